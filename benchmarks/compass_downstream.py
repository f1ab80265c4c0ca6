"""GeneCompass downstream benchmark on the real data of ../shared/data (CPU, about 15 minutes on 2 cores).

1. Pre-train a small GeneCompass (2 layers x 64, 4 heads, top 64 genes per cell, 60 epochs;
   ``--d-model``, ``--max-len``, ``--pretrain-epochs`` to change) on a
   small cross-species corpus of every real single-cell set at hand (labels never used): human immune
   cells (celltypist sample, counts), oligodendroglioma (Tirosh 2016, TPM), PBMC (pbmc68k_reduced
   ``.raw``, log1p), myoblasts (HSMM, FPKM, Ensembl ids), 500 training-split cells of the Norman
   subset (log1p), mouse dentate gyrus and pancreas (counts). Priors: TRRUST human GRN (a random
   half of the edges; the other half is held out for the GRN task), HGNC gene families (groups of
   <= 50 genes), co-expression pairs of the immune cells (r > 0.8 on non-zero values, genes
   expressed in >= 25% of the cells, pairs co-expressed in >= 30 cells). Held-out masked-token
   accuracy beside the same cells with their gene order shuffled.
2. Cell-type annotation, GeneCompass fine-tuned (whole encoder + linear head) and as a linear probe
   of the frozen cell embedding, each on both cell embeddings (species token, mean of gene tokens),
   beside a logistic regression on 50 principal components:
   - oligodendroglioma ``obs['cell_type']``: batches are the Smart-seq2 plates (cell id
     ``<patient>_P<plate>_<well>``); train on even-numbered plates, test on odd-numbered ones;
   - ``sc.datasets.pbmc68k_reduced()`` ``obs['bulk_labels']``: ``X`` holds scaled values of 765 genes,
     so cells are tokenized from ``.raw`` (log1p-normalized values of the same 765 genes,
     ``input_kind='log1p'``: ``expm1`` without re-normalizing, values relative to the corpus medians;
     each cell has ~250 expressed genes, the top ``--max-len`` become tokens). The set has no batch
     annotation: a stratified random 70/30 split (seed 0).
3. Cell-embedding geometry: median pairwise cosine (is every cell the same vector?) and the
   cell-type silhouette of the centred embedding, beside PCA of the expression.
4. GRN inference: cosine similarity of the static gene embeddings (averaged over the immune cells;
   raw as in the paper, and centered) scored by AUPRC against the held-out half of TRRUST, the prior
   half excluded from the candidates; beside the Pearson correlation of expression over the same
   cells and the GRN prior's own gene2vec embedding, on the same candidate pairs.
5. In-silico screen: overexpress each of the 300 most expressed genes to the cell's maximum in 30
   malignant oligodendroglioma cells, ranked by shift toward the oligodendrocytes; throughput, and
   the AUROC of the candidate-specific shift for the 30 candidates most up in the oligodendrocytes,
   for both cell embeddings and for the same network at random initialization.
6. GEARS with GeneCompass gene embeddings (frozen / fine-tuned, averaged over the Norman training
   cells) against plain GEARS on the same simulation split of the Norman subset, 3 seeds: top-20-DE
   MSE, Spearman of predicted vs true change, count of top-20 DE genes predicted in the wrong
   direction, beside the no-change, training-mean and additive baselines.

Run from the project root: ``.venv/bin/python benchmarks/compass_downstream.py`` (``--quick`` for a
smoke run). Writes ``benchmarks/results/compass_downstream.json`` and a summary ``.md`` beside it.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import tempfile
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp

import pertpy_gnn as pg

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "benchmarks" / "results" / "compass_downstream.json"


def _filter_genes(a: ad.AnnData, min_cells: int = 3) -> ad.AnnData:
    n = np.asarray((a.X > 0).sum(0)).ravel()
    return a[:, n >= min_cells].copy()


def load_data(norman_seed: int):
    """The real sets, genes expressed in >= 3 cells, and the Norman subset prepared for GEARS."""
    immune = _filter_genes(ad.read_h5ad(DATA / "scrna/celltypist_sample_cell_by_gene.h5ad"))
    oligo = ad.read_h5ad(DATA / "scrna/infercnvpy_oligodendroglioma_tirosh2016.h5ad")
    oligo.obs["plate"] = oligo.obs_names.str.rsplit("_", n=1).str[0]
    oligo = _filter_genes(oligo)
    pbmc = sc.datasets.pbmc68k_reduced()
    pbmc = ad.AnnData(
        sp.csr_matrix(pbmc.raw.X),
        obs=pbmc.obs[["bulk_labels"]].copy(),
        var=pd.DataFrame(index=pbmc.raw.var_names),
    )
    hsmm = _filter_genes(ad.read_h5ad(DATA / "scrna/hsmm_trapnell2014_fpkm.h5ad"))
    dentate = _filter_genes(ad.read_h5ad(DATA / "scrna/dentategyrus_100obs.h5ad"))
    pancreas = _filter_genes(ad.read_h5ad(DATA / "scrna/pancreas_50obs.h5ad"))

    norman = ad.read_h5ad(DATA / "perturbation/norman2019_k562_subset.h5ad")
    go = pg.datasets.go_annotations()
    perturbed = {g for c in norman.obs["condition"].unique() for g in c.split("+")} - {"control"}
    pg.pp.parse_perturbations(norman, perturbation_key="condition", gene_universe=set(go["gene"]) | perturbed)
    pg.pp.split_perturbations(norman, kind="simulation", seed=norman_seed)
    pg.pp.rank_de_genes(norman)
    pg.pp.go_graph(norman)
    pg.pp.coexpression_graph(norman)
    return {
        "immune": immune,
        "oligo": oligo,
        "pbmc": pbmc,
        "hsmm": hsmm,
        "dentate": dentate,
        "pancreas": pancreas,
        "norman": norman,
    }


def build_model(
    data: dict, tmp: Path, *, max_len: int, d_model: int, epochs: int, seed: int, accelerator: str
):
    gene_ids = pg.pp.gene_id_table(DATA / "gene_ids/celltypist_GENCODEv44_Gene_id2name.csv.gz")
    hsmm_symbols = pd.Index(data["hsmm"].var_names.str.split(".").str[0]).map(gene_ids).dropna()
    human = set(data["immune"].var_names) | set(data["oligo"].var_names) | set(data["pbmc"].var_names)
    human |= set(hsmm_symbols) | set(data["norman"].var_names)
    mouse = set(data["dentate"].var_names) | set(data["pancreas"].var_names)
    orth = pg.pp.mgi_orthologs(DATA / "orthologs/HOM_MouseHumanSequence.rpt.gz")
    rng = np.random.default_rng(seed)
    norman = data["norman"]
    norman_train = np.flatnonzero((norman.obs["pg_split"] == "train").to_numpy())
    norman_train = np.sort(rng.choice(norman_train, size=min(500, norman_train.size), replace=False))
    sources = [
        {"data": data["immune"], "name": "immune", "species": "human", "input_kind": "counts"},
        {"data": data["oligo"], "name": "oligodendroglioma", "species": "human", "input_kind": "counts"},
        {"data": data["pbmc"], "name": "pbmc68k_raw", "species": "human", "input_kind": "log1p"},
        {
            "data": data["hsmm"],
            "name": "hsmm",
            "species": "human",
            "input_kind": "counts",
            "gene_ids": gene_ids,
        },
        {"data": norman[norman_train], "name": "norman_train", "species": "human", "input_kind": "log1p"},
        {"data": data["dentate"], "name": "dentate_gyrus", "species": "mouse", "input_kind": "counts"},
        {"data": data["pancreas"], "name": "pancreas", "species": "mouse", "input_kind": "counts"},
    ]
    # two passes: tokenize with every gene, then keep the vocabulary of the genes that made it into a
    # cell's top max_len (the masked-id head over a 25k vocabulary would dominate the CPU time)
    keep = orth["class_key"].isin(orth.loc[orth["symbol"].isin(human | mouse), "class_key"])
    full = pg.pp.compass_vocab(orth[keep], human_genes=sorted(human), mouse_genes=sorted(mouse))
    first = pg.pp.compass_tokenize(sources, tmp / "corpus0", full, max_len=max_len, progress_bar=False)
    used = full.tokens[np.unique(first.read(np.arange(len(first)))[0])[1:]].astype(str)  # drop pad
    used = used[~np.isin(used, ["<human>", "<mouse>"])]
    mouse_only = np.char.startswith(used.astype(str), "mouse:")
    used_human = used[~mouse_only]
    classes = orth.loc[(orth["species"] == "human") & orth["symbol"].isin(used_human), "class_key"]
    vocab = pg.pp.compass_vocab(
        orth[orth["class_key"].isin(classes)],
        human_genes=sorted(used_human),
        mouse_genes=sorted(np.char.replace(used[mouse_only].astype(str), "mouse:", "")),
    )
    corpus = pg.pp.compass_tokenize(
        sources, tmp / "corpus", vocab, max_len=max_len, gene_medians=first.gene_medians, progress_bar=False
    )

    trrust = pg.pp.trrust_edges(DATA / "grn/trrust_rawdata.human.tsv")
    in_prior = rng.random(len(trrust)) < 0.5
    families = pg.pp.hgnc_gene_groups(DATA / "gene_families/hgnc_complete_set.txt.gz")
    immune = data["immune"]
    frequent = np.asarray((immune.X > 0).sum(0)).ravel() >= 0.25 * immune.n_obs  # keeps the pair search short
    coexpr = pg.pp.coexpression_pairs(
        immune[:, frequent], species="human", input_kind="counts", min_cells=30, seed=seed
    )
    priors = pg.pp.compass_priors(
        vocab,
        grn=trrust[in_prior],
        family=families,
        coexpression=coexpr,
        dim=16,
        epochs=2,
        max_group_size=50,
        seed=seed,
    )
    train, held = corpus.split(0.1, seed=seed)
    model = pg.tl.pretrain_compass(
        corpus,
        priors=priors,
        preset="cpu",
        n_layers=2,
        d_model=d_model,
        n_heads=4,
        max_epochs=epochs,
        batch_size=32,
        lr=2e-3,
        warmup=0.1,
        train_indices=train,
        accelerator=accelerator,
        seed=seed,
        progress_bar=False,
    )
    info = {
        "n_cells": len(corpus),
        "vocab_size": len(vocab),
        "vocab_size_before_trim": len(full),
        "max_len": max_len,
        "d_model": d_model,
        "epochs": epochs,
        "sources": corpus.sources[["name", "species", "n_cells", "n_mapped", "mean_tokens_per_cell"]].to_dict(
            "records"
        ),
        "priors": {k: repr(v) for k, v in priors.items()},
        "held_out_masked": model.evaluate(corpus, held),
        "held_out_masked_shuffled_context": model.evaluate(corpus, held, control="shuffled"),
    }
    return model, corpus, trrust[in_prior], trrust[~in_prior], info


def logreg_pca(x, labels: np.ndarray, tr: np.ndarray, te: np.ndarray, *, log: bool, seed: int) -> dict:
    """Logistic regression on 50 PCs of log-normalized expression (PCA on all cells, LR on training cells)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    a = ad.AnnData(sp.csr_matrix(x, dtype=np.float32))
    if log:
        sc.pp.normalize_total(a, target_sum=1e4)
        sc.pp.log1p(a)
    sc.pp.highly_variable_genes(a, n_top_genes=min(2000, a.n_vars))
    a = a[:, a.var["highly_variable"]].copy()
    sc.pp.scale(a, max_value=10)
    sc.pp.pca(a, n_comps=min(50, a.n_vars - 1), random_state=seed)
    clf = LogisticRegression(max_iter=5000).fit(a.obsm["X_pca"][tr], labels[tr])
    pred = clf.predict(a.obsm["X_pca"][te])
    return {
        "accuracy": float(accuracy_score(labels[te], pred)),
        "macro_f1": float(f1_score(labels[te], pred, average="macro")),
    }


