"""The MOSES benchmark's data: splits and reference statistics, read from the molsets wheel.

The ``molsets`` 0.3.1 wheel ships ``moses/dataset/data/{train,test,test_scaffolds}.csv.gz``
and ``{test,test_scaffolds}_stats.npz`` (the precomputed FCD, SNN, Frag and Scaf
statistics). Its code does not import with current RDKit, pandas and NumPy, so
it is installed without dependencies and only its files are read here: the
package is located with ``importlib.util.find_spec``, never imported.
"""

from __future__ import annotations

import gzip
import importlib.util
from functools import cache
from pathlib import Path

import numpy as np

__all__ = ["INSTALL_HINT", "SPLITS", "STATISTICS", "data_dir", "load_split", "load_statistics"]

SPLITS = ("train", "test", "test_scaffolds")
STATISTICS = ("test", "test_scaffolds")
INSTALL_HINT = "pip install --no-deps molsets==0.3.1 fcd_torch==1.0.7"


def data_dir() -> Path:
    """The folder holding the MOSES splits; a clear error if molsets is missing."""
    spec = importlib.util.find_spec("moses")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the MOSES data comes from the 'molsets' package, which is not installed: "
            f"{INSTALL_HINT}"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "dataset" / "data"
    if not (folder / "train.csv.gz").is_file():
        raise ImportError(f"the molsets package at {folder.parent.parent} lacks its data files")
    return folder


@cache
def _read_split(name: str) -> tuple[str, ...]:
    with gzip.open(data_dir() / f"{name}.csv.gz", "rt") as handle:
        lines = handle.read().split()
    if not lines or lines[0] != "SMILES":
        raise ValueError(f"{name}.csv.gz does not start with the SMILES header")
    return tuple(lines[1:])


def load_split(name: str) -> list[str]:
    """The SMILES of one split ('train', 'test' or 'test_scaffolds'), canonical as shipped."""
    if name not in SPLITS:
        raise ValueError(f"unknown MOSES split {name!r}; expected one of {SPLITS}")
    return list(_read_split(name))


@cache
def load_statistics(name: str) -> dict:
    """The precomputed reference statistics of 'test' or 'test_scaffolds'.

    A dict with 'FCD' ({'mu', 'sigma'}), 'SNN' ({'fps'}: uint8 Morgan bits),
    'Frag' ({'frag': Counter}) and 'Scaf' ({'scaf': Counter}). The file is a
    pickled object array; it is read from the installed wheel only.
    """
    if name not in STATISTICS:
        raise ValueError(f"unknown MOSES statistics {name!r}; expected one of {STATISTICS}")
    with np.load(data_dir() / f"{name}_stats.npz", allow_pickle=True) as archive:
        stats = archive["stats"].item()
    for key in ("FCD", "SNN", "Frag", "Scaf"):
        if key not in stats:
            raise ValueError(f"{name}_stats.npz lacks the {key} statistics")
    return stats
