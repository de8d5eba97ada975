"""chemscale: neural scaling of deep chemical models (Frey et al., Nat. Mach. Intell. 5, 1297, 2023)."""

__version__ = "0.1.0"
