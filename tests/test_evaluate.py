import anndata as ad
import numpy as np
import pandas as pd
import pytest
from anndata import AnnData
from scipy.stats import pearsonr, spearmanr, ttest_ind

import pertpy_gnn as pg
from pertpy_gnn._prediction import skipped_frame
from pertpy_gnn.tl._baselines import BASELINE_KINDS
from pertpy_gnn.tl._evaluate import (
    METRICS,
    _group_quantiles,
    de_weights,
    discrimination,
    top_overlap,
    weighted_r2,
)
from pertpy_gnn.tl._prediction import make_prediction_adata

from .conftest import Picky, additive_screen

TEST = ["G4", "G0+G1", "G2+G3", "G4+G5"]


def _synthetic(seed: int = 0, n_genes: int = 250, n_cells: int = 25) -> AnnData:
    """The additive screen with a gene zero in every cell, DE genes and a hand-written split."""
    adata = additive_screen(seed, n_genes, n_cells, silent_gene=True)
    pg.pp.rank_de_genes(adata)
    pert = adata.obs["pg_perturbation"].astype(str)
    adata.obs["pg_split"] = pd.Categorical(np.where(pert.isin(TEST), "test", "train"))
    sub = {"G4": "unseen_single", "G0+G1": "combo_seen2", "G2+G3": "combo_seen2", "G4+G5": "combo_seen1"}
    adata.obs["pg_subgroup"] = pd.Categorical(pert.map(sub).fillna("train"))
    return adata


@pytest.fixture
def synth() -> AnnData:
    return _synthetic()


def _means(adata: AnnData, names: list[str]) -> np.ndarray:
    pert = adata.obs["pg_perturbation"].astype(str).to_numpy()
    return np.vstack([np.asarray(adata.X[pert == n].astype(np.float64).mean(axis=0)).ravel() for n in names])


def _as_prediction(names: list[str], mean: np.ndarray, adata: AnnData) -> AnnData:
    ctrl = _means(adata, ["control"])[0]
    return make_prediction_adata([tuple(n.split("+")) for n in names], mean, ctrl, adata.var_names)


def _value(df: pd.DataFrame, model: str, pert: str, metric: str) -> float:
    row = df[(df["model"] == model) & (df["perturbation"] == pert) & (df["metric"] == metric)]
    assert len(row) == 1
    return float(row["value"].iloc[0])


def test_no_change_scores_one_and_truth_scores_perfectly(synth):
    names = ["G4", "G0+G1", "G2+G3", "G4+G5"]
    truth = _as_prediction(names, _means(synth, names), synth)
    models = {"no_change": pg.tl.fit_baseline(synth, "no_change"), "truth": truth}
    df = pg.tl.evaluate(synth, models)
    nc = df[df["model"] == "no_change"].set_index(["perturbation", "metric"])["value"]
    for n in names:
        assert nc[(n, "mse_top20_normalized")] == pytest.approx(1.0, abs=1e-12)
        assert nc[(n, "pearson_delta")] == 0.0
        assert nc[(n, "frac_opposite_direction_top20")] == 0.0
    tr = df[df["model"] == "truth"].set_index(["perturbation", "metric"])["value"]
    for n in names:
        for m in (
            "mse_top20",
            "mse_top20_normalized",
            "mse_top100",
            "mse_top200",
            "mse_all",
            "mean_abs_zscore_top20",
        ):
            assert tr[(n, m)] == pytest.approx(0.0, abs=1e-10), m
        for m in ("pearson_delta", "pearson_delta_top20", "spearman_delta", "spearman_delta_top20"):
            assert tr[(n, m)] == pytest.approx(1.0, abs=1e-6), m
        assert tr[(n, "frac_correct_direction_top20")] == 1.0


