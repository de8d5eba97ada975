"""The training runner: run folder contents, determinism, resume, divergence, config errors."""

import csv
import json
import subprocess
import sys

import pytest

from chemscale import paths, runs, train
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


def test_interrupted_run_resumes_without_duplicate_rows(runs_root, monkeypatch):
    import pytorch_lightning as pl

    run_dir = runs.create("t", tiny_lm_config(), runs_root)

    class CrashAt15(pl.Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == 15:
                raise _Crash("simulated crash")

    real = train._callbacks
    monkeypatch.setattr(train, "_callbacks", lambda *a: (real(*a)[0], [CrashAt15()]))
    with pytest.raises(_Crash):
        train.train(run_dir)
    assert not runs.is_finished(run_dir) and (run_dir / runs.CHECKPOINT).exists()
    monkeypatch.setattr(train, "_callbacks", real)
    result = train.train(run_dir)
    assert result["status"] == "finished" and result["resumed_from_step"] == 10 and result["steps"] == 20
    steps = [int(r["step"]) for r in _metrics(run_dir) if r["train_loss"]]
    assert sorted(steps) == list(range(1, 21)), "rows after the checkpoint are rewritten, not duplicated"


def test_diverging_learning_rate_is_recorded_not_raised(runs_root):
    run_dir = runs.create("t", tiny_lm_config(lr=1e9, grad_clip=0.0, max_steps=30), runs_root)
    result = train.train(run_dir)
    assert result["status"] == "diverged"
    assert "nan" in result["reason"].lower() or "inf" in result["reason"].lower()
    assert runs.is_finished(run_dir)


@pytest.mark.parametrize("section,key,value,message", [
    ("train", "learning_rate", 0.1, "unknown key"),
    ("train", "max_steps", "many", "max_steps"),
    ("model", "width", -4, "width"),
    ("train", "precision", "fp8", "precision"),
])
def test_bad_config_names_key_and_file(runs_root, section, key, value, message):
    config = tiny_lm_config()
    config[section][key] = value
    run_dir = runs.create("t", config, runs_root)
    with pytest.raises(ConfigError, match=message) as err:
        train.train(run_dir)
    assert str(run_dir / runs.CONFIG) in str(err.value)


def test_cli_reports_config_errors(runs_root):
    config = tiny_lm_config()
    config["train"]["bogus"] = 1
    run_dir = runs.create("t", config, runs_root)
    proc = subprocess.run([sys.executable, "-m", "chemscale.train", str(run_dir)], capture_output=True, text=True,
                          cwd=paths.ROOT)
    assert proc.returncode == 2 and "bogus" in proc.stderr and "config.json" in proc.stderr


def test_ddp_two_cpu_processes(runs_root):
    """Lightning DDP with the gloo backend: 2 processes train one run and write one result."""
    run_dir = runs.create("t", tiny_lm_config(devices=2, strategy="ddp", max_steps=10, val_every_steps=5), runs_root)
    proc = subprocess.run([sys.executable, "-m", "chemscale.train", str(run_dir)], capture_output=True, text=True,
                          cwd=paths.ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((run_dir / runs.RESULT).read_text())
    assert result["status"] == "finished" and result["steps"] == 10
    assert result["train"]["devices"] == 2


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
