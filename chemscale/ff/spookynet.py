"""SpookyNet's local core, implemented here (no package ships it).

Unke, Chmiela, Gastegger, Schütt, Sauceda, Müller: "SpookyNet: Learning force fields with
electronic degrees of freedom and nonlocal effects", Nat. Commun. 12, 7273 (2021).

Implemented (paper's Methods; defaults of its reference code where the paper leaves a choice):
- nuclear embedding e_Z = M d_Z + ẽ_Z: a learned vector per element plus a learned linear map
  of the electron-configuration descriptor d_Z (Z, occupations of 1s..6p in aufbau order with the
  ground-state exceptions, valence s/p/d/f electrons; each column scaled to [0, 1] over H..Rn);
- radial basis: K exponential Bernstein polynomials b_{k,K-1}(exp(-γ r)) with learnable γ > 0,
  times the C∞ cutoff f(r) = exp(-r² / ((r_c - r)(r_c + r))) for r < r_c, else 0;
- interaction modules: pre-activation residual stacks before and after a local interaction with
  s-, p- and d-type messages (radial filters times 1, r̂ (3 components) and the 5 real d-type
  spherical harmonics of r̂); p and d features become invariants as channel-wise dot products of
  two linear projections; every branch goes through a residual MLP; each module adds its residual
  MLP output to the atomic descriptor f = Σ_t y_t;
- Swish activations with learnable per-feature α and β (initialised to 1 and 1.702);
- atomic energy = linear map of f; the paper's per-element energy bias is the per-element shift
  of `chemscale.ff.forcefield.ForceField`.

Left out: the electronic embeddings of total charge Q and spin S (our data are neutral closed
shells); the nonlocal interaction (linear-scaling self-attention over all atoms of a molecule);
partial charges and the electrostatic term; the ZBL-like nuclear repulsion; Grimme's D4
dispersion; stochastic module dropout. With these left out SpookyNet is a local model with the
same cutoff as the other three, which the scaling comparison needs anyway.
"""

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from chemscale.ff.forcefield import Graph, NetForceField

