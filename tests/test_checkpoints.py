"""Model files are safe (weights_only=True), versioned, and fail with messages that name the file."""

import numpy as np
import pandas as pd
import pytest
import torch
from scvi.model.base import BaseModelClass

import pertpy_gnn as pg
from pertpy_gnn._checkpoint import FORMAT_VERSION, HEADER_KEY, CheckpointError, decode, encode
from pertpy_gnn.compass import GeneCompass
from pertpy_gnn.gears import GEARS

from .test_compass_model import TINY, toy_corpus
from .test_gears import _prepare, _toy


@pytest.fixture(scope="module")
def saved_gears(tmp_path_factory):
    adata = _prepare(_toy())
    model = pg.tl.train_gears(adata, max_epochs=1, hidden_dim=16, progress_bar=False)
    path = tmp_path_factory.mktemp("gears") / "m"
    model.save(path)
    return adata, model, path


@pytest.fixture
def spy_load(monkeypatch):
    """Record the weights_only argument of every torch.load call."""
    calls = []
    real = torch.load

    def load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    return calls


def test_gears_file_is_plain_and_versioned(saved_gears, spy_load):
    adata, model, path = saved_gears
    raw = torch.load(path / "model.pt", weights_only=True)  # no pickled class anywhere
    assert raw[HEADER_KEY] == {"format": FORMAT_VERSION, "version": pg.__version__, "kind": "GEARS"}
    loaded = GEARS.load(path, adata=adata.copy())
    assert spy_load and all(w is True for w in spy_load)
    sets = ["G000+G001", "G002"]
    np.testing.assert_array_equal(loaded.predict(sets, seed=1).X, model.predict(sets, seed=1).X)
    pd.testing.assert_frame_equal(loaded.history_, model.history_)
    assert list(GEARS.saved_var_names(path)) == list(adata.var_names)


def test_gears_newer_format_is_refused_with_versions(saved_gears, tmp_path):
    adata, _, path = saved_gears
    raw = torch.load(path / "model.pt", weights_only=True)
    raw[HEADER_KEY] = {"format": FORMAT_VERSION + 1, "version": "99.0", "kind": "GEARS"}
    (tmp_path / "new").mkdir()
    torch.save(raw, tmp_path / "new" / "model.pt")
    with pytest.raises(CheckpointError, match=r"pertpy-gnn 99\.0 in checkpoint format 2.*Upgrade"):
        GEARS.load(tmp_path / "new", adata=adata.copy())


def test_gears_wrong_kind_is_refused(saved_gears, tmp_path):
    adata, _, path = saved_gears
    raw = torch.load(path / "model.pt", weights_only=True)
    raw[HEADER_KEY]["kind"] = "GeneCompass"
    (tmp_path / "k").mkdir()
    torch.save(raw, tmp_path / "k" / "model.pt")
    with pytest.raises(CheckpointError, match="holds a 'GeneCompass' model, not a 'GEARS' model"):
        GEARS.load(tmp_path / "k", adata=adata.copy())


def test_gears_legacy_pickle_is_refused_by_name_then_migrated(saved_gears, tmp_path):
    adata, model, _ = saved_gears
    BaseModelClass.save(model, str(tmp_path / "old"))  # scvi-tools' own (pickled) format
    with pytest.raises(CheckpointError, match=r"model\.pt holds Python objects.*allow_pickle=True"):
        GEARS.load(tmp_path / "old", adata=adata.copy())
    old = GEARS.load(tmp_path / "old", adata=adata.copy(), allow_pickle=True)
    old.save(tmp_path / "migrated")
    again = GEARS.load(tmp_path / "migrated", adata=adata.copy())
    np.testing.assert_array_equal(again.predict("G002").X, model.predict("G002").X)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_gears_corrupt_file_names_the_file(saved_gears, tmp_path, damage):
    adata, _, path = saved_gears
    data = (path / "model.pt").read_bytes()
    bad = tmp_path / "bad"
    bad.mkdir()
    target = bad / "model.pt"
    target.write_bytes(
        {"truncate": data[: len(data) // 2], "garbage": b"not a model" * 10, "empty": b""}[damage]
    )
    with pytest.raises(CheckpointError, match=rf"{target}.*truncated or corrupt"):
        GEARS.load(bad, adata=adata.copy())


def test_gears_load_on_reordered_genes_says_reorder(saved_gears):
    adata, _, path = saved_gears
    reordered = adata[:, adata.var_names[::-1]].copy()
    with pytest.raises(ValueError, match="the same genes, reordered") as info:
        GEARS.load(path, adata=reordered)
    assert "saved_var_names" in str(info.value) and "recomputing them does not help" in str(info.value)
    assert "coexpression_graph(adata" not in str(info.value)


def test_compass_checkpoint_and_save_load_are_safe(tmp_path, spy_load):
    corpus, _ = toy_corpus(tmp_path / "corpus", n_cells=64)
    ck = tmp_path / "ckpt"
    model = pg.tl.pretrain_compass(
        corpus, max_epochs=1, batch_size=16, ckpt_dir=ck, accelerator="cpu", progress_bar=False, **TINY
    )
    spy_load.clear()
    restored = GeneCompass.from_checkpoint(ck / "last.ckpt")
    model.save(tmp_path / "saved")
    loaded = GeneCompass.load(tmp_path / "saved")
    assert spy_load and all(w is True for w in spy_load)
    for m in (restored, loaded):
        for (n1, p1), (n2, p2) in zip(
            model.module.state_dict().items(), m.module.state_dict().items(), strict=True
        ):
            assert n1 == n2 and torch.equal(p1.cpu(), p2.cpu())
    pd.testing.assert_series_equal(loaded.gene_medians_, model.gene_medians_)
    (tmp_path / "cut.ckpt").write_bytes((ck / "last.ckpt").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"cut\.ckpt.*truncated or corrupt"):
        GeneCompass.from_checkpoint(tmp_path / "cut.ckpt")


def test_encode_round_trip():
    obj = {
        "a": np.arange(5, dtype=np.int32),
        "s": np.array(["x", "y"], dtype=object),
        "df": pd.DataFrame({"v": [1.0, 2.0], "w": ["p", "q"]}, index=pd.Index(["r1", "r2"], name="row")),
        "t": (np.float32(1.5), [np.int64(3)]),
    }
    back = decode(encode(obj))
    np.testing.assert_array_equal(back["a"], obj["a"])
    assert back["a"].dtype == np.int32
    assert list(back["s"]) == ["x", "y"]
    pd.testing.assert_frame_equal(back["df"], obj["df"], check_dtype=False)
    assert back["t"] == (1.5, [3])
    with pytest.raises(TypeError, match="Cannot save"):
        encode({"f": object()})
