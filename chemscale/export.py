"""Take a trained ChemGPT away as a Hugging Face model: `python -m chemscale.export RUN_DIR OUT_DIR`.

The folder written holds what `transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR)` and
`transformers.AutoTokenizer.from_pretrained(OUT_DIR)` load without chemscale and without a
network: the run's best weights as a `GPTNeoForCausalLM` (same logits as chemscale's model), a
`tokenizers` word-level tokenizer over the run's SELFIES vocabulary (one token per `[...]`
symbol, `[PAD] [BOS] [EOS] [UNK]` at the model's ids 0-3) and a model card, `README.md`, saying
what the model was trained on, how large it is and the loss it reached. The vocabulary is also
copied into the run folder (`vocab.json`), so the run no longer depends on the shared corpus cache
to be read.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from chemscale import lm, runs
from chemscale.config import ConfigError, atomic_write_text
from chemscale.corpus import CorpusError
from chemscale.tokenizer import BOS_ID, EOS_ID, SPECIALS, Tokenizer, TokenizerError

VOCAB = "vocab.json"  # the run's vocabulary, copied into the run folder at export
SYMBOL_PATTERN = r"\[[^\]]*\]|\."  # one SELFIES symbol, or '.' between fragments (as selfies.split_selfies)


class ExportError(ValueError):
    """A run cannot be exported, or the export folder is in the way; the message says which and why."""


def export_hf(run_dir: str | os.PathLike, out_dir: str | os.PathLike, force: bool = False) -> Path:
    """Write the best ChemGPT of `run_dir` to `out_dir` as a Hugging Face model + tokenizer + card.

    Refuses a run without best weights and an existing non-empty `out_dir` (unless `force`,
    which replaces it). The folder appears whole or not at all: it is built beside `out_dir` and
    renamed into place. Returns `out_dir`.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    config = _check_run(run_dir)
    _check_target(out_dir, force)
    if run_dir.resolve().is_relative_to(out_dir.resolve()):
        raise ExportError(f"{out_dir}: holds the run {run_dir} itself; export to another folder")
    model, train_corpus = lm.load_best(run_dir)
    _keep_vocabulary(run_dir, train_corpus.tokenizer)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        hf = model.to_hf()
        hf.generation_config.max_length = model.config.n_positions  # whole molecules by default, not 20 tokens
        _save_quietly(hf, tmp)
        hf_tokenizer(train_corpus.tokenizer, model.config.n_positions).save_pretrained(tmp)
        _name_tokenizer_class(tmp / "tokenizer_config.json")
        atomic_write_text(tmp / "README.md", model_card(run_dir, config, model, train_corpus))
        _move_into_place(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _save_quietly(hf, folder: Path) -> None:
    """save_pretrained without its progress bar (one shard of a small model: a bar is noise)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        hf.save_pretrained(folder)
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _check_run(run_dir: Path) -> dict:
    """The run's config, once it is known to be a ChemGPT run with best weights."""
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir}: no such run folder")
    config = runs.read_config(run_dir)
    if config.get("task") != "chemgpt":
        raise ExportError(f"{run_dir}: a {config.get('task')!r} run; only ChemGPT runs export to Hugging Face")
    if not (run_dir / "best.pt").is_file():
        raise ExportError(f"{run_dir}: no best weights (best.pt); the run has not reached its first validation")
    return config


def _check_target(out_dir: Path, force: bool) -> None:
    """Refuse to write over a file, or over a folder with contents unless `force`."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ExportError(f"{out_dir}: folder exists and is not empty (pass --force to replace it)")


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished folder to `out_dir`, replacing what is there (already checked)."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _keep_vocabulary(run_dir: Path, tokenizer: Tokenizer) -> None:
    """Copy the vocabulary into the run folder; a different one already there means the cache changed."""
    path = run_dir / VOCAB
    if path.exists():
        kept = Tokenizer.load(path)
        if kept != tokenizer:
            raise ExportError(f"{path}: the vocabulary kept with this run ({len(kept)} tokens) differs from the "
                              f"corpus cache's ({len(tokenizer)} tokens); the cache was rebuilt differently")
        return
    tokenizer.save(path)


def hf_tokenizer(tokenizer: Tokenizer, max_length: int):
    """A `transformers` fast tokenizer with exactly chemscale's ids: [BOS] symbols [EOS], [UNK] for the unknown."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as RawTokenizer
    from transformers import PreTrainedTokenizerFast

    pad, bos, eos, unk = SPECIALS
    raw = RawTokenizer(models.WordLevel(dict(tokenizer.index), unk_token=unk))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex(SYMBOL_PATTERN), behavior="isolated")
    raw.post_processor = processors.TemplateProcessing(single=f"{bos} $A {eos}",
                                                       special_tokens=[(bos, BOS_ID), (eos, EOS_ID)])
    raw.decoder = decoders.Fuse()  # symbols are joined without spaces: decode gives a SELFIES string
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=bos, eos_token=eos, pad_token=pad,
                                   unk_token=unk, model_max_length=max_length,
                                   model_input_names=["input_ids", "attention_mask"],
                                   clean_up_tokenization_spaces=False)


