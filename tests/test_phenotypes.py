"""pg.tl.phenotypes / pg.tl.reference_de / pg.pl.phenotypes on the simulator's ground truth."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score, roc_auc_score

import pertpy_gnn as pg
from pertpy_gnn.tl._prediction import make_prediction_adata


@pytest.fixture(scope="module")
def screen():
    """Simulated screen, its true changes as a prediction AnnData, and the program each set drives.

    A set's program is the module program of largest |activity| (with its sign, 'P03+'); sets whose
    largest |activity| is below 0.5 drive no program clearly (weak regulators alone) and get ''.
    """
    adata = pg.datasets.simulate_perturbseq(seed=0, n_cells_per_perturbation=20, n_control=200)
    pg.pp.parse_perturbations(adata, perturbation_key="condition")
    sim = adata.uns["simulation"]
    td = sim["true_delta"]
    act = sim["program_activity"]
    programs = [p for p in act.columns if sim["programs"].loc[p, "kind"] == "module"]
    a = act.loc[td.index, programs].to_numpy()
    top = np.abs(a).argmax(1)
    value = a[np.arange(len(a)), top]
    label = np.array([f"{programs[t]}{'+' if v > 0 else '-'}" for t, v in zip(top, value, strict=True)])
    label[np.abs(value) < 0.5] = ""
    cm = sim["true_control_mean"]
    sets = [tuple(n.split("+")) for n in td.index]
    pred = make_prediction_adata(sets, td.to_numpy() + cm, cm, adata.var_names, model_name="truth")
    pred.obsm["activity"] = act.loc[td.index, programs].to_numpy()  # test-only: the true program activity
    return adata, pred, label


def test_clusters_recover_driven_programs_better_than_chance(screen):
    """Clusters of the true changes of the doubles recover the program each double drives.

    Chance level: the ARI of the same clusters with the program labels permuted among the doubles
    (200 permutations: mean about 0, sd about 0.03, max below 0.15 here). The clusters reach ARI
    about 0.7 (Leiden).
    """
    _, pred, label = screen
    pred = pred.copy()
    singles = [n for n in pred.obs_names if "+" not in n]
    pg.tl.phenotypes(pred, measured=singles)
    clusters = pred.obs["pg_phenotype"].astype(str).to_numpy()
    doubles = np.array(["+" in n for n in pred.obs_names]) & (label != "")
    assert doubles.sum() >= 30
    ari = adjusted_rand_score(label[doubles], clusters[doubles])
    rng = np.random.default_rng(0)
    null = np.array(
        [adjusted_rand_score(rng.permutation(label[doubles]), clusters[doubles]) for _ in range(200)]
    )
    assert abs(null.mean()) < 0.02
    assert ari > 0.5
    assert ari > null.max() + 0.2


def test_known_novel_and_keys(screen):
    _, pred, _ = screen
    pred = pred.copy()
    doubles = [n for n in pred.obs_names if "+" in n]
    measured = doubles[:10]
    pg.tl.phenotypes(pred, measured=measured, n_comps=10)
    obs, uns = pred.obs, pred.uns["pg_phenotype"]
    assert obs["pg_phenotype_measured"].sum() == 10
    clusters = uns["clusters"]
    assert clusters["n_sets"].sum() == pred.n_obs
    assert (clusters["n_sets"].diff().dropna() <= 0).all()  # numbered by decreasing size
    # a cluster is known iff it holds a measured set
    holds = obs.groupby("pg_phenotype", observed=False)["pg_phenotype_measured"].sum()
    assert ((holds >= 1) == (clusters["status"] == "known")).all()
    assert set(obs["pg_phenotype_status"].astype(str)) == {"known", "novel"}
    assert pred.obsm["pg_phenotype_pca"].shape == (pred.n_obs, 10)
    assert pred.obsp["pg_phenotype_connectivities"].shape == (pred.n_obs, pred.n_obs)
    assert uns["method"] == "leiden"
    # min_measured raises the bar
    pg.tl.phenotypes(pred, measured=measured, min_measured=100, overwrite=True)
    assert (pred.uns["pg_phenotype"]["clusters"]["status"] == "novel").all()
    # an AnnData of measured cells: its training perturbations
    adata = screen[0].copy()
    pg.pp.split_perturbations(adata, seed=0)
    train = set(adata.obs.loc[adata.obs["pg_split"] == "train", "pg_perturbation"].astype(str)) - {"control"}
    out = pg.tl.phenotypes(pred, measured=adata, key_added="ph2", copy=True)
    assert set(out.obs_names[out.obs["ph2_measured"].to_numpy()]) == train
    assert "ph2" not in pred.obs


def test_reference_ranks_drivers_of_a_program_first(screen):
    adata, pred, label = screen
    pred = pred.copy()
    values, counts = np.unique([lab for lab in label if lab.endswith("+")], return_counts=True)
    target = values[counts.argmax()]  # the program activated by the most sets
    k = int(target[1:3]) - 1
    sign = 1.0 if target.endswith("+") else -1.0
    drivers = sign * pred.obsm["activity"][:, k] > 0.5  # every set that drives it (not only most)
    assert drivers.sum() >= 5
    # reference: the DE vector control -> a single driving the program, from the simulated cells
    single = next(n for n, lab in zip(pred.obs_names, label, strict=True) if lab == target and "+" not in n)
    ref = pg.tl.reference_de(adata, "pg_perturbation", single, "control", n_genes=50)
    assert ref.name == f"control->{single}" and len(ref) == 50
    # and the program's own gene loadings, given directly
    sim = adata.uns["simulation"]
    hub = sim["programs"].loc[target[:-1], "hub"]
    grn = sim["grn"]
    loading = grn[(grn["kind"] == "program_target") & (grn["source"] == hub)].set_index("target")["weight"]
    pg.tl.phenotypes(pred, reference={"de": ref, "loading": loading * sign})
    refs = pred.uns["pg_phenotype"]["references"]
    assert refs.loc["de", "n_genes_shared"] == 50
    for name in ("de", "loading"):
        score = pred.obs[refs.loc[name, "dot_column"]].to_numpy()
        assert roc_auc_score(drivers, score) > 0.9
        top = np.argsort(-score)[: drivers.sum()]
        assert drivers[top[:5]].all(), (name, target, label[top])  # the first five drive it
        assert drivers[top].mean() >= 0.6, (name, target, label[top])  # chance: drivers.mean() ~ 0.13
        cos = pred.obs[refs.loc[name, "cosine_column"]].to_numpy()
        assert np.all(np.abs(cos) <= 1 + 1e-9)
    # the dot product is over shared genes, exactly
    delta = pd.DataFrame(pred.layers["delta"], index=pred.obs_names, columns=pred.var_names)
    expected = delta[ref.index].to_numpy(np.float64) @ ref.to_numpy()
    np.testing.assert_allclose(pred.obs["pg_phenotype_dot_de"], expected, rtol=1e-5)
    # a rank_de_genes result: one reference per perturbation (its top genes with t-scores)
    pg.pp.rank_de_genes(adata, n_genes=30, overwrite=True)
    out = pg.tl.phenotypes(pred, reference=adata.uns["pg_de_genes"], key_added="rk", copy=True)
    assert len(out.uns["rk"]["references"]) == len(adata.uns["pg_de_genes"]["names"])


def test_phenotypes_errors(screen):
    _, pred, _ = screen
    pred = pred.copy()
    with pytest.raises(ValueError, match="None of the"):
        pg.tl.phenotypes(pred, measured=["NOTAGENE+OTHER"])
    with pytest.raises(ValueError, match="shares no gene"):
        pg.tl.phenotypes(pred, reference=pd.Series([1.0, 2.0], index=["X1", "X2"], name="r"))
    with pytest.raises(TypeError, match="reference"):
        pg.tl.phenotypes(pred, reference=np.ones(3))
    with pytest.raises(ValueError, match="layers"):
        pg.tl.phenotypes(type(pred)(pred.X))
    pg.tl.phenotypes(pred)
    with pytest.raises(ValueError, match="overwrite"):
        pg.tl.phenotypes(pred)
    with pytest.raises(ValueError, match="at least 2"):
        pg.tl.reference_de(screen[0], "pg_perturbation", "NOPE", "control")


def test_pl_phenotypes_draws(screen):
    adata, pred, label = screen
    pred = pred.copy()
    loading = pd.Series(1.0, index=pred.var_names[:20], name="first20")
    pg.tl.phenotypes(pred, measured=[n for n in pred.obs_names if "+" not in n], reference=loading)
    fig, ax = plt.subplots()
    out = pg.pl.phenotypes(pred, ax=ax, n_top=5)
    assert out is ax
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("known" in lab for lab in labels) and "measured" in labels
    assert any(t.get_text() in set(pred.obs_names) for t in ax.texts)  # top sets named
    plt.close(fig)
    with pytest.raises(KeyError, match="phenotypes"):
        pg.pl.phenotypes(pred, key="nothing")
