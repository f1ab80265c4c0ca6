import numpy as np
import pandas as pd
import pytest
from anndata import AnnData

import pertpy_gnn as pg
from pertpy_gnn._linear import bilinear_ridge, graph_embedding
from pertpy_gnn.tl._baselines import BASELINE_KINDS

from .conftest import additive_screen

TEST = ["G4", "G0+G1", "G2+G3", "G4+G5"]


def _split(adata: AnnData, test=TEST) -> AnnData:
    """Hand-written split: ``test`` perturbations held out, everything else (control too) in train."""
    pert = adata.obs["pg_perturbation"].astype(str)
    adata.obs["pg_split"] = pd.Categorical(np.where(pert.isin(test), "test", "train"))
    return adata


def _train_mean(adata: AnnData, name: str) -> np.ndarray:
    mask = (adata.obs["pg_perturbation"] == name).to_numpy() & (adata.obs["pg_split"] == "train").to_numpy()
    return np.asarray(adata.X[mask].mean(axis=0), dtype=np.float64).ravel()


@pytest.fixture
def synth() -> AnnData:
    return _split(additive_screen())


def test_additive_is_the_hand_sum(synth):
    model = pg.tl.fit_baseline(synth, "additive")
    pred = model.predict(["G0+G1", "G3+G2", "G4"], n_control=None)
    ctrl = _train_mean(synth, "control")
    hand = ctrl + (_train_mean(synth, "G0") - ctrl) + (_train_mean(synth, "G1") - ctrl)
    np.testing.assert_allclose(pred.X[0], hand, rtol=1e-5, atol=1e-5)
    hand23 = ctrl + (_train_mean(synth, "G2") - ctrl) + (_train_mean(synth, "G3") - ctrl)
    np.testing.assert_allclose(pred.X[1], hand23, rtol=1e-5, atol=1e-5)
    # G4 was perturbed in training only within G0+G4, never alone: no additive prediction
    assert pred.obs["available"].tolist() == [True, True, False]
    assert np.isnan(pred.X[2]).all()
    assert pred.obs["perturbation"].tolist() == ["G0+G1", "G2+G3", "G4"]
    np.testing.assert_allclose(pred.layers["delta"][0], hand - ctrl, atol=1e-5)


def test_no_change_and_train_mean(synth):
    nc = pg.tl.fit_baseline(synth, "no_change")
    ctrl = _train_mean(synth, "control")
    pred = nc.predict(["G4", "G0+G1"], n_control=None)
    np.testing.assert_allclose(pred.X, np.vstack([ctrl, ctrl]), rtol=1e-6)
    assert np.all(pred.layers["delta"] == 0)
    assert pred.uns["pg_prediction"]["model"] == "no_change"
    assert pred.uns["pg_prediction"]["n_control"] == 60
    # a seeded random draw of control cells: reproducible, different from another seed
    a, b, c = (nc.predict("G4", n_control=10, seed=s).X for s in (0, 0, 1))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)

    tm = pg.tl.fit_baseline(synth, "train_mean", name="mean")
    train = (synth.obs["pg_split"] == "train").to_numpy() & (synth.obs["pg_n_genes"] > 0).to_numpy()
    hand = np.asarray(synth.X[train].mean(axis=0)).ravel()
    pred = tm.predict(["G4", "G0+G1"], n_control=None)
    np.testing.assert_allclose(pred.X[1], hand, rtol=1e-5)
    assert tm.name == "mean" and pred.uns["pg_prediction"]["model"] == "mean"
    assert tm.seen_genes == {"G0", "G1", "G2", "G3", "G4", "G5"}
    assert pred.obs["seen"].tolist() == [True, True]


def test_seen_genes_exclude_test_only_genes():
    adata = _split(additive_screen(), test=["G5", "G1+G5", "G4+G5"])
    model = pg.tl.fit_baseline(adata, "no_change")
    assert "G5" not in model.seen_genes and "G4" in model.seen_genes
    pred = model.predict(["G5", "G4+G5", "G0"])
    assert pred.obs["n_unseen"].tolist() == [1, 1, 0]


