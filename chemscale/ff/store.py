"""A dataset folder on disk: written completely or not at all, and verified before every use.

    train.db, val.db, test.db      schnetpack ASEAtomsData: units (eV, Ang, eV/Ang) in its metadata,
                                   per-element reference energies as its `atomrefs`
    train.npz, val.npz, test.npz   the same structures as contiguous arrays, for a fast load
    meta.json                      recipe, units, reference energies, counts, dropped entries by reason
    manifest.json                  size and SHA-256 of every other file, written last

A build writes into `temp_dir(final)` and renames it into place when complete; `verify` checks
a folder against its manifest, so an interrupted or damaged build is detected, never reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from collections import Counter
from pathlib import Path

import numpy as np

from chemscale.config import atomic_write_json, process_alive
from chemscale.ff.frames import DISTANCE_UNIT, ENERGY_UNIT, FORCES_UNIT, SPLITS, FFDataError, Frames

MANIFEST, META = "manifest.json", "meta.json"
UNITS = {"energy": ENERGY_UNIT, "forces": FORCES_UNIT, "positions": DISTANCE_UNIT}
FILES = (META, *(f"{split}.{ext}" for split in SPLITS for ext in ("db", "npz")))


def write(directory: Path, splits: dict[str, Frames], references: dict[int, float], meta: dict) -> None:
    """Write every split (db + npz), meta.json and, last, the manifest into a new `directory`."""
    directory.mkdir(parents=True)
    for name, frames in splits.items():
        _write_db(directory / f"{name}.db", frames, references)
        _write_npz(directory / f"{name}.npz", frames)
    atomic_write_json(directory / META, {
        **meta, "units": UNITS,
        "reference_energies_ev": {str(z): e for z, e in references.items()},
        "elements": sorted({z for f in splits.values() for z in f.elements}),
        "dropped": dict(sum((f.dropped for f in splits.values()), Counter())),
        "splits": {name: {"structures": len(f), "atoms": len(f.numbers), "dropped": dict(f.dropped)}
                   for name, f in splits.items()},
    })
    write_manifest(directory)


def read_meta(directory: Path) -> dict:
    """meta.json of a dataset folder, refusing units other than chemscale's."""
    meta = json.loads((directory / META).read_text())
    if meta.get("units") != UNITS:
        raise FFDataError(f"{directory}: stored units {meta.get('units')} are not chemscale's {UNITS}; "
                          f"re-read the source file with its energy_unit")
    return meta


def read_split(directory: Path, split: str) -> Frames:
    """One split's structures from its npz."""
    with np.load(directory / f"{split}.npz") as z:
        return Frames(z["numbers"], z["positions"], z["forces"], z["energy"], z["n_atoms"], z["group"])


def _write_db(path: Path, frames: Frames, references: dict[int, float]) -> None:
    """schnetpack ASEAtomsData with units (and reference energies as `atomrefs`) in its metadata."""
    from ase import Atoms

    from chemscale.ff import import_schnetpack

    atomrefs = np.zeros(119)
    atomrefs[list(references)] = list(references.values())
    db = import_schnetpack().data.ASEAtomsData.create(
        str(path), distance_unit=DISTANCE_UNIT, property_unit_dict={"energy": ENERGY_UNIT, "forces": FORCES_UNIT},
        atomrefs={"energy": atomrefs.tolist()})
    starts = frames.atom_start
    for chunk in np.array_split(np.arange(len(frames)), max(1, len(frames) // 1000)):  # one transaction per chunk
        atoms = [slice(starts[k], starts[k] + frames.n_atoms[k]) for k in chunk]
        if len(chunk):
            db.add_systems([{"energy": frames.energy[k:k + 1], "forces": frames.forces[a]} for k, a in zip(chunk, atoms)],
                           [Atoms(frames.numbers[a], frames.positions[a]) for a in atoms])


def _write_npz(path: Path, frames: Frames) -> None:
    with open(path, "wb") as f:
        np.savez(f, numbers=frames.numbers.astype(np.uint8), positions=frames.positions, forces=frames.forces,
                 energy=frames.energy, n_atoms=frames.n_atoms, group=frames.group)


# --- integrity ----------------------------------------------------------------------------------

def write_manifest(directory: Path) -> None:
    """Size and SHA-256 of every file in `directory` except the manifest itself."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != MANIFEST)
    atomic_write_json(directory / MANIFEST, {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in files})


_VERIFIED: dict[Path, tuple] = {}  # folder -> (name, size, mtime) of its files when last verified intact


def verify(directory: Path) -> str | None:
    """None if `directory` is a complete dataset matching its manifest, else what is wrong.

    Checksums are computed once per process while no file's size or mtime changes (a CLI call
    loads every split of one folder).
    """
    if not directory.is_dir():
        return "no such dataset folder"
    signature = _signature(directory)
    if _VERIFIED.get(directory) == signature:
        return None
    problem = _verify(directory)
    if problem is None:
        _VERIFIED[directory] = signature
    return problem


def _signature(directory: Path) -> tuple:
    return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in directory.iterdir() if p.is_file()))


def _verify(directory: Path) -> str | None:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return f"no readable {MANIFEST} (an interrupted build?)"
    if not isinstance(manifest, dict) or not set(FILES) <= set(manifest):
        return f"{MANIFEST} does not list all of {list(FILES)}"
    for name, entry in manifest.items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != entry.get("bytes"):
            return f"{name} is missing or has the wrong size"
        if sha256(path) != entry.get("sha256"):
            return f"{name} does not match its checksum"
    return None


def temp_dir(final: Path) -> Path:
    """Where this process builds `final` before renaming it into place."""
    return final.parent / f".{final.name}.{socket.gethostname()}.{os.getpid()}.tmp"


def remove_stale_temps(final: Path) -> None:
    """Delete this host's temporary builds of `final` whose process is gone (killed mid-build)."""
    for tmp in final.parent.glob(f".{final.name}.{socket.gethostname()}.*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
