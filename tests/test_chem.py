"""SMILES metrics against direct RDKit calls."""

import pytest

from ddvae_fast.seqvae import chem


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
