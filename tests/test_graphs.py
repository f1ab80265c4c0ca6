import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import pertpy_gnn as pg
from pertpy_gnn.pp import _graphs


def _random_annotations(n_genes=40, n_terms=25, seed=0):
    rng = np.random.default_rng(seed)
    member = rng.random((n_genes, n_terms)) < 0.15
    member[np.arange(n_genes), rng.integers(0, n_terms, n_genes)] = True  # every gene annotated
    g, t = np.nonzero(member)
    genes = np.array([f"G{i:03d}" for i in range(n_genes)])
    table = pd.DataFrame({"gene": genes[g], "go_id": [f"GO:{j:07d}" for j in t]})
    return table, member


def _jaccard(member):
    m = member.astype(float)
    inter = m @ m.T
    union = m.sum(1)[:, None] + m.sum(1)[None, :] - inter
    return inter / union


def _edges_by_target(graph):
    src, dst = graph["edge_index"]
    return {t: dict(zip(src[dst == t], graph["edge_weight"][dst == t], strict=True)) for t in np.unique(dst)}


def _check_top_k(graph, sim, k, threshold):
    """Every node's incoming edges are its k most similar other nodes above the threshold."""
    n = sim.shape[0]
    edges = _edges_by_target(graph)
    np.fill_diagonal(sim, -np.inf)
    for t in range(n):
        expect = np.sort(sim[t][sim[t] > threshold])[::-1][:k]
        got = edges.get(t, {})
        assert len(got) == len(expect)
        np.testing.assert_allclose(np.sort(list(got.values()))[::-1], expect, rtol=1e-5, atol=1e-6)
        for s, w in got.items():
            assert s != t
            assert w == pytest.approx(sim[t, s], rel=1e-5, abs=1e-6)


def test_go_graph_matches_brute_force_jaccard(monkeypatch):
    table, member = _random_annotations()
    monkeypatch.setattr(_graphs, "_CHUNK_ELEMENTS", 7 * 40)  # 7 genes per chunk: exercises chunking
    graph = pg.pp.go_graph(annotations=table.sample(frac=1, random_state=1), n_neighbors=5)
    assert list(graph["genes"]) == sorted(table["gene"].unique())
    assert graph["edge_index"].dtype == np.int64 and graph["edge_index"].shape[0] == 2
    assert graph["edge_weight"].dtype == np.float32
    assert graph["params"]["n_neighbors"] == 5 and graph["params"]["n_terms"] == member.any(0).sum()
    _check_top_k(graph, _jaccard(member), 5, 0.0)
    # same result without chunking
    monkeypatch.setattr(_graphs, "_CHUNK_ELEMENTS", 2**24)
    again = pg.pp.go_graph(annotations=table, n_neighbors=5)
    np.testing.assert_array_equal(again["edge_index"], graph["edge_index"])


def test_go_graph_hand_example_and_threshold():
    table = pd.DataFrame(
        {"gene": ["A", "A", "B", "B", "C", "D"], "go_id": ["t1", "t2", "t1", "t3", "t2", "t4"]}
    )
    graph = pg.pp.go_graph(annotations=table, n_neighbors=2)
    edges = _edges_by_target(graph)  # A=0, B=1, C=2, D=3
    assert edges[0] == {1: pytest.approx(1 / 3), 2: pytest.approx(1 / 2)}
    assert edges[2] == {0: pytest.approx(1 / 2)}  # C shares nothing with B or D: no zero-weight edges
    assert 3 not in edges  # D shares no term with anyone
    high = pg.pp.go_graph(annotations=table, n_neighbors=2, threshold=0.4)
    assert set(map(tuple, high["edge_index"].T)) == {(2, 0), (0, 2)}


def test_go_graph_stores_in_uns_h5ad_roundtrip(tmp_path):
    table, _ = _random_annotations()
    adata = ad.AnnData(np.zeros((3, 2), dtype=np.float32))
    adata.uns["pg_go_annotations"] = table.rename(columns={"gene": "symbol"})  # 'symbol' accepted too
    graph = pg.pp.go_graph(adata, n_neighbors=4)
    assert adata.uns["pg_go_graph"] is graph
    assert graph["params"]["source"] == "adata.uns['pg_go_annotations']"
    with pytest.raises(ValueError, match="overwrite=True"):
        pg.pp.go_graph(adata, n_neighbors=4)
    pg.pp.go_graph(adata, n_neighbors=3, overwrite=True)
    assert adata.uns["pg_go_graph"]["params"]["n_neighbors"] == 3
    adata.write_h5ad(tmp_path / "g.h5ad")
    back = ad.read_h5ad(tmp_path / "g.h5ad").uns["pg_go_graph"]
    ei, w, genes = pg.pp.graph_tensors(back)
    ref = adata.uns["pg_go_graph"]
    assert ei.dtype == torch.long and w.dtype == torch.float32
    np.testing.assert_array_equal(ei.numpy(), ref["edge_index"])
    np.testing.assert_array_equal(w.numpy(), ref["edge_weight"])
    assert list(genes) == list(ref["genes"])


