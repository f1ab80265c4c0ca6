"""Cell contexts: the multi-context simulator, parsing, splits, DE, baselines and evaluation per context."""

import numpy as np
import pandas as pd
import pytest
import torch

import pertpy_gnn as pg

from .conftest import Picky

SIM = {"n_genes": 120, "n_singles": 8, "n_doubles": 6, "n_cells_per_perturbation": 20, "n_control": 100}


@pytest.fixture(scope="module")
def screen():
    return pg.datasets.simulate_perturbseq(**SIM, n_contexts=3, seed=3)


@pytest.fixture
def parsed(screen):
    adata = screen.copy()
    pg.pp.parse_perturbations(adata, perturbation_key="condition", context_key="context")
    return adata


def test_single_context_unchanged():
    one = pg.datasets.simulate_perturbseq(**SIM, seed=3)
    same = pg.datasets.simulate_perturbseq(**SIM, seed=3, n_contexts=1)
    assert "context" not in one.obs and "contexts" not in one.uns["simulation"]
    assert (one.X != same.X).nnz == 0


def test_simulated_contexts_share_biology_partly(screen):
    truth = screen.uns["simulation"]
    ctx = truth["contexts"]
    assert screen.obs["context"].value_counts().to_dict() == dict.fromkeys(
        ("C1", "C2", "C3"), screen.n_obs // 3
    )
    # the reference context is the single-context screen of the same seed
    one = pg.datasets.simulate_perturbseq(**SIM, seed=3)
    np.testing.assert_array_equal(
        ctx["C1"]["true_delta"].to_numpy(), one.uns["simulation"]["true_delta"].to_numpy()
    )
    np.testing.assert_array_equal(ctx["C1"]["true_control_mean"], truth["true_control_mean"])
    d1 = ctx["C1"]["true_delta"].to_numpy().ravel()
    for c in ("C2", "C3"):
        d = ctx[c]["true_delta"].to_numpy().ravel()
        r = np.corrcoef(d1, d)[0, 1]
        assert 0.5 < r < 0.995  # shared programs, context-specific scaling and program
        assert np.linalg.norm(d - d1) / np.linalg.norm(d1) > 0.1
        # baselines differ along the documented base shift
        shift = ctx[c]["true_control_mean"] - ctx["C1"]["true_control_mean"]
        assert np.corrcoef(shift, ctx[c]["base_shift"])[0, 1] > 0.7
        assert ctx[c]["context_program"]["activity"].abs().max() > 0.1
    assert (ctx["C1"]["response_scale"] == 1).all() and not (ctx["C2"]["response_scale"] == 1).all()
    # cells follow their context's truth
    x = screen.X.toarray()
    ctrl = (screen.obs["condition"] == "control").to_numpy()
    for c, other in (("C1", "C2"), ("C2", "C1"), ("C3", "C1")):
        m = x[ctrl & (screen.obs["context"] == c).to_numpy()].mean(0)
        own = np.abs(m - ctx[c]["true_control_mean"]).mean()
        assert own < 0.7 * np.abs(m - ctx[other]["true_control_mean"]).mean()


def test_parse_contexts_errors(screen):
    adata = screen.copy()
    with pytest.raises(KeyError, match="cell_line"):
        pg.pp.parse_perturbations(adata, perturbation_key="condition", context_key="cell_line")
    bad = adata[~((adata.obs["context"] == "C2") & (adata.obs["condition"] == "control"))].copy()
    with pytest.raises(ValueError, match=r"\['C2'\].*no control cells"):
        pg.pp.parse_perturbations(bad, perturbation_key="condition", context_key="context")
    pg.pp.parse_perturbations(adata, perturbation_key="condition", context_key="context")
    assert list(adata.obs["pg_context"].cat.categories) == ["C1", "C2", "C3"]
    assert adata.uns["pg_perturbation"]["context_key"] == "context"


