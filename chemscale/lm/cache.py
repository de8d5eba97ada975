"""The on-disk corpus cache: one folder per (file, layout, split, seed), filled along a fixed permutation.

The lines of a file are visited in one fixed permutation (by `seed`) and each split is a fixed
stretch of it (`split_range`): MOSES's train.csv.gz is the training split, its test.csv.gz gives
the validation split and, from its last MAX_HELD_OUT lines, the test split; a user file gives
training, test and validation splits, in that order, and its test and validation splits drop
every line whose SMILES is also on a training line ('in_training_split', see `_read_records`). The
molecules of a split are visited in that order; a cache holds the molecules kept so far along it
(token ids back to back, offsets, positions, the SMILES) and what was dropped, by reason.
`encoded(..., target)` encodes only what the cache lacks: a larger request encodes just the
missing part and extends the cache, in rounds of ROUND_MOLECULES (a big encode resumes). Token
ids are append-only in order of first appearance along the permutation, so the vocabulary of the
first n molecules is a prefix of the cache's, whatever was encoded before.
Drops for a timeout or a worker crash depend on the machine's load, not the molecule: they are
retried on every load, and one that then encodes cuts the cache back to it and refills.

Every file is written atomically and a manifest written last records their sizes and checksums;
a folder is locked (flock) while one process reads or fills it.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import hashlib
import importlib.metadata
import io
import json
import mmap
import os
import re
import shutil
import sys
import time
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from chemscale import paths
from chemscale.config import atomic_write_bytes, atomic_write_json
from chemscale.lm.encode import encode_smiles, parent_only
from chemscale.lm.read import CorpusError, SmilesFile, clip, moses_path, open_smiles_file
from chemscale.lm.tokenizer import Tokenizer


CACHE_DIR = paths.CACHE / "corpus"  # the one place it is set; tests point it at a temporary folder
SPLITS = ("train", "val", "test")
MAX_HELD_OUT = 10_000  # lines of MOSES's test split; of a user file's validation and test splits: min(10%, this) each
MAX_SYMBOLS = 1024  # longer molecules (PubChem has peptides and polymers) are dropped as 'too_long'
SMILES_CHARS_PER_SYMBOL = 16  # a SMILES this many characters a symbol over MAX_SYMBOLS is too long unread
# every reason a line is dropped for (the keys of EncodeReport.dropped)
REASONS = ("empty", "malformed", "invalid_smiles", "valence", "selfies_error", "too_long", "timeout", "crash",
           "in_training_split")
N_EXAMPLES = 20  # offending lines kept per cache, for the report
ROUND_MOLECULES = 500_000  # molecules encoded between cache writes (bounds memory; a big encode resumes)
CACHE_FORMAT = 4  # bump when the cache layout or its meaning changes
SPOOL_FORMAT = 1  # of the records picked for an encode (`_Spool`)
SPOOL_MARGIN = 1.125  # a spool holds the lines for the molecules asked plus this much for drops
SPOOL_MAX_RECORDS = 1 << 24  # lines a spool holds at most: its index takes 13 bytes a line (220 MB at this)
PROBLEMS = (None, "empty", "malformed", "too_long", "in_training_split")  # a spooled record's, by code
TRANSIENT = ("timeout", "crash")  # drops that depend on the machine's load: retried on every load
HASH_ALWAYS_BYTES = 64 << 20  # files up to this size are hashed on every load (~50 ms), bigger ones memoised
STEM_CHARS = 40  # of a file's name in its cache folder's name
BIG_ENCODE = 100_000  # molecules: an encode this big says first what it will do
# selfies 2.2.0 still says __version__ == "2.1.1": key the cache on the installed distribution
SELFIES_VERSION = importlib.metadata.version("selfies")
_SYMBOL = re.compile(r"\[[^\]]*\]|\.")  # one SELFIES symbol, or '.' between fragments (as split_selfies)


# --- which lines a split takes ---------------------------------------------------------------------

def source_file(source: str, split: str, format: str | None) -> tuple[SmilesFile, bool]:  # noqa: A002
    """The file of a source and whether it is one whole split (MOSES) rather than a file to split."""
    whole_file = source == "moses"
    return open_smiles_file(moses_path(split) if whole_file else source, format), whole_file


def source_fingerprint(source: SmilesFile, progress: bool) -> dict:
    """sha256 and line count of a file. The count is memoised (cache/corpus/sources.json) under the
    content's sha256 for files up to HASH_ALWAYS_BYTES, under (path, size, mtime, ctime, inode) for
    bigger ones (PubChem's 1.5 GB is hashed once): `touch -r` after an edit still changes the ctime.
    Each entry carries a checksum, so an edited or damaged memo is recounted, never trusted."""
    _check_cache_root()
    st = source.path.stat()
    sha = _sha256(source.path) if st.st_size <= HASH_ALWAYS_BYTES else None
    where = f"sha256={sha}" if sha else (f"{source.path.resolve()}|{st.st_size}|{st.st_mtime_ns}|"
                                         f"{st.st_ctime_ns}|{st.st_ino}")
    key = f"{where}|encoding={source.encoding}|newline={source.newline!r}"
    memo_file = CACHE_DIR / "sources.json"
    memo = _read_memo(memo_file)
    entry = memo.get(key)
    try:
        if entry is not None and entry["check"] == _memo_check(key, entry["sha256"], entry["n_lines"]):
            return entry
    except (KeyError, TypeError):
        pass
    if entry is not None:
        warnings.warn(f"{memo_file}: the entry for {source.path} does not match its checksum; recounting",
                      stacklevel=3)
    lines = tqdm(source.lines(), desc=f"counting {source.path.name}", unit=" lines", disable=not progress,
                 leave=False, mininterval=0.5)
    n_lines = sum(1 for _ in lines)
    sha = sha or _sha256(source.path)
    memo[key] = {"sha256": sha, "n_lines": n_lines, "check": _memo_check(key, sha, n_lines)}
    atomic_write_json(memo_file, memo)
    return memo[key]


def _read_memo(memo_file: Path) -> dict:
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        return {}
    return memo if isinstance(memo, dict) else {}


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _memo_check(key: str, sha: str, n_lines: int) -> str:
    return hashlib.sha256(f"{key}|{sha}|{n_lines}".encode()).hexdigest()[:16]


def _check_cache_root() -> None:
    """The cache folder exists or can be made: else one line saying where and why, not a traceback."""
    try:
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CorpusError(f"{CACHE_DIR}: cannot create the corpus cache folder ({e.strerror or e}); "
                          "point CHEMSCALE_RUNS at a writable folder") from None
    if not os.access(CACHE_DIR, os.W_OK | os.X_OK):
        raise CorpusError(f"{CACHE_DIR}: the corpus cache folder is not writable; "
                          "point CHEMSCALE_RUNS at a writable folder")


def n_data_lines(source: SmilesFile, fingerprint: dict) -> int:
    return max(0, fingerprint["n_lines"] - source.header_lines)


def split_range(n_lines: int, whole_file: bool, split: str) -> tuple[int, int]:
    """(start, stop): the stretch of its file's permutation that a split takes.

    MOSES (`whole_file`): train.csv.gz is the training split, whole. Its test.csv.gz is split in
    two: validation takes the permutation's start and the test split its last MAX_HELD_OUT lines,
    so the first n validation molecules are the ones MOSES runs validated on before the test split
    existed (for n up to the validation split's size), and the test set, which neither early
    stopping nor the choice of best.pt ever sees, is the same whatever n_val_molecules a run asks.
    A user file: its last min(10%, MAX_HELD_OUT) lines are the validation split (as before the
    test split existed), the as many before them the test split, and the rest the training split.
    A line is in one split only, but a molecule may be on several lines: the held-out splits of a user
    file drop the lines whose SMILES is also on a training line (`_read_records`), so they are held out."""
    if whole_file:
        n_test = min(n_lines, MAX_HELD_OUT)
        return {"train": (0, n_lines), "val": (0, n_lines - n_test), "test": (n_lines - n_test, n_lines)}[split]
    n_held = min(n_lines // 10, MAX_HELD_OUT)
    return {"train": (0, n_lines - 2 * n_held), "test": (n_lines - 2 * n_held, n_lines - n_held),
            "val": (n_lines - n_held, n_lines)}[split]


def split_size(n_lines: int, whole_file: bool, split: str) -> int:
    """Data lines in a split (the length of `split_order`), without drawing the permutation."""
    start, stop = split_range(n_lines, whole_file, split)
    return stop - start


def split_order(n_lines: int, whole_file: bool, split: str, seed: int) -> np.ndarray:
    """Data-line indices of a split, in the fixed order in which molecules are taken (see `split_range`).

    The splits of one file are stretches of one permutation, so they never share a line."""
    start, stop = split_range(n_lines, whole_file, split)
    return np.random.default_rng(seed).permutation(n_lines)[start:stop]


def _training_lines(n_lines: int, seed: int) -> np.ndarray:
    """A mask over a user file's data lines: True on those of its training split (10 MB at 10^7 lines)."""
    mask = np.zeros(n_lines, bool)
    mask[split_order(n_lines, False, "train", seed)] = True
    return mask


def _pick(source: SmilesFile, records: np.ndarray, progress: bool) -> list[tuple[int, str, str | None]]:
    """(line number, SMILES or text, problem) of the data lines at indices `records`, in that order: one
    read of the file, in memory (for a few records: the molecules of an encode come from a `_Spool`)."""
    in_file_order = np.argsort(records, kind="stable")
    out: list = [None] * len(records)
    picked = _read_records(source, _in_order(records, in_file_order), len(records), progress)
    for k, record in zip(in_file_order.tolist(), picked, strict=False):
        out[k] = record
    for _ in picked:  # there is none left: this runs the check that the file had them all
        pass
    return out


def _in_order(lines: np.ndarray, order: np.ndarray, chunk: int = 1 << 16) -> Iterator[int]:
    """lines[order] as Python ints, a chunk at a time (no second array of the whole stretch)."""
    for i in range(0, len(order), chunk):
        yield from lines[order[i: i + chunk]].tolist()


def _read_records(source: SmilesFile, lines: Iterator[int], n: int, progress: bool,
                  training: np.ndarray | None = None, digests: bytearray | None = None
                  ) -> Iterator[tuple[int, str, str | None]]:
    """(line number, SMILES or text, problem) of the `n` data lines at the ascending indices `lines`, in file
    order: one read of the file (up to the last of them, or all of it with `training`).

    With `training` (`_training_lines`: the lines are of a held-out split), the read goes through the whole
    file and appends to `digests` the 8-byte blake2b digest of every training line's SMILES: a held-out
    record whose SMILES is among them gets the problem 'in_training_split' (`_in_training`), as a molecule
    on several lines of a file would otherwise be in training and in the held-out loss. The SMILES are
    compared as written, after the layout's parsing (PubChem's are canonical already): a molecule written two
    ways is not caught, as canonicalising 10^7 molecules with RDKit costs more than encoding them. The
    digests are a stable hash (the drops are the same in every process), 80 MB at 10^7 training lines; a
    collision can only drop a held-out line whose molecule is not in training, never keep one that is."""
    found = 0
    with tqdm(desc=f"reading {source.path.name}", unit=" lines", disable=not progress, leave=False,
              mininterval=0.5) as bar:
        if training is None:
            picked = source.data_lines_at(lines, bar.update)
        else:
            picked = _held_out_lines(source, lines, training, digests, bar.update)
        for line_no, text in picked:
            smiles, problem = source.smiles_of(text)
            if problem is None and len(smiles) > SMILES_CHARS_PER_SYMBOL * MAX_SYMBOLS:
                problem = "too_long"  # not worth the encoder's time
            found += 1
            yield line_no, smiles, problem
    if found < n:
        raise CorpusError(f"{source.path}: the file changed while being read (expected more lines)")


def _held_out_lines(source: SmilesFile, lines: Iterator[int], training: np.ndarray, digests: bytearray,
                    counted) -> Iterator[tuple[int, str]]:
    """(line number, text) of the data lines `lines` (ascending); every training line's digest goes to `digests`."""
    target = next(lines, None)
    r = -1
    for r, (line_no, text) in enumerate(source.data_lines()):
        if r < len(training) and training[r]:  # lines appended since: not training
            smiles, problem = source.smiles_of(text)
            if problem is None:
                digests += _digest(smiles)
        elif r == target:
            yield line_no, text
            target = next(lines, None)
        if r & 0xFFFF == 0xFFFF:
            counted(0x10000)
    counted((r + 1) & 0xFFFF)


def _digest(smiles: str) -> bytes:
    return hashlib.blake2b(smiles.encode(), digest_size=8).digest()


def _in_training(training_digests: bytearray, candidates: bytes) -> np.ndarray:
    """A mask over `candidates` (8-byte digests back to back): True where one is a training line's digest."""
    seen = np.frombuffer(training_digests, "<u8")
    seen.sort()  # in place: no second copy
    wanted = np.frombuffer(candidates, "<u8")
    if not len(seen):
        return np.zeros(len(wanted), bool)
    i = np.minimum(np.searchsorted(seen, wanted), len(seen) - 1)
    return seen[i] == wanted


class _Spool:
    """The records (SMILES or text, problem) of a stretch of a split's permutation, picked from the file in
    one read and kept on disk next to the cache until the encode that needs them is done.

    Why: a split's lines are visited in a random permutation, so every round of an encode takes lines from
    all over the file; picking each round's lines from the file read the whole file a round: 20 reads of
    PubChem's 10^8 lines for 10^7 molecules, hours. One read now picks every line the encode will take (with
    a margin for drops, SPOOL_MARGIN) in file order into `smiles.bin`, and each round takes its records by
    position. On disk, not in memory: 10^7 Python strings take over 1 GB, while the spool's index takes 13
    bytes a record (`rank`, int32 by position: the record's place in file order; `ends`, int64, and
    `problems`, uint8, in file order), memory-mapped like the SMILES, so a round holds only its own strings.
    Line numbers are not stored: a position's line is its index in the permutation. The files are written,
    then `spool.json` with their sizes and checksums: a spool without it (an interrupted read) is read
    again, and an encode interrupted after some rounds resumes from its spool without reading the file."""

    FILES = ("smiles.bin", "rank.npy", "ends.npy", "problems.npy")

    def __init__(self, folder: Path):
        self.folder = folder
        self.start = self.stop = 0  # the stretch of positions held; empty until opened or built
        self._opened = False
        self._blob, self._rank, self._ends, self._problems = b"", None, None, None

    def covers(self, start: int, stop: int, n_lines: int) -> bool:
        """True if the spool holds positions start..stop-1 of a split of `n_lines` lines (opened on first use)."""
        if not self._opened:
            self._opened = True
            if problem := self._open(n_lines):
                warnings.warn(f"{self.folder}: damaged spool ({problem}); reading the file again", stacklevel=4)
        return self.start <= start and stop <= self.stop

    def _open(self, n_lines: int, verify: bool = True) -> str | None:
        """Map a whole spool of this split; what is wrong with it, None if it is whole or absent.
        `verify`: check the files' checksums too (not right after writing them)."""
        try:
            meta = json.loads((self.folder / "spool.json").read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            return f"spool.json unreadable ({e})"
        try:
            if meta["checksum"] != _manifest_checksum(meta):
                return "spool.json does not match its checksum"
            if (meta["format"], meta["n_lines"], meta["too_long_chars"]) != (
                    SPOOL_FORMAT, n_lines, SMILES_CHARS_PER_SYMBOL * MAX_SYMBOLS):
                return None  # another split size or rule: stale, not damaged
            if verify and (problem := _Cache(self.folder)._check_files(meta["files"])):
                return problem
            rank, ends, problems = (np.load(self.folder / f"{a}.npy", mmap_mode="r")
                                    for a in ("rank", "ends", "problems"))
            start, stop = int(meta["start"]), int(meta["stop"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"unreadable ({e})"
        if not (0 <= start < stop <= n_lines and len(rank) == len(ends) == len(problems) == stop - start
                and (ends[-1] if len(ends) else 0) == meta["files"]["smiles.bin"][0]):
            return "its index disagrees with spool.json"
        self.start, self.stop, self._rank, self._ends, self._problems = start, stop, rank, ends, problems
        self._blob = self._map(self.folder / "smiles.bin")
        return None

    @staticmethod
    def _map(path: Path):
        with open(path, "rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else b""

    def build(self, source: SmilesFile, order: np.ndarray, start: int, stop: int, progress: bool,
              training: np.ndarray | None) -> None:
        """Read the records at positions start..stop-1 of `order` from the file, in one read."""
        self.remove()
        self.folder.mkdir(parents=True)
        lines = order[start:stop]
        in_file_order = np.argsort(lines, kind="stable")  # j-th record read -> its position - start
        ends, problems, size = array.array("q"), bytearray(), 0
        digests = bytearray() if training is not None else None
        candidates = bytearray()  # with `training`: each record's digest (zeros if it has a problem already)
        records = _read_records(source, _in_order(lines, in_file_order), len(lines), progress, training=training,
                                 digests=digests)
        with open(self.folder / "smiles.bin", "wb", buffering=1 << 20) as f:
            for _, smiles, problem in records:
                size += f.write(smiles.encode("utf-8", "surrogatepass"))
                ends.append(size)
                problems.append(PROBLEMS.index(problem))
                if training is not None:
                    candidates += _digest(smiles) if problem is None else bytes(8)
        codes = np.frombuffer(problems, np.uint8)  # a view: writes go to `problems`
        if training is not None:
            codes[(codes == 0) & _in_training(digests, candidates)] = PROBLEMS.index("in_training_split")
            del digests
        rank = np.empty(len(lines), np.int32)
        rank[in_file_order] = np.arange(len(lines), dtype=np.int32)
        del in_file_order
        for name, values in (("rank", rank), ("ends", np.frombuffer(ends, np.int64)), ("problems", codes)):
            np.save(self.folder / f"{name}.npy", values)
        del rank, ends, problems, codes
        meta = {"format": SPOOL_FORMAT, "n_lines": len(order), "start": start, "stop": stop,
                "too_long_chars": SMILES_CHARS_PER_SYMBOL * MAX_SYMBOLS,
                "files": {f: [(self.folder / f).stat().st_size, _crc32(self.folder / f)] for f in self.FILES}}
        atomic_write_json(self.folder / "spool.json", {**meta, "checksum": _manifest_checksum(meta)})
        self._opened = True
        if problem := self._open(len(order), verify=False):
            raise CorpusError(f"{self.folder}: the spool just written does not read back ({problem})")

    def records(self, order: np.ndarray, start: int, stop: int, header_lines: int) -> list[tuple[int, str, str | None]]:
        """(line number, SMILES or text, problem) at positions start..stop-1, in that order (`covers` them)."""
        j = np.asarray(self._rank[start - self.start: stop - self.start], np.int64)
        ends = self._ends[j]
        begins = np.where(j > 0, self._ends[j - 1], 0)
        line_nos = order[start:stop] + 1 + header_lines
        blob = self._blob
        return [(line_no, blob[a:b].decode("utf-8", "surrogatepass"), PROBLEMS[code])
                for line_no, a, b, code in zip(line_nos.tolist(), begins.tolist(), ends.tolist(),
                                               self._problems[j].tolist(), strict=True)]

    def remove(self) -> None:
        """Delete the spool (its spool.json first: a half-deleted spool is never taken as whole)."""
        self._blob, self._rank, self._ends, self._problems = b"", None, None, None
        self.start = self.stop = 0
        (self.folder / "spool.json").unlink(missing_ok=True)
        shutil.rmtree(self.folder, ignore_errors=True)


def _spool_stop(state: State, missing: int, n_take: int, n_order: int) -> int:
    """Where a spool starting at state.consumed ends: `missing` molecules, at the rate of molecules kept so far
    (1 if none read), with a margin (SPOOL_MARGIN and 1,024), at most SPOOL_MAX_RECORDS (rarely reached: an
    encode of more molecules, or of a file with a lot to drop, reads the file once per spool)."""
    kept_rate = max(state.n_kept / state.consumed if state.consumed else 1.0, 1 / 64)
    want = max(int(missing / kept_rate * SPOOL_MARGIN) + 1024, n_take)
    return min(state.consumed + min(want, max(SPOOL_MAX_RECORDS, n_take)), n_order)

# --- the cache -----------------------------------------------------------------------------------

@contextlib.contextmanager
def _locked(folder: Path):
    """Hold an exclusive lock on a cache folder: two runs of a sweep never write one cache at once.

    The lock's descriptor is kept out of encoding workers (they would hold the lock after a
    kill -9 of this process); a wait for another holder is said, never silent."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        with parent_only(fd):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"{folder}: waiting for the cache lock, held by {_lock_holder(fd)}", file=sys.stderr,
                      flush=True)
                fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
    finally:
        os.close(fd)  # releases the lock


def _lock_holder(fd: int) -> str:
    """Who holds a cache lock, from the pid its holder wrote into the lock file."""
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    if not text.isdigit():
        return "another process"
    try:
        os.kill(int(text), 0)
    except ProcessLookupError:
        return f"process {text}, which has exited (a process it started may still hold the lock)"
    except OSError:
        pass  # alive, another user's
    try:
        command = Path(f"/proc/{text}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return f"process {text}"
    return f"process {text} ({clip(command, 100)})"


@dataclass
class State:
    """What a cache folder holds: molecules kept so far along the permutation, and what was dropped."""

    tokens: np.ndarray  # uint16, all kept molecules back to back, no specials
    offsets: np.ndarray  # int64, n_kept + 1
    positions: np.ndarray  # int64, each kept molecule's position in the permutation
    tokenizer: Tokenizer  # every symbol seen, in order of first appearance
    drops: dict  # reason -> positions in the permutation
    examples: list  # [position, line, text (quoted and clipped by `clip`), reason] of the first N_EXAMPLES drops
    n_lines: int  # data lines in the split
    consumed: int  # positions taken so far
    encode_mol_per_s: float | None = None

    @property
    def n_kept(self) -> int:
        return len(self.positions)

    @property
    def exhausted(self) -> bool:
        return self.consumed >= self.n_lines


def _crc32(path: Path) -> int:
    """CRC-32 of a file (~1.5 GB/s): checked on every load, so a cache damaged in place is noticed."""
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 23), b""):
            crc = zlib.crc32(block, crc)
    return crc


class _Cache:
    """One (file, layout, split, seed) cache folder. Every file is written atomically and the
    manifest, written last, records their sizes and checksums: a folder without one (an
    interrupted write) is rebuilt; one whose files do not match it (damage) is rebuilt with a warning."""

    ARRAYS = ("tokens", "offsets", "positions")
    FILES = ("tokens.npy", "offsets.npy", "positions.npy", "smiles.txt", "tokenizer.json", "drops.json")

    def __init__(self, folder: Path):
        self.folder = folder

    def read(self) -> tuple[State | None, str | None]:
        """(the cached state, None); (None, None) if there is none; (None, what is wrong) if damaged."""
        try:
            m = json.loads((self.folder / "manifest.json").read_text())
        except FileNotFoundError:
            return None, None
        except (OSError, ValueError) as e:
            return None, f"manifest.json unreadable ({e})"
        try:
            if m.get("format") != CACHE_FORMAT:
                return None, None
            if m.get("checksum") != _manifest_checksum(m):
                return None, "manifest.json does not match its checksum"
            if problem := self._check_files(m["files"]):
                return None, problem
            arrays = {a: np.load(self.folder / f"{a}.npy", mmap_mode="r") for a in self.ARRAYS}
            tokenizer = Tokenizer.load(self.folder / "tokenizer.json")
            drops = json.loads((self.folder / "drops.json").read_text())
            state = State(**arrays, tokenizer=tokenizer, drops=drops["drops"], examples=drops["examples"],
                           n_lines=m["n_lines"], consumed=m["consumed"], encode_mol_per_s=m.get("encode_mol_per_s"))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            return None, f"unreadable ({e})"
        consistent = (len(state.tokens) == m["n_tokens"] and state.n_kept == m["n_kept"] == len(state.offsets) - 1
                      and state.offsets[-1] == len(state.tokens) and len(tokenizer) == m["vocab_size"])
        if not consistent:
            return None, "its arrays disagree with the manifest"
        return (state, None) if _covers(state) else (None, "its kept and dropped positions do not cover what it read")

    def _check_files(self, files: dict) -> str | None:
        """What differs between the files and the manifest's sizes and checksums; None if nothing."""
        for name, (size, crc) in files.items():
            path = self.folder / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size:
                return f"{name} has {path.stat().st_size:,} bytes, the manifest says {size:,}"
            if _crc32(path) != crc:
                return f"{name} does not match its checksum"
        return None

    def write(self, state: State, new_smiles: list[str]) -> None:
        """Write `state` (and append the kept SMILES `new_smiles`), manifest last."""
        (self.folder / "manifest.json").unlink(missing_ok=True)  # invalid from here until rewritten
        for name in self.ARRAYS:
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(getattr(state, name)))
            atomic_write_bytes(self.folder / f"{name}.npy", buf.getvalue())
        keep = state.n_kept - len(new_smiles)  # lines of the old smiles.txt still kept
        old = b"".join(s + b"\n" for s in (self.folder / "smiles.txt").read_bytes().split(b"\n", keep)[:keep]) \
            if keep else b""
        atomic_write_bytes(self.folder / "smiles.txt", old + "".join(s + "\n" for s in new_smiles).encode())
        state.tokenizer.save(self.folder / "tokenizer.json")
        atomic_write_json(self.folder / "drops.json", {"drops": state.drops, "examples": state.examples})
        manifest = {
            "format": CACHE_FORMAT,
            "files": {f: [(self.folder / f).stat().st_size, _crc32(self.folder / f)] for f in self.FILES},
            "n_lines": state.n_lines, "consumed": state.consumed, "n_kept": state.n_kept,
            "n_tokens": len(state.tokens), "vocab_size": len(state.tokenizer), "selfies": SELFIES_VERSION,
            "encode_mol_per_s": state.encode_mol_per_s}
        atomic_write_json(self.folder / "manifest.json", {**manifest, "checksum": _manifest_checksum(manifest)})


def _manifest_checksum(manifest: dict) -> str:
    """sha256 of the manifest's other fields: its counts (n_lines, consumed) are checked like the files."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _covers(state: State) -> bool:
    """True if every position read (0..consumed-1) is kept or dropped exactly once, none past the split."""
    if not 0 <= state.consumed <= state.n_lines:
        return False
    parts = [np.asarray(state.positions, np.int64)] + [np.asarray(p, np.int64) for p in state.drops.values()]
    every = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if len(every) != state.consumed or (len(every) and (every.min() < 0 or every.max() >= state.consumed)):
        return False
    seen = np.zeros(state.consumed, bool)
    seen[every] = True
    return bool(seen.all())


def _cache_folder(source: SmilesFile, whole_file: bool, split: str, seed: int, fingerprint: dict,
                  n_data: int) -> Path:
    """Keyed on the bytes and on how they are read (layout, column, encoding): a renamed file finds
    its cache, an edited one does not. A split that is part of its file is keyed on its stretch of
    the permutation too: when the splits were redrawn (the test split was carved out), its molecules
    are a new cache, not a damaged one; a split that is a whole file (MOSES train) keeps its folder.
    A held-out split of a user file is keyed on its dropping the lines whose SMILES is on a training line:
    one cached before it did may hold such molecules and is not reused; the training and MOSES caches keep theirs.
    The name starts with the file's (cut) stem only for people looking at the folder; the hash alone decides."""
    key = (f"format={CACHE_FORMAT}|sha256={fingerprint['sha256']}|{source.key}|whole_file={whole_file}|"
           f"split={split}|seed={seed}|selfies={SELFIES_VERSION}|max_symbols={MAX_SYMBOLS}")
    if (stretch := split_range(n_data, whole_file, split)) != (0, n_data):
        key += "|lines={}:{}".format(*stretch)
    if not whole_file and split != "train":
        key += "|drops=in_training_split"
    stem = source.path.name.split(".")[0][:STEM_CHARS].lstrip("-") or "file"
    return CACHE_DIR / f"{stem}-{source.layout}-{split}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _empty_state(n_lines: int) -> State:
    return State(tokens=np.zeros(0, np.uint16), offsets=np.zeros(1, np.int64), positions=np.zeros(0, np.int64),
                  tokenizer=Tokenizer(), drops={}, examples=[], n_lines=n_lines, consumed=0)


def encoded(source: SmilesFile, whole_file: bool, split: str, seed: int, target: int | None, workers,
             timeout_s: float, progress: bool) -> tuple[State, bool, Path]:
    """(state with at least `target` kept molecules or the split exhausted, whether it was all cached, folder)."""
    fingerprint = source_fingerprint(source, progress)
    n_data = n_data_lines(source, fingerprint)
    cache = _Cache(_cache_folder(source, whole_file, split, seed, fingerprint, n_data))
    n_split = split_size(n_data, whole_file, split)
    with _locked(cache.folder):
        state, problem = cache.read()
        if state is not None and state.n_lines != n_split:
            state, problem = None, f"the manifest says {state.n_lines:,} data lines, the split has {n_split:,}"
        if problem:
            warnings.warn(f"{cache.folder}: damaged cache ({problem}); rebuilding it", stacklevel=3)
        if n_split == 0:
            raise CorpusError(f"{source.path}: no molecules in split {split!r} ({n_data} data lines; "
                              "a user file's validation and test splits are 10% of its lines each)")
        order = split_order(n_data, whole_file, split, seed)
        retried = state is not None and _retry_transient(cache, state, source, order, workers, timeout_s, progress)
        if state is not None and (state.exhausted or (target is not None and state.n_kept >= target)):
            return state, not retried, cache.folder
        state = state or _empty_state(len(order))
        training = None if whole_file or split == "train" else _training_lines(n_data, seed)
        _fill(cache, state, order, source, len(order) if target is None else target, workers, timeout_s, progress,
              training)
        state, problem = cache.read()
        if state is None:
            raise CorpusError(f"{cache.folder}: the cache just written does not read back ({problem})")
    return state, False, cache.folder


def _fill(cache: _Cache, state: State, order: np.ndarray, source: SmilesFile, target: int, workers,
          timeout_s: float, progress: bool, training: np.ndarray | None) -> None:
    """Encode further along `order` until `target` molecules are kept or the split runs out.

    The records come from a `_Spool`: one read of the file for the whole request (more only if drops
    outrun its margin), not one a round. With `training` (a held-out split of a user file), that read
    also drops the lines whose SMILES is on a training line (`_read_records`).
    Works in rounds of at most ROUND_MOLECULES, writing the cache after each: memory stays
    bounded and an interrupted encode of a big file resumes from its last round, and from its spool."""
    spool = _Spool(cache.folder / "spool")
    n_encoded, seconds = 0, 0.0  # encoding alone, file reading excluded
    if progress and min(target, state.n_lines) - state.n_kept > BIG_ENCODE:
        n = min(target, state.n_lines) - state.n_kept
        print(f"{source.path.name}: encoding up to {n:,} molecules (about {max(1, round(n / 60_000)):,} min at ~1,000 "
              "molecules/s; cached for later runs; -n N encodes only the first N)", file=sys.stderr, flush=True)
    while state.n_kept < target and not state.exhausted:
        missing = target - state.n_kept
        n_take = min(missing + missing // 20 + 16, ROUND_MOLECULES)  # a margin of 5% + 16 for drops
        stop = min(state.consumed + n_take, len(order))
        if stop <= state.consumed:  # a consistent cache never gets here: never loop forever on one that is not
            raise CorpusError(f"{cache.folder}: nothing left to read at position {state.consumed:,} of "
                              f"{state.n_lines:,}; delete the folder to rebuild it")
        if not spool.covers(state.consumed, stop, len(order)):
            spool.build(source, order, state.consumed, _spool_stop(state, missing, n_take, len(order)), progress,
                        training)
        records = spool.records(order, state.consumed, stop, source.header_lines)
        to_encode = [s for _, s, problem in records if problem is None]
        t0 = time.perf_counter()
        encoded = encode_smiles(to_encode, workers, timeout_s, progress)
        n_encoded, seconds = n_encoded + len(to_encode), seconds + time.perf_counter() - t0
        new_smiles = _append(state, records, iter(encoded), source.path)
        state.encode_mol_per_s = n_encoded / seconds if n_encoded else state.encode_mol_per_s
        cache.write(state, new_smiles)
    spool.remove()
    if progress and n_encoded:
        print(f"{source.path.name}: encoded {n_encoded:,} molecules in {seconds:.1f} s "
              f"({n_encoded / seconds:,.0f} molecules/s)", file=sys.stderr)


def _retry_transient(cache: _Cache, state: State, source: SmilesFile, order: np.ndarray, workers,
                     timeout_s: float, progress: bool) -> bool:
    """Encode again the molecules a cache dropped for a timeout or a crash; True if any was retried.

    Those drops say how loaded the machine was, not what the molecule is: kept as final, a corpus
    would depend on the load of the day it was built. A retried molecule that now encodes cuts the
    cache back to its position (what follows was taken along the permutation without it), so the
    corpus equals the one a calm machine builds; one still failing stays dropped until next time
    (a molecule that always hangs costs `timeout_s` a load)."""
    transient = sorted(p for r in TRANSIENT for p in state.drops.get(r, []))
    if not transient:
        return False
    records = _pick(source, order[np.asarray(transient, np.int64)], progress)
    encoded = encode_smiles([smiles for _, smiles, _ in records], workers, timeout_s, progress)
    reasons = {p: reason for p, (selfies, reason) in zip(transient, encoded)}
    cut = next((p for p, (selfies, _) in zip(transient, encoded)
                if selfies is not None and len(_SYMBOL.findall(selfies)) <= MAX_SYMBOLS), None)
    if cut is not None:
        _truncate(state, cut)
    if _redrop(state, {p: r or "too_long" for p, r in reasons.items() if p < state.consumed}) or cut is not None:
        cache.write(state, [])
    return True


def _redrop(state: State, reasons: dict) -> bool:
    """Move dropped positions to their new reasons; True if any moved."""
    moved = {p: r for r in TRANSIENT for p in state.drops.get(r, []) if p in reasons and reasons[p] != r}
    if not moved:
        return False
    for reason in list(state.drops):
        state.drops[reason] = [p for p in state.drops[reason] if p not in moved]
    for p, reason in sorted(moved.items()):
        state.drops.setdefault(reason, []).append(p)
    state.drops = {r: sorted(v) for r, v in state.drops.items() if v}
    state.examples = [[p, line, text, moved.get(p, reason)] for p, line, text, reason in state.examples]
    return True


def _truncate(state: State, position: int) -> None:
    """Cut `state` back to the molecules before permutation position `position`."""
    k = int(np.searchsorted(np.asarray(state.positions), position))
    state.offsets = np.array(state.offsets[: k + 1])
    state.tokens = np.array(state.tokens[: state.offsets[-1]])
    state.positions = np.array(state.positions[:k])
    used = int(state.tokens.max()) + 1 if len(state.tokens) else 4  # ids come in order of first appearance
    state.tokenizer = Tokenizer(state.tokenizer.symbols[4:used])
    state.drops = {r: v for r, p in state.drops.items() if (v := [x for x in p if x < position])}
    state.examples = [e for e in state.examples if e[0] < position]
    state.consumed = position


def _append(state: State, records: list, encoded: Iterator, path: Path) -> list[str]:
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
                state.examples.append([position, line_no, clip(smiles), reason])
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
