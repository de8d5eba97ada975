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

The numbers are then checked (`check_unit`): atomic numbers must be elements, every number
finite and possible (`frames.check_values`), coordinates in Å (the closest atoms about a bond
length apart), energies must vary. Then the unit: molecular data has forces of about 1 eV/Å,
so a Hartree file read as kcal/mol (forces 627x too small) or an eV file read as kcal/mol (23x)
stands out; energy spread / force RMS is a length in any energy unit, so energies and forces in
different units stand out too. A unit only assumed from the format is refused when the evidence
is strong (forces far off, every measure fitting another unit); weak evidence (cold or hot
data look alike), or a unit the file declares or the caller asks for, only draws a warning, so
`energy_unit=` is the way to insist. kcal/mol and kJ/mol (4.2x apart) cannot be told apart.
Warnings are `FFDataWarning`s; `data.generate` records them in meta.json and repeats them on
every load.
"""

from __future__ import annotations

import warnings
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np

from chemscale.ff.frames import (EV_PER, MAX_Z, FFDataError, FFDataWarning, Frames, check_values, distance_factor,
                                  energy_factor, resolve_unit, unit_name)

RMD17_KEYS = ("nuclear_charges", "coords", "energies", "forces")
SGDML_KEYS = ("z", "R", "E", "F")
EXTXYZ_SUFFIXES = (".xyz", ".extxyz")
H5_SUFFIXES = (".h5", ".hdf5")


def read(path, energy_unit: str | None = None) -> Frames:
    """Read any supported file, chosen by suffix (and, for `.npz`, by its keys)."""
    path = Path(path)
    if path.is_dir():
        raise FFDataError(f"{path}: is a directory, not a data file")
    if not path.is_file():
        raise FFDataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        keys = _npz_keys(path)
        if {"nuclear_charges", "coords"} & set(keys) and {"R", "z"} & set(keys):
            warnings.warn(f"{path}: has both rMD17 keys {list(RMD17_KEYS)} and sGDML keys {list(SGDML_KEYS)}; read "
                          f"as rMD17, the sGDML arrays are ignored", FFDataWarning, stacklevel=2)
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
    unit, origin = _unit(energy_unit, None, "kcal/mol", path)
    frames = _molecule_frames(path, arrays["nuclear_charges"], arrays["coords"], arrays["energies"],
                              arrays["forces"], energy_factor(unit), 1.0)
    return check_unit(frames, unit, origin, path)


def read_sgdml(path, energy_unit: str | None = None) -> Frames:
    """sGDML/MD17 `.npz`: `R`, `z`, `E`, `F`, in `e_unit` (default kcal/mol) and `r_unit` (default Å)."""
    arrays = _load_npz(path, SGDML_KEYS, "sGDML", optional=("e_unit", "r_unit"))
    declared = str(arrays["e_unit"]) if "e_unit" in arrays else None
    unit, origin = _unit(energy_unit, declared, "kcal/mol", path)
    r_factor = distance_factor(str(arrays["r_unit"]), str(path)) if "r_unit" in arrays else 1.0
    frames = _molecule_frames(path, arrays["z"], arrays["R"], arrays["E"], arrays["F"], energy_factor(unit), r_factor)
    return check_unit(frames, unit, origin, path)


def _npz_keys(path: Path) -> list[str]:
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise _unreadable_npz(path, e) from None
    if not isinstance(npz, np.lib.npyio.NpzFile):  # np.load also reads a bare .npy array
        raise FFDataError(f"{path}: a single .npy array, not an .npz archive of named arrays")
    with npz:
        return list(npz.files)


def _load_npz(path, required, fmt: str, optional=()) -> dict[str, np.ndarray]:
    """The `required` (and present `optional`) arrays; only those are read (others may need pickle)."""
    keys = _npz_keys(Path(path))
    missing = [k for k in required if k not in keys]
    if missing:
        raise FFDataError(f"{path}: missing key(s) {missing} for an {fmt} .npz; found keys: {sorted(keys)}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in (*required, *optional) if k in keys}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # a member cut short, or pickled
        raise _unreadable_npz(path, e) from None


def _unreadable_npz(path, e: Exception) -> FFDataError:
    """The error for an .npz numpy cannot read: pickled objects (never loaded: unsafe) or a damaged file."""
    if "allow_pickle" in str(e):
        return FFDataError(f"{path}: not a readable .npz file (holds Python objects (pickle), not arrays of numbers)")
    return FFDataError(f"{path}: not a readable .npz file (truncated or corrupt?): {type(e).__name__}: {e}")


def _molecule_frames(path, numbers, coords, energies, forces, ev_per_unit: float, ang_per_unit: float) -> Frames:
    """Frames of one molecule's trajectory, shapes and finiteness checked, converted to eV and Å."""
    numbers = _atomic_numbers(path, numbers)
    coords, energies, forces = (_floats(path, name, a) for name, a in
                                (("coordinates", coords), ("energies", energies), ("forces", forces)))
    energies = energies.reshape(-1)  # sGDML stores E as (F, 1)
    _check_shapes(path, len(numbers), coords, energies, forces)
    if len(coords) == 0:
        raise FFDataError(f"{path}: no structures (0 frames)")
    _check_finite(path, energies, forces.reshape(len(forces), -1), coords.reshape(len(coords), -1))
    return Frames.from_trajectory(numbers, coords * ang_per_unit, forces * (ev_per_unit / ang_per_unit),
                                  energies * ev_per_unit)


