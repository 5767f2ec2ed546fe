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
