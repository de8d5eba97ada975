"""Force fields for the GNN scaling study: one factory, one contract.

`build(model, width=..., depth=...)` returns a `ForceField`. It takes the batch dict the data
side produces (schnetpack keys, see `P`) and returns ``{"energy": (n_mol,), "forces": (n_atoms, 3)}``
with forces = -dE/dR by autograd (``create_graph`` in training mode, so a force loss trains).

| model       | network                            | `width`                                | `depth`             |
|-------------|------------------------------------|----------------------------------------|---------------------|
| `schnet`    | `schnetpack.representation.SchNet` | atom features (= filters)              | interaction blocks  |
| `painn`     | `schnetpack.representation.PaiNN`  | scalar and vector features             | interaction+mixing  |
| `allegro`   | `allegro.model.AllegroModel`       | scalar latent (edge) features and MLP  | Allegro layers      |
|             | (nequip-allegro)                   | widths; tensor features = width // 4   |                     |
| `spookynet` | `chemscale.ff.spookynet.SpookyNet` | features F                             | interaction modules |

Every model gives per-atom energies; the total is their sum plus a learnable per-element shift
(initialised to 0; the data side subtracts fitted reference energies before training). All four
read the same pair vectors r_ij = R[idx_j] - R[idx_i] + offsets, built here once.
"""

import contextlib
from typing import Iterator, NamedTuple, Sequence

import torch
from ase.data import chemical_symbols
from torch import nn

from chemscale.ff.spookynet import SpookyNet


def _import_schnetpack():
    """Import schnetpack 2.1.1 under recent torch.

    schnetpack imports ``T_co`` from ``torch.utils.data.dataloader``, renamed ``_T_co`` in
    recent torch; alias it first. (To be replaced by ``chemscale.ff.import_schnetpack``.)
    """
    import torch.utils.data.dataloader as loader

    if not hasattr(loader, "T_co"):
        loader.T_co = loader._T_co
    import schnetpack

    return schnetpack


spk = _import_schnetpack()
P = spk.properties  # batch keys: P.Z, P.R, P.idx_i, P.idx_j, P.idx_m, P.n_atoms, P.offsets

MODELS = ("schnet", "painn", "allegro", "spookynet")
DEFAULT_ELEMENTS = (1, 6, 7, 8)  # H, C, N, O


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
        name: model name, one of `MODELS`.
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
        return {"energy": energy, "forces": forces}


