"""A corpus: the first n molecules of a SMILES source's split, as memory-mapped token ids; the CLI.

Sources: "moses" (the MOSES corpus shipped in the `molsets` wheel: train 1,584,663 SMILES;
its test file, 176,074, gives our validation split and, from 10,000 of its lines, our test
split) or a file in one of three layouts, read from its content whatever its name
(`chemscale.lm.read`): PubChem `CID<TAB>SMILES`, one SMILES per line with an optional name, or
CSV with a `smiles` column; `format=` overrides the layout. A file's lines are split three ways
(training, then test and validation, min(10%, 10,000) lines each): `chemscale.lm.cache.split_range`;
its test and validation splits drop the lines whose SMILES is also on a training line, reported
as 'in_training_split' with the other drops: no held-out molecule is written on a training line.

Nested subsets: the molecules of a split are visited in one fixed permutation (by `seed`) and
`load(n_molecules=n)` returns the first n that encode, so the 10^3 set is inside the 10^4 set.
Only the needed prefix is encoded, once: `chemscale.lm.cache` keeps what was encoded.

    python -m chemscale.lm.corpus PATH [--format pubchem|smi|csv]  # the whole file: lines, kept, dropped, splits
    python -m chemscale.lm.corpus PATH -n N [--split val]          # the first N molecules of a split
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import textwrap
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from chemscale.lm.cache import SPLITS, State, encoded, n_data_lines, source_file, source_fingerprint, split_order
from chemscale.lm.read import LAYOUTS, CorpusError
from chemscale.lm.tokenizer import UNK_ID, Tokenizer

__all__ = ["EncodeReport", "FileReport", "TokenCorpus", "describe", "load", "main"]


# --- the corpus ----------------------------------------------------------------------------------

@dataclass
class EncodeReport:
    """What a corpus read, kept and dropped (by reason, with the first offending lines)."""

    source: str
    split: str
    seed: int
    read: int  # data lines taken along the permutation to keep `kept` molecules
    kept: int
    dropped: dict = field(default_factory=dict)  # reason (one of cache.REASONS) -> count
    examples: list = field(default_factory=list)  # (line number, quoted text, reason) of the first few drops
    vocab_size: int = 0  # tokens of the corpus's tokenizer, specials included
    unknown_symbols: list = field(default_factory=list)  # symbols a given tokenizer lacks (mapped to [UNK])
    length_mean: float = 0.0  # SELFIES symbols per molecule, without [BOS]/[EOS]
    length_p50: float = 0.0
    length_p90: float = 0.0
    length_p99: float = 0.0
    length_max: int = 0
    encode_mol_per_s: float | None = None  # of the encoding that filled the cache
    cached: bool = False  # True if this load encoded nothing
    layout: str = ""  # how the file was read: layout (detected or given) and encoding

    def __str__(self) -> str:
        n_dropped = sum(self.dropped.values())
        by_reason = ", ".join(f"{r} {c:,}" for r, c in sorted(self.dropped.items(), key=lambda x: -x[1]))
        lines = [f"{self.source} [{self.split}, seed {self.seed}]: read {self.read:,} lines, "
                 f"kept {self.kept:,} molecules, dropped {n_dropped:,}" + (f" ({by_reason})" if by_reason else "")]
        if self.layout:
            lines.append(f"  {self.layout}")
        lines += [f"  line {line}: {text} ({reason})" for line, text, reason in self.examples]
        lines.append(f"  vocabulary: {self.vocab_size} tokens (4 special)")
        if self.unknown_symbols:
            lines.append(f"  symbols mapped to [UNK]: {' '.join(self.unknown_symbols)}")
        lines.append(f"  SELFIES tokens per molecule: mean {self.length_mean:.1f}, median {self.length_p50:.0f}, "
                     f"90% {self.length_p90:.0f}, 99% {self.length_p99:.0f}, max {self.length_max}")
        if self.encode_mol_per_s:
            cached = " (cached)" if self.cached else ""
            lines.append(f"  encoded at {self.encode_mol_per_s:,.0f} molecules/s{cached}")
        return "\n".join(lines)


class TokenCorpus:
    """Molecules as flat token ids (no specials): molecule i = tokens[offsets[i]:offsets[i+1]]."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, tokenizer: Tokenizer, report: EncodeReport,
                 smiles_file: Path):
        self.tokens, self.offsets, self.tokenizer, self.report = tokens, offsets, tokenizer, report
        self._smiles_file = smiles_file
        self._smiles: list[str] | None = None  # read on first use: only novelty needs them

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"molecule {i} of a corpus of {len(self)}")
        i %= len(self)
        return self.tokens[self.offsets[i]: self.offsets[i + 1]]

    def smiles(self) -> list[str]:
        """The input SMILES of the kept molecules, in corpus order (read from the cache on first use).

        MOSES SMILES are RDKit-canonical already; `molecules.quality` canonicalises anyway."""
        if self._smiles is None:
            with open(self._smiles_file, encoding="utf-8") as f:
                self._smiles = [line.rstrip("\n") for line in itertools.islice(f, len(self))]
        return self._smiles

    @property
    def n_tokens(self) -> int:
        """Tokens a pass over the corpus reads, [BOS] and [EOS] included."""
        return int(self.offsets[-1] - self.offsets[0]) + 2 * len(self)

    def __repr__(self) -> str:
        return f"TokenCorpus({len(self):,} molecules, {self.n_tokens:,} tokens, {len(self.tokenizer)} token ids)"


