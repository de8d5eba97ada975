"""The training runner: run folder contents, determinism, resume, divergence, config errors."""

import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from chemscale import energy, paths, runs, sweep, task, train
from chemscale.lm import loader
from chemscale.config import ConfigError
from conftest import tiny_lm_config


def _metrics(run_dir):
    with open(run_dir / runs.METRICS) as f:
        return list(csv.DictReader(f))


def test_run_writes_config_metrics_and_result(runs_root):
    run_dir = runs.create("t", tiny_lm_config(), runs_root)
    result = train.train(run_dir)
    assert result["status"] == "finished" and result["steps"] == 20
    rows = _metrics(run_dir)
    steps = [int(r["step"]) for r in rows if r["train_loss"]]
    assert steps == list(range(1, 21)), "one training-loss row per optimizer step (counted from 1)"
    vals = [float(r["val_loss"]) for r in rows if r["val_loss"]]
    assert len(vals) == 2 and result["best_val_loss"] == pytest.approx(min(vals), rel=1e-5)
    saved = json.loads((run_dir / runs.RESULT).read_text())
    assert saved["n_params_non_embedding"] > 0 and saved["tokens_seen"] > 0
    assert saved["flops_at_best"] == saved["flops_per_token"] * saved["tokens_at_best"]
    meta = runs.read_config(run_dir)["meta"]
    assert meta["versions"]["torch"] and "git_commit" in meta


def test_same_seed_gives_same_losses(runs_root):
    a = runs.create("a", tiny_lm_config("a"), runs_root)
    b = runs.create("b", tiny_lm_config("b"), runs_root)
    train.train(a)
    train.train(b)
    assert [r["train_loss"] for r in _metrics(a)] == [r["train_loss"] for r in _metrics(b)]


class _Crash(RuntimeError):
    pass


