"""Corpus contracts: every input format and kind of bad input, nested subsets, the cache, the loaders."""

import contextlib
import gzip
import itertools
import json
import multiprocessing as mp
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import selfies as sf

from chemscale.lm import cache, corpus, loader
from chemscale.lm import encode
from chemscale.lm import read as read_module
from chemscale.lm.corpus import describe, load
from chemscale.lm.encode import encode_smiles
from chemscale.lm.loader import pad_batch
from chemscale.lm.read import CorpusError, moses_path, open_smiles_file, read_smiles
from chemscale.lm.molecules import canonical
from chemscale.lm.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "moses_200.smi"  # 200 MOSES test-split molecules
# 9 lines: a user file this short has no validation or test split, so all of them are training molecules
BAD_SMI = "CCO\ncc(\nC1CC\n\nC(C)(C)(C)(C)C\nc1cccc1\nCCN ethylamine\nc1ccccc1\nO=C=O\n"


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """A private cache per test: tests never touch runs/cache."""
    folder = tmp_path / "cache"
    monkeypatch.setattr(cache, "CACHE_DIR", folder)
    return folder


def write(path: Path, text: str) -> Path:
    data = text.encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def quiet_load(*args, **kwargs) -> corpus.TokenCorpus:
    return load(*args, progress=False, **kwargs)


# --- reading -------------------------------------------------------------------------------------

def test_smi_with_names_skips_empty_lines_and_keeps_line_numbers(tmp_path):
    path = write(tmp_path / "a.smi", "CCO ethanol\n\nc1ccccc1\tbenzene\n   \nCC(=O)O  acetic acid\n")
    assert list(read_smiles(path)) == [(1, "CCO"), (3, "c1ccccc1"), (5, "CC(=O)O")]


def test_windows_line_endings(tmp_path):
    smi = write(tmp_path / "a.smi", "CCO\r\nCCN\r\n\r\nCCC\r\n")
    assert list(read_smiles(smi)) == [(1, "CCO"), (2, "CCN"), (4, "CCC")]
    csv = write(tmp_path / "a.csv", "id,SMILES\r\n1,CCO\r\n2,CCN\r\n")
    assert list(read_smiles(csv)) == [(2, "CCO"), (3, "CCN")]


@pytest.mark.parametrize("name", ["CID-SMILES", "CID-SMILES.gz", "pubchem.txt", "mols.smi", "dump.tsv.gz"])
def test_pubchem_cid_tab_smiles_in_any_file_name(tmp_path, name):
    path = write(tmp_path / name, "1\tCC(=O)OC(CC(=O)[O-])C[N+](C)(C)C\n2\tC1=CC(C(C(=C1)C(=O)O)O)O\n3\n")
    assert list(read_smiles(path)) == [(1, "CC(=O)OC(CC(=O)[O-])C[N+](C)(C)C"), (2, "C1=CC(C(C(=C1)C(=O)O)O)O")]
    assert open_smiles_file(path).layout == "pubchem"


@pytest.mark.parametrize("text, layout, molecules", [
    ("CCO ethanol\nc1ccccc1\n", "smi", ["CCO", "c1ccccc1"]),
    ("1\tCCO\n2\tCCN\n", "pubchem", ["CCN", "CCO"]),
    ("name,SMILES\nethanol,CCO\n", "csv", ["CCO"]),
    ("SMILES\nCCO\nCCN\n", "csv", ["CCN", "CCO"]),  # MOSES's own layout: a one-column CSV
])
def test_the_layout_comes_from_the_content_and_the_report_says_so(tmp_path, text, layout, molecules):
    for name in ("mols.txt", "mols.csv", "mols.smi", "mols"):  # every name reads the same
        source = open_smiles_file(write(tmp_path / name, text))
        assert (source.layout, source.detected) == (layout, True)
    c = quiet_load(str(tmp_path / "mols.csv"))
    assert sorted(c.smiles()) == molecules and c.report.dropped == {}
    assert f"layout '{layout}'" in str(c.report) and "detected from the content" in str(c.report)


def test_format_overrides_the_detected_layout(tmp_path, capsys):
    path = write(tmp_path / "cids.txt", "1\tCCO\n2\tCCN\n")
    as_smi = open_smiles_file(path, format="smi")
    assert (as_smi.layout, as_smi.detected) == ("smi", False)
    assert list(read_smiles(path, format="smi")) == [(1, "1"), (2, "2")]  # the CIDs, as asked
    with pytest.raises(CorpusError, match=r"cids\.txt: format must be one of pubchem, smi, csv, got 'sdf'"):
        open_smiles_file(path, format="sdf")
    assert corpus.main([str(path), "--format", "smi", "--workers", "1"]) == 2  # the CIDs: no molecule kept
    said = capsys.readouterr()
    assert "layout 'smi' (one SMILES per line, an optional name after whitespace; given by --format)" in said.out
    assert said.err.endswith(f"\nerror: {path}: no molecule could be encoded\n")
    with pytest.raises(CorpusError, match=r"cids\.txt: line 1: no 'smiles' column"):
        quiet_load(str(path), format="csv")


def test_a_tab_separated_header_with_a_smiles_column(tmp_path):
    path = write(tmp_path / "mols.tsv", "id\tname\tSmiles\n7\tethanol, absolute\tCCO\n8\tbenzene\tc1ccccc1\n")
    assert list(read_smiles(path)) == [(2, "CCO"), (3, "c1ccccc1")]


@pytest.mark.parametrize("name", ["mols.csv", "mols.csv.gz"])
def test_csv_smiles_column_in_any_case(tmp_path, name):
    path = write(tmp_path / name, 'id,Smiles,logp\n1,CCO,-0.1\n2,"C(=O)O",0.5\n3,,1\n')
    assert list(read_smiles(path)) == [(2, "CCO"), (3, "C(=O)O")]


def test_csv_without_smiles_column_names_the_columns_found(tmp_path):
    path = write(tmp_path / "mols.csv", "id,mol,y\n1,CCO,0\n")
    with pytest.raises(CorpusError, match=r"mols\.csv: line 1: no 'smiles' column .*\['id', 'mol', 'y'\]"):
        list(read_smiles(path))


def test_truncated_gz_names_file_and_line(tmp_path):
    whole = gzip.compress("".join(f"C{'C' * (i % 30)}O\n" for i in range(20_000)).encode())
    path = tmp_path / "big.smi.gz"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CorpusError, match=r"big\.smi\.gz: line \d+: cannot read past line \d+ .*truncated"):
        list(read_smiles(path))
    with pytest.raises(CorpusError, match="truncated"):
        quiet_load(str(path))


