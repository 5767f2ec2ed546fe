"""SMILES tooling on RDKit: validity, uniqueness, novelty, penalized logP.

Penalized logP is the Bayesian-optimisation score of Section 4.4 (Eq. 25-26):
logP(m) - SA(m) - cycle(m), with cycle(m) = max(0, largest ring size - 6),
each term standardised by its mean and standard deviation on the ZINC-250k
training set (the constants below, those of the JT-VAE/DD-VAE evaluation).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import lru_cache

from rdkit import Chem, RDLogger
from rdkit.Chem import Descriptors

# ZINC-250k statistics of each term of Eq. 25.
LOGP_MEAN, LOGP_STD = 2.4570953396190123, 1.434324401111988
SA_MEAN, SA_STD = -3.0525811293166134, 0.8335207024513095  # of -SA
CYCLE_MEAN, CYCLE_STD = -0.0485696876403053, 0.2860212110245455  # of -cycle

RDLogger.DisableLog("rdApp.*")  # invalid samples are expected; don't flood stderr


@lru_cache(maxsize=1)
def _sascorer():
    # rdkit.Contrib is not a regular package on every install; import it lazily
    # so validity metrics work even where SA_Score is missing.
    from rdkit.Contrib.SA_Score import sascorer

    return sascorer


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


def largest_ring_size(mol) -> int:
    rings = mol.GetRingInfo().AtomRings()
    return max((len(r) for r in rings), default=0)


def penalized_logp(smiles_or_mol) -> float:
    """Standardized logP - SA - cycle of a molecule (Eq. 25-26)."""
    mol = smiles_or_mol if isinstance(smiles_or_mol, Chem.Mol) else to_mol(smiles_or_mol)
    if mol is None:
        raise ValueError(f"not a valid molecule: {smiles_or_mol!r}")
    log_p = Descriptors.MolLogP(mol)
    sa = _sascorer().calculateScore(mol)
    cycle = max(0, largest_ring_size(mol) - 6)
    return (
        (log_p - LOGP_MEAN) / LOGP_STD
        + (-sa - SA_MEAN) / SA_STD
        + (-cycle - CYCLE_MEAN) / CYCLE_STD
    )


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
