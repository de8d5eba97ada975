"""Energies+forces datasets: built once from a recipe, cached and verified, loaded into memory.

A recipe says where structures come from: `MDRecipe` and `ConformerRecipe` (GFN2-xTB, see
`generate`) or `FileRecipe` (a user's rMD17/sGDML `.npz`, ANI-1x `.h5`, extxyz or ASE `.db`,
see `readers`). `generate(recipe)` builds the dataset once into `CACHE_DIR/<label>-<hash>/` (the hash covers
the recipe, the source file, the code that shapes the numbers and the package versions), a
folder laid out and verified as `store` describes (schnetpack ASEAtomsData per split, units in
its metadata, plus contiguous arrays), written under a temporary name and renamed into place
when complete: an interrupted or damaged build is rebuilt, never reused.
Nothing non-finite reaches the cache; a file too small for three non-empty splits is refused;
what reading the source warned about is kept in meta.json and warned again on every load.
`load(source, split, n)` returns an `FFDataset` whose `energy` has the per-element reference
energies (least squares on the training split) subtracted, the same ones for every split.
Batches for training: `ff_loader` (in `chemscale.ff.loader`).

CLI: `python -m chemscale.ff.data md:ethanol [n_train=5000 ...]` prints statistics in eV units;
a user error (no such file, a bad recipe field, a file whose numbers contradict its unit) is
one `error:` line and exit status 2.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import json
import os
import shutil
import sys
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from chemscale import paths
from chemscale.config import ConfigError, from_dict, require
from chemscale.ff import readers, store
from chemscale.ff.frames import SPLITS, FFDataError, FFDataWarning, Frames, check_values, energy_factor
from chemscale.ff.generate import ConformerRecipe, MDRecipe, build

CACHE_DIR = paths.CACHE / "ff"
FORMAT_VERSION = 1  # bump when what a recipe builds changes: old caches are then ignored


@dataclass(frozen=True)
class FileRecipe:
    """A user's data file, read with `readers.read` and split at random (by molecule if it has several)."""

    kind: ClassVar[str] = "file"
    path: str
    energy_unit: str | None = None  # None: the file's declared unit, else its format's documented one
    val_fraction: float = 0.05
    test_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self):
        require(not Path(self.path).is_dir(), "path", f"is a directory, not a data file: {self.path}")
        require(Path(self.path).is_file(), "path", f"no such file: {self.path}")
        require(0 <= self.val_fraction and 0 <= self.test_fraction and self.val_fraction + self.test_fraction < 1,
                "val_fraction/test_fraction", "must be >= 0 and sum to < 1")
        require(isinstance(self.seed, int) and self.seed >= 0, "seed", f"must be an integer >= 0, got {self.seed!r}")
        if self.energy_unit is not None:
            try:
                energy_factor(self.energy_unit)
            except FFDataError as e:  # the caller names the file
                raise ConfigError(f"key 'energy_unit' = {self.energy_unit!r}: {str(e).removeprefix(': ')}") from None

    def label(self) -> str:
        return f"file-{Path(self.path).stem}"


RECIPES = {cls.kind: cls for cls in (MDRecipe, ConformerRecipe, FileRecipe)}


