"""Run folders: what a run is, where it lives, and how it describes itself.

A run folder `runs/<study>/<run_id>/` holds `config.json` (everything needed to rerun, plus
seed, versions and git commit), `metrics.csv` (one row per training step and per validation),
`result.json` (final metrics; its presence means "finished") and `last.ckpt`. Every file is
written atomically, so a folder is never half-written.
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

# Packages whose versions change numbers; recorded with every run.
_VERSIONED = ("torch", "numpy", "selfies", "pytorch-lightning", "rdkit", "schnetpack", "tblite", "scipy")


def run_id(config: dict) -> str:
    """Stable id of a run config: the hash of its canonical JSON (metadata excluded)."""
    body = {k: v for k, v in config.items() if k != "meta"}
    blob = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


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
    """Create (or reuse) the run folder of `config` under `root/study`; returns its path."""
    run_dir = Path(root or paths.RUNS) / study / run_id(config)
    cfg_path = run_dir / CONFIG
    if cfg_path.exists():
        existing = read_config(run_dir)
        if run_id(existing) != run_dir.name:
            raise ConfigError(f"{cfg_path}: config does not hash to its folder name; was it edited by hand?")
        return run_dir
    atomic_write_json(cfg_path, {**config, "meta": describe()})
    return run_dir


def read_config(run_dir: Path) -> dict:
    """Read a run's config.json with a clear error for a missing or corrupt file."""
    path = Path(run_dir) / CONFIG
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no config.json in this run folder") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None


def read_result(run_dir: Path) -> dict | None:
    """The run's result.json, or None if the run has not finished."""
    path = Path(run_dir) / RESULT
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None


def is_finished(run_dir: Path) -> bool:
    return (Path(run_dir) / RESULT).exists()
