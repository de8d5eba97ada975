"""The ASE calculator of a trained force field, for every model, against the model itself and physics.

Runs are the tiny ones of `test_ff_task` (trained once per session through `chemscale.train`).
"""

import json
import re
import shutil
import warnings

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import molecule
from ase.calculators.calculator import CalculationFailed, PropertyNotImplementedError
from ase.calculators.fd import calculate_numerical_forces
from ase.md.verlet import VelocityVerlet

from chemscale import runs
from chemscale.ff import calculator as calculator_module
from chemscale.ff import models
from chemscale.ff.calculator import ChemscaleCalculator
from chemscale.ff.forcefield import P
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
        assert atoms.get_potential_energy() == pytest.approx(float(out[P.energy][k]) + reference, abs=2e-5)
        np.testing.assert_allclose(atoms.get_forces(), out[P.forces][batch[P.idx_m] == k].numpy(), atol=2e-5)
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
    with warnings.catch_warnings(record=True) as caught:  # pytest's config ignores DeprecationWarning
        warnings.simplefilter("always")
        exec(compile("\n".join(line[4:] for line in example.splitlines()), "example", "exec"), namespace)
    deprecated = [str(w.message) for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert not deprecated  # the example uses the installed ASE's current API (thermalize_momenta)
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


def test_model_card_of_a_run_trained_before_the_registry(tmp_path):
    """best_model.json written before issue 9 names the model under "model", not "name": same calculator."""
    run_dir, _ = trained("spookynet")
    card = json.loads((run_dir / "best_model.json").read_text())
    assert card["build"]["name"] == "spookynet" and "model" not in card["build"]
    copy = tmp_path / run_dir.name
    shutil.copytree(run_dir, copy)
    card["build"] = {"model" if k == "name" else k: v for k, v in card["build"].items()}
    (copy / "best_model.json").write_text(json.dumps(card))
    atoms = tiny_test_split().atoms(1)
    atoms.calc = ChemscaleCalculator.from_run(run_dir)
    expected = atoms.get_potential_energy()
    atoms.calc = ChemscaleCalculator.from_run(copy)
    assert atoms.get_potential_energy() == expected


def test_errors_name_what_is_wrong(tmp_path):
    run_dir, _ = trained("schnet")
    untrained = tmp_path / "untrained"
    shutil.copytree(run_dir, untrained)
    (untrained / "best.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"best.pt.*python -m chemscale.train"):
        ChemscaleCalculator.from_run(untrained)
    atoms = Atoms("CN", positions=[[0, 0, 0], [1.2, 0, 0]])
    atoms.calc = ChemscaleCalculator.from_run(run_dir)
    with pytest.raises(ValueError, match=r"\['H', 'C', 'O'\].*\['N'\]"):
        atoms.get_potential_energy()


def test_a_path_that_is_no_run_folder_is_named_so(tmp_path):
    """Not "no best model... train it", which would send the user training a folder that does not exist."""
    with pytest.raises(FileNotFoundError, match=r"nonexistent: no such run folder"):
        ChemscaleCalculator.from_run(tmp_path / "nonexistent")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"a.txt: a file, not a run folder"):
        ChemscaleCalculator.from_run(tmp_path / "a.txt")
    with pytest.raises(FileNotFoundError, match=r"not a run folder \(no config.json\)"):
        ChemscaleCalculator.from_run(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_damaged_weights_are_named_with_the_way_out(tmp_path, damage):
    """A truncated or empty best.pt (full disk, interrupted copy): the file and --retrain, not a torch traceback."""
    run_dir, _ = trained("schnet")
    copy = tmp_path / run_dir.name
    shutil.copytree(run_dir, copy)
    weights = copy / "best.pt"
    weights.write_bytes(weights.read_bytes()[:3000] if damage == "truncated" else b"")
    with pytest.raises(RuntimeError, match=rf"{re.escape(str(weights))}: cannot read.*chemscale.train .*--retrain"):
        ChemscaleCalculator.from_run(copy)


def test_dtype_and_device_by_name_or_a_clear_error():
    """dtype="float64" is torch.float64; a wrong dtype or device name says what to pass instead."""
    run_dir, _ = trained("schnet")
    assert ChemscaleCalculator.from_run(run_dir, dtype="float64").model.dtype == torch.float64
    with pytest.raises(ValueError, match=r"dtype 'int64': not a floating-point.*'float64'"):
        ChemscaleCalculator.from_run(run_dir, dtype="int64")
    with pytest.raises(ValueError, match=r"device 'gpu': not a torch device; use 'cpu', 'cuda'"):
        ChemscaleCalculator.from_run(run_dir, device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device 'cuda': torch sees no CUDA GPU"):
            ChemscaleCalculator.from_run(run_dir, device="cuda")


def test_stress_is_refused_with_what_the_calculator_gives():
    run_dir, _ = trained("schnet")
    atoms = molecule("CH3CH2OH", cell=[8.0, 8.0, 8.0], pbc=True)
    atoms.calc = ChemscaleCalculator.from_run(run_dir)
    with pytest.raises(PropertyNotImplementedError, match=r"stress: .*energy and forces only.*no stress"):
        atoms.get_stress()


def _nan_position(atoms):
    atoms.positions[3, 1] = np.nan


def _periodic_without_cell(atoms):
    atoms.pbc = True  # molecule() leaves the cell zero


def _periodic_along_a_zero_vector(atoms):
    atoms.pbc, atoms.cell = [True, False, False], [0.0, 20.0, 20.0]


def _flat_cell(atoms):
    atoms.pbc, atoms.cell = True, [[10.0, 0, 0], [20.0, 0, 0], [0, 0, 10.0]]


def _coincident_atoms(atoms):
    atoms.positions[1] = atoms.positions[0]


def _coincident_with_an_image(atoms):
    atoms.pbc, atoms.cell = True, [10.0, 10.0, 10.0]
    atoms.positions[1] = atoms.positions[0] + [10.0, 0.05, 0]


@pytest.mark.parametrize("name", ["schnet", "painn"])
@pytest.mark.parametrize("spoil, message", [
    (_nan_position, r"atom\(s\) \[3\]: position not finite"),
    (_periodic_without_cell, r"pbc=\[True, True, True\] but cell vector\(s\) \[0, 1, 2\] are zero.*atoms.pbc = False"),
    (_periodic_along_a_zero_vector, r"pbc=\[True, False, False\] but cell vector\(s\) \[0\] are zero"),
    (_flat_cell, r"linearly dependent"),
    (_coincident_atoms, r"atoms 0 \(C\) and 1 \(C\) are 0 Å apart, closer than 0.1 Å"),
    (_coincident_with_an_image, r"atoms 0 \(C\) and 1 \(C\) \(with a periodic image\) are 0.05 Å apart"),
])
def test_structures_without_a_meaningful_energy_are_refused(name, spoil, message):
    """Before: a finite energy with a NaN atom left out, -1750 eV (SchNet) or NaN (PaiNN) for pbc without a cell."""
    run_dir, _ = trained(name)
    atoms = molecule("CH3CH2OH")
    spoil(atoms)
    atoms.calc = ChemscaleCalculator.from_run(run_dir, dtype=torch.float64)
    with pytest.raises(ValueError, match=message):
        atoms.get_potential_energy()


def test_partly_periodic_cell_with_zero_vectors_along_open_directions():
    """pbc only along x, the cell zero along the open y and z: not refused, the energy of the free molecule."""
    run_dir, _ = trained("painn")
    calc = ChemscaleCalculator.from_run(run_dir, dtype=torch.float64)
    free, wire = molecule("CH3CH2OH"), molecule("CH3CH2OH", cell=[30.0, 0, 0], pbc=[True, False, False])
    free.calc, wire.calc = calc, calc
    assert wire.get_potential_energy() == pytest.approx(free.get_potential_energy(), abs=1e-9)


def test_a_non_finite_model_output_is_an_error_not_a_number():
    """The last guard: whatever makes the network give NaN (here a NaN weight), the dynamics never sees it."""
    run_dir, _ = trained("schnet")
    calc = ChemscaleCalculator.from_run(run_dir)
    with torch.no_grad():
        next(calc.model.parameters()).fill_(float("nan"))
    atoms = molecule("CH3CH2OH")
    atoms.calc = calc
    with pytest.raises(CalculationFailed, match=r"non-finite energy or forces for C2H6O"):
        atoms.get_potential_energy()
