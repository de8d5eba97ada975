"""Power-law fits for scaling curves, with bootstrap confidence intervals.

- `fit_power_law(x, L)`: `L = A·x^-α`, or with `offset=True` `L = E + A·x^-α`;
- `fit_joint(N, D, L)`: the Chinchilla form `L(N, D) = E + A/N^α + B/D^β`;
- `compute_optimal_frontier(curves)`: the lowest loss reached for each amount of compute.

Method (Hoffmann et al. 2022, as re-analysed by Besiroglu et al. 2024): every form is written
as a log-sum-exp of its terms (`log L = LSE(a - α log x, e)`), fitted by minimising a Huber
loss (δ = 1e-3) of the residuals in log L with L-BFGS-B from a grid of starting points; the
confidence intervals are percentiles over fits to bootstrap resamples of the points.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.optimize import minimize

HUBER_DELTA = 1e-3


def _huber(r: np.ndarray, delta: float = HUBER_DELTA) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r**2, delta * (a - 0.5 * delta))


def _clean(*columns, min_points: int) -> tuple[list[np.ndarray], int]:
    """Float arrays without rows holding NaN/inf (diverged runs); errors on too few or non-positive."""
    arrays = [np.asarray(c, dtype=float) for c in columns]
    if len({len(a) for a in arrays}) != 1:
        raise ValueError(f"columns differ in length: {[len(a) for a in arrays]}")
    finite = np.all([np.isfinite(a) for a in arrays], axis=0)
    dropped = int((~finite).sum())
    if dropped:
        warnings.warn(f"dropped {dropped} row(s) with NaN/inf values (diverged runs?)", stacklevel=3)
    arrays = [a[finite] for a in arrays]
    if any((a <= 0).any() for a in arrays):
        raise ValueError("power-law fits need positive x and loss values")
    if len(arrays[0]) < min_points:
        raise ValueError(f"need at least {min_points} finite points to fit, got {len(arrays[0])}")
    return arrays, dropped


def _objective(spec):
    """Huber loss of log-residuals, and its gradient, for log L = LSE over terms.

    `spec` lists the terms as (log-coefficient index, exponent index or None, row of logs):
    term = theta[c] - theta[e] * logs[row], or theta[c] alone for a constant. An analytic
    gradient makes the many L-BFGS starts and bootstrap refits ~5x faster than finite differences.
    """

    def f(theta, logs, log_y):
        terms = np.stack([theta[c] - (theta[e] * logs[r] if e is not None else 0.0 * logs[r]) for c, e, r in spec])
        top = terms.max(axis=0)
        pred = top + np.log(np.exp(terms - top).sum(axis=0))  # logsumexp; scipy's costs 10x more here
        resid = pred - log_y
        weights = np.exp(terms - pred)  # d pred / d term_k (softmax)
        dres = np.clip(resid, -HUBER_DELTA, HUBER_DELTA)  # d huber / d resid
        grad = np.zeros_like(theta)
        for k, (c, e, r) in enumerate(spec):
            g = dres * weights[k]
            grad[c] += g.sum()
            if e is not None:
                grad[e] -= (g * logs[r]).sum()
        return _huber(resid).sum(), grad

    return f


def _best_fit(f, starts, args, bounds=None) -> np.ndarray:
    best, best_val = None, np.inf
    for x0 in starts:
        res = minimize(f, np.asarray(x0, float), args=args, method="L-BFGS-B", jac=True, bounds=bounds)
        if res.fun < best_val:
            best, best_val = res.x, res.fun
    return best


def _bootstrap(f, theta, args, n_bootstrap, seed, bounds=None) -> np.ndarray:
    """Parameter vectors refitted on resampled points (warm-started from the best fit)."""
    rng = np.random.default_rng(seed)
    n = len(args[-1])
    samples = []
    for _ in range(n_bootstrap):
        idx = rng.integers(0, n, n)
        sample_args = tuple(a[..., idx] for a in args)
        res = minimize(f, theta, args=sample_args, method="L-BFGS-B", jac=True, bounds=bounds)
        samples.append(res.x)
    return np.array(samples).reshape(n_bootstrap, len(theta))


def _ci(values: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


@dataclass
class PowerLawFit:
    """`L = E + A·x^-alpha` (E = 0 without offset) with bootstrap CIs."""

    A: float
    alpha: float
    E: float
    ci: dict[str, tuple[float, float]]
    n_points: int
    x_min: float
    x_max: float
    offset: bool = False
    n_dropped: int = 0
    samples: np.ndarray = field(default=None, repr=False)  # bootstrap (A, alpha, E) rows

    def predict(self, x) -> np.ndarray:
        return self.E + self.A * np.asarray(x, float) ** -self.alpha

    def band(self, x, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise CI of the prediction at x from the bootstrap fits."""
        x = np.asarray(x, float)
        preds = self.samples[:, 2:3] + self.samples[:, 0:1] * x[None, :] ** -self.samples[:, 1:2]
        return np.percentile(preds, 50 * (1 - level), axis=0), np.percentile(preds, 50 * (1 + level), axis=0)

    def summary(self) -> dict:
        row = {"alpha": self.alpha, "alpha_lo": self.ci["alpha"][0], "alpha_hi": self.ci["alpha"][1], "A": self.A,
               "n_points": self.n_points}
        if self.offset:
            row |= {"E": self.E, "E_lo": self.ci["E"][0], "E_hi": self.ci["E"][1]}
        return row

    def label(self) -> str:
        lo, hi = self.ci["alpha"]
        return f"α = {self.alpha:.3f} [{lo:.3f}, {hi:.3f}]"


