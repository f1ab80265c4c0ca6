"""The tokenized GeneCompass corpus on disk and the data loaders that stream it.

Layout of a corpus folder (written by :func:`pertpy_gnn.pp.compass_tokenize`)::

    manifest.json              format, n_cells, seq_len, shards, sources, parameters
    vocab.json                 the CompassVocab
    gene_medians.tsv           token, median (non-zero normalized value), n_nonzero
    shard_00000_ids.npy        int32  (n_cells_in_shard, seq_len)  gene token ids, 0 = pad
    shard_00000_values.npy     float16 or float32 (n_cells_in_shard, seq_len) log1p(x / median)
    ...

Row ``i`` of a shard is one cell: the species token, then up to ``max_len`` genes in decreasing
order of value, then padding. Rows are read with positioned reads (``readinto`` at an offset), not
memory maps, so streaming a corpus larger than memory keeps the process memory flat. At most
``max_open_files`` shard files are open at once per process (the least recently used one is closed
first), however many shards the corpus has: the open-file limit of the system (often 1,024) never
caps the corpus size.
"""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, DistributedSampler

MANIFEST = "manifest.json"
FORMAT = "pertpy_gnn.compass_corpus"
#: default bound on the shard files a corpus keeps open at once (per process)
MAX_OPEN_FILES = 128
#: positions of a shuffled epoch turned into Python ints at a time (:class:`EpochRandomSampler`)
_SAMPLER_CHUNK = 65_536


def write_manifest(
    path: Path,
    *,
    n_cells: int,
    seq_len: int,
    vocab_size: int,
    shards: list,
    sources: list,
    params: dict,
    value_dtype: str = "float16",
) -> None:
    """Write the corpus manifest (the layout above) of a folder of shards, ``vocab.json`` and ``gene_medians.tsv``."""
    manifest = {
        "format": FORMAT,
        "version": 1,
        "n_cells": int(n_cells),
        "seq_len": int(seq_len),
        "max_len": int(seq_len) - 1,
        "pad_id": 0,
        "id_dtype": "int32",
        "value_dtype": value_dtype,
        "vocab": "vocab.json",
        "vocab_size": int(vocab_size),
        "gene_medians": "gene_medians.tsv",
        "shards": shards,
        "sources": sources,
        "params": params,
    }
    (Path(path) / MANIFEST).write_text(json.dumps(manifest, indent=1))


_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_BINARY", 0)


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Read into ``view`` from byte ``offset`` of the file ``fd`` (no shared file position)."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], offset)
    os.lseek(fd, offset, os.SEEK_SET)  # platforms without preadv (Windows)
    with open(fd, "rb", buffering=0, closefd=False) as f:
        return f.readinto(view)


