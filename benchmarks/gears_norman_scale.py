"""Time per epoch, preparation time and peak memory of GEARS on a Norman-shaped simulated screen.

Norman et al. 2019 (as processed by GEARS): ~90,000 cells x 5,000 genes, 105 singles, 131 doubles;
GEARS with its paper settings (hidden 64, batch 32, SGC, 1 GNN layer each). The screen is
simulated (``pg.datasets.simulate_perturbseq``), split as in the paper, its DE genes, GO graph
(the simulator's annotations) and co-expression graph computed, then GEARS trained for
``--epochs`` epochs. Writes a JSON record (machine, versions, timings, peak RSS) to ``--out``.

Usage::

    python benchmarks/gears_norman_scale.py --seed 0 --device cpu --epochs 1
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
        _, val, control_mean, _, _ = timed("training_tables_s", model._training_data, args.seed)
        prep["total_s"] = round(time.perf_counter() - t_prep, 2)

    class EpochTimer(lp.Callback):
        def __init__(self):
            self.epochs = []

        def on_train_epoch_start(self, trainer, plan):
            self._t, self._c = time.perf_counter(), cpu_seconds()

        def on_validation_epoch_start(self, trainer, plan):
            self._tv = time.perf_counter()
            self._train_s, self._train_cpu = self._tv - self._t, cpu_seconds() - self._c

        def on_train_epoch_end(self, trainer, plan):
            self.epochs.append(
                {
                    "epoch": trainer.current_epoch,
                    "train_steps": int(trainer.num_training_batches),
                    "train_s": round(self._train_s, 2),
                    "train_cpu_s": round(self._train_cpu, 2),
                    "validation_s": round(time.perf_counter() - self._tv, 2),
                    "epoch_s": round(time.perf_counter() - self._t, 2),
                    "load_average_1min": round(os.getloadavg()[0], 2),
                }
            )

    timer = EpochTimer()
    accelerator = "gpu" if args.device == "gpu" else "cpu"
    with PeakRSS() as train_peak:
        t0 = time.perf_counter()
        model.train(
            max_epochs=args.epochs,
            accelerator=accelerator,
            devices=1,
            progress_bar=False,
            callbacks=[timer],
            limit_train_batches=args.limit_train_batches,
        )
        train_total = time.perf_counter() - t0
    summary = model.train_summary_
    full_steps = -(-summary["n_train_cells"] // 32)
    per_step = [e["train_s"] / max(e["train_steps"], 1) for e in timer.epochs]
    record = {
        "benchmark": "gears_norman_scale",
        "seed": args.seed,
        "device": args.device,
        "gpu": torch.cuda.get_device_name(0) if args.device == "gpu" else None,
        "torch_threads": torch.get_num_threads(),
        "shape": list(adata.shape),
        "density": round(float(adata.X.nnz / (adata.shape[0] * adata.shape[1])), 4),
        "model": {"hidden_dim": 64, "batch_size": 32, "gnn": "sgc", "go_graph_nodes": len(model.go_genes)},
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
        "peak_rss_gib_preparation": round(prep_peak.peak, 3),
        "peak_rss_gib_training": round(train_peak.peak, 3),
        "peak_rss_gib_process": round(peak_rss_gib(), 3),
        "machine": machine(load_start),
        "versions": versions("pertpy-gnn", "torch", "torch-geometric", "lightning", "scvi-tools", "anndata"),
    }
    write_record(record, args.out)


if __name__ == "__main__":
    main()
