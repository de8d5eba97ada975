"""Training Performance Estimation (TPE): rank configurations by how fast they train, from the first
part of their budget, so a hyperparameter search need not train every configuration to the end.

The estimators generalise the training speed estimator of Ru et al., "Speedy Performance Estimation
for Neural Architecture Search" (NeurIPS 2021), as Frey et al., "Neural scaling of deep chemical
models" (Nature Machine Intelligence 2023) used it for ChemGPT and force fields. Neither's code is
used here; the definitions below are this module's own and each is pinned by its formula.

What an "epoch" is here. The runner trains for steps, not epochs, and configurations differ in
batch size, so an epoch counted in steps would give a batch-32 run twice as many epochs as a
batch-64 run at the same compute, and a sum over epochs would mean different things for the two.
Every quantity here is therefore counted in *examples* (molecules or structures) seen:

    x(s) = s · B                 examples seen after optimizer step s, B = batch_size · devices · num_nodes

and an epoch is a *window* of W examples (by default the size of the training set, the literal
epoch). Step s belongs to window w(s) = ⌈x(s) / W⌉ (the window in which the step ends). At a budget
of X examples a run has T = ⌊X / W⌋ complete windows, built from the steps s ≤ ⌊X / B⌋ with
w(s) ≤ T; the mean training loss of window w is m_w, the mean of the per-step training losses of
its steps. Every estimator below reads the same m_1 … m_T, so none reaches past window T.

The budget X is the same for every configuration compared: either given in examples, or a
fraction f of the runs' common budget, f · max_steps · B (refused when the runs' budgets differ,
since a fraction of different budgets is not equal compute). Compute spent by a search is counted
in FLOPs (the metrics' flops column, interpolated between validations), measured training seconds
(scaled by the fraction of steps trained) or examples.

Notebook 03 runs a study with the last part of this module: `validate_every_window` makes a grid's
runs validate at the end of every window (the same examples seen in every run), and
`agreement_table`, `hardness`, `search_table`, `pruner_table` (Optuna's pruners replayed from the
recorded curves by `replay_pruner`), `summary`, `verify_study` and the three figures turn the finished
runs into its tables, its comparison with the paper's claim and its closing checks.
"""

from __future__ import annotations

import copy
import csv
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from chemscale import runs
from chemscale.config import ConfigError

UNITS = ("flops", "seconds", "examples")


class CurveError(ConfigError):
    """A run's metrics.csv cannot give a curve: truncated, steps missing or repeated, NaN losses."""


class NotEnoughData(CurveError):
    """A run's curve is too short for what was asked (fewer windows, or no validation yet)."""


@dataclass(frozen=True)
class Curve:
    """One run's per-step training losses and validations, with what its compute is counted in.

    `train_loss[s - 1]` is the training loss of optimizer step s (s = 1 … len); `val_steps` and
    `val_loss` are the validations; `flops_steps`/`flops` the cumulative FLOPs logged at them.
    `final` is the ground truth a search is judged by (result.json's best_val_loss), `seconds` the
    run's measured training seconds over `steps_done` steps; both None for an unfinished run.
    """

    name: str
    train_loss: np.ndarray
    batch: int
    max_steps: int
    val_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    val_loss: np.ndarray = field(default_factory=lambda: np.zeros(0))
    flops_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    flops: np.ndarray = field(default_factory=lambda: np.zeros(0))
    final: float | None = None
    seconds: float | None = None
    train_size: int | None = None

    @property
    def steps_done(self) -> int:
        return len(self.train_loss)

    @property
    def budget(self) -> int:
        """The run's whole budget in examples: max_steps · B."""
        return self.max_steps * self.batch

    def step_at(self, examples: float) -> int:
        """The last optimizer step whose examples fit in `examples`: ⌊X / B⌋."""
        return int(math.floor(examples / self.batch + 1e-9))

    def cost(self, step: int, unit: str) -> float:
        """Compute spent by training this run to `step`, in `unit` (one of UNITS).

        flops: the metrics' cumulative flops column, linear between logged points (0 at step 0);
        seconds: train_seconds · step / steps_done; examples: step · B.
        """
        if step > self.steps_done:
            raise NotEnoughData(f"{self.name}: trained {self.steps_done} steps, cost asked at step {step}")
        if unit == "examples":
            return float(step * self.batch)
        if unit == "seconds":
            if self.seconds is None:
                raise NotEnoughData(f"{self.name}: no train_seconds (no result.json): cannot count compute in seconds")
            return self.seconds * step / self.steps_done
        if unit == "flops":
            if not len(self.flops) or step > self.flops_steps[-1]:
                last = int(self.flops_steps[-1]) if len(self.flops) else 0
                raise NotEnoughData(f"{self.name}: FLOPs logged up to step {last}, asked at step {step}")
            return float(np.interp(step, np.r_[0, self.flops_steps], np.r_[0.0, self.flops]))
        raise ConfigError(f"compute unit {unit!r}: expected one of {UNITS}")


