"""Genetic-interaction plots: the GI map, non-additive genes of a double, predicted vs true scores."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from .._constants import DELIM
from ..tl._gi import GI_SCORES, _as_scores, _deltas_of, _pair_sets, resolve_gi_thresholds

#: colormap of each score in the GI map (GEARS Fig. 5b): strong colour = strong interaction
_CMAPS = {
    "magnitude": "RdBu_r",  # red synergy (> 1), blue suppression (< 1)
    "model_fit": "Greens_r",  # low fit = neomorphism
    "similarity": "Oranges",  # high = redundancy
    "equality_of_contribution": "Purples_r",  # low = epistasis
    "dominance": "Purples",
}
#: value drawn on the diagonal / for missing pairs before clustering (neutral for each score)
_NEUTRAL = {
    "magnitude": 1.0,
    "model_fit": 1.0,
    "similarity": 0.0,
    "equality_of_contribution": 1.0,
    "dominance": 0.0,
}


def _pair_genes(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    if {"gene_a", "gene_b"} <= set(df.columns):
        return df["gene_a"].astype(str).to_numpy(), df["gene_b"].astype(str).to_numpy()
    parts = [str(i).split(DELIM) for i in df.index]
    if any(len(p) != 2 for p in parts):
        raise ValueError(
            "Expected doubles 'A+B' as the index of the GI score table (or columns gene_a, gene_b)."
        )
    return np.array([p[0] for p in parts]), np.array([p[1] for p in parts])


def _matrix(df: pd.DataFrame, score: str, genes: list[str]) -> np.ndarray:
    ga, gb = _pair_genes(df)
    pos = {g: i for i, g in enumerate(genes)}
    m = np.full((len(genes), len(genes)), np.nan)
    i = np.array([pos[g] for g in ga])
    j = np.array([pos[g] for g in gb])
    v = df[score].to_numpy(dtype=np.float64)
    m[i, j] = v
    m[j, i] = v
    return m


def gi_map(
    data,
    *,
    scores: Sequence[str] = ("magnitude", "model_fit", "similarity", "equality_of_contribution"),
    cluster: bool = True,
    mask_uncertain: bool = True,
    show_labels: bool | None = None,
    thresholds=None,
    panel_size: float = 4.0,
) -> Figure:
    """Multi-dimensional GI map: one genes x genes heatmap per score (GEARS Fig. 5b).

    Rows and columns are ordered by hierarchical clustering (average linkage, Euclidean) of the
    ``magnitude`` matrix, the same order in every panel. Colour maps: ``magnitude`` diverging at
    1 (red synergy, blue suppression), ``model_fit`` green (dark: low, neomorphic),
    ``similarity`` orange (dark: high, redundant), ``equality_of_contribution`` purple (dark: low,
    epistatic); each colour bar marks the subtype threshold.

    Parameters
    ----------
    data
        GI score table of :func:`pertpy_gnn.tl.gi_map` / :func:`pertpy_gnn.tl.gi_scores`, or an
        AnnData holding it in ``uns['pg_gi_scores']``.
    scores
        Scores to draw, one panel each.
    cluster
        Order the genes by clustering the magnitude matrix; else alphabetically.
    mask_uncertain
        Leave out pairs flagged in column ``uncertain`` (drawn blank).
    show_labels
        Gene names on the axes; default when at most 60 genes.
    thresholds
        Subtype rules (as in :func:`pertpy_gnn.tl.gi_scores`) marked on the colour bars.
    panel_size
        Width and height of a panel in inches.

    Returns
    -------
    The matplotlib figure (one axes per score, plus colour bars).
    """
    df = _as_scores(data, "`data`")
    bad = [s for s in scores if s not in df.columns]
    if bad:
        raise ValueError(
            f"Scores {bad} are not columns of the table; choose from {[s for s in GI_SCORES if s in df]}."
        )
    if mask_uncertain and "uncertain" in df:
        df = df[~df["uncertain"].to_numpy(dtype=bool)]
    if df.empty:
        raise ValueError("No pair to draw.")
    ga, gb = _pair_genes(df)
    genes = sorted(set(ga) | set(gb))
    if cluster and len(genes) > 2:
        from scipy.cluster.hierarchy import leaves_list, linkage

        key = "magnitude" if "magnitude" in df else scores[0]
        m = _matrix(df, key, genes)
        m = np.where(np.isnan(m), _NEUTRAL.get(key, np.nanmean(m)), m)
        order = leaves_list(linkage(m, method="average", metric="euclidean"))
        genes = [genes[i] for i in order]
    rules = resolve_gi_thresholds(thresholds)
    if show_labels is None:
        show_labels = len(genes) <= 60
    fig, axes = plt.subplots(
        1, len(scores), figsize=(panel_size * len(scores) * 1.2, panel_size), squeeze=False
    )
    for ax, score in zip(axes[0], scores, strict=True):
        m = _matrix(df, score, genes)
        norm = None
        if score == "magnitude":
            lo, hi = np.nanmin(m), np.nanmax(m)
            norm = TwoSlopeNorm(vcenter=1.0, vmin=min(lo, 1.0 - 1e-6), vmax=max(hi, 1.0 + 1e-6))
        im = ax.imshow(
            np.ma.masked_invalid(m), cmap=_CMAPS.get(score, "viridis"), norm=norm, interpolation="nearest"
        )
        cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        lo, hi = im.norm.vmin, im.norm.vmax
        for subtype, (sc, _, value) in rules.items():
            if sc == score and lo <= value <= hi:
                cb.ax.axhline(value, color="black", lw=1, ls="--")
                cb.ax.text(
                    -0.1,
                    value,
                    f"{subtype} ",
                    transform=cb.ax.get_yaxis_transform(),
                    ha="right",
                    va="center",
                    fontsize=7,
                )
        ax.set_title(score.replace("_", " "))
        if show_labels:
            ax.set_xticks(range(len(genes)), genes, rotation=90, fontsize=6)
            ax.set_yticks(range(len(genes)), genes, fontsize=6)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    return fig


def nonadditive_bars(
    adata_true,
    prediction,
    pair: str | Sequence[str],
    *,
    n_genes: int = 10,
    modality: str | None = None,
    ax: Axes | None = None,
) -> Axes:
    """Changes over control of a double's most non-additive genes (GEARS Fig. 4d, ED Fig. 9).

    For the ``n_genes`` genes with the largest true ``|ab - (a + b)|``: bars of the true change of
    single A, single B, their sum (the additive prediction), the true change of ``A+B`` and, when
    given, the predicted change of ``A+B``.

    Parameters
    ----------
    adata_true
        Parsed perturbation data with ``A``, ``B`` and ``A+B`` (or a MuData with ``modality``).
    prediction
        Prediction AnnData holding ``A+B`` on the same genes, or ``None``.
    pair
        The double, ``"A+B"`` or ``("A", "B")``.
    n_genes
        Number of genes.
    modality
        Modality of a MuData ``adata_true``.
    ax
        Axes to draw on; a new figure when ``None``.

    Returns
    -------
    The matplotlib axes.
    """
    from .._utils import get_adata

    adata = get_adata(adata_true, modality)
    (a_name, b_name) = _pair_sets(pair if not isinstance(pair, str) else [pair])[0]
    name = DELIM.join((a_name, b_name))
    delta, rows, _ = _deltas_of(adata)
    missing = [x for x in (a_name, b_name, name) if x not in rows]
    if missing:
        raise ValueError(f"{missing} not in the data: the plot needs A, B and A+B.")
    a, b, ab = (delta[rows[x]].astype(np.float64) for x in (a_name, b_name, name))
    top = np.argsort(-np.abs(ab - (a + b)), kind="stable")[: int(n_genes)]
    bars = {
        f"{a_name} (true)": a[top],
        f"{b_name} (true)": b[top],
        "additive": (a + b)[top],
        f"{name} (true)": ab[top],
    }
    if prediction is not None:
        p_delta, p_rows, _ = _deltas_of(prediction)
        if name not in p_rows:
            raise ValueError(f"The prediction has no row {name!r}.")
        cols = pd.Index(prediction.var_names.astype(str)).get_indexer(adata.var_names[top].astype(str))
        if (cols < 0).any():
            raise ValueError("The prediction lacks genes of the data; predict on the same genes.")
        bars[f"{name} (predicted)"] = p_delta[p_rows[name]][cols].astype(np.float64)
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 0.45 * len(top) + 1.5))
    colors = ["#e6c229", "#f1a208", "#bbbbbb", "#555555", "#d1495b"]
    height = 0.8 / len(bars)
    y = np.arange(len(top))
    for k, (label, vals) in enumerate(bars.items()):
        hatch = "//" if k < 2 else None
        ax.barh(
            y + (k - (len(bars) - 1) / 2) * height,
            vals,
            height=height,
            label=label,
            color=colors[k],
            hatch=hatch,
        )
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(y, adata.var_names[top].astype(str))
    ax.invert_yaxis()
    ax.set_xlabel("change in expression over control")
    ax.set_title(f"{name}: most non-additive genes")
    ax.legend(fontsize=7, loc="best")
    return ax


def gi_scatter(
    true_scores,
    predicted_scores,
    score: str = "magnitude",
    *,
    thresholds=None,
    ax: Axes | None = None,
) -> Axes:
    """Predicted against true GI scores of the doubles in both tables (GEARS ED Fig. 7b).

    The title gives the coefficient of determination ``R^2 = 1 - SS_res / SS_tot`` of the predicted
    score for the true one (identity line, dashed); dotted lines mark the subtype thresholds of
    ``score``.

    Parameters
    ----------
    true_scores, predicted_scores
        Tables of :func:`pertpy_gnn.tl.gi_scores` (or AnnData holding them).
    score
        The GI score to compare.
    thresholds
        Subtype rules (as in :func:`pertpy_gnn.tl.gi_scores`).
    ax
        Axes to draw on; a new figure when ``None``.

    Returns
    -------
    The matplotlib axes.
    """
    t = _as_scores(true_scores, "`true_scores`")
    p = _as_scores(predicted_scores, "`predicted_scores`")
    if score not in t or score not in p:
        raise ValueError(f"Score {score!r} is not in both tables; choose one of {list(GI_SCORES)}.")
    common = t.index.intersection(p.index)
    if len(common) == 0:
        raise ValueError("The true and predicted score tables share no double.")
    tv = t.loc[common, score].to_numpy(dtype=np.float64)
    pv = p.loc[common, score].to_numpy(dtype=np.float64)
    ok = np.isfinite(tv) & np.isfinite(pv)
    ss_tot = ((tv[ok] - tv[ok].mean()) ** 2).sum()
    r2 = 1.0 - ((tv[ok] - pv[ok]) ** 2).sum() / ss_tot if ss_tot > 0 else np.nan
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(tv[ok], pv[ok], s=14, color="#d1495b", alpha=0.8)
    lo = np.nanmin(np.r_[tv[ok], pv[ok]]) if ok.any() else 0.0
    hi = np.nanmax(np.r_[tv[ok], pv[ok]]) if ok.any() else 1.0
    ax.plot([lo, hi], [lo, hi], ls="--", color="grey", lw=1)
    for subtype, (sc, _, value) in resolve_gi_thresholds(thresholds).items():
        if sc == score:
            ax.axhline(value, ls=":", color="black", lw=0.8)
            ax.axvline(value, ls=":", color="black", lw=0.8)
            ax.text(hi, value, subtype, fontsize=7, ha="right", va="bottom")
    ax.set_xlabel(f"true {score.replace('_', ' ')}")
    ax.set_ylabel(f"predicted {score.replace('_', ' ')}")
    ax.set_title(f"{score.replace('_', ' ')}: $R^2$ = {r2:.2f} (n = {int(ok.sum())})")
    return ax