def _atomic_numbers(where, numbers) -> np.ndarray:
    """Atomic numbers as int64, refusing non-integers and numbers that are not elements (1-118)."""
    numbers = np.asarray(numbers).reshape(-1)
    if numbers.dtype.kind not in "iuf":
        raise FFDataError(f"{where}: atomic numbers of type {numbers.dtype} are not numbers")
    if numbers.dtype.kind == "f" and not np.array_equal(numbers, np.round(numbers)):
        raise FFDataError(f"{where}: atomic numbers must be whole numbers, got {numbers[numbers != np.round(numbers)][0]}")
    bad = (numbers < 1) | (numbers > MAX_Z)
    if bad.any():
        raise FFDataError(f"{where}: atomic number {numbers[bad][0]:g} (atom {int(np.argmax(bad))}) is not an element "
                          f"(1-{MAX_Z})")
    return numbers.astype(np.int64)


def _floats(where, name: str, array) -> np.ndarray:
    """`array` as float64, or a clear error for text, records or complex numbers."""
    array = np.asarray(array)
    if array.dtype.kind not in "iuf":
        raise FFDataError(f"{where}: {name} of type {array.dtype} are not real numbers")
    return array.astype(np.float64)


def _check_shapes(where, n_atoms: int, coords, energies, forces) -> None:
    """Coordinates (F, n_atoms, 3), forces likewise, F energies; else name what disagrees."""
    if coords.ndim != 3 or coords.shape[1:] != (n_atoms, 3):
        raise FFDataError(f"{where}: atom counts do not match: {n_atoms} atomic numbers but coordinates of "
                          f"shape {coords.shape} (expected (frames, {n_atoms}, 3))")
    if forces.shape != coords.shape:
        raise FFDataError(f"{where}: forces of shape {forces.shape} do not match coordinates {coords.shape}")
    if len(energies) != len(coords):
        raise FFDataError(f"{where}: {len(energies)} energies for {len(coords)} frames")