def read_curve(run_dir: str | Path, metric: str = "best_val_loss") -> Curve:
    """A run folder's curve: metrics.csv checked whole, with config.json and (if finished) result.json,
    whose `metric` is the curve's `final` (the ground truth a ranking is judged by).

    Refused with `CurveError` naming the folder: a row cut short, training steps that are not
    1 … S each once, a NaN or infinite loss, fewer training steps than result.json says ran, or a
    finished run whose result.json has no finite `metric`.
    """
    run_dir = Path(run_dir)
    config = runs.read_config(run_dir)
    result = runs.read_result(run_dir)
    rows = _metrics_rows(run_dir / runs.METRICS)
    train = [(int(r["step"]), _loss(r, "train_loss", run_dir)) for r in rows if r["train_loss"]]
    steps = [s for s, _ in train]
    if steps != list(range(1, len(steps) + 1)):
        missing = sorted(set(range(1, max(steps, default=0) + 1)) - set(steps))
        what = f"missing steps {missing[0]}-{missing[-1]}" if missing else "a step logged twice"
        raise CurveError(f"{run_dir}: metrics.csv has no single training loss for every step ({what})")
    if result is not None and result.get("steps", 0) > len(steps):
        raise CurveError(f"{run_dir}: metrics.csv is truncated: result.json says {result['steps']} steps ran, "
                         f"the file holds {len(steps)}")
    val = [(int(r["step"]), _loss(r, "val_loss", run_dir)) for r in rows if r["val_loss"]]
    logged = [(int(r["step"]), _loss(r, "flops", run_dir)) for r in rows if r.get("flops")]
    tcfg = config.get("train", {})
    lacking = [k for k in ("batch_size", "devices", "num_nodes", "max_steps") if k not in tcfg]
    if lacking:
        raise CurveError(f"{run_dir}: config.json's train section lacks {lacking} (written by an older chemscale?)")
    # The training set actually used (result.json), else the one asked for (config.json): one epoch.
    sizes = [src.get(k) for src in (result or {}, config.get("data", {}))
             for k in ("n_train_molecules", "n_train_structures")]
    result = result or {}
    value = result.get(metric)
    finite = isinstance(value, (int, float)) and math.isfinite(value)
    if result and result.get("status", "finished") == "finished" and not finite:
        raise CurveError(f"{run_dir}: result.json has no finite {metric!r} ({value!r}) to rank against")
    return Curve(
        name=str(run_dir),
        train_loss=np.array([v for _, v in train], dtype=float),
        batch=tcfg["batch_size"] * tcfg["devices"] * tcfg["num_nodes"],
        max_steps=tcfg["max_steps"],
        val_steps=np.array([s for s, _ in val], dtype=int),
        val_loss=np.array([v for _, v in val], dtype=float),
        flops_steps=np.array([s for s, _ in logged], dtype=int),
        flops=np.array([v for _, v in logged], dtype=float),
        final=value,
        seconds=result.get("train_seconds"),
        train_size=next((n for n in sizes if n is not None), None),
    )


def _metrics_rows(path: Path) -> list[dict]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = [runs.METRICS_RENAMED.get(c, c) for c in reader.fieldnames or ()]
            rows = list(reader)
    except FileNotFoundError:
        raise CurveError(f"{path.parent}: no metrics.csv in this run folder") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise CurveError(f"{path}: not a metrics file ({type(e).__name__}: {e})") from None
    lacking = {"step", "train_loss", "val_loss"} - set(header)
    if lacking:
        raise CurveError(f"{path}: no column {', '.join(sorted(lacking))} in the header {','.join(header) or '(none)'}")
    for i, row in enumerate(rows):
        if None in row or None in row.values() or not (row["step"] or "").isdigit():
            raise CurveError(f"{path}: row {i + 2} is cut short or malformed (a truncated file?)")
    return [{runs.METRICS_RENAMED.get(k, k): v for k, v in r.items()} for r in rows]


def _loss(row: dict, key: str, run_dir: Path) -> float:
    try:
        value = float(row[key])
    except ValueError:  # a garbled cell: name the run and the row, not only the text float() saw
        raise CurveError(f"{run_dir}: {key} is {row[key]!r} at step {row['step']}, not a number") from None
    if not math.isfinite(value):
        raise CurveError(f"{run_dir}: {key} is {value} at step {row['step']}; a curve with a non-finite loss "
                         "cannot be ranked (did the run diverge?)")
    return value


def read_curves(run_dirs: Sequence[str | Path], metric: str = "best_val_loss") -> list[Curve]:
    return [read_curve(d, metric) for d in run_dirs]


# ---- the budget and the windows ----------------------------------------------------------------------

def budget(curves: Sequence[Curve], fraction: float | None = None, examples: float | None = None) -> float:
    """The examples budget X at which `curves` are compared: `examples`, or f · their common max_steps · B.

    Refused (`ConfigError`) without either, with both, or for a fraction of budgets that differ
    (runs of different lengths): a fraction of each run's own budget would not be equal compute.
    """
    if (fraction is None) == (examples is None):
        raise ConfigError("give the budget as either fraction= (of the runs' common budget) or examples=, not "
                          f"{'both' if fraction is not None else 'neither'}")
    if examples is not None:
        if not (examples > 0 and math.isfinite(examples)):
            raise ConfigError(f"examples budget must be a finite number > 0, got {examples}")
        return float(examples)
    if not 0 < fraction <= 1:
        raise ConfigError(f"budget fraction must be in (0, 1], got {fraction}")
    whole = {c.budget for c in curves}
    if len(whole) != 1:
        raise ConfigError(f"the runs have different budgets (max_steps x batch: {sorted(whole)} examples), so a "
                          "fraction of each is not equal compute: give the budget as examples= instead")
    return fraction * whole.pop()


def window_size(curves: Sequence[Curve], window: int | None = None) -> int:
    """The window W in examples: `window`, or the runs' common training-set size (one epoch)."""
    if window is not None:
        if window < 1:
            raise ConfigError(f"window must be >= 1 example, got {window}")
        return int(window)
    sizes = {c.train_size for c in curves}
    if len(sizes) != 1 or None in sizes:
        raise ConfigError(f"the runs' training sets differ or are unknown ({sorted(map(str, sizes))}): give the "
                          "window in examples")
    return int(sizes.pop())


def window_means(curve: Curve, window: int, examples: float) -> np.ndarray:
    """m_1 … m_T: the mean training loss of each complete window of `window` examples within `examples`.

    T = ⌊X / W⌋; step s (s ≤ ⌊X / B⌋) is in window ⌈s·B / W⌉. `NotEnoughData` when T = 0 or the run
    has not logged the steps the budget needs; `ConfigError` when W < B (a window without a step).
    """
    if window < curve.batch:
        raise ConfigError(f"window of {window} examples is smaller than {curve.name}'s batch of {curve.batch}: "
                          "some windows would hold no step")
    t = int(math.floor(examples / window + 1e-9))
    if t < 1:
        raise NotEnoughData(f"{curve.name}: a budget of {examples:g} examples holds no complete window of {window}")
    last = curve.step_at(t * window)
    if last > curve.steps_done:
        raise NotEnoughData(f"{curve.name}: {t} windows of {window} examples need {last} steps, the run logged "
                            f"{curve.steps_done}")
    steps = np.arange(1, last + 1)
    which = np.ceil(steps * curve.batch / window - 1e-9).astype(int)
    sums = np.bincount(which - 1, weights=curve.train_loss[:last], minlength=t)[:t]
    counts = np.bincount(which - 1, minlength=t)[:t]
    return sums / counts


