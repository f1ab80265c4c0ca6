"""Scale of the GEARS graphs: the GO graph on every annotated human gene, co-expression on 90k cells x 5k genes.

Usage: ``python benchmarks/graphs_scale.py [--out benchmarks/results/graphs_scale.json]``. The GO
graph uses the real human gene2go table in ``../shared/data/go/`` (where absent, the same table
bundled as ``pg.datasets.go_annotations()``); the co-expression graph uses random sparse
log-normal-like data of Norman's full shape (GEARS: ~90,000 cells x 5,000 genes) at a low and a
realistic HVG density, and a Norman-shaped screen of ``pg.datasets.simulate_perturbseq`` (training
cells of a 'simulation' split). BLAS uses all cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

import pertpy_gnn as pg
from pertpy_gnn.pp._graphs import _use_sparse_gram

ROOT = Path(__file__).resolve().parents[1]
GO_FILE = ROOT.parent / "shared" / "data" / "go" / "human_gene2go_orgHsEgDb_20220912.tsv.gz"


def random_expression(n_cells: int, n_genes: int, density: float, seed: int = 0) -> sp.csr_matrix:
    """Sparse CSR float32 with log1p-like positive values, built in row blocks (no dense n x g array)."""
    rng = np.random.default_rng(seed)
    blocks = []
    for start in range(0, n_cells, 5000):
        rows = min(5000, n_cells - start)
        mask = rng.random((rows, n_genes), dtype=np.float32) < density
        block = sp.csr_matrix(mask, dtype=np.float32)
        block.data = np.log1p(rng.gamma(1.5, 1.0, block.nnz)).astype(np.float32)
        blocks.append(block)
    return sp.vstack(blocks, format="csr")


def bench_go(path: Path) -> dict:
    t0 = time.perf_counter()
    if path.is_file():
        table = pd.read_csv(path, sep="\t", usecols=["symbol", "go_id"])
    else:  # the same org.Hs.eg.db table, bundled with the package
        table, path = pg.datasets.go_annotations(), Path("pg.datasets.go_annotations()")
    t_read = time.perf_counter() - t0
    t0 = time.perf_counter()
    graph = pg.pp.go_graph(annotations=table, n_neighbors=20)
    t_graph = time.perf_counter() - t0
    deg = np.bincount(graph["edge_index"][1], minlength=len(graph["genes"]))
    return {
        "file": path.name,
        "n_annotation_rows": int(len(table)),
        "n_genes": int(len(graph["genes"])),
        "n_terms": graph["params"]["n_terms"],
        "n_edges": int(graph["edge_weight"].size),
        "median_in_degree": float(np.median(deg)),
        "read_s": round(t_read, 2),
        "go_graph_s": round(t_graph, 2),
    }


def bench_coexpression(adata: ad.AnnData, label: str) -> dict:
    t0 = time.perf_counter()
    graph = pg.pp.coexpression_graph(adata, n_neighbors=20, threshold=0.4, overwrite=True)
    seconds = time.perf_counter() - t0
    x = adata.X
    density = x.nnz / (x.shape[0] * x.shape[1]) if sp.issparse(x) else float(np.mean(x != 0))
    return {
        "data": label,
        "n_cells": int(adata.n_obs),
        "n_train_cells": graph["params"]["n_cells"],
        "n_genes": int(adata.n_vars),
        "density": round(density, 4),
        "path": "sparse Gram" if _use_sparse_gram(x) else "dense blocks",
        "n_edges": int(graph["edge_weight"].size),
        "coexpression_graph_s": round(seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "graphs_scale.json")
    parser.add_argument("--go-file", type=Path, default=GO_FILE)
    parser.add_argument("--n-cells", type=int, default=90_000)
    parser.add_argument("--n-genes", type=int, default=5_000)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.03, 0.2])
    args = parser.parse_args()

    result = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "load_avg_1min": os.getloadavg()[0],
        },
        "go_graph": bench_go(args.go_file),
        "coexpression_graph": [],
    }
    print(json.dumps(result["go_graph"]))
    for density in args.densities:
        x = random_expression(args.n_cells, args.n_genes, density)
        adata = ad.AnnData(x)
        rng = np.random.default_rng(0)
        adata.obs["pg_split"] = pd.Categorical(
            rng.choice(["train", "val", "test"], adata.n_obs, p=[0.8, 0.05, 0.15])
        )
        result["coexpression_graph"].append(bench_coexpression(adata, f"random sparse, density {density}"))
        print(json.dumps(result["coexpression_graph"][-1]))
        del adata, x
    if hasattr(pg.datasets, "simulate_perturbseq"):
        try:
            n_perts = 105 + 131  # Norman's singles and doubles
            sim = pg.datasets.simulate_perturbseq(
                n_genes=args.n_genes,
                n_singles=105,
                n_doubles=131,
                n_cells_per_perturbation=(args.n_cells - 1500) // n_perts,
                n_control=1500,
                seed=0,
            )
            pg.pp.parse_perturbations(sim, perturbation_key="condition")
            pg.pp.split_perturbations(sim, seed=0)
            result["coexpression_graph"].append(bench_coexpression(sim, "pg.datasets.simulate_perturbseq"))
        except Exception as err:  # noqa: BLE001 - the benchmark records the failure and goes on
            result["coexpression_graph"].append(
                {"data": "pg.datasets.simulate_perturbseq", "error": repr(err)}
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
