"""GeneCompass corpus at a million cells: open files and resident memory against cells streamed.

1. Writes a synthetic corpus of ``--cells`` cells (default 1,000,000) in the project's corpus format
   (``compass_throughput.build_corpus``: random gene tokens, float16 values, random lengths with
   padding), with short token windows (``--seq-len`` 33 = species + 32 genes, ~200 MB on disk) and
   small shards (``--shard-size`` 1,800: 556 shards = 1,112 files, more than the usual limit of 1,024
   open files) under ``benchmarks/work/compass_corpus_scale/`` (git-ignored; kept for reruns).
2. ``stream``: every cell once through the training DataLoader (shuffled).
3. ``train``: a tiny GeneCompass (1 layer, d_model 32, 2 heads: the cost is the data path) trained
   through ``GeneCompass.train`` (Lightning, the default logger) over the first ``--train-cells``
   cells (default 300,000; 0: all) of a shuffled epoch of the whole corpus.

Every ``--every`` batches each phase records the resident memory (VmRSS), the open files of the
process (``/proc/self/fd``), the cells streamed and the CPU seconds. The RSS slope is a least-squares
line through the samples after the first ``--warmup`` fraction of the cells, in MB per 100,000
cells. Results: ``benchmarks/results/compass_corpus_scale.json`` and ``.md`` (``--out``).

    OMP_NUM_THREADS=1 python benchmarks/compass_corpus_scale.py
    # the previous reader for comparison (no max_open_files), then both in one table:
    PYTHONPATH=<old tree>/src python benchmarks/compass_corpus_scale.py --phases stream --out old.json
    python benchmarks/compass_corpus_scale.py --phases stream --out new.json   # at the same time
    python benchmarks/compass_corpus_scale.py --table-only --compare "previous reader=old.json" \
        "bound 128, beside the previous reader=new.json"
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from _common import cpu_seconds, machine, status_kib, versions, write_record

HERE = Path(__file__).parent


def open_files() -> int:
    """Open file descriptors of this process (-1 where ``/proc/self/fd`` does not exist)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


class Recorder:
    """Samples (cells streamed, RSS MB, open files, CPU s) every ``every`` batches."""

    def __init__(self, every: int):
        self.every = every
        self.rows: list[tuple[int, float, int, float]] = []
        self.cpu0 = cpu_seconds()
        self.max_open = open_files()

    def __call__(self, batch_index: int, cells: int) -> None:
        n = open_files()
        self.max_open = max(self.max_open, n)
        if batch_index % self.every == 0:
            self.rows.append((cells, status_kib("VmRSS") / 1024, n, cpu_seconds() - self.cpu0))

    def summary(self, warmup: float) -> dict:
        a = np.array(self.rows, dtype=float)
        cells, rss = a[:, 0], a[:, 1]
        late = cells >= warmup * cells.max()
        slope = float(np.polyfit(cells[late], rss[late], 1)[0] * 1e5) if late.sum() > 2 else float("nan")
        return {
            "cells": int(cells.max()),
            "cpu_s": round(float(a[-1, 3]), 1),
            "cells_per_cpu_s": round(float(cells.max() / max(a[-1, 3], 1e-9)), 1),
            "rss_first_MB": round(float(rss[0]), 1),
            "rss_after_warmup_MB": round(float(rss[late][0]), 1),
            "rss_last_MB": round(float(rss[-1]), 1),
            "rss_max_MB": round(float(rss.max()), 1),
            "rss_slope_MB_per_100k_cells": round(slope, 2),
            "max_open_files": int(self.max_open),
            "samples": {
                "cells": cells.astype(int).tolist(),
                "rss_MB": np.round(rss, 1).tolist(),
                "open_files": a[:, 2].astype(int).tolist(),
                "cpu_s": np.round(a[:, 3], 2).tolist(),
            },
        }


def open_corpus(path: Path, max_open_files: int | None):
    from pertpy_gnn.compass import CompassCorpus

    if max_open_files is None:
        return CompassCorpus(path)
    return CompassCorpus(path, max_open_files=max_open_files)