def _crash_at(monkeypatch, step):
    """Make the next `train.train` die before optimizer step `step + 1`, as a killed job would."""
    import pytorch_lightning as pl

    class Crash(pl.Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == step:
                raise _Crash(f"simulated crash after step {step}")

    real = train._callbacks
    monkeypatch.setattr(train, "_callbacks", lambda *a: (real(*a)[0], [Crash()]))
    return lambda: monkeypatch.setattr(train, "_callbacks", real)


def _train_until_crash(monkeypatch, run_dir, step):
    """Train `run_dir` until a crash after `step` (its checkpoint is the last validation's)."""
    restore = _crash_at(monkeypatch, step)
    with pytest.raises(_Crash):
        train.train(run_dir)
    restore()
    assert not runs.is_finished(run_dir) and (run_dir / runs.CHECKPOINT).exists()


def _edit_config(run_dir, section, key, value):
    """Change one value of a run's config.json by hand."""
    config = json.loads((run_dir / runs.CONFIG).read_text())
    config[section][key] = value
    (run_dir / runs.CONFIG).write_text(json.dumps(config))


def _losses(run_dir):
    """Every training loss and every validation loss of a run, exactly as logged."""
    rows = _metrics(run_dir)
    return ([(int(r["step"]), float(r["train_loss"])) for r in rows if r["train_loss"]],
            [(int(r["step"]), float(r["val_loss"])) for r in rows if r["val_loss"]])


@pytest.mark.parametrize("val_every,crash_after,max_steps", [
    (10, 15, 20),  # checkpoint at step 10: mid-epoch (200 molecules / 16 = 12 batches an epoch)
    (12, 18, 24),  # checkpoint at step 12: an epoch's end
])
def test_resumed_run_repeats_the_uninterrupted_run(runs_root, monkeypatch, val_every, crash_after, max_steps):
    """Data order and random state come back with the checkpoint: every loss equal, not close (dropout on)."""
    config = tiny_lm_config(val_every_steps=val_every, max_steps=max_steps)
    config["model"]["dropout"] = 0.1  # draws from torch's global RNG every step
    whole = runs.create("t", config, runs_root / "whole")
    expected = train.train(whole)
    run_dir = runs.create("t", config, runs_root / "crashed")
    _train_until_crash(monkeypatch, run_dir, crash_after)
    result = train.train(run_dir)
    assert result["resumed_from_step"] == val_every and result["steps"] == max_steps
    train_losses, val_losses = _losses(run_dir)
    assert [s for s, _ in train_losses] == list(range(1, max_steps + 1)), "each step once: no row duplicated or lost"
    assert (train_losses, val_losses) == _losses(whole)
    assert result["best_val_loss"] == expected["best_val_loss"] and val_losses[-1] == _losses(whole)[1][-1]


def test_resumed_force_field_run_repeats_the_uninterrupted_run(runs_root, monkeypatch):
    from test_ff_task import tiny_ff_config

    config = tiny_ff_config(val_every_steps=5, max_steps=10)  # 24 structures / 8 = 3 batches an epoch
    whole = runs.create("ff", config, runs_root / "whole")
    train.train(whole)
    run_dir = runs.create("ff", config, runs_root / "crashed")
    _train_until_crash(monkeypatch, run_dir, 7)
    assert train.train(run_dir)["resumed_from_step"] == 5  # mid-epoch: one epoch of 3 batches, then 2
    assert _losses(run_dir) == _losses(whole)


def test_sampler_order_depends_on_seed_and_epoch_and_resumes_at_the_step(monkeypatch):
    steps = [0]
    sampler = loader.ResumableSampler(50, 8, seed=3, steps_done=lambda: steps[0])  # 6 whole batches an epoch
    epoch0 = list(sampler)
    assert len(epoch0) == len(sampler) == 48 and len(set(epoch0)) == 48
    steps[0] = 6
    epoch1 = list(sampler)
    assert epoch1 != epoch0 and list(loader.ResumableSampler(50, 8, 3, lambda: 6)) == epoch1
    steps[0] = 6 + 4  # epoch 1, 4 batches done
    assert list(sampler) == epoch1[32:]
    assert len(list(loader.ResumableSampler(5, 8, 3, lambda: 0))) == 5, "fewer items than a batch: one short batch"
    shards = []
    for rank in (0, 1):
        monkeypatch.setattr(loader.ResumableSampler, "_rank_world", staticmethod(lambda r=rank: (r, 2)))
        shards.append(list(loader.ResumableSampler(50, 8, 3, lambda: 0)))
    assert len(shards[0]) == len(shards[1]) == 24 and not set(shards[0]) & set(shards[1]), "DDP shares are disjoint"


def test_metrics_without_a_checkpoint_start_again_from_scratch(runs_root, monkeypatch):
    """Deleting last.ckpt restarts at step 1; the old rows are dropped, not appended to."""
    run_dir = runs.create("t", tiny_lm_config(), runs_root)
    _train_until_crash(monkeypatch, run_dir, 15)
    assert _losses(run_dir)[1], "the crashed attempt logged rows"
    (run_dir / runs.CHECKPOINT).unlink()
    result = train.train(run_dir)
    assert result["resumed_from_step"] is None and result["steps"] == 20
    train_losses, val_losses = _losses(run_dir)
    assert [s for s, _ in train_losses] == list(range(1, 21)) and [s for s, _ in val_losses] == [10, 20]


def test_damaged_metrics_are_refused_not_silently_shortened(runs_root, monkeypatch):
    """Rows before the checkpoint cannot be rebuilt: a resume refuses, naming the file and --retrain."""
    run_dir = runs.create("t", tiny_lm_config(), runs_root)
    _train_until_crash(monkeypatch, run_dir, 15)  # checkpoint and rows up to step 10
    path = run_dir / runs.METRICS
    good = path.read_bytes()
    damaged = {"header removed": good.split(b"\n", 1)[1], "cut mid-row": good[: len(good) // 2],
               "empty": b"", "random bytes": bytes(range(256)) * 80, "missing": None}
    for what, content in damaged.items():
        path.unlink(missing_ok=True)
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(train.BadMetrics, match="--retrain") as err:
            train.train(run_dir)
        assert str(path) in str(err.value), what
        assert content is None and not path.exists() or path.read_bytes() == content, f"{what}: left as it was"
    proc = subprocess.run([sys.executable, "-m", "chemscale.train", str(run_dir)], capture_output=True, text=True,
                          cwd=paths.ROOT)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    path.write_bytes(good)
    assert train.train(run_dir)["resumed_from_step"] == 10
    assert b"\r" not in path.read_bytes(), "one line ending, whether appended or rewritten (item 9)"
    assert [s for s, _ in _losses(run_dir)[0]] == list(range(1, 21))


def test_a_resumed_run_counts_the_training_seconds_before_the_resume(runs_root, monkeypatch):
    run_dir = runs.create("t", tiny_lm_config(max_steps=12), runs_root)
    _train_until_crash(monkeypatch, run_dir, 11)  # checkpoint at step 10; the resume trains 2 steps
    state = torch.load(run_dir / runs.CHECKPOINT, weights_only=False)["callbacks"]
    (before,) = [v["train_seconds"] for v in state.values() if "train_seconds" in v]
    result = train.train(run_dir)
    assert before > 0 and result["train_seconds"] >= before, "steps 1-10 count, not only steps 11-12"


def test_truncated_checkpoint_names_the_file_and_the_way_out(runs_root, monkeypatch):
    run_dir = runs.create("t", tiny_lm_config(), runs_root)
    _train_until_crash(monkeypatch, run_dir, 15)
    ckpt = run_dir / runs.CHECKPOINT
    truncated = ckpt.read_bytes()[: ckpt.stat().st_size // 2]
    ckpt.write_bytes(truncated)
    with pytest.raises(train.BadCheckpoint, match="--retrain") as err:
        train.train(run_dir)
    assert str(ckpt) in str(err.value)
    proc = subprocess.run([sys.executable, "-m", "chemscale.train", str(run_dir)], capture_output=True, text=True,
                          cwd=paths.ROOT)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert str(ckpt) in proc.stderr
    result = train.train(run_dir, retrain=True)
    assert result["status"] == "finished" and result["resumed_from_step"] is None
    assert [s for s, _ in _losses(run_dir)[0]] == list(range(1, 21))
    (moved,) = (run_dir / train.PREVIOUS).iterdir()
    assert (moved / runs.CHECKPOINT).read_bytes() == truncated, "the damaged file is moved aside, not deleted"


def test_a_checkpoint_changed_after_it_was_written_is_refused(runs_root, monkeypatch):
    """Flipped bytes load without error (they land in the optimizer's state, then NaN); the sha256 catches them."""
    run_dir = runs.create("t", tiny_lm_config(), runs_root)
    _train_until_crash(monkeypatch, run_dir, 15)
    ckpt = run_dir / runs.CHECKPOINT
    good = ckpt.read_bytes()
    middle = len(good) // 2
    ckpt.write_bytes(good[:middle] + b"\xff" * 8 + good[middle + 8:])
    with pytest.raises(train.BadCheckpoint, match="sha256 differs.*--retrain") as err:
        train.train(run_dir)
    assert str(ckpt) in str(err.value)
    ckpt.write_bytes(good)
    newer = run_dir / ".newer.ckpt"
    newer.write_bytes(good + b"another checkpoint")
    with monkeypatch.context() as m:  # a crash between the checksum's write and the checkpoint's move
        m.setattr(train.os, "replace", lambda *a: (_ for _ in ()).throw(_Crash("killed")))
        with pytest.raises(_Crash):
            train._commit_checkpoint(newer, run_dir)
    assert train.train(run_dir)["resumed_from_step"] == 10, "the previous checkpoint's sum is kept beside the new one"


def test_finished_run_is_left_alone_unless_retrained(runs_root):
    run_dir = runs.create("t", tiny_lm_config(), runs_root)
    train.train(run_dir)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    proc = subprocess.run([sys.executable, "-m", "chemscale.train", str(run_dir)], capture_output=True, text=True,
                          cwd=paths.ROOT)
    assert proc.returncode == 0 and "already finished" in proc.stdout and "--retrain" in proc.stdout
    assert train.train(run_dir) == json.loads(before[runs.RESULT])
    assert train.train_or_leave(run_dir) == (json.loads(before[runs.RESULT]), True), "decided under the lock"
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before, "nothing rewritten"
    assert train.train(run_dir, retrain=True)["status"] == "finished"
    (moved,) = (run_dir / train.PREVIOUS).iterdir()
    for name in (runs.RESULT, runs.METRICS, runs.CHECKPOINT, "best.pt"):
        assert (moved / name).read_bytes() == before[name], f"the earlier {name} is kept, unchanged"
    assert [s for s, _ in _losses(run_dir)[0]] == list(range(1, 21)), "the new metrics start afresh"
    assert (run_dir / runs.CONFIG).read_bytes() == before[runs.CONFIG]


@pytest.mark.parametrize("section,key,value", [("train", "lr", 0.1), ("model", "width", 32)])
def test_edited_config_is_refused(runs_root, section, key, value, monkeypatch):
    run_dir = runs.create("t", tiny_lm_config(), runs_root)
    _train_until_crash(monkeypatch, run_dir, 15)
    _edit_config(run_dir, section, key, value)
    with pytest.raises(ConfigError, match="edited by hand") as err:
        train.train(run_dir)
    assert str(run_dir / runs.CONFIG) in str(err.value) and run_dir.name in str(err.value)
    assert not runs.is_finished(run_dir)


def test_cli_refuses_an_edited_config_in_one_line(runs_root):
    run_dir = runs.create("t", tiny_lm_config(), runs_root)
    _edit_config(run_dir, "train", "lr", 0.1)
    proc = subprocess.run([sys.executable, "-m", "chemscale.train", str(run_dir)], capture_output=True, text=True,
                          cwd=paths.ROOT)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
    assert "hash to run id" in proc.stderr and str(run_dir / runs.CONFIG) in proc.stderr


def test_divergence_is_caught_at_the_step_it_happens(runs_root):
    run_dir = runs.create("t", tiny_lm_config(lr=1e9, grad_clip=0.0, max_steps=30), runs_root)
    result = train.train(run_dir)
    assert result["status"] == "diverged" and result["stop_reason"] == "diverged" and runs.is_finished(run_dir)
    assert result["convergence"] == "diverged"
    train_losses, val_losses = _losses(run_dir)
    bad = [s for s, loss in train_losses if not math.isfinite(loss)]
    assert bad and bad[0] == result["steps"] == train_losses[-1][0], "stopped at the first non-finite loss"
    assert result["steps"] < 10 and not val_losses, "before the first validation (step 10)"
    assert f"at step {result['steps']}" in result["reason"]
    outcome = train._outcome(result)  # the CLI's last line: why it stopped, not 'best val loss None at step -1'
    assert outcome.startswith(f"diverged: {result['reason']}") and "None" not in outcome and "-1" not in outcome
    assert "nan" in result["reason"].lower() or "inf" in result["reason"].lower()


def test_loss_watch_reads_each_step_on_cpu_and_one_step_late_when_deferred():
    """The deferred path (GPUs: no sync per step) runs here on CPU tensors, on any machine."""
    now = train.LossWatch()
    assert [now.update(torch.tensor(x)) for x in (2.0, 1.5, float("inf"))] == [False, False, True]
    assert train.LossWatch().update(torch.tensor(float("nan")))
    late = train.LossWatch(deferred=True)
    seen = [late.update(torch.tensor(x)) for x in (2.0, 1.5, float("nan"), 1.0, 1.0)]
    assert seen == [False, False, False, True, True], "seen one step late, and the flag is sticky"


def test_recorded_learning_rate_is_the_one_each_step_applied(runs_root):
    config = tiny_lm_config(warmup_steps=5, max_steps=20)
    run_dir = runs.create("t", config, runs_root)
    train.train(run_dir)
    schedule = task.lr_lambda(5, 20)
    rows = [r for r in _metrics(run_dir) if r["train_loss"]]
    # Step k (counted from 1) is the scheduler's step k - 1: warm-up 0.2, 0.4, ... 1.0, then cosine.
    assert [float(r["current_lr"]) for r in rows] == [pytest.approx(3e-3 * schedule(k - 1), rel=1e-7)
                                                      for k in range(1, 21)]
    assert float(rows[0]["current_lr"]) == pytest.approx(3e-3 / 5) and float(rows[4]["current_lr"]) == 3e-3


def test_learning_rate_schedule_warms_up_then_decays_to_a_tenth():
    f = task.lr_lambda(10, 110)
    assert [f(s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    decay = [f(s) for s in range(10, 111)]
    assert decay[0] == 1.0 and all(a > b for a, b in zip(decay, decay[1:]))
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert task.lr_lambda(0, 100)(0) == 1.0


def test_early_stopping_stops_at_the_validation_where_patience_runs_out(runs_root):
    """patience 2: two validations in a row without a new best end the run, within its first epoch."""
    config = tiny_lm_config(lr=0.05, warmup_steps=0, val_every_steps=4, patience=2, max_steps=100)
    config["data"]["n_train_molecules"] = 2000  # 125 batches an epoch: the stop falls in epoch 0
    run_dir = runs.create("t", config, runs_root)
    result = train.train(run_dir)
    rows = _metrics(run_dir)
    vals = [(int(r["step"]), float(r["val_loss"])) for r in rows if r["val_loss"]]
    waits = _waits([loss for _, loss in vals])
    expected = next(step for (step, _), wait in zip(vals, waits) if wait == 2)
    assert 1 in waits[: waits.index(2) - 1], "one validation without a new best (then a new best) went on"
    assert result["steps"] == expected == vals[-1][0] and result["stop_reason"] == "early_stopped"
    assert result["stopped_early"] is True and {r["epoch"] for r in rows} == {"0"}
    assert result["convergence"] == "converged", "early stopping ended it: the loss is the model's"
    assert result["best_val_loss"] == pytest.approx(min(loss for _, loss in vals), rel=1e-8)


def _waits(losses):
    """Validations in a row without a new best, after each validation (EarlyStopping's count, min_delta 0)."""
    best, wait, out = math.inf, 0, []
    for loss in losses:
        best, wait = (loss, 0) if loss < best else (best, wait + 1)
        out.append(wait)
    return out


def test_a_run_that_uses_its_step_budget_says_so(runs_root):
    result = train.train(runs.create("t", tiny_lm_config(patience=5), runs_root))
    assert result["stop_reason"] == "max_steps" and result["stopped_early"] is False and result["steps"] == 20
    assert result["convergence"] == "capped", "the step cap ended it: the loss is the budget's"


def test_a_run_whose_patience_runs_out_at_its_last_step_converged(runs_root):
    """Patience that runs out at the validation of step max_steps is an early stop, not a cap: the same run
    with a larger cap stops at that step with the same losses, and must not be told apart from it."""
    def run(max_steps):  # min_rel_improvement 0.5: no validation after the first is a gain, so patience 2 ends at 30
        config = tiny_lm_config(schedule="plateau", plateau_patience=0, patience=2, min_rel_improvement=0.5,
                                max_steps=max_steps)
        return train.train(runs.create("t", config, runs_root))

    at_cap, below_cap = run(30), run(40)
    assert below_cap["steps"] == at_cap["steps"] == 30 and below_cap["convergence"] == "converged"
    assert at_cap["best_val_loss"] == below_cap["best_val_loss"]
    assert at_cap["stop_reason"] == "early_stopped" and at_cap["convergence"] == "converged"


@pytest.mark.parametrize("section,key,value,message", [
    ("train", "learning_rate", 0.1, "unknown key"),
    ("train", "max_steps", "many", "max_steps"),
    ("model", "width", -4, "width"),
    ("train", "precision", "fp8", "precision"),
])
def test_bad_config_names_key_and_file(runs_root, section, key, value, message):
    run_dir = runs.create("t", tiny_lm_config(), runs_root)
    _edit_config(run_dir, section, key, value)  # a hand edit: values are checked before the id
    with pytest.raises(ConfigError, match=message) as err:
        train.train(run_dir)
    assert str(run_dir / runs.CONFIG) in str(err.value)


def test_cli_reports_config_errors(runs_root):
    run_dir = runs.create("t", tiny_lm_config(), runs_root)
    _edit_config(run_dir, "train", "bogus", 1)
    proc = subprocess.run([sys.executable, "-m", "chemscale.train", str(run_dir)], capture_output=True, text=True,
                          cwd=paths.ROOT)
    assert proc.returncode == 2 and "bogus" in proc.stderr and "config.json" in proc.stderr


def test_a_run_reports_the_molecules_it_trained_on_and_refuses_a_context_none_fits(runs_root):
    """Molecules longer than n_positions are dropped: the result's n_train_molecules (a fit's x) counts the rest."""
    config = tiny_lm_config(max_steps=4, val_every_steps=2)
    config["model"]["n_positions"] = 40
    result = train.train(runs.create("t", config, runs_root))
    assert result["dropped_too_long"] > 0 and result["n_train_molecules_asked"] == 200
    assert result["n_train_molecules"] < 200 and result["n_val_molecules"] <= 64
    assert result["n_train_molecules"] + result["n_val_molecules"] + result["dropped_too_long"] == 200 + 64
    assert sweep.collect("t", runs_root)["n_train_molecules"].tolist() == [result["n_train_molecules"]]
    config["model"]["n_positions"] = 20  # no MOSES molecule is that short
    run_dir = runs.create("t", config, runs_root)
    with pytest.raises(ConfigError, match=r"n_positions = 20, but none of the 200 training molecules fits "
                                          r"\(the shortest needs \d+ positions") as err:
        train.train(run_dir)
    assert str(run_dir / runs.CONFIG) in str(err.value) and not runs.is_finished(run_dir)


def test_a_run_being_trained_elsewhere_is_refused_and_left_alone(runs_root):
    fcntl = pytest.importorskip("fcntl")
    run_dir = runs.create("t", tiny_lm_config(), runs_root)
    with open(run_dir / train.LOCK, "a+") as held:  # another trainer of this run, as far as flock can tell
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242 on elsewhere\n")
        held.flush()
        with pytest.raises(train.RunInProgress, match="pid 4242 on elsewhere"):
            train.train(run_dir)
        out = subprocess.run([sys.executable, "-m", "chemscale.train", str(run_dir)], capture_output=True, text=True,
                             cwd=paths.ROOT)
        assert out.returncode == 2 and "being trained by another process" in out.stderr
    assert not (run_dir / runs.RESULT).exists() and not (run_dir / runs.METRICS).exists()
    assert train.train(run_dir)["status"] == "finished"  # free again once the holder is gone


def test_plateau_schedule_lowers_the_rate_after_validations_without_improvement(runs_root):
    """schedule: plateau warms up, then halves the rate once plateau_patience + 1 validations did not improve."""
    config = tiny_lm_config(lr=0.05, warmup_steps=3, val_every_steps=2, max_steps=40, patience=0,
                            schedule="plateau", plateau_factor=0.5, plateau_patience=1)
    run_dir = runs.create("t", config, runs_root)
    train.train(run_dir)
    rows = _metrics(run_dir)
    lrs = {int(r["step"]): float(r["current_lr"]) for r in rows if r["train_loss"]}
    assert [lrs[s] for s in (1, 2, 3)] == pytest.approx([0.05 / 3, 0.1 / 3, 0.05]), "linear warm-up over 3 steps"
    vals = [(int(r["step"]), float(r["val_loss"])) for r in rows if r["val_loss"]]
    # torch's rule (threshold 1e-4 relative): a reduction after the 2nd validation in a row without a new best.
    best, bad, factor, expected = math.inf, 0, 1.0, {}
    for step, loss in vals:
        if loss < best * (1 - 1e-4):
            best, bad = loss, 0
        else:
            bad += 1
        if bad > 1:
            factor, bad = factor * 0.5, 0
        expected[step] = factor
    assert min(expected.values()) < 1, "lr 0.05 on a tiny model must plateau within 20 validations"
    for step, loss in vals[:-1]:  # the rate of the step after each validation is the one it set
        assert lrs[step + 1] == pytest.approx(0.05 * expected[step], rel=1e-6)


def test_plateau_schedule_resumes_with_its_state(runs_root, monkeypatch):
    """The plateau scheduler's counters travel in the checkpoint: a resumed run equals the uninterrupted one."""
    config = tiny_lm_config(lr=0.05, warmup_steps=0, val_every_steps=2, max_steps=24, patience=0,
                            schedule="plateau", plateau_patience=0)
    whole = runs.create("t", config, runs_root / "whole")
    train.train(whole)
    run_dir = runs.create("t", config, runs_root / "crashed")
    _train_until_crash(monkeypatch, run_dir, 15)
    assert train.train(run_dir)["resumed_from_step"] == 14
    assert _losses(run_dir) == _losses(whole)
    lr = [r["current_lr"] for r in _metrics(run_dir) if r["train_loss"]]
    assert lr == [r["current_lr"] for r in _metrics(whole) if r["train_loss"]] and len(set(lr)) > 1


@pytest.mark.parametrize("train_kw,message", [
    ({"schedule": "step"}, "schedule"), ({"plateau_factor": 1.0}, "plateau_factor"),
    ({"schedule": "plateau", "patience": 3, "plateau_patience": 2}, "patience"),
])
def test_bad_schedule_settings_are_named(train_kw, message):
    from chemscale.config import ConfigError
    from chemscale.run_config import TrainConfig

    with pytest.raises(ConfigError, match=message):
        TrainConfig(**train_kw)


def test_early_stopping_with_a_relative_threshold_ignores_smaller_improvements(runs_root):
    """min_rel_improvement 5%: validations that lower the loss by less do not reset patience."""
    config = tiny_lm_config(lr=0.01, warmup_steps=0, val_every_steps=2, patience=2, max_steps=200,
                            min_rel_improvement=0.05)
    run_dir = runs.create("t", config, runs_root)
    result = train.train(run_dir)
    vals = [float(r["val_loss"]) for r in _metrics(run_dir) if r["val_loss"]]
    best, wait, stop = math.inf, 0, None
    for i, loss in enumerate(vals):
        best, wait = (loss, 0) if loss < best * 0.95 else (best, wait + 1)
        if wait == 2:
            stop = i
            break
    assert stop is not None and stop == len(vals) - 1, "the run ends at the 2nd validation without a 5% gain"
    assert result["stop_reason"] == "early_stopped" and result["steps"] < 200
    assert any(b < a for a, b in zip(vals, vals[1:stop + 1]) if b > a * 0.95), "a small gain was seen and ignored"


class _StandInNVML:
    """In place of pynvml, the calls `chemscale.energy` makes: a counter (mJ) that moves by `step` at each
    read, and the values it returned, so a test knows what the run must report."""

    def __init__(self, start: int, step: int, fail: Exception | None = None):
        self.next, self.step, self.fail, self.values = start, step, fail, []

    def nvmlInit(self):
        pass

    def nvmlDeviceGetHandleByUUID(self, uuid):
        return uuid

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        if self.fail is not None:
            raise self.fail
        self.values.append(self.next)
        self.next += self.step
        return self.values[-1]


def _stand_in_nvml(monkeypatch, start=5_000_000, step=1_234_567, fail=None):
    """Force the energy counter on, on any machine: a stand-in pynvml, and the training device taken for a GPU."""
    nvml = _StandInNVML(start, step, fail)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setattr(energy, "nvml_uuid", lambda device: "GPU-stand-in")
    return nvml


def test_energy_is_the_gpu_counter_difference_where_nvml_reads_it_and_null_with_why_elsewhere(runs_root, monkeypatch):
    plain = runs.create("t", tiny_lm_config(), runs_root / "plain")
    result = train.train(plain)
    assert result["energy_kj"] is None and result["energy_note"] == energy.NO_GPU, "not measured is never 0"
    nvml = _stand_in_nvml(monkeypatch)
    measured = runs.create("t", tiny_lm_config(), runs_root / "measured")
    assert measured.name == plain.name, "energy is no part of the run's config"
    result = train.train(measured)
    assert len(nvml.values) >= 2 and result["energy_note"] is None
    assert result["energy_kj"] == pytest.approx((nvml.values[-1] - nvml.values[0]) / 1e6), "mJ at the end - at start"
    assert _losses(measured) == _losses(plain), "measuring changes no loss"


def test_a_resumed_run_adds_the_energy_of_the_attempt_before_the_resume(runs_root, monkeypatch):
    run_dir = runs.create("t", tiny_lm_config(max_steps=12), runs_root)
    before = _stand_in_nvml(monkeypatch)
    _train_until_crash(monkeypatch, run_dir, 11)  # reads at training start and at step 10's checkpoint
    assert len(before.values) == 2
    after = _stand_in_nvml(monkeypatch, start=700_000, step=2_000_000)  # another machine: its counter is lower
    result = train.train(run_dir)
    expected = (before.values[1] - before.values[0]) + (after.values[-1] - after.values[0])
    assert result["energy_kj"] == pytest.approx(expected / 1e6), "steps 1-10 count, not only steps 11-12"


@pytest.mark.parametrize("nvml,note", [
    (None, "pynvml is not installed (pip install nvidia-ml-py)"),
    (_StandInNVML(0, 1, fail=RuntimeError("Not Supported")), "(RuntimeError: Not Supported): energy not measured"),
])
def test_a_gpu_whose_energy_nvml_cannot_read_gets_a_note_not_a_number(monkeypatch, nvml, note):
    monkeypatch.setitem(sys.modules, "pynvml", nvml)  # None: `import pynvml` raises ImportError
    monkeypatch.setattr(energy, "nvml_uuid", lambda device: "GPU-stand-in")
    run = energy.RunEnergy()
    run.start(torch.device("cpu"))
    mj, why = run.total(lambda t: t)
    assert mj is None and note in why


def test_a_counter_that_goes_back_or_a_checkpoint_without_energy_gives_no_figure(monkeypatch):
    nvml = _stand_in_nvml(monkeypatch, start=9_000_000, step=-1_000_000)  # the driver reloaded mid-run
    run = energy.RunEnergy()
    run.start(torch.device("cpu"))
    mj, why = run.total(lambda t: t)
    assert mj is None and why == "the GPU's energy counter went back (driver reloaded?): energy not measured"
    nvml.step = 1_000
    resumed = energy.RunEnergy()
    resumed.load_state_dict(None)  # a checkpoint written before energy was recorded
    resumed.start(torch.device("cpu"))
    mj, why = resumed.total(lambda t: t)
    assert mj is None and "no energy figure" in why


_STAND_IN_SITE = '''
import os, sys
import chemscale.energy

class StandInNVML:
    """pynvml's calls that chemscale.energy makes; each read appended to $NVML_LOG/<pid> (one counter a process)."""
    next = 3_000_000
    def nvmlInit(self):
        pass
    def nvmlDeviceGetHandleByUUID(self, uuid):
        return uuid
    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        self.next += 456_789
        with open(os.path.join(os.environ["NVML_LOG"], str(os.getpid())), "a") as f:
            f.write(f"{self.next}\\n")
        return self.next

sys.modules["pynvml"] = StandInNVML()
chemscale.energy.nvml_uuid = lambda device: "GPU-stand-in"
'''


def test_ddp_sums_the_energy_of_every_process_each_read_on_its_own_gpu(runs_root, tmp_path):
    """2 gloo processes, each with its own stand-in counter (a sitecustomize.py, as subprocesses cannot be
    monkeypatched): the run's energy is the sum of their differences."""
    site, log = tmp_path / "site", tmp_path / "nvml"
    site.mkdir()
    log.mkdir()
    (site / "sitecustomize.py").write_text(_STAND_IN_SITE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(paths.ROOT)]), "NVML_LOG": str(log)}
    run_dir = runs.create("t", tiny_lm_config(devices=2, strategy="ddp", max_steps=10, val_every_steps=5), runs_root)
    proc = subprocess.run([sys.executable, "-m", "chemscale.train", str(run_dir)], capture_output=True, text=True,
                          cwd=paths.ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reads = [[int(v) for v in f.read_text().split()] for f in log.iterdir()]
    assert len(reads) == 2, "each process reads its own counter"
    result = json.loads((run_dir / runs.RESULT).read_text())
    assert result["energy_note"] is None
    assert result["energy_kj"] == pytest.approx(sum(r[-1] - r[0] for r in reads) / 1e6)
