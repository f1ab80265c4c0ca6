"""Time and peak memory of simulating a Norman-shaped screen, and of ranking its DE genes.

Norman et al. 2019 (as processed by GEARS): ~90,000 cells x 5,000 genes, 105 singles, 131 doubles.
Writes a JSON record (machine, versions, timings, peak RSS) to ``--out``.

Usage::

    python benchmarks/simulate_norman_scale.py --seed 0 --out benchmarks/results/simulate_norman_scale.json
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import psutil
from _common import cpu_seconds, machine, peak_rss_gib, versions, write_record

N_CONTROL, N_PER_PERTURBATION = 12120, 330  # 12,120 + 236 x 330 = 90,000 cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "simulate_norman_scale.json"
    )
    parser.add_argument(
        "--n-jobs", type=int, default=None, help="sampling threads (default: the simulator's)"
    )
    parser.add_argument(
        "--no-counts-layer", action="store_true", help="do not keep raw counts in layers['counts']"
    )
    args = parser.parse_args()

    import pertpy_gnn as pg

    proc = psutil.Process()
    rss_start = proc.memory_info().rss / 2**30
    load_start = os.getloadavg()
    t0, c0 = time.perf_counter(), cpu_seconds()
    adata = pg.datasets.simulate_perturbseq(
        n_genes=5000,
        n_singles=105,
        n_doubles=131,
        n_cells_per_perturbation=N_PER_PERTURBATION,
        n_control=N_CONTROL,
        counts_layer=not args.no_counts_layer,
        n_jobs=args.n_jobs,
        seed=args.seed,
    )
    t_sim, c_sim = time.perf_counter() - t0, cpu_seconds() - c0
    peak_sim = peak_rss_gib()
    rss_after_sim = proc.memory_info().rss / 2**30

    t0 = time.perf_counter()
    pg.pp.parse_perturbations(adata, perturbation_key="condition")
    t_parse = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), cpu_seconds()
    pg.pp.rank_de_genes(adata, n_genes=20)
    t_de, c_de = time.perf_counter() - t0, cpu_seconds() - c0

    inter = adata.uns["simulation"]["interactions"]
    x = adata.X
    matrix_gib = (x.data.nbytes + x.indices.nbytes + x.indptr.nbytes) / 2**30
    if "counts" in adata.layers:
        c = adata.layers["counts"]
        matrix_gib += (c.data.nbytes + c.indices.nbytes + c.indptr.nbytes) / 2**30
    record = {
        "benchmark": "simulate_norman_scale",
        "seed": args.seed,
        "shape": list(adata.shape),
        "n_perturbations": int(adata.obs["condition"].nunique() - 1),
        "n_singles": int(adata.obs.loc[adata.obs["pg_n_genes"] == 1, "condition"].nunique()),
        "n_doubles": int(inter.shape[0]),
        "n_control": int((adata.obs["condition"] == "control").sum()),
        "counts_layer": "counts" in adata.layers,
        "n_jobs": "default" if args.n_jobs is None else args.n_jobs,
        "nnz": int(x.nnz),
        "density": float(x.nnz / np.prod(adata.shape)),
        "matrices_gib": round(matrix_gib, 3),
        "gi_types": {k: int(v) for k, v in inter["gi_type"].value_counts().items()},
        "simulate_seconds": round(t_sim, 2),
        "simulate_cpu_seconds": round(c_sim, 2),
        "peak_rss_gib_after_simulate": round(peak_sim, 3),
        "rss_gib_before": round(rss_start, 3),
        "rss_gib_after_simulate": round(rss_after_sim, 3),
        "parse_perturbations_seconds": round(t_parse, 2),
        "rank_de_genes_seconds": round(t_de, 2),
        "rank_de_genes_cpu_seconds": round(c_de, 2),
        "peak_rss_gib_total": round(peak_rss_gib(), 3),
        "machine": machine(load_start),
        "versions": versions("pertpy-gnn", "numpy", "scipy", "pandas", "anndata", "scanpy"),
    }
    write_record(record, args.out)


if __name__ == "__main__":
    main()