def test_metrics_match_a_per_perturbation_reference(synth):
    rng = np.random.default_rng(1)
    names = ["G4", "G0+G1", "G2+G3", "G4+G5"]
    pred = _means(synth, names) + rng.normal(0, 0.2, (4, synth.n_vars))
    df = pg.tl.evaluate(synth, {"noisy": _as_prediction(names, pred, synth)})
    x = synth.X.toarray().astype(np.float64)
    pert = synth.obs["pg_perturbation"].astype(str).to_numpy()
    ctrl_cells = x[pert == "control"]
    ctrl = ctrl_cells.mean(axis=0)
    p32 = pred.astype(np.float32).astype(np.float64)
    perturbed = [c for c in pert_names(synth) if c != "control"]
    centroid = np.mean([x[pert == c].mean(axis=0) for c in perturbed], axis=0)
    truths = np.vstack([x[pert == n].mean(axis=0) for n in names])
    for i, n in enumerate(names):
        cells = x[pert == n]
        true = cells.mean(axis=0)
        de = synth.uns["pg_de_genes"]["indices"].loc[n].to_numpy()[:20]
        t = ttest_ind(cells, ctrl_cells, equal_var=False).statistic
        t = np.where(np.isfinite(t), t, 0)
        top100 = np.argsort(-np.abs(t), kind="stable")[:100]
        p, tr, c = p32[i], true, ctrl
        expressed = ~(cells[:, de] == 0).all(axis=0)
        q = {k: np.quantile(cells[:, de], k / 100, axis=0) for k in (25, 40, 60, 75)}
        sd = cells[:, de].std(axis=0)
        ref = {
            "mse_top20": np.mean((p[de] - tr[de]) ** 2),
            "mse_top20_normalized": np.mean((p[de] - tr[de]) ** 2) / np.mean((c[de] - tr[de]) ** 2),
            "mse_top100": np.mean((p[top100] - tr[top100]) ** 2),
            "mse_top200": np.mean((p - tr)[np.argsort(-np.abs(t), kind="stable")[:200]] ** 2),
            "mse_all": np.mean((p - tr) ** 2),
            "pearson_delta": pearsonr(p - c, tr - c)[0],
            "pearson_delta_top20": pearsonr(p[de] - c[de], tr[de] - c[de])[0],
            "spearman_delta": spearmanr(p - c, tr - c)[0],
            "spearman_delta_top20": spearmanr(p[de] - c[de], tr[de] - c[de])[0],
            "frac_opposite_direction_top20": np.mean(np.sign(p[de] - c[de]) * np.sign(tr[de] - c[de]) < 0),
            "frac_correct_direction_top20": np.mean(np.sign(p[de] - c[de]) == np.sign(tr[de] - c[de])),
            "frac_in_40_60_top20": np.mean(((p[de] >= q[40]) & (p[de] <= q[60]))[expressed]),
            "frac_in_25_75_top20": np.mean(((p[de] >= q[25]) & (p[de] <= q[75]))[expressed]),
            "mean_abs_zscore_top20": np.mean(np.abs(p[de] - tr[de])[sd > 0] / sd[sd > 0]),
        }
        # calibrated metrics: weights from Welch t against every other perturbed cell
        rest = x[(pert != n) & (pert != "control")]
        t_rest = np.nan_to_num(ttest_ind(cells, rest, equal_var=False).statistic)
        a = np.abs(t_rest)
        w = ((a - a.min()) / (a.max() - a.min())) ** 2
        w /= w.sum()
        dt, dp = tr - centroid, p - centroid
        ref["mse_de_weighted"] = np.sum(w * (p - tr) ** 2)
        ref["r2_delta_de_weighted"] = 1 - np.sum(w * (dp - dt) ** 2) / np.sum(w * (dt - np.sum(w * dt)) ** 2)
        ref["pearson_delta_centroid"] = pearsonr(dp, dt)[0]
        dist = np.array([np.abs(p - truths[j]).sum() for j in range(len(names))])
        closer = sum(dist[j] < dist[i] for j in range(len(names)) if j != i)
        ref["perturbation_discrimination"] = 1 - closer / (len(names) - 1)
        for k, true_top in ((20, de), (100, top100)):
            pred_top = np.argsort(-np.abs(p - c), kind="stable")[:k]
            ref[f"de_overlap_top{k}"] = len(set(pred_top) & set(true_top)) / k
        assert set(ref) == set(METRICS)
        for m, v in ref.items():
            assert _value(df, "noisy", n, m) == pytest.approx(v, rel=1e-4, abs=1e-6), (n, m)


def pert_names(adata: AnnData) -> list[str]:
    return list(adata.obs["pg_perturbation"].cat.categories)


