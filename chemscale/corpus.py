"""SMILES sources -> SELFIES -> token ids, encoded once, cached and memory-mapped.

Sources: "moses" (the MOSES corpus shipped in the `molsets` wheel: train 1,584,663 SMILES;
its test split is our validation split), PubChem `CID-SMILES(.gz)` (`CID<TAB>SMILES`), `.smi`
/ `.txt` (one SMILES per line, an optional name after whitespace) and `.csv(.gz)` with a
`smiles` column.

Nested subsets: the molecules of a split are visited in one fixed permutation (by `seed`) and
`load(n_molecules=n)` returns the first n that encode, so the 10^3 set is inside the 10^4 set.
Only the needed prefix is encoded; a larger request encodes just the missing part and extends
the cache. Token ids are append-only in order of first appearance along the permutation, so
the vocabulary of the first n molecules is a prefix of the cache's and does not depend on
what was encoded before.

    python -m chemscale.corpus PATH [-n N] [--split train]   # prints what a file holds
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import importlib.util
import io
import json
import os
import re
import signal
import sys
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import selfies as sf
import torch
from tqdm.auto import tqdm

from chemscale import paths
from chemscale.config import atomic_write_bytes, atomic_write_json, atomic_write_text
from chemscale.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer

CACHE_DIR = paths.CACHE / "corpus"
SPLITS = ("train", "val")
_SYMBOL = re.compile(r"\[[^\]]*\]|\.")  # a SELFIES symbol, or '.' between fragments
_CHUNK = 2000  # molecules per worker task: large enough that IPC is a small cost


class CorpusError(ValueError):
    """A SMILES source cannot be read; the message names the file and line."""


# --- reading SMILES -------------------------------------------------------------------------

def moses_path(split: str = "train") -> Path:
    """Path of a MOSES file inside the molsets wheel, found without importing `moses`."""
    spec = importlib.util.find_spec("moses")
    if spec is None or spec.origin is None:
        raise CorpusError("the MOSES corpus needs the molsets wheel: pip install --no-deps molsets==0.3.1")
    name = {"train": "train.csv.gz", "val": "test.csv.gz"}[split]
    return Path(spec.origin).parent / "dataset" / "data" / name


def _open_text(path: Path):
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline=None)
    return open(path, encoding="utf-8", newline=None)


def _kind(path: Path) -> str:
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(".csv"):
        return "csv"
    if "cid-smiles" in name:
        return "pubchem"
    return "smi"


def read_smiles(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, SMILES) for each line; empty lines yield '' (counted as dropped)."""
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"{path}: no such file")
    kind, line_no = _kind(path), 0
    try:
        with _open_text(path) as f:
            column = None
            if kind == "csv":
                header = next(csv.reader([f.readline()]), [])
                line_no = 1
                lowered = [h.strip().lower() for h in header]
                if "smiles" not in lowered:
                    raise CorpusError(f"{path}: line 1: no 'smiles' column; columns found: {header}")
                column = lowered.index("smiles")
            for line in f:
                line_no += 1
                yield line_no, _smiles_of(line, kind, column)
    except (EOFError, gzip.BadGzipFile, zlib.error, UnicodeDecodeError, OSError) as e:
        raise CorpusError(f"{path}: unreadable after line {line_no} ({type(e).__name__}: {e}); "
                          "is the file truncated or corrupt?") from None


def _smiles_of(line: str, kind: str, column: int | None) -> str:
    line = line.strip()
    if not line:
        return ""
    if kind == "csv":
        row = next(csv.reader([line]))
        return row[column].strip() if column < len(row) else ""
    fields = line.split("\t") if kind == "pubchem" else line.split()
    if kind == "pubchem":
        return fields[1].strip() if len(fields) > 1 else ""
    return fields[0]


# --- encoding (worker processes, per-molecule timeout) -----------------------------------------

class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def _encode_one(smiles: str, timeout_s: float) -> tuple[str | None, str | None]:
    """(SELFIES, None) or (None, reason). Older selfies releases hang on inputs like 'cc(':
    a SIGALRM timer interrupts the (pure Python) encoder after `timeout_s`."""
    if not smiles:
        return None, "empty"
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        return sf.encoder(smiles), None
    except _Timeout:
        return None, "timeout"
    except sf.EncoderError as e:
        return None, "invalid_smiles" if "parse" in str(e) else "selfies_error"
    except Exception:  # noqa: BLE001 -- any failure drops this molecule, never the run
        return None, "selfies_error"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _encode_chunk(smiles: list[str], timeout_s: float) -> list[tuple[str | None, str | None]]:
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        return [_encode_one(s, timeout_s) for s in smiles]
    finally:
        signal.signal(signal.SIGALRM, old)


