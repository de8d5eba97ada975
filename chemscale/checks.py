"""The closing checks of a study notebook: every run finished, every fit is a finite number, and how
many of the points behind each fit converged (early stopping ended the run) rather than hit the step cap.

A sweep keeps going when a run crashes (its folder says why) and `scaling.fit_groups` skips a
group left with too few points, so a notebook could end with plots and tables while a model's
runs all failed. `verify` turns that into an error that fails the notebook (and `make test`),
naming each unfinished run's log and each fit that is not finite.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from chemscale.scaling import JOINT_PARAMS, JointFit, PowerLawFit


class StudyCheckError(AssertionError):
    """A study notebook's results are incomplete: a run did not finish or a fit is not finite."""


def unfinished_runs(results: pd.DataFrame) -> list[str]:
    """One line per run of `results` (rows of `sweep.run`) whose status is not 'finished'."""
    if results is None or len(results) == 0:
        return ["no runs at all"]
    bad = results[results["status"] != "finished"]
    return [f"{row.run_id}: {row.status}, see {Path(row.run_dir) / 'train.log'}" for row in bad.itertuples()]


def _fit_problems(name: str, fit) -> list[str]:
    """What is wrong with one fit: a parameter that is not finite, or runs left out for a non-finite loss."""
    params = ("A", "alpha", "E") if isinstance(fit, PowerLawFit) else JOINT_PARAMS
    problems = [f"{name}: {p} = {getattr(fit, p)}" for p in params if not math.isfinite(getattr(fit, p))]
    if fit.n_dropped:
        problems.append(f"{name}: {fit.n_dropped} run(s) left out for a loss that is not finite")
    return problems


def _flatten_fits(fits: dict) -> dict[str, PowerLawFit | JointFit]:
    """{'loss vs data': {64: fit, ...}, 'frontier': fit} -> {'loss vs data [64]': fit, 'frontier': fit}.

    A None (a fit that `scaling.fit_or_skip` skipped for too few points, with its own sentence)
    is left out: a grid too small for a fit is the user's design, not a failure.
    """
    flat = {}
    for name, value in fits.items():
        if value is None:
            continue
        if isinstance(value, (PowerLawFit, JointFit)):
            flat[name] = value
        elif isinstance(value, dict):
            flat.update({f"{name} [{key}]": fit for key, fit in value.items()})
        else:
            raise TypeError(f"{name}: expected a fit or a dict of fits, got {type(value).__name__}")
    return flat


def _converged(rows: pd.DataFrame, what: str) -> str:
    """'11 of 20 runs converged (55%)': the share of `rows` whose `convergence` is "converged"."""
    n = len(rows)
    done = int((rows["convergence"] == "converged").sum()) if "convergence" in rows.columns else 0
    return f"{done} of {n} {what} converged ({done / n:.0%})" if n else f"no {what}"


def convergence_report(results: pd.DataFrame, used: dict[str, pd.DataFrame], fixed_budget: bool = False) -> str:
    """How many runs converged, over all runs and among the points each fit was given.

    `used` maps a fit's name to the rows it was fitted on (a DataFrame with `convergence`, as
    `sweep.collect` gives it): a fit's exponent measures the models only as far as its points converged.
    `fixed_budget`: the runs were meant to train their whole budget with early stopping off (notebook
    03's ground truth is the metric at the end of the budget), so the line counts the runs that did,
    instead of reporting "0 converged" as if it were a shortfall.
    """
    if fixed_budget:
        state = results["convergence"] if "convergence" in results.columns else pd.Series("unknown", results.index)
        short = results[state != "capped"]
        line = (f"all runs: {len(results) - len(short)} of {len(results)} trained their whole fixed budget (early "
                "stopping off by design: the ground truth is the metric at the end of the budget, not a converged "
                "loss)")
        # named, as the figures' note (tpe.FIXED_BUDGET) says every run did: these are the ones it is wrong about
        return line + "".join(f"\n  {r.run_id} did not ({state[i]}), see {Path(r.run_dir) / 'train.log'}"
                              for i, r in zip(short.index, short.itertuples()))
    lines = [f"all runs: {_converged(results, 'runs')}"]
    lines += [f"{name}: {_converged(rows, 'points')}" for name, rows in used.items()]
    return "\n".join(lines)


