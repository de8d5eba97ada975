"""What makes a speed measurement fair, shared by the ChemGPT and force-field benchmarks.

`paired_ratio` compares two sides measured back to back, round by round, so a busy machine slows
both; `process_state_kept` restores what a benchmark changes in the process (threads,
determinism, default dtype, caches, Lightning's log levels), since the caller may be a notebook.
"""

import contextlib
import logging
import statistics

import torch

LIGHTNING_LOGGERS = ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric")


@contextlib.contextmanager
def process_state_kept():
    """Restore, on the way out, the process-wide state a benchmark changes (the caller may be a notebook)."""
    from chemscale.lm import cache as lm_cache
    from chemscale.ff import data as ff_data

    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), torch.get_default_dtype(),
             lm_cache.CACHE_DIR, ff_data.CACHE_DIR, {name: logging.getLogger(name).level for name in LIGHTNING_LOGGERS})
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            threads, deterministic, warn_only, dtype, lm_cache.CACHE_DIR, ff_data.CACHE_DIR, levels = saved
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
            torch.set_default_dtype(dtype)
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)


def paired_ratio(num: list[float], den: list[float], scale: float = 1.0) -> float:
    """Median over rounds of scale·num/den: each round's two sides were measured back to back."""
    return statistics.median(scale * a / b for a, b in zip(num, den, strict=True))
