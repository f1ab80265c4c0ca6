import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import pertpy_gnn as pg
from pertpy_gnn.compass import CompassCorpus, CompassDataset


@pytest.fixture
def vocab():
    # Mm0..Mm4 are 1:1 orthologs of H0..H4
    o = pd.DataFrame(
        {
            "class_key": [str(i) for i in range(5)] * 2,
            "species": ["human"] * 5 + ["mouse"] * 5,
            "symbol": [f"H{i}" for i in range(5)] + [f"Mm{i}" for i in range(5)],
            "one_to_one": True,
        }
    )
    return pg.pp.compass_vocab(
        o, human_genes=[f"H{i}" for i in range(30)], mouse_genes=[f"Mm{i}" for i in range(10)]
    )


def _counts(rng, n, g, p=0.4):
    return rng.poisson(20, (n, g)).astype(np.float32) * (rng.random((n, g)) < p)


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    human_genes = [f"H{i}" for i in range(25)] + [
        "NOT_A_GENE",
        "H3",
    ]  # an unmapped gene and a duplicate symbol
    hx = _counts(rng, 13, len(human_genes))
    human = ad.AnnData(sp.csr_matrix(hx), var=pd.DataFrame(index=pd.Index(human_genes)))
    human.var_names_make_unique()
    human.var["symbol"] = human_genes
    mouse_genes = [f"Mm{i}" for i in range(10)]
    mx = _counts(rng, 9, 10, p=0.8)
    mouse = ad.AnnData(sp.csr_matrix(mx), var=pd.DataFrame(index=mouse_genes))
    path = tmp_path / "mouse.h5ad"
    mouse.write_h5ad(path)
    return human, path, hx, mx, human_genes, mouse_genes


def _expected(vocab, xs, genes, species, medians, max_len, kinds):
    """Naive per-cell tokenization."""
    rows_ids, rows_vals = [], []
    for x, gs, sp_, kind in zip(xs, genes, species, kinds, strict=True):
        tok = vocab.lookup(gs, sp_)
        for cell in x:
            norm = cell / cell.sum() * 1e4 if kind == "counts" else np.expm1(cell)
            agg = {}
            for t, v in zip(tok, norm, strict=True):
                if t >= 0 and v > 0:
                    agg[t] = agg.get(t, 0.0) + v
            items = sorted(
                ((np.log1p(v / medians[vocab.tokens[t]]), t) for t, v in agg.items()),
                key=lambda z: (-z[0], z[1]),
            )[:max_len]
            ids = np.zeros(max_len + 1, np.int64)
            vals = np.zeros(max_len + 1)
            ids[0] = vocab.species_token(sp_)
            for k, (v, t) in enumerate(items):
                ids[k + 1], vals[k + 1] = t, v
            rows_ids.append(ids)
            rows_vals.append(vals)
    return np.array(rows_ids), np.array(rows_vals)


