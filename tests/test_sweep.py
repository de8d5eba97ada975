"""Sweeps: grid generation, data sizes checked up front, skipping finished runs, collecting,
failures that do not stop a sweep (and a sweep where all fail), resuming killed runs, parallel runs."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from chemscale import paths, run_config, runs, sweep, train
from chemscale.lm import corpus
from chemscale.config import ConfigError
from chemscale.ff import data as ffdata
from conftest import tiny_lm_config
from test_ff_data import ethanol_arrays, write_rmd17
from test_ff_task import tiny_ff_config

FIXTURE = Path(__file__).parent / "fixtures" / "moses_200.smi"  # 200 lines: a training split of 160


def crashing_config(**train):
    """A run that passes validation and fails as it builds: no MOSES molecule fits 8 positions."""
    config = tiny_lm_config(**train)
    config["model"]["n_positions"] = 8
    return config


def test_grid_ids_are_stable_and_distinct():
    base = tiny_lm_config()
    configs = sweep.grid("s", base, width=[16, 32], n_train_molecules=[100, 200])
    ids = [runs.run_id(c) for c in configs]
    assert len(set(ids)) == 4
    assert ids == [runs.run_id(c) for c in sweep.grid("s", base, width=[16, 32], n_train_molecules=[100, 200])]
    assert {(c["model"]["width"], c["data"]["n_train_molecules"]) for c in configs} == {
        (16, 100), (16, 200), (32, 100), (32, 200)}


NOTEBOOK_PARAMS = {"run_name": "s", "seed": 3, "accelerator": "cpu", "precision": "32-true", "batch_size": 8,
                   "lr": 0.01, "max_steps": 20, "val_every_steps": 5, "patience": 2, "devices": 1, "num_nodes": 1,
                   "width": [16, 32], "depth": 2, "executor": "local", "parallel": 2, "slurm": {}, "max_resubmits": 3,
                   "n_samples": 10, "save_figures": False}


def test_base_config_takes_the_train_fields_and_the_seed_from_notebook_parameters():
    base = sweep.base_config("chemgpt", NOTEBOOK_PARAMS, model={"depth": 2}, data={"source": "moses"})
    assert base == {"task": "chemgpt", "seed": 3, "model": {"depth": 2}, "data": {"source": "moses"},
                    "train": {"batch_size": 8, "lr": 0.01, "max_steps": 20, "val_every_steps": 5, "patience": 2,
                              "precision": "32-true", "accelerator": "cpu", "devices": 1, "num_nodes": 1,
                              "strategy": "auto"}}
    assert set(base["train"]) <= {f.name for f in dataclasses.fields(run_config.TrainConfig)}
    everything = {f.name: getattr(run_config.TrainConfig(), f.name) for f in dataclasses.fields(run_config.TrainConfig)}
    assert sweep.base_config("ff", {**everything, "other": 1})["train"] == everything  # every field, nothing else
    assert sweep.base_config("ff", {}) == {"task": "ff", "model": {}, "data": {}, "train": {"strategy": "auto"}}
    by_hand = {"task": "chemgpt", "seed": 3, "model": {"depth": 2}, "data": {"source": "moses"},  # notebook 01's
               "train": {k: v for k, v in base["train"].items() if k != "strategy"}}          # config cell before
    assert ([runs.run_id(c) for c in sweep.grid("s", base, width=[16, 32])]
            == [runs.run_id(c) for c in sweep.grid("s", by_hand, width=[16, 32])]), "the same runs as before"


def test_base_config_uses_ddp_only_across_devices():
    strategy = lambda **p: sweep.base_config("chemgpt", {**NOTEBOOK_PARAMS, **p})["train"]["strategy"]  # noqa: E731
    assert strategy(devices=1, num_nodes=1) == "auto"
    assert strategy(devices=4, num_nodes=1) == strategy(devices=1, num_nodes=2) == "ddp"
    assert strategy(devices=4, strategy="auto") == "auto"  # a strategy the parameters name is kept


@pytest.mark.parametrize("key, value", [("devices", "auto"), ("devices", None), ("num_nodes", [1]),
                                        ("threads", os), ("lr", "fast")])
def test_base_config_names_a_notebook_global_of_the_wrong_type(key, value):
    """A global that shares a train field's name but not its type fails here, naming the key (not in int())."""
    with pytest.raises(ConfigError, match=f"notebook parameters.*'{key}'"):
        sweep.base_config("chemgpt", {**NOTEBOOK_PARAMS, key: value})


