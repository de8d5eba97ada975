"""Generation quality on lists whose validity, uniqueness and novelty are known."""

import pytest

from chemscale.lm.molecules import canonical, is_selfies, quality, selfies_to_smiles

# 6 samples: 4 valid (CCO twice, written two ways), 3 distinct, CCO in training
GENERATED = ["CCO", "OCC", "c1ccccc1", "C1CC", "", "CCN"]
TRAIN = ["C(C)O", "CC(=O)O"]


def test_quality_on_known_smiles():
    q = quality(GENERATED, TRAIN)
    assert q == {"n": 6, "n_valid": 4, "n_unique": 3, "n_novel": 2,
                 "validity": pytest.approx(4 / 6), "uniqueness": pytest.approx(3 / 4), "novelty": pytest.approx(2 / 3)}


def test_selfies_input_is_detected():
    as_selfies = ["[C][C][O]", "[O][C][C]", "[C][=C][C][=C][C][=C][Ring1][=Branch1]", "[C][=C][UNK]", "", "[C][C][N]"]
    assert is_selfies(as_selfies) and not is_selfies(GENERATED)
    assert quality(as_selfies, TRAIN) == quality(GENERATED, TRAIN)


def test_bracket_only_smiles_need_kind():
    # '[Na+].[Cl-]' looks like SELFIES symbols; say what it is
    assert quality(["[Na+].[Cl-]"], [])["validity"] == 0.0
    assert quality(["[Na+].[Cl-]"], [], kind="smiles")["validity"] == 1.0
    with pytest.raises(ValueError, match="kind"):
        quality([], [], kind="inchi")


def test_canonical_training_set_is_used_as_given():
    q = quality(["OCC", "CCN"], ["CCO"], train_is_canonical=True)
    assert q["novelty"] == 0.5
    assert quality(["OCC"], ["OCC"], train_is_canonical=True)["novelty"] == 1.0  # 'OCC' is not canonical


def test_empty_and_all_invalid():
    assert quality([], TRAIN) == {"n": 0, "n_valid": 0, "n_unique": 0, "n_novel": 0,
                                  "validity": 0.0, "uniqueness": 0.0, "novelty": 0.0}
    assert quality([None, "C(("], TRAIN)["validity"] == 0.0


def test_selfies_to_smiles_and_canonical():
    assert selfies_to_smiles(["[C][C][O]", "[C][=C][UNK]", "", None, "[Branch1]"]) == ["CCO", None, None, None, None]
    assert canonical("OCC") == "CCO" and canonical("C1CC") is None and canonical("") is None