def annotation(
    model,
    corpus,
    a: ad.AnnData,
    labels_key: str,
    test: np.ndarray,
    *,
    input_kind: str,
    epochs: int,
    seed: int,
) -> dict:
    labels = a.obs[labels_key].astype(str).to_numpy()
    tr, te = np.flatnonzero(~test), np.flatnonzero(test)
    out = {"n_train": int(tr.size), "n_test": int(te.size), "n_classes": int(np.unique(labels).size)}
    tok = {"species": "human", "input_kind": input_kind, "gene_medians": corpus, "progress_bar": False}
    runs = [
        (f"genecompass_{how}_{kind}", freeze, lr_, ep, how)
        for how in ("species", "mean")
        for kind, freeze, lr_, ep in (("finetuned", False, 3e-4, epochs), ("linear_probe", True, 0.0, 40))
    ]
    for name, freeze, lr_, ep, how in runs:
        t = time.time()
        pg.tl.annotate_compass(
            a,
            model,
            labels_key=labels_key,
            test=test,
            epochs=ep,
            lr=lr_,
            head_lr=3e-3,
            batch_size=16,
            freeze_encoder=freeze,
            cell_embedding=how,
            seed=seed,
            key_added=name,
            **tok,
        )
        r = a.uns[name]
        out[name] = {
            "accuracy": r["accuracy"],
            "macro_f1": r["macro_f1"],
            "train_accuracy": r["train_accuracy"],
            "seconds": round(time.time() - t, 1),
        }
    out["logreg_pca"] = logreg_pca(a.X, labels, tr, te, log=input_kind == "counts", seed=seed)
    out["best_by_macro_f1"] = max([r[0] for r in runs] + ["logreg_pca"], key=lambda k: out[k]["macro_f1"])
    return out


