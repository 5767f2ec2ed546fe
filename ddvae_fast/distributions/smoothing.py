"""The smoothing kernels: standard densities K on [-1, 1] behind the bounded proposals.

("Smoothing kernel" is the paper's K; a compute kernel is a Triton or C++
function in kernels/ or csrc/.)

A proposal with location mu and scale sigma has density K((z - mu)/sigma)/sigma
(Eq. 7). Everything the library needs about a kernel lives here: its density,
CDF, K(0) (which sets the rejection sampler's acceptance rate 1/(2 K(0))), its
variance and its differential entropy. The constants are derived in closed
form; tests/test_smoothing_kernels.py checks each one by quadrature, because
the paper's Tables 1-2 are damaged in the copy this project works from.

The Gaussian is included as the unbounded reference "kernel" (support R).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

_SQRT3 = math.sqrt(3.0)


@dataclass(frozen=True)
class SmoothingKernel:
    name: str
    bounded: bool
    k0: float  # K(0): peak density, the rejection envelope's height
    variance: float  # Var(K) of the standard kernel
    entropy: float  # H(K) = -int K log K
    pdf: Callable[[torch.Tensor], torch.Tensor]
    cdf: Callable[[torch.Tensor], torch.Tensor]

    @property
    def acceptance_rate(self) -> float:
        """Acceptance of rejection sampling from the envelope K(0) * U[-1, 1]."""
        return 1.0 / (2.0 * self.k0) if self.bounded else 1.0


def _inside(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return torch.where(x.abs() <= 1, value, torch.zeros_like(value))


def _clamp_cdf(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    value = torch.where(x <= -1, torch.zeros_like(value), value)
    return torch.where(x >= 1, torch.ones_like(value), value)


def _odd_cdf(x: torch.Tensor, norm: float, antiderivative) -> torch.Tensor:
    """CDF of a symmetric kernel: 1/2 + sign(x) * norm * F(|x|), F(0) = 0."""
    a = x.abs().clamp(max=1)
    return _clamp_cdf(x, 0.5 + torch.sign(x) * norm * antiderivative(a))


def _uniform_pdf(x):
    return _inside(x, torch.full_like(x, 0.5))


def _uniform_cdf(x):
    return ((x + 1) / 2).clamp(0, 1)


def _triangular_pdf(x):
    return (1 - x.abs()).clamp(min=0)


def _triangular_cdf(x):
    return _odd_cdf(x, 1.0, lambda a: a - a * a / 2)


def _epanechnikov_pdf(x):
    return _inside(x, 0.75 * (1 - x * x))


def _epanechnikov_cdf(x):
    return _odd_cdf(x, 0.75, lambda a: a - a**3 / 3)


def _quartic_pdf(x):
    return _inside(x, (15 / 16) * (1 - x * x) ** 2)


def _quartic_cdf(x):
    return _odd_cdf(x, 15 / 16, lambda a: a - 2 * a**3 / 3 + a**5 / 5)


def _triweight_pdf(x):
    return _inside(x, (35 / 32) * (1 - x * x) ** 3)


def _triweight_cdf(x):
    return _odd_cdf(x, 35 / 32, lambda a: a - a**3 + 3 * a**5 / 5 - a**7 / 7)


def _tricube_pdf(x):
    return _inside(x, (70 / 81) * (1 - x.abs() ** 3) ** 3)


def _tricube_cdf(x):
    return _odd_cdf(x, 70 / 81, lambda a: a - 3 * a**4 / 4 + 3 * a**7 / 7 - a**10 / 10)


def _cosine_pdf(x):
    return _inside(x, (math.pi / 4) * torch.cos(math.pi * x / 2))


def _cosine_cdf(x):
    return _clamp_cdf(x, (1 + torch.sin(math.pi * x.clamp(-1, 1) / 2)) / 2)


def _gaussian_pdf(x):
    return torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _gaussian_cdf(x):
    return 0.5 * (1 + torch.erf(x / math.sqrt(2.0)))


SMOOTHING_KERNELS: dict[str, SmoothingKernel] = {
    k.name: k
    for k in (
        SmoothingKernel("uniform", True, 0.5, 1 / 3, math.log(2), _uniform_pdf, _uniform_cdf),
        SmoothingKernel("triangular", True, 1.0, 1 / 6, 0.5, _triangular_pdf, _triangular_cdf),
        SmoothingKernel(
            "epanechnikov",
            True,
            0.75,
            1 / 5,
            5 / 3 - math.log(3),
            _epanechnikov_pdf,
            _epanechnikov_cdf,
        ),
        SmoothingKernel(
            "quartic", True, 15 / 16, 1 / 7, 47 / 15 - math.log(15), _quartic_pdf, _quartic_cdf
        ),
        SmoothingKernel(
            "triweight",
            True,
            35 / 32,
            1 / 9,
            319 / 70 - math.log(70),
            _triweight_pdf,
            _triweight_cdf,
        ),
        SmoothingKernel(
            "tricube",
            True,
            70 / 81,
            35 / 243,
            -(math.pi * _SQRT3 / 2 - 1111 / 140 + math.log(70 * _SQRT3)),
            _tricube_pdf,
            _tricube_cdf,
        ),
        SmoothingKernel(
            "cosine",
            True,
            math.pi / 4,
            1 - 8 / math.pi**2,
            1 - math.log(math.pi / 2),
            _cosine_pdf,
            _cosine_cdf,
        ),
        SmoothingKernel(
            "gaussian",
            False,
            1 / math.sqrt(2 * math.pi),
            1.0,
            0.5 * math.log(2 * math.pi * math.e),
            _gaussian_pdf,
            _gaussian_cdf,
        ),
    )
}

PROPOSALS: tuple[str, ...] = tuple(SMOOTHING_KERNELS)
KERNELS: tuple[str, ...] = tuple(n for n, k in SMOOTHING_KERNELS.items() if k.bounded)


def get_kernel(name: str) -> SmoothingKernel:
    """Look up a kernel by name, with a clear error for an unknown one."""
    if not isinstance(name, str):
        raise TypeError(f"proposal name must be a str, got {type(name).__name__}")
    try:
        return SMOOTHING_KERNELS[name]
    except KeyError:
        raise ValueError(f"unknown proposal {name!r}; expected one of {PROPOSALS}") from None


def bounded_kernel(name: str) -> SmoothingKernel:
    """``get_kernel`` restricted to the seven bounded kernels (rejection sampling needs one)."""
    kernel = get_kernel(name)
    if not kernel.bounded:
        raise ValueError(
            f"rejection sampling needs a bounded kernel, one of {KERNELS}; got {name!r}"
        )
    return kernel