def encode_smiles(smiles: list[str], workers: int | None = None, timeout_s: float = 5.0,
                  progress: bool = True) -> list[tuple[str | None, str | None]]:
    """SELFIES (or a drop reason) for each SMILES, in order, using worker processes."""
    workers = workers or min(2, os.cpu_count() or 1)
    chunks = [smiles[i:i + _CHUNK] for i in range(0, len(smiles), _CHUNK)]
    bar = tqdm(total=len(smiles), desc="SMILES -> SELFIES", unit="mol", disable=not progress, leave=False)
    out: list = []
    if workers <= 1 or len(chunks) <= 1:
        for c in chunks:
            out.extend(_encode_chunk(c, timeout_s))
            bar.update(len(c))
    else:
        with ProcessPoolExecutor(workers) as pool:
            for c, res in zip(chunks, pool.map(_encode_chunk, chunks, [timeout_s] * len(chunks))):
                out.extend(res)
                bar.update(len(c))
    bar.close()
    return out


# --- the cache ---------------------------------------------------------------------------------

@dataclass
class EncodeReport:
    """What an encoding read, kept and dropped (by reason, with the first offending lines)."""

    source: str
    split: str
    read: int = 0
    kept: int = 0
    dropped: dict = field(default_factory=dict)
    examples: list = field(default_factory=list)  # [line, smiles, reason], the first few
    vocab_size: int = 0
    length_mean: float = 0.0
    length_p50: float = 0.0
    length_p95: float = 0.0
    length_max: int = 0
    encode_mol_per_s: float | None = None
    cached: bool = False

    def __str__(self) -> str:
        lines = [f"{self.source} [{self.split}]: read {self.read:,}, kept {self.kept:,}, "
                 f"dropped {sum(self.dropped.values()):,} {self.dropped or ''}".rstrip(),
                 f"  vocabulary {self.vocab_size} tokens; SELFIES tokens per molecule: mean {self.length_mean:.1f}, "
                 f"median {self.length_p50:.0f}, 95% {self.length_p95:.0f}, max {self.length_max}"]
        for line, smiles, reason in self.examples:
            lines.append(f"  line {line}: {smiles!r} dropped ({reason})")
        if self.encode_mol_per_s:
            lines.append(f"  encoded at {self.encode_mol_per_s:,.0f} molecules/s")
        lines.append("  (from cache)" if self.cached else "")
        return "\n".join(x for x in lines if x)


def _file_digest(path: Path) -> str:
    """sha256 of a file, remembered by (path, size, mtime) so big files are hashed once."""
    st = path.stat()
    memo = CACHE_DIR / "digests.json"
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    known = json.loads(memo.read_text()) if memo.exists() else {}
    if key not in known:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        known[key] = h.hexdigest()
        atomic_write_json(memo, known)
    return known[key]


def _source_file(source: str, split: str) -> Path:
    if source == "moses":
        return moses_path(split)
    return Path(source).expanduser()


def _cache_dir(source: str, split: str, seed: int) -> Path:
    path = _source_file(source, split)
    if not path.exists():
        raise CorpusError(f"{path}: no such file")
    key = f"{_file_digest(path)}|{source == 'moses'}|{split}|{seed}|selfies-{sf.__version__}"
    return CACHE_DIR / hashlib.sha256(key.encode()).hexdigest()[:16]


