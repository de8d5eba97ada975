"""Repository-root-anchored paths, so notebooks never depend on the working directory.

nbmake runs a notebook in its own folder, papermill in the caller's: every path a notebook
uses comes from here. `CHEMSCALE_RUNS` moves the build output (runs, caches) elsewhere,
e.g. onto a cluster's scratch file system.
"""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = Path(os.environ.get("CHEMSCALE_RUNS", ROOT / "runs"))
CACHE = RUNS / "cache"
FIGURES = Path(os.environ.get("CHEMSCALE_FIGURES", ROOT / "figures"))
PARAMS = ROOT / "params"
NOTEBOOKS = ROOT / "notebooks"
