import itertools

import anndata as ad
import matplotlib

matplotlib.use("Agg")
import dcor
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import TheilSenRegressor

import pertpy_gnn as pg
from pertpy_gnn.pp._perturbations import as_perturbation_sets
from pertpy_gnn.tl._gi import distance_correlations, theil_sen_no_intercept
from pertpy_gnn.tl._prediction import make_prediction_adata

NORMAN_PAIRS = ["KLF1+MAP2K6", "MAP2K3+MAP2K6", "MAPK1+TGFBR2", "KLF1+TGFBR2", "MAP2K3+SLC38A2"]


def _sklearn_ts(a, b, y, k, n_sub):
    reg = TheilSenRegressor(fit_intercept=False, n_subsamples=k, max_subpopulation=n_sub, random_state=0)
    return reg.fit(np.c_[a, b], y).coef_


def _groups_adata(deltas: dict[str, np.ndarray], n_cells: int = 2, base: float = 5.0) -> ad.AnnData:
    """Parsed AnnData whose group means minus the control mean are exactly ``deltas``."""
    n_genes = len(next(iter(deltas.values())))
    ctrl = base + np.linspace(0, 1, n_genes)
    rows, labels = [], []
    for name, d in {"control": np.zeros(n_genes), **deltas}.items():
        rows += [ctrl + d] * n_cells
        labels += [name] * n_cells
    adata = ad.AnnData(
        X=np.array(rows, dtype=np.float32),
        obs=pd.DataFrame({"condition": labels}, index=[f"c{i}" for i in range(len(labels))]),
        var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)]),
    )
    genes = {g for nm in deltas for g in nm.split("+")}
    pg.pp.parse_perturbations(adata, perturbation_key="condition", gene_universe=genes)
    return adata


def _norman_parsed(norman):
    genes = {g for c in norman.obs["condition"].unique() for g in str(c).split("+")} - {"control"}
    pg.pp.parse_perturbations(norman, perturbation_key="condition", gene_universe=genes)
    return norman


# ---------------------------------------------------------------- Theil-Sen
@pytest.mark.parametrize(("n", "k"), [(40, 2), (12, 3), (10, 10)])
def test_theil_sen_matches_sklearn_on_all_subsets(n, k):
    # with at most n_subsamples subsets, both enumerate every subset: identical estimators
    rng = np.random.default_rng(1)
    a, b = rng.standard_t(3, size=(2, 3, n))
    y = 1.3 * a - 0.4 * b + 0.5 * rng.standard_t(2, size=(3, n))
    a[0, :4] = 0.0  # zero rows make singular subsets (minimum-norm solutions)
    b[0, :3] = 0.0
    ours = theil_sen_no_intercept(a, b, y, n_subsamples=10_000, subsample_size=k)
    ref = np.array([_sklearn_ts(a[i], b[i], y[i], k, 10_000) for i in range(3)])
    np.testing.assert_allclose(ours, ref, atol=1e-10)


def test_theil_sen_random_subsets_agree_and_resist_outliers():
    rng = np.random.default_rng(2)
    n = 1500
    a, b = rng.normal(size=(2, 2, n))
    y = 2.0 * a + 0.5 * b + 0.05 * rng.normal(size=(2, n))
    y[:, :150] = -4.0 * a[:, :150] + 3.0 * b[:, :150]  # 10% of genes follow another relation
    ols = np.array([np.linalg.lstsq(np.c_[a[i], b[i]], y[i], rcond=None)[0] for i in range(2)])
    assert np.abs(ols - [2.0, 0.5]).max() > 0.1  # least squares is pulled away
    # 2-gene subsets (sklearn's default, the authors' code): random draws differ, estimates agree
    ours2 = theil_sen_no_intercept(a, b, y, n_subsamples=3000, subsample_size=2, seed=3)
    ref2 = np.array([_sklearn_ts(a[i], b[i], y[i], 2, 3000) for i in range(2)])
    np.testing.assert_allclose(ours2, [[2.0, 0.5]] * 2, atol=0.03)
    np.testing.assert_allclose(ours2, ref2, atol=0.03)
    # small random subsets (gathered): robust as well
    small = theil_sen_no_intercept(a, b, y, n_subsamples=3000, subsample_size=5, seed=1)
    np.testing.assert_allclose(small, [[2.0, 0.5]] * 2, atol=0.05)
    # large subsets (unions of random gene blocks) hold outliers (breakdown ~ 1 - 0.5 ** (1 / k)): as sklearn's
    big = theil_sen_no_intercept(a, b, y, n_subsamples=400, subsample_size=300, seed=0)
    ref_big = np.array([_sklearn_ts(a[i], b[i], y[i], 300, 400) for i in range(2)])
    np.testing.assert_allclose(big, ref_big, atol=0.03)
    assert np.abs(big - [2.0, 0.5]).max() > 0.1
    np.testing.assert_array_equal(
        big, theil_sen_no_intercept(a, b, y, n_subsamples=400, subsample_size=300, seed=0)
    )


