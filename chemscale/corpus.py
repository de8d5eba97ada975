"""SMILES sources -> SELFIES -> token ids, encoded once, cached and memory-mapped.

Sources: "moses" (the MOSES corpus shipped in the `molsets` wheel: train 1,584,663 SMILES;
its test split, 176,074, is our validation split), PubChem `CID-SMILES(.gz)` (`CID<TAB>SMILES`),
`.smi`/`.txt` (one SMILES per line, an optional name after whitespace) and `.csv(.gz)` with a
`smiles` column (any case).

Nested subsets: the molecules of a split are visited in one fixed permutation (by `seed`) and
`load(n_molecules=n)` returns the first n that encode, so the 10^3 set is inside the 10^4 set.
Only the needed prefix is encoded; a larger request encodes just the missing part and extends
the cache. Token ids are append-only in order of first appearance along the permutation, so
the vocabulary of the first n molecules is a prefix of the cache's, whatever was encoded before.

    python -m chemscale.corpus PATH [-n N] [--split train]   # what a file holds; PATH may be 'moses'
"""

from __future__ import annotations

import argparse
import array
import contextlib
import csv
import fcntl
import gzip
import hashlib
import importlib.metadata
import importlib.util
import io
import itertools
import json
import math
import multiprocessing as mp
import multiprocessing.connection
import os
import re
import sys
import time
import warnings
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import selfies as sf
import torch
from tqdm.auto import tqdm

from chemscale import paths
from chemscale.config import atomic_write_bytes, atomic_write_json
from chemscale.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer

CACHE_DIR = paths.CACHE / "corpus"  # tests point this at a temporary folder
SPLITS = ("train", "val")
MAX_VAL_MOLECULES = 10_000  # a user file's validation split: the last min(10%, this) of its permutation
MAX_SYMBOLS = 1024  # longer molecules (PubChem has peptides and polymers) are dropped as 'too_long'
# every reason a line is dropped for (the keys of EncodeReport.dropped)
REASONS = ("empty", "malformed", "invalid_smiles", "valence", "selfies_error", "too_long", "timeout", "crash")
N_EXAMPLES = 20  # offending lines kept per cache, for the report
ROUND_MOLECULES = 500_000  # molecules encoded between cache writes (bounds memory; a big encode resumes)
CACHE_FORMAT = 2  # bump when the cache layout or its meaning changes
# selfies 2.2.0 still says __version__ == "2.1.1": key the cache on the installed distribution
SELFIES_VERSION = importlib.metadata.version("selfies")
_SYMBOL = re.compile(r"\[[^\]]*\]|\.")  # one SELFIES symbol, or '.' between fragments (as split_selfies)
_CHUNK_MAX = 1000  # molecules a worker task: ~0.2-0.5 s of work against ~1 ms of IPC


class CorpusError(ValueError):
    """A SMILES source cannot be read or used; the message names the file and line."""


# --- reading SMILES ------------------------------------------------------------------------------

def moses_path(split: str = "train") -> Path:
    """Path of a MOSES file inside the molsets wheel, found without importing `moses` (its imports break)."""
    spec = importlib.util.find_spec("moses")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("source 'moses' needs the molsets wheel: pip install --no-deps molsets==0.3.1")
    name = {"train": "train.csv.gz", "val": "test.csv.gz"}[split]
    return Path(spec.submodule_search_locations[0]) / "dataset" / "data" / name


