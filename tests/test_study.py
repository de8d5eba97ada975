"""`python -m chemscale.study`: params checked before anything runs, --params route, one-paragraph
failures, a batch that goes past a failing notebook with a summary, progress lines over a sweep's runs,
stop and resume, the chemscale kernel and Lab settings, and the notebooks' closing checks."""

import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time

import nbformat
import numpy as np
import pandas as pd
import pytest

from chemscale import checks, paths, runs, scaling, study, sweep, train
from chemscale.config import ConfigError, atomic_write_json
from conftest import tiny_lm_config

NB01 = paths.NOTEBOOKS / "01_chemgpt_scaling.ipynb"


def _study(*args, cwd=None):
    """Run the CLI in a child process, as a user would."""
    return subprocess.run([sys.executable, "-m", "chemscale.study", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd or paths.ROOT, timeout=600)


def _one_error_line(proc) -> str:
    """The one `error:` line (papermill's progress bar and the kernel's own log may share stderr)."""
    lines = [line for line in proc.stderr.splitlines() if line.lower().startswith("error")]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def _params(tmp_path, text, name="mine.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# --- params errors: one line, exit 2, nothing executed ---

def test_malformed_params_file_names_file_and_line(tmp_path):
    bad = _params(tmp_path, "seed: 1\nwidth: [16, 32\nlr: 0.1\n")
    proc = _study("--params", bad, "01_chemgpt_scaling", "--output-dir", tmp_path / "out")
    assert proc.returncode == 2
    assert "mine.yaml: line" in _one_error_line(proc)
    assert not (tmp_path / "out").exists()


def test_missing_params_file(tmp_path):
    proc = _study("--params", tmp_path / "nope.yaml", "01_chemgpt_scaling")
    assert proc.returncode == 2 and "params file not found" in _one_error_line(proc)


def test_unknown_key_is_an_error_with_a_suggestion(tmp_path):
    typo = _params(tmp_path, "max_step: 10\n")
    proc = _study("--params", typo, "01_chemgpt_scaling", "--output-dir", tmp_path / "out")
    assert proc.returncode == 2
    line = _one_error_line(proc)
    assert "'max_step'" in line and "did you mean 'max_steps'" in line and "mine.yaml" in line
    assert not (tmp_path / "out").exists()


def test_wrong_type_is_an_error(tmp_path):
    bad = _params(tmp_path, "max_steps: ten\n")
    proc = _study("--params", bad, "01_chemgpt_scaling")
    assert proc.returncode == 2
    assert "'max_steps' = 'ten' is str" in _one_error_line(proc) and "declares it int" in proc.stderr


def test_params_needs_exactly_one_notebook(tmp_path):
    ok = _params(tmp_path, "seed: 1\n")
    proc = _study("--params", ok)
    assert proc.returncode == 2 and "exactly one NOTEBOOK" in _one_error_line(proc)


def test_missing_data_path_is_refused_before_the_notebook_starts(tmp_path):
    gpu = _params(tmp_path, "data_source: /no/such/pubchem/CID-SMILES.gz\n")
    proc = _study("--params", gpu, "01_chemgpt_scaling", "--output-dir", tmp_path / "out")
    assert proc.returncode == 2
    line = _one_error_line(proc)
    assert "'data_source'" in line and "no such file" in line and "mine.yaml" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, message", [
    ("executor: submitit-local\nslurm: {timeout_mn: 10}\n", "submitit refuses {'timeout_mn': 10}"),
    ("fractions: [0.1, 1.5]\n", "fractions and scatter_fraction are budget fractions in (0, 1], got [1.5]")])
def test_values_checked_in_notebook_03_fail_it_before_any_run_folder(tmp_path, text, message):
    """The executor's parameters are checked by sweep.run and the analysis's by tpe.check_study, in the notebook:
    either fails before any run trains (the analysis reads its parameters only once every run has finished), and
    leaves no run folder (notebook 03 counted its reused runs with sweep.run_dirs, which made every folder)."""
    pytest.importorskip("submitit")
    bad = _params(tmp_path, text)
    env = {**os.environ, "CHEMSCALE_RUNS": str(tmp_path / "runs")}
    proc = subprocess.run([sys.executable, "-m", "chemscale.study", "--params", str(bad), "03_tpe", "--output-dir",
                           str(tmp_path / "out")], capture_output=True, text=True, cwd=paths.ROOT, env=env, timeout=600)
    assert proc.returncode == 1, proc.stderr
    assert message in _one_error_line(proc)
    assert [p.name for p in (tmp_path / "runs").glob("*/*") if p.parent.name != "notebooks"] == []