def fit_power_law(x, y, *, offset: bool = False, n_bootstrap: int = 1000, seed: int = 0,
                  ci: float = 0.95) -> PowerLawFit:
    """Fit `y = A·x^-α` (or `E + A·x^-α` with offset=True) to positive points; NaN rows are dropped."""
    (x, y), dropped = _clean(x, y, min_points=4 if offset else 3)
    logs, log_y = np.log(x)[None, :], np.log(y)
    if offset:  # theta = (a, alpha, e)
        f = _objective([(0, 1, 0), (2, None, 0)])
        starts = itertools.product([0, 2, 5, 10], [0.05, 0.3, 1.0], [log_y.min() - 2, log_y.min() - 0.5])
        bounds = [(None, None), (0, 5), (None, None)]
    else:  # theta = (a, alpha)
        f = _objective([(0, 1, 0)])
        slope, intercept = np.polyfit(logs[0], log_y, 1)
        starts, bounds = [(intercept, -slope), (0.0, 0.1)], [(None, None), (-5, 5)]
    theta = _best_fit(f, starts, (logs, log_y), bounds)
    boot = _bootstrap(f, theta, (logs, log_y), n_bootstrap, seed, bounds)
    as_params = lambda t: np.stack([np.exp(t[:, 0]), t[:, 1], np.exp(t[:, 2]) if offset else 0 * t[:, 0]], 1)  # noqa: E731
    best = as_params(theta[None, :])[0]
    samples = as_params(boot)
    cis = {name: _ci(samples[:, i], ci) for i, name in enumerate(("A", "alpha", "E"))}
    return PowerLawFit(A=float(best[0]), alpha=float(best[1]), E=float(best[2]), ci=cis, n_points=len(x),
                       x_min=float(x.min()), x_max=float(x.max()), offset=offset, n_dropped=dropped, samples=samples)