def test_new_metrics_on_hand_computed_examples():
    # DE weights: |t| = (0, 1, 2) -> min-max (0, .5, 1) -> squared (0, .25, 1) -> / 1.25
    np.testing.assert_allclose(de_weights(np.array([[0.0, -1.0, 2.0]])), [[0.0, 0.2, 0.8]])
    np.testing.assert_allclose(de_weights(np.array([[3.0, -3.0]])), [[0.5, 0.5]])
    assert np.isnan(de_weights(np.zeros((1, 2)))).all()
    # weighted R^2: true (1, 3), weights (.5, .5): mean 2, SS_tot = 1; pred (1, 2): SS_res = .5 -> R^2 = .5
    assert weighted_r2(np.array([[1.0, 2.0]]), np.array([[1.0, 3.0]]), np.array([[0.5, 0.5]]))[
        0
    ] == pytest.approx(0.5)
    # discrimination: three true profiles 0, 1, 3 (one gene); predictions 0.9 (own 0: distance .9, profile 1 is
    # closer -> 1 of 2 -> 0.5), 1 (own: closest -> 1), 0 (own 3 is the farthest -> 0)
    true = np.array([[0.0], [1.0], [3.0]])
    np.testing.assert_allclose(discrimination(np.array([[0.9], [1.0], [0.0]]), true), [0.5, 1.0, 0.0])
    # a tie counts one half: prediction 0.5 is as far from 0 as from 1
    np.testing.assert_allclose(discrimination(np.array([[0.5], [1.0], [3.0]]), true)[0], 0.75)
    # top-k overlap: predicted |change| ranks genes 3, 0 first; true top-2 are 0, 1 -> 1 of 2
    d = np.array([[0.5, 0.1, 0.0, -0.9]])
    assert top_overlap(d, np.array([[0, 1]]))[0] == 0.5
    # a zero change is never a predicted DE gene
    assert top_overlap(np.zeros((1, 4)), np.array([[0, 1]]))[0] == 0.0


def test_group_quantiles_match_numpy():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 5, 200)
    codes[:5] = np.arange(5)
    v = rng.normal(size=(200, 7))
    v[:, 3] = np.round(v[:, 3])  # ties
    out = _group_quantiles(v, codes, 5, (0.0, 0.25, 0.4, 1.0))
    for g in range(5):
        np.testing.assert_allclose(out[:, g], np.quantile(v[codes == g], [0.0, 0.25, 0.4, 1.0], axis=0))


def test_keys_shapes_summary_and_h5ad(synth, tmp_path, caplog):
    models = {k: pg.tl.fit_baseline(synth, k) for k in ("no_change", "train_mean", "additive")}
    df = pg.tl.evaluate(synth, models)
    assert list(df.columns) == [
        "model",
        "perturbation",
        "subgroup",
        "metric",
        "value",
        "available",
        "skipped",
    ]
    assert len(df) == 3 * 4 * len(METRICS)
    assert (df["skipped"] == "").all() and synth.uns["pg_evaluation"]["skipped"].empty  # nothing left out
    sub = df.drop_duplicates("perturbation").set_index("perturbation")["subgroup"]
    assert sub.to_dict() == {
        "G4": "unseen_single",
        "G0+G1": "combo_seen2",
        "G2+G3": "combo_seen2",
        "G4+G5": "combo_seen1",
    }
    # additive: NaN for sets without both singles in train (G4 alone, G4+G5), values otherwise
    add = df[(df["model"] == "additive") & (df["metric"] == "mse_top20")].set_index("perturbation")["value"]
    assert np.isnan(add["G4"]) and np.isnan(add["G4+G5"]) and np.isfinite(add["G0+G1"])
    flags = df[(df["model"] == "additive") & (df["metric"] == "mse_top20")].set_index("perturbation")[
        "available"
    ]
    assert flags.to_dict() == {"G4": False, "G0+G1": True, "G2+G3": True, "G4+G5": False}
    # on additive synthetic data the additive baseline beats no change
    assert add["G0+G1"] < _value(df, "no_change", "G0+G1", "mse_top20")

    stored = synth.uns["pg_evaluation"]
    pd.testing.assert_frame_equal(stored["results"], df)
    summary = stored["summary"]
    assert list(summary.columns) == [
        "model",
        "subgroup",
        "metric",
        "mean",
        "sem",
        "n",
        "n_unavailable",
        "n_skipped",
    ]
    assert (summary["n_skipped"] == 0).all()
    assert set(summary["subgroup"]) == {"unseen_single", "combo_seen2", "combo_seen1", "all"}
    row = summary[
        (summary.model == "additive") & (summary.subgroup == "all") & (summary.metric == "mse_top20")
    ]
    assert row["n"].item() == 2 and row["mean"].item() == pytest.approx(add[["G0+G1", "G2+G3"]].mean())
    with caplog.at_level("WARNING", logger="pertpy_gnn"):
        wide = pg.tl.summarize_evaluation(df, wide=True)
    assert list(wide.columns) == ["no_change", "train_mean", "additive"]
    assert wide.loc[("all", "mse_top20_normalized"), "no_change"] == pytest.approx(1.0)
    assert "means of additive rest on fewer perturbations" in caplog.text
    # common=True: every model over G0+G1 and G2+G3, the perturbations additive predicts
    same = pg.tl.summarize_evaluation(df, common=True)
    assert set(same["subgroup"]) == {"combo_seen2"}  # one subgroup left: no separate 'all' row
    assert (same["n"] == 2).all()
    mean = same[(same.model == "no_change") & (same.metric == "mse_top20")]["mean"]
    assert mean.item() == pytest.approx(
        np.mean([_value(df, "no_change", p, "mse_top20") for p in ("G0+G1", "G2+G3")])
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="pertpy_gnn"):
        pg.tl.summarize_evaluation(df, wide=True, common=True)
    assert "fewer perturbations" not in caplog.text

    synth.write_h5ad(tmp_path / "e.h5ad")
    back = ad.read_h5ad(tmp_path / "e.h5ad").uns["pg_evaluation"]
    np.testing.assert_allclose(back["results"]["value"].to_numpy(), df["value"].to_numpy(), equal_nan=True)

    with pytest.raises(ValueError, match="overwrite=True"):
        pg.tl.evaluate(synth, models)
    df2 = pg.tl.evaluate(
        synth, list(models.values()), subset="train", overwrite=True, key_added="pg_evaluation"
    )
    assert set(df2["perturbation"]) == {"G0", "G1", "G2", "G3", "G5", "G0+G4", "G1+G5"}
    assert set(df2["subgroup"]) == {"train"}