def _check_finite(where, energies, forces_per_frame, coords_per_frame) -> None:
    """Raise naming the first frame whose energy, forces or coordinates are NaN/inf (one array per frame)."""
    def bad_frames(per_frame):
        if isinstance(per_frame, np.ndarray):  # (F, 3n): one molecule
            return ~np.isfinite(per_frame).all(axis=1)
        return np.array([not np.isfinite(f).all() for f in per_frame], dtype=bool)  # frames of different sizes

    for name, bad in (("energy", ~np.isfinite(energies)), ("forces", bad_frames(forces_per_frame)),
                      ("coordinates", bad_frames(coords_per_frame))):
        if bad.any():
            raise FFDataError(f"{where}: {name} of frame {int(np.argmax(bad))} is NaN or infinite "
                              f"({int(bad.sum())} frame(s) affected)")


# --- ANI-1x .h5 ---------------------------------------------------------------------------------

def read_ani1x(path, energy_unit: str | None = None, level: str = "wb97x_dz") -> Frames:
    """ANI-1x `.h5`: a group per formula; `{level}.energy` in Hartree, `{level}.forces` in Hartree/Å.

    Conformers with a NaN energy or NaN forces are left out and counted in `Frames.dropped`.
    """
    import h5py

    unit, origin = _unit(energy_unit, None, "Hartree", path)
    keys = ("atomic_numbers", "coordinates", f"{level}.energy", f"{level}.forces")
    try:
        h5 = h5py.File(path, "r")
    except OSError as e:
        raise FFDataError(f"{path}: not a readable HDF5 file (truncated or corrupt?): {e}") from None
    parts, dropped = [], Counter()
    with h5:
        for group_id, (name, group) in enumerate(_ani1x_groups(path, h5, keys)):
            part = _ani1x_group(path, name, group, keys, group_id, dropped)
            if len(part):
                parts.append(part)
    if not parts:
        raise FFDataError(f"{path}: no structures (dropped: {dict(dropped) or 'none'})")
    frames = Frames.concat(parts)
    frames.dropped = dropped
    with np.errstate(over="ignore"):  # an overflow to inf is refused by name in check_unit
        frames.energy *= energy_factor(unit)
        frames.forces *= energy_factor(unit)
    return check_unit(frames, unit, origin, path)


def _ani1x_groups(path, h5, keys) -> list:
    """(name, group) pairs: one per formula, or the file itself when its top level holds one molecule's `keys`.

    Any other dataset at the top level is refused by name (h5py datasets have no `.keys()`).
    """
    import h5py

    datasets = sorted(name for name, item in h5.items() if not isinstance(item, h5py.Group))
    if not datasets:
        return _distinct_groups(path, h5.items())
    if set(keys) <= set(datasets):
        return [("/", h5)]
    raise FFDataError(f"{path}: dataset(s) {datasets} at the top level, but an ANI-1x file holds one group per "
                      f"formula with datasets {list(keys)} (or, for a single molecule, those datasets at its top "
                      f"level; missing: {[k for k in keys if k not in datasets]})")


def _distinct_groups(path, items) -> list:
    """(name, group) pairs, each HDF5 object once: a soft or hard link to a group read already is skipped
    (its structures would otherwise be counted twice, and could land in two splits)."""
    seen, groups = {}, []
    for name, group in items:
        key = hash(group.id)  # the same for every link to one object
        if key in seen:
            warnings.warn(f"{path}: group {name!r} is a link to {seen[key]!r}; its structures are read once",
                          FFDataWarning, stacklevel=4)
            continue
        seen[key] = name
        groups.append((name, group))
    return groups