def _name_tokenizer_class(path: Path) -> None:
    """Name the class every transformers release since 4.x resolves: 5.x writes its new `TokenizersBackend`,
    which 4.x does not know (5.x still loads `PreTrainedTokenizerFast`, an alias of it)."""
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    atomic_write_text(path, json.dumps(config, indent=2) + "\n")


def model_card(run_dir: Path, config: dict, model, train_corpus) -> str:
    """README.md of the export: data, size, loss, provenance and how to load and sample."""
    result = runs.read_result(run_dir) or {}
    data, c = config.get("data", {}), model.config
    loss = result.get("best_val_loss")
    loss_text = f"{loss:.4f} nats per token" if isinstance(loss, (int, float)) else "not recorded"
    status = result.get("status", "not finished (no result.json): the best weights so far")
    rows = {
        "data": f"`{data.get('source', 'moses')}`: {len(train_corpus):,} training molecules, validated on "
                f"{data.get('n_val_molecules', '?')} held-out molecules; {_count(result.get('tokens_seen'))} "
                "training tokens seen",
        "size": f"width {c.width}, depth {c.depth}, {c.n_heads} heads, context {c.n_positions} tokens, "
                f"{c.attention_layers} attention; {model.n_params(non_embedding=False):,} parameters "
                f"({model.n_params(non_embedding=True):,} without embeddings)",
        "vocabulary": f"{len(train_corpus.tokenizer)} tokens: one per SELFIES symbol, `[PAD] [BOS] [EOS] [UNK]` "
                      "at ids 0-3",
        "loss": f"best validation loss {loss_text} (next-token cross-entropy, padding excluded) at step "
                f"{result.get('best_step', '?')} of {result.get('steps', '?')}; run {status}",
        "provenance": f"chemscale commit `{config.get('meta', {}).get('git_commit')}`; exported "
                      f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}",
    }
    table = "\n".join(f"| {key} | {text} |" for key, text in rows.items())
    return _CARD.format(run=run_dir.name, study=config.get("study", "?"), table=table, max_length=c.n_positions)


def _count(n) -> str:
    return f"{n:,}" if isinstance(n, int) else "?"


_CARD = """---
library_name: transformers
tags: [chemistry, selfies, gpt-neo, chemscale]
---
# ChemGPT {run} (study {study})

A decoder-only transformer over SELFIES strings (GPT-Neo architecture, as ChemGPT, Frey et al.
2023), trained with chemscale and exported by `python -m chemscale.export`.

| | |
|---|---|
{table}

## Use

```python
import selfies as sf
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")
model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER")
out = model.generate(do_sample=True, num_return_sequences=5, max_length={max_length})  # starts from [BOS]
for selfies in tokenizer.batch_decode(out, skip_special_tokens=True):
    print(sf.decoder(selfies))
```

`tokenizer("[C][C][O]")` gives the ids of `[BOS][C][C][O][EOS]`, the framing the model was trained
on; symbols the training data lacked map to `[UNK]`. `skip_special_tokens=True` also drops a `[PAD]`,
`[BOS]` or `[UNK]` that a sample holds before its `[EOS]`; chemscale's generation quality counts such a
sample invalid instead.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chemscale.export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a ChemGPT run folder holding config.json and best.pt")
    parser.add_argument("out_dir", help="folder to write (must be absent or empty unless --force)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    args = parser.parse_args(argv)
    try:
        import tokenizers  # noqa: F401 -- both come with the dev extra
        import transformers  # noqa: F401
    except ImportError as e:
        print(f"error: exporting needs transformers ({e}); pip install 'transformers>=4.40'", file=sys.stderr)
        return 2
    try:
        out = export_hf(args.run_dir, args.out_dir, force=args.force)
    except (ExportError, ConfigError, CorpusError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{out}: Hugging Face model, tokenizer and README.md of {args.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
