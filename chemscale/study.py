"""`python -m chemscale.study --profile cpu [NOTEBOOK ...]` or `--params FILE NOTEBOOK`: run notebooks.

Each notebook `notebooks/NN_name.ipynb` runs through papermill on the `chemscale` Jupyter
kernel with `params/NN_name/<profile>.yaml` (or the user's `--params FILE`) injected, into
`runs/notebooks/NN_name.<profile>.ipynb` (the executed copy, with its plots). Every params file
is checked against the notebook's parameters cell before anything runs: an unknown key, a
value of the wrong type or a data path that does not exist stops with one line naming the
file and the key. A notebook that fails while running prints one paragraph (the cell, the
error, the params key it names) and leaves the full traceback in `<executed notebook>.log`;
the study goes on with the next notebook. At the end a summary table gives each notebook's
status (ok, failed, stopped, not run), wall time, failing cell and executed copy; the exit
status is 1 if any notebook failed. While a notebook runs, a line is printed each time one of
its training runs starts or ends (the run folders under CHEMSCALE_RUNS are polled), so a batch
log read the next morning says which runs finished and which one was running when it stopped.
`--params other/cpu.yaml` is labelled `params-cpu`, so it never overwrites a profile's copy.
Ctrl-C or SIGTERM (kill, timeout, Slurm) stops the kernel and the runs it started, prints one
line and the summary of what ran, and exits 130 or 143; the same command again resumes the runs.
`--setup-jupyter` registers the kernel in this environment and turns JupyterLab's autosave
off, so opening a committed notebook never rewrites it (`make setup` runs it).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import json
import math
import os
import re
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

import yaml

from chemscale import paths, runs
from chemscale.config import ConfigError, atomic_write_json, atomic_write_text, process_alive

PROFILES = ("smoke", "cpu", "gpu")
KERNEL = "chemscale"  # the Jupyter kernel of this environment, named in every notebook's metadata
_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "list": (list,), "dict": (dict,)}
# Parameters named *_source, *_path or *_file are data: their value is a file path when it has a
# folder or a data-file suffix ('moses' and recipes such as 'md:ethanol' are names, not paths).
# No other parameter is ever read as a path: run_name: test.csv is a folder name.
_DATA_KEY = re.compile(r"(?:^|_)(?:source|path|file)$")
_PATH_SUFFIXES = {".gz", ".bz2", ".xz", ".smi", ".txt", ".csv", ".tsv", ".npz", ".h5", ".hdf5", ".xyz", ".extxyz"}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_YAML11_SCALARS = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
# Parameters renamed to the run config's names (issue 9): a params file written before says which name to use.
RENAMED = {"device": "accelerator", "widths": "width", "depths": "depth", "n_molecules": "n_train_molecules",
           "models": "name", "n_train": "n_train_structures",
           "slurm_partition": "slurm"}  # now a dict of submitit parameters: slurm: {slurm_partition: gpu}


POLL_S = 2.0  # how often the run folders are looked at for runs that started or ended
_RUN_ID = re.compile(r"[0-9a-f]{12}")  # a run folder's name (chemscale.runs.run_id)
_LOCK_OWNER = re.compile(r"pid (\d+) on (\S+)")  # what chemscale.train.exclusive writes into train.lock

_running: dict = {}  # the executed notebook being written, the summary rows and the run watcher, for a signal


class NotebookFailed(RuntimeError):
    """A notebook raised while running; the message is the one paragraph the user reads, `cell` the failing cell."""

    def __init__(self, message: str, cell: str = ""):
        super().__init__(message)
        self.cell = cell


class _Yaml12Loader(yaml.SafeLoader):
    """YAML 1.2 scalars and strict mappings, so a value means what it looks like.

    PyYAML follows YAML 1.1: `seed: 010` would be 8 (octal), `1:30` would be 90 (base 60),
    `on:`/`yes:` would be the key True, and `3e-4` a string. Here ints are decimal (or 0o/0x),
    booleans only true/false, `3e-4` a float; a repeated key or a key that is not a name is an
    error naming its line instead of the last value silently winning.
    """

    yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in resolvers if tag not in _YAML11_SCALARS]
                               for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, str):
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {_written(key_node, key)!r} is not a parameter name; quote it if it is one",
                    key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' repeats the one on line {seen[key]}; keep one", key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        text = self.construct_scalar(node).replace("_", "")
        if text.lower().startswith(("0o", "0x")):
            return int(text, 0)
        return int(text, 10)  # "010" is ten, as written


def _written(node, value):
    """A key as the file spells it (`~`, `1`), for messages."""
    return node.value if isinstance(node, yaml.ScalarNode) else value


_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))
_Yaml12Loader.add_implicit_resolver(  # before float: "10" is an int
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9][0-9_]*|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789"))
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)"
               r"|\.(?:nan|NaN|NAN))$"), list("-+.0123456789"))
_Yaml12Loader.add_constructor("tag:yaml.org,2002:int", _Yaml12Loader.construct_yaml_int)


def notebooks() -> list[Path]:
    """The study's notebooks in order."""
    return sorted(paths.NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def _shown(path: Path) -> str:
    """A path relative to the working directory when it is under it (shorter in messages)."""
    try:
        return str(Path(path).absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def read_params(path: Path) -> dict:
    """Load a params YAML file with a clear error naming the file and line."""
    path, shown = Path(path), _shown(path)
    try:
        data = yaml.load(Path(path).read_text(), Loader=_Yaml12Loader) or {}
    except FileNotFoundError:
        raise ConfigError(f"{shown}: params file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{shown}: cannot read the params file ({e.__class__.__name__}: {e})") from None
    except yaml.constructor.ConstructorError as e:  # a repeated key, a key that is not a name
        raise ConfigError(f"{shown}: line {e.problem_mark.line + 1}: {e.problem}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{shown}:{where} not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{shown}: expected a mapping of parameter names to values")
    return data


def _unknown_key_message(source: str, notebook: Path, unknown: list[str], declared: dict) -> str:
    """Renamed parameters with their new names, and in the same message any other unknown one (with a hint)."""
    renamed = [f"'{k}' was renamed '{RENAMED[k]}'" for k in unknown if RENAMED.get(k) in declared]
    hints = [f"'{k}' (did you mean '{m[0]}'?)" if (m := difflib.get_close_matches(k, declared, n=1)) else f"'{k}'"
             for k in unknown if RENAMED.get(k) not in declared]
    if renamed:
        others = f"; unknown parameter(s) {', '.join(hints)}" if hints else ""
        return (f"{source}: parameter {', '.join(renamed)}{others}; use the new name (the run config's) for "
                f"{notebook.name}")
    return (f"{source}: unknown parameter(s) {', '.join(hints)} for {notebook.name}; "
            f"its parameters are {sorted(declared)}")


def _type_message(source: str, notebook: Path, key: str, value, type_name: str) -> str:
    message = (f"{source}: parameter '{key}' = {value!r} is {type(value).__name__}, "
               f"but {notebook.name} declares it {type_name}")
    if isinstance(value, str) and type_name in ("int", "float"):
        message += "; write it as a number without quotes"
    elif isinstance(value, str) and type_name == "bool":
        message += "; write true or false"
    elif isinstance(value, float) and type_name == "int" and value.is_integer():
        message += f"; write it as an integer, e.g. {int(value)}"
    return message


def _default(spec: dict):
    """The notebook's default value of a parameter (its source text evaluated), or None."""
    try:
        return ast.literal_eval(spec.get("default") or "None")
    except (ValueError, SyntaxError):
        return None


def check_params(notebook: Path, params: dict, source: str) -> None:
    """Every key must be a parameter of the notebook, with a value of the annotated type.

    Lists must be non-empty, with items of the type of the default's items; numbers finite;
    run_name a plain folder name. All before the notebook starts, not an hour into it.
    """
    import papermill

    declared = papermill.inspect_notebook(str(notebook))
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise ConfigError(_unknown_key_message(source, notebook, unknown, declared))
    for key, value in params.items():
        type_name = (declared[key].get("inferred_type_name") or "").replace("None", "").strip()
        allowed = _TYPES.get(type_name)
        is_bool_as_number = isinstance(value, bool) and type_name in ("int", "float")
        if allowed and (not isinstance(value, allowed) or is_bool_as_number):
            raise ConfigError(_type_message(source, notebook, key, value, type_name))
        _check_value(f"{source}: parameter '{key}'", notebook, value, _default(declared[key]))
        if key == "run_name":
            _check_run_name(source, value)
        if key == "accelerator":
            _check_accelerator(source, value)
        if key == "executor":
            _check_executor(source, value)
        if key == "compare_with" and value:
            _check_compare_with(source, value, params.get("run_name"))


def _check_executor(source: str, executor) -> None:
    """`executor: slrum` fails here, with exit status 2, not as a failed notebook once its kernel has started."""
    from chemscale.sweep import EXECUTORS

    if isinstance(executor, str) and executor not in EXECUTORS:
        close = difflib.get_close_matches(executor, EXECUTORS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{source}: parameter 'executor' = {executor!r} is not one of {', '.join(EXECUTORS)}{hint}")


def _item_type(default) -> str | None:
    """The one type name ('int', 'float', 'str', ...) of a default list's items, or None if mixed or empty."""
    names = {type(v).__name__ for v in default} if isinstance(default, list) else set()
    return names.pop() if len(names) == 1 else None


def _check_value(what: str, notebook: Path, value, default) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{what} = {value!r}: a number must be finite")
    if isinstance(value, int) and not isinstance(value, bool) and value < 0:  # max_steps: -1 is "no limit" in Lightning
        raise ConfigError(f"{what} = {value!r}: a count, size or seed cannot be negative")
    if not isinstance(value, list):
        return
    if not value:
        raise ConfigError(f"{what} = []: list at least one value")
    item_type = _item_type(default)
    for i, item in enumerate(value):
        allowed = _TYPES.get(item_type)
        if allowed and (not isinstance(item, allowed) or (isinstance(item, bool) and item_type != "bool")):
            hint = (f"; write it as an integer, e.g. {int(item)}"
                    if isinstance(item, float) and item_type == "int" and item.is_integer() else "")
            raise ConfigError(f"{what}: item {i + 1} = {item!r} is {type(item).__name__}, but {notebook.name} "
                              f"declares a list of {item_type} (default {default}){hint}")
        _check_value(f"{what}: item {i + 1}", notebook, item, None)


def _check_accelerator(source: str, accelerator) -> None:
    """`accelerator` is Lightning's: accelerator: cpux fails here, not when the first run starts.

    The usual names pass without importing Lightning (seconds); others are looked up in its registry.
    """
    usual = {"auto", "cpu", "gpu", "cuda", "mps", "tpu", "hpu"}
    if not isinstance(accelerator, str) or accelerator in usual:
        return
    from pytorch_lightning.accelerators import AcceleratorRegistry

    names = usual | set(AcceleratorRegistry.available_accelerators())
    if accelerator not in names:
        close = difflib.get_close_matches(accelerator, sorted(names), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{source}: parameter 'accelerator' = {accelerator!r} is not a Lightning accelerator"
                          f"{hint}; one of {sorted(names)}")


def _check_run_name(source: str, name) -> None:
    """A run name is one folder under runs/: no '/', no '..', so runs never land outside CHEMSCALE_RUNS."""
    if not isinstance(name, str) or not name.strip() or name in (".", "..") or "/" in name or os.sep in name:
        raise ConfigError(f"{source}: parameter 'run_name' = {name!r} must be a plain folder name "
                          f"(no '/', not '..'): the study's one folder under runs/")


def _check_compare_with(source: str, name, run_name) -> None:
    """compare_with names an earlier study whose exponents.csv exists now, not at the end of an hour's training."""
    from chemscale import scaling

    if not isinstance(name, str) or name in (".", "..") or "/" in name or os.sep in name:
        raise ConfigError(f"{source}: parameter 'compare_with' = {name!r} must be another study's run_name, a plain "
                          f"folder name under runs/ (no '/', not '..')")
    if name == run_name:
        raise ConfigError(f"{source}: parameter 'compare_with' = {name!r} is this study's own run_name; name the "
                          f"study to compare with (e.g. cpu_chemgpt, the fp32 study)")
    path = paths.RUNS / name / scaling.EXPONENTS_FILE
    if not path.is_file():
        raise ConfigError(f"{source}: parameter 'compare_with' = {name!r}: {path} does not exist; run that study "
                          f"first (its notebook writes the file), or set compare_with to \"\"")


def _is_path(value) -> bool:
    return isinstance(value, str) and ("/" in value or os.sep in value or value.startswith("~")
                                       or any(s in _PATH_SUFFIXES for s in Path(value).suffixes))


def _is_data_file(key: str, value, names: tuple = ()) -> bool:
    """A data parameter's value names a file: it looks like a path, or it is a bare word that is not
    one of the notebook's own source names (`mosses` is a file that does not exist, not a name)."""
    bare_word = isinstance(value, str) and ":" not in value and value not in names
    return bool(_DATA_KEY.search(key)) and (_is_path(value) or bare_word)


def resolve_paths(params: dict, source: str, base: Path | None = None, names: tuple = ()) -> dict:
    """Params with every data path made absolute (the notebook runs in notebooks/), each checked to be a file.

    Relative paths are relative to `base` (the directory `chemscale.study` is run from), so a
    missing PubChem or rMD17 file is reported before the notebook starts, naming the key.
    `names` are the source names that are not files (the notebook's defaults, e.g. 'moses').
    """
    base = Path(base or Path.cwd())
    resolved = dict(params)
    for key, value in params.items():
        if not _is_data_file(key, value, names):
            continue
        path = (base / Path(value).expanduser()).absolute()
        if not path.exists():
            close = difflib.get_close_matches(value, names, n=1)
            hint = f"did you mean {close[0]!r}? Or p" if close else "p"
            raise ConfigError(f"{source}: parameter '{key}' = {value!r}: no such file ({path}); "
                              f"{hint}ut the file there or point '{key}' at a local copy")
        if path.is_dir():
            raise ConfigError(f"{source}: parameter '{key}' = {value!r} is a folder ({path}); "
                              f"point '{key}' at the data file inside it")
        resolved[key] = str(path)
    return resolved


def params_path(notebook: Path, profile: str) -> Path:
    return paths.PARAMS / notebook.stem / f"{profile}.yaml"


def load_checked(notebook: Path, source: Path) -> dict:
    """Read a params file and check it against the notebook: keys, types, paths. Returns what to inject."""
    import papermill

    params = read_params(source)
    check_params(notebook, params, _shown(source))
    defaults = {key: _default(spec) for key, spec in papermill.inspect_notebook(str(notebook)).items()}
    names = tuple(v for k, v in defaults.items() if _DATA_KEY.search(k) and isinstance(v, str) and not _is_path(v))
    resolved = resolve_paths(params, _shown(source), names=names)
    _check_recipe({**defaults, **resolved}, _shown(source))
    return resolved


def _check_recipe(params: dict, source: str) -> None:
    """A `recipe` dict (the GNN notebook's data recipe) is checked by the recipe it configures, now:
    recipe: {n_trian: 5} is an unknown field of the recipe that data_source names."""
    recipe, data = params.get("recipe"), params.get("data_source")
    if not isinstance(recipe, dict) or not isinstance(data, str) or not (":" in data or Path(data).is_file()):
        return
    from chemscale.ff.data import as_recipe

    try:
        as_recipe(data, **recipe)
    except (ConfigError, ValueError, TypeError) as e:
        raise ConfigError(f"{source}: parameter 'recipe' = {recipe!r} for data_source {data!r}: {e}") from None


# --- the Jupyter kernel and Lab settings of this environment ---

def install_jupyter(prefix: str | os.PathLike | None = None) -> Path:
    """Register the `chemscale` kernel (this Python) under `prefix` and turn Lab's autosave off there.

    Lab's autosave would otherwise write outputs into the committed notebooks as soon as a cell
    runs; with it off, a notebook changes on disk only when the user saves it.
    """
    from ipykernel.kernelspec import install

    prefix = Path(prefix or sys.prefix)
    spec_dir = Path(install(kernel_name=KERNEL, display_name=KERNEL, prefix=str(prefix)))
    overrides = prefix / "share" / "jupyter" / "lab" / "settings" / "overrides.json"
    settings = json.loads(overrides.read_text()) if overrides.exists() else {}
    settings.setdefault("@jupyterlab/docmanager-extension:plugin", {})["autosave"] = False
    atomic_write_json(overrides, settings)
    return spec_dir


def check_kernel() -> None:
    """The `chemscale` kernel exists and runs this environment's Python, not another one."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    fix = "register it with `python -m chemscale.study --setup-jupyter` (make setup does)"
    try:
        spec = KernelSpecManager().get_kernel_spec(KERNEL)
    except NoSuchKernel:
        raise ConfigError(f"no Jupyter kernel '{KERNEL}' in this environment; {fix}") from None
    kernel_bin = os.path.dirname(os.path.abspath(spec.argv[0]))
    if kernel_bin != os.path.dirname(os.path.abspath(sys.executable)):
        raise ConfigError(f"Jupyter kernel '{KERNEL}' ({spec.resource_dir}) runs {spec.argv[0]}, "
                          f"not this environment's {sys.executable}; {fix}")


# --- running ---

def _keys_named(text: str, params: dict) -> list[str]:
    """Params keys the error text mentions, by name or by a (string) value."""
    return [k for k, v in params.items()
            if re.search(rf"\b{re.escape(k)}\b", text) or (isinstance(v, str) and len(v) >= 4 and v in text)]


def _failure_message(e, notebook: Path, source: Path, params: dict, out: Path, log: Path) -> str:
    evalue = _ANSI.sub("", str(e.evalue)).strip()
    first = (evalue.splitlines() or [""])[0]
    first = first if len(first) <= 300 else first[:300] + "..."
    first += "" if first.endswith((".", "!", "?")) else "."
    keys = _keys_named(evalue, params)
    hint = (f"Check {', '.join(repr(k) for k in keys)} in {_shown(source)}." if keys
            else f"The parameters came from {_shown(source)}.")
    return (f"{notebook.name} with {_shown(source)} stopped in cell {_cell(e)}: "
            f"{e.ename}: {first} {hint} Full traceback: {_shown(log)} and the executed notebook {_shown(out)}.")


def _cell(e) -> str:
    """The failing cell as the summary and the error paragraph name it: `[3] (`fit = ...`)`."""
    return f"[{e.exec_count}] (`{(e.source.strip().splitlines() or [''])[0][:80]}`)"


def executed_path(notebook: Path, label: str, output_dir: Path | None = None) -> Path:
    """Where the executed copy of `notebook` run with the params labelled `label` goes."""
    return Path(output_dir or paths.RUNS / "notebooks") / f"{notebook.stem}.{label}.ipynb"


def run_notebook(notebook: Path, source: Path, label: str, output_dir: Path | None = None,
                 progress: bool = True) -> Path:
    """Execute one notebook with the params of `source`; returns the executed notebook's path.

    Raises NotebookFailed with one paragraph when a cell raises, the kernel dies or papermill
    fails otherwise (a kernel that does not start on a loaded machine): the next notebook still runs.
    """
    import papermill
    from nbclient.exceptions import DeadKernelError

    params = load_checked(notebook, source)
    check_kernel()
    out = executed_path(notebook, label, output_dir)
    log = out.with_suffix(".log")
    out.parent.mkdir(parents=True, exist_ok=True)
    log.unlink(missing_ok=True)
    _running["out"] = out
    try:
        papermill.execute_notebook(str(notebook), str(out), parameters=params, kernel_name=KERNEL,
                                   cwd=str(notebook.parent), progress_bar=progress)
    except papermill.PapermillExecutionError as e:
        atomic_write_text(log, _ANSI.sub("", "\n".join(e.traceback)) + "\n")
        raise NotebookFailed(_failure_message(e, notebook, source, params, out, log), _cell(e)) from None
    except DeadKernelError as e:
        raise NotebookFailed(f"{notebook.name} with {_shown(source)}: the kernel died ({e}); out of memory? "
                             f"The executed notebook up to that point: {_shown(out)}.", "kernel died") from None
    except Exception as e:
        atomic_write_text(log, traceback.format_exc())
        raise NotebookFailed(f"{notebook.name} with {_shown(source)}: {e.__class__.__name__}: {e}; "
                             f"full traceback: {_shown(log)}.", "(none: papermill failed)") from None
    return out


class RunWatcher(threading.Thread):
    """Prints a line when a training run under `root` starts or ends, while a notebook runs.

    papermill shows only which cell runs; a sweep's runs are processes of their own that the
    study cannot see otherwise. Their folders can: a run has ended when result.json is there
    (written atomically, so never read half-written), and is running while the process that took
    its train.lock (its pid is written there) lives on this host. A run whose process went without
    a result.json ended without one (crashed or stopped). Runs on other hosts (Slurm) show only
    when they end. Runs finished before the notebook started are not counted: a restarted study
    reuses them without training.
    """

    def __init__(self, root: Path, notebook: str, interval: float = POLL_S, write=None):
        super().__init__(daemon=True, name="chemscale-run-watcher")
        self.root, self.notebook, self.interval, self.write = Path(root), notebook, interval, write or _say
        self.halt, self.lock = threading.Event(), threading.RLock()  # reentrant: a signal's poll may interrupt one
        self.state = {key: "finished" for key, run_dir in self._folders() if runs.is_finished(run_dir)}
        self.before = set(self.state)

    def _folders(self):
        """(study/run_id, folder) of each run folder; a folder that goes while listed is skipped."""
        try:
            studies = sorted((d for d in os.scandir(self.root) if d.is_dir()), key=lambda d: d.name)
        except OSError:
            return
        for study_dir in studies:
            try:
                entries = sorted(os.scandir(study_dir.path), key=lambda e: e.name)
            except OSError:
                continue
            for entry in entries:
                if _RUN_ID.fullmatch(entry.name) and entry.is_dir():
                    yield f"{study_dir.name}/{entry.name}", Path(entry.path)

    def poll(self) -> list[str]:
        """The lines for the runs that started or ended since the last poll."""
        with self.lock:
            return self._poll()

    def _poll(self) -> list[str]:
        lines = []
        for key, run_dir in self._folders():
            was = self.state.get(key)
            if key in self.before:
                continue
            if not runs.is_finished(run_dir) and _trains(run_dir):
                now, what = "running", "started"
            elif runs.is_finished(run_dir):  # looked at again: a run may write its result and exit in between
                now, what = "finished", _result_status(run_dir)
            elif was == "running":
                now, what = "failed", f"ended without a result, see {_shown(run_dir / 'train.log')}"
            else:
                continue
            if now != was:
                self.state[key] = now
                lines.append((key, what))
        seen = [s for k, s in self.state.items() if k not in self.before]
        done = f"{len(seen) - seen.count('running')} of {len(seen)} runs ended"
        return [f"{time.strftime('%H:%M:%S')} {self.notebook}: run {key} {what} ({done})" for key, what in lines]

    def run(self) -> None:
        while not self.halt.wait(self.interval):
            self._write(self.poll())

    def finish(self) -> None:
        """Stop polling and print what ended since the last poll (the notebook's last runs)."""
        self.halt.set()
        self.join()
        self._write(self.poll())

    def _write(self, lines: list[str]) -> None:
        for line in lines:
            if _running.get("stopping"):  # a signal stops the study: its own lines come next, not the runs' deaths
                return
            self.write(line)


def _trains(run_dir: Path) -> bool:
    """Whether the process that last took RUN_DIR/train.lock (chemscale.train writes `pid N on HOST` there) is alive
    on this host.

    Read, not probed with flock (chemscale.train.held_elsewhere): a probe's shared lock at the moment a trainer
    takes the lock would make the trainer refuse its run, and importing chemscale.train brings torch into the study.
    """
    try:
        owner = _LOCK_OWNER.match((run_dir / "train.lock").read_text())
    except (OSError, UnicodeDecodeError):
        return False
    return bool(owner) and owner[2] == socket.gethostname() and process_alive(int(owner[1]))


def _say(line: str) -> None:
    """One line on stdout, above papermill's progress bar (not through it), flushed for batch logs."""
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


@dataclasses.dataclass
class Outcome:
    """One notebook's line of the summary table."""

    notebook: str
    out: Path
    status: str = "not run"  # ok, failed, stopped (by a signal) or not run
    seconds: float | None = None
    cell: str = ""
    started: float | None = None  # time.perf_counter() while it runs


def summary(outcomes: list[Outcome]) -> str:
    """The table printed at the end: notebook, status, wall time, failing cell, executed notebook."""
    rows = [("notebook", "status", "wall time", "failing cell", "executed notebook")]
    rows += [(o.notebook, o.status, _duration(o.seconds), o.cell or "-", _shown(o.out) if o.seconds is not None else "-")
             for o in outcomes]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[4] for row in rows]
    counts = {status: sum(o.status == status for o in outcomes) for status in ("ok", "failed", "stopped", "not run")}
    head = f"study summary: {len(outcomes)} notebook(s), " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    return "\n".join([head, *lines])


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, s = divmod(round(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours} h {m:02d} min" if hours else f"{m} min {s:02d} s" if m else f"{s} s"


def _result_status(run_dir: Path) -> str:
    """finished or diverged, from result.json; a damaged one says so (the run is not lost for that)."""
    try:
        return str(runs.read_result(run_dir).get("status", "finished"))
    except ConfigError:
        return f"ended with a damaged {runs.RESULT}"


def _stop_kernels(grace_s: float = 10.0) -> int:
    """Stop this process's kernels and everything they started; returns how many processes were stopped.

    The kernel runs in its own session (jupyter_client) and the sweep's training runs in theirs, so
    neither sees the terminal's Ctrl-C nor dies with this process by itself: each kernel's process
    group gets SIGTERM, then whatever of the whole tree is left after `grace_s` gets SIGKILL.
    """
    import psutil

    me = psutil.Process()
    tree = me.children(recursive=True)
    for kernel in me.children():
        try:
            group = os.getpgid(kernel.pid)
            os.killpg(group, signal.SIGTERM) if group != os.getpgrp() else kernel.terminate()
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    _, alive = psutil.wait_procs(tree, timeout=grace_s)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    return len(tree)


def _on_signal(signum, frame) -> None:
    """SIGINT (Ctrl-C) or SIGTERM (kill, timeout, Slurm): stop the kernel and its runs, one line, the summary,
    130/143.

    Exits with os._exit: unwinding through papermill would try to talk to the kernel just stopped.
    """
    for other in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C while stopping changes nothing
        signal.signal(other, signal.SIG_IGN)
    _running["stopping"] = True
    for line in _running["watcher"].poll() if "watcher" in _running else []:  # what had ended, what was running
        print(line, flush=True)
    stopped = _stop_kernels()
    out = _running.get("out")
    where = f"; the executed notebook so far: {_shown(out)}" if out else ""
    what = f"{stopped} process(es) stopped (the kernel and the runs it started)" if stopped else "no notebook running"
    newline = "\n" if out else ""  # papermill's progress bar leaves its line open
    print(f"{newline}error: stopped by {signal.Signals(signum).name}; {what}{where}", file=sys.stderr, flush=True)
    outcomes = _running.get("outcomes", [])
    for outcome in outcomes:
        if outcome.started is not None and outcome.seconds is None:
            outcome.status, outcome.seconds = "stopped", time.perf_counter() - outcome.started
    if outcomes:
        print(summary(outcomes), flush=True)
    sys.stdout.flush()
    os._exit(128 + signum)


def _resolve(names: list[str]) -> list[Path]:
    if not names:
        return notebooks()
    found = []
    for name in names:
        p = Path(name)
        candidates = [p, paths.NOTEBOOKS / p.name, paths.NOTEBOOKS / f"{p.stem}.ipynb"]
        hit = next((c for c in candidates if c.suffix == ".ipynb" and c.is_file()), None)
        if hit is None:
            raise ConfigError(f"no notebook {name!r}; available: {[n.name for n in notebooks()]}")
        found.append(hit)
    return found


def _label(notebook: Path, source: Path) -> str:
    """The executed copy's label for --params FILE: its stem, or params-<stem> when that is a profile's name.

    `--params other/cpu.yaml` must not overwrite the cpu profile's executed notebook and log.
    """
    profile_file = params_path(notebook, source.stem)
    if source.stem in PROFILES and source.absolute().resolve() != profile_file.absolute().resolve():
        return f"params-{source.stem}"
    return source.stem


def _plan(args) -> list[tuple[Path, Path, str]]:
    """(notebook, params file, label of the executed copy) for each notebook to run."""
    selected = _resolve(args.notebooks)
    if args.params is not None:
        if len(args.notebooks) != 1:
            raise ConfigError(f"--params {args.params} needs exactly one NOTEBOOK (a params file belongs to one "
                              f"notebook), got {len(args.notebooks)}")
        return [(selected[0], args.params, _label(selected[0], args.params))]
    profile = args.profile or "cpu"
    return [(nb, params_path(nb, profile), profile) for nb in selected]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m chemscale.study", description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", help="notebooks to run (default: all in notebooks/)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--profile", choices=PROFILES, help="params/<notebook>/<profile>.yaml (default: cpu)")
    source.add_argument("--params", type=Path, help="your own params file, for one NOTEBOOK")
    parser.add_argument("--output-dir", type=Path, default=None, help="where executed notebooks go (runs/notebooks)")
    parser.add_argument("--setup-jupyter", action="store_true",
                        help="register the 'chemscale' kernel in this environment, turn Lab's autosave off, and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        if args.setup_jupyter:
            print(f"kernel '{KERNEL}' registered in {install_jupyter()}; JupyterLab autosave off in {sys.prefix}")
            return 0
        plan = _plan(args)
        for nb, source, _ in plan:  # check every params file and the kernel before running anything
            load_checked(nb, source)
        check_kernel()
    except ConfigError as e:  # one line, exit status 2: what was asked cannot run; nothing ran
        print(f"error: {e}", file=sys.stderr)
        return 2
    outcomes = [Outcome(nb.name, executed_path(nb, label, args.output_dir)) for nb, _, label in plan]
    _running["outcomes"] = outcomes
    for (nb, source, label), outcome in zip(plan, outcomes):
        _run_one(nb, source, label, args.output_dir, outcome)
    print(summary(outcomes), flush=True)
    return 1 if any(o.status == "failed" for o in outcomes) else 0


def _run_one(notebook: Path, source: Path, label: str, output_dir: Path | None, outcome: Outcome) -> None:
    """Run one notebook of the study with its runs watched; a failure is one `error:` paragraph and the study
    goes on."""
    print(f"{notebook.name} ({_shown(source)}): running -> {_shown(outcome.out)}", flush=True)
    watcher = RunWatcher(paths.RUNS, notebook.stem)
    _running["watcher"] = watcher
    watcher.start()
    outcome.started = time.perf_counter()
    try:
        run_notebook(notebook, source, label, output_dir)
        outcome.status = "ok"
    except (ConfigError, NotebookFailed) as e:  # a params or data file changed since the check, or a cell failed
        print(f"error: {e}", file=sys.stderr, flush=True)
        outcome.status, outcome.cell = "failed", getattr(e, "cell", "") or "(none: params)"
    finally:
        outcome.seconds = time.perf_counter() - outcome.started
        watcher.finish()
    print(f"{notebook.name} ({_shown(source)}): {outcome.status}, {_duration(outcome.seconds)} -> "
          f"{_shown(outcome.out)}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
