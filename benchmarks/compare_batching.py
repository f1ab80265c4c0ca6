"""Set batches vs the paper's cell batches for GEARS training: accuracy at equal epochs and equal CPU time.

Issue 13. Two datasets: a simulated screen (``pg.datasets.simulate_perturbseq``) and the real
Norman subset (``../shared/data``; skipped with a note when absent). For each of ``--seeds`` model
seeds (one split per dataset, seed 0), GEARS (paper settings: hidden 64, Adam 1e-3, step decay 0.5
per epoch) is trained

- ``cells``: minibatches of 32 random cells (the paper's), ``--epochs`` epochs;
- ``sets``: ``train(batching='sets')`` (4 sets x up to 8 cells a step), ``--epochs`` epochs
  (equal epochs: as many cells drawn);
- ``sets_equal_cpu``: set batches for as many epochs as fit in the CPU seconds the ``cells`` run
  of the same seed took (from the per-epoch CPU of the ``sets`` run; at most ``--max-epochs``).

Each run reports its training CPU seconds (process CPU, all threads), the best validation top-20
DE MSE and the test metrics of ``pg.tl.evaluate`` (mean over test perturbations), beside the
``no_change`` and ``train_mean`` baselines on the same split. Writes ``--out`` (JSON with machine
load) and the Markdown table next to it.

Usage::

    python benchmarks/compare_batching.py --seeds 5 --epochs 2 --datasets norman --out benchmarks/results/compare_batching_norman.json
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from _common import cpu_seconds, machine, versions, write_record

ROOT = Path(__file__).resolve().parents[1]
NORMAN = ROOT.parent / "shared" / "data" / "perturbation" / "norman2019_k562_subset.h5ad"
GO_FILE = ROOT.parent / "shared" / "data" / "go" / "human_gene2go_orgHsEgDb_20220912.tsv.gz"
METRICS = ("mse_top20", "mse_top20_normalized", "pearson_delta", "pearson_delta_top20")


def simulated():
    import pertpy_gnn as pg

    adata = pg.datasets.simulate_perturbseq(
        n_genes=500,
        n_singles=30,
        n_doubles=30,
        n_cells_per_perturbation=50,
        n_control=500,
        counts_layer=False,
        seed=0,
    )
    pg.pp.parse_perturbations(adata, perturbation_key="condition")
    pg.pp.split_perturbations(adata, kind="simulation", seed=0)
    pg.pp.go_graph(adata)
    return adata


def norman():
    import anndata as ad

    import pertpy_gnn as pg

    adata = ad.read_h5ad(NORMAN)
    go = pd.read_csv(GO_FILE, sep="\t", usecols=["symbol", "go_id"]).rename(columns={"symbol": "gene"})
    perturbed = {g for c in adata.obs["condition"].unique() for g in c.split("+")}
    others = pd.Series(sorted(set(go["gene"]))).sample(1500, random_state=0)
    go = go[go["gene"].isin(set(adata.var_names) | perturbed | set(others))]
    pg.pp.parse_perturbations(adata, perturbation_key="condition", gene_universe=set(go["gene"]) | {"IER5L"})
    pg.pp.split_perturbations(adata, seed=0)
    pg.pp.go_graph(adata, annotations=go)
    return adata


class EpochCPU:
    """Lightning callback: cumulative process CPU seconds at the end of each training epoch."""

    def __init__(self):
        import lightning.pytorch as lp

        class _CB(lp.Callback):
            def on_train_start(cb, trainer, plan):
                self.start, self.marks = cpu_seconds(), []

            def on_train_epoch_end(cb, trainer, plan):
                self.marks.append(cpu_seconds() - self.start)

        self.callback = _CB()
        self.marks: list[float] = []


SET_SIZES = {"sets_per_batch": 4, "cells_per_set": 8}


def run(adata, mode: str, epochs: int, seed: int) -> dict:
    import pertpy_gnn as pg

    timer = EpochCPU()
    kwargs = {"batching": "sets", **SET_SIZES} if mode != "cells" else {}
    c0 = cpu_seconds()
    model = pg.tl.train_gears(
        adata,
        max_epochs=epochs,
        seed=seed,
        progress_bar=False,
        overwrite=True,
        train_kwargs={"callbacks": [timer.callback], **kwargs},
    )
    cpu = cpu_seconds() - c0
    ev = pg.tl.evaluate(adata, {"GEARS": model}, overwrite=True)
    test = ev[ev["metric"].isin(METRICS)].groupby("metric")["value"].mean()
    return {
        "mode": mode,
        "seed": seed,
        "epochs": epochs,
        "train_cpu_s": round(cpu, 2),
        "epoch_cpu_s": [round(m, 2) for m in timer.marks],
        "best_epoch": int(model.best_epoch_),
        "best_val_top20_de_mse": float(model.best_val),
        "test": {k: float(v) for k, v in test.items()},
    }


def baselines(adata) -> dict:
    import pertpy_gnn as pg

    models = {k: pg.tl.fit_baseline(adata, k) for k in ("no_change", "train_mean")}
    ev = pg.tl.evaluate(adata, models, overwrite=True)
    ev = ev[ev["metric"].isin(METRICS)].groupby(["model", "metric"])["value"].mean()
    return {m: {k: float(ev[(m, k)]) for k in METRICS} for m in models}


def summarize(runs: list[dict]) -> dict:
    out = {}
    for mode in sorted({r["mode"] for r in runs}):
        rs = [r for r in runs if r["mode"] == mode]
        row = {"n_seeds": len(rs), "epochs_mean": float(np.mean([r["epochs"] for r in rs]))}
        row["train_cpu_s"] = [
            round(float(np.mean([r["train_cpu_s"] for r in rs])), 2),
            round(float(np.std([r["train_cpu_s"] for r in rs])), 2),
        ]
        row["best_val_top20_de_mse"] = [
            float(np.mean([r["best_val_top20_de_mse"] for r in rs])),
            float(np.std([r["best_val_top20_de_mse"] for r in rs])),
        ]
        for k in METRICS:
            v = [r["test"][k] for r in rs]
            row[f"test_{k}"] = [float(np.mean(v)), float(np.std(v))]
        out[mode] = row
    return out


def markdown(record: dict) -> str:
    lines = [
        "### Set batches vs cell batches (GEARS training)",
        "",
        f"{record['seeds']} model seeds per mode (split seed 0), {record['epochs']} epochs for `cells` (32 cells a step) and "
        f"`sets` ({record['set_batches']['sets_per_batch']} sets x up to {record['set_batches']['cells_per_set']} cells a step); "
        "`sets_equal_cpu` trains set batches for the CPU seconds of the `cells` run of each seed. Mean +- SD over "
        "seeds; test metrics are means over the test perturbations (`pg.tl.evaluate`). CPU seconds: training only, "
        f"process CPU (load average at start {record['machine'].get('load_average_at_start')}).",
        "",
        "| dataset | mode | epochs | train CPU s | best val top-20 DE MSE | test MSE top-20 | test normalized MSE top-20 | test Pearson delta |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, d in record["datasets"].items():
        if "skipped" in d:
            lines.append(f"| {name} | skipped: {d['skipped']} | | | | | | |")
            continue
        for mode, r in d["summary"].items():
            f = lambda p: f"{p[0]:.4f} +- {p[1]:.4f}"  # noqa: E731
            lines.append(
                f"| {name} | {mode} | {r['epochs_mean']:.1f} | {r['train_cpu_s'][0]:.1f} +- {r['train_cpu_s'][1]:.1f} | "
                f"{f(r['best_val_top20_de_mse'])} | {f(r['test_mse_top20'])} | {f(r['test_mse_top20_normalized'])} | "
                f"{f(r['test_pearson_delta'])} |"
            )
        for m, b in d["baselines"].items():
            lines.append(
                f"| {name} | baseline {m} | | | | {b['mse_top20']:.4f} | {b['mse_top20_normalized']:.4f} | {b['pearson_delta']:.4f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--max-epochs", type=int, default=40, help="cap of the equal-CPU set-batch runs")
    parser.add_argument("--sets-per-batch", type=int, default=4)
    parser.add_argument("--cells-per-set", type=int, default=8)
    parser.add_argument("--datasets", nargs="+", default=["simulated", "norman"])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "compare_batching.json")
    args = parser.parse_args()

    import torch

    import pertpy_gnn as pg

    torch.set_num_threads(1)
    SET_SIZES.update(sets_per_batch=args.sets_per_batch, cells_per_set=args.cells_per_set)
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    record = {
        "benchmark": "compare_batching",
        "seeds": args.seeds,
        "epochs": args.epochs,
        "set_batches": dict(SET_SIZES),
        "datasets": {},
    }
    for name in args.datasets:
        if name == "norman" and not NORMAN.is_file():
            record["datasets"][name] = {"skipped": f"{NORMAN} absent"}
            continue
        adata = simulated() if name == "simulated" else norman()
        pg.pp.rank_de_genes(adata)
        pg.pp.coexpression_graph(adata)
        runs = []
        for seed in range(args.seeds):
            cells = run(adata, "cells", args.epochs, seed)
            sets = run(adata, "sets", args.epochs, seed)
            per_epoch = sets["train_cpu_s"] / args.epochs
            n_eq = int(min(args.max_epochs, max(1, round(cells["train_cpu_s"] / max(per_epoch, 1e-9)))))
            eq = run(adata, "sets_equal_cpu", n_eq, seed)
            runs += [cells, sets, eq]
            print(
                name,
                seed,
                [
                    (r["mode"], r["epochs"], r["train_cpu_s"], round(r["best_val_top20_de_mse"], 4))
                    for r in (cells, sets, eq)
                ],
                flush=True,
            )
        record["datasets"][name] = {
            "n_obs": int(adata.n_obs),
            "n_vars": int(adata.n_vars),
            "runs": runs,
            "summary": summarize(runs),
            "baselines": baselines(adata),
        }
    record["wall_s"] = round(time.perf_counter() - t0, 1)
    record["machine"] = machine(load_start)
    record["versions"] = versions("pertpy-gnn", "torch", "lightning")
    write_record(record, args.out)
    args.out.with_suffix(".md").write_text(markdown(record))


if __name__ == "__main__":
    main()
