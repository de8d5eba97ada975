"""An ASE calculator for a trained force field: SchNet, PaiNN, Allegro or SpookyNet.

A force-field run keeps its best weights in ``best.pt`` and, once finished, in
``best_model.json`` what rebuilds the network (its `chemscale.ff.models.build` arguments) and
the per-element reference energies that the data side subtracted before training. The
calculator adds them back: its energy is the total energy in the units of the data (eV, as
every dataset is converted to eV and Å on load), its forces are in eV/Å, as ASE expects.

Example (a few steps of Langevin dynamics with a trained run)::

    from ase import units
    from ase.build import molecule
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import thermalize_momenta

    from chemscale.ff.calculator import ChemscaleCalculator

    atoms = molecule("CH3CH2OH")  # any structure of the elements the run was trained on
    atoms.calc = ChemscaleCalculator.from_run(run_dir)  # e.g. a run_dir column of sweep.collect("ff")
    thermalize_momenta(atoms, temperature_K=300)  # ASE >= 3.29 (MaxwellBoltzmannDistribution is deprecated)
    dynamics = Langevin(atoms, timestep=0.5 * units.fs, temperature_K=300, friction=0.01 / units.fs,
                        fixcm=False)
    dynamics.run(20)
    print(atoms.get_potential_energy(), "eV")  # total energy, reference energies included
    print(atoms.get_forces())  # eV/Å

Neighbours: molecules (no periodic direction) use the neighbour list of training batches
(`chemscale.ff.loader.neighbor_pairs`); periodic cells use ASE's, with image offsets. Periodic
cells give energy and forces but no stress (no cell relaxation or constant-pressure MD).

Structures without a meaningful energy are refused with a ValueError instead of returning wrong
numbers or NaN: a non-finite position, a periodic direction whose cell vector is zero (an ASE
molecule with pbc=True and no cell) or a flat cell, and coincident atoms (closer than 0.1 Å,
periodic images included). A model that still gives NaN raises ASE's CalculationFailed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from ase.calculators.calculator import CalculationFailed, Calculator, PropertyNotImplementedError, all_changes
from ase.data import chemical_symbols

from chemscale import runs
from chemscale.config import ConfigError, from_dict
from chemscale.ff.card import MODEL_CARD
from chemscale.task import BEST

MIN_DISTANCE = 0.1  # Å: atoms closer than this are coincident (no bond is; PaiNN's directions are undefined at 0)


def read_model_card(run_dir: Path) -> tuple[dict, dict[int, float]]:
    """The build arguments and reference energies of a run's best model.

    A run trained before best_model.json existed has them rebuilt from its config and its
    dataset, as `chemscale.ff.task.build` chose them (the dataset is read from the cache, or
    built again if the cache was deleted).
    """
    path = Path(run_dir) / MODEL_CARD
    if path.exists():
        import json

        try:
            card = json.loads(path.read_text())
            return card["build"], {int(z): float(e) for z, e in card["reference_energies_ev"].items()}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{path}: damaged ({type(e).__name__}: {e}); delete it to rebuild it from the "
                              f"run's config and data") from None
    return _card_from_config(Path(run_dir))


def _card_from_config(run_dir: Path) -> tuple[dict, dict[int, float]]:
    from chemscale.ff import data as ffdata
    from chemscale.ff.task import FFDataConfig, FFModelConfig

    config = runs.read_config(run_dir)
    source = str(run_dir / runs.CONFIG)
    if config.get("task") != "ff":
        raise ConfigError(f"{source}: key 'task' = {config.get('task')!r}; only force-field runs ('ff') have a "
                          f"calculator")
    mcfg = from_dict(FFModelConfig, config.get("model", {}), f"{source} [model]")
    dcfg = from_dict(FFDataConfig, config.get("data", {}), f"{source} [data]")
    recipe = ffdata.as_recipe(dcfg.source, **dcfg.recipe)
    train = ffdata.load(recipe, "train", dcfg.n_train_structures, seed=0, progress=False)
    val = ffdata.load(recipe, "val", dcfg.n_val_structures or None, seed=0, progress=False)
    test = ffdata.load(recipe, "test", None, progress=False)
    elements = sorted(set(train.elements) | set(val.elements) | set(test.elements))
    build_args = {"name": mcfg.name, "width": mcfg.width, "depth": mcfg.depth, "cutoff": mcfg.cutoff,
                  "elements": elements, "n_rbf": mcfg.n_rbf, "per_element_shift": True, **mcfg.options}
    return build_args, train.reference_energies


class ChemscaleCalculator(Calculator):
    """Energy (eV, total: per-element reference energies added back) and forces (eV/Å) of a force field.

    Args:
        model: a `chemscale.ff.forcefield.ForceField` (put in eval mode here).
        reference_energies: eV per element (atomic number -> energy), added to the model's energy.
        device: where the model runs ("cpu", "cuda", ...).
    """

    implemented_properties = ["energy", "free_energy", "forces"]

    def __init__(self, model, reference_energies: dict[int, float], device: str | torch.device = "cpu", **kwargs):
        super().__init__(**kwargs)
        self.device = _as_device(device)
        self.model = model.eval().to(self.device)
        self.reference_energies = {int(z): float(e) for z, e in reference_energies.items()}
        if missing := sorted(set(model.elements) - set(self.reference_energies)):
            raise ValueError(f"no reference energy for element(s) {[chemical_symbols[z] for z in missing]}")

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, dtype: torch.dtype | str = torch.float32,
                 device: str | torch.device = "cpu") -> ChemscaleCalculator:
        """The calculator of a force-field run's best model (best.pt, saved at each new best validation:
        the best so far while the run still trains).

        `dtype` float64 (or "float64") gives smoother energies for long MD (the weights are
        converted; Allegro is rebuilt in float64, as nequip requires).
        """
        from chemscale.ff import models

        dtype, device = _as_dtype(dtype), _as_device(device)
        run_dir = _run_folder(Path(run_dir))
        weights = run_dir / BEST
        if not weights.exists():
            raise FileNotFoundError(f"{weights}: no best model in this run folder (it is written at the run's first "
                                    f"validation; train it with: python -m chemscale.train {run_dir})")
        build_args, references = read_model_card(run_dir)
        model, state = models.rebuild(build_args, dtype=dtype), _read_weights(weights, run_dir)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ConfigError(f"{weights} does not fit the model described by {run_dir / MODEL_CARD} or the run's "
                              f"config ({str(e).splitlines()[0]})") from None
        return cls(model, references, device=device)

    def get_property(self, name, atoms=None, allow_calculation=True):
        """ASE's, with a message that says which properties there are (no stress: no cell relaxation or NPT)."""
        if name not in self.implemented_properties:
            raise PropertyNotImplementedError(
                f"{name}: not computed by ChemscaleCalculator, which gives energy and forces only (periodic cells "
                f"included, but no stress, so no cell relaxation or constant-pressure dynamics)")
        return super().get_property(name, atoms, allow_calculation)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        _check_positions_and_cell(self.atoms)
        from chemscale.ff.forcefield import P

        out = self.model(self.batch(self.atoms))
        energy, forces = out[P.energy].detach().double().cpu()[0], out[P.forces].detach().double().cpu()
        if not (torch.isfinite(energy) and torch.isfinite(forces).all()):  # never hand NaN on to the dynamics
            formula = self.atoms.get_chemical_formula()
            raise CalculationFailed(f"the model gave a non-finite energy or forces for {formula} (energy "
                                    f"{float(energy)}): a structure far outside what it was trained on?")
        reference = sum(self.reference_energies[int(z)] for z in self.atoms.numbers)  # float64, after the model
        self.results = {"energy": float(energy) + reference, "free_energy": float(energy) + reference,
                        "forces": forces.numpy()}

    def batch(self, atoms) -> dict[str, torch.Tensor]:
        """The model's input for one structure: a batch of one, as in training."""
        from chemscale.ff.forcefield import P

        dtype = self.model.dtype
        R = torch.as_tensor(atoms.positions, dtype=dtype, device=self.device)
        n_atoms = torch.tensor([len(atoms)], device=self.device)
        idx_i, idx_j, offsets = self._pairs(atoms, R, n_atoms)
        _check_distances(atoms, R, idx_i, idx_j, offsets)
        return {P.Z: torch.as_tensor(atoms.numbers, dtype=torch.long, device=self.device), P.R: R,
                P.idx_m: torch.zeros(len(atoms), dtype=torch.long, device=self.device), P.n_atoms: n_atoms,
                P.idx_i: idx_i, P.idx_j: idx_j, P.offsets: offsets}

    def _pairs(self, atoms, R: torch.Tensor, n_atoms: torch.Tensor):
        """Neighbour pairs (idx_i, idx_j) and their image offsets (Å) within the model's cutoff."""
        cutoff = self.model.cutoff
        if not atoms.pbc.any():
            from chemscale.ff.loader import neighbor_pairs

            idx_i, idx_j = neighbor_pairs(R, n_atoms, cutoff)
            return idx_i, idx_j, R.new_zeros((len(idx_i), 3))
        from ase.neighborlist import primitive_neighbor_list

        # the complete cell: ASE's neighbour list needs three vectors, a non-periodic one may be zero
        i, j, shifts = primitive_neighbor_list("ijS", atoms.pbc, atoms.cell.complete(), atoms.positions, cutoff)
        offsets = np.asarray(shifts, dtype=np.float64) @ atoms.cell.array  # r_ij = R_j - R_i + offset
        as_long = lambda a: torch.as_tensor(a, dtype=torch.long, device=self.device)  # noqa: E731
        return as_long(i), as_long(j), torch.as_tensor(offsets, dtype=R.dtype, device=self.device)


