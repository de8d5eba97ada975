"""`python -m chemscale.study --profile cpu [NOTEBOOK ...]`: run notebooks through papermill.

Each notebook `notebooks/NN_name.ipynb` runs with `params/NN_name/<profile>.yaml` injected,
into `runs/notebooks/NN_name.<profile>.ipynb` (the executed copy, with its plots). The params
file is checked against the notebook's parameters cell first: an unknown key or a value of the
wrong type stops before anything runs, naming the file and the key.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

from chemscale import paths
from chemscale.config import ConfigError

PROFILES = ("smoke", "cpu", "gpu")
_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "list": (list,), "dict": (dict,)}


def notebooks() -> list[Path]:
    """The study's notebooks in order."""
    return sorted(paths.NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def read_params(path: Path) -> dict:
    """Load a params YAML file with a clear error naming the file and line."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of parameter names to values")
    return data


def check_params(notebook: Path, params: dict, source: str) -> None:
    """Every key must be a parameter of the notebook, with a value of the annotated type."""
    import papermill

    declared = papermill.inspect_notebook(str(notebook))
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise ConfigError(f"{source}: unknown parameter(s) {unknown} for {notebook.name}; "
                          f"its parameters are {sorted(declared)}")
    for key, value in params.items():
        type_name = (declared[key].get("inferred_type_name") or "").replace("None", "").strip()
        allowed = _TYPES.get(type_name)
        is_bool_as_number = isinstance(value, bool) and type_name in ("int", "float")
        if allowed and (not isinstance(value, allowed) or is_bool_as_number):
            raise ConfigError(f"{source}: parameter '{key}' = {value!r} is {type(value).__name__}, "
                              f"but {notebook.name} declares it {type_name}")


def params_path(notebook: Path, profile: str) -> Path:
    return paths.PARAMS / notebook.stem / f"{profile}.yaml"


def run_notebook(notebook: Path, profile: str, output_dir: Path | None = None, progress: bool = True) -> Path:
    """Execute one notebook with a profile's params; returns the executed notebook's path."""
    import papermill

    source = params_path(notebook, profile)
    params = read_params(source)
    check_params(notebook, params, str(source))
    out = Path(output_dir or paths.RUNS / "notebooks") / f"{notebook.stem}.{profile}.ipynb"
    out.parent.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(str(notebook), str(out), parameters=params, kernel_name="python3",
                               cwd=str(notebook.parent), progress_bar=progress)
    return out


def _resolve(names: list[str]) -> list[Path]:
    if not names:
        return notebooks()
    found = []
    for name in names:
        p = Path(name)
        candidates = [p, paths.NOTEBOOKS / p.name, paths.NOTEBOOKS / f"{p.stem}.ipynb"]
        hit = next((c for c in candidates if c.suffix == ".ipynb" and c.exists()), None)
        if hit is None:
            raise ConfigError(f"no notebook {name!r}; available: {[n.name for n in notebooks()]}")
        found.append(hit)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chemscale.study", description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", help="notebooks to run (default: all in notebooks/)")
    parser.add_argument("--profile", default="cpu", choices=PROFILES)
    parser.add_argument("--output-dir", type=Path, default=None, help="where executed notebooks go (runs/notebooks)")
    args = parser.parse_args(argv)
    try:
        selected = _resolve(args.notebooks)
        for nb in selected:  # check every params file before running anything
            check_params(nb, read_params(params_path(nb, args.profile)), str(params_path(nb, args.profile)))
        for nb in selected:
            t0 = time.perf_counter()
            out = run_notebook(nb, args.profile, args.output_dir)
            print(f"{nb.name} ({args.profile}): {time.perf_counter() - t0:.0f} s -> {out}", flush=True)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
