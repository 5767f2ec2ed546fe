"""The sampler as part of a model (issue 12, item 5): SamplerModule and RejectionSampler.to.

- model.state_dict() / load_state_dict() (through torch.save and
  torch.load(weights_only=True)) resume the sampler's stream exactly, and the
  sampler's own state_dict keeps working;
- .double() / .half() / .float() on the model set the dtype of the draws without
  changing the stream (draws are made in float32 and cast), and rsample follows
  the dtype of mu and sigma;
- a device change carries the stream over (CUDA tests below run where CUDA is
  there; on a CPU-only machine the cross-backend state transfer that a CPU <->
  CUDA move of a Philox sampler performs is tested between 'cpp' and the
  interpreted 'triton' backend).
"""

import io

import pytest
import torch
from torch import nn

from ddvae_fast.backends import available_backends
from ddvae_fast.sampling import RejectionSampler, SamplerModule

BACKENDS = ("reference", "cpp")
CUDA = torch.cuda.is_available()


class TinyVAE(nn.Module):
    """An encoder that owns its sampler, as a user's Gaussian VAE would."""

    def __init__(self, backend, seed=0):
        super().__init__()
        self.encoder = nn.Linear(3, 8)
        self.sampler = SamplerModule("triweight", seed=seed, backend=backend)

    def forward(self, x):
        mu, log_sigma = self.encoder(x).chunk(2, dim=-1)
        return self.sampler(mu, log_sigma.exp())


def roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_state_dict_resumes_the_sampler_stream(backend):
    torch.manual_seed(0)
    straight, interrupted = TinyVAE(backend), TinyVAE(backend)
    interrupted.load_state_dict(straight.state_dict())
    x = torch.randn(5, 3)
    for model in (straight, interrupted):
        model(x)
        model.sampler.sample(37)
    state = roundtrip(interrupted.state_dict())
    assert "sampler._extra_state" in state
    assert state["sampler._extra_state"]["buffer"].numel() == interrupted.sampler.sampler.buffered
    resumed = TinyVAE(backend, seed=123)  # the seed comes from the state
    resumed.load_state_dict(state)
    for _ in range(3):
        assert torch.equal(resumed(x), straight(x))
    assert resumed.sampler.sampler.candidates_drawn == straight.sampler.sampler.candidates_drawn


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampler_state_dict_and_module_extra_state_agree(backend):
    module = SamplerModule(RejectionSampler("cosine", seed=4, backend=backend))
    module.sample(100)
    own = module.sampler.state_dict()
    extra = module.state_dict()["_extra_state"]
    assert own.keys() == extra.keys()
    plain = RejectionSampler("cosine", seed=0, backend=backend)
    plain.load_state_dict(extra)  # a model's sampler state loads into a bare sampler
    assert torch.equal(plain.sample(50), module.sample(50))


def test_model_load_refuses_a_sampler_state_of_another_stream():
    model = TinyVAE("cpp")
    state = model.state_dict()
    other = TinyVAE("reference")
    with pytest.raises(ValueError, match="backend"):
        other.load_state_dict(state)
    state["sampler._extra_state"]["buffer"] = torch.full((4,), 2.0)
    with pytest.raises(ValueError, match="corrupt"):
        TinyVAE("cpp").load_state_dict(state)


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_dtype_casts_reach_the_sampler_without_changing_the_stream(backend):
    module = SamplerModule("quartic", seed=9, backend=backend)
    reference = RejectionSampler("quartic", seed=9, backend=backend)
    model = nn.Sequential(nn.Linear(2, 2), module)
    for cast, dtype in (
        (nn.Module.double, torch.float64),
        (nn.Module.half, torch.float16),
        (nn.Module.bfloat16, torch.bfloat16),
        (nn.Module.float, torch.float32),
    ):
        cast(model)
        assert module.sampler.dtype == dtype
        x = module.sample(64)
        assert x.dtype == dtype
        assert torch.equal(x, reference.sample(64).to(dtype))
        mu = torch.zeros(8, dtype=dtype)
        sigma = torch.full((8,), 2.0, dtype=dtype)
        z = model[1](mu, sigma)
        assert z.dtype == dtype
        assert torch.equal(z, 2 * reference.sample(8).to(dtype))  # exact: times 2


