"""Check every claim of the main job's report against the CSV files written beside it.

Used by tests/test_main_job.py (default simulated screen and the real Norman subset). Everything is
recomputed here from the per-perturbation CSVs, independently of pertpy_gnn._report.
"""

import re
from pathlib import Path

import numpy as np
import pandas as pd

LOWER = {"mse_top20_normalized": True, "pearson_delta": False}
VERDICT = re.compile(
    r"^- \*\*(?P<sg>[\w]+)\*\* \((?P<n>\d+) test perturbations\), `(?P<metric>\w+)`: best `(?P<best>[^`]+)` "
    r"(?P<mean>-?\d+\.\d+)(?: ± (?P<sd>\d+\.\d+))? \(n=(?P<nb>\d+)\)"
    r"(?:, (?:(?P<ratio>\d+\.\d+)x lower than|(?P<diff>\d+\.\d+) (?:below|above)|(?P<tie>tied with)) the runner-up "
    r"`(?P<second>[^`]+)` (?P<smean>-?\d+\.\d+))?"
)


def _means(evaluation: pd.DataFrame) -> pd.DataFrame:
    """subgroup x metric x model: seed-averaged mean over finite values, n finite (min over seeds), n_total."""
    both = pd.concat([evaluation, evaluation.assign(subgroup="all")], ignore_index=True)
    if "seed" not in both:
        both["seed"] = 0
    per_seed = both.groupby(["subgroup", "metric", "model", "seed"])["value"].agg(["mean", "count"])
    out = per_seed.groupby(["subgroup", "metric", "model"]).agg(mean=("mean", "mean"), n=("count", "min"))
    n_total = both.groupby("subgroup")["perturbation"].nunique()
    out["n_total"] = out.index.get_level_values("subgroup").map(n_total)
    return out


def check_report(out: Path, *, expect_gi: bool) -> dict:
    """Assert the report's verdict, counts, GI statements and figures match its CSVs; return parsed claims."""
    report = (out / "report.md").read_text()
    lines = report.splitlines()
    evaluation = pd.read_csv(out / "evaluation_per_perturbation.csv")
    means = _means(evaluation)

    # the verdict comes first
    assert lines[0].startswith("# ")
    v_start = lines.index("## Verdict")
    first_table = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    assert v_start < first_table

    claims = [m for m in (VERDICT.match(ln) for ln in lines) if m]
    subgroups = set(evaluation["subgroup"]) | {"all"}
    assert {(m["sg"], m["metric"]) for m in claims} == {(sg, mt) for sg in subgroups for mt in LOWER}
    for m in claims:
        rows = means.loc[(m["sg"], m["metric"])]
        n_total = int(rows["n_total"].iloc[0])
        assert int(m["n"]) == n_total
        complete = rows[(rows["n"] == n_total) & np.isfinite(rows["mean"])]
        ranked = complete["mean"].sort_values(ascending=LOWER[m["metric"]], kind="stable")
        top = ranked.iloc[0]
        tied = set(ranked.index[np.abs(ranked - top) <= 1e-3 * max(abs(top), 1e-12)])
        assert m["best"] in tied, (m.group(0), ranked)  # ties are broken by the models' order
        assert abs(float(m["mean"]) - top) < 6e-4
        assert int(m["nb"]) == n_total
        if len(ranked) > 1:
            second = ranked.drop(m["best"]).iloc[0]
            assert m["second"] in set(ranked.index[np.abs(ranked - second) <= 1e-9]) - {m["best"]}
            assert abs(float(m["smean"]) - second) < 6e-4
            assert bool(m["tie"]) == (abs(second - top) <= 1e-3 * max(abs(top), abs(second), 1e-12))
            if m["ratio"]:
                assert abs(float(m["ratio"]) - second / top) < 6e-3
        line = m.string
        # the no-change and training-mean baselines beside every claim
        for ref in ("no_change", "train_mean"):
            if ref != m["best"]:
                assert f"`{ref}` {rows.loc[ref, 'mean']:.3f}" in line, (ref, line)
        # every model predicting only part of the subgroup is named with its count
        for model, r in rows[rows["n"] < n_total].iterrows():
            if r["n"] > 0:
                assert f"`{model}` predicts only {int(r['n'])} of the {n_total}" in line, line

    # every mean in the accuracy tables states its n, per model
    for (sg, metric, _model), r in means.iterrows():
        if metric in LOWER and np.isfinite(r["mean"]):
            block = report.split(f"### {sg} (")[1].split("\n### ")[0].split("\n## ")[0]
            row = next(ln for ln in block.splitlines() if ln.startswith(f"| {metric} |"))
            assert f" {r['mean']:.3f} (n={int(r['n'])}) " in row, (sg, metric, _model, row)

    # every figure written is embedded, and there is a training curve
    figures = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert "training_curve.png" in figures
    for name in figures:
        assert f"](figures/{name})" in report, name
    history = pd.read_csv(out / "training_history.csv")
    assert {"train_loss", "val_top20_de_mse", "model", "seed"} <= set(history.columns)

    # GI: the doubles counted are exactly the test doubles whose two singles were training perturbations
    split = pd.read_csv(out / "split.csv", index_col=0)["split"]
    test_doubles = [p for p in split.index[split == "test"] if p.count("+") == 1]
    gi = {}
    if (out / "gi_scores_true.csv").exists():
        measured = set(pd.read_csv(out / "gi_scores_true.csv", index_col=0).index)
        held = [
            p for p in test_doubles if p in measured and all(split.get(g) == "train" for g in p.split("+"))
        ]
        gi["held_out"] = held
        if held:
            assert (
                f"### GI of the {len(held)} test doubles whose two singles were in training "
                f"(of {len(test_doubles)} test doubles)" in report
            )
            na = pd.read_csv(out / "gi_nonadditive_mse_test_doubles.csv", index_col=0)
            assert len(na) == len(held) and set(na.index) == set(held)
            na_means = na.mean()
            best = na_means.idxmin()
            mt = re.search(r"`nonadditive_mse`: best `([^`]+)` (\d+\.\d+)", report)
            assert mt and mt.group(1) == best and abs(float(mt.group(2)) - na_means[best]) < 6e-5
            for ref in ("no_change", "train_mean"):
                assert f"`{ref}` {na_means[ref]:.4f}" in report
            ev = pd.read_csv(out / "gi_evaluation_test_doubles.csv", index_col=[0, 1])
            first = ev.xs(ev.index.get_level_values(0)[0], level=0)
            degenerate = first.index[(first["n_true"] == 0) | (first["n_true"] == first["n"])]
            for st in degenerate:
                assert re.search(rf"Not scored against the measured data: [^\n]*{st} \(", report), st
                # a degenerate subtype never appears as a scored row against the measured data
                measured_block = report.split("against the measured data")[1].split("noiseless")[0]
                assert f"| {st} |" not in measured_block
        else:
            assert "GI prediction is not evaluated" in report
    elif expect_gi:
        raise AssertionError("no GI scores were written")
    assert "GI subtypes of the" not in report  # the old, miscounted sentence is gone
    gi["claims"] = claims
    return gi
