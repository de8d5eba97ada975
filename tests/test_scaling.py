"""Fitters recover known constants from synthetic noisy data; the frontier has a known answer."""

import numpy as np
import pandas as pd
import pytest

from chemscale import scaling


def test_plain_power_law_recovered_with_ci_covering_truth():
    rng = np.random.default_rng(0)
    x = np.logspace(2, 5, 8)
    y = 3.0 * x**-0.17 * np.exp(rng.normal(0, 0.02, x.size))
    fit = scaling.fit_power_law(x, y, n_bootstrap=200, seed=0)
    assert fit.alpha == pytest.approx(0.17, abs=0.02)
    lo, hi = fit.ci["alpha"]
    assert lo < 0.17 < hi and lo < fit.alpha < hi
    assert "α = " in fit.label()


def test_offset_power_law_recovered():
    rng = np.random.default_rng(1)
    x = np.logspace(1, 5, 12)
    y = (0.8 + 5.0 * x**-0.35) * np.exp(rng.normal(0, 0.005, x.size))
    fit = scaling.fit_power_law(x, y, offset=True, n_bootstrap=100, seed=0)
    assert fit.alpha == pytest.approx(0.35, abs=0.05)
    assert fit.E == pytest.approx(0.8, abs=0.05)
    assert fit.ci["E"][0] < 0.8 < fit.ci["E"][1]


def test_joint_chinchilla_form_recovered():
    rng = np.random.default_rng(2)
    N, D = np.meshgrid(np.logspace(5, 9, 6), np.logspace(6, 10, 6))
    N, D = N.ravel(), D.ravel()
    L = (1.82 + 400 / N**0.34 + 410 / D**0.28) * np.exp(rng.normal(0, 0.01, N.size))
    fit = scaling.fit_joint(N, D, L, n_bootstrap=20, seed=0)
    assert fit.alpha == pytest.approx(0.34, abs=0.05)
    assert fit.beta == pytest.approx(0.28, abs=0.05)
    assert fit.E == pytest.approx(1.82, abs=0.1)
    assert np.allclose(fit.predict(N, D), L, rtol=0.05)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="at least 3"):
        scaling.fit_power_law([1, 2], [1, 2], n_bootstrap=1)
    with pytest.raises(ValueError, match="positive"):
        scaling.fit_power_law([1, 2, 3], [1, -2, 3], n_bootstrap=1)


def test_nan_rows_dropped_with_warning():
    x = np.logspace(1, 4, 6)
    y = 2 * x**-0.3
    y[2] = np.nan
    with pytest.warns(UserWarning, match="dropped 1 row"):
        fit = scaling.fit_power_law(x, y, n_bootstrap=10)
    assert fit.n_points == 5 and fit.n_dropped == 1
    assert fit.alpha == pytest.approx(0.3, abs=1e-3)


def test_compute_optimal_frontier_on_known_curves():
    curves = pd.DataFrame({
        "run_id": ["small"] * 3 + ["big"] * 3,
        "flops": [1, 2, 4, 2, 4, 8],
        "val_loss": [3.0, 2.5, 2.4, 2.8, 2.0, 1.5],
    })
    frontier = scaling.compute_optimal_frontier(curves)
    assert list(zip(frontier["flops"], frontier["val_loss"], frontier["run_id"])) == [
        (1, 3.0, "small"), (2, 2.5, "small"), (4, 2.0, "big"), (8, 1.5, "big")]


def test_fit_groups_and_table():
    x = np.logspace(2, 4, 5)
    df = pd.DataFrame({"x": np.tile(x, 2), "y": np.concatenate([x**-0.1, 2 * x**-0.3]), "g": [1] * 5 + [2] * 5})
    fits = scaling.fit_groups(df, "x", "y", by="g", n_bootstrap=10)
    table = scaling.fits_table(fits, "g")
    assert list(table["g"]) == [1, 2]
    assert table["alpha"].round(3).tolist() == [0.1, 0.3]
