"""ddvae_fast: fast kernels and reference math for the Deterministic-Decoder VAE.

Polykovskiy & Vetrov, "Deterministic Decoding for Discrete Data in Variational
Autoencoders", AISTATS 2020.

The core (this package minus ``seqvae``) needs torch, numpy and triton only.
Public names are loaded lazily so that ``import ddvae_fast`` stays cheap (no
triton, no compiled module) until one is used. ``SequenceDDVAE`` and
``Trainer`` are the application's (``ddvae_fast.seqvae``, the ``app`` extra);
they are reachable from here for convenience and import the extra on use.
"""

from __future__ import annotations

import importlib

from .backends import available_backends
from .decoding import UNDEFINED_TOKEN, deterministic_argmax
from .distributions.smoothing import KERNELS, PROPOSALS, SMOOTHING_KERNELS, get_kernel
from .schedules import LinearSchedule, LogLinearSchedule

__version__ = "0.1.0"

_LAZY = {
    "proposal": "distributions.proposals",
    "kl_divergence": "distributions.kl",
    "uniform_prior_transform": "distributions.transform",
    "RejectionSampler": "sampling.sampler",
    "SamplerModule": "sampling.sampler",
    "relaxed_argmax_loss": "loss.api",
    "decoder_loss": "loss.api",
    "DecoderLoss": "loss.api",
    "RelaxedArgmaxLoss": "loss.nn",
    "linear_relaxed_argmax_loss": "loss.linear",
    "linear_decoder_loss": "loss.linear",
    "SequenceDDVAE": "seqvae.model",
    "Trainer": "seqvae.trainer",
    "empty_cpu_cache": "_memory",
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