def test_theil_sen_explicit_subsets_and_errors():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(2, 1, 20))
    y = 3 * a + b
    subsets = np.array([[0, 1], [2, 3], [4, 5]])
    np.testing.assert_allclose(theil_sen_no_intercept(a, b, y, subsets=subsets), [[3.0, 1.0]], atol=1e-12)
    with pytest.raises(ValueError, match="subsample_size"):
        theil_sen_no_intercept(a, b, y, subsample_size=1)


@pytest.mark.parametrize(
    ("n", "k", "n_sub"),
    [(300, 2, 2000), (300, 5, 2000), (300, 60, 500), (12, 3, 10_000), (40, 38, 10_000)],
    ids=["pairs", "gathered", "blocks", "all-subsets", "all-large-subsets"],
)
def test_theil_sen_numba_kernels_equal_numpy_reference(n, k, n_sub):
    # the compiled path (gathered Gram sums, fused solves and Weiszfeld steps) is the same estimator
    rng = np.random.default_rng(6)
    mask = rng.random((6, n)) < 0.4  # zero-inflated, as GI deltas
    a = rng.standard_t(3, size=(6, n)) * mask
    b = rng.standard_t(3, size=(6, n)) * (rng.random((6, n)) < 0.5)
    y = 1.2 * a - 0.3 * b + np.tanh(a * b) + 0.1 * rng.normal(size=(6, n))
    if k > 2:  # collinear singles: every subset singular (minimum-norm solutions). Not for 2-gene
        # subsets: their solutions then lie on a line with a third of them at 0, where the Weiszfeld
        # path (stopped at steps below tol) turns on float rounding in either implementation
        b[0] = 2.0 * a[0]
    y[1] = 0.0
    kw = {"n_subsamples": n_sub, "subsample_size": k, "seed": 3}
    fast = theil_sen_no_intercept(a, b, y, engine="numba", **kw)
    ref = theil_sen_no_intercept(a, b, y, engine="numpy", **kw)
    np.testing.assert_allclose(fast, ref, rtol=0, atol=1e-9)
    assert np.abs(ref).max() > 0.1
    with pytest.raises(ValueError, match="engine"):
        theil_sen_no_intercept(a, b, y, engine="fortran")


# ---------------------------------------------------------------- distance correlation
def test_distance_correlations_match_dcor():
    rng = np.random.default_rng(5)
    n = 300
    mask = rng.random((4, n)) < 0.4  # zero-inflated, many ties, like GI deltas
    a = rng.standard_t(3, size=(4, n)) * mask
    b = (0.6 * a + rng.standard_t(3, size=(4, n))) * (rng.random((4, n)) < 0.5)
    y = np.tanh(a) + 0.3 * b**2 + 0.2 * rng.normal(size=(4, n))
    y[:, :30] = 0.0
    exact = distance_correlations(a, b, y, n_projections=None, extra=a + b)
    ref_a = [dcor.distance_correlation(a[i], y[i]) for i in range(4)]
    ref_b = [dcor.distance_correlation(b[i], y[i]) for i in range(4)]
    ref_ab = [dcor.distance_correlation(np.c_[a[i], b[i]], y[i]) for i in range(4)]
    ref_x = [dcor.distance_correlation(a[i] + b[i], y[i]) for i in range(4)]
    np.testing.assert_allclose(exact["a"], ref_a, atol=1e-10)
    np.testing.assert_allclose(exact["b"], ref_b, atol=1e-10)
    np.testing.assert_allclose(exact["ab"], ref_ab, atol=1e-10)
    np.testing.assert_allclose(exact["extra"], ref_x, atol=1e-10)
    for k, tol in [(4, 1e-2), (6, 3e-3), (8, 1.5e-3)]:
        approx = distance_correlations(a, b, y, n_projections=k)
        np.testing.assert_allclose(approx["a"], ref_a, atol=1e-10)
        np.testing.assert_allclose(approx["ab"], ref_ab, atol=tol)