def load(source: str = "moses", split: str = "train", n_molecules: int | None = None, *, seed: int = 0,
         tokenizer: Tokenizer | None = None, workers: int | None = None, timeout_s: float = 5.0,
         progress: bool = True, format: str | None = None) -> TokenCorpus:  # noqa: A002 -- the CLI's --format
    """The first `n_molecules` molecules that encode along a split's fixed permutation (all if None).

    Encodes only what the cache lacks. With `tokenizer`, ids are mapped onto it (symbols it
    lacks become [UNK]), e.g. validation molecules onto the training vocabulary. The file's
    layout is read from its content unless `format` ('pubchem', 'smi' or 'csv') says it.
    """
    _check_args(split, n_molecules, timeout_s, seed)
    smiles_file, whole_file = source_file(source, split, format)
    state, cached, folder = encoded(smiles_file, whole_file, split, seed, n_molecules, workers, timeout_s, progress)
    if state.n_kept == 0:
        dropped = {r: len(p) for r, p in state.drops.items()}
        raise CorpusError(f"{smiles_file.path} [{split}]: no molecule could be encoded ({smiles_file.describe()}; "
                          f"dropped: {dropped})")
    if n_molecules is not None and state.n_kept < n_molecules:
        warnings.warn(f"{smiles_file.path} [{split}]: asked for {n_molecules:,} molecules, the split has "
                      f"{state.n_kept:,}", stacklevel=2)
    report = _report(state, "moses" if whole_file else str(smiles_file.path), split, seed, n_molecules, cached)
    report.layout = smiles_file.describe()
    return _subset(state, folder, report, tokenizer)


def _check_args(split: str, n_molecules: int | None, timeout_s: float, seed: int) -> None:
    if split not in SPLITS:
        raise CorpusError(f"split must be one of {SPLITS}, got {split!r}")
    if n_molecules is not None and n_molecules <= 0:
        raise CorpusError(f"n_molecules must be > 0, got {n_molecules}")
    if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):  # nan passes <= 0
        raise CorpusError(f"timeout must be a number of seconds > 0, got {timeout_s}")
    if not (isinstance(seed, (int, np.integer)) and 0 <= seed < 2**63):
        raise CorpusError(f"seed must be an integer >= 0, got {seed!r}")


def _report(state: State, source: str, split: str, seed: int, n: int | None, cached: bool) -> EncodeReport:
    """What the first n kept molecules of a cache cost: lines read, drops on the way, lengths."""
    n = state.n_kept if n is None else min(n, state.n_kept)
    read = int(state.positions[n - 1]) + 1 if n < state.n_kept else state.consumed
    lengths = np.diff(np.asarray(state.offsets[: n + 1]))
    return EncodeReport(
        source=source, split=split, seed=seed, read=read, kept=n,
        dropped={r: c for r, p in state.drops.items() if (c := sum(1 for x in p if x < read))},
        examples=sorted((line, text, reason) for pos, line, text, reason in state.examples if pos < read)[:5],
        length_mean=float(lengths.mean()), length_p50=float(np.percentile(lengths, 50)),
        length_p90=float(np.percentile(lengths, 90)), length_p99=float(np.percentile(lengths, 99)),
        length_max=int(lengths.max()), encode_mol_per_s=state.encode_mol_per_s, cached=cached)


def _subset(state: State, folder: Path, report: EncodeReport, tokenizer: Tokenizer | None) -> TokenCorpus:
    """The first report.kept molecules of a cache, with their own vocabulary (or mapped onto `tokenizer`)."""
    offsets = state.offsets[: report.kept + 1]
    tokens = state.tokens[: offsets[-1]]
    used = int(tokens.max()) + 1 if len(tokens) else 4  # ids come in order of first appearance
    own = Tokenizer(state.tokenizer.symbols[4:used])
    if tokenizer is not None:
        if len(tokenizer) > np.iinfo(np.uint16).max + 1:
            raise CorpusError(f"a tokenizer of {len(tokenizer)} tokens does not fit uint16 token ids")
        lookup = np.array([tokenizer.index.get(s, UNK_ID) for s in own.symbols], dtype=np.uint16)
        report.unknown_symbols = [s for s in own.symbols[4:] if s not in tokenizer.index]
        tokens, own = lookup[tokens], tokenizer
    report.vocab_size = len(own)
    return TokenCorpus(tokens, offsets, own, report, folder / "smiles.txt")


# --- what a whole file holds ---------------------------------------------------------------------

