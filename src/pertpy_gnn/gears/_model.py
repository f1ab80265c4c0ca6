"""GEARS as an scvi-tools model: AnnData registration, training, prediction, save / load."""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Sequence
from typing import Literal

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from scvi.data import AnnDataManager
from scvi.data.fields import LayerField, NumericalObsField
from scvi.model.base import BaseModelClass

from .._constants import (
    COEXPR_GRAPH_KEY,
    CONTEXT_KEY,
    CONTEXT_SEP,
    CONTROL,
    DE_KEY,
    DELIM,
    GEARS_PRED_LAYER,
    GO_GRAPH_KEY,
    PERT_KEY,
    SPLIT_KEY,
)
from .._prediction import PREDICTION_UNS_KEY, make_prediction_adata, skipped_frame
from .._training import _training_data
from .._utils import check_overwrite, get_matrix, group_means, logger
from ..pp._perturbations import (
    Groups,
    as_perturbation_sets,
    canonical_name,
    get_context,
    get_parsed,
    layer_of,
)
from ._constants import REGISTRY_KEYS, TENSOR_KEYS, TEST, TRAIN, VAL
from ._data import ExpressionRows, TensorDict, TrainCells, make_loader, make_set_loader
from ._module import GEARSModule
from ._training_plan import GEARSTrainingPlan

#: number of top DE genes scored by the validation MSE
N_VAL_DE = 20


class _ObsColumnField(NumericalObsField):
    """An existing categorical ``obs`` column, registered in place: no ``_scvi_*`` copy is written to ``obs``."""

    def register_field(self, adata: AnnData) -> dict:
        super().register_field(adata)
        col = adata.obs[self.attr_key]
        return {"categories": np.asarray(pd.Categorical(col).categories.astype(str))}

    def get_summary_stats(self, state_registry: dict) -> dict:
        return {f"n_{self.registry_key}": len(state_registry["categories"])}


def _resolve_graph(adata: AnnData, graph, what: str, fix: str) -> dict:
    """A graph dict (``genes``, ``edge_index``, ``edge_weight``) from ``adata.uns[key]`` or given, validated."""
    if isinstance(graph, str):
        if graph not in adata.uns:
            raise KeyError(
                f"No {what} graph in adata.uns[{graph!r}]: run {fix} first (or pass the graph dict itself)."
            )
        graph = adata.uns[graph]
    if not isinstance(graph, dict) or not {"genes", "edge_index", "edge_weight"} <= set(graph):
        raise ValueError(
            f"The {what} graph must be a dict with 'genes', 'edge_index' and 'edge_weight', as written by {fix}."
        )
    genes = np.asarray(graph["genes"]).astype(str)
    edge_index = np.asarray(graph["edge_index"], dtype=np.int64)
    edge_weight = np.asarray(graph["edge_weight"], dtype=np.float32)
    if edge_index.ndim != 2 or edge_index.shape[0] != 2 or edge_weight.shape != (edge_index.shape[1],):
        raise ValueError(
            f"The {what} graph has edge_index of shape {edge_index.shape} and edge_weight of shape "
            f"{edge_weight.shape}; expected (2, E) and (E,). Recompute it with {fix}."
        )
    if edge_index.size and (edge_index.min() < 0 or edge_index.max() >= len(genes)):
        raise ValueError(
            f"The {what} graph has edge indices outside its {len(genes)} nodes. Recompute it with {fix}."
        )
    return {"genes": genes, "edge_index": edge_index, "edge_weight": edge_weight}


def _check_gene_embeddings(embeddings, adata: AnnData) -> np.ndarray:
    """``embeddings`` as a ``float32`` ``n_vars x D`` array with at least one finite row, else a clear error."""
    e = np.array(embeddings, dtype=np.float32)  # a copy: the model saves it
    if e.ndim != 2 or e.shape[0] != adata.n_vars or e.shape[1] == 0:
        raise ValueError(
            f"gene_embeddings must be an n_vars x d matrix ({adata.n_vars} rows, aligned to adata.var_names), got "
            f"shape {e.shape}; make it with pg.tl.compass_gene_embeddings(model, adata)."
        )
    if not np.isfinite(e).all(1).any():
        raise ValueError(
            "gene_embeddings has no finite row: no gene of adata has an embedding. Check that the embeddings "
            "are aligned to adata.var_names (pg.tl.compass_gene_embeddings(model, adata))."
        )
    return e


def _train_val_means(
    x, codes: np.ndarray, train_mask: np.ndarray, val_mask: np.ndarray, n_groups: int
) -> tuple[np.ndarray, np.ndarray]:
    """Group means (float32, ``n_groups x n_vars``) of the training cells and of the validation cells, one pass.

    The two masks are disjoint: validation cells count as groups ``n_groups + code``, so each mean
    is the one :func:`~pertpy_gnn._utils.group_means` gives for its mask alone.
    """
    both = np.where(train_mask, codes, np.where(val_mask, codes + n_groups, -1))
    means = group_means(x, both, 2 * n_groups)
    return means[:n_groups], means[n_groups:]


def _validation_batch(
    adata: AnnData,
    codes: np.ndarray,
    val_mask: np.ndarray,
    val_means: np.ndarray,
    labels,
    what: str,
    hint: str,
) -> tuple[np.ndarray, dict | None]:
    """Validation groups and their top-DE targets: ``(val_codes, {DE_IDX, DE_MEAN})``, ``None`` if none.

    ``val_means`` holds each group's mean over its validation cells (``n_groups x n_vars``).
    """
    val_codes = np.unique(codes[val_mask])
    if not val_codes.size:
        logger.warning("No validation perturbations: training keeps the last epoch (no model selection).")
        return val_codes, None
    if DE_KEY not in adata.uns:
        raise KeyError(
            f"Validation needs the top DE genes in adata.uns[{DE_KEY!r}]: run pg.pp.rank_de_genes(adata) first."
        )
    de = adata.uns[DE_KEY]["indices"]
    names = [labels[c] for c in val_codes]
    missing = [n for n in names if n not in de.index]
    if missing:
        raise KeyError(f"adata.uns[{DE_KEY!r}] has no DE genes for validation {what} {missing[:10]}: {hint}")
    de_idx = torch.from_numpy(de.loc[names].to_numpy()[:, :N_VAL_DE].astype(np.int64))
    val_means = torch.from_numpy(val_means[val_codes])
    return val_codes, {TENSOR_KEYS.DE_IDX: de_idx, TENSOR_KEYS.DE_MEAN: val_means.gather(1, de_idx)}


@contextlib.contextmanager
def _quiet(verbose: bool):
    """Silence Lightning's banner (and its worker-count hint: loading is single-process on purpose)."""
    loggers = [
        logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "lightning_fabric")
    ]
    levels = [lg.level for lg in loggers]
    if not verbose:
        for lg in loggers:
            lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")
            warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