def test_gzip_is_recognised_by_its_bytes_not_its_name(tmp_path):
    plain = write(tmp_path / "plain.smi", "CCO\nCCN\n").rename(tmp_path / "plain.smi.gz")
    packed = tmp_path / "packed.smi"
    packed.write_bytes(gzip.compress(b"CCO\nCCN\n"))
    assert list(read_smiles(plain)) == list(read_smiles(packed)) == [(1, "CCO"), (2, "CCN")]


def test_missing_path_directory_and_binary_file(tmp_path):
    with pytest.raises(CorpusError, match=r"absent\.smi: no such file"):
        quiet_load(str(tmp_path / "absent.smi"))
    with pytest.raises(CorpusError, match=r": is a directory, not a SMILES file"):
        quiet_load(str(tmp_path))
    assert corpus.main([str(tmp_path)]) == 2
    binary = tmp_path / "weights.bin"
    binary.write_bytes(np.arange(4096, dtype=np.int64).tobytes())
    with pytest.raises(CorpusError, match=r"weights\.bin: binary data \(NUL bytes"):
        list(read_smiles(binary))


@pytest.mark.parametrize("encoding, said", [("utf-16", "utf-16"), ("utf-16-le", "utf-16-le"),
                                            ("utf-16-be", "utf-16-be"), ("utf-32", "utf-32"),
                                            ("utf-8-sig", "utf-8")])
def test_a_utf16_file_is_read_as_the_molecules_it_holds(tmp_path, encoding, said):
    """Windows tools (PowerShell's `>`, Notepad) save UTF-16: read it, and say so, not 'invalid SMILES'."""
    path = tmp_path / "win.smi"
    path.write_bytes(BAD_SMI.replace("\n", "\r\n").encode(encoding))
    c = quiet_load(str(path))
    assert sorted(c.smiles()) == ["CCN", "CCO", "O=C=O", "c1ccccc1"]
    assert c.report.dropped == {"invalid_smiles": 3, "empty": 1, "valence": 1}
    assert f"encoding {said}" in str(c.report)


def test_a_latin1_name_does_not_stop_the_file(tmp_path):
    path = tmp_path / "names.smi"
    path.write_bytes("CCO \u00e9thanol\nc1ccccc1 benz\u00e8ne\n".encode("latin-1"))
    source = open_smiles_file(path)
    assert source.encoding == "latin-1" and list(read_smiles(path)) == [(1, "CCO"), (2, "c1ccccc1")]


