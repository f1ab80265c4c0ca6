"""Effect of each GI-scoring setting on time and on the scores, on Norman-sized GI-map inputs.

The doubles of a GI map of 105 genes over 5,000 measured genes (``gi_map_scale.py``'s simulation and
its stand-in predictor, so that the scores spread as on real data), a random subset of ``--pairs``
pairs, scored by ``_score_table`` with today's defaults and with each alternative setting: CPU seconds
(all threads) and, per score, the largest absolute difference from the defaults' scores. Writes a
JSON record (machine, load, versions) to ``--out``.

Usage::

    python benchmarks/gi_scoring_knobs.py --pairs 600 --out benchmarks/results/gi_scoring_knobs.json
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from pathlib import Path

import numpy as np
from _common import cpu_seconds, machine, peak_rss_gib, versions, write_record
from gi_map_scale import StandIn

SCORES = (
    "c_a",
    "c_b",
    "magnitude",
    "model_fit",
    "similarity",
    "equality_of_contribution",
    "dcor_a",
    "dcor_b",
)
SETTINGS = {
    "defaults (10,000 subsets of 1,000 genes, 6 projections)": {},
    "4 projections": {"n_projections": 4},
    "8 projections": {"n_projections": 8},
    "5,000 Theil-Sen subsets": {"n_subsamples": 5000},
    "2,000 Theil-Sen subsets": {"n_subsamples": 2000},
    "1,000 Theil-Sen subsets": {"n_subsamples": 1000},
    "4 projections, 2,000 subsets": {"n_projections": 4, "n_subsamples": 2000},
    "exact similarity (no projections)": {"n_projections": None},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=600)
    parser.add_argument("--exact-pairs", type=int, default=60, help="pairs for the O(n^2) exact similarity")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="numba threads")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "gi_scoring_knobs.json"
    )
    args = parser.parse_args()

    import numba

    import pertpy_gnn as pg
    from pertpy_gnn.tl._gi import _score_table

    numba.set_num_threads(args.threads)
    load_start = os.getloadavg()
    adata = pg.datasets.simulate_perturbseq(
        n_genes=5000,
        n_singles=105,
        n_doubles=131,
        n_cells_per_perturbation=20,
        n_control=1000,
        counts_layer=False,
        seed=args.seed,
    )
    genes = sorted(p for p in adata.uns["simulation"]["true_delta"].index if p != "control" and "+" not in p)
    pairs = list(itertools.combinations(genes, 2))
    rng = np.random.default_rng(args.seed)
    pairs = [
        pairs[i] for i in np.sort(rng.choice(len(pairs), size=min(args.pairs, len(pairs)), replace=False))
    ]
    sets = [(g,) for g in genes] + pairs
    pred = StandIn(adata, seed=args.seed).predict(sets)
    delta = np.asarray(pred.layers["delta"])
    rows = {"+".join(s): i for i, s in enumerate(sets)}
    pg.tl._gi.distance_correlations(*np.random.default_rng(0).random((3, 2, 50)))  # compile outside timing

    results, base = {}, None
    for name, kw in SETTINGS.items():
        use = pairs[: args.exact_pairs] if kw.get("n_projections", 6) is None else pairs
        opts = {
            "n_subsamples": 10_000,
            "subsample_size": 1000,
            "n_projections": 6,
            "model_fit": "pearson",
        } | kw
        c0, t0 = cpu_seconds(), time.perf_counter()
        df = _score_table(delta, rows, use, thresholds=None, seed=args.seed, **opts)
        cpu, wall = cpu_seconds() - c0, time.perf_counter() - t0
        if base is None:
            base = df
        diff = {
            s: float(np.nanmax(np.abs(df[s].to_numpy() - base.loc[df.index, s].to_numpy()))) for s in SCORES
        }
        flips = int(sum((df[t] != base.loc[df.index, t]).sum() for t in pg.tl._gi.DEFAULT_GI_THRESHOLDS))
        results[name] = {
            "settings": opts,
            "pairs": len(use),
            "cpu_seconds": round(cpu, 2),
            "wall_seconds": round(wall, 2),
            "cpu_ms_per_pair": round(1e3 * cpu / len(use), 2),
            "max_abs_diff_vs_defaults": {k: round(v, 5) for k, v in diff.items()},
            "subtype_calls_changed": flips,
        }
        print(name, results[name], flush=True)
    record = {
        "benchmark": "gi_scoring_knobs",
        "n_genes_measured": int(adata.n_vars),
        "n_map_genes": len(genes),
        "numba_threads": args.threads,
        "results": results,
        "peak_rss_gib": round(peak_rss_gib(), 3),
        "machine": machine(load_start),
        "versions": versions("pertpy-gnn", "numpy", "numba"),
    }
    write_record(record, args.out)
    args.out.with_suffix(".md").write_text(markdown(record))


def markdown(record: dict) -> str:
    m = record["machine"]
    lines = [
        "### GI scoring settings: time and effect on the scores",
        "",
        f"Doubles of a Norman-sized GI map ({record['n_map_genes']} genes, {record['n_genes_measured']} measured "
        f"genes; stand-in predictor), {record['numba_threads']} numba threads; CPU seconds of the process (all "
        f"threads); load average at start {m.get('load_average_at_start')}. Differences: largest absolute "
        "difference from the defaults' scores on the same pairs; subtype calls: pairs x subtypes that change.",
        "",
        "| setting | pairs | CPU ms / pair | max abs diff: c_a | magnitude | model_fit | similarity | subtype calls changed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in record["results"].items():
        d = r["max_abs_diff_vs_defaults"]
        lines.append(
            f"| {name} | {r['pairs']} | {r['cpu_ms_per_pair']} | {d['c_a']:.2g} | {d['magnitude']:.2g} | "
            f"{d['model_fit']:.2g} | {d['similarity']:.2g} | {r['subtype_calls_changed']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
