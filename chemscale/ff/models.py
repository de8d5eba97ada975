"""The force-field registry: one row per model, and the one factory that builds from it.

`build(name, width=..., depth=...)` returns a `chemscale.ff.forcefield.ForceField` (the batch it
reads, the outputs ``P.energy`` and ``P.forces``, the per-element shift: see that module). Each
network lives in its own module, which provides the builder of its row in `REGISTRY`. A row also
says which kind of model it is (for the scaling comparison: invariant, equivariant or
physics-informed), which extra keyword options its builder takes, and what `width` and `depth`
mean for it. Adding a model is its module plus one row.

The table of models below is generated from `REGISTRY`.
"""

from dataclasses import dataclass
from typing import Callable

import torch
from ase.data import chemical_symbols

from chemscale.ff.allegro_adapter import build_allegro
from chemscale.ff.forcefield import ForceField, default_dtype
from chemscale.ff.schnetpack_models import build_painn, build_schnet
from chemscale.ff.spookynet import build_spookynet

KINDS = ("invariant", "equivariant", "physics-informed")
DEFAULT_ELEMENTS = (1, 6, 7, 8)  # H, C, N, O


@dataclass(frozen=True)
class ModelSpec:
    """One model of the registry.

    Attributes:
        build: keyword-only builder in the model's module: ``build(width=, depth=, cutoff=, elements=, n_rbf=,
            per_element_shift=, **options)`` (plus ``dtype=`` when `builds_in_dtype`) -> `ForceField`.
        kind: one of `KINDS`.
        network: where the network comes from (for the table).
        width: what `width` sets in this network.
        depth: what `depth` sets in this network.
        options: extra keyword options the builder accepts.
        builds_in_dtype: the network's precision is fixed when built (nequip's Allegro), so `build` passes
            ``dtype`` to the builder; otherwise the model is built in float32 and converted.
    """

    build: Callable[..., ForceField]
    kind: str
    network: str
    width: str
    depth: str
    options: frozenset[str] = frozenset()
    builds_in_dtype: bool = False


REGISTRY: dict[str, ModelSpec] = {
    "schnet": ModelSpec(build_schnet, "invariant", "`schnetpack.representation.SchNet`",
                        width="atom features (= filters)", depth="interaction blocks",
                        options=frozenset({"n_filters"})),
    "painn": ModelSpec(build_painn, "equivariant", "`schnetpack.representation.PaiNN`",
                       width="scalar and vector features", depth="interaction+mixing blocks"),
    "allegro": ModelSpec(build_allegro, "equivariant", "`allegro.model.AllegroModel` (nequip-allegro)",
                         width="scalar latent (edge) features and MLP widths; tensor features = width // 4",
                         depth="Allegro layers", options=frozenset({"l_max", "tensor_features", "avg_num_neighbors"}),
                         builds_in_dtype=True),
    "spookynet": ModelSpec(build_spookynet, "physics-informed", "`chemscale.ff.spookynet.SpookyNet`",
                           width="features F", depth="interaction modules"),
}
MODELS = tuple(REGISTRY)


def table() -> str:
    """The models as a Markdown table: network, kind, what width and depth mean, extra options."""
    rows = ["| model | network | kind | `width` | `depth` | options |", "|---|---|---|---|---|---|"]
    rows += [f"| `{name}` | {s.network} | {s.kind} | {s.width} | {s.depth} | {', '.join(sorted(s.options)) or '-'} |"
             for name, s in REGISTRY.items()]
    return "\n".join(rows)


__doc__ = (__doc__ or "") + "\n" + table() + "\n"  # `or`: python -OO strips docstrings


def kind(name: str) -> str:
    """The model's kind: "invariant", "equivariant" or "physics-informed"."""
    return _row(name).kind


def check(name: str, *, width: int, depth: int, cutoff: float, n_rbf: int, options: dict | None = None) -> None:
    """Raise `ValueError` unless `name` is a registered model, the sizes are positive and `options` are its row's."""
    spec = _row(name)
    if width < 1 or depth < 1 or cutoff <= 0 or n_rbf < 1:
        raise ValueError(f"need width, depth, n_rbf >= 1 and cutoff > 0; got {width=}, {depth=}, {n_rbf=}, {cutoff=}")
    if unknown := sorted(set(options or {}) - spec.options):
        raise ValueError(f"{name} has no option(s) {unknown}; its options: {sorted(spec.options)}")


def build(name: str, *, width: int, depth: int, cutoff: float = 5.0, elements: list[int] | None = None,
          n_rbf: int = 20, **kw) -> ForceField:
    """Build a force field.

    Args:
        name: a key of `REGISTRY` (the table in the module docstring).
        width: feature size (see the table in the module docstring for each model's mapping).
        depth: number of interaction layers.
        cutoff: neighbour cutoff in Å.
        elements: atomic numbers the model accepts (default H, C, N, O).
        n_rbf: number of radial basis functions: Gaussians with a cosine cutoff (SchNet, PaiNN;
            schnetpack's default configs), Bessel functions (Allegro), Bernstein polynomials (SpookyNet).
        **kw: ``dtype`` (default float32), ``per_element_shift`` (default True), and the options
            of the model's row (the table's last column; each builder documents its defaults).
            A run config sets them in its `model` section's `options`.

    Returns:
        The `ForceField`, in ``dtype``; its ``build_args`` (a dict) rebuild it with `rebuild`.
    """
    dtype = kw.pop("dtype", torch.float32)
    shift = kw.pop("per_element_shift", True)
    check(name, width=width, depth=depth, cutoff=cutoff, n_rbf=n_rbf, options=kw)
    spec = _row(name)
    elements = sorted(set(DEFAULT_ELEMENTS if elements is None else elements))
    if not all(1 <= z < len(chemical_symbols) for z in elements):
        raise ValueError(f"elements must be atomic numbers 1..{len(chemical_symbols) - 1}; got {elements}")
    common = dict(width=width, depth=depth, cutoff=cutoff, elements=elements, n_rbf=n_rbf, per_element_shift=shift)
    if spec.builds_in_dtype:
        built = spec.build(**common, **kw, dtype=dtype)
    else:
        # Build in float32 whatever the process default (schnetpack's GaussianRBF calls torch.FloatTensor,
        # which fails under a float64 default), then convert.
        with default_dtype(torch.float32):
            built = spec.build(**common, **kw).to(dtype)
    built.build_args = {"name": name, **common, **kw}  # JSON-able: `rebuild` makes the same network again
    return built


def rebuild(build_args: dict, dtype: torch.dtype = torch.float32) -> ForceField:
    """The network that `build` made with `build_args` (a model's `build_args`), in `dtype`, untrained.

    Saved weights (`state_dict`) load into it: how a trained model leaves its run (see
    `chemscale.ff.calculator`). Allegro is rebuilt in `dtype` rather than converted (see `build`).
    Runs trained before issue 9 saved the name under "model" in best_model.json; read either.
    """
    args = dict(build_args)
    name = args.pop("name") if "name" in args else args.pop("model")
    return build(name, dtype=dtype, **args)


def _row(name: str) -> ModelSpec:
    """The registry row of `name`; `ValueError` naming the registered models for an unknown one."""
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")
    return REGISTRY[name]