def as_recipe(source, **overrides):
    """A validated recipe from a recipe, a name, a dict with 'kind' or a data file path, plus field overrides.

    Names: 'md:<molecule name or SMILES>' (`MDRecipe`), 'conformers:moses' or
    'conformers:<SMILES file>' (`ConformerRecipe`); any existing file is a `FileRecipe`.
    """
    if type(source) in RECIPES.values():
        fields = {**dataclasses.asdict(source), **overrides}
        return from_dict(type(source), fields, f"{type(source).__name__} overrides")
    if isinstance(source, dict):
        fields = {**source, **overrides}
        kind = fields.pop("kind", None)
        if kind not in RECIPES:
            raise ConfigError(f"recipe: key 'kind' = {kind!r} must be one of {sorted(RECIPES)}")
        return from_dict(RECIPES[kind], fields, f"{kind} recipe")
    text = str(source)
    kind, _, rest = text.partition(":")
    named = {"md": "molecule", "conformers": "source"}.get(kind)
    if rest and named in overrides and overrides[named] != rest:
        raise ConfigError(f"{text}: names {named} {rest!r}, but {named}={overrides[named]!r} was also given; give one")
    if kind == "md" and rest:
        return from_dict(MDRecipe, {"molecule": rest, **overrides}, text)
    if kind == "conformers" and rest:
        return from_dict(ConformerRecipe, {"source": rest, **overrides}, text)
    path = Path(text).expanduser()
    if path.is_file():
        return from_dict(FileRecipe, {"path": str(path.resolve()), **overrides}, text)
    if path.is_dir():
        raise FFDataError(f"{text}: is a directory, not a data file (a dataset folder is read with load())")
    recipes = "'md:<name or SMILES>', 'conformers:moses', 'conformers:<SMILES file>'"
    if kind not in ("md", "conformers") and (not rest or "/" in text or os.sep in text or path.suffix):
        raise FFDataError(f"{text}: no such file (nor a recipe: {recipes})")
    raise FFDataError(f"{text!r} is not a recipe ({recipes}), a data file or a dataset folder")


def dataset_dir(recipe) -> Path:
    """Where `recipe`'s dataset is cached: CACHE_DIR/<label>-<hash of everything that shapes it>.

    That is the recipe, the source file, the code that makes the numbers (`code_digest`) and the
    packages that do (`_versions`): a warm cache can hide neither a regression nor a fix.
    """
    key = {"kind": recipe.kind, "format": FORMAT_VERSION, **dataclasses.asdict(recipe),
           "code": code_digest(recipe.kind), "versions": _versions()}
    source = recipe.path if isinstance(recipe, FileRecipe) else getattr(recipe, "source", "moses")
    if source != "moses":  # a changed file is a different dataset: its content decides, not its date
        key["file"] = [str(Path(source).resolve()), file_digest(source)]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return CACHE_DIR / f"{recipe.label()}-{digest}"


_FILE_DIGESTS: dict[tuple, str] = {}  # (path, size, mtime) -> SHA-256: each file hashed once per process


def file_digest(path) -> str:
    """SHA-256 of a source file's bytes, computed once per process for a given path, size and mtime."""
    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        _FILE_DIGESTS[key] = store.sha256(Path(path))
    return _FILE_DIGESTS[key]


# Modules whose every line may shape a dataset's numbers, per kind of recipe: a generated dataset
# does not depend on the readers, a file's does not depend on xTB generation; of this module only
# the functions that do (a changed CLI or docstring keeps the caches).
SHAPING_MODULES = {"generated": ("chemscale.ff.generate", "chemscale.ff.frames", "chemscale.ff.store"),
                   "file": ("chemscale.ff.readers", "chemscale.ff.frames", "chemscale.ff.store")}


def code_digest(kind: str = "generated") -> str:
    """SHA-256 (16 hex digits) of the source of the code that turns a recipe of `kind` into stored numbers."""
    h = hashlib.sha256()
    for name in SHAPING_MODULES["file" if kind == "file" else "generated"]:
        h.update(Path(importlib.import_module(name).__file__).read_bytes())
    for function in (_frames, split_frames, fit_reference_energies, composition):
        h.update(inspect.getsource(function).encode())
    return h.hexdigest()[:16]


# --- build and cache ----------------------------------------------------------------------------

