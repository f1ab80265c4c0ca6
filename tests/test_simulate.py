import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import pertpy_gnn as pg
from pertpy_gnn.datasets._simulate import GI_TYPES, _nb_sparse_block
from pertpy_gnn.pp._de import group_moments

SMALL = {"n_genes": 200, "n_singles": 12, "n_doubles": 12, "n_cells_per_perturbation": 20, "n_control": 200}


@pytest.fixture(scope="module")
def sim() -> ad.AnnData:
    return pg.datasets.simulate_perturbseq(seed=0)


def test_default_shape_and_expression(sim):
    n_perts = 40 + 60
    assert sim.shape == (1000 + 50 * n_perts, 500)
    assert sp.isspmatrix_csr(sim.X) and sim.X.dtype == np.float32
    assert sim.var_names[0] == "G0001" and sim.var_names.is_unique
    # log-normalized per 1e4: expm1 of every row sums to 1e4, values are not integers
    row_sums = np.asarray(np.expm1(sim.X[:50].toarray()).sum(axis=1)).ravel()
    np.testing.assert_allclose(row_sums, 1e4, rtol=1e-3)
    assert 0.2 < sim.X.nnz / np.prod(sim.shape) < 0.7
    assert np.isfinite(sim.X.data).all() and sim.X.data.min() > 0 and sim.X.max() < 12
    # the counts layer is the same sparsity pattern, integer valued, and gives X back
    counts = sim.layers["counts"]
    assert np.array_equal(counts.indices, sim.X.indices) and np.all(np.mod(counts.data, 1) == 0)
    tot = np.asarray(counts.sum(axis=1)).ravel()
    np.testing.assert_allclose(sim.obs["total_counts"], tot)
    back = np.log1p(counts[:20].toarray() / tot[:20, None] * 1e4)
    np.testing.assert_allclose(back, sim.X[:20].toarray(), rtol=1e-5, atol=1e-5)
    pg.pp.validate_expression(sim)  # passes the contract's own check


def test_conditions_and_contract(sim):
    cond = sim.obs["condition"]
    assert isinstance(cond.dtype, pd.CategoricalDtype)
    counts = cond.value_counts()
    assert counts["control"] == 1000 and (counts.drop("control") == 50).all()
    singles = [c for c in cond.cat.categories if c != "control" and "+" not in c]
    doubles = [c for c in cond.cat.categories if "+" in c]
    assert len(singles) == 40 and len(doubles) == 60
    for d in doubles:  # doubles are built from the singles, genes sorted
        a, b = d.split("+")
        assert a < b and a in singles and b in singles
    assert set(singles) <= set(sim.var_names)
    ad_ = sim.copy()
    pg.pp.parse_perturbations(ad_, perturbation_key="condition")
    assert ad_.obs["pg_perturbation"].nunique() == 101
    assert (
        ad_.obs["pg_n_genes"].to_numpy() == cond.astype(str).str.count(r"\+").to_numpy() + (cond != "control")
    ).all()


def test_seeded_and_network_independent_of_cells():
    a = pg.datasets.simulate_perturbseq(**SMALL, seed=3)
    b = pg.datasets.simulate_perturbseq(**SMALL, seed=3)
    c = pg.datasets.simulate_perturbseq(**SMALL, seed=4)
    assert (a.X != b.X).nnz == 0 and a.obs_names.equals(b.obs_names)
    assert (a.X != c.X).nnz > 0
    more = pg.datasets.simulate_perturbseq(**{**SMALL, "n_cells_per_perturbation": 7}, seed=3)
    pd.testing.assert_frame_equal(a.uns["simulation"]["grn"], more.uns["simulation"]["grn"])
    pd.testing.assert_frame_equal(a.uns["simulation"]["true_delta"], more.uns["simulation"]["true_delta"])
    one = pg.datasets.simulate_perturbseq(**SMALL, seed=3, n_jobs=1, counts_layer=False)
    assert (one.X != a.X).nnz == 0 and "counts" not in one.layers


