"""Backend discovery and selection, shared by every op in the library.

Backends: 'reference' (plain PyTorch, always there, the oracle), 'cpp' (the
pybind11 modules built from csrc/, CPU tensors) and 'triton' (kernels/, CUDA
tensors, or CPU tensors when TRITON_INTERPRET=1).

'auto' picks triton for CUDA tensors and cpp for CPU tensors. If the picked
backend is not available here it raises; nothing falls back silently. Tensors
on any other device type go to 'reference'.
"""
from __future__ import annotations

import importlib
import os
from functools import lru_cache

import torch

BACKENDS = ("reference", "cpp", "triton")
_CPP_MODULES = ("relaxed_argmax", "sampler")


def cpp_module(name: str):
    """Import the compiled module ddvae_fast._<name>, or explain why it is missing."""
    try:
        return importlib.import_module(f"ddvae_fast._{name}")
    except ImportError as exc:
        raise RuntimeError(
            f"the 'cpp' backend needs the compiled module ddvae_fast._{name}, which did not "
            f"import ({exc}). Build it with `pip install -e .` (needs a C++ compiler), or "
            "pass backend='reference'."
        ) from exc


@lru_cache(maxsize=None)
def _cpp_available() -> bool:
    try:
        for name in _CPP_MODULES:
            cpp_module(name)
    except RuntimeError:
        return False
    return True


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_available() -> bool:
    return _triton_importable() and (torch.cuda.is_available() or triton_interpreted())


def available_backends() -> tuple[str, ...]:
    """The backends that work in this process, in the order of BACKENDS."""
    ok = {"reference": True, "cpp": _cpp_available(), "triton": _triton_available()}
    return tuple(b for b in BACKENDS if ok[b])


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn a requested backend into the one to run on tensors on ``device``.

    Raises ValueError for an unknown name and RuntimeError when the backend
    cannot run tensors on this device here.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend not in BACKENDS + ("auto",):
        raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {BACKENDS}")
    device = torch.device(device)
    if backend == "auto":
        if device.type == "cuda":
            backend = "triton"
        elif device.type == "cpu":
            backend = "cpp"
        else:
            return "reference"
    if backend == "reference":
        return backend
    if backend == "cpp":
        if device.type != "cpu":
            raise RuntimeError(f"backend 'cpp' runs CPU tensors only, got a tensor on {device}")
        if not _cpp_available():
            for name in _CPP_MODULES:
                cpp_module(name)  # raises with the import error
        return backend
    # triton
    if not _triton_importable():
        raise RuntimeError("backend 'triton' needs the triton package, which is not installed")
    if device.type == "cuda":
        return backend
    if device.type == "cpu" and triton_interpreted():
        return backend
    raise RuntimeError(
        f"backend 'triton' runs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1); "
        f"got a tensor on {device}"
    )