def _run_folder(run_dir: Path) -> Path:
    """`run_dir`, or a message saying it is no run folder (before the "train it" one for a missing best.pt)."""
    if not run_dir.exists():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    if not run_dir.is_dir():
        raise NotADirectoryError(f"{run_dir}: a file, not a run folder (pass the folder that holds "
                                 f"{runs.CONFIG} and {BEST})")
    if not (run_dir / runs.CONFIG).exists():
        raise FileNotFoundError(f"{run_dir}: not a run folder (no {runs.CONFIG}); runs are made by "
                                f"chemscale.sweep or chemscale.runs.create")
    return run_dir


def _read_weights(weights: Path, run_dir: Path) -> dict:
    """best.pt's state dict; a truncated, empty or foreign file is named with the way out."""
    from chemscale.train import DamagedRun

    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, OSError, UnpicklingError... for a damaged file
        raise DamagedRun(f"{weights}: cannot read these weights ({type(e).__name__}: {_first_sentence(e)}); the "
                         f"file is damaged (a full disk, an interrupted copy?). Restore it from a copy, or train the "
                         f"run again from step 0: python -m chemscale.train {run_dir} --retrain") from None
    if not isinstance(state, dict):
        raise DamagedRun(f"{weights}: holds a {type(state).__name__}, not a model's weights; train the run again "
                         f"from step 0: python -m chemscale.train {run_dir} --retrain")
    return state


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A floating torch dtype from a dtype or its name ("float64", "torch.float64")."""
    value = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else dtype
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype {dtype!r}: not a floating-point torch dtype; use torch.float32 (the default) or "
                         f"torch.float64 (or the names 'float32', 'float64')")
    return value


def _as_device(device: str | torch.device) -> torch.device:
    """A torch device that this machine has, or a message naming the ones it accepts."""
    try:
        value = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r}: not a torch device; use 'cpu', 'cuda', 'cuda:1' or 'mps'") from None
    if value.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: torch sees no CUDA GPU on this machine; use 'cpu'")
    if value.type == "cuda" and value.index is not None and value.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s) "
                         f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    if value.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: torch sees no Apple GPU (MPS) on this machine; use 'cpu'")
    return value


def _check_positions_and_cell(atoms) -> None:
    """Refuse what would give finite but wrong numbers, or NaN: non-finite positions, a periodic zero or flat cell."""
    bad = np.flatnonzero(~np.isfinite(atoms.positions).all(axis=1))
    if len(bad):
        raise ValueError(f"atom(s) {bad[:10].tolist()}: position not finite ({atoms.positions[bad[0]].tolist()}); "
                         f"the force field needs finite coordinates (Å)")
    if not atoms.pbc.any():
        return
    cell = atoms.cell.array
    short = [int(axis) for axis in np.flatnonzero(atoms.pbc) if not np.linalg.norm(cell[axis]) >= MIN_DISTANCE]
    if short:
        raise ValueError(f"pbc={atoms.pbc.tolist()} but cell vector(s) {short} are zero, shorter than "
                         f"{MIN_DISTANCE} Å or not finite (cell {np.round(cell, 6).tolist()}): give the atoms a "
                         f"cell (atoms.cell = [a, b, c]) or, for a molecule, set atoms.pbc = False")
    complete = atoms.cell.complete()
    if abs(np.linalg.det(complete)) < 1e-6 * np.prod(np.linalg.norm(complete, axis=1)):
        raise ValueError(f"cell {np.round(cell, 6).tolist()}: its vectors are (nearly) linearly dependent, a flat "
                         f"cell has no volume; give three independent cell vectors")


def _check_distances(atoms, R: torch.Tensor, idx_i: torch.Tensor, idx_j: torch.Tensor, offsets: torch.Tensor) -> None:
    """Refuse coincident atoms (closer than MIN_DISTANCE, periodic images included): the energy there is NaN or junk."""
    if not len(idx_i):
        return
    distance = (R[idx_j] - R[idx_i] + offsets).norm(dim=-1)
    k = int(distance.argmin())
    if float(distance[k]) < MIN_DISTANCE:
        i, j = int(idx_i[k]), int(idx_j[k])
        image = " (with a periodic image)" if bool(offsets[k].any()) else ""
        raise ValueError(f"atoms {i} ({atoms.get_chemical_symbols()[i]}) and {j} ({atoms.get_chemical_symbols()[j]})"
                         f"{image} are {float(distance[k]):.3g} Å apart, closer than {MIN_DISTANCE} Å: coincident "
                         f"atoms, where no force field gives a meaningful energy")


def _first_sentence(error: Exception) -> str:
    """Torch's reason without its paragraphs of advice (a truncated file's message runs to many lines)."""
    return str(error).strip().split(". ")[0].splitlines()[0][:200] if str(error).strip() else "empty file?"
