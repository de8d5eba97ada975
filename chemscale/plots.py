"""Seaborn-styled log-log plots of scaling studies, and deterministic saving into `figures/`.

    plots.set_theme()
    fig = plots.loglog(df, "n_params_non_embedding", "best_val_loss", hue="n_train_molecules", fits=fits)
    plots.save(fig, "01_chemgpt_scaling", "loss_vs_params")   # figures/01_chemgpt_scaling/loss_vs_params.png

Every plot function returns its Figure, so a notebook shows it inline and can save it. `save`
writes a PNG with a fixed dpi and no software or time metadata, through a temp file and a
rename, so regenerating an unchanged figure gives the same bytes and git sees no change.
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib import ticker
import numpy as np
import pandas as pd
import seaborn as sns

from chemscale import paths, scaling
from chemscale.config import atomic_write_bytes

DPI = 150
FIGSIZE = (8.4, 4.4)  # wide enough for an axes and a legend beside it
FIT_COLOR = "crimson"  # a fit drawn over data of many colours

# Axis and legend titles in words with units, by the column names the runs table and curves use; a column not
# here is shown by its name, and a caller's own xlabel/ylabel wins.
LABELS = {
    "flops": "training compute (FLOPs)",
    "samples": "training samples seen",
    "step": "optimizer steps",
    "train_loss": "training loss (nats per token)",
    "val_loss": "validation loss (nats per token)",
    "best_val_loss": "validation loss (nats per token)",
    "test_loss": "test loss (nats per token)",
    "n_params": "parameters",
    "n_params_non_embedding": "parameters (non-embedding)",
    "n_train_molecules": "training molecules",
    "n_train_structures": "training structures",
    "width": "width (hidden features)",
    "depth": "depth (layers)",
    "name": "model",
    "force_mae_mev_per_a": "validation force MAE (meV/Å)",
    "test_force_mae_mev_per_a": "test force MAE (meV/Å)",
    "energy_mae_mev": "validation energy MAE (meV)",
    "test_energy_mae_mev": "test energy MAE (meV)",
}
# A force field's losses are not per token: its loss is energy_weight·MSE(E) + (1 - energy_weight)·MSE(F)
# (chemscale.ff.task), so a table of force-field runs (its `task` column all "ff") gets these words instead.
FF_LOSS_LABELS = {
    "train_loss": "training loss (weighted energy and force MSE)",
    "val_loss": "validation loss (weighted energy and force MSE)",
    "best_val_loss": "validation loss (weighted energy and force MSE)",
}
# The exponent of a fit against a data axis is β, as the notebooks' prose and L(N, D) = E + A/N^α + B/D^β call it;
# against anything else (parameters, compute) it is α.
DATA_COLUMNS = ("n_train_molecules", "n_train_structures")


def set_theme() -> None:
    """One look for every figure: seaborn 'ticks' with a light grid (log axes need it), notebook context."""
    sns.set_theme(style="ticks", context="notebook", rc={"axes.grid": True, "grid.alpha": 0.3})


def column_label(column: str | None, data: pd.DataFrame | None = None) -> str | None:
    """The words and unit for a column on an axis or legend title (`LABELS`), or its own name if it has none;
    `data`, the table plotted: where its `task` column says every run is a force field, its losses get
    `FF_LOSS_LABELS` (they are not nats per token)."""
    if data is not None and "task" in data.columns and len(data) and (data["task"] == "ff").all():
        return FF_LOSS_LABELS.get(column, LABELS.get(column, column))
    return LABELS.get(column, column)


def exponent_symbol(x: str) -> str:
    """β for a fit against training data, α otherwise (parameters, compute)."""
    return "β" if x in DATA_COLUMNS else "α"


def _axes(ax, figsize=FIGSIZE):
    """(figure, axes): the given axes, or a new figure with constrained layout."""
    if ax is not None:
        return ax.figure, ax
    return plt.subplots(figsize=figsize, layout="constrained")


def _fmt(value) -> str:
    """A group value for a legend: 100000 -> '1e5', 0.5 -> '0.5', 'moses' -> 'moses'."""
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        if value != 0 and not 1e-2 <= abs(value) < 1e4:
            mantissa, exponent = f"{value:.2g}".split("e")
            return f"{mantissa}e{int(exponent)}"
        return f"{value:g}"
    return str(value)


def _colors(levels, palette: str | None = None) -> dict:
    """One colour per level, in sorted order: by default a qualitative palette, so neighbouring levels (two model
    sizes, two architectures) differ in hue rather than in shade: seaborn's colour-blind safe 10, then its 'dark'
    10 (each a darker hue of another), then hues spaced around the wheel."""
    if palette is not None:
        return dict(zip(levels, sns.color_palette(palette, len(levels))))
    if len(levels) > 20:
        return dict(zip(levels, sns.color_palette("husl", len(levels))))
    return dict(zip(levels, sns.color_palette("colorblind") + sns.color_palette("dark")))


def _fit_label(fit: scaling.PowerLawFit, symbol: str) -> str:
    """The fit's legend text with its exponent named `symbol` ('β = 0.21 [0.15, 0.27]' for a data exponent)."""
    return fit.label().replace("α", symbol, 1)


