"""Energies+forces data generated with GFN2-xTB (tblite): nothing is downloaded.

Two recipes, each a validated `@dataclass`; `build(recipe)` returns train/val/test `Frames`:

- `MDRecipe` (rMD17-like): ASE Langevin MD of one molecule at 500 K, 0.5 fs steps, a frame every
  `stride` (>= 10) steps after equilibration. Each split is its own trajectory (own starting
  velocities and thermostat noise from the same MMFF-relaxed geometry), so no test frame is a
  close neighbour in time of a training frame.
- `ConformerRecipe` (ANI-1x-like): small CHNO molecules from the MOSES corpus (MOSES has no CHNO
  molecule of <= 12 heavy atoms, so larger ones are cut into BRICS fragments, capped with H),
  ETKDG conformers relaxed with MMFF, every coordinate perturbed by N(0, sigma_a), xTB labels.
  Splits hold different molecules; structures where xTB fails are dropped and counted.

Measured on the busy 2-core machine, tblite on one OpenMP thread (see `single_threaded_openmp`):
ethanol MD ~2 ms a step (~45 frames/s at stride 10), aspirin ~11 ms; conformers of MOSES
fragments (~12 atoms) ~100 structures/s.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from ase import Atoms, units

from chemscale.config import ConfigError, require
from chemscale.ff.frames import SPLITS, FFDataError, Frames

CHNO = frozenset({1, 6, 7, 8})
MAX_XTB_Z = 86  # GFN2-xTB has parameters for H to Rn

MOLECULES = {  # the rMD17 molecules by name; any other SMILES works too
    "aspirin": "CC(=O)Oc1ccccc1C(=O)O",
    "azobenzene": "c1ccc(cc1)/N=N/c1ccccc1",
    "benzene": "c1ccccc1",
    "ethanol": "CCO",
    "malonaldehyde": "O=C/C=C\\O",
    "naphthalene": "c1ccc2ccccc2c1",
    "paracetamol": "CC(=O)Nc1ccc(O)cc1",
    "salicylic_acid": "O=C(O)c1ccccc1O",
    "toluene": "Cc1ccccc1",
    "uracil": "O=c1cc[nH]c(=O)[nH]1",
}


@dataclass(frozen=True)
class MDRecipe:
    """rMD17-like: one molecule's xTB Langevin trajectories, one per split."""

    kind: ClassVar[str] = "md"
    molecule: str = "ethanol"  # a name in MOLECULES or a SMILES
    n_train: int = 1000  # frames in the training trajectory
    n_val: int = 200
    n_test: int = 1000
    temperature_k: float = 500.0
    timestep_fs: float = 0.5
    stride: int = 10  # MD steps between saved frames; closer frames are strongly correlated
    equilibration_steps: int = 1000  # steps run (and discarded) before the first frame
    friction_per_fs: float = 0.01  # Langevin friction: 100 fs velocity relaxation
    seed: int = 0

    def __post_init__(self):
        check_md_molecule(self.molecule)  # raises for a name that is neither known nor a SMILES xTB can run
        require(min(self.n_train, self.n_val, self.n_test) >= 0 and self.n_train > 0, "n_train/n_val/n_test",
                "must be >= 0, n_train > 0")
        require(self.stride >= 10, "stride", f"must be >= 10 (frames closer in time are correlated), got {self.stride}")
        require(self.temperature_k > 0 and self.timestep_fs > 0 and self.friction_per_fs > 0,
                "temperature_k/timestep_fs/friction_per_fs", "must be > 0")
        require(self.equilibration_steps >= 0, "equilibration_steps", "must be >= 0")
        require(isinstance(self.seed, int) and self.seed >= 0, "seed", f"must be an integer >= 0, got {self.seed!r}")

    def sizes(self) -> dict[str, int]:
        return {"train": self.n_train, "val": self.n_val, "test": self.n_test}

    def label(self) -> str:
        return f"md-{self.molecule if self.molecule in MOLECULES else 'smiles'}"


