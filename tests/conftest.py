"""Test-session settings shared by every test module.

Without a CUDA device, Triton kernels are tested on CPU tensors through the
interpreter, which must be switched on before triton is first imported.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
