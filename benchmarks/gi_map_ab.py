"""A/B of the GI-map speed changes in one process, alternating, so both sides see the same machine load.

On the Norman-shaped simulation of ``gi_map_scale.py`` (5,565 sets: 105 singles and their 5,460
pairs, 5,000 genes): (1) GEARS's folded prediction before (second linear layer applied to the
``genes x sets`` grid; a copy of that code is below) and now (folded into the gene heads), on one
torch thread; (2) the scoring of ``--pairs`` pairs with the numpy Theil-Sen (before) and the numba
kernels (now). CPU seconds per side (sum over ``--rounds``) and the largest absolute differences.
The GEARS weights are as initialized (the cost does not depend on training); run with
``OMP_NUM_THREADS=1``. Writes a JSON record to ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import os
from pathlib import Path

import numpy as np
from _common import cpu_seconds, machine, versions, write_record


def folded_before(self, pert_idx, h_gene, block_rows=8192):
    """GEARS's ``_predict_folded`` before this change (no contexts)."""
    import torch
    import torch.nn.functional as F

    k, n, d = self.n_genes, pert_idx.shape[0], self.hidden_dim
    h_p = self._set_embeddings(pert_idx, h_gene, None)
    bn = self.bn_post
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    g = (h_gene - bn.running_mean) * scale + bn.bias
    hp = h_p * scale
    lin1, bn1, _, lin2, bn_last = self.post_mlp
    s1 = bn1.weight / torch.sqrt(bn1.running_var + bn1.eps)
    w1 = lin1.weight * s1[:, None]
    b1 = (lin1.bias - bn1.running_mean) * s1 + bn1.bias
    s_last = bn_last.weight / torch.sqrt(bn_last.running_var + bn_last.eps)
    shift = bn_last.bias - bn_last.running_mean * s_last
    heads = [(self.w1, self.b1)] + ([(self.w_unc, self.b_unc)] if self.uncertainty else [])
    folded = [(w * s_last.unsqueeze(1), b + (shift.unsqueeze(1) * w).sum(1, keepdim=True)) for w, b in heads]
    outs = [h_gene.new_empty(k, n) for _ in heads]
    step = max(1, int(block_rows) // max(n, 1))
    for lo in range(0, k, step):
        hi = min(k, lo + step)
        h = (g[lo:hi, None, :] + hp[None, :, :]).relu_().reshape(-1, d)
        h = F.linear(F.linear(h, w1, b1).relu_(), lin2.weight, lin2.bias).reshape(hi - lo, n, d)
        for out, (w, b) in zip(outs, folded, strict=True):
            out[lo:hi] = torch.baddbmm(b[lo:hi], h, w[lo:hi]).squeeze(-1)
    return self._decode(outs[0]), (outs[1].T if self.uncertainty else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gi_map_ab.json")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    import pertpy_gnn as pg
    from pertpy_gnn.gears import GEARS
    from pertpy_gnn.tl._gi import DEFAULT_GI_THRESHOLDS, _numba_threads, _score_table

    load_start = os.getloadavg()
    adata = pg.datasets.simulate_perturbseq(
        n_genes=5000, n_singles=105, n_doubles=131, n_cells_per_perturbation=20, n_control=1000,
        counts_layer=False, seed=0,
    )  # fmt: skip
    pg.pp.parse_perturbations(adata, perturbation_key="condition")
    pg.pp.split_perturbations(adata, kind="simulation", seed=0)
    pg.pp.rank_de_genes(adata)
    pg.pp.go_graph(adata)
    pg.pp.coexpression_graph(adata)
    GEARS.setup_anndata(adata)
    model = GEARS(adata, uncertainty=True)
    genes = sorted(p for p in adata.uns["simulation"]["true_delta"].index if p != "control" and "+" not in p)
    pairs = list(itertools.combinations(genes, 2))
    sets = [(g,) for g in genes] + pairs
    m = model.module
    m.eval()
    idx = model._pert_index(sets)
    cpu = {"predict_before": 0.0, "predict_now": 0.0, "scoring_before": 0.0, "scoring_now": 0.0}
    with torch.inference_mode():
        h_gene = m.gene_states()
        for _ in range(args.rounds):
            for name, fn in (
                ("predict_before", lambda b: folded_before(m, b, h_gene)),
                ("predict_now", lambda b: m.predict_delta(b, h_gene=h_gene)),
            ):
                c0 = cpu_seconds()
                out = torch.cat([fn(idx[s : s + 512])[0] for s in range(0, len(sets), 512)]).numpy()
                cpu[name] += cpu_seconds() - c0
                if name == "predict_before":
                    before = out
            pred_diff = float(np.abs(out - before).max())
    delta = out.astype(np.float32)
    rows = {"+".join(s): i for i, s in enumerate(sets)}
    use = pairs[: args.pairs]
    opts = {"n_subsamples": 10_000, "subsample_size": 1000, "n_projections": 4, "model_fit": "pearson"}
    warm = np.random.default_rng(0).random((3, 2, 50))
    pg.tl._gi.distance_correlations(*warm)
    pg.tl._gi.theil_sen_no_intercept(*warm, n_subsamples=30, subsample_size=10)
    with _numba_threads(1):
        for _ in range(args.rounds):
            for name, engine in (("scoring_before", "numpy"), ("scoring_now", "numba")):
                c0 = cpu_seconds()
                df = _score_table(delta, rows, use, thresholds=None, seed=0, engine=engine, **opts)
                cpu[name] += cpu_seconds() - c0
                if engine == "numpy":
                    ref = df
    cols = ("c_a", "c_b", "magnitude", "model_fit", "similarity", "equality_of_contribution")
    record = {
        "benchmark": "gi_map_ab",
        "sets": len(sets),
        "n_genes_measured": int(adata.n_vars),
        "pairs_scored": len(use),
        "rounds": args.rounds,
        "threads": 1,
        "cpu_seconds_per_round": {k: round(v / args.rounds, 2) for k, v in cpu.items()},
        "prediction_max_abs_diff": pred_diff,
        "prediction_max_abs_value": float(np.abs(before).max()),
        "score_max_abs_diff": {
            c: float(np.nanmax(np.abs(df[c].to_numpy() - ref[c].to_numpy()))) for c in cols
        },
        "subtype_calls_changed": int(sum((df[t] != ref[t]).sum() for t in DEFAULT_GI_THRESHOLDS)),
        "machine": machine(load_start),
        "versions": versions("pertpy-gnn", "numpy", "numba", "torch"),
    }
    write_record(record, args.out)


if __name__ == "__main__":
    main()