def test_slurm_executor_without_submitit_says_so_before_any_run_folder(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # as if not installed
    configs = sweep.grid("s", tiny_lm_config(), seed=[0])
    for executor in ("slurm", "submitit-local"):
        with pytest.raises(ConfigError, match="needs submitit.*pip install submitit"):
            sweep.run(configs, executor=executor, root=tmp_path, progress=False)
    assert not list(tmp_path.iterdir())


def test_base_config_copies_its_sections():
    model = {"depth": 2}
    base = sweep.base_config("chemgpt", NOTEBOOK_PARAMS, model=model)
    base["model"]["width"] = 16
    assert model == {"depth": 2}


def test_run_options_pass_the_slurm_dict_and_max_resubmits():
    assert sweep.run_options(NOTEBOOK_PARAMS) == {"executor": "local", "parallel": 2, "slurm": {}, "max_resubmits": 3}
    slurm = {"slurm_partition": "gpu", "slurm_account": "chem", "timeout_min": 720}
    options = sweep.run_options({**NOTEBOOK_PARAMS, "executor": "slurm", "slurm": slurm, "max_resubmits": 1})
    assert options == {"executor": "slurm", "parallel": 2, "slurm": slurm, "max_resubmits": 1}
    assert options["slurm"] is not slurm  # run may add to it without changing the notebook's
    assert sweep.run_options({}) == {"executor": "local", "parallel": None, "slurm": {}, "max_resubmits": 3}
    with pytest.raises(ConfigError, match="'slurm' must be a mapping"):
        sweep.run_options({"slurm": "gpu"})


@pytest.mark.parametrize("options, match", [
    ({"executor": "slrum"}, "'executor'.*slrum"),
    ({"slurm": {"slurm_partion": "gpu"}}, "'slurm'.*slurm_partion"),
    ({"slurm": {"slurm_qos": "normal", "slurm_acount": "chem"}}, "'slurm'.*slurm_acount"),
    ({"slurm": {"timeout_min": "2h"}}, "'slurm'.*timeout_min"),
    ({"slurm": {"timeout_min": 1}}, "'slurm'.*1 minutes\\) is shorter than a job needs to reach its first "
                                    "checkpoint.*no run of the study has measured a step yet"),
    ({"max_resubmits": -1}, "'max_resubmits'")])
def test_bad_submitit_options_are_named_before_any_run_folder(runs_root, options, match):
    configs = sweep.grid("s", tiny_lm_config(), seed=[0])
    with pytest.raises(ConfigError, match=match):
        sweep.run(configs, **{"executor": "submitit-local", **options}, root=runs_root, progress=False)
    assert not list(runs_root.iterdir())


@pytest.mark.skipif(bool(shutil.which("srun")), reason="a Slurm cluster node: executor slurm is right here")
def test_executor_slurm_off_a_cluster_says_so_before_any_run_folder(runs_root):
    with pytest.raises(ConfigError, match="'executor'.*not a Slurm cluster"):
        sweep.run([tiny_lm_config()], executor="slurm", root=runs_root, progress=False)
    assert not list(runs_root.iterdir())


def test_job_time_limit_follows_the_measured_budget_and_the_params(runs_root):
    """No run measured yet: a day, not submitit's 60 minutes; then 1.5 x (start + max_steps x slowest s/step)."""
    config = tiny_lm_config(max_steps=20_000, val_every_steps=1000, accelerator="gpu", devices=2)
    params = sweep._job_parameters(config, "slurm", {}, runs_root)
    assert params["timeout_min"] == sweep.DEFAULT_TIMEOUT_MIN
    assert (params["nodes"], params["tasks_per_node"], params["gpus_per_node"]) == (1, 2, 2)
    for name, seconds in (("a", 10.0), ("b", 30.0)):  # two finished runs of the study: 0.1 and 0.3 s per step
        (runs_root / "t" / name).mkdir(parents=True)
        (runs_root / "t" / name / runs.RESULT).write_text(json.dumps({"train_seconds": seconds, "steps": 100}))
    assert sweep._job_parameters(config, "slurm", {}, runs_root)["timeout_min"] == 153  # 1.5 x (120 s + 20,000 x 0.3 s)
    assert sweep._job_parameters(config, "slurm", {"timeout_min": 600}, runs_root)["timeout_min"] == 600
    with pytest.raises(ConfigError, match="first checkpoint.*0.3 s per step"):  # 120 s + 1000 x 0.3 s > 5 min
        sweep._job_parameters(config, "slurm", {"timeout_min": 6}, runs_root)
    with pytest.raises(ConfigError, match="first checkpoint"):  # Slurm's own key wins on Slurm
        sweep._job_parameters(config, "slurm", {"timeout_min": 600, "slurm_time": 6}, runs_root)
    for text in ("6", "6:00", "0:06:00", "0-0:06"):  # sbatch --time's text, passed by submitit unchecked
        with pytest.raises(ConfigError, match=f"'{text}' \\(6 minutes\\) is shorter.*first checkpoint"):
            sweep._job_parameters(config, "slurm", {"slurm_time": text}, runs_root)
    for text in ("1-00:00", "12:00:00", "UNLIMITED"):  # a day, 12 hours, and what only sbatch can judge
        assert sweep._job_parameters(config, "slurm", {"slurm_time": text}, runs_root)["slurm_time"] == text
    assert sweep._minutes("2-03:04:30") == 2 * 1440 + 3 * 60 + 4.5 and sweep._minutes("7:30") == 7.5


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


def test_failed_runs_are_reported_and_a_sweep_where_all_failed_says_so(runs_root, capsys):
    crashing = crashing_config(max_steps=4, val_every_steps=2)
    diverging = tiny_lm_config(max_steps=10, val_every_steps=5, lr=1e9, grad_clip=0.0)
    with pytest.raises(sweep.SweepFailed) as failure:
        sweep.run([crashing, diverging], progress=False, root=runs_root)
    message = str(failure.value)
    assert message.startswith("all 2 runs of this sweep failed (1 crashed, 1 diverged); nothing to analyse")
    crashed = runs_root / "t" / runs.run_id(crashing)
    for config in (crashing, diverging):
        assert f"{runs_root / 't' / runs.run_id(config)}/train.log: " in message
    assert "n_positions = 8" in message.split(f"{crashed}/train.log: ")[1].splitlines()[0]  # why, without the log
    good = tiny_lm_config(max_steps=4, val_every_steps=2)
    df = sweep.run([good, crashing, diverging], progress=False, root=runs_root)  # the crashed run is retried
    assert df["status"].tolist() == ["finished", "crashed", "diverged"]
    err = capsys.readouterr().err
    assert "2 of 3 runs did not finish (1 crashed, 1 diverged)" in err and f"{crashed}/train.log: " in err
    with pytest.raises(ConfigError, match="no run configs"):
        sweep.run([], progress=False, root=runs_root)


# ---------------------------------------------------------------- training-set sizes checked before a sweep

def test_a_training_set_larger_than_the_split_is_refused_before_any_run(runs_root):
    base = tiny_lm_config()
    base["data"]["source"] = str(FIXTURE)
    configs = sweep.grid("s", base, n_train_molecules=[100, 500])
    with pytest.raises(ConfigError, match=r"n_train_molecules = 500, but the training split of '.*moses_200.smi' "
                                          r"leaves 160 molecules"):
        sweep.run(configs, progress=False, root=runs_root)
    assert not (runs_root / "s").exists()  # no run folder was made, nothing trained
    base["data"]["source"] = "moses"
    with pytest.raises(ConfigError, match="n_train_molecules = 2,000,000, but the training split of 'moses' "
                                          "leaves 1,584,663"):
        sweep.check_data(sweep.grid("s", base, n_train_molecules=[2_000_000]))
    sweep.check_data(sweep.grid("s", base, n_train_molecules=[1_584_663]))  # all of it is fine
    base["data"]["source"] = "/nonexistent/file.smi"
    with pytest.raises(ConfigError, match="sweep s \\[data\\]: source '/nonexistent/file.smi': .*no such file"):
        sweep.run(sweep.grid("s", base, width=[16]), progress=False, root=runs_root)


def test_data_is_checked_once_per_source_at_its_largest_size(monkeypatch, tmp_path):
    calls = []
    load = corpus.load
    monkeypatch.setattr(corpus, "load", lambda source, split, n, **kw: calls.append((source, split, n))
                        or load(source, split, n, **kw))
    base = tiny_lm_config()
    base["data"].update(source=str(FIXTURE), n_val_molecules=20, n_test_molecules=20)
    configs = sweep.grid("s", base, width=[16, 32], n_train_molecules=[50, 120, 80])
    sweep.check_data(configs)
    assert calls == [(str(FIXTURE), "train", 120), (str(FIXTURE), "val", 20), (str(FIXTURE), "test", 20)]
    calls.clear()
    other = tiny_lm_config()
    other["data"].update(source=str(tmp_path / "copy.smi"), n_train_molecules=150, n_val_molecules=10,
                         n_test_molecules=10)
    (tmp_path / "copy.smi").write_bytes(FIXTURE.read_bytes())
    sweep.check_data(configs + [other])
    copy = str(tmp_path / "copy.smi")
    assert sorted(calls) == sorted([(str(FIXTURE), "train", 120), (str(FIXTURE), "val", 20), (str(FIXTURE), "test", 20),
                                    (copy, "train", 150), (copy, "val", 10), (copy, "test", 10)])


def test_a_validation_set_larger_than_the_split_is_refused_before_any_run(runs_root):
    """A 200-line file has a validation split of 20: asking 64 would validate every run on 20, with only a warning."""
    base = tiny_lm_config()
    base["data"].update(source=str(FIXTURE), n_train_molecules=100)
    with pytest.raises(ConfigError, match=r"n_val_molecules = 64, but the validation split of '.*moses_200.smi' "
                                          r"leaves 20 molecules that encode; ask for at most 20"):
        sweep.run(sweep.grid("s", base, width=[16]), progress=False, root=runs_root)
    assert not (runs_root / "s").exists()
    base["data"].update(source="moses", n_val_molecules=10_000_000)
    with pytest.raises(ConfigError, match=r"n_val_molecules = 10,000,000, but the validation split of 'moses' "
                                          r"leaves [\d,]+ molecules"):
        sweep.check_data(sweep.grid("s", base, width=[16]))


def test_force_field_sizes_are_checked_before_any_run(runs_root, tmp_path, monkeypatch):
    built = []
    generate = ffdata.generate
    monkeypatch.setattr(ffdata, "generate", lambda recipe, progress=True: built.append(recipe)
                        or generate(recipe, progress))
    configs = sweep.grid("ff", tiny_ff_config(), name=["schnet", "painn"], n_train_structures=[8, 50])
    with pytest.raises(ConfigError, match="n_train_structures = 50, but the train split of 'md:ethanol' has 40; "
                                          "raise the recipe's size"):
        sweep.run(configs, progress=False, root=runs_root)
    val = tiny_ff_config()
    val["data"]["n_val_structures"] = 11
    with pytest.raises(ConfigError, match="n_val_structures = 11, but the val split of 'md:ethanol' has 10"):
        sweep.check_data([val])
    assert built == [] and not (runs_root / "ff").exists()  # refused from the recipe: nothing generated
    z, r, e, f = ethanol_arrays(n=40)
    path = write_rmd17(tmp_path / "rmd17_ethanol.npz", z, r, e, f)  # splits 34 / 2 / 4
    user = tiny_ff_config()
    user["data"].update(source=str(path), recipe={})
    sweep.check_data(sweep.grid("ff", user, name=["schnet", "painn"], n_train_structures=[10, 34]))
    with pytest.raises(ConfigError, match=r"n_train_structures = 35, but the train split of '.*rmd17_ethanol.npz' "
                                          r"has 34$"):
        sweep.check_data(sweep.grid("ff", user, name=["schnet", "painn"], n_train_structures=[10, 35]))
    assert len(built) == 2  # once per check, not once per run


# ---------------------------------------------------------------- retries and parallel runs

def train_rows(run_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training rows, validation rows) of a run's metrics.csv."""
    m = pd.read_csv(run_dir / runs.METRICS)
    return m[m["train_loss"].notna()], m[m["val_loss"].notna()]


def test_a_killed_run_is_resumed_by_the_next_sweep_without_duplicate_metrics(runs_root):
    config = tiny_lm_config(max_steps=300, val_every_steps=5)
    run_dir = runs.create("t", config, runs_root)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(paths.ROOT), os.environ.get("PYTHONPATH")]))}
    with open(run_dir / "train.log", "ab") as log:
        process = subprocess.Popen(sweep._train_command(run_dir), stdout=log, stderr=subprocess.STDOUT, env=env,
                                   cwd=paths.ROOT)
        while not (run_dir / runs.CHECKPOINT).exists():  # killed, as by the OOM killer, after its first checkpoint
            assert process.poll() is None, (run_dir / "train.log").read_text()
            time.sleep(0.02)
        process.kill()
        process.wait()
    assert not runs.is_finished(run_dir) and sweep.collect("t", runs_root)["status"].tolist() == ["pending"]
    df = sweep.run([config], progress=False, root=runs_root)
    assert df["status"].tolist() == ["finished"]
    result = runs.read_result(run_dir)
    assert result["steps"] == 300 and result["resumed_from_step"] > 0
    training, validations = train_rows(run_dir)
    assert training["step"].tolist() == sorted(set(training["step"])) and len(training) == 300  # each step once
    assert validations["step"].tolist() == list(range(5, 301, 5))  # each validation once


