"""Validated dataclass configs and atomic file writes, shared by every module.

A config is a `@dataclass` next to the code that consumes it; `from_dict` builds one from
JSON/YAML data and rejects unknown keys, wrong types and impossible values with one error
that names the key and the file it came from.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import tempfile
import typing
from pathlib import Path
from typing import Any


_UMASK = os.umask(0)
os.umask(_UMASK)


class ConfigError(ValueError):
    """A config key is unknown, mistyped or out of range; the message names key and source."""


def _check_type(value: Any, annotation: Any) -> bool:
    """True if `value` fits the (simple) type annotation: int, float, str, bool, Optional, list, dict."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return any(_check_type(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(annotation) or (Any,)
        return isinstance(value, (list, tuple)) and all(_check_type(v, inner) for v in value)
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:  # an int is a fine float (1 vs 1.0 in YAML)
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def from_dict(cls: type, data: dict, source: str = "<config>"):
    """Build dataclass `cls` from `data`, naming `source` (a file) in any error.

    Unknown keys and wrong types raise `ConfigError` (a key in `cls.RENAMED`, a dict of old name ->
    new name, is named with its new name); `cls.__post_init__` may raise `ConfigError`/`ValueError`
    for impossible values, re-raised here with the source.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    renamed = getattr(cls, "RENAMED", {})  # old key -> new key, for configs (run folders) written before a rename
    if moved := [f"'{k}' was renamed '{renamed[k]}'" for k in unknown if k in renamed]:
        others = [k for k in unknown if k not in renamed]
        raise ConfigError(
            f"{source}: key {', '.join(moved)}{f'; unknown key(s) {others}' if others else ''}: written by an older "
            f"chemscale. Use the new name; a run folder made before the rename is not resumed under it (its id "
            f"changes): run its sweep again to train it under its new id"
        )
    if unknown:
        close = [f"'{k}' -> '{m[0]}'" for k in unknown if (m := difflib.get_close_matches(str(k), fields, n=1))]
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"{source}: unknown key(s) {unknown} for {cls.__name__}; known keys: {sorted(fields)}{hint}"
        )
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        if not _check_type(value, hints[key]):
            raise ConfigError(
                f"{source}: key '{key}' = {value!r} has type {type(value).__name__}, "
                f"expected {getattr(hints[key], '__name__', hints[key])}"
            )
    try:
        return cls(**data)
    except (ConfigError, ValueError, TypeError) as e:
        raise ConfigError(f"{source}: {e}") from None


def require(ok: bool, key: str, message: str) -> None:
    """Raise ConfigError('key: message') unless ok; used in __post_init__ checks."""
    if not ok:
        raise ConfigError(f"key '{key}' {message}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; caches are shared on clusters
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (its temporary files are then not stale)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True
