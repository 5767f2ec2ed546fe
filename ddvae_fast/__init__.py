"""ddvae_fast: fast kernels and reference math for the Deterministic-Decoder VAE.

Polykovskiy & Vetrov, "Deterministic Decoding for Discrete Data in Variational
Autoencoders", AISTATS 2020. Public names are loaded lazily so that
``import ddvae_fast`` stays cheap (no triton, no compiled module) until used.
"""
from __future__ import annotations

import importlib

from .backends import available_backends
from .decoding import UNDEFINED_TOKEN, deterministic_argmax
from .schedules import LinearSchedule, LogLinearSchedule
from .smoothing_kernels import KERNELS, PROPOSALS, SMOOTHING_KERNELS, get_kernel

__version__ = "0.1.0"

_LAZY = {
    "proposal": "proposals",
    "kl_divergence": "proposals",
    "uniform_prior_transform": "proposals",
    "RejectionSampler": "sampler",
    "relaxed_argmax_loss": "relaxed_argmax",
    "decoder_loss": "relaxed_argmax",
    "DecoderLoss": "relaxed_argmax",
    "RelaxedArgmaxLoss": "nn",
    "SequenceDDVAE": "models",
    "Trainer": "training",
}

__all__ = [
    "KERNELS",
    "PROPOSALS",
    "SMOOTHING_KERNELS",
    "UNDEFINED_TOKEN",
    "LinearSchedule",
    "LogLinearSchedule",
    "available_backends",
    "deterministic_argmax",
    "get_kernel",
    *_LAZY,
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ddvae_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
