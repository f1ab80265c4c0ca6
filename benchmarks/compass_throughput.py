"""GeneCompass pre-training throughput and memory while streaming a large corpus from disk.

1. Builds a simulated corpus directly as sharded .npy files (random gene tokens, float16 values,
   random lengths with padding): ``--rows`` cells (default 1,000,000) x ``--seq-len`` (2,049) tokens.
2. Streams every row once through the training DataLoader (shuffled, as in training) and records
   the peak resident memory (RSS, sampled every batch) and the read rate.
3. Measures pre-training throughput (cells/s) with the real Lightning training path on that corpus
   for each preset (``cpu`` here; ``small`` and ``base`` too with ``--device cuda``).

Results go to benchmarks/results/compass_throughput.json (``--out``).

    python benchmarks/compass_throughput.py                       # CPU, cpu preset
    python benchmarks/compass_throughput.py --device cuda --presets cpu small base
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch


def build_corpus(
    path: Path, n_rows: int, seq_len: int, vocab_size: int, shard_size: int, seed: int = 0
) -> None:
    """Write a random corpus in the CompassCorpus layout without going through AnnData."""
    from pertpy_gnn.compass._corpus import write_manifest
    from pertpy_gnn.pp._compass_vocab import compass_vocab

    path.mkdir(parents=True, exist_ok=True)
    vocab = compass_vocab(human_genes=[f"G{i}" for i in range(vocab_size - 4)])
    vocab.write(path / "vocab.json")
    with open(path / "gene_medians.tsv", "w") as fh:
        fh.write("token\tmedian\tn_nonzero\n")
    rng = np.random.default_rng(seed)
    shards = []
    for k, start in enumerate(range(0, n_rows, shard_size)):
        n = min(shard_size, n_rows - start)
        ids = np.lib.format.open_memmap(
            path / f"shard_{k:05d}_ids.npy", mode="w+", dtype=np.int32, shape=(n, seq_len)
        )
        vals = np.lib.format.open_memmap(
            path / f"shard_{k:05d}_values.npy", mode="w+", dtype=np.float16, shape=(n, seq_len)
        )
        for a in range(0, n, 8192):
            b = min(n, a + 8192)
            block = rng.integers(4, vocab_size, (b - a, seq_len), dtype=np.int32)
            block[:, 0] = 2
            length = rng.integers(seq_len // 4, seq_len + 1, b - a)
            pad = np.arange(seq_len)[None, :] >= length[:, None]
            block[pad] = 0
            v = (rng.random((b - a, seq_len), dtype=np.float32) * 4).astype(np.float16)
            v[pad] = 0
            ids[a:b] = block
            vals[a:b] = v
        ids.flush()
        vals.flush()
        del ids, vals
        shards.append(
            {
                "ids": f"shard_{k:05d}_ids.npy",
                "values": f"shard_{k:05d}_values.npy",
                "start": start,
                "n_cells": n,
            }
        )
    write_manifest(
        path,
        n_cells=n_rows,
        seq_len=seq_len,
        vocab_size=len(vocab),
        shards=shards,
        sources=[{"name": "simulated", "species": "human", "start": 0, "n_cells": n_rows}],
        params={"simulated": True},
    )


class PeakRSS:
    """Peak resident memory of this process (and its children), sampled by a thread."""

    def __init__(self, interval: float = 0.05):
        self.proc = psutil.Process()
        self.peak = 0
        self.interval = interval
        self._stop = threading.Event()

    def rss(self) -> int:
        procs = [self.proc, *self.proc.children(recursive=True)]
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def __enter__(self):
        self.start_rss = self.rss()
        self.peak = self.start_rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def stream(corpus, batch_size: int, num_workers: int) -> dict:
    from pertpy_gnn.compass._corpus import make_dataloader

    loader = make_dataloader(
        corpus, np.arange(len(corpus)), batch_size=batch_size, shuffle=True, num_workers=num_workers, seed=0
    )
    n = 0
    checksum = 0
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        for batch in loader:
            n += batch["ids"].shape[0]
            checksum += int(batch["ids"][:, 1].sum())
        dt = time.perf_counter() - t0
    bytes_read = n * corpus.seq_len * 6
    return {
        "rows_streamed": n,
        "seconds": round(dt, 1),
        "rows_per_s": round(n / dt, 1),
        "MB_per_s": round(bytes_read / dt / 1e6, 1),
        "rss_start_MB": round(mem.start_rss / 1e6, 1),
        "rss_peak_MB": round(mem.peak / 1e6, 1),
        "corpus_on_disk_GB": round(sum(f.stat().st_size for f in corpus.path.glob("shard_*.npy")) / 1e9, 2),
        "batch_size": batch_size,
        "num_workers": num_workers,
        "checksum": checksum,
    }


class StepTimer:
    """Lightning callback timing optimizer steps after a warm-up."""

    def __init__(self, warmup: int):
        from lightning.pytorch import Callback

        outer = self

        class _CB(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                outer._t = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                if batch_idx >= warmup:
                    outer.times.append(time.perf_counter() - outer._t)

        self.times: list[float] = []
        self.callback = _CB()


def throughput(
    corpus, preset: str, batch_size: int, steps: int, accelerator: str, precision: str | None
) -> dict:
    from pertpy_gnn.compass import GeneCompass

    torch.manual_seed(0)
    model = GeneCompass(vocab=corpus.vocab, seq_len=corpus.seq_len, preset=preset)
    n_params = sum(p.numel() for p in model.module.parameters())
    timer = StepTimer(warmup=2)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        model.train(
            corpus,
            max_epochs=1,
            batch_size=batch_size,
            lr=5e-5,
            accelerator=accelerator,
            devices=1,
            precision=precision,
            progress_bar=False,
            callbacks=[timer.callback],
            limit_train_batches=steps + 2,
            logger=False,
        )
        wall = time.perf_counter() - t0
    step = float(np.median(timer.times))
    out = {
        "preset": preset,
        "parameters_M": round(n_params / 1e6, 2),
        "batch_size": batch_size,
        "seq_len": corpus.seq_len,
        "timed_steps": len(timer.times),
        "median_step_s": round(step, 4),
        "cells_per_s": round(batch_size / step, 2),
        "tokens_per_s": round(batch_size * corpus.seq_len / step, 0),
        "precision": precision or ("bf16-mixed" if accelerator == "gpu" else "32-true"),
        "wall_s": round(wall, 1),
        "rss_peak_MB": round(mem.peak / 1e6, 1),
    }
    if torch.cuda.is_available() and accelerator == "gpu":
        out["cuda_peak_memory_GB"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        torch.cuda.reset_peak_memory_stats()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument(
        "--presets", nargs="+", default=None, help="default: cpu (and small, base with --device cuda)"
    )
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--seq-len", type=int, default=2049)
    ap.add_argument("--vocab-size", type=int, default=40_000)
    ap.add_argument("--shard-size", type=int, default=100_000)
    ap.add_argument("--stream-batch-size", type=int, default=256)
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="timed training steps per preset")
    ap.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="training batch size (default: 4 on cpu, 32/16 for small/base on cuda)",
    )
    ap.add_argument(
        "--workdir", default=None, help="where the simulated corpus is written (default: a temp folder)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the simulated corpus")
    ap.add_argument("--skip-stream", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "compass_throughput.json"))
    args = ap.parse_args()

    torch.set_num_threads(min(torch.get_num_threads(), 16 if args.device == "cuda" else 2))
    from pertpy_gnn.compass import CompassCorpus

    presets = args.presets or (["cpu"] if args.device == "cpu" else ["cpu", "small", "base"])
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="compass_tp_"))
    corpus_dir = work / "corpus"
    result = {
        "device": args.device,
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "ram_GB": round(psutil.virtual_memory().total / 1e9, 1),
            "platform": platform.platform(),
        },
    }
    if args.device == "cuda":
        result["machine"]["gpu"] = torch.cuda.get_device_name(0)
    try:
        if not (corpus_dir / "manifest.json").exists():
            t0 = time.perf_counter()
            build_corpus(corpus_dir, args.rows, args.seq_len, args.vocab_size, args.shard_size)
            result["build_corpus_s"] = round(time.perf_counter() - t0, 1)
        corpus = CompassCorpus(corpus_dir)
        print(corpus, flush=True)
        if not args.skip_stream:
            result["stream"] = stream(corpus, args.stream_batch_size, args.num_workers)
            print(json.dumps(result["stream"]), flush=True)
        result["train"] = []
        for preset in presets:
            bs = (
                args.batch_size or {"cpu": 4 if args.device == "cpu" else 64, "small": 32, "base": 16}[preset]
            )
            steps = args.steps or (5 if args.device == "cpu" else 30)
            r = throughput(corpus, preset, bs, steps, "gpu" if args.device == "cuda" else "cpu", None)
            print(json.dumps(r), flush=True)
            result["train"].append(r)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.exists() else {}
    previous[args.device] = result
    out.write_text(json.dumps(previous, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