def _kind(path: Path) -> str:
    """'csv', 'pubchem' (CID<TAB>SMILES) or 'smi', from the file name."""
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(".csv"):
        return "csv"
    if "cid-smiles" in name:
        return "pubchem"
    if name.endswith((".smi", ".smiles", ".txt")):
        return "smi"
    raise CorpusError(f"{path}: unknown file type; expected a PubChem CID-SMILES(.gz), "
                      ".smi/.txt (one SMILES per line) or .csv(.gz) with a 'smiles' column")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of every line; \\r\\n is stripped, a corrupt .gz names its line."""
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    line_no = 0
    try:
        with opener(path, "rb") as f:
            for raw in f:
                line_no += 1
                # a stray non-UTF-8 byte in a molecule's name must not stop a 10M-line file
                yield line_no, raw.decode("utf-8", "replace").rstrip("\r\n").lstrip("\ufeff")
    except (EOFError, OSError, zlib.error) as e:
        raise CorpusError(f"{path}: line {line_no + 1}: cannot read past line {line_no} ({e}); "
                          "the file looks truncated or corrupt") from None


def _data_lines(path: Path) -> tuple[Iterator[tuple[int, str]], Callable[[str], tuple[str, str | None]]]:
    """The data lines of a file (after a CSV header) and the function that takes a SMILES out of one.

    That function returns (SMILES, None), or (text, problem) with problem 'empty' or 'malformed'.
    """
    if not path.is_file():
        raise CorpusError(f"{path}: no such file")
    kind = _kind(path)
    lines = _lines(path)
    column = _csv_column(path, lines) if kind == "csv" else None

    def smiles_of(text: str) -> tuple[str, str | None]:
        text = text.strip()
        if not text:
            return "", "empty"
        if kind == "csv":
            row = text.split(",") if '"' not in text else next(csv.reader([text]))
            value = row[column].strip() if column < len(row) else ""
        else:
            fields = text.split(None, 2)
            value = fields[0] if kind == "smi" else (fields[1] if len(fields) > 1 else "")
        return (value, None) if value else (text, "malformed")

    return lines, smiles_of


def _csv_column(path: Path, lines: Iterator[tuple[int, str]]) -> int:
    """Index of the 'smiles' column (any case) in a CSV header, read from `lines`."""
    _, header_line = next(lines, (1, ""))
    header = next(csv.reader([header_line]), [])
    lowered = [h.strip().lower() for h in header]
    if "smiles" not in lowered:
        raise CorpusError(f"{path}: line 1: no 'smiles' column (any case); columns found: {header}")
    return lowered.index("smiles")


def read_smiles(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, SMILES) of a file; empty and malformed lines are skipped."""
    lines, smiles_of = _data_lines(Path(path))
    for line_no, text in lines:
        smiles, problem = smiles_of(text)
        if problem is None:
            yield line_no, smiles


def _count_lines(path: Path, progress: bool) -> int:
    """Number of data lines (the records a permutation shuffles), empty ones included."""
    lines, _ = _data_lines(path)
    return sum(1 for _ in tqdm(lines, desc=f"counting {path.name}", unit=" lines", disable=not progress,
                               leave=False, mininterval=0.5))


def _pick(path: Path, records: np.ndarray, progress: bool) -> list[tuple[int, str, str | None]]:
    """(line number, SMILES or text, problem) of the data lines at indices `records`, in that order."""
    slot = {int(r): k for k, r in enumerate(records)}
    out: list = [None] * len(records)
    lines, smiles_of = _data_lines(path)
    found = 0
    for r, (line_no, text) in enumerate(tqdm(lines, desc=f"reading {path.name}", unit=" lines",
                                             disable=not progress, leave=False, mininterval=0.5)):
        k = slot.get(r)
        if k is not None:
            out[k] = (line_no, *smiles_of(text))
            found += 1
            if found == len(records):
                break
    if found < len(records):
        raise CorpusError(f"{path}: the file changed while being read (expected more lines)")
    return out


# --- SMILES -> SELFIES in worker processes, with a per-molecule timeout ------------------------------

_selfies_encoder = sf.encoder  # module-level so tests can swap in an encoder that hangs or crashes


def _encode_one(smiles: str) -> tuple[str | None, str | None]:
    """(SELFIES, None) or (None, drop reason). selfies itself rejects what does not parse,
    kekulize or respect valences, so RDKit (~40% more time per molecule) is not asked."""
    try:
        selfies = _selfies_encoder(smiles)
    except sf.EncoderError as e:
        message = str(e)
        if "semantic constraints" in message:
            return None, "valence"
        if "parse" in message or "kekuliz" in message:
            return None, "invalid_smiles"
        return None, "selfies_error"
    except Exception:  # noqa: BLE001 -- any failure drops this molecule, never the run
        return None, "selfies_error"
    return (selfies, None) if selfies else (None, "selfies_error")


def _worker_main(conn, position) -> None:
    """Worker loop: encode each (start, smiles) task, publishing `start + i` before molecule i."""
    with contextlib.suppress(EOFError, KeyboardInterrupt):
        while (task := conn.recv()) is not None:
            start, smiles = task
            results = []
            for i, s in enumerate(smiles):
                position.value = start + i
                results.append(_encode_one(s))
            conn.send(results)


