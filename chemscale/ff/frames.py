"""Energies+forces structures in memory, and the units they are converted to (eV, Å, eV/Å).

`Frames` is what the readers and the generators return and what the cache stores: every
structure's atoms laid end to end in flat arrays, so a dataset of any size is a handful of
contiguous arrays. Unit names are normalised here; conversion factors come from `ase.units`
(1 kcal/mol = 0.0433641 eV, 1 Hartree = 27.211386 eV; tests pin both).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from ase import units

ENERGY_UNIT, DISTANCE_UNIT, FORCES_UNIT = "eV", "Ang", "eV/Ang"  # chemscale's units, schnetpack spelling
SPLITS = ("train", "val", "test")

EV_PER = {  # energy unit -> eV
    "eV": 1.0,
    "meV": 1e-3,
    "kcal/mol": units.kcal / units.mol,
    "kJ/mol": units.kJ / units.mol,
    "Hartree": units.Hartree,
}
ANG_PER = {"Ang": 1.0, "Bohr": units.Bohr}  # distance unit -> Å

_ALIASES = {
    "ev": "eV", "mev": "meV",
    "kcal/mol": "kcal/mol", "kcalmol-1": "kcal/mol", "kcal": "kcal/mol",
    "kj/mol": "kJ/mol", "kjmol-1": "kJ/mol",
    "hartree": "Hartree", "ha": "Hartree", "eh": "Hartree", "au": "Hartree", "a.u.": "Hartree",
    "ang": "Ang", "angstrom": "Ang", "å": "Ang", "bohr": "Bohr", "a0": "Bohr",
}


class FFDataError(ValueError):
    """A force-field data file or cached dataset cannot be used; the message names the file."""


class FFDataWarning(UserWarning):
    """Something about a dataset's source the user should know on every load (recorded in meta.json)."""


MAX_Z = 118
MAX_ABS_ENERGY_EV_PER_ATOM = 1e7  # an all-electron uranium atom is ~8e5 eV: anything beyond is not an energy
MAX_ABS_FORCE_EV_PER_A = 1e6


def check_values(frames: Frames, where) -> None:
    """Refuse non-finite or impossible numbers (atomic numbers 1-118, energies, forces, positions), naming a frame.

    Readers check before their unit check; `data.generate` checks every split of every recipe
    before it is stored, so nothing broken reaches the cache.
    """
    if len(frames) == 0:
        return
    bad_z = (frames.numbers < 1) | (frames.numbers > MAX_Z)
    if bad_z.any():
        k = int(np.searchsorted(np.cumsum(frames.n_atoms), np.argmax(bad_z), side="right"))
        raise FFDataError(f"{where}: atomic number {int(frames.numbers[np.argmax(bad_z)])} in frame {k} is not an "
                          f"element (1-{MAX_Z})")
    rows = np.repeat(np.arange(len(frames)), frames.n_atoms)
    per_atom = np.abs(frames.energy) / np.maximum(frames.n_atoms, 1)
    checks = (("energy", ~np.isfinite(frames.energy), "NaN or infinite (in eV)"),
              ("positions", _frame_any(rows, ~np.isfinite(frames.positions).all(1), len(frames)), "NaN or infinite"),
              ("forces", _frame_any(rows, ~np.isfinite(frames.forces).all(1), len(frames)), "NaN or infinite (in eV/Å)"),
              ("energy", per_atom > MAX_ABS_ENERGY_EV_PER_ATOM,
               f"beyond {MAX_ABS_ENERGY_EV_PER_ATOM:g} eV per atom in magnitude: not an energy"),
              ("forces", _frame_any(rows, np.abs(frames.forces).max(1) > MAX_ABS_FORCE_EV_PER_A, len(frames)),
               f"beyond {MAX_ABS_FORCE_EV_PER_A:g} eV/Å in magnitude: not a force"))
    for name, bad, what in checks:
        if bad.any():
            raise FFDataError(f"{where}: {name} of frame {int(np.argmax(bad))} is {what} "
                              f"({int(bad.sum())} frame(s) affected)")


def _frame_any(rows: np.ndarray, per_atom: np.ndarray, n_frames: int) -> np.ndarray:
    """(n_frames,) whether any atom of each frame is flagged."""
    return np.bincount(rows[per_atom], minlength=n_frames) > 0


def unit_name(unit: str, source: str = "") -> str:
    """Canonical spelling of an energy or distance unit ('kcal mol-1' -> 'kcal/mol')."""
    key = str(unit).strip().lower().replace(" ", "").replace("^", "")
    if key not in _ALIASES:
        raise FFDataError(f"{source}: unknown unit {unit!r}; known: {sorted(EV_PER) + sorted(ANG_PER)}")
    return _ALIASES[key]


def energy_factor(unit: str, source: str = "") -> float:
    """eV per `unit`; an energy unit is required (a distance unit raises)."""
    name = unit_name(unit, source)
    if name not in EV_PER:
        raise FFDataError(f"{source}: {unit!r} is not an energy unit; known: {sorted(EV_PER)}")
    return EV_PER[name]


