"""The MOSES distribution-learning metrics, for current RDKit and NumPy.

Definitions follow the MOSES benchmark (Polykovskiy et al., 2020) and its
public code; every metric below is computed here, only the FCD network comes
from ``fcd_torch`` (the implementation MOSES uses):

- valid: fraction of generated strings that RDKit parses and sanitizes.
- unique@k: distinct canonical SMILES among the first k valid ones, over k.
- FCD/ref: Frechet distance between ChemNet activations of the valid
  molecules and the reference's precomputed mean and covariance.
- SNN/ref: mean over valid molecules of the largest Tanimoto similarity to a
  reference molecule (Morgan radius 2, 1024 bits).
- Frag/ref, Scaf/ref: cosine similarity of BRICS-fragment counts and of
  Bemis-Murcko scaffold counts (scaffolds with at least two rings).
- IntDiv (p = 1), IntDiv2 (p = 2): 1 - mean_i (mean_j T_ij^p)^(1/p) over the
  valid molecules' fingerprints, the diagonal included.
- Filters: fraction of valid molecules passing the MCF and PAINS filters with
  only C, N, S, O, F, Cl, Br, H atoms, no charge and no ring of 8 or more atoms.
- Novelty: fraction of the distinct valid molecules not in the training split.
"""

from __future__ import annotations

import csv
import math
import warnings
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import cache

import numpy as np
import torch
from rdkit import Chem
from rdkit.Chem import AllChem, rdFingerprintGenerator
from rdkit.Chem.Scaffolds import MurckoScaffold

from .chem import canonical, to_mol
from .moses_data import data_dir, load_split, load_statistics

__all__ = [
    "MOSES_KEYS",
    "cosine_similarity",
    "fingerprints",
    "fraction_passes_filters",
    "fragments",
    "frechet_distance",
    "internal_diversity",
    "moses_metrics",
    "passes_filters",
    "scaffold",
    "similarity_to_nearest_neighbour",
]

MOSES_KEYS = (
    "valid",
    "unique@1000",
    "unique@10000",
    "FCD/Test",
    "SNN/Test",
    "Frag/Test",
    "Scaf/Test",
    "FCD/TestSF",
    "SNN/TestSF",
    "Frag/TestSF",
    "Scaf/TestSF",
    "IntDiv",
    "IntDiv2",
    "Filters",
    "Novelty",
)
_ALLOWED_ATOMS = frozenset({"C", "N", "S", "O", "F", "Cl", "Br", "H"})
_FP_BITS = 1024


# ----------------------------------------------------------------- per molecule
@cache
def _morgan():
    return rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=_FP_BITS)


def _fingerprint(mol) -> np.ndarray:
    return _morgan().GetFingerprintAsNumPy(mol).astype(np.uint8)


def fingerprints(mols) -> np.ndarray:
    """Morgan radius-2, 1024-bit fingerprints as a (n, 1024) uint8 array."""
    if not mols:
        return np.zeros((0, _FP_BITS), dtype=np.uint8)
    return np.stack([_fingerprint(m) for m in mols])


def fragments(mol) -> list[str]:
    """SMILES of the BRICS fragments of ``mol`` (bonds cut, dummy atoms kept)."""
    return Chem.MolToSmiles(AllChem.FragmentOnBRICSBonds(mol)).split(".")


def scaffold(mol, min_rings: int = 2) -> str | None:
    """Bemis-Murcko scaffold SMILES, or None when it has fewer than ``min_rings`` rings."""
    try:
        core = MurckoScaffold.GetScaffoldForMol(mol)
    except (ValueError, RuntimeError):
        return None
    smiles = Chem.MolToSmiles(core)
    if not smiles or core.GetRingInfo().NumRings() < min_rings:
        return None
    return smiles


@cache
def _filter_patterns() -> tuple:
    folder = data_dir().parent.parent / "metrics"
    smarts = []
    with open(folder / "mcf.csv", newline="") as handle:
        smarts += [row["smarts"] for row in csv.DictReader(handle)]
    with open(folder / "wehi_pains.csv", newline="") as handle:
        smarts += [row[0].strip() for row in csv.reader(handle) if row]
    patterns = tuple(Chem.MolFromSmarts(s) for s in smarts)
    if any(p is None for p in patterns):
        raise ValueError("a MOSES filter SMARTS does not parse")
    return patterns


def passes_filters(mol) -> bool:
    """The MOSES medicinal-chemistry filters (see the module docstring)."""
    if any(len(ring) >= 8 for ring in mol.GetRingInfo().AtomRings()):
        return False
    if any(a.GetFormalCharge() != 0 or a.GetSymbol() not in _ALLOWED_ATOMS for a in mol.GetAtoms()):
        return False
    with_h = Chem.AddHs(mol)
    if any(with_h.HasSubstructMatch(p) for p in _filter_patterns()):
        return False
    smiles = Chem.MolToSmiles(mol, isomericSmiles=False)
    return bool(smiles) and Chem.MolFromSmiles(smiles) is not None


def _describe(smiles: str):
    """Everything the metrics need from one valid canonical SMILES (runs in a worker)."""
    mol = to_mol(smiles)
    return _fingerprint(mol), fragments(mol), scaffold(mol), passes_filters(mol)


