"""Shared fixtures: every test writes runs and caches under its own temporary folder."""

import pytest
import torch

torch.set_num_threads(2)


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
