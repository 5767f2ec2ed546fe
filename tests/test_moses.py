"""The MOSES data and metrics against independent computations.

Each metric is checked against a direct RDKit or NumPy computation on a small
set, the fingerprints and fragment/scaffold keys against the statistics the
MOSES authors precomputed for their test set, and FCD against fcd_torch.
"""

import math
from collections import Counter

import numpy as np
import pytest
from rdkit import DataStructs
from rdkit.Chem import rdFingerprintGenerator

from ddvae_fast.seqvae import moses_data, moses_metrics
from ddvae_fast.seqvae.chem import to_mol

SMALL = 200  # molecules per check: enough to cover many ring systems, seconds to run


@pytest.fixture(scope="module")
def test_smiles():
    return moses_data.load_split("test")


@pytest.fixture(scope="module")
def test_stats():
    return moses_data.load_statistics("test")


def test_splits_have_the_shipped_sizes():
    sizes = {name: len(moses_data.load_split(name)) for name in moses_data.SPLITS}
    assert sizes == {"train": 1584663, "test": 176074, "test_scaffolds": 176225}


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="split"):
        moses_data.load_split("valid")
    with pytest.raises(ValueError, match="statistics"):
        moses_data.load_statistics("train")


def test_missing_package_is_named(monkeypatch):
    monkeypatch.setattr(moses_data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="molsets"):
        moses_data.data_dir()


def test_fingerprints_equal_the_shipped_test_fingerprints(test_smiles, test_stats):
    mols = [to_mol(s) for s in test_smiles[:SMALL]]
    assert np.array_equal(moses_metrics.fingerprints(mols), test_stats["SNN"]["fps"][:SMALL])


def test_fragment_and_scaffold_keys_are_those_of_the_shipped_statistics(test_smiles, test_stats):
    """Counts over a subset of the test set can only be <= the counts over all of it,
    and any key the shipped statistics lack would mean a different definition."""
    mols = [to_mol(s) for s in test_smiles[:SMALL]]
    frags = Counter(f for m in mols for f in moses_metrics.fragments(m))
    scafs = Counter(s for m in mols if (s := moses_metrics.scaffold(m)) is not None)
    assert frags and scafs
    assert all(test_stats["Frag"]["frag"].get(k, 0) >= v for k, v in frags.items())
    assert all(test_stats["Scaf"]["scaf"].get(k, 0) >= v for k, v in scafs.items())


def _rdkit_fps(smiles):
    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=1024)
    return [gen.GetFingerprint(to_mol(s)) for s in smiles]


def test_snn_and_internal_diversity_against_rdkit_tanimoto(test_smiles):
    gen, ref = test_smiles[:60], test_smiles[1000:1150]
    gen_bv, ref_bv = _rdkit_fps(gen), _rdkit_fps(ref)
    snn = np.mean([max(DataStructs.BulkTanimotoSimilarity(g, ref_bv)) for g in gen_bv])
    fps = moses_metrics.fingerprints([to_mol(s) for s in gen])
    ref_fps = moses_metrics.fingerprints([to_mol(s) for s in ref])
    assert moses_metrics.similarity_to_nearest_neighbour(fps, ref_fps) == pytest.approx(
        snn, rel=1e-6
    )
    sims = np.array([DataStructs.BulkTanimotoSimilarity(g, gen_bv) for g in gen_bv])
    assert moses_metrics.internal_diversity(fps, 1) == pytest.approx(1 - sims.mean(), rel=1e-6)
    int_div2 = 1 - np.sqrt((sims**2).mean(axis=1)).mean()
    assert moses_metrics.internal_diversity(fps, 2) == pytest.approx(int_div2, rel=1e-6)