def test_ground_truth_tables(sim):
    truth = sim.uns["simulation"]
    genes = truth["genes"]
    assert list(genes.index) == list(sim.var_names)
    assert (genes["role"] == "regulator").sum() == 40
    assert (sim.var["module"].to_numpy() == genes["module"].to_numpy()).all()
    singles = [c for c in sim.obs["condition"].cat.categories if c != "control" and "+" not in c]
    assert set(genes.index[genes["role"] == "regulator"]) == set(singles)
    # every perturbed gene drives a program of its own module
    grn = truth["grn"]
    assert set(grn["kind"]) == {
        "regulator_program",
        "program_program",
        "program_target",
        "regulator_target",
        "inhibition",
    }
    rp = grn[grn["kind"] == "regulator_program"]
    hubs = truth["programs"]["hub"]
    own = {(g, hubs.iloc[genes.loc[g, "module"]]) for g in singles}
    assert own <= set(zip(rp["source"], rp["target"], strict=True))
    assert set(grn["source"]) | set(grn["target"]) <= set(sim.var_names)
    delta = truth["true_delta"]
    assert delta.shape == (100, 500) and list(delta.columns) == list(sim.var_names)
    assert truth["true_control_mean"].shape == (500,)
    assert truth["program_activity"].loc["control"].abs().max() == 0
    # the perturbed gene itself goes up (CRISPRa)
    self_delta = np.array([delta.loc[g, g] for g in singles])
    assert (self_delta > 0).all() and np.median(self_delta) > 1.0


def test_interactions_designed_and_measured(sim):
    inter = sim.uns["simulation"]["interactions"]
    doubles = [c for c in sim.obs["condition"].cat.categories if "+" in c]
    assert sorted(inter.index) == sorted(doubles)
    assert set(inter["gi_type"]) == set(GI_TYPES)
    counts = inter["gi_type"].value_counts()
    assert counts["additive"] == 15 and counts["synergy"] == 12 and counts["redundant"] == 6
    med = inter.groupby("gi_type")[["magnitude", "model_fit", "additive_deviation", "dominance"]].median()
    # additive pairs are additive; every other kind deviates from additivity
    assert med.loc["additive", "additive_deviation"] < 0.05 and med.loc["additive", "model_fit"] > 0.99
    assert (med.drop("additive")["additive_deviation"] > 0.15).all()
    # synergy is super-additive, suppression and redundancy sub-additive, neomorphism fits worst
    assert (
        med.loc["synergy", "magnitude"]
        > med.loc["additive", "magnitude"]
        > med.loc["suppression", "magnitude"]
    )
    assert med.loc["redundant", "magnitude"] < 1.0 and med.loc["suppression", "magnitude"] < 1.0
    assert med["model_fit"].idxmin() == "neomorphism"
    assert med.loc["epistasis", "dominance"] > 3 * med.loc["additive", "dominance"]
    epi = inter[inter["gi_type"] == "epistasis"]
    assert ((epi["dominant"] == epi["gene_a"]) | (epi["dominant"] == epi["gene_b"])).all()
    assert (inter.loc[inter["gi_type"] != "epistasis", "dominant"] == "").all()
    # the true delta of A+B is not the sum of those of A and B
    d = sim.uns["simulation"]["true_delta"]
    syn = inter.index[inter["gi_type"] == "synergy"][0]
    a, b = syn.split("+")
    assert np.abs(d.loc[syn] - d.loc[a] - d.loc[b]).max() > 0.2