def embedding_geometry(model, corpus, a: ad.AnnData, labels_key: str, *, input_kind: str) -> dict:
    """Are cells told apart by the embedding? Pairwise cosines (raw) and cell-type silhouettes (centred)."""
    from sklearn.metrics import silhouette_score

    labels = a.obs[labels_key].astype(str).to_numpy()
    out = {}
    for how in ("species", "mean"):
        b = a.copy()
        pg.tl.embed_compass(
            b,
            model,
            genes=False,
            cell_embedding=how,
            species="human",
            input_kind=input_kind,
            gene_medians=corpus,
            progress_bar=False,
        )
        z = b.obsm["X_compass"].astype(np.float64)
        u = z / np.linalg.norm(z, axis=1, keepdims=True)
        cos = (u @ u.T)[np.triu_indices(len(u), 1)]
        out[how] = {
            "pairwise_cos_median": float(np.median(cos)),
            "pairwise_cos_min": float(cos.min()),
            "silhouette_cell_type": float(silhouette_score(z - z.mean(0), labels, metric="cosine")),
        }
    x = a.copy()
    if input_kind == "counts":
        sc.pp.normalize_total(x, target_sum=1e4)
        sc.pp.log1p(x)
    sc.pp.pca(x, n_comps=50, random_state=0)
    out["pca50_expression"] = {
        "silhouette_cell_type": float(silhouette_score(x.obsm["X_pca"], labels, metric="cosine"))
    }
    return out


