"""Score predictions of held-out perturbations with GEARS's metrics, vectorized over perturbations."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from scipy.stats import rankdata

from pertpy_gnn._constants import CONTROL, DE_KEY, DELIM, EVAL_KEY, SPLIT_KEY, SUBGROUP_KEY
from pertpy_gnn._utils import check_overwrite, get_adata, get_matrix, logger
from pertpy_gnn.pp._de import group_moments
from pertpy_gnn.pp._perturbations import canonical_name, get_context, get_parsed, layer_of

from .._prediction import PREDICTION_UNS_KEY, recorded_skipped, unpredictable_of

#: metrics computed by :func:`evaluate`, with what they measure (per perturbation, on mean expression)
METRICS = {
    "mse_top20_normalized": "MSE on the top-20 DE genes / MSE of the control mean (no-change model) there",
    "mse_top20": "MSE on the top-20 DE genes",
    "mse_top100": "MSE on the top-100 DE genes (Welch t ranking as pp.rank_de_genes)",
    "mse_top200": "MSE on the top-200 DE genes",
    "mse_all": "MSE on all genes",
    "pearson_delta": "Pearson r of predicted vs true change over control, all genes",
    "pearson_delta_top20": "Pearson r of predicted vs true change over control, top-20 DE genes",
    "spearman_delta": "Spearman rho of predicted vs true change over control, all genes",
    "spearman_delta_top20": "Spearman rho of predicted vs true change over control, top-20 DE genes",
    "frac_opposite_direction_top20": "fraction of top-20 DE genes whose predicted change has the opposite sign",
    "frac_correct_direction_top20": "fraction of top-20 DE genes whose predicted change has the same sign",
    "frac_in_40_60_top20": "fraction of top-20 DE genes predicted within the 40-60th percentile of the true cells",
    "frac_in_25_75_top20": "fraction of top-20 DE genes predicted within the 25-75th percentile of the true cells",
    "mean_abs_zscore_top20": "mean over top-20 DE genes of |prediction - true mean| / true cells' SD",
    "mse_de_weighted": "MSE over all genes weighted by DE strength against the other perturbed cells (Mejia et al. 2025)",
    "r2_delta_de_weighted": "DE-weighted R^2 of the change relative to the perturbed centroid (Mejia et al. 2025)",
    "pearson_delta_centroid": "Pearson r of predicted vs true change relative to the perturbed centroid (Systema)",
    "perturbation_discrimination": "1 - normalized rank of the true profile among all evaluated ones by L1 distance "
    "to the prediction (1: closest, 0.5: chance; Virtual Cell Challenge)",
    "de_overlap_top20": "fraction of the true top-20 DE genes among the 20 genes of largest predicted |change|",
    "de_overlap_top100": "fraction of the true top-100 DE genes among the 100 genes of largest predicted |change|",
}
_N_TOP = 20
#: columns of the tidy frame returned by :func:`evaluate` (plus ``context`` after ``perturbation`` with contexts)
COLUMNS = ("model", "perturbation", "subgroup", "metric", "value", "available", "skipped")


def _welch_t(n: np.ndarray, mean: np.ndarray, var: np.ndarray, c: int) -> np.ndarray:
    """Welch t of every group against group ``c`` (as :func:`pertpy_gnn.pp.rank_de_genes`)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        se = np.sqrt(np.nan_to_num(var / n[:, None]) + np.nan_to_num(var[c] / n[c]))
        t = (mean - mean[c]) / se
    return np.where(np.isfinite(t), t, 0.0)


def _group_quantiles(v: np.ndarray, codes: np.ndarray, n_groups: int, qs: Sequence[float]) -> np.ndarray:
    """Quantiles (numpy's linear rule) of each column of ``v`` within each group, with one sort.

    ``codes`` (one group per row, all valid, every group non-empty); returns ``len(qs) x n_groups x v.shape[1]``.
    """
    o1 = np.argsort(v, axis=0, kind="stable")
    o2 = np.argsort(codes[o1], axis=0, kind="stable")
    sv = np.take_along_axis(v, np.take_along_axis(o1, o2, axis=0), axis=0)
    counts = np.bincount(codes, minlength=n_groups)
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    out = []
    for q in qs:
        pos = start + q * (counts - 1)
        lo, hi = np.floor(pos).astype(np.int64), np.ceil(pos).astype(np.int64)
        frac = (pos - lo)[:, None]
        out.append(sv[lo] + (sv[hi] - sv[lo]) * frac)
    return np.stack(out)


