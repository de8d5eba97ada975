"""Tests of the force-field data side: generation, readers, units, cache, reference energies, batches.

One tiny xTB MD set (ethanol, 20 train + 10 test frames) is generated once per module into a
private cache; every bad-input file is written into tmp_path (a truncated file is written, then
cut). Nothing is downloaded.
"""

import contextlib
import json
import subprocess
import sys
import warnings
from collections import Counter

import h5py
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule
from ase.calculators.calculator import CalculationFailed, Calculator, all_changes
from ase.neighborlist import neighbor_list

import chemscale.ff.data as data
import chemscale.ff.generate as generate
import chemscale.ff.store as store
from chemscale.config import ConfigError
from chemscale.ff import import_schnetpack
from chemscale.ff.frames import EV_PER, FFDataError, Frames
from chemscale.ff.readers import FFUnitWarning, read

TINY_MD = dict(n_train=20, n_val=0, n_test=10, stride=10, equilibration_steps=20)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path / "cache" / "ff")


@pytest.fixture(scope="module")
def md_dir(tmp_path_factory):
    """The tiny ethanol MD dataset, generated once for the module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "CACHE_DIR", tmp_path_factory.mktemp("md") / "ff")
        return data.generate(data.as_recipe("md:ethanol", **TINY_MD), progress=False)


def fake_build(n_train=6, n_test=3):
    """A `build` stand-in: water frames with made-up labels, and a call counter."""
    calls = []

    def build(recipe, progress=True):
        calls.append(recipe)
        water = molecule("H2O")
        splits = {}
        for k, (split, n) in enumerate({"train": n_train, "val": 0, "test": n_test}.items()):
            rng = np.random.default_rng(k)
            splits[split] = Frames.from_trajectory(water.numbers, water.positions + rng.normal(0, .05, (n, 3, 3)),
                                                   rng.normal(size=(n, 3, 3)), rng.normal(size=n))
        return splits

    build.calls = calls
    return build


# ---------------------------------------------------------------- units

def test_unit_constants_are_pinned():
    assert EV_PER["kcal/mol"] == pytest.approx(0.0433641, rel=1e-6)
    assert EV_PER["Hartree"] == pytest.approx(27.211386, rel=1e-8)
    assert EV_PER["kJ/mol"] == pytest.approx(0.01036427, rel=1e-6)


def test_import_schnetpack_shim():
    spk = import_schnetpack()
    assert spk.properties.idx_i == "_idx_i" and spk.data.ASEAtomsData


# ---------------------------------------------------------------- MD generation

def test_md_set_shapes_units_and_metadata(md_dir):
    train, test = data.load(md_dir, "train"), data.load(md_dir, "test")
    assert (len(train), len(test)) == (20, 10) and len(data.load(md_dir, "val")) == 0
    assert train.elements == (1, 6, 8) and train.positions.shape == train.forces.shape == (180, 3)
    assert train.total_energy.shape == train.energy.shape == (20,)
    # xTB ethanol is about -310 eV; 500 K makes forces of about 1 eV/Å (kcal/mol or Hartree would be off by 20x)
    assert -320 < train.total_energy.mean() < -300 and 0.3 < np.sqrt((train.forces ** 2).mean()) < 3
    meta = json.loads((md_dir / "meta.json").read_text())
    assert meta["units"] == {"energy": "eV", "forces": "eV/Ang", "positions": "Ang"}
    spk = import_schnetpack()
    db = spk.data.ASEAtomsData(str(md_dir / "train.db"))
    assert db.units == {"energy": "eV", "forces": "eV/Ang"} and db.metadata["_distance_unit"] == "Ang"
    first = db[0]
    np.testing.assert_allclose(first[spk.properties.R].numpy(), train.positions[:9])
    np.testing.assert_allclose(first["forces"].numpy(), train.forces[:9])
    assert float(first["energy"]) == pytest.approx(train.total_energy[0])


def test_forces_are_minus_energy_gradient(md_dir):
    atoms = data.load(md_dir, "test").atoms(3)
    stored = atoms.get_forces()
    atoms.calc = generate.xtb_calculator()
    h = 2e-3
    for atom, axis in [(0, 0), (2, 1), (5, 2)]:
        energies = []
        for sign in (1, -1):
            displaced = atoms.copy()
            displaced.calc = atoms.calc
            displaced.positions[atom, axis] += sign * h
            with generate.single_threaded_openmp():
                energies.append(displaced.get_potential_energy())
        assert -(energies[0] - energies[1]) / (2 * h) == pytest.approx(stored[atom, axis], abs=0.05)


def test_train_and_test_are_separate_trajectories(md_dir):
    train, test = data.load(md_dir, "train"), data.load(md_dir, "test")
    assert set(train.frames.group) == {0} and set(test.frames.group) == {2}
    distances = np.linalg.norm(train.positions.reshape(20, 1, -1) - test.positions.reshape(1, 10, -1), axis=-1)
    assert distances.min() > 0.05  # no test frame is (a near copy of) a training frame
    assert not np.isin(test.total_energy, train.total_energy).any()


def test_reference_energies_are_fitted_on_train_and_shared(md_dir):
    train, test = data.load(md_dir, "train"), data.load(md_dir, "test")
    assert train.reference_energies == test.reference_energies
    assert abs(train.energy.mean()) < 1e-6  # one composition: the fit removes the training mean
    offset = sum(train.reference_energies[z] for z in train.numbers[:9])
    np.testing.assert_allclose(test.energy, test.total_energy - offset)


def test_nested_subsets(md_dir):
    small, large = data.load(md_dir, n=5, seed=1), data.load(md_dir, n=12, seed=1)
    np.testing.assert_array_equal(large.indices[:5], small.indices)
    np.testing.assert_array_equal(large.energy[:5], small.energy)
    with pytest.raises(FFDataError, match="n=21 structures, the split has 20"):
        data.load(md_dir, n=21)


def test_cached_dataset_is_reused(md_dir, monkeypatch):
    monkeypatch.setattr(data, "CACHE_DIR", md_dir.parent)
    monkeypatch.setattr(data, "build", lambda *a, **k: pytest.fail("rebuilt a complete cache"))
    assert data.generate(data.as_recipe("md:ethanol", **TINY_MD)) == md_dir
    data.main(["md:ethanol", *(f"{k}={v}" for k, v in TINY_MD.items())])  # the CLI finds it too
    assert len(data.load(generate.MDRecipe(**TINY_MD), "test")) == 10


def test_cli_prints_statistics_in_ev(md_dir, capsys):
    data.main([str(md_dir)])
    out = capsys.readouterr().out
    assert "[train] 20 structures, 180 atoms" in out and "[test] 10 structures" in out
    assert "force component RMS" in out and "eV/Å" in out and "H -" in out


# ---------------------------------------------------------------- cache integrity

@pytest.mark.parametrize("damage", ["no manifest", "incomplete manifest", "truncated file"])
def test_interrupted_or_damaged_cache_is_rebuilt(monkeypatch, damage):
    build = fake_build()
    monkeypatch.setattr(data, "build", build)
    recipe = generate.MDRecipe(**TINY_MD)
    folder = data.generate(recipe)
    if damage == "no manifest":  # as if the build died before its last write
        (folder / "manifest.json").unlink()
    elif damage == "incomplete manifest":
        (folder / "manifest.json").write_text('{"meta.json": {"bytes": 1')
    else:
        path = folder / "train.npz"
        path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(FFDataError, match="rebuilt|manifest|size"):
        data.load(folder)  # a damaged folder is refused when given directly...
    assert data.generate(recipe) == folder and len(build.calls) == 2  # ...and rebuilt when asked by recipe
    assert store.verify(folder) is None and len(data.load(recipe)) == 6


def test_stale_temporary_build_is_removed_not_used(monkeypatch):
    monkeypatch.setattr(data, "build", fake_build())
    recipe = generate.MDRecipe(**TINY_MD)
    final = data.dataset_dir(recipe)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = final.parent / f".{final.name}.{store.socket.gethostname()}.{dead.pid}.tmp"
    stale.mkdir(parents=True)
    (stale / "train.npz").write_bytes(b"half a file")
    assert data.generate(recipe) == final and not stale.exists()
    assert not list(final.parent.glob("*.tmp"))


def test_stored_units_other_than_ev_are_refused(monkeypatch):
    monkeypatch.setattr(data, "build", fake_build())
    folder = data.generate(generate.MDRecipe(**TINY_MD))
    meta = json.loads((folder / "meta.json").read_text())
    meta["units"]["energy"] = "kcal/mol"
    (folder / "meta.json").write_text(json.dumps(meta))
    store.write_manifest(folder)  # a consistent folder that says kcal/mol
    with pytest.raises(FFDataError, match="kcal/mol"):
        data.load(folder)


# ---------------------------------------------------------------- recipes

def test_recipe_validation():
    with pytest.raises(ConfigError, match="stride"):
        generate.MDRecipe(stride=5)
    with pytest.raises(ConfigError, match="molecule"):
        data.as_recipe("md:not_a_molecule(")
    with pytest.raises(ConfigError, match="unknown key.*n_frames"):
        data.as_recipe("md:ethanol", n_frames=3)
    with pytest.raises(FFDataError, match="not a recipe"):
        data.as_recipe("nothing:here")
    recipe = data.as_recipe({"kind": "md", "molecule": "aspirin", "n_train": 7})
    assert recipe == generate.MDRecipe(molecule="aspirin", n_train=7)
    assert data.dataset_dir(recipe) != data.dataset_dir(data.as_recipe(recipe, seed=1))


# ---------------------------------------------------------------- conformers (ANI-1x-like)

def test_small_molecules_from_moses_are_small_chno():
    from rdkit import Chem

    recipe = generate.ConformerRecipe(n_train_molecules=20, n_val_molecules=2, n_test_molecules=3, max_heavy_atoms=8)
    molecules = generate.small_molecules(recipe)
    assert len(molecules) == len(set(molecules)) == 25
    for text in molecules:
        mol = Chem.AddHs(Chem.MolFromSmiles(text))
        assert {a.GetSymbol() for a in mol.GetAtoms()} <= set("CHNO") and mol.GetNumHeavyAtoms() <= 8


class FlakyXTB(Calculator):
    """Fails every other call as tblite does when the SCF does not converge; else harmonic labels."""

    implemented_properties = ["energy", "forces"]
    calls = 0

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        FlakyXTB.calls += 1
        if FlakyXTB.calls % 2 == 0:
            raise CalculationFailed("SCF not converged in 250 cycles")
        self.results = {"energy": float((self.atoms.positions ** 2).sum()), "forces": -2 * self.atoms.positions}


def test_conformers_split_by_molecule_and_count_failures(monkeypatch):
    monkeypatch.setattr(generate, "xtb_calculator", lambda *a, **k: FlakyXTB())
    recipe = generate.ConformerRecipe(n_train_molecules=3, n_val_molecules=1, n_test_molecules=2,
                                      conformers_per_molecule=4, sigma_a=0.1, max_heavy_atoms=8)
    splits = generate.build(recipe, progress=False)
    groups = {s: set(f.group) for s, f in splits.items()}
    assert groups == {"test": {0, 1}, "val": {2}, "train": {3, 4, 5}}
    for split, frames in splits.items():
        n = len(groups[split]) * 4
        assert len(frames) + frames.dropped["xtb_not_converged"] + frames.dropped["embedding_failed"] == n
        assert frames.dropped["xtb_not_converged"] > 0
        np.testing.assert_allclose(frames.forces, -2 * frames.positions)  # labels belong to the perturbed geometry


def test_conformers_with_xtb_labels():
    folder = data.generate(generate.ConformerRecipe(n_train_molecules=2, n_val_molecules=0, n_test_molecules=1,
                                                    conformers_per_molecule=2, max_heavy_atoms=6), progress=False)
    train = data.load(folder)
    assert len(train) == 4 and set(train.elements) <= {1, 6, 7, 8}
    assert np.isfinite(train.forces).all() and 0.1 < np.abs(train.forces).max() < 50


# ---------------------------------------------------------------- readers: good files

def ethanol_arrays(n=4, seed=0):
    """Ethanol frames in kcal/mol with rMD17's magnitudes (forces ~20 kcal/mol/Å, energies spread ~4 kcal/mol)."""
    rng = np.random.default_rng(seed)
    atoms = molecule("CH3CH2OH")
    return (atoms.numbers, atoms.positions + rng.normal(0, 0.05, (n, 9, 3)), -97000 + rng.normal(0, 4, n),
            rng.normal(0, 20, (n, 9, 3)))