def test_named_sources_are_not_paths(tmp_path):
    params = {"data_source": "md:ethanol", "run_name": "x", "precision": "bf16-mixed"}
    assert study.resolve_paths(params, "x.yaml", tmp_path) == params


def test_relative_data_path_is_made_absolute(tmp_path):
    (tmp_path / "mine.smi").write_text("CCO\n")
    resolved = study.resolve_paths({"data_source": "mine.smi"}, "x.yaml", tmp_path)
    assert resolved["data_source"] == str(tmp_path / "mine.smi")


def _checked(tmp_path, text, notebook=NB01):
    """study.load_checked on a params file holding `text`, run from tmp_path (relative paths resolve there)."""
    with contextlib.chdir(tmp_path):
        return study.load_checked(notebook, _params(tmp_path, text))


def test_only_data_parameters_are_paths(tmp_path):
    """run_name: test.csv is a folder name and a Slurm partition gpu/a100 a partition, not files (item 4)."""
    params = _checked(tmp_path, "run_name: test.csv\nslurm: {slurm_partition: gpu/a100}\n")
    assert params == {"run_name": "test.csv", "slurm": {"slurm_partition": "gpu/a100"}}


@pytest.mark.parametrize("name", ["results/v1", "..", "/tmp/x", ""])
def test_run_name_must_be_one_folder_under_runs(tmp_path, name):
    (tmp_path / "results" / "v1").mkdir(parents=True)  # existed in cwd: was made an absolute path outside runs/
    with pytest.raises(ConfigError, match=r"mine.yaml: parameter 'run_name' = .* must be a plain folder name"):
        _checked(tmp_path, f"run_name: '{name}'\n")


def test_a_folder_is_not_a_data_file(tmp_path):
    (tmp_path / "pubchem").mkdir()
    with pytest.raises(ConfigError, match=r"'data_source' = 'pubchem/' is a folder .*data file inside it"):
        _checked(tmp_path, "data_source: pubchem/\n")


def test_a_misspelt_source_name_is_a_missing_file_with_a_suggestion(tmp_path):
    with pytest.raises(ConfigError, match=r"'data_source' = 'mosses': no such file .*did you mean 'moses'\?"):
        _checked(tmp_path, "data_source: mosses\n")
    assert _checked(tmp_path, "data_source: moses\n") == {"data_source": "moses"}
    (tmp_path / "mydata").write_text("CCO\n")  # a bare word is a file when it is not the notebook's name
    assert _checked(tmp_path, "data_source: mydata\n") == {"data_source": str(tmp_path / "mydata")}


def test_recipe_fields_are_checked_by_the_recipe(tmp_path):
    nb02 = paths.NOTEBOOKS / "02_gnn_scaling.ipynb"
    with pytest.raises(ConfigError, match=r"mine.yaml: parameter 'recipe' = .*unknown key\(s\) \['n_trian'\] "
                                          r"for MDRecipe.*did you mean 'n_trian' -> 'n_train'\?"):
        _checked(tmp_path, "recipe: {n_trian: 5}\n", nb02)
    with pytest.raises(ConfigError, match=r"mine.yaml: parameter 'recipe'.*'n_val'"):
        _checked(tmp_path, "data_source: md:aspirin\nrecipe: {n_val: -1}\n", nb02)
    assert _checked(tmp_path, "recipe: {n_train: 5, equilibration_steps: 10}\n", nb02)["recipe"]["n_train"] == 5


def test_accelerator_is_a_lightning_accelerator(tmp_path):
    with pytest.raises(ConfigError, match=r"mine.yaml: parameter 'accelerator' = 'cpux' is not a Lightning "
                                          r"accelerator \(did you mean 'cpu'\?\)"):
        _checked(tmp_path, "accelerator: cpux\n")
    assert _checked(tmp_path, "accelerator: cuda\n") == {"accelerator": "cuda"}


def test_executor_is_one_sweep_run_takes(tmp_path):
    """A misspelt executor stops the study before its kernel starts (it was a notebook failure, refused by sweep.run)."""
    nb03 = paths.NOTEBOOKS / "03_tpe.ipynb"
    with pytest.raises(ConfigError, match=r"mine.yaml: parameter 'executor' = 'slrum' is not one of local, slurm, "
                                          r"submitit-local \(did you mean 'slurm'\?\)"):
        _checked(tmp_path, "executor: slrum\n", nb03)
    assert _checked(tmp_path, "executor: submitit-local\n", nb03) == {"executor": "submitit-local"}