def test_go_graph_errors(monkeypatch):
    with pytest.raises(ValueError, match="columns 'gene' and 'go_id'"):
        pg.pp.go_graph(annotations=pd.DataFrame({"name": ["A"], "term": ["t"]}))
    with pytest.raises(ValueError, match="positive integer"):
        pg.pp.go_graph(annotations=pd.DataFrame({"gene": ["A"], "go_id": ["t"]}), n_neighbors=0)
    with pytest.raises(ValueError, match="empty"):
        pg.pp.go_graph(annotations=pd.DataFrame({"gene": [None], "go_id": ["t"]}))
    # neither annotations, nor adata.uns, nor pg.datasets.go_annotations: a clear error
    monkeypatch.delattr(pg.datasets, "go_annotations", raising=False)
    with pytest.raises(ValueError, match="pass `annotations=`"):
        pg.pp.go_graph(ad.AnnData(np.zeros((2, 2), dtype=np.float32)))


def test_go_graph_on_real_annotations(shared_data):
    table = pd.read_csv(
        shared_data / "go" / "human_gene2go_orgHsEgDb_20220912.tsv.gz", sep="\t", usecols=["symbol", "go_id"]
    )
    keep = np.sort(table["symbol"].unique())[:1500]
    table = table[table["symbol"].isin(keep)]
    graph = pg.pp.go_graph(annotations=table, n_neighbors=20)
    assert len(graph["genes"]) == 1500
    counts = np.bincount(graph["edge_index"][1], minlength=1500)
    assert counts.max() == 20 and np.median(counts) == 20
    terms = table.groupby("symbol")["go_id"].agg(set)
    rng = np.random.default_rng(0)
    for e in rng.choice(graph["edge_weight"].size, 50, replace=False):
        s, t = graph["genes"][graph["edge_index"][:, e]]
        expect = len(terms[s] & terms[t]) / len(terms[s] | terms[t])
        assert graph["edge_weight"][e] == pytest.approx(expect, rel=1e-6)


def test_graph_tensors_reindex():
    graph = {
        "genes": np.array(["A", "B", "C"], dtype=object),
        "edge_index": np.array([[0, 1, 2], [1, 2, 0]]),
        "edge_weight": np.array([0.1, 0.2, 0.3], dtype=np.float32),
    }
    ei, w, genes = pg.pp.graph_tensors(graph, genes=["C", "X", "A"])
    assert list(genes) == ["C", "X", "A"]
    assert ei.tolist() == [[0], [2]] and w.tolist() == [pytest.approx(0.3)]  # only C -> A survives
    with pytest.raises(ValueError, match="duplicates"):
        pg.pp.graph_tensors(graph, genes=["A", "A"])


@pytest.fixture
def norman_split(norman):
    genes = {g for c in norman.obs["condition"].unique() for g in c.split("+")}
    pg.pp.parse_perturbations(norman, perturbation_key="condition", gene_universe=genes)
    pg.pp.split_perturbations(norman, seed=0)
    return norman


def test_coexpression_matches_numpy_corrcoef(norman_split):
    adata = norman_split
    graph = pg.pp.coexpression_graph(adata, threshold=0.1, n_neighbors=10)
    assert adata.uns["pg_coexpression_graph"] is graph
    assert list(graph["genes"]) == list(adata.var_names)
    train = (adata.obs["pg_split"] == "train").to_numpy()
    assert graph["params"]["n_cells"] == train.sum() < adata.n_obs
    x = adata.X[train].toarray().astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.corrcoef(x, rowvar=False)
    constant = x.std(0) == 0
    r[constant] = -np.inf
    r[:, constant] = -np.inf
    assert graph["edge_weight"].size > 100
    assert not np.isin(graph["edge_index"], np.flatnonzero(constant)).any()
    assert np.isfinite(graph["edge_weight"]).all()
    _check_top_k(graph, r, 10, 0.1)


