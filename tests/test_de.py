import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from mudata import MuData

import pertpy_gnn as pg

GO_TABLE = "go/human_gene2go_orgHsEgDb_20220912.tsv.gz"
CHECKED = ["KLF1", "MAP2K6", "KLF1+MAP2K6", "CBL+CNN1", "MAPK1+TGFBR2", "TMSB4X"]


@pytest.fixture
def norman_parsed(norman, shared_data):
    universe = set(pd.read_csv(shared_data / GO_TABLE, sep="\t", usecols=["symbol"])["symbol"]) | {"IER5L"}
    pg.pp.parse_perturbations(norman, perturbation_key="condition", gene_universe=universe)
    return norman


@pytest.fixture(scope="module")
def small() -> ad.AnnData:
    adata = pg.datasets.simulate_perturbseq(
        n_genes=200, n_singles=10, n_doubles=8, n_cells_per_perturbation=40, n_control=300, counts_layer=False
    )
    pg.pp.parse_perturbations(adata)
    return adata


def test_equals_scanpy_t_test_on_norman(norman_parsed):
    import scanpy as sc

    adata = norman_parsed
    pg.pp.rank_de_genes(adata, n_genes=20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.tl.rank_genes_groups(
            adata,
            groupby="pg_perturbation",
            groups=CHECKED,
            reference="control",
            method="t-test",
            rankby_abs=True,
            n_genes=20,
            use_raw=False,
        )
    ref = adata.uns["rank_genes_groups"]
    de = adata.uns["pg_de_genes"]
    for p in CHECKED:
        names = [ref["names"][i][p] for i in range(20)]
        scores = np.array([ref["scores"][i][p] for i in range(20)], dtype=np.float64)
        assert de["names"].loc[p].tolist() == names, p
        np.testing.assert_allclose(de["scores"].loc[p].to_numpy(), scores, rtol=1e-4, atol=1e-4)
    # ranked by absolute score, signed scores kept
    s = de["scores"].to_numpy()
    assert (np.diff(np.abs(s), axis=1) <= 1e-6).all() and (s < 0).any() and (s > 0).any()


def test_keys_and_shapes(norman_parsed):
    adata = norman_parsed
    pg.pp.rank_de_genes(adata, n_genes=25)
    de = adata.uns["pg_de_genes"]
    assert set(de) == {"names", "indices", "scores", "params"}
    perts = [c for c in adata.obs["pg_perturbation"].cat.categories if c != "control"]
    for key in ("names", "indices", "scores"):
        assert de[key].shape == (33, 25)
        assert list(de[key].index) == perts and list(de[key].columns) == [str(i) for i in range(25)]
    assert de["indices"].to_numpy().dtype == np.int64
    assert (adata.var_names.to_numpy()[de["indices"].to_numpy()] == de["names"].to_numpy()).all()
    assert de["params"] == {"n_genes": 25, "layer": "X", "method": "t-test (Welch)"}


def test_overwrite_refused_and_copy(small):
    adata = small.copy()
    out = pg.pp.rank_de_genes(adata, copy=True)
    assert "pg_de_genes" not in adata.uns and "pg_de_genes" in out.uns
    assert pg.pp.rank_de_genes(adata) is None
    first = adata.uns["pg_de_genes"]["names"].copy()
    with pytest.raises(ValueError, match=r"adata.uns\['pg_de_genes'\] already exists; pass `overwrite=True`"):
        pg.pp.rank_de_genes(adata, n_genes=5)
    with pytest.raises(ValueError, match="already exists"):
        pg.pp.rank_de_genes(adata, copy=True)
    pg.pp.rank_de_genes(adata, n_genes=5, overwrite=True)
    assert adata.uns["pg_de_genes"]["names"].shape[1] == 5
    pd.testing.assert_frame_equal(adata.uns["pg_de_genes"]["names"], first.iloc[:, :5])
    pg.pp.rank_de_genes(adata, n_genes=3, key_added="de3")
    assert adata.uns["de3"]["names"].shape[1] == 3


def test_layer_dense_and_capped_n_genes(small):
    adata = small.copy()
    adata.layers["neg"] = -adata.X
    adata.layers["dense"] = adata.X.toarray()
    pg.pp.rank_de_genes(adata, n_genes=500)  # more than n_vars: capped
    pg.pp.rank_de_genes(adata, layer="neg", key_added="neg")
    pg.pp.rank_de_genes(adata, layer="dense", key_added="dense")
    de, neg, dense = (adata.uns[k] for k in ("pg_de_genes", "neg", "dense"))
    assert de["names"].shape[1] == adata.n_vars and de["params"]["n_genes"] == adata.n_vars
    pd.testing.assert_frame_equal(neg["names"], de["names"].iloc[:, :20])
    np.testing.assert_allclose(neg["scores"].to_numpy(), -de["scores"].iloc[:, :20].to_numpy(), rtol=1e-5)
    np.testing.assert_allclose(dense["scores"].to_numpy(), de["scores"].iloc[:, :20].to_numpy(), rtol=1e-5)
    assert neg["params"]["layer"] == "neg"


def test_perturbed_gene_is_a_top_de_gene(small):
    """CRISPRa raises the perturbed gene itself: it ranks among the top DE genes of its single."""
    adata = small.copy()
    pg.pp.rank_de_genes(adata)
    names = adata.uns["pg_de_genes"]["names"]
    singles = [p for p in names.index if "+" not in p]
    hits = [g in set(names.loc[g]) for g in singles]
    assert np.mean(hits) >= 0.7


def test_errors(small):
    with pytest.raises(KeyError, match=r"not parsed yet: run pg.pp.parse_perturbations"):
        pg.pp.rank_de_genes(ad.AnnData(np.ones((4, 3), dtype=np.float32)))
    no_ctrl = small[small.obs["pg_perturbation"] != "control"].copy()
    with pytest.raises(ValueError, match="0 control cells"):
        pg.pp.rank_de_genes(no_ctrl)
    mdata = MuData({"rna": small.copy()})
    with pytest.raises(ValueError, match="pass `modality=`"):
        pg.pp.rank_de_genes(mdata)
    pg.pp.rank_de_genes(mdata, modality="rna")
    assert "pg_de_genes" in mdata["rna"].uns


def test_group_moments_matches_numpy():
    from pertpy_gnn.pp._de import group_moments

    rng = np.random.default_rng(0)
    x = sp.random(300, 40, density=0.3, format="csr", random_state=0, dtype=np.float32)
    codes = rng.integers(-1, 5, 300)
    n, mean, var = group_moments(x, codes, 5)
    dense = x.toarray()
    for g in range(5):
        rows = dense[codes == g]
        assert n[g] == rows.shape[0]
        np.testing.assert_allclose(mean[g], rows.mean(0), rtol=1e-6)
        np.testing.assert_allclose(var[g], rows.var(0, ddof=1), rtol=1e-5, atol=1e-9)
    for other in (dense, x.tocsc()):
        n2, mean2, var2 = group_moments(other, codes, 5)
        np.testing.assert_allclose(mean2, mean, rtol=1e-6)
        np.testing.assert_allclose(var2, var, rtol=1e-6, atol=1e-12)


def test_top_by_magnitude_is_the_stable_argsort_prefix():
    """The partial selection of the top DE genes equals a stable argsort of -|t|, ties (by column) included."""
    from pertpy_gnn.pp._de import _top_by_magnitude

    rng = np.random.default_rng(0)
    for trial in range(60):
        t = rng.integers(-3, 4, (rng.integers(1, 12), rng.integers(2, 40))).astype(np.float64)  # many ties
        if trial % 2:
            t = rng.normal(size=t.shape)
        if trial % 5 == 0:
            t[0] = 0.0  # a row of ties only
        for n in sorted({1, 3, t.shape[1] - 1, t.shape[1]}):
            expected = np.argsort(-np.abs(t), axis=1, kind="stable")[:, :n]
            np.testing.assert_array_equal(_top_by_magnitude(t, n), expected)
    assert _top_by_magnitude(np.zeros((0, 5)), 3).shape == (0, 3)
