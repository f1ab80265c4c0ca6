"""Torch CPU threads (1 vs 2) for a GEARS training step and for folded inference, 5,000 genes.

A GEARS module of the paper's size (hidden 64) over 5,000 genes with random graphs; a training step
(forward, loss, backward, Adam) on 32 cells of 23 distinct sets (the mean of a random Norman batch)
and the folded prediction of 512 sets, each timed ``--repeats`` times with 1 and with 2 torch threads
in alternation, in the same process: median wall and CPU seconds (process, all threads), the
machine's load recorded. Writes ``--out``.

Usage::

    python benchmarks/torch_threads.py --out benchmarks/results/torch_threads.json
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
from _common import cpu_seconds, machine, versions, write_record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--genes", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "torch_threads.json")
    args = parser.parse_args()

    import torch

    from pertpy_gnn.gears import GEARSModule
    from pertpy_gnn.gears._constants import TENSOR_KEYS as K

    load_start = os.getloadavg()
    g = torch.Generator().manual_seed(0)
    k, nodes = args.genes, 2000
    torch.manual_seed(0)
    module = GEARSModule(
        k,
        nodes,
        torch.randint(0, k, (2, 20 * k), generator=g),
        torch.rand(20 * k, generator=g),
        torch.randint(0, nodes, (2, 20 * nodes), generator=g),
        torch.rand(20 * nodes, generator=g),
    )
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)
    groups = torch.randint(0, 23, (32,), generator=g)
    table = torch.randint(0, nodes, (23, 2), generator=g)
    batch = {
        K.X: torch.rand(32, k, generator=g),
        K.X_CTRL: torch.rand(32, k, generator=g),
        K.PERT_IDX: table[groups],
        K.GROUP: groups,
        K.MASK: torch.ones(32, k, dtype=torch.bool),
    }
    sets = torch.randint(0, nodes, (512, 2), generator=g)

    def step():
        module.train()
        opt.zero_grad()
        module(batch)[2].loss.backward()
        opt.step()

    def predict():
        module.eval()
        with torch.inference_mode():
            module.predict_delta(sets)

    out = {}
    for name, fn in (("train_step_32_cells_23_sets", step), ("folded_predict_512_sets", predict)):
        fn()
        times = {1: [], 2: []}
        for _ in range(args.repeats):
            for threads in (1, 2):
                torch.set_num_threads(threads)
                w, c = time.perf_counter(), cpu_seconds()
                fn()
                times[threads].append((time.perf_counter() - w, cpu_seconds() - c))
        out[name] = {
            f"{t}_threads": {
                "median_wall_s": round(float(np.median([x[0] for x in v])), 4),
                "median_cpu_s": round(float(np.median([x[1] for x in v])), 4),
            }
            for t, v in times.items()
        }
        print(name, out[name], flush=True)
    write_record(
        {
            "benchmark": "torch_threads",
            "n_genes": k,
            "results": out,
            "machine": machine(load_start),
            "versions": versions("torch"),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