# ---------------------------------------------------------------- gi_scores
def test_gi_scores_hand_computed():
    rng = np.random.default_rng(6)
    a = rng.normal(0, 1, 30)
    b = rng.normal(0, 1, 30)
    ab = 2.0 * a + 0.5 * b
    adata = _groups_adata({"A": a, "B": b, "A+B": ab})
    df = pg.tl.gi_scores(adata)
    row = df.loc["A+B"]
    assert (row["gene_a"], row["gene_b"]) == ("A", "B")
    assert row["c_a"] == pytest.approx(2.0, abs=1e-4)
    assert row["c_b"] == pytest.approx(0.5, abs=1e-4)
    assert row["magnitude"] == pytest.approx(np.sqrt(4.25), abs=1e-4)
    assert row["model_fit"] == pytest.approx(1.0, abs=1e-6)
    assert row["dominance"] == pytest.approx(np.log10(4), abs=1e-4)
    x = adata.X[adata.obs["condition"].to_numpy() == "A+B"][0] - adata.X[0]  # float32 deltas, as scored
    xa = adata.X[adata.obs["condition"].to_numpy() == "A"][0] - adata.X[0]
    xb = adata.X[adata.obs["condition"].to_numpy() == "B"][0] - adata.X[0]
    da, db = (
        dcor.distance_correlation(xa.astype(float), x.astype(float)),
        dcor.distance_correlation(xb.astype(float), x.astype(float)),
    )
    assert row["equality_of_contribution"] == pytest.approx(min(da, db) / max(da, db), abs=1e-6)
    assert row["similarity"] == pytest.approx(
        dcor.distance_correlation(np.c_[xa, xb].astype(float), x.astype(float)), abs=1e-6
    )
    assert bool(row["synergy"]) and not row["suppression"] and not row["neomorphism"]
    assert bool(row["epistasis"]) == (row["equality_of_contribution"] < 0.28)
    assert bool(row["redundancy"]) == (row["similarity"] > 0.85)
    assert adata.uns["pg_gi_scores"] is df
    # every estimator of an exact linear relation is exact: 2-gene subsets (all 435) and random 5-gene ones
    for k in (2, 5):
        dk = pg.tl.gi_scores(adata, subsample_size=k, key_added=f"k{k}")
        np.testing.assert_allclose(dk.loc["A+B", ["c_a", "c_b"]].astype(float), [2.0, 0.5], atol=1e-4)
    with pytest.raises(ValueError, match="already exists"):
        pg.tl.gi_scores(adata)