def test_two_runs_at_once_give_the_results_of_one_at_a_time(tmp_path):
    configs = sweep.grid("p", tiny_lm_config(max_steps=6, val_every_steps=3), width=[16, 24])
    at_once = sweep.run(configs, parallel=2, progress=False, root=tmp_path / "at_once")
    assert at_once["status"].tolist() == ["finished"] * 2
    for config, run_dir in zip(configs, at_once["run_dir"]):
        alone = runs.create("p", config, tmp_path / "alone")
        assert train.train(alone)["best_val_loss"] == runs.read_result(Path(run_dir))["best_val_loss"]
        for rows_at_once, rows_alone in zip(train_rows(Path(run_dir)), train_rows(alone)):
            pd.testing.assert_frame_equal(rows_at_once.reset_index(drop=True), rows_alone.reset_index(drop=True))


def test_also_trains_the_checks_beside_the_grid_longest_first_and_returns_only_the_grids_rows(runs_root, monkeypatch):
    configs = sweep.grid("s", tiny_lm_config(max_steps=4, val_every_steps=2), width=[16])
    checks = [sweep.longer(c, 3) for c in configs]
    started, real = [], sweep._run_local
    monkeypatch.setattr(sweep, "_run_local", lambda d, *a, **k: started.append(Path(d).name) or real(d, *a, **k))
    df = sweep.run(configs, also=checks, progress=False, root=runs_root)
    assert df["run_id"].tolist() == [runs.run_id(configs[0])] and df["status"].tolist() == ["finished"]
    assert started == [runs.run_id(checks[0]), runs.run_id(configs[0])], "longest first: the 3x check (12 steps)"
    started.clear()
    longer = sweep.run(checks, progress=False, root=runs_root)
    assert started == [] and longer["status"].tolist() == ["finished"], "the checks were trained with the grid"
    assert longer["max_steps"].tolist() == [12]


