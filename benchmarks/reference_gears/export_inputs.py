"""Write one of our AnnData, and our GO prior knowledge, in the input format of the reference GEARS.

Runs in the project's own environment (``.venv``), never in the reference's. The reference
(PyPI ``cell-gears``) then reads everything offline from the output folder
(``run_reference.py --data-dir OUT``):

``ref_input.h5ad``
    obs ``condition`` (``A+ctrl``, ``A+B``, ``ctrl``) and ``cell_type``, var ``gene_name``, X sparse CSR.
``gene2go_all.pkl``
    ``{gene: set(GO ids)}``, read by ``PertData.__init__`` (it would download it otherwise).
``essential_all_data_pert_genes.pkl``
    list of the genes of the perturbation graph, read by ``PertData.set_pert_genes``.
``go_essential_all/go_essential_all.csv``
    the GO perturbation graph (source, target, importance = Jaccard index), read by
    ``utils.get_similarity_network``; the reference keeps the top ``k + 1`` sources of each target.
``doubles.txt`` / ``gi_doubles.txt``
    the double perturbations to predict and to score for genetic interactions (``A+B`` per line),
    the same lists for both tools.
``split_dict.pkl``
    only when the data has ``obs['pg_split']``: our split as the reference's custom split.
``manifest.json``
    what was written, from what, and which perturbations had to be dropped.

Pickles are benchmark inputs written at run time, never shipped with the package.

Usage (from the repository root)::

    .venv/bin/python benchmarks/reference_gears/export_inputs.py norman --out benchmarks/work/ref_data/norman
    .venv/bin/python benchmarks/reference_gears/export_inputs.py simulated --out benchmarks/work/ref_data/sim
    .venv/bin/python benchmarks/reference_gears/export_inputs.py tiny --out benchmarks/work/ref_data/tiny
    .venv/bin/python benchmarks/reference_gears/export_inputs.py FILE.h5ad --perturbation-key condition --out ...
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import pickle
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

import pertpy_gnn as pg
from pertpy_gnn._constants import CONTROL, DELIM, PERT_KEY, SPLIT_KEY

logger = logging.getLogger("export_inputs")

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"
NORMAN = SHARED / "perturbation" / "norman2019_k562_subset.h5ad"


# --------------------------------------------------------------------------------------- inputs
def tiny_dataset(seed: int = 0) -> ad.AnnData:
    """A small synthetic screen (200 genes, 6 singles, 4 doubles) with synthetic GO annotations."""
    rng = np.random.default_rng(seed)
    genes = np.array([f"G{i:04d}" for i in range(200)])
    singles = list(genes[:6])
    doubles = ["G0000+G0001", "G0002+G0003", "G0000+G0004", "G0001+G0005"]
    labels = ["control"] * 120 + [c for p in singles + doubles for c in [p] * 30]
    base = rng.gamma(2.0, 1.0, size=genes.size)
    shift = np.ones((len(labels), genes.size))
    for i, lab in enumerate(labels):
        for g in lab.split("+"):
            if g != "control":
                shift[i, int(g[1:]) * 7 % genes.size : int(g[1:]) * 7 % genes.size + 10] *= 3.0
    counts = rng.poisson(base * shift).astype(np.float32)
    x = sp.csr_matrix(np.log1p(counts))
    terms = np.array([f"GO:{i:07d}" for i in range(40)])
    go = pd.DataFrame(
        [(g, t) for g in genes for t in rng.choice(terms, size=rng.integers(2, 6), replace=False)],
        columns=["gene", "go_id"],
    )
    adata = ad.AnnData(
        x, obs=pd.DataFrame({"condition": labels}, index=[f"c{i}" for i in range(len(labels))])
    )
    adata.var_names = genes
    adata.uns["pg_go_annotations"] = go
    return adata


def go_prior(
    adata: ad.AnnData, n_neighbors: int, threshold: float
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Our GO annotations (gene, go_id), our GO graph as the reference's edge list
    (source, target, importance), and the graph's params.

    Annotations: ``adata.uns['pg_go_annotations']`` (the simulator's synthetic genes) if present,
    else ``pg.datasets.go_annotations()``. The graph is ``pg.pp.go_graph`` itself, so both tools see
    the same edges: the reference keeps the top ``k + 1`` sources of each target, which are all of
    our ``k`` (we store no self-loop; its SGConv adds one of weight 1, as for its own self edge).
    """
    ann = adata.uns["pg_go_annotations"] if "pg_go_annotations" in adata.uns else pg.datasets.go_annotations()
    ann = pd.DataFrame(ann)[["gene", "go_id"]].dropna().astype(str).drop_duplicates()
    graph = pg.pp.go_graph(annotations=ann, n_neighbors=n_neighbors, threshold=threshold)
    nodes = np.asarray(graph["genes"]).astype(str)
    ei = np.asarray(graph["edge_index"])
    edges = pd.DataFrame(
        {
            "source": nodes[ei[0]],
            "target": nodes[ei[1]],
            "importance": np.asarray(graph["edge_weight"], np.float64),
        }
    )
    params = dict(graph["params"])
    params["source"] = (
        "adata.uns['pg_go_annotations']"
        if "pg_go_annotations" in adata.uns
        else "pg.datasets.go_annotations()"
    )
    return ann, edges, {"nodes": nodes.tolist(), **params}


