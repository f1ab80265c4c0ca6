"""Command line: ``pertpy-gnn run [--data screen.h5ad] [--out dir]`` (the README's main job)."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pertpy-gnn`` command."""
    parser = argparse.ArgumentParser(prog="pertpy-gnn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train GEARS, evaluate it against baselines, score GIs, write a report")
    run.add_argument(
        "--data", default=None, help="perturbation h5ad (default: the embedded simulated screen)"
    )
    run.add_argument("--out", default="results/demo", help="output folder for the report")
    run.add_argument("--perturbation-key", default="condition", help="obs column with perturbation labels")
    run.add_argument("--control-label", default=None, help="label of control cells (default: auto-detect)")
    run.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="GEARS epochs (default: 10; the step decay halves the learning rate every epoch)",
    )
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--accelerator", default="cpu", help="Lightning accelerator (cpu, gpu, auto)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    from ._main_job import run_main_job

    run_main_job(
        data=args.data,
        out=args.out,
        perturbation_key=args.perturbation_key,
        control_label=args.control_label,
        epochs=args.epochs,
        seed=args.seed,
        accelerator=args.accelerator,
        progress_bar=not args.quiet,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
