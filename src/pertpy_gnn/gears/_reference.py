"""Models trained by the published GEARS code (PyPI ``cell-gears``), loaded into our module.

``cell-gears`` saves a model as ``model.pt`` (a state dict) and ``config.pkl`` (its hyperparameters
and both graphs as torch tensors). Its network differs from the paper's in the gene embedding
(``MLP(ReLU(BN(E)) + 0.2 SGC(P))`` of two embedding tables) and in the uncertainty head (an MLP
shared by all genes); :class:`ReferenceGEARSModule` is our :class:`~pertpy_gnn.gears.GEARSModule`
with those two parts replaced, so everything else (perturbation GNN, compositional module, the
gene-specific and cross-gene decoders, training, prediction) is the one implementation.

Two behaviours of the published code are reachable by options, so that its predictions can be
reproduced number for number:

- ``coexpression='first_cell'``: its co-expression ``SGConv`` runs on a ``batch x K`` node set whose
  edges cover the first ``K`` nodes only, so only the first cell of a batch gets the graph
  convolution; the others get the linear layer alone (a node with only its self-loop).
- ``predict_batch_size``: its ``predict`` draws 300 control cells per perturbation and runs them as
  one batch, so its prediction is the mean of one convolved and 299 unconvolved ``zhat`` (plus the
  mean of the drawn cells): ``(zhat_conv + (B - 1) zhat_lin) / B``.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .._constants import GEARS_DATA_KEY
from .._pickle import UnsafePickleError, read_plain_pickle
from ._module import MLP, GEARSModule, GraphEncoder, _unit_rows, grid_relu

COEXPRESSION_KINDS = ("all", "first_cell")
#: the cell-gears ``config.pkl`` entries our module needs
_CONFIG_KEYS = (
    "hidden_size",
    "num_go_gnn_layers",
    "num_gene_gnn_layers",
    "uncertainty",
    "num_genes",
    "num_perts",
)
#: weight of the co-expression embedding in the published gene embedding (``pert_emb_lambda``)
POS_LAMBDA = 0.2


class ReferenceGeneEncoder(nn.Module):
    """The published gene embedding before its MLP: ``ReLU(BN(unit(E))) + 0.2 GNN(unit(P))``.

    ``GNN`` is the co-expression graph network (``'gcn'`` stack of :class:`GraphEncoder`: the
    published stacked ``SGConv`` layers). With ``convolve=False`` the propagation is skipped
    (``Linear`` layers alone), which is what the published code computes for every cell of a batch
    but the first.
    """

    def __init__(self, n_genes: int, dim: int, n_layers: int, edge_index, edge_weight):
        super().__init__()
        self.embedding = nn.Parameter(torch.randn(n_genes, dim))
        self.bn = nn.BatchNorm1d(dim)
        self.pos = GraphEncoder(n_genes, dim, n_layers, "gcn", edge_index, edge_weight)
        self.convolve = True

    def forward(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Gene embeddings (``K x d``, or the rows ``rows``)."""
        base = F.relu(self.bn(_unit_rows(self.embedding)))
        if self.convolve:
            pos = self.pos()
        else:
            pos = _unit_rows(self.pos.embedding)
            last = len(self.pos.lins) - 1
            for i, lin in enumerate(self.pos.lins):
                pos = lin(pos)
                pos = F.relu(pos) if i < last else pos
        h = base + POS_LAMBDA * pos
        return h if rows is None else h[rows]


