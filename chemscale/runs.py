"""Run folders: what a run is, where it lives, and how it describes itself.

A run folder `runs/<study>/<run_id>/` holds `config.json` (everything needed to rerun, every
default written out, plus seed, versions and git commit), `metrics.csv` (one row per training
step and per validation), `result.json` (final metrics; its presence means "finished") and
`last.ckpt`. The run id is the hash of the complete settings, so the folder's name says what
ran there. Every file is written atomically, so a folder is never half-written.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from chemscale import paths
from chemscale.config import ConfigError, atomic_write_json

CONFIG, METRICS, RESULT, CHECKPOINT = "config.json", "metrics.csv", "result.json", "last.ckpt"
METRICS_RENAMED = {"tokens": "samples"}  # metrics.csv columns of runs started before issue 9 -> today's names

# Packages whose versions change numbers; recorded with every run.
_VERSIONED = ("torch", "numpy", "selfies", "pytorch-lightning", "rdkit", "schnetpack", "tblite", "scipy")


def run_id(config: dict) -> str:
    """Stable id of a run config: the hash of its canonical JSON, every default filled in.

    Defaults count (`chemscale.run_config.complete_config`): a config that leaves `lr` out and one
    that writes the default `lr` are the same run, and changing a default in the code changes
    the id of every config that relied on it, so no finished run of the old default is reused.
    Metadata (`meta`) is left out. Raises `ConfigError` for a config that does not validate.
    """
    from chemscale.run_config import complete_config

    return _hash(complete_config(config))


def _hash(config: dict) -> str:
    body = {k: v for k, v in config.items() if k != "meta"}
    blob = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def check_folder(run_dir: Path, config: dict, expected: dict | None = None) -> None:
    """Refuse a config.json that does not hash to its folder's name: it was edited, or is not this run's.

    A run folder's name is its settings' id, so an edited learning rate or width would otherwise
    be trained (or resumed from a checkpoint of other settings) under a name that says otherwise.
    `expected`, the complete settings of the folder's id (a sweep's config), lets the error name
    each key that differs: the hash alone cannot say which setting was changed.
    """
    run_dir = Path(run_dir)
    actual = run_id(config)
    if actual == run_dir.name:
        return
    path = run_dir / CONFIG
    if _hash(config) == run_dir.name:
        from chemscale.run_config import complete_config

        full = complete_config(config)
        added = sorted(f"{s}.{k}" for s, section in full.items() if isinstance(section, dict)
                       for k in section if k not in (config.get(s) or {}))
        lacks = f"; its settings lack {added}, keys added since, whose defaults are now part of the id" if added else ""
        why = (f"it was written by an older chemscale, whose run ids left out default values{lacks}; "
               "run its sweep again to make the run under its current id (from step 0: this folder's checkpoint "
               "belongs to the old id)")
    else:
        changed = _differences(config, expected) if expected is not None else []
        where = f" ({'; '.join(changed)})" if changed else ""
        why = (f"was it edited by hand{where}? A run's settings are fixed by its id: restore the file, or make a new "
               "run for the new settings (chemscale.sweep.grid or chemscale.runs.create)")
    raise ConfigError(f"{path}: these settings hash to run id {actual}, but the folder is {run_dir.name}; {why}")


def _settings(config: dict) -> dict:
    """A config's settings as {'train.lr': 0.003, 'seed': 0}; metadata left out."""
    flat = {}
    for key, value in config.items():
        if key == "meta":
            continue
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def _differences(stored: dict, expected: dict) -> list[str]:
    """'train.lr is 0.5 in the file, 0.003 for this run id' for each setting where `stored` differs from `expected`."""
    have, want = _settings(stored), _settings(expected)
    return [f"{key} is {_shown(have, key)} in the file, {_shown(want, key)} for this run id"
            for key in sorted(set(have) | set(want)) if key not in have or key not in want or have[key] != want[key]]


def _shown(settings: dict, key: str) -> str:
    return json.dumps(settings[key]) if key in settings else "absent"


def git_commit() -> str | None:
    """The repository's HEAD commit (with '-dirty' if the tree has changes), or None outside git."""
    try:
        head = subprocess.run(
            ["git", "-C", str(paths.ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(paths.ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def versions() -> dict[str, str | None]:
    """Versions of Python, chemscale and the packages that change numbers."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("chemscale", *_VERSIONED):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def describe() -> dict:
    """Provenance recorded in config.json/result.json: versions, git commit, time, host."""
    return {
        "versions": versions(),
        "git_commit": git_commit(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
    }


def create(study: str, config: dict, root: Path | None = None) -> Path:
    """Create (or reuse) the run folder of `config` under `root/study`; returns its path.

    config.json holds the config with every default filled in, so the folder describes its run
    completely and keeps its id when a default changes later.
    """
    from chemscale.run_config import complete_config

    full = complete_config(config, f"<run config of study {study!r}>")
    run_dir = Path(root or paths.RUNS) / study / _hash(full)
    cfg_path = run_dir / CONFIG
    if cfg_path.exists():
        check_folder(run_dir, read_config(run_dir), full)
        return run_dir
    atomic_write_json(cfg_path, {**full, "meta": describe()})
    return run_dir


def read_config(run_dir: Path) -> dict:
    """Read a run's config.json with a clear error for a missing folder, a file given for it, or a corrupt file."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG
    if run_dir.is_file():
        raise ConfigError(f"{run_dir}: a file, not a run folder; give the folder that holds config.json "
                          f"({run_dir.parent if run_dir.name == CONFIG else 'a runs/<study>/<run_id> folder'})")
    if not run_dir.exists():
        raise ConfigError(f"{run_dir}: no such run folder")
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no config.json in this run folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({_why(e)})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object of settings, got {type(config).__name__}")
    return config


def read_result(run_dir: Path) -> dict | None:
    """The run's result.json, or None if the run has not finished; a damaged one is named with the way out."""
    path = Path(run_dir) / RESULT
    if not path.exists():
        return None
    retrain = f"to train the run again from step 0: python -m chemscale.train {Path(run_dir)} --retrain"
    try:
        result = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({_why(e)}); the run's result is damaged; {retrain}") from None
    if not isinstance(result, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(result).__name__}; the run's result is "
                          f"damaged; {retrain}")
    return result


def _why(e: ValueError) -> str:
    return f"line {e.lineno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else str(e)


def is_finished(run_dir: Path) -> bool:
    return (Path(run_dir) / RESULT).exists()