def grn(
    model, corpus, immune: ad.AnnData, prior_edges: pd.DataFrame, held_edges: pd.DataFrame, seed: int
) -> dict:
    a = immune.copy()
    pg.tl.embed_compass(
        a, model, species="human", input_kind="counts", gene_medians=corpus, progress_bar=False
    )
    n_cells = a.uns["pg_compass_gene"]["n_cells"]
    emb = a[:, n_cells >= 5].copy()  # genes among the tokens of >= 5 cells
    out = {"n_genes_embedded": int(emb.n_vars), "threshold": 0.4}
    for name, center in (("genecompass", False), ("genecompass_centered", True)):
        out[name] = pg.tl.grn_auprc(emb, held_edges, exclude=prior_edges, center=center)
        pg.tl.compass_grn(emb, threshold=0.4, center=center, overwrite=True)
        out[name]["n_edges_at_threshold"] = emb.uns["pg_compass_grn"]["n_edges"]
    # baselines on the same genes and candidate pairs
    x = emb.X.toarray().astype(np.float64)
    x = np.log1p(x / np.maximum(np.asarray(immune.X.sum(1)).ravel()[:, None], 1) * 1e4)
    base = emb.copy()
    base.varm["pg_compass_gene"] = (x - x.mean(0)).T  # cosine of centered profiles = Pearson r
    out["pearson_expression"] = pg.tl.grn_auprc(base, held_edges, exclude=prior_edges)
    prior = model.module.prior_grn.cpu().numpy() if hasattr(model.module, "prior_grn") else None
    if prior is not None:
        ids = model.vocab.lookup(emb.var_names, "human")
        p = prior[ids].astype(np.float64)
        none = np.linalg.norm(p, axis=1) == 0
        p[none] = np.random.default_rng(seed).normal(
            size=(int(none.sum()), p.shape[1])
        )  # uncovered genes: random
        base.varm["pg_compass_gene"] = p
        out["grn_prior_gene2vec"] = pg.tl.grn_auprc(base, held_edges, exclude=prior_edges)
        out["grn_prior_gene2vec"]["n_genes_uncovered"] = int(none.sum())
    return out