def _draw_fit(ax, fit: scaling.PowerLawFit, color, label: str | None = None) -> None:
    """The fitted curve over the fitted range, dashed, with its confidence band (drawn from the fit's samples)."""
    xs = np.geomspace(fit.x_min, fit.x_max, 100)
    band = fit.band(xs)
    if band is not None:
        ax.fill_between(xs, *band, color=color, alpha=0.15, lw=0)
    ax.plot(xs, fit.predict(xs), "--", color=color, lw=1.3, label=label)


def _capped(df: pd.DataFrame) -> np.ndarray:
    """Which rows' runs hit their step cap (`convergence` == "capped"; no such column: none)."""
    if "convergence" not in df.columns:
        return np.zeros(len(df), dtype=bool)
    return (df["convergence"] == "capped").to_numpy()


def _points(ax, x, y, capped: np.ndarray, color, label, linestyle="-", **kw) -> None:
    """Markers at (x, y) joined by `linestyle`: filled where the run converged, hollow (white face, same colour)
    where it was capped, so a loss that is the step budget's is not read as the model's."""
    x, y = np.asarray(x), np.asarray(y)
    filled = [int(i) for i in np.flatnonzero(~capped)]
    mixed = bool(filled) and capped.any()
    ax.plot(x, y, marker="o", linestyle=linestyle, color=color, label=label, markevery=filled if mixed else None,
            markerfacecolor=color if filled else "white", **kw)
    if mixed:
        ax.plot(x[capped], y[capped], marker="o", linestyle="none", color=color, markerfacecolor="white", **kw)


def _capped_note(ax, drawn: pd.DataFrame) -> None:
    """Legend lines saying how many of the `drawn` points (rows with a finite x and y) are capped, or, when the runs
    said how they stopped (a `convergence` column), that all converged, or how many did where some runs said neither
    (diverged, unfinished): every figure says which of its points mean what their axis says."""
    if "convergence" not in drawn.columns or not len(drawn):
        return
    n, state = len(drawn), drawn["convergence"]
    converged, capped = int((state == "converged").sum()), int((state == "capped").sum())
    if converged == n:
        ax.plot([], [], "o", linestyle="none", color="0.35", label=f"all {n} points converged (filled)")
    elif converged + capped < n:
        ax.plot([], [], "o", linestyle="none", color="0.35", label=f"{converged} of {n} points converged")
    if capped:
        ax.plot([], [], "o", linestyle="none", color="0.35", markerfacecolor="white",
                label=f"{capped} of {n} points capped (hollow):\ntheir loss is the step budget's, not converged")