# ------------------------------------------------------------------------------------ the export
def reference_condition(name: str) -> str | None:
    """Our canonical name -> the reference's condition; ``None`` where it has no form (> 2 genes)."""
    if name == CONTROL:
        return "ctrl"
    genes = name.split(DELIM)
    if len(genes) == 1:
        return f"{genes[0]}+ctrl"
    return name if len(genes) == 2 else None


def choose_doubles(
    data_doubles: list[str], perturbed: list[str], nodes: list[str], n: int, seed: int
) -> list[str]:
    """``n`` doubles ``A+B`` (sorted genes, all graph nodes): the data's doubles, then every pair of
    perturbed genes, then random pairs of graph nodes."""
    rng = np.random.default_rng(seed)
    out = list(dict.fromkeys(data_doubles))
    pairs = [f"{a}{DELIM}{b}" for a, b in itertools.combinations(sorted(perturbed), 2)]
    rng.shuffle(pairs)
    out += [p for p in pairs if p not in set(out)]
    nodes = np.asarray(sorted(nodes))
    seen = set(out)
    while len(out) < n and nodes.size > 1:
        a, b = sorted(rng.choice(nodes, 2, replace=False))
        if f"{a}{DELIM}{b}" not in seen:
            seen.add(f"{a}{DELIM}{b}")
            out.append(f"{a}{DELIM}{b}")
    return out[:n]


