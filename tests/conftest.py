"""Test-session settings shared by every test module.

Without a CUDA device, Triton kernels are tested on CPU tensors through the
interpreter, which must be switched on before triton is first imported.
"""

import os

# OpenMP's default busy-waiting makes every parallel region slow when the cores
# are shared; set before torch (and libgomp) load.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_torch_thread():
    """Run a test on one torch thread: the model tests' matrices are tiny, a
    second OpenMP thread gains little, and on a busy machine threads waiting
    for each other made them ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
