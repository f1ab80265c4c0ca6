"""Baselines and evaluation of screens run in several cell contexts (cell lines, donors, conditions).

A context-aware baseline holds one baseline per context, fitted on that context's training cells
(changes relative to the context's own training control cells), and the *pooled* training
summaries of all contexts (each change relative to its own context's control mean), which serve as
the fallback of a context without training perturbations (e.g. a held-out cell line).
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from pertpy_gnn._constants import CONTEXT_SEP, CONTROL, DELIM, PERT_KEY, PERT_UNS_KEY
from pertpy_gnn._utils import get_matrix
from pertpy_gnn.pp._de import group_moments
from pertpy_gnn.pp._perturbations import as_perturbation_sets, get_context, layer_of

from .._prediction import unpredictable_of
from ._baselines import _KINDS, NoChangeBaseline, _Training, _training_data
from ._prediction import PREDICTION_UNS_KEY, make_prediction_adata

#: the baseline of a set's change in the other contexts (only for data with contexts)
CONTEXT_TRANSFER = "context_transfer"
#: kinds that can be pooled over contexts (``per_context=False``)
POOLABLE = ("no_change", "train_mean", "additive")


def _context_views(adata: AnnData) -> dict[str, AnnData]:
    ctx = get_context(adata).astype(str).to_numpy()
    return {str(c): adata[ctx == str(c)] for c in get_context(adata).cat.categories}


class ContextBaseline:
    """A baseline fitted per context, with the pooled training data as fallback; see :func:`fit_baseline`.

    ``predict(perturbations, *, context=None, n_control=300, seed=0)`` predicts each set in the
    context ``context`` (a name or a list of names; ``None``: every context), adding the predicted
    change to the mean of that context's training control cells. The prediction AnnData has one
    row per (context, set), ``obs['context']``, and ``obs['available']`` ``False`` where the
    context had no training data for the set and the pooled fallback was used
    (``uns['pg_prediction']['fallback']`` says which).

    Attributes
    ----------
    name, kind, contexts, seen_genes, var_names
        As for the single-context baselines; ``seen_genes`` is the union over contexts.
    per_context
        ``False``: the pooled baseline, the same change in every context.
    fitted
        Context -> fitted single-context baseline, or ``None`` for a context without training
        perturbations.
    control
        Context -> a no-change baseline on the context's training control cells.
    pooled_delta, pooled_singles
        The pooled training mean change and the pooled single-gene changes (DataFrame genes x var).
    """

    def __init__(
        self, adata: AnnData, kind: str, *, split_key: str, layer, name, per_context: bool, **kwargs
    ):
        if kind == CONTEXT_TRANSFER and not per_context:
            raise ValueError(f"{CONTEXT_TRANSFER!r} is a per-context baseline; drop per_context=False.")
        if not per_context and kind not in POOLABLE:
            raise ValueError(f"per_context=False is available for the kinds {POOLABLE}, not {kind!r}.")
        self.kind, self.per_context = kind, per_context
        self.name = name if name is not None else kind if per_context else f"{kind} (pooled)"
        self.fitted: dict[str, object] = {}
        self.control: dict[str, NoChangeBaseline] = {}
        trains: dict[str, _Training] = {}
        x_layer = layer
        for c, view in _context_views(adata).items():
            try:
                train = _training_data(view, split_key, x_layer)
            except ValueError as err:
                if "No perturbed cells" not in str(err):
                    raise
                train = _control_only(view, split_key, x_layer)
            else:
                trains[c] = train
            self.control[c] = NoChangeBaseline(train, view)
            if per_context and c in trains and kind != CONTEXT_TRANSFER:
                self.fitted[c] = _KINDS[kind](train, view, name=self.name, **kwargs)
            else:
                self.fitted[c] = None
        if not trains:
            raise ValueError(f"No perturbed cells have obs[{split_key!r}] == 'train' in any context.")
        self.contexts = list(self.control)
        self.var_names = next(iter(self.control.values())).var_names
        self.seen_genes = set().union(*(t.seen_genes for t in trains.values()))
        # pooled training summaries: each change relative to its own context's control mean
        deltas = np.vstack([t.deltas for t in trains.values()])
        n_cells = np.concatenate([t.n_cells for t in trains.values()]).astype(np.float64)
        sets = [s for t in trains.values() for s in t.sets]
        self.pooled_delta = (n_cells / n_cells.sum()) @ deltas
        single = np.array([len(s) == 1 for s in sets])
        genes = pd.Index([s[0] for s, ok in zip(sets, single, strict=True) if ok])
        w = pd.Series(n_cells[single])
        sums = pd.DataFrame(deltas[single] * w.to_numpy()[:, None]).groupby(genes.to_numpy()).sum()
        self.pooled_singles = sums.div(w.groupby(genes.to_numpy()).sum(), axis=0)
        self.pooled_singles.columns = self.var_names
        # per context: the cell-weighted sum of each training set's change, and its cells
        self._set_sums = {
            c: pd.DataFrame(t.deltas * t.n_cells[:, None], index=[DELIM.join(s) for s in t.sets]).assign(
                _n=t.n_cells.astype(np.float64)
            )
            for c, t in trains.items()
        }

    def __repr__(self) -> str:
        return (
            f"ContextBaseline(name={self.name!r}, contexts={self.contexts}, per_context={self.per_context})"
        )

    def _additive(self, sets, own_genes: pd.Index | None, own: np.ndarray | None):
        """Sum of single changes: the context's own where it has them, else the pooled ones (NaN: neither)."""
        delta = np.zeros((len(sets), len(self.var_names)))
        own_all = np.ones(len(sets), dtype=bool)
        pooled = self.pooled_singles
        for i, s in enumerate(sets):  # loop over sets (tens), vectorized over genes
            for g in s:
                if own_genes is not None and g in own_genes:
                    delta[i] += own[own_genes.get_loc(g)]
                elif g in pooled.index:
                    delta[i] += pooled.loc[g].to_numpy()
                    own_all[i] = False
                else:
                    delta[i] = np.nan
                    own_all[i] = False
        return delta, own_all

    def _delta(self, c: str, sets) -> tuple[np.ndarray, np.ndarray, str]:
        """Change of each set in context ``c``, whether the context's own fit gave it, and the fallback."""
        fit = self.fitted[c]
        n = len(sets)
        if self.kind == "no_change":
            return np.zeros((n, len(self.var_names))), np.ones(n, dtype=bool), ""
        if self.kind == CONTEXT_TRANSFER:
            others = [f for k, f in self._set_sums.items() if k != c]
            total = pd.concat(others).groupby(level=0).sum() if others else pd.DataFrame(columns=["_n"])
            total = total.reindex([DELIM.join(s) for s in sets])
            delta = total.drop(columns="_n").to_numpy(dtype=np.float64) / total["_n"].to_numpy()[:, None]
            delta = delta if others else np.full((n, len(self.var_names)), np.nan)
            return delta, np.isfinite(delta).all(1), "NaN (the set is trained in no other context)"
        if self.kind == "additive":
            own_genes = None if fit is None else fit.single_genes
            own = None if fit is None else fit.single_deltas
            if not self.per_context:
                own_genes = own = None
            delta, own_all = self._additive(sets, own_genes, own)
            return (
                delta,
                own_all if self.per_context else np.ones(n, dtype=bool),
                "pooled single-gene changes of other contexts (NaN where no context has the single)",
            )
        if fit is None:
            return (
                np.broadcast_to(self.pooled_delta, (n, len(self.var_names))).copy(),
                np.full(n, not self.per_context),
                "pooled training mean (no training perturbations in this context)",
            )
        delta, extra = fit._delta(sets)
        available = np.asarray(extra.get("available", np.ones(n, dtype=bool)), dtype=bool)
        return delta, available, getattr(fit, "fallback", "")

    def predict(self, perturbations, *, context=None, n_control: int | None = 300, seed: int = 0) -> AnnData:
        """Predict the mean expression of perturbation sets in one or more contexts.

        Parameters
        ----------
        perturbations
            ``"A"``, ``"A+B"``, a tuple of genes, or a list of those.
        context
            A context, a list of contexts, or ``None`` for every context.
        n_control
            Control cells of the context averaged (drawn at random); ``None``: all of them.
        seed
            Seed of the draw.

        Returns
        -------
        The prediction AnnData, one row per (context, set): ``obs`` ``perturbation``, ``context``,
        ``available``; ``uns['pg_prediction']['fallback']``.
        """
        sets = as_perturbation_sets(perturbations)
        contexts = (
            self.contexts if context is None else [context] if isinstance(context, str) else list(context)
        )
        unknown = [c for c in contexts if c not in self.control]
        if unknown:
            raise ValueError(f"Unknown contexts {unknown}; the model knows {self.contexts}.")
        rows, bases, avail, ctx_col, fallbacks = [], [], [], [], set()
        for c in contexts:
            base, n_used = self.control[c]._control_base(n_control, seed)
            delta, available, fallback = self._delta(c, sets)
            rows.append(base[None, :] + delta)
            bases.append(np.broadcast_to(base, delta.shape))
            avail.append(available)
            ctx_col += [c] * len(sets)
            if not available.all() and fallback:
                fallbacks.add(fallback)
        with warnings.catch_warnings():  # a set repeats once per context: obs names are made unique below
            warnings.filterwarnings("ignore", message=".*names are not unique.*")
            out = make_prediction_adata(
                sets * len(contexts),
                np.vstack(rows),
                np.zeros(len(self.var_names)),
                self.var_names,
                seen_genes=self.seen_genes,
                obs_extra={"context": ctx_col, "available": np.concatenate(avail)},
                model_name=self.name,
                n_control=n_used,
            )
        out.layers["delta"] = (np.vstack(rows) - np.vstack(bases)).astype(np.float32)
        out.obs_names = [
            f"{c}{CONTEXT_SEP}{p}" for c, p in zip(ctx_col, out.obs["perturbation"], strict=True)
        ]
        rec = out.uns[PREDICTION_UNS_KEY]
        rec["control_mean"] = np.vstack(
            [self.control[c]._control_base(n_control, seed)[0] for c in contexts]
        ).astype(np.float32)
        rec["contexts"] = np.array(contexts, dtype=object)
        rec["fallback"] = "; ".join(sorted(fallbacks))
        rec["n_unavailable"] = int((~out.obs["available"].astype(bool)).sum())
        return out


