"""Test-session settings shared by every test module.

Without a CUDA device, Triton kernels are tested on CPU tensors through the
interpreter, which must be switched on before triton is first imported.
"""
import os

# OpenMP's default busy-waiting makes every parallel region slow when the cores
# are shared; set before torch (and libgomp) load.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
