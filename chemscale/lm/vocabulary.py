"""A ChemGPT run's vocabulary: saved into the run folder when training starts, read back to use the model.

`keep_vocabulary` writes vocab.json and corpus.json (the training file's sha256) at the start of
a run and refuses a resume whose corpus now gives other ids; `run_vocabulary` reads the ids back,
or rebuilds them only from the file the run recorded.
"""

from __future__ import annotations

import json
from pathlib import Path

from chemscale.config import atomic_write_json
from chemscale.lm import cache, corpus

VOCAB, CORPUS_RECORD = "vocab.json", "corpus.json"  # written into the run folder when it starts


class BestModelError(ValueError):
    """A run's best model cannot be loaded as it was trained (damaged weights, another corpus); names the file."""


def keep_vocabulary(run_dir: Path, tokenizer, source: str) -> None:
    """Save the run's vocabulary and its corpus file's sha256 when it starts, so the model stays readable
    (and exportable) if the file or the cache changes later; a resume whose corpus gives other ids is refused."""
    from chemscale.config import ConfigError  # the train CLI prints it as one line
    from chemscale.lm.tokenizer import Tokenizer

    path = Path(run_dir) / VOCAB
    if path.exists() and Tokenizer.load(path) != tokenizer:
        raise ConfigError(f"{path}: the vocabulary this run started with differs from the one {source!r} gives "
                          "now (was the file changed?); restore the file, or make a new run")
    if not path.exists():
        tokenizer.save(path)
    atomic_write_json(Path(run_dir) / CORPUS_RECORD, {"source": source, "sha256": corpus_sha256(source)})


def corpus_sha256(source: str) -> str:
    """sha256 of the training file of a data source (memoised by the corpus cache for big files)."""
    smiles_file, _ = cache.source_file(source, "train", None)
    return cache.source_fingerprint(smiles_file, progress=False)["sha256"]


def run_vocabulary(run_dir: Path, data_cfg):
    """The run's tokenizer: its vocab.json; without one, rebuilt from the corpus only if the file is the
    one the run recorded (corpus.json), or MOSES for runs older than that record."""
    from chemscale.lm.tokenizer import Tokenizer

    path = run_dir / VOCAB
    if path.exists():
        return Tokenizer.load(path)
    record = _corpus_record(run_dir / CORPUS_RECORD)
    if record is None and data_cfg.source != "moses":
        raise BestModelError(f"{path}: missing, and the run records no fingerprint of {data_cfg.source!r} "
                             "(corpus.json), so its token ids cannot be rebuilt safely; retrain the run")
    if record is not None and record.get("sha256") != corpus_sha256(data_cfg.source):
        raise BestModelError(f"{path}: missing, and {data_cfg.source!r} is not the file the run trained on "
                             f"(sha256 {record.get('sha256')} in {run_dir / CORPUS_RECORD}); restore vocab.json "
                             "or the file as it was")
    return corpus.load(data_cfg.source, "train", data_cfg.n_train_molecules, seed=0, progress=False).tokenizer


def _corpus_record(path: Path) -> dict | None:
    """corpus.json of a run, None for runs older than it; a damaged one is named."""
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as e:
        raise BestModelError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(record, dict):
        raise BestModelError(f"{path}: expected a JSON object with 'source' and 'sha256'")
    return record