class GEARS(BaseModelClass):
    """GEARS (Roohani, Huang & Leskovec 2023): predict the expression outcome of gene perturbation sets.

    A GNN over the gene co-expression graph embeds the ``K`` measured genes, a GNN over the GO
    similarity graph embeds every perturbable gene (all nodes of the GO graph, so genes never
    perturbed in training, and genes outside ``var_names``, can be perturbed). A perturbation set
    of any size is the sum of its gene embeddings through an MLP; it shifts every gene embedding,
    and a gene-specific decoder with a cross-gene state predicts the change ``zhat`` over a control
    cell. See :class:`~pertpy_gnn.gears.GEARSModule` for the network and its loss, and the Notes
    for where this implementation departs from the published code.

    Run :meth:`setup_anndata` first (or use :func:`pertpy_gnn.tl.train_gears`). The model writes
    nothing into ``adata`` apart from the bookkeeping keys every scvi-tools model adds
    (``uns['_scvi_uuid']``, ``uns['_scvi_manager_uuid']``). :meth:`save` / :meth:`load` keep the
    graphs and gene embeddings (init parameters), the name, the learned state, ``seen_genes_``, ``history_`` and the training
    uncertainty statistics, so a loaded model predicts exactly what the saved one did.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`, holding the graphs.
    hidden_dim
        Embedding size ``d`` (paper: 64).
    gnn
        ``'sgc'`` (paper's choice), ``'gcn'`` or ``'gat'``.
    n_gene_gnn_layers, n_go_gnn_layers
        GNN layers over the co-expression and GO graphs (paper: 1 each).
    uncertainty
        Learn the per-gene log-variance ``s_u`` and report its mean per set at prediction.
    gamma
        Autofocus exponent (loss ``|g - g_hat|^(2 + gamma)``, paper: 2).
    direction_lambda
        Weight of the direction term (paper: 0.1).
    direction
        ``'sign'`` (published, default; its gradient is zero, so the term trains nothing) or
        ``'tanh'`` (a differentiable surrogate; it pulls predictions of zero-inflated genes toward
        the sign of most cells rather than the mean, see ``docs/methods.md``).
    direction_tau
        Temperature of the ``tanh`` surrogate.
    uncertainty_reg
        Weight of the uncertainty term (published default 1).
    go_graph
        Key in ``adata.uns`` of the GO graph (:func:`pertpy_gnn.pp.go_graph`), or the graph dict.
    coexpression_graph
        Key in ``adata.uns`` of the co-expression graph over ``var_names``
        (:func:`pertpy_gnn.pp.coexpression_graph`), or the graph dict. Not used, and not needed,
        with ``gene_embeddings``.
    seed
        Seed of the weight initialization and (by default) of training; the global RNG is not touched.
    gene_embeddings
        ``n_vars x D`` matrix aligned to ``var_names``, e.g.
        ``pg.tl.compass_gene_embeddings(...)``; replaces the co-expression GNN gene embedding by
        ``unit(E) W + b`` with ``W, b`` learned (Yang et al. 2024, Fig. 5a; see
        :class:`~pertpy_gnn.gears._module.PretrainedGeneEncoder`). ``NaN`` rows = genes without one
        get a learned embedding. Saved with the model.
    freeze_gene_embeddings
        Keep ``gene_embeddings`` fixed (only the projection is trained); ``False`` fine-tunes them.
    anchor
        ``None`` (default): the paper's GEARS. ``'additive'``: baseline-anchored GEARS, the network
        predicts a residual over the additive prediction (sum of the training single-gene changes)
        for sets whose genes were all seen as training singles, and over the training mean change
        otherwise; ``'train_mean'``: over the training mean change for every set. The anchor is
        computed from the training cells when :meth:`train` starts and saved with the model. In
        training, a single's own change is left out of its anchor (it gets the training mean, as
        an unseen single does), so that the residual learns what an unseen single needs. See
        ``docs/methods.md`` ("Baseline-anchored GEARS").
    anchor_reg
        Weight of the penalty ``mean(residual^2)`` that pulls an anchored model toward its anchor.
    use_go_graph
        Ablation switch (paper Extended Data Fig. 4, "No GO Graph"). ``False`` removes the GNN over
        the GO graph: every gene perturbed in ``adata`` gets a learned embedding of its own
        (:class:`~pertpy_gnn.gears._module.LearnedEncoder`), the GO graph is not needed, and sets
        with a gene not perturbed in training are refused at prediction (a ``ValueError``; dropped
        with ``skip_unknown=True``), since nothing links such a gene to the trained ones.
    use_coexpression_graph
        Ablation switch ("No Co-Express Graph"). ``False`` replaces the GNN over the co-expression
        graph by a learned embedding per measured gene; the co-expression graph is not needed.
    cross_gene
        Ablation switch ("No Cross-gene"). ``False`` removes the cross-gene MLP: each gene's output
        layer sees only its own effect, ``zhat_u = w_u z_u + b_u``.
    loss
        ``'autofocus'`` (paper: autofocus ``|g - g_hat|^(2 + gamma)`` plus ``direction_lambda`` times
        the direction term) or ``'mse'`` (ablation "MSE Loss": ``(g - g_hat)^2`` alone).
    name
        Name of the predictor (``.name``: model names in :func:`pertpy_gnn.tl.evaluate` tables and
        in predictions); default ``'GEARS'``, ``'GEARS+embeddings'`` with ``gene_embeddings``, and
        the ablations in brackets, e.g. ``'GEARS[no GO graph]'``, followed by
        `` (anchored: <anchor>)`` with an anchor.

    Notes
    -----
    Where this implementation departs from the published GEARS code (``snap-stanford/GEARS``):

    - The co-expression GNN runs once per step on the ``K`` gene nodes and is shared by every cell
      (the published code runs it on a ``batch x K`` node set whose edges cover the first ``K``
      nodes only, so only the first cell of a batch got the graph convolution).
    - ``h_gene = MLP(GNN(x_gene))`` as in the paper (the published code adds
      ``0.2 * GNN(x_pos)`` of a second embedding to ``ReLU(BN(x_gene))``); the uncertainty head is
      the paper's gene-specific linear layer on ``h_post`` (published: an MLP shared by all genes).
    - Loss: the direction term is the published one by default (``direction='sign'``: its
      gradient is zero); ``direction='tanh'`` gives a differentiable surrogate
      ``tanh((g_hat - c) / tau)``, which on zero-inflated genes fits the sign of most cells rather
      than the mean (it kept GEARS from fitting its own training perturbations, issue 11); ``c`` is
      the mean control expression, as published. The uncertainty term is
      ``exp(-s) |g - g_hat|^(2 + gamma) + s`` (Kendall & Gal), added with weight
      ``uncertainty_reg`` to the autofocus and direction terms; the published term lacks ``+ s``, so
      nothing stops ``s`` from growing without bound. With ``+ s`` its minimum is at
      ``s = log |g - g_hat|^(2 + gamma)``.
    - A training step evaluates the network once per distinct perturbation set of its batch
      (``zhat`` depends on the set only), so batch-norm statistics weight each set of the batch
      once rather than once per cell.
    - Validation scores each validation perturbation with ``zhat`` + the mean of the training
      control cells (exactly the published average over random control partners, in expectation)
      over its top 20 DE genes from ``adata.uns['pg_de_genes']``; the epoch with the lowest mean
      MSE is kept (in memory) and restored after training.
    - Training and validation perturbations with a gene absent from the GO graph are left out
      with a warning (as published); they are listed in ``train_summary_``.
    - Data-parallel training (``train(strategy='ddp', devices=n)``, gloo on CPU): every process
      draws the same seeded batches and trains on its own shard (every ``n``-th batch), gradients
      are averaged, batch-norm statistics are rank 0's, and all processes end with the same
      parameters (tested with two CPU processes, ``tests/test_gears_ddp.py``).

    Examples
    --------
    >>> pg.gears.GEARS.setup_anndata(adata)
    >>> model = pg.gears.GEARS(adata)
    >>> model.train(max_epochs=20)
    >>> pred = model.predict(["CBL+CNN1", "FOXA1+HOXB9"])
    """

    _module_cls = GEARSModule
    #: name of the predictor (an instance has its own: the ``name`` argument)
    name = "GEARS"

    def __init__(
        self,
        adata: AnnData,
        *,
        hidden_dim: int = 64,
        gnn: Literal["sgc", "gcn", "gat"] = "sgc",
        n_gene_gnn_layers: int = 1,
        n_go_gnn_layers: int = 1,
        uncertainty: bool = False,
        gamma: float = 2.0,
        direction_lambda: float = 0.1,
        direction: Literal["tanh", "sign"] = "sign",
        direction_tau: float = 0.1,
        uncertainty_reg: float = 1.0,
        go_graph: str | dict = GO_GRAPH_KEY,
        coexpression_graph: str | dict | None = COEXPR_GRAPH_KEY,
        seed: int = 0,
        gene_embeddings: np.ndarray | None = None,
        freeze_gene_embeddings: bool = True,
        anchor: Literal["additive", "train_mean"] | None = None,
        anchor_reg: float = 10.0,
        use_go_graph: bool = True,
        use_coexpression_graph: bool = True,
        cross_gene: bool = True,
        loss: Literal["autofocus", "mse"] = "autofocus",
        name: str | None = None,
    ):
        super().__init__(adata)
        if gene_embeddings is not None:
            gene_embeddings = _check_gene_embeddings(gene_embeddings, adata)
        if use_go_graph:
            go = _resolve_graph(adata, go_graph, "GO", "pg.pp.go_graph(adata)")
        elif isinstance(go_graph, dict) and "genes" in go_graph:  # a saved model: its own gene list
            go = {
                "genes": np.asarray(go_graph["genes"]).astype(str),
                "edge_index": np.zeros((2, 0), dtype=np.int64),
                "edge_weight": np.zeros(0, dtype=np.float32),
            }
        else:  # ablation: one learned embedding per gene perturbed anywhere in adata
            _, parsed_sets = get_parsed(adata)
            go = {
                "genes": np.asarray(sorted({g for s in parsed_sets for g in s}), dtype=str),
                "edge_index": np.zeros((2, 0), dtype=np.int64),
                "edge_weight": np.zeros(0, dtype=np.float32),
            }
        co = None
        if gene_embeddings is None and use_coexpression_graph:
            co = _resolve_graph(adata, coexpression_graph, "co-expression", "pg.pp.coexpression_graph(adata)")
            if len(co["genes"]) != adata.n_vars or not np.array_equal(
                co["genes"], np.asarray(adata.var_names).astype(str)
            ):
                raise ValueError(
                    "The co-expression graph's genes are not adata.var_names (in order). Recompute it on this "
                    "AnnData: pg.pp.coexpression_graph(adata, overwrite=True)."
                )
        if name is None:
            name = "GEARS" if gene_embeddings is None else "GEARS+embeddings"
            ablated = [
                label
                for label, off in (
                    ("no GO graph", not use_go_graph),
                    ("no co-expression graph", not use_coexpression_graph and gene_embeddings is None),
                    ("no cross-gene", not cross_gene),
                    ("MSE loss", loss == "mse"),
                )
                if off
            ]
            if ablated:
                name += f"[{', '.join(ablated)}]"
            name += f" (anchored: {anchor})" if anchor is not None else ""
        self.name = name
        self.init_params_ = self._get_init_params(locals())
        # the graphs and embeddings are saved with the model (init params): loading does not depend on adata.uns
        self.init_params_["non_kwargs"].update(go_graph=go, coexpression_graph=co)
        self.go_genes = go["genes"]
        self._go_index = pd.Index(self.go_genes)
        if self._go_index.has_duplicates:
            raise ValueError("The GO graph has duplicated gene names. Recompute it with pg.pp.go_graph.")
        self._seed = seed
        ctx = get_context(adata)
        #: contexts of the training data (empty: one context, the paper's model)
        self.contexts_: list[str] = [] if ctx is None else [str(c) for c in ctx.cat.categories]
        if anchor is not None and len(self.contexts_) > 1:
            raise ValueError(
                f"anchor={anchor!r} is not available for data with several cell contexts "
                f"({len(self.contexts_)} in obs['pg_context']): the anchor pools the contexts. Use anchor=None "
                "(the context-aware GEARS) or fit a per-context baseline with pg.tl.fit_baseline."
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.module = self._module_cls(
                adata.n_vars,
                len(self.go_genes),
                None if co is None else torch.from_numpy(co["edge_index"]),
                None if co is None else torch.from_numpy(co["edge_weight"]),
                torch.from_numpy(go["edge_index"]),
                torch.from_numpy(go["edge_weight"]),
                hidden_dim=hidden_dim,
                gnn=gnn,
                n_gene_gnn_layers=n_gene_gnn_layers,
                n_go_gnn_layers=n_go_gnn_layers,
                uncertainty=uncertainty,
                gamma=gamma,
                direction_lambda=direction_lambda,
                direction=direction,
                direction_tau=direction_tau,
                uncertainty_reg=uncertainty_reg,
                gene_embeddings=None if gene_embeddings is None else torch.from_numpy(gene_embeddings),
                freeze_gene_embeddings=freeze_gene_embeddings,
                anchor=anchor,
                anchor_reg=anchor_reg,
                n_contexts=len(self.contexts_),
                use_go_graph=use_go_graph,
                use_coexpression_graph=use_coexpression_graph,
                cross_gene=cross_gene,
                loss=loss,
            )
        self.seen_genes_: list[str] = []
        self.train_summary_: dict = {}
        self.best_epoch_ = -1
        self._model_summary_string = (
            f"{name}: {adata.n_vars} genes, {len(self.go_genes)} perturbable genes (GO graph), hidden_dim={hidden_dim}, "
            f"gnn={gnn}, uncertainty={uncertainty}"
        )
        if anchor is not None:
            self._model_summary_string += f", anchored on {anchor} (residual penalty {anchor_reg:g})"
        if self.contexts_:
            self._model_summary_string += f", {len(self.contexts_)} contexts (context embedding)"
        if gene_embeddings is not None:
            n_missing = int((~np.isfinite(gene_embeddings).all(1)).sum())
            self._model_summary_string += (
                f", gene embeddings d={gene_embeddings.shape[1]} "
                f"({'frozen' if freeze_gene_embeddings else 'fine-tuned'}, {n_missing} genes without one learned)"
            )

    # ------------------------------------------------------------------ cell-gears models
    @classmethod
    def load_reference(
        cls,
        path,
        adata: AnnData,
        *,
        pert_genes: Sequence[str] | None = None,
        data_path=None,
        coexpression: Literal["all", "first_cell"] = "all",
        predict_batch_size: int = 300,
        direction: Literal["tanh", "sign"] = "tanh",
        layer: str | None = None,
        name: str = "GEARS (cell-gears)",
    ):
        """Load a model trained and saved by the published GEARS code (PyPI ``cell-gears``, ``save_model``).

        ``config.pkl`` is read by a restricted unpickler (plain data, and torch tensors read with
        ``weights_only=True``; anything else is refused with an error naming the file), ``model.pt``
        with ``torch.load(weights_only=True)``. The weights are mapped into our module with the
        published gene embedding and uncertainty head
        (:class:`~pertpy_gnn.gears._reference.ReferenceGEARSModule`).

        Parameters
        ----------
        path
            Folder written by cell-gears' ``GEARS.save_model`` (``model.pt``, ``config.pkl``).
        adata
            The data the model was trained on, with cell-gears' genes in its order: best
            :func:`pertpy_gnn.datasets.read_gears_data` of its data folder (perturbations parsed,
            cell-gears' split in ``obs['pg_split']``).
        pert_genes
            Genes of the model's perturbation (GO) graph, in cell-gears' order. Default: from
            ``data_path``.
        data_path
            cell-gears data folder with ``gene2go_all.pkl`` and ``essential_all_data_pert_genes.pkl``
            (its default perturbation graph); default the one recorded by ``read_gears_data``.
        coexpression
            ``'all'`` (the paper, default): every set gets the co-expression convolution.
            ``'first_cell'``: the published code, where only the first cell of a batch gets it; with
            ``predict_batch_size`` this reproduces cell-gears' ``predict`` (prediction only).
        predict_batch_size
            Cells per batch of cell-gears' ``predict`` (300 control cells, one batch).
        direction
            Direction term for fine-tuning: ``'tanh'`` (default) or ``'sign'`` (published, no gradient).
        layer
            Layer with the expression (as in :meth:`setup_anndata`).
        name
            Name of the predictor.

        Returns
        -------
        A trained :class:`~pertpy_gnn.gears._reference.ReferenceGEARS` (a :class:`GEARS`) registered
        on ``adata``. ``predict`` gives ``zhat`` + the mean of drawn control cells, as cell-gears;
        with ``coexpression='first_cell'`` and the same control cells, cell-gears' own numbers.
        """
        from ._reference import load_reference

        return load_reference(
            path,
            adata,
            pert_genes=pert_genes,
            data_path=data_path,
            coexpression=coexpression,
            predict_batch_size=predict_batch_size,
            direction=direction,
            layer=layer,
            name=name,
        )

    # ------------------------------------------------------------------ setup
    @classmethod
    def setup_anndata(cls, adata: AnnData, *, layer: str | None = None, **kwargs) -> None:
        """Register the expression, the canonical perturbation column and the split of ``adata``.

        Parameters
        ----------
        adata
            AnnData parsed by :func:`pertpy_gnn.pp.parse_perturbations` and split by
            :func:`pertpy_gnn.pp.split_perturbations`.
        layer
            Layer with log-normalized expression; by default the one recorded by
            ``parse_perturbations`` (``X`` unless it was given a layer).
        **kwargs
            Passed to :meth:`scvi.data.AnnDataManager.register_fields` (used by :meth:`load`).

        Returns
        -------
        ``None``. Registers ``X`` / ``layers[layer]``, ``obs['pg_perturbation']``, ``obs['pg_split']``
        (and ``obs['pg_context']`` for data parsed with a ``context_key``) with an :class:`~scvi.data.AnnDataManager`; no column or layer is written into ``adata``.
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        get_parsed(adata)
        if SPLIT_KEY not in adata.obs:
            raise KeyError(
                f"No split: obs[{SPLIT_KEY!r}] is missing. Run pg.pp.split_perturbations(adata) first "
                "(kind='simulation' reproduces the GEARS paper's split)."
            )
        bad = sorted(set(adata.obs[SPLIT_KEY].astype(str).unique()) - {TRAIN, VAL, TEST})
        if bad:
            raise ValueError(
                f"obs[{SPLIT_KEY!r}] has values {bad}; only 'train', 'val' and 'test' are allowed."
            )
        layer = layer_of(adata) if layer is None else layer
        if layer is not None and layer not in adata.layers:
            raise KeyError(f"Layer {layer!r} not found; available layers: {list(adata.layers)}.")
        fields = [
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=False),
            _ObsColumnField(REGISTRY_KEYS.PERT_KEY, PERT_KEY),
            _ObsColumnField(REGISTRY_KEYS.SPLIT_KEY, SPLIT_KEY),
        ]
        if get_context(adata) is not None:
            fields.append(_ObsColumnField(REGISTRY_KEYS.CONTEXT_KEY, CONTEXT_KEY))
        adata_manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        adata_manager.register_fields(adata, **kwargs)
        cls.register_manager(adata_manager)

    # ------------------------------------------------------------------ properties
    @property
    def seen_genes(self) -> set[str]:
        """Genes seen perturbed in training."""
        return set(self.seen_genes_)

    @property
    def perturbable_genes(self) -> np.ndarray:
        """Genes that can be perturbed: the nodes of the GO graph."""
        return self.go_genes

    def _matrix(self, adata: AnnData | None = None):
        adata = self.adata if adata is None else adata
        return get_matrix(adata, self.adata_manager.data_registry[REGISTRY_KEYS.X_KEY].attr_key)

    def _pert_index(self, sets: Sequence[tuple[str, ...]]) -> torch.Tensor:
        """``len(sets) x max_set`` GO-node indices (``-1`` for padding and for genes not in the graph)."""
        lengths = np.fromiter((len(s) for s in sets), dtype=np.int64, count=len(sets))
        out = np.full((len(sets), max(int(lengths.max(initial=0)), 1)), -1, dtype=np.int64)
        genes = [g for s in sets for g in s]
        if genes:  # one look-up for the genes of all sets
            rows = np.repeat(np.arange(len(sets)), lengths)
            cols = np.arange(len(genes)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            out[rows, cols] = self._go_index.get_indexer(genes)
        return torch.from_numpy(out)

    @staticmethod
    def _in_graph(sets: Sequence[tuple[str, ...]], table: torch.Tensor) -> np.ndarray:
        """Whether every gene of each set is a GO-graph node, from its rows of :meth:`_pert_index`."""
        lengths = np.fromiter((len(s) for s in sets), dtype=np.int64, count=len(sets))
        idx = table.numpy()
        return ((idx >= 0) | (np.arange(idx.shape[1]) >= lengths[:, None])).all(1)

    # ------------------------------------------------------------------ training
    def _training_data(self, seed: int):
        """Training cells, validation perturbations and the loss tables, from the registered AnnData."""
        adata = self.adata
        col, sets = get_parsed(adata)
        cats = list(col.cat.categories)
        codes = col.cat.codes.to_numpy().astype(np.int64)
        split = adata.obs[SPLIT_KEY].astype(str).to_numpy()
        x = self._matrix()
        ctrl_code = cats.index(CONTROL)
        pert_table = self._pert_index(sets)
        known = self._in_graph(sets, pert_table)
        used = np.isin(split, [TRAIN, VAL])
        excluded = sorted({cats[c] for c in np.unique(codes[used & ~known[codes]])})
        if excluded:
            logger.warning(
                "Excluding the cells of %d train/val perturbations with genes absent from the GO graph (GEARS cannot "
                "embed them): %s",
                len(excluded),
                excluded[:20],
            )
        is_ctrl = codes == ctrl_code
        control_cells = np.flatnonzero(is_ctrl & (split == TRAIN))
        if control_cells.size == 0:
            raise ValueError(
                "No control cells in the training split; pg.pp.split_perturbations puts them in 'train'."
            )
        train_cells = np.flatnonzero((split == TRAIN) & known[codes])
        if train_cells.size == control_cells.size:
            raise ValueError(
                "No perturbed cells in the training split: check obs['pg_split'] (pg.pp.split_perturbations)."
            )
        val_mask = (split == VAL) & known[codes] & ~is_ctrl
        means, val_means = _train_val_means(x, codes, (split == TRAIN) & known[codes], val_mask, len(cats))
        expressed = torch.from_numpy(np.nan_to_num(means, nan=1.0) != 0)
        expressed[ctrl_code] = True
        control_mean = means[ctrl_code]

        val_codes, val = _validation_batch(
            adata,
            codes,
            val_mask,
            val_means,
            cats,
            "perturbations",
            "rerun pg.pp.rank_de_genes(adata, overwrite=True).",
        )
        if val is not None:
            val[TENSOR_KEYS.PERT_IDX] = pert_table[val_codes]
        train = TrainCells(
            ExpressionRows(x),
            train_cells,
            codes[train_cells],
            control_cells,
            pert_table,
            expressed,
            ctrl_code,
            seed,
        )
        seen = sorted({g for c in np.unique(codes[train_cells]) for g in sets[c]})
        summary = {
            "n_train_cells": int(train_cells.size),
            "n_train_control_cells": int(control_cells.size),
            "n_train_perturbations": int(np.unique(codes[train_cells]).size - 1),
            "n_val_cells": int(val_mask.sum()),
            "n_val_perturbations": int(val_codes.size),
            "excluded_perturbations": np.asarray(excluded, dtype=str),
        }
        return train, val, control_mean, seen, summary

    def _training_data_contexts(self, seed: int):
        """:meth:`_training_data` for data with contexts: (context, perturbation) groups, partners of the same context."""
        adata = self.adata
        col, sets = get_parsed(adata)
        groups = Groups(adata)
        codes = groups.codes
        split = adata.obs[SPLIT_KEY].astype(str).to_numpy()
        x = self._matrix()
        pert_table = self._pert_index(sets)
        known_pert = self._in_graph(sets, pert_table)
        known = known_pert[groups.pert]
        used = np.isin(split, [TRAIN, VAL])
        excluded = sorted(
            {str(col.cat.categories[p]) for p in np.unique(groups.pert[codes[used & ~known[codes]]])}
        )
        if excluded:
            logger.warning(
                "Excluding the cells of %d train/val perturbations with genes absent from the GO graph (GEARS cannot "
                "embed them): %s",
                len(excluded),
                excluded[:20],
            )
        is_ctrl = groups.is_control[codes]
        control_cells = np.flatnonzero(is_ctrl & (split == TRAIN))
        n_ctx = len(groups.contexts)
        ctrl_ctx = groups.context[codes[control_cells]]
        lacking = [groups.contexts[c] for c in range(n_ctx) if not (ctrl_ctx == c).any()]
        if lacking:
            raise ValueError(
                f"Contexts {lacking} have no control cells in the training split; every context needs them "
                "(pg.pp.split_perturbations puts control cells in 'train')."
            )
        train_mask = (split == TRAIN) & known[codes]
        train_cells = np.flatnonzero(train_mask)
        if train_cells.size == control_cells.size:
            raise ValueError(
                "No perturbed cells in the training split: check obs['pg_split'] (pg.pp.split_perturbations)."
            )
        val_mask = (split == VAL) & known[codes] & ~is_ctrl
        means, val_means = _train_val_means(x, codes, train_mask, val_mask, len(groups))
        expressed = torch.from_numpy(np.nan_to_num(means, nan=1.0) != 0)
        expressed[torch.from_numpy(groups.is_control)] = True
        ctrl_group = groups.control[groups.is_control]
        self.module.context_control_mean.copy_(torch.from_numpy(means[ctrl_group]))
        control_mean = group_means(x, np.where(np.isin(np.arange(adata.n_obs), control_cells), 0, -1), 1)[0]

        val_codes, val = _validation_batch(
            adata,
            codes,
            val_mask,
            val_means,
            groups.labels,
            "groups",
            "rerun pg.pp.rank_de_genes(adata, overwrite=True) on the data parsed with its context_key.",
        )
        if val is not None:
            val[TENSOR_KEYS.PERT_IDX] = pert_table[groups.pert[val_codes]]
            val[TENSOR_KEYS.CONTEXT] = torch.from_numpy(groups.context[val_codes])
        train = TrainCells(
            ExpressionRows(x),
            train_cells,
            codes[train_cells],
            control_cells,
            pert_table,
            expressed,
            -1,
            seed,
            groups={
                "pert": groups.pert,
                "context": groups.context,
                "control": groups.is_control,
                "control_context": ctrl_ctx,
            },
        )
        train_groups = np.unique(codes[train_cells])
        seen = sorted({g for c in train_groups for g in groups.sets[c]})
        summary = {
            "n_train_cells": int(train_cells.size),
            "n_train_control_cells": int(control_cells.size),
            "n_train_perturbations": int((~groups.is_control[train_groups]).sum()),
            "n_val_cells": int(val_mask.sum()),
            "n_val_perturbations": int(val_codes.size),
            "excluded_perturbations": np.asarray(excluded, dtype=str),
            "contexts": np.asarray(groups.contexts, dtype=str),
        }
        return train, val, control_mean, seen, summary

    def train(
        self,
        max_epochs: int = 20,
        batch_size: int = 32,
        *,
        lr: float = 1e-3,
        weight_decay: float = 5e-4,
        lr_decay: float = 0.5,
        gradient_clip_val: float = 1.0,
        selection: Literal["val", "last"] = "val",
        seed: int | None = None,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        strategy: str = "auto",
        precision: str | int = "32-true",
        progress_bar: bool = True,
        val_batch_size: int = 64,
        batching: Literal["cells", "sets"] = "cells",
        sets_per_batch: int = 4,
        cells_per_set: int | None = 8,
        **trainer_kwargs,
    ) -> None:
        """Train on the ``train`` cells, select the epoch with the lowest validation top-20-DE MSE.

        Parameters
        ----------
        max_epochs
            Epochs (paper: 15-20).
        batch_size
            Cells per minibatch (paper: 32).
        lr, weight_decay
            Adam settings (paper: 1e-3, 5e-4).
        lr_decay
            Learning-rate factor after each epoch (paper: 0.5).
        gradient_clip_val
            Gradients are clipped by value to this bound (paper: 1.0).
        selection
            ``'val'`` (paper): restore the epoch with the lowest validation top-20-DE MSE;
            ``'last'``: a fixed schedule, keep the last epoch (validation is still recorded in
            ``history_``). With a handful of validation perturbations the selected epoch is noisy
            (see ``docs/methods.md``).
        seed
            Seed of the data order and of the control partners; default the model's ``seed``.
        accelerator, devices, strategy
            Passed to :class:`lightning.pytorch.Trainer` (e.g. ``accelerator='gpu', devices=1``).
            Data-parallel training: ``strategy='ddp', devices=n`` (on CPU over gloo, e.g.
            ``accelerator='cpu', devices=2``); Lightning starts the other processes by running the
            calling script again, so call it from a script, not a notebook. Every process draws the
            same seeded batches and trains on its own shard of them (batches ``rank``,
            ``rank + n``, ...; the last ``len % n`` batches of an epoch are left out), gradients
            are averaged over the processes, each process validates on every validation
            perturbation, and every process ends with the same parameters.
        precision
            Lightning's ``Trainer(precision=...)``: ``'32-true'`` (default, float32) or
            ``'bf16-mixed'`` (the forward pass and its gradients in bfloat16 under autocast; weights,
            optimizer state, batch-norm statistics and predictions stay float32, and so does
            validation), for hardware with bf16 units (CPUs
            with AVX512-BF16 / AMX, recent GPUs). Measured on a CPU with AMX
            (``benchmarks/results/compare_precision.md``, paired seeds): with
            ``train_gears(preset='anchored')`` as accurate as float32 (test normalized top-20 MSE
            +0.003 +- 0.003 simulated over 5 seeds, -0.007 +- 0.051 Norman subset over 24) but not
            faster on 500 genes (1.2x float32's CPU seconds); with this method's defaults (the paper's
            schedule) test Pearson delta on the Norman subset fell by 0.12 +- 0.09 over 5 seeds
            (the same after validation became fully float32). On 2,000 genes a cell-batch epoch
            took 0.83-0.89x float32's CPU in 3 runs (``compare_speed.md``; 0.71-0.97x in earlier
            sittings): an option, not the default.
        progress_bar
            Show progress: Lightning's bar and banner in a terminal or notebook; elsewhere (output
            redirected to a file) one log line per epoch with the loss, the validation MSE and the time.
        val_batch_size
            Validation perturbations per forward pass.
        batching
            ``'cells'`` (the paper's): minibatches of ``batch_size`` random cells. ``'sets'``: each
            step draws ``sets_per_batch`` perturbation sets and up to ``cells_per_set`` cells of
            each (:class:`~pertpy_gnn.gears._data.SetBatches`); the network runs once per set
            and the same per-cell loss is applied to every drawn cell (tested equal). An epoch
            draws as many cells as there are training cells either way. Measured over 5 seeds
            (``benchmarks/results/compare_batching.md``): with a constant learning rate and the last
            epoch kept (``train_gears(preset='anchored')``, which uses set batches) they are as
            accurate as cell batches within the paired spread, for 0.5-0.75x the CPU; with this
            method's defaults (the paper's schedule: ``lr_decay=0.5``, validation-selected epoch)
            they lost test Pearson delta on the Norman subset (-0.06 +- 0.05), so cell batches stay
            the default here.
        sets_per_batch, cells_per_set
            Sizes of the set batches (``cells_per_set=None``: all cells of each drawn set). The
            defaults, 4 x 8 (32 cells a step, as a cell batch), were as good as any size of the
            sweep in ``benchmarks/compare_batching.py`` (8 x 8, 4 x 32, 4 x all at equal CPU) and
            better than 2 x 8; learning rates of 3e-3 and 1e-2 did not help them.
        **trainer_kwargs
            Further :class:`lightning.pytorch.Trainer` arguments.

        Returns
        -------
        ``None``. Sets ``history_`` (per-epoch ``train_loss``, ``val_top20_de_mse``, ``lr``),
        ``best_epoch_``, ``seen_genes_``, ``train_summary_`` and, with uncertainty, the training
        uncertainty statistics used for z-scores.
        """
        if batching not in ("cells", "sets"):
            raise ValueError(f"`batching` must be 'cells' or 'sets', got {batching!r}.")
        if int(max_epochs) < 1:
            raise ValueError(
                f"`max_epochs` must be at least 1, got {max_epochs}: with no epoch the model stays untrained."
            )
        seed = self._seed if seed is None else seed
        if self.contexts_:
            train, val, control_mean, seen, summary = self._training_data_contexts(seed)
        else:
            train, val, control_mean, seen, summary = self._training_data(seed)
        self.module.control_mean.copy_(torch.from_numpy(control_mean))
        if self.module.anchor is not None:
            self._set_anchor()
        self.module.train()
        if selection not in ("val", "last"):
            raise ValueError(f"`selection` must be 'val' or 'last', got {selection!r}.")
        plan = GEARSTrainingPlan(
            self.module,
            lr=lr,
            weight_decay=weight_decay,
            lr_decay=lr_decay,
            select_best=selection == "val",
        )
        val_loader = make_loader(TensorDict(val), val_batch_size) if val is not None else None
        from .._progress import progress

        show_bar, progress_callbacks = progress(progress_bar, max_epochs)
        trainer_kwargs["callbacks"] = [*trainer_kwargs.get("callbacks", []), *progress_callbacks]
        with _quiet(progress_bar):
            trainer = pl.Trainer(
                max_epochs=max_epochs,
                accelerator=accelerator,
                devices=devices,
                strategy=strategy,
                precision=precision,
                gradient_clip_val=gradient_clip_val,
                gradient_clip_algorithm="value",
                logger=False,
                enable_checkpointing=False,
                enable_model_summary=False,
                num_sanity_val_steps=0,
                enable_progress_bar=show_bar,
                # the loaders shard their own seeded batches over data-parallel processes (ShardedBatches)
                use_distributed_sampler=trainer_kwargs.pop("use_distributed_sampler", False),
                **trainer_kwargs,
            )
            if batching == "sets":
                loader = make_set_loader(train, sets_per_batch, cells_per_set, seed=seed)
            else:
                loader = make_loader(train, batch_size, shuffle=True, seed=seed, shard=True)
            trainer.fit(plan, loader, val_loader)
        if plan.best_state is not None:
            self.module.load_state_dict(plan.best_state)
        self.module.to(trainer.strategy.root_device)
        self.module.eval()
        self.history_ = pd.DataFrame(plan.history)
        self.best_epoch_ = int(plan.best_epoch if plan.best_state is not None else len(self.history_) - 1)
        self.seen_genes_ = seen
        self.train_summary_ = summary
        if self.module.uncertainty:
            self._set_uncertainty_stats(train)
        self.is_trained_ = True

    def _set_anchor(self) -> None:
        """The anchor from the training cells: the changes of the baselines ``additive`` and ``train_mean``."""
        layer = self.adata_manager.data_registry[REGISTRY_KEYS.X_KEY].attr_key
        summary = _training_data(self.adata, SPLIT_KEY, "X" if layer is None else layer)
        genes, deltas = summary.single_deltas()
        nodes = self._go_index.get_indexer(genes)
        known = nodes >= 0
        self.module.set_anchor(
            torch.from_numpy(nodes[known]),
            torch.from_numpy(deltas[known].astype(np.float32)),
            torch.from_numpy(summary.mean_delta.astype(np.float32)),
        )

    def _set_uncertainty_stats(self, train: TrainCells) -> None:
        """Mean and std over training cells of the per-cell uncertainty (mean log-variance over genes)."""
        codes, counts = torch.unique(train.codes, return_counts=True)
        sets = train.set_index(codes) if hasattr(train, "set_index") else (train.pert_table[codes], None)
        _, logvar = self._delta_from_index(*sets)
        s = logvar.mean(1).double()
        w = counts.double() / counts.sum()
        mean = (w * s).sum()
        std = ((w * (s - mean) ** 2).sum()).sqrt().clamp(min=1e-8)
        self.module.uncertainty_stats.copy_(torch.stack([mean, std]).float())

    # ------------------------------------------------------------------ prediction
    @torch.inference_mode()
    def _delta_from_index(
        self, pert_idx: torch.Tensor, context: torch.Tensor | None = None, batch_size: int = 64
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.module.eval()
        if pert_idx.shape[0] == 0:  # no set: an empty prediction
            empty = torch.zeros(0, self.module.control_mean.shape[0])
            return empty, (empty.clone() if self.module.uncertainty else None)
        device = self.module.device
        zs, ss = [], []
        h_gene = self.module.gene_states()  # shared by every batch
        for start in range(0, pert_idx.shape[0], batch_size):
            chunk = pert_idx[start : start + batch_size].to(device)
            if context is None:
                z, s = self.module.predict_delta(chunk, h_gene=h_gene)
            else:
                z, s = self.module.predict_delta(
                    chunk, context[start : start + batch_size].to(device), h_gene=h_gene
                )
            zs.append(z.cpu())
            ss.append(s.cpu() if s is not None else None)
        logvar = torch.cat(ss) if self.module.uncertainty else None
        return torch.cat(zs), logvar

    def _unknown_genes(self, genes: list[str]) -> list[str]:
        """Genes of ``genes`` (sorted, unique) that this model has no embedding for."""
        if not self.module.use_go_graph:  # ablation: only genes perturbed in training have an embedding
            return [g for g in genes if g not in self.seen_genes]
        return [g for g, i in zip(genes, self._go_index.get_indexer(genes), strict=True) if i < 0]

    def unpredictable(self, perturbations) -> dict[str, str]:
        """The sets of ``perturbations`` this model cannot predict, each with the reason and the fix.

        GEARS embeds a perturbed gene through its node in the GO graph; a gene without a node (no GO
        annotation in the graph's source, e.g. IER5L in the 2022 human GO tables) cannot be embedded.
        Without the GO graph (``use_go_graph=False``) only genes perturbed in training have an embedding.
        :func:`pertpy_gnn.tl.evaluate` asks every predictor this and leaves such sets out (logged).

        Parameters
        ----------
        perturbations
            A set or a list of sets, as for :meth:`predict`.

        Returns
        -------
        Dict canonical set name (``'A+B'``) -> reason with the fix; empty when every set can be predicted.
        """
        sets = as_perturbation_sets(perturbations)
        unknown = set(self._unknown_genes(sorted({g for s in sets for g in s})))
        out: dict[str, str] = {}
        for s in sets:
            bad = [g for g in s if g in unknown]
            if not bad:
                continue
            them = "it" if len(bad) == 1 else "them"
            if self.module.use_go_graph:
                out[canonical_name(s)] = (
                    f"{', '.join(bad)} {'has' if len(bad) == 1 else 'have'} no node in the GO graph (no GO "
                    f"annotation in its source), so GEARS cannot embed {them}; fix: build the GO graph from "
                    f"a GO source that annotates {them} (pg.pp.go_graph(adata, annotations=...)) and retrain"
                )
            else:
                out[canonical_name(s)] = (
                    f"{', '.join(bad)} {'was' if len(bad) == 1 else 'were'} not perturbed in training and this "
                    f"GEARS has no GO graph (use_go_graph=False), so {them} {'has' if len(bad) == 1 else 'have'} "
                    "no embedding; fix: train with the GO graph (use_go_graph=True) to predict genes not "
                    "perturbed in training"
                )
        return out

    def _check_sets(self, perturbations, skip_unknown: bool) -> list[tuple[str, ...]]:
        sets = as_perturbation_sets(perturbations)
        genes = sorted({g for s in sets for g in s})
        unknown = self._unknown_genes(genes)
        if not self.module.use_go_graph:
            if unknown and not skip_unknown:
                raise ValueError(
                    f"This GEARS has no GO graph (use_go_graph=False): genes not perturbed in training have no "
                    f"embedding, so {len(unknown)} genes cannot be predicted: {unknown[:20]}"
                    f"{' ...' if len(unknown) > 20 else ''}. Pass `skip_unknown=True` to drop the sets containing "
                    "them, or train with the GO graph to predict unseen genes."
                )
        if unknown and not skip_unknown:
            raise ValueError(
                f"{len(unknown)} genes are not in the GO graph, so GEARS cannot embed them: {unknown[:20]}"
                f"{' ...' if len(unknown) > 20 else ''}. Pass `skip_unknown=True` to drop the sets containing them, "
                "or build the GO graph from annotations that cover them (pg.pp.go_graph(adata, annotations=...)) "
                "and retrain."
            )
        if unknown:
            bad = set(unknown)
            dropped = [s for s in sets if bad & set(s)]
            sets = [s for s in sets if not bad & set(s)]
            logger.warning(
                "Dropping %d perturbation sets with genes GEARS cannot embed (%s): %s",
                len(dropped),
                "not in the GO graph"
                if self.module.use_go_graph
                else "not perturbed in training, no GO graph",
                [DELIM.join(s) for s in dropped[:10]],
            )
            if not sets:
                raise ValueError(
                    "No perturbation set left after dropping those with genes GEARS cannot embed: "
                    f"{self.unpredictable(dropped[:1])}."
                )
        return sets

    def _control_cells(self, adata: AnnData, train_only: bool = False) -> np.ndarray:
        col, _ = get_parsed(adata)
        is_ctrl = col.to_numpy() == CONTROL
        if train_only:
            is_ctrl &= adata.obs[SPLIT_KEY].astype(str).to_numpy() == TRAIN
        cells = np.flatnonzero(is_ctrl)
        if cells.size == 0:
            raise ValueError("No control cells in adata: GEARS adds its predicted change to control cells.")
        return cells

    def _check_trained(self) -> None:
        if not self.is_trained_:
            raise RuntimeError("The model is not trained yet: call model.train() (or use pg.tl.train_gears).")

    def predict(
        self,
        perturbations,
        *,
        n_control: int | None = 300,
        seed: int = 0,
        batch_size: int = 64,
        skip_unknown: bool = False,
        context: str | Sequence[str] | None = None,
    ) -> AnnData:
        """Predicted mean expression of perturbation sets of any size.

        The paper's prediction is the mean over ``n_control`` random control cells of
        ``zhat + g_ctrl``. ``zhat`` does not depend on the control cell (batch norm uses running
        statistics at inference), so this is ``zhat`` + the mean of those cells, computed with one
        forward pass per set (batched).

        Parameters
        ----------
        perturbations
            A set (``"A"``, ``"A+B"``, ``("A", "B", "C")``) or a list of sets; order within a set
            does not matter. An empty list gives an empty prediction (no row), as the baselines do.
        n_control
            Training control cells averaged, drawn at random without replacement (as the
            baselines do); ``None``, or at least their number, uses all of them.
        seed
            Seed of the control-cell draw.
        batch_size
            Sets per forward pass.
        skip_unknown
            Drop (with a warning) the sets with genes not in the GO graph instead of failing; they are
            listed with the reason in ``uns['pg_prediction']['skipped']`` (see :meth:`unpredictable`).
        context
            A model trained on data with contexts: the context(s) to predict in (``None``: every
            context); each set's change in a context is added to the mean of that context's
            training control cells, and the output has one row per (context, set) with
            ``obs['context']``.

        Returns
        -------
        AnnData in the form of :func:`pertpy_gnn._prediction.make_prediction_adata`: one row per
        set, ``X`` the predicted mean, ``layers['delta']`` the predicted change ``zhat`` over the mean
        of the drawn control cells (``uns['pg_prediction']['control_mean']``), ``obs`` ``perturbation``, ``n_genes``, ``n_unseen``, ``seen`` and, with uncertainty,
        ``uncertainty`` (mean predicted log-variance over genes) and ``uncertainty_z`` (z-scored
        against the training cells).
        """
        if self.contexts_:
            self._check_trained()
            sets = self._check_sets(perturbations, skip_unknown)
            out = self._predict_contexts(sets, context, n_control, seed, batch_size)
        else:
            if context is not None:
                raise ValueError("`context` is only for a model trained on data with contexts.")
            sets, zhat, base, extra, n_ctrl = self._predict_arrays(
                perturbations, n_control, seed, batch_size, skip_unknown
            )
            out = make_prediction_adata(
                sets,
                zhat + base[None, :],
                base,
                self.adata.var_names,
                seen_genes=self.seen_genes,
                obs_extra=extra,
                model_name=self.name,
                n_control=n_ctrl,
            )
        skipped = self.unpredictable(perturbations) if skip_unknown else {}
        if skipped:  # what was dropped and why travels with the prediction (pg.tl.evaluate, pg.tl.gi_scores)
            out.uns[PREDICTION_UNS_KEY]["skipped"] = skipped_frame(skipped)
        return out

    def predict_deltas(
        self,
        perturbations,
        *,
        n_control: int | None = 300,
        seed: int = 0,
        batch_size: int = 512,
        skip_unknown: bool = False,
    ) -> tuple[np.ndarray, pd.DataFrame]:
        """The predicted changes of :meth:`predict` as one array, without building an AnnData.

        For many sets at once (e.g. :func:`pertpy_gnn.tl.gi_map`): the same values as
        ``predict(...).layers['delta']`` and the same per-set ``obs`` columns.

        Parameters
        ----------
        perturbations, n_control, seed, batch_size, skip_unknown
            As in :meth:`predict`.

        Returns
        -------
        ``(delta, obs)``: ``len(sets) x n_vars`` ``float32`` changes over the drawn control cells'
        mean, and a DataFrame (index: canonical set names) with ``perturbation``, ``n_genes``,
        ``n_unseen``, ``seen`` and, with uncertainty, ``uncertainty`` and ``uncertainty_z``.
        """
        if self.contexts_:
            raise ValueError("predict_deltas is for models without contexts; use predict(..., context=...).")
        sets, zhat, base, extra, _ = self._predict_arrays(
            perturbations, n_control, seed, batch_size, skip_unknown
        )
        base32 = base.astype(np.float32)
        delta = (zhat + base[None, :]).astype(np.float32)  # as make_prediction_adata: mean - control mean
        delta -= base32[None, :]
        names = [DELIM.join(s) for s in sets]
        n_unseen = np.array([sum(g not in self.seen_genes for g in s) for s in sets], dtype=np.int64)
        obs = pd.DataFrame(
            {
                "perturbation": names,
                "n_genes": np.array([len(s) for s in sets], dtype=np.int64),
                "n_unseen": n_unseen,
                "seen": n_unseen == 0,
                **(extra or {}),
            },
            index=pd.Index(names),
        )
        return delta, obs

    def _predict_arrays(self, perturbations, n_control, seed, batch_size, skip_unknown):
        """Sets, ``zhat`` (``float32``), the control mean (``float64``), extra obs columns, control count."""
        self._check_trained()
        sets = self._check_sets(perturbations, skip_unknown)
        x = self._matrix()
        ctrl = self._control_cells(self.adata, train_only=True)
        if n_control is not None and n_control < 1:
            raise ValueError(
                f"`n_control` must be a positive number of control cells or None (all), got {n_control}."
            )
        if n_control is not None and n_control < ctrl.size:
            ctrl = ctrl[
                np.sort(np.random.default_rng(seed).choice(ctrl.size, size=int(n_control), replace=False))
            ]
        base = np.asarray(x[ctrl].mean(axis=0), dtype=np.float64).ravel()
        zhat, logvar = self._delta_from_index(self._pert_index(sets), batch_size=batch_size)
        extra = None
        if logvar is not None:
            u = logvar.mean(1).numpy()
            mu, sd = self.module.uncertainty_stats.cpu().numpy()
            extra = {"uncertainty": u.astype(np.float32), "uncertainty_z": ((u - mu) / sd).astype(np.float32)}
        return sets, zhat.numpy(), base, extra, ctrl.size

    def _predict_contexts(self, sets, context, n_control, seed, batch_size) -> AnnData:
        """:meth:`predict` of a model with contexts: one row per (context, set)."""
        contexts = (
            self.contexts_ if context is None else [context] if isinstance(context, str) else list(context)
        )
        unknown = [c for c in contexts if c not in self.contexts_]
        if unknown:
            raise ValueError(f"Unknown contexts {unknown}; the model knows {self.contexts_}.")
        if n_control is not None and n_control < 1:
            raise ValueError(
                f"`n_control` must be a positive number of control cells or None (all), got {n_control}."
            )
        x = self._matrix()
        ctrl_all = self._control_cells(self.adata, train_only=True)
        cell_ctx = get_context(self.adata).astype(str).to_numpy()[ctrl_all]
        bases, deltas, n_used = [], [], []
        for c in contexts:
            ctrl = ctrl_all[cell_ctx == c]
            if n_control is not None and n_control < ctrl.size:
                ctrl = ctrl[
                    np.sort(np.random.default_rng(seed).choice(ctrl.size, size=int(n_control), replace=False))
                ]
            bases.append(np.asarray(x[ctrl].mean(axis=0), dtype=np.float64).ravel())
            n_used.append(ctrl.size)
            ci = torch.full((len(sets),), self.contexts_.index(c), dtype=torch.long)
            zhat, _ = self._delta_from_index(self._pert_index(sets), ci, batch_size=batch_size)
            deltas.append(zhat.numpy())
        base = np.repeat(np.vstack(bases), len(sets), axis=0)
        with warnings.catch_warnings():  # a set repeats once per context: obs names are made unique below
            warnings.filterwarnings("ignore", message=".*names are not unique.*")
            out = make_prediction_adata(
                sets * len(contexts),
                np.vstack(deltas) + base,
                np.zeros(self.adata.n_vars),
                self.adata.var_names,
                seen_genes=self.seen_genes,
                obs_extra={"context": np.repeat(contexts, len(sets))},
                model_name=self.name,
                n_control=int(min(n_used)),
            )
        out.layers["delta"] = np.vstack(deltas).astype(np.float32)
        out.obs_names = [
            f"{c}{CONTEXT_SEP}{p}" for c, p in zip(out.obs["context"], out.obs["perturbation"], strict=True)
        ]
        out.uns["pg_prediction"]["control_mean"] = np.vstack(bases).astype(np.float32)
        out.uns["pg_prediction"]["contexts"] = np.array(contexts, dtype=object)
        return out

    def predict_cells(
        self,
        perturbations,
        *,
        adata: AnnData | None = None,
        cells=None,
        layer_added: str = GEARS_PRED_LAYER,
        overwrite: bool = False,
        batch_size: int = 64,
    ) -> None:
        """Predicted expression of given cells after perturbation, written into ``adata.layers``.

        Each selected cell ``i`` gets ``x_i + zhat(P_i)``: its own expression as the control state plus
        the predicted change of its set (what GEARS predicts for that cell as a control partner).

        Parameters
        ----------
        perturbations
            One set applied to every selected cell, or a list with one set per selected cell.
        adata
            AnnData with the model's ``var_names`` (default: the training AnnData).
        cells
            Boolean mask, integer positions or ``obs_names`` of the cells; default the control cells
            (``obs['pg_perturbation'] == 'control'``) if parsed, else all cells.
        layer_added
            Layer to write.
        overwrite
            Replace an existing layer.
        batch_size
            Sets per forward pass.

        Returns
        -------
        ``None``. Sets ``adata.layers[layer_added]`` (dense ``float32``): the prediction for the
        selected cells and ``NaN`` for the others.
        """
        self._check_trained()
        adata = self.adata if adata is None else adata
        if not np.array_equal(np.asarray(adata.var_names), np.asarray(self.adata.var_names)):
            raise ValueError(
                "adata.var_names differ from the model's genes; subset / reorder adata to model.adata.var_names."
            )
        check_overwrite(adata.layers, layer_added, overwrite, "adata.layers")
        if cells is None:
            rows = self._control_cells(adata) if PERT_KEY in adata.obs else np.arange(adata.n_obs)
        else:
            cells = np.asarray(cells)
            if cells.dtype == bool:
                rows = np.flatnonzero(cells)
            elif np.issubdtype(cells.dtype, np.integer):
                rows = cells
            else:
                rows = adata.obs_names.get_indexer(cells)
                if (rows < 0).any():
                    raise KeyError(f"Cells not in adata.obs_names: {list(cells[rows < 0][:10])}.")
        sets = as_perturbation_sets(perturbations)
        if len(sets) not in (1, len(rows)):
            raise ValueError(
                f"Give one perturbation set, or one per selected cell ({len(rows)}); got {len(sets)}."
            )
        self._check_sets(sets, skip_unknown=False)
        names = pd.Index([DELIM.join(s) for s in sets])
        uniq, inverse = np.unique(names, return_inverse=True)
        uniq_sets = [tuple(u.split(DELIM)) for u in uniq]
        if self.contexts_:  # each cell gets the change of its set in its own context
            ctx = get_context(adata) if PERT_KEY in adata.obs else None
            if ctx is None:
                raise ValueError(
                    "This GEARS model has contexts: `adata` must be parsed with the same context_key."
                )
            cidx = pd.Index(self.contexts_).get_indexer(ctx.astype(str).to_numpy()[rows])
            if (cidx < 0).any():
                raise ValueError(f"Cells of contexts the model does not know; it knows {self.contexts_}.")
            pair = np.broadcast_to(inverse, (len(rows),)) * len(self.contexts_) + cidx
            pidx = self._pert_index(uniq_sets).repeat_interleave(len(self.contexts_), 0)
            cten = torch.arange(len(self.contexts_)).repeat(len(uniq_sets))
            zhat, _ = self._delta_from_index(pidx, cten, batch_size=batch_size)
            x = self._matrix(adata)
            base = x[rows].toarray() if sp.issparse(x) else np.asarray(x[rows])
            out = np.full(adata.shape, np.nan, dtype=np.float32)
            out[rows] = base + zhat.numpy()[pair]
            adata.layers[layer_added] = out
            return
        zhat, _ = self._delta_from_index(self._pert_index(uniq_sets), batch_size=batch_size)
        x = self._matrix(adata)
        base = x[rows].toarray() if sp.issparse(x) else np.asarray(x[rows])
        out = np.full(adata.shape, np.nan, dtype=np.float32)
        out[rows] = base + zhat.numpy()[np.broadcast_to(inverse, (len(rows),))]
        adata.layers[layer_added] = out

    @property
    def best_val(self) -> float:
        """Validation top-20-DE MSE of the selected epoch (NaN without validation)."""
        h = getattr(self, "history_", None)
        if not isinstance(h, pd.DataFrame) or h.empty:
            return math.nan
        return float(h["val_top20_de_mse"].iloc[self.best_epoch_])

    # ------------------------------------------------------------------ save / load (safe, versioned)
    def save(
        self,
        dir_path,
        prefix: str | None = None,
        overwrite: bool = False,
        save_anndata: bool = False,
        **anndata_write_kwargs,
    ) -> None:
        """Save the model to ``dir_path/[prefix]model.pt`` (and the AnnData with ``save_anndata=True``).

        The file holds tensors and plain containers only, with a header (checkpoint format, package
        version, model kind), so :meth:`load` reads it with ``torch.load(weights_only=True)``: loading a
        file cannot run code.

        Returns
        -------
        ``None``.
        """
        from .._checkpoint import save_model

        save_model(
            self,
            dir_path,
            kind="GEARS",
            prefix=prefix,
            overwrite=overwrite,
            save_anndata=save_anndata,
            **anndata_write_kwargs,
        )

    @staticmethod
    def saved_var_names(dir_path, prefix: str | None = None) -> np.ndarray:
        """The genes (in order) of a model saved by :meth:`save`, read safely from its file."""
        from .._checkpoint import saved_var_names

        return saved_var_names(dir_path, kind="GEARS", prefix=prefix)

    @classmethod
    def load(
        cls,
        dir_path,
        adata: AnnData | None = None,
        accelerator: str = "auto",
        device: int | str = "auto",
        prefix: str | None = None,
        allow_pickle: bool = False,
    ) -> GEARS:
        """Load a model saved by :meth:`save`, onto ``adata`` (or the AnnData saved with it).

        The file is read with ``torch.load(weights_only=True)``; its checkpoint format is checked (a
        file from a newer pertpy-gnn is refused with both versions named), and a truncated or corrupt
        file raises :class:`pertpy_gnn._checkpoint.CheckpointError` naming it. ``adata`` must have the
        model's genes in the model's order (:meth:`saved_var_names`). ``allow_pickle=True`` reads a
        file written by pertpy-gnn before checkpoint format 1 (a pickle: only for files you trust);
        save it again to get a safe file.

        Returns
        -------
        The model, with its trained weights and attributes.
        """
        from .._checkpoint import load_model

        return load_model(
            cls,
            dir_path,
            adata,
            kind="GEARS",
            uses_adata=True,
            accelerator=accelerator,
            device=device,
            prefix=prefix,
            allow_pickle=allow_pickle,
        )
