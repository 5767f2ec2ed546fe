"""The one dispatch point of the library: op -> backend -> implementation.

Backends: 'reference' (plain PyTorch, always there, the oracle), 'cpp' (the
pybind11 modules built from csrc/, CPU tensors) and 'triton' (the kernels in
kernels/, CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).

Each op's implementations are rows of ``REGISTRY``: adding a backend is one
module per op plus one row per op here (docs/adding_a_backend.md).
``available_backends`` and ``resolve_backend`` read nothing else.

'auto' picks triton for CUDA tensors and cpp for CPU tensors. A backend that
cannot run here raises; nothing falls back silently. Tensors on any other
device type go to 'reference'.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from functools import cache

import torch

__all__ = [
    "BACKENDS",
    "REGISTRY",
    "Implementation",
    "available_backends",
    "cpp_module",
    "implementation",
    "resolve_backend",
    "supported_dtypes",
    "triton_interpreted",
]

BACKENDS = ("reference", "cpp", "triton")

_ALL_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Implementation:
    """Where an op's backend lives (``"module:attribute"``) and what it accepts."""

    target: str
    dtypes: tuple[torch.dtype, ...] = _ALL_FLOATS


REGISTRY: dict[str, dict[str, Implementation]] = {
    # The fused forward of docs/loss_backend_contract.md.
    "relaxed_argmax": {
        "reference": Implementation("ddvae_fast.loss.reference:forward"),
        "cpp": Implementation(
            "ddvae_fast.loss.cpp:forward",
            (torch.float32, torch.float64, torch.bfloat16, torch.float16),
        ),
        "triton": Implementation(
            "ddvae_fast.loss.triton:forward", (torch.float32, torch.bfloat16, torch.float16)
        ),
    },
    # The draw source of RejectionSampler (docs/sampler_stream_contract.md).
    "sampler": {
        "reference": Implementation("ddvae_fast.sampling.reference:ReferenceSource"),
        "cpp": Implementation("ddvae_fast.sampling.cpp:CppSource"),
        "triton": Implementation("ddvae_fast.sampling.triton:TritonSource"),
    },
}

# The compiled modules the 'cpp' backend needs (csrc/<name>.cpp -> ddvae_fast._<name>).
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


@cache
def _cpp_available() -> bool:
    try:
        for name in _CPP_MODULES:
            cpp_module(name)
    except RuntimeError:
        return False
    return True


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@cache
def _triton_importable() -> bool:
    try:
        import triton
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

    Raises TypeError for a non-string, ValueError for an unknown name and
    RuntimeError when the backend cannot run tensors on this device here.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend not in BACKENDS + ("auto",):
        raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {BACKENDS}")
    device = torch.device(device)
    if backend == "auto":
        backend = {"cuda": "triton", "cpu": "cpp"}.get(device.type, "reference")
    if backend == "reference":
        return backend
    if backend == "cpp":
        if device.type != "cpu":
            raise RuntimeError(f"backend 'cpp' runs CPU tensors only, got a tensor on {device}")
        if not _cpp_available():
            for name in _CPP_MODULES:
                cpp_module(name)  # raises with the import error
        return backend
    if not _triton_importable():
        raise RuntimeError("backend 'triton' needs the triton package, which is not installed")
    if device.type == "cuda" or (device.type == "cpu" and triton_interpreted()):
        return backend
    raise RuntimeError(
        "backend 'triton' runs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1); "
        f"got a tensor on {device}"
    )


@cache
def _load(target: str):
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


def implementation(op: str, backend: str):
    """The implementation of ``op`` on a resolved ``backend`` (imported on first use)."""
    return _load(REGISTRY[op][backend].target)


def supported_dtypes(op: str, backend: str) -> tuple[torch.dtype, ...]:
    return REGISTRY[op][backend].dtypes
