"""What every force field shares: the batch it reads, the `Graph` its network reads, energy and forces.

A `ForceField` takes the batch dict the data side produces (schnetpack's keys, `P`) and returns
``{P.energy: (n_mol,), P.forces: (n_atoms, 3)}`` with forces = -dE/dR by autograd (``create_graph``
in training mode, so a force loss trains). The energy is a sum of per-atom energies plus a
learnable per-element shift (initialised to 0; the data side subtracts fitted reference energies
before training). Every network reads the same pair vectors r_ij = R[idx_j] - R[idx_i] + offsets,
built here once. The networks live in their own modules and `chemscale.ff.models` is the registry
that builds them.
"""

import contextlib
from typing import Iterator, NamedTuple, Sequence

import torch
from ase.data import chemical_symbols
from torch import nn

from chemscale.ff import import_schnetpack

P = import_schnetpack().properties  # batch and output keys: P.Z, P.R, P.idx_i, ..., P.energy, P.forces


class Graph(NamedTuple):
    """What every network reads: element indices (0..n_elements-1) and pair geometry."""

    element_index: torch.Tensor  # (n_atoms,) long
    r_ij: torch.Tensor  # (n_pairs, 3) R[idx_j] - R[idx_i] + offsets
    idx_i: torch.Tensor  # (n_pairs,) centre atom
    idx_j: torch.Tensor  # (n_pairs,) neighbour atom
    idx_m: torch.Tensor  # (n_atoms,) molecule of each atom
    n_atoms: torch.Tensor  # (n_mol,) atoms per molecule


class ForceField(nn.Module):
    """Energy as a sum of atomic energies, forces as its negative gradient.

    Subclasses implement `atomic_energies(graph)`. This class checks elements, builds pair
    vectors, adds the per-element shift, sums per molecule and differentiates.

    Args:
        name: model name, a key of `chemscale.ff.models.REGISTRY`.
        elements: atomic numbers the model accepts; others raise `ValueError`.
        cutoff: neighbour cutoff in Å (the data side's neighbour list must use the same).
        per_element_shift: learn a per-element energy shift (else a fixed zero).
    """

    def __init__(self, name: str, elements: Sequence[int], cutoff: float, per_element_shift: bool = True):
        super().__init__()
        self.name, self.elements, self.cutoff = name, list(elements), float(cutoff)
        index_of_z = torch.full((len(chemical_symbols),), -1, dtype=torch.long)
        index_of_z[torch.tensor(self.elements)] = torch.arange(len(self.elements))
        self.register_buffer("index_of_z", index_of_z, persistent=False)
        shift = torch.zeros(len(self.elements))
        if per_element_shift:
            self.element_shift = nn.Parameter(shift)
        else:
            self.register_buffer("element_shift", shift)

    @property
    def dtype(self) -> torch.dtype:
        return self.element_shift.dtype

    def n_params(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def atomic_energies(self, graph: Graph) -> torch.Tensor:
        """Per-atom energies (n_atoms,), before the per-element shift."""
        raise NotImplementedError

    def element_index(self, Z: torch.Tensor) -> torch.Tensor:
        """Map atomic numbers to 0..n_elements-1; `ValueError` for elements not built for."""
        index = self.index_of_z[Z.clamp(0, len(self.index_of_z) - 1)]
        if bool(((index < 0) | (Z >= len(self.index_of_z))).any()):
            unknown = sorted(set(Z.tolist()) - set(self.elements))
            raise ValueError(
                f"{self.name} was built for elements {_symbols(self.elements)}; "
                f"the batch has element(s) {_symbols(unknown)} (Z={unknown})"
            )
        return index

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if torch.is_inference_mode_enabled():
            raise RuntimeError("forces need autograd, which torch.inference_mode() disables; "
                               "use torch.no_grad() (Lightning: Trainer(inference_mode=False))")
        with torch.enable_grad():  # forces need autograd even under torch.no_grad() (validation loops)
            R = batch[P.R].to(self.dtype)
            if not R.requires_grad:
                R = R.detach().requires_grad_()  # a new leaf; the caller's tensor is left alone
            idx_i, idx_j = batch[P.idx_i].long(), batch[P.idx_j].long()
            r_ij = R[idx_j] - R[idx_i] + batch[P.offsets].to(R.dtype)
            graph = Graph(self.element_index(batch[P.Z]), r_ij, idx_i, idx_j, batch[P.idx_m].long(), batch[P.n_atoms])

            e_atoms = self.atomic_energies(graph).to(R.dtype) + self.element_shift[graph.element_index]
            energy = e_atoms.new_zeros(len(graph.n_atoms)).index_add(0, graph.idx_m, e_atoms)
            (dE_dR,) = torch.autograd.grad(energy.sum(), R, create_graph=self.training, allow_unused=True)
        forces = -dE_dR if dE_dR is not None else torch.zeros_like(R)  # None: no atom has a neighbour
        return {P.energy: energy, P.forces: forces}


class NetForceField(ForceField):
    """A `ForceField` around a network that maps a `Graph` to atomic energies (SpookyNet, Allegro).

    Args:
        name: model name, a key of `chemscale.ff.models.REGISTRY`.
        net: a module whose ``net(graph)`` gives per-atom energies (n_atoms,).
        elements, cutoff, per_element_shift: see `ForceField`.
    """

    def __init__(self, name: str, net: nn.Module, elements: Sequence[int], cutoff: float,
                 per_element_shift: bool = True):
        super().__init__(name, elements, cutoff, per_element_shift)
        self.net = net

    def atomic_energies(self, graph: Graph) -> torch.Tensor:
        return self.net(graph)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Create parameters in `dtype`, restoring the process default afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _symbols(zs: Sequence[int]) -> list[str]:
    return [chemical_symbols[z] if 0 <= z < len(chemical_symbols) else f"Z={z}" for z in zs]