def export(
    adata: ad.AnnData,
    out: Path,
    *,
    perturbation_key: str = "condition",
    cell_type: str = "cell",
    n_neighbors: int = 20,
    go_threshold: float = 0.0,
    n_predict: int = 500,
    n_gi: int = 10,
    split: str | None = "simulation",
    seed: int = 0,
    source: str = "",
) -> dict:
    """Write ``adata`` and its GO prior knowledge into ``out`` in the reference's format.

    With ``split`` (a ``pg.pp.split_perturbations`` kind; unless the data has ``obs['pg_split']``
    already), the reference trains on our split (its custom split): both tools see the same cells.
    """
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    ann, edges, graph = go_prior(adata, n_neighbors, go_threshold)
    nodes = graph.pop("nodes")
    node_set = set(nodes)

    parsed = pg.pp.parse_perturbations(
        adata, perturbation_key=perturbation_key, gene_universe=node_set, drop_unknown=True, copy=True
    )
    names = parsed.obs[PERT_KEY].astype(str)
    cond = names.map({n: reference_condition(n) for n in names.unique()})
    unsupported = sorted(names[cond.isna()].unique())
    # the reference drops every perturbation with a gene outside its perturbation graph (load())
    outside = [n for n in names.unique() if n != CONTROL and not set(n.split(DELIM)) <= node_set]
    dropped_unknown = sorted(
        set(adata.obs[perturbation_key].astype(str)) - set(parsed.obs[perturbation_key].astype(str))
    )
    dropped_unknown += sorted(
        parsed.obs.loc[names.isin(outside).to_numpy(), perturbation_key].astype(str).unique()
    )
    keep = (cond.notna() & ~names.isin(outside)).to_numpy()
    if dropped_unknown:
        logger.warning("Dropping perturbations with genes outside the GO graph: %s", dropped_unknown)
    parsed = parsed[keep].copy()
    parsed.obs[PERT_KEY] = parsed.obs[PERT_KEY].cat.remove_unused_categories()
    cond = cond[keep]
    if split is not None and SPLIT_KEY not in parsed.obs:
        pg.pp.split_perturbations(parsed, kind=split, seed=seed)
    # our side of the comparison reads exactly these cells (and split)
    parsed.write_h5ad(out / "our_input.h5ad")

    x = parsed.X if sp.issparse(parsed.X) else sp.csr_matrix(parsed.X)
    ref = ad.AnnData(
        sp.csr_matrix(x, dtype=np.float32),
        obs=pd.DataFrame(
            {
                "condition": pd.Categorical(cond.to_numpy()),
                "cell_type": pd.Categorical(
                    parsed.obs["cell_type"].astype(str).to_numpy()
                    if "cell_type" in parsed.obs
                    else [cell_type] * parsed.n_obs
                ),
            },
            index=parsed.obs_names.astype(str),
        ),
        var=pd.DataFrame({"gene_name": parsed.var_names.astype(str)}, index=parsed.var_names.astype(str)),
    )
    if ref.obs["cell_type"].nunique() != 1:
        raise ValueError("The benchmark expects a single cell type (the reference splits DE by cell_type).")
    ref.write_h5ad(out / "ref_input.h5ad")

    gene2go = ann.groupby("gene")["go_id"].agg(set).to_dict()
    with open(out / "gene2go_all.pkl", "wb") as f:
        pickle.dump(gene2go, f)
    with open(out / "essential_all_data_pert_genes.pkl", "wb") as f:
        pickle.dump(list(nodes), f)
    (out / "go_essential_all").mkdir(exist_ok=True)
    edges.to_csv(out / "go_essential_all" / "go_essential_all.csv", index=False)

    conditions = [c for c in ref.obs["condition"].cat.categories if c != "ctrl"]
    data_doubles = [c for c in conditions if "ctrl" not in c.split("+")]
    data_singles = {c.split("+")[0] for c in conditions if c.endswith("+ctrl")}
    perturbed = sorted({g for c in conditions for g in c.split("+") if g != "ctrl"})
    doubles = choose_doubles(data_doubles, perturbed, nodes, n_predict, seed)
    both_singles = [d for d in data_doubles if set(d.split("+")) <= data_singles]
    gi = list(dict.fromkeys(both_singles + data_doubles + doubles))[:n_gi]
    (out / "doubles.txt").write_text("\n".join(doubles) + "\n")
    (out / "gi_doubles.txt").write_text("\n".join(gi) + "\n")

    has_split = SPLIT_KEY in parsed.obs
    if has_split:
        split = pd.DataFrame(
            {"condition": cond.to_numpy(), "split": parsed.obs[SPLIT_KEY].astype(str).to_numpy()}
        )
        per = split.drop_duplicates()
        if per["condition"].duplicated().any():
            raise ValueError(f"obs[{SPLIT_KEY!r}] assigns one perturbation to several splits.")
        set2conditions = {
            s: sorted(per.loc[per["split"] == s, "condition"]) for s in ["train", "val", "test"]
        }
        if "ctrl" not in set2conditions["train"]:
            set2conditions["train"].append("ctrl")
        with open(out / "split_dict.pkl", "wb") as f:
            pickle.dump(set2conditions, f)

    manifest = {
        "source": source,
        "n_cells": int(ref.n_obs),
        "n_genes": int(ref.n_vars),
        "n_perturbations": len(conditions),
        "n_singles": sum(c.endswith("+ctrl") for c in conditions),
        "n_doubles": len(data_doubles),
        "n_control": int((ref.obs["condition"] == "ctrl").sum()),
        "dropped_not_in_go_graph": dropped_unknown,
        "dropped_more_than_two_genes": unsupported,
        "go_graph": {"function": "pg.pp.go_graph", **graph},
        "n_annotated_genes": len(gene2go),
        "n_graph_nodes": len(nodes),
        "n_graph_edges": len(edges),
        "n_neighbors": n_neighbors,
        "n_predict_doubles": len(doubles),
        "n_gi_doubles": len(gi),
        "custom_split": has_split,
        "split": (
            {
                "kind": str(parsed.uns.get("pg_split", {}).get("kind", "given")),
                "seed": int(parsed.uns.get("pg_split", {}).get("seed", -1)),
                "cells": parsed.obs[SPLIT_KEY].astype(str).value_counts().to_dict(),
                "conditions": {k: len(v) for k, v in set2conditions.items()},
            }
            if has_split
            else "reference's own simulation split"
        ),
        "seed": seed,
        "export_seconds": round(time.perf_counter() - t0, 2),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def load(args) -> tuple[ad.AnnData, str]:
    if args.dataset == "norman":
        return ad.read_h5ad(NORMAN), str(NORMAN)
    if args.dataset == "tiny":
        return tiny_dataset(args.seed), "tiny synthetic (export_inputs.tiny_dataset)"
    if args.dataset == "simulated":
        kw = {
            "n_genes": args.n_genes,
            "n_singles": args.n_singles,
            "n_doubles": args.n_doubles,
            "n_cells_per_perturbation": args.cells_per_perturbation,
            "n_control": args.n_control,
            "seed": args.seed,
        }
        return pg.datasets.simulate_perturbseq(**kw), f"pg.datasets.simulate_perturbseq({kw})"
    return ad.read_h5ad(args.dataset), args.dataset


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dataset", help="'norman', 'simulated', 'tiny' or a path to an .h5ad")
    p.add_argument("--out", type=Path, required=True, help="folder to write (under benchmarks/work/)")
    p.add_argument("--perturbation-key", default="condition")
    p.add_argument(
        "--go-threshold", type=float, default=0.0, help="pg.pp.go_graph threshold (published code: 0.1)"
    )
    p.add_argument("--n-neighbors", type=int, default=20)
    p.add_argument("--n-predict", type=int, default=500)
    p.add_argument("--n-gi", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-genes", type=int, default=2000)
    p.add_argument("--n-singles", type=int, default=60)
    p.add_argument("--n-doubles", type=int, default=40)
    p.add_argument("--cells-per-perturbation", type=int, default=190)
    p.add_argument("--n-control", type=int, default=1000)
    p.add_argument(
        "--split",
        default="simulation",
        help="pg.pp.split_perturbations kind, or 'none' (reference's own split)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    adata, source = load(args)
    manifest = export(
        adata,
        args.out,
        perturbation_key=args.perturbation_key,
        go_threshold=args.go_threshold,
        n_neighbors=args.n_neighbors,
        n_predict=args.n_predict,
        n_gi=args.n_gi,
        split=None if args.split == "none" else args.split,
        seed=args.seed,
        source=source,
    )
    logger.info(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
