"""Smoothing kernels, the proposals built on them, their KL to the priors, the uniform-prior transform."""

from .kl import kl_divergence
from .proposals import PRIORS, PROPOSAL_CLASSES, KernelProposal, proposal
from .smoothing import KERNELS, PROPOSALS, SMOOTHING_KERNELS, SmoothingKernel, get_kernel
from .transform import uniform_prior_transform

__all__ = [
    "KERNELS",
    "PRIORS",
    "PROPOSALS",
    "PROPOSAL_CLASSES",
    "SMOOTHING_KERNELS",
    "KernelProposal",
    "SmoothingKernel",
    "get_kernel",
    "kl_divergence",
    "proposal",
    "uniform_prior_transform",
]
