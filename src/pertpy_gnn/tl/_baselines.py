"""Baselines that every model is reported beside, fitted on the training cells of a split.

Every baseline is a predictor in the project's contract: ``.name``, ``.seen_genes`` and
``.predict(perturbations, *, n_control=300, seed=0)`` returning the AnnData of
:func:`~pertpy_gnn._prediction.make_prediction_adata`. A baseline predicts a change ``delta``
over the mean of the *training* control cells; ``predict`` adds it to the mean of ``n_control``
control cells drawn at random (seeded), or of all control cells when ``n_control`` is ``None`` or
at least their number, so that with all control cells ``no_change`` is exactly the control mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from pertpy_gnn._constants import COEXPR_GRAPH_KEY, GO_GRAPH_KEY, SPLIT_KEY
from pertpy_gnn._linear import bilinear_ridge, graph_embedding, pca_gene_embedding, relative_penalties
from pertpy_gnn._training import _Training, _training_data
from pertpy_gnn._utils import get_adata, logger, to_dense
from pertpy_gnn.pp._perturbations import as_perturbation_sets, get_context

from .._prediction import PREDICTION_UNS_KEY, make_prediction_adata

#: the kinds understood by :func:`fit_baseline`
BASELINE_KINDS = ("no_change", "train_mean", "additive", "linear_coexpression", "linear_embedding")


def _indicator(sets: Sequence[tuple[str, ...]], genes: pd.Index) -> tuple[sp.csr_matrix, np.ndarray]:
    """Sets x genes 0/1 matrix, and whether every gene of each set is in ``genes``."""
    pos = dict(zip(genes, range(len(genes)), strict=True))
    rows, cols, complete = [], [], np.ones(len(sets), dtype=bool)
    for i, s in enumerate(sets):
        idx = [pos[g] for g in s if g in pos]
        complete[i] = len(idx) == len(s)
        rows += [i] * len(idx)
        cols += idx
    ind = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(sets), len(genes)))
    return ind, complete


class Baseline:
    """A fitted baseline predictor; build one with :func:`fit_baseline`.

    Attributes
    ----------
    name
        Name of the predictor (the kind unless given).
    seen_genes
        Genes seen perturbed (alone or in a combination) in the training cells.
    var_names
        Genes of the predictions.
    control_mean
        Mean expression of the training control cells; every ``delta`` is relative to it.
    """

    kind = ""
    #: what a row with ``obs['available'] == False`` holds (recorded in ``uns['pg_prediction']['fallback']``)
    fallback = ""

    def __init__(self, train: _Training, *, name: str | None = None):
        self.name = self.kind if name is None else name
        self.var_names = train.var_names
        self.seen_genes = train.seen_genes
        self.control_mean = train.control_mean
        self._control_x = train.control_x

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, n_vars={len(self.var_names)}, n_seen_genes={len(self.seen_genes)})"

    def _delta(self, sets: list[tuple[str, ...]]) -> tuple[np.ndarray, dict]:
        raise NotImplementedError

    def _control_base(self, n_control: int | None, seed: int) -> tuple[np.ndarray, int]:
        n_avail = self._control_x.shape[0]
        if n_control is None or n_control >= n_avail:
            return self.control_mean, n_avail
        if n_control < 1:
            raise ValueError(
                f"`n_control` must be a positive number of control cells or None (all), got {n_control}."
            )
        idx = np.random.default_rng(seed).choice(n_avail, size=int(n_control), replace=False)
        return to_dense(self._control_x[np.sort(idx)]).astype(np.float64).mean(axis=0), int(n_control)

    def predict(self, perturbations, *, n_control: int | None = 300, seed: int = 0) -> AnnData:
        """Predict the mean expression of perturbation sets.

        Parameters
        ----------
        perturbations
            ``"A"``, ``"A+B"``, a tuple of genes, or a list of those.
        n_control
            Number of control cells, drawn at random, whose mean the predicted change is added to;
            ``None`` (or at least the number of training control cells) uses all of them.
        seed
            Seed of the draw of control cells.

        Returns
        -------
        The prediction AnnData of :func:`~pertpy_gnn._prediction.make_prediction_adata`, one row per set
        (``X`` mean, ``layers['delta']`` change over the control mean, ``obs`` ``perturbation``,
        ``n_genes``, ``n_unseen``, ``seen`` and baseline-specific columns).
        """
        sets = as_perturbation_sets(perturbations)
        base, n_used = self._control_base(n_control, seed)
        delta, extra = self._delta(sets)
        out = make_prediction_adata(
            sets,
            base[None, :] + delta,
            base,
            self.var_names,
            seen_genes=self.seen_genes,
            obs_extra=extra or None,
            model_name=self.name,
            n_control=n_used,
        )
        if "available" in out.obs:
            out.uns[PREDICTION_UNS_KEY]["fallback"] = self.fallback
            out.uns[PREDICTION_UNS_KEY]["n_unavailable"] = int((~out.obs["available"].astype(bool)).sum())
        return out


class NoChangeBaseline(Baseline):
    """Predicts the control mean for every perturbation (GEARS's "no perturbation" model)."""

    kind = "no_change"

    def __init__(self, train: _Training, adata: AnnData, *, name: str | None = None):
        super().__init__(train, name=name)

    def _delta(self, sets):
        return np.zeros((len(sets), len(self.var_names))), {}


class TrainMeanBaseline(Baseline):
    """Predicts the mean of all perturbed training cells (each cell weighs the same) for every set."""

    kind = "train_mean"

    def __init__(self, train: _Training, adata: AnnData, *, name: str | None = None):
        super().__init__(train, name=name)
        self.train_delta = train.mean_delta

    def _delta(self, sets):
        return np.broadcast_to(self.train_delta, (len(sets), len(self.var_names))).copy(), {}


class AdditiveBaseline(Baseline):
    """Control mean plus the sum of the single-gene changes seen in training.

    Defined for sets whose genes were *all* perturbed alone in the training cells; other rows are
    NaN and ``obs['available']`` is ``False`` (evaluation then reports NaN metrics for them).
    """

    kind = "additive"
    fallback = "NaN (no prediction)"

    def __init__(self, train: _Training, adata: AnnData, *, name: str | None = None):
        super().__init__(train, name=name)
        self.single_genes, self.single_deltas = train.single_deltas()

    def _delta(self, sets):
        ind, available = _indicator(sets, self.single_genes)
        delta = np.asarray(ind @ self.single_deltas)
        delta[~available] = np.nan
        if not available.all():
            logger.info(
                "additive: %d of %d sets have a gene not seen as a training single (NaN rows).",
                (~available).sum(),
                len(sets),
            )
        return delta, {"available": available}


class LinearCoexpressionBaseline(Baseline):
    r"""GEARS's linear model (paper eq. 1): ``x_theta = E^hops theta``, scaled by one fitted scalar.

    ``E`` is the weighted co-expression graph (``E[target, source] = weight``), ``theta`` is +1 at the
    perturbed genes and 0 elsewhere. The sign (CRISPRa raises, CRISPRi lowers the target) and the
    scale of the effect are a single scalar ``s`` fitted by least squares on the training
    perturbations whose genes are all measured, :math:`s = \sum \langle x_\theta, \delta\rangle /
    \sum \langle x_\theta, x_\theta\rangle`, unless ``scale`` is given (``s = 1`` with a warning when
    no training perturbation has measured genes). A set with a gene outside ``var_names`` cannot be
    placed on the graph: its row is the control mean and ``obs['available']`` is ``False``
    (``uns['pg_prediction']['fallback']`` says so, and :func:`pertpy_gnn.tl.evaluate` carries the
    flag into its ``available`` column and warns).
    """

    kind = "linear_coexpression"
    fallback = "no_change (the control mean)"

    def __init__(
        self,
        train: _Training,
        adata: AnnData,
        *,
        graph: dict | str = COEXPR_GRAPH_KEY,
        hops: int = 3,
        scale: float | None = None,
        name: str | None = None,
    ):
        super().__init__(train, name=name)
        if isinstance(graph, str):
            if graph not in adata.uns:
                raise KeyError(
                    f"adata.uns[{graph!r}] not found: build the co-expression graph first with "
                    "pg.pp.coexpression_graph(adata), or pass `graph=` (a key of uns or the graph dict)."
                )
            graph = adata.uns[graph]
        if hops < 1:
            raise ValueError(f"`hops` must be at least 1, got {hops}.")
        nodes = self.var_names.get_indexer(np.asarray(graph["genes"]).astype(str))
        src, tgt = np.asarray(graph["edge_index"], dtype=np.int64)
        w = np.asarray(graph["edge_weight"], dtype=np.float64)
        ok = (nodes[src] >= 0) & (nodes[tgt] >= 0)
        n = len(self.var_names)
        self.adjacency = sp.csr_matrix((w[ok], (nodes[tgt[ok]], nodes[src[ok]])), shape=(n, n))
        self.hops = int(hops)
        if scale is None:
            ind, complete = _indicator(train.sets, self.var_names)
            if complete.any():
                x = self._propagate(ind[complete])
                y = train.deltas[complete]
                denom = float((x * x).sum())
                scale = float((x * y).sum()) / denom if denom > 0 else 0.0
            else:
                logger.warning(
                    "linear_coexpression: no training perturbation has all genes in var_names; using scale 1."
                )
                scale = 1.0
        self.scale = float(scale)

    def _propagate(self, theta: sp.csr_matrix) -> np.ndarray:
        x = theta.T.toarray()  # genes x sets
        for _ in range(self.hops):
            x = self.adjacency @ x
        return x.T

    def _delta(self, sets):
        ind, available = _indicator(sets, self.var_names)
        delta = np.zeros((len(sets), len(self.var_names)))
        if available.any():
            delta[available] = self.scale * self._propagate(ind[available])
        if not available.all():
            logger.warning(
                "linear_coexpression: %d of %d sets have a gene outside var_names; their rows are the control "
                "mean (obs['available'] is False).",
                int((~available).sum()),
                len(sets),
            )
        return delta, {"available": available}


#: perturbation embeddings understood by ``LinearEmbeddingBaseline`` (besides a gene x d matrix)
PERTURBATION_EMBEDDINGS = ("pca", "go", "coexpression")
#: default grid of relative ridge strengths searched by cross-validation
RIDGE_ALPHAS = np.logspace(-6, 3, 19)


def _graph_of(adata: AnnData, graph) -> dict | None:
    if isinstance(graph, str):
        if graph not in adata.uns:
            return None
        graph = adata.uns[graph]
    return graph


class LinearEmbeddingBaseline(Baseline):
    r"""Linear model on gene embeddings (Ahlmann-Eltze, Huber & Anders 2025): ``Y ~ G W P^T + b``.

    ``Y`` (genes x conditions) holds the change over control of every training perturbation and of
    control itself (a zero column); ``G`` (genes x k) is the PCA of the training pseudobulk
    (genes as observations, conditions as features, each condition centred), ``b`` the mean of ``Y``
    over conditions and ``W`` the closed-form ridge solution
    :math:`W = (G^T G + \lambda_G I)^{-1} G^T (Y - b) P (P^T P + \lambda_P I)^{-1}`.

    A perturbation's embedding ``P`` is the sum over its genes of a per-gene embedding ``e_g``
    (``perturbation_embedding``):

    ``'pca'``
        the gene's row of ``G`` (the paper's default; only for measured genes);
    ``'go'``
        a spectral embedding of the GO graph (``go_graph``, :func:`pertpy_gnn._linear.graph_embedding`);
    ``'coexpression'``
        a spectral embedding of the co-expression graph (``coexpression_graph``; measured genes);
    a DataFrame (genes x d, index gene names) or an array (``n_vars x d`` aligned to ``var_names``, ``NaN``
    rows for genes without one)
        any gene embedding, e.g. GeneCompass's (:func:`pertpy_gnn.tl.compass_gene_embeddings`).

    A gene without its own embedding gets the edge-weighted mean of the embeddings of its GO
    neighbours that have one (our extension, for perturbed genes outside ``var_names``), else zero,
    so that the prediction falls back to ``b``, the average training change. With ``normalize``
    (default) every per-gene embedding is scaled to unit length first, so that no gene's embedding
    is far outside those seen in training (a measured, highly variable gene has a ``G`` row tens of
    times longer than a GO-neighbour average, which made the unnormalized fit explode on some
    splits). Control has ``P = 0``.

    The penalty: ``ridge`` a number gives :math:`\lambda_G = \lambda_P = ` ``ridge`` (the paper:
    0.1). ``ridge='cv'`` (default) chooses a scale-free strength ``alpha`` from ``alphas`` by
    ``cv_folds``-fold cross-validation over the training perturbations (leave-one-perturbation-out
    when there are fewer), :math:`\lambda_G = \alpha\,\mathrm{tr}(G^TG)/k`,
    :math:`\lambda_P = \alpha\,\mathrm{tr}(P^TP)/d`: for each fold ``G``, ``P`` and ``b`` are
    recomputed without the held-out perturbations, ``W`` is solved for the whole grid at once
    (:func:`pertpy_gnn._linear.bilinear_ridge`) and the squared error of the held-out changes over
    all genes is summed; the smallest error wins (ties: the stronger penalty). A large ``alpha``
    shrinks ``W`` to zero and the prediction to ``b``: when the embedding carries no signal the
    model becomes the training mean change instead of exploding.

    ``obs['embedding_source']`` lists per gene ``measured`` (``'pca'``), ``embedded`` (other
    embeddings), ``go`` (GO neighbours) or ``none``; ``obs['available']`` is ``False`` when a gene
    has no embedding (such a gene adds nothing: a set of such genes is predicted as ``b``).
    Attributes after fitting: ``gene_embedding`` (``G``), ``W``, ``b``, ``ridge_`` (the penalties
    used), ``cv_alpha`` and ``cv_error`` (mean held-out error per ``alphas``).
    """

    kind = "linear_embedding"
    fallback = "b (the mean training change) plus the part of the set's genes that have an embedding"

    def __init__(
        self,
        train: _Training,
        adata: AnnData,
        *,
        pca_dim: int = 10,
        ridge: float | str = "cv",
        go_graph: dict | str | None = GO_GRAPH_KEY,
        perturbation_embedding: str | pd.DataFrame | np.ndarray = "pca",
        embedding_dim: int = 10,
        coexpression_graph: dict | str = COEXPR_GRAPH_KEY,
        normalize: bool = True,
        cv_folds: int = 10,
        cv_rule: str = "1se",
        alphas: Sequence[float] | None = None,
        seed: int = 0,
        name: str | None = None,
    ):
        super().__init__(train, name=name)
        if pca_dim < 1 or embedding_dim < 1:
            raise ValueError(f"Need pca_dim >= 1 and embedding_dim >= 1, got {pca_dim}, {embedding_dim}.")
        if isinstance(ridge, str):
            if ridge != "cv":
                raise ValueError(f"`ridge` must be a number >= 0 or 'cv', got {ridge!r}.")
        elif ridge < 0:
            raise ValueError(f"Need ridge >= 0, got ridge={ridge}.")
        if isinstance(go_graph, str) and go_graph not in adata.uns:
            logger.info(
                "linear_embedding: adata.uns[%r] not found; genes without an embedding get a zero one.",
                go_graph,
            )
        go_graph = _graph_of(adata, go_graph)
        self.pca_dim = int(pca_dim)
        self.normalize = bool(normalize)
        self._go_graph = go_graph
        self._go_cache: dict = {}
        pe = perturbation_embedding
        if isinstance(pe, str):
            if pe not in PERTURBATION_EMBEDDINGS:
                raise ValueError(
                    f"Unknown perturbation_embedding {pe!r}; choose one of {list(PERTURBATION_EMBEDDINGS)} "
                    "or pass a genes x d DataFrame (e.g. GeneCompass gene embeddings)."
                )
            self.perturbation_embedding = pe
            if pe == "pca":
                self._external = None
            else:
                graph = go_graph if pe == "go" else _graph_of(adata, coexpression_graph)
                if graph is None:
                    fix = "pg.pp.go_graph(adata)" if pe == "go" else "pg.pp.coexpression_graph(adata)"
                    raise KeyError(
                        f"perturbation_embedding={pe!r} needs the {pe} graph: build it first with {fix}, "
                        "or pass the graph dict."
                    )
                self._external = graph_embedding(graph, int(embedding_dim))
        else:
            self.perturbation_embedding = "matrix"
            if isinstance(pe, pd.DataFrame):
                ext = pe.copy()
                ext.index = ext.index.astype(str)
            else:
                arr = np.asarray(pe, dtype=np.float64)
                if arr.ndim != 2 or arr.shape[0] != len(self.var_names):
                    raise ValueError(
                        f"A perturbation_embedding array must be n_vars x d ({len(self.var_names)} rows, aligned to "
                        f"var_names), got shape {arr.shape}; pass a DataFrame indexed by gene for other genes."
                    )
                ext = pd.DataFrame(arr, index=self.var_names)
            ext = ext.astype(np.float64)
            ext = ext[np.isfinite(ext.to_numpy()).all(axis=1)]
            if ext.empty:
                raise ValueError("The perturbation_embedding matrix has no finite row.")
            self._external = ext[~ext.index.duplicated()]

        sets = list(train.sets)
        n = len(sets)
        self.cv_alpha, self.cv_error = None, None
        if ridge == "cv":
            grid = RIDGE_ALPHAS if alphas is None else np.asarray(alphas, dtype=np.float64)
            if n >= 3:
                err = np.zeros((len(grid), n))  # squared error per alpha and held-out perturbation
                folds = np.array_split(np.random.default_rng(seed).permutation(n), min(int(cv_folds), n))
                for held in folds:
                    keep = np.setdiff1d(np.arange(n), held)
                    g, p, yc, b = self._design(train.control_mean, train.means[keep], [sets[i] for i in keep])
                    lam_g, lam_p = relative_penalties(g, p, grid)
                    ws = bilinear_ridge(g, yc, p, lam_g, lam_p)
                    ph, _ = self._embed([sets[i] for i in held], g)
                    pred = np.einsum("gk,lkm,hm->lhg", g, ws, ph, optimize=True) + b[None, None, :]
                    err[:, held] = ((pred - train.deltas[held][None]) ** 2).sum(axis=2)
                mean = err.mean(axis=1)
                best = int(np.argmin(mean))
                if cv_rule == "1se":  # the strongest penalty within one standard error of the best
                    se = err[best].std(ddof=1) / np.sqrt(n)
                    best = int(np.flatnonzero(mean <= mean[best] + se).max())
                elif cv_rule != "min":
                    raise ValueError(f"`cv_rule` must be '1se' or 'min', got {cv_rule!r}.")
                self.cv_alpha, self.cv_error = float(grid[best]), mean
            else:
                logger.warning(
                    "linear_embedding: %d training perturbations are too few to cross-validate; alpha = 1.", n
                )
                self.cv_alpha = 1.0
        g, p, yc, b = self._design(train.control_mean, train.means, sets)
        if ridge == "cv":
            lam_g, lam_p = relative_penalties(g, p, [self.cv_alpha])
        else:
            lam_g, lam_p = np.array([float(ridge)]), np.array([float(ridge)])
        self.ridge_ = (float(lam_g[0]), float(lam_p[0]))
        self.gene_embedding, self.b = g, b
        self.W = bilinear_ridge(g, yc, p, lam_g, lam_p)[0]

    def _design(self, control_mean, means, sets):
        """``G``, ``P`` (control first), centred ``Y`` and ``b`` of a set of training conditions."""
        pseudobulk = np.vstack([control_mean[None, :], means])  # conditions x genes
        g = pca_gene_embedding(pseudobulk, self.pca_dim)
        p, _ = self._embed([()] + list(sets), g)
        y = (pseudobulk - control_mean[None, :]).T  # genes x conditions, control column zero
        b = y.mean(axis=1)
        return g, p, y - b[:, None], b

    def _table(self, g: np.ndarray) -> tuple[pd.Index, np.ndarray, str]:
        if self._external is None:
            return self.var_names, g, "measured"
        return self._external.index, self._external.to_numpy(), "embedded"

    def _go_adjacency(self, index: pd.Index):
        """GO neighbour -> embedded gene weights (GO nodes x ``index``), cached per index."""
        key = id(index)
        if key not in self._go_cache:
            nodes = pd.Index(np.asarray(self._go_graph["genes"]).astype(str))
            src, tgt = np.asarray(self._go_graph["edge_index"], dtype=np.int64)
            col = index.get_indexer(nodes[src])
            ok = col >= 0
            w = np.asarray(self._go_graph["edge_weight"], dtype=np.float64)[ok]
            adj = sp.csr_matrix((w, (tgt[ok], col[ok])), shape=(len(nodes), len(index)))
            self._go_cache[key] = (nodes, adj)
        return self._go_cache[key]

    def _embed(
        self, sets: Sequence[tuple[str, ...]], g: np.ndarray | None = None
    ) -> tuple[np.ndarray, list[str]]:
        index, table, direct = self._table(self.gene_embedding if g is None else g)
        genes = pd.Index(sorted({x for s in sets for x in s}))
        emb = np.zeros((len(genes), table.shape[1]))
        source = np.full(len(genes), "none", dtype=object)
        pos = index.get_indexer(genes)
        emb[pos >= 0] = table[pos[pos >= 0]]
        source[pos >= 0] = direct
        todo = np.flatnonzero(pos < 0)
        if self._go_graph is not None and todo.size:
            nodes, adj = self._go_adjacency(index)
            rows = nodes.get_indexer(genes[todo])
            sub = adj[np.where(rows >= 0, rows, 0)]
            wsum = np.asarray(sub.sum(axis=1)).ravel() * (rows >= 0)
            has = wsum > 0
            emb[todo[has]] = np.asarray(sub[has] @ table) / wsum[has, None]
            source[todo[has]] = "go"
        if self.normalize:
            norm = np.linalg.norm(emb, axis=1, keepdims=True)
            emb = np.where(norm > 0, emb / np.where(norm > 0, norm, 1.0), 0.0)
        ind, _ = _indicator(sets, genes)
        by_gene = dict(zip(genes, source, strict=True))
        names = [",".join(by_gene[x] for x in s) for s in sets]
        return np.asarray(ind @ emb), names

    def _delta(self, sets):
        p, source = self._embed(sets)
        delta = (self.gene_embedding @ self.W @ p.T).T + self.b[None, :]
        available = np.array(["none" not in s.split(",") for s in source])
        return delta, {"embedding_source": source, "available": available}


_KINDS = {
    cls.kind: cls
    for cls in (
        NoChangeBaseline,
        TrainMeanBaseline,
        AdditiveBaseline,
        LinearCoexpressionBaseline,
        LinearEmbeddingBaseline,
    )
}


def fit_baseline(
    data,
    kind: str,
    *,
    split_key: str = SPLIT_KEY,
    layer: str | None = None,
    name: str | None = None,
    per_context: bool = True,
    modality: str | None = None,
    **kwargs,
) -> Baseline:
    """Fit a baseline predictor on the training cells (``obs[split_key] == 'train'``).

    Parameters
    ----------
    data
        AnnData parsed by :func:`pertpy_gnn.pp.parse_perturbations` and split by
        :func:`pertpy_gnn.pp.split_perturbations`, or a MuData with ``modality``.
    kind
        ``'no_change'``
            the control mean (GEARS's "no perturbation" model);
        ``'train_mean'``
            the mean of all perturbed training cells, whatever the set;
        ``'additive'``
            control mean + sum of each gene's single-perturbation change; only for sets whose genes
            were all perturbed alone in training, other rows are NaN (``obs['available']``);
        ``'linear_coexpression'``
            GEARS's linear model, eq. 1: a +1 vector on the perturbed genes propagated ``hops=3``
            times through the co-expression graph (``graph=``, default
            ``uns['pg_coexpression_graph']``), scaled by one least-squares scalar (``scale=`` fixes it);
            genes must be in ``var_names``, else the row is the control mean (``obs['available']``);
        ``'linear_embedding'``
            Ahlmann-Eltze et al. 2025, ``Y ~ G W P^T + b`` with PCA read-out gene embeddings
            (``pca_dim=10``) and a closed-form ridge fit whose penalty is cross-validated over the
            training perturbations (``ridge='cv'``, ``cv_folds=10``, ``cv_rule='1se'``, ``alphas=``;
            ``ridge=0.1, normalize=False`` is the paper's fit); perturbation embeddings
            (``perturbation_embedding=``) ``'pca'``, ``'go'``, ``'coexpression'`` (spectral
            embeddings of the graphs, ``embedding_dim=10``) or a gene x d matrix (e.g. GeneCompass
            gene embeddings); genes without one are embedded from their GO neighbours (``go_graph=``,
            default ``uns['pg_go_graph']``) or as zero (see ``LinearEmbeddingBaseline``).
        ``'context_transfer'``
            data with contexts only: the cell-weighted mean change of the same set in the *other*
            contexts' training cells, over the context's control mean (NaN and
            ``obs['available'] == False`` where no other context trained the set). The baseline of
            the held-out-context task.
    split_key
        Column of ``obs`` with the train / val / test assignment.
    layer
        Expression layer; by default the one recorded by ``parse_perturbations``.
    name
        Name of the predictor (default: ``kind``).
    per_context
        Data parsed with a ``context_key`` only. ``True`` (default): one baseline per context, fitted
        on its training cells, predicting over its control mean; a context without training
        perturbations (a held-out context) gets the pooled training mean change (``train_mean`` and
        the linear kinds) or pooled single-gene changes (``additive``, also for genes of a set
        without a single in that context), flagged ``obs['available'] == False``. ``False``
        (``no_change``, ``train_mean``, ``additive``): the pooled baseline, whose change comes
        from all contexts' training cells (each relative to its own context's control mean) and
        is added to each context's control mean.
    modality
        Modality of a MuData.
    **kwargs
        Options of the kind (above).

    Returns
    -------
    A fitted ``Baseline`` with ``.name``, ``.seen_genes`` and ``.predict``; nothing is written into ``data``.
    With contexts a :class:`~pertpy_gnn.tl._contexts.ContextBaseline`, whose ``predict`` takes ``context=``.
    """
    adata = get_adata(data, modality)
    if kind == "context_transfer" and get_context(adata) is None:
        raise ValueError("kind='context_transfer' needs data parsed with a `context_key`.")
    if kind not in _KINDS and kind != "context_transfer":
        raise ValueError(f"Unknown baseline kind {kind!r}; choose one of {list(BASELINE_KINDS)}.")
    if get_context(adata) is not None:  # one baseline per context, pooled fallback (tl/_contexts.py)
        from ._contexts import ContextBaseline

        model = ContextBaseline(
            adata, kind, split_key=split_key, layer=layer, name=name, per_context=per_context, **kwargs
        )
        logger.info("Fitted %s.", model)
        return model
    if not per_context:
        raise ValueError("`per_context=False` needs data parsed with a `context_key`.")
    train = _training_data(adata, split_key, layer)
    model = _KINDS[kind](train, adata, name=name, **kwargs)
    logger.info("Fitted %s on %d training perturbations.", model, len(train.sets))
    return model
