"""Power-law fits of loss against scale, with bootstrap confidence intervals.

    fit = scaling.fit_power_law(df["n_params_non_embedding"], df["best_val_loss"])   # L = A·x^-α
    fit = scaling.fit_power_law(x, y, offset=True)                                  # L = E + A·x^-α
    joint = scaling.fit_joint(N, D, L)                                              # L = E + A/N^α + B/D^β
    frontier = scaling.compute_optimal_frontier(curves, compute="flops", loss="val_loss")

A plain power law `L = A·x^-α` is a straight line in log space: it is fitted by ordinary least
squares on (log x, log L), and its intervals are Student-t intervals with n - 2 degrees of
freedom, the textbook intervals that hold at the 3-5 points of a study's axis (a percentile
bootstrap of 3 points, where a resample often holds only 2 distinct points, covered the truth
in about two thirds of trials at a nominal 95%: tests/test_scaling.py measures the coverage).

The forms with a floor, `E + A·x^-α` and Hoffmann et al.'s (Chinchilla) `E + A/N^α + B/D^β`,
are not linear in any space; they are fitted as Besiroglu et al. (Epoch) refitted Chinchilla:
every form is written as a log-sum-exp of its terms, `log L = LSE(a - α·log x, e)` with
`A = exp(a)`, `E = exp(e)`, so each term stays positive without constraints; the loss is a
Huber loss (δ = 1e-3) on the log-loss residuals, nearly an L1 loss, so one odd run does not
pull the exponent; L-BFGS-B starts from a grid of starting points and the best fit is kept.
Their intervals are percentiles of refits to resamples of the points drawn with replacement,
and a joint-fit parameter the grid cannot pin down is marked "not constrained by this grid"
instead of being given an interval (see `JointFit.constrained`).
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats
from scipy.optimize import minimize

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # optional: the fits are the same without it, only slower on a busy machine
    threadpool_limits = None

HUBER_DELTA = 1e-3
N_STARTS = 20  # L-BFGS runs from the best grid points (the whole grid is only evaluated, not optimised)
N_BOOTSTRAP_STARTS = 3  # distinct local optima of the full fit, each a warm start for every resample
ALPHA_GRID = (0.0, 0.5, 1.0, 1.5, 2.0)  # Hoffmann et al.'s starting exponents
E_GRID = (-2.0, -1.5, -1.0, -0.5, 0.0)  # log E relative to log(min L): the floor is below every loss
A_GRID = (-5.0, -4.0, -3.0, -2.0, -1.0, 0.0)  # log of a term at the centre of the data, relative to log(median L)
LBFGS_OPTIONS = {"maxiter": 5000, "ftol": 1e-12, "gtol": 1e-9}


# --- the model: log L = LSE over terms (a_j - α_j·u_j) and optionally e, Huber loss on log L ---

def _objective(theta: np.ndarray, U: np.ndarray, log_y: np.ndarray, weights: np.ndarray, offset: bool):
    """Huber loss and its gradient for many parameter vectors at once.

    theta (S, P) = [a_1, α_1, ..., a_k, α_k, (e)]; U (n, k) centred log-scales; weights (S, n)
    are bootstrap counts (ones for a plain fit). Returns loss (S,), grad (S, P).
    """
    k = U.shape[1]
    a, alpha = theta[:, 0:2 * k:2], theta[:, 1:2 * k:2]
    terms = a[:, None, :] - alpha[:, None, :] * U[None]  # (S, n, k)
    if offset:
        e = np.broadcast_to(theta[:, None, -1:], (*terms.shape[:2], 1))
        terms = np.concatenate([terms, e], axis=2)  # (S, n, k + 1)
    top = terms.max(axis=2, keepdims=True)
    exp = np.exp(terms - top)
    total = exp.sum(axis=2, keepdims=True)
    share = exp / total  # d log L / d term: the softmax of the terms
    residual = (top + np.log(total))[..., 0] - log_y  # (S, n)
    small = np.abs(residual) <= HUBER_DELTA
    # Huber divided by δ: same minimiser, but values of order |r| so L-BFGS's tolerances mean something
    huber = np.where(small, 0.5 * residual**2 / HUBER_DELTA, np.abs(residual) - 0.5 * HUBER_DELTA)
    slope = weights * np.where(small, residual / HUBER_DELTA, np.sign(residual))  # (S, n)
    grad = np.empty_like(theta)
    grad[:, 0:2 * k:2] = (slope[..., None] * share[..., :k]).sum(axis=1)
    grad[:, 1:2 * k:2] = -(slope[..., None] * share[..., :k] * U[None]).sum(axis=1)
    if offset:
        grad[:, -1] = (slope * share[..., -1]).sum(axis=1)
    return (weights * huber).sum(axis=1), grad


def _one_blas_thread():
    """Limit BLAS to one thread: L-BFGS-B's tiny BLAS calls otherwise wake idle threads, which made
    each fit ~20x slower on a busy 2-core machine."""
    return threadpool_limits(1, "blas") if threadpool_limits else contextlib.nullcontext()


def _lbfgs(theta0, U, log_y, weights, offset, bounds):
    """One L-BFGS-B run from theta0; returns (loss, theta)."""
    def f(theta):
        loss, grad = _objective(theta[None], U, log_y, weights[None], offset)
        return loss[0], grad[0]

    result = minimize(f, theta0, jac=True, method="L-BFGS-B", bounds=bounds, options=LBFGS_OPTIONS)
    return result.fun, result.x


def _start_grid(log_y: np.ndarray, k: int, offset: bool) -> np.ndarray:
    """Starting points: Hoffmann et al.'s grid, with a and e shifted to the scale of the data."""
    a_values = np.median(log_y) + np.array(A_GRID)
    per_term = [a_values, ALPHA_GRID] * k
    e_values = [np.min(log_y) + np.array(E_GRID)] if offset else []
    return np.array(list(itertools.product(*per_term, *e_values)), dtype=float)