@dataclass(frozen=True)
class ConformerRecipe:
    """ANI-1x-like: perturbed conformers of small CHNO molecules, one molecule in one split only."""

    kind: ClassVar[str] = "conformers"
    source: str = "moses"  # 'moses' or a SMILES file (first column; header lines are skipped)
    n_train_molecules: int = 200
    n_val_molecules: int = 20
    n_test_molecules: int = 50
    conformers_per_molecule: int = 10
    sigma_a: float = 0.05  # std of the Gaussian displacement of every coordinate, Å
    max_heavy_atoms: int = 12
    max_scf_iterations: int = 250  # tblite's default; structures that do not converge are dropped
    seed: int = 0

    def __post_init__(self):
        if self.source != "moses":
            require(not Path(self.source).is_dir(), "source", f"is a directory, not a SMILES file: {self.source}")
            require(Path(self.source).is_file(), "source", f"must be 'moses' or a SMILES file; no such file: "
                                                           f"{self.source}")
        require(self.n_train_molecules > 0 and min(self.n_val_molecules, self.n_test_molecules) >= 0,
                "n_*_molecules", "must be >= 0, n_train_molecules > 0")
        require(self.conformers_per_molecule > 0, "conformers_per_molecule", "must be > 0")
        require(self.sigma_a >= 0, "sigma_a", "must be >= 0")
        require(self.max_heavy_atoms > 0 and self.max_scf_iterations > 0, "max_heavy_atoms/max_scf_iterations",
                "must be > 0")
        require(isinstance(self.seed, int) and self.seed >= 0, "seed", f"must be an integer >= 0, got {self.seed!r}")

    def sizes(self) -> dict[str, int]:
        return {"train": self.n_train_molecules, "val": self.n_val_molecules, "test": self.n_test_molecules}

    def label(self) -> str:
        return f"conformers-{'moses' if self.source == 'moses' else Path(self.source).stem}"


def build(recipe, progress: bool = True) -> dict[str, Frames]:
    """Generate the train/val/test Frames of `recipe`, with a progress bar."""
    with single_threaded_openmp():
        return _build(recipe, progress)


def _build(recipe, progress: bool) -> dict[str, Frames]:
    from tqdm.auto import tqdm

    if isinstance(recipe, MDRecipe):
        total = sum(recipe.equilibration_steps + n * recipe.stride for n in recipe.sizes().values() if n)
        with tqdm(total=total, unit="step", desc=f"xTB MD {recipe.molecule}", disable=not progress) as bar:
            return {split: md_trajectory(recipe, split, bar) for split in SPLITS}
    if isinstance(recipe, ConformerRecipe):
        total = sum(recipe.sizes().values()) * recipe.conformers_per_molecule
        with tqdm(total=total, unit="structure", desc="xTB conformers", disable=not progress) as bar:
            return conformer_splits(recipe, bar)
    raise TypeError(f"not a generation recipe: {recipe!r}")


@contextlib.contextmanager
def single_threaded_openmp():
    """Run tblite on one OpenMP thread, restoring the previous count afterwards.

    On molecules this small threads only add overhead, and on a busy 2-core machine spinning
    OpenMP threads made an ethanol MD step ~10x slower (54 ms against 5 ms). torch and tblite
    share one libgomp when torch is imported first, hence the restore.
    """
    import tblite.ase  # noqa: F401  (loads libgomp)

    try:
        gomp = ctypes.CDLL("libgomp.so.1")
    except OSError:  # another OpenMP runtime: leave it alone
        yield
        return
    before = gomp.omp_get_max_threads()
    gomp.omp_set_num_threads(1)
    try:
        yield
    finally:
        gomp.omp_set_num_threads(before)


def smiles(molecule: str) -> str:
    """SMILES of a molecule given by name (MOLECULES) or as SMILES."""
    from rdkit import Chem, rdBase

    text = MOLECULES.get(molecule, molecule)
    with rdBase.BlockLogs():
        ok = Chem.MolFromSmiles(text) is not None
    if not ok:
        raise ConfigError(f"key 'molecule' = {molecule!r} is neither a known name {sorted(MOLECULES)} nor a SMILES")
    return text


def check_md_molecule(molecule: str) -> None:
    """Refuse, before any xTB call, what MD of one molecule cannot run: single atoms, several fragments,
    dummy atoms (*) and elements GFN2-xTB has no parameters for."""
    from rdkit import Chem, rdBase

    with rdBase.BlockLogs():
        mol = Chem.MolFromSmiles(smiles(molecule))
        numbers = [a.GetAtomicNum() for a in Chem.AddHs(mol).GetAtoms()]
        fragments = len(Chem.GetMolFrags(mol))
    unsupported = sorted({z for z in numbers if not 1 <= z <= MAX_XTB_Z})
    if unsupported:
        raise ConfigError(f"key 'molecule' = {molecule!r} has atomic number(s) {unsupported}: GFN2-xTB covers "
                          f"elements 1-{MAX_XTB_Z} (a '*' is a dummy atom, 0)")
    if len(numbers) < 2:
        raise ConfigError(f"key 'molecule' = {molecule!r} is a single atom: it has no forces to learn")
    if fragments > 1:
        raise ConfigError(f"key 'molecule' = {molecule!r} has {fragments} disconnected fragments ('.'): MD of one "
                          f"molecule needs one")