@pytest.mark.parametrize("notebook, old, new", [
    ("01_chemgpt_scaling", "device", "accelerator"), ("01_chemgpt_scaling", "widths", "width"),
    ("01_chemgpt_scaling", "n_molecules", "n_train_molecules"), ("02_gnn_scaling", "device", "accelerator"),
    ("02_gnn_scaling", "models", "name"), ("02_gnn_scaling", "n_train", "n_train_structures"),
    ("02_gnn_scaling", "widths", "width"), ("02_gnn_scaling", "depths", "depth"),
    ("03_tpe", "slurm_partition", "slurm"),
])
def test_a_renamed_parameter_names_its_new_name(tmp_path, notebook, old, new):
    """Params files written before the parameters took the run config's names (issue 9) say what to write."""
    with pytest.raises(ConfigError, match=rf"mine.yaml: parameter '{old}' was renamed '{new}'; use the new name"):
        _checked(tmp_path, f"seed: 1\n{old}: []\n", paths.NOTEBOOKS / f"{notebook}.ipynb")


def test_a_renamed_parameter_and_a_misspelt_one_are_both_named(tmp_path):
    """An old params file fixed for its renames alone would only fail again on the typo."""
    with pytest.raises(ConfigError, match=r"mine.yaml: parameter 'widths' was renamed 'width'; unknown parameter\(s\) "
                                          r"'paitence' \(did you mean 'patience'\?\); use the new name"):
        _checked(tmp_path, "widths: []\npaitence: 3\n", paths.NOTEBOOKS / "01_chemgpt_scaling.ipynb")


def test_an_old_name_the_notebook_still_declares_is_not_renamed(tmp_path):
    """`n_train` is a recipe field, and a notebook's own parameter may use a name renamed elsewhere."""
    nb = _tiny_notebook(tmp_path, body="pass\n")
    assert study.load_checked(nb, _params(tmp_path, "n_molecules: 3\n")) == {"n_molecules": 3}
    with pytest.raises(ConfigError, match=r"unknown parameter\(s\) 'widths' for 00_tiny.ipynb"):
        study.load_checked(nb, _params(tmp_path, "widths: [3]\n"))


# --- keys and YAML 1.1 surprises (items 5, 13) ---

@pytest.mark.parametrize("text, message", [
    ("1: 2\n", r"line 1: key '1' is not a parameter name"),
    ("~: 3\n", r"line 1: key '~' is not a parameter name"),
    ("seed: 1\nlr: 0.1\nseed: 2\n", r"line 3: key 'seed' repeats the one on line 1"),
    ("recipe: {n_train: 5, n_train: 6}\n", r"line 1: key 'n_train' repeats"),
])
def test_keys_that_are_not_names_or_repeat_are_refused(tmp_path, text, message):
    with pytest.raises(ConfigError, match=rf"mine.yaml: {message}"):
        study.read_params(_params(tmp_path, text))


@pytest.mark.parametrize("key", ["on", "yes"])
def test_yaml11_boolean_words_are_unknown_keys_not_a_crash(tmp_path, key):
    with pytest.raises(ConfigError, match=rf"unknown parameter\(s\) '{key}'"):
        _checked(tmp_path, f"{key}: 1\n")


def test_cli_non_string_key_is_one_error_line(tmp_path):
    proc = _study("--params", _params(tmp_path, "on: 1\n1: 2\n"), "01_chemgpt_scaling")
    assert proc.returncode == 2 and "mine.yaml: line 2: key '1' is not a parameter name" in _one_error_line(proc)


def test_integers_read_as_written(tmp_path):
    assert study.read_params(_params(tmp_path, "seed: 010\nmax_steps: 1_000\n")) == {"seed": 10, "max_steps": 1000}
    with pytest.raises(ConfigError, match=r"'seed' = '1:30' is str, but .* declares it int"):
        _checked(tmp_path, "seed: 1:30\n")
    with pytest.raises(ConfigError, match=r"'save_figures' = 'yes' is str.*write true or false"):
        _checked(tmp_path, "save_figures: yes\n")


@pytest.mark.parametrize("text, message", [
    ('width: ["a", 2]\n', r"'width': item 1 = 'a' is str, but 01_chemgpt_scaling.ipynb declares a list of int"),
    ("width: [16, true]\n", r"'width': item 2 = True is bool"),
    ("n_train_molecules: [10, 1e2]\n",
     r"'n_train_molecules': item 2 = 100.0 is float.*write it as an integer, e.g. 100"),
    ("width: []\n", r"'width' = \[\]: list at least one value"),
    ("lr: .nan\n", r"'lr' = nan: a number must be finite"),
    ("lr: -.inf\n", r"'lr' = -inf: a number must be finite"),
    ("max_steps: -5\n", r"'max_steps' = -5: a count, size or seed cannot be negative"),
    ("n_train_molecules: [100, -3]\n", r"'n_train_molecules': item 2 = -3: a count, size or seed cannot be negative"),
])
def test_values_are_checked_before_the_notebook_starts(tmp_path, text, message):
    with pytest.raises(ConfigError, match=rf"mine.yaml: parameter {message}"):
        _checked(tmp_path, text)


