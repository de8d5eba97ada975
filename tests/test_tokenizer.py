"""Tokenizer contracts: round trip on real molecules, stable ids, and clear errors for bad files."""

import json
import random
from pathlib import Path

import pytest
import selfies as sf

from chemscale.lm.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, TokenizerError, split_symbols

FIXTURE = Path(__file__).parent / "fixtures" / "moses_200.smi"


@pytest.fixture(scope="module")
def selfies_strings() -> list[str]:
    return [sf.encoder(line.split()[0]) for line in FIXTURE.read_text().splitlines()]


def test_specials_come_first():
    tok = Tokenizer(["[C]"])
    assert (PAD_ID, BOS_ID, EOS_ID, UNK_ID) == (0, 1, 2, 3)
    assert tok.symbols == ["[PAD]", "[BOS]", "[EOS]", "[UNK]", "[C]"]
    assert len(tok) == 5


def test_round_trip_on_moses_molecules(selfies_strings):
    tok = Tokenizer.from_selfies(selfies_strings)
    for s in selfies_strings:
        ids = tok.encode(s)
        assert ids[0] == BOS_ID and ids[-1] == EOS_ID and UNK_ID not in ids
        assert ids[1:-1] == tok.encode(s, add_special=False)
        assert tok.decode(ids) == s


def test_from_selfies_is_sorted_and_order_independent(selfies_strings):
    shuffled = random.Random(0).sample(selfies_strings, len(selfies_strings))
    a, b = Tokenizer.from_selfies(selfies_strings), Tokenizer.from_selfies(shuffled)
    assert a == b
    assert a.symbols[4:] == sorted(a.symbols[4:])


def test_unknown_symbols_and_decode_rules():
    tok = Tokenizer(["[C]", "[O]"])
    c, o = tok.index["[C]"], tok.index["[O]"]
    assert tok.encode("[C][N][O]") == [BOS_ID, c, UNK_ID, o, EOS_ID]
    assert tok.decode([BOS_ID, c, o, EOS_ID, c, PAD_ID]) == "[C][O]"  # stops at EOS
    assert tok.decode([PAD_ID, BOS_ID, c, PAD_ID, o]) == "[C][O]"  # PAD and BOS skipped
    assert tok.decode([c, 999]) == "[C][UNK]"


def test_extend_never_changes_existing_ids(selfies_strings):
    tok = Tokenizer.from_selfies(selfies_strings[:20])
    before = {s: tok.index[s] for s in tok.symbols}
    ids_before = [tok.encode(s) for s in selfies_strings[:20]]
    added = tok.extend(["[Xe]", "[C]", "[Kr]", "[Xe]"])
    assert added == ["[Xe]", "[Kr]"]  # only new ones, in the order given
    assert tok.symbols[-2:] == ["[Xe]", "[Kr]"]
    assert {s: tok.index[s] for s in before} == before
    assert [tok.encode(s) for s in selfies_strings[:20]] == ids_before


def test_save_load(tmp_path, selfies_strings):
    tok = Tokenizer.from_selfies(selfies_strings)
    tok.extend(["[Xe]"])
    tok.save(tmp_path / "tok.json")
    loaded = Tokenizer.load(tmp_path / "tok.json")
    assert loaded == tok and loaded.index == tok.index
    assert json.loads((tmp_path / "tok.json").read_text())["symbols"] == tok.symbols


@pytest.mark.parametrize("content, message", [
    ("{not json", "not a JSON file"),
    ("[1, 2]", "list of strings under 'symbols'"),
    ('{"symbols": ["[C]", 5]}', "list of strings under 'symbols'"),
    ('{"symbols": ["[C]", "[O]"]}', "must start with"),
    ('{"symbols": ["[PAD]", "[BOS]", "[EOS]", "[UNK]", "[C]", "[C]"]}', r"duplicate symbols \['\[C\]'\]"),
])
def test_malformed_file(tmp_path, content, message):
    path = tmp_path / "tok.json"
    path.write_text(content)
    with pytest.raises(TokenizerError, match=message) as e:
        Tokenizer.load(path)
    assert str(path) in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer.load(tmp_path / "nope.json")


@pytest.mark.parametrize("text, symbols", [
    ("CCO", ["CCO"]), ("[C] [C]", ["[C]", " ", "[C]"]), ("[C]x[O]", ["[C]", "x", "[O]"]),
    ("[C]..[O]", ["[C]", ".", ".", "[O]"]), (" [C]", [" ", "[C]"]), ("[C][C", ["[C]", "[C"]), ("[", ["["]),
])
def test_malformed_selfies_keep_every_piece_as_unk(text, symbols):
    """Issue 8 review, item 12: nothing is dropped and nothing raises; stray text is [UNK], as in the export."""
    tok = Tokenizer(["[C]", "[O]"])
    assert split_symbols(text) == symbols
    assert tok.encode(text) == [BOS_ID, *(tok.index.get(s, UNK_ID) for s in symbols), EOS_ID]
    assert "".join(split_symbols(text)) == text
