"""A finished ChemGPT run's best model, read back with the vocabulary it trained with.

`load_best_model` (export) needs only the run folder (its vocab.json); `load_best` (sampling)
also loads the training corpus, for novelty, and refuses one whose ids changed since the run.
"""

from __future__ import annotations

from pathlib import Path

import torch

from chemscale import runs
from chemscale.config import from_dict
from chemscale.lm import chemgpt, corpus
from chemscale.lm.task import LMDataConfig, make_model
from chemscale.lm.vocabulary import VOCAB, BestModelError, run_vocabulary
from chemscale.task import BEST


def _best_settings(run_dir: Path) -> tuple[chemgpt.ChemGPTShape, LMDataConfig, Path]:
    config = runs.read_config(run_dir)
    source = str(run_dir / runs.CONFIG)
    model_cfg = from_dict(chemgpt.ChemGPTShape, config.get("model", {}), f"{source} [model]")
    data_cfg = from_dict(LMDataConfig, config.get("data", {}), f"{source} [data]")
    best = run_dir / BEST
    if not best.exists():  # before the corpus: loading it may encode molecules for minutes
        raise FileNotFoundError(f"{best}: the run has no best weights (did it finish?)")
    return model_cfg, data_cfg, best


def _with_weights(model: chemgpt.ChemGPT, best: Path) -> chemgpt.ChemGPT:
    """`model` holding the weights of `best`; a damaged or foreign file is named with the way out."""
    try:
        model.load_state_dict(torch.load(best, map_location="cpu", weights_only=True))
    except Exception as e:  # truncated/empty: OSError, EOFError...; another model: RuntimeError (keys, shapes)
        why = " ".join(str(e).split())  # torch's key and shape lists span lines: one line, cut short
        why = why if len(why) <= 160 else why[:157] + "..."
        raise BestModelError(f"{best}: not the ChemGPT weights of this run ({type(e).__name__}: {why}); it is "
                             f"damaged or from another run: python -m chemscale.train {best.parent} --retrain "
                             "trains it again") from None
    return model.eval()


def load_best_model(run_dir: str | Path):
    """The best-validation ChemGPT of a run and its tokenizer, from the run folder alone when it holds vocab.json."""
    run_dir = Path(run_dir)
    model_cfg, data_cfg, best = _best_settings(run_dir)
    tokenizer = run_vocabulary(run_dir, data_cfg)
    return _with_weights(make_model(model_cfg, len(tokenizer)), best), tokenizer


def load_best(run_dir: str | Path) -> tuple[chemgpt.ChemGPT, corpus.TokenCorpus]:
    """The best-validation ChemGPT of a finished run, with its training corpus (for the tokenizer and novelty).

    The corpus must give the ids the run kept in vocab.json: a changed file would otherwise be read
    with the wrong vocabulary without a word."""
    from chemscale.lm.tokenizer import Tokenizer

    run_dir = Path(run_dir)
    model_cfg, data_cfg, best = _best_settings(run_dir)
    train_corpus = corpus.load(data_cfg.source, "train", data_cfg.n_train_molecules, seed=0, progress=False)
    kept = run_dir / VOCAB
    if kept.exists() and Tokenizer.load(kept) != train_corpus.tokenizer:
        raise BestModelError(f"{kept}: the vocabulary this run trained with differs from the one "
                             f"{data_cfg.source!r} gives now (was the file changed?); restore the file")
    return _with_weights(make_model(model_cfg, len(train_corpus.tokenizer)), best), train_corpus