def test_list_items_of_the_gnn_notebook(tmp_path):
    nb02 = paths.NOTEBOOKS / "02_gnn_scaling.ipynb"
    with pytest.raises(ConfigError, match=r"'name': item 2 = 3 is int, but 02_gnn_scaling.ipynb declares a list "
                                          r"of str"):
        _checked(tmp_path, "name: [schnet, 3]\n", nb02)
    assert _checked(tmp_path, "n_train_structures: [10, 100]\nname: [painn]\n", nb02) == {
        "n_train_structures": [10, 100], "name": ["painn"]}


@pytest.mark.parametrize("profile", sorted(study.PROFILES))
def test_every_profile_passes_the_checks(profile, monkeypatch, tmp_path):
    """The shipped profiles pass; gpu names data files on a GPU server, so only their path check is skipped."""
    monkeypatch.setattr(study, "resolve_paths", lambda params, source, base=None, names=(): params)
    for nb in study.notebooks():
        study.load_checked(nb, study.params_path(nb, profile))


# --- YAML 1.1 floats ---

def test_exponent_without_a_dot_is_a_float(tmp_path):
    params = study.read_params(_params(tmp_path, "lr: 3e-4\nmax_steps: 100\nrun_name: '3e-4'\n"))
    assert params == {"lr": 3e-4, "max_steps": 100, "run_name": "3e-4"}
    assert isinstance(params["lr"], float)
    study.check_params(NB01, {"lr": params["lr"]}, "x.yaml")


def test_float_where_an_int_is_declared_suggests_the_integer(tmp_path):
    params = study.read_params(_params(tmp_path, "max_steps: 1e4\n"))
    with pytest.raises(ConfigError, match=r"'max_steps' = 10000.0 is float.*write it as an integer, e.g. 10000"):
        study.check_params(NB01, params, "x.yaml")


# --- running a notebook: --params route, failures in one paragraph ---

_TINY_BODY = (
    "import json, pathlib\n"
    "assert n_molecules <= 4, f'n_molecules = {n_molecules} is more than the 4 molecules in {data_source}'\n"
    "pathlib.Path('seen.json').write_text(json.dumps({'lr': lr, 'data_source': data_source}))\n")


