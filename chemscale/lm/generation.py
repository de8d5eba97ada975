"""Validity, uniqueness and novelty of molecules sampled from a trained ChemGPT (the paper's generation check)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from chemscale.lm import molecules
from chemscale.config import atomic_write_json, atomic_write_text
from chemscale.lm import corpus
from chemscale.lm.best import load_best
from chemscale.task import BEST


def generation_quality(run_dir: str | Path, n_samples: int = 1000, seed: int = 0) -> dict:
    """Validity, uniqueness and novelty of `n_samples` molecules sampled from a run's best model.

    Cached in the run folder (`samples_<n>_<seed>.smi` and `.json`), so re-running a notebook
    samples nothing twice; the cache is keyed on the best weights, so a retrained run samples
    again. A sample is scored as the model wrote it: one holding [PAD], [BOS] or [UNK] is
    invalid (SELFIES rejects those symbols) rather than cleaned into a molecule. Novelty is
    against the canonicalised training set: 11 of the first 20,000 MOSES SMILES are not
    RDKit-canonical, so the stored strings alone would call those molecules novel.
    """
    import hashlib

    run_dir = Path(run_dir)
    cached, best = run_dir / f"samples_{n_samples}_{seed}.json", run_dir / BEST
    weights = None
    if best.exists():
        with open(best, "rb") as f:
            weights = hashlib.file_digest(f, "sha256").hexdigest()
    if cached.exists():
        quality = json.loads(cached.read_text())
        if weights is not None and quality.pop("best_pt_sha256", None) == weights:
            return quality
    model, train_corpus = load_best(run_dir)
    with torch.no_grad():
        ids = model.sample(n_samples, generator=torch.Generator().manual_seed(seed))
    symbols = train_corpus.tokenizer.symbols
    smiles = molecules.selfies_to_smiles(["".join(symbols[i] for i in s) for s in ids])
    atomic_write_text(cached.with_suffix(".smi"), "\n".join(s or "" for s in smiles) + "\n")
    quality = molecules.quality(smiles, _canonical_training_set(train_corpus), kind="smiles", train_is_canonical=True)
    atomic_write_json(cached, {**quality, "best_pt_sha256": weights})
    return quality


_CANONICAL: dict = {}  # the last training set canonicalised: a notebook scores every width on the same one


def _canonical_training_set(train_corpus: corpus.TokenCorpus) -> frozenset[str]:
    """RDKit-canonical SMILES of a training corpus (~0.35 ms a molecule; the last one kept in memory)."""
    import hashlib

    smiles = train_corpus.smiles()
    key = hashlib.sha256("\n".join(smiles).encode()).hexdigest()  # ~0.1 s for a million molecules
    if key not in _CANONICAL:
        _CANONICAL.clear()
        _CANONICAL[key] = frozenset(c for c in map(molecules.canonical, smiles) if c)
    return _CANONICAL[key]


def generation_quality_table(df, n_samples: int = 1000, seed: int = 0):
    """One row per finished run of `df`: its size and the quality of `n_samples` sampled molecules."""
    import pandas as pd
    from tqdm.auto import tqdm

    rows = []
    for row in tqdm(list(df.itertuples(index=False)), desc="sampling", leave=False):
        quality = generation_quality(row.run_dir, n_samples, seed)
        rows.append({"width": row.width, "n_params_non_embedding": row.n_params_non_embedding,
                     "best_val_loss": row.best_val_loss, **quality})
    return pd.DataFrame(rows).sort_values("n_params_non_embedding", ignore_index=True)