def write_rmd17(path, numbers, coords, energies, forces, **extra):
    np.savez(path, nuclear_charges=numbers, coords=coords, energies=energies, forces=forces, **extra)
    return path


def test_rmd17_is_read_in_kcal_per_mol(tmp_path):
    z, r, e, f = ethanol_arrays()
    frames = read(write_rmd17(tmp_path / "rmd17_ethanol.npz", z, r, e, f, old_indices=np.arange(4)))
    np.testing.assert_allclose(frames.energy, e * 0.0433641, rtol=1e-6)
    np.testing.assert_allclose(frames.forces, f.reshape(-1, 3) * 0.0433641, rtol=1e-6)
    np.testing.assert_allclose(frames.positions, r.reshape(-1, 3))
    with pytest.warns(FFUnitWarning, match="(most likely|may be) in kcal/mol"):  # asked for: read, with a word
        as_ev = read(tmp_path / "rmd17_ethanol.npz", energy_unit="eV")
    np.testing.assert_allclose(as_ev.energy, e)


def test_sgdml_respects_its_declared_unit(tmp_path):
    z, r, e, f = ethanol_arrays()
    np.savez(tmp_path / "md17.npz", z=z, R=r, E=e[:, None], F=f)
    np.testing.assert_allclose(read(tmp_path / "md17.npz").energy, e * EV_PER["kcal/mol"])
    ev = EV_PER["kcal/mol"]
    np.savez(tmp_path / "md17_ev.npz", z=z, R=r, E=e[:, None] * ev, F=f * ev, e_unit="eV", r_unit="Ang")
    np.testing.assert_allclose(read(tmp_path / "md17_ev.npz").energy, e * ev)
    with pytest.raises(FFDataError, match=r"md17_ev.npz: the file declares energies in 'eV' but energy_unit='kcal/mol'"):
        read(tmp_path / "md17_ev.npz", energy_unit="kcal/mol")


