import gzip
import itertools
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import pertpy_gnn as pg


@pytest.fixture
def loopback(tmp_path):
    """A local HTTP server on 127.0.0.1 serving tmp_path/www (stopped after the test)."""
    www = tmp_path / "www"
    www.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(www)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def vocab():
    genes = [f"G{i}" for i in range(20)]
    return pg.pp.compass_vocab(human_genes=genes, mouse_genes=["Mm1", "Mm2"])


def test_loaders_on_loopback(tmp_path, loopback):
    www, base = loopback
    (www / "trrust.tsv").write_text(
        "TF1\tG1\tActivation\t123\nTF1\tG2\tRepression\t456\nTF2\tG1\tUnknown\t789\n"
    )
    with gzip.open(www / "doro.tsv.gz", "wt") as fh:
        fh.write("tf\tconfidence\ttarget\tmor\nTF1\tA\tG1\t1\nTF1\tD\tG2\t-1\nTF2\tC\tG3\t-1\n")
    (www / "omnipath.tsv").write_text(
        "source\ttarget\tsource_genesymbol\ttarget_genesymbol\tis_stimulation\tis_inhibition\tdorothea_level\n"
        "P1\tP2\tTF1\tG1\t1\t0\tA\nP1\tP3\tTF1\tG2\t0\t1\tD;B\nP4\tP3\tTF2\tG2\t1\t0\tE\n"
    )
    (www / "hgnc.txt").write_text(
        "hgnc_id\tsymbol\tgene_group\tgene_group_id\tname\nH1\tG1\tFam A|Fam B\t1|2\tg1\nH2\tG2\tFam A\t1\tg2\nH3\tG3\t\t\tg3\n"
    )
    cache = tmp_path / "cache"
    t = pg.pp.trrust_edges(url=f"{base}/trrust.tsv", species="mouse", cache_dir=cache)
    assert t[["tf", "target", "mode"]].values.tolist() == [
        ["TF1", "G1", "Activation"],
        ["TF1", "G2", "Repression"],
        ["TF2", "G1", "Unknown"],
    ]
    assert (t["species"] == "mouse").all() and "TRRUST" in t.attrs["source"]
    d = pg.pp.dorothea_edges(url=f"{base}/doro.tsv.gz", cache_dir=cache)
    assert d[["tf", "target", "confidence"]].values.tolist() == [["TF1", "G1", "A"], ["TF2", "G3", "C"]]
    assert d["mor"].tolist() == [1.0, -1.0]
    o = pg.pp.dorothea_edges(url=f"{base}/omnipath.tsv", cache_dir=cache, confidence="AB")
    assert o[["tf", "target", "confidence", "mor"]].values.tolist() == [
        ["TF1", "G1", "A", 1.0],
        ["TF1", "G2", "B", -1.0],
    ]
    h = pg.pp.hgnc_gene_groups(url=f"{base}/hgnc.txt", cache_dir=cache)
    assert sorted(map(tuple, h[["gene", "group", "group_name"]].values.tolist())) == [
        ("G1", "1", "Fam A"),
        ("G1", "2", "Fam B"),
        ("G2", "1", "Fam A"),
    ]
    (www / "bad.tsv").write_text("a\tb\n1\t2\n")
    with pytest.raises(ValueError, match="not a DoRothEA table"):
        pg.pp.dorothea_edges(url=f"{base}/bad.tsv", cache_dir=cache)


def test_real_grn_and_family_files(shared_data):
    t = pg.pp.trrust_edges(shared_data / "grn" / "trrust_rawdata.human.tsv")
    assert len(t) == 9396 and {"tf", "target", "mode", "species"} <= set(t.columns)
    d = pg.pp.dorothea_edges(shared_data / "grn" / "dorothea_mm.tsv.gz", species="mouse")
    assert set(d["confidence"]) == {"A", "B", "C"} and (d["species"] == "mouse").all()
    g = pg.pp.hgnc_gene_groups(shared_data / "gene_families" / "hgnc_complete_set.txt.gz")
    assert g["group"].nunique() == 1673
    assert "HOXA1" in set(g.loc[g["group_name"] == "HOXL subclass homeoboxes", "gene"])


def test_family_pairs():
    groups = pd.DataFrame(
        {
            "gene": ["A", "B", "C", "A", "D", "E", "F", "G", "H"],
            "group": ["1", "1", "1", "2", "2", "3", "3", "3", "3"],
        }
    )
    p = pg.pp.family_pairs(groups)
    expected = {("A", "B"), ("A", "C"), ("B", "C"), ("A", "D")} | set(itertools.combinations("EFGH", 2))
    assert set(map(tuple, p[["gene_a", "gene_b"]].values.tolist())) == expected and len(p) == len(expected)
    small = pg.pp.family_pairs(groups, max_group_size=3)
    assert len(small) == 4


