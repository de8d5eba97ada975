"""Physics tests of every registered force field (nequip-style mixins on tiny configs).

Every check in a `Test*` class runs for each model in `MODELS` through the `model_name` fixture.
Physics checks use float64 models (built with ``dtype=torch.float64``: nequip fixes Allegro's
dtype at build time, so ``.double()`` cannot convert it) and eval mode; batching and training
use the default float32. Molecules are random C/H/N/O clusters of 4-12 atoms, at least 0.9 Å
apart, batched with the neighbour list of the training batches (`chemscale.ff.loader`).
"""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from ase import Atoms

from chemscale.ff import models
from chemscale.ff.forcefield import P, ForceField
from chemscale.ff.loader import neighbor_pairs
from chemscale.ff.models import MODELS, build
from chemscale.ff.spookynet import electron_configuration

CUTOFF = 5.0
TINY = dict(width=12, depth=2, n_rbf=8, cutoff=CUTOFF)


# ---------------------------------------------------------------- molecules and batches

def random_molecule(rng: np.random.Generator, n_atoms: int | None = None, min_distance: float = 0.9) -> Atoms:
    """C/H/N/O atoms placed one by one in a box, rejecting any closer than `min_distance`."""
    n_atoms = n_atoms or int(rng.integers(4, 13))
    box = 1.3 * n_atoms ** (1 / 3) + 1.0
    positions = []
    while len(positions) < n_atoms:
        x = rng.uniform(0, box, 3)
        if all(np.linalg.norm(x - y) >= min_distance for y in positions):
            positions.append(x)
    return Atoms(numbers=rng.choice([1, 6, 7, 8], n_atoms), positions=positions)


def make_batch(molecules: list[Atoms], cutoff: float = CUTOFF, dtype=torch.float32,
               all_pairs: bool = False) -> dict[str, torch.Tensor]:
    """The data side's batch dict, with the training batches' neighbour list (`loader.neighbor_pairs`).

    `all_pairs` lists every ordered pair of atoms of a molecule however far apart, so only the
    model's own cutoff function can drop the distant ones.
    """
    R = torch.as_tensor(np.concatenate([a.positions for a in molecules]), dtype=dtype)
    n_atoms = torch.tensor([len(a) for a in molecules])
    idx_i, idx_j = neighbor_pairs(R, n_atoms, math.inf if all_pairs else cutoff)
    return {P.Z: torch.as_tensor(np.concatenate([a.numbers for a in molecules])), P.R: R,
            P.idx_m: torch.repeat_interleave(torch.arange(len(molecules)), n_atoms), P.n_atoms: n_atoms,
            P.idx_i: idx_i, P.idx_j: idx_j, P.offsets: torch.zeros(len(idx_i), 3, dtype=dtype)}


