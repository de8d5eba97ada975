"""Training Performance Estimation: estimators on hand-worked windows, rank agreement, replayed searches'
compute and regret, the metrics reader's refusals, and the Optuna pruner in a real in-memory study."""

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from chemscale import tpe
from chemscale.config import ConfigError


def curve(losses, *, batch=10, max_steps=None, val=None, final=1.0, name="run", seconds=None):
    """A synthetic finished run: per-step losses, validation at every step (`val`, default the losses),
    FLOPs of 1 per example, so every unit of compute counts the same."""
    losses = np.asarray(losses, dtype=float)
    steps = np.arange(1, len(losses) + 1)
    return tpe.Curve(name=name, train_loss=losses, batch=batch, max_steps=max_steps or len(losses),
                     val_steps=steps, val_loss=losses if val is None else np.asarray(val, dtype=float),
                     flops_steps=steps, flops=steps * float(batch), final=final,
                     seconds=len(losses) * 2.0 if seconds is None else seconds)


# ---- estimators ------------------------------------------------------------------------------------------

def test_estimators_on_hand_worked_window_means():
    means = [3.0, 2.0, 1.0]
    assert tpe.tse(means) == 6
    assert tpe.tse_e(means, e=1) == 1
    assert tpe.tse_e(means, e=2) == 3
    assert tpe.tse_e(means, e=3) == tpe.tse(means)
    assert tpe.tse_ema(means, gamma=0.5) == pytest.approx(0.25 * 3 + 0.5 * 2 + 1)  # 2.75
    assert tpe.tse_ema(means) == pytest.approx(0.81 * 3 + 0.9 * 2 + 1)  # gamma 0.9: 5.23
    assert tpe.tse_ema(means, gamma=1) == tpe.tse(means)
    with pytest.raises(tpe.NotEnoughData):
        tpe.tse_e(means, e=4)
    with pytest.raises(ConfigError):
        tpe.tse_ema(means, gamma=0)


def test_window_means_count_examples_and_assign_a_step_to_the_window_it_ends_in():
    c = curve([1, 2, 3, 4, 5, 6], batch=20)  # window 30: steps end at 20, 40, 60, 80, 100, 120 examples
    # windows ⌈20 s / 30⌉ = 1, 2, 2, 3, 4, 4
    assert tpe.window_means(c, 30, 120) == pytest.approx([1, 2.5, 4, 5.5])
    assert tpe.window_means(c, 30, 119) == pytest.approx([1, 2.5, 4])  # window 4 is not complete
    with pytest.raises(ConfigError, match="smaller than"):
        tpe.window_means(c, 10, 120)
    with pytest.raises(tpe.NotEnoughData, match="run"):
        tpe.window_means(c, 30, 29)
    with pytest.raises(tpe.NotEnoughData, match="logged 6"):
        tpe.window_means(c, 30, 150)


def test_tse_e_never_reaches_past_the_tse_window():
    """Regression: the study's own TSE-E read one epoch past its TSE window. Window 4 is huge here."""
    c = curve([3, 3, 3, 2, 2, 2, 1, 1, 1, 100, 100, 100], batch=10)
    for x in (90, 110):  # 3 complete windows of 30 examples; at 110 two steps of window 4 are in the budget
        assert tpe.estimates([c], "TSE", examples=x, window=30)[0] == pytest.approx(6)
        assert tpe.estimates([c], "TSE-E", examples=x, window=30)[0] == pytest.approx(1)
        assert tpe.estimates([c], "TSE-E", examples=x, window=30, e=2)[0] == pytest.approx(3)
        assert tpe.estimates([c], "TSE-EMA", examples=x, window=30, gamma=0.5)[0] == pytest.approx(2.75)
    with pytest.raises(tpe.NotEnoughData, match="run: TSE-E"):
        tpe.estimates([c], "TSE-E", examples=90, window=30, e=4)