def _hand_graph(adata: AnnData) -> dict:
    # G0 -> G10 (0.5), G10 -> G11 (0.8), G11 -> G12 (1.0), G12 -> G0 (0.5), G1 -> G10 (0.4)
    genes = np.asarray(adata.var_names)
    src = [0, 10, 11, 12, 1]
    tgt = [10, 11, 12, 0, 10]
    w = np.array([0.5, 0.8, 1.0, 0.5, 0.4], dtype=np.float32)
    return {
        "genes": genes,
        "edge_index": np.array([src, tgt], dtype=np.int64),
        "edge_weight": w,
        "params": {},
    }


def test_linear_coexpression_is_eq1(synth):
    synth.uns["pg_coexpression_graph"] = _hand_graph(synth)
    model = pg.tl.fit_baseline(synth, "linear_coexpression", scale=2.0)
    pred = model.predict(["G0", "G0+G1"], n_control=None)
    e = np.zeros((30, 30))
    e[[10, 11, 12, 0, 10], [0, 10, 11, 12, 1]] = [0.5, 0.8, 1.0, 0.5, 0.4]
    theta = np.zeros((30, 2))
    theta[0, :] = 1
    theta[1, 1] = 1
    hand = 2.0 * np.linalg.matrix_power(e, 3) @ theta
    np.testing.assert_allclose(pred.layers["delta"], hand.T, atol=1e-6)
    assert pred.layers["delta"][0, 12] == pytest.approx(2.0 * 0.5 * 0.8 * 1.0)

    # fitted scale: least squares of the training deltas on the propagated vectors
    fitted = pg.tl.fit_baseline(synth, "linear_coexpression")
    train_sets = [("G0",), ("G1",), ("G2",), ("G3",), ("G5",), ("G0", "G4"), ("G1", "G5")]
    ctrl = _train_mean(synth, "control")
    x = np.vstack([model.predict([s], n_control=None).layers["delta"][0] / 2.0 for s in train_sets])
    y = np.vstack([_train_mean(synth, "+".join(s)) - ctrl for s in train_sets])
    assert fitted.scale == pytest.approx((x * y).sum() / (x * x).sum(), rel=1e-4)


def test_linear_coexpression_flags_unmeasured_genes(synth):
    synth.uns["pg_coexpression_graph"] = _hand_graph(synth)
    model = pg.tl.fit_baseline(synth, "linear_coexpression", scale=1.0)
    pred = model.predict(["G0", "G0+NOTMEASURED"], n_control=None)
    assert pred.obs["available"].tolist() == [True, False]
    np.testing.assert_allclose(pred.X[1], model.control_mean, rtol=1e-6)


def test_linear_embedding_closed_form(synth):
    model = pg.tl.fit_baseline(synth, "linear_embedding", pca_dim=4, ridge=0.1, normalize=False)
    train_sets = [(), ("G0",), ("G1",), ("G2",), ("G3",), ("G5",), ("G0", "G4"), ("G1", "G5")]
    ctrl = _train_mean(synth, "control")
    pseudo = np.vstack([_train_mean(synth, "+".join(s) or "control") for s in train_sets])
    m = pseudo.T - pseudo.T.mean(axis=0)
    u, s, _ = np.linalg.svd(m, full_matrices=False)
    g = u[:, :4] * s[:4]
    idx = {f"G{i}": i for i in range(30)}
    p = np.vstack([g[[idx[x] for x in st]].sum(axis=0) if st else np.zeros(4) for st in train_sets])
    y = (pseudo - ctrl).T
    b = y.mean(axis=1, keepdims=True)
    w = (
        np.linalg.inv(g.T @ g + 0.1 * np.eye(4))
        @ g.T
        @ (y - b)
        @ p
        @ np.linalg.inv(p.T @ p + 0.1 * np.eye(4))
    )
    pred = model.predict(["G4", "G2+G3"], n_control=None)
    hand = (g @ w @ np.vstack([g[4], g[2] + g[3]]).T + b).T
    np.testing.assert_allclose(pred.layers["delta"], hand, atol=1e-4)
    assert pred.obs["embedding_source"].tolist() == ["measured", "measured,measured"]
    # a gene with no embedding falls back to b, the mean change over the training conditions
    unknown = model.predict("NOTMEASURED", n_control=None)
    np.testing.assert_allclose(unknown.layers["delta"][0], b.ravel(), atol=1e-5)
    assert unknown.obs["available"].tolist() == [False]