def test_gi_scores_thresholds_and_errors():
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(2, 25))
    adata = _groups_adata({"A": a, "B": b, "A+B": 0.6 * a + 0.3 * b, "C": rng.normal(size=25)})
    df = pg.tl.gi_scores(
        adata, thresholds={"suppression": 0.5, "epistasis": ("equality_of_contribution", ">", 0.28)}
    )
    assert list(df.index) == ["A+B"]  # C has no double
    assert bool(df.loc["A+B", "suppression"]) == (df.loc["A+B", "magnitude"] < 0.5)
    assert bool(df.loc["A+B", "epistasis"]) == (df.loc["A+B", "equality_of_contribution"] > 0.28)
    with pytest.raises(ValueError, match="not in the data"):
        pg.tl.gi_scores(adata, pairs=["A+C"], overwrite=True)
    with pytest.raises(ValueError, match="doubles"):
        pg.tl.gi_scores(adata, pairs=["A"], overwrite=True)
    with pytest.raises(ValueError, match="unknown score"):
        pg.tl.gi_scores(adata, thresholds={"x": ("nope", ">", 1)}, overwrite=True)
    with pytest.raises(ValueError, match="'>' or '<'"):
        pg.tl.gi_scores(adata, thresholds={"synergy": ("magnitude", ">=", 1)}, overwrite=True)
    with pytest.raises(ValueError, match="full rule"):
        pg.tl.gi_scores(adata, thresholds={"newtype": 1.0}, overwrite=True)
    with pytest.raises(ValueError, match="parse_perturbations"):
        pg.tl.gi_scores(ad.AnnData(np.ones((3, 4), dtype=np.float32)))


def test_gi_scores_prediction_input_matches_data():
    rng = np.random.default_rng(8)
    a, b = rng.normal(size=(2, 40))
    ab = 1.2 * a + 0.4 * b + 0.3 * np.tanh(a * b)
    adata = _groups_adata({"A": a, "B": b, "A+B": ab})
    ctrl = adata.X[0].astype(np.float64)
    pred = make_prediction_adata(
        [("A",), ("B",), ("A", "B")], ctrl + np.stack([a, b, ab]), ctrl, adata.var_names
    )
    got = pg.tl.gi_scores(pred)
    ref = pg.tl.gi_scores(adata)
    cols = ["c_a", "c_b", "magnitude", "model_fit", "similarity", "equality_of_contribution", "dominance"]
    np.testing.assert_allclose(got[cols].astype(float), ref[cols].astype(float), atol=1e-5)
    assert "pg_gi_scores" in pred.uns


def test_gi_scores_norman(norman, tmp_path):
    adata = _norman_parsed(norman)
    df = pg.tl.gi_scores(adata)
    assert sorted(df.index) == sorted(NORMAN_PAIRS)
    # 500 genes < subsample_size: one subset of all genes, i.e. least squares; similarity exact (<= 1,000 genes)
    col = adata.obs["condition"].astype(str).to_numpy()
    x = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    ctrl = x[col == "control"].mean(0)
    for pair in NORMAN_PAIRS:
        ga, gb = sorted(pair.split("+"))
        a, b = x[col == ga].mean(0) - ctrl, x[col == gb].mean(0) - ctrl
        ab = (
            x[col == pair].mean(0) - ctrl
            if (col == pair).any()
            else x[col == "+".join((gb, ga))].mean(0) - ctrl
        )
        coef = np.linalg.lstsq(np.c_[a, b], ab, rcond=None)[0]
        np.testing.assert_allclose(df.loc[pair, ["c_a", "c_b"]].astype(float), coef, atol=1e-4)
        sim = dcor.distance_correlation(np.c_[a, b].astype(float), ab.astype(float))
        assert df.loc[pair, "similarity"] == pytest.approx(sim, abs=1e-5)
    assert df.loc["KLF1+MAP2K6", "magnitude"] == pytest.approx(1.10, abs=0.01)
    assert df[["magnitude", "model_fit", "similarity", "equality_of_contribution"]].notna().all().all()
    # stored, h5ad-writable
    path = tmp_path / "gi.h5ad"
    adata.write_h5ad(path)
    back = ad.read_h5ad(path).uns["pg_gi_scores"]
    pd.testing.assert_frame_equal(back.loc[df.index], df, check_dtype=False)
    # the authors' estimator (2-gene subsets) collapses to ~0 on these zero-inflated deltas (75% of
    # genes have no change): one reason their code scores only well-expressed genes
    pub = pg.tl.gi_scores(
        adata, pairs=["KLF1+MAP2K6"], subsample_size=2, n_subsamples=20_000, key_added="pub"
    )
    assert pub.loc["KLF1+MAP2K6", "magnitude"] < 0.05


