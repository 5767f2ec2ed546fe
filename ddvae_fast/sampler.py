"""RejectionSampler: draws from the standard kernels with a persistent buffer (Section 2.1).

The paper samples a kernel K on [-1, 1] by rejection from the envelope
K(0) * U[-1, 1] (acceptance rate 1 / (2 K(0))), asks for N * 2K(0) candidates
per batch, repeats until N are accepted, and keeps the surplus in a buffer for
the following batches; z = mu + sigma * eps is the reparametrised draw. This
module is that sampler, with three backends behind one API:

- 'reference': PyTorch with a ``torch.Generator``; candidates come from
  ``proposals.rejection_candidates`` (the oracle the other backends are tested
  against). RNG state = the generator's state.
- 'cpp' (ddvae_fast._sampler: up to torch.get_num_threads() threads, AVX-512
  where the CPU has it) and 'triton' (kernels/rejection_sampler.py;
  CUDA, or CPU tensors under TRITON_INTERPRET=1) share one counter-based
  stream, Philox4x32-10, defined in csrc/sampler.cpp, and draw bit-identical
  values for the same seed and calls. RNG state = (seed, Philox block offset):
  a refill consumes whole blocks and advances the offset. Draws do not depend
  on the thread count.

Buffer. Accepted draws are consumed strictly in candidate order: a call takes
what the buffer holds first, then refills; a refill writes its first ``need``
accepted draws straight into the output and its surplus into the device-resident
buffer. Hence, for one seed, the concatenation of all draws does not depend on
how they were requested (sample(a) then sample(b) equals sample(a + b)), and
state_dict() (seed, offset or generator state, buffer contents) resumes the
stream exactly.

Refill size, in candidates: need / a + 4 sqrt(need (1 - a)) / a for acceptance
rate a (the expected count plus four standard deviations, so one refill almost
always suffices), but at least max(256, min(2^20, candidates_drawn / 32)):
small calls are then served from the buffer most of the time while the
candidates drawn beyond what was asked for stay under ~3% of the total.

Host syncs: none when the buffer covers a call; per refill, 'cpp' returns the
accepted count from C++ and 'triton' reads it once from the device (one sync
per rejection refill; transforms and Gaussian draws keep every draw and need
none). ``rsample`` checks sigma > 0, which is one more read on CUDA.
"""
from __future__ import annotations

import math

import torch

from .backends import resolve_backend
from .smoothing_kernels import get_kernel

__all__ = ["RejectionSampler", "METHODS", "TRANSFORM_KERNELS"]

METHODS: tuple[str, ...] = ("rejection", "transform")
# Kernels with an exact closed-form sampler (method='transform').
TRANSFORM_KERNELS: tuple[str, ...] = ("uniform", "triangular", "epanechnikov", "cosine")

_MIN_REFILL = 256  # candidates
_MAX_REFILL_FLOOR = 1 << 20
_REFILL_FRACTION = 32  # a refill is at least candidates_drawn / 32
_SLACK_SIGMAS = 4.0
_SEED_LIMIT = 1 << 64
_STATE_VERSION = 1


def _draws_per_block(mode: str, proposal: str) -> int:
    """Candidates (rejection) or draws per Philox block in the stream of csrc/sampler.cpp."""
    if mode == "rejection":
        return 2
    if mode == "gaussian":
        return 4
    return {"uniform": 4, "triangular": 2, "epanechnikov": 1, "cosine": 4}[proposal]


def _as_shape(shape) -> torch.Size:
    if isinstance(shape, bool):
        raise TypeError("shape must be an int or a sequence of ints, got a bool")
    if isinstance(shape, int):
        shape = (shape,)
    try:
        dims = tuple(shape)
    except TypeError:
        raise TypeError(f"shape must be an int or a sequence of ints, got {shape!r}") from None
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int):
            raise TypeError(f"shape entries must be ints, got {shape!r}")
        if d < 0:
            raise ValueError(f"shape entries must be >= 0, got {tuple(dims)}")
    return torch.Size(dims)


