"""Triton kernels, installed as ``ddvae_fast.kernels``; import one module per op."""