def screen(model, corpus, oligo: ad.AnnData, *, n_cells: int, n_genes: int, seed: int) -> dict:
    """In-silico screen: overexpress each candidate in malignant cells, ranked by shift toward oligodendrocytes.

    Throughput, and a sanity check with a known direction: the 30 candidates most up in the
    oligodendrocytes against the malignant cells (Welch t on log-normalized expression) should rank
    above the others; AUROC of ``specific_shift`` for these markers (0.5 = no better than chance).
    """
    import torch
    from sklearn.metrics import roc_auc_score

    a = oligo.copy()
    rng = np.random.default_rng(seed)
    malignant = a.obs["cell_type"].str.startswith("malignant").to_numpy()
    target = (a.obs["cell_type"] == "Oligodendrocytes (non-malignant)").to_numpy()
    cells = np.sort(
        rng.choice(np.flatnonzero(malignant), size=min(n_cells, int(malignant.sum())), replace=False)
    )
    genes = a.var_names[np.argsort(-np.asarray(a.X.mean(0)).ravel())]
    genes = genes[model.vocab.lookup(genes, "human") >= 0][:n_genes]
    x = a[:, genes].copy()
    sc.pp.normalize_total(x, target_sum=1e4)  # of the candidates only: a ranking, not absolute levels
    sc.pp.log1p(x)
    m = np.asarray(x.X.todense() if sp.issparse(x.X) else x.X, dtype=np.float64)
    t_, s_ = m[target], m[malignant]
    welch = (t_.mean(0) - s_.mean(0)) / np.sqrt(
        t_.var(0, ddof=1) / len(t_) + s_.var(0, ddof=1) / len(s_) + 1e-12
    )
    markers = set(np.asarray(genes)[np.argsort(-welch)[:30]])
    out = {"n_cells": int(cells.size), "n_candidates": int(len(genes)), "n_markers": len(markers)}
    # control: the same network at random initialization (its fixed prior embeddings kept): how much of
    # the marker ranking comes from the token edit itself rather than from what pre-training learned
    untrained = copy.deepcopy(model)
    torch.manual_seed(seed)
    untrained.module.apply(untrained.module._init)
    for how, m in (("species", model), ("mean", model), ("mean_random_init", untrained)):
        t = time.time()
        df = pg.tl.in_silico_screen(
            a,
            m,
            target=("cell_type", "Oligodendrocytes (non-malignant)"),
            cells=cells,
            candidates=list(genes),
            mode="overexpress",
            level="max",
            cell_embedding=how.removesuffix("_random_init"),
            species="human",
            input_kind="counts",
            gene_medians=corpus,
            batch_size=256,
            progress_bar=False,
            key_added=f"screen_{how}",
        )
        sec = time.time() - t
        n = a.uns[f"screen_{how}"]["n_variants"]
        is_marker = df.index.isin(list(markers))
        out[how] = {
            "n_variants": int(n),
            "seconds": round(sec, 1),
            "variants_per_second": round(n / sec, 1),
            "mean_target_shift": float(df["target_shift"].mean()),
            "sd_specific_shift": float(df["specific_shift"].std()),
            "n_z_above_3": int((df["z"] > 3).sum()),
            "n_z_below_-3": int((df["z"] < -3).sum()),
            "marker_auroc": float(roc_auc_score(is_marker, df["specific_shift"])),
            "markers_in_top30": int(is_marker[:30].sum()),
            "top10": df.head(10)[["target_shift", "specific_shift", "z"]]
            .round(6)
            .reset_index()
            .to_dict("records"),
        }
    return out