def test_linear_embedding_uses_go_neighbours(synth):
    # XGENE is not measured; its only measured GO neighbour is G3 -> same embedding, same prediction
    go = {
        "genes": np.array(["XGENE", "G3", "OTHER"], dtype=object),
        "edge_index": np.array([[1, 2], [0, 0]], dtype=np.int64),
        "edge_weight": np.array([0.7, 0.9], dtype=np.float32),
        "params": {},
    }
    model = pg.tl.fit_baseline(synth, "linear_embedding", go_graph=go)
    pred = model.predict(["XGENE", "G3"], n_control=None)
    np.testing.assert_allclose(pred.X[0], pred.X[1], rtol=1e-5)
    assert pred.obs["embedding_source"].tolist() == ["go", "measured"]
    synth.uns["pg_go_graph"] = go
    again = pg.tl.fit_baseline(synth, "linear_embedding").predict("XGENE", n_control=None)
    np.testing.assert_allclose(again.X[0], pred.X[0], rtol=1e-6)


def test_errors(synth):
    with pytest.raises(ValueError, match="Unknown baseline kind 'mean'"):
        pg.tl.fit_baseline(synth, "mean")
    with pytest.raises(KeyError, match="pg.pp.coexpression_graph"):
        pg.tl.fit_baseline(synth, "linear_coexpression")
    with pytest.raises(TypeError, match="pca_dim"):
        pg.tl.fit_baseline(synth, "additive", pca_dim=3)
    unsplit = additive_screen()
    with pytest.raises(KeyError, match="pg.pp.split_perturbations"):
        pg.tl.fit_baseline(unsplit, "no_change")
    unparsed = AnnData(X=np.ones((3, 2), dtype=np.float32))
    with pytest.raises(KeyError, match="parse_perturbations"):
        pg.tl.fit_baseline(unparsed, "no_change")
    with pytest.raises(ValueError, match="Empty perturbation set"):
        pg.tl.fit_baseline(synth, "no_change").predict([""])


def test_norman_all_baselines(norman):
    genes = {g for c in norman.obs["condition"].unique() for g in c.split("+") if g != "control"}
    pg.pp.parse_perturbations(norman, perturbation_key="condition", gene_universe=genes)
    test = ["KLF1+MAP2K6", "MAPK1+TGFBR2", "FOXO4", "CBL+CNN1", "TMSB4X"]
    _split(norman, test=test)
    pg.pp.coexpression_graph(norman)
    # GO graph over the measured and perturbed genes only (the full ~20k-gene graph is for real runs)
    ann = pg.datasets.go_annotations()
    pg.pp.go_graph(norman, annotations=ann[ann["gene"].isin(set(norman.var_names) | genes)])
    for kind in BASELINE_KINDS:
        model = pg.tl.fit_baseline(norman, kind)
        pred = model.predict(test)
        assert pred.shape == (5, 500) and pred.obs["perturbation"].tolist() == test
        assert list(pred.var_names) == list(norman.var_names)
        if kind == "additive":
            assert pred.obs["available"].tolist() == [True, True, False, False, False]
        elif kind == "linear_coexpression":
            # TMSB4X is the only perturbed gene among the 500 measured genes
            assert pred.obs["available"].tolist() == [False, False, False, False, True]
            assert np.all(pred.layers["delta"][:4] == 0)
        else:
            assert np.isfinite(pred.X).all()
    # linear_embedding: TMSB4X is measured, other genes are embedded through GO neighbours when they have any
    sources = pg.tl.fit_baseline(norman, "linear_embedding").predict(sorted(genes)).obs["embedding_source"]
    assert sources["TMSB4X"] == "measured"
    assert sources["IER5L"] == "none"  # no GO annotation
    assert (sources == "go").sum() >= 5


def test_bilinear_ridge_matches_the_closed_form():
    rng = np.random.default_rng(0)
    g, y, p = rng.normal(size=(40, 3)), rng.normal(size=(40, 7)), rng.normal(size=(7, 2))
    lam_g, lam_p = np.array([0.0, 0.5, 10.0]), np.array([0.1, 2.0, 0.0])
    ws = bilinear_ridge(g, y, p, lam_g, lam_p)
    for i in range(3):
        hand = (
            np.linalg.inv(g.T @ g + lam_g[i] * np.eye(3))
            @ g.T
            @ y
            @ p
            @ np.linalg.inv(p.T @ p + lam_p[i] * np.eye(2))
        )
        np.testing.assert_allclose(ws[i], hand, rtol=1e-8, atol=1e-10)


