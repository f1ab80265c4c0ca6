"""Paths that used to fail silently or misleadingly now stop early with a clear message, or give a
documented result (issue 14)."""

import re
from pathlib import Path

import pytest

import pertpy_gnn as pg

from .test_gears import _prepare, _toy

KEYS_DOC = Path(__file__).resolve().parents[1] / "docs" / "keys.md"


@pytest.fixture(scope="module")
def trained():
    adata = _prepare(_toy())
    model = pg.tl.train_gears(adata, max_epochs=1, hidden_dim=16, progress_bar=False)
    return adata, model


def test_second_parse_is_refused_unless_overwrite():
    adata = _toy()
    pg.pp.parse_perturbations(adata, perturbation_key="condition")
    with pytest.raises(ValueError, match=r"obs\['pg_perturbation'\] already exists.*overwrite=True"):
        pg.pp.parse_perturbations(adata, perturbation_key="condition")
    assert (adata.obs["pg_perturbation"] == "control").sum() == 100  # the first parse is intact
    pg.pp.parse_perturbations(adata, perturbation_key="condition", overwrite=True)
    copy = pg.pp.parse_perturbations(adata, perturbation_key="condition", copy=True)
    assert copy is not adata and copy.n_obs == adata.n_obs


def test_train_with_zero_epochs_is_refused():
    adata = _prepare(_toy())
    with pytest.raises(ValueError, match="`max_epochs` must be at least 1, got 0"):
        pg.tl.train_gears(adata, max_epochs=0, hidden_dim=16, progress_bar=False)
    assert "pg_gears" not in adata.uns


def test_predict_empty_and_none(trained):
    adata, model = trained
    baseline = pg.tl.fit_baseline(adata, "train_mean")
    for m in (model, baseline):
        empty = m.predict([])
        assert empty.n_obs == 0 and empty.n_vars == adata.n_vars
        with pytest.raises(TypeError, match="Perturbations must be a set .* got NoneType"):
            m.predict(None)


def test_gi_map_names_unknown_genes_without_a_missing_option(trained):
    _, model = trained
    with pytest.raises(ValueError, match=r"cannot be perturbed .*\['NOT_A_GENE'\].*Leave them out") as info:
        pg.tl.gi_map(model, ["G000", "G001", "NOT_A_GENE"], progress_bar=False)
    assert "skip_unknown" not in str(info.value)


def test_every_key_written_is_documented(trained):
    adata, _ = trained
    documented = set(re.findall(r"`([\w*]+)`", KEYS_DOC.read_text()))
    written = set(adata.uns) | set(adata.obs.columns) - {"condition"}
    assert {"_scvi_uuid", "_scvi_manager_uuid"} <= written
    assert written <= documented, sorted(written - documented)
