"""Training batches of an `FFDataset`: contiguous tensors once, neighbour pairs per batch in torch.

Stock schnetpack reads each structure from its ASE db, runs a neighbour-list transform per
structure and collates dicts; for SchNet on ethanol that data path, not the model, set the
pace. Here the whole split is converted to tensors once (on the training device if given), a
batch gathers its atoms by index, and its neighbour pairs are all ordered pairs of atoms of
the same molecule closer than the cutoff: a block-diagonal all-pairs search in a few
vectorised ops (molecules are small and have no periodic cell, so `offsets` are zeros).

Batches are dicts with schnetpack's keys (`schnetpack.properties`: Z, R, idx_m, n_atoms,
idx_i, idx_j, offsets, idx) plus `energy` (per molecule, reference-subtracted, eV) and
`forces` (eV/Å), so schnetpack models and `chemscale.ff.models` consume them directly.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from chemscale.ff import import_schnetpack

P = import_schnetpack().properties


class FFBatches:
    """Re-iterable mini-batches of an `FFDataset`; each pass is one epoch (reshuffled if `shuffle`).

    Args:
        dataset: an `FFDataset` (or anything with numbers, positions, forces, energy, n_atoms).
        batch_size: molecules per batch.
        shuffle: a new permutation each epoch, from (`seed`, epoch): reproducible.
        cutoff: neighbour cutoff in Å; must equal the model's.
        drop_last: drop a final smaller batch.
        device, dtype: where and in which float type the tensors live (indices are int64).
        rank, world_size: this process's share of each epoch under DDP (equal shares; the
            remainder of the permutation is left out, as DistributedSampler(drop_last=True)).
    """

    def __init__(self, dataset, batch_size: int = 32, shuffle: bool = False, seed: int = 0, cutoff: float = 5.0,
                 drop_last: bool = False, device=None, dtype: torch.dtype = torch.float32, rank: int = 0,
                 world_size: int = 1):
        if batch_size < 1 or cutoff <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1, cutoff > 0, 0 <= rank < world_size; got {batch_size}, "
                             f"{cutoff}, {rank}, {world_size}")
        self.batch_size, self.shuffle, self.seed, self.cutoff = batch_size, shuffle, seed, float(cutoff)
        self.drop_last, self.rank, self.world_size, self.epoch = drop_last, rank, world_size, 0
        as_tensor = lambda x, dt: torch.as_tensor(np.asarray(x), dtype=dt, device=device)  # noqa: E731
        self.Z = as_tensor(dataset.numbers, torch.long)  # (n_atoms_total,)
        self.R = as_tensor(dataset.positions, dtype)  # (n_atoms_total, 3) Å
        self.F = as_tensor(dataset.forces, dtype)  # (n_atoms_total, 3) eV/Å
        self.E = as_tensor(dataset.energy, dtype)  # (n_structures,) eV, reference-subtracted
        self.n_atoms = as_tensor(dataset.n_atoms, torch.long)  # (n_structures,)
        self.start = torch.cumsum(self.n_atoms, 0) - self.n_atoms  # first atom of each structure
        self.n_structures = len(dataset.n_atoms) // world_size  # this rank's share of an epoch

    def __len__(self) -> int:
        n = self.n_structures
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass epoch `epoch` (as after a restart from a checkpoint)."""
        self.epoch = epoch

    def __iter__(self):
        order = self._order(self.epoch)
        self.epoch += 1
        for b in range(len(self)):
            yield self.batch(order[b * self.batch_size:(b + 1) * self.batch_size])

    def _order(self, epoch: int) -> torch.Tensor:
        """This rank's structure indices for `epoch`."""
        n_total = self.n_structures * self.world_size
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.n_atoms))[:n_total]
        else:
            order = np.arange(n_total)
        return torch.as_tensor(order[self.rank::self.world_size], device=self.R.device)

    def batch(self, molecules: torch.Tensor) -> dict[str, torch.Tensor]:
        """The batch of structures `molecules` (dataset indices)."""
        n_atoms = self.n_atoms[molecules]  # (B,)
        idx_m = torch.repeat_interleave(torch.arange(len(molecules), device=n_atoms.device), n_atoms)  # (A,)
        first = torch.cumsum(n_atoms, 0) - n_atoms  # first atom of each molecule in the batch
        atoms = self.start[molecules][idx_m] + torch.arange(len(idx_m), device=n_atoms.device) - first[idx_m]
        R = self.R[atoms]
        idx_i, idx_j = neighbor_pairs(R, n_atoms, self.cutoff)
        return {P.idx: molecules, P.Z: self.Z[atoms], P.R: R, P.idx_m: idx_m, P.n_atoms: n_atoms,
                P.idx_i: idx_i, P.idx_j: idx_j, P.offsets: R.new_zeros((len(idx_i), 3)),
                P.energy: self.E[molecules], P.forces: self.F[atoms]}


def ff_loader(dataset, batch_size: int = 32, shuffle: bool = False, seed: int = 0, cutoff: float = 5.0,
              **kwargs) -> FFBatches:
    """Training batches of `dataset` (see `FFBatches` for the other arguments)."""
    return FFBatches(dataset, batch_size, shuffle, seed, cutoff, **kwargs)


def neighbor_pairs(R: torch.Tensor, n_atoms: torch.Tensor, cutoff: float) -> tuple[torch.Tensor, torch.Tensor]:
    """All ordered pairs (i, j), i != j, of atoms of the same molecule with |R_j - R_i| < cutoff.

    `R` holds the molecules' atoms end to end, `n_atoms` their sizes; pairs are sorted by i, then j.
    """
    device = R.device
    first = torch.cumsum(n_atoms, 0) - n_atoms
    n_pairs = n_atoms * n_atoms  # candidates: every (a, b) within each molecule
    pair_m = torch.repeat_interleave(torch.arange(len(n_atoms), device=device), n_pairs)
    k = torch.arange(len(pair_m), device=device) - (torch.cumsum(n_pairs, 0) - n_pairs)[pair_m]
    size = n_atoms[pair_m]
    idx_i, idx_j = first[pair_m] + k // size, first[pair_m] + k % size
    keep = (idx_i != idx_j) & ((R[idx_j] - R[idx_i]).square().sum(-1) < cutoff * cutoff)
    return idx_i[keep], idx_j[keep]