def _drawn(df: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """The rows a plot shows: a NaN loss (a diverged run) or a missing x is no point, and is not counted as one."""
    return df[np.isfinite(df[x].astype(float)) & np.isfinite(df[y].astype(float))]


class _LogMinorLocator(ticker.LogLocator):
    """Minor ticks of a log axis at 2..9 × 10^k, and on an axis shorter than a decade at steps about a tenth
    (under 0.3 decades: a twentieth) of the value apart, so a loss between 1 and 2 has ticks to be read against."""

    NARROW_SUBS = np.concatenate([np.arange(11, 20) / 10, np.arange(4, 10) / 2, np.arange(5, 10)])
    VERY_NARROW_SUBS = np.concatenate([np.arange(21, 40) / 20, np.arange(20, 50) / 10, np.arange(25, 50) / 5])

    def tick_values(self, vmin, vmax):
        decades = abs(np.log10(vmax / vmin)) if vmin > 0 and vmax > 0 else np.inf
        subs = np.arange(2.0, 10) if decades >= 1 else self.NARROW_SUBS if decades >= 0.3 else self.VERY_NARROW_SUBS
        self.set_params(subs=subs)
        return super().tick_values(vmin, vmax)


class _LogLabels(ticker.Formatter):
    """Plain-number labels ('0.8', '1.5', '300', '2e10') for a log axis's ticks, as many as fit.

    Major ticks (the decades) are all labelled. Minor ticks are labelled roundest first (see `_roundness`), each
    at least `min_gap` of the axis length from every other label, so an axis spanning 0.8 to 3 reads 0.8, 1,
    1.2, 1.5, 2, 2.5, 3, one spanning 20 to 80 (no decade at all) still has numbers, and one spanning five
    decades keeps its minor ticks unlabelled.
    """

    def __init__(self, minor: bool, min_gap: float):
        self.minor = minor
        self.min_gap = min_gap

    def __call__(self, x, pos=None):
        return _fmt(float(f"{x:.3g}"))

    def format_ticks(self, values):
        if not self.minor:
            return [self(v) for v in values]
        vmin, vmax = sorted(self.axis.get_view_interval())
        if vmin <= 0:
            return ["" for _ in values]
        gap = self.min_gap * np.log10(vmax / vmin)
        taken = [np.log10(v) for v in self.axis.get_majorticklocs() if vmin <= v <= vmax]
        labelled = set()
        for v in sorted((v for v in values if vmin <= v <= vmax), key=_roundness):
            if all(abs(np.log10(v) - t) >= gap for t in taken):
                taken.append(np.log10(v))
                labelled.add(v)
        return [self(v) if v in labelled else "" for v in values]


def _roundness(value: float) -> tuple:
    """Sort key of a tick value, roundest mantissa first: 2 and 5, then 3, 4, 6..9, then halves (1.5, 2.5),
    then fifths (1.2, 1.4), then the rest."""
    mantissa = round(value / 10 ** np.floor(np.log10(value)), 3)
    return (mantissa % 1 != 0, (2 * mantissa) % 1 != 0, (5 * mantissa) % 1 != 0, mantissa not in (2, 5), mantissa)


def _log_axis(axis) -> None:
    """Ticks labelled with plain numbers, minor ones too where there is room (`_LogLabels`): at least 1/12 of
    the axis apart on a y axis, 1/8 on an x axis, whose labels are side by side. A fixed number of ticks, not
    one that follows the axes' size in pixels, so the layout settles and a saved PNG is the same every time."""
    min_gap = 1 / 8 if axis.axis_name == "x" else 1 / 12
    axis.set_major_locator(ticker.LogLocator(base=10, numticks=12))
    axis.set_minor_locator(_LogMinorLocator(base=10, numticks=12))
    axis.set_major_formatter(_LogLabels(minor=False, min_gap=min_gap))
    axis.set_minor_formatter(_LogLabels(minor=True, min_gap=min_gap))


def _legend(ax, title: str | None = None) -> None:
    """The legend outside the axes, so it never covers a point or a curve: for a figure of its own, a figure legend
    to the right that constrained layout makes room for; for axes the caller placed, beside their right edge."""
    if not ax.get_legend_handles_labels()[1]:
        return
    style = dict(title=title, fontsize="small", title_fontsize="small", frameon=False)
    if ax.figure.axes == [ax] and ax.figure.get_layout_engine() is not None:
        ax.figure.legend(*ax.get_legend_handles_labels(), loc="outside right upper", **style)
    else:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, **style)


