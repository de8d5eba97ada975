"""Run ids: the hash of a run's complete settings, defaults included; run folders that describe themselves."""

import dataclasses
import json
import subprocess
import sys

import pytest

from chemscale import paths, run_config, runs, train
from chemscale.lm import chemgpt
from chemscale.lm import task as lmtask
from chemscale.config import ConfigError
from conftest import tiny_lm_config


def test_writing_a_default_out_is_the_same_run():
    config = tiny_lm_config()
    explicit = tiny_lm_config(weight_decay=run_config.TrainConfig.weight_decay, precision="32-true")
    explicit["model"]["dropout"] = chemgpt.ChemGPTShape.dropout
    explicit["seed"] = 0
    assert runs.run_id(explicit) == runs.run_id(config)
    assert runs.run_id({**config, "meta": {"created": "now"}}) == runs.run_id(config), "metadata is not a setting"


def test_an_int_for_a_float_key_is_the_same_run():
    assert runs.run_id(tiny_lm_config(lr=1)) == runs.run_id(tiny_lm_config(lr=1.0))
    assert runs.run_id(tiny_lm_config(lr=1)) != runs.run_id(tiny_lm_config(lr=2.0))


def test_changing_a_default_changes_the_id_of_configs_that_rely_on_it(monkeypatch):
    """A finished run of the old default must not be reused for the new one."""
    config = tiny_lm_config()
    before = runs.run_id(config)

    @dataclasses.dataclass
    class NewTrainDefault(run_config.TrainConfig):
        weight_decay: float = 0.01

    monkeypatch.setattr(run_config, "TrainConfig", NewTrainDefault)
    assert runs.run_id(config) != before
    assert runs.run_id(tiny_lm_config(weight_decay=0.1)) == before, "a config that names the value keeps its id"
    monkeypatch.undo()

    @dataclasses.dataclass
    class NewModelDefault(chemgpt.ChemGPTShape):
        n_positions: int = 64

    monkeypatch.setitem(lmtask.SECTIONS, "model", NewModelDefault)
    assert runs.run_id(config) != before


def test_run_folder_holds_every_default_and_keeps_its_id(runs_root, monkeypatch):
    run_dir = runs.create("t", tiny_lm_config(), runs_root)
    stored = runs.read_config(run_dir)
    assert stored["train"]["weight_decay"] == 0.1 and stored["model"]["n_positions"] == 128
    assert stored["data"]["source"] == "moses" and stored["seed"] == 0
    assert run_dir.name == runs.run_id(stored) == runs.run_id(tiny_lm_config())

    @dataclasses.dataclass
    class NewTrainDefault(run_config.TrainConfig):
        weight_decay: float = 0.01

    monkeypatch.setattr(run_config, "TrainConfig", NewTrainDefault)
    runs.check_folder(run_dir, stored)  # its settings are written out: a later default does not orphan it
    assert runs.create("t", tiny_lm_config(), runs_root) != run_dir


def test_create_refuses_a_folder_whose_config_was_edited(runs_root):
    run_dir = runs.create("t", tiny_lm_config(), runs_root)
    config = json.loads((run_dir / runs.CONFIG).read_text())
    config["train"]["lr"] = 0.5
    (run_dir / runs.CONFIG).write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="edited by hand") as err:
        runs.create("t", tiny_lm_config(), runs_root)
    assert str(run_dir / runs.CONFIG) in str(err.value)


def test_folder_of_an_older_chemscale_is_named_as_such(runs_root):
    """Before run ids covered defaults, a folder was named by the hash of the config as written."""
    config = tiny_lm_config()
    old_id = runs._hash(config)
    assert old_id != runs.run_id(config)
    folder = runs_root / "t" / old_id
    folder.mkdir(parents=True)
    (folder / runs.CONFIG).write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="older chemscale"):
        runs.check_folder(folder, config)


def test_a_config_that_does_not_validate_has_no_id():
    with pytest.raises(ConfigError, match="learning_rate"):
        runs.run_id(tiny_lm_config(learning_rate=0.1))
    with pytest.raises(ConfigError, match="'task'"):
        runs.run_id({k: v for k, v in tiny_lm_config().items() if k != "task"})


def test_an_unknown_top_level_key_is_refused_by_name(runs_root):
    """A typo like 'sead' would otherwise be stored and trained with seed 0."""
    with pytest.raises(ConfigError, match=r"unknown top-level key\(s\) \['sead'\] \(did you mean 'seed'\?\)"):
        runs.create("typo", {**tiny_lm_config(), "sead": 1}, runs_root)
    assert not (runs_root / "typo").exists()
    run_dir = runs.create("t", tiny_lm_config(), runs_root)
    config = json.loads((run_dir / runs.CONFIG).read_text())
    (run_dir / runs.CONFIG).write_text(json.dumps({**config, "sead": 1}))  # added to a run by hand
    with pytest.raises(ConfigError, match="unknown top-level key") as err:
        train.train(run_dir)
    assert str(run_dir / runs.CONFIG) in str(err.value) and "hash" not in str(err.value)


def test_a_wrong_run_folder_or_a_damaged_result_is_one_clear_error(runs_root):
    run_dir = runs.create("t", tiny_lm_config(), runs_root)
    with pytest.raises(ConfigError, match=f"a file, not a run folder.*\\({run_dir}\\)"):
        runs.read_config(run_dir / runs.CONFIG)
    with pytest.raises(ConfigError, match="no such run folder"):
        runs.read_config(runs_root / "t" / "nothing")
    proc = subprocess.run([sys.executable, "-m", "chemscale.train", str(run_dir / runs.CONFIG)], capture_output=True,
                          text=True, cwd=paths.ROOT)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    for content in ('{"status": "fini', "[]"):
        (run_dir / runs.RESULT).write_text(content)
        with pytest.raises(ConfigError, match=f"{runs.RESULT}.*damaged.*{run_dir} --retrain"):
            runs.read_result(run_dir)
        with pytest.raises(ConfigError, match="--retrain"):
            train.train(run_dir)


def test_folder_written_before_a_key_existed_names_the_keys_it_lacks(runs_root):
    """A run folder from before the plateau keys (and the test split) existed hashes to its name without them;
    the error names those keys, rather than saying only that run ids once left out defaults."""
    config = runs.read_config(runs.create("t", tiny_lm_config(), runs_root))
    for key in ("schedule", "plateau_factor", "plateau_patience", "min_rel_improvement"):
        del config["train"][key]
    del config["data"]["n_test_molecules"]
    folder = runs_root / "t" / runs._hash(config)
    folder.mkdir(parents=True)
    (folder / runs.CONFIG).write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"older chemscale.*data\.n_test_molecules.*train\.min_rel_improvement"):
        runs.check_folder(folder, config)