def _bounds(k: int, offset: bool):
    """Exponents ≥ 0 when there is a floor E (a rising term is meaningless there); else free."""
    if not offset:
        return None
    return [(None, None), (0.0, None)] * k + [(None, None)]


def _fit_theta(U, log_y, weights, offset, starts):
    """Best (loss, theta) of L-BFGS from `starts`, plus every run's result (for warm starts)."""
    bounds = _bounds(U.shape[1], offset)
    runs = sorted((_lbfgs(s, U, log_y, weights, offset, bounds) for s in starts), key=lambda r: r[0])
    return runs[0], runs


def _best_starts(U, log_y, offset) -> np.ndarray:
    """The N_STARTS grid points of lowest loss: evaluating the grid is cheap, optimising from all of it is not."""
    grid = _start_grid(log_y, U.shape[1], offset)
    loss, _ = _objective(grid, U, log_y, np.ones((1, len(log_y))), offset)
    return grid[np.argsort(loss, kind="stable")[:N_STARTS]]


def _distinct(runs, n: int) -> list[np.ndarray]:
    """Up to n parameter vectors of the best distinct local optima, best first."""
    kept = []
    for _, theta in runs:
        if not any(np.allclose(theta, other, atol=1e-3) for other in kept):
            kept.append(theta)
        if len(kept) == n:
            break
    return kept


def _resample_weights(n: int, n_bootstrap: int, min_distinct: int, rng) -> np.ndarray:
    """Bootstrap resamples as counts per point (n_bootstrap, n); resamples with too few distinct points are redrawn."""
    weights = np.empty((0, n))
    while len(weights) < n_bootstrap:
        draw = rng.multinomial(n, np.full(n, 1.0 / n), size=n_bootstrap)
        weights = np.vstack([weights, draw[(draw > 0).sum(axis=1) >= min_distinct]])
    return weights[:n_bootstrap]


def _fit(U, log_y, offset, n_bootstrap, seed, min_distinct):
    """Best theta and the bootstrap thetas (n_bootstrap, P) of a log-sum-exp fit."""
    ones = np.ones(len(log_y))
    with _one_blas_thread():
        (_, theta), runs = _fit_theta(U, log_y, ones, offset, _best_starts(U, log_y, offset))
        warm = _distinct(runs, N_BOOTSTRAP_STARTS)
        weights = _resample_weights(len(log_y), n_bootstrap, min_distinct, np.random.default_rng(seed))
        samples = [_fit_theta(U, log_y, w, offset, warm)[0][1] for w in weights]
    return theta, np.array(samples).reshape(n_bootstrap, len(theta))


# --- inputs ---

class TooFewPoints(ValueError):
    """Fewer points with a loss than a fit has parameters to pin down: the fit is skipped, not guessed."""


def _name(values, default: str) -> str:
    """The column name of a pandas Series, for error messages."""
    return str(getattr(values, "name", None) or default)


