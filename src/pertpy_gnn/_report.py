"""The main job's report: tables and a verdict in words, all computed from the evaluation frames.

Every claim of the report is derived here from the same frames that are written as CSV files, so a
test can recompute each claim from the CSVs. Nothing is written as a fixed sentence: which model is
best, by how much, and on how many perturbations each mean rests, all come from the numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

#: metrics of the accuracy tables, and whether lower is better
REPORT_METRICS = {
    "mse_top20_normalized": True,
    "pearson_delta": False,
    "pearson_delta_top20": False,
    "frac_opposite_direction_top20": True,
}
#: metrics the verdict speaks about
VERDICT_METRICS = ("mse_top20_normalized", "pearson_delta")
METRIC_LABELS = {
    "mse_top20_normalized": "MSE on the top-20 DE genes / no-change MSE (lower is better)",
    "pearson_delta": "Pearson r of predicted and true change, all genes (higher is better)",
    "pearson_delta_top20": "Pearson r of predicted and true change, top-20 DE genes (higher is better)",
    "frac_opposite_direction_top20": "fraction of top-20 DE genes moved the wrong way (lower is better)",
    "nonadditive_mse": "MSE on the 20 most non-additive genes of each double (lower is better)",
}
#: the simple baselines every number sits beside
REFERENCE_MODELS = ("no_change", "train_mean")
_SUBGROUP_ORDER = ["all", "unseen_single", "combo_seen0", "combo_seen1", "combo_seen2"]


def table(df: pd.DataFrame, floatfmt: str = ".3f") -> str:
    """Markdown table without optional dependencies (NaN shown as an em dash)."""
    df = df.reset_index() if df.index.name is not None or not isinstance(df.index, pd.RangeIndex) else df
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        cells = []
        for v in row:
            if isinstance(v, float | np.floating):
                cells.append("—" if np.isnan(v) else format(v, floatfmt))
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _subgroup_key(s: str) -> tuple[int, str]:
    return (_SUBGROUP_ORDER.index(s) if s in _SUBGROUP_ORDER else len(_SUBGROUP_ORDER), s)


def accuracy_summary(
    evaluation: pd.DataFrame, metrics: Sequence[str] = tuple(REPORT_METRICS)
) -> pd.DataFrame:
    """Mean of each metric per subgroup (and ``all``) and model, with its count and spread over seeds.

    Parameters
    ----------
    evaluation
        Tidy frame of :func:`pertpy_gnn.tl.evaluate`, optionally with a ``seed`` column (one evaluation
        per training seed of a model; a model evaluated once has one seed).
    metrics
        Metrics to summarize.

    Returns
    -------
    One row per ``subgroup`` x ``metric`` x ``model``: ``mean`` (over seeds of the per-seed mean over
    perturbations with a finite value), ``sd`` (over seeds; NaN with one seed), ``n_seeds``, ``n``
    (perturbations with a finite value, the smallest over seeds) and ``n_total`` (perturbations of
    the subgroup).
    """
    df = evaluation[evaluation["metric"].isin(list(metrics))].copy()
    if "seed" not in df:
        df["seed"] = 0
    # a prediction the model could not make and replaced by a fallback (``available`` False) is counted
    # (a missing prediction, NaN, is not a fallback: it is left out of the mean and of n)
    df["fallback"] = (~df["available"].astype(bool) & df["value"].notna()) if "available" in df else False
    both = pd.concat([df, df.assign(subgroup="all")], ignore_index=True)
    n_total = both.groupby("subgroup")["perturbation"].nunique()
    per_seed = (
        both.groupby(["subgroup", "metric", "model", "seed"], sort=False)
        .agg(mean=("value", "mean"), count=("value", "count"), fallback=("fallback", "sum"))
        .reset_index()
    )
    out = (
        per_seed.groupby(["subgroup", "metric", "model"], sort=False)
        .agg(
            mean=("mean", "mean"),
            sd=("mean", "std"),
            n_seeds=("seed", "nunique"),
            n=("count", "min"),
            n_fallback=("fallback", "max"),
        )
        .reset_index()
    )
    out["n_fallback"] = out["n_fallback"].astype(np.int64)
    out["n_total"] = out["subgroup"].map(n_total).astype(np.int64)
    out["n"] = out["n"].astype(np.int64)
    order = {m: i for i, m in enumerate(pd.unique(evaluation["model"]))}
    out = out.sort_values(
        ["subgroup", "metric", "model"],
        key=lambda s: (
            s.map(_subgroup_key) if s.name == "subgroup" else s.map(order) if s.name == "model" else s
        ),
    )
    return out.reset_index(drop=True)


def _fmt(mean: float, sd: float, n: int | None = None) -> str:
    s = "—" if not np.isfinite(mean) else f"{mean:.3f}"
    if np.isfinite(sd):
        s += f" ± {sd:.3f}"
    if n is not None:
        s += f" (n={n})"
    return s


def accuracy_tables(acc: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """One table per subgroup: metric rows, model columns, each cell ``mean [± sd over seeds] (n=...)``.

    A model that fell back on some perturbations (``available`` False in the evaluation, e.g. a linear
    baseline predicting no change for a gene it has no embedding of) says how many: ``[k fell back]``.
    """
    out = {}
    models = list(pd.unique(acc["model"]))
    for sg in sorted(acc["subgroup"].unique(), key=_subgroup_key):
        sub = acc[acc["subgroup"] == sg]
        rows = []
        for metric in pd.unique(sub["metric"]):
            r = sub[sub["metric"] == metric].set_index("model")
            rows.append(
                {"metric": metric}
                | {
                    m: _fmt(r.at[m, "mean"], r.at[m, "sd"], int(r.at[m, "n"]))
                    + (f" [{int(r.at[m, 'n_fallback'])} fell back]" if r.at[m, "n_fallback"] else "")
                    if m in r.index
                    else "—"
                    for m in models
                }
            )
        out[sg] = pd.DataFrame(rows)
    return out


def compare(
    values: pd.DataFrame, *, lower_is_better: bool, references: Sequence[str] = REFERENCE_MODELS
) -> dict:
    """The best model on a metric among those that cover every perturbation, and how far ahead it is.

    Parameters
    ----------
    values
        Rows indexed by model with ``mean``, ``sd``, ``n`` and ``n_total``.
    lower_is_better
        Direction of the metric.
    references
        Baselines always quoted beside the best.

    Returns
    -------
    dict with ``best`` and ``second`` (model names, ``None`` when absent), ``best_mean``,
    ``second_mean``, ``ratio`` (second / best for a lower-is-better metric, else NaN), ``difference``
    (best - second, signed so that positive means better), ``complete`` (models covering every
    perturbation) and ``partial`` (the others, with their ``n``).
    """
    v = values[np.isfinite(values["mean"])]
    complete = v[v["n"] == v["n_total"]]
    partial = v[v["n"] < v["n_total"]]
    ranked = complete.sort_values("mean", ascending=lower_is_better, kind="stable")
    best = ranked.index[0] if len(ranked) else None
    second = ranked.index[1] if len(ranked) > 1 else None
    bm = float(ranked["mean"].iloc[0]) if best is not None else np.nan
    sm = float(ranked["mean"].iloc[1]) if second is not None else np.nan
    sign = -1.0 if lower_is_better else 1.0
    return {
        "best": best,
        "second": second,
        "best_mean": bm,
        "second_mean": sm,
        "ratio": sm / bm if lower_is_better and bm > 0 else np.nan,
        "difference": sign * (bm - sm),
        "complete": list(complete.index),
        "partial": {m: int(partial.at[m, "n"]) for m in partial.index},
        "references": {m: float(values.at[m, "mean"]) for m in references if m in values.index},
    }


def margin_words(c: dict, lower_is_better: bool) -> str:
    """How far the best leads the runner-up, in words (a tie within 0.1% is called a tie)."""
    b, s = c["best_mean"], c["second_mean"]
    if abs(b - s) <= 1e-3 * max(abs(b), abs(s), 1e-12):
        return "tied with"
    if lower_is_better and np.isfinite(c["ratio"]):
        return f"{c['ratio']:.2f}x lower than"
    return f"{abs(c['difference']):.3f} {'below' if lower_is_better else 'above'}"


def _common_mean(
    evaluation: pd.DataFrame, subgroup: str, metric: str, models: Sequence[str]
) -> tuple[dict, int]:
    """Mean of each model over the perturbations where all of ``models`` have a finite value (seed-averaged)."""
    df = evaluation[evaluation["metric"] == metric]
    if subgroup != "all":
        df = df[df["subgroup"] == subgroup]
    wide = df.pivot_table(index="perturbation", columns="model", values="value", aggfunc="mean")
    wide = wide[list(models)].dropna()
    return {m: float(wide[m].mean()) for m in models}, len(wide)


def verdict(
    evaluation: pd.DataFrame,
    acc: pd.DataFrame,
    metrics: Sequence[str] = VERDICT_METRICS,
    references: Sequence[str] = REFERENCE_MODELS,
) -> tuple[list[str], pd.DataFrame]:
    """The verdict in words, one line per subgroup and metric, and the table of the claims it makes.

    Each line names the best model among those that predict every perturbation of the subgroup, its
    mean (± sd over seeds where there are seeds) and count, the runner-up and the margin, the
    no-change and training-mean baselines, and for each model that predicts only part of the
    subgroup (e.g. ``additive``) a comparison with the best on the perturbations both predict.
    """
    lines, claims = [], []
    for sg in sorted(acc["subgroup"].unique(), key=_subgroup_key):
        for metric in metrics:
            rows = acc[(acc["subgroup"] == sg) & (acc["metric"] == metric)].set_index("model")
            if rows.empty:
                continue
            lower = REPORT_METRICS.get(metric, True)
            c = compare(rows, lower_is_better=lower, references=references)
            n_total = int(rows["n_total"].iloc[0])
            head = f"- **{sg}** ({n_total} test perturbations), `{metric}`: "
            if c["best"] is None:
                lines.append(head + "no model predicts every perturbation, so none is ranked.")
                continue
            b = c["best"]
            text = head + f"best `{b}` {_fmt(c['best_mean'], rows.at[b, 'sd'], int(rows.at[b, 'n']))}"
            if c["second"] is not None:
                s = c["second"]
                text += f", {margin_words(c, lower)} the runner-up `{s}` {_fmt(c['second_mean'], rows.at[s, 'sd'])}"
            refs = [f"`{m}` {_fmt(v, np.nan)}" for m, v in c["references"].items() if m != b]
            if refs:
                text += "; baselines: " + ", ".join(refs)
            if b in references or b in ("additive", "linear_coexpression", "linear_embedding"):
                text += f". A baseline (`{b}`) wins here"
            for m in (b, c["second"]):
                if m is not None and rows.at[m, "n_fallback"]:
                    text += f" (`{m}` fell back on {int(rows.at[m, 'n_fallback'])} of them)"
            text += "."
            for m, n in c["partial"].items():
                means, n_common = _common_mean(evaluation, sg, metric, [m, b])
                if n_common:
                    better = means[m] < means[b] if lower else means[m] > means[b]
                    text += (
                        f" `{m}` predicts only {n} of the {n_total}; on those, `{m}` {means[m]:.3f} vs "
                        f"`{b}` {means[b]:.3f} ({'`' + m + '` is better' if better else '`' + b + '` is better'})."
                    )
            lines.append(text)
            claims.append(
                {
                    "subgroup": sg,
                    "metric": metric,
                    "n_total": n_total,
                    "best": b,
                    "best_mean": c["best_mean"],
                    "second": c["second"],
                    "second_mean": c["second_mean"],
                }
            )
    return lines, pd.DataFrame(claims)


def degenerate_rules(gi_eval: pd.DataFrame) -> pd.Series:
    """Subtype rules with nothing to score: no double, or every double, passes the rule in the truth."""
    return (gi_eval["n_true"] == 0) | (gi_eval["n_true"] == gi_eval["n"])


def gi_subtype_section(evals: dict[str, pd.DataFrame], what: str) -> list[str]:
    """GI subtype precision per model, with degenerate rules replaced by a sentence saying why.

    ``evals``: model name -> :func:`pertpy_gnn.tl.evaluate_gi` frame against the same truth ``what``.
    """
    first = next(iter(evals.values()))
    n = int(first["n"].iloc[0])
    degenerate = degenerate_rules(first)
    out: list[str] = []
    if degenerate.any():
        parts = [
            f"{st} (`{first.at[st, 'rule']}`: {'every' if first.at[st, 'n_true'] == n else 'no'} double passes)"
            for st in first.index[degenerate]
        ]
        out += [
            "",
            f"Not scored against {what}: " + "; ".join(parts) + f". With all or none of the {n} doubles "
            "showing a subtype, precision and recall say nothing about a model, so those rows are left out.",
        ]
    keep = first.index[~degenerate]
    if len(keep) == 0:
        return out
    k = int(first["k"].iloc[0])
    if k >= n:
        out += [
            "",
            f"With {n} doubles the top-k list (k={k}) holds them all, so precision@k equals the random baseline "
            "for every model and is left out; below, the precision and recall of each model's subtype calls.",
        ]
    rows = []
    for st in keep:
        row = {"subtype": st, "rule": first.at[st, "rule"], "n_true": int(first.at[st, "n_true"])}
        if k < n:
            row["k"] = k
            row["random precision@k"] = float(first.at[st, "random_precision_at_k_mean"])
        for m, ev in evals.items():
            if k < n:
                row[f"{m} precision@k"] = float(ev.at[st, "precision_at_k"]) if st in ev.index else np.nan
            else:
                p = ev.at[st, "precision"] if st in ev.index else np.nan
                r = ev.at[st, "recall"] if st in ev.index else np.nan
                row[f"{m} precision / recall"] = f"{_num(p)} / {_num(r)}"
        rows.append(row)
    out += ["", table(pd.DataFrame(rows))]
    return out


def _num(v: float) -> str:
    return "—" if not np.isfinite(v) else f"{v:.2f}"