def test_true_delta_matches_simulated_cells():
    """With many cells, the observed mean change converges to true_delta (z-scores ~ N(0, 1))."""
    adata = pg.datasets.simulate_perturbseq(
        n_genes=200,
        n_singles=8,
        n_doubles=4,
        n_modules=4,
        n_cells_per_perturbation=800,
        n_control=2000,
        seed=1,
    )
    cats = list(adata.obs["condition"].cat.categories)
    n, mean, var = group_moments(adata.X, adata.obs["condition"].cat.codes.to_numpy(), len(cats))
    obs = mean[1:] - mean[0]
    se = np.sqrt(var[1:] / n[1:, None] + var[0] / n[0])
    truth = adata.uns["simulation"]["true_delta"].loc[cats[1:]].to_numpy()
    ok = se > 1e-3
    z = (obs - truth)[ok] / se[ok]
    assert abs(z.mean()) < 0.2 and 0.85 < z.std() < 1.15
    # as correlated with the truth as the sampling error allows (a biased truth would fall below)
    r = np.corrcoef(obs.ravel(), truth.ravel())[0, 1]
    assert r > 0.95 and r > np.sqrt(truth.var() / (truth.var() + (se**2).mean())) - 0.005
    ctrl = adata.uns["simulation"]["true_control_mean"]
    z_ctrl = (mean[0] - ctrl) / np.sqrt(var[0] / n[0] + 1e-12)
    assert abs(z_ctrl.mean()) < 0.3 and 0.85 < z_ctrl.std() < 1.15 and np.abs(z_ctrl).max() < 5


def test_nb_sampler_matches_numpy():
    rng = np.random.default_rng(0)
    for m in (0.05, 1.0, 3.5, 12.0):
        mu = np.full((200, 500), m, dtype=np.float32)
        flat, cnt = _nb_sparse_block(mu, 10.0, rng)
        full = np.zeros(mu.size)
        full[flat] = cnt
        assert abs(full.mean() - m) < 4 * np.sqrt((m + m**2 / 10) / mu.size)
        np.testing.assert_allclose(full.var(), m + m**2 / 10, rtol=0.05)
        np.testing.assert_allclose((full == 0).mean(), (1 + m / 10) ** -10, atol=0.005)


def test_go_annotations_link_modules(sim):
    go = sim.uns["pg_go_annotations"]
    assert list(go.columns) == ["gene", "go_id"] and not go.duplicated().any()
    assert set(go["gene"]) == set(sim.var_names)
    terms = go.groupby("gene")["go_id"].agg(set)
    module = sim.var["module"]
    genes = sim.var_names.to_numpy()
    rng = np.random.default_rng(0)
    pairs = rng.choice(genes, size=(400, 2))

    def jac(a, b):
        return len(terms[a] & terms[b]) / len(terms[a] | terms[b])

    same = [jac(a, b) for a, b in pairs if a != b and module[a] == module[b]]
    diff = [jac(a, b) for a, b in pairs if module[a] != module[b]]
    assert np.mean(same) > 3 * np.mean(diff)


def _module_programs(adata) -> np.ndarray:
    """Boolean (module programs x genes): the genes each module program loads on (hubs included)."""
    truth = adata.uns["simulation"]
    grn, programs = truth["grn"], truth["programs"]
    hubs = pd.Index(programs.loc[programs["kind"] == "module", "hub"])
    edges = grn[(grn["kind"] == "program_target") & grn["source"].isin(hubs)]
    member = np.zeros((hubs.size, adata.n_vars), dtype=bool)
    member[hubs.get_indexer(edges["source"]), adata.var_names.get_indexer(edges["target"])] = True
    return member