def _clean(columns: list[tuple[str, object]], min_points: int) -> tuple[list[np.ndarray], int]:
    """Float arrays of the named columns without NaN rows; ValueError naming the column on bad values.

    The last column is the loss: a NaN or +inf loss is a diverged run, dropped with a warning.
    """
    names = [name for name, _ in columns]
    arrays = [np.asarray(values, dtype=float).ravel() for _, values in columns]
    if len({len(a) for a in arrays}) != 1:
        raise ValueError(f"columns {names} have different lengths {[len(a) for a in arrays]}")
    drop = np.isnan(arrays[-1]) | (arrays[-1] == np.inf)
    for a in arrays[:-1]:
        drop |= np.isnan(a)
    if drop.any():
        warnings.warn(f"dropped {drop.sum()} row(s) of {drop.size} with a NaN (or an infinite loss): "
                      "diverged runs?", stacklevel=3)
    arrays = [a[~drop] for a in arrays]
    for name, a in zip(names, arrays):
        bad = ~np.isfinite(a) | (a <= 0)
        if bad.any():
            raise ValueError(f"{name} must be positive and finite for a log-log fit; "
                             f"{bad.sum()} value(s) are not, e.g. {a[bad][0]!r}")
    if len(arrays[0]) < min_points:
        raise TooFewPoints(f"{len(arrays[0])} point(s) with a finite loss"
                           + (f" ({drop.sum()} dropped as NaN)" if drop.any() else "")
                           + f", and this fit needs at least {min_points}: add values to the sweep axis, or give the "
                           f"runs the budget to converge (the notebooks fit converged runs only)")
    return arrays, int(drop.sum())


def _interval(values: np.ndarray, ci: float) -> tuple[float, float]:
    """Percentile interval of bootstrap values; NaNs when there was no bootstrap."""
    if len(values) == 0:
        return (float("nan"), float("nan"))
    with np.errstate(invalid="ignore"):  # resamples that sent a scale to inf: inf - inf between them is an open end
        lo, hi = np.percentile(values, [50 * (1 - ci), 50 * (1 + ci)])
    return (float(lo), float(hi))


# --- L = E + A·x^-α ---

@dataclass
class PowerLawFit:
    """L = E + A·x^-α fitted to n_points points over [x_min, x_max], with bootstrap CIs."""

    A: float
    alpha: float
    E: float  # 0.0 without an offset
    ci: dict[str, tuple[float, float]]  # parameter -> (lo, hi) at level ci_level
    n_points: int
    x_min: float
    x_max: float
    samples: np.ndarray = field(repr=False)  # (n_bootstrap, 3): A, alpha, E of each resample
    n_dropped: int = 0  # NaN rows (diverged runs) left out
    offset: bool = False
    ci_level: float = 0.95

    def predict(self, x) -> np.ndarray:
        """The fitted loss at x."""
        return self.E + self.A * np.asarray(x, dtype=float) ** -self.alpha

    def band(self, x, ci: float | None = None) -> tuple[np.ndarray, np.ndarray] | None:
        """Pointwise percentile band of the resamples' predictions at x; None without a bootstrap."""
        if len(self.samples) == 0:
            return None
        x = np.asarray(x, dtype=float)
        A, alpha, E = (self.samples[:, [i]] for i in range(3))
        predictions = E + A * x[None, :] ** -alpha  # (n_bootstrap, len(x))
        ci = self.ci_level if ci is None else ci
        lo, hi = np.percentile(predictions, [50 * (1 - ci), 50 * (1 + ci)], axis=0)
        return lo, hi

    def summary(self) -> dict:
        """One table row: each parameter with its CI, and the data it was fitted to."""
        row = {}
        for name in ("alpha", "A", "E"):
            lo, hi = self.ci.get(name, (float("nan"), float("nan")))
            row.update({name: getattr(self, name), f"{name}_lo": lo, f"{name}_hi": hi})
        return {**row, "n_points": self.n_points, "n_dropped": self.n_dropped,
                "x_min": self.x_min, "x_max": self.x_max}

    def label(self) -> str:
        """Short legend text, e.g. 'α = 0.17 [0.12, 0.22]'."""
        return _label("α", self.alpha, self.ci.get("alpha"))


def _label(symbol: str, value: float, interval) -> str:
    """'α = 0.17 [0.12, 0.22]', or 'α = 0.17' without a CI."""
    if interval is None or np.isnan(interval[0]):
        return f"{symbol} = {value:.2f}"
    return f"{symbol} = {value:.2f} [{interval[0]:.2f}, {interval[1]:.2f}]"


