"""The application: a GRU sequence DD-VAE, its trainer, data, SMILES tools, experiments and CLI.

Built on the core library (``ddvae_fast``) and nothing else of it imports
this package. It needs the ``app`` extra: ``pip install 'ddvae_fast[app]'``
(RDKit, matplotlib, tqdm).
"""

from __future__ import annotations

import importlib.util

_EXTRA = {"tqdm": "tqdm", "matplotlib": "matplotlib", "rdkit": "rdkit"}

_missing = [pkg for pkg, module in _EXTRA.items() if importlib.util.find_spec(module) is None]
if _missing:
    raise ImportError(
        f"ddvae_fast.seqvae needs the 'app' extra, which is not installed (missing: "
        f"{', '.join(_missing)}). Install it with: pip install 'ddvae_fast[app]'"
    )
