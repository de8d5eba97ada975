"""A force-field run through `chemscale.train`: metrics in meV, test-set errors, measured FLOPs."""

import csv

import pytest

from chemscale import runs, sweep, train
from chemscale.config import ConfigError

TINY_RECIPE = {"n_train": 40, "n_val": 10, "n_test": 10, "equilibration_steps": 50}


def tiny_ff_config(name="schnet", **train_kw):
    t = {"batch_size": 8, "lr": 2e-3, "warmup_steps": 2, "max_steps": 10, "val_every_steps": 5, "patience": 0,
         "accelerator": "cpu", "threads": 1}
    t.update(train_kw)
    return {"study": "ff", "task": "ff", "seed": 0, "model": {"name": name, "width": 8, "depth": 1},
            "data": {"source": "md:ethanol", "recipe": TINY_RECIPE, "n_train": 24}, "train": t}


def test_ff_run_reports_energy_and_force_errors(runs_root):
    run_dir = runs.create("ff", tiny_ff_config(), runs_root)
    result = train.train(run_dir)
    assert result["status"] == "finished" and result["steps"] == 10
    for key in ("test_energy_mae_mev", "test_force_mae_mev_per_a", "val_energy_mae_mev", "val_force_mae_mev_per_a"):
        assert result[key] > 0
    assert result["n_test_structures"] == 10 and result["n_train_structures"] == 24
    assert result["flops_per_structure"] > 0 and result["flops_at_best"] > 0
    with open(run_dir / runs.METRICS) as f:
        vals = [r for r in csv.DictReader(f) if r["val_loss"]]
    assert len(vals) == 2 and all(float(r["force_mae_mev_per_a"]) > 0 for r in vals)


def test_ff_sweep_axes_and_bad_model_name():
    configs = sweep.grid("ff", tiny_ff_config(), name=["schnet", "painn"], n_train=[8, 16])
    assert {(c["model"]["name"], c["data"]["n_train"]) for c in configs} == {
        ("schnet", 8), ("schnet", 16), ("painn", 8), ("painn", 16)}
    with pytest.raises(ConfigError, match="name"):
        sweep.grid("ff", tiny_ff_config(), name=["dimenet"])