def gears(model, corpus, norman: ad.AnnData, *, epochs: int, seed: int, n_seeds: int = 3) -> dict:
    """Plain GEARS against GEARS with GeneCompass gene embeddings (frozen / fine-tuned), ``n_seeds`` seeds each."""
    t = time.time()
    e = pg.tl.compass_gene_embeddings(
        model,
        norman,
        cells=("pg_split", "train"),
        species="human",
        input_kind="log1p",
        gene_medians=corpus,
        progress_bar=False,
    )
    covered = np.isfinite(e).all(1)
    out = {
        "n_genes": int(norman.n_vars),
        "n_genes_with_compass_embedding": int(covered.sum()),
        "epochs": epochs,
        "seeds": [seed + i for i in range(n_seeds)],
    }
    metrics = ["mse_top20", "mse_top20_normalized", "spearman_delta", "spearman_delta_top20", "pearson_delta"]
    rows = []
    baselines = {
        "no_change": pg.tl.fit_baseline(norman, "no_change"),
        "train_mean": pg.tl.fit_baseline(norman, "train_mean"),
        "additive": pg.tl.fit_baseline(norman, "additive"),
    }
    for s_ in out["seeds"]:
        models = {
            "GEARS": pg.tl.train_gears(norman, max_epochs=epochs, seed=s_, progress_bar=False, overwrite=True)
        }
        for name, freeze in (("GEARS+GeneCompass (frozen)", True), ("GEARS+GeneCompass (fine-tuned)", False)):
            m = pg.tl.compass_gears(norman, e, freeze=freeze, seed=s_)
            m.train(max_epochs=epochs, progress_bar=False)
            models[name] = m
        if s_ == seed:
            models.update(baselines)  # deterministic: evaluated once
        df = pg.tl.evaluate(norman, models, predict_kwargs={"n_control": None}, overwrite=True)
        wide = df.set_index(["model", "perturbation", "metric"])["value"].unstack("metric")
        for name in models:
            w = wide.loc[name]
            if (
                w["mse_top20"].notna().sum() == 0
            ):  # e.g. additive: no test double has both singles in training
                rows.append({"model": name, "seed": s_})
                continue
            rows.append(
                {
                    "model": name,
                    "seed": s_,
                    **{k: float(w[k].mean()) for k in metrics},
                    "wrong_direction_top20_count": float((w["frac_opposite_direction_top20"] * 20).sum()),
                    "n_perturbations_scored": int(w["mse_top20"].notna().sum()),
                }
            )
        out["n_test_perturbations"] = int(wide.loc["GEARS"].shape[0])
    res = pd.DataFrame(rows)
    for name, g in res.groupby("model", sort=False):
        if g["mse_top20"].isna().all():
            out[name] = "not applicable to any test perturbation of this split"
            continue
        keys = [*metrics, "wrong_direction_top20_count"]
        out[name] = {k: float(g[k].mean()) for k in keys}
        out[name].update({f"{k}_sd": float(g[k].std(ddof=1)) if len(g) > 1 else 0.0 for k in keys})
        out[name]["n_seeds"] = len(g)
        out[name]["n_perturbations_scored"] = int(g["n_perturbations_scored"].iloc[0])
    out["seconds"] = round(time.time() - t, 1)
    return out


