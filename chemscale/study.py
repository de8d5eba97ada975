"""`python -m chemscale.study --profile cpu [NOTEBOOK ...]` or `--params FILE NOTEBOOK`: run notebooks.

Each notebook `notebooks/NN_name.ipynb` runs through papermill on the `chemscale` Jupyter
kernel with `params/NN_name/<profile>.yaml` (or the user's `--params FILE`) injected, into
`runs/notebooks/NN_name.<profile>.ipynb` (the executed copy, with its plots). Every params file
is checked against the notebook's parameters cell before anything runs: an unknown key, a
value of the wrong type or a data path that does not exist stops with one line naming the
file and the key. A notebook that fails while running prints one paragraph (the cell, the
error, the params key it names) and leaves the full traceback in `<executed notebook>.log`.
`--setup-jupyter` registers the kernel in this environment and turns JupyterLab's autosave
off, so opening a committed notebook never rewrites it (`make setup` runs it).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
import time
from pathlib import Path

import yaml

from chemscale import paths
from chemscale.config import ConfigError, atomic_write_json, atomic_write_text

PROFILES = ("smoke", "cpu", "gpu")
KERNEL = "chemscale"  # the Jupyter kernel of this environment, named in every notebook's metadata
_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "list": (list,), "dict": (dict,)}
# A string parameter is a file path when it has a folder or a data-file suffix; 'moses' and
# recipes such as 'md:ethanol' are names, not paths.
_PATH_SUFFIXES = {".gz", ".bz2", ".xz", ".smi", ".txt", ".csv", ".tsv", ".npz", ".h5", ".hdf5", ".xyz", ".extxyz"}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class NotebookFailed(RuntimeError):
    """A notebook raised while running; the message is the one paragraph the user reads."""


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML reads `3e-4` as a string (YAML 1.1 wants `3.0e-4`); here it is the float YAML 1.2 says."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


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
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{shown}:{where} not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{shown}: expected a mapping of parameter names to values")
    return data


def _unknown_key_message(source: str, notebook: Path, unknown: list[str], declared: dict) -> str:
    hints = [f"'{k}' (did you mean '{m[0]}'?)" if (m := difflib.get_close_matches(k, declared, n=1)) else f"'{k}'"
             for k in unknown]
    return (f"{source}: unknown parameter(s) {', '.join(hints)} for {notebook.name}; "
            f"its parameters are {sorted(declared)}")


def _type_message(source: str, notebook: Path, key: str, value, type_name: str) -> str:
    message = (f"{source}: parameter '{key}' = {value!r} is {type(value).__name__}, "
               f"but {notebook.name} declares it {type_name}")
    if isinstance(value, str) and type_name in ("int", "float"):
        message += "; write it as a number without quotes"
    elif isinstance(value, float) and type_name == "int" and value.is_integer():
        message += f"; write it as an integer, e.g. {int(value)}"
    return message


def check_params(notebook: Path, params: dict, source: str) -> None:
    """Every key must be a parameter of the notebook, with a value of the annotated type."""
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


def _is_path(value) -> bool:
    return isinstance(value, str) and ("/" in value or os.sep in value or value.startswith("~")
                                       or any(s in _PATH_SUFFIXES for s in Path(value).suffixes))


def resolve_paths(params: dict, source: str, base: Path | None = None) -> dict:
    """Params with every file path made absolute (the notebook runs in notebooks/), each checked to exist.

    Relative paths are relative to `base` (the directory `chemscale.study` is run from), so a
    missing PubChem or rMD17 file is reported before the notebook starts, naming the key.
    """
    base = Path(base or Path.cwd())
    resolved = dict(params)
    for key, value in params.items():
        if not _is_path(value):
            continue
        path = (base / Path(value).expanduser()).absolute()
        if not path.exists():
            raise ConfigError(f"{source}: parameter '{key}' = {value!r}: no such file ({path}); "
                              f"put the file there or point '{key}' at a local copy")
        resolved[key] = str(path)
    return resolved


def params_path(notebook: Path, profile: str) -> Path:
    return paths.PARAMS / notebook.stem / f"{profile}.yaml"


def load_checked(notebook: Path, source: Path) -> dict:
    """Read a params file and check it against the notebook: keys, types, paths. Returns what to inject."""
    params = read_params(source)
    check_params(notebook, params, _shown(source))
    return resolve_paths(params, _shown(source))


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
    cell = (e.source.strip().splitlines() or [""])[0][:80]
    keys = _keys_named(evalue, params)
    hint = (f"Check {', '.join(repr(k) for k in keys)} in {_shown(source)}." if keys
            else f"The parameters came from {_shown(source)}.")
    return (f"{notebook.name} with {_shown(source)} stopped in cell [{e.exec_count}] (`{cell}`): "
            f"{e.ename}: {first} {hint} Full traceback: {_shown(log)} and the executed notebook {_shown(out)}.")


def run_notebook(notebook: Path, source: Path, label: str, output_dir: Path | None = None,
                 progress: bool = True) -> Path:
    """Execute one notebook with the params of `source`; returns the executed notebook's path.

    Raises NotebookFailed with one paragraph when a cell raises or the kernel dies.
    """
    import papermill
    from nbclient.exceptions import DeadKernelError

    params = load_checked(notebook, source)
    check_kernel()
    out = Path(output_dir or paths.RUNS / "notebooks") / f"{notebook.stem}.{label}.ipynb"
    log = out.with_suffix(".log")
    out.parent.mkdir(parents=True, exist_ok=True)
    log.unlink(missing_ok=True)
    try:
        papermill.execute_notebook(str(notebook), str(out), parameters=params, kernel_name=KERNEL,
                                   cwd=str(notebook.parent), progress_bar=progress)
    except papermill.PapermillExecutionError as e:
        atomic_write_text(log, _ANSI.sub("", "\n".join(e.traceback)) + "\n")
        raise NotebookFailed(_failure_message(e, notebook, source, params, out, log)) from None
    except DeadKernelError as e:
        raise NotebookFailed(f"{notebook.name} with {_shown(source)}: the kernel died ({e}); out of memory? "
                             f"The executed notebook up to that point: {_shown(out)}.") from None
    return out


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


def _plan(args) -> list[tuple[Path, Path, str]]:
    """(notebook, params file, label of the executed copy) for each notebook to run."""
    selected = _resolve(args.notebooks)
    if args.params is not None:
        if len(args.notebooks) != 1:
            raise ConfigError(f"--params {args.params} needs exactly one NOTEBOOK (a params file belongs to one "
                              f"notebook), got {len(args.notebooks)}")
        return [(selected[0], args.params, args.params.stem)]
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
    try:
        if args.setup_jupyter:
            print(f"kernel '{KERNEL}' registered in {install_jupyter()}; JupyterLab autosave off in {sys.prefix}")
            return 0
        plan = _plan(args)
        for nb, source, _ in plan:  # check every params file and the kernel before running anything
            load_checked(nb, source)
        check_kernel()
        for nb, source, label in plan:
            t0 = time.perf_counter()
            out = run_notebook(nb, source, label, args.output_dir)
            print(f"{nb.name} ({_shown(source)}): {time.perf_counter() - t0:.0f} s -> {_shown(out)}", flush=True)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NotebookFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