def test_equal_samples_give_equal_windows_across_batch_sizes():
    """At equal examples a batch-32 and a batch-64 run have as many windows, so their sums compare."""
    def loss(x):
        return 1 + 1 / (1 + x / 1000)

    small = curve([loss(32 * s) for s in range(1, 201)], batch=32, max_steps=400)
    large = curve([loss(64 * s) for s in range(1, 101)], batch=64, max_steps=200)
    a, b = (tpe.window_means(c, 640, 6400) for c in (small, large))
    assert len(a) == len(b) == 10
    assert tpe.tse(a) == pytest.approx(tpe.tse(b), rel=0.01)


def test_window_defaults_to_the_common_training_set():
    c = curve(np.ones(20))
    assert tpe.window_size([dataclasses.replace(c, train_size=50)] * 2) == 50
    with pytest.raises(ConfigError, match="give the window"):
        tpe.window_size([c])


def test_validation_baseline_is_the_last_validation_within_the_budget():
    c = tpe.Curve(name="run", train_loss=np.ones(10), batch=10, max_steps=10, val_steps=np.array([4, 8]),
                  val_loss=np.array([2.0, 1.5]))
    assert tpe.val_loss_at(c, 79) == 2.0
    assert tpe.val_loss_at(c, 80) == 1.5
    with pytest.raises(tpe.NotEnoughData, match="no validation"):
        tpe.val_loss_at(c, 39)


def test_budgets_of_different_runs_are_refused_unless_given_in_examples():
    short, long = curve(np.ones(10), max_steps=10), curve(np.ones(20), max_steps=20)
    with pytest.raises(ConfigError, match="different budgets"):
        tpe.estimates([short, long], "TSE", fraction=0.5, window=10)
    with pytest.raises(ConfigError, match="different budgets"):  # batch 10 vs 20 at equal steps: not equal compute
        tpe.budget([curve(np.ones(10)), curve(np.ones(10), batch=20)], fraction=0.5)
    assert list(tpe.estimates([short, long], "TSE", examples=100, window=10)) == [10, 10]
    with pytest.raises(ConfigError, match="neither"):
        tpe.budget([short])
    with pytest.raises(ConfigError, match="both"):
        tpe.budget([short], fraction=0.5, examples=10)
    assert tpe.budget([short, short], fraction=0.5) == 50


# ---- rank agreement ----------------------------------------------------------------------------------

def test_rank_agreement_hand_worked():
    a = tpe.rank_agreement([1, 2, 3], [1, 3, 2])
    assert a.rho == pytest.approx(0.5)
    assert a.tau == pytest.approx(1 / 3)
    assert -1 <= a.rho_interval[0] <= a.rho_interval[1] <= 1
    perfect = tpe.rank_agreement([1, 2, 3, 4, 5], [0.1, 0.2, 0.3, 0.4, 0.5])
    assert np.allclose([perfect.rho, perfect.tau, *perfect.rho_interval, *perfect.tau_interval], 1)
    reversed_ = tpe.rank_agreement([1, 2, 3, 4, 5], [5, 4, 3, 2, 1])
    assert reversed_.rho == pytest.approx(-1)


def test_rank_agreement_interval_is_reproducible_and_wider_for_noisier_rankings():
    rng = np.random.default_rng(1)
    truth = np.arange(20.0)
    good = tpe.rank_agreement(truth + rng.normal(0, 1, 20), truth)
    bad = tpe.rank_agreement(truth + rng.normal(0, 10, 20), truth)
    assert good.rho > bad.rho
    assert good.rho_interval[1] - good.rho_interval[0] < bad.rho_interval[1] - bad.rho_interval[0]
    assert good == tpe.rank_agreement(truth + np.random.default_rng(1).normal(0, 1, 20), truth)


def test_bootstrap_correlations_match_scipy_with_ties():
    from scipy import stats

    rng = np.random.default_rng(0)
    p, t = rng.integers(0, 5, size=(100, 12)).astype(float), rng.integers(0, 5, size=(100, 12)).astype(float)
    assert np.allclose(tpe._spearman(p, t), [stats.spearmanr(a, b).statistic for a, b in zip(p, t)])
    assert np.allclose(tpe._kendall_b(p, t), [stats.kendalltau(a, b).statistic for a, b in zip(p, t)])
    assert np.isnan(tpe._spearman(np.ones((1, 4)), t[:1, :4])).all()