def test_graph_embedding_separates_two_cliques():
    # two 4-cliques {a0..a3}, {b0..b3} joined by one weak edge a0 - b0: the first component splits them
    genes = [f"a{i}" for i in range(4)] + [f"b{i}" for i in range(4)]
    edges = [(i, j) for c in (range(4), range(4, 8)) for i in c for j in c if i != j] + [(0, 4)]
    src, tgt = np.array(edges).T
    w = np.where((src == 0) & (tgt == 4), 0.1, 1.0)
    emb = graph_embedding({"genes": np.array(genes), "edge_index": np.stack([src, tgt]), "edge_weight": w}, 2)
    assert list(emb.index) == genes and emb.shape == (8, 2)
    first = emb.iloc[:, 0].to_numpy()
    assert np.sign(first[:4]).tolist() == [np.sign(first[0])] * 4
    assert np.sign(first[4:]).tolist() == [-np.sign(first[0])] * 4
    np.testing.assert_allclose(first[1:4], first[1], rtol=1e-6)  # a1..a3 are symmetric


def _cv_by_hand(adata, sets, deltas, ctrl, pred_fn_alpha, alphas, n_folds, seed=0):
    """Per-alpha mean squared error of leaving out each fold, with explicit loops."""
    n = len(sets)
    folds = np.array_split(np.random.default_rng(seed).permutation(n), n_folds)
    err = np.zeros((len(alphas), n))
    for held in folds:
        keep = [i for i in range(n) if i not in set(held)]
        for a, alpha in enumerate(alphas):
            for h in held:
                err[a, h] = ((pred_fn_alpha(keep, alpha, sets[h]) - deltas[h]) ** 2).sum()
    return err


def test_linear_embedding_cross_validated_ridge_by_hand(synth):
    alphas = [1e-3, 1e-1, 10.0]
    model = pg.tl.fit_baseline(synth, "linear_embedding", pca_dim=3, alphas=alphas, cv_rule="min", cv_folds=7)
    train_sets = [("G0",), ("G1",), ("G2",), ("G3",), ("G5",), ("G0", "G4"), ("G1", "G5")]
    ctrl = _train_mean(synth, "control")
    means = np.vstack([_train_mean(synth, "+".join(s)) for s in train_sets])
    idx = {f"G{i}": i for i in range(30)}

    def fit(keep, alpha):
        pseudo = np.vstack([ctrl] + [means[i] for i in keep])
        m = pseudo.T - pseudo.T.mean(axis=0)
        u, s, _ = np.linalg.svd(m, full_matrices=False)
        g = u[:, :3] * s[:3]
        unit = g / np.linalg.norm(g, axis=1, keepdims=True)

        def emb(st):
            return sum((unit[idx[x]] for x in st), np.zeros(3))

        p = np.vstack([np.zeros(3)] + [emb(train_sets[i]) for i in keep])
        y = (pseudo - ctrl).T
        b = y.mean(axis=1, keepdims=True)
        lg, lp = alpha * (g * g).sum() / 3, alpha * (p * p).sum() / 3
        w = (
            np.linalg.inv(g.T @ g + lg * np.eye(3))
            @ g.T
            @ (y - b)
            @ p
            @ np.linalg.inv(p.T @ p + lp * np.eye(3))
        )
        return g, w, b.ravel(), emb

    def predict(keep, alpha, st):
        g, w, b, emb = fit(keep, alpha)
        return g @ w @ emb(st) + b

    err = _cv_by_hand(synth, train_sets, means - ctrl, ctrl, predict, alphas, 7)
    np.testing.assert_allclose(model.cv_error, err.mean(axis=1), rtol=1e-4)
    best = alphas[int(np.argmin(err.mean(axis=1)))]
    assert model.cv_alpha == best
    g, w, b, emb = fit(list(range(7)), best)
    pred = model.predict(["G4", "G2+G3"], n_control=None)
    np.testing.assert_allclose(
        pred.layers["delta"], np.vstack([g @ w @ emb(s) + b for s in [("G4",), ("G2", "G3")]]), atol=1e-4
    )
    # the one-standard-error rule takes the strongest penalty within one SE of the best
    se_model = pg.tl.fit_baseline(synth, "linear_embedding", pca_dim=3, alphas=alphas, cv_folds=7)
    mean = err.mean(axis=1)
    k = int(np.argmin(mean))
    within = mean <= mean[k] + err[k].std(ddof=1) / np.sqrt(7)
    assert se_model.cv_alpha == alphas[int(np.flatnonzero(within).max())]


