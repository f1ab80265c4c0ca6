"""Command line: ``pertpy-gnn run [--data screen.h5ad] [--out dir]`` (the README's main job)."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pertpy-gnn`` command."""
    from ._main_job import DEFAULT_EPOCHS, INPUT_CONTRACT

    parser = argparse.ArgumentParser(prog="pertpy-gnn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="train the models, evaluate them against baselines, score GIs, write a report",
        description="Train the models on the paper's simulation split, evaluate them beside every baseline, "
        "score genetic interactions and write report.md (verdict first) with its CSV tables and figures.",
        epilog="Input: " + INPUT_CONTRACT,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    run.add_argument("--data", default=None, help="perturbation h5ad (None: the embedded simulated screen)")
    run.add_argument("--out", default="results/demo", help="output folder for the report")
    run.add_argument("--perturbation-key", default="condition", help="obs column with perturbation labels")
    run.add_argument("--control-label", default=None, help="label of control cells (None: auto-detect)")
    run.add_argument(
        "--epochs",
        type=int,
        default=DEFAULT_EPOCHS,
        help="training epochs (the step decay halves the learning rate every epoch)",
    )
    run.add_argument(
        "--seed", type=int, default=0, help="seed of the data, the split and the first training run"
    )
    run.add_argument("--n-seeds", type=int, default=1, help="training seeds; the report gives their spread")
    run.add_argument(
        "--accelerator",
        default="auto",
        help="Lightning accelerator: auto (a GPU when there is one), cpu, gpu",
    )
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
        n_seeds=args.n_seeds,
        accelerator=args.accelerator,
        progress_bar=not args.quiet,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
