"""Argument checks shared by every public function and op (one copy of each check)."""

from __future__ import annotations

import math
import numbers

import torch

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_int(value, name: str) -> int:
    """A Python or NumPy integer (not bool) that fits in int64; returned as int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise ValueError(f"{name} must fit in int64, got {value}")
    return value


def _real(value, name: str) -> float:
    """A real scalar: Python or NumPy number, or a 0-dim real CPU tensor (not bool)."""
    if isinstance(value, torch.Tensor):
        # A 0-dim CPU tensor is read on the host (no device sync); a CUDA
        # tensor would cost a sync per call, so it is refused.
        if value.dim() != 0 or value.device.type != "cpu":
            raise TypeError(
                f"{name} must be a real number or a 0-dim CPU tensor, got a tensor of shape "
                f"{tuple(value.shape)} on {value.device}"
            )
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be real, got a {value.dtype} tensor")
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def check_finite_real(value, name: str) -> float:
    """A finite real scalar (see ``_real``), returned as float."""
    value = _real(value, name)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_tau(value, name: str = "tau") -> float:
    """A temperature strictly inside (0, 1), returned as float."""
    value = _real(value, name)
    if not 0.0 < value < 1.0:  # also rejects NaN
        raise ValueError(f"{name} must lie strictly inside (0, 1), got {value}")
    return value


def check_choice(value, name: str, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def check_shape(shape, name: str = "shape") -> torch.Size:
    """An int or a sequence of non-negative ints, as a torch.Size."""
    if isinstance(shape, bool):
        raise TypeError(f"{name} must be an int or a sequence of ints, got a bool")
    if isinstance(shape, numbers.Integral):
        shape = (shape,)
    try:
        dims = tuple(shape)
    except TypeError:
        raise TypeError(f"{name} must be an int or a sequence of ints, got {shape!r}") from None
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, numbers.Integral):
            raise TypeError(f"{name} entries must be ints, got {shape!r}")
        if d < 0:
            raise ValueError(f"{name} entries must be >= 0, got {dims}")
    return torch.Size(int(d) for d in dims)


def check_loc_scale(mu, sigma, what: str) -> torch.Size:
    """Float tensors mu and sigma of one dtype and device; returns their broadcast shape."""
    for arg, label in ((mu, "mu"), (sigma, "sigma")):
        if not isinstance(arg, torch.Tensor):
            raise TypeError(f"{what}: {label} must be a torch.Tensor, got {type(arg).__name__}")
        if not arg.is_floating_point():
            raise TypeError(f"{what}: {label} must be a floating-point tensor, got {arg.dtype}")
    if mu.dtype != sigma.dtype:
        raise TypeError(
            f"{what}: mu and sigma must share a dtype, got {mu.dtype} and {sigma.dtype}"
        )
    if mu.device != sigma.device:
        raise ValueError(
            f"{what}: mu and sigma are on different devices ({mu.device}, {sigma.device})"
        )
    try:
        return torch.broadcast_shapes(mu.shape, sigma.shape)
    except RuntimeError:
        raise ValueError(
            f"{what}: shapes of mu {tuple(mu.shape)} and sigma {tuple(sigma.shape)} do not broadcast"
        ) from None