def test_de_per_context(parsed):
    pg.pp.rank_de_genes(parsed)
    de = parsed.uns["pg_de_genes"]
    assert de["indices"].index[0].startswith("C1|") and len(de["indices"]) == 3 * (8 + 6)
    # one group against its own context's control cells: Welch t by hand
    pert = de["indices"].index[0].split("|")[1]
    x = parsed.X.toarray()
    c1 = (parsed.obs["context"] == "C1").to_numpy()
    a = x[c1 & (parsed.obs["pg_perturbation"] == pert).to_numpy()]
    b = x[c1 & (parsed.obs["pg_perturbation"] == "control").to_numpy()]
    t = (a.mean(0) - b.mean(0)) / np.sqrt(a.var(0, ddof=1) / len(a) + b.var(0, ddof=1) / len(b))
    t = np.nan_to_num(t)
    g = de["indices"].iloc[0, 0]
    assert g == np.argmax(np.abs(t))
    np.testing.assert_allclose(de["scores"].iloc[0, 0], t[g], rtol=1e-4)


def test_split_held_out_context(parsed):
    with pytest.raises(ValueError, match="held_out_context"):
        pg.pp.split_perturbations(parsed, kind="context")
    with pytest.raises(ValueError, match="held_out_context"):
        pg.pp.split_perturbations(parsed, kind="context", held_out_context="C9")
    pg.pp.split_perturbations(parsed, kind="context", held_out_context="C2", seed=1)
    obs = parsed.obs
    held = (obs["context"] == "C2").to_numpy()
    ctrl = (obs["pg_perturbation"] == "control").to_numpy()
    split = obs["pg_split"].astype(str).to_numpy()
    assert (split[held & ~ctrl] == "test").all() and (split[ctrl] == "train").all()
    assert not (split[~held] == "test").any()
    table = parsed.uns["pg_split"]["table"]
    val = set(table.loc[table["split"] == "val", "perturbation"])
    assert val and all(
        (table[(table["perturbation"] == p) & (table["context"] != "C2")]["split"] == "val").all()
        for p in val
    )
    test = table[table["split"] == "test"]
    assert set(test["subgroup"]) == {"context_seen", "context_unseen"}
    assert set(test.loc[test["subgroup"] == "context_unseen", "perturbation"]) == val


def test_split_within_contexts_is_shared(parsed):
    pg.pp.split_perturbations(parsed, kind="simulation", seed=0)
    per = parsed.obs.groupby(["pg_perturbation", "context"], observed=True)["pg_split"].first().unstack()
    assert (per.nunique(axis=1) == 1).all()


def _deltas(adata, context, split="train"):
    x = adata.X.toarray()
    o = adata.obs
    in_c = (o["context"] == context).to_numpy()
    ctrl = x[in_c & (o["pg_perturbation"] == "control").to_numpy()].mean(0, dtype=np.float64)
    keep = in_c & (o["pg_split"] == split).to_numpy() & (o["pg_perturbation"] != "control").to_numpy()
    return x[keep], o["pg_perturbation"].to_numpy()[keep], ctrl


def test_baselines_per_context(parsed):
    pg.pp.split_perturbations(parsed, kind="context", held_out_context="C3", seed=0)
    nc = pg.tl.fit_baseline(parsed, "no_change")
    tm = pg.tl.fit_baseline(parsed, "train_mean")
    pooled = pg.tl.fit_baseline(parsed, "train_mean", per_context=False)
    transfer = pg.tl.fit_baseline(parsed, "context_transfer")
    sets = (
        ["G0001"]
        if False
        else [parsed.uns["pg_split"]["table"].query("split == 'test'")["perturbation"].iloc[0]]
    )
    out = nc.predict(sets, n_control=None)
    assert list(out.obs["context"]) == ["C1", "C2", "C3"]
    for i, c in enumerate(["C1", "C2", "C3"]):
        _, _, ctrl = _deltas(parsed, c)
        np.testing.assert_allclose(out.X[i], ctrl, atol=1e-5)
    # training mean per context: the cells of the context's training perturbations over its control mean
    x, _, ctrl = _deltas(parsed, "C1")
    p = tm.predict(sets, context="C1", n_control=None)
    np.testing.assert_allclose(p.layers["delta"][0], x.mean(0) - ctrl, atol=1e-4)
    assert p.obs["available"].all()
    # the held-out context falls back to the pooled training change, flagged
    p3 = tm.predict(sets, context="C3", n_control=None)
    assert not p3.obs["available"].any() and "pooled" in p3.uns["pg_prediction"]["fallback"]
    xs = [_deltas(parsed, c) for c in ("C1", "C2")]
    want = sum(len(x) * (x.mean(0) - ctrl) for x, _, ctrl in xs) / sum(len(x) for x, _, _ in xs)
    np.testing.assert_allclose(p3.layers["delta"][0], want, atol=1e-4)
    pp = pooled.predict(sets, context="C1", n_control=None)
    np.testing.assert_allclose(pp.layers["delta"][0], want, atol=1e-4)
    assert pp.obs["available"].all()
    # transfer: the set's change in the other contexts, cell-weighted
    name = sets[0]
    pt = transfer.predict(sets, context="C3", n_control=None)
    assert pt.obs["available"].iloc[0]
    if True:
        parts = [(x[lab == name], ctrl) for x, lab, ctrl in xs]
        want = sum(len(v) * (v.mean(0) - c) for v, c in parts) / sum(len(v) for v, _ in parts)
        np.testing.assert_allclose(pt.layers["delta"][0], want, atol=1e-4)
    with pytest.raises(ValueError, match="per_context=False"):
        pg.tl.fit_baseline(parsed, "linear_embedding", per_context=False)