def test_predictor_and_prediction_adata_agree(synth):
    model = pg.tl.fit_baseline(synth, "train_mean")
    pred = model.predict(["G4+G5", "G4", "G2+G3", "G0+G1", "G0"])  # other order, one extra set
    a = pg.tl.evaluate(synth, {"m": model}, key_added="a")
    b = pg.tl.evaluate(synth, {"m": pred}, key_added="b")
    pd.testing.assert_frame_equal(a, b)


def test_errors(synth):
    model = pg.tl.fit_baseline(synth, "no_change")
    nosplit = synth.copy()
    del nosplit.obs["pg_split"]
    with pytest.raises(KeyError, match=r"pg\.pp\.split_perturbations"):
        pg.tl.evaluate(nosplit, {"m": model})
    node = synth.copy()
    del node.uns["pg_de_genes"]
    with pytest.raises(KeyError, match=r"pg\.pp\.rank_de_genes"):
        pg.tl.evaluate(node, {"m": model})
    with pytest.raises(ValueError, match="lacks 3 perturbations"):
        pg.tl.evaluate(synth, {"m": model.predict("G4")})
    with pytest.raises(ValueError, match="lacks 1 genes"):
        pg.tl.evaluate(synth, {"m": model.predict(TEST)[:, 1:]})
    with pytest.raises(ValueError, match="No cells with obs\\['pg_split'\\] == 'tset'"):
        pg.tl.evaluate(synth, {"m": model}, subset="tset")
    with pytest.raises(TypeError, match="expected a predictor or a prediction AnnData"):
        pg.tl.evaluate(synth, {"m": np.zeros(3)})