def _npy_offset(path: Path) -> tuple[int, tuple[int, ...], np.dtype]:
    """Byte offset of the data, shape and dtype of a ``.npy`` file."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        return f.tell(), shape, dtype


class CompassCorpus:
    """A tokenized corpus on disk (see :func:`pertpy_gnn.pp.compass_tokenize`).

    Parameters
    ----------
    path
        The corpus folder (holding ``manifest.json``).
    max_open_files
        Most shard files kept open at once in one process (each shard is two files, ids and
        values); the least recently used file is closed when another is needed. Reads are the same
        whatever the bound; a bound below the number of shard files costs a re-open (about 2 µs) per
        shard a batch touches outside the open ones. DataLoader workers each keep their own; threads
        should not share one corpus object (a file may be closed under another thread's read).
    """

    def __init__(self, path: str | Path, *, max_open_files: int = MAX_OPEN_FILES):
        self.path = Path(path)
        if int(max_open_files) < 1:
            raise ValueError(f"max_open_files must be at least 1, got {max_open_files}.")
        self.max_open_files = int(max_open_files)
        file = self.path / MANIFEST
        if not file.is_file():
            raise FileNotFoundError(
                f"{file} not found: {self.path} is not a tokenized corpus; make one with pg.pp.compass_tokenize()."
            )
        self.manifest = json.loads(file.read_text())
        if self.manifest.get("format") != FORMAT:
            raise ValueError(
                f"{file} is not a GeneCompass corpus manifest (format {self.manifest.get('format')!r})."
            )
        self.n_cells = int(self.manifest["n_cells"])
        self.seq_len = int(self.manifest["seq_len"])
        self.value_dtype = np.dtype(self.manifest.get("value_dtype", "float16"))
        shards = self.manifest["shards"]
        self._starts = np.array([s["start"] for s in shards] + [self.n_cells], dtype=np.int64)
        # per shard: the two file paths and the byte offsets of their data (headers read once, files closed)
        self._paths: list[tuple[str, str]] = []
        self._offsets = np.empty((len(shards), 2), dtype=np.int64)
        for k, s in enumerate(shards):
            entry = []
            for j, (key, dtype) in enumerate((("ids", np.int32), ("values", self.value_dtype))):
                p = self.path / s[key]
                offset, shape, dt = _npy_offset(p)
                if shape != (s["n_cells"], self.seq_len) or dt != dtype:
                    raise ValueError(
                        f"{p} has shape {shape} / dtype {dt}, the manifest says {(s['n_cells'], self.seq_len)} / {np.dtype(dtype)}."
                    )
                entry.append(str(p))
                self._offsets[k, j] = offset
            self._paths.append((entry[0], entry[1]))
        # open shard files, least recently used first: path -> file descriptor
        self._handles: OrderedDict[str, int] = OrderedDict()
        self._pid = None

    @property
    def n_shards(self) -> int:
        """Number of shards (each an ids file and a values file)."""
        return len(self._paths)

    def __len__(self) -> int:
        return self.n_cells

    def __repr__(self) -> str:
        return f"CompassCorpus({str(self.path)!r}: {self.n_cells} cells x {self.seq_len} tokens, {self.n_shards} shards)"

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"], state["_pid"] = OrderedDict(), None  # descriptors belong to this process
        return state

    def close(self) -> None:
        """Close the shard files this process has open (reads reopen them as needed)."""
        handles = getattr(self, "_handles", None)
        while handles:
            os.close(handles.popitem(last=False)[1])

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to close with
            pass

    def __enter__(self) -> CompassCorpus:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @cached_property
    def vocab(self):
        """The vocabulary the corpus was tokenized with."""
        from ..pp._compass_vocab import CompassVocab

        return CompassVocab.read(self.path / self.manifest["vocab"])

    @cached_property
    def gene_medians(self) -> pd.Series:
        """Median of the non-zero normalized values of each token (index: token name)."""
        return pd.read_csv(self.path / self.manifest["gene_medians"], sep="\t", index_col=0)["median"]

    @property
    def sources(self) -> pd.DataFrame:
        """One row per tokenized source: name, species, first cell, n_cells, n_genes, n_mapped, ..."""
        return pd.DataFrame(self.manifest["sources"])

    @property
    def max_len(self) -> int:
        """Maximum number of gene tokens per cell (``seq_len - 1``)."""
        return self.seq_len - 1

    def _handle(self, path: str) -> int:
        """The open file descriptor of ``path``, opened (closing the least recently used one past the bound) if needed."""
        if self._pid != os.getpid():  # new process (forked DataLoader worker): its own files
            self.close()  # this process's copies of the parent's descriptors
            self._pid = os.getpid()
        fd = self._handles.get(path)
        if fd is not None:
            self._handles.move_to_end(path)
            return fd
        while len(self._handles) >= self.max_open_files:
            os.close(self._handles.popitem(last=False)[1])
        fd = self._handles[path] = os.open(path, _OPEN_FLAGS)
        return fd

    def read(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """Token ids (int32) and values (float16 or float32) of cells ``indices``, each ``(len(indices), seq_len)``."""
        idx = np.asarray(indices, dtype=np.int64).ravel()
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_cells):
            raise IndexError(f"cell indices must be in [0, {self.n_cells}).")
        order = np.argsort(idx, kind="stable")
        srt = idx[order]
        shard = np.searchsorted(self._starts, srt, side="right") - 1
        local = srt - self._starts[shard]
        out = (
            np.empty((idx.size, self.seq_len), np.int32),
            np.empty((idx.size, self.seq_len), self.value_dtype),
        )
        if idx.size == 0:
            return out
        # runs of consecutive rows of one shard are read with one call each; the runs of a shard
        # follow each other (sorted rows), so each file is looked up once per shard a read touches
        brk = np.flatnonzero((np.diff(shard) != 0) | (np.diff(local) != 1)) + 1
        run_start = np.concatenate([[0], brk])
        run_end = np.append(brk, idx.size).tolist()
        run_shard = shard[run_start]
        groups = np.append(np.flatnonzero(np.diff(run_shard, prepend=-1) != 0), run_start.size).tolist()
        run_local, run_shard, run_start = local[run_start].tolist(), run_shard.tolist(), run_start.tolist()
        for g0, g1 in zip(groups[:-1], groups[1:], strict=True):
            k = run_shard[g0]
            for arr, path, offset in zip(out, self._paths[k], self._offsets[k].tolist(), strict=True):
                row = self.seq_len * arr.itemsize
                fd = self._handle(path)
                buf = memoryview(arr).cast("B")
                for r in range(g0, g1):
                    view = buf[run_start[r] * row : run_end[r] * row]
                    at, got = offset + run_local[r] * row, 0
                    while got < view.nbytes:  # a single read may return less (e.g. over 2 GB on Linux)
                        n = _pread_into(fd, view[got:], at + got)
                        if n <= 0:
                            raise OSError(f"short read from {path}; the corpus files are truncated.")
                        got += n
        inv = np.empty_like(order)
        inv[order] = np.arange(order.size)
        return out[0][inv], out[1][inv]

    def split(self, held_out: float = 0.1, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Random split of the cells: ``(train_indices, held_out_indices)``."""
        if not 0 < held_out < 1:
            raise ValueError("held_out must be a fraction in (0, 1).")
        perm = np.random.default_rng(seed).permutation(self.n_cells)
        n_held = max(1, int(round(held_out * self.n_cells)))
        return np.sort(perm[n_held:]), np.sort(perm[:n_held])


def _collate(batch):
    """The dataset returns whole batches (``__getitems__``): nothing to collate."""
    return batch


class CompassDataset:
    """Map-style torch dataset over (a subset of) the cells of a :class:`CompassCorpus`.

    ``dataset[i]`` is one cell; a DataLoader fetches whole batches through ``__getitems__``:
    ``{'ids': int64 (b, n), 'values': float32 (b, n)}`` with ``n <= seq_len`` the longest cell of
    the batch (``trim=True``: columns that are padding in every cell are dropped, which saves the
    attention and feed-forward work on them).
    """

    def __init__(self, corpus: CompassCorpus, indices: np.ndarray | None = None, *, trim: bool = True):
        self.corpus = corpus
        self.indices = np.arange(len(corpus)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.trim = trim

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getitems__(self, positions) -> dict:
        ids, values = self.corpus.read(self.indices[np.asarray(positions, dtype=np.int64)])
        if self.trim and ids.size:  # padding sits at the end: drop the columns that are padding in every cell
            n = int((ids != 0).sum(axis=1).max())
            ids, values = ids[:, :n], values[:, :n]
        return {
            "ids": torch.from_numpy(ids.astype(np.int64)),
            "values": torch.from_numpy(values.astype(np.float32)),
        }

    def __getitem__(self, position: int) -> dict:
        return {k: v[0] for k, v in self.__getitems__([position]).items()}


class EpochRandomSampler(DistributedSampler):
    """A random order that depends only on ``(seed, epoch)``, shared out over data-parallel ranks.

    A resumed run sees the same order as an uninterrupted one. Lightning calls :meth:`set_epoch`
    before every epoch. With ``num_replicas > 1`` (DDP), rank ``r`` takes positions ``r``,
    ``r + num_replicas``, ... of the order, padded by its start to a multiple of ``num_replicas``
    (as torch's DistributedSampler; being one, Lightning leaves it in place). ``shuffle=False``: the
    positions in order. Positions are handed out a chunk at a time, never as one Python list of
    the whole epoch (~36 bytes per cell).
    """

    def __init__(
        self, data_source, seed: int = 0, *, shuffle: bool = True, num_replicas: int = 1, rank: int = 0
    ):
        # DistributedSampler.__init__ would ask the process group; everything is given here
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}.")
        self.dataset = self.data_source = data_source
        self.seed, self.epoch, self.shuffle, self.drop_last = int(seed), 0, bool(shuffle), False
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.num_samples = math.ceil(len(data_source) / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        n = len(self.data_source)
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        if self.num_replicas > 1:
            if self.total_size > n:  # pad with the start of the order (repeated if needed)
                order = torch.cat(
                    [order, order.repeat(math.ceil(self.total_size / n) - 1)[: self.total_size - n]]
                )
            order = order[self.rank : self.total_size : self.num_replicas]
        for chunk in order.split(_SAMPLER_CHUNK):
            yield from chunk.tolist()


def make_dataloader(
    corpus: CompassCorpus,
    indices,
    *,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    seed: int = 0,
    num_replicas: int = 1,
    rank: int = 0,
    loader_cls=DataLoader,
    sampler_cls=None,
):
    """A torch DataLoader streaming ``indices`` of ``corpus`` in batches (shuffled by ``(seed, epoch)``).

    ``num_replicas > 1``: this ``rank``'s share of them (see :class:`EpochRandomSampler`).
    ``loader_cls`` / ``sampler_cls`` (default :class:`EpochRandomSampler`): subclasses to use instead,
    e.g. the resumable ones of pre-training.
    """
    dataset = CompassDataset(corpus, indices)
    sharded = shuffle or num_replicas > 1
    return loader_cls(
        dataset,  # type: ignore[arg-type]
        batch_size=batch_size,
        sampler=(sampler_cls or EpochRandomSampler)(
            dataset, seed, shuffle=shuffle, num_replicas=num_replicas, rank=rank
        )
        if sharded
        else None,
        num_workers=num_workers,
        collate_fn=_collate,
        persistent_workers=num_workers > 0,
    )


class CompassDataModule(LightningDataModule):
    """Lightning DataModule over a corpus: train cells shuffled, validation cells in order.

    Under DDP each rank streams its own share of the cells (:class:`EpochRandomSampler`, which
    Lightning keeps in place of its own sampler).
    """

    def __init__(
        self,
        corpus: CompassCorpus,
        *,
        train_indices=None,
        validation_indices=None,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        self.corpus = corpus
        self.train_indices = (
            np.arange(len(corpus)) if train_indices is None else np.asarray(train_indices, dtype=np.int64)
        )
        self.validation_indices = (
            None if validation_indices is None else np.asarray(validation_indices, dtype=np.int64)
        )
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.n_obs = int(self.train_indices.size)

    def _replicas(self) -> dict:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return {"num_replicas": 1, "rank": 0}
        return {"num_replicas": int(trainer.world_size), "rank": int(trainer.global_rank)}

    def train_dataloader(self):
        return make_dataloader(
            self.corpus,
            self.train_indices,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            seed=self.seed,
            **self._replicas(),
        )

    def val_dataloader(self):
        if self.validation_indices is None or self.validation_indices.size == 0:
            return []
        return make_dataloader(
            self.corpus,
            self.validation_indices,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            **self._replicas(),
        )
