import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.collections import PathCollection

import pertpy_gnn as pg

TEST = ["KLF1+MAP2K6", "MAPK1+TGFBR2", "FOXO4", "CBL+CNN1"]


@pytest.fixture
def prepared(norman):
    genes = {g for c in norman.obs["condition"].unique() for g in c.split("+") if g != "control"}
    pg.pp.parse_perturbations(norman, perturbation_key="condition", gene_universe=genes)
    pg.pp.rank_de_genes(norman)
    assignment = {p: "train" for p in norman.obs["pg_perturbation"].cat.categories if p != "control"}
    assignment.update(dict.fromkeys(TEST, "test") | {"MAP2K3": "val"})
    pg.pp.split_perturbations(norman, kind="custom", assignment=assignment)
    return norman


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def test_de_genes_boxes_points_and_zero_line(prepared):
    additive = pg.tl.fit_baseline(prepared, "additive")
    preds = {"additive": additive, "mean": pg.tl.fit_baseline(prepared, "train_mean").predict(TEST)}
    _, ax = plt.subplots()
    out = pg.pl.de_genes(prepared, "MAP2K6+KLF1", preds, ax=ax)
    assert out is ax
    names = prepared.uns["pg_de_genes"]["names"].loc["KLF1+MAP2K6"].tolist()
    assert [t.get_text() for t in ax.get_xticklabels()] == names
    assert len(ax.patches) == 20  # one box per gene
    points = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert len(points) == 2 and all(len(c.get_offsets()) == 20 for c in points)
    # the additive points are the predicted change over the control mean
    pred = additive.predict("KLF1+MAP2K6")
    idx = prepared.uns["pg_de_genes"]["indices"].loc["KLF1+MAP2K6"].to_numpy()
    ctrl = np.asarray(
        prepared.X[(prepared.obs["pg_perturbation"] == "control").to_numpy()].mean(axis=0)
    ).ravel()
    np.testing.assert_allclose(points[0].get_offsets()[:, 1], pred.X[0, idx] - ctrl[idx], atol=1e-4)
    assert any(np.allclose(line.get_ydata(), 0) for line in ax.lines)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["additive", "mean"]
    assert ax.get_title() == "KLF1+MAP2K6"


def test_de_genes_without_prediction_and_errors(prepared):
    ax = pg.pl.de_genes(prepared, "FOXO4", n_genes=10)
    assert len(ax.patches) == 10 and ax.get_legend() is None
    with pytest.raises(KeyError, match="has no DE genes"):
        pg.pl.de_genes(prepared, "NOTAGENE")
    with pytest.raises(ValueError, match="n_genes=50"):
        pg.pl.de_genes(prepared, "FOXO4", n_genes=50)
    del prepared.uns["pg_de_genes"]
    with pytest.raises(KeyError, match=r"pg\.pp\.rank_de_genes"):
        pg.pl.de_genes(prepared, "FOXO4")


def test_metrics_bars_points_and_labels(prepared):
    models = {k: pg.tl.fit_baseline(prepared, k) for k in ("no_change", "train_mean", "additive")}
    df = pg.tl.evaluate(prepared, models)
    _, ax = plt.subplots()
    out = pg.pl.metrics(df, ax=ax)
    assert out is ax
    assert len(ax.patches) == 3 * 3  # models x subgroups
    assert [t.get_text() for t in ax.get_xticklabels()] == ["unseen_single", "combo_seen0", "combo_seen2"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["no_change", "train_mean", "additive"]
    # points: 2 perturbations per (model, subgroup), none for additive on unseen singles (NaN)
    points = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert sum(len(c.get_offsets()) for c in points) == 2 * 2 * 2 + 2
    heights = [p.get_height() for p in ax.patches]
    assert heights[0] == pytest.approx(1.0) and heights[1] == pytest.approx(1.0)  # no_change
    assert any(np.allclose(line.get_ydata(), 1) for line in ax.lines)
    assert ax.get_ylabel() == "mse_top20_normalized"

    # additive predicts no unseen single and only some doubles: its bars are labelled with their coverage
    assert [t.get_text() for t in ax.texts] == ["0/1", "0/1"]  # the unseen single and one double
    hatched = [p for p in ax.patches if p.get_hatch()]
    assert len(hatched) == 2 and all(p.get_height() == 0 for p in hatched)
    # common=True: every bar over the perturbations all three models predict (none in the subgroups where
    # additive predicts nothing: there every model's bar is empty and labelled 0/1)
    ax3 = pg.pl.metrics(df, common=True, points=True)
    assert [t.get_text() for t in ax3.texts] == ["0/1"] * 6
    value = df[df["metric"] == "mse_top20_normalized"].pivot_table(
        index=["subgroup", "perturbation"], columns="model", values="value"
    )
    shared = value.dropna()
    for k, sg in enumerate(["unseen_single", "combo_seen0", "combo_seen2"]):
        want = shared.loc[sg, "train_mean"].mean() if sg in shared.index.get_level_values(0) else 0.0
        assert ax3.patches[3 + k].get_height() == pytest.approx(want)  # train_mean's bars

    ax2 = pg.pl.metrics(df, metric="pearson_delta", models=["additive"], points=False)
    assert len(ax2.patches) == 3 and not [c for c in ax2.collections if isinstance(c, PathCollection)]
    with pytest.raises(ValueError, match="No values of metric 'nope'"):
        pg.pl.metrics(df, metric="nope")