def test_norman_baselines(norman):
    genes = {g for c in norman.obs["condition"].unique() for g in c.split("+") if g != "control"}
    pg.pp.parse_perturbations(norman, perturbation_key="condition", gene_universe=genes)
    pg.pp.rank_de_genes(norman)
    test = ["KLF1+MAP2K6", "MAPK1+TGFBR2", "KLF1+TGFBR2", "FOXO4", "CBL+CNN1"]
    pert = norman.obs["pg_perturbation"].astype(str)
    norman.obs["pg_split"] = pd.Categorical(np.where(pert.isin(test), "test", "train"))
    pg.pp.coexpression_graph(norman)
    models = {
        k: pg.tl.fit_baseline(norman, k)
        for k in ("no_change", "train_mean", "additive", "linear_embedding", "linear_coexpression")
    }
    df = pg.tl.evaluate(norman, models)
    assert len(df) == 5 * 5 * len(METRICS)
    # linear_coexpression cannot place these perturbed genes (none is measured): the table says so
    avail = df[df["metric"] == "mse_all"].pivot(index="perturbation", columns="model", values="available")
    assert not avail["linear_coexpression"].any() and avail["no_change"].all()
    summary = norman.uns["pg_evaluation"]["summary"]
    row = summary[
        (summary.model == "linear_coexpression") & (summary.subgroup == "all") & (summary.metric == "mse_all")
    ]
    assert row["n_unavailable"].item() == 5
    nmse = df[df["metric"] == "mse_top20_normalized"].pivot(
        index="perturbation", columns="model", values="value"
    )
    np.testing.assert_allclose(nmse["no_change"], 1.0, rtol=1e-9)
    # the additive baseline on doubles whose singles were both measured (the benchmark finding)
    seen2 = ["KLF1+MAP2K6", "MAPK1+TGFBR2", "KLF1+TGFBR2"]
    assert (nmse.loc[seen2, "additive"] < 0.5).all()
    assert nmse.loc[["FOXO4", "CBL+CNN1"], "additive"].isna().all()


def test_simulated_screen_with_real_split_and_graphs():
    adata = pg.datasets.simulate_perturbseq(
        n_genes=200, n_singles=20, n_doubles=30, n_cells_per_perturbation=60, n_control=200, seed=0
    )
    pg.pp.parse_perturbations(adata, perturbation_key="condition")
    pg.pp.rank_de_genes(adata)
    pg.pp.split_perturbations(adata, kind="simulation", seed=1)
    pg.pp.coexpression_graph(adata, threshold=0.1)
    pg.pp.go_graph(adata)
    models = {k: pg.tl.fit_baseline(adata, k) for k in BASELINE_KINDS}
    df = pg.tl.evaluate(adata, models, predict_kwargs={"n_control": None})
    table = adata.uns["pg_split"]["table"]
    test = table[table["split"] == "test"]
    assert set(df["perturbation"]) == set(test.index)
    sub = df.drop_duplicates("perturbation").set_index("perturbation")["subgroup"]
    assert (sub == test["subgroup"].reindex(sub.index)).all()
    summary = pg.tl.summarize_evaluation(df, wide=True)
    nmse = summary.xs("mse_top20_normalized", level="metric")
    assert nmse.loc["all", "no_change"] == pytest.approx(1.0)
    # on combinations of seen singles the additive and linear models beat predicting no change
    assert nmse.loc["combo_seen2", "additive"] < 0.8
    assert nmse.loc["all", "linear_embedding"] < 1.0
    assert models["linear_coexpression"].scale != 0
    # additive is defined exactly for test sets whose genes all have a training single
    singles = {p for p in table.index[table["split"] == "train"] if "+" not in p and p != "control"}
    add = df[(df["model"] == "additive") & (df["metric"] == "mse_top20")].set_index("perturbation")["value"]
    for p, v in add.items():
        assert np.isfinite(v) == all(g in singles for g in p.split("+"))