def test_a_huge_line_is_never_echoed_whole(tmp_path, capsys):
    path = write(tmp_path / "huge.smi", "CCO\n" + "C" * 100_000 + "\n" + "x" * 5000 + "(\nCCN\n")
    assert corpus.main([str(path), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) < 200
    assert "line 2: 'CCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCC...CCCCCCCCCC' (100,000 characters) (too_long)" in out
    assert "line 3: 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx...xxxxxxxxx(' (5,001 characters) (invalid_smiles)" in out
    assert "too_long 1: line 2" in out


# --- encoding and what is dropped ----------------------------------------------------------------

def test_unclosed_branch_and_other_invalid_smiles_get_reasons():
    out = encode_smiles(["cc(", "C1CC", "c1cccc1", "C(C)(C)(C)(C)C", "CCO"], workers=1, progress=False)
    assert out == [(None, "invalid_smiles"), (None, "invalid_smiles"), (None, "invalid_smiles"),
                   (None, "valence"), ("[C][C][O]", None)]


def test_bad_lines_are_dropped_and_reported_with_line_numbers(tmp_path):
    c = quiet_load(str(write(tmp_path / "bad.smi", BAD_SMI)))
    r = c.report
    assert (r.read, r.kept, len(c)) == (9, 4, 4)
    assert r.dropped == {"invalid_smiles": 3, "empty": 1, "valence": 1}
    assert r.examples == [(2, "'cc('", "invalid_smiles"), (3, "'C1CC'", "invalid_smiles"), (4, "''", "empty"),
                          (5, "'C(C)(C)(C)(C)C'", "valence"), (6, "'c1cccc1'", "invalid_smiles")]
    assert sorted(c.smiles()) == ["CCN", "CCO", "O=C=O", "c1ccccc1"]
    assert "line 2: 'cc(' (invalid_smiles)" in str(r)


def test_malformed_and_too_long_lines_are_dropped(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "MAX_SYMBOLS", 5)
    c = quiet_load(str(write(tmp_path / "CID-SMILES", "1\tCCO\n2\n3\tc1ccccc1\n4\tO=C=O\n")))
    assert c.report.dropped == {"malformed": 1, "too_long": 1}
    assert c.report.examples == [(2, "'2'", "malformed"), (3, "'c1ccccc1'", "too_long")]
    assert set(c.report.dropped) <= set(cache.REASONS)


def test_a_hanging_molecule_times_out_and_its_worker_is_replaced(monkeypatch):
    def encoder(smiles):  # older selfies releases hang like this on some invalid input: forever
        if smiles == "HANG":
            threading.Event().wait()
        return sf.encoder(smiles)

    monkeypatch.setattr(encode, "_selfies_encoder", encoder)
    # a timeout far above what a healthy molecule takes (~0.1 ms) even on a crowded machine:
    # only the molecule that never returns can reach it
    out = encode_smiles(["CCO", "HANG", "CCN", "CCC"], workers=1, timeout_s=3.0, progress=False)
    assert out == [("[C][C][O]", None), (None, "timeout"), ("[C][C][N]", None), ("[C][C][C]", None)]
    assert mp.active_children() == []  # the stuck worker was killed, the others stopped


def test_a_crashing_worker_drops_only_its_molecule(monkeypatch):
    def encoder(smiles):
        if smiles == "BOOM":
            os._exit(1)
        return sf.encoder(smiles)

    monkeypatch.setattr(encode, "_selfies_encoder", encoder)
    out = encode_smiles(["CCO"] * 40 + ["BOOM"] + ["CCN"] * 40, workers=2, progress=False)
    assert out[40] == (None, "crash")
    assert out[:40] == [("[C][C][O]", None)] * 40 and out[41:] == [("[C][C][N]", None)] * 40
    assert mp.active_children() == []


# --- workers never outlive their parent nor hold its descriptors -------------------------------------

LINUX_PROC = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads /proc (Linux)")


def process_state(pid: int) -> str | None:
    """The state letter of a process (R, S, Z, ...), None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def living_children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        try:
            state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError, IndexError):
            continue
        if int(ppid) == pid and state != "Z":
            out.append(int(entry.name))
    return out


def sockets() -> set[str]:
    """The sockets this process has open ('socket:[inode]'); multiprocessing pipes are socket pairs."""
    links = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            links.add(os.readlink(f"/proc/self/fd/{fd}"))
    return {x for x in links if x.startswith("socket:")}


@LINUX_PROC
def test_workers_hold_neither_the_cache_lock_nor_other_pipe_ends(tmp_path, monkeypatch):
    """A forked worker inherits every descriptor: the cache lock's kept the lock held after a kill -9 of
    the parent, and the parent's pipe ends kept a worker from ever seeing EOF."""
    def open_files(smiles):  # the worker reports what it holds instead of encoding
        links = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                links.append(os.readlink(f"/proc/self/fd/{fd}"))
        return "\n".join(links)

    monkeypatch.setattr(encode, "_selfies_encoder", open_files)
    before = sockets()
    with cache._locked(tmp_path / "folder"):
        seen = encode_smiles(["C"] * 40, workers=2, progress=False)  # 3 tasks: two workers
    held = [set(text.split("\n")) for text, _ in seen]
    assert all(str(tmp_path / "folder" / ".lock") not in files for files in held)
    new_sockets = [{f for f in files if f.startswith("socket:")} - before for files in held]
    assert all(len(s) == 1 for s in new_sockets)  # a worker holds its own pipe end, no other
    assert len(set().union(*new_sockets)) == 2  # and two workers answered


@LINUX_PROC
def test_kill_9_mid_encode_leaves_no_worker_and_the_next_run_finishes(tmp_path):
    """Issue 8 item 12, as a user met it: encode MOSES lines with one worker, kill -9 the CLI while
    its worker encodes, run it again. A worker used to survive holding the cache lock; the rerun hung."""
    with gzip.open(moses_path("train"), "rt") as f:
        path = write(tmp_path / "moses_head.csv", "".join(itertools.islice(f, 10_001)))  # header + 10,000
    env = {**os.environ, "CHEMSCALE_RUNS": str(tmp_path / "runs")}
    command = [sys.executable, "-m", "chemscale.lm.corpus", str(path), "--workers", "1"]
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    while not workers and first.poll() is None:
        workers = living_children(first.pid)
        time.sleep(0.01)
    assert workers, "the first run ended before its worker was seen"
    first.kill()
    first.wait()
    deadline = time.monotonic() + 60  # generous: a surviving worker never ends on its own
    try:
        while any(process_state(w) not in (None, "Z") for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(process_state(w) in (None, "Z") for w in workers), "a worker outlived its killed parent"
    finally:
        for w in workers:  # a failing run leaves nothing behind
            if process_state(w) not in (None, "Z"):
                with contextlib.suppress(OSError):
                    os.kill(w, 9)
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "moses_head.csv: 10,001 lines" in second.stdout and "kept 10,000 molecules" in second.stdout


def test_a_wait_for_the_cache_lock_says_who_holds_it(tmp_path, capfd):
    folder = tmp_path / "folder"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys; from pathlib import Path; f = Path(sys.argv[1]); "
         "f.parent.mkdir(); fd = os.open(f, os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); "
         "os.write(fd, str(os.getpid()).encode()); print('held', flush=True); sys.stdin.read()",
         str(folder / ".lock")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    done = threading.Event()

    def wait_for_lock():
        with cache._locked(folder):
            done.set()

    waiter = threading.Thread(target=wait_for_lock)
    waiter.start()
    said, deadline = "", time.monotonic() + 60  # generous: the message comes before the wait
    try:
        while "waiting for the cache lock" not in said and time.monotonic() < deadline:
            said += capfd.readouterr().err
            time.sleep(0.01)
    finally:
        holder.communicate("")  # the holder exits: the lock is free
        waiter.join()
    assert done.is_set() and f"waiting for the cache lock, held by process {holder.pid} (" in said


# --- splits, nested subsets, tokenizer mapping -------------------------------------------------------

def test_user_file_splits_are_disjoint_and_val_and_test_are_ten_percent_each():
    """Training, test and validation take every line of the file once: none shared, by line or by molecule."""
    train, val, test = (quiet_load(str(FIXTURE), split) for split in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (160, 20, 20)
    assert sorted(train.smiles() + val.smiles() + test.smiles()) == sorted(FIXTURE.read_text().split())
    lines = [set(cache.split_order(200, False, split, 0).tolist()) for split in ("train", "val", "test")]
    assert set.union(*lines) == set(range(200)) and sum(map(len, lines)) == 200
    molecules = [{canonical(s) for s in c.smiles()} for c in (train, val, test)]
    assert not (molecules[0] & molecules[1] or molecules[0] & molecules[2] or molecules[1] & molecules[2])
    # the validation split is the one of before the test split was carved: the permutation's last 10%
    assert val.smiles() == [FIXTURE.read_text().split()[i] for i in np.random.default_rng(0).permutation(200)[180:]]


def _moses_lines(split: str) -> list[str]:
    """Every SMILES of a MOSES file, in file order."""
    source = open_smiles_file(moses_path(split))
    return [source.smiles_of(text)[0] for _, text in source.data_lines()]


def test_moses_validation_and_test_splits_share_no_molecule_with_each_other_or_training():
    """MOSES's test file gives validation (its permutation's start: the molecules runs validated on before the
    test split existed) and test (its last 10,000); no test molecule is in the training file."""
    lines = _moses_lines("test")
    perm = np.random.default_rng(0).permutation(len(lines))
    assert len(lines) == 176_074 and cache.split_range(len(lines), True, "test") == (166_074, 176_074)
    val, test = quiet_load("moses", "val", 300), quiet_load("moses", "test", 300)
    assert val.smiles() == [lines[i] for i in perm[:300]]  # MOSES drops nothing
    assert test.smiles() == [lines[i] for i in perm[166_074:166_374]]
    val_split, test_split = {lines[i] for i in perm[:166_074]}, {lines[i] for i in perm[166_074:]}
    assert len(test_split) == 10_000 and not val_split & test_split  # MOSES SMILES are RDKit-canonical
    assert not test_split.intersection(_moses_lines("train"))
    assert quiet_load("moses", "test", 100, seed=0).smiles() == test.smiles()[:100]  # nested, like every split



def test_a_user_files_held_out_splits_drop_the_molecules_on_training_lines(tmp_path, monkeypatch):
    """Issue 10, item 2 review: a molecule on several lines of a user file was in training and in the held-out
    loss. Its validation and test lines are dropped as 'in_training_split', counted like any drop; training is
    unchanged: every training line's molecule, in the permutation's order, a repeated one as often as written."""
    molecules = FIXTURE.read_text().split()  # 200 different molecules
    train_lines, val_lines, test_lines = (cache.split_order(200, False, split, 0) for split in ("train", "val", "test"))
    repeated = molecules[train_lines[0]]
    lines = list(molecules)
    for i in (val_lines[0], val_lines[7], test_lines[3]):  # one training molecule, again in val and test
        lines[i] = repeated
    lines[train_lines[1]] = repeated  # and twice in training, where it is kept twice
    path = write(tmp_path / "copies.smi", "".join(f"{smiles}\n" for smiles in lines))
    train, val, test = (quiet_load(str(path), split, workers=1) for split in ("train", "val", "test"))
    assert train.smiles() == [lines[i] for i in train_lines] and train.report.dropped == {}
    assert not set(train.smiles()) & (set(val.smiles()) | set(test.smiles()))
    assert (len(val), len(test)) == (18, 19)
    assert val.report.dropped == {"in_training_split": 2} and test.report.dropped == {"in_training_split": 1}
    assert "dropped 2 (in_training_split 2)" in str(val.report)
    assert f"line {val_lines[0] + 1}: '{repeated}' (in_training_split)" in str(val.report)
    report = describe(str(path), workers=1, progress=False)
    assert report.dropped == {"in_training_split": sorted([val_lines[0] + 1, val_lines[7] + 1, test_lines[3] + 1])}
    assert report.splits == {"train": (160, 160), "val": (20, 18), "test": (20, 19)}
    assert "in_training_split 3: lines" in str(report)
    # every digest equal: a hash collision drops held-out lines, it never keeps one
    monkeypatch.setattr(cache, "CACHE_DIR", tmp_path / "colliding")
    monkeypatch.setattr(cache, "_digest", lambda smiles: b"\0" * 8)
    with pytest.raises(CorpusError, match=r"copies\.smi \[test\]: no molecule could be encoded .*in_training_split"):
        quiet_load(str(path), "test", workers=1)


def test_moses_held_out_splits_are_read_as_before(monkeypatch):
    """MOSES's test file shares no molecule with its training file (checked above): its held-out splits are read
    as before, without a pass over the training file, and drop nothing."""
    passes, real = [], cache._read_records
    monkeypatch.setattr(cache, "_read_records",
                        lambda *args, **kwargs: passes.append(kwargs.get("training")) or real(*args, **kwargs))
    test = quiet_load("moses", "test", 50, workers=1)
    assert passes == [None] and test.report.dropped == {}

def test_nested_subsets_equal_fresh_smaller_loads(tmp_path, monkeypatch):
    big = quiet_load("moses", "val", 300)
    monkeypatch.setattr(cache, "CACHE_DIR", tmp_path / "another_cache")
    small = quiet_load("moses", "val", 100)
    assert not small.report.cached and len(small) == 100
    assert np.array_equal(small.offsets, big.offsets[:101])
    assert np.array_equal(small.tokens, big.tokens[: big.offsets[100]])
    assert small.smiles() == big.smiles()[:100]
    assert small.tokenizer.symbols == big.tokenizer.symbols[: len(small.tokenizer)]
    assert quiet_load("moses", "val", 100, seed=1).smiles() != small.smiles()


def test_tokens_decode_back_to_the_input_molecules():
    c = quiet_load(str(FIXTURE))
    for i in range(len(c)):
        selfies = c.tokenizer.decode(c[i])
        symbols = list(sf.split_selfies(selfies))  # a list: a generator would be truthy even when empty
        assert symbols and "".join(symbols) == selfies and len(symbols) == len(c[i])
    for i, smiles in enumerate(c.smiles()):
        assert canonical(sf.decoder(c.tokenizer.decode(c[i]))) == canonical(smiles)
    assert c.n_tokens == len(c.tokens) + 2 * len(c)


def test_mapping_onto_a_given_tokenizer():
    own = quiet_load(str(FIXTURE), "val")
    given = Tokenizer(["[O]", "[C]", "[=C]"])
    mapped = quiet_load(str(FIXTURE), "val", tokenizer=given)
    assert mapped.tokenizer is given and mapped.report.vocab_size == len(given)
    expected = [given.index.get(own.tokenizer.symbols[t], UNK_ID) for t in own.tokens]
    assert mapped.tokens.tolist() == expected and UNK_ID in expected
    assert "[N]" in mapped.report.unknown_symbols and "[C]" not in mapped.report.unknown_symbols
    assert quiet_load(str(FIXTURE), "val", tokenizer=own.tokenizer).tokens.tolist() == own.tokens.tolist()


def test_moses_is_the_default_source():
    c = quiet_load(n_molecules=50)
    assert (len(c), c.report.source, c.report.split, c.report.dropped) == (50, "moses", "train", {})
    assert moses_path("val").name == moses_path("test").name == "test.csv.gz"
    assert c.tokens.dtype == np.uint16 and c.offsets.dtype == np.int64


# --- the cache ------------------------------------------------------------------------------------

def counting_encoder(monkeypatch) -> list[int]:
    """Wrap encode_smiles; returns the list of batch sizes it is called with."""
    calls, real = [], cache.encode_smiles

    def wrapper(smiles, *args, **kwargs):
        calls.append(len(smiles))
        return real(smiles, *args, **kwargs)

    monkeypatch.setattr(cache, "encode_smiles", wrapper)
    return calls


def test_second_load_encodes_nothing_and_larger_ones_only_the_missing_part(monkeypatch):
    calls = counting_encoder(monkeypatch)
    first = quiet_load(str(FIXTURE), n_molecules=50)
    assert not first.report.cached and len(calls) == 1
    again, fewer = quiet_load(str(FIXTURE), n_molecules=50), quiet_load(str(FIXTURE), n_molecules=20)
    assert again.report.cached and fewer.report.cached and len(calls) == 1
    assert np.array_equal(again.tokens, first.tokens) and fewer.smiles() == first.smiles()[:20]
    assert isinstance(again.tokens, np.memmap)
    more = quiet_load(str(FIXTURE), n_molecules=120)
    assert len(calls) == 2 and sum(calls) < 120 + 2 * 20  # the second call only encoded what was missing
    assert np.array_equal(more.tokens[: len(first.tokens)], first.tokens) and len(more) == 120


def flip_one_byte(path: Path) -> None:
    """Damage a file in place without changing its size (a bad sector, a stray write)."""
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["no manifest", "short tokens", "bad manifest", "missing smiles",
                                    "flipped token", "flipped smiles"])
def test_an_interrupted_or_damaged_cache_is_rebuilt(cache_dir, monkeypatch, damage):
    first = quiet_load(str(FIXTURE), n_molecules=50)
    (folder,) = [p for p in cache_dir.iterdir() if p.is_dir()]
    if damage == "no manifest":  # killed before the manifest was written
        (folder / "manifest.json").unlink()
    elif damage == "short tokens":
        data = (folder / "tokens.npy").read_bytes()
        (folder / "tokens.npy").write_bytes(data[:-10])
    elif damage == "bad manifest":
        manifest = json.loads((folder / "manifest.json").read_text())
        (folder / "manifest.json").write_text(json.dumps({**manifest, "n_kept": 7}))
    elif damage == "missing smiles":
        (folder / "smiles.txt").unlink()
    else:  # same size, different bytes: only a checksum can tell
        flip_one_byte(folder / ("tokens.npy" if damage == "flipped token" else "smiles.txt"))
    calls = counting_encoder(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rebuilt = quiet_load(str(FIXTURE), n_molecules=50)
    said = [str(w.message) for w in caught if "damaged cache" in str(w.message)]
    # an interrupted write is the normal way to lose a manifest: rebuilt without a word; damage is said
    assert len(said) == (0 if damage == "no manifest" else 1)
    if damage.startswith("flipped"):
        assert "does not match its checksum" in said[0]
    assert not rebuilt.report.cached and len(calls) == 1
    assert np.array_equal(rebuilt.tokens, first.tokens) and rebuilt.smiles() == first.smiles()
    assert quiet_load(str(FIXTURE), n_molecules=50).report.cached  # and the rebuilt cache is trusted again


def test_the_cache_is_keyed_on_how_the_bytes_are_read_not_on_the_file_name(tmp_path, cache_dir):
    """The same bytes read as one SMILES a line, then (renamed) as what they are, must not share a cache."""
    path = write(tmp_path / "mols.smi", "".join(f"{i}\t{s}\n" for i, s in enumerate(FIXTURE.read_text().split())))
    with pytest.raises(CorpusError, match=r"mols\.smi \[train\]: no molecule could be encoded \(layout 'smi'"):
        quiet_load(str(path), format="smi")  # the CIDs taken for molecules
    renamed = path.rename(tmp_path / "mols.csv")
    c = quiet_load(str(renamed))  # detected: pubchem
    assert len(c) == 160 and c.report.dropped == {} and "layout 'pubchem'" in str(c.report)
    assert sorted(p.name.split("-")[1] for p in cache_dir.iterdir() if p.is_dir()) == ["pubchem", "smi"]


# --- batches -------------------------------------------------------------------------------------

def test_pad_batch():
    batch = pad_batch([np.array([5, 6, 7], np.uint16), np.array([8], np.uint16)])
    assert batch.dtype.is_floating_point is False and batch.tolist() == [[BOS_ID, 5, 6, 7, EOS_ID],
                                                                         [BOS_ID, 8, EOS_ID, PAD_ID, PAD_ID]]


def test_the_loaders_training_uses():
    """Whole padded batches, each epoch its own reproducible order resumed at a step; validation in corpus
    order; molecules longer than the context left out."""
    c = quiet_load(str(FIXTURE), n_molecules=100)
    steps = [0]
    train = loader.train_loader(c, np.arange(len(c)), 32, seed=3, steps_done=lambda: steps[0])
    first = list(train)
    steps[0] = len(first)  # an epoch of steps taken: the next pass is the next epoch
    second = list(train)
    assert len(train) == len(first) == len(second) == 3
    assert all(b.shape[0] == 32 and b.shape[1] == max(int((b[i] != PAD_ID).sum()) for i in range(32)) for b in first)
    assert not all(np.array_equal(a, b) for a, b in zip(first, second))  # each epoch its own order
    steps[0] = 0
    assert all(np.array_equal(a, b) for a, b in zip(first, train, strict=True))  # and reproducible
    steps[0] = 1  # resumed after one step: the rest of the epoch
    assert all(np.array_equal(a, b) for a, b in zip(first[1:], train, strict=True))
    (ordered,) = list(loader.val_loader(c, np.arange(len(c)), 32))  # at least VAL_BATCH_SIZE a batch
    assert len(ordered) == len(c) and all(ordered[i, 1: len(c[i]) + 1].tolist() == c[i].tolist() for i in range(len(c)))
    index = loader.fitting(c, 30)
    assert len(c) - len(index) == int((np.diff(c.offsets) + 2 > 30).sum()) > 0
    assert all(b.shape[1] <= 30 for b in loader.train_loader(c, index, 8, seed=0, steps_done=lambda: 0))


# --- command line --------------------------------------------------------------------------------

def test_cli_reports_the_whole_file(tmp_path, capsys):
    """Every line of the file counts, whichever split it falls in: lines, kept, every dropped line, splits."""
    val_lines, test_lines = (sorted(int(i) + 1 for i in cache.split_order(206, False, split, 0))
                             for split in ("val", "test"))  # 20 of 206 lines each
    train_lines = sorted(set(range(1, 207)) - set(val_lines) - set(test_lines))
    bad = ["cc(", "", "C(C)(C)(C)(C)C", "c1cccc1", "C1CC", "xyz"]
    bad_at = dict(zip([train_lines[5], train_lines[6], val_lines[3], test_lines[2], val_lines[-1], train_lines[-1]],
                      bad))
    molecules = iter(FIXTURE.read_text().split())
    path = write(tmp_path / "mixed.txt", "".join((bad_at[i] if i in bad_at else next(molecules)) + "\n"
                                                 for i in range(1, 207)))
    report = describe(str(path), workers=1, progress=False)
    assert (report.n_lines, report.kept) == (206, 200)
    expected = {}
    for line_no, text in bad_at.items():
        reason = {"": "empty", "C(C)(C)(C)(C)C": "valence"}.get(text, "invalid_smiles")
        expected.setdefault(reason, []).append(line_no)
    assert report.dropped == {r: sorted(v) for r, v in expected.items()}
    assert report.splits == {"train": (166, 163), "val": (20, 18), "test": (20, 19)}  # held-out drops count too
    assert corpus.main([str(path), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "mixed.txt: 206 lines; layout 'smi'" in out and "kept 200 molecules, dropped 6 lines" in out
    assert corpus._ranges([2, 3, 6, 8, 9, 10]) == "2-3, 6, 8-10"  # every line number, runs written once
    assert f"invalid_smiles 4: lines {corpus._ranges(sorted(expected['invalid_smiles']))}" in out
    assert f"empty 1: line {train_lines[6]}" in out
    assert f"line {train_lines[5]}: 'cc(' (invalid_smiles)" in out and "train vocabulary:" in out
    assert ("splits (seed 0): train 163 molecules of 166 lines, val 18 molecules of 20 lines, "
            "test 19 molecules of 20 lines") in out
    assert corpus.main([str(write(tmp_path / "x.csv", "a,b\n1,2\n"))]) == 2
    assert "no 'smiles' column" in capsys.readouterr().err


def test_cli_with_n_reports_that_prefix_of_a_split(tmp_path, capsys):
    assert corpus.main([str(write(tmp_path / "bad.smi", BAD_SMI)), "-n", "4", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "read 9 lines, kept 4 molecules, dropped 5 (invalid_smiles 3, empty 1, valence 1)" in out
    assert "line 2: 'cc(' (invalid_smiles)" in out and "vocabulary:" in out and "max" in out


def interrupt_encoder(monkeypatch, at_call: int) -> list[int]:
    """Ctrl-C at the `at_call`-th call of the encoder (a round of an encode); the list of the molecules each call got."""
    calls, real = [], cache.encode_smiles

    def interrupted(smiles, *args, **kwargs):
        calls.append(len(smiles))
        if len(calls) == at_call:
            raise KeyboardInterrupt
        return real(smiles, *args, **kwargs)

    monkeypatch.setattr(cache, "encode_smiles", interrupted)
    return calls


def test_a_big_encode_writes_rounds_and_resumes_after_an_interruption(monkeypatch):
    whole = quiet_load(str(FIXTURE), n_molecules=100)
    monkeypatch.setattr(cache, "CACHE_DIR", cache.CACHE_DIR.parent / "another_cache")
    monkeypatch.setattr(cache, "ROUND_MOLECULES", 30)
    calls = interrupt_encoder(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        quiet_load(str(FIXTURE), n_molecules=100)
    assert calls == [30, 30, 30]
    resumed = quiet_load(str(FIXTURE), n_molecules=100)
    assert calls[3:] == [30, 10 + 16]  # it went on from the 60 cached: 30, then the last 10 and a margin
    assert np.array_equal(resumed.tokens, whole.tokens) and resumed.smiles() == whole.smiles()


def test_a_file_too_short_for_a_validation_split(tmp_path):
    with pytest.raises(CorpusError, match=r"bad\.smi: no molecules in split 'val' \(9 data lines"):
        quiet_load(str(write(tmp_path / "bad.smi", BAD_SMI)), "val")


# --- the hostile review of items 6, 7, 10, 11, 12 (each test failed before its fix) ----------------

def rewrite_manifest(folder: Path, checksum: bool, **changes) -> None:
    """Edit manifest.json's counts, with a recomputed checksum (a consistent forgery) or without."""
    manifest = {k: v for k, v in json.loads((folder / "manifest.json").read_text()).items() if k != "checksum"}
    manifest.update(changes)
    if checksum:
        manifest["checksum"] = cache._manifest_checksum(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def bounded_encoder(monkeypatch, limit: int = 10) -> list[int]:
    """Count encode_smiles calls and fail past `limit`: a load that loops forever fails instead."""
    calls, real = [], cache.encode_smiles

    def wrapper(smiles, *args, **kwargs):
        calls.append(len(smiles))
        assert len(calls) <= limit, "the load keeps encoding: it loops"
        return real(smiles, *args, **kwargs)

    monkeypatch.setattr(cache, "encode_smiles", wrapper)
    return calls


@pytest.mark.parametrize("checksum", [False, True])
@pytest.mark.parametrize("field", ["n_lines", "consumed"])
def test_a_manifest_with_changed_counts_is_rebuilt_never_looped_on_or_duplicated(cache_dir, monkeypatch, field,
                                                                                   checksum):
    """Item 11: n_lines one too many made every load loop forever; consumed set back re-read molecules
    already kept (60 SMILES, 40 distinct). The manifest is checksummed, and its counts checked against
    the split and the kept and dropped positions even when the checksum was forged."""
    target = None if field == "n_lines" else 20
    first = quiet_load(str(FIXTURE), n_molecules=target)
    (folder,) = [p for p in cache_dir.iterdir() if p.is_dir()]
    manifest = json.loads((folder / "manifest.json").read_text())
    rewrite_manifest(folder, checksum, **{field: manifest[field] + (1 if field == "n_lines" else -10)})
    bounded_encoder(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = quiet_load(str(FIXTURE), n_molecules=None if target is None else 60)
    assert any("damaged cache" in str(w.message) for w in caught)
    assert len(set(again.smiles())) == len(again) == (160 if target is None else 60)
    assert again.smiles()[: len(first)] == first.smiles()


def test_a_pass_that_reads_nothing_raises_instead_of_looping(tmp_path, monkeypatch):
    bounded_encoder(monkeypatch)
    path = write(tmp_path / "a.smi", "CCO\nCCN\n")
    source = open_smiles_file(path)
    folder = cache._Cache(tmp_path / "folder")
    state = cache._empty_state(3)  # claims a third line the order does not have
    state.consumed = 2
    with pytest.raises(CorpusError, match="nothing left to read at position 2 of 3"):
        cache._fill(folder, state, np.arange(2), source, 3, 1, 5.0, False, None)


@pytest.mark.parametrize("big", [False, True])
def test_an_edited_line_count_memo_is_recounted(tmp_path, cache_dir, monkeypatch, big):
    """Item 2: sources.json's n_lines was trusted: 100 there made a 200-line file 100 lines long."""
    if big:  # the stat-keyed memo of files too big to hash on every load
        monkeypatch.setattr(cache, "HASH_ALWAYS_BYTES", 0)
    path = tmp_path / "mols.smi"
    path.write_bytes(FIXTURE.read_bytes())
    assert len(quiet_load(str(path))) == 160
    memo = json.loads((cache_dir / "sources.json").read_text())
    (cache_dir / "sources.json").write_text(json.dumps({k: {**v, "n_lines": 100} for k, v in memo.items()}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert len(quiet_load(str(path))) == 160
    assert any("does not match its checksum; recounting" in str(w.message) for w in caught)


@LINUX_PROC
def test_a_same_size_edit_with_its_mtime_restored_is_seen(tmp_path, monkeypatch):
    """Item 2: the memo was keyed on (path, size, mtime): an edit followed by `touch -r` kept the old count
    and the old molecules. The ctime, which no user can set, is in the key."""
    monkeypatch.setattr(cache, "HASH_ALWAYS_BYTES", 0)
    path = tmp_path / "mols.smi"
    path.write_bytes(FIXTURE.read_bytes())
    before = path.stat()
    quiet_load(str(path)), quiet_load(str(path), "val"), quiet_load(str(path), "test")
    lines = FIXTURE.read_text().split("\n")
    lines[0] = "C" * len(lines[0])  # same size, another molecule
    deadline = time.monotonic() + 10
    while path.stat().st_ctime_ns == before.st_ctime_ns and time.monotonic() < deadline:
        time.sleep(0.01)  # the kernel's clock ticks coarsely: make sure the edit gets a new ctime
        path.write_text("\n".join(lines))
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # touch -r
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    train, val, test = quiet_load(str(path)), quiet_load(str(path), "val"), quiet_load(str(path), "test")
    assert sorted(train.smiles() + val.smiles() + test.smiles()) == sorted(x for x in lines if x)


@pytest.mark.parametrize("case", ["cr endings", "cr in line 1", "quote and cr", "huge quoted field"])
def test_lines_the_csv_module_refuses_are_dropped_not_a_traceback(tmp_path, capsys, case):
    """Item 3: csv.Error escaped as a traceback (exit 1)."""
    molecules = FIXTURE.read_text().split()[:30]
    expected_drops: dict = {}
    if case == "cr endings":  # classic Mac OS: every line ends in a lone CR
        path = write(tmp_path / "mac.smi", "\r".join(molecules) + "\r")
    elif case == "cr in line 1":
        path = write(tmp_path / "stray.smi", "CC(\rO ethanol\n" + "\n".join(molecules) + "\n")
        expected_drops = {"invalid_smiles": [1]}  # the CR splits the line's fields: CC( is no SMILES
    elif case == "quote and cr":
        path = write(tmp_path / "q.csv", "id,smiles\n" + "".join(f'{i},{m}\n' for i, m in enumerate(molecules))
                     + '31,"CCO"\rx\n')
        expected_drops = {"malformed": [32]}
    else:
        path = write(tmp_path / "big.csv", "id,smiles\n" + "".join(f'{i},{m}\n' for i, m in enumerate(molecules))
                     + '31,"' + "C" * 140_000 + '"\n')
        expected_drops = {"too_long": [32]}
    assert corpus.main([str(path), "--workers", "1"]) == 0, capsys.readouterr().err
    report = describe(str(path), workers=1, progress=False)
    assert report.kept == 30 and report.dropped == expected_drops
    assert report.n_lines == 30 + (case != "cr endings") + ("csv" in path.suffix)
    if case == "cr endings":
        assert "lines end in CR" in report.layout


def test_binary_junk_without_nul_bytes_is_refused_in_one_line(tmp_path, capsys):
    junk = tmp_path / "junk.smi"
    junk.write_bytes(bytes(b for b in np.random.default_rng(0).integers(1, 256, 4000, dtype=np.uint8)))
    assert corpus.main([str(junk)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {junk}: binary data (control characters in the first 4,000")


def test_a_csv_header_after_blank_lines(tmp_path):
    """Item 4: the header was found on line 3 but line 1 was skipped, so 'smiles' was read as a molecule."""
    molecules = FIXTURE.read_text().split()[:30]
    path = write(tmp_path / "blank.csv", "\n\nid,smiles\n" + "".join(f"{i},{m}\n" for i, m in enumerate(molecules)))
    report = describe(str(path), workers=1, progress=False)
    assert (report.kept, report.dropped, report.n_lines) == (30, {}, 33)
    assert list(read_smiles(path))[0] == (4, molecules[0])


def test_timeouts_and_crashes_are_retried_on_the_next_load(tmp_path, monkeypatch):
    """Item 5: a molecule that timed out on a loaded machine stayed dropped in the cache for good, so the
    corpus depended on the load of the day. It is retried; once it encodes, the corpus equals a calm build."""
    flag = tmp_path / "machine-is-busy"
    slow = FIXTURE.read_text().split()[cache.split_order(200, False, "train", 0)[0]]  # a training molecule

    def encoder(smiles):  # hangs on one molecule while the flag file exists (forked workers see it)
        if smiles == slow and flag.exists():
            threading.Event().wait()
        return sf.encoder(smiles)

    monkeypatch.setattr(encode, "_selfies_encoder", encoder)
    calm = quiet_load(str(FIXTURE), workers=1, timeout_s=3.0)
    monkeypatch.setattr(cache, "CACHE_DIR", tmp_path / "busy_cache")
    flag.touch()
    busy = quiet_load(str(FIXTURE), workers=1, timeout_s=1.0)
    assert busy.report.dropped == {"timeout": 1} and slow not in busy.smiles()
    flag.unlink()
    again = quiet_load(str(FIXTURE), workers=1, timeout_s=3.0)
    assert again.report.dropped == {} and not again.report.cached
    assert again.smiles() == calm.smiles() and np.array_equal(again.tokens, calm.tokens)
    assert again.tokenizer.symbols == calm.tokenizer.symbols
    assert quiet_load(str(FIXTURE), workers=1).report.cached  # nothing transient left: cached again


def test_a_molecule_that_still_hangs_stays_dropped_and_the_rest_is_kept(tmp_path, monkeypatch):
    slow = FIXTURE.read_text().split()[cache.split_order(200, False, "train", 0)[0]]  # a training molecule

    def encoder(smiles):
        if smiles == slow:
            threading.Event().wait()
        return sf.encoder(smiles)

    monkeypatch.setattr(encode, "_selfies_encoder", encoder)
    first = quiet_load(str(FIXTURE), workers=1, timeout_s=1.0)
    again = quiet_load(str(FIXTURE), workers=1, timeout_s=1.0)
    assert first.report.dropped == again.report.dropped == {"timeout": 1}
    assert again.smiles() == first.smiles() and len(again) == 159


def test_a_very_long_file_name(tmp_path):
    """Item 6: the cache folder took the whole stem: a 250-character name was 'File name too long'."""
    path = tmp_path / ("a" * 246 + ".smi")
    path.write_bytes(FIXTURE.read_bytes())
    assert len(quiet_load(str(path))) == 160


@pytest.mark.parametrize("args, said", [
    (["--seed", "-1"], "error: seed must be an integer >= 0, got -1"),
    (["--timeout", "nan"], "error: timeout must be a number of seconds > 0, got nan"),
    (["--timeout", "inf"], "error: timeout must be a number of seconds > 0, got inf"),
])
def test_bad_arguments_are_one_error_line(tmp_path, capsys, args, said):
    """Items 7, 8: --seed -1 was a numpy traceback; --timeout nan silently turned the timeout off."""
    path = write(tmp_path / "a.smi", "CCO\n")
    assert corpus.main([str(path), *args]) == 2
    assert capsys.readouterr().err == said + "\n"


def test_a_cache_folder_that_cannot_be_made_is_one_error_line(tmp_path, monkeypatch, capsys):
    """Item 7: CHEMSCALE_RUNS=/dev/null/x was a NotADirectoryError traceback."""
    monkeypatch.setattr(cache, "CACHE_DIR", Path("/dev/null/x/cache/corpus"))
    assert corpus.main([str(write(tmp_path / "a.smi", "CCO\n"))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: /dev/null/x/cache/corpus: cannot create the corpus cache folder (")
    assert err.count("\n") == 1 and "CHEMSCALE_RUNS" in err


@pytest.mark.parametrize("encoding", ["utf-32-le", "utf-32-be", "utf-16-le", "utf-16-be"])
def test_utf16_and_utf32_without_a_byte_order_mark_with_non_ascii_names(tmp_path, encoding):
    """Item 9: UTF-32 without a BOM, and UTF-16 without one holding non-ASCII names, were 'binary data'."""
    path = tmp_path / "win.smi"
    molecules = FIXTURE.read_text().split()[:30]
    name = "\u4e59\u9187\u00e9" * 12  # more non-ASCII than ASCII in the names: few NUL bytes in UTF-16
    path.write_bytes("".join(f"{m} {name} {i}\r\n" for i, m in enumerate(molecules)).encode(encoding))
    assert open_smiles_file(path).encoding == encoding
    assert [s for _, s in read_smiles(path)] == molecules


@pytest.mark.parametrize("kind", ["bzip2", "xz", "zip", "zstd"])
def test_other_compressed_files_are_named_with_how_to_decompress(tmp_path, capsys, kind):
    """Item 10: they were 'binary data ... convert it with iconv'."""
    import bz2
    import lzma
    import zipfile
    data = FIXTURE.read_bytes()
    path = tmp_path / "mols.smi"
    if kind == "bzip2":
        path.write_bytes(bz2.compress(data))
    elif kind == "xz":
        path.write_bytes(lzma.compress(data))
    elif kind == "zip":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("mols.smi", data)
    else:  # a zstd frame's magic number, then its (here unused) content
        path.write_bytes(b"\x28\xb5\x2f\xfd" + data)
    assert corpus.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: {kind}-compressed data; decompress it first") and err.count("\n") == 1


def test_rdkit_smiles_name_header_is_skipped_and_said(tmp_path):
    """Item 11: RDKit's SmilesWriter header 'SMILES Name' was reported as an invalid SMILES on line 1."""
    molecules = FIXTURE.read_text().split()[:30]
    path = write(tmp_path / "rdkit.smi", "SMILES Name\n" + "".join(f"{m} mol{i}\n" for i, m in enumerate(molecules)))
    report = describe(str(path), workers=1, progress=False)
    assert (report.kept, report.dropped) == (30, {}) and "header line 1 skipped" in report.layout


def test_a_big_encode_says_what_it_will_do_first(tmp_path, monkeypatch, capsys):
    """Item 11: `python -m chemscale.lm.corpus moses` encoded 1.58M molecules (~30 min) without a word."""
    monkeypatch.setattr(cache, "BIG_ENCODE", 100)
    load(str(FIXTURE), workers=1)
    assert "moses_200.smi: encoding up to 160 molecules (about 1 min at ~1,000 molecules/s; cached for later " \
           "runs; -n N encodes only the first N)\n" in capsys.readouterr().err
    load(str(FIXTURE), workers=1)  # cached: says nothing
    assert "encoding up to" not in capsys.readouterr().err


def test_the_cache_folder_name_is_cut_and_a_leading_dash_dropped(tmp_path):
    source = open_smiles_file(write(tmp_path / ("-" + "b" * 100 + ".smi"), "CCO\n"))
    folder = cache._cache_folder(source, False, "train", 0, {"sha256": "0" * 64}, 1)
    assert folder.name.startswith("b" * (cache.STEM_CHARS - 1) + "-smi-train-") and len(folder.name) < 80


# --- picking lines in one read (issue 12, item 5: 10^7 PubChem molecules) ------------------------------------------

@pytest.mark.parametrize("name, text", [
    ("plain.smi", "".join(f"{'C' * (1 + i % 7)}O line{i}\n" for i in range(60))),
    ("no_last_lf.smi", "".join(f"C{'C' * (i % 5)}N\n" for i in range(40)) + "CCO"),
    ("header.csv", "smiles,name\n" + "".join(f"{'C' * (1 + i % 9)}O,m{i}\n" for i in range(50))),
    ("long_line.smi", "CCO\n" + "C" * 300 + "\n" + "".join(f"C{'N' * (i % 3)}\n" for i in range(30))),
    ("gzipped.smi.gz", "".join(f"{'C' * (1 + i % 4)}Cl\n" for i in range(45))),
    ("crlf.smi", "".join(f"C{'O' * (i % 4)}\r\n" for i in range(35)))])
def test_picking_lines_in_one_read_gives_what_reading_every_line_gives(tmp_path, monkeypatch, name, text):
    """Blocks far smaller than a line, so that lines are cut by every block end, and a line longer than a block."""
    monkeypatch.setattr(read_module, "READ_BLOCK", 7)
    source = open_smiles_file(write(tmp_path / name, text))
    every = list(source.data_lines())
    rng = np.random.default_rng(0)
    for picked in ([0], [len(every) - 1], sorted(rng.choice(len(every), 12, replace=False).tolist()),
                   list(range(len(every)))):
        counted = []
        assert list(source.data_lines_at(picked, counted.append)) == [every[i] for i in picked]
        assert sum(counted) <= len(every) + source.header_lines


def test_a_truncated_gz_is_named_when_picking_lines(tmp_path):
    data = gzip.compress("".join(f"C{'C' * (i % 6)}O\n" for i in range(20_000)).encode())
    path = tmp_path / "cut.smi.gz"
    path.write_bytes(data[: len(data) // 2])
    source = open_smiles_file(path)
    with pytest.raises(CorpusError, match=r"cut\.smi\.gz: line \d+: cannot read past line \d+ .*truncated or corrupt"):
        list(source.data_lines_at([19_999]))


def spools(folder: Path) -> list[Path]:
    return sorted(folder.glob("*/spool"))


def test_an_encode_of_many_rounds_reads_the_file_once_and_resumes_from_its_spool(cache_dir, monkeypatch):
    """Each round used to read the whole file for its lines (20 reads of PubChem for 10^7 molecules); one read now
    spools every line the encode takes, an interrupted encode resumes from the spool without reading the file, and
    the spool goes once the encode is done."""
    whole = quiet_load(str(FIXTURE), n_molecules=100)
    monkeypatch.setattr(cache, "CACHE_DIR", cache_dir.parent / "rounds")
    monkeypatch.setattr(cache, "ROUND_MOLECULES", 30)
    reads, real_read = [], cache._read_records
    monkeypatch.setattr(cache, "_read_records", lambda *a, **k: reads.append(a[2]) or real_read(*a, **k))
    interrupt_encoder(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        quiet_load(str(FIXTURE), n_molecules=100)
    assert len(reads) == 1 and reads[0] >= 100, "one read of the file for every round"
    assert len(spools(cache.CACHE_DIR)) == 1
    resumed = quiet_load(str(FIXTURE), n_molecules=100)
    assert len(reads) == 1, "the resumed encode took its lines from the spool"
    assert np.array_equal(resumed.tokens, whole.tokens) and resumed.smiles() == whole.smiles()
    assert spools(cache.CACHE_DIR) == [], "the spool is removed once its encode is done"


def test_a_damaged_spool_is_read_again_with_a_warning(cache_dir, monkeypatch):
    whole = quiet_load(str(FIXTURE), n_molecules=100)
    monkeypatch.setattr(cache, "CACHE_DIR", cache_dir.parent / "damaged")
    monkeypatch.setattr(cache, "ROUND_MOLECULES", 30)
    interrupt_encoder(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        quiet_load(str(FIXTURE), n_molecules=100)
    [spool] = spools(cache.CACHE_DIR)
    flip_one_byte(spool / "smiles.bin")
    with pytest.warns(UserWarning, match="damaged spool"):
        resumed = quiet_load(str(FIXTURE), n_molecules=100)
    assert np.array_equal(resumed.tokens, whole.tokens) and resumed.smiles() == whole.smiles()