class _Worker:
    """One encoding process. The parent watches `position` (shared memory, no IPC) to see
    which molecule it is on and since when: one stuck past the timeout gets the worker killed."""

    def __init__(self, ctx):
        self.position = ctx.RawValue("q", -1)
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child, self.position), daemon=True)
        self.process.start()
        child.close()  # so the parent sees EOF when the worker dies
        self.task: tuple[int, int] | None = None
        self.seen = (-1, 0.0)  # (position, when the parent first saw it)

    def submit(self, task: tuple[int, int], smiles: list[str]) -> None:
        self.position.value = -1
        self.task, self.seen = task, (-1, time.monotonic())
        self.conn.send((task[0], smiles[task[0]:task[1]]))

    def receive(self) -> list | None:
        """The finished task's results, or None if the worker died."""
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            return None

    def stuck(self, timeout_s: float) -> bool:
        """True if the same molecule has been encoding for more than `timeout_s`."""
        now, position = time.monotonic(), self.position.value
        if position != self.seen[0]:
            self.seen = (position, now)
            return False
        return now - self.seen[1] > timeout_s

    def stop(self, kill: bool = False) -> None:
        if not kill:
            with contextlib.suppress(OSError):
                self.conn.send(None)
            self.process.join(timeout=1)
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()


def _mp_context():
    # fork: workers start in milliseconds and inherit the (possibly monkeypatched) encoder
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def _tasks(n: int, workers: int) -> deque[tuple[int, int]]:
    """(start, stop) slices: several per worker for an even finish, at most _CHUNK_MAX each."""
    size = max(16, min(_CHUNK_MAX, math.ceil(n / (8 * workers))))
    return deque((i, min(i + size, n)) for i in range(0, n, size))


def encode_smiles(smiles: list[str], workers: int | None = None, timeout_s: float = 5.0,
                  progress: bool = True) -> list[tuple[str | None, str | None]]:
    """(SELFIES, None) or (None, reason) for each SMILES, in order, encoded in worker processes.

    A molecule still encoding after `timeout_s` seconds gets its worker killed and replaced and is
    dropped as 'timeout'; one whose worker dies is dropped as 'crash'. Either way the rest go on.
    """
    results: list = [None] * len(smiles)
    if not smiles:
        return results
    if workers is not None and workers < 1:
        raise CorpusError(f"workers must be >= 1 (or None for min(2, cores)), got {workers}")
    workers = workers or min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    tasks, ctx, false_starts = _tasks(len(smiles), workers), _mp_context(), 0
    pool = [_Worker(ctx) for _ in range(min(workers, len(tasks)))]
    bar = tqdm(total=len(smiles), desc="SMILES -> SELFIES", unit=" mol", disable=not progress, leave=False)
    try:
        while tasks or any(w.task for w in pool):
            for w in pool:
                if w.task is None and tasks:
                    w.submit(tasks.popleft(), smiles)
            ready = mp.connection.wait([w.conn for w in pool if w.task], timeout=min(0.05, timeout_s / 4))
            for i, w in enumerate(pool):
                if w.task is None:
                    continue
                done = w.receive() if w.conn in ready else None
                if done is not None:
                    results[w.task[0]:w.task[1]] = done
                    bar.update(w.task[1] - w.task[0])
                    w.task = None
                elif w.conn in ready or w.stuck(timeout_s):
                    false_starts += _fail(w, "crash" if w.conn in ready else "timeout", results, tasks, bar)
                    if false_starts > 3:
                        raise CorpusError("SMILES encoder worker processes keep dying before encoding anything")
                    pool[i] = _Worker(ctx)
    finally:
        bar.close()
        for w in pool:
            w.stop(kill=w.task is not None)
    return results


def _fail(w: _Worker, reason: str, results: list, tasks: deque, bar) -> int:
    """Drop the molecule worker `w` is stuck on and requeue the rest of its task; 1 if it had not started."""
    w.stop(kill=True)
    (start, stop), position = w.task, w.position.value
    if not start <= position < stop:
        tasks.appendleft((start, stop))
        return 1
    results[position] = (None, reason)
    bar.update(1)
    # the results of molecules it had already done died with it: requeue those too
    tasks.extendleft([t for t in ((position + 1, stop), (start, position)) if t[0] < t[1]])
    return 0


