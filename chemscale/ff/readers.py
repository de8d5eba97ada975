"""Readers for users' own energies+forces files; each returns `Frames` in eV, Å, eV/Å.

| format                                    | energies in (documented) | a file may declare        | NaN entries          |
|-------------------------------------------|--------------------------|---------------------------|----------------------|
| rMD17 `.npz` (nuclear_charges, coords,    | kcal/mol                 | -                         | error naming frame   |
|   energies, forces)                       |                          |                           |                      |
| sGDML/MD17 `.npz` (R, z, E, F)            | kcal/mol                 | `e_unit`, `r_unit` fields | error naming frame   |
| ANI-1x `.h5` (group per formula)          | Hartree                  | -                         | filtered and counted |
| extxyz (`.xyz`, `.extxyz`)                | eV                       | info key `energy_unit`    | error naming frame   |
| ASE db / schnetpack `ASEAtomsData` `.db`  | eV                       | `_property_unit_dict`     | error naming frame   |

Forces are in energy unit per distance unit (Å unless the file says Bohr). `energy_unit=None`
reads a file in its declared unit, else the format's documented one; an explicit unit that
contradicts the file's declaration raises (`frames.resolve_unit`). Every error is an
`FFDataError` naming the file.
"""

from __future__ import annotations

import zipfile
from collections import Counter
from pathlib import Path

import numpy as np

from chemscale.ff.frames import FFDataError, Frames, distance_factor, energy_factor, resolve_unit, unit_name

RMD17_KEYS = ("nuclear_charges", "coords", "energies", "forces")
SGDML_KEYS = ("z", "R", "E", "F")
EXTXYZ_SUFFIXES = (".xyz", ".extxyz")
H5_SUFFIXES = (".h5", ".hdf5")


def read(path, energy_unit: str | None = None) -> Frames:
    """Read any supported file, chosen by suffix (and, for `.npz`, by its keys)."""
    path = Path(path)
    if not path.is_file():
        raise FFDataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        keys = _npz_keys(path)
        if "nuclear_charges" in keys or "coords" in keys:
            return read_rmd17(path, energy_unit)
        if "R" in keys or "z" in keys:
            return read_sgdml(path, energy_unit)
        raise FFDataError(f"{path}: not an rMD17 npz (keys {list(RMD17_KEYS)}) nor an sGDML npz "
                          f"(keys {list(SGDML_KEYS)}); found keys: {sorted(keys)}")
    if suffix in H5_SUFFIXES:
        return read_ani1x(path, energy_unit)
    if suffix in EXTXYZ_SUFFIXES:
        return read_extxyz(path, energy_unit)
    if suffix == ".db":
        return read_ase_db(path, energy_unit)
    raise FFDataError(f"{path}: unknown format {suffix!r}; readable: .npz (rMD17, sGDML), .h5 (ANI-1x), "
                      f".xyz/.extxyz, .db (ASE/schnetpack)")


# --- npz (rMD17, sGDML) -------------------------------------------------------------------------

def read_rmd17(path, energy_unit: str | None = None) -> Frames:
    """rMD17 `.npz`: one molecule's trajectory in kcal/mol and kcal/mol/Å."""
    arrays = _load_npz(path, RMD17_KEYS, "rMD17")
    unit = resolve_unit(energy_unit, None, "kcal/mol", str(path))
    return _molecule_frames(path, arrays["nuclear_charges"], arrays["coords"], arrays["energies"], arrays["forces"],
                            energy_factor(unit), 1.0)


def read_sgdml(path, energy_unit: str | None = None) -> Frames:
    """sGDML/MD17 `.npz`: `R`, `z`, `E`, `F`, in `e_unit` (default kcal/mol) and `r_unit` (default Å)."""
    arrays = _load_npz(path, SGDML_KEYS, "sGDML", optional=("e_unit", "r_unit"))
    declared = str(arrays["e_unit"]) if "e_unit" in arrays else None
    unit = resolve_unit(energy_unit, declared, "kcal/mol", str(path))
    r_factor = distance_factor(str(arrays["r_unit"]), str(path)) if "r_unit" in arrays else 1.0
    return _molecule_frames(path, arrays["z"], arrays["R"], arrays["E"], arrays["F"], energy_factor(unit), r_factor)


def _npz_keys(path: Path) -> list[str]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return list(npz.files)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise FFDataError(f"{path}: not a readable .npz file (truncated or corrupt?): {type(e).__name__}: {e}") from None