def test_unpredictable_perturbations_are_left_out_for_every_model(synth, caplog):
    train_mean = pg.tl.fit_baseline(synth, "train_mean")
    models = {
        "picky": Picky(train_mean, {"G4"}),
        "no_change": pg.tl.fit_baseline(synth, "no_change"),
        "train_mean": train_mean,
    }
    with caplog.at_level("WARNING", logger="pertpy_gnn"):
        df = pg.tl.evaluate(synth, models)
    assert (
        "picky cannot predict 2 of the 4" in caplog.text
        and "G4+G5: G4+G5 has no embedding; fix" in caplog.text
    )
    # every perturbation keeps its rows; those left out are NaN, not available, with the reason
    assert len(df) == 3 * 4 * len(METRICS)
    left = df[df["skipped"] != ""]
    assert set(left["perturbation"]) == {"G4", "G4+G5"} and left["value"].isna().all()
    assert not left["available"].any()
    assert (left.loc[left["model"] == "picky", "skipped"].str.contains("has no embedding")).all()
    assert (left.loc[left["model"] != "picky", "skipped"].str.contains("picky cannot predict it")).all()
    # the model and the baselines are scored on the same perturbations: the common ones
    scored = (
        df[df["metric"] == "mse_all"].dropna(subset=["value"]).groupby("model")["perturbation"].apply(set)
    )
    assert all(s == {"G0+G1", "G2+G3"} for s in scored) and len(scored) == 3
    # picky is train_mean on the common perturbations, discrimination over the same pool included
    wide = df.pivot_table(index=["perturbation", "metric"], columns="model", values="value", dropna=False)
    np.testing.assert_array_equal(wide["picky"].to_numpy(), wide["train_mean"].to_numpy())
    record = synth.uns["pg_evaluation"]
    assert record["skipped"][["model", "perturbation"]].values.tolist() == [
        [m, p] for m in models for p in ("G4", "G4+G5")
    ]
    summary = record["summary"]
    all_rows = summary[summary["subgroup"] == "all"]
    assert (all_rows["n_skipped"] == 2).all() and (all_rows.loc[all_rows.metric == "mse_all", "n"] == 2).all()
    assert (all_rows["n_unavailable"] == 0).all()  # a perturbation left out is no fallback
    # a prediction AnnData recording what its model skipped (predict(..., skip_unknown=True)) is the same
    pred = train_mean.predict(["G0+G1", "G2+G3"])
    pred.uns["pg_prediction"]["skipped"] = skipped_frame({"G4": "no G4", "G4+G5": "no G4"})
    df2 = pg.tl.evaluate(synth, {**models, "picky": pred}, key_added="b")
    pd.testing.assert_series_equal(df2["value"], df["value"])
    assert set(df2.loc[(df2["model"] == "picky") & (df2["skipped"] != ""), "skipped"]) == {"no G4"}


def test_unpredictable_everything_raises(synth):
    no_change = pg.tl.fit_baseline(synth, "no_change")
    with pytest.raises(
        ValueError, match=r"'picky' cannot predict any of the 4 perturbations.*G4: G4 has no embedding"
    ):
        pg.tl.evaluate(synth, {"picky": Picky(no_change, {"G0", "G2", "G4"}), "no_change": no_change})
    # each model alone predicts some, together none in common
    with pytest.raises(ValueError, match="No perturbation of subset 'test' can be predicted by every model"):
        pg.tl.evaluate(synth, {"a": Picky(no_change, {"G0", "G2"}), "b": Picky(no_change, {"G4"})})
    assert "pg_evaluation" not in synth.uns


def test_gi_scores_leave_out_pairs_the_model_could_not_predict(caplog):
    adata = pg.datasets.simulate_perturbseq(
        n_genes=60, n_singles=6, n_doubles=8, n_cells_per_perturbation=20, n_control=40, seed=0
    )
    pg.pp.parse_perturbations(adata, perturbation_key="condition")
    true = pg.tl.gi_scores(adata, n_subsamples=200, subsample_size=20)
    pairs = list(true.index)
    adata.obs["pg_split"] = "train"
    model = pg.tl.fit_baseline(adata, "train_mean")
    gone = pairs[0].split("+")[0]
    keep = [p for p in [*{g for p in pairs for g in p.split("+")}, *pairs] if gone not in p.split("+")]
    pred = model.predict(keep)
    pred.uns["pg_prediction"]["skipped"] = skipped_frame({gone: f"{gone} has no GO-graph node"})
    with caplog.at_level("WARNING", logger="pertpy_gnn"):
        scores = pg.tl.gi_scores(pred, pairs=pairs, n_subsamples=200, subsample_size=20)
    expected = [p for p in pairs if gone not in p.split("+")]
    assert list(scores.index) == expected and 0 < len(expected) < len(pairs)
    assert f"{gone} has no GO-graph node" in caplog.text and "left out of the GI scores" in caplog.text
    only = [p for p in pairs if gone in p.split("+")]
    with pytest.raises(ValueError, match="None of the .* requested pairs can be scored"):
        pg.tl.gi_scores(pred, pairs=only, overwrite=True)
    # a perturbation missing for no recorded reason is still an error
    del pred.uns["pg_prediction"]["skipped"]
    with pytest.raises(ValueError, match="not in the prediction"):
        pg.tl.gi_scores(pred, pairs=pairs, overwrite=True)
