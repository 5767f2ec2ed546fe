"""SMILES tooling on RDKit: validity, uniqueness and novelty of sampled strings."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from rdkit import Chem, RDLogger

RDLogger.DisableLog("rdApp.*")  # invalid samples are expected; don't flood stderr


def to_mol(smiles):
    """The sanitized RDKit molecule of ``smiles``, or None if it does not parse.

    The empty string is not a molecule (RDKit would return an empty one).
    """
    if smiles is None or not isinstance(smiles, str) or not smiles:
        return None
    return Chem.MolFromSmiles(smiles)  # parses and sanitizes; None on failure


def canonical(smiles) -> str | None:
    mol = to_mol(smiles)
    return None if mol is None else Chem.MolToSmiles(mol)


def is_valid(smiles) -> bool:
    return to_mol(smiles) is not None


def validity(smiles: Sequence) -> float:
    """Fraction of strings that parse and sanitize (None counts as invalid)."""
    smiles = list(smiles)
    if not smiles:
        raise ValueError("validity of an empty list is undefined")
    return sum(is_valid(s) for s in smiles) / len(smiles)


def uniqueness(smiles: Sequence) -> float:
    """Fraction of distinct molecules (by canonical SMILES) among the valid ones."""
    valid = [c for c in map(canonical, smiles) if c is not None]
    if not valid:
        return 0.0
    return len(set(valid)) / len(valid)


def novelty(smiles: Sequence, training: Iterable[str]) -> float:
    """Fraction of the distinct valid molecules that are not in ``training``."""
    valid = {c for c in map(canonical, smiles) if c is not None}
    if not valid:
        return 0.0
    known = {c for c in map(canonical, training) if c is not None}
    return len(valid - known) / len(valid)


def sample_metrics(samples: Sequence, training: Iterable[str] | None = None) -> dict:
    """Validity, uniqueness (and novelty, given the training strings) of samples."""
    samples = list(samples)
    out = {
        "n_samples": len(samples),
        "validity": validity(samples),
        "uniqueness": uniqueness(samples),
    }
    if training is not None:
        out["novelty"] = novelty(samples, training)
    return out