def test_rsample_on_a_float64_model_has_float64_gradients():
    module = SamplerModule("tricube", seed=1, backend="cpp").double()
    mu = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    sigma = (torch.rand(4, 3, dtype=torch.float64) + 0.5).requires_grad_()
    eps = RejectionSampler("tricube", seed=1, backend="cpp").sample((4, 3)).double()
    z = module(mu, sigma)
    z.sum().backward()
    assert mu.grad.dtype == sigma.grad.dtype == torch.float64
    torch.testing.assert_close(sigma.grad, eps, rtol=0, atol=0)


def test_construction_errors():
    with pytest.raises(TypeError, match="sampler"):
        SamplerModule(3)
    with pytest.raises(TypeError, match="options"):
        SamplerModule(RejectionSampler("cosine", seed=1), seed=2)
    with pytest.raises(ValueError, match="unknown proposal"):
        SamplerModule("laplace")
    with pytest.raises(TypeError, match="dtype"):
        RejectionSampler("cosine", seed=1).to(dtype=torch.int32)


def test_a_move_to_a_device_without_storage_is_refused_and_changes_nothing():
    sampler = RejectionSampler("cosine", seed=1, backend="cpp")
    expected = RejectionSampler("cosine", seed=1, backend="cpp").sample(300)
    sampler.sample(100)
    with pytest.raises(ValueError, match="meta"):
        sampler.to("meta")
    assert sampler.device == torch.device("cpu") and sampler.backend == "cpp"
    assert sampler.to("cpu:0") is sampler  # the same device: nothing moves
    assert torch.equal(sampler.sample(200), expected[100:])


@pytest.mark.skipif("triton" not in available_backends(), reason="triton is not installed")
@pytest.mark.parametrize("first,second", [("cpp", "triton"), ("triton", "cpp")])
def test_philox_states_load_across_cpp_and_triton(first, second):
    # What a CPU <-> CUDA move of a Philox sampler does: the state of one backend
    # continues, bit for bit, on the other (interpreted Triton: tiny sizes).
    a = RejectionSampler("triweight", seed=2**33 + 5, backend=first, rank=3)
    straight = RejectionSampler("triweight", seed=2**33 + 5, backend=first, rank=3)
    a.sample(123)
    straight.sample(123)
    b = RejectionSampler("triweight", seed=0, backend=second, rank=3)
    b.load_state_dict(a.state_dict())
    for size in (7, 400):
        assert torch.equal(b.sample(size), straight.sample(size))


# ---------------------------------------------------------------- CUDA (where available)
cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


@cuda_only
@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_cuda_move_continues_the_stream(backend):
    straight = RejectionSampler("triweight", seed=5, backend=backend)
    moved = RejectionSampler("triweight", seed=5, backend=backend)
    expected = straight.sample(5000)
    first = moved.sample(1234)
    moved.to("cuda")
    assert moved.device.type == "cuda"
    assert moved.backend == ("triton" if backend == "cpp" else "reference")
    second = moved.sample(3000)
    assert second.device.type == "cuda"
    moved.to("cpu")
    assert moved.backend == backend
    third = moved.sample(766)
    assert torch.equal(torch.cat([first, second.cpu(), third]), expected)


@cuda_only
def test_cuda_rsample_follows_mu_and_module_cuda():
    module = SamplerModule("quartic", seed=3, backend="cpp")
    reference = RejectionSampler("quartic", seed=3, backend="cpp")
    mu = torch.zeros(64, device="cuda")
    z = module(mu, torch.ones(64, device="cuda"))  # the sampler follows mu
    assert z.device.type == "cuda" and module.sampler.backend == "triton"
    assert torch.equal(z.cpu(), reference.sample(64))
    module.cpu()
    assert module.sampler.backend == "cpp"
    module.cuda().double()
    assert module.sample(10).dtype == torch.float64
    state = roundtrip(nn.Sequential(module).state_dict())
    fresh = nn.Sequential(SamplerModule("quartic", seed=0, backend="cpp"))
    fresh.load_state_dict(state)  # a CUDA model's state resumes on CPU
    assert torch.equal(fresh[0].sample(50), reference.sample(10 + 50)[10:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_deepcopy_of_a_model_copies_the_stream_independently(backend):
    import copy

    model = TinyVAE(backend)
    model.sampler.sample(50)
    twin = copy.deepcopy(model)
    assert twin.sampler.sampler._lock is not model.sampler.sampler._lock
    a = model.sampler.sample(300)
    assert torch.equal(twin.sampler.sample(300), a)  # same position, separate state
    assert not torch.equal(model.sampler.sample(300), a)
