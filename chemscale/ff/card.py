"""A force-field run's model card, best_model.json: what rebuilds its best model outside training.

Written beside best.pt when a run finishes (`chemscale.ff.task`): the network's build arguments
(`chemscale.ff.models.rebuild` makes the same network again), the per-element reference
energies the data side subtracted, and the units. `chemscale.ff.calculator` reads it.
"""

from __future__ import annotations

from pathlib import Path

from chemscale.config import atomic_write_json
from chemscale.task import BEST

MODEL_CARD = "best_model.json"
UNITS = {"energy": "eV", "forces": "eV/Å", "positions": "Å"}


def write_model_card(run_dir: Path, build_args: dict, reference_energies: dict[int, float]) -> None:
    """Write RUN_DIR/best_model.json: what `ChemscaleCalculator.from_run` needs beside best.pt."""
    card = {"build": build_args, "reference_energies_ev": {str(z): float(e) for z, e in reference_energies.items()},
            "units": UNITS, "weights": BEST}
    atomic_write_json(Path(run_dir) / MODEL_CARD, card)
