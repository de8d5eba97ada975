"""SMILES files as users bring them: the layout and text encoding are read from the content.

Layouts: 'pubchem' (`CID<TAB>SMILES`, PubChem's CID-SMILES dump), 'smi' (one SMILES per line,
an optional name after whitespace) and 'csv' (a header line with a `smiles` column, any case;
comma, tab or semicolon separated). The file name decides nothing: a PubChem dump called
`mols.txt` is still read as CID + SMILES, and gzip is recognised by its magic bytes. The text
encoding is UTF-8 unless the bytes say otherwise (a UTF-16/32 byte-order mark, UTF-16/32
without one, or bytes that are not UTF-8, read as Latin-1), so a file saved by Windows tools is
read as the molecules it holds instead of one invalid SMILES a line. Lines may end in LF, CRLF
or a lone CR (classic Mac OS). Other compressed formats and binary data are refused in one line.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import importlib.util
import io
import os
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

LAYOUTS = {
    "pubchem": "PubChem CID<TAB>SMILES",
    "smi": "one SMILES per line, an optional name after whitespace",
    "csv": "CSV with a 'smiles' column",
}
SNIFF_BYTES = 1 << 16  # the start of a file that decides its encoding and layout
SNIFF_LINES = 200
_DELIMITERS = (",", "\t", ";")
_BOMS = ((b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"),
         (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))  # utf-32-le first: it starts like utf-16-le
CLIP_CHARS = 60  # longer offending lines are shown cut, with their length
# compressed formats Python could read but chemscale does not: said, with how to decompress
_OTHER_COMPRESSION = ((b"BZh", "bzip2", "bunzip2 -k FILE"), (b"\xfd7zXZ\x00", "xz", "unxz -k FILE"),
                      (b"PK\x03\x04", "zip", "unzip FILE"), (b"\x28\xb5\x2f\xfd", "zstd", "unzstd FILE"),
                      (b"7z\xbc\xaf\x27\x1c", "7-Zip", "7z x FILE"))
_NO_BOM = ("utf-32-le", "utf-32-be", "utf-16-le", "utf-16-be")  # tried in this order on text with NUL bytes
_CONTROL = frozenset(chr(c) for c in range(32) if chr(c) not in "\t\n\r\f\v") | {"\x7f"}
MAX_CONTROL_FRACTION = 0.01  # text has (almost) no control characters; binary data has ~12%
READ_BLOCK = 1 << 20  # bytes read at a time when picking lines (`SmilesFile.data_lines_at`)


class CorpusError(ValueError):
    """A SMILES source cannot be read or used; the message names the file and line."""


def clip(text: str, limit: int = CLIP_CHARS) -> str:
    """`text` quoted, cut to about `limit` characters and saying how long it was if longer:
    a report never echoes a 100 kB line."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[: limit - 20] + '...' + text[-10:]!r} ({len(text):,} characters)"


def moses_path(split: str = "train") -> Path:
    """Path of a MOSES file inside the molsets wheel, found without importing `moses` (its imports break).

    MOSES's test file holds both our validation and our test split (`chemscale.lm.cache.split_range`)."""
    spec = importlib.util.find_spec("moses")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("source 'moses' needs the molsets wheel: pip install --no-deps molsets==0.3.1")
    name = {"train": "train.csv.gz", "val": "test.csv.gz", "test": "test.csv.gz"}[split]  # val and test share it
    return Path(spec.submodule_search_locations[0]) / "dataset" / "data" / name