def test_cosine_similarity_against_numpy():
    a, b = Counter({"x": 3, "y": 1}), Counter({"y": 2, "z": 5})
    keys = ["x", "y", "z"]
    va, vb = np.array([a[k] for k in keys]), np.array([b[k] for k in keys])
    want = va @ vb / np.linalg.norm(va) / np.linalg.norm(vb)
    assert moses_metrics.cosine_similarity(a, b) == pytest.approx(want, rel=1e-12)
    assert moses_metrics.cosine_similarity(a, a) == pytest.approx(1.0)
    assert math.isnan(moses_metrics.cosine_similarity(a, Counter()))


def test_frechet_distance_against_scipy_sqrtm():
    from scipy import linalg

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 6)), rng.normal(1.0, 2.0, size=(300, 6))
    mu1, mu2, s1, s2 = x.mean(0), y.mean(0), np.cov(x.T), np.cov(y.T)
    covmean = linalg.sqrtm(s1 @ s2).real
    want = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
    assert moses_metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-8)
    assert moses_metrics.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_fcd_against_fcd_torch(test_smiles):
    from fcd_torch import FCD

    gen, ref = test_smiles[:300], test_smiles[5000:5300]
    want = FCD(device="cpu", n_jobs=1)(ref, gen)
    mu_g, s_g = moses_metrics._chemnet_statistics(gen)
    mu_r, s_r = moses_metrics._chemnet_statistics(ref)
    assert moses_metrics.frechet_distance(mu_g, s_g, mu_r, s_r) == pytest.approx(want, rel=1e-4)


def test_filters_refuse_charges_rare_atoms_and_large_rings():
    assert moses_metrics.passes_filters(to_mol("CCOc1ccccc1"))
    assert not moses_metrics.passes_filters(to_mol("CC[N+](C)(C)C"))  # charged
    assert not moses_metrics.passes_filters(to_mol("CCI"))  # iodine is not allowed
    assert not moses_metrics.passes_filters(to_mol("C1CCCCCCC1"))  # an 8-membered ring


def test_moses_metrics_of_test_molecules_against_the_test_set(test_smiles):
    """Test molecules measured against the test set: self-similar (SNN = 1, Frag and
    Scaf near 1), valid, unique, all passing filters; invalid strings count against
    validity only."""
    gen = [*test_smiles[:400], "not a molecule", ""]
    m = moses_metrics.moses_metrics(gen, train=[], n_jobs=1, unique_at=(100,))
    assert m["valid"] == pytest.approx(400 / 402)
    assert m["unique@100"] == 1.0
    assert m["SNN/Test"] == pytest.approx(1.0)
    assert m["Frag/Test"] > 0.9 and m["Scaf/Test"] > 0.3
    assert m["Filters"] == 1.0 and m["Novelty"] == 1.0
    assert 0.8 < m["IntDiv"] < 0.9 and m["IntDiv2"] < m["IntDiv"]
    assert m["SNN/TestSF"] < m["SNN/Test"] and m["FCD/TestSF"] > m["FCD/Test"]


def test_metrics_command_prints_and_writes_the_moses_keys(tmp_path, test_smiles, capsys):
    import json

    from ddvae_fast.seqvae import cli

    gen = tmp_path / "gen.smi"
    gen.write_text("\n".join([*test_smiles[:50], "not a molecule"]) + "\n")
    out = tmp_path / "metrics.json"
    assert cli.main(["metrics", "--gen", str(gen), "--json", str(out), "--jobs", "1"]) == 0
    written = json.loads(out.read_text())
    assert tuple(written) == moses_metrics.MOSES_KEYS
    assert written["valid"] == pytest.approx(50 / 51)
    assert "SNN/Test" in capsys.readouterr().out


def test_metrics_command_refuses_bad_input_with_exit_code_2(tmp_path, capsys):
    from ddvae_fast.seqvae import cli

    empty = tmp_path / "empty.smi"
    empty.write_text("\n")
    assert cli.main(["metrics", "--gen", str(tmp_path / "missing.smi")]) == 2
    assert cli.main(["metrics", "--gen", str(empty)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: --gen") for line in err)
