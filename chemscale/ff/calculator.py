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
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    from chemscale.ff.calculator import ChemscaleCalculator

    atoms = molecule("CH3CH2OH")  # any structure of the elements the run was trained on
    atoms.calc = ChemscaleCalculator.from_run(run_dir)  # e.g. a run_dir column of sweep.collect("ff")
    MaxwellBoltzmannDistribution(atoms, temperature_K=300)
    dynamics = Langevin(atoms, timestep=0.5 * units.fs, temperature_K=300, friction=0.01 / units.fs,
                        fixcm=False)
    dynamics.run(20)
    print(atoms.get_potential_energy(), "eV")  # total energy, reference energies included
    print(atoms.get_forces())  # eV/Å

Neighbours: molecules (no periodic direction) use the neighbour list of training batches
(`chemscale.ff.loader.neighbor_pairs`); periodic cells use ASE's, with image offsets.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes
from ase.data import chemical_symbols

from chemscale import runs
from chemscale.config import ConfigError, atomic_write_json, from_dict

WEIGHTS, MODEL_CARD = "best.pt", "best_model.json"
UNITS = {"energy": "eV", "forces": "eV/Å", "positions": "Å"}


def write_model_card(run_dir: Path, build_args: dict, reference_energies: dict[int, float]) -> None:
    """Write RUN_DIR/best_model.json: what `ChemscaleCalculator.from_run` needs beside best.pt."""
    card = {"build": build_args, "reference_energies_ev": {str(z): float(e) for z, e in reference_energies.items()},
            "units": UNITS, "weights": WEIGHTS}
    atomic_write_json(Path(run_dir) / MODEL_CARD, card)


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
    train = ffdata.load(recipe, "train", dcfg.n_train, seed=0, progress=False)
    val = ffdata.load(recipe, "val", dcfg.n_val or None, seed=0, progress=False)
    test = ffdata.load(recipe, "test", None, progress=False)
    elements = sorted(set(train.elements) | set(val.elements) | set(test.elements))
    build_args = {"model": mcfg.name, "width": mcfg.width, "depth": mcfg.depth, "cutoff": mcfg.cutoff,
                  "elements": elements, "n_rbf": mcfg.n_rbf, "per_element_shift": True}
    return build_args, train.reference_energies


class ChemscaleCalculator(Calculator):
    """Energy (eV, total: per-element reference energies added back) and forces (eV/Å) of a force field.

    Args:
        model: a `chemscale.ff.models.ForceField` (put in eval mode here).
        reference_energies: eV per element (atomic number -> energy), added to the model's energy.
        device: where the model runs ("cpu", "cuda", ...).
    """

    implemented_properties = ["energy", "free_energy", "forces"]

    def __init__(self, model, reference_energies: dict[int, float], device: str | torch.device = "cpu", **kwargs):
        super().__init__(**kwargs)
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.reference_energies = {int(z): float(e) for z, e in reference_energies.items()}
        if missing := sorted(set(model.elements) - set(self.reference_energies)):
            raise ValueError(f"no reference energy for element(s) {[chemical_symbols[z] for z in missing]}")

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> ChemscaleCalculator:
        """The calculator of a force-field run's best model (best.pt, saved at each new best validation:
        the best so far while the run still trains).

        `dtype` float64 gives smoother energies for long MD (the weights are converted; Allegro
        is rebuilt in float64, as nequip requires).
        """
        from chemscale.ff import models

        run_dir = Path(run_dir)
        weights = run_dir / WEIGHTS
        if not weights.exists():
            raise FileNotFoundError(f"{weights}: no best model in this run folder (it is written at the run's first "
                                    f"validation; train it with: python -m chemscale.train {run_dir})")
        build_args, references = read_model_card(run_dir)
        model = models.rebuild(build_args, dtype=dtype)
        state = torch.load(weights, map_location="cpu", weights_only=True)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ConfigError(f"{weights} does not fit the model described by {run_dir / MODEL_CARD} or the run's "
                              f"config ({str(e).splitlines()[0]})") from None
        return cls(model, references, device=device)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        out = self.model(self.batch(self.atoms))
        reference = sum(self.reference_energies[int(z)] for z in self.atoms.numbers)  # float64, after the model
        energy = float(out["energy"].detach().double().cpu()[0]) + reference
        self.results = {"energy": energy, "free_energy": energy,
                        "forces": out["forces"].detach().double().cpu().numpy()}

    def batch(self, atoms) -> dict[str, torch.Tensor]:
        """The model's input for one structure: a batch of one, as in training."""
        from chemscale.ff.models import P

        dtype = self.model.dtype
        R = torch.as_tensor(atoms.positions, dtype=dtype, device=self.device)
        n_atoms = torch.tensor([len(atoms)], device=self.device)
        idx_i, idx_j, offsets = self._pairs(atoms, R, n_atoms)
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

        i, j, shifts = primitive_neighbor_list("ijS", atoms.pbc, atoms.cell.array, atoms.positions, cutoff)
        offsets = np.asarray(shifts, dtype=np.float64) @ atoms.cell.array  # r_ij = R_j - R_i + offset
        as_long = lambda a: torch.as_tensor(a, dtype=torch.long, device=self.device)  # noqa: E731
        return as_long(i), as_long(j), torch.as_tensor(offsets, dtype=R.dtype, device=self.device)
