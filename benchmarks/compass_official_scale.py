"""Cost of the published GeneCompass base shape: load a checkpoint, embed cells (CPU, or GPU with --device cuda).

Random weights of the published base shape (12 layers, hidden 768, 12 heads, intermediate 3,072,
2,048 gene positions; all four priors 768-wide; vocabulary ``--vocab-size``, default 56,227 = the
28,291 human and 27,934 mouse genes named by the published prior files + ``<pad>``, ``<mask>``) are
written with ``GeneCompass.save_official`` into a temporary folder, then

1. ``GeneCompass.load_official`` reads it back (CPU seconds, peak resident memory of the load);
2. ``pg.tl.embed_compass`` embeds ``--cells`` cells (default 24) of counts over ``--genes`` genes
   (default 4,000; every cell expresses more than 2,048 of them, so each cell fills all 2,048 gene
   positions): cells per CPU second and per wall second, peak memory of the embedding.

Results go to benchmarks/results/compass_official_scale.json (``--out``)::

    OMP_NUM_THREADS=1 python benchmarks/compass_official_scale.py
    python benchmarks/compass_official_scale.py --device cuda --cells 512 --out benchmarks/results/compass_official_scale_gpu.json
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import cpu_seconds, reset_peak, status_kib, torch_machine, versions, write_record


def build_vocab(vocab_size: int):
    from pertpy_gnn.pp._compass_vocab import CompassVocab

    n_h = (vocab_size - 2) // 2 + 1
    human = [f"ENSG{i:011d}" for i in range(n_h)]
    mouse = [f"ENSMUSG{i:011d}" for i in range(vocab_size - 2 - n_h)]
    symbols = {e: f"HG{i}" for i, e in enumerate(human)} | {e: f"Mg{i}" for i, e in enumerate(mouse)}
    return CompassVocab(["<pad>", "<mask>", *human, *mouse], symbols=symbols)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--cells", type=int, default=24)
    ap.add_argument("--genes", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--vocab-size", type=int, default=56_227)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "compass_official_scale.json"))
    args = ap.parse_args()

    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp
    import torch

    import pertpy_gnn as pg
    from pertpy_gnn.compass import GeneCompass
    from pertpy_gnn.pp._compass_priors import CompassPrior

    load0 = os.getloadavg()
    torch.manual_seed(0)
    vocab = build_vocab(args.vocab_size)
    rng = np.random.default_rng(0)
    priors = {
        n: CompassPrior(
            n, rng.standard_normal((len(vocab), 768), dtype=np.float32), np.ones(len(vocab), bool), "random"
        )
        for n in ("promoter", "coexpression", "family", "grn")
    }
    model = GeneCompass(vocab=vocab, seq_len=2049, priors=priors, preset="base", d_ff=3072)
    n_par = sum(p.numel() for p in model.module.parameters())
    n_buf = sum(b.numel() for b in model.module.buffers())
    del priors
    with tempfile.TemporaryDirectory(prefix="pg_compass_base_") as tmp:
        model.save_official(Path(tmp) / "ckpt")
        size = sum(f.stat().st_size for f in (Path(tmp) / "ckpt").rglob("*") if f.is_file())
        del model
        reset_peak()
        rss0 = status_kib("VmRSS")
        c0, w0 = cpu_seconds(), time.perf_counter()
        model = GeneCompass.load_official(Path(tmp) / "ckpt", map_location=args.device)
        load = {
            "cpu_s": round(cpu_seconds() - c0, 2),
            "wall_s": round(time.perf_counter() - w0, 2),
            "peak_rss_gib_above_start": round((status_kib("VmHWM") - rss0) / 2**20, 3),
            "checkpoint_folder_gib": round(size / 2**30, 3),
        }
    genes = vocab.tokens[2 : 2 + args.genes].tolist()
    x = rng.poisson(3.0, (args.cells, args.genes)).astype(np.float32)
    adata = ad.AnnData(sp.csr_matrix(x), var=pd.DataFrame(index=genes))
    n_tok = int(np.minimum((x > 0).sum(1), 2048).min())
    reset_peak()
    rss0 = status_kib("VmRSS")
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    c0, w0 = cpu_seconds(), time.perf_counter()
    pg.tl.embed_compass(adata, model, batch_size=args.batch_size, progress_bar=False)
    if args.device == "cuda":
        torch.cuda.synchronize()
    cpu_s, wall_s = cpu_seconds() - c0, time.perf_counter() - w0
    embed = {
        "n_cells": args.cells,
        "gene_tokens_per_cell_min": n_tok,
        "batch_size": args.batch_size,
        "cpu_s": round(cpu_s, 2),
        "wall_s": round(wall_s, 2),
        "cells_per_cpu_s": round(args.cells / cpu_s, 4),
        "cells_per_wall_s": round(args.cells / wall_s, 4),
        "peak_rss_gib_above_start": round((status_kib("VmHWM") - rss0) / 2**20, 3),
        "peak_rss_gib_process": round(status_kib("VmHWM") / 2**20, 3),
    }
    if args.device == "cuda":
        embed["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        embed["gpu"] = torch.cuda.get_device_name()
    record = {
        "what": "published GeneCompass base shape, random weights: load_official, then embed_compass",
        "shape": {
            "n_layers": 12,
            "hidden": 768,
            "heads": 12,
            "intermediate": 3072,
            "gene_positions": 2048,
            "vocab_size": len(vocab),
            "prior_dims": 768,
            "parameters_millions": round(n_par / 1e6, 1),
            "buffers_millions": round(n_buf / 1e6, 1),
        },
        "load_official": load,
        "embed_compass": embed,
        "machine": torch_machine(args.device, load_start=load0),
        "versions": versions("torch", "pertpy_gnn"),
    }
    write_record(record, Path(args.out))


if __name__ == "__main__":
    main()