def write_ani1x(path, groups):
    with h5py.File(path, "w") as h5:
        for name, (z, r, e, f) in groups.items():
            g = h5.create_group(name)
            g["atomic_numbers"], g["coordinates"], g["wb97x_dz.energy"], g["wb97x_dz.forces"] = z, r, e, f
            g["ccsd(t)_cbs.energy"] = np.full(len(e), np.nan)  # other levels are NaN for most conformers
    return path


def test_ani1x_is_read_in_hartree_and_nans_are_dropped_and_counted(tmp_path):
    z, r, e, f = ethanol_arrays(n=5)
    e, f = e / 627.5, f / 627.5
    e[1] = np.nan
    f[3, 2, 0] = np.nan
    water = molecule("H2O")
    path = write_ani1x(tmp_path / "ani1x.h5", {"C2H6O": (z, r, e, f), "H2O": (
        water.numbers, water.positions[None].repeat(2, 0), np.array([-76.4, -76.3]), np.zeros((2, 3, 3)))})
    frames = read(path)
    assert frames.dropped == Counter(nan_energy=1, nan_forces=1) and len(frames) == 5
    np.testing.assert_allclose(frames.energy[:3], e[[0, 2, 4]] * 27.211386, rtol=1e-6)
    assert sorted(set(frames.group)) == [0, 1]
    folder = data.generate(data.as_recipe(str(path), val_fraction=0))  # a cached dataset, drops recorded
    assert json.loads((folder / "meta.json").read_text())["dropped"] == {"nan_energy": 1, "nan_forces": 1}