@dataclass
class JointFit:
    """`L(N, D) = E + A/N^alpha + B/D^beta` with bootstrap CIs."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float
    ci: dict[str, tuple[float, float]]
    n_points: int

    def predict(self, N, D) -> np.ndarray:
        N, D = np.asarray(N, float), np.asarray(D, float)
        return self.E + self.A / N**self.alpha + self.B / D**self.beta

    def summary(self) -> dict:
        row = {}
        for k in ("E", "A", "alpha", "B", "beta"):
            row |= {k: getattr(self, k), f"{k}_lo": self.ci[k][0], f"{k}_hi": self.ci[k][1]}
        return row | {"n_points": self.n_points}


def fit_joint(N, D, L, *, n_bootstrap: int = 1000, seed: int = 0, ci: float = 0.95,
              grid: str = "coarse") -> JointFit:
    """Fit the Chinchilla form to losses L of models with N parameters trained on D samples.

    grid="full" is Hoffmann et al.'s grid of starts (α, β in 0..2 by 0.5, e in -1..1 by 0.5,
    a, b in 0..25 by 5: 4,500 starts); "coarse" (default) 72 starts around it, enough for the
    few dozen points of a laptop study and 60x faster."""
    (N, D, L), _ = _clean(N, D, L, min_points=6)
    logs, log_y = np.stack([np.log(N), np.log(D)]), np.log(L)
    # theta = (a, alpha, b, beta, e)
    f = _objective([(0, 1, 0), (2, 3, 1), (4, None, 0)])
    if grid == "full":
        exps, es, ab = np.arange(0, 2.01, 0.5), np.arange(-1, 1.01, 0.5), np.arange(0, 26, 5)
    else:
        exps, es, ab = [0.2, 0.8], [-1.0, 0.5], [0, 5, 10]
    starts = [(a, al, b, be, e) for a, b in itertools.product(ab, ab) for al, be in itertools.product(exps, exps)
              for e in es]
    bounds = [(None, None), (0, 5), (None, None), (0, 5), (None, None)]
    theta = _best_fit(f, starts, (logs, log_y), bounds)
    boot = _bootstrap(f, theta, (logs, log_y), n_bootstrap, seed, bounds)
    conv = lambda t: np.stack([np.exp(t[:, 4]), np.exp(t[:, 0]), t[:, 1], np.exp(t[:, 2]), t[:, 3]], 1)  # noqa: E731
    best, samples = conv(theta[None, :])[0], conv(boot)
    names = ("E", "A", "alpha", "B", "beta")
    return JointFit(*map(float, best), ci={k: _ci(samples[:, i], ci) for i, k in enumerate(names)},
                    n_points=len(L))


def fit_groups(df: pd.DataFrame, x: str, y: str, by: str, **kw) -> dict:
    """One `fit_power_law` per value of column `by` (groups with too few points are skipped)."""
    fits = {}
    for key, group in df.groupby(by):
        try:
            fits[key] = fit_power_law(group[x], group[y], **kw)
        except ValueError as e:
            warnings.warn(f"{by} = {key}: not fitted ({e})", stacklevel=2)
    return fits


def fits_table(fits: dict, name: str = "group") -> pd.DataFrame:
    """The fits of `fit_groups` as a tidy table, one row per group."""
    return pd.DataFrame([{name: k, **f.summary()} for k, f in fits.items()])


def compute_optimal_frontier(curves: pd.DataFrame, compute: str = "flops", loss: str = "val_loss") -> pd.DataFrame:
    """Points (from any run) that reached a loss no run reached with less or equal compute.

    `curves` holds one row per evaluation of each run (e.g. `sweep.curves`); the result keeps
    those rows, sorted by compute, each lower than every cheaper point.
    """
    pts = curves.dropna(subset=[compute, loss]).sort_values([compute, loss])
    best = np.minimum.accumulate(pts[loss].to_numpy())
    strictly_lower = np.concatenate([[True], pts[loss].to_numpy()[1:] < best[:-1]])
    return pts[strictly_lower].reset_index(drop=True)


def fit_frontier(curves: pd.DataFrame, compute: str = "flops", loss: str = "val_loss", **kw) -> PowerLawFit:
    frontier = compute_optimal_frontier(curves, compute, loss)
    return fit_power_law(frontier[compute], frontier[loss], **kw)