def _tiny_notebook(folder, body=_TINY_BODY, name="00_tiny"):
    """A two-cell notebook with a parameters cell, run on the real chemscale kernel."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": study.KERNEL, "display_name": study.KERNEL, "language": "python"}
    params = nbformat.v4.new_code_cell('lr: float = 0.1\ndata_source: str = "moses"\nn_molecules: int = 2\n')
    params.metadata["tags"] = ["parameters"]
    body = nbformat.v4.new_code_cell(body)
    path = folder / f"{name}.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[params, body], metadata=nb.metadata), path)
    return path


def test_params_route_runs_the_notebook_and_reports_failures_in_one_paragraph(tmp_path):
    nb = _tiny_notebook(tmp_path)
    (tmp_path / "four.smi").write_text("C\nCC\nCCO\nCCN\n")
    good = _params(tmp_path, "lr: 3e-4\ndata_source: four.smi\nn_molecules: 3\n", "good.yaml")
    proc = _study("--params", good, nb, "--output-dir", tmp_path / "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "seen.json").read_text()) == {"lr": 3e-4, "data_source": str(tmp_path / "four.smi")}
    assert (tmp_path / "out" / "00_tiny.good.ipynb").exists()

    too_many = _params(tmp_path, "data_source: four.smi\nn_molecules: 10\n", "big.yaml")
    proc = _study("--params", too_many, nb, "--output-dir", tmp_path / "out", cwd=tmp_path)
    assert proc.returncode == 1
    line = _one_error_line(proc)
    assert "Check 'data_source', 'n_molecules' in big.yaml." in line
    assert "AssertionError: n_molecules = 10 is more than the 4 molecules" in line
    log = tmp_path / "out" / "00_tiny.big.log"
    assert str(log.relative_to(tmp_path)) in line and "Traceback" not in proc.stderr
    assert "AssertionError" in log.read_text() and "assert n_molecules <= 4" in log.read_text()
    assert "00_tiny.big.ipynb" in line


@pytest.mark.parametrize("file, label", [("mine.yaml", "mine"), ("other/cpu.yaml", "params-cpu"),
                                         ("other/smoke.yaml", "params-smoke")])
def test_params_label_never_takes_a_profiles_name(file, label):
    plan = study._plan(study._parser().parse_args(["--params", file, "01_chemgpt_scaling"]))
    assert [(nb.name, str(source), got) for nb, source, got in plan] == [(NB01.name, file, label)]


def test_the_profiles_own_file_keeps_its_label():
    own = study.params_path(NB01, "cpu")
    assert study._plan(study._parser().parse_args(["--params", str(own), "01_chemgpt_scaling"]))[0][2] == "cpu"


# A run started the way chemscale.sweep starts one (its own session, so the terminal's Ctrl-C never
# reaches it), then a long cell: the study is stopped while the notebook is busy.
_BUSY_BODY = (
    "import os, pathlib, subprocess, sys, time\n"
    "run = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True)\n"
    "pathlib.Path('pids.tmp').write_text(f'{os.getpid()} {run.pid}')\n"
    "os.replace('pids.tmp', 'pids')\n"
    "time.sleep(600)\n")


def _gone(pid, timeout=30.0):
    """The process exited (a zombie waiting for its reaper counts as exited)."""
    import psutil

    try:
        psutil.Process(pid).wait(timeout=timeout)
    except psutil.NoSuchProcess:
        return True
    except psutil.TimeoutExpired:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    return True


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_stopping_the_study_stops_the_kernel_and_its_runs(tmp_path, sig, code):
    import psutil

    nb = _tiny_notebook(tmp_path, _BUSY_BODY)
    busy = _params(tmp_path, "n_molecules: 1\n", "busy.yaml")
    study_proc = subprocess.Popen([sys.executable, "-m", "chemscale.study", "--params", busy, nb, "--output-dir", "out"],
                                  cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids = tmp_path / "pids"
    try:
        for _ in range(600):  # the kernel starts (minutes on a busy machine), the cell starts its run
            if pids.exists() or study_proc.poll() is not None:
                break
            time.sleep(0.5)
        assert pids.exists(), study_proc.communicate(timeout=5)
        kernel, run = map(int, pids.read_text().split())
        assert psutil.Process(run).ppid() == kernel
        study_proc.send_signal(sig)
        _, stderr = study_proc.communicate(timeout=120)
    finally:
        study_proc.kill()
    assert study_proc.returncode == code, stderr
    lines = [line for line in stderr.splitlines() if line.lower().startswith("error")]
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"error: stopped by {sig.name}; 2 process(es) stopped")
    assert lines[0].endswith("the executed notebook so far: out/00_tiny.busy.ipynb")
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert _gone(kernel) and _gone(run), "the kernel or its run outlived the study"


def _profile_study(tmp_path, *notebooks, profile="smoke"):
    """`python -m chemscale.study --profile PROFILE NOTEBOOK...` with the profiles' params under tmp_path/params
    (paths.PARAMS; the repository's own params folder is left alone). Runs go to the session's CHEMSCALE_RUNS,
    whose data cache the other tests share (a private one would encode MOSES again)."""
    code = ("import sys; from pathlib import Path; from chemscale import paths, study; "
            f"paths.PARAMS = Path({str(tmp_path / 'params')!r}); sys.exit(study.main(sys.argv[1:]))")
    return subprocess.Popen([sys.executable, "-c", code, "--profile", profile, *map(str, notebooks),
                             "--output-dir", "out"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _profile(tmp_path, notebook, text, profile="smoke"):
    (tmp_path / "params" / notebook.stem).mkdir(parents=True, exist_ok=True)
    (tmp_path / "params" / notebook.stem / f"{profile}.yaml").write_text(text)


def _summary_row(stdout, notebook) -> list[str]:
    """A notebook's row of the summary table, split into its columns (two or more spaces apart)."""
    table = stdout[stdout.index("study summary:"):].splitlines()
    rows = [re.split(r" {2,}", line.strip()) for line in table if line.startswith(notebook)]
    assert len(rows) == 1, stdout
    return rows[0]


def test_a_failing_notebook_does_not_stop_the_batch_and_the_summary_says_which_failed(tmp_path):
    """Batch users run several notebooks overnight: the one after a failure still runs, the summary and exit
    status 1 say what failed, where, and where its executed copy is."""
    first, second = (_tiny_notebook(tmp_path, name=name) for name in ("00_first", "00_second"))
    _profile(tmp_path, first, "n_molecules: 10\n")  # more than its 4 molecules: its second cell raises
    _profile(tmp_path, second, "n_molecules: 3\n")
    proc = _profile_study(tmp_path, first, second)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 1, stderr
    assert "AssertionError: n_molecules = 10 is more than the 4 molecules" in _one_error_line(
        subprocess.CompletedProcess([], 1, stdout, stderr))
    assert json.loads((tmp_path / "seen.json").read_text())["lr"] == 0.1, "the second notebook ran"
    assert "study summary: 2 notebook(s), 1 ok, 1 failed" in stdout
    name, status, wall, cell, out = _summary_row(stdout, "00_first.ipynb")
    # cell [3] as the executed copy numbers it: papermill puts the injected parameters after the notebook's own
    assert (status, cell, out) == ("failed", "[3] (`import json, pathlib`)", "out/00_first.smoke.ipynb"), stdout
    assert re.fullmatch(r"\d+ s|\d+ min \d\d s", wall)
    name, status, wall, cell, out = _summary_row(stdout, "00_second.ipynb")
    assert (status, cell, out) == ("ok", "-", "out/00_second.smoke.ipynb")
    assert (tmp_path / "out" / "00_first.smoke.log").exists() and (tmp_path / "out" / "00_second.smoke.ipynb").exists()


_HOLDER = ("import sys; from pathlib import Path; from chemscale import train\n"
           "with train.exclusive(Path(sys.argv[1])):\n    print('held', flush=True); sys.stdin.read()\n")


def test_run_watcher_prints_a_line_when_a_run_starts_and_when_it_ends(tmp_path):
    """Runs of a notebook's sweep are processes of their own: their folders say when they start and end."""
    root = tmp_path / "runs"
    old, a, b, c = (runs.create("s", {**tiny_lm_config(), "seed": seed}, root) for seed in range(4))
    atomic_write_json(old / runs.RESULT, {"status": "finished"})  # finished before: reused, not counted
    (root / "notebooks" / "not_a_run").mkdir(parents=True)
    lines = []
    watcher = study.RunWatcher(root, "01_x", interval=600, write=lines.append)
    assert watcher.poll() == []
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, b], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)  # a training process that will end without a result
    with train.exclusive(a):  # a run trained in this process (as in a notebook's kernel)
        assert holder.stdout.readline() == "held\n"
        assert [line.split(" ", 1)[1] for line in watcher.poll()] == sorted(
            f"01_x: run s/{d.name} started (0 of 2 runs ended)" for d in (a, b)), "folders in name order"
        assert watcher.poll() == [], "a line per change, not per poll"
        atomic_write_json(a / runs.RESULT, {"status": "finished"})  # written before the lock goes
    holder.communicate("", timeout=60)
    (c / runs.RESULT).write_text('{"status": "fin')  # damaged: the line says so, the watcher goes on
    watcher.start()
    watcher.finish()
    assert sorted(line.split(" ", 1)[1] for line in lines) == sorted([  # one poll: the count after it
        f"01_x: run s/{a.name} finished (3 of 3 runs ended)",
        f"01_x: run s/{b.name} ended without a result, see {b / 'train.log'} (3 of 3 runs ended)",
        f"01_x: run s/{c.name} ended with a damaged result.json (3 of 3 runs ended)"])
    assert all(re.match(r"\d\d:\d\d:\d\d 01_x: ", line) for line in lines)