def write_extxyz(path, energies, force, unit=None):
    """H2 frames: frame k has forces (0, 0, force + k) and (0, 0, -force), declared in `unit` if given."""
    lines = []
    for k, energy in enumerate(energies):
        declared = f" energy_unit={unit}" if unit else ""
        lines += ["2", f'energy={energy}{declared} Properties=species:S:1:pos:R:3:forces:R:3 pbc="F F F"',
                  f"H 0 0 0 0 0 {force + k}", f"H 0 0 0.74 0 0 {-force}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_extxyz_in_ev_or_its_declared_unit(tmp_path):
    path = write_extxyz(tmp_path / "frames.extxyz", [-10.0, -11.0], 20.0, "kcal/mol")
    frames = read(path)
    np.testing.assert_allclose(frames.energy, [-10 * EV_PER["kcal/mol"], -11 * EV_PER["kcal/mol"]])
    np.testing.assert_allclose(frames.forces[2], [0, 0, 21 * EV_PER["kcal/mol"]])  # frame 1, atom 0
    with pytest.raises(FFDataError, match="declares energies in 'kcal/mol' but energy_unit='eV'"):
        read(path, energy_unit="eV")
    path = write_extxyz(tmp_path / "frames_ev.extxyz", [-10.0, -11.0], 1.0)
    np.testing.assert_allclose(read(path).energy, [-10, -11])


def test_schnetpack_db_in_kcal_per_mol_is_converted_or_refused(tmp_path):
    spk = import_schnetpack()
    db = spk.data.ASEAtomsData.create(str(tmp_path / "kcal.db"), distance_unit="Ang",
                                      property_unit_dict={"energy": "kcal/mol", "forces": "kcal/mol/Ang"})
    water = molecule("H2O")
    db.add_systems([{"energy": np.array([-100.0]), "forces": np.full((3, 3), 20.0)}], [water])
    frames = read(tmp_path / "kcal.db")
    assert frames.energy[0] == pytest.approx(-100 * 0.0433641, rel=1e-6)
    np.testing.assert_allclose(frames.forces, 20 * 0.0433641, rtol=1e-6)
    with pytest.raises(FFDataError, match="kcal.db: the file declares energies in 'kcal/mol' but energy_unit='eV'"):
        data.load(str(tmp_path / "kcal.db"), energy_unit="eV")


def test_user_file_is_split_and_loaded(tmp_path):
    z, r, e, f = ethanol_arrays(n=40)
    path = write_rmd17(tmp_path / "rmd17_ethanol.npz", z, r, e, f)
    splits = [data.load(str(path), s) for s in ("train", "val", "test")]
    assert [len(s) for s in splits] == [34, 2, 4]
    np.testing.assert_allclose(np.sort(np.concatenate([s.total_energy for s in splits])),
                               np.sort(e * EV_PER["kcal/mol"]))


# ---------------------------------------------------------------- readers: bad files

def test_truncated_and_corrupt_files_name_the_file(tmp_path):
    z, r, e, f = ethanol_arrays(n=50)
    good = write_rmd17(tmp_path / "good.npz", z, r, e, f)
    cut = tmp_path / "cut.npz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(FFDataError, match=r"cut.npz: not a readable .npz file \(truncated or corrupt\?\)"):
        read(cut)
    (tmp_path / "noise.npz").write_bytes(np.random.default_rng(0).bytes(500))
    with pytest.raises(FFDataError, match="noise.npz: not a readable .npz"):
        read(tmp_path / "noise.npz")
    h5 = write_ani1x(tmp_path / "good.h5", {"C2H6O": (z, r, e, f)})
    (tmp_path / "cut.h5").write_bytes(h5.read_bytes()[: h5.stat().st_size // 2])
    with pytest.raises(FFDataError, match=r"cut.h5: not a readable HDF5 file \(truncated or corrupt\?\)"):
        read(tmp_path / "cut.h5")
    (tmp_path / "bad.extxyz").write_text("3\nProperties=species:S:1:pos:R:3\nH 0 0\n")
    with pytest.raises(FFDataError, match="bad.extxyz: not a readable extxyz"):
        read(tmp_path / "bad.extxyz")
    with pytest.raises(FFDataError, match="missing.npz: no such file"):
        read(tmp_path / "missing.npz")


def test_missing_keys_are_named_with_the_keys_found(tmp_path):
    z, r, e, f = ethanol_arrays()
    np.savez(tmp_path / "partial.npz", nuclear_charges=z, coords=r, forces=f)
    with pytest.raises(FFDataError, match=r"partial.npz: missing key\(s\) \['energies'\] for an rMD17 .npz; "
                                          r"found keys: \['coords', 'forces', 'nuclear_charges'\]"):
        read(tmp_path / "partial.npz")
    np.savez(tmp_path / "other.npz", x=z)
    with pytest.raises(FFDataError, match=r"other.npz: not an rMD17 npz.*found keys: \['x'\]"):
        read(tmp_path / "other.npz")
    with h5py.File(tmp_path / "ani.h5", "w") as h5:
        h5.create_group("CH4")["coordinates"] = np.zeros((1, 5, 3))
    with pytest.raises(FFDataError, match=r"ani.h5 \[group 'CH4'\]: missing key\(s\) \['atomic_numbers', "
                                          r"'wb97x_dz.energy', 'wb97x_dz.forces'\]; found keys: \['coordinates'\]"):
        read(tmp_path / "ani.h5")
    (tmp_path / "noforces.xyz").write_text("1\nenergy=-1.0 Properties=species:S:1:pos:R:3\nH 0 0 0\n")
    with pytest.raises(FFDataError, match="noforces.xyz: frame 0 has no forces"):
        read(tmp_path / "noforces.xyz")


def test_nan_energies_or_forces_name_the_frame(tmp_path):
    z, r, e, f = ethanol_arrays(n=6)
    e[4] = np.nan
    with pytest.raises(FFDataError, match="nan_e.npz: energy of frame 4 is NaN"):
        read(write_rmd17(tmp_path / "nan_e.npz", z, r, e, f))
    z, r, e, f = ethanol_arrays(n=6)
    f[2, 1, 1] = np.nan
    with pytest.raises(FFDataError, match="nan_f.npz: forces of frame 2 is NaN"):
        read(write_rmd17(tmp_path / "nan_f.npz", z, r, e, f))
    (tmp_path / "nan.xyz").write_text("1\nenergy=-1.0 Properties=species:S:1:pos:R:3:forces:R:3\nH 0 0 0 0 0 0\n"
                                      "1\nenergy=nan Properties=species:S:1:pos:R:3:forces:R:3\nH 0 0 0 0 0 0\n")
    with pytest.raises(FFDataError, match="nan.xyz: energy of frame 1 is NaN"):
        read(tmp_path / "nan.xyz")


def test_atom_counts_that_do_not_match_coordinates(tmp_path):
    z, r, e, f = ethanol_arrays()
    with pytest.raises(FFDataError, match=r"short.npz: atom counts do not match: 8 atomic numbers but coordinates "
                                          r"of shape \(4, 9, 3\)"):
        read(write_rmd17(tmp_path / "short.npz", z[:8], r, e, f))
    with pytest.raises(FFDataError, match=r"forces.npz: forces of shape \(4, 8, 3\) do not match"):
        read(write_rmd17(tmp_path / "forces.npz", z, r, e, f[:, :8]))
    write_ani1x(tmp_path / "ani.h5", {"C2H6O": (z[:8], r, e, f)})
    with pytest.raises(FFDataError, match=r"ani.h5 \[group 'C2H6O'\]: atom counts do not match"):
        read(tmp_path / "ani.h5")


# ---------------------------------------------------------------- reference energies

def test_reference_energy_fit_recovers_known_per_element_energies():
    rng = np.random.default_rng(0)
    truth = {1: -13.6, 6: -1029.5, 7: -1484.2, 8: -2041.3}
    sizes = rng.integers(2, 15, 60)
    molecules = [Atoms(rng.choice(list(truth), n), rng.normal(size=(n, 3))) for n in sizes]
    energy = [sum(truth[z] for z in m.numbers) + rng.normal(0, 1e-3) for m in molecules]
    frames = Frames.from_structures([m.numbers for m in molecules], [m.positions for m in molecules],
                                    [np.zeros((len(m), 3)) for m in molecules], energy, range(60))
    fitted = data.fit_reference_energies([frames.take(range(30)), frames.take(range(30, 60))])
    assert fitted.keys() == truth.keys()
    for z in truth:
        assert fitted[z] == pytest.approx(truth[z], abs=2e-3)
    dataset = data.FFDataset(frames, fitted)
    assert np.abs(dataset.energy).max() < 5e-3


# ---------------------------------------------------------------- batches

def random_frames(n=23, seed=0):
    """Molecules of 1-12 atoms spread over a few Å, so a 2.5 Å cutoff keeps some pairs and drops others."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 13, n)
    return Frames.from_structures([rng.choice([1, 6, 7, 8], s) for s in sizes],
                                  [rng.uniform(0, 4, (s, 3)) for s in sizes], [rng.normal(size=(s, 3)) for s in sizes],
                                  rng.normal(size=n), range(n))


def test_batches_have_schnetpack_keys_and_consistent_indices():
    P = import_schnetpack().properties
    frames = random_frames()
    dataset = data.FFDataset(frames, data.fit_reference_energies(frames))
    loader = data.ff_loader(dataset, batch_size=5, shuffle=True, seed=3, cutoff=2.5)
    seen, n_pairs = [], 0
    for batch in loader:
        mols = batch[P.idx].numpy()
        seen += list(mols)
        n_atoms = batch[P.n_atoms]
        assert batch[P.R].dtype == batch["energy"].dtype == batch["forces"].dtype == torch.float32
        np.testing.assert_array_equal(batch[P.idx_m], np.repeat(np.arange(len(mols)), n_atoms))
        np.testing.assert_allclose(batch["energy"], dataset.energy[mols], rtol=1e-6)
        pairs = set()
        for m, k in enumerate(mols):  # brute force with ase, molecule by molecule
            atoms = dataset.atoms(k)
            i, j = neighbor_list("ij", atoms, 2.5)
            first = int(n_atoms[:m].sum())
            pairs |= set(zip((i + first).tolist(), (j + first).tolist()))
            np.testing.assert_allclose(batch[P.R][first:first + len(atoms)], atoms.positions, rtol=1e-6)
            np.testing.assert_allclose(batch["forces"][first:first + len(atoms)], atoms.get_forces(), rtol=1e-6)
            np.testing.assert_array_equal(batch[P.Z][first:first + len(atoms)], atoms.numbers)
        assert set(zip(batch[P.idx_i].tolist(), batch[P.idx_j].tolist())) == pairs
        assert len(batch[P.idx_i]) == len(pairs) and (batch[P.offsets] == 0).all()
        n_pairs += len(pairs)
    assert sorted(seen) == list(range(len(dataset))) and len(loader) == 5 and n_pairs > 0
    second = [b[P.idx].tolist() for b in loader]
    assert sum(second, []) != seen  # reshuffled each epoch...
    loader.set_epoch(0)
    assert sum([b[P.idx].tolist() for b in loader], []) == seen  # ...reproducibly


def test_batches_feed_a_schnetpack_model(md_dir):
    spk = import_schnetpack()
    P = spk.properties
    cutoff = 5.0
    model = spk.model.NeuralNetworkPotential(
        representation=spk.representation.SchNet(n_atom_basis=8, n_interactions=1,
                                                 radial_basis=spk.nn.GaussianRBF(10, cutoff),
                                                 cutoff_fn=spk.nn.CosineCutoff(cutoff)),
        input_modules=[spk.atomistic.PairwiseDistances()],
        output_modules=[spk.atomistic.Atomwise(n_in=8, output_key="energy"),
                        spk.atomistic.Forces(energy_key="energy", force_key="forces")])
    batch = next(iter(data.ff_loader(data.load(md_dir), batch_size=4, cutoff=cutoff)))
    out = model(dict(batch))
    assert out["energy"].shape == (4,) and out["forces"].shape == batch[P.R].shape


def test_sharded_batches_partition_an_epoch():
    P = import_schnetpack().properties
    frames = random_frames(n=21)
    dataset = data.FFDataset(frames, data.fit_reference_energies(frames))
    shards = [sum((b[P.idx].tolist() for b in data.ff_loader(dataset, 4, shuffle=True, rank=r, world_size=2)), [])
              for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 10 and not set(shards[0]) & set(shards[1])
    batch = next(iter(data.ff_loader(dataset, 4, dtype=torch.float64, device="cpu")))
    assert batch[P.R].dtype == batch["energy"].dtype == torch.float64 and batch[P.idx_i].dtype == torch.long


# ---------------------------------------------------------------- units the numbers contradict (item 9)

def write_in_unit(path, frames, unit, fmt="rmd17", **extra):
    """Real xTB ethanol frames (eV) written in `unit`: as rMD17, as sGDML (extra fields) or as a flat ANI-1x h5."""
    n = int(frames.n_atoms[0])
    per = 1 / EV_PER[unit]
    z, r = frames.numbers[:n], frames.positions.reshape(-1, n, 3)
    e, f = frames.energy * per, frames.forces.reshape(-1, n, 3) * per
    if fmt == "rmd17":
        return write_rmd17(path, z, r, e, f)
    if fmt == "sgdml":
        np.savez(path, z=z, R=r, E=e[:, None], F=f, **extra)
        return path
    with h5py.File(path, "w") as h5:  # a single molecule's datasets at the top level
        h5["atomic_numbers"], h5["coordinates"], h5["wb97x_dz.energy"], h5["wb97x_dz.forces"] = z, r, e, f
    return path


@contextlib.contextmanager
def no_unit_warning():
    """A context in which an FFUnitWarning fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FFUnitWarning)
        yield


def test_hartree_or_ev_read_as_kcal_per_mol_is_refused_naming_the_likely_unit(md_dir, tmp_path):
    xtb = data.load(md_dir, "train").frames
    hartree = write_in_unit(tmp_path / "ethanol_hartree.npz", xtb, "Hartree")
    with pytest.raises(FFDataError, match=r"ethanol_hartree.npz: the numbers do not look like kcal/mol .*"
                                          r"force RMS 0.00\d+ eV/Å.*most likely in Hartree: pass energy_unit='Hartree'"):
        read(hartree)
    ev = write_in_unit(tmp_path / "ethanol_ev.npz", xtb, "eV")
    with pytest.raises(FFDataError, match="ethanol_ev.npz: .*most likely in eV: pass energy_unit='eV'"):
        read(ev)
    with pytest.raises(FFDataError, match="most likely in Hartree"):  # through a recipe, nothing is cached
        data.load(str(hartree))
    assert not list(data.CACHE_DIR.glob("file-*"))
    with no_unit_warning():  # the way out: say the unit; the right unit reads the same numbers back
        np.testing.assert_allclose(read(hartree, energy_unit="Hartree").forces, xtb.forces, rtol=1e-9)
        loaded = [data.load(str(ev), split, energy_unit="eV").total_energy for split in ("train", "val", "test")]
        np.testing.assert_allclose(np.sort(np.concatenate(loaded)), np.sort(xtb.energy), rtol=1e-9)
        kcal = read(write_in_unit(tmp_path / "ethanol_kcal.npz", xtb, "kcal/mol"))  # the right unit: silent
    np.testing.assert_allclose(kcal.energy, xtb.energy, rtol=1e-9)
    with pytest.warns(FFUnitWarning, match="most likely in Hartree"):  # insisting reads it, with a warning
        read(hartree, energy_unit="kcal/mol")


def test_declared_units_the_numbers_contradict_warn_and_ani1x_in_kcal_is_refused(md_dir, tmp_path):
    xtb = data.load(md_dir, "train").frames
    declared = write_in_unit(tmp_path / "sgdml.npz", xtb, "Hartree", fmt="sgdml", e_unit="kcal/mol")
    with pytest.warns(FFUnitWarning, match="sgdml.npz: the numbers do not look like kcal/mol \\(the unit the file "
                                           "declares\\).*most likely in Hartree: correct the file's declared unit"):
        read(declared)
    ani = write_in_unit(tmp_path / "ani_kcal.h5", xtb, "kcal/mol", fmt="h5")
    with pytest.raises(FFDataError, match="ani_kcal.h5: the numbers do not look like Hartree.*most likely in kcal/mol"):
        read(ani)


def test_a_cold_trajectory_is_a_close_call_read_with_a_warning(md_dir, tmp_path):
    xtb = data.load(md_dir, "train").frames
    cold = xtb.take(range(len(xtb)))  # forces and energy fluctuations 5x smaller, as at a much lower temperature
    cold.forces *= 0.2
    cold.energy = cold.energy.mean() + 0.2 * (cold.energy - cold.energy.mean())
    path = write_in_unit(tmp_path / "cold.npz", cold, "kcal/mol")
    with pytest.warns(FFUnitWarning, match="cold.npz: the numbers do not look like kcal/mol .*may be in eV, but the evidence is weak"):
        frames = read(path)
    np.testing.assert_allclose(frames.forces, cold.forces, rtol=1e-9)


# ---------------------------------------------------------------- ANI-1x .h5 layouts (item 10)

def test_h5_with_datasets_at_its_top_level(md_dir, tmp_path):
    xtb = data.load(md_dir, "train").frames
    flat = write_in_unit(tmp_path / "flat.h5", xtb, "Hartree", fmt="h5")  # one molecule, no group: read
    frames = read(flat)
    np.testing.assert_allclose(frames.forces, xtb.forces, rtol=1e-9)
    assert len(frames) == len(xtb) and set(frames.group) == {0}
    z, r, e, f = ethanol_arrays()
    mixed = write_ani1x(tmp_path / "mixed.h5", {"C2H6O": (z, r, e / 627.5, f / 627.5)})
    with h5py.File(mixed, "a") as h5:
        h5["energies"] = e  # a stray dataset beside the formula groups: AttributeError before
    with pytest.raises(FFDataError, match=r"mixed.h5: dataset\(s\) \['energies'\] at the top level, but an ANI-1x "
                                          r"file holds one group per formula"):
        read(mixed)
    h5py.File(tmp_path / "empty.h5", "w").close()
    with pytest.raises(FFDataError, match="empty.h5: no structures"):
        read(tmp_path / "empty.h5")


# ---------------------------------------------------------------- CLI errors (item 8)

@pytest.mark.parametrize("case, expected", [
    ("missing", r"missing.npz: no such file"),
    ("bare name", r"ethanol: no such file \(nor a recipe: 'md:<name or SMILES>'"),
    ("directory", r"is a directory but not a complete chemscale dataset folder: no readable manifest.json"),
    ("not key=value", r"recipe field 'n_train' must be key=value"),
    ("unknown field", r"unknown key.*n_frames"),
    ("unknown unit", r"unknown unit 'furlong'"),
    ("wrong unit", r"hartree.npz: the numbers do not look like kcal/mol.*--energy-unit Hartree"),
])
def test_cli_user_errors_are_one_line_and_exit_2(md_dir, tmp_path, capsys, case, expected):
    hartree = write_in_unit(tmp_path / "hartree.npz", data.load(md_dir, "train").frames, "Hartree")
    argv = {"missing": [str(tmp_path / "missing.npz")], "bare name": ["ethanol"], "directory": [str(tmp_path)],
            "not key=value": ["md:ethanol", "n_train"], "unknown field": ["md:ethanol", "n_frames=3"],
            "unknown unit": [str(hartree), "--energy-unit", "furlong"], "wrong unit": [str(hartree)]}[case]
    assert data.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1, err
    assert __import__("re").search(expected, err), err


def test_cli_as_a_module_exits_2_without_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "chemscale.ff.data", str(tmp_path / "nothing.npz")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr == f"error: {tmp_path / 'nothing.npz'}: no such file (nor a recipe: 'md:<name or SMILES>', " \
                            f"'conformers:moses', 'conformers:<SMILES file>')\n"


def test_recipes_name_missing_files_and_directories(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        data.as_recipe({"kind": "file", "path": str(tmp_path / "gone.npz")})
    with pytest.raises(ConfigError, match="is a directory, not a data file"):
        data.as_recipe({"kind": "file", "path": str(tmp_path)})
    with pytest.raises(ConfigError, match="no such file"):
        data.as_recipe(f"conformers:{tmp_path / 'gone.smi'}")
    with pytest.raises(FFDataError, match="is a directory, not a data file"):
        read(tmp_path)


# ---------------------------------------------------------------- cache key includes the code (item 28)

def test_cache_dir_changes_with_the_generating_code_and_versions(tmp_path, monkeypatch):
    build = fake_build()
    monkeypatch.setattr(data, "build", build)
    recipe = generate.MDRecipe(**TINY_MD)
    before = data.generate(recipe, progress=False)
    changed = tmp_path / "generate.py"  # the same module with one more line: a fix or a regression
    changed.write_text(open(generate.__file__).read() + "\nFRICTION_FIX = True\n")
    with monkeypatch.context() as mp:
        mp.setattr(generate, "__file__", str(changed))
        after = data.generate(recipe, progress=False)
        assert after != before and len(build.calls) == 2  # rebuilt, not served from the warm cache
        assert json.loads((after / "meta.json").read_text())["code"] == data.code_digest("md")
    with monkeypatch.context() as mp:
        mp.setattr(data, "_versions", lambda: {"tblite": "0.0.1"})
        assert data.dataset_dir(recipe) not in (before, after)
    assert data.dataset_dir(recipe) == before and data.generate(recipe) == before and len(build.calls) == 2


# ---------------------------------------------------------------- hostile review of the data side (issue 8, items 8-10)

def xtb_frames(md_dir, n=None):
    """The tiny xTB ethanol training frames (eV, Å), the first `n` of them."""
    frames = data.load(md_dir, "train").frames
    return frames if n is None else frames.take(range(n))


def test_too_few_molecules_or_frames_for_three_splits_is_refused(md_dir, tmp_path):
    xtb = xtb_frames(md_dir)
    one = write_in_unit(tmp_path / "one.npz", xtb.take([0]), "kcal/mol")
    with pytest.raises(FFDataError, match=r"one.npz: 1 structure\(s\): too few for train/val/test splits"):
        data.generate(str(one))
    water = molecule("H2O")
    path = write_ani1x(tmp_path / "two.h5", {  # two formulas, 20 structures: whole molecules go to one split
        "C2H6O": (xtb.numbers[:9], xtb.positions.reshape(-1, 9, 3), xtb.energy / 27.211386,
                  xtb.forces.reshape(-1, 9, 3) / 27.211386),
        "H2O": (water.numbers, water.positions[None].repeat(3, 0), np.array([-5.07, -5.06, -5.08]),
                np.full((3, 3, 3), 0.02))})
    with pytest.raises(FFDataError, match=r"two.h5: 23 structures of 2 molecules .*too few for train/val/test"):
        data.generate(str(path))


def test_unit_warnings_are_recorded_and_shown_on_every_load(md_dir, tmp_path):
    hartree = write_in_unit(tmp_path / "hartree.npz", xtb_frames(md_dir), "Hartree")
    with pytest.warns(FFUnitWarning, match="hartree.npz: the numbers do not look like kcal/mol"):
        folder = data.generate(data.as_recipe(str(hartree), energy_unit="kcal/mol"))
    recorded = json.loads((folder / "meta.json").read_text())["warnings"]
    assert recorded[0]["category"] == "FFUnitWarning" and "do not look like kcal/mol" in recorded[0]["message"]
    for source in (str(hartree), folder):  # the cached dataset, by its file and by its folder
        with pytest.warns(FFUnitWarning, match="hartree.npz: the numbers do not look like kcal/mol"):
            data.load(source, "train", energy_unit="kcal/mol" if source != folder else None)


def test_nonfinite_numbers_never_reach_the_cache(md_dir, tmp_path, monkeypatch):
    def nan_build(recipe, progress=True):
        splits = fake_build()(recipe)
        splits["train"].positions[0, 0] = np.nan
        return splits

    monkeypatch.setattr(data, "build", nan_build)
    with pytest.raises(FFDataError, match=r"md:ethanol \[train\]: positions of frame 0 is NaN or infinite"):
        data.generate(generate.MDRecipe(**TINY_MD), progress=False)
    assert not list(data.CACHE_DIR.glob("md-*"))
    xtb = xtb_frames(md_dir)
    bad = xtb.take(range(len(xtb)))
    bad.positions[12, 1] = np.nan
    with pytest.raises(FFDataError, match=r"nan_coords.npz: coordinates of frame 1 is NaN"):
        read(write_in_unit(tmp_path / "nan_coords.npz", bad, "kcal/mol"))
    huge = xtb.take(range(len(xtb)))
    huge.energy[0] = 1e305
    with pytest.raises(FFDataError, match=r"huge.npz: energy of frame 0 is beyond 1e\+07 eV per atom"):
        read(write_in_unit(tmp_path / "huge.npz", huge, "eV"), energy_unit="eV")
    z, r, e, f = xtb.numbers[:9], xtb.positions.reshape(-1, 9, 3), xtb.energy / 27.211386, xtb.forces.reshape(-1, 9, 3)
    r = r.copy()
    r[2, 0, 0] = np.nan
    e = e.copy()
    e[5] = 1e307  # Hartree: overflows to inf in eV
    path = write_ani1x(tmp_path / "ani.h5", {"C2H6O": (z, r, e, f / 27.211386)})
    with pytest.raises(FFDataError, match=r"ani.h5: energy of frame \d+ is NaN or infinite \(in eV\)"):
        read(path)
    e[5] = e[4]
    frames = read(write_ani1x(tmp_path / "ani_nancoord.h5", {"C2H6O": (z, r, e, f / 27.211386)}))
    assert frames.dropped == Counter(nan_coordinates=1) and len(frames) == len(e) - 1


@pytest.mark.parametrize("numbers, expected", [
    ([0, 6, 8], r"atomic number 0 \(atom 0\) is not an element"),
    ([6.4, 6, 8], r"atomic numbers must be whole numbers, got 6.4"),
    ([-1, 6, 8], r"atomic number -1 \(atom 0\) is not an element"),
    ([200, 6, 8], r"atomic number 200 \(atom 0\) is not an element"),
])
def test_atomic_numbers_must_be_elements(tmp_path, numbers, expected):
    z, r, e, f = ethanol_arrays(n=5)
    z = np.array(numbers + list(z[3:]), dtype=float if 6.4 in numbers else np.int64)
    with pytest.raises(FFDataError, match="z.npz: " + expected):
        read(write_rmd17(tmp_path / "z.npz", z, r, e, f))


def test_odd_files_are_one_clear_error(md_dir, tmp_path):
    z, r, e, f = ethanol_arrays(n=5)
    with pytest.raises(FFDataError, match=r"zero.npz: no structures \(0 frames\)"):
        read(write_rmd17(tmp_path / "zero.npz", z, r[:0], e[:0], f[:0]))
    np.save(tmp_path / "arr.npy", r)
    (tmp_path / "arr.npy").rename(tmp_path / "arr.npz")
    with pytest.raises(FFDataError, match=r"arr.npz: a single .npy array, not an .npz archive"):
        read(tmp_path / "arr.npz")
    np.savez(tmp_path / "pickled.npz", nuclear_charges=z, coords=r, energies=np.array([{}] * 5, dtype=object), forces=f)
    with pytest.raises(FFDataError, match=r"pickled.npz: not a readable .npz file \(holds Python objects"):
        read(tmp_path / "pickled.npz")
    compound = np.zeros(5, dtype=[("a", "f8"), ("b", "f8")])
    path = write_ani1x(tmp_path / "compound.h5", {"C2H6O": (z, r, compound, f / 627.5)})
    with pytest.raises(FFDataError, match=r"compound.h5 \[group 'C2H6O'\]: energies of type .* are not real numbers"):
        read(path)
    with pytest.raises(ConfigError, match="key 'seed' must be an integer >= 0, got -1"):
        data.as_recipe(str(path), seed=-1)
    with pytest.raises(ConfigError, match="key 'seed' must be an integer >= 0, got -1"):
        data.as_recipe("md:ethanol", seed=-1)


def test_frames_must_agree_on_a_declared_unit(tmp_path):
    path = write_extxyz(tmp_path / "h2.xyz", [-31.0, -31.1, -31.05, -30.9], 1.0)
    text = path.read_text().splitlines()
    header = next(k for k, line in enumerate(text) if "energy=" in line and k > 3)  # a later frame's comment line
    text[header] += " energy_unit=Hartree"
    path.write_text("\n".join(text) + "\n")
    with pytest.raises(FFDataError, match=r"h2.xyz: 1 frame\(s\) declare energy_unit=Hartree but 3 .*declare none"):
        read(path)


def test_robust_spread_and_constant_energies(md_dir, tmp_path):
    xtb = xtb_frames(md_dir)
    outlier = xtb.take(range(len(xtb)))
    outlier.energy[3] = 0.0  # one broken frame must not decide the unit
    with no_unit_warning():
        read(write_in_unit(tmp_path / "one_zero.npz", outlier, "kcal/mol"))
    flat = xtb.take(range(len(xtb)))
    flat.energy[:] = -4200.0
    with pytest.raises(FFDataError, match=r"const.npz: the energies do not vary"):
        read(write_in_unit(tmp_path / "const.npz", flat, "kcal/mol"))


def test_energies_and_forces_in_different_units_are_named(md_dir, tmp_path):
    xtb = xtb_frames(md_dir)
    n = int(xtb.n_atoms[0])
    z, r = xtb.numbers[:n], xtb.positions.reshape(-1, n, 3)
    kcal, f = EV_PER["kcal/mol"], xtb.forces.reshape(-1, n, 3)
    path = write_rmd17(tmp_path / "e_ev_f_kcal.npz", z, r, xtb.energy, f / kcal)
    with pytest.warns(FFUnitWarning, match=r"e_ev_f_kcal.npz: energies and forces do not look like the same unit.*"
                                           r"fits best in eV.*in kcal/mol/Å"):
        read(path)
    path = write_rmd17(tmp_path / "e_ha_f_kcal.npz", z, r, xtb.energy / EV_PER["Hartree"], f / kcal)
    with pytest.raises(FFDataError, match=r"e_ha_f_kcal.npz: energies and forces do not look like the same unit"):
        read(path)


@pytest.mark.parametrize("unit, ratio", [("Bohr", "1.8"), ("nm", "0.09")])
def test_coordinates_not_in_angstrom_are_refused(md_dir, tmp_path, unit, ratio):
    xtb = xtb_frames(md_dir)
    scaled = xtb.take(range(len(xtb)))
    scaled.positions /= {"Bohr": 0.529177, "nm": 10.0}[unit]
    with pytest.raises(FFDataError, match=rf"coords.npz: the coordinates do not look like Å.* {ratio}\d* times their "
                                          rf"bond length"):
        read(write_in_unit(tmp_path / "coords.npz", scaled, "kcal/mol"))


@pytest.mark.parametrize("molecule_text, expected", [
    ("[Na+]", "is a single atom"), ("C.C", "has 2 disconnected fragments"), ("C*", r"atomic number\(s\) \[0\]"),
    ("[U]", r"atomic number\(s\) \[92\]: GFN2-xTB covers elements 1-86"),
])
def test_md_molecules_xtb_cannot_run_are_refused_up_front(molecule_text, expected):
    with pytest.raises(ConfigError, match=expected):
        data.as_recipe(f"md:{molecule_text}")


def test_xtb_failure_is_one_error(capsys):
    argv = ["md:ethanol", "n_train=1", "n_val=0", "n_test=0", "equilibration_steps=0", "timestep_fs=1e9"]
    assert data.main(argv) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert err.startswith("error: md:ethanol [train]: xTB failed after 0 of 1 frames (CalculationFailed"), err


@pytest.mark.parametrize("argv, expected", [
    (["--energy-unit", "Bohr"], r"^error: \S*hartree.npz: key 'energy_unit' = 'Bohr': 'Bohr' is not an energy unit"),
    (["--energy-unit", ""], r"key 'energy_unit' = '': unknown unit ''"),
    (["energy_unit=Hartree", "--energy-unit", "eV"], r"energy_unit='Hartree' and --energy-unit 'eV' disagree"),
])
def test_cli_unit_options_are_checked(md_dir, tmp_path, capsys, argv, expected):
    hartree = write_in_unit(tmp_path / "hartree.npz", xtb_frames(md_dir), "Hartree")
    assert data.main([str(hartree), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and __import__("re").search(expected, err), err


def test_a_recipe_name_and_a_field_that_contradict_it_are_refused():
    with pytest.raises(ConfigError, match="md:ethanol: names molecule 'ethanol', but molecule='benzene'"):
        data.as_recipe("md:ethanol", molecule="benzene")


def test_ambiguous_npz_aliased_h5_groups_and_periodic_cells_are_named(md_dir, tmp_path):
    z, r, e, f = ethanol_arrays(n=5)
    np.savez(tmp_path / "both.npz", nuclear_charges=z, coords=r, energies=e, forces=f, z=z, R=r, E=e, F=f)
    with pytest.warns(UserWarning, match=r"both.npz: has both rMD17 keys .* read as rMD17"):
        read(tmp_path / "both.npz")
    path = write_ani1x(tmp_path / "alias.h5", {"C2H6O": (z, r, e / 627.5, f / 627.5)})
    with h5py.File(path, "a") as h5:
        h5["hard"] = h5["C2H6O"]
        h5["soft"] = h5py.SoftLink("/C2H6O")
    with pytest.warns(UserWarning, match=r"alias.h5: group 'hard' is a link to 'C2H6O'"):
        frames = read(path)
    assert len(frames) == 5 and not frames.dropped  # read once; no zero counts either
    periodic = write_extxyz(tmp_path / "periodic.xyz", [-31.0, -31.1, -31.05, -30.9], 1.0)
    periodic.write_text(periodic.read_text().replace('pbc="F F F"', 'Lattice="9 0 0 0 9 0 0 0 9" pbc="T T T"'))
    with pytest.warns(UserWarning, match=r"periodic.xyz: 4 frame\(s\) .*periodic cell; it is ignored"):
        read(periodic)


def test_file_cache_is_keyed_by_content_and_generated_data_by_generating_code(md_dir, tmp_path, monkeypatch):
    import os
    import shutil

    xtb = xtb_frames(md_dir)
    kcal = write_in_unit(tmp_path / "kcal.npz", xtb, "kcal/mol")
    first = data.dataset_dir(data.as_recipe(str(kcal)))
    stat = kcal.stat()
    shutil.copy(write_in_unit(tmp_path / "other.npz", xtb.take(range(10)), "kcal/mol"), kcal)
    os.utime(kcal, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the old date: only the content tells
    assert data.dataset_dir(data.as_recipe(str(kcal))) != first
    md = generate.MDRecipe(**TINY_MD)
    before = data.dataset_dir(md)
    changed = tmp_path / "readers.py"  # an edited reader's message: generated datasets are not rebuilt
    changed.write_text(open(data.readers.__file__).read() + "\n# a reworded message\n")
    monkeypatch.setattr(data.readers, "__file__", str(changed))
    assert data.dataset_dir(md) == before and data.dataset_dir(data.as_recipe(str(kcal))) != first


def test_a_dataset_folder_is_checksummed_once_per_process(md_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(store, "sha256", lambda path: calls.append(path) or store.hashlib.sha256(
        path.read_bytes()).hexdigest())
    monkeypatch.setattr(store, "_VERIFIED", {})
    for split in ("train", "val", "test", "train"):
        data.load(md_dir, split)
    assert len(calls) == len(store.FILES)  # every file once, not once per load


def test_forces_decide_how_sure_the_unit_check_is(md_dir, tmp_path):
    """kcal/mol read as eV: forces 23x too large, the energy spread still plausible: refused (forces decide)."""
    xtb = xtb_frames(md_dir)
    with pytest.raises(FFDataError, match=r"kcal.xyz: the numbers do not look like eV .*most likely in kcal/mol"):
        _read_assumed_ev(tmp_path, xtb)


def _read_assumed_ev(tmp_path, frames):
    """`frames` written in kcal/mol to an extxyz without a declared unit (so eV is assumed), then read."""
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    per, images = 1 / EV_PER["kcal/mol"], []
    for k in range(len(frames)):
        a = slice(frames.atom_start[k], frames.atom_start[k] + frames.n_atoms[k])
        atoms = Atoms(frames.numbers[a], frames.positions[a])
        atoms.calc = SinglePointCalculator(atoms, energy=frames.energy[k] * per, forces=frames.forces[a] * per)
        images.append(atoms)
    ase.io.write(tmp_path / "kcal.xyz", images, format="extxyz")
    return read(tmp_path / "kcal.xyz")