def xtb_calculator(charge: int = 0, max_iterations: int = 250):
    """tblite's GFN2-xTB ASE calculator, silent."""
    from tblite.ase import TBLite

    return TBLite(method="GFN2-xTB", charge=charge, max_iterations=max_iterations, verbosity=0)


def embed(smiles_text: str, n_conformers: int, seed: int) -> list[Atoms]:
    """ETKDG conformers with hydrogens, relaxed with MMFF where MMFF has parameters."""
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles(smiles_text))
    params = AllChem.ETKDGv3()
    params.randomSeed = seed
    ids = list(AllChem.EmbedMultipleConfs(mol, n_conformers, params))
    if ids and AllChem.MMFFHasAllMoleculeParams(mol):
        AllChem.MMFFOptimizeMoleculeConfs(mol, maxIters=2000)
    numbers = [a.GetAtomicNum() for a in mol.GetAtoms()]
    return [Atoms(numbers, mol.GetConformer(i).GetPositions()) for i in ids]


def formal_charge(smiles_text: str) -> int:
    """Net formal charge of a molecule, which xTB needs."""
    from rdkit import Chem

    return Chem.GetFormalCharge(Chem.MolFromSmiles(smiles_text))


# --- MD (rMD17-like) -------------------------------------------------------------------------

def md_trajectory(recipe: MDRecipe, split: str, bar) -> Frames:
    """One split's trajectory: its own velocities and noise, from the shared relaxed start."""
    from ase.calculators.calculator import CalculationFailed, InputError
    from ase.constraints import FixCom
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import Stationary, ZeroRotation, thermalize_momenta

    n_frames = recipe.sizes()[split]
    text = smiles(recipe.molecule)
    atoms = embed(text, 1, recipe.seed)[0]
    if n_frames == 0:
        return Frames.from_trajectory(atoms.numbers, np.zeros((0, len(atoms), 3)), np.zeros((0, len(atoms), 3)), [])
    atoms.calc = xtb_calculator(formal_charge(text))
    rng = np.random.default_rng([recipe.seed, SPLITS.index(split)])  # distinct streams, whatever the seed
    thermalize_momenta(atoms, temperature_K=recipe.temperature_k, rng=rng)
    Stationary(atoms)
    ZeroRotation(atoms)
    atoms.set_constraint(FixCom())  # ASE's replacement for Langevin(fixcm=True); recorded forces are unconstrained
    dyn = Langevin(atoms, timestep=recipe.timestep_fs * units.fs, temperature_K=recipe.temperature_k,
                   friction=recipe.friction_per_fs / units.fs, fixcm=False, rng=rng)
    positions, forces, energies = [], [], []
    try:
        dyn.run(recipe.equilibration_steps)
        bar.update(recipe.equilibration_steps)
        for _ in range(n_frames):
            dyn.run(recipe.stride)  # forces at the new positions are computed by the step itself: no extra call
            positions.append(atoms.get_positions())
            forces.append(atoms.get_forces(apply_constraint=False))
            energies.append(atoms.get_potential_energy())
            bar.update(recipe.stride)
    except (CalculationFailed, InputError) as e:
        raise FFDataError(f"md:{recipe.molecule} [{split}]: xTB failed after {len(energies)} of {n_frames} frames "
                          f"({type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else e!r}); "
                          f"a temperature_k of {recipe.temperature_k:g} K or a timestep_fs of {recipe.timestep_fs:g} "
                          f"fs may tear the molecule apart") from None
    return Frames.from_trajectory(atoms.numbers, positions, forces, energies, group=SPLITS.index(split))


# --- conformers (ANI-1x-like) ------------------------------------------------------------------

def conformer_splits(recipe: ConformerRecipe, bar) -> dict[str, Frames]:
    """Label perturbed conformers; test molecules come first so they stay fixed as n_train grows."""
    molecules = small_molecules(recipe)
    sizes = recipe.sizes()
    first = {"test": 0, "val": sizes["test"], "train": sizes["test"] + sizes["val"]}
    splits = {}
    for split in SPLITS:
        dropped = Counter()
        parts = [_label_conformers(recipe, m, molecules[m], dropped, bar)
                 for m in range(first[split], first[split] + sizes[split])]
        splits[split] = Frames.concat(parts)
        splits[split].dropped = dropped
    return splits


