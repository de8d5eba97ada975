"""SELFIES tokenizer: one token per `[...]` symbol, plus `[PAD] [BOS] [EOS] [UNK]`.

Ids are append-only: `extend` adds new symbols at the end, so a token id never changes
meaning once a corpus has been encoded with it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import selfies as sf

from chemscale.config import atomic_write_json

SPECIALS = ("[PAD]", "[BOS]", "[EOS]", "[UNK]")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)
FORMAT = "chemscale-selfies-tokenizer"
SYMBOL_PATTERN = r"\[[^\]]*\]|\."  # one SELFIES symbol, or '.' between fragments (as selfies.split_selfies)
_SYMBOL = re.compile(SYMBOL_PATTERN)


def split_symbols(text: str) -> list[str]:
    """The SELFIES symbols of `text`, and each stretch of other text between them as one piece.

    Unlike `selfies.split_selfies`, nothing is lost and nothing raises: "[C]x[O]" gives
    `[C]`, `x`, `[O]` and "[C][C" gives `[C]`, `[C`, so a malformed string encodes with [UNK]
    where it is malformed, exactly as the exported Hugging Face tokenizer splits it."""
    pieces, end = [], 0
    for m in _SYMBOL.finditer(text):
        if m.start() > end:
            pieces.append(text[end:m.start()])
        pieces.append(m.group())
        end = m.end()
    if end < len(text):
        pieces.append(text[end:])
    return pieces


class TokenizerError(ValueError):
    """A tokenizer file is missing, malformed or inconsistent; the message names the file."""


class Tokenizer:
    """Maps SELFIES symbols to integer ids and back; ids 0-3 are the special tokens."""

    def __init__(self, symbols: Iterable[str] = ()):
        self.symbols: list[str] = list(SPECIALS)
        self.index: dict[str, int] = {s: i for i, s in enumerate(self.symbols)}
        self.extend(symbols)

    @classmethod
    def from_selfies(cls, strings: Iterable[str]) -> Tokenizer:
        """A tokenizer of every symbol in `strings`, sorted so ids do not depend on the order."""
        found = set()
        for s in strings:
            found.update(sf.split_selfies(s))
        return cls(sorted(found))

    def extend(self, symbols: Iterable[str]) -> list[str]:
        """Append the symbols not yet known, in the order given; returns the ones added."""
        added = []
        for s in symbols:
            if s not in self.index:
                self.index[s] = len(self.symbols)
                self.symbols.append(s)
                added.append(s)
        return added

    def __len__(self) -> int:
        return len(self.symbols)

    def encode(self, selfies_string: str, add_special: bool = True) -> list[int]:
        """Token ids of a SELFIES string, framed by [BOS] ... [EOS]; unknown symbols and text outside
        `[...]` map to [UNK] (see `split_symbols`)."""
        ids = [self.index.get(s, UNK_ID) for s in split_symbols(selfies_string)]
        return [BOS_ID, *ids, EOS_ID] if add_special else ids

    def decode(self, ids: Iterable[int]) -> str:
        """SELFIES string of token ids: skips [PAD] and [BOS], stops at [EOS]."""
        out = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if i in (PAD_ID, BOS_ID):
                continue
            out.append(self.symbols[i] if 0 <= i < len(self.symbols) else SPECIALS[UNK_ID])
        return "".join(out)

    def save(self, path: str | Path) -> None:
        """Write the vocabulary as JSON (atomically: a reader never sees half a file)."""
        atomic_write_json(path, {"format": FORMAT, "version": 1, "symbols": self.symbols})

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Read a tokenizer written by `save`; a missing or malformed file raises TokenizerError."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise TokenizerError(f"{path}: tokenizer file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{path}: not a JSON file ({e})") from None
        symbols = data.get("symbols") if isinstance(data, dict) else None
        if not isinstance(symbols, list) or not all(isinstance(s, str) for s in symbols):
            raise TokenizerError(f"{path}: expected a JSON object with a list of strings under 'symbols'")
        if tuple(symbols[:4]) != SPECIALS:
            raise TokenizerError(f"{path}: 'symbols' must start with {list(SPECIALS)}, got {symbols[:4]}")
        if len(set(symbols)) != len(symbols):
            duplicated = sorted({s for s in symbols if symbols.count(s) > 1})
            raise TokenizerError(f"{path}: duplicate symbols {duplicated}")
        return cls(symbols[4:])

    def __eq__(self, other) -> bool:
        return isinstance(other, Tokenizer) and self.symbols == other.symbols

    def __repr__(self) -> str:
        return f"Tokenizer({len(self)} tokens)"