def test_tokenize_matches_naive(tmp_path, vocab, data):
    human, path, hx, mx, hg, mg = data
    corpus = pg.pp.compass_tokenize(
        [{"data": human, "gene_symbols": "symbol"}, path],
        tmp_path / "corpus",
        vocab,
        max_len=8,
        chunk_size=4,
        shard_size=7,
        progress_bar=False,
    )
    assert isinstance(corpus, CompassCorpus) and len(corpus) == 22 and corpus.seq_len == 9
    m = json.loads((tmp_path / "corpus" / "manifest.json").read_text())
    assert [s["n_cells"] for s in m["shards"]] == [7, 7, 7, 1]
    src = corpus.sources
    assert src["species"].tolist() == ["human", "mouse"]  # guessed from the gene names
    assert src["start"].tolist() == [0, 13] and src["n_mapped"].tolist() == [26, 10]
    # medians: close to the exact median of the non-zero normalized values of each token
    norm_h = hx / hx.sum(1, keepdims=True) * 1e4
    norm_m = mx / mx.sum(1, keepdims=True) * 1e4
    h0 = np.concatenate(
        [norm_h[:, 0][norm_h[:, 0] > 0], norm_m[:, 0][norm_m[:, 0] > 0]]
    )  # H0 is shared with Mm0
    m7 = norm_m[:, 7][norm_m[:, 7] > 0]
    for token, values in (("H0", h0), ("mouse:Mm7", m7)):
        v = np.sort(values)  # between the middle order statistics, up to the histogram bin (10% in log space)
        assert v[(v.size - 1) // 2] * 0.9 <= corpus.gene_medians[token] <= v[v.size // 2] * 1.1
    ids, vals = corpus.read(np.arange(len(corpus)))
    exp_ids, exp_vals = _expected(
        vocab, [hx, mx], [hg, mg], ["human", "mouse"], corpus.gene_medians, 8, ["counts"] * 2
    )
    assert np.array_equal(ids, exp_ids)
    assert np.allclose(vals.astype(float), exp_vals, rtol=2e-3, atol=2e-3)
    assert ids.dtype == np.int32 and vals.dtype == np.float16
    assert (ids[:13, 0] == 2).all() and (ids[13:, 0] == 3).all()
    # random access in any order, duplicates allowed, across shards
    order = np.array([21, 3, 3, 14, 0, 7, 6])
    i2, v2 = corpus.read(order)
    assert np.array_equal(i2, ids[order]) and np.array_equal(v2, vals[order])
    # the dataset hands whole batches to the DataLoader
    ds = CompassDataset(corpus, np.array([5, 20]))
    batch = ds.__getitems__([1, 0])
    n = int((ids[[20, 5]] > 0).sum(1).max())  # columns that are padding in both cells are dropped
    assert batch["ids"].dtype == torch.int64 and tuple(batch["values"].shape) == (2, n)
    assert np.array_equal(batch["ids"].numpy(), ids[[20, 5], :n]) and not ids[[20, 5], n:].any()
    short = CompassDataset(corpus, np.arange(22)).__getitems__([0])["ids"]
    assert short.shape[1] == (ids[0] > 0).sum()
    # reusing the medians reproduces the corpus
    again = pg.pp.compass_tokenize(
        [{"data": human, "gene_symbols": "symbol"}, path],
        tmp_path / "again",
        vocab,
        gene_medians=corpus.gene_medians,
        max_len=8,
        progress_bar=False,
    )
    assert np.array_equal(again.read(np.arange(22))[0], ids)
    assert again.manifest["params"]["medians_given"]


def test_tokenize_log1p_input_and_errors(tmp_path, vocab, data, caplog):
    human, path, hx, *_ = data
    logx = np.log1p(hx / hx.sum(1, keepdims=True) * 1e4)
    lg = ad.AnnData(sp.csr_matrix(logx), var=human.var.copy())
    c = pg.pp.compass_tokenize(
        {"data": lg, "gene_symbols": "symbol", "input_kind": "log1p"},
        tmp_path / "c",
        vocab,
        species="human",
        max_len=5,
        progress_bar=False,
    )
    ref = pg.pp.compass_tokenize(
        {"data": human, "gene_symbols": "symbol"},
        tmp_path / "r",
        vocab,
        species="human",
        max_len=5,
        progress_bar=False,
    )
    assert np.array_equal(c.read(np.arange(13))[0], ref.read(np.arange(13))[0])
    with pytest.raises(ValueError, match="looks log-transformed.*input_kind='log1p'"):
        pg.pp.compass_tokenize(
            {"data": lg, "gene_symbols": "symbol"}, tmp_path / "w", vocab, max_len=5, progress_bar=False
        )
    with pytest.raises(FileExistsError, match="overwrite=True"):
        pg.pp.compass_tokenize(human, tmp_path / "r", vocab, gene_symbols="symbol", progress_bar=False)
    pg.pp.compass_tokenize(
        human, tmp_path / "r", vocab, gene_symbols="symbol", max_len=3, overwrite=True, progress_bar=False
    )
    assert CompassCorpus(tmp_path / "r").seq_len == 4
    neg = ad.AnnData(sp.csr_matrix(-np.ones((2, 3), np.float32)), var=pd.DataFrame(index=["H1", "H2", "H3"]))
    with pytest.raises(ValueError, match="negative values"):
        pg.pp.compass_tokenize(neg, tmp_path / "n", vocab, progress_bar=False)
    with pytest.raises(ValueError, match="input_kind must be one of"):
        pg.pp.compass_tokenize(human, tmp_path / "n", vocab, input_kind="tpm", progress_bar=False)
    with pytest.raises(ValueError, match="source dict needs 'data'"):
        pg.pp.compass_tokenize({"adata": human}, tmp_path / "n", vocab, progress_bar=False)
    with pytest.raises(FileNotFoundError, match="not a tokenized corpus"):
        CompassCorpus(tmp_path / "nothing")


def test_tokenize_norman(tmp_path, norman):
    vocab = pg.pp.compass_vocab(human_genes=norman.var_names)
    c = pg.pp.compass_tokenize(
        {"data": norman, "input_kind": "log1p"}, tmp_path / "n", vocab, max_len=64, progress_bar=False
    )
    ids, vals = c.read(np.arange(len(c)))
    nnz = np.diff(norman.X.tocsr().indptr)
    assert np.array_equal((ids[:, 1:] > 0).sum(1), np.minimum(nnz, 64))
    # the first gene token of a cell is its highest expm1(x) / median gene
    x = np.expm1(norman.X[0].toarray().ravel())
    med = c.gene_medians.reindex(norman.var_names).to_numpy()
    assert vocab.tokens[ids[0, 1]] == norman.var_names[np.nanargmax(np.where(x > 0, x / med, -1))]
    assert (np.diff(vals[:, 1:].astype(float), axis=1)[(ids[:, 2:] > 0)] <= 1e-3).all()  # non-increasing


def test_tokenize_refuses_nan(tmp_path, vocab, data):
    human, *_ = data
    bad = human.copy()
    x = bad.X.toarray() if sp.issparse(bad.X) else np.array(bad.X, dtype=np.float32)
    x[0, np.flatnonzero(x[0])[0]] = np.nan
    bad.X = sp.csr_matrix(x)
    with pytest.raises(ValueError, match="NaN or infinite"):
        pg.pp.compass_tokenize(bad, tmp_path / "nan", vocab, gene_symbols="symbol", progress_bar=False)