def _order(source: str, split: str, seed: int) -> tuple[list[int], list[str], np.ndarray]:
    """(line numbers, SMILES, visiting order) of a split: a fixed permutation by `seed`.

    MOSES has its own test split for validation; a user file keeps the last
    min(10%, 10,000) molecules of its permutation for validation."""
    path = _source_file(source, split)
    lines, smiles = [], []
    for line_no, s in read_smiles(path):
        lines.append(line_no)
        smiles.append(s)
    perm = np.random.default_rng(seed).permutation(len(smiles))
    if source != "moses":
        n_val = min(len(smiles) // 10, 10_000)
        perm = perm[len(perm) - n_val:] if split == "val" else perm[: len(perm) - n_val]
    return lines, smiles, perm


class _Cache:
    """Files of one (source, split, seed) cache; the manifest is written last and checked on load."""

    FILES = ("tokens.npy", "offsets.npy", "smiles.txt", "tokenizer.json", "report.json")

    def __init__(self, folder: Path):
        self.folder = folder

    def load(self) -> dict | None:
        """The cache's contents, or None if absent or inconsistent (e.g. an interrupted write)."""
        manifest = self.folder / "manifest.json"
        if not manifest.exists():
            return None
        try:
            m = json.loads(manifest.read_text())
            tokens = np.load(self.folder / "tokens.npy", mmap_mode="r")
            offsets = np.load(self.folder / "offsets.npy", mmap_mode="r")
            smiles = (self.folder / "smiles.txt").read_text().split("\n")[:-1]
            tok = Tokenizer.load(self.folder / "tokenizer.json")
            report = json.loads((self.folder / "report.json").read_text())
        except (OSError, ValueError):
            return None
        ok = (len(tokens) == m["n_tokens"] and len(offsets) == m["n_kept"] + 1 and len(smiles) == m["n_kept"]
              and len(tok) == m["vocab_size"] and offsets[-1] == len(tokens))
        if not ok:
            return None
        return {"manifest": m, "tokens": tokens, "offsets": offsets, "smiles": smiles, "tokenizer": tok,
                "report": report}

    def save(self, tokens, offsets, smiles, tokenizer, report, consumed: int, exhausted: bool) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "manifest.json").unlink(missing_ok=True)  # invalid until rewritten below
        for name, arr in (("tokens.npy", tokens), ("offsets.npy", offsets)):
            buf = io.BytesIO()
            np.save(buf, arr)
            atomic_write_bytes(self.folder / name, buf.getvalue())
        atomic_write_text(self.folder / "smiles.txt", "".join(s + "\n" for s in smiles))
        tokenizer.save(self.folder / "tokenizer.json")
        atomic_write_json(self.folder / "report.json", report)
        atomic_write_json(self.folder / "manifest.json", {
            "n_tokens": int(len(tokens)), "n_kept": len(smiles), "vocab_size": len(tokenizer),
            "consumed": consumed, "exhausted": exhausted, "selfies": sf.__version__})