def _load_npz(path, required, fmt: str, optional=()) -> dict[str, np.ndarray]:
    """The `required` (and present `optional`) arrays; only those are read (others may need pickle)."""
    keys = _npz_keys(Path(path))
    missing = [k for k in required if k not in keys]
    if missing:
        raise FFDataError(f"{path}: missing key(s) {missing} for an {fmt} .npz; found keys: {sorted(keys)}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in (*required, *optional) if k in keys}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # a member cut short
        raise FFDataError(f"{path}: not a readable .npz file (truncated or corrupt?): {type(e).__name__}: {e}") from None


def _molecule_frames(path, numbers, coords, energies, forces, ev_per_unit: float, ang_per_unit: float) -> Frames:
    """Frames of one molecule's trajectory, shapes and finiteness checked, converted to eV and Å."""
    numbers, coords, forces = np.asarray(numbers).reshape(-1), np.asarray(coords), np.asarray(forces)
    energies = np.asarray(energies, dtype=np.float64).reshape(-1)  # sGDML stores E as (F, 1)
    _check_shapes(path, len(numbers), coords, energies, forces)
    _check_finite(path, energies, forces.reshape(len(forces), -1))
    return Frames.from_trajectory(numbers, coords * ang_per_unit, forces * (ev_per_unit / ang_per_unit),
                                  energies * ev_per_unit)


def _check_shapes(where, n_atoms: int, coords, energies, forces) -> None:
    """Coordinates (F, n_atoms, 3), forces likewise, F energies; else name what disagrees."""
    if coords.ndim != 3 or coords.shape[1:] != (n_atoms, 3):
        raise FFDataError(f"{where}: atom counts do not match: {n_atoms} atomic numbers but coordinates of "
                          f"shape {coords.shape} (expected (frames, {n_atoms}, 3))")
    if forces.shape != coords.shape:
        raise FFDataError(f"{where}: forces of shape {forces.shape} do not match coordinates {coords.shape}")
    if len(energies) != len(coords):
        raise FFDataError(f"{where}: {len(energies)} energies for {len(coords)} frames")


def _check_finite(where, energies, forces_per_frame) -> None:
    """Raise naming the first frame whose energy or forces are NaN/inf (forces: one array per frame)."""
    if isinstance(forces_per_frame, np.ndarray):  # (F, 3n): one molecule
        bad_forces = ~np.isfinite(forces_per_frame).all(axis=1)
    else:  # a list of per-frame arrays of different lengths
        bad_forces = np.array([not np.isfinite(f).all() for f in forces_per_frame], dtype=bool)
    for name, bad in (("energy", ~np.isfinite(energies)), ("forces", bad_forces)):
        if bad.any():
            raise FFDataError(f"{where}: {name} of frame {int(np.argmax(bad))} is NaN or infinite "
                              f"({int(bad.sum())} frame(s) affected)")


# --- ANI-1x .h5 ---------------------------------------------------------------------------------

def read_ani1x(path, energy_unit: str | None = None, level: str = "wb97x_dz") -> Frames:
    """ANI-1x `.h5`: a group per formula; `{level}.energy` in Hartree, `{level}.forces` in Hartree/Å.

    Conformers with a NaN energy or NaN forces are left out and counted in `Frames.dropped`.
    """
    import h5py

    unit = resolve_unit(energy_unit, None, "Hartree", str(path))
    keys = ("atomic_numbers", "coordinates", f"{level}.energy", f"{level}.forces")
    try:
        h5 = h5py.File(path, "r")
    except OSError as e:
        raise FFDataError(f"{path}: not a readable HDF5 file (truncated or corrupt?): {e}") from None
    parts, dropped = [], Counter()
    with h5:
        for group_id, name in enumerate(h5):
            part = _ani1x_group(path, name, h5[name], keys, group_id, dropped)
            if len(part):
                parts.append(part)
    frames = Frames.concat(parts)
    frames.dropped = dropped
    frames.energy *= energy_factor(unit)
    frames.forces *= energy_factor(unit)
    return frames


def _ani1x_group(path, name: str, group, keys, group_id: int, dropped: Counter) -> Frames:
    """One formula's conformers, NaN entries dropped and counted."""
    where = f"{path} [group {name!r}]"
    missing = [k for k in keys if k not in group]
    if missing:
        raise FFDataError(f"{where}: missing key(s) {missing}; found keys: {sorted(group.keys())}")
    try:
        numbers, coords, energies, forces = (np.asarray(group[k][()]) for k in keys)
    except (OSError, KeyError, ValueError) as e:
        raise FFDataError(f"{where}: unreadable data (truncated or corrupt?): {e}") from None
    energies = energies.astype(np.float64).reshape(-1)
    _check_shapes(where, len(numbers), coords, energies, forces)
    nan_energy = ~np.isfinite(energies)
    nan_forces = ~nan_energy & ~np.isfinite(forces.reshape(len(forces), -1)).all(axis=1)
    dropped["nan_energy"] += int(nan_energy.sum())
    dropped["nan_forces"] += int(nan_forces.sum())
    keep = ~(nan_energy | nan_forces)
    return Frames.from_trajectory(numbers, coords[keep], forces[keep], energies[keep], group=group_id)


# --- extxyz and ASE db (one ase.Atoms per structure) ----------------------------------------------

def read_extxyz(path, energy_unit: str | None = None) -> Frames:
    """extxyz via `ase.io`: energies in eV unless the frames declare `energy_unit=...`."""
    import ase.io

    try:
        images = ase.io.read(path, index=":", format="extxyz")
    except Exception as e:  # ase raises a zoo of errors on malformed text
        raise FFDataError(f"{path}: not a readable extxyz file: {type(e).__name__}: {e}") from None
    declared = {str(a.info["energy_unit"]) for a in images if "energy_unit" in a.info}
    if len(declared) > 1:
        raise FFDataError(f"{path}: frames declare different energy units {sorted(declared)}")
    unit = resolve_unit(energy_unit, next(iter(declared), None), "eV", str(path))
    labelled = [_energy_forces(path, k, a) for k, a in enumerate(images)]
    return _atoms_frames(path, images, labelled, energy_factor(unit), 1.0)


def read_ase_db(path, energy_unit: str | None = None) -> Frames:
    """ASE db; a schnetpack `ASEAtomsData` declares its units in metadata, a plain one is in eV."""
    from ase.db import connect

    try:
        with connect(str(path), type="db") as db:
            metadata = db.metadata
            rows = list(db.select())
    except Exception as e:  # sqlite3.DatabaseError and friends
        raise FFDataError(f"{path}: not a readable ASE database: {type(e).__name__}: {e}") from None
    declared = metadata.get("_property_unit_dict", {})
    unit = resolve_unit(energy_unit, declared.get("energy"), "eV", str(path))
    ang_per_unit = distance_factor(metadata.get("_distance_unit", "Ang"), str(path))
    if "forces" in declared:
        _check_forces_unit(path, declared["forces"], unit, metadata.get("_distance_unit", "Ang"))
    images = [row.toatoms() for row in rows]
    labelled = [_row_energy_forces(path, k, row) for k, row in enumerate(rows)]
    return _atoms_frames(path, images, labelled, energy_factor(unit), ang_per_unit)


def _energy_forces(path, k: int, atoms) -> tuple[float, np.ndarray]:
    """Energy and forces of frame `k`, from its calculator results or its info/arrays."""
    results = atoms.calc.results if atoms.calc is not None else {}
    energy = results.get("energy", atoms.info.get("energy"))
    forces = results.get("forces", atoms.arrays.get("forces"))
    if energy is None or forces is None:
        raise FFDataError(f"{path}: frame {k} has no {'energy' if energy is None else 'forces'}; found info keys "
                          f"{sorted(atoms.info)}, per-atom arrays {sorted(atoms.arrays)}, results {sorted(results)}")
    return float(energy), np.asarray(forces, dtype=np.float64)


def _row_energy_forces(path, k: int, row) -> tuple[float, np.ndarray]:
    """Energy and forces of db row `k`: schnetpack keeps them in `row.data`, ASE in the row."""
    data = row.data or {}
    energy = data.get("energy", row.get("energy"))
    forces = data.get("forces", row.get("forces"))
    if energy is None or forces is None:
        raise FFDataError(f"{path}: row {k} has no {'energy' if energy is None else 'forces'}; "
                          f"found data keys {sorted(data)}, row keys {sorted(row)}")
    return float(np.asarray(energy).reshape(-1)[0]), np.asarray(forces, dtype=np.float64)


def _check_forces_unit(path, forces_unit: str, energy_unit: str, distance_unit: str) -> None:
    """A declared forces unit must be energy unit / distance unit, the only kind converted here."""
    energy_part, _, distance_part = str(forces_unit).rpartition("/")
    if (unit_name(energy_part, str(path)), unit_name(distance_part, str(path))) != \
            (unit_name(energy_unit, str(path)), unit_name(distance_unit, str(path))):
        raise FFDataError(f"{path}: forces in {forces_unit!r} do not match energies in {energy_unit!r} "
                          f"per {distance_unit!r}")


def _atoms_frames(path, images, labelled, ev_per_unit: float, ang_per_unit: float) -> Frames:
    """Frames from ase.Atoms and their (energy, forces); checked, converted, grouped by formula."""
    if not images:
        raise FFDataError(f"{path}: no structures")
    for k, (atoms, (_, forces)) in enumerate(zip(images, labelled)):
        if forces.shape != (len(atoms), 3):
            raise FFDataError(f"{path}: atom counts do not match: frame {k} has {len(atoms)} atoms "
                              f"but forces of shape {forces.shape}")
    _check_finite(path, np.array([e for e, _ in labelled]), [f.reshape(-1) for _, f in labelled])
    formulas = [a.get_chemical_formula() for a in images]
    group_of = {f: g for g, f in enumerate(dict.fromkeys(formulas))}
    return Frames.from_structures([a.numbers for a in images], [a.positions * ang_per_unit for a in images],
                                  [f * (ev_per_unit / ang_per_unit) for _, f in labelled],
                                  [e * ev_per_unit for e, _ in labelled], [group_of[f] for f in formulas])
