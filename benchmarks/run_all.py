"""Run every benchmark of benchmarks/ in turn, then regenerate benchmarks/results/RESULTS.md.

Each benchmark writes its JSON (and some a Markdown table) to ``benchmarks/results/``; its log goes to
``benchmarks/work/logs/<name>.log``. A failing benchmark is reported and the others still run;
``make_table.py`` runs last. ``--device`` and ``--seed`` are passed to every benchmark that has them
(``gears_norman_scale.py`` calls the GPU ``gpu`` and writes ``gears_norman_scale_gpu.json`` then).

Usage (from the repository root; ``make bench`` runs it with the defaults)::

    .venv/bin/python benchmarks/run_all.py                       # everything, CPU (many hours on 2 cores)
    .venv/bin/python benchmarks/run_all.py --only compare_speed compare_accuracy
    .venv/bin/python benchmarks/run_all.py --skip reference_gears compass_throughput --device cuda
    .venv/bin/python benchmarks/run_all.py --list
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
PY = sys.executable


def commands(device: str, seed: int) -> dict[str, list[str]]:
    """Benchmark name -> command line (run from the repository root), in running order."""
    s = ["--seed", str(seed)]
    gpu = device == "cuda"
    return {
        "simulate_norman_scale": [PY, "benchmarks/simulate_norman_scale.py", *s],
        "graphs_scale": [PY, "benchmarks/graphs_scale.py"],
        "gears_norman_scale": [
            PY,
            "benchmarks/gears_norman_scale.py",
            *s,
            "--device",
            "gpu" if gpu else "cpu",
            *(
                ["--epochs", "3", "--out", "benchmarks/results/gears_norman_scale_gpu.json"]
                if gpu
                else ["--limit-train-batches", "400"]
            ),
        ],
        # full epochs of set batches on CPU, 1 torch thread (issue 13: an epoch + validation < 30 CPU s)
        "gears_norman_scale_sets": [
            PY,
            "benchmarks/gears_norman_scale.py",
            *s,
            *("--batching sets --sets-per-batch 8 --cells-per-set 64 --threads 1 --epochs 3 --md".split()),
            *("--out", "benchmarks/results/gears_norman_scale_sets.json"),
        ],
        "gi_map_scale": [PY, "benchmarks/gi_map_scale.py", *s, "--predictor", "auto"],
        # the reference GEARS in its own venv (created on first use); the settings of the committed results
        "reference_gears": ["bash", "benchmarks/reference_gears/run_all.sh", "norman", "sim20k"],
        "compare_speed": [PY, "benchmarks/compare_speed.py", "--device", device, *s],
        "compare_accuracy": [PY, "benchmarks/compare_accuracy.py", "--device", device, *s],
        "ablations": [PY, "benchmarks/ablations.py", "--epochs", "5"],
        "compass_throughput": [PY, "benchmarks/compass_throughput.py", "--device", device],
        "compass_corpus_scale": [PY, "benchmarks/compass_corpus_scale.py"],
        "compass_pretrain_real": [PY, "benchmarks/compass_pretrain_real.py", *s],
        "compass_downstream": [
            PY,
            "benchmarks/compass_downstream.py",
            *s,
            "--accelerator",
            "gpu" if gpu else "cpu",
        ],
        "compass_official_parity": [PY, "benchmarks/compass_official_parity.py"],
        "compass_official_scale": [
            PY,
            "benchmarks/compass_official_scale.py",
            "--device",
            device,
            *(
                ["--cells", "512", "--out", "benchmarks/results/compass_official_scale_gpu.json"]
                if gpu
                else []
            ),
        ],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="+", default=None, help="run only these benchmarks")
    p.add_argument("--skip", nargs="+", default=[], help="do not run these benchmarks")
    p.add_argument("--list", action="store_true", help="print the benchmarks and their commands, run nothing")
    args = p.parse_args()
    cmds = commands(args.device, args.seed)
    unknown = (set(args.only or []) | set(args.skip)) - set(cmds)
    if unknown:
        p.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {list(cmds)}")
    names = [n for n in cmds if (args.only is None or n in args.only) and n not in args.skip]
    if args.list:
        for n in names:
            print(f"{n}: {' '.join(cmds[n])}")
        return
    env = dict(os.environ, N_PREDICT=os.environ.get("N_PREDICT", "50"))
    logs = BENCH / "work" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    failed = []
    for n in names:
        t0 = time.perf_counter()
        print(f"[run_all] {n}: {' '.join(cmds[n])}", flush=True)
        with open(logs / f"{n}.log", "w") as log:
            rc = subprocess.run(
                cmds[n], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, check=False
            ).returncode
        print(
            f"[run_all] {n}: exit {rc} after {time.perf_counter() - t0:.0f} s (log {logs / f'{n}.log'})",
            flush=True,
        )
        if rc:
            failed.append(n)
    subprocess.run([PY, "benchmarks/make_table.py"], cwd=ROOT, check=True)
    print("[run_all] wrote benchmarks/results/RESULTS.md", flush=True)
    if failed:
        sys.exit(f"[run_all] failed: {failed} (see their logs)")


if __name__ == "__main__":
    main()