def markdown(result: dict) -> str:
    """Summary tables of a result (written next to the JSON; the docs' Benchmarks page includes it)."""
    pre = result["pretraining"]
    lines = [
        f"Pre-training: {pre['n_cells']} cells (7 real sets, human + mouse), vocabulary {pre['vocab_size']}, "
        f"top {pre['max_len']} genes, d={pre['d_model']}, {pre['epochs']} epochs, "
        f"{result['args']['accelerator']}; {result['seconds']['total']:.0f} s in all.",
        "",
        "| held-out masked tokens | top-1 | top-10 | value MSE |",
        "|---|---|---|---|",
    ]
    for name, key in (
        ("trained", "held_out_masked"),
        ("same cells, gene order shuffled", "held_out_masked_shuffled_context"),
    ):
        r = pre[key]
        lines.append(f"| {name} | {r['accuracy']:.3f} | {r['accuracy_top10']:.3f} | {r['value_mse']:.3f} |")
    lines += ["", "**Cell-type annotation** (held-out cells; best macro-F1 in bold)", ""]
    lines += ["| set | method | accuracy | macro-F1 |", "|---|---|---|---|"]
    for ds, r in result["annotation"].items():
        for k, v in r.items():
            if isinstance(v, dict) and "macro_f1" in v:
                f1 = f"**{v['macro_f1']:.3f}**" if k == r["best_by_macro_f1"] else f"{v['macro_f1']:.3f}"
                lines.append(f"| {ds} | {k} | {v['accuracy']:.3f} | {f1} |")
    lines += [
        "",
        "**Cell-embedding geometry** (median pairwise cosine; cell-type silhouette, centred, cosine)",
        "",
    ]
    lines += ["| set | embedding | median cosine | silhouette |", "|---|---|---|---|"]
    for ds, r in result["embedding_geometry"].items():
        for k, v in r.items():
            cos = f"{v['pairwise_cos_median']:.6f}" if "pairwise_cos_median" in v else ""
            lines.append(f"| {ds} | {k} | {cos} | {v['silhouette_cell_type']:.3f} |")
    sc_ = result["screen"]
    lines += [
        "",
        f"**In-silico screen**: {sc_['n_candidates']} candidates overexpressed in {sc_['n_cells']} malignant cells, "
        f"toward the oligodendrocytes; the {sc_['n_markers']} candidates most up in the oligodendrocytes are the "
        "markers (AUROC 0.5 = chance).",
        "",
        "| cell embedding | variants / s | mean raw shift | SD of specific shift | genes z > 3 | genes z < -3 | marker AUROC | markers in top 30 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for how in ("species", "mean", "mean_random_init"):
        v = sc_[how]
        lines.append(
            f"| {how} | {v['variants_per_second']:.0f} | {v['mean_target_shift']:.2e} | {v['sd_specific_shift']:.2e} | "
            f"{v['n_z_above_3']} | {v['n_z_below_-3']} | {v['marker_auroc']:.3f} | {v['markers_in_top30']} |"
        )
    g = result["grn"]
    lines += ["", f"**GRN** ({g['n_genes_embedded']} genes; held-out TRRUST edges)", ""]
    lines += ["| scores | AUPRC | random | ratio |", "|---|---|---|---|"]
    for k, v in g.items():
        if isinstance(v, dict):
            lines.append(f"| {k} | {v['auprc']:.4f} | {v['random_auprc']:.4f} | {v['auprc_ratio']:.1f} |")
    ge = result["gears"]
    lines += [
        "",
        f"**GEARS with GeneCompass gene embeddings** (Norman subset, simulation split, {ge['epochs']} epochs; "
        f"{ge['n_genes_with_compass_embedding']} of {ge['n_genes']} genes embedded)",
        "",
    ]
    lines += [
        f"Mean (SD) over seeds {ge['seeds']} for the GEARS models; the baselines are deterministic. "
        "Raw MSE is the mean top-20-DE MSE over the test perturbations; normalized is the mean of each "
        "perturbation's MSE divided by no change's.",
        "",
        "| model | top-20 DE MSE | normalized (no change = 1) | Spearman delta | wrong direction (top 20, total) |",
        "|---|---|---|---|---|",
    ]
    for k, v in ge.items():
        if isinstance(v, dict):
            sd = {
                m: f" ({v[m + '_sd']:.3f})" if v.get("n_seeds", 1) > 1 else ""
                for m in ("mse_top20", "mse_top20_normalized", "spearman_delta")
            }
            lines.append(
                f"| {k} | {v['mse_top20']:.4f}{sd['mse_top20']} | {v['mse_top20_normalized']:.3f}{sd['mse_top20_normalized']} | "
                f"{v['spearman_delta']:.3f}{sd['spearman_delta']} | {v['wrong_direction_top20_count']:.0f} |"
            )
        elif isinstance(v, str) and k not in ("seconds",):
            lines.append(f"| {k} | {v} | | | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pretrain-epochs", type=int, default=60)
    p.add_argument("--finetune-epochs", type=int, default=10)
    p.add_argument("--gears-epochs", type=int, default=15)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--quick", action="store_true", help="tiny smoke run (1 epoch each); results are not meaningful"
    )
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    if args.quick:
        args.pretrain_epochs = args.finetune_epochs = args.gears_epochs = 1
    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("pertpy_gnn").setLevel(logging.WARNING)

    timings: dict[str, float] = {}
    result: dict = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    t0 = t = time.time()
    data = load_data(args.seed)
    timings["load_and_prepare"] = time.time() - t
    with tempfile.TemporaryDirectory() as tmp:
        t = time.time()
        model, corpus, prior_edges, held_edges, info = build_model(
            data,
            Path(tmp),
            max_len=args.max_len,
            d_model=args.d_model,
            epochs=args.pretrain_epochs,
            seed=args.seed,
            accelerator=args.accelerator,
        )
        model.module.to("cpu")
        timings["pretrain"] = time.time() - t
        result["pretraining"] = info
        print("pretraining:", json.dumps(info["held_out_masked"]), flush=True)

        t = time.time()
        oligo = data["oligo"]
        plate = oligo.obs["plate"].str.extract(r"P(\d+)$")[0].astype(int).to_numpy()
        result["annotation"] = {
            "oligodendroglioma": {
                "split": "train on even-numbered plates, test on odd-numbered plates",
                **annotation(
                    model,
                    corpus,
                    oligo,
                    "cell_type",
                    plate % 2 == 1,
                    input_kind="counts",
                    epochs=args.finetune_epochs,
                    seed=args.seed,
                ),
            }
        }
        pbmc = data["pbmc"]
        from sklearn.model_selection import train_test_split

        _, te = train_test_split(
            np.arange(pbmc.n_obs), test_size=0.3, stratify=pbmc.obs["bulk_labels"], random_state=args.seed
        )
        test = np.zeros(pbmc.n_obs, dtype=bool)
        test[te] = True
        result["annotation"]["pbmc68k_reduced"] = {
            "split": "stratified random 70/30 (no batch annotation); tokenized from .raw (765 genes, log1p)",
            **annotation(
                model,
                corpus,
                pbmc,
                "bulk_labels",
                test,
                input_kind="log1p",
                epochs=args.finetune_epochs,
                seed=args.seed,
            ),
        }
        timings["annotation"] = time.time() - t
        print("annotation:", json.dumps(result["annotation"], default=str), flush=True)

        t = time.time()
        result["embedding_geometry"] = {
            "oligodendroglioma": embedding_geometry(model, corpus, oligo, "cell_type", input_kind="counts"),
            "pbmc68k_reduced": embedding_geometry(model, corpus, pbmc, "bulk_labels", input_kind="log1p"),
        }
        timings["embedding_geometry"] = time.time() - t
        print("embedding geometry:", json.dumps(result["embedding_geometry"]), flush=True)

        t = time.time()
        result["grn"] = grn(model, corpus, data["immune"], prior_edges, held_edges, args.seed)
        timings["grn"] = time.time() - t
        print("grn:", json.dumps(result["grn"]), flush=True)

        t = time.time()
        result["screen"] = screen(model, corpus, data["oligo"], n_cells=30, n_genes=300, seed=args.seed)
        timings["screen"] = time.time() - t
        print("screen:", json.dumps(result["screen"]), flush=True)

        t = time.time()
        result["gears"] = gears(
            model,
            corpus,
            data["norman"],
            epochs=args.gears_epochs,
            seed=args.seed,
            n_seeds=1 if args.quick else 3,
        )
        timings["gears"] = time.time() - t
        print("gears:", json.dumps(result["gears"]), flush=True)
    timings["total"] = time.time() - t0
    result["seconds"] = {k: round(v, 1) for k, v in timings.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    args.out.with_suffix(".md").write_text(markdown(result))
    print(json.dumps(result["seconds"]))


if __name__ == "__main__":
    main()
