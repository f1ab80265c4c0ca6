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
memory maps, so streaming a corpus larger than memory keeps the process memory flat.
"""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, RandomSampler

MANIFEST = "manifest.json"
FORMAT = "pertpy_gnn.compass_corpus"


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
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
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
        self._starts = np.array(
            [s["start"] for s in self.manifest["shards"]] + [self.n_cells], dtype=np.int64
        )
        self._files = []
        for s in self.manifest["shards"]:
            entry = []
            for key, dtype in (("ids", np.int32), ("values", self.value_dtype)):
                p = self.path / s[key]
                offset, shape, dt = _npy_offset(p)
                if shape != (s["n_cells"], self.seq_len) or dt != dtype:
                    raise ValueError(
                        f"{p} has shape {shape} / dtype {dt}, the manifest says {(s['n_cells'], self.seq_len)} / {np.dtype(dtype)}."
                    )
                entry.append((str(p), offset))
            self._files.append(entry)
        self._handles: dict = {}
        self._pid = None

    def __len__(self) -> int:
        return self.n_cells

    def __repr__(self) -> str:
        return f"CompassCorpus({str(self.path)!r}: {self.n_cells} cells x {self.seq_len} tokens, {len(self._files)} shards)"

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"], state["_pid"] = {}, None
        return state

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

    def _handle(self, path: str):
        if self._pid != os.getpid():  # new process (DataLoader worker, DDP rank): reopen
            self._handles, self._pid = {}, os.getpid()
        h = self._handles.get(path)
        if h is None:
            h = self._handles[path] = open(path, "rb", buffering=0)
        return h

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
        # runs of consecutive rows of one shard are read with one call each
        brk = np.flatnonzero((np.diff(shard) != 0) | (np.diff(local) != 1)) + 1
        bounds = np.concatenate([[0], brk, [idx.size]])
        for k0, k1 in zip(bounds[:-1], bounds[1:], strict=True):
            for arr, (path, offset) in zip(out, self._files[shard[k0]], strict=True):
                row = self.seq_len * arr.itemsize
                f = self._handle(path)
                f.seek(offset + int(local[k0]) * row)
                view = memoryview(arr[k0:k1]).cast("B")
                if f.readinto(view) != view.nbytes:
                    raise OSError(f"short read from {path}; the corpus files are truncated.")
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


class EpochRandomSampler(RandomSampler):
    """A random order that depends only on ``(seed, epoch)``.

    A resumed run sees the same order as an uninterrupted one. Lightning calls :meth:`set_epoch`
    before every epoch (under DDP it puts its own DistributedSampler in place of this one).
    """

    def __init__(self, data_source, seed: int = 0):
        super().__init__(data_source)
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=gen).tolist()


def make_dataloader(
    corpus: CompassCorpus,
    indices,
    *,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    seed: int = 0,
    loader_cls=DataLoader,
    sampler_cls=None,
):
    """A torch DataLoader streaming ``indices`` of ``corpus`` in batches (shuffled by ``(seed, epoch)``).

    ``loader_cls`` / ``sampler_cls`` (default :class:`EpochRandomSampler`): subclasses to use instead,
    e.g. the resumable ones of pre-training.
    """
    dataset = CompassDataset(corpus, indices)
    return loader_cls(
        dataset,  # type: ignore[arg-type]
        batch_size=batch_size,
        sampler=(sampler_cls or EpochRandomSampler)(dataset, seed) if shuffle else None,
        num_workers=num_workers,
        collate_fn=_collate,
        persistent_workers=num_workers > 0,
    )


class CompassDataModule(LightningDataModule):
    """Lightning DataModule over a corpus: train cells shuffled, validation cells in order.

    Under DDP, Lightning puts a DistributedSampler in place of the shuffling sampler, so each rank
    streams its own share of the cells.
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

    def train_dataloader(self):
        return make_dataloader(
            self.corpus,
            self.train_indices,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            seed=self.seed,
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
        )
