"""Cell contexts: GEARS with contexts vs the baselines on a simulated three-context screen.

Two tasks on ``pg.datasets.simulate_perturbseq(..., n_contexts=3)`` (its ground truth: shared
programs, context-specific base expression, response scaling and an own program per context),
each over several seeds (the seed of the screen and of the split):

* ``within``: held-out perturbations within contexts, the GEARS 'simulation' split drawn once and
  applied in every context (a test perturbation is held out everywhere);
* ``held_out_context``: every perturbation of context ``C3`` is tested; its control cells and all
  perturbations of ``C1``/``C2`` (less a validation set) are trained on.

Models: no change (the context's control mean), training mean per context (falls back to the
pooled training change in a context without training data, flagged), pooled training mean,
additive per context (pooled single-gene changes where a context lacks a single), the set's change
in the other contexts (``context_transfer``, held-out context only) and GEARS with contexts
(a context vector, per-context controls; the paper's settings otherwise). Metrics: normalized
top-20-DE MSE and Pearson delta (all genes), per context and perturbation, then averaged per
subgroup; the table shows mean and SD over seeds.

Run: ``PYTHONPATH=src python benchmarks/contexts.py [--seeds 5] [--epochs 15]``; writes
``benchmarks/results/contexts.json`` and ``contexts.md`` (included in RESULTS.md by make_table.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from _common import cpu_seconds, machine, versions, write_record

import pertpy_gnn as pg

OUT = Path(__file__).parent / "results"
SCREEN = {
    "n_genes": 300,
    "n_singles": 20,
    "n_doubles": 20,
    "n_cells_per_perturbation": 30,
    "n_control": 300,
    "n_contexts": 3,
}
METRICS = ("mse_top20_normalized", "pearson_delta")


def _prepare(seed: int):
    adata = pg.datasets.simulate_perturbseq(**SCREEN, seed=seed)
    pg.pp.parse_perturbations(adata, perturbation_key="condition", context_key="context")
    pg.pp.rank_de_genes(adata)
    pg.pp.go_graph(adata)
    return adata


def _models(adata, task: str, epochs: int, seed: int) -> tuple[dict, dict]:
    models = {
        "no_change": pg.tl.fit_baseline(adata, "no_change"),
        "train_mean (per context)": pg.tl.fit_baseline(adata, "train_mean", name="train_mean (per context)"),
        "train_mean (pooled)": pg.tl.fit_baseline(adata, "train_mean", per_context=False),
        "additive (per context)": pg.tl.fit_baseline(adata, "additive", name="additive (per context)"),
    }
    if task == "held_out_context":
        models["context_transfer"] = pg.tl.fit_baseline(adata, "context_transfer")
    t0 = cpu_seconds()
    pg.pp.coexpression_graph(adata, overwrite=True)  # on this split's training cells
    gears = pg.tl.train_gears(adata, max_epochs=epochs, seed=seed, progress_bar=False, name="GEARS+contexts")
    models["GEARS+contexts"] = gears
    return models, {"gears_train_cpu_s": cpu_seconds() - t0, "gears_best_epoch": int(gears.best_epoch_)}


def run(seeds: int, epochs: int) -> dict:
    rows, runs = [], []
    for seed in range(seeds):
        base = _prepare(seed)
        for task in ("within", "held_out_context"):
            adata = base.copy()
            if task == "within":
                pg.pp.split_perturbations(adata, kind="simulation", seed=seed)
            else:
                pg.pp.split_perturbations(adata, kind="context", held_out_context="C3", seed=seed)
            t0 = cpu_seconds()
            models, info = _models(adata, task, epochs, seed)
            df = pg.tl.evaluate(adata, models, predict_kwargs={"n_control": None})
            df = df[df["metric"].isin(METRICS)]
            # per seed: mean over (context, perturbation) of each subgroup, and over all test groups
            per = df.groupby(["model", "subgroup", "metric"])["value"].mean().reset_index()
            # 'all': NaN for a model that cannot predict every test group (its mean would cover fewer groups)
            every = df.groupby(["model", "metric"])["value"].apply(lambda v: v.mean(skipna=False))
            per = pd.concat([per, every.reset_index().assign(subgroup="all")])
            avail = df[df["metric"] == METRICS[0]].groupby("model")["available"].mean()
            for r in per.itertuples(index=False):
                rows.append(
                    {
                        "seed": seed,
                        "task": task,
                        "model": r.model,
                        "subgroup": r.subgroup,
                        "metric": r.metric,
                        "value": float(r.value),
                    }
                )
            runs.append(
                {
                    "seed": seed,
                    "task": task,
                    "cpu_s": cpu_seconds() - t0,
                    **info,
                    "share_available": {k: float(v) for k, v in avail.items()},
                }
            )
            logging.getLogger("pertpy_gnn").warning(
                "seed %d task %s done (%.0f CPU s)", seed, task, runs[-1]["cpu_s"]
            )
    return {"rows": rows, "runs": runs}


def _table(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    g = df.groupby(["task", "subgroup", "metric", "model"])["value"]
    out = pd.DataFrame({"mean": g.mean(), "sd": g.std(ddof=1), "n_seeds": g.count()}).reset_index()
    return out


def _markdown(table: pd.DataFrame, record: dict) -> str:
    order = [
        "no_change",
        "train_mean (per context)",
        "train_mean (pooled)",
        "additive (per context)",
        "context_transfer",
        "GEARS+contexts",
    ]
    p = record["params"]
    lines = [
        f"Simulated screen with {p['screen']['n_contexts']} contexts ({p['screen']['n_genes']} genes, "
        f"{p['screen']['n_singles']} singles, {p['screen']['n_doubles']} doubles, "
        f"{p['screen']['n_cells_per_perturbation']} cells per perturbation and {p['screen']['n_control']} "
        f"control cells per context), {p['seeds']} seeds (screen and split), GEARS {p['epochs']} epochs "
        "(paper's schedule). Mean +- SD over seeds of the per-seed mean over (context, perturbation); "
        "normalized MSE: lower is better (no change = 1); Pearson delta: higher is better. "
        "`within`: test perturbations held out in every context; `held_out_context`: all perturbations of "
        "C3 (`context_seen`: trained in C1/C2; `context_unseen`: the validation perturbations, trained nowhere). "
        "Empty cells: the model cannot predict that subgroup (NaN, e.g. additive without both singles); "
        "`all` is left empty for a model that cannot predict every test group. In the held-out context, "
        "`train_mean (per context)` has no training data and is the pooled training mean (flagged "
        "`available == False`), and `additive (per context)` uses the pooled single-gene changes of C1/C2.",
        "",
    ]
    for metric in METRICS:
        sub = table[table["metric"] == metric]
        models = [m for m in order if m in set(sub["model"])]
        lines += [f"**{metric}**", "", "| task | subgroup | " + " | ".join(models) + " |"]
        lines.append("|---|---|" + "---|" * len(models))
        for (task, subgroup), block in sub.groupby(["task", "subgroup"], sort=False):
            cells = []
            for m in models:
                r = block[block["model"] == m]
                if r.empty or not np.isfinite(r["mean"].iloc[0]):
                    cells.append("")
                else:
                    cells.append(f"{r['mean'].iloc[0]:.3f} +- {r['sd'].iloc[0]:.3f}")
            lines.append(f"| {task} | {subgroup} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(record.get("note", ""))
    return "\n".join(lines).strip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--out", type=Path, default=OUT / "contexts.json")
    parser.add_argument("--note", default=None, help="closing note of the table (who wins, in words)")
    parser.add_argument(
        "--render", action="store_true", help="only rewrite the .md from the .json (with --note)"
    )
    args = parser.parse_args()
    if args.render:
        import json

        record = json.loads(args.out.read_text())
        if args.note is not None:
            record["note"] = args.note
            args.out.write_text(json.dumps(record, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(_markdown(pd.DataFrame(record["summary"]), record))
        return
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("pertpy_gnn").setLevel(logging.ERROR)
    import torch

    torch.set_num_threads(1)
    load = os.getloadavg()
    t0, w0 = cpu_seconds(), time.time()
    res = run(args.seeds, args.epochs)
    table = _table(res["rows"])
    record = {
        "benchmark": "contexts",
        "params": {"screen": SCREEN, "seeds": args.seeds, "epochs": args.epochs, "metrics": list(METRICS)},
        "summary": table.to_dict(orient="records"),
        "per_seed": res["rows"],
        "runs": res["runs"],
        "cpu_s_total": cpu_seconds() - t0,
        "wall_s_total": time.time() - w0,
        "machine": machine(load),
        "versions": versions("torch", "anndata", "scanpy"),
    }
    write_record(record, args.out)
    args.out.with_suffix(".md").write_text(_markdown(table, record))


if __name__ == "__main__":
    main()