@pytest.mark.parametrize("predicted, truth", [([1, 2], [1, 2]), ([1, 2, np.nan], [1, 2, 3]), ([1, 1, 1], [1, 2, 3]),
                                              ([1, 2, 3], [1, 2])])
def test_rank_agreement_refuses_what_has_no_ranking(predicted, truth):
    with pytest.raises(ConfigError):
        tpe.rank_agreement(predicted, truth)


# ---- searches ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("call, message", [
    (lambda c: tpe.rank_agreement([1, 2, 3], [3, 2, 1], n_boot=0), "n_boot"),
    (lambda c: tpe.successive_halving(c, eta=2.5), "eta"),
    (lambda c: tpe.successive_halving(c, min_fraction=2), "min_fraction"),
    (lambda c: tpe.study_window(c, 0), "windows"),
    (lambda c: tpe.estimates(c, examples=float("inf")), "examples budget"),
])
def test_search_arguments_that_mean_nothing_are_refused_naming_them(call, message):
    """Not an IndexError, an OverflowError or a NotEnoughData about a run that is not the problem."""
    with pytest.raises(ConfigError, match=message):
        call([curve(np.linspace(3, 1, 100)) for _ in range(3)])


def test_regret_hand_worked():
    assert tpe.regret([1.00, 1.02, 1.10], 1) == pytest.approx(0.02)
    assert tpe.regret([1.00, 1.02, 1.10], 0) == 0


def ten_runs(best=3):
    """10 equal-cost runs of 100 steps; run `best` trains fastest and ends best."""
    return [curve(np.full(100, 1.0 if i == best else 2.0 + i), final=1.0 if i == best else 2.0 + i, name=f"r{i}")
            for i in range(10)]


@pytest.mark.parametrize("unit", tpe.UNITS)
def test_tpe_search_spends_n_f_plus_k_one_minus_f(unit):
    """10 configurations, f = 0.1, top 1: 10·0.1 + 1·0.9 = 1.9 of 10 runs = 19% of the grid, 81% saved."""
    s = tpe.tpe_search(ten_runs(), "TSE-E", fraction=0.1, top_k=1, unit=unit, window=10)
    assert s.spent / s.grid == pytest.approx(0.19)
    assert s.saved == pytest.approx(0.81)
    assert (s.chosen, s.run, s.regret) == (3, "r3", 0)
    two = tpe.tpe_search(ten_runs(), "TSE", fraction=0.1, top_k=2, unit=unit, window=10)
    assert two.spent / two.grid == pytest.approx(0.28)


def test_tpe_search_regret_when_the_estimator_misranks():
    runs = [curve(np.full(20, loss), final=final, name=n)
            for loss, final, n in ((2.0, 1.00, "a"), (1.0, 1.02, "b"), (3.0, 1.10, "c"))]
    s = tpe.tpe_search(runs, "TSE-E", fraction=0.5, window=10)
    assert (s.run, s.regret) == ("b", pytest.approx(0.02))
    assert tpe.tpe_search(runs, "TSE-E", fraction=0.5, window=10, top_k=2).regret == 0


def test_tpe_search_needs_every_run_to_reach_the_budget():
    runs = ten_runs()
    runs[5] = curve(np.ones(5), max_steps=100, name="stopped early")
    with pytest.raises(tpe.NotEnoughData, match="stopped early"):
        tpe.tpe_search(runs, fraction=0.1, window=10)
    with pytest.raises(ConfigError, match="top_k"):
        tpe.tpe_search(ten_runs(), fraction=0.1, window=10, top_k=0)


