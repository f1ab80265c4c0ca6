"""The main job's report helpers: verdict, counts and spread over seeds, computed from the frames."""

import numpy as np
import pandas as pd

from pertpy_gnn._report import (
    accuracy_summary,
    accuracy_tables,
    degenerate_rules,
    gi_subtype_section,
    verdict,
)


def _frame():
    rows = []
    for seed in (0, 1, 2):
        for pert, sg in [
            ("A", "unseen_single"),
            ("B", "unseen_single"),
            ("A+B", "combo_seen2"),
            ("C+D", "combo_seen2"),
        ]:
            for model, value in [
                ("GEARS", 0.5 + 0.1 * seed),
                ("no_change", 1.0),
                ("train_mean", 0.9),
                ("additive", 0.3 if pert == "A+B" else np.nan),
            ]:
                if model != "GEARS" and seed > 0:
                    continue  # baselines do not depend on the training seed
                rows.append(
                    {
                        "model": model,
                        "perturbation": pert,
                        "subgroup": sg,
                        "metric": "mse_top20_normalized",
                        "value": value,
                        "seed": seed,
                        "available": not (model == "train_mean" and pert == "B")
                        and not (model == "additive" and pert != "A+B"),
                    }
                )
    return pd.DataFrame(rows)


def test_verdict_spread_counts_partial_models_and_fallbacks():
    ev = _frame()
    acc = accuracy_summary(ev).set_index(["subgroup", "model"])
    g = acc.loc[("all", "GEARS")]
    assert g["mean"] == 0.6 and np.isclose(g["sd"], 0.1) and g["n_seeds"] == 3 and g["n"] == 4
    assert acc.loc[("all", "additive"), "n"] == 1  # counts only what it predicts
    assert acc.loc[("all", "additive"), "n_fallback"] == 0  # NaN (not predicted) is no fallback
    assert acc.loc[("all", "train_mean"), "n_fallback"] == 1
    lines, claims = verdict(ev, accuracy_summary(ev), metrics=("mse_top20_normalized",))
    first = lines[0]
    assert first.startswith(
        "- **all** (4 test perturbations), `mse_top20_normalized`: best `GEARS` 0.600 ± 0.100 (n=4)"
    )
    assert "1.50x lower than the runner-up `train_mean` 0.900" in first
    assert "`no_change` 1.000" in first and "`train_mean` fell back on 1 of them" in first
    # the additive baseline is compared on the one perturbation it predicts, not ranked on a different set
    assert "`additive` predicts only 1 of the 4; on those, `additive` 0.300 vs `GEARS` 0.600" in first
    assert set(claims["best"]) == {"GEARS"}
    tab = accuracy_tables(accuracy_summary(ev))["all"].set_index("metric")
    assert tab.loc["mse_top20_normalized", "train_mean"] == "0.900 (n=4) [1 fell back]"


def test_a_baseline_winning_is_said():
    ev = _frame()
    ev.loc[ev["model"] == "GEARS", "value"] = 2.0
    lines, _ = verdict(ev, accuracy_summary(ev), metrics=("mse_top20_normalized",))
    assert "best `train_mean` 0.900 (n=4)" in lines[0] and "A baseline (`train_mean`) wins here" in lines[0]


def test_degenerate_gi_rules_are_replaced_by_a_sentence():
    ev = pd.DataFrame(
        {
            "rule": ["magnitude > 1.15", "magnitude < 1", "model_fit < 0.88"],
            "n": 12,
            "n_true": [0, 12, 5],
            "k": 10,
            "precision_at_k": [0.0, 1.0, 0.6],
            "random_precision_at_k_mean": [0.0, 1.0, 0.4],
            "precision": np.nan,
            "recall": np.nan,
        },
        index=pd.Index(["synergy", "suppression", "neomorphism"], name="subtype"),
    )
    assert degenerate_rules(ev).tolist() == [True, True, False]
    text = "\n".join(gi_subtype_section({"GEARS": ev}, "the measured data"))
    assert "synergy (`magnitude > 1.15`: no double passes)" in text
    assert "suppression (`magnitude < 1`: every double passes)" in text
    assert "| neomorphism |" in text and "| suppression |" not in text and "| synergy |" not in text