def _rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r of matching rows; 0 where a row is constant (GEARS's convention), NaN where NaN."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        denom = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
        r = (a * b).sum(axis=1) / denom
    r[denom == 0] = 0.0
    return r


def _rowwise_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    bad = np.isnan(a).any(axis=1) | np.isnan(b).any(axis=1)
    r = np.full(a.shape[0], np.nan)
    if (~bad).any():
        r[~bad] = _rowwise_pearson(rankdata(a[~bad], axis=1), rankdata(b[~bad], axis=1))
    return r


def de_weights(t: np.ndarray) -> np.ndarray:
    """Per-gene weights of the DE-weighted metrics from DE statistics (rows: perturbations).

    ``w = ((|t| - min |t|) / (max |t| - min |t|))^2``, normalized to sum 1 per row (Mejia et al. 2025);
    a row of equal ``|t|`` gets uniform weights, a row of zeros gets NaN.
    """
    a = np.abs(t)
    lo, hi = a.min(axis=1, keepdims=True), a.max(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        w = np.where(hi > lo, (a - lo) / np.where(hi > lo, hi - lo, 1.0), np.where(hi > 0, 1.0, np.nan)) ** 2
        return w / w.sum(axis=1, keepdims=True)


def weighted_r2(pred: np.ndarray, true: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Row-wise weighted R^2 (``w`` rows sum to 1): ``1 - sum w (pred - true)^2 / sum w (true - sum w true)^2``."""
    mu = (w * true).sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return 1.0 - (w * (pred - true) ** 2).sum(axis=1) / (w * (true - mu) ** 2).sum(axis=1)


def discrimination(pred: np.ndarray, true: np.ndarray, *, chunk_elements: int = 1 << 24) -> np.ndarray:
    """Perturbation discrimination of each prediction among the true profiles (Virtual Cell Challenge).

    ``1 - r_i / (N - 1)`` with ``r_i`` the number of other true profiles ``j`` closer to prediction ``i``
    (L1 distance) than its own true profile ``i`` (ties count one half). NaN for NaN rows or ``N < 2``.
    """
    n = pred.shape[0]
    out = np.full(n, np.nan)
    if n < 2:
        return out
    step = max(1, chunk_elements // max(true.size, 1))
    for i0 in range(0, n, step):  # blocks of predictions, all true profiles at once
        d = np.abs(pred[i0 : i0 + step, None, :] - true[None, :, :]).sum(axis=2)
        rows = np.arange(d.shape[0])
        own = d[rows, i0 + rows][:, None]
        closer = (d < own).sum(axis=1) + 0.5 * ((d == own).sum(axis=1) - 1)
        out[i0 : i0 + step] = 1.0 - closer / (n - 1)
    out[np.isnan(pred).any(axis=1)] = np.nan
    return out


def top_overlap(d_pred: np.ndarray, true_top: np.ndarray) -> np.ndarray:
    """Fraction of ``true_top`` (rows of gene indices, k each) among the k genes of largest ``|d_pred|``.

    Genes with a predicted change of exactly 0 never count as predicted.
    """
    k = true_top.shape[1]
    a = np.abs(np.nan_to_num(d_pred, nan=0.0))
    top = (
        np.argpartition(-a, k - 1, axis=1)[:, :k]
        if k < a.shape[1]
        else np.tile(np.arange(a.shape[1]), (len(a), 1))
    )
    picked = np.zeros(a.shape, dtype=bool)
    np.put_along_axis(picked, top, True, axis=1)
    picked &= a > 0
    return np.take_along_axis(picked, true_top, axis=1).sum(axis=1) / k


def _is_predictor(obj) -> bool:
    return hasattr(obj, "predict") and not isinstance(obj, AnnData)


def _prediction_rows(pred: AnnData, names: Sequence[str]) -> np.ndarray:
    """Row of ``pred`` of each perturbation of ``names`` (by canonical name; -1 where absent)."""
    labels = pred.obs["perturbation"] if "perturbation" in pred.obs else pd.Series(pred.obs_names)
    canon = [canonical_name(str(lab).split(DELIM)) for lab in labels]
    first = {nm: i for i, nm in reversed(list(enumerate(canon)))}
    return np.array([first.get(nm, -1) for nm in names], dtype=np.int64)


def prediction_matrix(
    pred: AnnData, names: Sequence[str], var_names: pd.Index, *, model: str = "prediction"
) -> np.ndarray:
    """Rows of a prediction AnnData for perturbations ``names``, columns in the order of ``var_names``.

    Rows are matched by ``obs['perturbation']`` (else ``obs_names``) after canonicalizing
    (``B+A`` = ``A+B``). Raises a clear error when perturbations or genes are missing.
    """
    rows = _prediction_rows(pred, names)
    if (rows < 0).any():
        missing = [n for n, r in zip(names, rows, strict=True) if r < 0]
        raise ValueError(
            f"The prediction of {model!r} lacks {len(missing)} perturbations to evaluate, e.g. {missing[:5]}; "
            "predict every perturbation of the evaluated subset (or pass the predictor itself)."
        )
    cols = pd.Index(pred.var_names.astype(str)).get_indexer(var_names)
    if (cols < 0).any():
        missing = list(var_names[cols < 0][:5])
        raise ValueError(
            f"The prediction of {model!r} lacks {int((cols < 0).sum())} genes of adata.var_names, e.g. {missing}; "
            "predict on the same genes as the evaluated data."
        )
    x = pred.X[rows][:, cols]
    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)


def _gather(x, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``x[rows[i], cols[i, j]]`` for a sparse or dense matrix, as dense float64."""
    r = np.broadcast_to(rows[:, None], cols.shape)
    v = x[r, cols]
    return np.asarray(v.toarray() if sp.issparse(v) else v, dtype=np.float64)


def _subgroups(adata: AnnData, names: list[str], split_key: str, col: pd.Series) -> np.ndarray:
    """Test subgroup of each perturbation: from ``uns[split_key]['table']``, else the subgroup column."""
    record = adata.uns.get(split_key)
    record = record if isinstance(record, Mapping) else {}
    table = record.get("table")
    if isinstance(table, pd.DataFrame) and "subgroup" in table:
        sub = table["subgroup"].astype(str).reindex(names)
        if sub.notna().all():
            return sub.to_numpy(dtype=object)
    key = record.get("params", {}).get("subgroup_key", SUBGROUP_KEY)
    if key in adata.obs:
        first = adata.obs[key].astype(str).groupby(col.astype(str).to_numpy()).first()
        return first.reindex(names).fillna("all").to_numpy(dtype=object)
    return np.full(len(names), "all", dtype=object)


def evaluate(
    data,
    predictions,
    *,
    split_key: str = SPLIT_KEY,
    subset: str | None = "test",
    de_key: str = DE_KEY,
    layer: str | None = None,
    predict_kwargs: dict | None = None,
    key_added: str = EVAL_KEY,
    overwrite: bool = False,
    modality: str | None = None,
) -> pd.DataFrame:
    """Score predicted mean expression of held-out perturbations against the measured cells.

    Per perturbation and model, on mean expression (GEARS Fig. 2, Extended Data Fig. 1; see
    ``METRICS``): MSE on the top-20 DE genes, raw and divided by the MSE of the control mean (the
    no-change model; so ``no_change`` scores 1), MSE on the top-100 / top-200 DE genes and on all
    genes, Pearson and Spearman correlation of the predicted and true change over control (all genes
    and top-20 DE), the fraction of top-20 DE genes whose change has the opposite / the same sign
    (a predicted change of exactly 0 counts as neither, as in GEARS), the fraction of top-20 DE genes
    predicted within the 40-60th and 25-75th percentile of the true cells (genes whose true cells
    are all zero are left out, as in GEARS), and the mean absolute z-score of the prediction against
    the true cells (population SD; genes with SD 0 left out). Correlations of a constant vector are
    0 (GEARS's convention); a NaN prediction row (e.g. ``additive`` without both singles) gives NaN.

    Beside the paper's metrics, those the field uses now (formulas in ``docs/methods.md``): with
    ``m`` the perturbed centroid (the mean over all perturbations of the data, all splits, of their mean
    profiles) and DE weights ``w_pg = ((|t_pg| - min|t_p|) / (max|t_p| - min|t_p|))^2`` normalized to sum
    1, ``t_pg`` the Welch t of perturbation ``p`` against all other perturbed cells (Mejia et al. 2025):
    ``mse_de_weighted = sum_g w_pg (pred - true)^2``; ``r2_delta_de_weighted``, the ``w``-weighted R^2
    of ``pred - m`` against ``true - m``; ``pearson_delta_centroid``, Pearson r of ``pred - m`` and
    ``true - m`` (Vinas Torne et al. 2025); ``perturbation_discrimination = 1 - r / (N - 1)``, ``r`` the
    number of other evaluated perturbations whose true profile is closer (L1) to the prediction than
    its own (ties one half; Virtual Cell Challenge; 1 best, 0.5 chance); ``de_overlap_top20`` / ``_top100``,
    the fraction of the true top-k DE genes among the k genes of largest predicted ``|change|``
    (a change of exactly 0 never counts).

    The top-20 DE genes are those of ``uns[de_key]`` (:func:`pertpy_gnn.pp.rank_de_genes`); the top
    100 / 200 are ranked here by the same Welch t. The control mean is the mean of all control cells;
    a predictor averaging a random subset of them (``n_control=300``) carries that sampling noise.
    Percentiles are computed for all perturbations at once with one sort per gene rank.

    Parameters
    ----------
    data
        AnnData parsed by :func:`pertpy_gnn.pp.parse_perturbations`, split by
        :func:`pertpy_gnn.pp.split_perturbations` and with DE genes from :func:`pertpy_gnn.pp.rank_de_genes`;
        or a MuData with ``modality``.
    predictions
        Dict ``name -> predictor or prediction AnnData`` (a list of predictors is named by their
        ``.name``). Predictors are asked to predict the subset's perturbations; a prediction AnnData
        (the form of :func:`~pertpy_gnn._prediction.make_prediction_adata`) must contain them.
    split_key
        Column of ``obs`` with the train / val / test assignment.
    subset
        Which split to evaluate (``'test'``, ``'val'``, ...); ``None`` evaluates every perturbation.
    de_key
        Key of the DE genes in ``uns``.
    layer
        Expression layer; by default the one recorded by ``parse_perturbations``.
    predict_kwargs
        Passed to every predictor's ``predict`` (e.g. ``{'n_control': None, 'seed': 0}``).
    key_added
        Key in ``adata.uns``.
    overwrite
        Replace an existing result under ``key_added``.
    modality
        Modality of a MuData.

    Perturbations a model cannot predict (a predictor's ``unpredictable(sets)``: GEARS has no embedding
    for a gene without a node in its GO graph, e.g. IER5L, which has no GO annotation; a prediction
    AnnData's ``uns['pg_prediction']['skipped']``, written by ``predict(..., skip_unknown=True)``) are
    left out of the metrics of **every** model, so that all models, baselines included, are scored on
    the same perturbations; a warning names them, the reason and the fix, and their rows say so
    (``skipped``). A model that can predict none of them, or no perturbation left for every model,
    raises an error naming why. Evaluate models in one call to compare them on the same perturbations.

    Returns
    -------
    Tidy DataFrame with columns ``model``, ``perturbation``, ``subgroup``, ``metric``, ``value``,
    ``available``, ``skipped`` (one row per model x evaluated perturbation x metric; ``available`` is
    ``False`` where the prediction's ``obs['available']`` says the model fell back, e.g.
    ``linear_coexpression`` on a gene outside ``var_names``, and a warning is logged; ``skipped`` is
    ``''`` for a scored row and the reason for a perturbation left out, whose ``value`` is NaN and
    ``available`` ``False``). Sets ``adata.uns['pg_evaluation']`` = ``{'results':`` that frame,
    ``'summary':`` :func:`summarize_evaluation` of it (``n``: the perturbations each mean rests on,
    ``n_skipped``: those left out), ``'skipped':`` one row per model and left-out perturbation
    (``model``, ``perturbation``, ``subgroup``, ``reason``; empty when none), ``'params': {...}}``.

    With contexts (``parse_perturbations(..., context_key=)``) every context is scored on its own:
    truth, control mean, DE genes (``'context|perturbation'`` rows of ``uns[de_key]``), perturbed
    centroid and the discrimination pool are those of the context; predictors are asked
    ``predict(sets, context=c)``, a prediction AnnData needs ``obs['context']``; the frame gets a
    ``context`` column (after ``perturbation``).
    """
    adata = get_adata(data, modality)
    check_overwrite(adata.uns, key_added, overwrite, "adata.uns")
    col, _ = get_parsed(adata)
    if subset is not None and split_key not in adata.obs:
        raise KeyError(
            f"obs[{split_key!r}] not found: split the perturbations first with "
            "pg.pp.split_perturbations(adata, kind='simulation'), or pass `split_key=`, or `subset=None`."
        )
    if de_key not in adata.uns:
        raise KeyError(
            f"adata.uns[{de_key!r}] not found: rank the DE genes first with pg.pp.rank_de_genes(adata)."
        )
    if isinstance(predictions, Mapping):
        models = dict(predictions)
    elif isinstance(predictions, Sequence) and all(_is_predictor(p) for p in predictions):
        models = {p.name: p for p in predictions}
    else:
        raise TypeError(
            "`predictions` must be a dict name -> predictor or prediction AnnData (or a list of predictors)."
        )
    if not models:
        raise ValueError("`predictions` is empty: give at least one predictor or prediction AnnData.")
    for name, m in models.items():
        if not (_is_predictor(m) or isinstance(m, AnnData)):
            raise TypeError(
                f"predictions[{name!r}] is a {type(m).__name__}; expected a predictor or a prediction AnnData."
            )

    if get_context(adata) is not None:  # each context against its own control cells, DE genes and centroid
        from ._contexts import evaluate_contexts

        df = evaluate_contexts(
            adata,
            models,
            split_key=split_key,
            subset=subset,
            de_key=de_key,
            layer=layer,
            predict_kwargs=predict_kwargs,
            evaluate=functools.partial(evaluate, key_added=key_added),
        )
        _store(adata, key_added, df, split_key, subset, de_key, layer, _N_TOP, models)
        return df

    in_subset = np.ones(adata.n_obs, dtype=bool)
    if subset is not None:
        split = adata.obs[split_key].astype(str).to_numpy()
        if subset not in set(split):
            raise ValueError(
                f"No cells with obs[{split_key!r}] == {subset!r}; the split has {sorted(set(split))}."
            )
        in_subset = split == subset
    labels = col.astype(str).to_numpy()
    is_ctrl = labels == CONTROL
    in_split = np.bincount(
        col.cat.codes.to_numpy()[in_subset & (col.cat.codes.to_numpy() >= 0)],
        minlength=len(col.cat.categories),
    )
    names = [cat for cat, k in zip(col.cat.categories, in_split, strict=True) if cat != CONTROL and k > 0]
    if not names:
        raise ValueError(f"No perturbed cells in subset {subset!r} to evaluate.")
    # perturbations some model cannot predict (e.g. a gene without a GO-graph node for GEARS) are left out
    # of every model's metrics: all models are scored on the same perturbations
    all_names = names
    skipped = _skipped_perturbations(models, names, subset, key_added)
    names = [nm for nm in all_names if not any(nm in sk for sk in skipped.values())]
    de_names = adata.uns[de_key]["indices"]
    missing = [n for n in names if n not in de_names.index]
    if missing:
        raise KeyError(
            f"{len(missing)} evaluated perturbations have no DE genes in uns[{de_key!r}] (e.g. {missing[:5]}): "
            "recompute them with pg.pp.rank_de_genes(adata, overwrite=True)."
        )
    n_top = min(_N_TOP, de_names.shape[1])
    top20 = de_names.loc[names].to_numpy()[:, :n_top].astype(np.int64)
    if n_top < _N_TOP and adata.n_vars >= _N_TOP:
        logger.warning(
            "uns[%r] holds only %d DE genes per perturbation; top-20 metrics use %d.", de_key, n_top, n_top
        )

    # truth: moments of every evaluated perturbation (subset cells) and of all control cells
    layer = layer_of(adata) if layer is None else layer
    x = get_matrix(adata, layer)
    pos = pd.Index(names).get_indexer(labels)
    codes = np.where(in_subset & (pos >= 0), pos, -1)
    codes[is_ctrl] = len(names)
    n, mean, var = group_moments(x, codes, len(names) + 1)
    # predictions are float32 (make_prediction_adata): compare at that precision, so that a prediction
    # equal to the control mean (or to the true mean) scores exactly as such
    mean = mean.astype(np.float32).astype(np.float64)
    c = len(names)
    true, ctrl = mean[:c], mean[c]
    t = _welch_t(n, mean, var, c)[:c]
    order = np.argsort(-np.abs(t), axis=1, kind="stable")
    tops = {k: order[:, : min(k, adata.n_vars)] for k in (100, 200)}

    # per-cell values of each perturbation's top-20 genes -> percentiles, all perturbations at once
    cells = np.flatnonzero((codes >= 0) & (codes < c))
    cell_codes = codes[cells]
    vals = _gather(x, cells, top20[cell_codes])
    q25, q40, q60, q75 = _group_quantiles(vals, cell_codes, c, (0.25, 0.4, 0.6, 0.75))
    q0, q1 = _group_quantiles(vals, cell_codes, c, (0.0, 1.0))
    expressed = ~((q0 == 0) & (q1 == 0))
    true20 = np.take_along_axis(true, top20, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        sd20 = np.sqrt(np.take_along_axis(var[:c], top20, axis=1) * ((n[:c] - 1) / n[:c])[:, None])
    ctrl20 = ctrl[top20]
    d_true = true - ctrl[None, :]
    nochange_mse = ((ctrl20 - true20) ** 2).mean(axis=1)

    # the perturbed centroid (mean of every perturbation's mean, all splits) and DE against the other
    # perturbed cells, for the calibrated metrics
    all_codes = col.cat.codes.to_numpy().astype(np.int64)
    all_codes = np.where(is_ctrl, -1, all_codes)
    n_all, mean_all, var_all = group_moments(x, all_codes, len(col.cat.categories))
    has = n_all > 0
    centroid = mean_all[has].mean(axis=0)
    s1 = (n_all[:, None] * mean_all)[has].sum(axis=0)
    s2 = (np.nan_to_num(var_all) * np.maximum(n_all - 1, 0)[:, None] + n_all[:, None] * mean_all**2)[has].sum(
        axis=0
    )
    own = pd.Index(col.cat.categories).get_indexer(names)
    n_rest = n_all[has].sum() - n_all[own]
    with np.errstate(invalid="ignore", divide="ignore"):
        m_rest = (s1[None, :] - n_all[own, None] * mean_all[own]) / n_rest[:, None]
        ss_rest = s2[None, :] - (
            np.nan_to_num(var_all[own]) * np.maximum(n_all[own] - 1, 0)[:, None]
            + n_all[own, None] * mean_all[own] ** 2
        )
        v_rest = np.maximum(ss_rest - n_rest[:, None] * m_rest**2, 0) / (n_rest[:, None] - 1)
        se = np.sqrt(np.nan_to_num(var[:c] / n[:c, None]) + np.nan_to_num(v_rest / n_rest[:, None]))
        t_rest = (mean[:c] - m_rest) / se
    t_rest = np.where(np.isfinite(t_rest), t_rest, 0.0)
    weights = de_weights(t_rest)
    d_true_c = true - centroid[None, :]

    subgroups = _subgroups(adata, all_names, split_key, col)
    sets = [tuple(nm.split(DELIM)) for nm in names]
    kwargs = {} if predict_kwargs is None else dict(predict_kwargs)
    frames = []
    for model, m in models.items():
        pred_ad = m.predict(sets, **kwargs) if _is_predictor(m) else m
        pred = prediction_matrix(pred_ad, names, pd.Index(adata.var_names.astype(str)), model=model)
        d_pred = pred - ctrl[None, :]
        pred20 = np.take_along_axis(pred, top20, axis=1)
        dp20, dt20 = pred20 - ctrl20, true20 - ctrl20
        sign_p, sign_t = np.sign(dp20), np.sign(dt20)
        with np.errstate(invalid="ignore", divide="ignore"):
            mse20 = ((pred20 - true20) ** 2).mean(axis=1)
            z = np.where(sd20 > 0, np.abs(pred20 - true20) / sd20, np.nan)
            values = {
                "mse_top20_normalized": mse20 / np.where(nochange_mse > 0, nochange_mse, np.nan),
                "mse_top20": mse20,
                "mse_top100": ((np.take_along_axis(pred - true, tops[100], axis=1)) ** 2).mean(axis=1),
                "mse_top200": ((np.take_along_axis(pred - true, tops[200], axis=1)) ** 2).mean(axis=1),
                "mse_all": ((pred - true) ** 2).mean(axis=1),
                "pearson_delta": _rowwise_pearson(d_pred, d_true),
                "pearson_delta_top20": _rowwise_pearson(dp20, dt20),
                "spearman_delta": _rowwise_spearman(d_pred, d_true),
                "spearman_delta_top20": _rowwise_spearman(dp20, dt20),
                "frac_opposite_direction_top20": (sign_p * sign_t < 0).mean(axis=1),
                "frac_correct_direction_top20": (sign_p == sign_t).mean(axis=1),
                "frac_in_40_60_top20": (((pred20 >= q40) & (pred20 <= q60)) & expressed).sum(axis=1)
                / expressed.sum(axis=1),
                "frac_in_25_75_top20": (((pred20 >= q25) & (pred20 <= q75)) & expressed).sum(axis=1)
                / expressed.sum(axis=1),
                "mean_abs_zscore_top20": np.nansum(z, axis=1) / (~np.isnan(z)).sum(axis=1),
                "mse_de_weighted": (weights * (pred - true) ** 2).sum(axis=1),
                "r2_delta_de_weighted": weighted_r2(pred - centroid[None, :], d_true_c, weights),
                "pearson_delta_centroid": _rowwise_pearson(pred - centroid[None, :], d_true_c),
                "perturbation_discrimination": discrimination(pred, true),
                "de_overlap_top20": top_overlap(d_pred, top20),
                "de_overlap_top100": top_overlap(d_pred, tops[100]),
            }
        nan_rows = np.isnan(pred).any(axis=1)
        for k in values:
            values[k] = np.where(nan_rows, np.nan, values[k]).astype(np.float64)
        available = np.ones(len(names), dtype=bool)
        if "available" in pred_ad.obs:
            rows = _prediction_rows(pred_ad, names)
            available = pred_ad.obs["available"].to_numpy().astype(bool)[rows]
        if not available.all():
            fallback = pred_ad.uns.get(PREDICTION_UNS_KEY, {}).get("fallback", "a fallback")
            logger.warning(
                "%s could not predict %d of %d perturbations and gave %s for them (column 'available' is False).",
                model,
                int((~available).sum()),
                len(names),
                fallback,
            )
        # every evaluated perturbation gets its rows; those left out: NaN, available False, `skipped` says why
        wide = pd.DataFrame(values, index=names).reindex(all_names)
        wide.insert(0, "skipped", [_skip_reason(model, nm, skipped) for nm in all_names])
        wide.insert(0, "available", pd.Series(available, index=names).reindex(all_names, fill_value=False))
        wide.insert(0, "subgroup", subgroups)
        wide.insert(0, "perturbation", all_names)
        wide.insert(0, "model", model)
        frames.append(
            wide.melt(
                id_vars=["model", "perturbation", "subgroup", "available", "skipped"],
                var_name="metric",
                value_name="value",
            )
        )
    df = pd.concat(frames, ignore_index=True)
    df = df[list(COLUMNS)]
    for k in ("model", "perturbation", "subgroup", "metric", "skipped"):
        df[k] = df[k].astype(str)
    df["available"] = df["available"].astype(bool)
    df["value"] = df["value"].astype(np.float64)
    _store(adata, key_added, df, split_key, subset, de_key, layer, n_top, models)
    logger.info(
        "Evaluated %d models on the same %d perturbations of subset %r%s.",
        len(models),
        len(names),
        subset,
        f" ({len(all_names) - len(names)} left out: not predictable by every model)"
        if len(names) < len(all_names)
        else "",
    )
    return df


def _skipped_perturbations(models: dict, names: list[str], subset, key: str) -> dict[str, dict[str, str]]:
    """Per model, the evaluated perturbations it cannot predict (name -> reason with the fix); logs them.

    A predictor says so through ``unpredictable(sets)`` (GEARS: genes without a GO-graph node); a
    prediction AnnData through ``uns['pg_prediction']['skipped']`` (``predict(..., skip_unknown=True)``).
    Raises when a model can predict none of them, or when no perturbation is left for every model.
    """
    sets = [tuple(nm.split(DELIM)) for nm in names]
    wanted = set(names)
    out: dict[str, dict[str, str]] = {}
    for model, m in models.items():
        if _is_predictor(m):
            sk = unpredictable_of(m, sets)
        else:
            present = _prediction_rows(m, names) >= 0
            recorded = recorded_skipped(m)
            sk = {
                nm: recorded[nm] for nm, ok in zip(names, present, strict=True) if not ok and nm in recorded
            }
        sk = {nm: r for nm, r in sk.items() if nm in wanted}
        if len(sk) == len(names):
            raise ValueError(
                f"{model!r} cannot predict any of the {len(names)} perturbations of subset {subset!r}, so it cannot "
                f"be evaluated: {_reasons(sk)}"
            )
        out[model] = sk
    left_out = [nm for nm in names if any(nm in sk for sk in out.values())]
    if len(left_out) == len(names):
        raise ValueError(
            f"No perturbation of subset {subset!r} can be predicted by every model, so they cannot be compared on "
            "the same perturbations: "
            + " | ".join(f"{model}: {_reasons(sk)}" for model, sk in out.items() if sk)
            + " Evaluate the models in separate calls, or fix the reasons above."
        )
    for model, sk in out.items():
        if sk:
            logger.warning(
                "%s cannot predict %d of the %d evaluated perturbations; they are left out of the metrics of "
                "every model (so that all are scored on the same %d perturbations; column 'skipped' and "
                "uns[%r]['skipped'] list them): %s",
                model,
                len(sk),
                len(names),
                len(names) - len(left_out),
                key,
                _reasons(sk),
            )
    return out


def _reasons(skipped: dict[str, str], n: int = 10) -> str:
    """``'A, A+B: reason; C: other reason.'``: perturbations grouped by reason, at most ``n`` reasons."""
    by_reason: dict[str, list[str]] = {}
    for nm, r in skipped.items():
        by_reason.setdefault(r, []).append(nm)
    items = list(by_reason.items())
    text = "; ".join(
        f"{', '.join(nms[:10])}{f' (+{len(nms) - 10} more)' if len(nms) > 10 else ''}: {r}"
        for r, nms in items[:n]
    )
    return text + (f"; ... ({len(items) - n} more reasons)" if len(items) > n else "") + "."


def _skip_reason(model: str, name: str, skipped: dict[str, dict[str, str]]) -> str:
    """Why ``name`` is not scored for ``model`` ('' when it is)."""
    if name in skipped[model]:
        return skipped[model][name]
    others = [m for m, sk in skipped.items() if name in sk]
    if not others:
        return ""
    return f"left out of every model's metrics (all scored on the same perturbations): {', '.join(others)} cannot predict it"


def _store(adata, key_added, df, split_key, subset, de_key, layer, n_top, models) -> None:
    keys = ["model", "perturbation", *(["context"] if "context" in df else [])]
    skipped = (
        df.loc[df["skipped"] != "", [*keys, "subgroup", "skipped"]]
        .drop_duplicates(keys)
        .rename(columns={"skipped": "reason"})
        .reset_index(drop=True)
    )
    adata.uns[key_added] = {
        "results": df,
        "summary": summarize_evaluation(df),
        "skipped": skipped,
        "params": {
            "split_key": split_key,
            "subset": "all" if subset is None else subset,
            "de_key": de_key,
            "layer": "X" if layer is None else layer,
            "n_top": int(n_top),
            "models": list(models),
        },
    }


def common_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of a tidy :func:`evaluate` frame with a finite value for every model of the frame.

    Per metric and perturbation (and context, if any): the perturbations all models are scored on.
    """
    keys = ["metric", "perturbation", *(["context"] if "context" in df else [])]
    finite = np.isfinite(df["value"].to_numpy(dtype=float))
    n_models = df[finite].groupby(keys)["model"].nunique()
    shared = n_models[n_models == df["model"].nunique()].index
    return df[finite & pd.MultiIndex.from_frame(df[keys]).isin(shared)]


def summarize_evaluation(df: pd.DataFrame, *, wide: bool = False, common: bool = False) -> pd.DataFrame:
    """Mean of each metric per model and subgroup (and over all subgroups, as subgroup ``all``).

    A model that cannot predict some perturbations (``additive`` on sets with an untrained gene: NaN)
    has its means over fewer perturbations than the others (``n``); the wide table, which has no
    ``n``, logs a warning naming such models. ``common=True`` compares like with like.

    Parameters
    ----------
    df
        Tidy frame returned by :func:`evaluate` (or ``adata.uns['pg_evaluation']['results']``).
    wide
        Return one row per ``subgroup`` x ``metric`` and one column per model (means only), ready for
        ``DataFrame.to_markdown()``.
    common
        Per metric, only the perturbations with a value for every model (the means then rest on the
        same perturbations); default: each model over the perturbations it has a value for.

    Returns
    -------
    Long DataFrame with columns ``model``, ``subgroup``, ``metric``, ``mean``, ``sem``, ``n`` (number of
    perturbations with a finite value, the perturbations the mean rests on; NaN values are left out of
    the mean), when ``df`` has the ``available`` column ``n_unavailable`` (scored perturbations the model
    fell back on) and, when it has the ``skipped`` column, ``n_skipped`` (perturbations left out of the
    metrics because some model cannot predict them; the same for every model of one evaluation), or
    the wide table.
    """
    need = {"model", "perturbation", "subgroup", "metric", "value"}
    if not need <= set(df.columns):
        raise ValueError(
            f"Expected the tidy frame of pg.tl.evaluate with columns {sorted(need)}, got {list(df.columns)}."
        )
    if common:
        df = common_rows(df)
        if df.empty:
            raise ValueError(
                "No perturbation has a value for every model: `common=True` leaves nothing to summarize."
            )
    both = (
        pd.concat([df, df.assign(subgroup="all")], ignore_index=True) if df["subgroup"].nunique() > 1 else df
    )
    g = both.groupby(["model", "subgroup", "metric"], sort=False)["value"]
    out = pd.DataFrame({"mean": g.mean(), "sem": g.sem(), "n": g.count()}).reset_index()
    out["n"] = out["n"].astype(np.int64)
    by = [both["model"], both["subgroup"], both["metric"]]
    skipped = both["skipped"].astype(str) != "" if "skipped" in both else pd.Series(False, index=both.index)
    if "available" in both:  # fallbacks among the scored perturbations (a skipped one is not a fallback)
        unavailable = (~both["available"].astype(bool) & ~skipped).groupby(by, sort=False)
        out["n_unavailable"] = unavailable.sum().to_numpy().astype(np.int64)
    if "skipped" in both:
        out["n_skipped"] = skipped.groupby(by, sort=False).sum().to_numpy().astype(np.int64)
    if wide:
        fewer = out["n"] < out.groupby(["subgroup", "metric"])["n"].transform("max")
        if fewer.any():
            logger.warning(
                "In the wide summary the means of %s rest on fewer perturbations than the other models' "
                "(column n of the long table); summarize_evaluation(..., common=True) compares all models "
                "on the same perturbations.",
                ", ".join(map(str, pd.unique(out.loc[fewer, "model"]))),
            )
        return out.pivot(index=["subgroup", "metric"], columns="model", values="mean")[
            list(pd.unique(df["model"]))
        ]
    return out