def _normalize_device(device) -> torch.device:
    try:
        device = torch.device(device)
    except (TypeError, RuntimeError) as exc:
        raise ValueError(f"invalid device {device!r}: {exc}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device} requested, but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


# ----------------------------------------------------------------- reference draws
def _reference_transform(proposal: str, n: int, generator, device, dtype) -> torch.Tensor:
    """Exact inverse-transform (or order-statistic) samplers, plain PyTorch."""

    def rand(*size):
        return torch.rand(*size, generator=generator, device=device, dtype=dtype)

    if proposal == "uniform":
        return 2 * rand(n) - 1
    if proposal == "triangular":  # sum of two U[0, 1], shifted
        u = rand(2, n)
        return u[0] + u[1] - 1
    if proposal == "epanechnikov":  # Devroye's median-of-three: x2 if |x3| is the largest, else x3
        x = 2 * rand(3, n) - 1
        a = x.abs()
        third_largest = (a[2] >= a[1]) & (a[2] >= a[0])
        return torch.where(third_largest, x[1], x[2])
    if proposal == "cosine":  # inverse CDF of (1 + sin(pi x / 2)) / 2
        return (2 / math.pi) * torch.asin(2 * rand(n) - 1)
    raise AssertionError(proposal)


class _Reference:
    """Draw source for backend='reference': a torch.Generator on the sampler's device."""

    def __init__(self, proposal: str, mode: str, device: torch.device, seed: int, work_dtype: torch.dtype):
        self.proposal, self.mode, self.device, self.work_dtype = proposal, mode, device, work_dtype
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def draw(self, n_units: int) -> torch.Tensor:
        if self.mode == "rejection":
            from .proposals import rejection_candidates

            return rejection_candidates(self.proposal, n_units, generator=self.generator, device=self.device,
                                        dtype=self.work_dtype)
        if self.mode == "gaussian":
            return torch.randn(n_units, generator=self.generator, device=self.device, dtype=self.work_dtype)
        return _reference_transform(self.proposal, n_units, self.generator, self.device, self.work_dtype)

    def state(self) -> dict:
        return {"generator_state": self.generator.get_state()}

    def load_state(self, state: dict) -> None:
        self.generator.set_state(state["generator_state"])


class _Philox:
    """Draw source for backends 'cpp' and 'triton': Philox4x32-10 at (seed, block offset)."""

    def __init__(self, backend: str, proposal: str, mode: str, seed: int):
        self.backend, self.proposal, self.mode, self.seed = backend, proposal, mode, seed
        self.block_offset = 0
        self.per_block = _draws_per_block(mode, proposal)
        if backend == "cpp":
            from .backends import cpp_module

            self.module = cpp_module("sampler")
        else:
            from .kernels import rejection_sampler

            self.module = rejection_sampler

    def refill(self, n_blocks: int, out: torch.Tensor, need: int, buffer: torch.Tensor) -> int:
        if self.block_offset + n_blocks >= 1 << 64:
            raise OverflowError("the Philox block counter of this seed is exhausted (2^64 blocks)")
        if self.backend == "cpp":
            kept = self.module.refill(self.mode, self.proposal, self.seed, self.block_offset, n_blocks,
                                      out.data_ptr(), need, buffer.data_ptr(), buffer.numel(),
                                      torch.get_num_threads())
        else:
            kept = self.module.refill(self.mode, self.proposal, self.seed, self.block_offset, n_blocks,
                                      self.per_block, out, need, buffer)
            kept = int(kept)  # rejection: the one host read of this refill
        self.block_offset += n_blocks
        return kept

    def state(self) -> dict:
        return {"seed": self.seed, "block_offset": self.block_offset}

    def load_state(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self.block_offset = int(state["block_offset"])


class _Reparametrize(torch.autograd.Function):
    """z = mu + sigma * eps, clamped to [mu - sigma, mu + sigma] for bounded kernels; saves only eps."""

    @staticmethod
    def forward(ctx, mu, sigma, eps, bounded: bool):
        z = torch.addcmul(mu, sigma, eps)
        if bounded and z.numel():
            # |eps| <= 1 keeps z inside mathematically; the clamp makes it hold
            # after rounding too, for any dtype and mu/sigma magnitudes.
            z = torch.clamp(z, min=mu - sigma, max=mu + sigma)
        ctx.save_for_backward(eps)
        ctx.mu_shape, ctx.sigma_shape = mu.shape, sigma.shape
        return z

    @staticmethod
    def backward(ctx, grad):
        (eps,) = ctx.saved_tensors
        grad_mu = grad.sum_to_size(ctx.mu_shape) if ctx.needs_input_grad[0] else None
        grad_sigma = (grad * eps).sum_to_size(ctx.sigma_shape) if ctx.needs_input_grad[1] else None
        return grad_mu, grad_sigma, None, None


class RejectionSampler:
    """Draws eps from a standard kernel on [-1, 1] (or N(0, 1)), with a persistent buffer.

    Args:
        proposal: a name in ``smoothing_kernels.PROPOSALS`` (the seven bounded
            kernels or 'gaussian').
        device: where draws, and the buffer, live.
        seed: int in [0, 2^64), or None for a seed drawn from torch's global RNG
            (so torch.manual_seed makes it reproducible).
        backend: 'auto' (triton for CUDA, cpp for CPU), 'reference', 'cpp' or
            'triton'. An unavailable backend raises; nothing falls back.
        method: 'rejection' (the paper's sampler, default) or 'transform' (exact
            closed forms for uniform, triangular, epanechnikov, cosine). For
            'gaussian' both give exact normal draws (Box-Muller in cpp/triton).
        dtype: floating dtype of the draws. cpp/triton draw in float32 (the
            values are on a 2^-23 grid, exact in any wider dtype) and cast.
    """

    def __init__(self, proposal: str, *, device="cpu", seed: int | None = None, backend: str = "auto",
                 method: str = "rejection", dtype: torch.dtype = torch.float32):
        self.kernel = get_kernel(proposal)  # ValueError / TypeError for a bad name
        if not isinstance(method, str) or method not in METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
        if self.kernel.bounded and method == "transform" and proposal not in TRANSFORM_KERNELS:
            raise ValueError(
                f"kernel {proposal!r} has no closed-form transform sampler; use method='rejection' "
                f"(closed forms exist for {TRANSFORM_KERNELS})"
            )
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.is_complex:
            raise TypeError(f"dtype must be a real floating-point torch.dtype, got {dtype!r}")
        self.device = _normalize_device(device)
        self.backend = resolve_backend(backend, self.device)
        if seed is None:
            seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        if not 0 <= seed < _SEED_LIMIT:
            raise ValueError(f"seed must be in [0, 2^64), got {seed}")
        self.proposal = proposal
        self.method = method
        self.dtype = dtype
        self.seed = seed
        self._mode = "gaussian" if not self.kernel.bounded else method
        self._acceptance = self.kernel.acceptance_rate if self._mode == "rejection" else 1.0
        if self.backend == "reference":
            self._work_dtype = torch.float64 if dtype == torch.float64 else torch.float32
            self._source = _Reference(proposal, self._mode, self.device, seed, self._work_dtype)
            self._unit = 1
        else:
            self._work_dtype = torch.float32
            self._source = _Philox(self.backend, proposal, self._mode, seed)
            self._unit = self._source.per_block
        self._buffer = torch.empty(0, dtype=self._work_dtype, device=self.device)
        self._head = 0
        self._count = 0
        self._candidates = 0

    # ------------------------------------------------------------------ properties
    @property
    def candidates_drawn(self) -> int:
        """Candidates generated so far (draws, for transforms and 'gaussian')."""
        return self._candidates

    @property
    def buffered(self) -> int:
        """Accepted draws waiting in the buffer."""
        return self._count

    def __repr__(self) -> str:
        return (f"RejectionSampler({self.proposal!r}, backend={self.backend!r}, method={self.method!r}, "
                f"device={self.device}, dtype={self.dtype}, buffered={self._count})")

    # --------------------------------------------------------------------- drawing
    def sample(self, shape) -> torch.Tensor:
        """Draws eps of the given shape from the standard kernel (support [-1, 1])."""
        shape = _as_shape(shape)
        out = torch.empty(shape.numel(), dtype=self._work_dtype, device=self.device)
        self._fill(out)
        if self._work_dtype != self.dtype:
            out = out.to(self.dtype)
        return out.view(shape)

    def rsample(self, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """z = mu + sigma * eps, differentiable in mu and sigma (dz/dsigma = eps).

        The result has the broadcast shape of mu and sigma; for a bounded kernel
        it lies in [mu - sigma, mu + sigma] as computed in floating point.
        """
        for name, t in (("mu", mu), ("sigma", sigma)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype != self.dtype:
                raise TypeError(f"{name} has dtype {t.dtype}, but this sampler draws {self.dtype}")
            if t.device != self.device:
                raise ValueError(f"{name} is on device {t.device}, but this sampler draws on device {self.device}")
        try:
            shape = torch.broadcast_shapes(mu.shape, sigma.shape)
        except RuntimeError as exc:
            raise ValueError(f"mu {tuple(mu.shape)} and sigma {tuple(sigma.shape)} do not broadcast: {exc}") from None
        if not bool((sigma > 0).all()):  # NaN fails too
            raise ValueError("sigma must be > 0 everywhere")
        eps = self.sample(shape)
        return _Reparametrize.apply(mu, sigma, eps, self.kernel.bounded)

    def _fill(self, out: torch.Tensor) -> None:
        n = out.numel()
        take = min(self._count, n)
        if take:
            out[:take].copy_(self._buffer[self._head:self._head + take])
            self._head += take
            self._count -= take
        filled = take
        while filled < n:
            filled += self._refill(out[filled:], n - filled)

    def _refill_units(self, need: int) -> int:
        a = self._acceptance
        expected = need / a + _SLACK_SIGMAS * math.sqrt(need * (1.0 - a)) / a
        floor = max(_MIN_REFILL, min(_MAX_REFILL_FLOOR, self._candidates // _REFILL_FRACTION))
        units = max(math.ceil(expected), floor)
        return -(-units // self._unit) * self._unit

    def _ensure_buffer(self, capacity: int) -> None:
        if self._buffer.numel() < capacity:
            capacity = -(-capacity // 4096) * 4096
            self._buffer = torch.empty(capacity, dtype=self._work_dtype, device=self.device)

    def _refill(self, out: torch.Tensor, need: int) -> int:
        """One refill for ``need`` draws (buffer empty): returns how many went to ``out``."""
        units = self._refill_units(need)
        if isinstance(self._source, _Philox):
            self._ensure_buffer(max(units - need, 1))  # room for the largest possible surplus
            kept = self._source.refill(units // self._unit, out, need, self._buffer)
        else:
            draws = self._source.draw(units)
            kept = draws.numel()
            surplus = max(kept - need, 0)
            out[:kept - surplus].copy_(draws[:kept - surplus])
            if surplus:
                self._ensure_buffer(surplus)
                self._buffer[:surplus].copy_(draws[kept - surplus:])
        self._candidates += units
        self._head = 0
        self._count = max(kept - need, 0)
        return min(kept, need)

    # ---------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Everything needed to resume the stream: RNG position and the buffered draws."""
        state = {
            "version": _STATE_VERSION,
            "proposal": self.proposal,
            "method": self.method,
            "backend": self.backend,
            "dtype": str(self.dtype),
            "seed": self.seed,
            "candidates_drawn": self._candidates,
            "buffer": self._buffer[self._head:self._head + self._count].detach().to("cpu", copy=True),
        }
        state.update(self._source.state())
        return state

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        missing = {"version", "proposal", "method", "backend", "candidates_drawn", "buffer"} - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}")
        if state["version"] != _STATE_VERSION:
            raise ValueError(f"unsupported state version {state['version']!r}")
        for key in ("proposal", "method", "backend"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"state is for {key}={state[key]!r}, this sampler has {key}={getattr(self, key)!r}; "
                    "the random streams differ")
        rng_keys = {"generator_state"} if isinstance(self._source, _Reference) else {"seed", "block_offset"}
        if rng_keys - set(state):
            raise ValueError(f"state is missing {sorted(rng_keys - set(state))}")
        for key, limit in (("candidates_drawn", None), ("seed", _SEED_LIMIT), ("block_offset", _SEED_LIMIT)):
            value = state.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (limit and value >= limit):
                raise ValueError(f"state[{key!r}] must be an int in [0, {limit or 'inf'}), got {value!r}")
        buffer = state["buffer"]
        if not isinstance(buffer, torch.Tensor) or buffer.dim() != 1 or buffer.dtype != self._work_dtype:
            raise ValueError(f"state['buffer'] must be a 1-D {self._work_dtype} tensor")
        self._source.load_state(state)
        if "seed" in state:
            self.seed = int(state["seed"])
        self._candidates = int(state["candidates_drawn"])
        self._ensure_buffer(buffer.numel())
        self._buffer[:buffer.numel()].copy_(buffer)
        self._head = 0
        self._count = buffer.numel()