def test_submitit_local_executor(runs_root):
    configs = sweep.grid("s", tiny_lm_config(max_steps=4, val_every_steps=2), width=[16])
    df = sweep.run(configs, executor="submitit-local", progress=False, root=runs_root)
    assert list(df["status"]) == ["finished"]



def test_a_timed_out_job_is_requeued_by_submitit_as_the_same_run(tmp_path):
    """submitit requeues a timed-out or preempted job with what its function's checkpoint() returns (it looks for the
    method, as for submitit.helpers.Checkpointable): the same run folder, so the job resumes from its checkpoint."""
    job = sweep._TrainJob(tmp_path / "run")
    again = job.checkpoint()
    assert again.function is job and again.args == () and again.kwargs == {}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux's")
def test_a_killed_submitit_job_is_submitted_again_and_ends_as_an_uninterrupted_run(runs_root, tmp_path):
    """SIGKILL to a job's process once its run has a checkpoint: the sweep submits it again through submitit, it
    resumes, and its metrics equal an uninterrupted run's row for row (none twice, none missing)."""
    config = tiny_lm_config(max_steps=60, val_every_steps=5)
    run_dir = runs_root / "t" / runs.run_id(config)
    out = {}
    sweeping = threading.Thread(target=lambda: out.update(df=sweep.run(
        [config], executor="submitit-local", progress=False, root=runs_root)))
    sweeping.start()
    _wait(lambda: not sweeping.is_alive() or (run_dir / runs.CHECKPOINT).exists(), "the job's first checkpoint", 0.02)
    trainer = int((run_dir / train.LOCK).read_text().split()[1])
    job = int(Path(f"/proc/{trainer}/stat").read_text().rsplit(")", 1)[1].split()[1])  # its parent: the job's process
    os.kill(job, signal.SIGKILL)
    assert not runs.is_finished(run_dir), "the run finished before its job was killed; give it more steps"
    sweeping.join()
    assert out["df"]["status"].tolist() == ["finished"]
    result = runs.read_result(run_dir)
    assert result["steps"] == 60 and result["resumed_from_step"] > 0
    log = (run_dir / "train.log").read_text()
    assert "submitted again (1 of 3)" in log
    assert "failed: it ended without a result (state: " in log and "_log.err" in log, "why the job failed"
    alone = runs.create("t", config, tmp_path / "alone")
    assert train.train(alone)["best_val_loss"] == result["best_val_loss"]
    for resumed, uninterrupted in zip(train_rows(run_dir), train_rows(alone)):
        pd.testing.assert_frame_equal(resumed.reset_index(drop=True), uninterrupted.reset_index(drop=True))