def test_gene2vec_separates_cliques():
    a = [f"A{i}" for i in range(8)]
    b = [f"B{i}" for i in range(8)]
    pairs = pd.DataFrame(
        list(itertools.combinations(a, 2)) + list(itertools.combinations(b, 2)) + [("A0", "B0")]
    )
    emb = pg.pp.gene2vec(pairs, dim=16, epochs=100, seed=0)
    assert emb.shape == (16, 16)
    x = emb.to_numpy()
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    cos = pd.DataFrame(x @ x.T, index=emb.index, columns=emb.index)
    within = (
        cos.loc[a, a].to_numpy()[np.triu_indices(8, 1)].mean()
        + cos.loc[b, b].to_numpy()[np.triu_indices(8, 1)].mean()
    ) / 2
    between = cos.loc[a, b].to_numpy().mean()
    assert within > between + 0.5
    again = pg.pp.gene2vec(pairs, dim=16, epochs=100, seed=0)
    assert np.allclose(again.to_numpy(), emb.to_numpy())  # deterministic


def test_coexpression_pairs_match_bruteforce():
    rng = np.random.default_rng(0)
    n = 400
    base = rng.poisson(5, n).astype(float)
    counts = np.column_stack(
        [
            base,
            base * 2 + rng.poisson(0.3, n),  # tracks gene 0
            rng.poisson(5, n),  # independent
            base * (rng.random(n) < 0.5),  # same values, expressed in half the cells
            (rng.random(n) < 0.01) * 3.0,  # too rare
            rng.poisson(1, n) + 0.0,
        ]
    )
    counts[:, :3] *= rng.random((n, 1)) < 0.7  # dropouts
    adata = ad.AnnData(sp.csr_matrix(counts), var=pd.DataFrame(index=[f"G{i}" for i in range(6)]))
    allp = pg.pp.coexpression_pairs(
        adata, threshold=-2, min_cells=10, n_cells=n, species="human", block_size=2
    )
    x = np.log1p(counts / counts.sum(1, keepdims=True).clip(1e-12) * 1e4)
    for row in allp.itertuples():
        i, j = int(row.gene_a[1:]), int(row.gene_b[1:])
        both = (counts[:, i] > 0) & (counts[:, j] > 0)
        assert row.n_cells == both.sum()
        assert row.r == pytest.approx(np.corrcoef(x[both, i], x[both, j])[0, 1], abs=1e-3)  # float32 products
    assert "G4" not in set(allp["gene_a"]) | set(allp["gene_b"])
    assert len(allp) == 10  # 5 genes expressed in >= 10 cells -> all 10 pairs
    strong = pg.pp.coexpression_pairs(adata, threshold=0.8, n_cells=n, species="human")
    pairs = set(map(tuple, strong[["gene_a", "gene_b"]].values.tolist()))
    assert ("G0", "G1") in pairs and ("G0", "G3") in pairs and ("G0", "G2") not in pairs
    assert (strong["species"] == "human").all()


def test_compass_priors_alignment(vocab):
    grn = pd.DataFrame(
        {
            "tf": ["G1", "G1", "G2", "Mm1", "NOPE"],
            "target": ["G3", "G4", "G3", "Mm2", "G1"],
            "species": ["human"] * 3 + ["mouse", "human"],
        }
    )
    family = pd.DataFrame({"gene": ["G6", "G7", "G8"], "group": ["f", "f", "f"]})
    promoter = pd.DataFrame(np.arange(6, dtype=float).reshape(2, 3), index=["G9", "G10"])
    promoter.attrs["source"] = "DNABERT test"
    priors = pg.pp.compass_priors(vocab, grn=grn, family=family, promoter=promoter, dim=8, epochs=2)
    assert set(priors) == {"grn", "family", "promoter"}
    g = priors["grn"]
    assert g.matrix.shape == (len(vocab), 8) and g.matrix.dtype == np.float32
    covered = set(vocab.tokens[g.covered])
    assert covered == {"G1", "G2", "G3", "G4", "mouse:Mm1", "mouse:Mm2"}
    assert np.all(g.matrix[~g.covered] == 0) and np.all(np.abs(g.matrix[g.covered]).sum(1) > 0)
    assert "gene2vec of 4 pairs" in g.source
    assert set(vocab.tokens[priors["family"].covered]) == {"G6", "G7", "G8"}
    p = priors["promoter"]
    assert p.dim == 3 and p.source == "DNABERT test"
    assert np.array_equal(p.matrix[vocab.token_id("G10")], [3, 4, 5])
    with pytest.raises(ValueError, match="No grn pair has both genes"):
        pg.pp.compass_priors(vocab, grn=pd.DataFrame({"tf": ["X"], "target": ["Y"]}))
