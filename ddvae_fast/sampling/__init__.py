"""The persistent-buffer rejection sampler (Section 2.1): ``sampler`` plus one module per backend."""

from .sampler import (
    METHODS,
    TRANSFORM_KERNELS,
    RejectionSampler,
    SamplerModule,
    sample_standard_kernel,
)

__all__ = [
    "METHODS",
    "TRANSFORM_KERNELS",
    "RejectionSampler",
    "SamplerModule",
    "sample_standard_kernel",
]
