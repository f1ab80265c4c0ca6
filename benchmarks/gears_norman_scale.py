"""Time per epoch, preparation time and peak memory of GEARS on a Norman-shaped simulated screen.

Norman et al. 2019 (as processed by GEARS): ~90,000 cells x 5,000 genes, 105 singles, 131 doubles;
GEARS with its paper settings (hidden 64, batch 32, SGC, 1 GNN layer each). The screen is
simulated (``pg.datasets.simulate_perturbseq``), split as in the paper, its DE genes, GO graph
(the simulator's annotations) and co-expression graph computed, then GEARS trained for
``--epochs`` epochs with cell batches (the paper's, ``--batching cells``) or set batches
(``--batching sets``: ``--sets-per-batch`` sets and up to ``--cells-per-set`` cells of each per step).
Writes a JSON record (machine, versions, timings in wall and CPU seconds, the epoch's CPU seconds
including its validation, peak RSS of the preparation and of the training, load averages, the
validation top-20-DE MSE beside the no-change prediction's) to ``--out``; with ``--md`` also a
Markdown summary next to it (included in ``RESULTS.md`` by ``make_table.py``).

Memory: the simulated AnnData (CSR float32, no counts layer) is ~2.2 GiB of the process's resident
memory before preparation starts (``rss_gib_after_simulate``); the preparation and training peaks
are of the whole process, so they include it.

Usage::

    python benchmarks/gears_norman_scale.py --seed 0 --device cpu --epochs 1
    python benchmarks/gears_norman_scale.py --batching sets --sets-per-batch 8 --cells-per-set 64 \
        --threads 1 --epochs 2 --out benchmarks/results/gears_norman_scale_sets.json --md
    python benchmarks/gears_norman_scale.py --device gpu --epochs 3 --out benchmarks/results/gears_norman_scale_gpu.json
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

import psutil
from _common import cpu_seconds, machine, peak_rss_gib, versions, write_record

N_CONTROL, N_PER_PERTURBATION = 12120, 330  # 12,120 + 236 x 330 = 90,000 cells


class PeakRSS:
    """Highest resident memory of this process while active (sampled every 0.2 s)."""

    def __init__(self):
        self.proc, self.peak, self._stop = psutil.Process(), 0.0, threading.Event()

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss / 2**30)
            self._stop.wait(0.2)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss / 2**30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batching", choices=["cells", "sets"], default="cells")
    parser.add_argument("--batch-size", type=int, default=32, help="cells per step (cell batches)")
    parser.add_argument("--sets-per-batch", type=int, default=4, help="sets per step (set batches)")
    parser.add_argument(
        "--cells-per-set", type=int, default=8, help="most cells of a set per step (set batches; 0: all)"
    )
    parser.add_argument(
        "--training-block",
        choices=["folded", "plain"],
        default="folded",
        help="the first post-perturbation block in training: folded (the default) or the plain layers",
    )
    parser.add_argument("--md", action="store_true", help="also write a Markdown summary next to --out")
    parser.add_argument(
        "--threads", type=int, default=2, help="torch CPU threads (default 2: the target machine)"
    )
    parser.add_argument(
        "--limit-train-batches",
        type=float,
        default=1.0,
        help="fraction (or number) of training batches per epoch; the epoch time is then extrapolated",
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "gears_norman_scale.json"
    )
    args = parser.parse_args()
    if args.limit_train_batches > 1:
        args.limit_train_batches = int(args.limit_train_batches)

    import lightning.pytorch as lp
    import torch

    import pertpy_gnn as pg
    from pertpy_gnn.gears._data import SetBatches

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    prep: dict[str, float] = {}

    def timed(name, fn, *a, **kw):
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        prep[name] = round(time.perf_counter() - t0, 2)
        return out

    adata = timed(
        "simulate_s",
        pg.datasets.simulate_perturbseq,
        n_genes=5000,
        n_singles=105,
        n_doubles=131,
        n_cells_per_perturbation=N_PER_PERTURBATION,
        n_control=N_CONTROL,
        counts_layer=False,
        seed=args.seed,
    )
    rss_after_sim = psutil.Process().memory_info().rss / 2**30
    peak_sim = peak_rss_gib()  # the process's peak so far: imports and the simulation
    with PeakRSS() as prep_peak:
        t_prep = time.perf_counter()
        timed("parse_perturbations_s", pg.pp.parse_perturbations, adata, perturbation_key="condition")
        timed("split_perturbations_s", pg.pp.split_perturbations, adata, seed=args.seed)
        timed("rank_de_genes_s", pg.pp.rank_de_genes, adata)
        timed("go_graph_s", pg.pp.go_graph, adata)
        timed("coexpression_graph_s", pg.pp.coexpression_graph, adata)
        timed("setup_anndata_s", pg.gears.GEARS.setup_anndata, adata)
        model = timed("build_model_s", pg.gears.GEARS, adata, hidden_dim=64, seed=args.seed)
        # what train() prepares before epoch 1 (kept here to score the no-change prediction on the same genes)
        train, val, control_mean, _, _ = timed("training_tables_s", model._training_data, args.seed)
        prep["total_s"] = round(time.perf_counter() - t_prep, 2)

    class EpochTimer(lp.Callback):
        def __init__(self):
            self.epochs = []

        def on_train_epoch_start(self, trainer, plan):
            self._t, self._c = time.perf_counter(), cpu_seconds()
            self._tv = self._cv = None

        def on_validation_epoch_start(self, trainer, plan):
            self._tv, self._cv = time.perf_counter(), cpu_seconds()

        def on_train_epoch_end(self, trainer, plan):
            t, c = time.perf_counter(), cpu_seconds()
            tv, cv = (t, c) if self._tv is None else (self._tv, self._cv)
            self.epochs.append(
                {
                    "epoch": trainer.current_epoch,
                    "train_steps": int(trainer.num_training_batches),
                    "train_s": round(tv - self._t, 2),
                    "train_cpu_s": round(cv - self._c, 2),
                    "validation_s": round(t - tv, 2),
                    "validation_cpu_s": round(c - cv, 2),
                    "epoch_s": round(t - self._t, 2),
                    "epoch_cpu_s": round(c - self._c, 2),
                    "load_average_1min": round(os.getloadavg()[0], 2),
                }
            )

    timer = EpochTimer()
    accelerator = "gpu" if args.device == "gpu" else "cpu"
    model.module.fold_training_block = args.training_block == "folded"
    with PeakRSS() as train_peak:
        t0 = time.perf_counter()
        model.train(
            max_epochs=args.epochs,
            batch_size=args.batch_size,
            accelerator=accelerator,
            devices=1,
            progress_bar=False,
            callbacks=[timer],
            limit_train_batches=args.limit_train_batches,
            batching=args.batching,
            sets_per_batch=args.sets_per_batch,
            cells_per_set=args.cells_per_set or None,
        )
        train_total = time.perf_counter() - t0
    summary = model.train_summary_
    if args.batching == "sets":
        full_steps = len(SetBatches(train.codes, args.sets_per_batch, args.cells_per_set or None, 0))
    else:
        full_steps = -(-summary["n_train_cells"] // args.batch_size)
    per_step = [e["train_s"] / max(e["train_steps"], 1) for e in timer.epochs]
    record = {
        "benchmark": "gears_norman_scale",
        "seed": args.seed,
        "device": args.device,
        "gpu": torch.cuda.get_device_name(0) if args.device == "gpu" else None,
        "torch_threads": torch.get_num_threads(),
        "shape": list(adata.shape),
        "density": round(float(adata.X.nnz / (adata.shape[0] * adata.shape[1])), 4),
        "model": {"hidden_dim": 64, "gnn": "sgc", "go_graph_nodes": len(model.go_genes)},
        "batching": {"mode": args.batching}
        | (
            {"sets_per_batch": args.sets_per_batch, "cells_per_set": args.cells_per_set or "all"}
            if args.batching == "sets"
            else {"batch_size": args.batch_size}
        )
        | {"training_block": args.training_block},
        "split": {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in summary.items()},
        "preparation": prep,
        "epochs": timer.epochs,
        "limit_train_batches": args.limit_train_batches,
        "steps_per_full_epoch": full_steps,
        "seconds_per_step": round(min(per_step), 4) if per_step else None,
        "full_epoch_train_minutes_estimate": round(min(per_step) * full_steps / 60, 2) if per_step else None,
        "train_total_s": round(train_total, 2),
        "train_loss": model.history_["train_loss"].round(5).tolist(),
        "val_top20_de_mse": model.history_["val_top20_de_mse"].round(5).tolist(),
        "val_top20_de_mse_no_change": round(
            float(((control_mean[val["de_idx"].numpy()] - val["de_mean"].numpy()) ** 2).mean()), 5
        ),
        "rss_gib_after_simulate": round(rss_after_sim, 3),
        "peak_rss_gib_simulate": round(peak_sim, 3),
        "peak_rss_gib_preparation": round(prep_peak.peak, 3),
        "peak_rss_gib_training": round(train_peak.peak, 3),
        "peak_rss_gib_training_above_data": round(train_peak.peak - rss_after_sim, 3),
        "peak_rss_gib_preparation_above_data": round(prep_peak.peak - rss_after_sim, 3),
        "peak_rss_gib_process": round(peak_rss_gib(), 3),
        "machine": machine(load_start),
        "versions": versions("pertpy-gnn", "torch", "torch-geometric", "lightning", "scvi-tools", "anndata"),
    }
    write_record(record, args.out)
    if args.md:
        args.out.with_suffix(".md").write_text(summary_md(record, args.out.name))


def summary_md(r: dict, name: str) -> str:
    """A short Markdown summary of one record: per epoch CPU seconds incl. validation, peak RSS, load."""
    b = r["batching"]
    how = (
        f"set batches, {b['sets_per_batch']} sets x up to {b['cells_per_set']} cells per step"
        if b["mode"] == "sets"
        else f"cell batches of {b['batch_size']}"
    ) + f", training block {b.get('training_block', 'not recorded')}"
    lines = [
        f"GEARS on the Norman-shaped simulation ({r['shape'][0]} cells x {r['shape'][1]} genes, "
        f"{r['split']['n_train_cells']} training cells, {r['split']['n_train_perturbations']} training perturbations), "
        f"{how}, {r['device']}, {r['torch_threads']} torch thread(s), seed {r['seed']}; "
        f"`{name}`. CPU seconds are user + system of the whole process (all threads).\n",
        "| epoch | steps | train CPU s | validation CPU s | epoch CPU s (incl. validation) | epoch wall s "
        "| val top-20-DE MSE | no change | load (1 min) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e, v in zip(r["epochs"], r["val_top20_de_mse"], strict=False):
        lines.append(
            f"| {e['epoch']} | {e['train_steps']} | {e['train_cpu_s']} | {e['validation_cpu_s']} | "
            f"**{e['epoch_cpu_s']}** | {e['epoch_s']} | {v:.4f} | {r['val_top20_de_mse_no_change']:.4f} | "
            f"{e['load_average_1min']} |"
        )
    p = r["preparation"]
    lines.append(
        f"\nResident memory (whole process): {r['rss_gib_after_simulate']} GiB after simulating (the AnnData "
        f"itself; peak {r.get('peak_rss_gib_simulate', 'n/a')} GiB while simulating, {p['simulate_s']} s wall); "
        f"peak {r['peak_rss_gib_preparation']} GiB during "
        f"preparation ({p['total_s']} s wall: DE, GO and co-expression graphs, model, training tables), "
        f"{r['peak_rss_gib_training']} GiB during training (so {r['peak_rss_gib_training_above_data']} GiB "
        f"above the data). Load averages at start {r['machine']['load_average_at_start']}, at end "
        f"{r['machine']['load_average_at_end']} (2-core machine shared with other jobs).\n"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
