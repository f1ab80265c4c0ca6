"""Pre-train GeneCompass ('cpu' preset) on the real human + mouse cells of ../shared/data.

Corpus: celltypist immune sample (human, counts), oligodendroglioma (human, Smart-seq2 TPM-like),
HSMM myoblasts (human, FPKM, Ensembl ids mapped with the GENCODE id table), dentate gyrus and
pancreas (mouse, counts) and the K562 cells of the Norman subset. Norman's X is already
log1p(normalized counts) over 500 highly variable genes: it is tokenized with
``input_kind='log1p'`` (expm1, no per-cell rescaling, since the 500 genes are a subset of the
transcriptome; its cells therefore carry at most 500 genes, ~15 non-zero per cell).

Vocabulary: the MGI homology classes (1:1 mouse orthologs share the human token). Priors: GRN =
TRRUST + DoRothEA (A-C), human and mouse; gene family = HGNC gene groups; co-expression = pairs with
Pearson r > 0.8 on non-zero values of each dataset's cells; promoter = absent (no sequences here:
a learned embedding takes its place). All three pair priors are embedded with gene2vec.

A random 10% of the cells is held out. After training, masked-token metrics on the held-out cells
(same masks for every model) are compared with (1) the same architecture at random init and
(2) a shuffled-input control: the trained model on held-out cells whose gene tokens (ids and values,
masked ones included) are put in random order, so the input no longer ranks the cell's genes. A
stricter diagnostic is also reported, ``context_swap``: the unmasked context tokens come from random
other held-out cells at the same rank positions, so rank statistics are kept and only the cell's own
context is lost; beating it needs a model that uses the cell's context, which short CPU runs
learn only partly (rank statistics are learned first). Writes
benchmarks/results/compass_pretrain_real.json.

CPU budget (~10 minutes on 2 shared cores): max_len 64, 3 epochs, learning rate 1e-3 (the paper's
5e-5 is for 100M cells).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

import pertpy_gnn as pg
from pertpy_gnn.compass import GeneCompass

ROOT = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--prior-dim", type=int, default=32)
    ap.add_argument("--held-out", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--accelerator", default="cpu", help="Lightning accelerator for pre-training ('cpu', 'gpu', 'auto')"
    )
    ap.add_argument(
        "--precision", default=None, help="Lightning precision; default: bf16-mixed on a CUDA GPU, else 32"
    )
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compass_pretrain_real.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    if not data.is_dir():
        raise SystemExit(f"{data} not found: this benchmark needs the project's real data folder.")
    timings = {}
    t0 = time.perf_counter()

    # ---- vocabulary and priors
    orthologs = pg.pp.mgi_orthologs(data / "orthologs" / "HOM_MouseHumanSequence.rpt.gz")
    vocab = pg.pp.compass_vocab(orthologs)
    gene_ids = pg.pp.gene_id_table(data / "gene_ids" / "celltypist_GENCODEv44_Gene_id2name.csv.gz")
    scrna = data / "scrna"
    sources = [
        {"data": scrna / "celltypist_sample_cell_by_gene.h5ad", "species": "human"},
        {"data": scrna / "infercnvpy_oligodendroglioma_tirosh2016.h5ad", "species": "human"},
        {"data": scrna / "hsmm_trapnell2014_fpkm.h5ad", "species": "human", "gene_ids": gene_ids},
        {"data": scrna / "dentategyrus_100obs.h5ad", "species": "mouse"},
        {"data": scrna / "pancreas_50obs.h5ad", "species": "mouse"},
        {
            "data": data / "perturbation" / "norman2019_k562_subset.h5ad",
            "species": "human",
            "input_kind": "log1p",
            "name": "norman2019_k562",
        },
    ]
    timings["vocab_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    grn = pd.concat(
        [
            pg.pp.trrust_edges(data / "grn" / "trrust_rawdata.human.tsv", species="human"),
            pg.pp.trrust_edges(data / "grn" / "trrust_rawdata.mouse.tsv", species="mouse"),
            pg.pp.dorothea_edges(data / "grn" / "dorothea_hs.tsv.gz", species="human", confidence="ABC"),
            pg.pp.dorothea_edges(data / "grn" / "dorothea_mm.tsv.gz", species="mouse", confidence="ABC"),
        ],
        ignore_index=True,
    )
    family = pg.pp.hgnc_gene_groups(data / "gene_families" / "hgnc_complete_set.txt.gz")
    import anndata as ad

    coexp = []
    for s in sources:
        adata = ad.read_h5ad(s["data"])
        symbols = "gene_short_name" if "gene_ids" in s else None  # HSMM: Ensembl var_names, symbols in var
        coexp.append(
            pg.pp.coexpression_pairs(
                adata,
                species=s["species"],
                gene_symbols=symbols,
                input_kind=s.get("input_kind", "counts"),
                seed=args.seed,
            )
        )
    coexp = pd.concat(coexp, ignore_index=True)
    priors = pg.pp.compass_priors(
        vocab,
        grn=grn,
        family=family,
        coexpression=coexp,
        dim=args.prior_dim,
        epochs=3,
        max_group_size=200,
        seed=args.seed,
        sources={
            "grn": "TRRUST v2 + DoRothEA A-C (human, mouse)",
            "family": "HGNC gene groups (<= 200 genes)",
            "coexpression": "Pearson r > 0.8 on non-zero values, 6 datasets",
        },
    )
    timings["priors_s"] = time.perf_counter() - t1

    # ---- corpus
    t1 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="compass_real_"))
    corpus = pg.pp.compass_tokenize(sources, work / "corpus", vocab, max_len=args.max_len, progress_bar=False)
    timings["tokenize_s"] = time.perf_counter() - t1
    train, held = corpus.split(args.held_out, seed=args.seed)

    # ---- pre-training
    t1 = time.perf_counter()
    model = pg.tl.pretrain_compass(
        corpus,
        priors=priors,
        preset="cpu",
        max_epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=0.05,
        train_indices=train,
        validation_indices=held,
        accelerator=args.accelerator,
        precision=args.precision,
        seed=args.seed,
        progress_bar=False,
        ckpt_dir=work / "ckpt",
    )
    timings["train_s"] = time.perf_counter() - t1

    # ---- held-out evaluation and controls (identical masks: same seed)
    t1 = time.perf_counter()
    trained = model.evaluate(corpus, held, seed=1)
    shuffled = model.evaluate(corpus, held, seed=1, control="shuffled")
    swapped = model.evaluate(corpus, held, seed=1, control="context_swap")
    torch.manual_seed(args.seed + 1)
    fresh = GeneCompass(vocab=vocab, seq_len=corpus.seq_len, priors=priors, preset="cpu").evaluate(
        corpus, held, seed=1
    )
    by_species = {}
    species_of = corpus.read(held)[0][:, 0]
    for name, tok in (("human", 2), ("mouse", 3)):
        by_species[name] = model.evaluate(corpus, held[species_of == tok], seed=1)
    timings["evaluate_s"] = time.perf_counter() - t1
    timings["total_s"] = time.perf_counter() - t0

    hist = model.history

    def series(key):
        if key not in hist:
            return []
        df = hist[key].astype(float)
        return [[int(i), round(float(v), 4)] for i, v in zip(df.index, df.iloc[:, 0], strict=True)]

    result = {
        "description": "GeneCompass 'cpu' preset pre-trained on the real human + mouse cells; masked-token metrics on held-out cells vs controls",
        "corpus": {
            "n_cells": len(corpus),
            "n_train": int(train.size),
            "n_held_out": int(held.size),
            "max_len": args.max_len,
            "vocab_size": len(vocab),
            "sources": corpus.sources[
                ["name", "species", "input_kind", "n_cells", "n_genes", "n_mapped", "mean_tokens_per_cell"]
            ].to_dict("records"),
        },
        "priors": {
            k: {"dim": p.dim, "tokens_covered": int(p.covered.sum()), "source": p.source}
            for k, p in priors.items()
        },
        "model": {
            "preset": "cpu",
            **{k: model.config_[k] for k in ("n_layers", "d_model", "n_heads", "dropout", "beta")},
            "parameters_M": round(sum(p.numel() for p in model.module.parameters()) / 1e6, 2),
        },
        "training": {
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "warmup": 0.05,
            "steps": int(model.trainer.global_step),
            "accelerator": args.accelerator,
            "precision": str(model.trainer.precision),
            "device": torch.cuda.get_device_name(0)
            if torch.cuda.is_available() and args.accelerator != "cpu"
            else "cpu",
        },
        "held_out": {
            "trained": trained,
            "random_init": fresh,
            "shuffled_input": shuffled,
            "context_swap": swapped,
            "trained_by_species": by_species,
        },
        "beats_controls (random_init and shuffled_input)": {
            "accuracy": bool(trained["accuracy"] > max(fresh["accuracy"], shuffled["accuracy"])),
            "value_mse": bool(trained["value_mse"] < min(fresh["value_mse"], shuffled["value_mse"])),
        },
        "curve": {
            "loss_train_step": series("loss_train_step")[:: max(1, len(series("loss_train_step")) // 100)],
            "loss_validation": series("loss_validation"),
            "accuracy_validation": series("accuracy_validation"),
            "loss_value_validation": series("loss_value_validation"),
            "loss_id_validation": series("loss_id_validation"),
        },
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "threads": args.threads,
        "versions": {"torch": torch.__version__},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(
        json.dumps(
            {k: v for k, v in result.items() if k.startswith(("held_out", "beats", "timings"))}, indent=1
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
