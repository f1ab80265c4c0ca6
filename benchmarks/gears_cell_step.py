"""CPU time and peak memory of a GEARS training epoch, this source tree against an earlier commit (issue 13).

The same inputs and settings as ``compare_speed.py``'s training phases (the ~20k cells x 2k genes
simulated screen ``our_input.h5ad`` read without layers; ``rank_de_genes``, ``go_graph(n_neighbors=20)``,
``coexpression_graph``, ``GEARS(hidden_dim=64, seed=0)``; one epoch and its validation, batches of
32, one torch thread). Each run is a fresh process; the two source trees (``before``: ``git archive``
of ``--before`` under ``benchmarks/work/``; ``after``: this tree's ``src``) alternate, ``--repeats``
times each, so that both see the same machine state. Per run: CPU seconds of ``train()`` and of its
training steps alone, the peak RSS of ``train()`` (``VmHWM`` reset after preparation) and its rise
over the prepared state, the first step losses and the validation score (the two trees compute the
same thing; the losses agree to float rounding). Writes ``--out`` (JSON) and a Markdown table beside it.

Usage::

    python benchmarks/gears_cell_step.py --before 3abb75c --out benchmarks/results/gears_cell_step.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import cpu_seconds, machine, reset_peak, status_kib, write_record

ROOT = Path(__file__).resolve().parent.parent
N_LOSSES = 20


def child(data: Path, batching: str, seed: int) -> dict:
    import lightning.pytorch as lp
    import torch

    import pertpy_gnn as pg
    from pertpy_gnn.gears import GEARS

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from compare_speed import read_without_layers

    torch.set_num_threads(1)
    adata, _ = read_without_layers(data / "our_input.h5ad")
    pg.pp.rank_de_genes(adata)
    pg.pp.go_graph(adata, n_neighbors=20)
    pg.pp.coexpression_graph(adata)
    GEARS.setup_anndata(adata)
    model = GEARS(adata, hidden_dim=64, seed=seed)
    model._training_data(seed)  # the tables train() builds first: not part of the measured step work
    losses: list[float] = []

    class Timer(lp.Callback):
        def on_train_epoch_start(self, trainer, plan):
            self.c = cpu_seconds()

        def on_validation_epoch_start(self, trainer, plan):
            self.steps_cpu = cpu_seconds() - self.c

        def on_train_batch_end(self, trainer, plan, outputs, batch, batch_idx):
            self.n_steps = batch_idx + 1
            if len(losses) < N_LOSSES:
                losses.append(float(outputs["loss"]))

    timer = Timer()
    rss0 = status_kib("VmRSS") / 1024
    reset_peak()
    c0 = cpu_seconds()
    model.train(
        max_epochs=1,
        batch_size=32,
        accelerator="cpu",
        devices=1,
        progress_bar=False,
        callbacks=[timer],
        seed=seed,
        batching=batching,
    )
    cpu = cpu_seconds() - c0
    peak = status_kib("VmHWM") / 1024
    return {
        "train_cpu_s": round(cpu, 3),
        "steps_cpu_s": round(timer.steps_cpu, 3),
        "n_steps": int(timer.n_steps),
        "rss_prepared_mib": round(rss0, 1),
        "peak_rss_train_mib": round(peak, 1),
        "peak_rise_mib": round(peak - rss0, 1),
        "val_top20_de_mse": float(model.history_["val_top20_de_mse"].iloc[-1]),
        "losses": losses,
    }


def before_tree(commit: str) -> Path:
    """``src`` of ``commit`` under ``benchmarks/work/`` (extracted once)."""
    sha = subprocess.check_output(["git", "rev-parse", "--short", commit], cwd=ROOT, text=True).strip()
    dest = ROOT / "benchmarks" / "work" / f"src_{sha}"
    if not (dest / "src").exists():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.check_output(["git", "archive", sha, "src"], cwd=ROOT)
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest / "src"


def markdown(record: dict) -> str:
    md = [
        "### GEARS training epoch: cell batches and set batches, before and after (issue 13)\n",
        f"{record['what']} `before` = commit `{record['before']}`, `after` = `{record['after']}`. Median "
        f"(min-max) over {record['repeats']} fresh processes per tree, alternating. Load average "
        f"{record['machine']['load_average_at_start']} at the start, {record['machine']['load_average_at_end']} "
        "at the end (2 cores shared with other work).\n",
        "| batching | tree | train() CPU s | steps CPU s | peak RSS rise during train() MiB | peak RSS MiB | "
        "val top-20 DE MSE |",
        "|---|---|---|---|---|---|---|",
    ]

    def f(row, key):
        return f"{row[key]['median']:.4g} ({row[key]['min']:.4g}-{row[key]['max']:.4g})"

    for row in record["summary"]:
        md.append(
            f"| {row['batching']} | {row['tree']} | {f(row, 'train_cpu_s')} | {f(row, 'steps_cpu_s')} | "
            f"{f(row, 'peak_rise_mib')} | {f(row, 'peak_rss_train_mib')} | {row['val_top20_de_mse']:.6g} |"
        )
    md.append("")
    for b, diff in record["max_abs_loss_diff"].items():
        md.append(
            f"- {b}: max abs difference of the first {N_LOSSES} step losses, after vs before: {diff:.3g}"
        )
    md.append(
        "\nThe step's arithmetic is the same to float rounding (tests); the first step's loss is identical "
        "and the runs drift apart from there (rounding, amplified by Adam, which also turns the plain "
        "layers' rounding-noise gradient of the bias before the batch norm into steps of size lr), so the "
        "one-epoch validation scores differ by about as much as rounding-level changes of the plain "
        "layers move them."
    )
    return "\n".join(md) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--before", default="main", help="commit of the `before` source tree")
    p.add_argument("--data-dir", type=Path, default=None, help="folder of our_input.h5ad (sim20k)")
    p.add_argument("--batching", nargs="+", default=["cells", "sets"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/gears_cell_step.json")
    p.add_argument("--child", nargs=2, metavar=("BATCHING", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    data = args.data_dir or ROOT / "benchmarks/work/ref_data/sim20k"
    if args.child:
        Path(args.child[1]).write_text(json.dumps(child(data, args.child[0], args.seed)))
        return
    if not (data / "our_input.h5ad").exists():
        sys.exit(f"{data / 'our_input.h5ad'} not found: give --data-dir (compare_speed.py's sim20k inputs).")
    load0 = os.getloadavg()
    trees = {"before": before_tree(args.before), "after": ROOT / "src"}
    after = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    dirty = subprocess.check_output(["git", "status", "--porcelain", "src"], cwd=ROOT, text=True).strip()
    runs = []
    tmp = ROOT / "benchmarks/work/gears_cell_step_child.json"
    for batching in args.batching:
        for rep in range(args.repeats):
            for tree, src in trees.items():
                env = os.environ | {"PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
                t = time.perf_counter()
                cmd = [sys.executable, __file__, "--child", batching, str(tmp), "--data-dir", str(data)]
                subprocess.run(cmd + ["--seed", str(args.seed)], env=env, check=True)
                run = {"batching": batching, "tree": tree, "repeat": rep, **json.loads(tmp.read_text())}
                run["process_wall_s"] = round(time.perf_counter() - t, 1)
                print(
                    json.dumps({k: v for k, v in run.items() if k != "losses"}), file=sys.stderr, flush=True
                )
                runs.append(run)
    tmp.unlink(missing_ok=True)
    summary, loss_diff = [], {}
    keys = ("train_cpu_s", "steps_cpu_s", "peak_rise_mib", "peak_rss_train_mib")
    for batching in args.batching:
        for tree in trees:
            rs = [r for r in runs if r["batching"] == batching and r["tree"] == tree]
            row = {"batching": batching, "tree": tree, "val_top20_de_mse": rs[0]["val_top20_de_mse"]}
            for k in keys:
                v = [r[k] for r in rs]
                row[k] = {"median": statistics.median(v), "min": min(v), "max": max(v)}
            summary.append(row)
        b = [r for r in runs if r["batching"] == batching and r["tree"] == "before"][0]["losses"]
        a = [r for r in runs if r["batching"] == batching and r["tree"] == "after"][0]["losses"]
        loss_diff[batching] = max(abs(x - y) for x, y in zip(a, b, strict=True))
    record = {
        "what": "GEARS.train(max_epochs=1, batch_size=32), sim20k inputs of compare_speed.py, one torch thread.",
        "before": args.before,
        "after": after + (" (uncommitted changes in src)" if dirty else ""),
        "repeats": args.repeats,
        "machine": machine(load0),
        "summary": summary,
        "max_abs_loss_diff": loss_diff,
        "runs": runs,
    }
    write_record(record, args.out)
    args.out.with_suffix(".md").write_text(markdown(record))


if __name__ == "__main__":
    main()
