"""Plots draw data, fits and bands; `save` writes the same PNG bytes every time, under figures/<notebook>/."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from chemscale import plots, scaling  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def two_groups():
    """Two model sizes whose loss falls as x^-0.1 and x^-0.3."""
    x = np.logspace(2, 4, 5)
    return pd.DataFrame({"x": np.tile(x, 2), "y": np.concatenate([x**-0.1, 2 * x**-0.3]),
                         "size": [1000] * 5 + [200_000] * 5})


def legend_texts(fig):
    return [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def test_loglog_draws_each_group_with_its_fit_and_band():
    df = two_groups()
    fits = scaling.fit_groups(df, "x", "y", by="size", n_bootstrap=20)
    fig = plots.loglog(df, "x", "y", hue="size", fits=fits, xlabel="N", title="t")
    ax = fig.axes[0]
    assert ax.get_xscale() == ax.get_yscale() == "log" and ax.get_xlabel() == "N"
    assert len(ax.collections) == 2  # one CI band per group
    assert legend_texts(fig) == ["1000: α = 0.10 [0.10, 0.10]", "2e5: α = 0.30 [0.30, 0.30]"]


def test_loglog_with_one_fit_or_none():
    df = two_groups()
    fit = scaling.fit_power_law(df["x"], df["y"], n_bootstrap=20)
    assert legend_texts(plots.loglog(df, "x", "y", fits=fit))[-1].startswith("fit: α = ")
    assert plots.loglog(df, "x", "y", hue="size").axes[0].get_legend() is not None
    assert plots.loglog(df, "x", "y").axes[0].get_legend() is None


def test_frontier_plot_shows_runs_frontier_and_fit():
    curves = pd.DataFrame({"run_id": ["a"] * 3 + ["b"] * 3, "flops": [1, 2, 4, 2, 4, 8],
                           "val_loss": [3.0, 2.5, 2.4, 2.8, 2.0, 1.5], "size": [1] * 3 + [2] * 3})
    frontier = scaling.compute_optimal_frontier(curves)
    fit = scaling.fit_power_law(frontier["flops"], frontier["val_loss"], n_bootstrap=20)
    fig = plots.frontier_plot(curves, "flops", "val_loss", "size", frontier, fit)
    texts = legend_texts(fig)
    assert texts[:3] == ["size = 1", "size = 2", "compute-optimal frontier"] and texts[3].startswith("frontier fit")
    assert plots.frontier_plot(curves, "flops", "val_loss").axes  # no hue, frontier computed


def test_exponent_plot_tolerates_missing_and_lopsided_intervals():
    table = pd.DataFrame({"fit": ["L(N)", "joint", "frontier"], "alpha": [0.1, 0.2, 0.05],
                          "alpha_lo": [0.05, np.nan, 0.06], "alpha_hi": [0.2, np.nan, 0.09]})
    fig = plots.exponent_plot(table, reference=0.17, reference_label="paper")
    ax = fig.axes[0]
    rows = {t.get_text(): y for t, y in zip(ax.get_yticklabels(), ax.get_yticks())}
    assert rows == {"L(N)": 2, "joint": 1, "frontier": 0}  # the table's first row at the top
    assert legend_texts(fig) == ["paper"]


def test_quality_plot_and_its_missing_columns():
    quality = pd.DataFrame({"n_params_non_embedding": [10, 100], "validity": [1.0, 1.0],
                            "uniqueness": [0.9, 0.8], "novelty": [0.9, 0.7]})
    assert legend_texts(plots.quality_plot(quality)) == ["validity", "uniqueness", "novelty"]
    with pytest.raises(ValueError, match="no column"):
        plots.quality_plot(quality.drop(columns="novelty"))


def a_figure():
    df = two_groups()
    return plots.loglog(df, "x", "y", hue="size", fits=scaling.fit_groups(df, "x", "y", by="size", n_bootstrap=20))


def test_save_is_deterministic_and_atomic(tmp_path, monkeypatch):
    monkeypatch.setattr(plots.paths, "FIGURES", tmp_path)
    fig = a_figure()
    path = plots.save(fig, "01_nb", "loss_vs_x")
    data = path.read_bytes()
    assert path == tmp_path / "01_nb" / "loss_vs_x.png" and data[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"matplotlib" not in data  # no version string to change the bytes
    assert plots.save(fig, "01_nb", "loss_vs_x").read_bytes() == data
    assert plots.save(a_figure(), "01_nb", "again").read_bytes() == data  # a rebuilt figure too
    assert sorted(p.name for p in path.parent.iterdir()) == ["again.png", "loss_vs_x.png"]  # no temp files left


def test_save_to_another_root_and_bad_names(tmp_path):
    fig = a_figure()
    assert plots.save(fig, "nb", "f", root=tmp_path) == tmp_path / "nb" / "f.png"
    for bad in ("f.png", "sub/f"):
        with pytest.raises(ValueError, match="bare file name"):
            plots.save(fig, "nb", bad, root=tmp_path)
