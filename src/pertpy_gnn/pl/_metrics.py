"""Models against baselines, per test subgroup, for one evaluation metric."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes

from pertpy_gnn.tl._evaluate import METRICS, common_rows

#: subgroups of pg.pp.split_perturbations in the order GEARS reports them; others follow in order of appearance
_SUBGROUP_ORDER = ["unseen_single", "combo_seen0", "combo_seen1", "combo_seen2", "val", "train", "all"]


def metrics(
    eval_df: pd.DataFrame,
    *,
    metric: str = "mse_top20_normalized",
    models: list[str] | None = None,
    subgroups: list[str] | None = None,
    points: bool = True,
    common: bool = False,
    seed: int = 0,
    ax: Axes | None = None,
) -> Axes:
    """Bars of a metric's mean per model and subgroup, with one point per perturbation.

    A bar behind which stand fewer perturbations than its subgroup has with a value for some drawn
    model (a model that cannot predict some of them, e.g. ``additive`` on doubles with an untrained
    single) is hatched and labelled ``n/N``: its mean is over other perturbations than its
    neighbours' and is not comparable with them.

    Parameters
    ----------
    eval_df
        Tidy frame of :func:`pertpy_gnn.tl.evaluate` (``adata.uns['pg_evaluation']['results']``).
    metric
        Metric to draw (see ``pertpy_gnn.tl._evaluate.METRICS``). For ``mse_top20_normalized`` a
        dashed line marks 1, the no-change model.
    models
        Models to draw, in this order (default: all, in the order of ``eval_df``).
    subgroups
        Subgroups to draw, in this order (default: all; ``unseen_single``, ``combo_seen0/1/2`` first).
    points
        Draw each perturbation's value as a point over its bar (jittered, seeded).
    common
        Per subgroup, only the perturbations that every drawn model predicts (so that the bars compare
        the same perturbations); default: each model over those it predicts.
    seed
        Seed of the jitter.
    ax
        Axes to draw on; a new figure when ``None``.

    Returns
    -------
    The matplotlib axes: one bar per model and subgroup (NaN means are drawn as empty bars), with an
    ``n/N`` label over each bar that stands for fewer than all the subgroup's perturbations.
    """
    need = {"model", "perturbation", "subgroup", "metric", "value"}
    if not need <= set(eval_df.columns):
        raise ValueError(
            f"Expected the tidy frame of pg.tl.evaluate with columns {sorted(need)}, got {list(eval_df.columns)}."
        )
    df = eval_df[eval_df["metric"] == metric]
    if df.empty:
        raise ValueError(
            f"No values of metric {metric!r}; available: {sorted(eval_df['metric'].unique())} (see {list(METRICS)})."
        )
    models = list(pd.unique(df["model"])) if models is None else list(models)
    if subgroups is None:
        found = list(pd.unique(df["subgroup"]))
        subgroups = [s for s in _SUBGROUP_ORDER if s in found] + [
            s for s in found if s not in _SUBGROUP_ORDER
        ]
    df = df[df["model"].isin(models)]
    scored = df[np.isfinite(df["value"].to_numpy(dtype=float))]  # not left out, predictable
    n_all = scored.groupby("subgroup")["perturbation"].nunique()  # with a value for at least one model
    df = common_rows(df) if common else scored  # common: the perturbations every drawn model predicts
    means = df.groupby(["subgroup", "model"])["value"].mean()
    counts = df.groupby(["subgroup", "model"])["perturbation"].nunique()

    if ax is None:
        _, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(subgroups) * max(1, len(models)) / 2), 3.5))
    width = 0.8 / len(models)
    x = np.arange(len(subgroups))
    rng = np.random.default_rng(seed)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, model in enumerate(models):
        offs = x - 0.4 + width * (j + 0.5)
        heights = np.nan_to_num([means.get((s, model), np.nan) for s in subgroups])
        color = colors[j % len(colors)]
        bars = ax.bar(offs, heights, width=width * 0.9, color=color, alpha=0.7, label=str(model))
        for i, s in enumerate(subgroups):
            n, total = int(counts.get((s, model), 0)), int(n_all.get(s, 0))
            if n < total:  # fewer perturbations behind this bar than the subgroup has
                bars[i].set_hatch("//")
                ax.text(offs[i], heights[i], f"{n}/{total}", ha="center", va="bottom", fontsize="x-small")
        if points:
            sub = df[df["model"] == model]
            for i, s in enumerate(subgroups):
                v = sub.loc[sub["subgroup"] == s, "value"].to_numpy(dtype=float)
                if v.size:
                    jitter = rng.uniform(-0.25, 0.25, v.size) * width
                    ax.scatter(offs[i] + jitter, v, s=10, color="black", zorder=3, linewidths=0)
    if metric == "mse_top20_normalized":
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(x)
    ax.set_xticklabels(subgroups)
    ax.set_ylabel(metric)
    ax.legend(frameon=False, fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars
    return ax
