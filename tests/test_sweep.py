"""Sweeps: grid generation, skipping finished runs, collecting, failures that do not stop a sweep."""

import pytest

from chemscale import runs, sweep
from chemscale.config import ConfigError
from conftest import tiny_lm_config


def test_grid_ids_are_stable_and_distinct():
    base = tiny_lm_config()
    configs = sweep.grid("s", base, width=[16, 32], n_train_molecules=[100, 200])
    ids = [runs.run_id(c) for c in configs]
    assert len(set(ids)) == 4
    assert ids == [runs.run_id(c) for c in sweep.grid("s", base, width=[16, 32], n_train_molecules=[100, 200])]
    assert {(c["model"]["width"], c["data"]["n_train_molecules"]) for c in configs} == {
        (16, 100), (16, 200), (32, 100), (32, 200)}


def test_grid_rejects_unknown_axis_and_bad_values():
    with pytest.raises(ConfigError, match="widht"):
        sweep.grid("s", tiny_lm_config(), widht=[1])
    with pytest.raises(ConfigError, match="width"):
        sweep.grid("s", tiny_lm_config(), width=[0])


def test_sweep_runs_skips_finished_and_survives_divergence(runs_root):
    base = tiny_lm_config(max_steps=10, val_every_steps=5)
    configs = sweep.grid("s", base, lr=[3e-3, 1e9], **{"train.grad_clip": [0.0]})
    df = sweep.run(configs, progress=False, root=runs_root)
    assert sorted(df["status"]) == ["diverged", "finished"]
    before = {d: (runs_root / "s" / d / runs.RESULT).stat().st_mtime_ns for d in df["run_id"]}
    again = sweep.run(configs, progress=False, root=runs_root)
    after = {d: (runs_root / "s" / d / runs.RESULT).stat().st_mtime_ns for d in again["run_id"]}
    assert before == after, "finished runs are not trained again"
    collected = sweep.collect("s", root=runs_root)
    assert len(collected) == 2 and {"width", "lr", "best_val_loss", "status"} <= set(collected.columns)
    curves = sweep.curves(collected)
    assert {"step", "val_loss", "run_id", "lr"} <= set(curves.columns)


def test_crashed_run_is_reported_and_sweep_continues(runs_root, capsys):
    good = tiny_lm_config(max_steps=4, val_every_steps=2)
    bad = tiny_lm_config(max_steps=4, val_every_steps=2)
    bad["data"]["source"] = "/nonexistent/file.smi"
    df = sweep.run([good, bad], progress=False, root=runs_root)
    assert sorted(df["status"]) == ["crashed", "finished"]
    assert "train.log" in capsys.readouterr().err


def test_submitit_local_executor(runs_root):
    configs = sweep.grid("s", tiny_lm_config(max_steps=4, val_every_steps=2), width=[16])
    df = sweep.run(configs, executor="submitit-local", progress=False, root=runs_root)
    assert list(df["status"]) == ["finished"]