def distance_factor(unit: str, source: str = "") -> float:
    """Å per `unit`."""
    name = unit_name(unit, source)
    if name not in ANG_PER:
        raise FFDataError(f"{source}: {unit!r} is not a distance unit; known: {sorted(ANG_PER)}")
    return ANG_PER[name]


def resolve_unit(asked: str | None, declared: str | None, documented: str, source: str) -> str:
    """The energy unit to read a file in: the one asked for, else the file's, else the format's.

    Asking for a unit the file contradicts raises: a silent kcal/mol-as-eV mix-up is the bug
    this guards against.
    """
    if asked is not None and declared is not None and unit_name(asked, source) != unit_name(declared, source):
        raise FFDataError(f"{source}: the file declares energies in {declared!r} but energy_unit={asked!r} "
                          f"was asked for; drop energy_unit to use the file's unit")
    return unit_name(asked or declared or documented, source)


@dataclass
class Frames:
    """Structures with energies and forces in eV, Å, eV/Å; atoms of all structures end to end."""

    numbers: np.ndarray  # (n_atoms_total,) int64 atomic numbers
    positions: np.ndarray  # (n_atoms_total, 3) float64, Å
    forces: np.ndarray  # (n_atoms_total, 3) float64, eV/Å
    energy: np.ndarray  # (n_structures,) float64 total energy, eV
    n_atoms: np.ndarray  # (n_structures,) int64 atoms per structure
    group: np.ndarray  # (n_structures,) int64 molecule or trajectory id: splits never cut a group
    dropped: Counter = field(default_factory=Counter)  # reason -> structures left out (reading, labelling)

    def __post_init__(self):
        self.numbers = np.asarray(self.numbers, dtype=np.int64).reshape(-1)
        self.positions = np.asarray(self.positions, dtype=np.float64).reshape(-1, 3)
        self.forces = np.asarray(self.forces, dtype=np.float64).reshape(-1, 3)
        self.energy = np.asarray(self.energy, dtype=np.float64).reshape(-1)
        self.n_atoms = np.asarray(self.n_atoms, dtype=np.int64).reshape(-1)
        self.group = np.asarray(self.group, dtype=np.int64).reshape(-1)
        n, a = len(self.energy), int(self.n_atoms.sum())
        if not (len(self.n_atoms) == len(self.group) == n and len(self.numbers) == len(self.positions)
                == len(self.forces) == a):
            raise FFDataError(f"inconsistent Frames: {n} energies, {len(self.n_atoms)} atom counts summing to {a}, "
                              f"{len(self.numbers)} numbers, {len(self.positions)} positions, {len(self.forces)} forces")

    def __len__(self) -> int:
        return len(self.energy)

    @property
    def atom_start(self) -> np.ndarray:
        """(n_structures,) index of each structure's first atom."""
        return np.concatenate([[0], np.cumsum(self.n_atoms)[:-1]]).astype(np.int64)

    @property
    def elements(self) -> tuple[int, ...]:
        """Atomic numbers present, ascending."""
        return tuple(int(z) for z in np.unique(self.numbers))

    def take(self, indices) -> Frames:
        """The structures at `indices`, in that order (dropped counts are kept)."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        atoms = _atom_indices(self.atom_start[indices], self.n_atoms[indices])
        return Frames(self.numbers[atoms], self.positions[atoms], self.forces[atoms], self.energy[indices],
                      self.n_atoms[indices], self.group[indices], Counter(self.dropped))

    @staticmethod
    def concat(parts: list[Frames]) -> Frames:
        """One Frames of all `parts` in order; dropped counts are summed."""
        dropped = sum((p.dropped for p in parts), Counter())
        if not parts:
            return Frames(np.zeros(0), np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0), np.zeros(0), np.zeros(0), dropped)
        cat = lambda name: np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
        return Frames(cat("numbers"), cat("positions"), cat("forces"), cat("energy"), cat("n_atoms"), cat("group"),
                      dropped)

    @staticmethod
    def from_structures(numbers, positions, forces, energy, group) -> Frames:
        """Frames from per-structure lists: `numbers[k]` (n_k,), `positions[k]`/`forces[k]` (n_k, 3)."""
        flat = lambda arrays, shape: np.concatenate(arrays) if len(arrays) else np.zeros(shape)  # noqa: E731
        return Frames(flat(numbers, (0,)), flat(positions, (0, 3)), flat(forces, (0, 3)), energy,
                      [len(z) for z in numbers], group)

    @staticmethod
    def from_trajectory(numbers, positions, forces, energy, group: int = 0) -> Frames:
        """Frames of one molecule: `numbers` (n,), `positions`/`forces` (F, n, 3), `energy` (F,)."""
        n_frames, n = len(energy), len(numbers)
        return Frames(np.tile(np.asarray(numbers), n_frames), positions, forces, energy,
                      np.full(n_frames, n), np.full(n_frames, group))


def _atom_indices(start: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Concatenation of range(start[k], start[k] + count[k]) over k, without a Python loop."""
    total = int(count.sum())
    first = np.concatenate([[0], np.cumsum(count)[:-1]])
    return np.repeat(start - first, count) + np.arange(total)
