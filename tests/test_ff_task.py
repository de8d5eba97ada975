"""Force-field runs of every model through `chemscale.train`: metrics in meV, test-set errors, measured FLOPs.

The test-set errors a run reports are recomputed here by another path (the ASE calculator on
each test molecule, total energies against the data's total energies) and checked against
ranges that the data set itself gives, so an error in units or in the reduction cannot pass.
"""

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from chemscale import run_config, runs, sweep, train
from chemscale.config import ConfigError
from chemscale.ff import data, models
from chemscale.ff.models import MODELS

TINY_RECIPE = {"n_train": 40, "n_val": 10, "n_test": 10, "equilibration_steps": 50}


def tiny_ff_config(name="schnet", **train_kw):
    t = {"batch_size": 8, "lr": 2e-3, "warmup_steps": 2, "max_steps": 10, "val_every_steps": 5, "patience": 0,
         "accelerator": "cpu", "threads": 1}
    t.update(train_kw)
    return {"study": "ff", "task": "ff", "seed": 0, "model": {"name": name, "width": 8, "depth": 1},
            "data": {"source": "md:ethanol", "recipe": TINY_RECIPE, "n_train_structures": 24}, "train": t}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: a second torch thread only adds contention on a busy machine (conftest restores it)."""
    torch.set_num_threads(1)

_TRAINED: dict[str, tuple[Path, dict]] = {}


def trained(name: str) -> tuple[Path, dict]:
    """A tiny run of model `name`, trained once per test session through the runner; tests only read it."""
    if name not in _TRAINED:
        root = Path(os.environ["CHEMSCALE_RUNS"]) / "trained-ff"  # conftest's session folder
        run_dir = runs.create("ff", tiny_ff_config(name), root)
        _TRAINED[name] = run_dir, train.train(run_dir)
    return _TRAINED[name]


def tiny_test_split() -> data.FFDataset:
    """The test split of the tiny runs (the same recipe for every model)."""
    return data.load(data.as_recipe("md:ethanol", **TINY_RECIPE), "test", progress=False)


@pytest.mark.parametrize("name", MODELS)
def test_ff_run_reports_energy_and_force_errors(name):
    run_dir, result = trained(name)
    assert result["status"] == "finished" and result["steps"] == 10
    assert result["n_test_structures"] == 10 and result["n_train_structures"] == 24
    assert result["flops_per_structure"] > 0 and result["flops_at_best"] > 0
    assert (run_dir / "best.pt").exists() and (run_dir / "best_model.json").exists()
    with open(run_dir / runs.METRICS) as f:
        vals = [r for r in csv.DictReader(f) if r["val_loss"]]
    assert [int(r["step"]) for r in vals] == [5, 10]
    best = next(r for r in vals if int(r["step"]) == result["best_step"])
    assert result["val_energy_mae_mev"] == pytest.approx(float(best["energy_mae_mev"]), rel=1e-5)
    assert result["val_force_mae_mev_per_a"] == pytest.approx(float(best["force_mae_mev_per_a"]), rel=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_reported_test_errors_equal_recomputed_ones(name):
    """Test-set MAEs recomputed from best.pt molecule by molecule (total energies, eV -> meV) match result.json."""
    from chemscale.ff.calculator import ChemscaleCalculator

    run_dir, result = trained(name)
    calc = ChemscaleCalculator.from_run(run_dir)
    test = tiny_test_split()
    energy_errors, force_errors = [], []
    for k in range(len(test)):
        atoms = test.atoms(k)  # labels: total energy (eV) and forces (eV/Å) of the data
        label_energy, label_forces = atoms.get_potential_energy(), atoms.get_forces()
        atoms.calc = calc
        energy_errors.append(abs(atoms.get_potential_energy() - label_energy))
        force_errors.append(np.abs(atoms.get_forces() - label_forces).ravel())
    energy_mae_mev = 1000 * np.mean(energy_errors)
    force_mae_mev = 1000 * np.mean(np.concatenate(force_errors))
    assert result["test_energy_mae_mev"] == pytest.approx(energy_mae_mev, rel=1e-5, abs=1e-4)
    assert result["test_force_mae_mev_per_a"] == pytest.approx(force_mae_mev, rel=1e-5, abs=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_reported_test_errors_are_plausible(name):
    """Between a perfect and a hopeless model: bounds from the test labels themselves, in meV and meV/Å.

    A model after 10 steps is far from converged but is not 5x worse than predicting zero
    forces, nor better than 1% of it; its energy error is between 1 meV and 20 eV per molecule.
    These catch a force unit slip by 1000 even where both code paths share it; the comparison
    with the recomputed errors above is the precise check.
    """
    _, result = trained(name)
    test = tiny_test_split()
    zero_force_mae_mev = 1000 * np.abs(test.forces).mean()  # what predicting F = 0 would score
    assert 500 < zero_force_mae_mev < 5000  # xTB ethanol at 500 K: ~1 eV/Å
    assert 0.01 * zero_force_mae_mev < result["test_force_mae_mev_per_a"] < 5 * zero_force_mae_mev
    assert 1 < result["test_energy_mae_mev"] < 20_000
    assert 0.01 * zero_force_mae_mev < result["val_force_mae_mev_per_a"] < 5 * zero_force_mae_mev


def test_ff_sweep_axes_and_bad_model_name():
    configs = sweep.grid("ff", tiny_ff_config(), name=["schnet", "painn"], n_train_structures=[8, 16])
    assert {(c["model"]["name"], c["data"]["n_train_structures"]) for c in configs} == {
        ("schnet", 8), ("schnet", 16), ("painn", 8), ("painn", 16)}
    with pytest.raises(ConfigError, match="name"):
        sweep.grid("ff", tiny_ff_config(), name=["dimenet"])


def test_a_dataset_without_val_or_test_structures_is_refused(tmp_path):
    """An empty held-out split would report errors of 0.0: refused by validate and build, naming the sizes."""
    from chemscale.ff import task

    config = tiny_ff_config()
    config["data"] = {"source": "md:ethanol", "n_train_structures": 4,
                      "recipe": {"n_train": 4, "n_val": 0, "n_test": 2, "equilibration_steps": 0}}
    expected = r"cfg \[data\]: the val split\(s\) of 'md:ethanol' hold no structures \(splits: .*'val': 0"
    with pytest.raises(ConfigError, match=expected):
        task.validate(config, "cfg", data=True)
    with pytest.raises(ConfigError, match=expected):
        task.build(config, None, tmp_path, "cfg")


def test_a_models_own_options_come_from_the_run_config(runs_root):
    """The registry row's options (schnet's n_filters) are set in the model section; others are refused by name."""
    config = tiny_ff_config(max_steps=2, val_every_steps=2)
    config["model"]["options"] = {"n_filters": 4}
    run_dir = runs.create("ff", config, root=runs_root)
    result = train.train(run_dir)
    default = tiny_ff_config()["model"]
    assert result["status"] == "finished"
    assert result["n_params"] < models.build("schnet", width=default["width"], depth=default["depth"]).n_params()
    assert json.loads((run_dir / "best_model.json").read_text())["build"]["n_filters"] == 4
    config["model"]["options"] = {"l_max": 2}
    with pytest.raises(ConfigError, match=r"\[model\]: schnet has no option\(s\) \['l_max'\]; its options: \['n_filters'\]"):
        runs.create("ff", config, root=runs_root)


def test_a_run_config_from_before_the_data_keys_were_renamed_names_their_new_names(tmp_path):
    """A force-field run folder of issue 8 says n_train/n_val: the error says what they are called now."""
    old = tiny_ff_config()
    old["data"]["n_train"] = old["data"].pop("n_train_structures")
    old["data"].update(n_val=0, energy_wieght=0.1)
    with pytest.raises(ConfigError, match=r"x/config.json \[data\]: key 'n_train' was renamed 'n_train_structures', "
                                          r"'n_val' was renamed 'n_val_structures'; unknown key\(s\) "
                                          r"\['energy_wieght'\]: written by an older chemscale.*run its sweep again"):
        run_config.complete_config(old, "x/config.json")


def test_compile_is_refused_for_a_force_field_not_ignored(runs_root):
    """train.compile is a ChemGPT setting: a force-field sweep that asks for it is refused before any run."""
    with pytest.raises(ConfigError, match=r"\[train\]: key 'compile' is for ChemGPT runs only"):
        sweep.grid("ff", tiny_ff_config(compile="aot_eager"), name=["schnet"])