def _finish(ax, x, y, xlabel, ylabel, title, legend_title=None, data=None) -> None:
    """Log-log axes with readable ticks, axis labels in words (`LABELS`) unless given, and the legend beside."""
    ax.set(xscale="log", yscale="log", xlabel=xlabel or column_label(x, data), ylabel=ylabel or column_label(y, data),
           title=title)
    _log_axis(ax.xaxis)
    _log_axis(ax.yaxis)
    _legend(ax, legend_title)


def loglog(df: pd.DataFrame, x: str, y: str, hue: str | None = None, *, fits=None, ax=None,
           xlabel: str | None = None, ylabel: str | None = None, title: str | None = None,
           palette: str | None = None):
    """y against x on log-log axes, one line of points per `hue` group, with fitted power laws.

    `fits` is a mapping hue value -> PowerLawFit (as `scaling.fit_groups` returns), each drawn in
    its group's colour with its exponent in the legend (β against training data, α otherwise), or a
    single PowerLawFit for all points. Axis labels and the legend title default to `LABELS`.
    With a mapping, a group it lacks (too few points to fit) is joined by a dotted line with
    'not fitted' in the legend, so a missing line reads as skipped, not forgotten. Points of runs
    that hit their step cap (a `convergence` column of "capped") are hollow and counted in the legend.
    """
    fig, ax = _axes(ax)
    groups = list(df.groupby(hue, sort=True)) if hue else [(None, df)]
    colors = _colors([level for level, _ in groups], palette) if hue else {None: "C0"}
    per_group = fits if isinstance(fits, dict) else None
    symbol = exponent_symbol(x)
    for level, group in groups:
        group = group.sort_values(x)
        fit = per_group.get(level) if per_group is not None else None
        label = _fmt(level) if hue else None
        skipped = per_group is not None and fit is None
        if fit is not None:
            _draw_fit(ax, fit, colors[level])
            label = f"{label}: {_fit_label(fit, symbol)}" if label else _fit_label(fit, symbol)
        elif skipped:
            label = f"{label}: not fitted" if label else "not fitted"
        _points(ax, group[x], group[y], _capped(group), colors[level], label, linestyle=":" if skipped else "-",
                ms=5, lw=0.9)
    if isinstance(fits, scaling.PowerLawFit):
        _draw_fit(ax, fits, FIT_COLOR, label=f"fit: {_fit_label(fits, symbol)}")
    _capped_note(ax, _drawn(df, x, y))
    _finish(ax, x, y, xlabel, ylabel, title, legend_title=column_label(hue), data=df)
    return fig


def frontier_plot(df: pd.DataFrame, compute: str, loss: str, hue: str | None = None,
                  frontier: pd.DataFrame | None = None, fit: scaling.PowerLawFit | None = None, *,
                  run: str = "run_id", ax=None, xlabel: str | None = None, ylabel: str | None = None,
                  title: str | None = "Loss vs compute", palette: str | None = None):
    """Every run's loss-vs-compute curve (faint, coloured by `hue`), the frontier (bold) and its fit.

    Frontier points of runs that hit their step cap (a `convergence` column of "capped") are hollow
    and counted in the legend.
    """
    fig, ax = _axes(ax)
    if frontier is None:
        frontier = scaling.compute_optimal_frontier(df, compute, loss)
    levels = sorted(df[hue].dropna().unique()) if hue else [None]
    colors = _colors(levels, palette) if hue else {None: "0.4"}
    for _, curve in df.sort_values(compute).groupby(run, sort=True):
        color = colors[curve[hue].iloc[0]] if hue else colors[None]
        ax.plot(curve[compute], curve[loss], "-", color=color, alpha=0.35, lw=1)
    for level in levels if hue else []:  # one legend entry per hue level, not per run
        ax.plot([], [], "-", color=colors[level], label=_fmt(level))
    _points(ax, frontier[compute], frontier[loss], _capped(frontier), "black", "compute-optimal frontier",
            linestyle="none", ms=5, zorder=3)
    _capped_note(ax, _drawn(frontier, compute, loss))
    if fit is not None:
        _draw_fit(ax, fit, FIT_COLOR, label=f"frontier fit: {fit.label()}")
    _finish(ax, compute, loss, xlabel, ylabel, title, legend_title=column_label(hue), data=df)
    return fig


