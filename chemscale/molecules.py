"""Generation quality of sampled molecules: validity, uniqueness and novelty (RDKit)."""

from __future__ import annotations

from collections.abc import Iterable

import selfies as sf
from rdkit import Chem, RDLogger

RDLogger.DisableLog("rdApp.*")  # invalid samples are expected; RDKit would print one line each


def canonical(smiles: str) -> str | None:
    """RDKit canonical SMILES, or None if it does not parse (or is empty)."""
    if not smiles:
        return None
    mol = Chem.MolFromSmiles(smiles)
    if mol is None or mol.GetNumAtoms() == 0:
        return None
    return Chem.MolToSmiles(mol)


def selfies_to_smiles(strings: Iterable[str]) -> list[str | None]:
    """Decode SELFIES strings to SMILES; None where decoding fails."""
    out = []
    for s in strings:
        try:
            out.append(sf.decoder(s) or None)
        except Exception:  # noqa: BLE001 -- a malformed sample is an invalid molecule, not an error
            out.append(None)
    return out


def quality(generated: list[str | None], train_smiles: Iterable[str]) -> dict:
    """Validity (fraction RDKit parses), uniqueness (unique among valid), novelty (unique valid not in training)."""
    n = len(generated)
    valid = [c for c in (canonical(s) for s in generated if s) if c]
    unique = set(valid)
    train = {c for c in (canonical(s) for s in train_smiles) if c}
    novel = unique - train
    return {"n": n, "validity": len(valid) / n if n else 0.0,
            "uniqueness": len(unique) / len(valid) if valid else 0.0,
            "novelty": len(novel) / len(unique) if unique else 0.0}