def test_successive_halving_nine_runs_eta_three_spends_seven_twenty_sevenths():
    """Rungs 1/9, 1/3, 1 of 90 steps: 6 runs stop at 10 steps, 2 at 30, 1 trains 90: 210 of 810 steps = 7/27."""
    val = {i: np.linspace(3, 2, 90) + 0.1 * i for i in range(9)}
    val[6] = np.linspace(1, 0.5, 90)  # best at every validation
    runs = [curve(np.ones(90), batch=1, val=val[i], final=float(val[i][-1]), name=f"r{i}") for i in range(9)]
    s = tpe.successive_halving(runs, eta=3, unit="examples")
    assert s.spent / s.grid == pytest.approx(7 / 27)
    assert (s.run, s.regret) == ("r6", 0)
    val[6] = np.r_[np.full(20, 9.0), np.linspace(1, 0.5, 70)]  # worst at the first rung: dropped there
    runs[6] = curve(np.ones(90), batch=1, val=val[6], final=0.5, name="r6")
    late = tpe.successive_halving(runs, eta=3, unit="examples")
    assert late.run == "r0" and late.regret == pytest.approx(runs[0].final - 0.5)


def test_random_search_stays_within_its_compute():
    runs = ten_runs()
    s = tpe.random_search(runs, spend=3 * 1000.0, unit="examples", seed=4)
    assert s.spent == 3000 and s.saved == pytest.approx(0.7)
    assert s == tpe.random_search(runs, spend=3 * 1000.0, unit="examples", seed=4)
    regrets = [tpe.random_search(runs, spend=1000.0, unit="examples", seed=k).regret for k in range(50)]
    assert 0 < np.mean(regrets) and min(regrets) == 0


def test_compute_units_count_what_they_say():
    c = tpe.Curve(name="run", train_loss=np.ones(100), batch=8, max_steps=100, flops_steps=np.array([50, 100]),
                  flops=np.array([400.0, 1000.0]), seconds=20.0)
    assert c.cost(25, "flops") == 200  # linear from (0, 0) to the first logged point
    assert c.cost(75, "flops") == 700
    assert c.cost(25, "seconds") == 5
    assert c.cost(25, "examples") == 200
    with pytest.raises(ConfigError, match="compute unit"):
        c.cost(25, "joules")
    with pytest.raises(tpe.NotEnoughData):
        c.cost(101, "examples")
    with pytest.raises(tpe.NotEnoughData, match="train_seconds"):
        tpe.Curve(name="run", train_loss=np.ones(3), batch=1, max_steps=3).cost(1, "seconds")


# ---- reading run folders ------------------------------------------------------------------------------

HEADER = "step,epoch,samples,flops,train_loss,val_loss,current_lr"


def write_run(folder, lines, steps=None, header=HEADER):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"task": "chemgpt", "data": {"n_train_molecules": 30},
                                                    "train": {"batch_size": 10, "max_steps": 6, "devices": 1,
                                                              "num_nodes": 1}}))
    (folder / "metrics.csv").write_text("\n".join([header, *lines]) + "\n")
    if steps is not None:
        (folder / "result.json").write_text(json.dumps({"steps": steps, "best_val_loss": 1.5, "train_seconds": 3.0,
                                                        "n_train_molecules": 30}))
    return folder


def good_lines():
    lines = [f"{s},0,,,{4 - s / 2},," for s in range(1, 4)] + ["3,1,30,300,,2.5,"]
    return lines + [f"{s},1,,,{4 - s / 2},," for s in range(4, 7)] + ["6,2,60,600,,1.5,"]


def test_read_curve_from_a_run_folder(tmp_path):
    c = tpe.read_curve(write_run(tmp_path / "r", good_lines(), steps=6))
    assert list(c.train_loss) == [3.5, 3, 2.5, 2, 1.5, 1]
    assert (c.batch, c.max_steps, c.final, c.seconds, c.train_size) == (10, 6, 1.5, 3.0, 30)
    assert list(c.val_steps) == [3, 6] and list(c.val_loss) == [2.5, 1.5]
    assert c.cost(6, "flops") == 600
    assert tpe.estimates([c], "TSE", fraction=1.0)[0] == pytest.approx(3 + 1.5)  # windows of 30 = 3 steps
    legacy_header = HEADER.replace("samples", "tokens")
    legacy = tpe.read_curve(write_run(tmp_path / "old", good_lines(), steps=6, header=legacy_header))
    assert list(legacy.train_loss) == list(c.train_loss)