def test_coexpression_graph_finds_modules(sim):
    """GEARS' co-expression graph (r > 0.4, training cells) links genes of the same module."""
    adata = sim.copy()
    pg.pp.parse_perturbations(adata, perturbation_key="condition")
    pg.pp.split_perturbations(adata, kind="simulation", seed=0)
    graph = pg.pp.coexpression_graph(adata)
    src, dst = graph["edge_index"]
    assert src.size >= 400 and (graph["edge_weight"] > 0.4).all()
    module = adata.var["module"].to_numpy()
    assert (module[src] == module[dst]).mean() > 0.9
    member = _module_programs(adata)
    assert (member[:, src] & member[:, dst]).any(axis=0).mean() > 0.99  # edges join genes of one program
    # many genes of the module programs get neighbours, most other genes none
    program = member.any(axis=0)
    has = np.zeros(adata.n_vars, dtype=bool)
    has[dst] = True
    assert has[program].mean() > 0.3 and has[program].mean() > 3 * has[~program].mean()
    # the co-expression comes from the cells' program activity: without it the graph is (nearly) empty
    flat = pg.datasets.simulate_perturbseq(program_noise=0.0, counts_layer=False, seed=0)
    pg.pp.parse_perturbations(flat, perturbation_key="condition")
    pg.pp.split_perturbations(flat, kind="simulation", seed=0)
    assert pg.pp.coexpression_graph(flat)["edge_index"].shape[1] < src.size / 10


def test_go_graph_links_modules(sim):
    graph = pg.pp.go_graph(sim.copy())
    genes = np.asarray(graph["genes"])
    assert set(genes) == set(sim.var_names)
    module = sim.var["module"].reindex(genes).to_numpy()
    src, dst = graph["edge_index"]
    assert src.size == 20 * genes.size
    assert (module[src] == module[dst]).mean() > 0.8  # chance: 1 / 8 modules


def test_h5ad_roundtrip(sim, tmp_path):
    small = pg.datasets.simulate_perturbseq(**SMALL, seed=0)
    path = tmp_path / "sim.h5ad"
    small.write_h5ad(path)
    back = ad.read_h5ad(path)
    truth, truth_back = small.uns["simulation"], back.uns["simulation"]
    assert set(truth_back) == set(truth)
    for key in ("genes", "grn", "programs", "program_activity", "true_delta", "interactions"):
        pd.testing.assert_frame_equal(truth_back[key], truth[key], check_dtype=False, check_categorical=False)
    assert truth_back["params"]["interaction_fractions"] == truth["params"]["interaction_fractions"]
    pd.testing.assert_frame_equal(
        back.uns["pg_go_annotations"], small.uns["pg_go_annotations"], check_dtype=False
    )
    assert (back.X != small.X).nnz == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_doubles": 100, "n_singles": 10}, "make only 45 pairs"),
        ({"n_genes": 30}, "too small"),
        ({"interaction_fractions": {"synergy": 1.0, "bogus": 1.0}}, "Unknown interaction types"),
        ({"n_singles": 0}, "`n_singles` must be at least 1"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pg.datasets.simulate_perturbseq(**{**SMALL, **kwargs})


def test_norman_shape_scaled_down():
    """The Norman-shaped configuration (105 singles, 131 doubles) designs every pair, at a cheap cell count."""
    adata = pg.datasets.simulate_perturbseq(
        n_genes=5000,
        n_singles=105,
        n_doubles=131,
        n_cells_per_perturbation=2,
        n_control=20,
        counts_layer=False,
    )
    inter = adata.uns["simulation"]["interactions"]
    assert adata.n_vars == 5000 and inter.shape[0] == 131 and set(inter["gi_type"]) == set(GI_TYPES)
    assert adata.obs["condition"].nunique() == 1 + 105 + 131


def test_tiny_screen_fills_missing_types(caplog):
    """Too few pairs for some designed types: the others (any pair for inhibition / AND gates) fill in."""
    adata = pg.datasets.simulate_perturbseq(
        n_genes=60, n_singles=8, n_doubles=6, n_cells_per_perturbation=5, n_control=30, seed=0
    )
    inter = adata.uns["simulation"]["interactions"]
    assert inter.shape[0] == 6 and set(inter["gi_type"]) <= set(GI_TYPES)
    assert inter["gi_type"].nunique() >= 3
    assert "were given other types" in caplog.text
    with pytest.raises(ValueError, match="Cannot design 6 doubles of the types"):
        pg.datasets.simulate_perturbseq(
            n_genes=60, n_singles=8, n_doubles=6, interaction_fractions={"additive": 1.0}, seed=0
        )