class ReferenceGEARSModule(GEARSModule):
    """:class:`~pertpy_gnn.gears.GEARSModule` with the published gene embedding and uncertainty head.

    Parameters
    ----------
    n_genes, n_pert_nodes, gene_edge_index, gene_edge_weight, pert_edge_index, pert_edge_weight
        As in :class:`~pertpy_gnn.gears.GEARSModule`.
    hidden_dim, n_gene_gnn_layers, n_go_gnn_layers, uncertainty, gamma, direction_lambda, direction, direction_tau, uncertainty_reg
        As in :class:`~pertpy_gnn.gears.GEARSModule` (the GNNs are stacks of ``SGConv``-like
        layers with ReLU in between, as published; for one layer this is SGC).
    coexpression
        ``'all'`` (paper): every perturbation set gets the co-expression convolution;
        ``'first_cell'``: prediction reproduces the published first-cell-only convolution with the
        batch layout of ``predict_batch_size`` (prediction only: training refuses it).
    predict_batch_size
        Cells per batch in the published ``predict`` (300).
    """

    def __init__(
        self,
        n_genes: int,
        n_pert_nodes: int,
        gene_edge_index: torch.Tensor,
        gene_edge_weight: torch.Tensor,
        pert_edge_index: torch.Tensor,
        pert_edge_weight: torch.Tensor,
        *,
        hidden_dim: int = 64,
        n_gene_gnn_layers: int = 1,
        n_go_gnn_layers: int = 1,
        uncertainty: bool = False,
        gamma: float = 2.0,
        direction_lambda: float = 0.1,
        direction: Literal["tanh", "sign"] = "tanh",
        direction_tau: float = 0.1,
        uncertainty_reg: float = 1.0,
        coexpression: Literal["all", "first_cell"] = "all",
        predict_batch_size: int = 300,
    ):
        if coexpression not in COEXPRESSION_KINDS:
            raise ValueError(f"`coexpression` must be one of {COEXPRESSION_KINDS}, got {coexpression!r}.")
        if predict_batch_size < 1:
            raise ValueError(f"`predict_batch_size` must be at least 1, got {predict_batch_size}.")
        super().__init__(
            n_genes,
            n_pert_nodes,
            gene_edge_index,
            gene_edge_weight,
            pert_edge_index,
            pert_edge_weight,
            hidden_dim=hidden_dim,
            gnn="gcn",
            n_gene_gnn_layers=n_gene_gnn_layers,
            n_go_gnn_layers=n_go_gnn_layers,
            uncertainty=False,
            gamma=gamma,
            direction_lambda=direction_lambda,
            direction=direction,
            direction_tau=direction_tau,
            uncertainty_reg=uncertainty_reg,
        )
        d = hidden_dim
        self.gene_encoder = ReferenceGeneEncoder(
            n_genes, d, n_gene_gnn_layers, gene_edge_index, gene_edge_weight
        )
        self.uncertainty = uncertainty
        if uncertainty:
            self.unc_mlp = MLP([d, 2 * d, d, 1])
        self.coexpression, self.predict_batch_size = coexpression, predict_batch_size

    def _get_generative_input(self, tensors: dict, inference_outputs: dict, **kwargs) -> dict:
        # the shared uncertainty MLP reads the input of post_mlp, built here only where it is needed
        h = grid_relu(*inference_outputs["h_terms"]) if self.uncertainty else None
        return {"h_post": inference_outputs["h_post"], "h": h}

    def inference(self, pert_idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """As :meth:`GEARSModule.inference`; refuses training with ``coexpression='first_cell'``."""
        if self.training and self.coexpression == "first_cell":
            raise RuntimeError(
                "coexpression='first_cell' reproduces the published predictions only; train (fine-tune) a model "
                "loaded with coexpression='all' (the paper's model)."
            )
        return super().inference(pert_idx)

    def generative(
        self, h_post: torch.Tensor, h: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor | None]:
        """As :meth:`GEARSModule.generative`; the log-variance is the published shared MLP on ``h``."""
        unc, self.uncertainty = self.uncertainty, False  # the parent's gene-specific head is not used
        try:
            out = super().generative(h_post)
        finally:
            self.uncertainty = unc
        if unc:
            k, n, d = h.shape
            out["logvar"] = self.unc_mlp(h.reshape(k * n, d)).reshape(k, n).T
        return out

    def _delta(self, pert_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.generative(**self._get_generative_input({}, self.inference(pert_idx)))
        return out["zhat"], out["logvar"]

    def predict_delta(self, pert_idx: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``zhat`` and log-variance; with ``coexpression='first_cell'`` the published batch mixture.

        Always the plain ``generative(inference(...))`` path (keyword options of the parent's
        prediction path, e.g. a shared ``h_gene``, are ignored: the gene states depend on the layout).
        """
        if self.coexpression == "all":
            return self._delta(pert_idx)
        enc = self.gene_encoder
        try:
            enc.convolve = True
            z1, s1 = self._delta(pert_idx)
            enc.convolve = False
            z0, s0 = self._delta(pert_idx)
        finally:
            enc.convolve = True
        b = self.predict_batch_size
        z = (z1 + (b - 1) * z0) / b
        s = None if s1 is None else (s1 + (b - 1) * s0) / b
        return z, s


# ------------------------------------------------------------------------------------------ reading
def _storage_from_bytes(b: bytes):
    """A tensor storage pickled by torch (``torch.storage._load_from_bytes``), read with ``weights_only=True``."""
    storage = torch.load(io.BytesIO(b), weights_only=True)
    if not isinstance(storage, torch.storage.TypedStorage | torch.UntypedStorage):
        raise TypeError(f"expected a tensor storage, got {type(storage).__name__}")
    return storage


def _rebuild_tensor(storage, storage_offset, size, stride, *_unused):
    """``torch._utils._rebuild_tensor_v2`` for plain data: a tensor view of a storage, no hooks or metadata."""
    if not isinstance(storage, torch.storage.TypedStorage | torch.UntypedStorage):
        raise TypeError(f"expected a tensor storage, got {type(storage).__name__}")
    return torch._utils._rebuild_tensor(storage, int(storage_offset), tuple(size), tuple(stride))


#: the globals a torch tensor pickled by ``pickle`` needs, each mapped to a safe stand-in (``None``: itself)
_TENSOR_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("collections", "OrderedDict"): None,
}


def read_cellgears_config(path: str | os.PathLike) -> dict:
    """Read a cell-gears ``config.pkl``: plain data and torch tensors only, nothing else is run.

    The tensors (the two graphs) are pickled by torch as raw bytes in its own format, read here with
    ``torch.load(weights_only=True)``; any other class or function in the pickle is refused
    (:class:`~pertpy_gnn._pickle.UnsafePickleError`, naming the file).
    """
    config = read_plain_pickle(path, extra_globals=_TENSOR_GLOBALS)
    if not isinstance(config, dict):
        raise ValueError(
            f"{path}: expected the dict of a cell-gears config.pkl, got {type(config).__name__}."
        )
    missing = [
        k
        for k in (*_CONFIG_KEYS, "G_go", "G_go_weight", "G_coexpress", "G_coexpress_weight")
        if k not in config
    ]
    if missing:
        raise ValueError(
            f"{path} is not a cell-gears config.pkl: it lacks {missing}. Give the folder written by cell-gears' "
            "GEARS.save_model (model.pt + config.pkl)."
        )
    return config


def read_cellgears_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a cell-gears ``model.pt`` (state dict) with ``torch.load(weights_only=True)``; strip ``module.``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: a cell-gears model folder holds model.pt and config.pkl."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{path} could not be read as a torch state dict with weights_only=True ({type(e).__name__}: {e}). "
            "It is truncated, corrupt, or not a cell-gears model.pt."
        ) from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict of tensors (cell-gears model.pt).")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in state.items()}


def reference_pert_genes(data_path: str | os.PathLike) -> list[str]:
    """Nodes of cell-gears' perturbation graph (default graph), from its data folder.

    ``PertData.set_pert_genes``: the genes of ``essential_all_data_pert_genes.pkl`` with GO
    annotations in ``gene2go_all.pkl``, sorted.
    """
    data_path = Path(data_path)
    files = [data_path / "essential_all_data_pert_genes.pkl", data_path / "gene2go_all.pkl"]
    absent = [str(f) for f in files if not f.is_file()]
    if absent:
        raise FileNotFoundError(
            f"{absent} not found: give the cell-gears data folder that holds gene2go_all.pkl and "
            "essential_all_data_pert_genes.pkl, or the perturbation-graph genes themselves (`pert_genes=`)."
        )
    essential = read_plain_pickle(files[0])
    gene2go = read_plain_pickle(files[1])
    if not isinstance(gene2go, dict):
        raise ValueError(f"{files[1]} should hold a dict {{gene: GO terms}}, got {type(gene2go).__name__}.")
    return sorted({str(g) for g in essential if g in gene2go})


def _renorm(w: torch.Tensor) -> torch.Tensor:
    """What ``nn.Embedding(max_norm=1)`` does to its rows on lookup (rows above norm 1 scaled by ``1 / (norm + 1e-7)``).

    The result has every row below norm 1, where our :func:`_unit_rows` is the identity: the loaded
    module then computes exactly what the published lookup gives.
    """
    norm = w.norm(dim=1, keepdim=True)
    return torch.where(norm > 1.0, w / (norm + 1e-7), w)


def _mlp_state(prefix: str, state: dict, ours: str) -> dict:
    """Published ``MLP.network.<i>.*`` entries as ours (``<ours>.<i>.*``: same layer order)."""
    p = f"{prefix}.network."
    return {f"{ours}.{k[len(p) :]}": v for k, v in state.items() if k.startswith(p)}


def map_state_dict(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """The cell-gears ``GEARS_Model`` state dict as a :class:`ReferenceGEARSModule` state dict."""
    k, d = int(config["num_genes"]), int(config["hidden_size"])
    out = {
        "gene_encoder.embedding": _renorm(state["gene_emb.weight"]),
        "gene_encoder.pos.embedding": _renorm(state["emb_pos.weight"]),
        "pert_encoder.embedding": _renorm(state["pert_emb.weight"]),
        "w1": state["indv_w1"].reshape(k, d, 1),
        "b1": state["indv_b1"].reshape(k, 1, 1),
        "w2": state["indv_w2"].reshape(k, d + 1),
        "b2": state["indv_b2"].reshape(k, 1),
    }
    for bn_ref, bn_ours in (("bn_emb", "gene_encoder.bn"), ("bn_pert_base", "bn_post")):
        out |= {
            f"{bn_ours}.{n[len(bn_ref) + 1 :]}": v for n, v in state.items() if n.startswith(bn_ref + ".")
        }
    for i in range(int(config["num_gene_gnn_layers"])):
        out |= {
            f"gene_encoder.pos.lins.{i}.{p}": state[f"layers_emb_pos.{i}.lin.{p}"] for p in ("weight", "bias")
        }
    for i in range(int(config["num_go_gnn_layers"])):
        out |= {f"pert_encoder.lins.{i}.{p}": state[f"sim_layers.{i}.lin.{p}"] for p in ("weight", "bias")}
    for ref, ours in (
        ("emb_trans_v2", "gene_mlp"),
        ("pert_fuse", "pert_fuse"),
        ("recovery_w", "post_mlp"),
        ("cross_gene_state", "cross_gene"),
        ("uncertainty_w", "unc_mlp"),
    ):
        out |= _mlp_state(ref, state, ours)
    return out


def check_config(config: dict, path: Path, n_vars: int, n_pert_genes: int) -> None:
    """Clear errors where a cell-gears config cannot be mapped onto ``adata`` and the perturbation genes."""
    if config.get("no_perturb"):
        raise ValueError(
            f"{path}: a cell-gears model with no_perturb=True predicts no change; nothing to load."
        )
    if int(config["num_genes"]) != n_vars:
        raise ValueError(
            f"{path}: the model has {config['num_genes']} genes, adata has {n_vars}. Give the AnnData the model "
            "was trained on (pg.datasets.read_gears_data on its cell-gears data folder)."
        )
    if int(config["num_perts"]) != n_pert_genes:
        raise ValueError(
            f"{path}: the model's perturbation graph has {config['num_perts']} nodes, but {n_pert_genes} "
            "perturbation genes were given. Give the gene list cell-gears used (its data folder's "
            "gene2go_all.pkl and essential_all_data_pert_genes.pkl, or `pert_genes=`)."
        )


def graph_dict(genes, edge_index, edge_weight) -> dict:
    """A graph dict (``genes``, ``edge_index``, ``edge_weight``) from cell-gears' tensors."""
    return {
        "genes": np.asarray(genes).astype(str),
        "edge_index": np.asarray(torch.as_tensor(edge_index), dtype=np.int64).reshape(2, -1),
        "edge_weight": np.asarray(torch.as_tensor(edge_weight), dtype=np.float32).ravel(),
    }


__all__ = [
    "ReferenceGEARSModule",
    "ReferenceGeneEncoder",
    "read_cellgears_config",
    "read_cellgears_state",
    "reference_pert_genes",
    "map_state_dict",
    "UnsafePickleError",
]


# ------------------------------------------------------------------------------------------ the model
from ._model import GEARS  # noqa: E402 - after the module classes it uses


class ReferenceGEARS(GEARS):
    """A GEARS model with the published network's gene embedding and uncertainty head (cell-gears).

    Made by :meth:`pertpy_gnn.gears.GEARS.load_reference` from a cell-gears ``model.pt`` /
    ``config.pkl``; everything of :class:`~pertpy_gnn.gears.GEARS` applies (``predict``,
    ``predict_cells``, ``train`` to fine-tune, ``save``). Load a saved one with
    ``pg.gears.ReferenceGEARS.load(path, adata)``. See :class:`ReferenceGEARSModule` for the network
    and the options reproducing the published behaviour.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    hidden_dim, n_gene_gnn_layers, n_go_gnn_layers, uncertainty, gamma, direction_lambda, direction, direction_tau, uncertainty_reg
        As in :class:`~pertpy_gnn.gears.GEARS` (``gnn`` is the published ``SGConv`` stack).
    coexpression
        ``'all'`` (paper) or ``'first_cell'`` (published predictions, see :class:`ReferenceGEARSModule`).
    predict_batch_size
        Cells per batch of the published ``predict`` (300).
    go_graph, coexpression_graph
        The graphs (dicts) of the cell-gears ``config.pkl``.
    seed
        Seed of the (replaced) initial weights and of training.
    name
        Name of the predictor.
    """

    # GEARS.__init__ builds a plain module (its arguments are GEARS's), replaced below by the reference one
    _module_cls = GEARSModule
    name = "GEARS (cell-gears)"

    def __init__(
        self,
        adata,
        *,
        hidden_dim: int = 64,
        n_gene_gnn_layers: int = 1,
        n_go_gnn_layers: int = 1,
        uncertainty: bool = False,
        gamma: float = 2.0,
        direction_lambda: float = 0.1,
        direction: Literal["tanh", "sign"] = "tanh",
        direction_tau: float = 0.1,
        uncertainty_reg: float = 1.0,
        coexpression: Literal["all", "first_cell"] = "all",
        predict_batch_size: int = 300,
        go_graph: dict | None = None,
        coexpression_graph: dict | None = None,
        seed: int = 0,
        name: str = "GEARS (cell-gears)",
    ):
        if go_graph is None or coexpression_graph is None:
            raise ValueError(
                "ReferenceGEARS needs both graphs of the cell-gears model; make it with pg.gears.GEARS.load_reference."
            )
        super().__init__(
            adata,
            hidden_dim=hidden_dim,
            gnn="gcn",
            n_gene_gnn_layers=n_gene_gnn_layers,
            n_go_gnn_layers=n_go_gnn_layers,
            gamma=gamma,
            direction_lambda=direction_lambda,
            direction=direction,
            direction_tau=direction_tau,
            uncertainty_reg=uncertainty_reg,
            go_graph=go_graph,
            coexpression_graph=coexpression_graph,
            seed=seed,
            name=name,
        )
        go, co = (
            self.init_params_["non_kwargs"]["go_graph"],
            self.init_params_["non_kwargs"]["coexpression_graph"],
        )
        self.init_params_ = self._get_init_params(locals())
        self.init_params_["non_kwargs"].update(go_graph=go, coexpression_graph=co)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.module = ReferenceGEARSModule(
                adata.n_vars,
                len(self.go_genes),
                torch.from_numpy(co["edge_index"]),
                torch.from_numpy(co["edge_weight"]),
                torch.from_numpy(go["edge_index"]),
                torch.from_numpy(go["edge_weight"]),
                hidden_dim=hidden_dim,
                n_gene_gnn_layers=n_gene_gnn_layers,
                n_go_gnn_layers=n_go_gnn_layers,
                uncertainty=uncertainty,
                gamma=gamma,
                direction_lambda=direction_lambda,
                direction=direction,
                direction_tau=direction_tau,
                uncertainty_reg=uncertainty_reg,
                coexpression=coexpression,
                predict_batch_size=predict_batch_size,
            )
        self._model_summary_string = (
            f"{name}: {adata.n_vars} genes, {len(self.go_genes)} perturbable genes (GO graph), hidden_dim={hidden_dim}, "
            f"published network (cell-gears), coexpression={coexpression!r}, uncertainty={uncertainty}"
        )


def load_reference(
    path: str | os.PathLike,
    adata,
    *,
    pert_genes=None,
    data_path: str | os.PathLike | None = None,
    coexpression: Literal["all", "first_cell"] = "all",
    predict_batch_size: int = 300,
    direction: Literal["tanh", "sign"] = "tanh",
    layer: str | None = None,
    name: str = "GEARS (cell-gears)",
) -> ReferenceGEARS:
    """See :meth:`pertpy_gnn.gears.GEARS.load_reference`."""
    from .._constants import PERT_KEY, SPLIT_KEY
    from .._utils import logger
    from ..pp._perturbations import get_parsed
    from ._constants import TRAIN

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} is not a folder: give the folder written by cell-gears' GEARS.save_model (model.pt, config.pkl)."
        )
    config = read_cellgears_config(path / "config.pkl")
    state = read_cellgears_state(path / "model.pt")
    if pert_genes is None:
        if data_path is None:
            info = adata.uns.get(GEARS_DATA_KEY, {})
            data_path = info.get("data_path") if isinstance(info, dict) else None
        if data_path is None:
            raise ValueError(
                "The genes of the model's perturbation graph are needed: pass `data_path=` (the cell-gears data folder "
                "with gene2go_all.pkl and essential_all_data_pert_genes.pkl), `pert_genes=`, or read adata with "
                "pg.datasets.read_gears_data from that folder."
            )
        pert_genes = reference_pert_genes(data_path)
    pert_genes = [str(g) for g in pert_genes]
    check_config(config, path / "config.pkl", adata.n_vars, len(pert_genes))
    go = graph_dict(pert_genes, config["G_go"], config["G_go_weight"])
    co = graph_dict(
        np.asarray(adata.var_names).astype(str), config["G_coexpress"], config["G_coexpress_weight"]
    )
    if PERT_KEY not in adata.obs:
        raise KeyError(
            f"adata has no obs[{PERT_KEY!r}]: read the cell-gears data folder with pg.datasets.read_gears_data, or "
            "run pg.pp.parse_perturbations(adata) and pg.pp.split_perturbations(adata) first."
        )
    ReferenceGEARS.setup_anndata(adata, layer=layer)
    model = ReferenceGEARS(
        adata,
        hidden_dim=int(config["hidden_size"]),
        n_gene_gnn_layers=int(config["num_gene_gnn_layers"]),
        n_go_gnn_layers=int(config["num_go_gnn_layers"]),
        uncertainty=bool(config["uncertainty"]),
        direction_lambda=float(config.get("direction_lambda", 0.1)),
        uncertainty_reg=float(config.get("uncertainty_reg", 1.0)),
        direction=direction,
        coexpression=coexpression,
        predict_batch_size=predict_batch_size,
        go_graph=go,
        coexpression_graph=co,
        name=name,
    )
    mapped = map_state_dict(state, config)
    ours = model.module.state_dict()
    ours_only = {"control_mean", "uncertainty_stats"}  # ours: set from adata below / not in cell-gears
    missing = sorted(
        set(ours) - set(mapped) - ours_only - {k for k in ours if k.endswith("num_batches_tracked")}
    )
    if missing:
        raise ValueError(
            f"{path / 'model.pt'} lacks the weights {missing[:10]} of a cell-gears GEARS_Model with this config.pkl: "
            "the two files do not belong together, or the file is not a cell-gears model."
        )
    mapped = {k: v for k, v in mapped.items() if k in ours}
    bad = [k for k, v in mapped.items() if tuple(v.shape) != tuple(ours[k].shape)]
    if bad:
        raise ValueError(
            f"{path / 'model.pt'}: weights {bad[:10]} have shapes that do not match config.pkl "
            f"({[tuple(mapped[k].shape) for k in bad[:3]]} vs {[tuple(ours[k].shape) for k in bad[:3]]})."
        )
    model.module.load_state_dict(mapped, strict=False)
    model.module.eval()
    col, sets = get_parsed(adata)
    ctrl = model._control_cells(adata, train_only=SPLIT_KEY in adata.obs)
    x = model._matrix()
    model.module.control_mean.copy_(
        torch.as_tensor(np.asarray(x[ctrl].mean(axis=0), dtype=np.float32).ravel())
    )
    if SPLIT_KEY in adata.obs:
        train = adata.obs[SPLIT_KEY].astype(str).to_numpy() == TRAIN
        codes = np.unique(col.cat.codes.to_numpy()[train])
        model.seen_genes_ = sorted({g for c in codes for g in sets[c]})
        if model.module.uncertainty:  # z-scores against the training cells, as for a model trained here
            table = model._pert_index(sets)
            known = (table >= 0).sum(1).numpy() == np.array([len(st) for st in sets])
            cell_codes = col.cat.codes.to_numpy()[train]
            model._set_uncertainty_stats(
                SimpleNamespace(
                    codes=torch.as_tensor(cell_codes[known[cell_codes]], dtype=torch.long), pert_table=table
                )
            )
    model.is_trained_ = True
    logger.info(
        "Loaded the cell-gears model of %s (%d genes, %d perturbation-graph genes).",
        path,
        adata.n_vars,
        len(pert_genes),
    )
    return model