@pytest.mark.parametrize("lines, steps, match", [
    (good_lines()[:5], 6, "truncated"),  # result.json says 6 steps ran
    (good_lines()[:-1] + ["6,2,60"], 6, "cut short"),  # a crash mid-append
    ([line for line in good_lines() if not line.startswith("2,")], None, "missing steps 2-2"),
    (good_lines() + ["6,2,,,1.0,,"], None, "twice"),
    ([line.replace("3.0,", "nan,") for line in good_lines()], 6, "train_loss is nan at step 2"),
    (good_lines()[:-1] + ["6,2,60,600,,inf,"], 6, "val_loss is inf"),
    ([line.replace("3.0,", "3.O,") for line in good_lines()], 6, "train_loss is '3.O' at step 2, not a number"),
    (good_lines()[:-1] + ["6,2,60,6e,,1.5,"], 6, "flops is '6e' at step 6"),
])
def test_read_curve_refuses_a_damaged_metrics_file_naming_the_run(tmp_path, lines, steps, match):
    folder = write_run(tmp_path / "damaged_run", lines, steps=steps)
    with pytest.raises(tpe.CurveError, match=match) as e:
        tpe.read_curve(folder)
    assert "damaged_run" in str(e.value)


def test_read_curve_refuses_a_missing_or_foreign_file(tmp_path):
    folder = write_run(tmp_path / "r", good_lines())
    (folder / "metrics.csv").unlink()
    with pytest.raises(tpe.CurveError, match="no metrics.csv"):
        tpe.read_curve(folder)
    (folder / "metrics.csv").write_text("a,b\n1,2\n")
    with pytest.raises(tpe.CurveError, match="no column"):
        tpe.read_curve(folder)
    write_run(folder, good_lines())
    (folder / "config.json").write_text(json.dumps({"task": "chemgpt", "train": {"batch_size": 10}}))
    with pytest.raises(tpe.CurveError, match="lacks"):
        tpe.read_curve(folder)


def test_an_unfinished_run_has_no_final_and_too_few_windows_are_named(tmp_path):
    c = tpe.read_curve(write_run(tmp_path / "half_run", good_lines()[:4]))
    assert c.final is None and c.steps_done == 3
    with pytest.raises(tpe.NotEnoughData, match="half_run"):
        tpe.estimates([c], "TSE", fraction=1.0)
    with pytest.raises(tpe.NotEnoughData, match="half_run"):
        tpe.tpe_search([c, c, c], fraction=0.5)


# ---- the Optuna pruner --------------------------------------------------------------------------------

def test_importing_tpe_does_not_import_optuna():
    code = "import sys, chemscale.tpe; print('optuna' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() \
        == "False"


def test_pruner_without_optuna_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)
    tpe._pruner_class.cache_clear()
    try:
        with pytest.raises(ImportError, match="pip install"):
            tpe.tse_pruner(window=10)
    finally:
        tpe._pruner_class.cache_clear()


def test_pruner_decides_at_complete_windows_against_the_others():
    optuna = pytest.importorskip("optuna")
    study = optuna.create_study(pruner=tpe.tse_pruner(window=10, top_k=1, min_trials=2))
    for _ in range(2):
        study.add_trial(optuna.trial.create_trial(value=1.0, intermediate_values={s: 1.0 for s in range(1, 31)}))

    def should_prune(losses):
        trial = study.ask()
        for step, loss in enumerate(losses, 1):
            trial.report(loss, step)
        decision = trial.should_prune()
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return decision

    assert should_prune([2.0] * 10)  # one complete window, both others better
    assert not should_prune([2.0] * 9)  # no complete window yet
    assert not should_prune([0.5] * 10)
    assert should_prune([0.5] * 10 + [2.0] * 10)  # TSE-E reads window 2 only
    assert not should_prune([0.5] * 10 + [1.0] * 10)  # ties are not worse
    assert should_prune([float("nan")])
    lone = optuna.create_study(pruner=tpe.tse_pruner(window=10, top_k=1, min_trials=2))
    lone.add_trial(optuna.trial.create_trial(value=1.0, intermediate_values={s: 1.0 for s in range(1, 31)}))
    trial = lone.ask()
    for step in range(1, 11):
        trial.report(2.0, step)
    assert not trial.should_prune()  # one trial to compare with, two needed


