"""The README's main job, end to end, on a small simulated screen and on the real Norman subset."""

import json

import pandas as pd
import pytest

import pertpy_gnn as pg
from pertpy_gnn.__main__ import main

from .conftest import NORMAN


def _check_report(out, *, simulated: bool):
    report = (out / "report.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    for model in (
        "GEARS (anchored)",
        "GEARS (paper)",
        "no_change",
        "train_mean",
        "additive",
        "linear_coexpression",
        "linear_embedding",
    ):
        assert model in report
    table = pd.read_csv(out / "evaluation_per_perturbation.csv")
    assert set(table["model"]) >= {"GEARS (anchored)", "GEARS (paper)", "no_change", "additive"}
    # the no-change baseline is the normalizer of the normalized MSE: exactly 1
    nc = table[(table["model"] == "no_change") & (table["metric"] == "mse_top20_normalized")]["value"]
    assert len(nc) > 0 and (nc.round(5) == 1).all()
    assert (out / "figures" / "metrics_mse_top20.png").stat().st_size > 1000
    assert (out / "figures" / "gi_map.png").stat().st_size > 1000
    gimap = pd.read_csv(out / "gi_map_all_pairs.csv", index_col=0)
    n = summary["gi_map"]["genes"]
    assert len(gimap) == n * (n - 1) // 2
    if simulated:
        assert "Designed interaction type" in report
        assert "noiseless ground truth" in report
        assert (out / "gi_evaluation_vs_simulator_truth.csv").exists()
    return summary


def test_main_job_on_small_simulated_screen(tmp_path):
    adata = pg.datasets.simulate_perturbseq(
        n_genes=150, n_singles=12, n_doubles=16, n_cells_per_perturbation=30, n_control=200, seed=1
    )
    path = tmp_path / "screen.h5ad"
    adata.write_h5ad(path)
    out = tmp_path / "report"
    assert (
        main(["run", "--data", str(path), "--out", str(out), "--epochs", "1", "--quiet", "--seed", "1"]) == 0
    )
    summary = _check_report(out, simulated=True)
    assert summary["dataset"]["single_perturbations"] == 12
    assert summary["dataset"]["double_perturbations"] == 16
    assert summary["gi_map"]["pairs"] == 66


def test_main_job_on_real_norman_subset(tmp_path):
    if not NORMAN.is_file():
        pytest.skip(f"{NORMAN} is absent (the real data folder is only on the project's machines)")
    out = tmp_path / "norman"
    main(["run", "--data", str(NORMAN), "--out", str(out), "--epochs", "1", "--quiet"])
    summary = _check_report(out, simulated=False)
    # IER5L has no GO annotation: its cells are dropped and reported, never silently
    assert summary["dataset"]["cells_dropped_unknown_genes"] == 100
    assert summary["dataset"]["control_cells"] == 100