# ----------------------------------------------------------------- set metrics
def _tanimoto_aggregate(ref: np.ndarray, gen: np.ndarray, agg: str, p: int = 1) -> np.ndarray:
    """Per generated molecule: max (or (mean T^p)^(1/p)) Tanimoto similarity to ``ref``.

    Chunked float32 matrix products; 0/0 (two empty fingerprints) counts as 1.
    """
    out = np.zeros(len(gen))
    if len(gen) == 0 or len(ref) == 0:
        return out
    g = torch.from_numpy(gen).float()
    g_bits = g.sum(1)
    for start in range(0, len(ref), 8192):
        r = torch.from_numpy(ref[start : start + 8192]).float()
        both = r @ g.T
        sim = both / (r.sum(1, keepdim=True) + g_bits - both)
        sim = torch.nan_to_num(sim, nan=1.0)
        if agg == "max":
            out = np.maximum(out, sim.max(0).values.double().numpy())
        else:
            out += (sim.double() ** p).sum(0).numpy()
    if agg == "mean":
        out = (out / len(ref)) ** (1.0 / p)
    return out


def similarity_to_nearest_neighbour(gen_fps: np.ndarray, ref_fps: np.ndarray) -> float:
    return float(_tanimoto_aggregate(ref_fps, gen_fps, "max").mean())


def internal_diversity(fps: np.ndarray, p: int = 1) -> float:
    return float(1.0 - _tanimoto_aggregate(fps, fps, "mean", p).mean())


def cosine_similarity(ref: Counter, gen: Counter) -> float:
    """<r, g> / (|r| |g|) over the union of keys; NaN when either is empty."""
    if not ref or not gen:
        return math.nan
    dot = sum(count * gen.get(key, 0) for key, count in ref.items())
    norm = math.sqrt(sum(c * c for c in ref.values())) * math.sqrt(sum(c * c for c in gen.values()))
    return dot / norm


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), via the symmetric form.

    (S1 S2)^(1/2) has the eigenvalues of S1^(1/2) S2 S1^(1/2), a symmetric PSD
    matrix, so its trace is the sum of square roots of those eigenvalues.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    trace_sqrt = np.sqrt(np.clip(middle, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def _chemnet_statistics(smiles: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    from fcd_torch import FCD  # the ChemNet weights ship in the wheel

    activations = FCD(device="cpu", n_jobs=1).get_predictions(list(smiles))
    return activations.mean(0), np.cov(activations.T)


def fraction_passes_filters(mols) -> float:
    return sum(map(passes_filters, mols)) / len(mols) if mols else math.nan


# ----------------------------------------------------------------- everything
def moses_metrics(
    generated: Sequence[str],
    *,
    train: Sequence[str] | None = None,
    n_jobs: int = 2,
    unique_at: tuple[int, ...] = (1000, 10000),
) -> dict[str, float]:
    """All MOSES metrics of ``generated`` against the shipped test and scaffold-test sets.

    Keys are MOSES's own (``MOSES_KEYS``). ``train`` defaults to the MOSES
    training split (its SMILES are canonical as shipped, so novelty compares
    canonical strings directly). Per-molecule RDKit work runs in ``n_jobs``
    processes.
    """
    generated = list(generated)
    if not generated:
        raise ValueError("no generated molecules")
    canon = [canonical(s) for s in generated]
    valid = [c for c in canon if c is not None]
    metrics: dict[str, float] = {"valid": len(valid) / len(generated)}
    for k in unique_at:
        if len(valid) < k:
            warnings.warn(f"unique@{k} from only {len(valid)} valid molecules", stacklevel=2)
        head = valid[:k]
        metrics[f"unique@{k}"] = len(set(head)) / len(head) if head else math.nan
    if not valid:
        return {**dict.fromkeys(MOSES_KEYS, math.nan), **metrics}
    if n_jobs > 1:
        with ProcessPoolExecutor(n_jobs) as pool:
            described = list(pool.map(_describe, valid, chunksize=256))
    else:
        described = [_describe(s) for s in valid]
    fps = np.stack([d[0] for d in described])
    frag_counts = Counter(f for d in described for f in d[1])
    scaf_counts = Counter(d[2] for d in described if d[2] is not None)
    mu, sigma = _chemnet_statistics(valid)
    for ref, suffix in (("test", "Test"), ("test_scaffolds", "TestSF")):
        stats = load_statistics(ref)
        metrics[f"FCD/{suffix}"] = frechet_distance(
            mu, sigma, stats["FCD"]["mu"], stats["FCD"]["sigma"]
        )
        metrics[f"SNN/{suffix}"] = similarity_to_nearest_neighbour(fps, stats["SNN"]["fps"])
        metrics[f"Frag/{suffix}"] = cosine_similarity(stats["Frag"]["frag"], frag_counts)
        metrics[f"Scaf/{suffix}"] = cosine_similarity(stats["Scaf"]["scaf"], scaf_counts)
    metrics["IntDiv"] = internal_diversity(fps, 1)
    metrics["IntDiv2"] = internal_diversity(fps, 2)
    metrics["Filters"] = sum(d[3] for d in described) / len(described)
    distinct = set(valid)
    known = set(load_split("train") if train is None else train)
    metrics["Novelty"] = len(distinct - known) / len(distinct)
    ordered = {key: metrics[key] for key in MOSES_KEYS if key in metrics}
    return {**ordered, **metrics}