_SWEEP_BODY = (
    "from chemscale import sweep\n"
    "configs = sweep.grid({study!r}, {config!r}, max_steps={steps!r})\n"
    "df = sweep.run(configs, progress=False)\n"
    "assert df.status.tolist() == ['finished'] * len(configs), df.status.tolist()\n")


def test_a_study_stopped_mid_sweep_prints_its_runs_and_a_restart_reuses_the_finished_ones(tmp_path):
    """Lines for the runs of a sweep while the notebook runs; SIGTERM stops the study (143, summary), and the
    same command again trains only what had not finished."""
    # a local sweep starts its longest run first: the first run (60 steps) ends before the second (40) starts
    name, config, steps = f"study-{tmp_path.name}", tiny_lm_config(val_every_steps=2), [60, 40]
    nb = _tiny_notebook(tmp_path, _SWEEP_BODY.format(study=name, config=config, steps=steps), name="00_sweep")
    _profile(tmp_path, nb, "n_molecules: 1\n")
    first, second = (paths.RUNS / name / runs.run_id(c) for c in sweep.grid(name, config, max_steps=steps))
    proc = _profile_study(tmp_path, nb)
    try:
        lock = second / "train.lock"  # read, not flock-probed: a probe as the trainer starts makes it refuse the run
        for _ in range(1200):  # the kernel starts, the first run trains, the second starts (minutes when busy)
            if lock.exists() and lock.read_text().startswith("pid") or proc.poll() is not None:
                break
            time.sleep(0.25)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr
    assert f"00_sweep: run {name}/{first.name} finished (1 of " in stdout
    assert f"00_sweep: run {name}/{second.name} started (1 of 2 runs ended)" in stdout
    assert "study summary: 1 notebook(s), 1 stopped" in stdout and _summary_row(stdout, "00_sweep.ipynb")[1] == "stopped"
    assert not runs.is_finished(second)
    finished_at = (first / runs.RESULT).stat().st_mtime_ns

    proc = _profile_study(tmp_path, nb)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert (first / runs.RESULT).stat().st_mtime_ns == finished_at, "the finished run is not trained again"
    assert f"00_sweep: run {name}/{second.name} finished (1 of 1 runs ended)" in stdout
    assert first.name not in stdout
    assert runs.read_result(second)["steps"] == 40
    assert _summary_row(stdout, "00_sweep.ipynb")[1] == "ok"


