"""The main job behind ``make demo`` / ``pertpy-gnn run``.

Builds (or reads) a screen, validates it, computes DE genes, trains the models of
:func:`train_models` on the simulation split (over one or several seeds), evaluates them against
every baseline, scores genetic interactions (against the simulator's ground truth when there is
one), draws the GI map of all pairs of the single genes and writes a report whose verdict is
computed from its own tables (:mod:`pertpy_gnn._report`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from . import datasets, pp, tl
from ._constants import CONTROL, DELIM, GO_ANNOTATIONS_KEY
from ._prediction import make_prediction_adata
from ._report import (
    METRIC_LABELS,
    REFERENCE_MODELS,
    REPORT_METRICS,
    accuracy_summary,
    accuracy_tables,
    compare,
    gi_subtype_section,
    margin_words,
    table,
    verdict,
)
from ._utils import logger
from .tl._evaluate import METRICS

KEY_METRICS = tuple(REPORT_METRICS)
LOWER_IS_BETTER = tuple(m for m, low in REPORT_METRICS.items() if low)
BASELINES = ("no_change", "train_mean", "additive", "linear_coexpression", "linear_embedding")
#: default training epochs of the job
DEFAULT_EPOCHS = 10

#: what the input h5ad of ``pertpy-gnn run --data`` must contain (shown by ``--help``)
INPUT_CONTRACT = (
    "The input h5ad must hold log-normalized expression in X (cells x genes, unique gene symbols as "
    "var_names, no NaN) and an obs column (--perturbation-key, default 'condition') with one label per "
    "cell: a control label (control, ctrl, non-targeting, NT; or --control-label) for unperturbed cells, "
    "the gene symbol for a single perturbation, 'A+B' (or GEARS's 'A+ctrl') for a double. Perturbed "
    "genes without a GO annotation are dropped and counted in the report."
)


def _has_scorable_doubles(col: pd.Series) -> bool:
    present = set(col.cat.categories)
    return any(p.count(DELIM) == 1 and all(g in present for g in p.split(DELIM)) for p in present)


def train_models(adata, *, seed: int, epochs: int, accelerator: str, progress_bar: bool) -> dict:
    """The models the main job trains, by name; the first is the one drawn in the example figures.

    Every part of the report works over whatever this returns (predictors with ``.predict`` and,
    for the training-curve figure, ``history_``).
    """
    # the recommended model (baseline-anchored GEARS, docs/methods.md) and the paper's GEARS beside it
    common = {
        "max_epochs": epochs,
        "seed": seed,
        "accelerator": accelerator,
        "devices": 1,
        "progress_bar": progress_bar,
        "overwrite": True,
    }
    model = tl.train_gears(adata, uncertainty=True, preset="anchored", name="GEARS (anchored)", **common)
    paper = tl.train_gears(adata, key_added="pg_gears_paper", name="GEARS (paper)", **common)
    return {"GEARS (anchored)": model, "GEARS (paper)": paper}


def _figure(plt, fig, out: Path, name: str) -> str:
    fig.savefig(out / "figures" / name, dpi=120)
    plt.close(fig)
    return f"figures/{name}"


def _embed(path: str, caption: str) -> list[str]:
    return ["", f"![{caption}]({path})", "", f"*{caption}*"]


def run_main_job(
    data: str | None = None,
    out: str | Path = "results/demo",
    *,
    perturbation_key: str = "condition",
    control_label: str | None = None,
    epochs: int | None = None,
    seed: int = 0,
    n_seeds: int = 1,
    accelerator: str = "auto",
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
        Training epochs (default 10).
    seed
        Seed of the simulator and the split, and first training seed.
    n_seeds
        Train every model with seeds ``seed, seed + 1, ...``; the report gives the spread over them.
    accelerator
        Lightning accelerator (``'auto'``: a GPU when there is one).
    progress_bar
        Show progress.

    Returns
    -------
    A summary dict (also written to ``out/summary.json``).
    """
    if n_seeds < 1:
        raise ValueError(f"`n_seeds` must be at least 1, got {n_seeds}.")
    if epochs is not None and epochs < 1:
        raise ValueError(f"`epochs` must be at least 1, got {epochs}.")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import pl

    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    from ._progress import interactive

    bar = progress_bar and interactive()
    steps = tqdm(total=9, desc="main job", disable=not bar)

    done: list[str] = []

    def stage(name: str) -> None:
        steps.set_postfix_str(name)
        done.append(name)
        if progress_bar and not bar:  # no terminal: one log line per step instead of a bar
            logger.info("main job step %d/9: %s", len(done), name)

    summary: dict = {"seed": seed, "n_seeds": n_seeds}
    body: list[str] = []

    # 1. data
    stage("data")
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

    # 2. validate and parse (the job's own copy of the data: an earlier parse is replaced)
    stage("validate")
    parsed = pp.parse_perturbations(
        adata,
        perturbation_key=perturbation_key,
        control_label=control_label,
        gene_universe=set(annotations["gene"]),
        drop_unknown=True,
        overwrite=True,
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
    body += ["", "## Dataset", "", table(pd.DataFrame({"value": counts}).rename_axis("quantity"))]
    steps.update()

    # 3. DE genes
    stage("DE genes")
    pp.rank_de_genes(adata, n_genes=20)
    de = adata.uns["pg_de_genes"]["names"]
    de.to_csv(out / "de_genes_top20.csv")
    body += ["", "## Top-20 DE genes (first 5 perturbations, first 8 genes)", ""]
    body += [table(de.iloc[:5, :8].rename_axis("perturbation"))]
    steps.update()

    # 4. split and graphs
    stage("split and graphs")
    has_doubles = counts["double_perturbations"] > 0
    pp.split_perturbations(adata, kind="simulation" if has_doubles else "single", seed=seed)
    pp.go_graph(adata, annotations=annotations)
    pp.coexpression_graph(adata)
    split_table = adata.uns["pg_split"]["table"]
    split_table.rename_axis("perturbation").to_csv(out / "split.csv")
    split_counts = (
        split_table.groupby(["split", "subgroup"], observed=True).size().rename("perturbations").reset_index()
    )
    body += [
        "",
        "## Split (paper's simulation split)",
        "",
        table(split_counts),
        "",
        "Per perturbation: `split.csv`.",
    ]
    steps.update()

    # 5. the models, over the seeds
    stage("train")
    n_epochs = epochs if epochs is not None else DEFAULT_EPOCHS
    seeds = [seed + i for i in range(n_seeds)]
    trained: dict[int, dict] = {}
    histories = []
    for s in seeds:
        trained[s] = train_models(
            adata, seed=s, epochs=n_epochs, accelerator=accelerator, progress_bar=progress_bar
        )
        for name, m in trained[s].items():
            h = getattr(m, "history_", None)
            if isinstance(h, pd.DataFrame) and len(h):
                histories.append(h.assign(model=name, seed=s))
    model_names = list(trained[seeds[0]])
    primary_name = model_names[0]
    primary = trained[seeds[0]][primary_name]
    history = pd.concat(histories, ignore_index=True) if histories else pd.DataFrame()
    history.to_csv(out / "training_history.csv", index=False)
    summary["epochs"] = n_epochs
    summary["models"] = model_names
    steps.update()

    # 6. baselines and evaluation
    stage("evaluate")
    baselines = {kind: tl.fit_baseline(adata, kind) for kind in BASELINES}
    # every prediction over the mean of all training control cells: no_change is exactly the control mean
    kw = {"subset": "test", "overwrite": True, "predict_kwargs": {"n_control": None}}
    # the baselines in the same call as the first seed's models: a perturbation one model cannot predict
    # is left out for all of them, so every model and baseline is scored on the same perturbations
    frames = [
        tl.evaluate(adata, {**trained[s], **baselines} if s == seeds[0] else trained[s], **kw).assign(seed=s)
        for s in seeds
    ]
    evaluation = pd.concat(frames, ignore_index=True)
    evaluation.to_csv(out / "evaluation_per_perturbation.csv", index=False)
    accuracy_summary(evaluation, metrics=list(METRICS)).to_csv(out / "evaluation_summary.csv", index=False)
    acc = accuracy_summary(evaluation)
    verdict_lines, claims = verdict(evaluation, acc)
    claims.to_csv(out / "verdict.csv", index=False)
    summary["verdict"] = claims.to_dict(orient="records")
    summary["evaluation"] = {
        f"{r.subgroup}/{r.metric}/{r.model}": {"mean": r.mean, "sd": r.sd, "n": int(r.n)}
        for r in acc.itertuples()
    }
    seeds_note = (
        f"mean ± sd over {n_seeds} training seeds ({', '.join(map(str, seeds))}) of the mean over perturbations"
        if n_seeds > 1
        else "one training seed; run with `--n-seeds 3` for the spread over seeds"
    )
    body += [
        "",
        "## Accuracy on the test perturbations: every model beside every baseline",
        "",
        "`GEARS (anchored)` is the model `pg.tl.train_gears(preset='anchored')` recommends: GEARS predicting "
        "a residual over the additive prediction (sets whose genes were all trained on alone) or the training "
        "mean change (other sets), because the paper's GEARS, `GEARS (paper)`, shown beside it, loses to "
        "those simple baselines on small screens (docs/methods.md).",
        "",
        f"Each cell: mean over the test perturbations the model predicts ({seeds_note}), and `n`, the "
        "number of perturbations that mean covers. A model that predicts only some perturbations (the "
        "additive baseline needs both singles among the training perturbations) has a smaller `n`; its "
        "mean is then not comparable to the others' and the verdict compares it on the shared "
        "perturbations only. Metrics:",
        "",
        *[f"- `{m}`: {METRIC_LABELS[m]}" for m in REPORT_METRICS],
        "",
        "Every metric: `evaluation_summary.csv`, per perturbation: `evaluation_per_perturbation.csv`.",
    ]
    for sg, tab in accuracy_tables(acc).items():
        n_total = int(acc.loc[acc["subgroup"] == sg, "n_total"].iloc[0])
        body += ["", f"### {sg} ({n_total} test perturbations)", "", table(tab)]
    fig, ax = plt.subplots(figsize=(8, 4))
    pl.metrics(evaluation, ax=ax)
    fig.tight_layout()
    body += _embed(
        _figure(plt, fig, out, "metrics_mse_top20.png"),
        "Normalized top-20 DE MSE per model and subgroup (one point per perturbation; 1 = no change; a hatched "
        "bar labelled n/N stands for the n of the subgroup's N perturbations its model predicts).",
    )
    test_perts = split_table.index[split_table["split"] == "test"].tolist()
    if test_perts:
        example = sorted(test_perts, key=lambda p: (-p.count(DELIM), p))[0]
        fig, ax = plt.subplots(figsize=(9, 4))
        pl.de_genes(adata, example, prediction=primary.predict(example), ax=ax)
        fig.tight_layout()
        body += _embed(
            _figure(plt, fig, out, "de_genes_example.png"),
            f"Top-20 DE genes of the test perturbation {example}: measured cells and the {primary_name} prediction.",
        )
    if len(history):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
        for (name, s), h in history.groupby(["model", "seed"], sort=False):
            epoch = h["epoch"].to_numpy() + 1 if "epoch" in h else np.arange(1, len(h) + 1)
            axes[0].plot(epoch, h["train_loss"], marker="o", label=f"{name} (seed {s})")
            if "val_top20_de_mse" in h:
                axes[1].plot(epoch, h["val_top20_de_mse"], marker="o", label=f"{name} (seed {s})")
        axes[0].set(xlabel="epoch", ylabel="training loss", title="training loss")
        axes[1].set(xlabel="epoch", ylabel="MSE", title="validation MSE, top-20 DE genes")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        body += [
            "",
            "## Training",
            "",
            f"{n_epochs} epochs; the epoch with the lowest validation MSE is kept. Per epoch: "
            "`training_history.csv`.",
            *_embed(
                _figure(plt, fig, out, "training_curve.png"), "Training loss and validation MSE per epoch."
            ),
        ]
    steps.update()

    # 7. genetic interactions of the measured doubles
    stage("GI scores")
    gi_verdict: list[str] = []
    true_gi = (
        tl.gi_scores(adata, overwrite=True) if has_doubles and _has_scorable_doubles(col) else pd.DataFrame()
    )
    if len(true_gi):
        true_gi.to_csv(out / "gi_scores_true.csv")
        body += [
            "",
            "## Genetic interactions",
            "",
            f"{len(true_gi)} measured doubles have both singles measured.",
        ]
        sim = adata.uns.get("simulation", {})
        if "interactions" in sim:
            truth = sim["interactions"]
            score_cols = [c for c in ("magnitude", "model_fit") if c in truth and c in true_gi]
            joined = truth[["gi_type", *score_cols]].join(
                true_gi[score_cols], how="inner", rsuffix="_measured"
            )
            joined.to_csv(out / "gi_designed_vs_measured.csv")
            per_type = joined.groupby("gi_type")[[*score_cols, *(f"{c}_measured" for c in score_cols)]].mean()
            per_type.insert(0, "n", joined.groupby("gi_type").size())
            body += [
                "",
                "Designed interaction type (simulator ground truth): GI scores of the noiseless true changes "
                "beside those measured on the simulated cells (mean per designed type; measured scores are "
                "pulled toward 0 by the noise of the single perturbations' means):",
                "",
                table(per_type),
            ]
        # honest GI evaluation: only test doubles whose two singles were training perturbations
        split_of = split_table["split"].astype(str)
        test_doubles = [p for p in split_of.index[split_of == "test"] if p.count(DELIM) == 1]

        def _trained(g: str) -> bool:
            return g in split_of.index and split_of[g] == "train"

        held_out = [
            p for p in test_doubles if p in true_gi.index and all(_trained(g) for g in p.split(DELIM))
        ]
        summary["gi_test_doubles"] = {"n": len(held_out), "n_test_doubles": len(test_doubles)}
        if held_out:
            singles = sorted({g for p in held_out for g in p.split(DELIM)})
            gi_models = {**trained[seeds[0]], **baselines}
            preds = {name: m.predict(singles + held_out, n_control=None) for name, m in gi_models.items()}
            # MSE on the most non-additive genes, every model beside the baselines
            na = {name: tl.nonadditive_mse(adata, p, held_out) for name, p in preds.items()}
            na_table = pd.DataFrame({name: f["mse"] for name, f in na.items()})
            na_table["additive_measured_singles"] = na[primary_name]["mse_additive"]
            na_table.rename_axis("double").to_csv(out / "gi_nonadditive_mse_test_doubles.csv")
            na_values = pd.DataFrame(
                {
                    "mean": na_table.mean(),
                    "sd": np.nan,
                    "n": na_table.notna().sum(),
                    "n_total": len(held_out),
                }
            )
            c = compare(na_values, lower_is_better=True)
            gi_verdict.append(
                f"- **GI test doubles** ({len(held_out)} doubles whose two singles were in training), "
                f"`nonadditive_mse`: best `{c['best']}` {c['best_mean']:.4f} (n={len(held_out)})"
                + (
                    f", {margin_words(c, True)} the runner-up `{c['second']}` {c['second_mean']:.4f}"
                    if c["second"] is not None
                    else ""
                )
                + "; baselines: "
                + ", ".join(
                    f"`{m}` {na_values.at[m, 'mean']:.4f}" for m in REFERENCE_MODELS if m in na_values.index
                )
                + "."
            )
            summary["gi_test_doubles"]["nonadditive_mse"] = na_values["mean"].to_dict()
            summary["gi_test_doubles"]["nonadditive_best"] = c["best"]
            body += [
                "",
                f"### GI of the {len(held_out)} test doubles whose two singles were in training "
                f"(of {len(test_doubles)} test doubles)",
                "",
                "MSE on the 20 most non-additive genes of each double (mean over the doubles, first training "
                "seed; `additive_measured_singles`: the sum of the measured single changes):",
                "",
                table(na_values.rename_axis("model").reset_index()[["model", "mean", "n"]], floatfmt=".4f"),
            ]
            pred_gi, no_gi = {}, {}
            for name, p in preds.items():
                try:
                    scores = tl.gi_scores(p, pairs=held_out)
                except ValueError as err:
                    no_gi[name] = str(err)
                    continue
                if scores[["magnitude", "model_fit"]].isna().all().all():
                    no_gi[name] = "all its GI scores are undefined (no predicted change)"
                    continue
                pred_gi[name] = scores
            if primary_name in pred_gi:
                pred_gi[primary_name].to_csv(out / "gi_scores_predicted_test_doubles.csv")
            evals = {name: tl.evaluate_gi(true_gi.loc[held_out], g) for name, g in pred_gi.items()}
            if evals:
                pd.concat(evals, names=["model"]).to_csv(out / "gi_evaluation_test_doubles.csv")
                body += [
                    "",
                    "GI subtypes predicted by each model against the measured data (precision@k: fraction of the "
                    "k doubles with the most extreme predicted score that truly show the subtype; random: mean "
                    "over 1,000 random draws of k doubles):",
                    *gi_subtype_section(evals, "the measured data"),
                ]
            if no_gi:
                body += [
                    "",
                    "No GI subtypes from: " + "; ".join(f"`{m}` ({why})" for m, why in no_gi.items()) + ".",
                ]
            if "true_delta" in sim and evals:
                delta = sim["true_delta"]
                rows = [p for p in singles + held_out if p in delta.index]
                noiseless = make_prediction_adata(
                    [tuple(p.split(DELIM)) for p in rows],
                    delta.loc[rows, adata.var_names].to_numpy()
                    + np.asarray(sim["true_control_mean"])[None, :],
                    sim["true_control_mean"],
                    adata.var_names,
                    model_name="simulator ground truth",
                )
                truth_gi = tl.gi_scores(noiseless, pairs=held_out)
                truth_gi.to_csv(out / "gi_scores_simulator_truth_test_doubles.csv")
                evals_truth = {name: tl.evaluate_gi(truth_gi, g) for name, g in pred_gi.items()}
                pd.concat(evals_truth, names=["model"]).to_csv(out / "gi_evaluation_vs_simulator_truth.csv")
                body += [
                    "",
                    "The same predictions against the simulator's noiseless ground truth (GI scores of the true "
                    "mean changes):",
                    *gi_subtype_section(evals_truth, "the simulator's noiseless ground truth"),
                ]
            if primary_name in pred_gi:
                fig, ax = plt.subplots(figsize=(4.5, 4.5))
                pl.gi_scatter(true_gi.loc[held_out], pred_gi[primary_name], score="magnitude", ax=ax)
                fig.tight_layout()
                body += _embed(
                    _figure(plt, fig, out, "gi_magnitude_true_vs_predicted.png"),
                    f"GI magnitude of the test doubles: measured against {primary_name}.",
                )
            fig, ax = plt.subplots(figsize=(8, 4))
            pl.nonadditive_bars(adata, preds[primary_name], held_out[0], ax=ax)
            fig.tight_layout()
            body += _embed(
                _figure(plt, fig, out, "nonadditive_bars.png"),
                f"The most non-additive genes of {held_out[0]}: measured, additive and {primary_name}.",
            )
        else:
            reason = (
                "there is no test double"
                if not test_doubles
                else f"none of the {len(test_doubles)} test doubles has both singles among the training "
                "perturbations"
            )
            body += ["", f"GI prediction is not evaluated: {reason}, so there is nothing to score."]
            gi_verdict.append(f"- GI prediction is not evaluated: {reason}.")
    steps.update()

    # 8. GI map of all pairs of the single genes
    stage("GI map")
    single_genes = sorted({p for p in col.cat.categories if p != CONTROL and DELIM not in p})
    if len(single_genes) >= 2:
        t_map = time.perf_counter()
        gimap = tl.gi_map(primary, single_genes, seed=seed, progress_bar=bar)
        summary["gi_map"] = {
            "genes": len(single_genes),
            "pairs": int(len(gimap)),
            "seconds": round(time.perf_counter() - t_map, 2),
        }
        gimap.to_csv(out / "gi_map_all_pairs.csv")
        fig = pl.gi_map(gimap)
        body += [
            "",
            "## GI map",
            "",
            f"All {len(gimap)} pairs of the {len(single_genes)} single genes predicted by {primary_name} and "
            f"scored in {summary['gi_map']['seconds']} s: `gi_map_all_pairs.csv`.",
            *_embed(
                _figure(plt, fig, out, "gi_map.png"), f"GI map of all pairs predicted by {primary_name}."
            ),
        ]
    steps.update()

    # 9. report: the verdict first, computed from the tables below
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    head = [
        "# pertpy-gnn main job report",
        "",
        f"Data: {summary['data']}. Models: {', '.join(f'`{m}`' for m in model_names)}, "
        f"{n_epochs} epochs, {n_seeds} training seed{'s' if n_seeds > 1 else ''}; baselines: "
        f"{', '.join(f'`{b}`' for b in BASELINES)}.",
        "",
        "## Verdict",
        "",
        "Computed from the tables below (`verdict.csv`). Per test subgroup, the best model among those that "
        "predict every perturbation of it, by how much it leads, and the no-change and training-mean "
        "baselines beside it:",
        "",
        *verdict_lines,
        *gi_verdict,
    ]
    report = [*head, *body, "", f"Total time: {summary['seconds']} s.", ""]
    (out / "report.md").write_text("\n".join(report))
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    steps.update()
    steps.close()
    logger.info("Report written to %s", out / "report.md")
    return summary