def _ani1x_group(path, name: str, group, keys, group_id: int, dropped: Counter) -> Frames:
    """One formula's conformers, NaN entries dropped and counted."""
    where = f"{path} [group {name!r}]"
    missing = [k for k in keys if k not in group]
    if missing:
        raise FFDataError(f"{where}: missing key(s) {missing}; found keys: {sorted(group.keys())}")
    try:
        numbers, coords, energies, forces = (np.asarray(group[k][()]) for k in keys)
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise FFDataError(f"{where}: unreadable data (truncated or corrupt?): {e}") from None
    numbers = _atomic_numbers(where, numbers)
    coords, energies, forces = (_floats(where, name, a) for name, a in
                                (("coordinates", coords), ("energies", energies), ("forces", forces)))
    energies = energies.reshape(-1)
    _check_shapes(where, len(numbers), coords, energies, forces)
    nan_energy = ~np.isfinite(energies)
    nan_forces = ~nan_energy & ~np.isfinite(forces.reshape(len(forces), -1)).all(axis=1)
    nan_coords = ~nan_energy & ~nan_forces & ~np.isfinite(coords.reshape(len(coords), -1)).all(axis=1)
    for reason, bad in (("nan_energy", nan_energy), ("nan_forces", nan_forces), ("nan_coordinates", nan_coords)):
        if bad.any():
            dropped[reason] += int(bad.sum())
    keep = ~(nan_energy | nan_forces | nan_coords)
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
    silent = [k for k, a in enumerate(images) if "energy_unit" not in a.info]
    if declared and silent:
        raise FFDataError(f"{path}: {len(images) - len(silent)} frame(s) declare energy_unit={next(iter(declared))} "
                          f"but {len(silent)} (frame {silent[0]} first) declare none; every frame must declare the "
                          f"same unit, or none")
    _warn_periodic(path, images)
    unit, origin = _unit(energy_unit, next(iter(declared), None), "eV", path)
    labelled = [_energy_forces(path, k, a) for k, a in enumerate(images)]
    return check_unit(_atoms_frames(path, images, labelled, energy_factor(unit), 1.0), unit, origin, path)


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
    unit, origin = _unit(energy_unit, declared.get("energy"), "eV", path)
    ang_per_unit = distance_factor(metadata.get("_distance_unit", "Ang"), str(path))
    if "forces" in declared:
        _check_forces_unit(path, declared["forces"], unit, metadata.get("_distance_unit", "Ang"))
    images = [row.toatoms() for row in rows]
    _warn_periodic(path, images)
    labelled = [_row_energy_forces(path, k, row) for k, row in enumerate(rows)]
    return check_unit(_atoms_frames(path, images, labelled, energy_factor(unit), ang_per_unit), unit, origin, path)


def _warn_periodic(path, images) -> None:
    """Structures are read as isolated molecules: say so when the file has a periodic cell."""
    periodic = [k for k, a in enumerate(images) if a.pbc.any()]
    if periodic:
        warnings.warn(f"{path}: {len(periodic)} frame(s) (frame {periodic[0]} first) have a periodic cell; it is "
                      f"ignored, every structure is read as an isolated molecule", FFDataWarning, stacklevel=3)


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
        _atomic_numbers(f"{path} [frame {k}]", atoms.numbers)
        if forces.shape != (len(atoms), 3):
            raise FFDataError(f"{path}: atom counts do not match: frame {k} has {len(atoms)} atoms "
                              f"but forces of shape {forces.shape}")
    _check_finite(path, np.array([e for e, _ in labelled]), [f.reshape(-1) for _, f in labelled],
                  [a.positions.reshape(-1) for a in images])
    formulas = [a.get_chemical_formula() for a in images]
    group_of = {f: g for g, f in enumerate(dict.fromkeys(formulas))}
    return Frames.from_structures([a.numbers for a in images], [a.positions * ang_per_unit for a in images],
                                  [f * (ev_per_unit / ang_per_unit) for _, f in labelled],
                                  [e * ev_per_unit for e, _ in labelled], [group_of[f] for f in formulas])


# --- are the numbers plausible? ----------------------------------------------------------------

