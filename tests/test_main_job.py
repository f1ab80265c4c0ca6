"""The README's main job, end to end, on the default simulated screen and on the real Norman subset.

Every claim of the report (verdict, counts, GI statements, figures) is checked against its own CSVs.
"""

import json
import subprocess
import sys

import pandas as pd
import pytest

from pertpy_gnn.__main__ import main

from .conftest import NORMAN
from .report_checks import check_report


def _check_outputs(out, *, simulated: bool):
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
    gi = check_report(out, expect_gi=True)
    return summary, gi, report


def test_main_job_on_default_screen(tmp_path):
    out = tmp_path / "report"
    assert main(["run", "--out", str(out), "--epochs", "1", "--quiet"]) == 0
    summary, gi, report = _check_outputs(out, simulated=True)
    assert summary["dataset"]["single_perturbations"] == 40
    assert summary["dataset"]["double_perturbations"] == 60
    assert summary["gi_map"]["pairs"] == 780
    # the default screen has test doubles with both singles in training: GI is scored, with a verdict
    assert 0 < len(gi["held_out"]) < summary["gi_test_doubles"]["n_test_doubles"]
    assert "noiseless ground truth" in report
    assert (out / "gi_evaluation_vs_simulator_truth.csv").exists()


def test_main_job_on_real_norman_subset(tmp_path):
    if not NORMAN.is_file():
        pytest.skip(f"{NORMAN} is absent (the real data folder is only on the project's machines)")
    out = tmp_path / "norman"
    main(["run", "--data", str(NORMAN), "--out", str(out), "--epochs", "1", "--quiet"])
    summary, _, _ = _check_outputs(out, simulated=False)
    # IER5L has no GO annotation: its cells are dropped and reported, never silently
    assert summary["dataset"]["cells_dropped_unknown_genes"] == 100
    assert summary["dataset"]["control_cells"] == 100


def test_cli_help_shows_defaults_and_input_contract():
    res = subprocess.run(
        [sys.executable, "-m", "pertpy_gnn", "run", "--help"], capture_output=True, text=True, check=True
    )
    text = " ".join(res.stdout.split())
    assert "(default: auto)" in text  # the accelerator is chosen automatically
    assert "(default: 10)" in text and "(default: condition)" in text
    assert "log-normalized expression in X" in text and "control label" in text