# ---- the estimators, on one window set m_1 … m_T (lower is better) ------------------------------------

def tse(means: np.ndarray) -> float:
    """TSE = Σ_{w=1..T} m_w: the training losses summed over the whole window set."""
    return float(np.sum(_checked(means, 1)))


def tse_e(means: np.ndarray, e: int = 1) -> float:
    """TSE-E = Σ_{w=T-E+1..T} m_w: the last E windows of the same set (Ru et al. found E = 1 best)."""
    return float(np.sum(_checked(means, e)[len(means) - e:]))


GAMMA = 0.9  # TSE-EMA's weight, Ru et al.'s


def tse_ema(means: np.ndarray, gamma: float = GAMMA) -> float:
    """TSE-EMA = Σ_{w=1..T} γ^(T-w) · m_w, 0 < γ ≤ 1: the set weighted towards its last windows.

    This is Ru et al.'s formula as written in their paper (γ = 0.9 there), not normalised by Σ γ^(T-w)
    as their code's moving average is; γ = 1 gives TSE.
    """
    if not 0 < gamma <= 1:
        raise ConfigError(f"gamma must be in (0, 1], got {gamma}")
    means = _checked(means, 1)
    return float(np.sum(gamma ** np.arange(len(means) - 1, -1, -1) * means))


def _checked(means: np.ndarray, need: int) -> np.ndarray:
    means = np.asarray(means, dtype=float)
    if need < 1:
        raise ConfigError(f"the number of windows to sum must be >= 1, got {need}")
    if len(means) < need:
        raise NotEnoughData(f"{len(means)} windows, {need} needed")
    return means


ESTIMATORS: dict[str, Callable[..., float]] = {"TSE": tse, "TSE-E": tse_e, "TSE-EMA": tse_ema}


def val_loss_at(curve: Curve, examples: float) -> float:
    """The baseline: the last validation loss logged at or before X examples (step ≤ ⌊X / B⌋)."""
    seen = curve.val_steps <= curve.step_at(examples)
    if not seen.any():
        raise NotEnoughData(f"{curve.name}: no validation within {examples:g} examples")
    return float(curve.val_loss[seen][-1])


def estimates(curves: Sequence[Curve], estimator: str = "TSE-E", *, fraction: float | None = None,
              examples: float | None = None, window: int | None = None, **options) -> np.ndarray:
    """Each curve's `estimator` value at one budget: a name in ESTIMATORS (with its options, e.g. e=1,
    gamma=0.9) on one window set, or "val" for the validation-loss baseline. Lower ranks better.

    An `NotEnoughData` for one run names that run, and says how many windows it had.
    """
    x = budget(curves, fraction, examples)
    if estimator == "val":
        return np.array([val_loss_at(c, x) for c in curves])
    if estimator not in ESTIMATORS:
        raise ConfigError(f"estimator {estimator!r}: expected one of {[*ESTIMATORS, 'val']}")
    w = window_size(curves, window)
    out = []
    for c in curves:
        means = window_means(c, w, x)
        try:
            out.append(ESTIMATORS[estimator](means, **options))
        except NotEnoughData as e:
            raise NotEnoughData(f"{c.name}: {estimator} at {x:g} examples: {e}") from None
    return np.array(out)


# ---- rank agreement -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Agreement:
    """Spearman ρ and Kendall τ (τ-b) with percentile bootstrap intervals over configurations."""

    rho: float
    rho_interval: tuple[float, float]
    tau: float
    tau_interval: tuple[float, float]
    n: int


def rank_agreement(predicted: Sequence[float], truth: Sequence[float], n_boot: int = 2000, level: float = 0.95,
                   seed: int = 0) -> Agreement:
    """How well `predicted` orders the configurations as `truth` (e.g. final losses) does.

    ρ = Pearson correlation of the ranks; τ-b = (concordant - discordant pairs) / √(untied pairs in
    each). The interval resamples configurations with replacement `n_boot` times; resamples in
    which either side is constant have no correlation and are left out.
    """
    from scipy import stats

    if n_boot < 1 or not 0 < level < 1:
        raise ConfigError(f"rank agreement needs n_boot >= 1 and level in (0, 1), got {n_boot} and {level}")
    p, t = np.asarray(predicted, dtype=float), np.asarray(truth, dtype=float)
    if p.shape != t.shape or p.ndim != 1 or len(p) < 3:
        raise ConfigError(f"rank agreement needs two equal-length lists of >= 3 values, got {p.shape} and {t.shape}")
    if not (np.isfinite(p).all() and np.isfinite(t).all()):
        raise ConfigError("rank agreement of non-finite values: a NaN would be ranked silently")
    if np.ptp(p) == 0 or np.ptp(t) == 0:
        raise ConfigError("rank agreement with a constant list: every configuration ties, no correlation exists")
    idx = np.random.default_rng(seed).integers(0, len(p), size=(n_boot, len(p)))
    rhos, taus = _spearman(p[idx], t[idx]), _kendall_b(p[idx], t[idx])
    varied = np.isfinite(rhos)
    q = [(1 - level) / 2, (1 + level) / 2]
    rho_interval, tau_interval = (tuple(map(float, np.quantile(v[varied], q))) for v in (rhos, taus))
    return Agreement(rho=float(stats.spearmanr(p, t).statistic), rho_interval=rho_interval,
                     tau=float(stats.kendalltau(p, t).statistic), tau_interval=tau_interval, n=len(p))