def stream(corpus, batch_size: int, every: int, warmup: float) -> dict:
    from pertpy_gnn.compass._corpus import make_dataloader

    rec = Recorder(every)
    loader = make_dataloader(corpus, np.arange(len(corpus)), batch_size=batch_size, shuffle=True, seed=0)
    cells = checksum = 0
    for k, batch in enumerate(loader):
        cells += batch["ids"].shape[0]
        checksum += int(batch["ids"][:, 1].sum())
        rec(k, cells)
    rec(0, cells)  # the last state
    return {"batch_size": batch_size, "checksum": checksum, **rec.summary(warmup)}


def train(corpus, batch_size: int, every: int, warmup: float, seed: int, cells: int | None) -> dict:
    import torch
    from lightning.pytorch import Callback

    from pertpy_gnn.compass import GeneCompass

    rec = Recorder(every)

    class _Sample(Callback):
        cells = 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.cells += int(batch["ids"].shape[0])
            rec(batch_idx, self.cells)

    torch.manual_seed(seed)
    config = {"n_layers": 1, "d_model": 32, "n_heads": 2}
    model = GeneCompass(vocab=corpus.vocab, seq_len=corpus.seq_len, **config)
    cb = _Sample()
    model.train(
        corpus,
        max_epochs=1,
        batch_size=batch_size,
        lr=1e-3,
        accelerator="cpu",
        devices=1,
        progress_bar=False,
        callbacks=[cb],
        seed=seed,
        **({} if cells is None else {"limit_train_batches": -(-cells // batch_size)}),
    )
    rec(0, cb.cells)
    loss = model.history_["loss_train_step"] if "loss_train_step" in model.history_ else None
    return {
        "batch_size": batch_size,
        "model": config,
        "loss_first_last": None
        if loss is None
        else [round(float(loss.iloc[0, 0]), 3), round(float(loss.iloc[-1, 0]), 3)],
        **rec.summary(warmup),
    }


def markdown(rec: dict) -> str:
    c = rec["corpus"]
    lines = [
        f"Synthetic corpus of {c['n_cells']:,} cells x {c['seq_len']} tokens in {c['n_shards']} shards "
        f"({2 * c['n_shards']} files, {c['on_disk_MB']:.0f} MB), reader bound `max_open_files` = "
        f"{c['max_open_files']}; {rec['machine']['cpus_available']} shared cores, load average "
        f"{rec['machine']['load_average_at_start']} at the start. RSS slope: least squares after the first "
        f"{rec['warmup']:.0%} of the cells.",
        "",
        "| phase | cells | batch | CPU s | cells / CPU s | max open files | RSS first / after warm-up / last / max (MB) | RSS slope (MB per 100k cells) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = [(name, rec.get(name)) for name in ("stream", "train")]
    for label, other in rec.get("compare", {}).items():
        rows += [(f"{name}, {label}", other.get(name)) for name in ("stream", "train")]
    for name, r in rows:
        if r is None:
            continue
        lines.append(
            f"| {name} | {r['cells']:,} | {r['batch_size']} | {r['cpu_s']} | {r['cells_per_cpu_s']:,} | "
            f"{r['max_open_files']} | {r['rss_first_MB']:.0f} / {r['rss_after_warmup_MB']:.0f} / "
            f"{r['rss_last_MB']:.0f} / {r['rss_max_MB']:.0f} | {r['rss_slope_MB_per_100k_cells']} |"
        )
    for label, other in rec.get("compare", {}).items():
        lines += [
            "",
            f"{label}: max_open_files {other['corpus']['max_open_files']}, batch "
            f"{(other.get('stream') or other.get('train'))['batch_size']}, load average "
            f"{other['machine']['load_average_at_start']} at its start.",
        ]
    if rec.get("note"):
        lines += ["", rec["note"]]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=1_000_000)
    ap.add_argument("--seq-len", type=int, default=33)
    ap.add_argument("--vocab-size", type=int, default=2_000)
    ap.add_argument("--shard-size", type=int, default=1_800)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument(
        "--train-cells",
        type=int,
        default=300_000,
        help="cells trained over (a shuffled sample of the whole corpus; 0: every cell)",
    )
    ap.add_argument("--every", type=int, default=100, help="sample every this many batches")
    ap.add_argument("--warmup", type=float, default=0.1, help="fraction of the cells before the RSS slope")
    ap.add_argument("--max-open-files", type=int, default=None, help="reader bound (default: the reader's)")
    ap.add_argument(
        "--release-every",
        type=int,
        default=None,
        help="training steps between returns of freed heap memory (0: never; default: the package's)",
    )
    ap.add_argument("--phases", nargs="+", choices=["stream", "train"], default=["stream", "train"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=str(HERE / "work" / "compass_corpus_scale"))
    ap.add_argument("--note", default="")
    ap.add_argument(
        "--compare", nargs="+", default=[], help="LABEL=PATH: results of other runs (JSON) shown beside"
    )
    ap.add_argument(
        "--table-only", action="store_true", help="only rewrite the table (and --compare) of --out"
    )
    ap.add_argument("--out", default=str(HERE / "results" / "compass_corpus_scale.json"))
    args = ap.parse_args()
    args.train_cells = args.train_cells or None

    out = Path(args.out)
    if args.table_only:
        rec = json.loads(out.read_text())
        add_compare(rec, args.compare)
        rec["note"] = args.note or rec.get("note", "")
        write_record(rec, out)
        out.with_suffix(".md").write_text(markdown(rec) + "\n")
        return

    import torch
    from compass_throughput import build_corpus

    torch.set_num_threads(1)
    if args.release_every is not None:
        from pertpy_gnn.compass import _training

        _training.RELEASE_EVERY_N_STEPS = args.release_every
    load = os.getloadavg()
    path = Path(args.workdir) / f"corpus_{args.cells}_{args.seq_len}_{args.shard_size}"
    rec: dict = {"args": vars(args), "warmup": args.warmup, "note": args.note}
    if not (path / "manifest.json").exists():
        t0 = cpu_seconds()
        build_corpus(path, args.cells, args.seq_len, args.vocab_size, args.shard_size, seed=args.seed)
        rec["build_cpu_s"] = round(cpu_seconds() - t0, 1)
    corpus = open_corpus(path, args.max_open_files)
    rec["corpus"] = {
        "n_cells": len(corpus),
        "seq_len": corpus.seq_len,
        "n_shards": len(corpus.manifest["shards"]),
        "on_disk_MB": round(sum(f.stat().st_size for f in path.glob("shard_*.npy")) / 1e6, 1),
        "max_open_files": getattr(corpus, "max_open_files", "unbounded (previous reader)"),
        "release_every_n_steps": getattr(
            __import__("pertpy_gnn.compass._training").compass._training, "RELEASE_EVERY_N_STEPS", None
        ),
        "open_files_at_start": open_files(),
    }
    print(corpus, flush=True)
    for phase in args.phases:
        t0 = time.perf_counter()
        if phase == "stream":
            rec["stream"] = stream(corpus, args.batch_size, args.every, args.warmup)
        else:
            rec["train"] = train(
                corpus, args.batch_size, args.every, args.warmup, args.seed, args.train_cells
            )
        rec[phase]["wall_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps({k: v for k, v in rec[phase].items() if k != "samples"}), flush=True)
        finish(rec, args, load, out)  # what is done so far survives an interrupted run


def add_compare(rec: dict, items: list[str]) -> None:
    """Attach ``LABEL=PATH`` results (JSON of other runs) under ``rec['compare']``."""
    for item in items:
        label, _, path = item.partition("=")
        rec.setdefault("compare", {})[label] = json.loads(Path(path).read_text())


def finish(rec: dict, args, load, out: Path) -> None:
    """Write the record and its table."""
    import torch

    rec["machine"] = machine(load, torch=torch.__version__, torch_threads=torch.get_num_threads())
    rec["versions"] = versions("pertpy_gnn", "torch", "lightning")
    add_compare(rec, args.compare)
    write_record(rec, out)
    out.with_suffix(".md").write_text(markdown(rec) + "\n")


if __name__ == "__main__":
    main()