def predict(model, molecules: list[Atoms], all_pairs: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Energies (n_mol,) and forces (n_atoms, 3) as float64 numpy arrays."""
    out = model(make_batch(molecules, model.cutoff, model.dtype, all_pairs))
    return out[P.energy].detach().double().numpy(), out[P.forces].detach().double().numpy()


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def tiny_model(name: str, dtype=torch.float32, seed: int = 0, perturb: bool = True, **kw):
    """A tiny model in eval mode; `perturb` adds noise to every parameter.

    Some initialisations are deliberately degenerate (SpookyNet's local interaction starts at
    zero, as in its reference code, so energies start geometry-independent): the physics checks
    perturb the weights so that they test a generic network, not an initial one.
    """
    torch.manual_seed(seed)
    model = build(name, **{**TINY, **kw}, dtype=dtype).eval()
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.fixture(params=MODELS)
def model_name(request) -> str:
    return request.param


_float64_models = {}


@pytest.fixture
def model64(model_name):
    """A float64 model in eval mode, shared by the read-only physics tests."""
    if model_name not in _float64_models:
        _float64_models[model_name] = tiny_model(model_name, torch.float64)
    return _float64_models[model_name]


# ---------------------------------------------------------------- physics mixins

class TestSymmetry:
    def test_energy_invariant_forces_equivariant(self, model64):
        """E(X Qᵀ + t, permuted) = E(X); F(X Qᵀ + t) = F(X) Qᵀ, permuted along."""
        rng = np.random.default_rng(1)
        molecule = random_molecule(rng, 9)
        energy, forces = predict(model64, [molecule])
        assert np.abs(forces).max() > 1e-4  # not vacuous: the energy depends on geometry
        for _ in range(2):
            Q, t, perm = random_rotation(rng), rng.normal(size=3) * 3, rng.permutation(len(molecule))
            moved = Atoms(numbers=molecule.numbers[perm], positions=(molecule.positions @ Q.T + t)[perm])
            energy2, forces2 = predict(model64, [moved])
            np.testing.assert_allclose(energy2, energy, rtol=1e-10, atol=1e-10)
            np.testing.assert_allclose(forces2, (forces @ Q.T)[perm], rtol=1e-8, atol=1e-10)

    def test_forces_are_minus_energy_gradient(self, model64):
        """Central differences, h = 1e-4 Å, in float64: truncation error ~h² E''' ~ 1e-9, so atol 1e-6."""
        rng = np.random.default_rng(2)
        molecule = random_molecule(rng, 7)
        _, forces = predict(model64, [molecule])
        h, displaced = 1e-4, []
        for atom in range(len(molecule)):
            for axis in range(3):
                for sign in (1, -1):
                    copy = molecule.copy()
                    copy.positions[atom, axis] += sign * h
                    displaced.append(copy)
        energies, _ = predict(model64, displaced)  # one batch of 2·3N displaced copies
        numeric = -(energies[0::2] - energies[1::2]) / (2 * h)
        assert np.abs(numeric).max() > 1e-4
        np.testing.assert_allclose(forces.reshape(-1), numeric, rtol=1e-5, atol=1e-6)

    def test_cutoff_drops_what_is_beyond_it_and_only_that(self, model64):
        """Move atom B radially through the cutoff r_c of A, with the training neighbour list and with every pair.

        Just past r_c B changes nothing (its energy equals B far away, its force is zero), just
        inside it changes the energy, smoothly (no jump, and -dE/dr → 0 at r_c). Listing every
        pair gives the same numbers: the model's own cutoff drops distant pairs, and the
        training list misses none that the model would count.
        """
        rc = model64.cutoff
        radii = np.concatenate([np.arange(rc - 0.4, rc + 0.1, 0.01), [rc - 1e-4, rc + 1e-4, rc + 1e-3, 3 * rc]])
        other = [-1.1, 0.4, 0.0]  # an H bonded to A, never within r_c of B on this path
        path = [Atoms("CHO", positions=[[0, 0, 0], other, [r, 0, 0]]) for r in radii]
        energies, forces = predict(model64, path)
        energies_all, forces_all = predict(model64, path, all_pairs=True)
        np.testing.assert_allclose(energies_all, energies, rtol=0, atol=1e-12)
        np.testing.assert_allclose(forces_all, forces, rtol=0, atol=1e-12)
        f_b = forces.reshape(len(path), 3, 3)[:, 2, 0]  # x-force on B
        far = energies[-1]
        beyond = radii[:-1] > rc
        np.testing.assert_allclose(energies[:-1][beyond], far, rtol=0, atol=1e-12)
        assert np.abs(f_b[:-1][beyond]).max() < 1e-12
        inside = energies[np.isclose(radii, rc - 0.3)][0]  # SpookyNet's C∞ cutoff is ~1e-22 at r_c - 0.05
        assert abs(inside - far) > 1e-7
        e, f, (e_in, e_out), f_in = energies[:-4], f_b[:-4], energies[-4:-2], f_b[-4]
        assert np.abs(f).max() > 1e-4  # not vacuous: B interacts with A inside the cutoff
        # no jumps: every step changes E by at most (max slope) × step (mean value theorem, 50% slack)
        assert np.abs(np.diff(e)).max() <= 1.5 * np.abs(f).max() * 0.01 + 1e-12
        # continuous at r_c, and the pair force vanishes there (no kink)
        assert abs(e_in - e_out) <= 1e-4 * np.ptp(e) + 1e-12
        assert abs(f_in) <= 1e-2 * np.abs(f).max() + 1e-12

    def test_isolated_atom(self, model64):
        """C-H bonded, O beyond the cutoff of both: O feels exactly no force and adds its lone energy.

        With every pair listed, O's pairs are in the graph, so its zero force comes from the
        model's cutoff through autograd, not from the no-neighbour fallback (checked last).
        """
        molecule = Atoms("CHO", positions=[[0, 0, 0], [1.1, 0, 0], [CUTOFF + 1.5, 0.3, 0]])
        (e_ch,), _ = predict(model64, [molecule[:2]])
        (e_o,), f_o = predict(model64, [molecule[2:]])
        for all_pairs in (True, False):
            (energy,), forces = predict(model64, [molecule], all_pairs)
            assert np.abs(forces[:2]).max() > 1e-4  # not vacuous: C and H interact
            np.testing.assert_array_equal(forces[2], 0.0)
            assert energy == pytest.approx(e_ch + e_o, rel=1e-12, abs=1e-12)
        np.testing.assert_array_equal(f_o, 0.0)  # a lone atom: no pairs at all


class TestBatching:
    def test_batch_equals_single_molecules(self, model_name):
        model = tiny_model(model_name)
        molecules = [random_molecule(np.random.default_rng(s)) for s in (3, 4, 5)]
        energy, forces = predict(model, molecules)
        singles = [predict(model, [m]) for m in molecules]
        # float32: matmul blocking differs between batch shapes, so agreement is to rounding (~1e-6)
        np.testing.assert_allclose(energy, [e[0] for e, _ in singles], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(forces, np.concatenate([f for _, f in singles]), rtol=1e-4, atol=1e-5)


class TestContract:
    def test_outputs(self, model_name):
        model = tiny_model(model_name)
        batch = make_batch([random_molecule(np.random.default_rng(6), n) for n in (4, 6)])
        with torch.no_grad():  # validation loops: forces still come out
            out = model(batch)
        assert out[P.energy].shape == (2,) and out[P.forces].shape == (10, 3)
        assert out[P.energy].dtype == out[P.forces].dtype == torch.float32
        assert not batch[P.R].requires_grad  # the caller's positions are left alone
        assert 0 < model.n_params() < tiny_model(model_name, width=16).n_params()
        with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
            model(batch)

    def test_unknown_element(self, model_name):
        model = tiny_model(model_name, elements=[1, 6, 8])
        molecule = Atoms("CHN", positions=[[0, 0, 0], [1.1, 0, 0], [0, 1.4, 0]])
        with pytest.raises(ValueError, match=r"\['H', 'C', 'O'\].*\['N'\]"):
            model(make_batch([molecule]))

    def test_seeded_build_is_reproducible(self, model_name):
        a, b = tiny_model(model_name, seed=7), tiny_model(model_name, seed=7)
        for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), key

    def test_learns_beyond_the_per_element_shift(self, model_name):
        """80 Adam steps on 10 molecules (toy pair-potential labels) beat what needs no geometry.

        The per-element shift alone can at best reach the least-squares fit of the energies on
        element counts, with zero forces; the trained model must beat that fit's energy error by
        2x and the zero-force error by 1.4x, so it has learned how energy depends on geometry.
        """
        torch.set_num_threads(1)  # tiny tensors: a second thread only adds contention (conftest restores it)
        model = tiny_model(model_name, perturb=False).train()
        molecules = [random_molecule(np.random.default_rng(s)) for s in range(8, 18)]
        batch = make_batch(molecules)
        target = toy_labels(batch)
        counts = np.stack([[np.sum(m.numbers == z) for z in model.elements] for m in molecules]).astype(float)
        energy = target[P.energy].double().numpy()
        fit, *_ = np.linalg.lstsq(counts, energy, rcond=None)
        shift_only_energy_mse = np.mean((counts @ fit - energy) ** 2)
        zero_force_mse = target[P.forces].pow(2).mean().item()
        assert shift_only_energy_mse > 0.1  # not vacuous: counts do not explain the energies
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(81):
            out = model(batch)
            energy_mse = (out[P.energy] - target[P.energy]).pow(2).mean()
            force_mse = (out[P.forces] - target[P.forces]).pow(2).mean()
            optimizer.zero_grad()
            (energy_mse / shift_only_energy_mse + force_mse / zero_force_mse).backward()
            optimizer.step()
        assert energy_mse.item() < 0.5 * shift_only_energy_mse, (energy_mse.item(), shift_only_energy_mse)
        assert force_mse.item() < 0.7 * zero_force_mse, (force_mse.item(), zero_force_mse)


def toy_labels(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Energies and forces of a smooth pair potential, sum over pairs of exp(-r) (r - 1.5)²."""
    R = batch[P.R].detach().double().requires_grad_()
    r = (R[batch[P.idx_j]] - R[batch[P.idx_i]]).norm(dim=-1)
    pair = 0.5 * torch.exp(-r) * (r - 1.5) ** 2  # 0.5: each pair appears in both directions
    energy = torch.zeros(len(batch[P.n_atoms]), dtype=R.dtype).index_add(0, batch[P.idx_m][batch[P.idx_i]], pair)
    (grad,) = torch.autograd.grad(energy.sum(), R)
    return {P.energy: energy.float().detach(), P.forces: -grad.float()}


# ---------------------------------------------------------------- registry, factory and per-model details

@pytest.mark.parametrize("name", MODELS)
def test_every_registry_row_has_a_kind_and_a_builder_that_builds(name):
    """The row's kind is one of the three, its builder builds its model, and the docstring table lists it."""
    spec = models.REGISTRY[name]
    assert models.KINDS == ("invariant", "equivariant", "physics-informed")
    assert models.kind(name) == spec.kind in models.KINDS
    model = tiny_model(name, perturb=False)
    assert isinstance(model, ForceField) and model.name == name and model.n_params() > 0
    assert model.build_args["name"] == name and model.build_args["width"] == TINY["width"]
    assert f"| `{name}` |" in models.__doc__ and spec.width in models.__doc__ and spec.depth in models.__doc__
    assert MODELS == tuple(models.REGISTRY)


def test_unknown_model_bad_sizes_and_unknown_options():
    with pytest.raises(ValueError, match="unknown model"):
        build("mace", width=8, depth=1)
    with pytest.raises(ValueError, match="depth"):
        build("schnet", width=8, depth=0)
    with pytest.raises(ValueError, match="l_max"):
        build("painn", width=8, depth=1, l_max=2)
    with pytest.raises(ValueError, match=r"unknown model 'mace'; expected one of \('schnet', 'painn'"):
        models.kind("mace")


@pytest.mark.parametrize("bad", [dict(name="mace"), dict(width=0), dict(depth=0), dict(cutoff=0.0), dict(n_rbf=0),
                                 dict(cutoff=-1.0)])
def test_check_refuses_what_build_refuses(bad):
    """`check` (what FFModelConfig calls) and `build` refuse the same values with the same message."""
    args = {"name": "schnet", "width": 8, "depth": 1, "cutoff": 5.0, "n_rbf": 4, **bad}
    message = "unknown model 'mace'" if "name" in bad else r"need width, depth, n_rbf >= 1 and cutoff > 0; got width="
    with pytest.raises(ValueError, match=message):
        models.check(**args)
    with pytest.raises(ValueError, match=message):
        build(**args)
    models.check("schnet", width=8, depth=1, cutoff=5.0, n_rbf=4)  # good values pass


def test_rebuild_reads_build_args_old_and_new():
    """build_args name the model under "name"; cards of runs trained before (issue 9) under "model"."""
    model = tiny_model("painn", perturb=False)
    assert "model" not in model.build_args
    old = {"model" if k == "name" else k: v for k, v in model.build_args.items()}
    for args in (model.build_args, old):
        again = models.rebuild(args)
        assert type(again) is type(model) and again.build_args == model.build_args
        again.load_state_dict(model.state_dict())


def test_allegro_double_conversion_is_refused():
    model = tiny_model("allegro").double()
    with pytest.raises(ValueError, match="dtype"):
        model(make_batch([random_molecule(np.random.default_rng(0), 4)], dtype=torch.float64))


def test_spookynet_electron_configurations():
    #                              Z 1s 2s 2p 3s 3p 4s 3d 4p 5s 4d 5p 6s 4f 5d 6p vs vp vd vf
    assert electron_configuration(6) == [6, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 0, 0]
    assert electron_configuration(29) == [29, 2, 2, 6, 2, 6, 1, 10, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 10, 0]  # Cu 4s¹3d¹⁰
    assert electron_configuration(46)[9:11] == [0, 10] and electron_configuration(46)[16] == 0  # Pd 5s⁰4d¹⁰


def test_nequip_global_state_does_not_leak():
    """In a fresh process: building Allegro leaves torch's default dtype, RNG, PL_* env and sharing strategy."""
    code = """
import os, random, numpy as np, torch
from chemscale.ff.models import build
strategy = torch.multiprocessing.get_sharing_strategy()
g = torch.Generator().manual_seed(3)
torch.randint(0, 2**31 - 1, (), generator=g)  # build() draws nequip's seed from torch's RNG
expected = torch.rand(2, generator=g)
torch.manual_seed(3); np.random.seed(3); random.seed(3)
build("allegro", width=8, depth=1, n_rbf=4)  # the first build runs nequip's set_global_state()
assert torch.get_default_dtype() == torch.float32
assert torch.equal(torch.rand(2), expected)
assert np.random.rand() == np.random.RandomState(3).rand() and random.random() == random.Random(3).random()
assert "PL_GLOBAL_SEED" not in os.environ and torch.multiprocessing.get_sharing_strategy() == strategy
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PL_")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
