"""Corpus contracts: every input format and kind of bad input, nested subsets, the cache, batches."""

import gzip
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np
import pytest
import selfies as sf

from chemscale import corpus
from chemscale.corpus import CorpusError, MoleculeLoader, encode_smiles, load, pad_batch, read_smiles
from chemscale.molecules import canonical
from chemscale.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "moses_200.smi"  # 200 MOSES test-split molecules
# 9 lines: a user file this short has no validation split, so all of them are training molecules
BAD_SMI = "CCO\ncc(\nC1CC\n\nC(C)(C)(C)(C)C\nc1cccc1\nCCN ethylamine\nc1ccccc1\nO=C=O\n"


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """A private cache per test: tests never touch runs/cache."""
    folder = tmp_path / "cache"
    monkeypatch.setattr(corpus, "CACHE_DIR", folder)
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


@pytest.mark.parametrize("name", ["CID-SMILES", "CID-SMILES.gz"])
def test_pubchem_cid_tab_smiles(tmp_path, name):
    path = write(tmp_path / name, "1\tCC(=O)OC(CC(=O)[O-])C[N+](C)(C)C\n2\tC1=CC(C(C(=C1)C(=O)O)O)O\n3\n")
    assert list(read_smiles(path)) == [(1, "CC(=O)OC(CC(=O)[O-])C[N+](C)(C)C"), (2, "C1=CC(C(C(=C1)C(=O)O)O)O")]


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


def test_not_gzip_and_unknown_types(tmp_path):
    with pytest.raises(CorpusError, match=r"fake\.smi\.gz: line 1: .*truncated or corrupt"):
        list(read_smiles(write(tmp_path / "fake.smi", "CCO\n").rename(tmp_path / "fake.smi.gz")))
    with pytest.raises(CorpusError, match=r"mols\.xyz: unknown file type"):
        list(read_smiles(write(tmp_path / "mols.xyz", "CCO\n")))
    with pytest.raises(CorpusError, match="no such file"):
        quiet_load(str(tmp_path / "absent.smi"))


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
    assert r.examples == [(2, "cc(", "invalid_smiles"), (3, "C1CC", "invalid_smiles"), (4, "", "empty"),
                                  (5, "C(C)(C)(C)(C)C", "valence"), (6, "c1cccc1", "invalid_smiles")]
    assert sorted(c.smiles()) == ["CCN", "CCO", "O=C=O", "c1ccccc1"]
    assert "line 2: 'cc(' (invalid_smiles)" in str(r)


def test_malformed_and_too_long_lines_are_dropped(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "MAX_SYMBOLS", 5)
    c = quiet_load(str(write(tmp_path / "CID-SMILES", "1\tCCO\n2\n3\tc1ccccc1\n4\tO=C=O\n")))
    assert c.report.dropped == {"malformed": 1, "too_long": 1}
    assert c.report.examples == [(2, "2", "malformed"), (3, "c1ccccc1", "too_long")]
    assert set(c.report.dropped) <= set(corpus.REASONS)


def test_a_hanging_molecule_times_out_and_its_worker_is_replaced(monkeypatch):
    def encoder(smiles):  # older selfies releases hang like this on some invalid input
        if smiles == "HANG":
            time.sleep(60)
        return sf.encoder(smiles)

    monkeypatch.setattr(corpus, "_selfies_encoder", encoder)
    t0 = time.perf_counter()
    out = encode_smiles(["CCO", "HANG", "CCN", "CCC"], workers=1, timeout_s=0.5, progress=False)
    assert out == [("[C][C][O]", None), (None, "timeout"), ("[C][C][N]", None), ("[C][C][C]", None)]
    assert time.perf_counter() - t0 < 10
    assert mp.active_children() == []  # the stuck worker was killed, the others stopped


def test_a_crashing_worker_drops_only_its_molecule(monkeypatch):
    def encoder(smiles):
        if smiles == "BOOM":
            os._exit(1)
        return sf.encoder(smiles)

    monkeypatch.setattr(corpus, "_selfies_encoder", encoder)
    out = encode_smiles(["CCO"] * 40 + ["BOOM"] + ["CCN"] * 40, workers=2, progress=False)
    assert out[40] == (None, "crash")
    assert out[:40] == [("[C][C][O]", None)] * 40 and out[41:] == [("[C][C][N]", None)] * 40
    assert mp.active_children() == []


# --- splits, nested subsets, tokenizer mapping -------------------------------------------------------

def test_user_file_splits_are_disjoint_and_val_is_ten_percent():
    train, val = quiet_load(str(FIXTURE), "train"), quiet_load(str(FIXTURE), "val")
    assert (len(train), len(val)) == (180, 20)
    assert sorted(train.smiles() + val.smiles()) == sorted(FIXTURE.read_text().split())