def exponent_plot(table: pd.DataFrame, *, label: str = "fit", value: str = "alpha", reference: float | None = None,
                  reference_label: str | None = None, ax=None, xlabel: str = "exponent (95% CI)",
                  title: str | None = "Fitted scaling exponents"):
    """One row per fit: its exponent with the CI as an error bar (columns value, value_lo, value_hi),
    and a dotted line at a reference value such as the paper's."""
    fig, ax = _axes(ax, figsize=(FIGSIZE[0], 1.4 + 0.5 * max(len(table), 1)))
    t = table.reset_index(drop=True)
    if t.empty:  # every fit was skipped (too few points): say so instead of failing after the training
        ax.text(0.5, 0.5, "no exponent could be fitted (too few points)", ha="center", va="center",
                transform=ax.transAxes)
        ax.set(yticks=[], xlabel=xlabel, title=title)
        return fig
    rows = np.arange(len(t))[::-1]  # first row at the top, as in the table
    # a percentile CI may sit to one side of the point estimate, or be missing: no negative bars
    below = np.nan_to_num(t[value] - t[f"{value}_lo"]).clip(min=0)
    above = np.nan_to_num(t[f"{value}_hi"] - t[value]).clip(min=0)
    # An unconstrained fit can have a CI of [0, 20]: clip the axis near the estimates and print the clipped end.
    points = [v for v in [*t[value], reference] if v is not None and np.isfinite(v)]
    right = max(0.5, 2.5 * max(points, default=0.5))
    clipped = (t[value] + above) > right
    above = np.where(clipped, np.clip(right - t[value].to_numpy(), 0, None), above)
    ax.errorbar(t[value], rows, xerr=np.vstack([below, above]), fmt="o", color="C0", capsize=4)
    for row, hi in zip(rows[clipped.to_numpy()], t[f"{value}_hi"][clipped]):
        ax.annotate(f"CI to {hi:.3g} →", (right, row), xytext=(-4, 6), textcoords="offset points", ha="right",
                    fontsize="small", color="C0")
    ax.set_xlim(min(0.0, float(np.nanmin(t[value] - below))) - 0.02 * right, right)
    if reference is not None:
        ax.axvline(reference, color=FIT_COLOR, ls=":", label=reference_label)
    ax.set(yticks=rows, yticklabels=t[label].astype(str), xlabel=xlabel, title=title)
    ax.grid(False, axis="y")
    _legend(ax)
    return fig


def quality_plot(quality: pd.DataFrame, x: str = "n_params_non_embedding",
                 metrics: tuple[str, ...] = ("validity", "uniqueness", "novelty"), *, ax=None,
                 xlabel: str | None = None, title: str | None = "Generation quality by model size"):
    """Fractions (validity, uniqueness, novelty of sampled molecules) against model size, log x."""
    missing = [m for m in (x, *metrics) if m not in quality.columns]
    if missing:
        raise ValueError(f"quality table has no column(s) {missing}; it has {list(quality.columns)}")
    fig, ax = _axes(ax)
    q = quality.sort_values(x)
    for metric, color in zip(metrics, sns.color_palette("colorblind", len(metrics))):
        ax.plot(q[x], q[metric], "o-", color=color, label=metric)
    ax.set(xscale="log", ylim=(0, 1.02), xlabel=xlabel or column_label(x), ylabel="fraction", title=title)
    _log_axis(ax.xaxis)
    _legend(ax)
    return fig


def save(fig, notebook_stem: str, name: str, *, root: str | Path | None = None, dpi: int = DPI) -> Path:
    """Write `fig` to <root or paths.FIGURES>/<notebook_stem>/<name>.png, byte-for-byte reproducibly.

    PNGs are always rendered by Agg, whatever the interactive backend; dropping the 'Software'
    entry leaves no matplotlib version in the file, and PNGs carry no time stamp.
    """
    if Path(name).name != name or name.endswith(".png"):
        raise ValueError(f"figure name {name!r} must be a bare file name without '.png'")
    path = Path(root or paths.FIGURES) / notebook_stem / f"{name}.png"
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    atomic_write_bytes(path, buffer.getvalue())
    return path
