"""The closing checks say how many runs converged, over all runs and among each fit's points."""

import numpy as np
import pandas as pd
import pytest

from chemscale import checks, scaling


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