def fit_power_law(x, y, *, offset: bool = False, n_bootstrap: int = 1000, seed: int = 0,
                  ci: float = 0.95) -> PowerLawFit:
    """Fit L = A·x^-α by least squares on log L, or E + A·x^-α (offset=True) by Huber loss on log L.

    Without an offset the intervals are Student-t intervals of the least-squares line (n - 2
    degrees of freedom), which cover the truth at their nominal level even at 3 points, where a
    bootstrap does not; `samples` are then n_bootstrap draws of (A, α) from the same
    t-distribution (seeded), so `band` and callers that read samples see the same uncertainty.
    With an offset the intervals are bootstrap percentiles. n_bootstrap=0 gives no interval.
    """
    (x, y), n_dropped = _clean([(_name(x, "x"), x), (_name(y, "y"), y)], min_points=4 if offset else 3)
    log_x = np.log(x)
    centre = log_x.mean()  # fit a at the centre of the data: a and α are then nearly uncorrelated
    U = (log_x - centre)[:, None]
    if offset:
        theta, thetas = _fit(U, np.log(y), offset, n_bootstrap, seed, min_distinct=3)
        samples = _powerlaw_params(thetas, centre, offset)
        intervals = {n: _interval(samples[:, i], ci) for i, n in enumerate(("A", "alpha", "E"))}
    else:
        theta, cov, dof = _least_squares(U[:, 0], np.log(y))
        samples = _powerlaw_params(_t_draws(theta, cov, dof, n_bootstrap, seed), centre, offset)
        intervals = _t_intervals(theta, cov, dof, centre, ci) if n_bootstrap else \
            {n: (float("nan"), float("nan")) for n in ("A", "alpha")}
    A, alpha, E = map(float, _powerlaw_params(theta[None], centre, offset)[0])
    return PowerLawFit(A=A, alpha=alpha, E=E, ci=intervals, n_points=len(x), x_min=float(x.min()),
                       x_max=float(x.max()), samples=samples, n_dropped=n_dropped, offset=offset, ci_level=ci)