def test_gi_scores_mudata():
    mudata = pytest.importorskip("mudata")
    rng = np.random.default_rng(9)
    a, b = rng.normal(size=(2, 20))
    adata = _groups_adata({"A": a, "B": b, "A+B": a + b})
    mdata = mudata.MuData({"rna": adata})
    df = pg.tl.gi_scores(mdata, modality="rna")
    assert "pg_gi_scores" in mdata["rna"].uns
    assert df.loc["A+B", "magnitude"] == pytest.approx(np.sqrt(2), abs=1e-4)
    with pytest.raises(ValueError, match="modality"):
        pg.tl.gi_scores(mdata)


# ---------------------------------------------------------------- gi_map
class _StandIn:
    """Pair (g1 < g2) = 1.5 e_g1 + 0.5 e_g2; uncertainty_z = 2 * n_unseen - 0.5."""

    name = "stand-in"

    def __init__(self, genes, n_vars=200, seen=None, uncertainty=True, seed=0):
        rng = np.random.default_rng(seed)
        self.effects = {g: rng.normal(0, 1, n_vars) * (rng.random(n_vars) < 0.5) for g in genes}
        self.var_names = [f"v{i}" for i in range(n_vars)]
        self.control_mean = np.full(n_vars, 2.0)
        self.seen_genes = set(genes) if seen is None else set(seen)
        self.uncertainty = uncertainty
        self.calls = 0

    def predict(self, perturbations, *, n_control=300, seed=0):
        self.calls += 1
        sets = as_perturbation_sets(perturbations)
        delta = np.stack(
            [
                self.effects[s[0]] if len(s) == 1 else 1.5 * self.effects[s[0]] + 0.5 * self.effects[s[1]]
                for s in sets
            ]
        )
        extra = None
        if self.uncertainty:
            extra = {"uncertainty_z": [2.0 * sum(g not in self.seen_genes for g in s) - 0.5 for s in sets]}
        return make_prediction_adata(
            sets,
            self.control_mean + delta,
            self.control_mean,
            self.var_names,
            seen_genes=self.seen_genes,
            obs_extra=extra,
        )


def test_gi_map_scores_every_pair_and_flags_uncertainty():
    genes = ["G1", "G2", "G3", "G4", "U1", "U2"]
    model = _StandIn(genes, seen=genes[:4])
    df = pg.tl.gi_map(model, genes[::-1], batch_size=4, progress_bar=False)
    assert model.calls == 6  # 6 singles + 15 pairs in batches of 4
    assert list(df.index) == ["+".join(p) for p in itertools.combinations(sorted(genes), 2)]
    np.testing.assert_allclose(df["c_a"], 1.5, atol=1e-5)
    np.testing.assert_allclose(df["c_b"], 0.5, atol=1e-5)
    assert df["synergy"].all() and not df["suppression"].any()
    np.testing.assert_array_equal(
        df["n_unseen"], [sum(g.startswith("U") for g in p.split("+")) for p in df.index]
    )
    np.testing.assert_array_equal(df["uncertain"], df["n_unseen"] > 0)  # z = 1.5 or 3.5 > 0.386
    q = pg.tl.gi_map(model, genes, uncertainty_threshold=None, uncertainty_quantile=0.5, progress_bar=False)
    assert list(q.index[q["uncertain"]]) == ["U1+U2"]  # above the median of the unseen pairs' z
    dropped = pg.tl.gi_map(model, genes, drop_uncertain=True, progress_bar=False)
    assert len(dropped) == 6 and (dropped["n_unseen"] == 0).all()
    plain = pg.tl.gi_map(_StandIn(genes, uncertainty=False), genes, progress_bar=False)
    assert not plain["uncertain"].any() and "uncertainty_z" not in plain
    with pytest.raises(ValueError, match="at least 2 genes"):
        pg.tl.gi_map(model, ["G1"], progress_bar=False)
    with pytest.raises(ValueError, match="either"):
        pg.tl.gi_map(model, genes, uncertainty_quantile=0.5, progress_bar=False)
    with pytest.raises(TypeError, match="predict"):
        pg.tl.gi_map(object(), genes, progress_bar=False)


