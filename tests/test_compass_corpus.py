"""Streaming a tokenized GeneCompass corpus: bounded open files, reads identical to the files on disk."""

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import pertpy_gnn as pg
from pertpy_gnn.compass import CompassCorpus
from pertpy_gnn.compass._corpus import MAX_OPEN_FILES, EpochRandomSampler, make_dataloader
from pertpy_gnn.compass._training import ReleaseFreedMemory, _malloc_trim

N_CELLS, SHARD = 150, 2  # 75 shards = 150 files


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory) -> Path:
    """A corpus of 75 small shards (cells of varying length, so batches are trimmed differently)."""
    rng = np.random.default_rng(0)
    genes = [f"G{i}" for i in range(30)]
    x = rng.poisson(5, (N_CELLS, 30)).astype(np.float32) * (
        rng.random((N_CELLS, 30)) < rng.random((N_CELLS, 1))
    )
    x[:, 0] += 1  # no empty cell
    adata = ad.AnnData(sp.csr_matrix(x), var=pd.DataFrame(index=genes))
    path = tmp_path_factory.mktemp("corpus") / "corpus"
    pg.pp.compass_tokenize(
        adata,
        path,
        pg.pp.compass_vocab(human_genes=genes),
        species="human",
        max_len=12,
        shard_size=SHARD,
        progress_bar=False,
    )
    return path