def _spearman(p: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Row-wise Spearman ρ (ties ranked by their mean) of 2-D arrays; NaN for a constant row."""
    from scipy import stats

    rp, rt = (stats.rankdata(a, axis=1) for a in (p, t))
    rp, rt = rp - rp.mean(axis=1, keepdims=True), rt - rt.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rp * rt).sum(axis=1) / np.sqrt((rp ** 2).sum(axis=1) * (rt ** 2).sum(axis=1))


def _kendall_b(p: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Row-wise Kendall τ-b of 2-D arrays: Σ sign(Δp)·sign(Δt) / √(Σ sign(Δp)² · Σ sign(Δt)²), over pairs."""
    sp, st = (np.sign(a[:, :, None] - a[:, None, :]) for a in (p, t))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sp * st).sum(axis=(1, 2)) / np.sqrt((sp ** 2).sum(axis=(1, 2)) * (st ** 2).sum(axis=(1, 2)))


# ---- searches replayed from recorded runs ---------------------------------------------------------------

@dataclass(frozen=True)
class Search:
    """A search's outcome: the chosen run, the compute it spent and the whole grid's, and its regret."""

    method: str
    chosen: int
    run: str
    spent: float
    grid: float
    regret: float

    @property
    def saved(self) -> float:
        """1 - spent / grid: the share of training every configuration to the end that was not spent."""
        return 1 - self.spent / self.grid


def regret(finals: Sequence[float], chosen: int) -> float:
    """final[chosen] - min(final): how much worse the chosen configuration ends than the best one."""
    finals = np.asarray(finals, dtype=float)
    return float(finals[chosen] - finals.min())


def _finals(curves: Sequence[Curve]) -> np.ndarray:
    missing = [c.name for c in curves if c.final is None]
    if missing:
        raise NotEnoughData(f"no final loss (result.json) for {missing}: a replayed search needs every run finished")
    return np.array([c.final for c in curves], dtype=float)


def _search(method: str, curves: Sequence[Curve], reached: dict[int, int], candidates: Sequence[int],
            unit: str) -> Search:
    """The outcome when run i was trained to step reached[i] and the best final among `candidates` is chosen."""
    finals = _finals(curves)
    chosen = min(candidates, key=lambda i: finals[i])
    spent = sum(curves[i].cost(s, unit) for i, s in reached.items())
    grid = sum(c.cost(c.steps_done, unit) for c in curves)
    return Search(method, chosen, curves[chosen].name, spent, grid, regret(finals, chosen))


def tpe_search(curves: Sequence[Curve], estimator: str = "TSE-E", *, top_k: int = 1, unit: str = "flops",
               fraction: float | None = None, examples: float | None = None, window: int | None = None,
               **options) -> Search:
    """Train every configuration to the budget, rank by `estimator`, train the top k to their end,
    keep the best of those by final loss.

    spent = Σ_i cost_i(X) + Σ_{i in top k} (cost_i(end) - cost_i(X)); for N equal runs that is
    N·f + k·(1 - f) runs' worth (10 runs, f = 0.1, k = 1: 1.9 of 10, 81% saved).
    """
    if not 1 <= top_k <= len(curves):
        raise ConfigError(f"top_k must be in 1 … {len(curves)}, got {top_k}")
    values = estimates(curves, estimator, fraction=fraction, examples=examples, window=window, **options)
    x = budget(curves, fraction, examples)
    top = [int(i) for i in np.argsort(values, kind="stable")[:top_k]]
    reached = {i: c.step_at(x) for i, c in enumerate(curves)} | {i: curves[i].steps_done for i in top}
    return _search(f"TPE ({estimator}, top {top_k})", curves, reached, top, unit)