# ---------------------------------------------------------------- interrupts: no run left training unseen

# Ctrl-C as a terminal user has it: Python's KeyboardInterrupt handler. A process started with SIGINT ignored
# (a background job of a non-interactive shell: `cmd &`, so also `make test &`) passes that on, and Python then
# installs no handler, so the sweep would rightly ignore the test's SIGINT.
SWEEP_SCRIPT = """
import signal
import sys
signal.signal(signal.SIGINT, signal.default_int_handler)
from chemscale import sweep
from conftest import tiny_lm_config
sweep.run([tiny_lm_config(max_steps=100_000, val_every_steps=5)], progress=False, root=sys.argv[1])
"""


def _alive(pid: int) -> bool:
    """Whether a process runs (a zombie no reaper has collected counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _wait(condition, what: str, every_s: float = 0.1, limit_s: float = 120.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"still waiting for {what} after {limit_s} s"
        time.sleep(every_s)


def _start_sweep(runs_root: Path) -> tuple[subprocess.Popen, int, Path]:
    """A sweep in its own process, once its run trains: (sweep, the training child's pid, run folder)."""
    run_dir = runs_root / "t" / runs.run_id(tiny_lm_config(max_steps=100_000, val_every_steps=5))
    lock = run_dir / train.LOCK
    if lock.exists():
        lock.write_text("")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(paths.ROOT), str(Path(__file__).parent)])}
    process = subprocess.Popen([sys.executable, "-c", SWEEP_SCRIPT, str(runs_root)], env=env, cwd=paths.ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait(lambda: process.poll() is not None or (lock.exists() and lock.read_text().startswith("pid ")
                                                 and (run_dir / runs.CHECKPOINT).exists()), "the run to train")
    assert process.poll() is None, process.communicate()
    return process, int(lock.read_text().split()[1]), run_dir


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux's")
def test_an_interrupted_or_killed_sweep_leaves_no_run_training(runs_root):
    """Ctrl-C (SIGINT) stops the sweep's running child and re-raises; a SIGKILLed sweep's child dies with it."""
    fcntl = pytest.importorskip("fcntl")
    started = []
    try:
        sweep_process, child, run_dir = _start_sweep(runs_root)
        started += [sweep_process.pid, child]
        sweep_process.send_signal(signal.SIGINT)
        _wait(lambda: sweep_process.poll() is not None, "the interrupted sweep to return")
        assert "KeyboardInterrupt" in sweep_process.communicate()[1], "the interrupt is re-raised"
        _wait(lambda: not _alive(child), "the interrupted sweep's child to stop", limit_s=5)
        with open(run_dir / train.LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: nothing trains it
        assert sweep.collect("t", runs_root)["status"].tolist() == ["pending"], "an interrupt is not a crash"
        sweep_process, child, _ = _start_sweep(runs_root)
        started += [sweep_process.pid, child]
        sweep_process.kill()
        sweep_process.communicate()
        _wait(lambda: not _alive(child), "the killed sweep's child to die with it", limit_s=30)
    finally:  # a failure must not leave a 100,000-step run training
        for pid in started:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_run_trained_by_another_process_is_running_not_failed(runs_root, capsys):
    """A second sweep reaching a run that a first one trains reports it as running elsewhere, not as a crash."""
    fcntl = pytest.importorskip("fcntl")
    config = tiny_lm_config()
    run_dir = runs.create("t", config, runs_root)
    with open(run_dir / train.LOCK, "a+") as held:  # the first sweep's trainer, as far as flock can tell
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        df = sweep.run([config], progress=False, root=runs_root)
        assert df["status"].tolist() == ["running"]
        assert "1 of 1 runs are being trained by another process" in capsys.readouterr().err
    assert sweep.collect("t", runs_root)["status"].tolist() == ["pending"], "free again: not running, not crashed"


def test_curves_read_the_samples_of_a_run_from_before_the_column_was_renamed(tmp_path):
    """A finished run keeps its id across the rename, so a study mixes metrics.csv headers 'tokens' and 'samples'."""
    for name, column in (("old", "tokens"), ("new", "samples")):
        (tmp_path / name).mkdir()
        (tmp_path / name / runs.METRICS).write_text(f"step,epoch,{column},flops,train_loss,val_loss,current_lr\n"
                                                    f"1,0,,,2.5,,0.001\n1,0,512,1000.0,,2.4,\n")
    df = pd.DataFrame({"run_id": ["old", "new"], "run_dir": [str(tmp_path / "old"), str(tmp_path / "new")]})
    curves = sweep.curves(df).dropna(subset=["val_loss"])
    assert "tokens" not in curves.columns and list(curves["samples"]) == [512, 512]


def test_collect_says_which_runs_converged_also_for_results_written_before_convergence(runs_root):
    """Old result.json files have only stop_reason: collect derives convergence, so they need no retraining."""
    results = {"early": {"stop_reason": "early_stopped"}, "capped": {"stop_reason": "max_steps"},
               "nan": {"status": "diverged", "stop_reason": "diverged"},
               "new": {"stop_reason": "max_steps", "convergence": "capped"}}
    dirs = []
    for seed, (name, result) in enumerate(results.items()):
        run_dir = runs.create("old", tiny_lm_config(max_steps=20 + seed), runs_root)
        (run_dir / runs.RESULT).write_text(json.dumps({"status": "finished", "best_val_loss": 1.0, **result}))
        dirs.append(run_dir)
    pending = runs.create("old", tiny_lm_config(max_steps=99), runs_root)
    df = sweep.collect_dirs([*dirs, pending])
    assert df["convergence"].tolist()[:4] == ["converged", "capped", "diverged", "capped"]
    assert pd.isna(df["convergence"].iloc[4]), "an unfinished run has no convergence yet"
    assert sorted(train.CONVERGENCE.values()) == ["capped", "converged", "diverged"]


def test_converged_keeps_the_runs_early_stopping_ended():
    df = pd.DataFrame({"run_id": ["a", "b", "c", "d"], "convergence": ["converged", "capped", "diverged", None]})
    assert sweep.converged(df)["run_id"].tolist() == ["a"]


def test_budget_follows_each_point_clipped_to_its_floor_and_cap():
    from conftest import tiny_lm_config

    configs = []
    for n in (100, 1000, 10000):
        c = tiny_lm_config(batch_size=50, max_steps=1500)
        c["data"]["n_train_molecules"] = n
        configs.append(c)
    budgeted = sweep.budget(configs, epochs=5, min_steps=40)
    # 5 epochs: 10, 100 and 1,000 steps; the first raised to the floor, none above the cap
    assert [c["train"]["max_steps"] for c in budgeted] == [40, 100, 1000]
    assert [c["train"]["max_steps"] for c in sweep.budget(configs, epochs=20, min_steps=40)] == [40, 400, 1500]
    assert [c["train"]["max_steps"] for c in configs] == [1500] * 3, "the configs given are left as they were"
    assert sweep.budget(configs, epochs=0) == configs
    assert sweep.longer(budgeted[1])["train"]["max_steps"] == 300 and budgeted[1]["train"]["max_steps"] == 100
    assert budgeted[1]["train"]["patience"] == 0 and sweep.longer(budgeted[1])["train"]["patience"] == 0
    patient = dict(budgeted[1], train={**budgeted[1]["train"], "patience": 4})
    assert sweep.longer(patient)["train"]["patience"] == 12, "a converged run ends where patience runs out: scale it"
    ddp = dict(configs[2], train={**configs[2]["train"], "devices": 2, "num_nodes": 2})
    assert sweep.budget([ddp], epochs=5)[0]["train"]["max_steps"] == 250, "4 processes take 4 batches a step"


def test_select_finds_a_point_once_and_refuses_one_off_the_grid():
    from conftest import tiny_lm_config

    base = tiny_lm_config()
    configs = sweep.grid("s", base, width=[16, 32]) + sweep.grid("s", base, width=[32, 64])
    picked = sweep.select(configs, width=32, n_train_molecules=200)
    assert len(picked) == 1 and picked[0]["model"]["width"] == 32
    with pytest.raises(ConfigError, match="no run of this grid"):
        sweep.select(configs, width=48)


@pytest.mark.parametrize("kwargs,message", [
    ({"epochs": -1}, "epochs"),
    ({"epochs": float("nan")}, "epochs"),
    ({"epochs": float("inf")}, "epochs"),
    ({"epochs": 5, "min_steps": -1}, "min_steps"),
    ({"epochs": 5, "min_steps": 2000}, "min_steps = 2000 .*max_steps = 1500"),
])
def test_budget_refuses_epochs_and_floors_it_cannot_mean(kwargs, message):
    """A negative or non-finite epochs, and a floor above a config's cap (which the cap would silently win
    over, so the floor the notebook's params promise is never given), are refused naming the key."""
    from conftest import tiny_lm_config

    with pytest.raises(ConfigError, match=message):
        sweep.budget([tiny_lm_config(max_steps=1500)], **kwargs)


@pytest.mark.parametrize("data, train, message", [
    ({"n_train_molecules": None}, {}, "data n_train_molecules of 't' must be a whole number >= 1, got None"),
    ({"n_train_molecules": "1e3x"}, {}, "data n_train_molecules .* got '1e3x'"),
    ({}, {"batch_size": 0}, "train batch_size of 't' must be a whole number >= 1, got 0"),
    ({}, {"devices": 1.5}, "train devices"),
    ({}, {"max_steps": None}, "train max_steps"),
])
def test_budget_names_the_key_of_a_config_it_cannot_read(data, train, message):
    """A config without its training-set size, or with a batch of 0, is a ConfigError naming the key and the study,
    not a bare KeyError or ZeroDivisionError; sizes from a numpy grid or YAML floats such as 1e3 are whole numbers."""
    from conftest import tiny_lm_config

    config = tiny_lm_config(**train)
    config["data"].update(data)
    with pytest.raises(ConfigError, match=message):
        sweep.budget([config], epochs=2)
    with pytest.raises(ConfigError, match="task 'smiles' of 't'"):
        sweep.budget([{**tiny_lm_config(), "task": "smiles"}], epochs=2)
    config = tiny_lm_config(batch_size=np.int64(10))
    config["data"]["n_train_molecules"] = 1e3
    assert sweep.budget([config], epochs=2)[0]["train"]["max_steps"] == 20  # the cap: 200 steps asked


def test_longer_refuses_a_factor_that_does_not_lengthen_and_a_config_without_a_budget():
    from conftest import tiny_lm_config

    with pytest.raises(ConfigError, match="factor"):
        sweep.longer(tiny_lm_config(), 0)
    bare = tiny_lm_config()
    del bare["train"]["max_steps"]
    with pytest.raises(ConfigError, match="max_steps"):
        sweep.longer(bare)


def test_select_names_a_key_that_is_not_a_column():
    """A misspelt key is not 'a value off the grid': the error names the key and the columns there are."""
    from conftest import tiny_lm_config

    configs = sweep.grid("s", tiny_lm_config(), width=[16, 32])
    with pytest.raises(ConfigError, match=r"'widht' is not a column.*'width'"):
        sweep.select(configs, widht=16)
    with pytest.raises(ConfigError, match="'foo' is not a column"):
        sweep.select(configs, foo=None)  # would otherwise match every config (flat.get -> None)