# Molecular energies+forces data in eV and Å. Measured on GFN2-xTB data from `generate`: force
# component RMS 0.88 eV/Å (ethanol MD, 500 K), 1.08 (aspirin), 2.5 (perturbed conformers);
# energy spread (median absolute deviation of one molecule's energies, scaled to a standard
# deviation, / sqrt(atoms)) 0.033, 0.043, 0.077 eV. rMD17 (about 20 kcal/mol/Å) and ANI-1x
# (about 0.05 Hartree/Å) are near 1 eV/Å too. Colder data has both smaller (forces ~ sqrt(T),
# spread ~ T), hotter data larger: outside these ranges is unusual, not impossible.
TYPICAL = {"force_rms_ev_per_a": (0.2, 5.0), "energy_spread_ev": (0.005, 1.0)}
# Energy spread / force RMS is a length, whatever the energy unit: 0.038 Å for ethanol at 500 K,
# 0.031 for perturbed conformers, 0.0045 at 5 K (it grows as sqrt(T)). Energies and forces in
# different units (kcal/mol vs eV: 23x, vs Hartree: 627x) fall outside.
TYPICAL_LENGTH_A = (0.003, 0.3)
STRONG_DECADES = 0.5  # refuse an assumed unit only if every measure is this far off (or one measure 1.5 decades)
# The closest pair of atoms of a molecule, as a multiple of the sum of their covalent radii:
# about 0.85-1.1 in real molecules (bonds), 1.89 for Bohr read as Å, 0.1 for nm.
BOND_RATIO = (0.55, 1.6)
DISTANCE_SAMPLE = 300  # structures whose closest pair is measured


class FFUnitWarning(FFDataWarning):
    """A data file's numbers look like another energy unit than the one it is read in."""


def _unit(asked: str | None, declared: str | None, documented: str, path) -> tuple[str, str]:
    """The unit to read a file in (`frames.resolve_unit`) and its origin: 'asked', 'declared' or 'assumed'."""
    unit = resolve_unit(asked, declared, documented, str(path))
    return unit, "asked" if asked is not None else "declared" if declared is not None else "assumed"


def _group_spread(frames: Frames) -> tuple[np.ndarray, np.ndarray]:
    """Per group of >= 3 structures: robust energy spread per sqrt(atom) (eV) and whether it is exactly 0.

    The spread is 1.4826 x the median absolute deviation, a standard deviation that one bad
    frame cannot move.
    """
    spreads, flat = [], []
    for g in np.unique(frames.group):
        energy = frames.energy[frames.group == g]
        if len(energy) >= 3:
            mad = 1.4826 * np.median(np.abs(energy - np.median(energy)))
            spreads.append(mad / np.sqrt(frames.n_atoms[frames.group == g].mean()))
            flat.append(np.ptp(energy) == 0)
    return np.array(spreads), np.array(flat, dtype=bool)


def unit_measures(frames: Frames) -> dict[str, float]:
    """Median per-structure force RMS (eV/Å) and median robust energy spread per sqrt(atom) (eV); absent if 0."""
    measures = {}
    if len(frames.forces):
        rows = np.repeat(np.arange(len(frames)), frames.n_atoms)
        per_frame = np.sqrt(np.bincount(rows, (frames.forces ** 2).sum(1), len(frames)) / (3 * frames.n_atoms))
        measures["force_rms_ev_per_a"] = float(np.median(per_frame))
    spreads, _ = _group_spread(frames)
    if (spreads > 0).any():
        measures["energy_spread_ev"] = float(np.median(spreads[spreads > 0]))
    return {k: v for k, v in measures.items() if v > 0 and np.isfinite(v)}


def _misfit(measures: dict[str, float], scale: float) -> float:
    """Decades by which `measures` times `scale` fall outside their typical ranges, summed."""
    return sum(_off(key, value * scale) for key, value in measures.items())


def _off(key: str, value: float) -> float:
    """Decades by which one measure falls outside its typical range (0 inside)."""
    low, high = TYPICAL[key]
    return max(0.0, np.log10(low / value), np.log10(value / high))


def likely_unit(measures: dict[str, float], unit: str) -> str:
    """The energy unit the numbers (read in `unit`) fit best; ties go to forces nearest 1 eV/Å."""
    def badness(candidate):
        scale = EV_PER[candidate] / EV_PER[unit]
        force = measures.get("force_rms_ev_per_a", 1.0) * scale
        return _misfit(measures, scale), abs(np.log10(force)), candidate != unit

    return min(EV_PER, key=badness)