def test_summary_table_columns_line_up():
    outcomes = [study.Outcome("01_a.ipynb", paths.Path("out/01_a.cpu.ipynb"), "ok", 75.2),
                study.Outcome("02_bb.ipynb", paths.Path("out/02_bb.cpu.ipynb"), "failed", 3725.0, "[4] (`fit()`)"),
                study.Outcome("03_c.ipynb", paths.Path("out/03_c.cpu.ipynb"))]
    assert study.summary(outcomes).splitlines() == [
        "study summary: 3 notebook(s), 1 ok, 1 failed, 1 not run",
        "notebook     status   wall time   failing cell   executed notebook",
        "01_a.ipynb   ok       1 min 15 s  -              out/01_a.cpu.ipynb",
        "02_bb.ipynb  failed   1 h 02 min  [4] (`fit()`)  out/02_bb.cpu.ipynb",
        "03_c.ipynb   not run  -           -              -"]


def test_unknown_notebook_is_an_error():
    proc = _study("--profile", "smoke", "99_nothing")
    assert proc.returncode == 2 and "no notebook '99_nothing'" in _one_error_line(proc)


# --- the chemscale kernel and JupyterLab settings ---

def test_missing_kernel_says_how_to_register_it(monkeypatch):
    monkeypatch.setattr(study, "KERNEL", "chemscale-not-registered")
    with pytest.raises(ConfigError, match="no Jupyter kernel 'chemscale-not-registered'.*--setup-jupyter"):
        study.check_kernel()


def test_setup_jupyter_registers_this_python_and_turns_autosave_off(tmp_path):
    from jupyterlab_server.settings_utils import get_settings

    overrides = tmp_path / "share/jupyter/lab/settings/overrides.json"
    overrides.parent.mkdir(parents=True)
    overrides.write_text(json.dumps({"@jupyterlab/apputils-extension:themes": {"theme": "JupyterLab Dark"}}))
    spec_dir = study.install_jupyter(tmp_path)
    spec = json.loads((spec_dir / "kernel.json").read_text())
    assert spec_dir.name == "chemscale" and spec["argv"][0] == sys.executable
    lab = paths.Path(sys.prefix) / "share/jupyter/lab"
    settings, _ = get_settings(str(overrides.parent), str(lab / "schemas"), str(tmp_path / "user"),
                               schema_name="@jupyterlab/docmanager-extension:plugin")
    assert settings["schema"]["properties"]["autosave"]["default"] is False
    assert "@jupyterlab/apputils-extension:themes" in json.loads(overrides.read_text()), "other overrides kept"