def _label_conformers(recipe: ConformerRecipe, index: int, smiles_text: str, dropped: Counter, bar) -> Frames:
    """xTB energies and forces of one molecule's perturbed conformers; failures dropped and counted."""
    from ase.calculators.calculator import CalculationFailed

    seed = int(np.random.SeedSequence([recipe.seed, index]).generate_state(1)[0] >> 1)  # RDKit wants < 2**31
    conformers = embed(smiles_text, recipe.conformers_per_molecule, seed)
    dropped["embedding_failed"] += recipe.conformers_per_molecule - len(conformers)
    bar.update(recipe.conformers_per_molecule - len(conformers))
    rng = np.random.default_rng([recipe.seed, index])
    calc = xtb_calculator(formal_charge(smiles_text), recipe.max_scf_iterations)
    kept = []
    for atoms in conformers:
        atoms.positions += rng.normal(scale=recipe.sigma_a, size=atoms.positions.shape)
        atoms.calc = calc
        try:
            kept.append((atoms, atoms.get_potential_energy(), atoms.get_forces()))
        except CalculationFailed as e:
            dropped["xtb_not_converged" if "converge" in str(e) else "xtb_failed"] += 1
        bar.update(1)
    return Frames.from_structures([a.numbers for a, _, _ in kept], [a.positions for a, _, _ in kept],
                                  [f for _, _, f in kept], [e for _, e, _ in kept], [index] * len(kept))


def small_molecules(recipe: ConformerRecipe) -> list[str]:
    """Distinct CHNO molecules of <= max_heavy_atoms, in a seeded order: whole if they fit, else fragments."""
    from rdkit import Chem, rdBase

    corpus = _source_smiles(recipe.source)
    needed = sum(recipe.sizes().values())
    found: dict[str, None] = {}  # an ordered set
    with rdBase.BlockLogs():  # header lines and odd SMILES would each log an error
        for k in np.random.default_rng(recipe.seed).permutation(len(corpus)):
            mol = Chem.MolFromSmiles(corpus[k])
            for text in _fitting_parts(mol, recipe.max_heavy_atoms) if mol is not None else ():
                found.setdefault(text)
                if len(found) == needed:
                    return list(found)
    raise FFDataError(f"{recipe.source}: only {len(found)} distinct CHNO molecules of <= {recipe.max_heavy_atoms} "
                      f"heavy atoms (whole or as BRICS fragments); the recipe needs {needed}")


def _fitting_parts(mol, max_heavy_atoms: int) -> list[str]:
    """The molecule if it is small neutral closed-shell CHNO, else such BRICS fragments of it (H-capped)."""
    from rdkit import Chem
    from rdkit.Chem import BRICS

    parts = [mol] if mol.GetNumHeavyAtoms() <= max_heavy_atoms else [
        _cap(f) for f in BRICS.BRICSDecompose(mol, returnMols=True)]
    return [Chem.MolToSmiles(p) for p in parts if p is not None and _fits(p, max_heavy_atoms)]


def _cap(fragment):
    """Replace BRICS attachment points (dummy atoms) by hydrogens; None if that fails to sanitise."""
    from rdkit import Chem

    mol = Chem.RWMol(fragment)
    for atom in mol.GetAtoms():
        if atom.GetAtomicNum() == 0:
            atom.SetAtomicNum(1)
            atom.SetIsotope(0)
    try:
        return Chem.RemoveHs(mol.GetMol())
    except Exception:  # RDKit raises several sanitisation errors
        return None


def _fits(mol, max_heavy_atoms: int) -> bool:
    from rdkit import Chem

    atoms = Chem.AddHs(mol).GetAtoms()
    z = [a.GetAtomicNum() for a in atoms]
    return (mol.GetNumHeavyAtoms() <= max_heavy_atoms and set(z) <= CHNO and Chem.GetFormalCharge(mol) == 0
            and sum(z) % 2 == 0 and all(a.GetNumRadicalElectrons() == 0 for a in atoms))


def _source_smiles(source: str) -> list[str]:
    """SMILES strings of the MOSES training set or of a file (first comma/space separated column)."""
    import gzip

    from chemscale.lm.read import moses_path

    path = moses_path("train") if source == "moses" else Path(source)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return [line.replace(",", " ").split()[0] for line in f if line.strip()]