# --- the cache -----------------------------------------------------------------------------------

def _source_file(source: str, split: str) -> Path:
    return moses_path(split) if source == "moses" else Path(source).expanduser()


def _fingerprint(path: Path, progress: bool) -> dict:
    """sha256 and data-line count of a file, remembered by (path, size, mtime): big files are read once."""
    st = path.stat()
    memo_file = CACHE_DIR / "sources.json"
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    if key not in memo:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        memo[key] = {"sha256": digest.hexdigest(), "lines": _count_lines(path, progress)}
        atomic_write_json(memo_file, memo)
    return memo[key]


def _split_order(n_lines: int, whole_file: bool, split: str, seed: int) -> np.ndarray:
    """Data-line indices of a split, in the fixed order in which molecules are taken.

    MOSES has its own validation file; a user file's validation split is the last
    min(10%, 10,000) lines of its permutation, its training split the rest."""
    perm = np.random.default_rng(seed).permutation(n_lines)
    if whole_file:
        return perm
    n_val = min(n_lines // 10, MAX_VAL_MOLECULES)
    return perm[n_lines - n_val:] if split == "val" else perm[: n_lines - n_val]


@contextlib.contextmanager
def _locked(folder: Path):
    """Hold an exclusive lock on a cache folder: two runs of a sweep never write one cache at once."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass
class _State:
    """What a cache folder holds: molecules kept so far along the permutation, and what was dropped."""

    tokens: np.ndarray  # uint16, all kept molecules back to back, no specials
    offsets: np.ndarray  # int64, n_kept + 1
    positions: np.ndarray  # int64, each kept molecule's position in the permutation
    tokenizer: Tokenizer  # every symbol seen, in order of first appearance
    drops: dict  # reason -> positions in the permutation
    examples: list  # [position, line, smiles, reason] of the first N_EXAMPLES drops
    n_lines: int  # data lines in the split
    consumed: int  # positions taken so far
    encode_mol_per_s: float | None = None

    @property
    def n_kept(self) -> int:
        return len(self.positions)

    @property
    def exhausted(self) -> bool:
        return self.consumed >= self.n_lines


class _Cache:
    """One (file, split, seed) cache folder. Every file is written atomically and the manifest,
    written last, records their sizes: a folder without one, or whose files do not match it
    (an interrupted write), is ignored and rebuilt."""

    ARRAYS = ("tokens", "offsets", "positions")

    def __init__(self, folder: Path):
        self.folder = folder

    def read(self) -> _State | None:
        """The cached state, or None if absent or inconsistent."""
        try:
            m = json.loads((self.folder / "manifest.json").read_text())
            if m.get("format") != CACHE_FORMAT or any(
                    (self.folder / name).stat().st_size != size for name, size in m["files"].items()):
                return None
            arrays = {a: np.load(self.folder / f"{a}.npy", mmap_mode="r") for a in self.ARRAYS}
            tokenizer = Tokenizer.load(self.folder / "tokenizer.json")
            drops = json.loads((self.folder / "drops.json").read_text())
        except (OSError, ValueError, KeyError, TypeError):
            return None
        state = _State(**arrays, tokenizer=tokenizer, drops=drops["drops"], examples=drops["examples"],
                       n_lines=m["n_lines"], consumed=m["consumed"], encode_mol_per_s=m.get("encode_mol_per_s"))
        consistent = (len(state.tokens) == m["n_tokens"] and state.n_kept == m["n_kept"] == len(state.offsets) - 1
                      and state.offsets[-1] == len(state.tokens) and len(tokenizer) == m["vocab_size"])
        return state if consistent else None

    def write(self, state: _State, new_smiles: list[str]) -> None:
        """Write `state` (and append the kept SMILES `new_smiles`), manifest last."""
        (self.folder / "manifest.json").unlink(missing_ok=True)  # invalid from here until rewritten
        for name in self.ARRAYS:
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(getattr(state, name)))
            atomic_write_bytes(self.folder / f"{name}.npy", buf.getvalue())
        old = (self.folder / "smiles.txt").read_bytes() if state.n_kept > len(new_smiles) else b""
        atomic_write_bytes(self.folder / "smiles.txt", old + "".join(s + "\n" for s in new_smiles).encode())
        state.tokenizer.save(self.folder / "tokenizer.json")
        atomic_write_json(self.folder / "drops.json", {"drops": state.drops, "examples": state.examples})
        files = ("tokens.npy", "offsets.npy", "positions.npy", "smiles.txt", "tokenizer.json", "drops.json")
        atomic_write_json(self.folder / "manifest.json", {
            "format": CACHE_FORMAT, "files": {f: (self.folder / f).stat().st_size for f in files},
            "n_lines": state.n_lines, "consumed": state.consumed, "n_kept": state.n_kept,
            "n_tokens": len(state.tokens), "vocab_size": len(state.tokenizer), "selfies": SELFIES_VERSION,
            "encode_mol_per_s": state.encode_mol_per_s})


def _cache_folder(path: Path, whole_file: bool, split: str, seed: int, fingerprint: dict) -> Path:
    key = (f"format={CACHE_FORMAT}|sha256={fingerprint['sha256']}|whole_file={whole_file}|split={split}|"
           f"seed={seed}|selfies={SELFIES_VERSION}|max_symbols={MAX_SYMBOLS}")
    return CACHE_DIR / f"{path.name.split('.')[0]}-{split}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _empty_state(n_lines: int) -> _State:
    return _State(tokens=np.zeros(0, np.uint16), offsets=np.zeros(1, np.int64), positions=np.zeros(0, np.int64),
                  tokenizer=Tokenizer(), drops={}, examples=[], n_lines=n_lines, consumed=0)


def _fill(cache: _Cache, state: _State, order: np.ndarray, path: Path, target: int, workers, timeout_s: float,
          progress: bool) -> None:
    """Encode further along `order` until `target` molecules are kept or the split runs out.

    Works in rounds of at most ROUND_MOLECULES, writing the cache after each: memory stays
    bounded and an interrupted encode of a big file resumes from its last round."""
    n_encoded, seconds = 0, 0.0  # encoding alone, file reading excluded
    while state.n_kept < target and not state.exhausted:
        missing = target - state.n_kept
        n_take = min(missing + missing // 20 + 16, ROUND_MOLECULES)  # a margin of 5% + 16 for drops
        records = _pick(path, order[state.consumed: state.consumed + n_take], progress)
        to_encode = [s for _, s, problem in records if problem is None]
        t0 = time.perf_counter()
        encoded = encode_smiles(to_encode, workers, timeout_s, progress)
        n_encoded, seconds = n_encoded + len(to_encode), seconds + time.perf_counter() - t0
        new_smiles = _append(state, records, iter(encoded), path)
        state.encode_mol_per_s = n_encoded / seconds if n_encoded else state.encode_mol_per_s
        cache.write(state, new_smiles)
    if progress and n_encoded:
        print(f"{path.name}: encoded {n_encoded:,} molecules in {seconds:.1f} s "
              f"({n_encoded / seconds:,.0f} molecules/s)", file=sys.stderr)


def _append(state: _State, records: list, encoded: Iterator, path: Path) -> list[str]:
    """Add a round's molecules to `state` (kept ones as token ids, the others as drops); their SMILES."""
    new_smiles: list[str] = []
    tokens, lengths, positions = array.array("H"), array.array("q"), array.array("q")
    for position, (line_no, smiles, problem) in enumerate(records, start=state.consumed):
        selfies, reason = (None, problem) if problem else next(encoded)
        symbols = _SYMBOL.findall(selfies) if selfies else []
        if selfies and len(symbols) > MAX_SYMBOLS:
            reason = "too_long"
        if reason:
            state.drops.setdefault(reason, []).append(position)
            if len(state.examples) < N_EXAMPLES:
                state.examples.append([position, line_no, smiles, reason])
            continue
        if state.tokenizer.extend(symbols) and len(state.tokenizer) > np.iinfo(np.uint16).max + 1:
            raise CorpusError(f"{path}: {len(state.tokenizer)} SELFIES symbols do not fit uint16 token ids")
        tokens.extend(state.tokenizer.index[s] for s in symbols)
        lengths.append(len(symbols))
        positions.append(position)
        new_smiles.append(smiles)
    state.consumed += len(records)
    state.tokens = np.concatenate([state.tokens, np.frombuffer(tokens, np.uint16)])
    state.offsets = np.concatenate([state.offsets, state.offsets[-1] + np.cumsum(np.frombuffer(lengths, np.int64))])
    state.positions = np.concatenate([state.positions, np.frombuffer(positions, np.int64)])
    return new_smiles


# --- the corpus ----------------------------------------------------------------------------------

@dataclass
class EncodeReport:
    """What a corpus read, kept and dropped (by reason, with the first offending lines)."""

    source: str
    split: str
    seed: int
    read: int  # data lines taken along the permutation to keep `kept` molecules
    kept: int
    dropped: dict = field(default_factory=dict)  # reason (one of REASONS) -> count
    examples: list = field(default_factory=list)  # (line number, text, reason) of the first few drops
    vocab_size: int = 0  # tokens of the corpus's tokenizer, specials included
    unknown_symbols: list = field(default_factory=list)  # symbols a given tokenizer lacks (mapped to [UNK])
    length_mean: float = 0.0  # SELFIES symbols per molecule, without [BOS]/[EOS]
    length_p50: float = 0.0
    length_p90: float = 0.0
    length_p99: float = 0.0
    length_max: int = 0
    encode_mol_per_s: float | None = None  # of the encoding that filled the cache
    cached: bool = False  # True if this load encoded nothing

    def __str__(self) -> str:
        n_dropped = sum(self.dropped.values())
        by_reason = ", ".join(f"{r} {c:,}" for r, c in sorted(self.dropped.items(), key=lambda x: -x[1]))
        lines = [f"{self.source} [{self.split}, seed {self.seed}]: read {self.read:,} lines, "
                 f"kept {self.kept:,} molecules, dropped {n_dropped:,}" + (f" ({by_reason})" if by_reason else "")]
        lines += [f"  line {line}: {text!r} ({reason})" for line, text, reason in self.examples]
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
         progress: bool = True) -> TokenCorpus:
    """The first `n_molecules` molecules that encode along a split's fixed permutation (all if None).

    Encodes only what the cache lacks. With `tokenizer`, ids are mapped onto it (symbols it
    lacks become [UNK]), e.g. validation molecules onto the training vocabulary.
    """
    if split not in SPLITS:
        raise CorpusError(f"split must be one of {SPLITS}, got {split!r}")
    if n_molecules is not None and n_molecules <= 0:
        raise CorpusError(f"n_molecules must be > 0, got {n_molecules}")
    if timeout_s <= 0:
        raise CorpusError(f"timeout_s must be > 0, got {timeout_s}")
    path, whole_file = _source_file(source, split), source == "moses"
    if not path.is_file():
        raise CorpusError(f"{path}: no such file")
    fingerprint = _fingerprint(path, progress)
    cache = _Cache(_cache_folder(path, whole_file, split, seed, fingerprint))
    with _locked(cache.folder):
        state, cached = cache.read(), True
        if state is None or (not state.exhausted and (n_molecules is None or state.n_kept < n_molecules)):
            order = _split_order(fingerprint["lines"], whole_file, split, seed)
            if len(order) == 0:
                raise CorpusError(f"{path}: no molecules in split {split!r} ({fingerprint['lines']} data lines; "
                                  "a user file's validation split is the last 10% of its lines)")
            state = state or _empty_state(len(order))
            target = len(order) if n_molecules is None else n_molecules
            _fill(cache, state, order, path, target, workers, timeout_s, progress)
            state, cached = cache.read(), False
    if state is None or state.n_kept == 0:
        raise CorpusError(f"{path} [{split}]: no molecule could be encoded"
                          + (f" (dropped: {({r: len(p) for r, p in state.drops.items()})})" if state else ""))
    if n_molecules is not None and state.n_kept < n_molecules:
        warnings.warn(f"{path} [{split}]: asked for {n_molecules:,} molecules, the split has {state.n_kept:,}",
                      stacklevel=2)
    return _subset(state, cache.folder, "moses" if whole_file else str(path), split, seed, n_molecules,
                   tokenizer, cached)