def check_unit(frames: Frames, unit: str, origin: str, path) -> Frames:
    """`frames` if their numbers are sound and fit `unit`; else refuse or warn.

    Impossible numbers and coordinates that are not in Å are refused (`check_values`,
    `check_distances`), so are energies that do not vary. A unit only assumed from the format
    is refused when the evidence against it is strong (every measure far off, another unit
    fitting); weaker evidence, or a unit the file declares or the caller asks for, only warns.
    Energies and forces that point to different units are named as such.
    """
    check_values(frames, path)
    check_distances(frames, path)
    _check_energies_vary(frames, path)
    measures = unit_measures(frames)
    off = {k: _off(k, v) for k, v in measures.items()}
    if len(measures) == 2:
        length = measures["energy_spread_ev"] / measures["force_rms_ev_per_a"]  # Å: the same in every energy unit
        mismatch = max(0.0, np.log10(TYPICAL_LENGTH_A[0] / length), np.log10(length / TYPICAL_LENGTH_A[1]))
        if mismatch > 0:
            message = _mismatch_message(path, measures, unit, length)
            if origin == "assumed" and mismatch >= 1.0:
                raise FFDataError(message)
            warnings.warn(message, FFUnitWarning, stacklevel=3)
            return frames
    if not off or (min(off.values()) == 0 and max(off.values()) < STRONG_DECADES):
        return frames  # a measure that fits and the other not far off: cold or hot data look like this
    best = likely_unit(measures, unit)
    if best == unit or _misfit(measures, EV_PER[best] / EV_PER[unit]) >= _misfit(measures, 1.0):
        return frames
    strong = _strong(measures, off, EV_PER[best] / EV_PER[unit])
    message = _unit_message(path, measures, unit, origin, best, strong)
    if origin == "assumed" and strong:
        raise FFDataError(message)
    warnings.warn(message, FFUnitWarning, stacklevel=3)
    return frames


def _strong(measures: dict[str, float], off: dict[str, float], scale: float) -> bool:
    """Whether the numbers all but prove the unit wrong: forces far off (they change only as sqrt(T), the
    energy spread as T, so forces decide) and every measure typical once converted by `scale`."""
    force_off = off.get("force_rms_ev_per_a")
    fits = _misfit(measures, scale) == 0
    if force_off is None:
        return fits and off["energy_spread_ev"] >= 1.5
    return fits and force_off >= (STRONG_DECADES if len(measures) == 2 else 1.0)


def _alone(key: str, value: float, unit: str) -> str:
    """The energy unit in which one measure (read in `unit`) sits best in its typical range."""
    centre = np.mean(np.log10(TYPICAL[key]))
    return min(EV_PER, key=lambda c: (round(_off(key, value * EV_PER[c] / EV_PER[unit]), 6), c != unit,
                                      abs(np.log10(value * EV_PER[c] / EV_PER[unit]) - centre)))


def _mismatch_message(path, measures: dict[str, float], unit: str, length: float) -> str:
    """Energies and forces fit different units: say which, and what they are read as."""
    e_best = _alone("energy_spread_ev", measures["energy_spread_ev"], unit)
    f_best = _alone("force_rms_ev_per_a", measures["force_rms_ev_per_a"], unit)
    return (f"{path}: energies and forces do not look like the same unit: their ratio (energy spread / force RMS, "
            f"a length whatever the energy unit) is {length:.3g} Å where molecular data has "
            f"{TYPICAL_LENGTH_A[0]:g}-{TYPICAL_LENGTH_A[1]:g} Å; read as {unit}, the energy spread "
            f"{measures['energy_spread_ev']:.3g} eV/sqrt(atom) fits best in {e_best} and the force RMS "
            f"{measures['force_rms_ev_per_a']:.3g} eV/Å in {f_best}/Å. Check that the file's energies and forces "
            f"are in the same unit")