def verify(results: pd.DataFrame, fits: dict, used: dict[str, pd.DataFrame] | None = None,
           fixed_budget: bool = False) -> str:
    """Raise StudyCheckError unless every run finished and every fit is finite; else a summary that
    says, over all runs and per fit in `used`, how many points converged (`convergence_report`).

    Args:
        results: the DataFrame `sweep.run` returned (one row per run, with `status`).
        fits: name -> a PowerLawFit/JointFit, or name -> the dict `scaling.fit_groups` returned.
            An empty dict (every group had fewer than 3 points by the grid's design) or a None
            (a fit `scaling.fit_or_skip` skipped) is allowed.
        used: fit name -> the rows it was fitted on, for the convergence lines.
        fixed_budget: every run trains its whole budget by design (`convergence_report`).
    """
    flat = _flatten_fits(fits)
    problems = [f"run {line}" for line in unfinished_runs(results)]
    for name, fit in flat.items():
        problems += _fit_problems(name, fit)
    if problems:
        raise StudyCheckError("study incomplete:\n  " + "\n  ".join(problems))
    summary = f"checks passed: {len(results)} of {len(results)} runs finished; {len(flat)} fits, all finite"
    if "convergence" not in results.columns:  # results from before runs said why they stopped
        return summary
    return f"{summary}\n{convergence_report(results, used or {}, fixed_budget)}"


BUDGET_TOLERANCE = 0.05  # a point whose metric improves by less than this with 3x its budget is not budget-limited


def budget_check(runs: pd.DataFrame, longer: pd.DataFrame, metric: str, on: list[str],
                 tolerance: float = BUDGET_TOLERANCE) -> pd.DataFrame:
    """Did a point's budget set its metric? Each row of `longer` (a run trained again with 3x the step
    budget, `sweep.longer`) beside the same point in `runs`, matched on the `on` columns.

    `improvement` is (metric - metric_longer) / metric, lower being better; `verdict` says whether it is
    below `tolerance` (the budget did not set the point) or not (it did, and the point is budget-limited
    even if early stopping ended it). A point without a finished run on both sides is reported, with each
    side's status (a 3x run that diverged says so), not dropped. Two finished runs at one point of either
    table (seeds, or a key that varies left out of `on`) and a column of `on` that a table lacks raise
    `ConfigError`, naming them.
    """
    from chemscale.config import ConfigError

    for name, table in (("runs", runs), ("longer", longer)):
        missing = [c for c in (*on, "status") if c not in table.columns]
        if missing:
            raise ConfigError(f"budget_check: {name} has no column(s) {missing}; its columns: {sorted(table.columns)}")
    keep = [*on, "max_steps", "steps", "convergence", metric]
    a = runs[runs["status"] == "finished"].reindex(columns=keep)  # a table of crashed runs has no metric column
    b = longer[longer["status"] == "finished"].reindex(columns=keep)
    for name, table in (("runs", a), ("longer", b)):
        twice = table[table.duplicated(on, keep=False)]
        if len(twice):
            point = {k: (v.item() if hasattr(v, "item") else v) for k, v in twice.iloc[0][on].items()}
            raise ConfigError(f"budget_check: {name} holds {int(table.duplicated(on, keep=False).sum())} finished "
                              f"runs at the point {point}: add the column that tells them apart (seed?) to `on`")

    def status(table: pd.DataFrame, suffix: str) -> pd.DataFrame:
        """A point's status: finished if a run there finished, else its first run's (diverged, crashed...)."""
        s = table[[*on, "status"]].assign(_rank=(table["status"] != "finished").astype(int))
        s = s.sort_values("_rank", kind="stable").drop_duplicates(on).drop(columns="_rank")
        return s.rename(columns={"status": f"status{suffix}"})

    points = longer[on].drop_duplicates()
    table = points.merge(a, on=on, how="left").merge(b, on=on, how="left", suffixes=("", "_3x"))
    table = table.merge(status(runs, ""), on=on, how="left").merge(status(longer, "_3x"), on=on, how="left")
    table["status"] = table["status"].fillna("missing")
    table["improvement"] = (table[metric] - table[f"{metric}_3x"]) / table[metric]

    def verdict(row) -> str:
        gain = row["improvement"]
        if gain != gain:  # NaN: one side did not finish
            return f"not measured: the run {row['status']}, the 3x run {row['status_3x']}"
        if gain < tolerance:
            return f"budget did not set it (3x budget: {gain:+.1%})"
        return f"budget-limited (3x budget improves it by {gain:.1%})"

    table["verdict"] = table.apply(verdict, axis=1) if len(table) else pd.Series(dtype=object)
    return table.drop(columns=["status", "status_3x"])