def test_coexpression_dense_and_sparse_paths_agree(monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.poisson(0.8, (300, 30)).astype(np.float32)
    x[:, :10] += x[:, [10]] * 2  # a correlated block
    x[:, 29] = 3.0  # constant, non-zero
    x[:, 28] = 0.0  # constant zero
    x = np.log1p(x)
    graphs = []
    for matrix, density in ((x, 0.0), (sp.csr_matrix(x), 0.0), (sp.csr_matrix(x), 100.0)):
        monkeypatch.setattr(_graphs, "_CHUNK_ELEMENTS", 64 * 30)  # 64 cells per block
        monkeypatch.setattr(_graphs, "_STRIP_GENES", 8)  # 3 gene strips
        monkeypatch.setattr(_graphs, "_SPARSE_DENSITY", density)  # 0: dense blocks, 100: sparse Gram
        adata = ad.AnnData(matrix)
        graphs.append(pg.pp.coexpression_graph(adata, n_neighbors=5, threshold=0.2, split_key=None))
    for g in graphs[1:]:
        np.testing.assert_array_equal(g["edge_index"], graphs[0]["edge_index"])
        np.testing.assert_allclose(g["edge_weight"], graphs[0]["edge_weight"], rtol=1e-5)
    r = np.corrcoef(x[:, :28], rowvar=False)
    r = np.pad(r, ((0, 2), (0, 2)), constant_values=-np.inf)
    _check_top_k(graphs[0], r, 5, 0.2)
    assert not np.isin(graphs[0]["edge_index"], [28, 29]).any()


def test_coexpression_absolute_and_warnings(caplog):
    rng = np.random.default_rng(1)
    base = rng.normal(size=(200, 1))
    x = np.hstack([base, -base + 0.1 * rng.normal(size=(200, 1)), rng.normal(size=(200, 3))]).astype(
        np.float32
    )
    adata = ad.AnnData(x + 5)
    with caplog.at_level(logging.WARNING, logger="pertpy_gnn"):
        signed = pg.pp.coexpression_graph(adata, n_neighbors=2, threshold=0.4)
    assert "uses all cells" in caplog.text
    assert signed["edge_weight"].size == 0  # genes 0 and 1 are anti-correlated
    assert "graph is empty" in caplog.text
    absolute = pg.pp.coexpression_graph(adata, n_neighbors=2, threshold=0.4, absolute=True, key_added="abs")
    assert set(map(tuple, absolute["edge_index"].T)) == {(0, 1), (1, 0)}
    assert absolute["edge_weight"].min() > 0.9
    adata.obs["pg_split"] = pd.Categorical(["test"] * 199 + ["train"])
    with pytest.raises(ValueError, match="at least 2"):
        pg.pp.coexpression_graph(adata, overwrite=True)


@pytest.mark.parametrize("sparse", [False, True])
def test_covariance_of_selected_rows_in_blocks(monkeypatch, sparse):
    """The covariance of a subset of cells, gathered a block at a time, is numpy's; ``x`` is not written."""
    rng = np.random.default_rng(1)
    x = np.log1p(rng.poisson(0.7, (400, 40))).astype(np.float32)
    matrix = sp.csr_matrix(x) if sparse else x.copy()
    rows = np.flatnonzero(rng.random(400) < 0.6)
    monkeypatch.setattr(_graphs, "_CHUNK_ELEMENTS", 50 * 40)  # 50 cells per block
    monkeypatch.setattr(_graphs, "_STRIP_GENES", 8)  # 5 gene strips
    monkeypatch.setattr(_graphs, "_SPARSE_DENSITY", 0.0)  # dense blocks
    cov = _graphs._covariance(matrix, rows)
    np.testing.assert_allclose(cov, np.cov(x[rows].astype(np.float64), rowvar=False), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(cov, cov.T)
    np.testing.assert_array_equal(matrix.toarray() if sparse else matrix, x)


@pytest.mark.parametrize("chunk", [50 * 40, 10 * 40])
def test_covariance_gene_strips_and_offset_data(monkeypatch, chunk):
    """One genes x genes product or gene strips (where it would not fit a block); data far from 0 stays exact."""
    rng = np.random.default_rng(2)
    x = (np.log1p(rng.poisson(0.7, (400, 40))) + 50.0 * rng.random(40)).astype(np.float32)
    x[:200] += 3.0  # the first block's mean is off the mean of all rows
    monkeypatch.setattr(_graphs, "_CHUNK_ELEMENTS", chunk)
    monkeypatch.setattr(_graphs, "_STRIP_GENES", 8)
    monkeypatch.setattr(_graphs, "_SPARSE_DENSITY", 0.0)
    assert _graphs._gene_strips(40).size - 1 == (1 if chunk >= 40 * 40 else 4)
    for matrix in (x, sp.csr_matrix(x)):
        cov = _graphs._covariance(matrix)
        np.testing.assert_allclose(cov, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(cov, cov.T)