def _check_energies_vary(frames: Frames, path) -> None:
    """Refuse a file whose molecules' energies are all constant while their forces are not (energies missing?)."""
    _, flat = _group_spread(frames)
    if len(flat) and flat.all() and np.abs(frames.forces).max(initial=0.0) > 0:
        raise FFDataError(f"{path}: the energies do not vary: every molecule with 3 or more structures has the same "
                          f"energy in all of them ({frames.energy[0]:.6g} eV first), while the forces are not zero; "
                          f"energies missing or overwritten?")


def check_distances(frames: Frames, path) -> None:
    """Refuse coordinates that are not in Å: the closest atoms of a molecule are about one bond length apart.

    Measured on up to `DISTANCE_SAMPLE` structures (seeded): the median, over structures, of
    the closest pair's distance divided by the sum of the pair's covalent radii.
    """
    from ase.data import covalent_radii

    several = np.flatnonzero(frames.n_atoms > 1)
    if not len(several):
        return
    sample = np.random.default_rng(0).permutation(several)[:DISTANCE_SAMPLE]
    starts, ratios, closest = frames.atom_start, [], []
    for k in sample:
        atoms = slice(starts[k], starts[k] + frames.n_atoms[k])
        r, radii = frames.positions[atoms], covalent_radii[frames.numbers[atoms]]
        d = np.linalg.norm(r[:, None] - r[None], axis=-1) + np.diag(np.full(len(r), np.inf))
        ratio = d / (radii[:, None] + radii[None])
        i, j = np.unravel_index(np.argmin(ratio), ratio.shape)
        ratios.append(ratio[i, j])
        closest.append(d[i, j])
    median = float(np.median(ratios))
    if not BOND_RATIO[0] <= median <= BOND_RATIO[1]:
        raise FFDataError(f"{path}: the coordinates do not look like Å: the closest atoms of a structure are "
                          f"{np.median(closest):.3g} Å apart (median over {len(sample)} structures), "
                          f"{median:.3g} times their bond length (covalent radii), where molecules have about 1 "
                          f"({BOND_RATIO[0]:g}-{BOND_RATIO[1]:g}); Bohr read as Å gives 1.9, nm 0.1. Convert the "
                          f"coordinates to Å")


def _unit_message(path, measures: dict[str, float], unit: str, origin: str, best: str, strong: bool) -> str:
    """One paragraph: what the numbers are in `unit`, what is typical, what they would be in `best`, what to do."""
    scale = EV_PER[best] / EV_PER[unit]
    names = {"force_rms_ev_per_a": ("force RMS", "eV/Å"), "energy_spread_ev": ("energy spread", "eV/sqrt(atom)")}
    now = ", ".join(f"{names[k][0]} {v:.3g} {names[k][1]}" for k, v in measures.items())
    typical = ", ".join(f"{TYPICAL[k][0]:g}-{TYPICAL[k][1]:g} {names[k][1]}" for k in measures)
    then = ", ".join(f"{v * scale:.3g} {names[k][1]}" for k, v in measures.items())
    how = {"assumed": "the format's documented unit", "declared": "the unit the file declares",
           "asked": "the energy_unit asked for"}[origin]
    advice = {"assumed": f"pass energy_unit={best!r} (CLI: --energy-unit {best}) if so, or energy_unit={unit!r} "
                         f"to read it as {unit} anyway",
              "declared": f"correct the file's declared unit if it is {best}",
              "asked": f"pass energy_unit={best!r} if the file is in {best}"}[origin]
    verdict = (f"The file is most likely in {best}" if strong else
               f"The file may be in {best}, but the evidence is weak (very cold or hot data, or unusual molecules, "
               f"look like this too)")
    return (f"{path}: the numbers do not look like {unit} ({how}): read as {unit} they give {now}, where molecular "
            f"data typically has {typical}; in {best} they would be {then}. {verdict}: {advice}")