def _extend(cache: _Cache, state: dict | None, source: str, split: str, seed: int, n: int | None, workers,
            timeout_s: float, progress: bool) -> dict:
    """Encode further along the permutation until `n` molecules are kept (or the split runs out)."""
    lines, smiles, perm = _order(source, split, seed)
    if state is None:
        tokens, offsets, kept_smiles, tok = np.zeros(0, np.uint16), np.zeros(1, np.int64), [], Tokenizer()
        report, consumed = {"dropped": {}, "examples": [], "read": 0}, 0
    else:
        tokens, offsets = np.asarray(state["tokens"]), np.asarray(state["offsets"])
        kept_smiles, tok, report = list(state["smiles"]), state["tokenizer"], state["report"]
        consumed = state["manifest"]["consumed"]
    target = len(perm) if n is None else n
    t0, n_encoded = time.perf_counter(), 0
    new_tokens, new_lengths = [], []
    while len(kept_smiles) < target and consumed < len(perm):
        want = target - len(kept_smiles)
        idx = perm[consumed: consumed + max(want + want // 20 + 16, 1)]  # 5% margin for drops
        batch = [smiles[i] for i in idx]
        for i, s, (selfies, reason) in zip(idx, batch, encode_smiles(batch, workers, timeout_s, progress)):
            if len(kept_smiles) >= target:
                break  # the rest of this batch stays unconsumed, for a later, larger request
            consumed += 1
            n_encoded += 1
            if selfies is None:
                report["dropped"][reason] = report["dropped"].get(reason, 0) + 1
                if len(report["examples"]) < 10:
                    report["examples"].append([lines[i], s, reason])
                continue
            symbols = _SYMBOL.findall(selfies)
            tok.extend(symbols)
            new_tokens.append(np.fromiter((tok.index[x] for x in symbols), np.uint16, len(symbols)))
            new_lengths.append(len(symbols))
            kept_smiles.append(s)
    if new_tokens:
        tokens = np.concatenate([tokens, *new_tokens])
        offsets = np.concatenate([offsets, offsets[-1] + np.cumsum(new_lengths)])
    if len(tok) > np.iinfo(np.uint16).max:
        raise CorpusError(f"{source}: vocabulary of {len(tok)} symbols does not fit uint16 token ids")
    report["read"] = consumed
    report["encode_mol_per_s"] = n_encoded / max(time.perf_counter() - t0, 1e-9) if n_encoded else None
    cache.save(tokens, offsets, kept_smiles, tok, report, consumed, consumed >= len(perm))
    return cache.load()


class TokenCorpus:
    """The first n molecules of a split as flat token ids: molecule i = tokens[offsets[i]:offsets[i+1]]."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, tokenizer: Tokenizer, smiles: list[str],
                 report: EncodeReport):
        self.tokens, self.offsets, self.tokenizer = tokens, offsets, tokenizer
        self._smiles, self.report = smiles, report

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]: self.offsets[i + 1]]

    def smiles(self) -> list[str]:
        """The input SMILES of the kept molecules, in corpus order."""
        return self._smiles

    @property
    def n_tokens(self) -> int:
        """Tokens a pass over the corpus reads, [BOS] and [EOS] included."""
        return int(self.offsets[-1] - self.offsets[0]) + 2 * len(self)


def load(source: str = "moses", split: str = "train", n_molecules: int | None = None, *, seed: int = 0,
         tokenizer: Tokenizer | None = None, workers: int | None = None, timeout_s: float = 5.0,
         progress: bool = True) -> TokenCorpus:
    """The first `n_molecules` encodable molecules of a split (all if None), from the cache if there.

    With `tokenizer`, ids are mapped onto it (symbols it lacks become [UNK]), e.g. validation
    data onto the training vocabulary.
    """
    if split not in SPLITS:
        raise CorpusError(f"split must be one of {SPLITS}, got {split!r}")
    if n_molecules is not None and n_molecules <= 0:
        raise CorpusError(f"n_molecules must be > 0, got {n_molecules}")
    cache = _Cache(_cache_dir(source, split, seed))
    state, cached = cache.load(), True
    have = 0 if state is None else state["manifest"]["n_kept"]
    exhausted = state is not None and state["manifest"]["exhausted"]
    if state is None or (not exhausted and (n_molecules is None or have < n_molecules)):
        state, cached = _extend(cache, state, source, split, seed, n_molecules, workers, timeout_s, progress), False
    n = state["manifest"]["n_kept"] if n_molecules is None else min(n_molecules, state["manifest"]["n_kept"])
    if n == 0:
        raise CorpusError(f"{_source_file(source, split)}: no molecule could be encoded ({state['report']['dropped']})")
    offsets = state["offsets"][: n + 1]
    tokens = state["tokens"][: offsets[-1]]
    used = int(tokens.max()) + 1 if len(tokens) else 4  # ids are in order of first appearance
    own = Tokenizer(state["tokenizer"].symbols[4:used])
    if tokenizer is not None:
        lookup = np.array([tokenizer.index.get(s, UNK_ID) for s in own.symbols], dtype=np.uint16)
        tokens, own = lookup[tokens], tokenizer
    report = _report(source, split, state, n, tokens, offsets, own, cached)
    return TokenCorpus(tokens, offsets, own, state["smiles"][:n], report)


def _report(source, split, state, n, tokens, offsets, tokenizer, cached) -> EncodeReport:
    lengths = np.diff(np.asarray(offsets))
    r = state["report"]
    return EncodeReport(
        source=str(_source_file(source, split)) if source != "moses" else "moses", split=split, read=r["read"],
        kept=n, dropped=dict(r["dropped"]), examples=[tuple(e) for e in r["examples"]], vocab_size=len(tokenizer),
        length_mean=float(lengths.mean()), length_p50=float(np.percentile(lengths, 50)),
        length_p95=float(np.percentile(lengths, 95)), length_max=int(lengths.max()),
        encode_mol_per_s=r.get("encode_mol_per_s"), cached=cached)


def pad_batch(seqs: list[np.ndarray]) -> torch.Tensor:
    """(B, T) LongTensor: [BOS] ids [EOS] then [PAD] up to the longest molecule in the batch."""
    T = max(len(s) for s in seqs) + 2
    out = np.full((len(seqs), T), PAD_ID, dtype=np.int64)
    out[:, 0] = BOS_ID
    for i, s in enumerate(seqs):
        out[i, 1: len(s) + 1] = s
        out[i, len(s) + 1] = EOS_ID
    return torch.from_numpy(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chemscale.corpus", description="Report what a SMILES file holds.")
    parser.add_argument("path", help="'moses' or a CID-SMILES(.gz), .smi/.txt or .csv(.gz) file")
    parser.add_argument("-n", type=int, default=None, help="encode only the first N molecules of the permutation")
    parser.add_argument("--split", default="train", choices=SPLITS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        corpus = load(args.path, args.split, args.n, seed=args.seed)
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(corpus.report)
    print(json.dumps({k: v for k, v in asdict(corpus.report).items() if k != "examples"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