def test_gi_map_threads_follow_torch_and_give_the_same_scores():
    import torch

    genes = [f"G{i}" for i in range(6)]
    model = _StandIn(genes, n_vars=700)  # > 500 genes: the projected similarity, all kernels run
    before = torch.get_num_threads()
    one = pg.tl.gi_map(model, genes, n_jobs=1, progress_bar=False)
    assert torch.get_num_threads() == before  # the user's torch setting is left alone
    two = pg.tl.gi_map(model, genes, n_jobs=2, progress_bar=False)
    pd.testing.assert_frame_equal(one, two)  # pairs are independent: same numbers on any thread count
    torch.set_num_threads(1)
    try:
        assert pg.tl._gi._n_threads(None) == 1  # the user's torch setting, no environment variable
    finally:
        torch.set_num_threads(before)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="n_jobs"):
            pg.tl.gi_map(model, genes, n_jobs=bad, progress_bar=False)


# ---------------------------------------------------------------- evaluation
def _table(mag, **cols):
    idx = [f"A{i}+B{i}" for i in range(len(mag))]
    base = {s: np.full(len(mag), 0.5) for s in ("model_fit", "similarity", "equality_of_contribution")}
    base.update(cols)
    return pd.DataFrame({"magnitude": mag, **base}, index=idx)


def test_evaluate_gi_counts():
    true = _table([2.0, 1.9, 1.8, 1.7, 1.6, 0.5, 0.6, 0.7, 1.05, 1.1, 0.95, 0.98])
    pred = _table([1.2, 1.3, 1.0, 1.4, 0.9, 0.4, 1.5, 0.8, 1.1, 1.12, 0.99, 0.3])
    res = pg.tl.evaluate_gi(true, pred, k=3, n_random=4000)
    syn = res.loc["synergy"]
    # true synergy (> 1.15): 0-4; predicted: 0, 1, 3, 6 -> TP 3
    assert (syn["n_true"], syn["n_predicted"]) == (5, 4)
    assert syn["precision"] == pytest.approx(3 / 4) and syn["recall"] == pytest.approx(3 / 5)
    # top-3 predicted: 6 (1.5), 3 (1.4), 1 (1.3) -> 2 truly synergistic; top-3 true: 0, 1, 2 -> overlap {1}
    assert syn["precision_at_k"] == pytest.approx(2 / 3)
    assert syn["top_k_accuracy"] == pytest.approx(1 / 3)
    assert syn["random_precision_at_k_mean"] == pytest.approx(5 / 12, abs=0.02)
    assert syn["random_top_k_accuracy_mean"] == pytest.approx(3 / 12, abs=0.02)
    sup = res.loc["suppression"]
    # true suppression (< 1): 5, 6, 7, 10, 11; predicted: 4, 5, 7, 10, 11 -> TP 4
    assert sup["precision"] == pytest.approx(4 / 5) and sup["recall"] == pytest.approx(4 / 5)
    # lowest 3 predicted: 11, 5, 7 -> all truly suppressive
    assert sup["precision_at_k"] == 1.0
    # nothing predicted or true for redundancy (similarity 0.5 everywhere): NaN precision / recall
    assert np.isnan(res.loc["redundancy", "precision"]) and np.isnan(res.loc["redundancy", "recall"])
    perfect = pg.tl.evaluate_gi(true, true, k=3)
    metrics = ["precision", "recall", "precision_at_k", "top_k_accuracy"]
    assert (perfect.loc[["synergy", "suppression"], metrics] == 1).all(axis=None)
    assert perfect.loc["synergy", "r2"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="share no double"):
        pg.tl.evaluate_gi(true, pred.set_axis([f"X{i}+Y{i}" for i in range(12)]))