# Subshells in aufbau (Madelung) order as (n, l), up to 6p (radon).
_SUBSHELLS = [(1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (4, 0), (3, 2), (4, 1), (5, 0), (4, 2), (5, 1), (6, 0),
              (4, 3), (5, 2), (6, 1)]
# Ground states that break the aufbau order: electrons moved between subshells.
_EXCEPTIONS = {
    24: {(4, 0): -1, (3, 2): 1}, 29: {(4, 0): -1, (3, 2): 1},
    41: {(5, 0): -1, (4, 2): 1}, 42: {(5, 0): -1, (4, 2): 1}, 44: {(5, 0): -1, (4, 2): 1},
    45: {(5, 0): -1, (4, 2): 1}, 46: {(5, 0): -2, (4, 2): 2}, 47: {(5, 0): -1, (4, 2): 1},
    57: {(4, 3): -1, (5, 2): 1}, 58: {(4, 3): -1, (5, 2): 1}, 64: {(4, 3): -1, (5, 2): 1},
    78: {(6, 0): -1, (5, 2): 1}, 79: {(6, 0): -1, (5, 2): 1},
}
MAX_Z = 86


def electron_configuration(z: int) -> list[int]:
    """Z, the 15 subshell occupations (1s..6p) and valence s, p, d, f electron counts."""
    occupation, left = {}, z
    for n, l in _SUBSHELLS:
        occupation[(n, l)] = min(left, 4 * l + 2)
        left -= occupation[(n, l)]
    period = max((n for (n, l), k in occupation.items() if l == 0 and k > 0), default=1)
    for shell, delta in _EXCEPTIONS.get(z, {}).items():
        occupation[shell] += delta
    valence = [occupation.get((period, 0), 0), occupation.get((period, 1), 0),
               occupation.get((period - 1, 2), 0), occupation.get((period - 2, 3), 0)]
    return [z] + [occupation[s] for s in _SUBSHELLS] + valence


def electron_configuration_descriptors(elements: Sequence[int]) -> torch.Tensor:
    """d_Z for each element (n_elements, 20), each column scaled by its maximum over Z = 0..86."""
    table = torch.tensor([electron_configuration(z) for z in range(MAX_Z + 1)], dtype=torch.float64)
    table = table / table.max(dim=0).values
    return table[list(elements)].to(torch.get_default_dtype())


def smooth_cutoff(r: torch.Tensor, cutoff: float) -> torch.Tensor:
    """exp(-r² / ((r_c - r)(r_c + r))) below the cutoff, 0 beyond; all derivatives vanish at r_c."""
    inside = r < cutoff
    r_safe = torch.where(inside, r, torch.zeros_like(r))  # no 0/0 in the unused branch's gradient
    return torch.where(inside, torch.exp(-r_safe**2 / ((cutoff - r_safe) * (cutoff + r_safe))), torch.zeros_like(r))


class Swish(nn.Module):
    """α x sigmoid(β x) with learnable per-feature α, β (β = 1.702 starts close to GELU)."""

    def __init__(self, n_features: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(n_features))
        self.beta = nn.Parameter(torch.full((n_features,), 1.702))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * x * torch.sigmoid(self.beta * x)


class ResidualBlock(nn.Module):
    """Pre-activation residual block x + W2 σ(W1 σ(x)) (He et al. 2016); an identity at init."""

    def __init__(self, n_features: int):
        super().__init__()
        self.act1, self.act2 = Swish(n_features), Swish(n_features)
        self.linear1, self.linear2 = nn.Linear(n_features, n_features), nn.Linear(n_features, n_features)
        nn.init.orthogonal_(self.linear1.weight)
        nn.init.zeros_(self.linear1.bias)
        nn.init.zeros_(self.linear2.weight)
        nn.init.zeros_(self.linear2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear2(self.act2(self.linear1(self.act1(x))))


def residual_stack(n_features: int, n_blocks: int) -> nn.Sequential:
    return nn.Sequential(*[ResidualBlock(n_features) for _ in range(n_blocks)])


class ResidualMLP(nn.Module):
    """Residual blocks, an activation and a linear layer: W σ(res(x)) + b."""

    def __init__(self, n_features: int, n_blocks: int = 1, zero_init: bool = False):
        super().__init__()
        self.blocks = residual_stack(n_features, n_blocks)
        self.act = Swish(n_features)
        self.linear = nn.Linear(n_features, n_features)
        (nn.init.zeros_ if zero_init else nn.init.orthogonal_)(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.act(self.blocks(x)))


class NuclearEmbedding(nn.Module):
    """e_Z = M d_Z + ẽ_Z: a learned linear map of the electron configuration plus a free vector."""

    def __init__(self, elements: Sequence[int], n_features: int):
        super().__init__()
        self.register_buffer("config", electron_configuration_descriptors(elements))
        self.from_config = nn.Linear(self.config.shape[1], n_features, bias=False)
        self.free = nn.Parameter(torch.empty(len(elements), n_features).uniform_(-math.sqrt(3), math.sqrt(3)))
        nn.init.orthogonal_(self.from_config.weight)

    def forward(self, element_index: torch.Tensor) -> torch.Tensor:
        return (self.from_config(self.config) + self.free)[element_index]


class BernsteinBasis(nn.Module):
    """g_k(r) = C(K-1, k) x^k (1-x)^(K-1-k) f_cut(r), x = exp(-γ r), k = 0..K-1, in log space.

    γ = softplus(γ_raw) is learned, initialised to 0.5 / bohr = 0.9449 / Å.
    """

    def __init__(self, n_basis: int, cutoff: float, gamma: float = 0.9448630629184640):
        super().__init__()
        self.cutoff = cutoff
        k = torch.arange(n_basis, dtype=torch.float64)
        n = n_basis - 1
        log_binomial = math.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)
        dtype = torch.get_default_dtype()
        self.register_buffer("k", k.to(dtype))
        self.register_buffer("n_minus_k", (n - k).to(dtype))
        self.register_buffer("log_binomial", log_binomial.to(dtype))
        self.gamma_raw = nn.Parameter(torch.tensor(gamma + math.log(-math.expm1(-gamma))))  # softplus⁻¹

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        log_x = -F.softplus(self.gamma_raw) * r[:, None]  # (P, 1), log exp(-γ r)
        log_b = self.log_binomial + self.k * log_x + self.n_minus_k * torch.log(-torch.expm1(log_x))
        return torch.exp(log_b) * smooth_cutoff(r, self.cutoff)[:, None]  # (P, K)


def angular_functions(r_ij: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distances (P,), p-type r̂ (P, 3) and the 5 real d-type spherical harmonics of r̂ (P, 5)."""
    r = torch.linalg.vector_norm(r_ij, dim=-1)
    x, y, z = (r_ij / r[:, None]).unbind(-1)
    s3 = math.sqrt(3.0)
    d = torch.stack([s3 * x * y, s3 * x * z, s3 * y * z, 0.5 * (3 * z * z - 1), 0.5 * s3 * (x * x - y * y)], dim=-1)
    return r, torch.stack([x, y, z], dim=-1), d


class LocalInteraction(nn.Module):
    """s-, p- and d-type messages from neighbours, reduced to rotation invariants."""

    def __init__(self, n_features: int, n_basis: int):
        super().__init__()
        self.radial = nn.ModuleDict({t: nn.Linear(n_basis, n_features, bias=False) for t in "spd"})
        self.centre = ResidualMLP(n_features)
        self.neighbour = nn.ModuleDict({t: ResidualMLP(n_features) for t in "spd"})
        self.project_p = nn.Linear(n_features, 2 * n_features, bias=False)
        self.project_d = nn.Linear(n_features, 2 * n_features, bias=False)
        self.out = ResidualMLP(n_features, zero_init=True)
        for linear in [*self.radial.values(), self.project_p, self.project_d]:
            nn.init.orthogonal_(linear.weight)

    def forward(self, x: torch.Tensor, rbf: torch.Tensor, y1: torch.Tensor, y2: torch.Tensor,
                idx_i: torch.Tensor, idx_j: torch.Tensor) -> torch.Tensor:
        n_atoms, n_features = x.shape
        g_s = self.radial["s"](rbf)  # (P, F)
        g_p = self.radial["p"](rbf)[:, None, :] * y1[:, :, None]  # (P, 3, F)
        g_d = self.radial["d"](rbf)[:, None, :] * y2[:, :, None]  # (P, 5, F)

        s = self.centre(x).index_add(0, idx_i, g_s * self.neighbour["s"](x)[idx_j])
        p = x.new_zeros(n_atoms, 3, n_features).index_add(0, idx_i, g_p * self.neighbour["p"](x)[idx_j][:, None])
        d = x.new_zeros(n_atoms, 5, n_features).index_add(0, idx_i, g_d * self.neighbour["d"](x)[idx_j][:, None])

        p_a, p_b = self.project_p(p).chunk(2, dim=-1)  # rotations act on dim 1, projections on features
        d_a, d_b = self.project_d(d).chunk(2, dim=-1)
        return self.out(s + (p_a * p_b).sum(1) + (d_a * d_b).sum(1))


class InteractionModule(nn.Module):
    """x ← res_post(res_pre(x) + local(res_pre(x))); returns (x, y = ResidualMLP(x))."""

    def __init__(self, n_features: int, n_basis: int):
        super().__init__()
        self.pre = residual_stack(n_features, 1)
        self.local = LocalInteraction(n_features, n_basis)
        self.post = residual_stack(n_features, 1)
        self.out = ResidualMLP(n_features)

    def forward(self, x: torch.Tensor, rbf: torch.Tensor, y1: torch.Tensor, y2: torch.Tensor,
                idx_i: torch.Tensor, idx_j: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pre(x)
        x = self.post(x + self.local(x, rbf, y1, y2, idx_i, idx_j))
        return x, self.out(x)


class SpookyNet(nn.Module):
    """SpookyNet's local core: atomic energies from elements and pair vectors.

    Reference: Unke et al., Nat. Commun. 12, 7273 (2021); see the module docstring for what is
    implemented and what is left out.

    Args:
        elements: atomic numbers (≤ 86) the model is built for, in the order of `element_index`.
        n_features: feature size F (the study's `width`).
        n_modules: number of interaction modules T (the study's `depth`).
        n_basis: number of Bernstein radial basis functions K.
        cutoff: cutoff radius in Å.
    """

    def __init__(self, elements: Sequence[int], n_features: int, n_modules: int, n_basis: int = 20,
                 cutoff: float = 5.0):
        super().__init__()
        if max(elements) > MAX_Z:
            raise ValueError(f"SpookyNet's electron configurations go up to Z={MAX_Z}; got elements {list(elements)}")
        self.embedding = NuclearEmbedding(elements, n_features)
        self.basis = BernsteinBasis(n_basis, cutoff)
        self.interactions = nn.ModuleList([InteractionModule(n_features, n_basis) for _ in range(n_modules)])
        self.energy = nn.Linear(n_features, 1, bias=False)
        nn.init.orthogonal_(self.energy.weight)

    def forward(self, graph: Graph) -> torch.Tensor:
        """Atomic energies (n_atoms,) from the graph's element indices and pair vectors."""
        r, y1, y2 = angular_functions(graph.r_ij)
        rbf = self.basis(r)
        x = self.embedding(graph.element_index)
        f = torch.zeros_like(x)  # atomic descriptors, the sum of every module's output
        for module in self.interactions:
            x, y = module(x, rbf, y1, y2, graph.idx_i, graph.idx_j)
            f = f + y
        return self.energy(f).squeeze(-1)


def build_spookynet(*, width, depth, cutoff, elements, n_rbf, per_element_shift) -> NetForceField:
    """SpookyNet: `width` features F, `depth` interaction modules T, `n_rbf` Bernstein polynomials K."""
    net = SpookyNet(elements=elements, n_features=width, n_modules=depth, n_basis=n_rbf, cutoff=cutoff)
    return NetForceField("spookynet", net, elements, cutoff, per_element_shift)
