"""SMILES metrics and penalized logP (Eq. 25-26) against direct RDKit calls."""

import pytest
from rdkit import Chem
from rdkit.Chem import Crippen
from rdkit.Contrib.SA_Score import sascorer

from ddvae_fast.seqvae import chem

MOLECULES = [
    "CCO",
    "c1ccccc1O",
    "CC(C)(C)c1ccc2occ(CC(=O)Nc3ccccc3F)c2c1",
    "C[C@@H]1CC(Nc2cncc(-c3nncn3C)c2)C[C@@H](C)C1",
    "C1CCCCCCC1",  # an 8-ring: cycle penalty 2
    "O=C1CCCCCCCCCCCN1",  # a 13-ring (laurolactam): penalty 7
    "C1CC2CCC1C2",  # bicyclic, largest ring 6 atoms
]


def _direct_score(smiles):
    # Eq. 25-26 written out with independent RDKit calls and the ZINC-250k
    # constants of the JT-VAE evaluation.
    mol = Chem.MolFromSmiles(smiles)
    log_p = Crippen.MolLogP(mol)
    sa = -sascorer.calculateScore(mol)
    ring_sizes = [len(ring) for ring in mol.GetRingInfo().AtomRings()]
    largest = max(ring_sizes) if ring_sizes else 0
    cycle = -max(largest - 6, 0)
    return (
        (log_p - 2.4570953396190123) / 1.434324401111988
        + (sa - -3.0525811293166134) / 0.8335207024513095
        + (cycle - -0.0485696876403053) / 0.2860212110245455
    )


@pytest.mark.parametrize("smiles", MOLECULES)
def test_penalized_logp_matches_direct_computation(smiles):
    # Same float64 operations in the same order up to association: 1e-12.
    assert chem.penalized_logp(smiles) == pytest.approx(_direct_score(smiles), rel=0, abs=1e-12)
    assert chem.penalized_logp(Chem.MolFromSmiles(smiles)) == pytest.approx(
        _direct_score(smiles), rel=0, abs=1e-12
    )


def test_ring_penalty_uses_largest_ring():
    assert chem.largest_ring_size(Chem.MolFromSmiles("CCO")) == 0
    assert chem.largest_ring_size(Chem.MolFromSmiles("C1CCCCCCC1")) == 8
    assert chem.largest_ring_size(Chem.MolFromSmiles("O=C1CCCCCCCCCCCN1")) == 13
    # Two more carbons raise logP, but the 8-ring's penalty (2 / 0.286 = 7 units) dominates.
    eight = chem.penalized_logp("C1CCCCCCC1")
    six = chem.penalized_logp("C1CCCCC1")
    assert eight < six


def test_penalized_logp_rejects_invalid():
    for bad in ("C1CC", "not a molecule", "", None):
        with pytest.raises(ValueError, match="not a valid molecule"):
            chem.penalized_logp(bad)


def test_validity_uniqueness_novelty():
    samples = ["CCO", "OCC", "c1ccccc1", "C1CC", None, "", "C(", "Cl"]
    # CCO and OCC are one molecule; C1CC (open ring), C( , '' and None are invalid.
    assert chem.validity(samples) == pytest.approx(4 / 8)
    assert chem.uniqueness(samples) == pytest.approx(3 / 4)
    assert chem.novelty(samples, training=["CCO", "CC"]) == pytest.approx(2 / 3)
    metrics = chem.sample_metrics(samples, training=["c1ccccc1"])
    assert metrics == {
        "n_samples": 8,
        "validity": 0.5,
        "uniqueness": 0.75,
        "novelty": pytest.approx(2 / 3),
    }
    assert chem.uniqueness([None, "C1CC"]) == 0.0
    with pytest.raises(ValueError):
        chem.validity([])


def test_validity_requires_sanitization():
    # Parses as a graph but fails valence sanitization: a pentavalent carbon.
    assert not chem.is_valid("C(C)(C)(C)(C)C")
    assert chem.is_valid("[nH]1cccc1")
    assert chem.canonical("OCC") == chem.canonical("CCO")