def test_notebook_metadata_is_what_lab_writes_for_the_chemscale_kernel():
    """Lab sets kernelspec and language_info on open; equal values leave the notebook unmodified."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import start_new_kernel

    spec = KernelSpecManager().get_kernel_spec(study.KERNEL)
    km, kc = start_new_kernel(kernel_name=study.KERNEL, startup_timeout=300)  # a busy machine
    try:
        language_info = kc.kernel_info(reply=True, timeout=120)["content"]["language_info"]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    for nb in study.notebooks():
        meta = json.loads(nb.read_text())["metadata"]
        assert meta["kernelspec"] == {"name": study.KERNEL, "display_name": spec.display_name,
                                      "language": spec.language}
        # Lab writes the kernel's full version; on another 3.11 patch release only that field differs
        assert {**meta["language_info"], "version": language_info["version"]} == language_info
        assert meta["language_info"]["version"].rsplit(".", 1)[0] == language_info["version"].rsplit(".", 1)[0]


# --- checks at the end of each notebook ---

def _fit(seed=0):
    x = np.array([100.0, 300, 1000, 3000])
    return scaling.fit_power_law(x, 3 * x ** -0.2, n_bootstrap=20, seed=seed)


def _results(*statuses):
    return pd.DataFrame([{"run_id": f"r{i}", "run_dir": f"/runs/s/r{i}", "status": s} for i, s in enumerate(statuses)])


def test_checks_pass_when_every_run_finished_and_every_fit_is_finite():
    summary = checks.verify(_results("finished", "finished"), {"data": {16: _fit(), 32: _fit(1)}, "frontier": _fit(),
                                                                "width": {}})
    assert summary == "checks passed: 2 of 2 runs finished; 3 fits, all finite"


def test_checks_fail_for_an_unfinished_run_naming_its_log():
    with pytest.raises(checks.StudyCheckError, match=r"r1: crashed, see /runs/s/r1/train.log"):
        checks.verify(_results("finished", "crashed", "diverged"), {"data": {16: _fit()}})


def test_checks_fail_without_runs():
    with pytest.raises(checks.StudyCheckError, match="no runs at all"):
        checks.verify(pd.DataFrame(), {})


def test_checks_fail_for_a_fit_that_is_not_finite():
    broken = dataclasses.replace(_fit(), alpha=float("nan"))
    with pytest.raises(checks.StudyCheckError, match=r"data \[64\]: alpha = nan"):
        checks.verify(_results("finished"), {"data": {16: _fit(), 64: broken}})


def test_checks_fail_for_a_fit_that_left_runs_out():
    x = np.array([100.0, 300, 1000, 3000, 10000])
    y = 3 * x ** -0.2
    y[2] = np.nan  # a run whose loss is NaN is dropped from the fit, with a count
    fit = scaling.fit_power_law(x, y, n_bootstrap=20)
    with pytest.raises(checks.StudyCheckError, match=r"frontier: 1 run\(s\) left out"):
        checks.verify(_results("finished"), {"frontier": fit})


def test_checks_accept_a_fit_skipped_for_too_few_points():
    """A grid with two values on an axis loses that fit (scaling.fit_or_skip gives None), not the notebook."""
    x = np.array([100.0, 300])
    with pytest.warns(UserWarning, match="joint: not fitted"):
        skipped = scaling.fit_or_skip("joint", scaling.fit_power_law, x, 3 * x ** -0.2, n_bootstrap=20)
    assert skipped is None
    summary = checks.verify(_results("finished"), {"data": {16: _fit()}, "joint": skipped})
    assert summary == "checks passed: 1 of 1 runs finished; 1 fits, all finite"


def test_compare_with_needs_an_earlier_studys_exponents_before_anything_runs(tmp_path, monkeypatch):
    """compare_with (cpu_bf16.yaml: the fp32 study) is checked up front, naming the missing file and the key."""
    from chemscale import scaling

    monkeypatch.setattr(paths, "RUNS", tmp_path / "runs")
    with pytest.raises(ConfigError, match=r"mine.yaml: parameter 'compare_with' = 'cpu_chemgpt': .*exponents.csv "
                                          r"does not exist; run that study first"):
        _checked(tmp_path, "run_name: cpu_chemgpt_bf16\ncompare_with: cpu_chemgpt\n")
    with pytest.raises(ConfigError, match=r"'compare_with' = 'x' is this study's own run_name"):
        _checked(tmp_path, "run_name: x\ncompare_with: x\n")
    with pytest.raises(ConfigError, match=r"'compare_with' = '../elsewhere' must be another study's run_name"):
        _checked(tmp_path, "compare_with: ../elsewhere\n")
    table = scaling.exponents_table({})
    scaling.save_exponents(table, "cpu_chemgpt", tmp_path / "runs")
    assert _checked(tmp_path, "compare_with: cpu_chemgpt\n") == {"compare_with": "cpu_chemgpt"}
    bf16 = study.load_checked(NB01, paths.PARAMS / "01_chemgpt_scaling" / "cpu_bf16.yaml")
    cpu = study.read_params(study.params_path(NB01, "cpu"))
    differ = {k: (cpu[k], v) for k, v in bf16.items() if cpu[k] != v}
    assert differ == {"run_name": ("cpu_chemgpt", "cpu_chemgpt_bf16"), "precision": ("32-true", "bf16-mixed"),
                      "save_figures": (True, False), "compare_with": ("", "cpu_chemgpt")}, "only the precision differs"
