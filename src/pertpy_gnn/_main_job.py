"""The main job behind ``make demo`` / ``pertpy-gnn run``.

Builds (or reads) a screen, validates it, computes DE genes, trains GEARS on the simulation split,
evaluates it against every baseline, scores genetic interactions (against the simulator's ground
truth when there is one), draws the GI map of all pairs of the single genes and writes a report.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from . import datasets, pl, pp, tl
from ._constants import CONTROL, GO_ANNOTATIONS_KEY
from ._prediction import make_prediction_adata
from ._utils import logger

KEY_METRICS = (
    "mse_top20_normalized",
    "pearson_delta",
    "pearson_delta_top20",
    "frac_opposite_direction_top20",
)
LOWER_IS_BETTER = ("mse_top20_normalized", "frac_opposite_direction_top20")
BASELINES = ("no_change", "train_mean", "additive", "linear_coexpression", "linear_embedding")


def _table(df: pd.DataFrame, floatfmt: str = ".3f") -> str:
    """Markdown table without optional dependencies."""
    df = df.reset_index() if df.index.name is not None or not isinstance(df.index, pd.RangeIndex) else df
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        cells = [format(v, floatfmt) if isinstance(v, float | np.floating) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _has_scorable_doubles(col: pd.Series) -> bool:
    present = set(col.cat.categories)
    return any(p.count("+") == 1 and all(g in present for g in p.split("+")) for p in present)


def run_main_job(
    data: str | None = None,
    out: str | Path = "results/demo",
    *,
    perturbation_key: str = "condition",
    control_label: str | None = None,
    epochs: int | None = None,
    seed: int = 0,
    accelerator: str = "cpu",
    progress_bar: bool = True,
) -> dict:
    """Run the main job and write a report to ``out``.

    Parameters
    ----------
    data
        Path to a perturbation h5ad; ``None`` uses the embedded simulated screen.
    out
        Output folder (created).
    perturbation_key
        obs column with perturbation labels.
    control_label
        Label of control cells; ``None`` auto-detects.
    epochs
        GEARS training epochs.
    seed
        Seed of the simulator, the split and training.
    accelerator
        Lightning accelerator.
    progress_bar
        Show progress.

    Returns
    -------
    A summary dict (also written to ``out/summary.json``).
    """
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    steps = tqdm(total=9, desc="main job", disable=not progress_bar)
    summary: dict = {"seed": seed}
    report: list[str] = []

    # 1. data
    steps.set_postfix_str("data")
    if data is None:
        adata = datasets.simulate_perturbseq(seed=seed)
        annotations = adata.uns[GO_ANNOTATIONS_KEY]
        summary["data"] = "embedded simulated screen (pg.datasets.simulate_perturbseq)"
    else:
        adata = datasets.read_perturbation_h5ad(data, perturbation_key=perturbation_key)
        # a file may carry its own annotations (e.g. a saved simulated screen); else human GO
        annotations = adata.uns.get(GO_ANNOTATIONS_KEY)
        if annotations is None:
            annotations = datasets.go_annotations()
        summary["data"] = str(data)
    steps.update()

    # 2. validate and parse
    steps.set_postfix_str("validate")
    parsed = pp.parse_perturbations(
        adata,
        perturbation_key=perturbation_key,
        control_label=control_label,
        gene_universe=set(annotations["gene"]),
        drop_unknown=True,
    )
    n_before = adata.n_obs
    if parsed is not None:
        adata = parsed
    col = adata.obs["pg_perturbation"]
    n_genes_per_cell = adata.obs["pg_n_genes"]
    counts = {
        "cells": int(adata.n_obs),
        "cells_dropped_unknown_genes": int(n_before - adata.n_obs),
        "genes": int(adata.n_vars),
        "control_cells": int((col == CONTROL).sum()),
        "single_perturbations": int(col[n_genes_per_cell == 1].nunique()),
        "double_perturbations": int(col[n_genes_per_cell == 2].nunique()),
        "perturbed_genes": len(adata.uns["pg_perturbation"]["genes"]),
    }
    summary["dataset"] = counts
    report += ["# pertpy-gnn main job report", "", f"Data: {summary['data']}", "", "## Dataset", ""]
    report += [_table(pd.DataFrame({"value": counts}).rename_axis("quantity"))]
    steps.update()

    # 3. DE genes
    steps.set_postfix_str("DE genes")
    pp.rank_de_genes(adata, n_genes=20)
    de = adata.uns["pg_de_genes"]["names"]
    de.to_csv(out / "de_genes_top20.csv")
    report += ["", "## Top-20 DE genes (first 5 perturbations, first 8 genes)", ""]
    report += [_table(de.iloc[:5, :8].rename_axis("perturbation"))]
    steps.update()

    # 4. split and graphs
    steps.set_postfix_str("split and graphs")
    has_doubles = counts["double_perturbations"] > 0
    pp.split_perturbations(adata, kind="simulation" if has_doubles else "single", seed=seed)
    pp.go_graph(adata, annotations=annotations)
    pp.coexpression_graph(adata)
    table = adata.uns["pg_split"]["table"]
    split_counts = (
        table.groupby(["split", "subgroup"], observed=True).size().rename("perturbations").reset_index()
    )
    report += ["", "## Split (paper's simulation split)", "", _table(split_counts)]
    steps.update()

    # 5. GEARS
    steps.set_postfix_str("train GEARS")
    model = tl.train_gears(
        adata,
        max_epochs=epochs if epochs is not None else 10,
        seed=seed,
        uncertainty=True,
        accelerator=accelerator,
        devices=1,
        progress_bar=progress_bar,
    )
    history = pd.DataFrame(adata.uns["pg_gears"]["history"])
    history.to_csv(out / "gears_training_history.csv", index=False)
    summary["gears_epochs"] = int(len(history))
    steps.update()

    # 6. baselines and evaluation
    steps.set_postfix_str("evaluate")
    predictors = {"GEARS": model}
    for kind in BASELINES:
        predictors[kind] = tl.fit_baseline(adata, kind)
    evaluation = tl.evaluate(adata, predictors, subset="test")
    evaluation.to_csv(out / "evaluation_per_perturbation.csv", index=False)
    overview = tl.summarize_evaluation(evaluation)
    overview.to_csv(out / "evaluation_summary.csv", index=False)
    wide = tl.summarize_evaluation(evaluation, wide=True)
    wide = wide[wide.index.get_level_values("metric").isin(KEY_METRICS)].copy()
    lower_is_better = wide.index.get_level_values("metric").isin(LOWER_IS_BETTER)
    scores = wide.mul(np.where(lower_is_better, -1.0, 1.0), axis=0)
    wide["best"] = scores.idxmax(axis=1, skipna=True)
    n_per_subgroup = evaluation.groupby("subgroup")["perturbation"].nunique()
    n_per_subgroup["all"] = evaluation["perturbation"].nunique()
    wide["n"] = n_per_subgroup.reindex(wide.index.get_level_values("subgroup")).to_numpy()
    summary["evaluation"] = {
        f"{sg}/{m}": row.drop(["best", "n"]).to_dict() | {"best": row["best"]}
        for (sg, m), row in wide.iterrows()
    }
    report += [
        "",
        "## Accuracy on the test perturbations: GEARS beside every baseline",
        "",
        "Mean over the test perturbations of each subgroup (`n`); `best` is the best model of the row, "
        "whichever it is. `mse_top20_normalized`: MSE on the top-20 DE genes divided by the no-change MSE "
        "(lower is better; no_change = 1). `pearson_delta` / `_top20`: correlation of predicted and true "
        "change over control on all genes / the top-20 DE genes (higher is better). "
        "`frac_opposite_direction_top20`: lower is better. The additive baseline only predicts doubles whose "
        "singles were both trained on (combo_seen2). Every metric: `evaluation_summary.csv`, per "
        "perturbation: `evaluation_per_perturbation.csv`.",
        "",
        _table(wide.reset_index()),
    ]
    fig, ax = plt.subplots(figsize=(8, 4))
    pl.metrics(evaluation, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "figures" / "metrics_mse_top20.png", dpi=120)
    plt.close(fig)
    test_perts = table.index[table["split"] == "test"].tolist()
    if test_perts:
        example = sorted(test_perts, key=lambda p: (-p.count("+"), p))[0]
        pred = tl.predict(model, example)
        fig, ax = plt.subplots(figsize=(9, 4))
        pl.de_genes(adata, example, prediction=pred, ax=ax)
        fig.tight_layout()
        fig.savefig(out / "figures" / "de_genes_example.png", dpi=120)
        plt.close(fig)
    steps.update()

    # 7. genetic interactions of the measured doubles
    steps.set_postfix_str("GI scores")
    true_gi = tl.gi_scores(adata) if has_doubles and _has_scorable_doubles(col) else pd.DataFrame()
    if len(true_gi):
        true_gi.to_csv(out / "gi_scores_true.csv")
        report += [
            "",
            "## Genetic interactions",
            "",
            f"{len(true_gi)} measured doubles have both singles measured.",
        ]
        if "simulation" in adata.uns and "interactions" in adata.uns["simulation"]:
            truth = adata.uns["simulation"]["interactions"]
            score_cols = [c for c in ("magnitude", "model_fit") if c in truth and c in true_gi]
            joined = truth[["gi_type", *score_cols]].join(
                true_gi[score_cols], how="inner", rsuffix="_measured"
            )
            joined.to_csv(out / "gi_designed_vs_measured.csv")
            per_type = joined.groupby("gi_type")[[*score_cols, *(f"{c}_measured" for c in score_cols)]].mean()
            per_type.insert(0, "n", joined.groupby("gi_type").size())
            report += [
                "",
                "Designed interaction type (simulator ground truth): GI scores of the noiseless true changes "
                "beside those measured on the simulated cells (mean per designed type; measured scores are "
                "pulled toward 0 by the noise of the single perturbations' means):",
                "",
                _table(per_type),
            ]
        # honest GI evaluation: only doubles held out from training whose singles were trained on
        held_out = [p for p in true_gi.index if p in table.index and table.loc[p, "split"] == "test"]
        if held_out:
            singles = sorted({g for p in held_out for g in p.split("+")})
            pred = tl.predict(model, singles + held_out)
            pred_gi = tl.gi_scores(pred, pairs=held_out)
            pred_gi.to_csv(out / "gi_scores_gears_test_doubles.csv")
            gi_eval = tl.evaluate_gi(true_gi.loc[held_out], pred_gi)
            gi_eval.to_csv(out / "gi_evaluation_test_doubles.csv")
            cols = [
                "rule",
                "n_true",
                "n_predicted",
                "precision",
                "recall",
                "precision_at_k",
                "random_precision_at_k_mean",
                "r2",
            ]
            truth_lines: list[str] = []
            if "simulation" in adata.uns and "true_delta" in adata.uns["simulation"]:
                # the simulator's noiseless truth: GI scores of the true changes, free of sampling noise
                sim = adata.uns["simulation"]
                delta = sim["true_delta"]
                rows = [p for p in singles + held_out if p in delta.index]
                noiseless = make_prediction_adata(
                    [tuple(p.split("+")) for p in rows],
                    delta.loc[rows, adata.var_names].to_numpy()
                    + np.asarray(sim["true_control_mean"])[None, :],
                    sim["true_control_mean"],
                    adata.var_names,
                    model_name="simulator ground truth",
                )
                truth_gi = tl.gi_scores(noiseless, pairs=held_out)
                truth_gi.to_csv(out / "gi_scores_simulator_truth_test_doubles.csv")
                gi_eval_truth = tl.evaluate_gi(truth_gi, pred_gi)
                gi_eval_truth.to_csv(out / "gi_evaluation_vs_simulator_truth.csv")
                truth_lines += [
                    "",
                    "The same GEARS predictions against the simulator's noiseless ground truth (GI scores of "
                    "the true mean changes):",
                    "",
                    _table(gi_eval_truth[cols]),
                ]
            nonadd = tl.nonadditive_mse(adata, pred, held_out)
            nonadd.to_csv(out / "gi_nonadditive_mse_test_doubles.csv")
            report += [
                "",
                f"GI subtypes of the {len(held_out)} test doubles whose two singles were in training, from GEARS "
                "predictions against the true data (random: mean precision@k of 1,000 random draws):",
                "",
                _table(gi_eval[cols]),
                "",
                "MSE on the 20 most non-additive genes of each test double (mean over doubles): "
                f"GEARS {nonadd['mse'].mean():.4f}, additive baseline {nonadd['mse_additive'].mean():.4f} "
                f"({'GEARS' if nonadd['mse'].mean() < nonadd['mse_additive'].mean() else 'the additive baseline'} "
                "is better).",
            ]
            report += truth_lines
            summary["gi_test_doubles"] = {
                "n": len(held_out),
                "nonadditive_mse_gears": float(nonadd["mse"].mean()),
                "nonadditive_mse_additive": float(nonadd["mse_additive"].mean()),
            }
            fig, ax = plt.subplots(figsize=(4.5, 4.5))
            pl.gi_scatter(true_gi.loc[held_out], pred_gi, score="magnitude", ax=ax)
            fig.tight_layout()
            fig.savefig(out / "figures" / "gi_magnitude_true_vs_gears.png", dpi=120)
            plt.close(fig)
            fig, ax = plt.subplots(figsize=(8, 4))
            pl.nonadditive_bars(adata, pred, held_out[0], ax=ax)
            fig.tight_layout()
            fig.savefig(out / "figures" / "nonadditive_bars.png", dpi=120)
            plt.close(fig)
        else:
            report += [
                "",
                "No test double has both singles in training: GI prediction is not evaluated here.",
            ]
    steps.update()

    # 8. GI map of all pairs of the single genes
    steps.set_postfix_str("GI map")
    single_genes = sorted({p for p in col.cat.categories if p != CONTROL and "+" not in p})
    if len(single_genes) >= 2:
        t_map = time.perf_counter()
        gimap = tl.gi_map(model, single_genes, seed=seed, progress_bar=progress_bar)
        summary["gi_map"] = {
            "genes": len(single_genes),
            "pairs": int(len(gimap)),
            "seconds": round(time.perf_counter() - t_map, 2),
        }
        gimap.to_csv(out / "gi_map_all_pairs.csv")
        fig = pl.gi_map(gimap)
        fig.savefig(out / "figures" / "gi_map.png", dpi=120)
        plt.close(fig)
        report += [
            "",
            "## GI map",
            "",
            f"All {len(gimap)} pairs of the {len(single_genes)} single genes predicted and scored in "
            f"{summary['gi_map']['seconds']} s: `gi_map_all_pairs.csv`, `figures/gi_map.png`.",
        ]
    steps.update()

    # 9. report
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    report += ["", f"Total time: {summary['seconds']} s.", ""]
    (out / "report.md").write_text("\n".join(report))
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    steps.update()
    steps.close()
    logger.info("Report written to %s", out / "report.md")
    return summary
