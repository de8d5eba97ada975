"""Plots show the data, fits and bands they are given (read back from the Axes); `save` writes the
same PNG bytes every time, under figures/<notebook>/."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.image  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402

from chemscale import plots, scaling  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def two_groups():
    """Two model sizes whose loss falls as x^-0.1 and x^-0.3, rows shuffled (the plot sorts them)."""
    x = np.logspace(2, 4, 5)
    df = pd.DataFrame({"x": np.tile(x, 2), "y": np.concatenate([x**-0.1, 2 * x**-0.3]),
                       "size": [1000] * 5 + [200_000] * 5})
    return df.sample(frac=1, random_state=0)


def legend(fig):
    """The figure's legend: a figure legend beside the axes, or the axes' own where the caller placed the axes."""
    return (fig.legends or [fig.axes[0].get_legend()])[0]


def legend_texts(fig):
    return [t.get_text() for t in legend(fig).get_texts()]


def data_lines(ax):
    """The lines drawn with markers (the runs), by label."""
    return {line.get_label(): line for line in ax.lines if line.get_marker() == "o"}


def fit_lines(ax):
    return [line for line in ax.lines if line.get_linestyle() == "--"]


def is_hollow(line) -> bool:
    return to_rgba(line.get_markerfacecolor()) == to_rgba("white")


def is_dotted(line) -> bool:
    return line.get_linestyle() == ":"


def markers(line):
    """The (x, y) points a line draws markers at (all, or its markevery indices)."""
    keep = line.get_markevery()
    xy = list(zip(line.get_xdata(), line.get_ydata()))
    return xy if keep is None else [xy[i] for i in keep]


def test_loglog_draws_each_group_its_fit_and_band():
    df = two_groups()
    fits = scaling.fit_groups(df, "x", "y", by="size", n_bootstrap=20)
    fig = plots.loglog(df, "x", "y", hue="size", fits=fits, xlabel="N", title="t")
    ax = fig.axes[0]
    assert ax.get_xscale() == ax.get_yscale() == "log" and ax.get_xlabel() == "N" and ax.get_ylabel() == "y"
    assert legend_texts(fig) == ["1000: α = 0.10 [0.10, 0.10]", "2e5: α = 0.30 [0.30, 0.30]"]
    points = data_lines(ax)
    for (size, group), label in zip(df.groupby("size"), legend_texts(fig)):
        line = points[label]
        expected = group.sort_values("x")
        np.testing.assert_array_equal(line.get_xdata(), expected["x"])  # every run, sorted by x
        np.testing.assert_array_equal(line.get_ydata(), expected["y"])
        assert not is_hollow(line)
    fitted = fit_lines(ax)
    assert len(fitted) == 2 and len(ax.collections) == 2  # one curve and one CI band per group
    for line, band, (size, fit) in zip(fitted, ax.collections, fits.items()):
        xs = line.get_xdata()
        assert xs[0] == pytest.approx(fit.x_min) and xs[-1] == pytest.approx(fit.x_max)  # over the fitted range
        np.testing.assert_allclose(line.get_ydata(), fit.predict(xs))
        label = next(k for k in points if k.startswith(plots._fmt(size)))
        assert to_rgba(line.get_color()) == to_rgba(points[label].get_color())  # the fit in its group's colour
        assert to_rgba(band.get_facecolor()[0])[:3] == to_rgba(line.get_color())[:3]
        lo, hi = fit.band(xs)
        polygon = band.get_paths()[0].vertices
        assert polygon[:, 1].min() == pytest.approx(lo.min()) and polygon[:, 1].max() == pytest.approx(hi.max())


def test_loglog_draws_groups_without_a_fit_dotted():
    df = pd.concat([two_groups(), pd.DataFrame({"x": [100.0, 1000.0], "y": [0.5, 0.4], "size": [5e6, 5e6]})])
    with pytest.warns(UserWarning, match="not fitted"):
        fits = scaling.fit_groups(df, "x", "y", by="size", n_bootstrap=0)
    ax = plots.loglog(df, "x", "y", hue="size", fits=fits).axes[0]
    points = data_lines(ax)
    assert sorted(points) == ["1000: α = 0.10", "2e5: α = 0.30", "5e6: not fitted"]
    assert [label for label, line in points.items() if is_dotted(line)] == ["5e6: not fitted"]
    assert not any(is_hollow(line) for line in points.values()), "hollow means capped, not unfitted"
    assert len(fit_lines(ax)) == 2
    everything_skipped = plots.loglog(df, "x", "y", hue="size", fits={}).axes[0]
    assert all(is_dotted(line) for line in data_lines(everything_skipped).values())
    no_fits_asked = plots.loglog(df, "x", "y", hue="size").axes[0]  # no fits given: nothing was skipped
    assert not any(is_dotted(line) for line in data_lines(no_fits_asked).values())
    assert sorted(data_lines(no_fits_asked)) == ["1000", "2e5", "5e6"]


def test_loglog_draws_capped_points_hollow_in_their_colour_and_counts_them():
    df = two_groups().sort_values(["size", "x"])
    df["convergence"] = ["converged"] * 3 + ["capped"] * 2 + ["capped"] * 5  # the large model never converged
    fits = scaling.fit_groups(df[df["convergence"] == "converged"], "x", "y", by="size", n_bootstrap=0)
    ax = plots.loglog(df, "x", "y", hue="size", fits=fits).axes[0]
    small, large = (line for label, line in data_lines(ax).items() if label.startswith(("1000", "2e5")))
    assert markers(small) == list(zip(df["x"][:3], df["y"][:3])) and not is_hollow(small)  # converged: filled
    [small_capped] = [line for line in ax.lines if line.get_marker() == "o" and line.get_label().startswith("_")
                      and to_rgba(line.get_color()) == to_rgba(small.get_color())]
    assert list(zip(small_capped.get_xdata(), small_capped.get_ydata())) == list(zip(df["x"][3:5], df["y"][3:5]))
    assert is_hollow(small_capped) and to_rgba(small_capped.get_markeredgecolor()) == to_rgba(small.get_color())
    assert is_hollow(large) and len(markers(large)) == 5 and is_dotted(large)  # all capped: hollow, not fitted
    assert "7 of 10 points capped (hollow):\ntheir loss is the step budget's, not converged" in legend_texts(ax.figure)
    converged = plots.loglog(df.assign(convergence="converged"), "x", "y", hue="size").axes[0]
    assert not any(is_hollow(line) for line in converged.lines) and not any("capped" in t for t in
                                                                          legend_texts(converged.figure))


def test_loglog_with_one_fit_or_none():
    df = two_groups()
    fit = scaling.fit_power_law(df["x"], df["y"], n_bootstrap=20)
    ax = plots.loglog(df, "x", "y", fits=fit).axes[0]
    [line] = fit_lines(ax)
    assert to_rgba(line.get_color()) == to_rgba(plots.FIT_COLOR) and line.get_label() == f"fit: {fit.label()}"
    [points] = data_lines(ax).values()
    assert len(points.get_xdata()) == len(df) and not is_hollow(points)
    assert plots.loglog(df, "x", "y").axes[0].get_legend() is None


def test_frontier_plot_shows_runs_frontier_and_fit():
    curves = pd.DataFrame({"run_id": ["a"] * 3 + ["b"] * 3, "flops": [1, 2, 4, 2, 4, 8],
                           "val_loss": [3.0, 2.5, 2.4, 2.8, 2.0, 1.5], "size": [1] * 3 + [2] * 3})
    frontier = scaling.compute_optimal_frontier(curves)
    fit = scaling.fit_power_law(frontier["flops"], frontier["val_loss"], n_bootstrap=20)
    fig = plots.frontier_plot(curves, "flops", "val_loss", "size", frontier, fit)
    ax = fig.axes[0]
    texts = legend_texts(fig)
    assert texts == ["1", "2", "compute-optimal frontier", f"frontier fit: {fit.label()}"]
    assert legend(fig).get_title().get_text() == "size"  # one entry per size, the column named once
    runs = [line for line in ax.lines if line.get_alpha() == 0.35]
    assert [list(line.get_xdata()) for line in runs] == [[1, 2, 4], [2, 4, 8]]  # one faint curve per run
    assert to_rgba(runs[0].get_color()) != to_rgba(runs[1].get_color())  # coloured by size
    [marked] = data_lines(ax).values()
    assert list(zip(marked.get_xdata(), marked.get_ydata())) == [(1, 3.0), (2, 2.5), (4, 2.0), (8, 1.5)]
    [fitted] = fit_lines(ax)
    np.testing.assert_allclose(fitted.get_ydata(), fit.predict(fitted.get_xdata()))
    computed = plots.frontier_plot(curves, "flops", "val_loss").axes[0]  # no hue: the frontier is computed
    np.testing.assert_array_equal(data_lines(computed)["compute-optimal frontier"].get_xdata(), [1, 2, 4, 8])
    curves["convergence"] = ["converged"] * 3 + ["capped"] * 3  # run b hit its step cap
    capped = plots.frontier_plot(curves, "flops", "val_loss", "size").axes[0]
    front = data_lines(capped)["compute-optimal frontier"]
    assert markers(front) == [(1, 3.0), (2, 2.5)] and not is_hollow(front)
    [hollow] = [line for line in capped.lines if line.get_marker() == "o" and is_hollow(line)
                and line.get_label().startswith("_")]
    assert list(zip(hollow.get_xdata(), hollow.get_ydata())) == [(4, 2.0), (8, 1.5)]
    assert "2 of 4 points capped (hollow):\ntheir loss is the step budget's, not converged" in legend_texts(
        capped.figure)


def test_exponent_plot_draws_intervals_clips_wide_ones_and_tolerates_missing_ones():
    table = pd.DataFrame({"fit": ["L(N)", "joint", "frontier", "wide"], "alpha": [0.1, 0.2, 0.05, 0.15],
                          "alpha_lo": [0.05, np.nan, 0.06, 0.1], "alpha_hi": [0.2, np.nan, 0.09, 20.0]})
    fig = plots.exponent_plot(table, reference=0.17, reference_label="paper")
    ax = fig.axes[0]
    rows = {t.get_text(): y for t, y in zip(ax.get_yticklabels(), ax.get_yticks())}
    assert rows == {"L(N)": 3, "joint": 2, "frontier": 1, "wide": 0}  # the table's first row at the top
    assert legend_texts(fig) == ["paper"]
    [reference] = [line for line in ax.lines if line.get_linestyle() == ":"]
    assert list(reference.get_xdata()) == [0.17, 0.17]
    bars = ax.containers[0]
    assert bars.lines[0].get_xydata().tolist() == [[0.1, 3], [0.2, 2], [0.05, 1], [0.15, 0]]
    spans = [segment[:, 0].tolist() for segment in bars.lines[2][0].get_segments()]
    right = ax.get_xlim()[1]
    assert right == pytest.approx(0.5)  # 2.5 x the largest estimate, at least 0.5
    assert spans[0] == pytest.approx([0.05, 0.2]) and spans[1] == pytest.approx([0.2, 0.2])  # no CI: no bar
    assert spans[2] == pytest.approx([0.05, 0.09])  # the point is below its CI: no negative bar
    assert spans[3] == pytest.approx([0.1, right])  # clipped at the axis end ...
    assert [t.get_text() for t in ax.texts] == ["CI to 20 →"]  # ... which says where it goes


def test_exponent_plot_of_no_fits_says_so():
    ax = plots.exponent_plot(scaling.exponents_table({"L(N)": None})).axes[0]
    assert [t.get_text() for t in ax.texts] == ["no exponent could be fitted (too few points)"]
    assert not ax.containers


def test_quality_plot_and_its_missing_columns():
    quality = pd.DataFrame({"n_params_non_embedding": [100, 10], "validity": [1.0, 0.5],
                            "uniqueness": [0.8, 0.9], "novelty": [0.7, 0.9]})
    ax = plots.quality_plot(quality).axes[0]
    assert legend_texts(ax.figure) == ["validity", "uniqueness", "novelty"]
    lines = {line.get_label(): line for line in ax.lines}
    assert lines["validity"].get_xdata().tolist() == [10, 100]  # sorted by size, values kept with their rows
    assert lines["validity"].get_ydata().tolist() == [0.5, 1.0] and lines["novelty"].get_ydata().tolist() == [0.9, 0.7]
    assert ax.get_xscale() == "log" and ax.get_ylim() == (0, 1.02)
    with pytest.raises(ValueError, match=r"no column\(s\) \['novelty'\]"):
        plots.quality_plot(quality.drop(columns="novelty"))


def a_figure(scale=1.0):
    df = two_groups()
    df["y"] *= scale
    return plots.loglog(df, "x", "y", hue="size", fits=scaling.fit_groups(df, "x", "y", by="size", n_bootstrap=20))


def test_save_is_deterministic_and_atomic(tmp_path, monkeypatch):
    monkeypatch.setattr(plots.paths, "FIGURES", tmp_path)
    fig = a_figure()
    path = plots.save(fig, "01_nb", "loss_vs_x")
    data = path.read_bytes()
    assert path == tmp_path / "01_nb" / "loss_vs_x.png" and data[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(path).shape[:2] == (round(plots.FIGSIZE[1] * plots.DPI),
                                                        round(plots.FIGSIZE[0] * plots.DPI))
    assert b"matplotlib" not in data  # no version string to change the bytes
    assert plots.save(fig, "01_nb", "loss_vs_x").read_bytes() == data
    assert plots.save(a_figure(), "01_nb", "again").read_bytes() == data  # a rebuilt figure too
    assert plots.save(a_figure(scale=1.5), "01_nb", "other").read_bytes() != data  # other data, other bytes
    assert sorted(p.name for p in path.parent.iterdir()) == ["again.png", "loss_vs_x.png", "other.png"]  # no temp files


def test_save_to_another_root_and_bad_names(tmp_path):
    fig = a_figure()
    assert plots.save(fig, "nb", "f", root=tmp_path) == tmp_path / "nb" / "f.png"
    for bad in ("f.png", "sub/f"):
        with pytest.raises(ValueError, match="bare file name"):
            plots.save(fig, "nb", bad, root=tmp_path)


def test_axis_and_legend_titles_are_words_with_units_unless_the_caller_names_them():
    assert plots.column_label("flops") == "training compute (FLOPs)"
    assert plots.column_label("best_val_loss") == "validation loss (nats per token)"
    assert plots.column_label("test_loss") == "test loss (nats per token)"
    assert plots.column_label("n_params_non_embedding") == "parameters (non-embedding)"
    assert plots.column_label("n_train_molecules") == "training molecules"
    assert plots.column_label("n_train_structures") == "training structures"
    assert plots.column_label("test_force_mae_mev_per_a") == "test force MAE (meV/Å)"
    assert plots.column_label("some_new_column") == "some_new_column"  # no words for it: its name
    df = two_groups().rename(columns={"x": "n_train_molecules", "y": "best_val_loss", "size": "n_params_non_embedding"})
    fig = plots.loglog(df, "n_train_molecules", "best_val_loss", hue="n_params_non_embedding")
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("training molecules", "validation loss (nats per token)")
    assert legend(fig).get_title().get_text() == "parameters (non-embedding)"
    own = plots.loglog(df, "n_train_molecules", "best_val_loss", xlabel="D", ylabel="L").axes[0]
    assert (own.get_xlabel(), own.get_ylabel()) == ("D", "L")
    curves = pd.DataFrame({"run_id": ["a"] * 3, "flops": [1e9, 1e10, 1e11], "val_loss": [3.0, 2.0, 1.5]})
    frontier = plots.frontier_plot(curves, "flops", "val_loss").axes[0]
    assert (frontier.get_xlabel(), frontier.get_ylabel()) == ("training compute (FLOPs)",
                                                              "validation loss (nats per token)")
    quality = pd.DataFrame({"n_params_non_embedding": [10, 100], "validity": [1.0, 1.0], "uniqueness": [1.0, 1.0],
                            "novelty": [1.0, 1.0]})
    assert plots.quality_plot(quality).axes[0].get_xlabel() == "parameters (non-embedding)"
    ff = plots.loglog(df.assign(task="ff"), "n_train_molecules", "best_val_loss").axes[0]  # not per token
    assert ff.get_ylabel() == "validation loss (weighted energy and force MSE)"
    mixed = plots.loglog(df.assign(task=["ff", "chemgpt"] * (len(df) // 2)), "n_train_molecules", "best_val_loss")
    assert mixed.axes[0].get_ylabel() == "validation loss (nats per token)"


def test_a_data_exponent_is_beta_and_a_parameter_exponent_alpha():
    df = two_groups().rename(columns={"x": "n_train_structures", "y": "test_force_mae_mev_per_a", "size": "name"})
    fits = scaling.fit_groups(df, "n_train_structures", "test_force_mae_mev_per_a", by="name", n_bootstrap=0)
    data = plots.loglog(df, "n_train_structures", "test_force_mae_mev_per_a", hue="name", fits=fits)
    assert legend_texts(data) == ["1000: β = 0.10", "2e5: β = 0.30"]
    one = plots.loglog(df, "n_train_structures", "test_force_mae_mev_per_a", fits=fits[1000])
    assert legend_texts(one) == ["fit: β = 0.10"]
    params = plots.loglog(df.rename(columns={"n_train_structures": "n_params"}), "n_params", "test_force_mae_mev_per_a",
                          hue="name", fits=fits)
    assert legend_texts(params) == ["1000: α = 0.10", "2e5: α = 0.30"]


def labelled_ticks(axis):
    """{tick value: label} of the labelled ticks, major and minor, inside the axis's view (after a draw)."""
    lo, hi = sorted(axis.get_view_interval())
    ticks = [*zip(axis.get_majorticklocs(), axis.get_majorticklabels()),
             *zip(axis.get_minorticklocs(), axis.get_minorticklabels())]
    return {float(v): t.get_text() for v, t in ticks if lo <= v <= hi and t.get_text()}