def test_pruner_percentile_and_bad_settings():
    optuna = pytest.importorskip("optuna")
    study = optuna.create_study(pruner=tpe.tse_pruner(window=5, top_k=None, percentile=50, estimator="TSE"))
    for level in (1.0, 2.0, 3.0, 4.0):
        study.add_trial(optuna.trial.create_trial(value=level, intermediate_values={s: level for s in range(1, 11)}))
    for loss, pruned in ((2.4, False), (2.6, True)):  # the median of the others' TSE at T = 1 (one window mean) is 2.5
        trial = study.ask()
        for step in range(1, 6):
            trial.report(loss, step)
        assert trial.should_prune() is pruned
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    for bad in ({"top_k": 1, "percentile": 50}, {"top_k": None}, {"estimator": "median"}, {"top_k": 0}):
        with pytest.raises(ConfigError):
            tpe.tse_pruner(window=5, **bad)


def test_pruner_in_a_real_study_never_prunes_a_trial_fewer_than_top_k_beat():
    """A synthetic objective whose loss at every step grows with x: the pruner must keep the best and save steps."""
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    steps = 40

    def objective(trial):
        x = trial.suggest_float("x", 0.0, 1.0)
        for step in range(1, steps + 1):
            loss = (0.5 + x) * (1 + 10 / step)
            trial.report(loss, step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return loss

    pruner = tpe.tse_pruner(window=8, top_k=3)
    computed, estimate = [], pruner._value
    pruner._value = lambda values, t: computed.append(t) or estimate(values, t)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0), pruner=pruner)
    study.optimize(objective, n_trials=25)
    # each trial's estimator once per window it completed, not all trials' at every report (n·S² in time)
    assert len(computed) <= 25 * steps // 8
    trials = study.get_trials(deepcopy=False)
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    xs = sorted(t.params["x"] for t in trials)
    assert pruned and sum(len(t.intermediate_values) for t in trials) < 0.8 * steps * len(trials)
    assert study.best_trial.params["x"] == xs[0]
    for t in pruned:
        assert sum(o.params["x"] < t.params["x"] for o in trials if o.number < t.number) >= 3
    assert math.isclose(study.best_value, (0.5 + xs[0]) * (1 + 10 / steps))


# ---- the study over a grid (notebook 03) -------------------------------------------------------------

def grid_runs(n=6, steps=40, batch=10, noise=0.0, seed=0):
    """n finished runs whose training and validation losses fall towards their final, best first in the
    final but listed in a shuffled order; FLOPs of 1 per example, validation every 2 steps."""
    rng = np.random.default_rng(seed)
    out = []
    for i in rng.permutation(n):
        final = 1.0 + 0.1 * i
        loss = final + 2.0 / np.sqrt(np.arange(1, steps + 1)) + rng.normal(0, noise, steps)
        c = curve(loss, batch=batch, final=final, name=f"/runs/s/r{i}")
        out.append(dataclasses.replace(c, val_steps=c.val_steps[1::2], val_loss=c.val_loss[1::2]))
    return out


def test_read_curve_takes_the_ground_truth_metric_it_is_asked_for(tmp_path):
    folder = write_run(tmp_path / "r", good_lines(), steps=6)
    result = json.loads((folder / "result.json").read_text())
    (folder / "result.json").write_text(json.dumps({**result, "status": "finished", "test_loss": 1.25}))
    assert tpe.read_curve(folder, "test_loss").final == 1.25
    assert tpe.read_curves([folder])[0].final == 1.5  # best_val_loss unless told
    with pytest.raises(tpe.CurveError, match="no finite 'test_force_mae_mev_per_a'"):
        tpe.read_curve(folder, "test_force_mae_mev_per_a")


