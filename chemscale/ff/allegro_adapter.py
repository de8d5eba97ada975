"""Allegro from nequip-allegro 0.8.x, fed with the chemscale batch.

Musaelian, Batzner, Johansson, Sun, Owen, Kornbluth, Kozinsky: "Learning local equivariant
representations for large-scale atomistic dynamics", Nat. Commun. 14, 579 (2023).

How it is built: `allegro.model.AllegroModel` is a nequip ``@model_builder``; called directly
with keyword arguments (what a nequip YAML config would hold) it returns a nequip `GraphModel`.
We build it with ``do_derivatives=False`` and read its per-atom energies; `ForceField` sums them
and differentiates, as for the other models. nequip (and Lightning, e3nn) is imported on the first
build, not with this module: importing it takes seconds and adds warning filters, which a
process training another model would not want.

How the batch is adapted (AtomicDataDict): ``edge_vectors`` = our r_ij in float64 (nequip keeps
geometry in float64 and casts to the model dtype itself; giving the vectors means periodic
offsets are already in them, and nequip never reads ``pos``), ``edge_index`` = (idx_i, idx_j)
(row 0 the centre, as in nequip), ``atom_types`` = index into `elements`, ``batch`` = idx_m,
``num_atoms`` = n_atoms. No ``cell``/``edge_cell_shift`` is passed.

NequIP's global state: model building asserts that ``nequip.utils.global_state.set_global_state()``
ran. That call, once per process, sets torch's default dtype to float64, calls Lightning's
``seed_everything(123)`` (reseeding torch, numpy and random and setting ``PL_GLOBAL_SEED``), sets
torch's multiprocessing sharing strategy to ``file_system``, sets e3nn's optimisation defaults, the
TorchScript fusion strategy and ``PYTORCH_JIT_USE_NNC_NOT_NVFUSER=1``, and on CUDA turns TF32 off.
`init_nequip_global_state` calls it and restores the default dtype, the RNG states, the
``PL_*`` variables and the sharing strategy; the e3nn/TorchScript settings and the TF32 choice stay
(they only affect nequip/e3nn code, and TF32 off is also torch's default for matmuls).

Precision: nequip fixes the model dtype at build time (``model_dtype``) and casts to it inside the
model, so ``.double()`` on a built model fails ("expected m1 and m2 to have the same dtype"):
build with ``dtype=torch.float64`` instead (`AllegroEnergy` refuses a converted model with that advice).
"""

import os
from typing import Sequence

import torch
from ase.data import chemical_symbols
from torch import nn

from chemscale.ff.forcefield import Graph, NetForceField, default_dtype

_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64"}


def init_nequip_global_state() -> None:
    """Run nequip's `set_global_state()` once, undoing its process-wide side effects we can undo."""
    from lightning.pytorch.utilities.seed import isolate_rng
    from nequip.utils.global_state import global_state_initialized, set_global_state

    if global_state_initialized():
        return
    dtype = torch.get_default_dtype()
    sharing = torch.multiprocessing.get_sharing_strategy()
    env = {k: os.environ.get(k) for k in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")}
    try:
        with isolate_rng():
            set_global_state(allow_tf32=False)
    finally:
        torch.set_default_dtype(dtype)
        torch.multiprocessing.set_sharing_strategy(sharing)
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class AllegroEnergy(nn.Module):
    """Per-atom energies from nequip-allegro's `AllegroModel`.

    Args:
        elements: atomic numbers, in the order of `element_index` (nequip's ``type_names``).
        width: ``num_scalar_features`` (the scalar latent / edge feature size) and the hidden width
            of the two-body, Allegro-layer and readout MLPs.
        depth: ``num_layers``, the number of Allegro layers.
        cutoff: ``r_max`` in Å.
        n_bessels: number of Bessel radial functions of the two-body embedding.
        dtype: ``model_dtype``, float32 or float64.
        l_max: maximum spherical-harmonic order of the tensor track.
        tensor_features: ``num_tensor_features`` (default width // 4, Allegro's 64:16 ratio).
        avg_num_neighbors: neighbour sums are scaled by 1/sqrt(avg_num_neighbors); nequip requires
            it and would take the training set's mean neighbour count (``num_neighbors_mean``).
            The default, 10, is typical of rMD17/ANI-1x molecules at a 5 Å cutoff (ethanol: 8).
    """

    def __init__(self, elements: Sequence[int], width: int, depth: int, cutoff: float, n_bessels: int = 8,
                 dtype: torch.dtype = torch.float32, l_max: int = 1, tensor_features: int | None = None,
                 avg_num_neighbors: float = 10.0):
        super().__init__()
        from allegro.model import AllegroModel

        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"Allegro supports {list(_DTYPE_NAMES)}; got {dtype}")
        init_nequip_global_state()
        self.built_dtype = dtype
        # nequip seeds its own RNG while building: draw that seed from torch's, so torch.manual_seed reproduces
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
        self.model = AllegroModel(
            seed=seed, model_dtype=_DTYPE_NAMES[dtype], type_names=[chemical_symbols[z] for z in elements],
            r_max=cutoff, l_max=l_max, num_layers=depth,
            radial_chemical_embed={"_target_": "allegro.nn.TwoBodyBesselScalarEmbed", "num_bessels": n_bessels},
            num_scalar_features=width, num_tensor_features=tensor_features or max(1, width // 4),
            scalar_embed_mlp_hidden_layers_width=width, allegro_mlp_hidden_layers_width=width,
            readout_mlp_hidden_layers_width=width, avg_num_neighbors=avg_num_neighbors, do_derivatives=False,
        )

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def forward(self, graph: Graph) -> torch.Tensor:
        """Atomic energies (n_atoms,), in float64 (nequip's output dtype)."""
        from nequip.data import AtomicDataDict  # imported by __init__ already: a lookup

        if self.dtype != self.built_dtype:
            raise ValueError(
                f"this Allegro model was built in {self.built_dtype} and converted to {self.dtype}; "
                "nequip fixes the dtype at build time: use build('allegro', ..., dtype=...) instead"
            )
        data = {
            AtomicDataDict.EDGE_VECTORS_KEY: graph.r_ij.to(torch.float64),
            AtomicDataDict.EDGE_INDEX_KEY: torch.stack([graph.idx_i, graph.idx_j]),
            AtomicDataDict.ATOM_TYPE_KEY: graph.element_index,
            AtomicDataDict.BATCH_KEY: graph.idx_m,
            AtomicDataDict.NUM_NODES_KEY: graph.n_atoms,
        }
        return self.model(data)[AtomicDataDict.PER_ATOM_ENERGY_KEY].squeeze(-1)


def build_allegro(*, width, depth, cutoff, elements, n_rbf, per_element_shift, dtype, **options) -> NetForceField:
    """Allegro in `dtype` (nequip fixes it at build time, so it is built in it, not converted).

    `width`: scalar latent (edge) features and MLP widths, tensor features width // 4; `depth`:
    Allegro layers; `n_rbf`: Bessel functions; `options`: `AllegroEnergy`'s ``l_max``,
    ``tensor_features`` and ``avg_num_neighbors``.
    """
    net = AllegroEnergy(elements=elements, width=width, depth=depth, cutoff=cutoff, n_bessels=n_rbf, dtype=dtype,
                        **options)
    with default_dtype(dtype):  # the per-element shift in the model's dtype
        return NetForceField("allegro", net, elements, cutoff, per_element_shift)