@pytest.mark.parametrize("lo, hi", [(0.8, 3.0), (1.9, 2.9), (20, 80)])
def test_a_log_axis_under_a_decade_has_labels_between_its_decades(lo, hi):
    df = pd.DataFrame({"x": [10, 100, 1000], "y": [hi, np.sqrt(lo * hi), lo]})
    fig = plots.loglog(df, "x", "y")
    fig.canvas.draw()
    labels = labelled_ticks(fig.axes[0].yaxis)
    assert len(labels) >= 3, labels
    assert all(float(text) == pytest.approx(value, rel=1e-3) for value, text in labels.items())  # labels are values
    if lo < 1:
        assert any(1 < value < 2 for value in labels), labels  # a loss of 1.3 can be read between labels
    spacing = np.diff(np.log10(sorted(labels)))
    assert spacing.min() >= np.log10(hi / lo) / 14  # and they do not run into each other


def test_a_log_axis_over_decades_labels_the_decades_and_stays_uncluttered():
    df = pd.DataFrame({"x": [1e9, 1e11, 1e14], "y": [3.0, 2.0, 1.0]})
    fig = plots.loglog(df, "x", "y")
    fig.canvas.draw()
    labels = labelled_ticks(fig.axes[0].xaxis)
    assert {1e10: "1e10", 1e12: "1e12"}.items() <= labels.items()
    assert len(labels) <= 9