def test_validate_every_window_aligns_validations_across_batch_sizes():
    from conftest import tiny_lm_config

    configs = [tiny_lm_config(batch_size=16, max_steps=40), tiny_lm_config(batch_size=32, max_steps=20)]
    out = tpe.validate_every_window(configs, 10)
    assert [c["train"]["val_every_steps"] for c in out] == [4, 2]  # both validate every 64 molecules
    assert configs[0]["train"]["val_every_steps"] == 10  # the configs given are not changed
    with pytest.raises(ConfigError, match="whole number of 8 windows"):
        tpe.validate_every_window(configs, 8)
    with pytest.raises(ConfigError, match="differ in examples"):
        tpe.validate_every_window([tiny_lm_config(max_steps=40), tiny_lm_config(batch_size=32, max_steps=40)], 10)


def test_study_window_cuts_the_common_budget():
    runs = grid_runs()
    assert tpe.study_window(runs, 20) == 20  # 40 steps x 10 examples / 20
    with pytest.raises(ConfigError, match="whole number"):
        tpe.study_window(runs, 30)


def test_agreement_table_rows_and_a_perfect_ranking():
    runs = grid_runs()
    table = tpe.agreement_table(runs, [0.1, 0.5], 20, n_boot=100)
    assert list(table["estimator"]) == ["TSE", "TSE", "TSE-E", "TSE-E", "TSE-EMA", "TSE-EMA", "val", "val"]
    assert np.allclose(table["rho"], 1) and np.allclose(table["tau"], 1)  # noiseless: every estimator ranks exactly
    assert (table["rho_lo"] <= table["rho"]).all() and (table["n"] == 6).all()


def test_hardness_counts_close_pairs():
    runs = [curve(np.ones(10), final=f, name=str(f)) for f in (1.0, 1.005, 1.008, 1.5)]
    h = tpe.hardness(runs)
    assert (h["configurations"], h["pairs"], h["close_pairs"]) == (4, 6, 3)  # 1.0, 1.005, 1.008 within 1% of 1.0
    assert h["spread"] == pytest.approx(0.5) and h["smallest gap"] == pytest.approx(0.003)
    assert h["median gap"] == pytest.approx(0.005)


def test_search_table_has_each_search_beside_random_search_at_its_compute():
    runs = grid_runs(n=9, steps=90)
    table = tpe.search_table(runs, [0.1, 0.5], 20, unit="examples", n_random=20)
    assert list(table["method"]) == ["TPE (TSE-E, top 1)"] * 2 + ["TPE (val, top 1)"] * 2 + [
        "successive halving (eta 3)"]
    tse_e = table.iloc[0]
    assert tse_e["saved"] == pytest.approx(1 - (9 * 0.1 + 0.9) / 9) and tse_e["regret"] == 0
    assert tse_e["chosen"] == "r0" and 0 <= tse_e["random_found_best"] <= 1
    assert table.iloc[-1]["saved"] == pytest.approx(1 - 7 / 27)  # 9 runs, eta 3: 7/3 of 9 runs' worth
    assert (table["random_saved"] >= table["saved"] - 1e-9).all()  # random search never spends more
    assert "0%" in tpe.summary(table.assign(family="f"), "f") and "falls short of" in tpe.summary(
        table.assign(family="f"), "f")


def test_replayed_pruners_keep_the_best_and_save_compute():
    pytest.importorskip("optuna")
    runs = grid_runs(n=9)
    table = tpe.pruner_table(runs, 0.2, 20, unit="examples", n_random=20)
    assert list(table["method"]) == ["Optuna + tse_pruner (TSE-E, top 1)", "Optuna + SuccessiveHalvingPruner (eta 3)"]
    assert (table["regret"] == 0).all() and (table["saved"] > 0.3).all()
    import optuna

    never = tpe.replay_pruner(runs, optuna.pruners.NopPruner(), unit="examples")
    assert never.saved == pytest.approx(0) and never.regret == 0
    with pytest.raises(ConfigError, match="reports"):
        tpe.replay_pruner(runs, optuna.pruners.NopPruner(), reports="test")