def generate(recipe, progress: bool = True) -> Path:
    """The folder of `recipe`'s dataset: reused if complete and intact, else (re)built."""
    recipe = as_recipe(recipe)
    final = dataset_dir(recipe)
    store.remove_stale_temps(final)
    problem = store.verify(final)
    if problem is None:
        _reemit_warnings(final)
        return final
    if final.exists():
        print(f"{final}: {problem}; rebuilding it", file=sys.stderr)
        shutil.rmtree(final)
    tmp = store.temp_dir(final)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", FFDataWarning)
            splits = _frames(recipe, progress)
        for w in caught:  # others go on as they came
            if not issubclass(w.category, FFDataWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if len(splits["train"]) == 0:
            raise FFDataError(f"{recipe}: no training structures (dropped: {dict(splits['train'].dropped)})")
        for name, frames in splits.items():
            check_values(frames, f"{_source_name(recipe)} [{name}]")
        meta = {"recipe": {"kind": recipe.kind, **dataclasses.asdict(recipe)}, "format": FORMAT_VERSION,
                "code": code_digest(recipe.kind), "versions": _versions(),
                "warnings": [{"category": w.category.__name__, "message": str(w.message)}
                             for w in caught if issubclass(w.category, FFDataWarning)]}
        store.write(tmp, splits, fit_reference_energies(splits["train"]), meta)
        try:
            os.rename(tmp, final)  # atomic; fails if another process finished the same build first
        except OSError:
            if store.verify(final) is not None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _reemit_warnings(final)
    return final


def _source_name(recipe) -> str:
    return recipe.path if isinstance(recipe, FileRecipe) else f"{recipe.kind}:{getattr(recipe, 'molecule', None) or recipe.source}"


def _reemit_warnings(directory: Path) -> None:
    """Warn again, on every load, what reading the source warned about when the dataset was built."""
    categories = {c.__name__: c for c in (FFDataWarning, readers.FFUnitWarning)}
    for w in store.read_meta(directory).get("warnings", []):
        warnings.warn(w["message"], categories.get(w["category"], FFDataWarning), stacklevel=4)


def _frames(recipe, progress: bool) -> dict[str, Frames]:
    if isinstance(recipe, FileRecipe):
        frames = readers.read(recipe.path, recipe.energy_unit)
        return split_frames(frames, recipe.val_fraction, recipe.test_fraction, recipe.seed, recipe.path)
    return build(recipe, progress)


def split_frames(frames: Frames, val_fraction: float, test_fraction: float, seed: int,
                 where: str = "") -> dict[str, Frames]:
    """Random train/val/test split; by group (molecule, formula) when there are several, else by structure.

    A split asked for (fraction > 0) gets at least one unit; too few units for three splits is
    an error, not an empty validation or test split (whose error would read 0).
    """
    grouped = len(np.unique(frames.group)) > 1
    units = frames.group if grouped else np.arange(len(frames))
    ids = np.random.default_rng(seed).permutation(np.unique(units))
    n_test, n_val = (max(round(f * len(ids)), 1 if f > 0 else 0) for f in (test_fraction, val_fraction))
    if n_test + n_val >= len(ids):
        what = (f"{len(frames)} structures of {len(ids)} molecules (formula groups; a molecule's structures stay in "
                f"one split)") if grouped else f"{len(frames)} structure(s)"
        raise FFDataError(f"{where}: {what}: too few for train/val/test splits (val_fraction={val_fraction} needs "
                          f"{n_val}, test_fraction={test_fraction} needs {n_test}, and training at least 1)")
    chosen = {"test": ids[:n_test], "val": ids[n_test:n_test + n_val], "train": ids[n_test + n_val:]}
    splits = {name: frames.take(np.flatnonzero(np.isin(units, chosen[name]))) for name in SPLITS}
    for name in ("val", "test"):  # drops happened while reading, before splitting
        splits[name].dropped = Counter()
    return splits


def _versions() -> dict[str, str]:
    """Versions of the packages that compute, read or write the numbers (xTB, ASE, RDKit, MOSES, ...)."""
    from importlib.metadata import version

    return {name: version(name) for name in ("tblite", "ase", "rdkit", "numpy", "h5py", "schnetpack", "molsets")}


# --- in memory ----------------------------------------------------------------------------------

class FFDataset:
    """One split in memory (eV, Å, eV/Å); `energy` is the total minus per-element reference energies."""

    def __init__(self, frames: Frames, reference_energies: dict[int, float], name: str = "", split: str = "",
                 indices: np.ndarray | None = None):
        self.frames, self.name, self.split = frames, name, split
        self.reference_energies = {int(z): float(e) for z, e in reference_energies.items()}
        self.indices = np.arange(len(frames)) if indices is None else indices  # positions in the stored split
        missing = sorted(set(frames.elements) - set(self.reference_energies))
        if missing:
            raise FFDataError(f"{name} [{split}]: element(s) {missing} have no reference energy "
                              f"(absent from the training split)")
        refs = np.array([self.reference_energies[z] for z in frames.elements])
        self.energy = frames.energy - composition(frames, frames.elements) @ refs  # (n,) eV

    def __len__(self) -> int:
        return len(self.frames)

    def __repr__(self) -> str:
        return f"FFDataset({self.name!r}, split={self.split!r}, structures={len(self)}, elements={self.elements})"

    numbers = property(lambda self: self.frames.numbers)
    positions = property(lambda self: self.frames.positions)
    forces = property(lambda self: self.frames.forces)
    n_atoms = property(lambda self: self.frames.n_atoms)
    total_energy = property(lambda self: self.frames.energy)

    @property
    def elements(self) -> tuple[int, ...]:
        """Atomic numbers present, ascending."""
        return self.frames.elements

    def subset(self, indices) -> FFDataset:
        """The structures at `indices` (positions in this dataset), same reference energies."""
        indices = np.asarray(indices, dtype=np.int64)
        return FFDataset(self.frames.take(indices), self.reference_energies, self.name, self.split,
                         self.indices[indices])

    def atoms(self, k: int):
        """Structure `k` as ase.Atoms with its total energy and forces attached."""
        from ase import Atoms
        from ase.calculators.singlepoint import SinglePointCalculator

        start, n = self.frames.atom_start[k], self.n_atoms[k]
        atoms = Atoms(self.numbers[start:start + n], self.positions[start:start + n])
        atoms.calc = SinglePointCalculator(atoms, energy=float(self.total_energy[k]),
                                           forces=self.forces[start:start + n].copy())
        return atoms


def load(source, split: str = "train", n: int | None = None, seed: int = 0, *, energy_unit: str | None = None,
         progress: bool = True) -> FFDataset:
    """One split of a dataset: a recipe, a recipe name, a data file (built once) or a dataset folder.

    `n` takes the first n structures of a permutation fixed by `seed`: subsets are nested.
    """
    if split not in SPLITS:
        raise FFDataError(f"split {split!r} must be one of {SPLITS}")
    directory = _directory(source, energy_unit, progress)
    references = {int(z): e for z, e in store.read_meta(directory)["reference_energies_ev"].items()}
    dataset = FFDataset(store.read_split(directory, split), references, directory.name, split)
    if n is None:
        return dataset
    if not 0 <= n <= len(dataset):
        raise FFDataError(f"{directory} [{split}]: asked for n={n} structures, the split has {len(dataset)}")
    return dataset.subset(np.random.default_rng(seed).permutation(len(dataset))[:n])


def _directory(source, energy_unit: str | None, progress: bool) -> Path:
    """A verified dataset folder for `source`, building it if needed."""
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        problem = store.verify(Path(source))
        if problem:
            raise FFDataError(f"{source}: is a directory but not a complete chemscale dataset folder: {problem}")
        _reemit_warnings(Path(source))
        return Path(source)
    overrides = {"energy_unit": energy_unit} if energy_unit is not None else {}
    return generate(as_recipe(source, **overrides), progress)


def composition(frames: Frames, elements) -> np.ndarray:
    """(n_structures, n_elements) count of each element in each structure."""
    rows = np.repeat(np.arange(len(frames)), frames.n_atoms)
    cells = rows * len(elements) + np.searchsorted(elements, frames.numbers)
    return np.bincount(cells, minlength=len(frames) * len(elements)).reshape(len(frames), len(elements)).astype(float)


def fit_reference_energies(datasets) -> dict[int, float]:
    """Per-element energies (eV) whose sums best fit the total energies, by least squares.

    With a single composition (one molecule's MD) the system is underdetermined; the
    minimum-norm solution then just removes the mean energy.
    """
    parts = datasets if isinstance(datasets, (list, tuple)) else [datasets]
    frames = Frames.concat([p.frames if isinstance(p, FFDataset) else p for p in parts])
    elements = frames.elements
    coefficients, *_ = np.linalg.lstsq(composition(frames, elements), frames.energy, rcond=None)
    return {z: float(e) for z, e in zip(elements, coefficients)}


def __getattr__(name):  # the loader imports schnetpack (seconds); only when asked for
    if name in ("FFBatches", "ff_loader"):
        from chemscale.ff import loader

        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- CLI ----------------------------------------------------------------------------------------

def describe(dataset: FFDataset) -> dict:
    """Counts and energy/force statistics (eV, eV/Å) of one split."""
    def summary(x):
        return {"mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()), "max": float(x.max())} if len(x) \
            else {}

    return {"structures": len(dataset), "atoms": len(dataset.numbers), "elements": list(dataset.elements),
            "total_energy_ev": summary(dataset.total_energy), "energy_ev": summary(dataset.energy),
            "forces_ev_per_a": summary(dataset.forces.reshape(-1)),
            "force_component_rms_ev_per_a": float(np.sqrt((dataset.forces ** 2).mean())) if len(dataset) else None}


def main(argv: list[str] | None = None) -> int:
    """Build (if needed) and describe a dataset; a user error is one `error:` line and exit status 2."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m chemscale.ff.data", description=__doc__.split("\n")[0])
    parser.add_argument("source", help="md:<molecule or SMILES>, conformers:moses, a data file or a dataset folder")
    parser.add_argument("overrides", nargs="*", help="recipe fields as key=value, e.g. n_train=5000")
    parser.add_argument("--energy-unit", help="energy unit of a data file (default: its declared or documented one)")
    args = parser.parse_args(argv)
    try:
        return _main(args)
    except BrokenPipeError:  # `| head`: the reader has gone, nothing left to say
        sys.stderr.close()
        return 0


def _main(args) -> int:
    with warnings.catch_warnings():
        shown = set()  # a dataset's recorded warnings come again with each split loaded: print each once

        def show(message, *_, **__):
            if str(message) not in shown:
                shown.add(str(message))
                print(f"warning: {message}", file=sys.stderr)

        warnings.showwarning = show
        try:
            _describe_source(args.source, args.overrides, args.energy_unit)
        except (FFDataError, ConfigError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0


def _describe_source(source: str, override_texts: list[str], energy_unit: str | None) -> None:
    """Print what `main` prints: the dataset folder, its recipe, reference energies and per-split statistics."""
    from ase.data import chemical_symbols

    overrides = dict(_parse_override(o) for o in override_texts)
    if energy_unit is not None:
        if overrides.get("energy_unit", energy_unit) != energy_unit:
            raise ConfigError(f"energy_unit={overrides['energy_unit']!r} and --energy-unit {energy_unit!r} disagree; "
                              f"give one")
        overrides["energy_unit"] = energy_unit
    if Path(source).is_dir():
        if overrides:
            raise ConfigError(f"{source}: a dataset folder takes no recipe fields, got {sorted(overrides)}")
        directory = _directory(source, None, True)
    else:
        directory = generate(as_recipe(source, **overrides))
    meta = store.read_meta(directory)
    print(f"dataset {directory}\nrecipe  {json.dumps(meta.get('recipe'))}")
    print("reference energies (eV): " + ", ".join(f"{chemical_symbols[int(z)]} {e:.4f}"
                                                  for z, e in meta["reference_energies_ev"].items()))
    print(f"dropped: {meta['dropped'] or 'none'}")
    for split in SPLITS:
        stats = describe(load(directory, split))
        print(f"\n[{split}] {stats['structures']} structures, {stats['atoms']} atoms, elements "
              f"{[chemical_symbols[z] for z in stats['elements']]}, dropped {meta['splits'][split]['dropped'] or 'none'}")
        for key in ("total_energy_ev", "energy_ev", "forces_ev_per_a"):
            if stats[key]:
                print(f"  {key:<16} " + "  ".join(f"{k} {v:12.4f}" for k, v in stats[key].items()))
        if stats["force_component_rms_ev_per_a"] is not None:
            print(f"  force component RMS {stats['force_component_rms_ev_per_a']:.4f} eV/Å")


def _parse_override(text: str) -> tuple[str, object]:
    """'n_train=500' -> ('n_train', 500): values are JSON where they parse, else strings."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"recipe field {text!r} must be key=value, e.g. n_train=5000")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value  # a plain string


if __name__ == "__main__":
    sys.exit(main())
