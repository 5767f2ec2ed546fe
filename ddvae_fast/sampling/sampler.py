"""RejectionSampler: draws from the standard kernels with a persistent buffer (Section 2.1).

The paper samples a kernel K on [-1, 1] by rejection from the envelope
K(0) * U[-1, 1] (acceptance rate 1 / (2 K(0))), asks for N * 2K(0) candidates
per batch, repeats until N are accepted, and keeps the surplus in a buffer for
the following batches; z = mu + sigma * eps is the reparametrised draw. This
module is that sampler, with three backends behind one API:

- 'reference' (``sampling/reference.py``): PyTorch with a ``torch.Generator``,
  the oracle the other backends are tested against. RNG state = the
  generator's state.
- 'cpp' (``sampling/cpp.py``, csrc/sampler.cpp) and 'triton'
  (``sampling/triton.py``, kernels/rejection_sampler.py) share one
  counter-based stream, Philox4x32-10 (``sampling/philox.py``,
  docs/sampler_stream_contract.md), and draw bit-identical values for the
  same seed and calls. Draws do not depend on the thread count.

Each backend is a draw source (``backends.REGISTRY['sampler']``) with one
method, ``refill(n_units, out, need, buffer)``; this module owns the one
rejection loop, the buffer, the seeding and the state.

Thread safety: a sampler holds state between calls (buffer, RNG position), so
every public method takes the sampler's lock; threads sharing one sampler get
disjoint draws, in some order.

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
import threading

import torch

from .._checks import check_shape
from ..backends import implementation, resolve_backend
from ..distributions.smoothing import get_kernel

__all__ = ["METHODS", "TRANSFORM_KERNELS", "RejectionSampler", "sample_standard_kernel"]

METHODS: tuple[str, ...] = ("rejection", "transform")
# Kernels with an exact closed-form sampler (method='transform').
TRANSFORM_KERNELS: tuple[str, ...] = ("uniform", "triangular", "epanechnikov", "cosine")

_MIN_REFILL = 256  # candidates
_MAX_REFILL_FLOOR = 1 << 20
_REFILL_FRACTION = 32  # a refill is at least candidates_drawn / 32
_SLACK_SIGMAS = 4.0
_SEED_LIMIT = 1 << 64
_STATE_VERSION = 1


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

    def __init__(
        self,
        proposal: str,
        *,
        device="cpu",
        seed: int | None = None,
        backend: str = "auto",
        method: str = "rejection",
        dtype: torch.dtype = torch.float32,
        **source_options,
    ):
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
        if seed is None and not source_options:
            seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
        elif seed is None:  # sample_standard_kernel: a reference source on a caller's generator
            seed = 0
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
        source = implementation("sampler", self.backend)
        self._source = source(proposal, self._mode, self.device, seed, dtype, **source_options)
        self._work_dtype = self._source.work_dtype
        self._unit = self._source.unit
        # One lock per sampler: the buffer and the RNG position are shared state,
        # so concurrent calls are serialised (never interleaved or duplicated).
        self._lock = threading.RLock()
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
        return (
            f"RejectionSampler({self.proposal!r}, backend={self.backend!r}, method={self.method!r}, "
            f"device={self.device}, dtype={self.dtype}, buffered={self._count})"
        )

    # --------------------------------------------------------------------- drawing
    def sample(self, shape) -> torch.Tensor:
        """Draws eps of the given shape from the standard kernel (support [-1, 1])."""
        shape = check_shape(shape)
        out = torch.empty(shape.numel(), dtype=self._work_dtype, device=self.device)
        with self._lock:
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
                raise ValueError(
                    f"{name} is on device {t.device}, but this sampler draws on device {self.device}"
                )
        try:
            shape = torch.broadcast_shapes(mu.shape, sigma.shape)
        except RuntimeError as exc:
            raise ValueError(
                f"mu {tuple(mu.shape)} and sigma {tuple(sigma.shape)} do not broadcast: {exc}"
            ) from None
        if not bool((sigma > 0).all()):  # NaN fails too
            raise ValueError("sigma must be > 0 everywhere")
        eps = self.sample(shape)
        return _Reparametrize.apply(mu, sigma, eps, self.kernel.bounded)

    def _fill(self, out: torch.Tensor) -> None:
        n = out.numel()
        take = min(self._count, n)
        if take:
            out[:take].copy_(self._buffer[self._head : self._head + take])
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
        self._ensure_buffer(max(units - need, 1))  # room for the largest possible surplus
        kept = self._source.refill(units, out, need, self._buffer)
        self._candidates += units
        self._head = 0
        self._count = max(kept - need, 0)
        return min(kept, need)

    # ---------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Everything needed to resume the stream: RNG position and the buffered draws."""
        with self._lock:
            return self._state_dict()

    def _state_dict(self) -> dict:
        state = {
            "version": _STATE_VERSION,
            "proposal": self.proposal,
            "method": self.method,
            "backend": self.backend,
            "dtype": str(self.dtype),
            "seed": self.seed,
            "candidates_drawn": self._candidates,
            "buffer": self._buffer[self._head : self._head + self._count]
            .detach()
            .to("cpu", copy=True),
        }
        state.update(self._source.state())
        return state

    def load_state_dict(self, state: dict) -> None:
        """Resume from ``state_dict()``; every entry is checked before any is applied."""
        with self._lock:
            self._load_state_dict(state)

    def _load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        missing = {"version", "proposal", "method", "backend", "candidates_drawn", "buffer"} - set(
            state
        )
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}")
        if state["version"] != _STATE_VERSION:
            raise ValueError(f"unsupported state version {state['version']!r}")
        for key in ("proposal", "method", "backend"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"state is for {key}={state[key]!r}, this sampler has {key}={getattr(self, key)!r}; "
                    "the random streams differ"
                )
        rng_keys = set(self._source.state())
        if rng_keys - set(state):
            raise ValueError(f"state is missing {sorted(rng_keys - set(state))}")
        for key, limit in (
            ("candidates_drawn", None),
            ("seed", _SEED_LIMIT),
            ("block_offset", _SEED_LIMIT),
        ):
            value = state.get(key, 0)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < 0
                or (limit and value >= limit)
            ):
                raise ValueError(
                    f"state[{key!r}] must be an int in [0, {limit or 'inf'}), got {value!r}"
                )
        buffer = state["buffer"]
        if (
            not isinstance(buffer, torch.Tensor)
            or buffer.dim() != 1
            or buffer.dtype != self._work_dtype
        ):
            raise ValueError(f"state['buffer'] must be a 1-D {self._work_dtype} tensor")
        # The buffer is served as draws: a value the kernel cannot produce is corrupt state.
        bad = ~buffer.isfinite() | (buffer.abs() > 1) if self.kernel.bounded else ~buffer.isfinite()
        if bool(bad.any()):
            support = "[-1, 1]" if self.kernel.bounded else "finite values"
            raise ValueError(f"state['buffer'] holds values outside {support}: it is corrupt")
        self._source.load_state(state)
        if "seed" in state:
            self.seed = int(state["seed"])
        self._candidates = int(state["candidates_drawn"])
        self._ensure_buffer(buffer.numel())
        self._buffer[: buffer.numel()].copy_(buffer)
        self._head = 0
        self._count = buffer.numel()


def sample_standard_kernel(
    name: str,
    shape,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Draws of shape ``shape`` from the standard kernel ``name``, from ``generator``.

    For ``torch.distributions`` sampling: the reference backend's rejection loop
    (the same as ``RejectionSampler``'s) on the caller's generator, or on
    torch's global RNG when ``generator`` is None; the surplus is discarded.
    """
    sampler = RejectionSampler(
        name, device=device, backend="reference", dtype=dtype, generator=generator
    )
    return sampler.sample(shape)