def plotted_points(ax):
    """Display coordinates of every point drawn on the axes (markers and line vertices)."""
    xy = [np.column_stack([line.get_xdata(), line.get_ydata()]) for line in ax.lines if len(line.get_xdata())]
    return ax.transData.transform(np.vstack(xy))


@pytest.mark.parametrize("n_groups", [2, 6])
def test_the_legend_covers_no_point(n_groups):
    x = np.logspace(1, 3, 5)
    df = pd.DataFrame({"x": np.tile(x, n_groups), "y": np.concatenate([(k + 1) * x**-0.2 for k in range(n_groups)]),
                       "size": np.repeat(10.0 ** np.arange(n_groups), len(x))})
    df["convergence"] = np.where(df["x"] > 500, "capped", "converged")
    fig = plots.loglog(df, "x", "y", hue="size", fits=scaling.fit_groups(df, "x", "y", by="size", n_bootstrap=0))
    fig.canvas.draw()
    box = legend(fig).get_window_extent()
    points = plotted_points(fig.axes[0])
    inside = ((points[:, 0] >= box.x0) & (points[:, 0] <= box.x1) & (points[:, 1] >= box.y0)
              & (points[:, 1] <= box.y1))
    assert not inside.any()
    assert not box.overlaps(fig.axes[0].get_window_extent())  # nor any part of the axes a point could be in
    assert box.x1 <= fig.bbox.x1  # and it is on the figure, not cut off


