"""The ASE calculator of a trained force field, for every model, against the model itself and physics.

Runs are the tiny ones of `test_ff_task` (trained once per session through `chemscale.train`).
"""

import re
import shutil

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.calculators.fd import calculate_numerical_forces
from ase.md.verlet import VelocityVerlet

from chemscale import runs
from chemscale.ff import calculator as calculator_module
from chemscale.ff import models
from chemscale.ff.calculator import ChemscaleCalculator
from chemscale.ff.loader import ff_loader
from chemscale.ff.task import FFModelConfig
from test_ff_task import tiny_test_split, trained


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: a second torch thread only adds contention on a busy machine (conftest restores it)."""
    torch.set_num_threads(1)

@pytest.mark.parametrize("name", models.MODELS)
def test_calculator_equals_the_model_on_test_molecules(name):
    """Energy = the model's own prediction + the data's per-element reference energies (eV); forces equal (eV/Å).

    The model is built here from the run's config and the data's elements, not from best_model.json.
    """
    run_dir, _ = trained(name)
    config = FFModelConfig(**runs.read_config(run_dir)["model"])
    test = tiny_test_split()
    model = models.build(name, width=config.width, depth=config.depth, cutoff=config.cutoff, n_rbf=config.n_rbf,
                         elements=list(test.elements))
    model.load_state_dict(torch.load(run_dir / "best.pt", weights_only=True))
    batch = next(iter(ff_loader(test, batch_size=len(test), cutoff=model.cutoff)))
    out = {k: v.detach() for k, v in model.eval()(batch).items()}
    calc = ChemscaleCalculator.from_run(run_dir)
    for k in (0, 7):
        atoms = test.atoms(k)
        label_energy = atoms.get_potential_energy()  # total energy of the data, eV
        atoms.calc = calc
        reference = sum(test.reference_energies[z] for z in atoms.numbers)
        assert atoms.get_potential_energy() == pytest.approx(float(out["energy"][k]) + reference, abs=2e-5)
        np.testing.assert_allclose(atoms.get_forces(), out["forces"][batch[models.P.idx_m] == k].numpy(),
                                   atol=2e-5)
        # the total energy of the data: ethanol is ~ -310 eV, the model off by much less than that
        assert abs(atoms.get_potential_energy() - label_energy) < 10 < abs(label_energy)


@pytest.mark.parametrize("name", models.MODELS)
def test_forces_are_minus_the_gradient_of_the_energy(name):
    """Finite differences of the calculator's energy (float64 weights): forces in eV/Å with the right sign."""
    run_dir, _ = trained(name)
    atoms = tiny_test_split().atoms(3)
    atoms.calc = ChemscaleCalculator.from_run(run_dir, dtype=torch.float64)
    forces = atoms.get_forces()
    numeric = calculate_numerical_forces(atoms, eps=1e-4)
    assert np.abs(forces).max() > 1e-3  # not vacuous
    np.testing.assert_allclose(forces, numeric, rtol=1e-5, atol=1e-6)


def test_md_example_of_the_docstring_runs():
    """The README/docstring Langevin example, executed as written on a trained run."""
    run_dir, _ = trained("schnet")
    example = re.search(r"Example.*?::\n\n(.*?)\n\n(?=\S)", calculator_module.__doc__, re.S).group(1)
    namespace = {"run_dir": run_dir}
    exec(compile("\n".join(line[4:] for line in example.splitlines()), "example", "exec"), namespace)
    atoms = namespace["atoms"]
    assert len(atoms) == 9 and np.isfinite(atoms.get_potential_energy()) and np.isfinite(atoms.get_forces()).all()
    assert namespace["dynamics"].nsteps == 20


@pytest.mark.parametrize("name", ["schnet", "allegro"])
def test_velocity_verlet_conserves_energy(name):
    """NVE dynamics: kinetic + potential energy stays constant while both change (forces consistent with energy)."""
    run_dir, _ = trained(name)
    atoms = tiny_test_split().atoms(0)
    atoms.calc = ChemscaleCalculator.from_run(run_dir, dtype=torch.float64)
    atoms.set_velocities(np.random.default_rng(0).normal(0, 0.02, (len(atoms), 3)))  # ~ 500 K for H
    totals, potentials = [], []
    dynamics = VelocityVerlet(atoms, timestep=0.1 * units.fs)
    dynamics.attach(lambda: (totals.append(atoms.get_total_energy()), potentials.append(atoms.get_potential_energy())))
    dynamics.run(30)
    assert np.ptp(potentials) > 1e-3  # the atoms moved on the energy surface
    assert np.ptp(totals) < 0.02 * np.ptp(potentials)


def test_periodic_cell_gives_the_molecule_s_energy():
    """A molecule wrapped across the faces of a large periodic box: same energy and forces as in vacuum."""
    run_dir, _ = trained("painn")
    calc = ChemscaleCalculator.from_run(run_dir, dtype=torch.float64)
    molecule = tiny_test_split().atoms(2)
    molecule.calc = calc
    energy, forces = molecule.get_potential_energy(), molecule.get_forces()
    boxed = Atoms(molecule.numbers, molecule.positions - molecule.positions.mean(0), cell=[15.0, 16.0, 17.0],
                  pbc=True)
    boxed.wrap()  # atoms on both sides of the box's faces: bonds go through the boundary
    assert np.ptp(boxed.positions[:, 0]) > 10
    boxed.calc = calc
    assert boxed.get_potential_energy() == pytest.approx(energy, abs=1e-9)
    np.testing.assert_allclose(boxed.get_forces(), forces, atol=1e-9)


def test_run_without_model_card_rebuilds_it_from_config_and_data(tmp_path):
    """A run trained before best_model.json existed: same calculator from its config and dataset."""
    run_dir, _ = trained("spookynet")
    copy = tmp_path / run_dir.name
    shutil.copytree(run_dir, copy)
    (copy / "best_model.json").unlink()
    atoms = tiny_test_split().atoms(1)
    atoms.calc = ChemscaleCalculator.from_run(run_dir)
    expected = atoms.get_potential_energy()
    atoms.calc = ChemscaleCalculator.from_run(copy)
    assert atoms.get_potential_energy() == pytest.approx(expected, abs=1e-9)


def test_errors_name_what_is_wrong(tmp_path):
    run_dir, _ = trained("schnet")
    with pytest.raises(FileNotFoundError, match=r"best.pt.*python -m chemscale.train"):
        ChemscaleCalculator.from_run(tmp_path)
    atoms = Atoms("CN", positions=[[0, 0, 0], [1.2, 0, 0]])
    atoms.calc = ChemscaleCalculator.from_run(run_dir)
    with pytest.raises(ValueError, match=r"\['H', 'C', 'O'\].*\['N'\]"):
        atoms.get_potential_energy()