def test_additive_per_context_and_evaluate(parsed):
    for seed in range(20):  # a split with a test double whose two singles are training singles
        pg.pp.split_perturbations(parsed, kind="simulation", seed=seed, overwrite=True)
        table = parsed.uns["pg_split"]["table"]
        train = set(table.index[table["split"] == "train"])
        doubles = [d for d in table.index[table["subgroup"] == "combo_seen2"] if set(d.split("+")) <= train]
        if doubles:
            break
    double = doubles[0]
    pg.pp.rank_de_genes(parsed)
    add = pg.tl.fit_baseline(parsed, "additive")
    a, b = double.split("+")
    p = add.predict([double], context="C2", n_control=None)
    x, lab, ctrl = _deltas(parsed, "C2")
    want = x[lab == a].mean(0) + x[lab == b].mean(0) - 2 * ctrl
    assert np.isfinite(want).all()
    np.testing.assert_allclose(p.layers["delta"][0], want, atol=1e-4)
    df = pg.tl.evaluate(parsed, {"no_change": pg.tl.fit_baseline(parsed, "no_change"), "additive": add})
    assert set(df["context"]) == {"C1", "C2", "C3"}
    nc = df[(df["model"] == "no_change") & (df["metric"] == "mse_top20_normalized")]
    np.testing.assert_allclose(nc["value"], 1.0)
    # a model that cannot predict the sets of one gene: left out in every context, for every model
    no_change = pg.tl.fit_baseline(parsed, "no_change")
    picky = Picky(no_change, {a})
    dfp = pg.tl.evaluate(parsed, {"picky": picky, "no_change": no_change}, key_added="picky")
    gone = dfp["perturbation"].str.split("+").apply(lambda g: a in g)
    assert gone.any() and (dfp.loc[gone, "skipped"] != "").all() and dfp.loc[gone, "value"].isna().all()
    assert (dfp.loc[~gone, "skipped"] == "").all()
    rec = parsed.uns["picky"]["skipped"]
    assert list(rec.columns) == ["model", "perturbation", "context", "subgroup", "reason"]
    assert (
        len(rec)
        == 2 * dfp.loc[gone & (dfp["model"] == "picky")].drop_duplicates(["perturbation", "context"]).shape[0]
    )
    # a prediction AnnData must carry the context
    pred = add.predict(sorted(set(table.index[table["split"] == "test"])), n_control=None)
    df2 = pg.tl.evaluate(parsed, {"additive": pred}, overwrite=True)
    merged = df.merge(df2, on=["model", "perturbation", "context", "metric"])
    np.testing.assert_allclose(merged["value_x"], merged["value_y"], equal_nan=True)
    with pytest.raises(ValueError, match="context"):
        pg.tl.evaluate(
            parsed,
            {
                "x": pred[:, :]
                .copy()
                .__class__(
                    pred.X,
                    obs=pd.DataFrame(
                        {"perturbation": pred.obs["perturbation"].to_numpy()}, index=pred.obs_names
                    ),
                    var=pred.var,
                )
            },
            overwrite=True,
        )