def successive_halving(curves: Sequence[Curve], *, eta: int = 3, min_fraction: float | None = None,
                       unit: str = "flops", examples: float | None = None) -> Search:
    """Successive halving on validation loss: all start, the best 1/η go on to η times the budget.

    Rung i trains the survivors to f_i = min_fraction · η^i of the full budget (each resuming where
    it stopped) and keeps the ⌊n_i / η⌋ (at least 1) with the lowest validation loss at f_i; a
    sole survivor, or the rung reaching f = 1, is trained to its end and the best final is kept.
    min_fraction defaults to η^-⌊log_η N⌋ (N = 9, η = 3: rungs 1/9, 1/3, 1; 9·1/9 + 2·1/3 + 1·1 =
    7/3 of 9 runs' worth spent). The full budget is `examples`, or the runs' common one.
    """
    if not (isinstance(eta, (int, np.integer)) and eta >= 2):
        raise ConfigError(f"eta must be a whole number >= 2 (survivors are a 1/eta share), got {eta!r}")
    if min_fraction is not None and not 0 < min_fraction <= 1:
        raise ConfigError(f"min_fraction must be in (0, 1], got {min_fraction}")
    n = len(curves)
    rungs = int(math.floor(math.log(n, eta) + 1e-9))
    min_fraction = eta ** -rungs if min_fraction is None else min_fraction
    alive, reached, level = list(range(n)), {}, 0
    while True:
        f = min_fraction * eta ** level
        if f >= 1 - 1e-9 or len(alive) == 1:
            reached |= {i: curves[i].steps_done for i in alive}
            return _search(f"successive halving (eta {eta})", curves, reached, alive, unit)
        x = budget(curves, fraction=f) if examples is None else f * examples
        reached |= {i: curves[i].step_at(x) for i in alive}
        loss = {i: val_loss_at(curves[i], x) for i in alive}
        alive = sorted(alive, key=lambda i: loss[i])[:max(1, len(alive) // eta)]
        level += 1


def random_search(curves: Sequence[Curve], spend: float, *, unit: str = "flops", seed: int = 0) -> Search:
    """Random search at a given compute: configurations in a random order, each trained to its end, while
    the compute spent stays within `spend` (the first always trains); the best final of those is kept.

    Its regret is a random variable: average `regret` over seeds to compare with a deterministic search.
    """
    order = np.random.default_rng(seed).permutation(len(curves))
    reached, total = {}, 0.0
    for i in map(int, order):
        cost = curves[i].cost(curves[i].steps_done, unit)
        if reached and total + cost > spend * (1 + 1e-9):
            break
        reached[i], total = curves[i].steps_done, total + cost
    return _search("random search", curves, reached, list(reached), unit)


# ---- the Optuna pruner --------------------------------------------------------------------------------

def tse_pruner(window: int, *, estimator: str = "TSE-E", top_k: int | None = 1, percentile: float | None = None,
               min_windows: int = 1, min_trials: int = 2, **options):
    """An Optuna pruner that prunes a trial whose estimator is worse than the other trials' at the same compute.

    Report each training step's loss with `trial.report(loss, step)`, where `step` (from 1) counts compute in
    one unit for every trial: the examples seen (s · B) when batch sizes differ, or the optimizer
    step when they do not. The pruner builds the trial's windows of `window` such steps (window
    w holds the reports with ⌈step / window⌉ = w), takes its T complete windows, and compares its
    `estimator` (TSE, TSE-E, TSE-EMA, with `options` such as e=1) with the same estimator at the
    same T of every completed or running trial that got that far; it prunes when at least `top_k`
    of them are strictly better, or (with `percentile` instead) when it is worse than that
    percentile of them. Nothing is pruned before `min_windows` windows or with fewer than
    `min_trials` trials to compare with; a NaN loss is pruned at once.

        study = optuna.create_study(pruner=chemscale.tpe.tse_pruner(window=3000, top_k=3))

    Optuna is an optional extra: an ImportError here says how to install it.
    """
    if (top_k is None) == (percentile is None):
        raise ConfigError("give the pruner either top_k= or percentile=, not both or neither")
    if estimator not in ESTIMATORS:
        raise ConfigError(f"estimator {estimator!r}: expected one of {list(ESTIMATORS)}")
    if window < 1 or min_windows < 1 or min_trials < 1 or (top_k is not None and top_k < 1) or \
            (percentile is not None and not 0 < percentile < 100):
        raise ConfigError("window, min_windows, min_trials and top_k must be >= 1, percentile in (0, 100)")
    return _pruner_class()(window, ESTIMATORS[estimator], top_k, percentile, min_windows, min_trials, options)


@functools.cache
def _pruner_class():
    try:
        import optuna
    except ImportError:
        raise ImportError("chemscale.tpe.tse_pruner needs Optuna, an optional extra: pip install 'optuna>=5'") from None

    class TSEPruner(optuna.pruners.BasePruner):
        """See `chemscale.tpe.tse_pruner`."""

        def __init__(self, window, estimator, top_k, percentile, min_windows, min_trials, options):
            self.window, self.estimator, self.options = window, estimator, options
            self.top_k, self.percentile = top_k, percentile
            self.min_windows, self.min_trials = min_windows, min_trials
            self._values = {}  # (study, trial, start, t) -> estimator over windows 1 … t: fixed once t is reached

        def prune(self, study, trial) -> bool:
            values = trial.intermediate_values
            if not values:
                return False
            if any(math.isnan(v) for v in values.values()):
                return True
            t = int(max(values) // self.window)
            mine = self._reached(study, trial, t) if t >= self.min_windows else None
            if mine is None:
                return False
            states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING)
            others = [v for o in study.get_trials(deepcopy=False, states=states)
                      if o.number != trial.number and (v := self._reached(study, o, t)) is not None]
            if len(others) < self.min_trials:
                return False
            if self.top_k is not None:
                return sum(v < mine for v in others) >= self.top_k
            return bool(mine > np.percentile(others, self.percentile))

        def _reached(self, study, trial, t: int) -> float | None:
            """`_value` of a trial that reported up to window t, else None; kept, as windows 1 … t of a trial
            that got past them do not change: without it every report re-read every trial's reports, and a
            search of n trials of S reports each spent time in n·S² (12 trials of 2,000 steps: 54 s)."""
            key = (study.study_name, trial.number, trial.datetime_start, t)
            if key not in self._values:
                if max(trial.intermediate_values, default=0) < t * self.window:
                    return None
                self._values[key] = self._value(trial.intermediate_values, t)
            return self._values[key]

        def _value(self, values: dict, t: int) -> float | None:
            """The estimator over windows 1 … t of one trial's reports; None if a window has no report."""
            steps = np.array([s for s in values if 0 < s <= t * self.window])
            if t < 1 or not len(steps):
                return None
            which = np.ceil(steps / self.window).astype(int)
            counts = np.bincount(which - 1, minlength=t)
            if (counts == 0).any():
                return None
            means = np.bincount(which - 1, weights=[values[s] for s in steps], minlength=t) / counts
            try:
                return self.estimator(means, **self.options)
            except NotEnoughData:
                return None

    return TSEPruner


# ---- a TPE study over a trained grid (notebook 03): its configs, tables and figures ------------------------

# The estimators a study compares, with the options this module pins, and the words a table or legend shows.
STUDY_ESTIMATORS = {"TSE": {}, "TSE-E": {"e": 1}, "TSE-EMA": {"gamma": GAMMA}, "val": {}}
ESTIMATOR_LABELS = {"TSE": "TSE", "TSE-E": "TSE-E (E = 1)", "TSE-EMA": f"TSE-EMA (γ = {GAMMA})",
                    "val": "validation loss at f"}


def validate_every_window(configs: Sequence[dict], windows: int) -> list[dict]:
    """The configs with a validation (and checkpoint) at the end of each of `windows` windows of their budget:
    val_every_steps = max_steps / windows.

    With every budget equal in examples (`sweep.budget` with one epochs and training set, its cap not
    reached), window w then ends at the same examples seen in every run, so the baseline "validation
    loss at f" and successive halving read each run at the same compute. Refused (`ConfigError`) when the
    budgets differ in examples, or a max_steps is not a multiple of `windows`. Returns new configs.
    """
    if windows < 1:
        raise ConfigError(f"windows must be >= 1, got {windows}")
    out, budgets = [], set()
    for config in configs:
        config = copy.deepcopy(config)
        train = config["train"]
        if train["max_steps"] % windows:
            raise ConfigError(f"a budget of {train['max_steps']} steps (batch {train['batch_size']}) is not a whole "
                              f"number of {windows} windows: pick epochs and a training set whose examples divide by "
                              f"{windows} x every batch size")
        train["val_every_steps"] = train["max_steps"] // windows
        budgets.add(train["max_steps"] * train["batch_size"] * train.get("devices", 1) * train.get("num_nodes", 1))
        out.append(config)
    if len(budgets) > 1:
        raise ConfigError(f"the runs' budgets differ in examples ({sorted(budgets)}): a budget fraction would not be "
                          "equal compute; is sweep.budget's max_steps cap or min_steps reached?")
    return out


def check_study(grids: dict[str, Sequence[dict]], fractions: Sequence[float], scatter_fraction: float, top_k: int,
                eta: int, n_random: int) -> None:
    """Notebook 03's analysis parameters, checked against its grids before any run trains: the analysis reads them
    only once every run has finished, so `fractions: [1.5]` or `eta: 1` would otherwise fail hours into a study.
    Each family needs 3 configurations (a rank agreement of fewer means nothing) and at least top_k."""
    bad = [f for f in [*fractions, scatter_fraction] if not 0 < f <= 1]
    if bad:
        raise ConfigError(f"parameters fractions and scatter_fraction are budget fractions in (0, 1], got {bad}")
    if eta < 2:
        raise ConfigError(f"parameter eta (successive halving keeps 1/eta of the configurations) must be >= 2, "
                          f"got {eta}")
    if n_random < 1:
        raise ConfigError(f"parameter n_random (random searches drawn at each compute) must be >= 1, got {n_random}")
    for family, configs in grids.items():
        if len(configs) < max(3, top_k):
            raise ConfigError(f"the {family} grid has {len(configs)} configuration(s): the study ranks at least 3 "
                              f"and top_k = {top_k}; widen its axes")
    if top_k < 1:
        raise ConfigError(f"parameter top_k (configurations a search trains to the end) must be >= 1, got {top_k}")

def study_window(curves: Sequence[Curve], windows: int) -> int:
    """The window W in examples when the runs' common budget is cut into `windows` windows (5% each for 20)."""
    if windows < 1:
        raise ConfigError(f"windows must be >= 1, got {windows}")
    whole = budget(curves, fraction=1.0)
    if whole % windows:
        raise ConfigError(f"a budget of {whole:g} examples is not a whole number of {windows} windows")
    return int(whole // windows)


def agreement_table(curves: Sequence[Curve], fractions: Sequence[float], windows: int, *,
                    estimators: dict = STUDY_ESTIMATORS, n_boot: int = 2000, seed: int = 0):
    """Rank agreement with the final metric of each estimator (`STUDY_ESTIMATORS`: name -> options) at each
    budget fraction: one row per pair, with Spearman ρ, Kendall τ and their bootstrap intervals."""
    import pandas as pd

    finals, window = _finals(curves), study_window(curves, windows)
    rows = []
    for name, options in estimators.items():
        for f in fractions:
            a = rank_agreement(estimates(curves, name, fraction=f, window=window, **options), finals,
                               n_boot=n_boot, seed=seed)
            rows.append({"estimator": name, "fraction": f, "rho": a.rho, "rho_lo": a.rho_interval[0],
                         "rho_hi": a.rho_interval[1], "tau": a.tau, "tau_lo": a.tau_interval[0],
                         "tau_hi": a.tau_interval[1], "n": a.n})
    return pd.DataFrame(rows)


def hardness(curves: Sequence[Curve], close: float = 0.01) -> dict:
    """How hard a grid is to rank: the spread of its final metrics against the gaps between neighbours.

    spread = max - min of the finals; the gaps are the differences of the sorted finals; `close_pairs`
    counts the pairs of configurations whose finals differ by at most `close` of the best final, the
    pairs a ranking must order on differences that small.
    """
    finals = np.sort(_finals(curves))
    gaps, best = np.diff(finals), finals[0]
    pairs = np.abs(finals[:, None] - finals[None, :])[np.triu_indices(len(finals), 1)]
    return {"configurations": len(finals), "best final": float(best), "worst final": float(finals[-1]),
            "spread": float(finals[-1] - best), "relative spread": float((finals[-1] - best) / best),
            "smallest gap": float(gaps.min()), "median gap": float(np.median(gaps)),
            "close_pairs": int((pairs <= close * abs(best)).sum()), "pairs": len(pairs), "close": close}


def _row(search: Search, curves: Sequence[Curve], *, n_random: int, seed: int, unit: str, **extra) -> dict:
    """A search's table row: compute saved and regret (also in % of the best final), beside random search at
    the compute it spent (`random_at`)."""
    best = abs(float(_finals(curves).min()))
    return {"method": search.method, **extra, "saved": search.saved, "regret": search.regret,
            "regret_pct": 100 * search.regret / best, "chosen": Path(search.run).name,
            **random_at(curves, search.spent, unit=unit, n=n_random, seed=seed)}


def random_at(curves: Sequence[Curve], spend: float, *, unit: str, n: int = 200, seed: int = 0) -> dict:
    """Random search at a compute of `spend` over `n` random orders: its mean saved share, mean regret in % of
    the best final, and the share of orders that found the best configuration."""
    found = [random_search(curves, spend, unit=unit, seed=seed + k) for k in range(n)]
    regrets = np.array([s.regret for s in found])
    return {"random_saved": float(np.mean([s.saved for s in found])),
            "random_regret_pct": float(100 * regrets.mean() / abs(float(_finals(curves).min()))),
            "random_found_best": float(np.mean(regrets == 0))}


def search_table(curves: Sequence[Curve], fractions: Sequence[float], windows: int, *, unit: str,
                 estimators: Sequence[str] = ("TSE-E", "val"), top_k: int = 1, eta: int = 3, n_random: int = 200,
                 seed: int = 0):
    """The replayed searches: TPE with each estimator at each budget fraction (all to f, the top k to the
    end) and successive halving on validation loss, one row each with compute saved and regret, beside
    random search at the compute each spent (`random_at`, `n_random` orders)."""
    import pandas as pd

    window = study_window(curves, windows)
    searches = [(tpe_search(curves, name, top_k=top_k, unit=unit, fraction=f, window=window,
                            **STUDY_ESTIMATORS[name]), f) for name in estimators for f in fractions]
    searches.append((successive_halving(curves, eta=eta, unit=unit), float("nan")))
    return pd.DataFrame([_row(search, curves, n_random=n_random, seed=seed, unit=unit, fraction=f)
                         for search, f in searches])


def replay_pruner(curves: Sequence[Curve], pruner, *, reports: str = "train", unit: str = "flops", seed: int = 0,
                  method: str | None = None) -> Search:
    """An Optuna study replayed from recorded runs, in memory (no database): one trial per run, in a random
    order (`seed`), as a live search with that pruner would have gone.

    Each trial reports at the examples seen (s · B): every step's training loss (`reports="train"`, for
    `tse_pruner`) or each validation loss (`"val"`, for Optuna's own pruners), and asks the pruner at each
    validation before the last, as a training loop validating there would. A pruned trial spent its compute
    to that step, a completed one its whole run, with its final metric as the trial's value; the search
    chooses the best completed trial.
    """
    import optuna

    if reports not in ("train", "val"):
        raise ConfigError(f"reports must be 'train' or 'val', got {reports!r}")
    _finals(curves)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(pruner=pruner, sampler=optuna.samplers.RandomSampler(seed=seed))
        reached, completed = {}, []
        for i in map(int, np.random.default_rng(seed).permutation(len(curves))):
            c, trial, done = curves[i], study.ask(), 0
            reached[i] = c.steps_done
            for step, val in zip(c.val_steps, c.val_loss):
                if step >= c.steps_done:
                    break
                if reports == "train":
                    for s in range(done + 1, step + 1):
                        trial.report(float(c.train_loss[s - 1]), int(s * c.batch))
                else:
                    trial.report(float(val), int(step * c.batch))
                done = int(step)
                if trial.should_prune():
                    reached[i] = done
                    break
            if reached[i] < c.steps_done:
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            else:
                study.tell(trial, c.final)
                completed.append(i)
    finally:
        optuna.logging.set_verbosity(verbosity)
    return _search(method or type(pruner).__name__, curves, reached, completed, unit)


def pruner_table(curves: Sequence[Curve], fraction: float, windows: int, *, unit: str, top_k: int = 1, eta: int = 3,
                 n_random: int = 200, seed: int = 0):
    """`tse_pruner` (TSE-E, deciding from `fraction` of the budget on, pruning a trial `top_k` others beat)
    against Optuna's `SuccessiveHalvingPruner` on validation loss (first rung at `fraction` of the budget,
    reduction factor `eta`), both replayed (`replay_pruner`), each beside random search at its compute."""
    import optuna
    import pandas as pd

    window = study_window(curves, windows)
    first = max(1, round(fraction * windows))
    tse = tse_pruner(window, top_k=top_k, min_windows=first, **STUDY_ESTIMATORS["TSE-E"])
    halving = optuna.pruners.SuccessiveHalvingPruner(min_resource=first * window, reduction_factor=eta)
    searches = (replay_pruner(curves, tse, reports="train", unit=unit, seed=seed,
                              method=f"Optuna + tse_pruner (TSE-E, top {top_k})"),
                replay_pruner(curves, halving, reports="val", unit=unit, seed=seed,
                              method=f"Optuna + SuccessiveHalvingPruner (eta {eta})"))
    return pd.DataFrame([_row(search, curves, n_random=n_random, seed=seed, unit=unit, fraction=fraction)
                         for search in searches])


def verify_study(agreement, searches, families: Sequence[str]) -> str:
    """Raise `StudyCheckError` unless every family has a finite ρ for every estimator and fraction and every
    search a finite saved share and regret; else one line per family with its best ρ at the smallest fraction."""
    from chemscale.checks import StudyCheckError

    problems = []
    for family in families:
        a, s = agreement[agreement["family"] == family], searches[searches["family"] == family]
        if a.empty or s.empty:
            problems.append(f"{family}: no rank agreement or no search was computed")
        problems += [f"{family}: ρ of {r.estimator} at {r.fraction:.0%} is {r.rho}"
                     for r in a.itertuples() if not np.isfinite([r.rho, r.rho_lo, r.rho_hi]).all()]
        problems += [f"{family}: {r.method} has saved {r.saved}, regret {r.regret}"
                     for r in s.itertuples() if not np.isfinite([r.saved, r.regret]).all()]
    if problems:
        raise StudyCheckError("TPE study incomplete:\n  " + "\n  ".join(problems))
    lines = []
    for family in families:
        a = agreement[agreement["family"] == family]
        smallest = a[a["fraction"] == a["fraction"].min()]
        first = smallest.loc[smallest["rho"].idxmax()]
        lines.append(f"{family}: ρ finite for {len(a)} estimator-fraction pairs; best at {first.fraction:.0%} of the "
                     f"budget: {ESTIMATOR_LABELS.get(first.estimator, first.estimator)} ρ = {first.rho:.2f}")
    return "\n".join(lines)


# ---- figures (drawn with chemscale.plots' look: set_theme, legends beside the axes) ---------------------

def _panels(families: Sequence, sharey: bool = False):
    """One panel per family side by side, with room under them for the shared legend."""
    import matplotlib.pyplot as plt

    from chemscale import plots

    width = max(plots.FIGSIZE[0], 4.6 * len(families))
    return plt.subplots(1, len(families), figsize=(width, plots.FIGSIZE[1] + 1.2), layout="constrained",
                        squeeze=False, sharey=sharey)


FIXED_BUDGET = "every run trained its whole fixed budget, no early stopping (none converged, by design)"


def _title(fig, title: str, note: str | None) -> None:
    """The figure's title, with `note` under it: which runs converged, as every figure of the study says."""
    import textwrap

    # the note wrapped to the figure's width (~14 characters an inch at this size), so no panel count clips it
    width = max(40, int(14 * fig.get_size_inches()[0]))
    fig.suptitle("\n".join([title, *textwrap.wrap(note, width)]) if note else title)


def _family_legend(fig) -> None:
    """One legend for all panels, under them, so it covers no point and no title."""
    handles = {label: h for ax in fig.axes for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncols=2, frameon=False,
               fontsize="small")


def agreement_plot(agreement, title: str = "How early does the ranking hold?", note: str | None = FIXED_BUDGET):
    """ρ against the budget fraction, one panel per family (`family` column), one line per estimator,
    bars the bootstrap 95% intervals (dodged so they do not cover each other); `note` under the title
    says how the runs were trained (default: `FIXED_BUDGET`, notebook 03's grids)."""
    import seaborn as sns

    families = list(dict.fromkeys(agreement["family"]))
    fig, axes = _panels(families, sharey=True)
    names = list(dict.fromkeys(agreement["estimator"]))
    colors = dict(zip(names, sns.color_palette("colorblind")))
    for ax, family in zip(axes[0], families):
        rows = agreement[agreement["family"] == family]
        for k, name in enumerate(names):
            r = rows[rows["estimator"] == name].sort_values("fraction")
            x = 100 * r["fraction"] * 1.06 ** (k - (len(names) - 1) / 2)
            ax.errorbar(x, r["rho"], yerr=[r["rho"] - r["rho_lo"], r["rho_hi"] - r["rho"]], marker="o", capsize=3,
                        color=colors[name], label=ESTIMATOR_LABELS.get(name, name), lw=1.2, ms=5)
        fractions = sorted(rows["fraction"].unique())
        ax.set(xscale="log", xlabel="budget trained (% of each run's)", title=family, ylim=(-1.05, 1.05))
        ax.set_xticks([100 * f for f in fractions], [f"{100 * f:g}" for f in fractions])
        ax.minorticks_off()
        ax.axhline(0, color="0.5", lw=0.8)
    axes[0][0].set_ylabel("Spearman ρ with the final metric (95% CI)")
    _title(fig, title, note)
    _family_legend(fig)
    return fig


def scatter_plot(panels: dict, fraction: float, windows: int, estimator: str = "TSE-E",
                 title: str | None = None, note: str | None = FIXED_BUDGET):
    """The estimator at `fraction` of the budget against the final metric, one panel per family:
    `panels` maps a family to (curves, the final metric's column name, for its axis label); `note` as
    in `agreement_plot`."""
    from chemscale import plots

    fig, axes = _panels(list(panels))
    for ax, (family, (curves, metric)) in zip(axes[0], panels.items()):
        values = estimates(curves, estimator, fraction=fraction, window=study_window(curves, windows),
                           **STUDY_ESTIMATORS[estimator])
        finals = _finals(curves)
        rho = rank_agreement(values, finals, n_boot=200).rho
        ax.plot(values, finals, "o", color="C0", ms=6, label="one configuration")
        best = int(np.argmin(finals))
        ax.plot(values[best], finals[best], "*", color="crimson", ms=14, label="the best final")
        ax.set(xlabel=f"{ESTIMATOR_LABELS[estimator]} at {fraction:.0%} of the budget",
               ylabel=plots.column_label(metric), title=f"{family}: ρ = {rho:.2f}")
    _title(fig, title or f"{ESTIMATOR_LABELS[estimator]} at {fraction:.0%} of the budget vs the final metric", note)
    _family_legend(fig)
    return fig


def search_plot(searches, title: str = "Searches at equal compute: compute saved vs regret",
                note: str | None = FIXED_BUDGET):
    """Regret (% of the best final) against compute saved (%), one panel per family: TPE per estimator
    across budget fractions, successive halving, the Optuna pruners, and random search at each's compute;
    `note` as in `agreement_plot`."""
    import seaborn as sns

    families = list(dict.fromkeys(searches["family"]))
    fig, axes = _panels(families)
    methods = list(dict.fromkeys(searches["method"]))
    colors = dict(zip(methods, sns.color_palette("colorblind") + sns.color_palette("dark")))
    markers = dict(zip(methods, "oDs^vP" * len(methods)))
    for ax, family in zip(axes[0], families):
        rows = searches[searches["family"] == family]
        ax.plot(100 * rows["random_saved"], rows["random_regret_pct"], "x", color="0.45", ms=6,
                label="random search at each one's compute (mean)")
        for method in methods:
            r = rows[rows["method"] == method].sort_values("saved")
            if len(r):  # hollow markers, of a size per method, so methods that coincide stay visible
                ax.plot(100 * r["saved"], r["regret_pct"], marker=markers[method], ls="-" if len(r) > 1 else "none",
                        color=colors[method], mfc="none", mew=1.5, ms=11 - 1.2 * methods.index(method) % 6,
                        label=method, lw=1)
        ax.set(xlabel="compute saved (% of training the whole grid)", ylabel="regret (% of the best final)",
               title=family)
    _title(fig, title, note)
    _family_legend(fig)
    return fig


def summary(searches, family: str, tolerance_pct: float = 1.0, paper_saved: float = 0.9) -> str:
    """One family's searches against the paper's claim: the most compute a search saved at a regret within
    `tolerance_pct` % of the best final, beside random search at that compute and the paper's "up to 90%"."""
    rows = searches[searches["family"] == family]
    good = rows[rows["regret_pct"] <= tolerance_pct + 1e-12]
    paper = f"the paper's \"up to {paper_saved:.0%}\""
    if good.empty:
        best = rows.loc[rows["regret_pct"].idxmin()]
        return (f"{family}: no search came within {tolerance_pct:g}% of the best final; the closest, {best.method}"
                f"{_at(best)}, saved {best.saved:.0%} at a regret of {best.regret_pct:.2g}% ({paper})")
    best = good.loc[good["saved"].idxmax()]  # the first in the table of those that saved the most
    verdict = "reaches" if best.saved >= paper_saved else "falls short of"
    return (f"{family}: {best.method}{_at(best)} saved {best.saved:.0%} of the compute at a regret of "
            f"{best.regret_pct:.2g}% (within {tolerance_pct:g}%); random search at that compute: "
            f"{best.random_regret_pct:.2g}% on average, the best found in {best.random_found_best:.0%} of orders. "
            f"This {verdict} {paper}")


def _at(row) -> str:
    return f" at {row.fraction:.0%} of the budget" if np.isfinite(row.fraction) else ""