def test_nonadditive_mse():
    a = np.array([1.0, 0.0, 0.5, 0.0, 2.0, 0.0, 0.1, 0.0])
    b = np.array([0.0, 1.0, 0.5, 0.0, 0.0, 1.0, 0.0, 0.2])
    ab = a + b
    ab[2] += 3.0  # most non-additive
    ab[5] -= 1.5  # second
    adata = _groups_adata({"A": a, "B": b, "A+B": ab})
    ctrl = adata.X[0].astype(np.float64)
    pred_ab = ab.copy()
    pred_ab[2] -= 1.0
    pred = make_prediction_adata([("A", "B")], (ctrl + pred_ab)[None], ctrl, adata.var_names)
    res = pg.tl.nonadditive_mse(adata, pred, n_genes=2)
    assert res.loc["A+B", "genes"] == "g2,g5"
    assert res.loc["A+B", "mse"] == pytest.approx(1.0 / 2, abs=1e-5)
    assert res.loc["A+B", "mse_additive"] == pytest.approx((9.0 + 2.25) / 2, abs=1e-5)
    with pytest.raises(ValueError, match="Missing"):
        pg.tl.nonadditive_mse(adata, pred, pairs=["A+C"])


# ---------------------------------------------------------------- plots
def test_gi_plots_draw(norman):
    genes = ["G1", "G2", "G3", "G4", "U1"]
    model = _StandIn(genes, seen=genes[:4])
    df = pg.tl.gi_map(model, genes, progress_bar=False)
    fig = pg.pl.gi_map(df)
    assert len([ax for ax in fig.axes if ax.get_title()]) == 4
    shown = fig.axes[0].images[0].get_array()
    assert shown.shape == (4, 4)  # U1 pairs are uncertain and masked away
    fig.canvas.draw()
    plt.close(fig)
    fig = pg.pl.gi_map(df, scores=["magnitude"], mask_uncertain=False, cluster=False)
    assert fig.axes[0].images[0].get_array().shape == (5, 5)
    plt.close(fig)
    with pytest.raises(ValueError, match="not columns"):
        pg.pl.gi_map(df, scores=["nope"])

    adata = _norman_parsed(norman)
    true = pg.tl.gi_scores(adata)
    noisy = true.copy()
    noisy["magnitude"] = noisy["magnitude"] + 0.05
    ax = pg.pl.gi_scatter(true, noisy, "magnitude")
    assert "R^2" in ax.get_title() and len(ax.collections[0].get_offsets()) == 5
    ax.figure.canvas.draw()
    plt.close(ax.figure)

    ctrl = np.asarray(adata.X[adata.obs["condition"].to_numpy() == "control"].mean(0)).ravel()
    x = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    col = adata.obs["condition"].astype(str).to_numpy()
    mean_ab = x[col == "KLF1+MAP2K6"].mean(0)
    pred = make_prediction_adata([("KLF1", "MAP2K6")], mean_ab[None], ctrl, adata.var_names)
    fig, axis = plt.subplots()
    out = pg.pl.nonadditive_bars(adata, pred, "KLF1+MAP2K6", n_genes=6, ax=axis)
    assert out is axis and len(axis.get_yticklabels()) == 6
    assert len(axis.patches) == 6 * 5  # A, B, additive, true, predicted
    fig.canvas.draw()
    plt.close(fig)


def test_gi_map_logs_progress_when_not_a_terminal(caplog, monkeypatch):
    """Output redirected: prediction and scoring report progress as log lines; progress_bar=False: none."""
    import logging

    import pertpy_gnn._progress as progress

    monkeypatch.setattr(progress, "interactive", lambda: False)
    genes = [f"G{i}" for i in range(6)]
    model = _StandIn(genes)
    with caplog.at_level(logging.INFO, logger="pertpy_gnn"):
        pg.tl.gi_map(model, genes, batch_size=2)  # 21 sets in 11 batches
    lines = [r.getMessage() for r in caplog.records if r.name == "pertpy_gnn"]
    predicting = [m for m in lines if m.startswith("Predicting: ")]
    assert predicting and predicting[-1].startswith("Predicting: 11/11 batches (100%)")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pertpy_gnn"):
        pg.tl.gi_map(model, genes, batch_size=2, progress_bar=False)
    assert not [r for r in caplog.records if "%)" in r.getMessage()]