def _least_squares(u: np.ndarray, log_y: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """theta = [a, α] of log L = a - α·u (u centred), its covariance and the residual degrees of freedom."""
    design = np.column_stack([np.ones_like(u), -u])
    theta, *_ = np.linalg.lstsq(design, log_y, rcond=None)
    dof = len(u) - 2
    variance = np.sum((log_y - design @ theta) ** 2) / dof
    return theta, variance * np.linalg.inv(design.T @ design), dof


def _t_draws(theta: np.ndarray, cov: np.ndarray, dof: int, n: int, seed: int) -> np.ndarray:
    """n draws (n, 2) from the multivariate t-distribution of the least-squares estimate: every linear
    combination of them (log A, α, a prediction) is t-distributed with dof degrees of freedom."""
    rng = np.random.default_rng(seed)
    normal = rng.multivariate_normal(np.zeros(2), cov, size=n, method="eigh")  # eigh: a zero cov (exact data) is fine
    return theta + normal / np.sqrt(rng.chisquare(dof, size=(n, 1)) / dof)


def _t_intervals(theta: np.ndarray, cov: np.ndarray, dof: int, centre: float, ci: float) -> dict:
    """Student-t intervals of α and of A = exp(a + α·centre) (the interval of log A, exponentiated)."""
    t = stats.t.ppf(0.5 + ci / 2, dof)
    log_a = np.array([1.0, centre])  # log A = a + α·centre
    half_alpha = t * np.sqrt(cov[1, 1])
    half_log_a = t * np.sqrt(log_a @ cov @ log_a)
    log_A = theta @ log_a
    return {"A": (float(np.exp(log_A - half_log_a)), float(np.exp(log_A + half_log_a))),
            "alpha": (float(theta[1] - half_alpha), float(theta[1] + half_alpha))}


def _powerlaw_params(thetas: np.ndarray, centre: float, offset: bool) -> np.ndarray:
    """(S, 3) columns A, alpha, E from centred log-space parameters [a, α, (e)]."""
    a, alpha = thetas[:, 0], thetas[:, 1]
    E = np.exp(thetas[:, 2]) if offset else np.zeros(len(thetas))
    return np.column_stack([np.exp(a + alpha * centre), alpha, E])


# --- L(N, D) = E + A/N^α + B/D^β ---

JOINT_PARAMS = ("E", "A", "alpha", "B", "beta")
NOT_CONSTRAINED = "not constrained by this grid"
# An exponent whose bootstrap CI is wider than this spans flat to steep curves (known exponents are 0.05-0.5,
# and the unconstrained ChemGPT fit gave [0, 19.5]); a floor E whose CI spans more than this ratio
# (hi / lo) is not pinned either.
MAX_EXPONENT_WIDTH = 1.0
MAX_FLOOR_RATIO = 10.0
# An axis needs 3 distinct values: with 2, any exponent fits (its scale B follows), and with 1 the term
# is a constant that merges with E, so the optimiser never moves its exponent and the bootstrap CI is a
# point that looks precise.
MIN_DISTINCT_VALUES = 3


@dataclass
class JointFit:
    """L(N, D) = E + A/N^α + B/D^β (Hoffmann et al.'s form) fitted to n_points runs, with bootstrap CIs."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float
    ci: dict[str, tuple[float, float]]  # parameter -> (lo, hi) at level ci_level
    n_points: int
    samples: np.ndarray = field(repr=False)  # (n_bootstrap, 5): E, A, alpha, B, beta of each resample
    n_dropped: int = 0
    ci_level: float = 0.95
    constrained: dict[str, bool] = field(default_factory=dict)  # parameter -> False where the grid does not pin it
    n_values: dict[str, int] = field(default_factory=dict)  # alpha/beta -> distinct N/D values, for `limits`

    def predict(self, N, D) -> np.ndarray:
        """The fitted loss of N parameters trained on D samples."""
        N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
        return self.E + self.A * N**-self.alpha + self.B * D**-self.beta

    def interval(self, name: str) -> tuple[float, float]:
        """The CI of a parameter, or NaNs where the grid does not constrain it (its bootstrap CI means nothing)."""
        return self.ci[name] if self.constrained.get(name, True) else (float("nan"), float("nan"))

    def summary(self) -> dict:
        """One table row: each parameter with its CI (NaN where not constrained, named in `note`)."""
        row = {}
        for name in JOINT_PARAMS:
            lo, hi = self.interval(name)
            row.update({name: getattr(self, name), f"{name}_lo": lo, f"{name}_hi": hi})
        loose = [name for name in JOINT_PARAMS if not self.constrained.get(name, True)]
        note = f"{', '.join(loose)}: {NOT_CONSTRAINED}" if loose else ""
        return {**row, "n_points": self.n_points, "n_dropped": self.n_dropped, "note": note}

    def limits(self, width: float = 0.3) -> list[str]:
        """Sentences, from the fit's numbers, for each exponent this grid does not pin to an interval narrower
        than `width` (issue 10's bar for the joint fit), saying why; [] when both are that narrow.

        An exponent trades off against the floor E: where E is not constrained, a lower floor with a flatter
        term fits the same points, so the exponent's interval is as wide as the floor is free."""
        out = []
        for symbol, name, axis in (("α", "alpha", "parameters N"), ("β", "beta", "training data D")):
            lo, hi = self.ci[name]
            value, distinct = getattr(self, name), self.n_values.get(name, MIN_DISTINCT_VALUES)
            if np.isnan(lo):  # said as such, not as an interval "nan wide"
                out.append(f"{symbol} = {value:.2f} has no interval: the fit ran without a bootstrap")
            elif not self.constrained.get(name, True):
                why = (f"the grid has {distinct} distinct {axis} value{'s' * (distinct != 1)}, fewer than the "
                       f"{MIN_DISTINCT_VALUES} a term needs to be shaped" if distinct < MIN_DISTINCT_VALUES else
                       f"its bootstrap interval [{lo:.2f}, {hi:.2f}] is wider than {MAX_EXPONENT_WIDTH:g}, flat to "
                       "steep curves")
                out.append(f"{symbol} = {value:.2f} is {NOT_CONSTRAINED}: {why}")
            elif not hi - lo < width:
                why = ("the floor E is not constrained and trades off against it (a lower floor with a flatter term "
                       "fits the same points)" if not self.constrained.get("E", True) else
                       f"{self.n_points} points leave the curvature along {axis} loosely pinned")
                out.append(f"{symbol} = {value:.2f} [{lo:.2f}, {hi:.2f}] is {hi - lo:.2f} wide, wider than {width:g}: "
                           f"{why}")
        return out

    def label(self) -> str:
        """Short legend text, e.g. 'α = 0.34 [0.30, 0.38], β = 0.28 [0.25, 0.31]'."""
        return ", ".join(self._label(symbol, name) for symbol, name in (("α", "alpha"), ("β", "beta")))

    def _label(self, symbol: str, name: str) -> str:
        """'α = 0.34 [0.30, 0.38]', or 'α = 0.57 (not constrained by this grid)'."""
        if self.constrained.get(name, True):
            return _label(symbol, getattr(self, name), self.ci[name])
        return f"{symbol} = {getattr(self, name):.2f} ({NOT_CONSTRAINED})"


def fit_joint(N, D, L, *, n_bootstrap: int = 1000, seed: int = 0, ci: float = 0.95) -> JointFit:
    """Fit L(N, D) = E + A/N^α + B/D^β to runs of N parameters on D samples, with bootstrap CIs.

    The starting grid is Hoffmann et al.'s (α, β in 0..2 by 0.5; six a, b and five e values,
    4,500 starts) on the data's scale; L-BFGS runs from its N_STARTS best points.
    """
    (N, D, L), n_dropped = _clean([(_name(N, "N"), N), (_name(D, "D"), D), (_name(L, "L"), L)], min_points=6)
    logs = np.column_stack([np.log(N), np.log(D)])
    centres = logs.mean(axis=0)
    theta, thetas = _fit(logs - centres, np.log(L), True, n_bootstrap, seed, min_distinct=5)
    samples = _joint_params(thetas, centres)
    best = map(float, _joint_params(theta[None], centres)[0])
    intervals = {name: _interval(samples[:, i], ci) for i, name in enumerate(JOINT_PARAMS)}
    return JointFit(*best, ci=intervals, n_points=len(L), samples=samples, n_dropped=n_dropped, ci_level=ci,
                    constrained=_constrained(intervals, len(np.unique(N)), len(np.unique(D))),
                    n_values={"alpha": len(np.unique(N)), "beta": len(np.unique(D))})


def _constrained(intervals: dict, n_sizes: int, n_data: int) -> dict[str, bool]:
    """Which joint-fit parameters the grid pins down (see MAX_EXPONENT_WIDTH, MIN_DISTINCT_VALUES).

    An exponent is not constrained when its axis has too few distinct values or its CI is not
    finite or wider than MAX_EXPONENT_WIDTH; its scale (A or B, the term's value at N or D = 1,
    an extrapolation whose CI is wide even when the fit is good) shares its exponent's verdict;
    E is not constrained when either term is not (E absorbs a term the grid cannot shape) or its
    CI spans more than MAX_FLOOR_RATIO. Without a bootstrap nothing is marked.
    """
    def narrow(lo: float, hi: float, limit: float) -> bool:
        return bool(np.isnan(lo) or (np.isfinite(lo) and np.isfinite(hi) and hi - lo <= limit))

    with np.errstate(divide="ignore"):  # a floor CI down to exp(-inf) = 0 is infinitely wide in log
        log_floor = np.log(np.array(intervals["E"], dtype=float))
    alpha = n_sizes >= MIN_DISTINCT_VALUES and narrow(*intervals["alpha"], MAX_EXPONENT_WIDTH)
    beta = n_data >= MIN_DISTINCT_VALUES and narrow(*intervals["beta"], MAX_EXPONENT_WIDTH)
    floor = alpha and beta and narrow(*log_floor, np.log(MAX_FLOOR_RATIO))
    return {"E": floor, "A": alpha, "alpha": alpha, "B": beta, "beta": beta}


def _joint_params(thetas: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """(S, 5) columns E, A, alpha, B, beta from centred log-space parameters [a, α, b, β, e]."""
    a, alpha, b, beta, e = thetas.T
    with np.errstate(over="ignore"):  # a degenerate bootstrap sample may send A or B to inf: an unbounded CI
        return np.column_stack([np.exp(e), np.exp(a + alpha * centres[0]), alpha, np.exp(b + beta * centres[1]), beta])


# --- many fits, and the compute-optimal frontier ---

def _key(value):
    """A plain Python scalar for a group key (numpy int64 -> int), so tables and legends print cleanly."""
    return value.item() if isinstance(value, np.generic) else value


def fit_groups(df: pd.DataFrame, x: str, y: str, by: str, **kw) -> dict:
    """One fit_power_law of y against x per value of column `by`, keyed by that value.

    A group with too few points with a loss is skipped with a warning (a failed run should not
    stop the notebook); every other bad input still raises.
    """
    min_points = 4 if kw.get("offset") else 3
    fits = {}
    for value, group in df.groupby(by, sort=True):
        n_valid = int(np.isfinite(group[y].to_numpy(dtype=float)).sum())
        if n_valid < min_points:
            warnings.warn(f"{y} against {x} at {by} = {_key(value)}: not fitted, {n_valid} point(s) with a finite "
                          f"loss and a fit needs at least {min_points}", stacklevel=2)
            continue
        fits[_key(value)] = fit_power_law(group[x], group[y], **kw)
    return fits


def fit_or_skip(what: str, fit, *args, **kw):
    """`fit(*args, **kw)`, or None with one sentence (a warning) when there are too few points for it.

    A small grid (two values on an axis, or runs that failed) then loses that fit, not the
    notebook: `joint = scaling.fit_or_skip("joint fit L(N, D)", scaling.fit_joint, N, D, L)`.
    """
    try:
        return fit(*args, **kw)
    except TooFewPoints as e:
        warnings.warn(f"{what}: not fitted: {e}", stacklevel=2)
        return None


def exponents_table(fits: dict) -> pd.DataFrame:
    """One row per exponent of the named fits (columns fit, alpha, alpha_lo, alpha_hi), for `plots.exponent_plot`.

    A PowerLawFit gives its α; a JointFit two rows, 'name: α' and 'name: β' (an exponent the grid
    does not constrain gets no interval and says so in its name, which `plots.exponent_plot` prints
    beside it, instead of an error bar to 19.5); a None (a fit that
    `fit_or_skip` skipped) gives none, so the table holds what could be fitted.
    """
    rows = []
    for name, fit in fits.items():
        if isinstance(fit, JointFit):
            for symbol, param in (("α", "alpha"), ("β", "beta")):
                note = "" if fit.constrained.get(param, True) else f" ({NOT_CONSTRAINED})"
                lo, hi = fit.interval(param)
                rows.append({"fit": f"{name}: {symbol}{note}", "alpha": getattr(fit, param), "alpha_lo": lo,
                             "alpha_hi": hi})
        elif fit is not None:
            lo, hi = fit.ci.get("alpha", (float("nan"), float("nan")))
            rows.append({"fit": name, "alpha": fit.alpha, "alpha_lo": lo, "alpha_hi": hi})
    return pd.DataFrame(rows, columns=["fit", "alpha", "alpha_lo", "alpha_hi"])


def fits_table(fits: dict, name: str = "group") -> pd.DataFrame:
    """The fits of fit_groups as a tidy table: one row per group with its exponent, CI, A and E."""
    columns = [name, "alpha", "alpha_lo", "alpha_hi", "A", "E", "n_points", "x_min", "x_max"]
    rows = [{name: value, **fit.summary()} for value, fit in fits.items()]
    return pd.DataFrame(rows, columns=columns)


FRONTIER_BINS = 8


def compute_optimal_frontier(df: pd.DataFrame, compute: str = "flops", loss: str = "val_loss",
                             n_bins: int | None = FRONTIER_BINS) -> pd.DataFrame:
    """The rows (of any run) whose loss no row reached with less or equal compute, by increasing compute.

    `df` holds every evaluation of every run (e.g. sweep.curves), so the result keeps each
    point's run_id and config columns. The frontier is thinned to its lowest point in each of
    n_bins log-spaced compute bins (n_bins=None keeps every point): consecutive evaluations of
    one run are strongly correlated, so ~60 raw frontier points fitted as independent give an
    interval several times too narrow, while a few points per decade of compute, mostly from
    different runs, are close to independent and let the fit's interval reflect what was measured.
    """
    points = df.dropna(subset=[compute, loss])
    points = points[points[compute] > 0].sort_values([compute, loss], kind="stable")
    losses = points[loss].to_numpy(dtype=float)
    best_before = np.concatenate([[np.inf], np.minimum.accumulate(losses)[:-1]])
    frontier = points[losses < best_before]
    if n_bins and len(frontier):
        frontier = _thin(frontier, compute, n_bins)
    return frontier.reset_index(drop=True)


def _thin(frontier: pd.DataFrame, compute: str, n_bins: int) -> pd.DataFrame:
    """The last (lowest-loss) frontier row in each log-spaced compute bin."""
    log_c = np.log(frontier[compute].to_numpy(dtype=float))
    edges = np.linspace(log_c.min(), log_c.max(), n_bins + 1)
    bins = np.clip(np.searchsorted(edges, log_c, side="right") - 1, 0, n_bins - 1)
    last_in_bin = np.append(bins[1:] != bins[:-1], True)
    return frontier[last_in_bin]


def compare_exponents(table: pd.DataFrame, group: str, better: str, than: str, value: str = "alpha",
                      name: str = "fit") -> str:
    """One sentence: do the `better` rows' exponents exceed the `than` rows', judged by their CIs?

    "Clearly" needs every `better` interval above every `than` interval; "partly" names the
    `better` rows whose interval is above and those whose interval overlaps; otherwise the
    intervals overlap and the data cannot tell the groups apart.
    """
    a, b = table[table[group] == better], table[table[group] == than]
    if a.empty or b.empty:
        return f"no {better} or no {than} fits to compare"
    fmt = lambda rows: ", ".join(f"{r[name]} {r[value]:.2f} [{r[value + '_lo']:.2f}, {r[value + '_hi']:.2f}]"  # noqa: E731
                                 for _, r in rows.iterrows())
    above = a[a[f"{value}_lo"] > b[f"{value}_hi"].max()]
    if len(above) == len(a):
        verdict = f"yes: the {better} models' exponents are clearly larger"
    elif len(above):
        rest = a.drop(above.index)
        verdict = (f"partly: {', '.join(above[name])} clearly (its interval lies above every {than} one), "
                   f"{', '.join(rest[name])} not (the intervals overlap)")
    elif a[value].mean() > b[value].mean():
        verdict = f"only by the point estimates: the {better} exponents are larger, but the intervals overlap"
    else:
        verdict = f"no: the {better} exponents are not larger here"
    return f"Do {better} models scale better with data than {than} ones? {verdict} ({better}: {fmt(a)}; {than}: {fmt(b)})"


EXPONENTS_FILE = "exponents.csv"  # runs/<study>/exponents.csv: a study's exponents, for `against` in a later one


def save_exponents(table: pd.DataFrame, study: str, root=None) -> Path:
    """Write an `exponents_table` to RUNS/<study>/exponents.csv (atomically), for another study to compare with."""
    from chemscale import paths
    from chemscale.config import atomic_write_text

    path = Path(root or paths.RUNS) / study / EXPONENTS_FILE
    atomic_write_text(path, table.to_csv(index=False, float_format="%.6g"))
    return path


def read_exponents(study: str, root=None) -> pd.DataFrame:
    """The exponents table that `save_exponents` wrote for `study`; a clear error if it is missing or not one."""
    from chemscale import paths
    from chemscale.config import ConfigError

    path = Path(root or paths.RUNS) / study / EXPONENTS_FILE
    if not path.is_file():
        raise ConfigError(f"{path}: no such file. The study {study!r} has not been run to its exponents with this "
                          f"runs folder; run its notebook first (e.g. python -m chemscale.study --profile cpu "
                          f"01_chemgpt_scaling for cpu_chemgpt), or set compare_with to a study that has")
    try:
        table = pd.read_csv(path)
    except (ValueError, pd.errors.ParserError) as e:
        raise ConfigError(f"{path}: not an exponents table ({str(e).splitlines()[0]})") from None
    missing = {"fit", "alpha", "alpha_lo", "alpha_hi"} - set(table.columns)
    if missing:
        raise ConfigError(f"{path}: not an exponents table, it lacks the column(s) {sorted(missing)}")
    return table


def _fit_name(name: str) -> str:
    """A fit's name without the joint fit's 'not constrained' note, so the same exponent matches across studies."""
    return name.replace(f" ({NOT_CONSTRAINED})", "")


def against(table: pd.DataFrame, other: pd.DataFrame, other_name: str) -> pd.DataFrame:
    """Each exponent of `table` beside the same fit's exponent in `other` (e.g. a bf16 study against its fp32 twin),
    with a verdict: 'inside' or 'outside' the other's 95% interval, 'no interval in OTHER' where the other fit's
    exponent is not constrained, 'not fitted in OTHER' where the other study has no such fit."""
    other = other.assign(key=other["fit"].map(_fit_name)).set_index("key")
    rows = []
    for _, r in table.iterrows():
        key = _fit_name(r["fit"])
        row = {"fit": key, "alpha": r["alpha"], f"alpha_{other_name}": np.nan,
               f"lo_{other_name}": np.nan, f"hi_{other_name}": np.nan}
        if key not in other.index:
            verdict = f"not fitted in {other_name}"
        else:
            o = other.loc[key]
            row.update({f"alpha_{other_name}": o["alpha"], f"lo_{other_name}": o["alpha_lo"],
                        f"hi_{other_name}": o["alpha_hi"]})
            if not (np.isfinite(o["alpha_lo"]) and np.isfinite(o["alpha_hi"])):
                verdict = f"no interval in {other_name}"
            else:
                verdict = "inside" if o["alpha_lo"] <= r["alpha"] <= o["alpha_hi"] else "outside"
        rows.append({**row, "verdict": verdict})
    return pd.DataFrame(rows)


def against_summary(comparison: pd.DataFrame, other_name: str) -> str:
    """One sentence from an `against` table: how many exponents lie inside the other study's intervals."""
    judged = comparison[comparison["verdict"].isin(["inside", "outside"])]
    outside = judged[judged["verdict"] == "outside"]
    text = f"{len(judged) - len(outside)} of {len(judged)} exponents lie inside {other_name}'s 95% intervals"
    if len(outside):
        text += "; outside: " + ", ".join(f"{r.fit} {r.alpha:.3f}" for r in outside.itertuples())
    if len(judged) < len(comparison):
        text += f" ({len(comparison) - len(judged)} not judged: no interval or no such fit in {other_name})"
    return text