# ----------------------------------------------------------------------------- GEARS with contexts
@pytest.fixture(scope="module")
def gears_ready(screen):
    adata = screen.copy()
    pg.pp.parse_perturbations(adata, perturbation_key="condition", context_key="context")
    pg.pp.rank_de_genes(adata)
    pg.pp.split_perturbations(adata, kind="context", held_out_context="C3", seed=0)
    pg.pp.go_graph(adata)
    pg.pp.coexpression_graph(adata)
    return adata


def test_gears_default_has_no_context_parts():
    from pertpy_gnn.gears import GEARSModule

    ei = torch.tensor([[0, 1], [1, 0]])
    w = torch.ones(2)
    plain = GEARSModule(5, 3, ei, w, ei[:, :1] * 0 + torch.tensor([[0], [1]]), torch.ones(1), hidden_dim=4)
    assert plain.n_contexts == 0
    assert not any("context" in k for k in plain.state_dict())
    torch.manual_seed(0)
    a = GEARSModule(5, 3, ei, w, ei, w, hidden_dim=4)
    torch.manual_seed(0)
    b = GEARSModule(5, 3, ei, w, ei, w, hidden_dim=4, n_contexts=2)
    # the context parts come last: every shared parameter is initialized as without contexts
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v)
    assert b.context_embedding.shape == (2, 4) and b.context_control_mean.shape == (2, 5)


def test_gears_with_contexts(gears_ready, tmp_path):
    from pertpy_gnn.gears import GEARS

    adata = gears_ready.copy()
    model = pg.tl.train_gears(adata, max_epochs=1, hidden_dim=8, progress_bar=False)
    assert model.contexts_ == ["C1", "C2", "C3"] and model.module.n_contexts == 3
    # each context's control mean is the mean of its training control cells
    x = adata.X.toarray()
    obs = adata.obs
    for i, c in enumerate(model.contexts_):
        ctrl = x[((obs["context"] == c) & (obs["pg_perturbation"] == "control")).to_numpy()].mean(0)
        np.testing.assert_allclose(model.module.context_control_mean[i].numpy(), ctrl, atol=1e-5)
    # partners are control cells of the cell's own context
    train, *_ = model._training_data_contexts(0)
    batch = train.__getitems__(list(range(0, len(train), 7)))
    ctx = obs["pg_context"].cat.codes.to_numpy()
    rows = {
        tuple(np.round(x[i], 5)): i for i in np.flatnonzero((obs["pg_perturbation"] == "control").to_numpy())
    }
    partner_ctx = [ctx[rows[tuple(np.round(r, 5))]] for r in batch["x_ctrl"].numpy()]
    np.testing.assert_array_equal(partner_ctx, batch["context"].numpy())
    test = adata.uns["pg_split"]["table"].query("split == 'test'")["perturbation"].tolist()[:3]
    pred = model.predict(test, n_control=None)
    assert list(pred.obs["context"]) == ["C1"] * 3 + ["C2"] * 3 + ["C3"] * 3
    # the context vector changes the predicted change of the same set
    d = pred.layers["delta"]
    assert np.abs(d[:3] - d[6:]).max() > 1e-4
    np.testing.assert_allclose(
        pred.X[6:] - d[6:],
        np.broadcast_to(model.module.context_control_mean[2], (3, adata.n_vars)),
        atol=1e-5,
    )
    one = model.predict(test, context="C3", n_control=None)
    np.testing.assert_allclose(one.X, pred.X[6:], atol=1e-6)
    df = pg.tl.evaluate(adata, {"GEARS": model})
    assert set(df["context"]) == {"C3"} and set(df["subgroup"]) <= {"context_seen", "context_unseen"}
    model.save(tmp_path / "m", overwrite=True)
    loaded = GEARS.load(tmp_path / "m", adata=adata)
    np.testing.assert_allclose(loaded.predict(test, n_control=None).X, pred.X, atol=1e-6)


def test_anchored_gears_refuses_contexts(gears_ready):
    from pertpy_gnn.gears import GEARS

    adata = gears_ready.copy()
    GEARS.setup_anndata(adata)
    with pytest.raises(ValueError, match="several cell contexts"):
        GEARS(adata, anchor="additive")