def on_disk(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every row of the corpus, straight from the shard files."""
    ids = np.concatenate([np.load(p) for p in sorted(path.glob("shard_*_ids.npy"))])
    values = np.concatenate([np.load(p) for p in sorted(path.glob("shard_*_values.npy"))])
    return ids, values


def open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 1024


@pytest.mark.parametrize("bound", [1, 3, 1000])
def test_reads_are_bitwise_the_files_whatever_the_bound(many_shards, bound):
    ids, values = on_disk(many_shards)
    assert ids.shape == (N_CELLS, 13) and values.dtype == np.float16 and (ids[:, 1:] == 0).any()
    corpus = CompassCorpus(many_shards, max_open_files=bound)
    assert corpus.n_shards == N_CELLS // SHARD and corpus.max_open_files == bound
    rng = np.random.default_rng(1)
    cases = [
        np.arange(N_CELLS),  # every row, in order: one run per shard
        np.arange(N_CELLS)[::-1],
        rng.integers(0, N_CELLS, 64),  # random, with duplicates
        np.array([5, 4, 5, 149, 0, 0, 77, 76, 75]),
        np.arange(30, 71),  # a run across shards
        np.array([], dtype=np.int64),
    ]
    for idx in cases:
        got_ids, got_values = corpus.read(idx)
        assert got_ids.dtype == np.int32 and got_values.dtype == np.float16
        assert np.array_equal(got_ids, ids[idx])
        assert np.array_equal(got_values.view(np.uint16), values[idx].view(np.uint16))  # same bits
        assert len(corpus._handles) <= bound
    corpus.close()
    assert not corpus._handles
    assert np.array_equal(corpus.read([3])[0], ids[[3]])  # reopens after close
    with CompassCorpus(many_shards) as c:
        c.read(np.arange(N_CELLS))
        assert len(c._handles) == min(2 * corpus.n_shards, MAX_OPEN_FILES)
    assert not c._handles
    with pytest.raises(ValueError, match="max_open_files"):
        CompassCorpus(many_shards, max_open_files=0)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open files in /proc/self/fd (Linux)")
def test_streaming_more_shards_than_the_bound_keeps_open_files_bounded(many_shards):
    ids, values = on_disk(many_shards)
    bound = 8
    corpus = CompassCorpus(many_shards, max_open_files=bound)
    assert 2 * corpus.n_shards > 10 * bound
    before = open_files()
    loader = make_dataloader(corpus, np.arange(N_CELLS), batch_size=16, shuffle=True, seed=3)
    order = np.array(list(loader.sampler))
    assert sorted(order.tolist()) == list(range(N_CELLS))  # one shuffled epoch
    peak, seen = before, 0
    for k, batch in enumerate(loader):
        peak = max(peak, open_files())
        rows = order[16 * k : 16 * (k + 1)]
        n = batch["ids"].shape[1]
        assert np.array_equal(batch["ids"].numpy(), ids[rows, :n]) and not ids[rows, n:].any()
        assert torch.equal(batch["values"], torch.from_numpy(values[rows, :n].astype(np.float32)))
        seen += len(rows)
    assert seen == N_CELLS
    assert 0 < peak - before <= bound  # files were opened, never more than the bound
    corpus.close()
    assert open_files() == before
    # without a bound every file would be open at once
    unbounded = CompassCorpus(many_shards, max_open_files=10_000)
    unbounded.read(np.arange(N_CELLS))
    assert open_files() - before == 2 * corpus.n_shards
    del unbounded  # closes its files
    assert open_files() == before


def test_epoch_order_does_not_depend_on_chunking():
    """The sampler hands out positions a chunk at a time; the order is torch.randperm's, as before."""
    n = 70_000  # more than one chunk
    sampler = EpochRandomSampler(range(n), seed=2)
    sampler.set_epoch(5)
    gen = torch.Generator().manual_seed(2 * 1_000_003 + 5)
    assert list(sampler) == torch.randperm(n, generator=gen).tolist()


def test_release_freed_memory_cadence_and_effect():
    cb = ReleaseFreedMemory(every_n_steps=3)
    calls = []
    cb._trim = calls.append
    for i in range(9):
        cb.on_train_batch_end(None, None, None, None, i)
    assert calls == [0, 0, 0]
    off = ReleaseFreedMemory(every_n_steps=0)
    off._trim = calls.append
    off.on_train_batch_end(None, None, None, None, 0)
    assert len(calls) == 3
    trim = _malloc_trim()
    if trim is None or not Path("/proc/self/status").is_file():
        pytest.skip("needs glibc's malloc_trim and /proc/self/status")
    # freeing every other small block leaves glibc's heap fragmented: the memory stays resident
    blocks = [np.ones(100_000 // 8) for _ in range(2000)]  # 200 MB below the mmap threshold
    del blocks[::2]
    before = rss_mb()
    ReleaseFreedMemory(every_n_steps=1).on_train_batch_end(None, None, None, None, 0)
    assert before - rss_mb() > 50  # ~100 MB handed back
    del blocks


def test_training_returns_freed_memory(many_shards, monkeypatch):
    """GeneCompass.train puts the callback among the trainer's callbacks."""
    from pertpy_gnn.compass import GeneCompass

    corpus = CompassCorpus(many_shards)
    model = GeneCompass(vocab=corpus.vocab, seq_len=corpus.seq_len, n_layers=1, d_model=16, n_heads=2)
    seen = []

    def runner(model, **kw):
        seen.extend(kw["callbacks"])
        return lambda: None  # nothing is trained

    monkeypatch.setattr(GeneCompass, "_train_runner_cls", staticmethod(runner))
    model.train(corpus, accelerator="cpu", progress_bar=False)
    assert [type(c) for c in seen if isinstance(c, ReleaseFreedMemory)] == [ReleaseFreedMemory]


@pytest.mark.parametrize("n", [10, 12, 2])
def test_sampler_shares_an_epoch_over_ranks_as_distributed_sampler(n):
    """Each rank takes every num_replicas-th position of the order padded by its start (torch's rule)."""
    gen = torch.Generator().manual_seed(7 * 1_000_003 + 1)
    order = torch.randperm(n, generator=gen).tolist()
    size = -(-n // 3) * 3
    padded = (order * 3)[:size]
    shares = []
    for rank in range(3):
        s = EpochRandomSampler(range(n), seed=7, num_replicas=3, rank=rank)
        s.set_epoch(1)
        assert len(s) == size // 3 and list(s) == padded[rank::3]
        shares += list(s)
    assert sorted(set(shares)) == list(range(n))
    in_order = EpochRandomSampler(range(n), shuffle=False, num_replicas=3, rank=2)
    assert list(in_order) == (list(range(n)) * 3)[:size][2::3]
    with pytest.raises(ValueError, match="rank"):
        EpochRandomSampler(range(n), num_replicas=2, rank=2)