@pytest.mark.parametrize("n_series", [2, 4, 10, 14, 20])
def test_series_colours_differ(n_series):
    df = pd.DataFrame({"x": np.tile([1.0, 10.0], n_series), "y": np.tile([2.0, 1.0], n_series),
                       "size": np.repeat(np.arange(n_series), 2)})
    colours = [to_rgba(line.get_color())[:3] for line in data_lines(plots.loglog(df, "x", "y", hue="size").axes[0])
               .values()]
    assert len(colours) == n_series
    colours = np.array(colours)
    distance = np.linalg.norm(colours[:, None] - colours[None], axis=-1)  # in RGB, each channel 0..1
    assert distance[~np.eye(n_series, dtype=bool)].min() > 0.15


def test_a_figure_whose_points_all_converged_says_so():
    df = pd.DataFrame({"x": [1, 2, 3, 1, 2, 3], "y": [3.0, 2.0, 1.5, 2.5, 1.8, 1.2], "g": [0, 0, 0, 1, 1, 1],
                       "convergence": "converged"})
    assert "all 6 points converged (filled)" in legend_texts(plots.loglog(df, "x", "y", hue="g"))
    assert not any("converged" in t for t in legend_texts(plots.loglog(df.drop(columns="convergence"), "x", "y",
                                                                        hue="g"))), "unknown: nothing claimed"
    df.loc[2, "y"], df.loc[5, "convergence"] = np.nan, None  # a diverged run (no point) and one that said nothing
    texts = legend_texts(plots.loglog(df, "x", "y", hue="g"))
    assert "4 of 5 points converged" in texts and not any(t.startswith("all") for t in texts)

