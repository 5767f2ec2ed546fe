import ast
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import ddvae_fast as ddf
from ddvae_fast.backends import resolve_backend


def test_reference_and_cpp_are_available_on_a_cpu_install():
    # CI builds the C++ extension, so its absence is a failed install.
    backends = ddf.available_backends()
    assert backends[:2] == ("reference", "cpp")


def test_auto_picks_cpp_for_cpu_tensors():
    assert resolve_backend("auto", torch.device("cpu")) == "cpp"


def test_auto_sends_other_devices_to_reference():
    assert resolve_backend("auto", torch.device("meta")) == "reference"


def test_explicit_backend_on_the_wrong_device_raises():
    with pytest.raises(RuntimeError, match="CPU tensors only"):
        resolve_backend("cpp", torch.device("meta"))


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        resolve_backend("triton", torch.device("cpu"))


@pytest.mark.parametrize("name,exc", [("cuda_magic", ValueError), (3, TypeError)])
def test_unknown_backend(name, exc):
    with pytest.raises(exc):
        resolve_backend(name, torch.device("cpu"))


def test_unknown_public_attribute():
    with pytest.raises(AttributeError):
        _ = ddf.not_a_thing


def test_public_api_names_resolve():
    # The names the foundation issue fixes, plus the model entry points.
    for name in (
        "PROPOSALS",
        "KERNELS",
        "kl_divergence",
        "uniform_prior_transform",
        "proposal",
        "RejectionSampler",
        "relaxed_argmax_loss",
        "RelaxedArgmaxLoss",
        "decoder_loss",
        "deterministic_argmax",
        "available_backends",
        "LinearSchedule",
        "LogLinearSchedule",
        "SequenceDDVAE",
        "Trainer",
    ):
        assert getattr(ddf, name) is not None, name
    assert ddf.PROPOSALS == (
        "uniform",
        "triangular",
        "epanechnikov",
        "quartic",
        "triweight",
        "tricube",
        "cosine",
        "gaussian",
    )
    assert ddf.PROPOSALS[:7] == ddf.KERNELS


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_cpp_modules_share_torchs_openmp_runtime():
    # csrc/common.h: the C++ kernels run on torch's own OpenMP team. That holds
    # only if the process has one libgomp, torch's; checked in a fresh process
    # after both modules ran multi-threaded next to a torch op.
    code = textwrap.dedent(
        """
        import torch
        import ddvae_fast as ddf
        from ddvae_fast.backends import cpp_module
        torch.set_num_threads(2)
        logits = torch.randn(4096, 64, requires_grad=True)
        target = torch.randint(0, 64, (4096,))
        ddf.relaxed_argmax_loss(logits, target, 0.1, backend="cpp").backward()
        ddf.RejectionSampler("tricube", seed=0, backend="cpp").sample((300_000,))
        torch.randn(1 << 20).add(1)
        cpp_module("sampler")
        paths = {line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line}
        print(sorted(paths))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    paths = ast.literal_eval(out.strip().splitlines()[-1])
    torch_lib = os.path.realpath(os.path.join(os.path.dirname(torch.__file__), "lib"))
    assert len(paths) == 1, paths
    assert os.path.dirname(os.path.realpath(paths[0])) == torch_lib, paths


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_cpp_kernels_run_in_a_forked_child_after_the_parent_used_openmp():
    # libgomp cannot start a parallel region in a child forked after its threads
    # ran (torch's own ops hang there); the kernels must then run on the calling
    # thread (csrc/common.h, fork handler) and give the parent's result.
    code = textwrap.dedent(
        """
        import os, torch
        from ddvae_fast.backends import cpp_module
        torch.set_num_threads(2)
        n, v = 65536, 64
        logits = torch.randn(n, v, generator=torch.Generator().manual_seed(0))
        target = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(1))
        module = cpp_module("relaxed_argmax")
        rows, nll = torch.empty(n), torch.empty(n)
        correct, scale, grad = torch.empty(n, dtype=torch.bool), torch.tensor(1.0), torch.empty(n, v)

        def kernel():
            module.forward(
                logits.data_ptr(), target.data_ptr(), scale.data_ptr(), rows.data_ptr(),
                nll.data_ptr(), correct.data_ptr(), grad.data_ptr(), n, v, v, 0, 0.1, False,
                -100, 1.0, 0.0, True, False, 2, "auto",
            )

        kernel()
        expected = rows.numpy().copy()
        torch.randn(1 << 20).add(1)  # torch's OpenMP threads ran too
        pid = os.fork()
        if pid == 0:
            rows.numpy()[:] = 0
            kernel()  # would wait forever for the parent's OpenMP threads
            os._exit(0 if (rows.numpy() == expected).all() else 3)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert out.strip().splitlines()[-1] == "0"
