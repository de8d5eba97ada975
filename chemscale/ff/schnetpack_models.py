"""SchNet and PaiNN from schnetpack, each a `ForceField` with an `Atomwise` energy head.

References: Schütt et al., J. Chem. Phys. 148, 241722 (2018) (SchNet);
Schütt, Unke, Gastegger, ICML 2021 (PaiNN); Schütt et al., JCTC 19, 2023 (SchNetPack 2.0).
"""

from typing import Sequence

import torch
from torch import nn

from chemscale.ff import import_schnetpack
from chemscale.ff.forcefield import P, ForceField, Graph

spk = import_schnetpack()


class SchnetpackForceField(ForceField):
    """A `schnetpack.representation` with an `Atomwise` energy head.

    schnetpack's nuclear embedding is replaced by one row per built element: the representation
    is fed element indices under `P.Z`, so `n_params()` counts no embedding rows for unused elements.

    Args:
        name: "schnet" or "painn".
        representation: a `schnetpack.representation` module.
        width: its feature size (input of the `Atomwise` head).
        elements, cutoff, per_element_shift: see `ForceField`.
    """

    def __init__(self, name: str, representation: nn.Module, width: int, elements: Sequence[int], cutoff: float,
                 per_element_shift: bool = True):
        super().__init__(name, elements, cutoff, per_element_shift)
        self.representation = representation
        self.head = spk.atomistic.Atomwise(n_in=width, n_out=1, aggregation_mode=None, per_atom_output_key="e_atoms")

    def atomic_energies(self, graph: Graph) -> torch.Tensor:
        inputs = {P.Z: graph.element_index, P.Rij: graph.r_ij, P.idx_i: graph.idx_i, P.idx_j: graph.idx_j}
        return self.head(self.representation(inputs))["e_atoms"].squeeze(-1)


def build_schnet(*, width, depth, cutoff, elements, n_rbf, per_element_shift,
                 n_filters: int | None = None) -> SchnetpackForceField:
    """SchNet: `width` atom features (= filters unless `n_filters`), `depth` interaction blocks, Gaussian RBFs."""
    representation = spk.representation.SchNet(
        n_atom_basis=width, n_interactions=depth, n_filters=n_filters or width,
        radial_basis=spk.nn.GaussianRBF(n_rbf=n_rbf, cutoff=cutoff), cutoff_fn=spk.nn.CosineCutoff(cutoff),
        nuclear_embedding=nn.Embedding(len(elements), width),
    )
    return SchnetpackForceField("schnet", representation, width, elements, cutoff, per_element_shift)


def build_painn(*, width, depth, cutoff, elements, n_rbf, per_element_shift) -> SchnetpackForceField:
    """PaiNN: `width` scalar and vector features, `depth` interaction+mixing blocks, Gaussian RBFs."""
    representation = spk.representation.PaiNN(
        n_atom_basis=width, n_interactions=depth,
        radial_basis=spk.nn.GaussianRBF(n_rbf=n_rbf, cutoff=cutoff), cutoff_fn=spk.nn.CosineCutoff(cutoff),
        nuclear_embedding=nn.Embedding(len(elements), width),
    )
    return SchnetpackForceField("painn", representation, width, elements, cutoff, per_element_shift)
