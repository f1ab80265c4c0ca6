"""cell-gears models and data folders: loaded, they predict what cell-gears predicts.

The fixture ``tests/data/cellgears_fixture/`` was made by cell-gears 0.1.2 itself on our simulator's
data (``benchmarks/reference_gears/make_cellgears_fixture.sh``): two small models saved with its
``save_model``, its data folder with its own simulation split, and its ``predict`` outputs with the
control cells it drew. These tests need only the committed files, not cell-gears.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import pertpy_gnn as pg
from pertpy_gnn._constants import PERT_KEY, SPLIT_KEY
from pertpy_gnn._pickle import UnsafePickleError

FIX = Path(__file__).parent / "data" / "cellgears_fixture"
DATA = FIX / "data" / "sim"
TOL = 1e-5


@pytest.fixture(scope="module")
def preds():
    return dict(np.load(FIX / "predictions.npz"))


@pytest.fixture
def adata():
    return pg.datasets.read_gears_data(DATA)


def _published(model, adata, preds, tag):
    """Our prediction with cell-gears' control cells, beside cell-gears' own, and its uncertainty."""
    perts = [str(p) for p in preds[f"{tag}_perts"]]
    out = model.predict(perts)
    x = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    pos = adata.obs_names.get_indexer_for
    ctrl_mean = np.stack([x[pos(cells)].astype(np.float64).mean(0) for cells in preds[f"{tag}_ctrl_cells"]])
    order = out.obs_names.get_indexer([pg.pp.canonical_name(p.split("+")) for p in perts])
    ours = out.layers["delta"][order].astype(np.float64) + ctrl_mean
    return (
        ours,
        preds[f"{tag}_pred"].astype(np.float64),
        out.obs["uncertainty"].to_numpy()[order] if ("uncertainty" in out.obs) else None,
    )


@pytest.mark.parametrize("tag", ["plain", "unc"])
def test_load_reference_reproduces_cellgears_predictions(adata, preds, tag):
    model = pg.gears.GEARS.load_reference(FIX / f"model_{tag}", adata, coexpression="first_cell")
    ours, theirs, unc = _published(model, adata, preds, tag)
    assert ours.shape == theirs.shape == (len(preds[f"{tag}_perts"]), adata.n_vars)
    assert np.abs(ours - theirs).max() < TOL
    if tag == "unc":
        # cell-gears reports exp(-mean over genes of the mean log-variance over its 300 cells)
        np.testing.assert_allclose(np.exp(-unc.astype(np.float64)), preds["unc_logvar_sum"], rtol=TOL, atol=0)
        mu, sd = model.module.uncertainty_stats.numpy()
        assert sd > 0 and mu != 0  # set from the training cells of the split
        out = model.predict([str(p) for p in preds["unc_perts"]])
        np.testing.assert_allclose(out.obs["uncertainty_z"], (out.obs["uncertainty"] - mu) / sd, rtol=1e-5)


@pytest.mark.parametrize("tag", ["plain", "unc"])
def test_float64_agreement_shows_the_float32_gap_is_rounding(adata, preds, tag):
    # cell-gears' own network re-run in float64 on the same batches (reference_gears/cellgears_float64.py):
    # ours in float64 agrees to ~1e-9, so the float32 differences above (~6e-6) are rounding, not the model
    ref = np.load(FIX / "predictions_float64.npz")
    model = pg.gears.GEARS.load_reference(FIX / f"model_{tag}", adata, coexpression="first_cell")
    sets = [tuple(str(p).split("+")) for p in preds[f"{tag}_perts"]]
    model.module.double()
    with torch.inference_mode():
        z, s = model.module.predict_delta(model._pert_index(sets))
    x = adata.X.toarray().astype(np.float64)
    ctrl = np.stack([x[adata.obs_names.get_indexer_for(c)].mean(0) for c in preds[f"{tag}_ctrl_cells"]])
    assert np.abs(z.numpy() + ctrl - ref[f"{tag}_f64"]).max() < 1e-7
    assert np.abs(ref[f"{tag}_f32"] - preds[f"{tag}_pred"]).max() == 0  # the re-run is cell-gears' predict
    if s is not None:
        np.testing.assert_allclose(np.exp(-s.numpy().mean(1)), ref[f"{tag}_f64_logvar_sum"], rtol=1e-7)


def test_paper_default_differs_from_published_first_cell_layout(adata, preds):
    # the default convolves every set over the co-expression graph (paper); cell-gears convolves 1 of 300 cells
    paper = pg.gears.GEARS.load_reference(FIX / "model_plain", adata)
    ours, theirs, _ = _published(paper, adata, preds, "plain")
    assert np.abs(ours - theirs).max() > 10 * TOL  # 4e-4 on this small model
    one = pg.gears.GEARS.load_reference(
        FIX / "model_plain", adata, coexpression="first_cell", predict_batch_size=1
    )
    conv, _, _ = _published(one, adata, preds, "plain")
    np.testing.assert_allclose(conv, ours, atol=1e-5)


def test_loaded_reference_saves_and_loads(adata, tmp_path):
    model = pg.gears.GEARS.load_reference(FIX / "model_unc", adata, coexpression="first_cell")
    sets = [c for c in adata.obs[PERT_KEY].cat.categories if c != "control"][:3]
    before = model.predict(sets)
    model.save(tmp_path / "m")
    back = pg.gears.ReferenceGEARS.load(tmp_path / "m", adata=adata)
    after = back.predict(list(before.obs_names))
    np.testing.assert_array_equal(before.X, after.X)
    np.testing.assert_array_equal(before.obs["uncertainty"], after.obs["uncertainty"])


def test_first_cell_layout_refuses_training(adata):
    model = pg.gears.GEARS.load_reference(FIX / "model_plain", adata, coexpression="first_cell")
    model.module.train()
    with pytest.raises(RuntimeError, match="first_cell"):
        model.module.inference(model._pert_index([(str(model.go_genes[0]),)]))


def _copy_model(tmp_path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(FIX / "model_plain", dst)
    return dst


def test_foreign_pickle_is_refused_naming_the_file(adata, tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    dst = _copy_model(tmp_path)
    with open(dst / "config.pkl", "wb") as f:
        pickle.dump({"hidden_size": 16, "x": Evil()}, f)
    with pytest.raises(UnsafePickleError, match=r"config\.pkl.*builtins\.print"):
        pg.gears.GEARS.load_reference(dst, adata)
    # tensors are plain data; a torch object that is not a tensor is not
    with open(dst / "config.pkl", "wb") as f:
        pickle.dump({"G_go": torch.zeros(2, 3), "layer": torch.nn.Linear(1, 1)}, f)
    with pytest.raises(UnsafePickleError, match=r"config\.pkl.*torch\.nn\.modules\.linear\.Linear"):
        pg.gears.GEARS.load_reference(dst, adata)


def test_truncated_or_foreign_weights_fail_clearly(adata, tmp_path):
    dst = _copy_model(tmp_path)
    raw = (dst / "model.pt").read_bytes()
    (dst / "model.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"model\.pt.*truncated, corrupt"):
        pg.gears.GEARS.load_reference(dst, adata)
    cfg = (dst / "config.pkl").read_bytes()
    (dst / "config.pkl").write_bytes(cfg[: len(cfg) // 3])
    with pytest.raises(ValueError, match=r"config\.pkl is not a readable pickle"):
        pg.gears.GEARS.load_reference(dst, adata)


def test_model_and_data_must_match(adata):
    with pytest.raises(ValueError, match="the model has 120 genes, adata has 119"):
        pg.gears.GEARS.load_reference(FIX / "model_plain", adata[:, 1:].copy())
    with pytest.raises(ValueError, match="perturbation graph has 120 nodes, but 3"):
        pg.gears.GEARS.load_reference(FIX / "model_plain", adata, pert_genes=["a", "b", "c"])


# ----------------------------------------------------------------------------------- read_gears_data
def test_read_gears_data_keeps_cellgears_split(adata):
    table = pickle.loads((DATA / "splits" / "sim_simulation_1_0.75.pkl").read_bytes())
    canon = lambda c: pg.pp.canonical_name([g for g in c.split("+") if g != "ctrl"])  # noqa: E731
    for s in ("train", "val", "test"):
        expected = {canon(c) for c in table[s] if c != "ctrl"}
        got = set(adata.obs.loc[adata.obs[SPLIT_KEY] == s, PERT_KEY].astype(str)) - {"control"}
        assert got == expected, s
    assert set(adata.obs.loc[adata.obs[PERT_KEY] == "control", SPLIT_KEY]) == {"train"}
    assert adata.obs["pg_n_genes"].max() == 2
    info = adata.uns["pg_gears_data"]
    assert Path(info["data_path"]) == FIX / "data"
    sub = info["test_subgroup"]
    assert set(sub["perturbation"]) == set(
        adata.obs.loc[adata.obs[SPLIT_KEY] == "test", PERT_KEY].astype(str)
    )


def _write_folder(root: Path, splits: dict[str, dict]) -> Path:
    folder = root / "mini"
    (folder / "splits").mkdir(parents=True)
    ad_ = pg.datasets.read_gears_data(DATA)  # reuse the processed file's layout, rewritten smaller
    raw = ad_.copy()
    raw.var_names = raw.var["gears_var_name"].to_numpy()
    for k in [c for c in raw.obs if c.startswith("pg_")]:
        del raw.obs[k]
    raw.uns = {}
    raw.write_h5ad(folder / "perturb_processed.h5ad")
    for name, table in splits.items():
        with open(folder / "splits" / f"{name}.pkl", "wb") as f:
            pickle.dump(table, f)
    return folder


def test_read_gears_data_written_layout(tmp_path):
    conds = sorted(set(pg.datasets.read_gears_data(DATA).obs["condition"].astype(str)) - {"ctrl"})
    a = {"train": ["ctrl", *conds[:-3]], "val": conds[-3:-2], "test": conds[-2:-1]}  # conds[-1] unlisted
    folder = _write_folder(tmp_path, {"mini_custom_1_0.75": a, "mini_simulation_2_0.75": a})
    with pytest.raises(ValueError, match="several splits"):
        pg.datasets.read_gears_data(folder)
    out = pg.datasets.read_gears_data(folder, split="custom")
    assert conds[-1] not in set(out.obs["condition"].astype(str))
    assert list(out.uns["pg_gears_data"]["dropped_conditions"]) == [conds[-1]]
    test = set(out.obs.loc[out.obs[SPLIT_KEY] == "test", "condition"].astype(str))
    assert test == set(a["test"])
    with pytest.raises(FileNotFoundError, match="perturb_processed.h5ad"):
        pg.datasets.read_gears_data(tmp_path)
    with open(folder / "splits" / "mini_custom_1_0.75.pkl", "wb") as f:
        pickle.dump({"train": [np.random.default_rng]}, f)
    with pytest.raises(UnsafePickleError, match="mini_custom_1_0.75.pkl"):
        pg.datasets.read_gears_data(folder, split="custom")


def test_loaded_reference_fine_tunes(adata):
    pg.pp.rank_de_genes(adata)
    model = pg.gears.GEARS.load_reference(FIX / "model_unc", adata, direction="sign")
    sets = [c for c in adata.obs[PERT_KEY].cat.categories if c != "control"]
    before = model.predict(sets).X.copy()
    model.train(max_epochs=1, progress_bar=False)
    assert np.isfinite(model.history_["train_loss"]).all()
    assert np.abs(model.predict(sets).X - before).max() > 1e-3