def _control_only(view: AnnData, split_key: str, layer):
    """Training summaries of a context with control cells but no perturbed training cells."""
    col = view.obs[PERT_KEY].astype(str).to_numpy()
    rows = np.flatnonzero((col == CONTROL) & (view.obs[split_key].astype(str).to_numpy() == "train"))
    if rows.size == 0:
        raise ValueError(
            f"A context has no control cells with obs[{split_key!r}] == 'train'; control cells must be in 'train'."
        )
    x = get_matrix(view, layer_of(view) if layer is None else None if layer == "X" else layer)
    cx = x[rows] if sp.issparse(x) else np.asarray(x[rows])
    # the float64 sums of pg.tl.evaluate, so that no_change is exactly the evaluated control mean
    mean = group_moments(cx, np.zeros(rows.size, dtype=np.int64), 1)[1][0]
    return _Training(
        var_names=pd.Index(view.var_names.astype(str)),
        control_x=cx,
        control_mean=mean,
        sets=[],
        means=np.zeros((0, view.n_vars)),
        n_cells=np.zeros(0, dtype=np.int64),
    )


class _InContext:
    """A context-aware predictor seen as a single-context one (predicts in one context)."""

    def __init__(self, model, context: str):
        self.model, self.context = model, context
        self.name = getattr(model, "name", "model")

    def unpredictable(self, sets) -> dict[str, str]:
        return unpredictable_of(self.model, sets)

    def predict(self, sets, **kwargs):
        out = self.model.predict(sets, context=self.context, **kwargs)
        out.uns[PREDICTION_UNS_KEY]["control_mean"] = np.asarray(
            out.uns[PREDICTION_UNS_KEY]["control_mean"]
        ).reshape(-1, out.n_vars)[0]
        return out


