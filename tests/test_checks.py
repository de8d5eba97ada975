"""The closing checks say how many runs converged, over all runs and among each fit's points."""

import numpy as np
import pandas as pd
import pytest

from chemscale import checks, scaling
from chemscale.config import ConfigError


def _results(*convergence):
    return pd.DataFrame([{"run_id": f"r{i}", "run_dir": f"/runs/s/r{i}", "status": "finished", "convergence": c}
                         for i, c in enumerate(convergence)])


def test_verify_reports_the_converged_share_over_all_runs_and_per_fit():
    results = _results("converged", "converged", "converged", "capped")
    x = np.array([100.0, 300, 1000])
    fit = scaling.fit_power_law(x, 3 * x ** -0.2, n_bootstrap=0)
    converged = results[results["convergence"] == "converged"]
    summary = checks.verify(results, {"data": {16: fit}, "frontier": None},
                            used={"data": converged, "frontier": results.iloc[1:]})
    assert summary.splitlines() == ["checks passed: 4 of 4 runs finished; 1 fits, all finite",
                                    "all runs: 3 of 4 runs converged (75%)",
                                    "data: 3 of 3 points converged (100%)",
                                    "frontier: 2 of 3 points converged (67%)"]


def test_a_fixed_budget_grid_counts_the_runs_that_trained_their_whole_budget_not_a_shortfall():
    """Notebook 03 turns early stopping off: its line says so, and counts a run that stopped early apart."""
    summary = checks.verify(_results("capped", "capped", "converged"), {}, fixed_budget=True)
    assert summary.splitlines()[1].startswith("all runs: 2 of 3 trained their whole fixed budget (early stopping off")
    assert "converged (" not in summary
    assert summary.splitlines()[2:] == ["  r2 did not (converged), see /runs/s/r2/train.log"]


def test_convergence_report_of_no_points_says_so():
    assert checks.convergence_report(_results("capped"), {"joint": _results().iloc[:0]}).splitlines() == [
        "all runs: 0 of 1 runs converged (0%)", "joint: no points"]


def test_budget_check_says_which_points_their_budget_set():
    runs = pd.DataFrame({"name": ["a", "b", "c"], "status": "finished", "max_steps": 100, "steps": [60, 100, 100],
                         "convergence": ["converged", "capped", "capped"], "loss": [1.00, 2.00, 1.00]})
    longer = pd.DataFrame({"name": ["a", "b", "c"], "status": ["finished", "finished", "crashed"], "max_steps": 300,
                           "steps": [90, 300, None], "convergence": ["converged", "capped", None],
                           "loss": [0.99, 1.50, None]})
    table = checks.budget_check(runs, longer, "loss", on=["name"]).set_index("name")
    assert table.loc["a", "improvement"] == pytest.approx(0.01) and table.loc["b", "improvement"] == pytest.approx(0.25)
    assert table.loc["a", "verdict"].startswith("budget did not set it")
    assert table.loc["b", "verdict"] == "budget-limited (3x budget improves it by 25.0%)"
    assert table.loc["c", "verdict"].startswith("not measured") and table.loc["a", "steps_3x"] == 90


def test_budget_check_says_how_an_unmeasured_point_failed():
    """A 3x run that diverged, or one that crashed before writing any result (no metric column at all), is
    reported with its status, not a KeyError or a 'did not finish' that hides a divergence."""
    runs = pd.DataFrame({"name": ["a", "b"], "status": "finished", "max_steps": 100, "steps": 100,
                         "convergence": "capped", "loss": [1.0, 2.0]})
    diverged = pd.DataFrame({"name": ["a", "b"], "status": ["diverged", "finished"], "max_steps": 300,
                             "steps": [20, 300], "convergence": ["diverged", "capped"], "loss": [None, 1.5]})
    table = checks.budget_check(runs, diverged, "loss", on=["name"]).set_index("name")
    assert "diverged" in table.loc["a", "verdict"] and table.loc["b", "verdict"].startswith("budget-limited")
    crashed = pd.DataFrame({"name": ["a"], "status": ["crashed"], "run_dir": ["/r/a"]})  # collect's row of a crash
    table = checks.budget_check(runs, crashed, "loss", on=["name"]).set_index("name")
    assert table.loc["a", "verdict"].startswith("not measured") and "crashed" in table.loc["a", "verdict"]


def test_budget_check_refuses_two_runs_at_one_point_and_an_unknown_column():
    """Two finished runs at one point (seeds, a key left out of `on`) would each be compared with the 3x run,
    one row per pair; the error names the point. A column of `on` that is not in the table is named too."""
    runs = pd.DataFrame({"name": ["a", "a"], "seed": [0, 1], "status": "finished", "loss": [1.0, 1.1]})
    longer = pd.DataFrame({"name": ["a"], "seed": [0], "status": "finished", "loss": [0.9]})
    with pytest.raises(ConfigError, match=r"2 finished runs.*'name': 'a'"):
        checks.budget_check(runs, longer, "loss", on=["name"])
    assert len(checks.budget_check(runs, longer, "loss", on=["name", "seed"])) == 1
    with pytest.raises(ConfigError, match="'width'"):
        checks.budget_check(runs, longer, "loss", on=["width"])