def test_verify_study_fails_on_a_non_finite_rho():
    from chemscale.checks import StudyCheckError

    runs = grid_runs()
    agreement = tpe.agreement_table(runs, [0.1], 20, n_boot=50).assign(family="f")
    searches = tpe.search_table(runs, [0.1], 20, unit="examples", n_random=5).assign(family="f")
    assert "f: ρ finite for 4" in tpe.verify_study(agreement, searches, ["f"])
    with pytest.raises(StudyCheckError, match="ρ of TSE at 10% is nan"):
        tpe.verify_study(agreement.assign(rho=np.nan), searches, ["f"])
    with pytest.raises(StudyCheckError, match="g: no rank agreement"):
        tpe.verify_study(agreement, searches, ["f", "g"])


def test_study_figures_draw_one_panel_per_family():
    import matplotlib.pyplot as plt

    runs = grid_runs()
    agreement = tpe.agreement_table(runs, [0.1, 0.2], 20, n_boot=50)
    searches = tpe.search_table(runs, [0.1, 0.2], 20, unit="examples", n_random=5)
    two = pd.concat([agreement.assign(family="a"), agreement.assign(family="b")])
    figs = [tpe.agreement_plot(two), tpe.scatter_plot({"a": (runs, "test_loss")}, 0.2, 20),
            tpe.search_plot(pd.concat([searches.assign(family="a"), searches.assign(family="b")]))]
    assert [len(f.axes) for f in figs] == [2, 1, 2]
    assert all(" ".join(f.get_suptitle().split("\n")[1:]) == tpe.FIXED_BUDGET for f in figs)  # none converged
    figs.append(tpe.agreement_plot(two, title="t", note=None))
    assert figs[-1].get_suptitle() == "t"
    for f in figs:
        plt.close(f)


def test_a_config_finished_under_a_study_is_not_trained_again(runs_root, monkeypatch):
    """Notebook 03 puts its runs in notebook 01's study folder: a config 01 trained is found there and reused."""
    from conftest import tiny_lm_config

    from chemscale import sweep

    first = sweep.run([tiny_lm_config(study="smoke_chemgpt", max_steps=6, val_every_steps=3)], progress=False,
                      root=runs_root)
    result = Path(first["run_dir"][0]) / "result.json"
    before = result.read_bytes()
    monkeypatch.setattr(sweep, "_train_command", lambda run_dir: [sys.executable, "-c", "raise SystemExit(3)"])
    base = {k: v for k, v in tiny_lm_config(max_steps=6, val_every_steps=3).items() if k != "study"}
    again = sweep.run(sweep.grid("smoke_chemgpt", base, lr=[3e-3]), progress=False, root=runs_root)
    assert list(again["status"]) == ["finished"] and list(again["run_dir"]) == list(first["run_dir"])
    assert result.read_bytes() == before
    with pytest.raises(sweep.SweepFailed):  # the same settings in another study folder are another run
        sweep.run(sweep.grid("another_study", base, lr=[3e-3]), progress=False, root=runs_root)


@pytest.mark.parametrize("kwargs, message", [
    ({"fractions": [0.0]}, r"budget fractions in \(0, 1\], got \[0.0\]"),
    ({"scatter_fraction": 1.2}, r"budget fractions in \(0, 1\], got \[1.2\]"),
    ({"eta": 1}, "eta .* must be >= 2, got 1"),
    ({"n_random": 0}, "n_random .* must be >= 1, got 0"),
    ({"top_k": 0}, "top_k .* must be >= 1, got 0"),
    ({"top_k": 5}, "ChemGPT grid has 4 configuration.*top_k = 5"),
    ({"grids": {"ChemGPT": [{}] * 4, "force field": [{}] * 2}}, "force field grid has 2 configuration.*at least 3")])
def test_check_study_refuses_analysis_parameters_before_any_run_trains(kwargs, message):
    """Notebook 03 reads these only after the whole grid has trained: each is refused from the grids alone."""
    args = {"grids": {"ChemGPT": [{}] * 4, "force field": [{}] * 4}, "fractions": [0.05, 1.0], "scatter_fraction": 0.2,
            "top_k": 1, "eta": 3, "n_random": 200}
    tpe.check_study(**args)
    with pytest.raises(ConfigError, match=message):
        tpe.check_study(**{**args, **kwargs})