@dataclass(frozen=True)
class SmilesFile:
    """A SMILES file with its layout and encoding resolved; iterates its lines with line numbers."""

    path: Path
    layout: str  # a key of LAYOUTS
    encoding: str  # a Python codec name
    gzipped: bool
    detected: bool  # False when the layout was given (format=...)
    column: int = 0  # csv: index of the smiles column
    delimiter: str = ","  # csv
    header_at: int = 0  # line number of a header line (a CSV's, or 'SMILES Name' of a .smi); 0 if none
    newline: str = "\n"  # "\r" for a file whose lines end in a lone CR

    @property
    def header_lines(self) -> int:
        """Lines before the first data line: the header and any blank lines above it."""
        return self.header_at

    @property
    def key(self) -> str:
        """What, besides the bytes, decides which molecules are read: part of the cache key."""
        return (f"layout={self.layout}|column={self.column}|delimiter={self.delimiter!r}|encoding={self.encoding}|"
                f"header_at={self.header_at}|newline={self.newline!r}")

    def describe(self) -> str:
        how = "detected from the content" if self.detected else "given by --format"
        extra = (", gzip" if self.gzipped else "") + (", lines end in CR" if self.newline == "\r" else "")
        if self.header_at and self.layout != "csv":
            extra += f", header line {self.header_at} skipped"
        return f"layout '{self.layout}' ({LAYOUTS[self.layout]}; {how}), encoding {self.encoding}{extra}"

    def lines(self) -> Iterator[tuple[int, str]]:
        """(1-based line number, text) of every line, header included; a corrupt .gz names its line."""
        line_no = 0
        try:
            with _open_bytes(self.path, self.gzipped) as f:
                for line_no, text in enumerate(_decoded_lines(f, self.encoding, self.newline), start=1):
                    yield line_no, text
        except (EOFError, OSError, zlib.error) as e:
            raise CorpusError(f"{self.path}: line {line_no + 1}: cannot read past line {line_no} ({e}); "
                              "the file looks truncated or corrupt") from None

    def data_lines(self) -> Iterator[tuple[int, str]]:
        """The lines that hold molecules (all but a CSV header), empty ones included."""
        return (x for x in self.lines() if x[0] > self.header_lines)

    def data_lines_at(self, indices: Iterable[int], counted: Callable[[int], object] | None = None
                      ) -> Iterator[tuple[int, str]]:
        """(line number, text) of the data lines at `indices` (0-based among the data lines, ascending),
        in that order, as `data_lines` gives them: one read of the file, up to the last of them.

        UTF-8 and Latin-1 files with LF endings (PubChem's) are read in blocks whose lines are counted in C
        and split only where a wanted line lies; only wanted lines are decoded. Picking 10^7 lines out of
        10^8 then costs little more than reading the bytes, where decoding every line costs ~1 us a line.
        `counted(n)` is told how many lines were read past, for a progress bar."""
        wanted = (i + self.header_lines for i in indices)  # 0-based line indices, header included
        if self.encoding not in ("utf-8", "latin-1") or self.newline != "\n":  # rare: decode every line
            target = next(wanted, None)
            for line_no, text in self.lines():
                if target is None:
                    return
                if line_no - 1 == target:
                    yield line_no, text
                    target = next(wanted, None)
            return
        read = [0]  # lines read past: where a corrupt .gz stops

        def count(n: int) -> None:
            read[0] += n
            if counted is not None:
                counted(n)
        try:
            with _open_bytes(self.path, self.gzipped) as f:
                for index, raw in _raw_lines_at(f, wanted, count):
                    yield index + 1, _decoded(raw, self.encoding)
        except (EOFError, OSError, zlib.error) as e:
            raise CorpusError(f"{self.path}: line {read[0] + 1}: cannot read past line {read[0]} ({e}); "
                              "the file looks truncated or corrupt") from None

    def smiles_of(self, text: str) -> tuple[str, str | None]:
        """(SMILES, None), or (the stripped line, 'empty' or 'malformed')."""
        text = text.strip()
        if not text:
            return "", "empty"
        if self.layout == "csv":
            row = text.split(self.delimiter) if '"' not in text else _csv_row(text, self.delimiter)
            if row is None:  # a field over csv's limit is far over the corpus's too
                return text, "too_long" if len(text) > csv.field_size_limit() else "malformed"
            value = row[self.column].strip() if self.column < len(row) else ""
        elif self.layout == "smi":
            value = text.split(None, 1)[0]
        else:
            fields = text.split(None, 2)
            value = fields[1] if len(fields) > 1 else ""
        return (value, None) if value else (text, "malformed")


def open_smiles_file(path: str | os.PathLike, format: str | None = None) -> SmilesFile:  # noqa: A002 -- the CLI's name
    """Resolve a file's encoding and layout from its first 64 KiB (`format` overrides the layout)."""
    path = Path(path).expanduser()
    _check_path(path)
    if format is not None and format not in LAYOUTS:
        raise CorpusError(f"{path}: format must be one of {', '.join(LAYOUTS)}, got {format!r}")
    gzipped, head = _head(path)
    encoding = _encoding(path, head)
    newline = _newline(head, encoding)
    sample, first_at = _sample_lines(head, encoding, newline, whole=len(head) < SNIFF_BYTES)
    layout = format or _detect_layout(sample)
    if layout != "csv":
        named = layout == "smi" and sample and sample[0].split(None, 1)[0].lower() == "smiles"  # RDKit's header
        return SmilesFile(path, layout, encoding, gzipped, format is None, header_at=first_at if named else 0,
                          newline=newline)
    column, delimiter = _csv_column(path, sample[0] if sample else "", first_at)
    return SmilesFile(path, "csv", encoding, gzipped, format is None, column, delimiter, first_at, newline)