class SchnetpackForceField(ForceField):
    """SchNet or PaiNN representation from schnetpack with an `Atomwise` energy head.

    schnetpack's nuclear embedding is replaced by one row per built element: the representation
    is fed element indices under `P.Z`, so `n_params()` counts no embedding rows for unused elements.

    References: Schütt et al., J. Chem. Phys. 148, 241722 (2018) (SchNet);
    Schütt, Unke, Gastegger, ICML 2021 (PaiNN); Schütt et al., JCTC 19, 2023 (SchNetPack 2.0).

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


class SpookyNetForceField(ForceField):
    """SpookyNet's local core (see `chemscale.ff.spookynet`); its element bias is our per-element shift.

    Args:
        net: a `chemscale.ff.spookynet.SpookyNet`.
        elements, cutoff, per_element_shift: see `ForceField`.
    """

    def __init__(self, net: nn.Module, elements: Sequence[int], cutoff: float, per_element_shift: bool = True):
        super().__init__("spookynet", elements, cutoff, per_element_shift)
        self.net = net

    def atomic_energies(self, graph: Graph) -> torch.Tensor:
        return self.net(graph.element_index, graph.r_ij, graph.idx_i, graph.idx_j)


class AllegroForceField(ForceField):
    """Allegro from nequip-allegro (see `chemscale.ff.allegro_adapter`).

    Its precision is fixed when built (nequip casts to its build dtype inside the model), so
    `.double()` cannot convert it: build with ``dtype=torch.float64`` instead.

    Args:
        net: an `chemscale.ff.allegro_adapter.AllegroEnergy`.
        elements, cutoff, per_element_shift: see `ForceField`.
    """

    def __init__(self, net: nn.Module, elements: Sequence[int], cutoff: float, per_element_shift: bool = True):
        super().__init__("allegro", elements, cutoff, per_element_shift)
        self.net = net

    def atomic_energies(self, graph: Graph) -> torch.Tensor:
        if self.net.dtype != self.net.built_dtype:
            raise ValueError(
                f"this Allegro model was built in {self.net.built_dtype} and converted to {self.net.dtype}; "
                "nequip fixes the dtype at build time: use build('allegro', ..., dtype=...) instead"
            )
        return self.net(graph.element_index, graph.r_ij, graph.idx_i, graph.idx_j, graph.idx_m, graph.n_atoms)


def build(model: str, *, width: int, depth: int, cutoff: float = 5.0, elements: list[int] | None = None,
          n_rbf: int = 20, **kw) -> ForceField:
    """Build a force field.

    Args:
        model: one of "schnet", "painn", "allegro", "spookynet".
        width: feature size (see the table in the module docstring for each model's mapping).
        depth: number of interaction layers.
        cutoff: neighbour cutoff in Å.
        elements: atomic numbers the model accepts (default H, C, N, O).
        n_rbf: number of radial basis functions: Gaussians with a cosine cutoff (SchNet, PaiNN;
            schnetpack's default configs), Bessel functions (Allegro), Bernstein polynomials (SpookyNet).
        **kw: ``dtype`` (default float32), ``per_element_shift`` (default True), and per model:
            schnet ``n_filters``; allegro ``l_max`` (1), ``tensor_features`` (width // 4),
            ``avg_num_neighbors`` (10; better: the training set's mean neighbour count).

    Returns:
        The `ForceField`, in ``dtype``; its ``build_args`` (a dict) rebuild it with `rebuild`.
    """
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; expected one of {MODELS}")
    if width < 1 or depth < 1 or cutoff <= 0 or n_rbf < 1:
        raise ValueError(f"need width, depth, n_rbf >= 1 and cutoff > 0; got {width=}, {depth=}, {n_rbf=}, {cutoff=}")
    elements = sorted(set(DEFAULT_ELEMENTS if elements is None else elements))
    if not all(1 <= z < len(chemical_symbols) for z in elements):
        raise ValueError(f"elements must be atomic numbers 1..{len(chemical_symbols) - 1}; got {elements}")
    dtype = kw.pop("dtype", torch.float32)
    shift = kw.pop("per_element_shift", True)
    if unknown := sorted(set(kw) - _OPTIONS[model]):
        raise ValueError(f"{model} has no option(s) {unknown}; its options: {sorted(_OPTIONS[model])}")
    common = dict(width=width, depth=depth, cutoff=cutoff, elements=elements, n_rbf=n_rbf, per_element_shift=shift)
    if model == "allegro":  # nequip sets its own default dtype while building
        built = _build_allegro(dtype=dtype, **common, **kw)
    else:
        # Build in float32 whatever the process default (schnetpack's GaussianRBF calls torch.FloatTensor,
        # which fails under a float64 default), then convert.
        with _default_dtype(torch.float32):
            built = _BUILDERS[model](**common, **kw).to(dtype)
    built.build_args = {"model": model, **common, **kw}  # JSON-able: `rebuild` makes the same network again
    return built


def rebuild(build_args: dict, dtype: torch.dtype = torch.float32) -> ForceField:
    """The network that `build` made with `build_args` (a model's `build_args`), in `dtype`, untrained.

    Saved weights (`state_dict`) load into it: how a trained model leaves its run (see
    `chemscale.ff.calculator`). Allegro is rebuilt in `dtype` rather than converted (see `build`).
    """
    args = dict(build_args)
    return build(args.pop("model"), dtype=dtype, **args)


def _build_schnet(*, width, depth, cutoff, elements, n_rbf, per_element_shift, n_filters: int | None = None):
    representation = spk.representation.SchNet(
        n_atom_basis=width, n_interactions=depth, n_filters=n_filters or width,
        radial_basis=spk.nn.GaussianRBF(n_rbf=n_rbf, cutoff=cutoff), cutoff_fn=spk.nn.CosineCutoff(cutoff),
        nuclear_embedding=nn.Embedding(len(elements), width),
    )
    return SchnetpackForceField("schnet", representation, width, elements, cutoff, per_element_shift)


def _build_painn(*, width, depth, cutoff, elements, n_rbf, per_element_shift):
    representation = spk.representation.PaiNN(
        n_atom_basis=width, n_interactions=depth,
        radial_basis=spk.nn.GaussianRBF(n_rbf=n_rbf, cutoff=cutoff), cutoff_fn=spk.nn.CosineCutoff(cutoff),
        nuclear_embedding=nn.Embedding(len(elements), width),
    )
    return SchnetpackForceField("painn", representation, width, elements, cutoff, per_element_shift)


def _build_spookynet(*, width, depth, cutoff, elements, n_rbf, per_element_shift):
    net = SpookyNet(elements=elements, n_features=width, n_modules=depth, n_basis=n_rbf, cutoff=cutoff)
    return SpookyNetForceField(net, elements, cutoff, per_element_shift)


def _build_allegro(*, width, depth, cutoff, elements, n_rbf, per_element_shift, dtype, **kw):
    from chemscale.ff.allegro_adapter import AllegroEnergy  # imports nequip (and Lightning): seconds

    net = AllegroEnergy(elements=elements, width=width, depth=depth, cutoff=cutoff, n_bessels=n_rbf, dtype=dtype, **kw)
    with _default_dtype(dtype):
        return AllegroForceField(net, elements, cutoff, per_element_shift)


_BUILDERS = {"schnet": _build_schnet, "painn": _build_painn, "spookynet": _build_spookynet}
_OPTIONS = {"schnet": {"n_filters"}, "painn": set(), "spookynet": set(),
            "allegro": {"l_max", "tensor_features", "avg_num_neighbors"}}


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Create parameters in `dtype`, restoring the process default afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _symbols(zs: Sequence[int]) -> list[str]:
    return [chemical_symbols[z] if 0 <= z < len(chemical_symbols) else f"Z={z}" for z in zs]