def _rows_of_context(pred: AnnData, context: str, model: str) -> AnnData:
    if "context" not in pred.obs:
        raise ValueError(
            f"The prediction of {model!r} has no obs['context'], but the data has contexts: predict per context "
            "(model.predict(sets, context=None) predicts every context) or pass the predictor itself."
        )
    return pred[pred.obs["context"].astype(str).to_numpy() == context]


def evaluate_contexts(
    adata: AnnData, models: dict, *, split_key, subset, de_key, layer, predict_kwargs, evaluate
):
    """:func:`pertpy_gnn.tl.evaluate` on data with contexts: each context scored against its own cells.

    Every context with evaluated cells becomes a single-context AnnData (its cells, its DE genes and
    split table), scored with its own control mean, centroid and discrimination pool; the frames are
    stacked with a ``context`` column.
    """
    ctx = get_context(adata).astype(str).to_numpy()
    de = adata.uns[de_key]
    record = adata.uns.get(split_key, {}) if isinstance(adata.uns.get(split_key), dict) else {}
    table = record.get("table")
    parsed = {k: v for k, v in adata.uns[PERT_UNS_KEY].items() if k not in ("context_key", "contexts")}
    layer_name = parsed.get("layer", "X") if layer is None else layer
    parsed["layer"] = "X"  # each context's AnnData holds the evaluated layer as X
    split = adata.obs[split_key].astype(str).to_numpy() if split_key in adata.obs else None
    frames = []
    for c in get_context(adata).cat.categories:
        c = str(c)
        mask = ctx == c
        if subset is not None and not (split[mask] == subset).any():
            continue
        prefix = f"{c}{CONTEXT_SEP}"
        sub_de = {}
        for k in ("names", "indices", "scores"):
            if k in de:
                frame = de[k]
                keep = frame.index.astype(str).str.startswith(prefix)
                sub_de[k] = frame[keep].set_axis(frame.index[keep].astype(str).str[len(prefix) :], axis=0)
        sub_de["params"] = de.get("params", {})
        x = get_matrix(adata, None if layer_name == "X" else layer_name)
        cols = [
            k
            for k in adata.obs.columns
            if k in (PERT_KEY, split_key, record.get("params", {}).get("subgroup_key"))
        ]
        sub = AnnData(
            X=x[np.flatnonzero(mask)], obs=adata.obs.loc[mask, cols].copy(), var=adata.var[[]].copy()
        )
        sub.uns[PERT_UNS_KEY] = parsed
        sub.uns[de_key] = sub_de
        if record:
            rec = dict(record)
            if isinstance(table, pd.DataFrame) and "context" in table:
                rec["table"] = table[table["context"].astype(str) == c].set_index("perturbation")[
                    ["split", "subgroup"]
                ]
            sub.uns[split_key] = rec
        sub_models = {
            name: _rows_of_context(m, c, name) if isinstance(m, AnnData) else _InContext(m, c)
            for name, m in models.items()
        }
        df = evaluate(
            sub,
            sub_models,
            split_key=split_key,
            subset=subset,
            de_key=de_key,
            layer=None,
            predict_kwargs=predict_kwargs,
        )
        df.insert(2, "context", c)
        frames.append(df)
    if not frames:
        raise ValueError(f"No perturbed cells in subset {subset!r} to evaluate in any context.")
    return pd.concat(frames, ignore_index=True)
