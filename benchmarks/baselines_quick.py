"""The linear baselines of issue 11 on the Norman subset: the paper's linear_embedding against the improved ones.

Same cells and simulation splits as ``compare_accuracy.py`` (perturbations with a gene outside the GO
annotations dropped, i.e. IER5L; ``pg.pp.split_perturbations(kind='simulation', seed=s)``), no GEARS:
every baseline is fitted on the training cells and scored by ``pg.tl.evaluate`` with the paper's and the
calibrated metrics. Results: ``benchmarks/results/baselines_quick.{json,md}``.

Usage (from the repository root)::

    .venv/bin/python benchmarks/baselines_quick.py --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NORMAN = ROOT.parent / "shared" / "data" / "perturbation" / "norman2019_k562_subset.h5ad"
MODELS = {
    "no_change": ("no_change", {}),
    "train_mean": ("train_mean", {}),
    "additive": ("additive", {}),
    "linear_coexpression": ("linear_coexpression", {}),
    "linear_embedding_paper": ("linear_embedding", {"ridge": 0.1, "normalize": False}),
    "linear_embedding": ("linear_embedding", {}),
    "linear_go": ("linear_embedding", {"perturbation_embedding": "go"}),
    "linear_coexpr_emb": ("linear_embedding", {"perturbation_embedding": "coexpression"}),
}
METRICS = [
    "mse_top20_normalized",
    "pearson_delta",
    "mse_de_weighted",
    "r2_delta_de_weighted",
    "pearson_delta_centroid",
    "perturbation_discrimination",
    "de_overlap_top20",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "baselines_quick.json")
    args = p.parse_args()
    if not NORMAN.is_file():
        raise FileNotFoundError(
            f"{NORMAN} is absent (the real data folder is only on the project's machines)"
        )
    import anndata as ad
    import pandas as pd

    import pertpy_gnn as pg

    ann = pg.datasets.go_annotations()
    adata = pg.pp.parse_perturbations(
        ad.read_h5ad(NORMAN),
        perturbation_key="condition",
        gene_universe=set(ann["gene"]),
        drop_unknown=True,
        copy=True,
    )
    pg.pp.rank_de_genes(adata)
    pg.pp.go_graph(adata, annotations=ann)
    frames, fits = [], []
    for seed in args.seeds:
        pg.pp.split_perturbations(adata, kind="simulation", seed=seed, overwrite=True)
        pg.pp.coexpression_graph(adata, overwrite=True)
        models = {}
        for name, (kind, kw) in MODELS.items():
            c0 = time.process_time()
            models[name] = pg.tl.fit_baseline(adata, kind, name=name, **kw)
            fits.append(
                {
                    "seed": seed,
                    "model": name,
                    "fit_cpu_s": time.process_time() - c0,
                    "cv_alpha": getattr(models[name], "cv_alpha", None),
                }
            )
        df = pg.tl.evaluate(adata, models, predict_kwargs={"n_control": None}, overwrite=True)
        frames.append(df.assign(seed=seed))
    res = pd.concat(frames, ignore_index=True)
    per_seed = res.groupby(["model", "subgroup", "metric", "seed"])["value"].mean().reset_index()
    all_seed = res.groupby(["model", "metric", "seed"])["value"].mean().reset_index().assign(subgroup="all")
    per_seed = pd.concat([per_seed, all_seed])
    agg = (
        per_seed.groupby(["model", "subgroup", "metric"])["value"].agg(["mean", "std", "count"]).reset_index()
    )
    fits = pd.DataFrame(fits)
    unavailable = (
        res[res["metric"] == "mse_all"]
        .groupby("model")["available"]
        .apply(lambda s: int((~s).sum()))
        .to_dict()
    )

    lines = [
        "### Linear baselines on the Norman subset: the paper's linear_embedding and the improved ones\n",
        f"Simulation splits, seeds {args.seeds}; every model fitted on the training cells and scored by "
        "`pg.tl.evaluate` (all control cells as the base). Values: mean over the perturbations of a subgroup, "
        "then mean ± SD over seeds. `linear_embedding_paper` is the paper's fit (`ridge=0.1`, no "
        "normalization); `linear_embedding` the new default (cross-validated ridge, 1-SE rule, unit-norm gene "
        "embeddings, PCA perturbation embedding); `linear_go` / `linear_coexpr_emb` the same with spectral "
        "embeddings of the GO / co-expression graph. `additive` covers combo_seen2 only (NaN elsewhere). "
        "Lower is better for `mse_*`, higher for the rest; `perturbation_discrimination` 0.5 is chance.\n",
        "Fallbacks (perturbation x seed rows with `available == False`): "
        + ", ".join(f"{k} {v}" for k, v in unavailable.items() if v)
        + ".\n",
    ]
    subs = ["all"] + sorted(s for s in agg.subgroup.unique() if s != "all")
    for metric in METRICS:
        lines.append(f"\n#### {metric}\n")
        lines.append("| model | " + " | ".join(subs) + " |")
        lines.append("|---" * (len(subs) + 1) + "|")
        for m in MODELS:
            cells = []
            for s in subs:
                r = agg[(agg.model == m) & (agg.subgroup == s) & (agg.metric == metric)]
                cells.append(
                    ""
                    if r.empty or r["count"].iloc[0] == 0
                    else f"{r['mean'].iloc[0]:.3g} ± {r['std'].iloc[0]:.2g}"
                )
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    alpha = fits.dropna(subset=["cv_alpha"]).pivot(index="model", columns="seed", values="cv_alpha")
    lines.append(
        "\n#### Chosen ridge strength alpha per seed (1e3: W = 0, the model is b, the mean training change)\n"
    )
    lines.append("| model | " + " | ".join(str(s) for s in alpha.columns) + " |")
    lines.append("|---" * (len(alpha.columns) + 1) + "|")
    for m, row in alpha.iterrows():
        lines.append(f"| {m} | " + " | ".join(f"{v:.0e}" for v in row) + " |")
    cpu = fits.groupby("model")["fit_cpu_s"].mean()
    lines.append(
        "\nFit CPU seconds per split (mean over seeds): "
        + ", ".join(f"{m} {cpu[m]:.2f}" for m in MODELS)
        + ".\n"
    )
    record = {
        "benchmark": "baselines_quick",
        "seeds": args.seeds,
        "summary": agg.to_dict(orient="records"),
        "fits": fits.to_dict(orient="records"),
        "unavailable": unavailable,
        "machine": {"python": platform.python_version()},
        "command": " ".join(sys.argv),
    }
    args.out.write_text(json.dumps(record, indent=1, default=float).replace("NaN", "null") + "\n")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}", file=sys.stderr)


if __name__ == "__main__":
    main()
