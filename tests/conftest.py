"""Shared fixtures: no test reads or writes the user's runs/, caches or figures.

Before chemscale is imported, `CHEMSCALE_RUNS` and `CHEMSCALE_FIGURES` point at a temporary
folder made for this pytest session (environment variables, so the child processes of sweeps,
the train CLI and benchmarks inherit them). Caches under it are shared by the tests of one
session (the MOSES subsets are encoded once) and deleted at its end; every run folder a test
makes goes under its own `runs_root`. Process-wide state that a test may change (torch
threads, deterministic algorithms, the cache folders) is restored after each test.
"""

import os
import shutil
import tempfile
from pathlib import Path

_SESSION_RUNS = Path(tempfile.mkdtemp(prefix="chemscale-tests-"))
os.environ["CHEMSCALE_RUNS"] = str(_SESSION_RUNS / "runs")
os.environ["CHEMSCALE_FIGURES"] = str(_SESSION_RUNS / "figures")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SESSION_RUNS, ignore_errors=True)


@pytest.fixture(autouse=True)
def _restore_process_state():
    """Undo what a test (or the code it calls) changed process-wide, so results never depend on order."""
    from chemscale.lm import cache as lm_cache
    from chemscale.ff import data as ff_data

    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), torch.get_default_dtype(),
             lm_cache.CACHE_DIR, ff_data.CACHE_DIR)
    yield
    threads, deterministic, warn_only, dtype, corpus_cache, ff_cache = saved
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.set_default_dtype(dtype)
    lm_cache.CACHE_DIR, ff_data.CACHE_DIR = corpus_cache, ff_cache


@pytest.fixture
def runs_root(tmp_path):
    """A private runs/ folder for sweeps and run folders."""
    root = tmp_path / "runs"
    root.mkdir()
    return root


def tiny_lm_config(study="t", **train):
    """A ChemGPT run small enough to train in a few seconds on 2 cores."""
    t = {"batch_size": 16, "lr": 3e-3, "warmup_steps": 2, "max_steps": 20, "val_every_steps": 10, "patience": 0,
         "accelerator": "cpu", "threads": 1}
    t.update(train)
    return {"study": study, "task": "chemgpt", "seed": 0,
            "model": {"width": 16, "depth": 1, "n_heads": 2},
            "data": {"source": "moses", "n_train_molecules": 200, "n_val_molecules": 64},
            "train": t}