def _subset(state: _State, folder: Path, source: str, split: str, seed: int, n: int | None,
            tokenizer: Tokenizer | None, cached: bool) -> TokenCorpus:
    """The first n kept molecules of a cache, with their own vocabulary (or mapped onto `tokenizer`)."""
    n = state.n_kept if n is None else min(n, state.n_kept)
    offsets = state.offsets[: n + 1]
    tokens = state.tokens[: offsets[-1]]
    used = int(tokens.max()) + 1 if len(tokens) else 4  # ids come in order of first appearance
    own, unknown = Tokenizer(state.tokenizer.symbols[4:used]), []
    if tokenizer is not None:
        if len(tokenizer) > np.iinfo(np.uint16).max + 1:
            raise CorpusError(f"a tokenizer of {len(tokenizer)} tokens does not fit uint16 token ids")
        lookup = np.array([tokenizer.index.get(s, UNK_ID) for s in own.symbols], dtype=np.uint16)
        unknown = [s for s in own.symbols[4:] if s not in tokenizer.index]
        tokens, own = lookup[tokens], tokenizer
    read = int(state.positions[n - 1]) + 1 if n < state.n_kept else state.consumed
    lengths = np.diff(np.asarray(offsets))
    report = EncodeReport(
        source=source, split=split, seed=seed, read=read, kept=n,
        dropped={r: c for r, p in state.drops.items() if (c := sum(1 for x in p if x < read))},
        examples=sorted((line, text, reason) for pos, line, text, reason in state.examples if pos < read)[:5],
        vocab_size=len(own), unknown_symbols=unknown, length_mean=float(lengths.mean()),
        length_p50=float(np.percentile(lengths, 50)), length_p90=float(np.percentile(lengths, 90)),
        length_p99=float(np.percentile(lengths, 99)), length_max=int(lengths.max()),
        encode_mol_per_s=state.encode_mol_per_s, cached=cached)
    return TokenCorpus(tokens, offsets, own, report, folder / "smiles.txt")