@dataclass
class FileReport:
    """A whole file: its lines, the molecules kept, every dropped line by reason, and the splits."""

    source: str
    layout: str  # how it was read (SmilesFile.describe)
    n_lines: int  # every line, a CSV header included
    kept: int
    dropped: dict  # reason -> sorted line numbers
    examples: list  # (line number, quoted text, reason) of a few dropped lines
    splits: dict  # split -> (data lines, molecules kept)
    seed: int
    train: EncodeReport | None = None  # the training split's report (vocabulary, lengths)

    def __str__(self) -> str:
        n_dropped = sum(len(v) for v in self.dropped.values())
        out = [f"{self.source}: {self.n_lines:,} lines; {self.layout}",
               f"  kept {self.kept:,} molecules, dropped {n_dropped:,} line{'' if n_dropped == 1 else 's'}"]
        for reason, lines in sorted(self.dropped.items(), key=lambda x: -len(x[1])):
            text = f"{reason} {len(lines):,}: line{'s' if len(lines) > 1 else ''} {_ranges(lines)}"
            out += textwrap.wrap(text, 110, initial_indent="    ", subsequent_indent="      ")
        if self.examples:
            out.append("  dropped lines, for example:")
            out += [f"    line {line}: {text} ({reason})" for line, text, reason in self.examples]
        splits = ", ".join(f"{s} {kept:,} molecules of {n:,} lines" for s, (n, kept) in self.splits.items())
        short = " (a file under 10 lines has no validation or test split)" if self.splits.get("val") == (0, 0) else ""
        out.append(f"  splits (seed {self.seed}): {splits}{short}")
        if self.train is not None:
            t = self.train
            out.append(f"  train vocabulary: {t.vocab_size} tokens (4 special); SELFIES tokens per molecule: mean "
                       f"{t.length_mean:.1f}, median {t.length_p50:.0f}, 99% {t.length_p99:.0f}, max {t.length_max}")
        return "\n".join(out)


def _ranges(numbers: list[int]) -> str:
    """'2-3, 6' for [2, 3, 6]: every line number, runs written once."""
    parts, start = [], None
    for a, b in itertools.zip_longest(numbers, numbers[1:]):
        start = a if start is None else start
        if b != a + 1:
            parts.append(f"{start}" if start == a else f"{start}-{a}")
            start = None
    return ", ".join(parts)


def describe(source: str, *, seed: int = 0, workers: int | None = None, timeout_s: float = 5.0,
             progress: bool = True, format: str | None = None, split: str = "train") -> FileReport:  # noqa: A002
    """Encode every split of a file (cached, as training would) and say what the whole file holds.

    MOSES keeps its splits in two files (its test file holds val and test): `split` picks the one described."""
    _check_args(split, None, timeout_s, seed)
    smiles_file, whole_file = source_file(source, split, format)
    fingerprint = source_fingerprint(smiles_file, progress)
    report = FileReport(source="moses" if whole_file else str(smiles_file.path), layout=smiles_file.describe(),
                        n_lines=fingerprint["n_lines"], kept=0, dropped={}, examples=[], splits={}, seed=seed)
    for name in [split] if whole_file else list(SPLITS):
        order = split_order(n_data_lines(smiles_file, fingerprint), whole_file, name, seed)
        if len(order) == 0:
            report.splits[name] = (0, 0)
            continue
        state, cached, _ = encoded(smiles_file, whole_file, name, seed, None, workers, timeout_s, progress)
        report.splits[name], report.kept = (len(order), state.n_kept), report.kept + state.n_kept
        for reason, positions in state.drops.items():  # permutation positions -> line numbers
            lines = order[np.asarray(positions, np.int64)] + 1 + smiles_file.header_lines
            report.dropped[reason] = sorted(report.dropped.get(reason, []) + lines.tolist())
        report.examples = sorted(report.examples + [tuple(e[1:]) for e in state.examples])[:5]
        if name == "train" and state.n_kept:
            report.train = _report(state, source, name, seed, None, cached)
            report.train.vocab_size = len(state.tokenizer)
    return report


# --- command line --------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m chemscale.lm.corpus",
        description="Encode a SMILES source (cached) and report what it holds: without -n the whole file "
                    "(lines, molecules kept, every dropped line by reason, split sizes), with -n the first "
                    "N molecules of a split.")
    parser.add_argument("path", help="'moses' or a SMILES file (PubChem CID<TAB>SMILES, .smi/.txt, .csv; gzip or not)")
    parser.add_argument("-n", type=int, default=None, help="only the first N molecules of the split's permutation")
    parser.add_argument("--split", default="train", choices=SPLITS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds a molecule may take to encode")
    parser.add_argument("--format", choices=tuple(LAYOUTS), default=None,
                        help="the file's layout, when detecting it from the content is not wanted: "
                             + "; ".join(f"{k}: {v}" for k, v in LAYOUTS.items()))
    args = parser.parse_args(argv)
    common = dict(seed=args.seed, workers=args.workers, timeout_s=args.timeout, format=args.format)
    try:
        if args.n is None:
            report = describe(args.path, split=args.split, **common)
            print(report)
            if report.kept == 0:
                raise CorpusError(f"{report.source}: no molecule could be encoded")
        else:
            print(load(args.path, args.split, args.n, **common).report)
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
