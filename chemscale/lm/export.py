"""Take a trained ChemGPT away as a Hugging Face model: `python -m chemscale.lm.export RUN_DIR OUT_DIR`.

The folder written holds what `transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR)` and
`transformers.AutoTokenizer.from_pretrained(OUT_DIR)` load without chemscale and without a
network: the run's best weights as a `GPTNeoForCausalLM` (same logits as chemscale's model), a
`tokenizers` word-level tokenizer over the run's SELFIES vocabulary (one token per `[...]`
symbol, `[PAD] [BOS] [EOS] [UNK]` at the model's ids 0-3) and a model card, `README.md`, saying
what the model was trained on, how large it is and the loss it reached. The vocabulary comes from
the run folder's `vocab.json` (saved when the run started), so exporting needs neither the corpus
file nor its cache. `--force` replaces only an earlier export (it holds the marker file MARKER).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

from chemscale import runs
from chemscale.config import ConfigError, atomic_write_text, process_alive
from chemscale.lm import best
from chemscale.lm.read import CorpusError
from chemscale.lm.tokenizer import BOS_ID, SPECIALS, SYMBOL_PATTERN, Tokenizer, TokenizerError
from chemscale.task import BEST

VOCAB = best.VOCAB  # the run's vocabulary, saved in the run folder when it starts
MARKER = ".chemscale-export"  # written into every export: --force replaces only a folder holding it


class ExportError(ValueError):
    """A run cannot be exported, or the export folder is in the way; the message says which and why."""


def export_hf(run_dir: str | os.PathLike, out_dir: str | os.PathLike, force: bool = False) -> Path:
    """Write the best ChemGPT of `run_dir` to `out_dir` as a Hugging Face model + tokenizer + card.

    Refuses a run without best weights and an existing non-empty `out_dir` (unless `force`,
    which replaces it). The folder appears whole or not at all: it is built beside `out_dir` and
    renamed into place. Returns `out_dir`.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir).resolve()  # resolved: '.' has no name to build beside
    config = _check_run(run_dir)
    if Path.cwd().is_relative_to(out_dir):
        raise ExportError(f"{out_dir}: is (or holds) the current folder, which the export would replace, leaving "
                          "the shell in a deleted folder; export to a new folder, e.g. ./chemgpt-hf")
    if run_dir.resolve().is_relative_to(out_dir):
        raise ExportError(f"{out_dir}: holds the run {run_dir} itself; export to another folder")
    _check_target(out_dir, force)
    model, tokenizer = best.load_best_model(run_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.export-{os.getpid()}.tmp")
    tmp.mkdir(mode=0o777)  # the umask decides, as for any folder the user makes (mkdtemp would give 0700)
    try:
        hf = model.to_hf()
        hf.generation_config.max_length = model.config.n_positions  # whole molecules by default, not 20 tokens
        _save_quietly(hf, tmp)
        hf_tokenizer(tokenizer, model.config.n_positions).save_pretrained(tmp)
        _name_tokenizer_class(tmp / "tokenizer_config.json")
        atomic_write_text(tmp / "README.md", model_card(run_dir, config, model, tokenizer))
        atomic_write_text(tmp / MARKER, json.dumps({"run": str(run_dir.resolve())}) + "\n")
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
    runs.check_folder(run_dir, config)  # an edited config.json would build a model of another shape
    if not (run_dir / BEST).is_file():
        raise ExportError(f"{run_dir}: no best weights (best.pt); the run has not reached its first validation")
    return config


def _check_target(out_dir: Path, force: bool) -> None:
    """Refuse to write over a file, or over a folder with contents: `force` replaces only an earlier export."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir}: exists and is not a folder")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not (out_dir / MARKER).is_file():
        raise ExportError(f"{out_dir}: folder exists, is not empty and is not an earlier export (no {MARKER}); "
                          "choose another folder" + ("" if force else " or empty this one"))
    if not force:
        raise ExportError(f"{out_dir}: holds an earlier export (pass --force to replace it)")


def _remove_stale(out_dir: Path) -> None:
    """Remove folders that a killed export of `out_dir` left beside it (their process no longer runs)."""
    for tmp in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.export-*.tmp"):
        pid = re.fullmatch(r"(\d+)(\.old)?", tmp.name[len(out_dir.name) + 9:-4])
        if pid and not process_alive(int(pid[1])):
            shutil.rmtree(tmp, ignore_errors=True)


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished folder to `out_dir`, replacing what is there (already checked)."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.export-{os.getpid()}.old.tmp")
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def hf_tokenizer(tokenizer: Tokenizer, max_length: int):
    """A `transformers` fast tokenizer with chemscale's ids: [BOS] symbols, [UNK] for the unknown.

    No [EOS] is added: a prompt must not end the molecule (generation would continue after it).
    "[C][C][O][EOS]" gives the framing chemscale trains on, to score whole molecules."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as RawTokenizer
    from transformers import PreTrainedTokenizerFast

    pad, bos, eos, unk = SPECIALS
    raw = RawTokenizer(models.WordLevel(dict(tokenizer.index), unk_token=unk))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex(SYMBOL_PATTERN), behavior="isolated")
    raw.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, BOS_ID)])
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