def test_linear_embedding_external_embeddings(synth):
    # a DataFrame gene embedding (e.g. GeneCompass's): G4 shares G3's row -> the same prediction
    rng = np.random.default_rng(0)
    table = pd.DataFrame(rng.normal(size=(6, 5)), index=[f"G{i}" for i in range(6)])
    table.loc["G4"] = table.loc["G3"]
    model = pg.tl.fit_baseline(synth, "linear_embedding", perturbation_embedding=table)
    pred = model.predict(["G4", "G3", "G20"], n_control=None)
    np.testing.assert_allclose(pred.X[0], pred.X[1], rtol=1e-6)
    assert pred.obs["embedding_source"].tolist() == ["embedded", "embedded", "none"]
    assert pred.obs["available"].tolist() == [True, True, False]
    np.testing.assert_allclose(pred.layers["delta"][2], model.b, atol=1e-6)
    assert pred.uns["pg_prediction"]["fallback"].startswith("b (the mean training change)")
    # an n_vars x d array aligned to var_names (NaN rows: no embedding), the form of compass_gene_embeddings
    arr = np.full((30, 5), np.nan)
    arr[:6] = table.to_numpy()
    again = pg.tl.fit_baseline(synth, "linear_embedding", perturbation_embedding=arr)
    np.testing.assert_allclose(again.predict(["G4", "G3"], n_control=None).X, pred.X[:2], rtol=1e-5)
    # graph embeddings
    synth.uns["pg_coexpression_graph"] = _hand_graph(synth)
    co = pg.tl.fit_baseline(synth, "linear_embedding", perturbation_embedding="coexpression", embedding_dim=2)
    assert np.isfinite(co.predict(["G4", "G0+G1"]).X).all()
    with pytest.raises(KeyError, match="pg.pp.go_graph"):
        pg.tl.fit_baseline(synth, "linear_embedding", perturbation_embedding="go")
    with pytest.raises(ValueError, match="n_vars x d"):
        pg.tl.fit_baseline(synth, "linear_embedding", perturbation_embedding=np.ones((3, 2)))


def test_linear_embedding_no_longer_explodes_on_norman_seed0(norman):
    # the benchmark's cells: perturbations with a gene outside GO dropped (IER5L), simulation split seed 0;
    # TMSB4X (test, measured, a G row far longer than any GO-neighbour embedding) made the old fit explode
    ann = pg.datasets.go_annotations()
    adata = pg.pp.parse_perturbations(
        norman, perturbation_key="condition", gene_universe=set(ann["gene"]), drop_unknown=True, copy=True
    )
    pg.pp.rank_de_genes(adata)
    perturbed = {g for c in adata.obs["pg_perturbation"].unique() for g in str(c).split("+")}
    pg.pp.go_graph(adata, annotations=ann[ann["gene"].isin(set(adata.var_names) | perturbed)])
    pg.pp.split_perturbations(adata, kind="simulation", seed=0)
    models = {
        "old": pg.tl.fit_baseline(adata, "linear_embedding", ridge=0.1, normalize=False),
        "new": pg.tl.fit_baseline(adata, "linear_embedding"),
        "train_mean": pg.tl.fit_baseline(adata, "train_mean"),
    }
    df = pg.tl.evaluate(adata, models)
    nmse = df[df["metric"] == "mse_top20_normalized"].groupby(["model", "subgroup"])["value"].mean().unstack()
    assert nmse.loc["old"].max() > 5  # the explosion this guards against
    assert nmse.loc["new"].max() < 1.5
    assert nmse.loc["new"].mean() < 1.1