def read_smiles(path: str | os.PathLike, format: str | None = None) -> Iterator[tuple[int, str]]:  # noqa: A002
    """Yield (1-based line number, SMILES) of a file; empty and malformed lines are skipped."""
    source = open_smiles_file(path, format)
    for line_no, text in source.data_lines():
        smiles, problem = source.smiles_of(text)
        if problem is None:
            yield line_no, smiles


# --- what the first bytes say ----------------------------------------------------------------------

def _check_path(path: Path) -> None:
    if path.is_dir():
        raise CorpusError(f"{path}: is a directory, not a SMILES file")
    if not path.exists():
        raise CorpusError(f"{path}: no such file")
    if not path.is_file():
        raise CorpusError(f"{path}: not a regular file")


def _open_bytes(path: Path, gzipped: bool):
    try:
        return gzip.open(path, "rb") if gzipped else open(path, "rb")
    except OSError as e:
        raise CorpusError(f"{path}: cannot open ({e.strerror or e})") from None


def _head(path: Path) -> tuple[bool, bytes]:
    """(gzip-compressed?, the first SNIFF_BYTES of the content); a truncated .gz gives what it holds."""
    with _open_bytes(path, False) as f:
        magic = f.read(8)
    gzipped = magic.startswith(b"\x1f\x8b")
    for start, name, command in _OTHER_COMPRESSION:
        if magic.startswith(start):
            raise CorpusError(f"{path}: {name}-compressed data; decompress it first ({command}) or gzip it")
    head = b""
    try:
        with _open_bytes(path, gzipped) as f:
            while len(head) < SNIFF_BYTES and (block := f.read1(SNIFF_BYTES - len(head))):
                head += block
    except (EOFError, OSError, zlib.error):
        pass  # reading the whole file reports it, with the line
    return gzipped, head


def _encoding(path: Path, head: bytes) -> str:
    """'utf-8', 'utf-16'/'utf-32' (byte-order mark), 'utf-16/32-le/-be' (no mark) or 'latin-1'.

    Text without a mark but with NUL bytes is tried as UTF-32 then UTF-16: the first codec that
    decodes it strictly into text that is at least 30% ASCII (SMILES are) without control characters
    wins. Otherwise UTF-8 or Latin-1, unless over 1% of it is control characters: binary data."""
    for bom, codec in _BOMS:
        if head.startswith(bom):
            return codec
    if b"\x00" in head:
        for codec in _NO_BOM:
            text = _text_of(head, codec)
            if text and not _binary(text) and sum(c < "\x80" for c in text) > 0.3 * len(text):
                return codec
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a cut last character is fine
        encoding = "utf-8"
    except UnicodeDecodeError:
        text, encoding = head.decode("latin-1"), "latin-1"
    if _binary(text):
        raise _binary_error(path, head, "NUL bytes" if b"\x00" in head else "control characters")
    return encoding


def _text_of(head: bytes, codec: str) -> str | None:
    """`head` decoded strictly (a character cut at the end is left out), None if it is not `codec`."""
    try:
        return codecs.getincrementaldecoder(codec)().decode(head, final=False)
    except UnicodeDecodeError:
        return None


def _binary(text: str) -> bool:
    """True if more than 1% of the characters are control characters (not tab, newline, CR, FF, VT)."""
    return sum(c in _CONTROL for c in text) > MAX_CONTROL_FRACTION * max(len(text), 1)


def _binary_error(path: Path, head: bytes, what: str) -> CorpusError:
    return CorpusError(f"{path}: binary data ({what} in the first {len(head):,} bytes), not a text file of "
                       "SMILES; if it is text in another encoding, convert it: iconv -t UTF-8 FILE > FILE.smi")


def _newline(head: bytes, encoding: str) -> str:
    """'\r' if the sample's lines end in a lone CR (classic Mac OS), else '\n'."""
    text = _text_of(head, encoding) or ""
    return "\r" if "\r" in text and "\n" not in text else "\n"