def test_nested_subsets_equal_fresh_smaller_loads(tmp_path, monkeypatch):
    big = quiet_load("moses", "val", 300)
    monkeypatch.setattr(corpus, "CACHE_DIR", tmp_path / "another_cache")
    small = quiet_load("moses", "val", 100)
    assert not small.report.cached and len(small) == 100
    assert np.array_equal(small.offsets, big.offsets[:101])
    assert np.array_equal(small.tokens, big.tokens[: big.offsets[100]])
    assert small.smiles() == big.smiles()[:100]
    assert small.tokenizer.symbols == big.tokenizer.symbols[: len(small.tokenizer)]
    assert quiet_load("moses", "val", 100, seed=1).smiles() != small.smiles()


def test_tokens_decode_back_to_the_input_molecules():
    c = quiet_load(str(FIXTURE))
    assert all(sf.split_selfies(c.tokenizer.decode(c[i])) for i in range(len(c)))
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
    assert corpus.moses_path("val").name == "test.csv.gz"
    assert c.tokens.dtype == np.uint16 and c.offsets.dtype == np.int64


# --- the cache ------------------------------------------------------------------------------------

def counting_encoder(monkeypatch) -> list[int]:
    """Wrap encode_smiles; returns the list of batch sizes it is called with."""
    calls, real = [], corpus.encode_smiles

    def wrapper(smiles, *args, **kwargs):
        calls.append(len(smiles))
        return real(smiles, *args, **kwargs)

    monkeypatch.setattr(corpus, "encode_smiles", wrapper)
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


@pytest.mark.parametrize("damage", ["no manifest", "short tokens", "bad manifest", "missing smiles"])
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
    else:
        (folder / "smiles.txt").unlink()
    calls = counting_encoder(monkeypatch)
    rebuilt = quiet_load(str(FIXTURE), n_molecules=50)
    assert not rebuilt.report.cached and len(calls) == 1
    assert np.array_equal(rebuilt.tokens, first.tokens) and rebuilt.smiles() == first.smiles()


# --- batches -------------------------------------------------------------------------------------

def test_pad_batch():
    batch = pad_batch([np.array([5, 6, 7], np.uint16), np.array([8], np.uint16)])
    assert batch.dtype.is_floating_point is False and batch.tolist() == [[BOS_ID, 5, 6, 7, EOS_ID],
                                                                         [BOS_ID, 8, EOS_ID, PAD_ID, PAD_ID]]


def test_molecule_loader():
    c = quiet_load(str(FIXTURE), n_molecules=100)
    loader = MoleculeLoader(c, 32, seed=3)
    first, second = list(loader), list(loader)
    assert len(loader) == len(first) == 3
    assert all(b.shape[0] == 32 and b.shape[1] == max(int((b[i] != PAD_ID).sum()) for i in range(32)) for b in first)
    assert not all(np.array_equal(a, b) for a, b in zip(first, second))  # each epoch its own order
    loader.set_epoch(0)
    assert all(np.array_equal(a, b) for a, b in zip(first, loader))  # and reproducible
    ordered = list(MoleculeLoader(c, 32, shuffle=False, drop_last=False))
    assert [len(b) for b in ordered] == [32, 32, 32, 4]
    assert ordered[0][1, 1: len(c[1]) + 1].tolist() == c[1].tolist()
    short = MoleculeLoader(c, 8, max_len=30)
    assert short.n_skipped == int((np.diff(c.offsets) + 2 > 30).sum()) > 0
    assert all(b.shape[1] <= 30 for b in short)


# --- command line --------------------------------------------------------------------------------

def test_cli_prints_the_report(tmp_path, capsys):
    assert corpus.main([str(write(tmp_path / "bad.smi", BAD_SMI)), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "read 9 lines, kept 4 molecules, dropped 5 (invalid_smiles 3, empty 1, valence 1)" in out
    assert "line 2: 'cc(' (invalid_smiles)" in out and "vocabulary:" in out and "max" in out
    assert corpus.main([str(write(tmp_path / "x.csv", "a,b\n1,2\n"))]) == 2
    assert "no 'smiles' column" in capsys.readouterr().err


def test_a_big_encode_writes_rounds_and_resumes_after_an_interruption(monkeypatch):
    whole = quiet_load(str(FIXTURE), n_molecules=100)
    monkeypatch.setattr(corpus, "CACHE_DIR", corpus.CACHE_DIR.parent / "another_cache")
    monkeypatch.setattr(corpus, "ROUND_MOLECULES", 30)
    calls, real = [], corpus.encode_smiles

    def interrupted(smiles, *args, **kwargs):
        calls.append(len(smiles))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(smiles, *args, **kwargs)

    monkeypatch.setattr(corpus, "encode_smiles", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quiet_load(str(FIXTURE), n_molecules=100)
    assert calls == [30, 30, 30]
    resumed = quiet_load(str(FIXTURE), n_molecules=100)
    assert calls[3:] == [30, 10 + 16]  # it went on from the 60 cached: 30, then the last 10 and a margin
    assert np.array_equal(resumed.tokens, whole.tokens) and resumed.smiles() == whole.smiles()


def test_a_file_too_short_for_a_validation_split(tmp_path):
    with pytest.raises(CorpusError, match=r"bad\.smi: no molecules in split 'val' \(9 data lines"):
        quiet_load(str(write(tmp_path / "bad.smi", BAD_SMI)), "val")