def model_card(run_dir: Path, config: dict, model, tokenizer: Tokenizer) -> str:
    """README.md of the export: data, size, loss, provenance and how to load and sample.

    The loss row cites the test loss (result.json's `test_loss` on `n_test_molecules`) beside the best
    validation loss when the run has one: the validation minimum chose the weights, so it is biased low."""
    result = runs.read_result(run_dir) or {}
    data, c = config.get("data", {}), model.config
    loss = result.get("best_val_loss")
    loss_text = f"{loss:.4f} nats per token" if isinstance(loss, (int, float)) else "not recorded"
    test_loss = result.get("test_loss")  # an unfinished run, or one from before the test split, has none
    test_text = (f"; test loss {test_loss:.4f} nats per token on {_count(result.get('n_test_molecules'))} held-out "
                 "test molecules that neither early stopping nor the choice of these weights saw"
                 if isinstance(test_loss, (int, float)) else "")
    status = result.get("status", "not finished (no result.json): the best weights so far")
    n_train = result.get("n_train_molecules", data.get("n_train_molecules"))  # kept, or asked for before the end
    rows = {
        "data": f"`{data.get('source', 'moses')}`: {_count(n_train)} training molecules, validated on "
                f"{data.get('n_val_molecules', '?')} held-out molecules; {_count(result.get('tokens_seen'))} "
                "training tokens seen",
        "size": f"width {c.width}, depth {c.depth}, {c.n_heads} heads, context {c.n_positions} tokens, "
                f"{c.attention_layers} attention; {model.n_params(non_embedding=False):,} parameters "
                f"({model.n_params(non_embedding=True):,} without embeddings)",
        "vocabulary": f"{len(tokenizer)} tokens: one per SELFIES symbol, `[PAD] [BOS] [EOS] [UNK]` "
                      "at ids 0-3",
        "loss": f"best validation loss {loss_text} (next-token cross-entropy, padding excluded) at step "
                f"{result.get('best_step', '?')} of {result.get('steps', '?')}{test_text}; run {status}",
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
2023), trained with chemscale and exported by `python -m chemscale.lm.export`.

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

`tokenizer("[C][C]")` gives the ids of `[BOS][C][C]`, a prompt to continue:
`model.generate(**tokenizer("[C][C]", return_tensors="pt"), do_sample=True, max_length={max_length})`.
To score a whole molecule, end it with `[EOS]`: `tokenizer("[C][C][O][EOS]")` is the framing the model
was trained on. Symbols the training data lacked, and text outside `[...]`, map to `[UNK]`.
`max_length` is set to the context ({max_length} tokens) in `generation_config.json`; passing
`max_new_tokens` instead works, with a transformers warning that it takes precedence.

`decode(..., skip_special_tokens=True)` does not stop at `[EOS]`: cut each sample at its first `[EOS]`
(id 2) before decoding. It also drops a `[PAD]`, `[BOS]` or `[UNK]` that a sample holds before its
`[EOS]`; chemscale's generation quality counts such a sample invalid instead.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chemscale.lm.export", description=__doc__.splitlines()[0])
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
    except (ExportError, ConfigError, CorpusError, TokenizerError, best.BestModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{out}: Hugging Face model, tokenizer and README.md of {args.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