# --- batches -------------------------------------------------------------------------------------

def pad_batch(seqs: list[np.ndarray]) -> torch.Tensor:
    """(B, T) LongTensor: [BOS] ids [EOS] then [PAD] up to the longest molecule in the batch."""
    T = max(len(s) for s in seqs) + 2
    out = np.full((len(seqs), T), PAD_ID, dtype=np.int64)
    out[:, 0] = BOS_ID
    for i, s in enumerate(seqs):
        out[i, 1: len(s) + 1] = s
        out[i, len(s) + 1] = EOS_ID
    return torch.from_numpy(out)


class MoleculeLoader:
    """Batches of a TokenCorpus, (B, T) LongTensors from `pad_batch`, one epoch per iteration.

    Each iteration shuffles with numpy Generator(seed + epoch) and then advances the epoch, so
    epochs differ yet are reproducible; `set_epoch(e)` picks the next one (e.g. on resume).
    With `max_len`, molecules whose [BOS] ids [EOS] is longer are left out (`n_skipped`).
    """

    def __init__(self, corpus: TokenCorpus, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = True, max_len: int | None = None):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        self.corpus, self.batch_size, self.shuffle, self.drop_last = corpus, batch_size, shuffle, drop_last
        self.seed = seed
        lengths = np.diff(np.asarray(corpus.offsets)) + 2
        self.index = np.flatnonzero(lengths <= max_len) if max_len is not None else np.arange(len(corpus))
        self.n_skipped = len(corpus) - len(self.index)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.index)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        order = np.random.default_rng(self.seed + self.epoch).permutation(self.index) if self.shuffle else self.index
        self.epoch += 1
        for b in range(len(self)):
            yield pad_batch([self.corpus[i] for i in order[b * self.batch_size: (b + 1) * self.batch_size]])


# --- command line --------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chemscale.corpus",
                                     description="Encode a SMILES source (cached) and report what it holds.")
    parser.add_argument("path", help="'moses', a PubChem CID-SMILES(.gz), a .smi/.txt or a .csv(.gz) file")
    parser.add_argument("-n", type=int, default=None, help="only the first N molecules of the permutation")
    parser.add_argument("--split", default="train", choices=SPLITS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds a molecule may take to encode")
    args = parser.parse_args(argv)
    try:
        corpus = load(args.path, args.split, args.n, seed=args.seed, workers=args.workers, timeout_s=args.timeout)
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(corpus.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