def _decoded(raw: bytes, encoding: str) -> str:
    """One line's bytes (UTF-8 or Latin-1, LF-separated) as text without its line ending."""
    return raw.decode(encoding, "replace").rstrip("\r\n").lstrip("\ufeff")


def _decoded_lines(f, encoding: str, newline: str = "\n") -> Iterator[str]:
    """Lines of a binary stream as text without their line ending.

    UTF-8 and Latin-1 split the bytes (fast); a stray non-UTF-8 byte in a molecule's name must
    not stop a 10M-line file, so it is replaced. UTF-16/32 and CR-only files go through a text decoder."""
    if encoding in ("utf-8", "latin-1") and newline == "\n":
        for raw in f:
            yield _decoded(raw, encoding)
    else:
        for text in io.TextIOWrapper(f, encoding=encoding, errors="replace", newline=newline):
            yield text.rstrip("\r\n").lstrip("\ufeff")


def _raw_lines_at(f, wanted: Iterator[int], counted: Callable[[int], object]) -> Iterator[tuple[int, bytes]]:
    """(0-based index, bytes without its LF) of the lines at the ascending indices `wanted`, split on LF
    exactly as iterating `f` does (a last line without LF counts, an LF at the end starts no line).

    A block without a wanted line is counted (bytes.count), not split; a line longer than a block is
    gathered in pieces (no quadratic copying)."""
    target = next(wanted, None)
    base = 0  # index of the first line of the next complete stretch
    pending: list[bytes] = []  # the start of a line cut by a block's end
    while target is not None:
        block = f.read(READ_BLOCK)
        if not block:
            if pending and target == base:  # the last line, without LF
                yield base, b"".join(pending)
            return
        cut = block.rfind(b"\n")
        if cut < 0:
            pending.append(block)
            continue
        data = b"".join([*pending, block[:cut]]) if pending else block[:cut]
        pending = [block[cut + 1:]] if cut + 1 < len(block) else []
        n = data.count(b"\n") + 1  # complete lines in `data`
        if target < base + n:
            parts = data.split(b"\n")
            while target is not None and target < base + n:
                yield target, parts[target - base]
                target = next(wanted, None)
        base += n
        counted(n)


def _sample_lines(head: bytes, encoding: str, newline: str, whole: bool) -> tuple[list[str], int]:
    """(non-blank lines of the sample (the last one dropped if it may be cut), the first one's line number)."""
    lines = list(_decoded_lines(io.BytesIO(head), encoding, newline))
    if not whole:
        lines = lines[:-1]
    first_at = next((i for i, s in enumerate(lines, start=1) if s.strip()), 0)
    return [s for s in lines if s.strip()][:SNIFF_LINES], first_at


def _detect_layout(sample: list[str]) -> str:
    """'csv' if the first line is a header (a 'smiles' column, or commas where a SMILES cannot have
    them), 'pubchem' if most lines start with a number (no SMILES is all digits), else 'smi'."""
    if not sample:
        return "smi"
    first = sample[0].split(None, 1)[0]
    if _header_column(sample[0]) is not None or "," in first:
        return "csv"
    numbered = sum(s.split(None, 1)[0].isdigit() for s in sample)
    return "pubchem" if numbered > len(sample) / 2 else "smi"


def _csv_row(text: str, delimiter: str) -> list[str] | None:
    """The fields of one CSV line; None if it is not one (a CR or quote out of place, a field over
    csv's limit of 131,072 characters): such a line is dropped as malformed, never a traceback."""
    try:
        return next(csv.reader([text], delimiter=delimiter), [])
    except csv.Error:
        return None


def _header_column(header: str) -> tuple[int, str] | None:
    """(index, delimiter) of a 'smiles' column in a header line, any case; None if there is none."""
    for delimiter in _DELIMITERS:
        names = [h.strip().lower() for h in _csv_row(header, delimiter) or []]
        if "smiles" in names:
            return names.index("smiles"), delimiter
    return None


def _csv_column(path: Path, header: str, line_no: int) -> tuple[int, str]:
    found = _header_column(header)
    if found is None:
        columns = _csv_row(header, ",") or [header]
        found = repr(columns) if len(repr(columns)) <= 200 else f"{repr(columns)[:180]}... ({len(columns)} columns)"
        raise CorpusError(f"{path}: line {max(line_no, 1)}: no 'smiles' column (any case); columns found: {found}")
    return found
