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

Thread safety: a sampler holds state between calls (buffer, RNG position,
device), so every public method that reads or changes it (sample, rsample,
to, state_dict, load_state_dict, candidates_drawn, buffered, copy/pickle)
takes the sampler's lock; threads sharing one
sampler get disjoint draws, in some order, and together exactly the draws of
one sequential stream (tests/test_sampler_threads.py).

Per-rank streams (``rank=r``, e.g. the process rank under torchrun): each
(seed, rank) is its own stream, rank 0 the stream of ``seed`` alone. 'cpp' and
'triton' give rank r the Philox blocks [r 2^48, (r + 1) 2^48) of the seed
(``sampling/philox.py``), so ranks of one seed never overlap; 'reference' seeds
its generator with ``stream_seed(seed, rank)`` (``sampling/reference.py``).
The rank is saved in ``state_dict()`` and a state of another rank is refused.

Devices and dtypes (the sampler as part of a model): ``rsample(mu, sigma)``
returns mu's dtype and follows mu's device. Draws are always made in the
stream's work dtype (float32; float64 for a 'reference' sampler built with
dtype=float64) and cast, so the dtype never changes the stream. A device change
(``to(device)``, or an rsample on another device) carries the state over and
continues the same stream: 'reference' draws from a CPU generator wherever it
lives, and 'cpp' and 'triton' are one Philox stream, bit for bit, so a Philox
sampler switches between them when its backend cannot run on the new device
(cpp for CPU, triton for CUDA). ``SamplerModule`` (below) holds a sampler in an
nn.Module: ``.to()``, ``.double()`` and ``model.state_dict()`` reach it.

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
none). ``rsample`` checks 0 < sigma < inf, which is one more read on CUDA.
"""

from __future__ import annotations

import math
import threading

import torch
from torch import nn

from .._checks import check_int, check_shape
from ..backends import implementation, resolve_backend
from ..distributions.smoothing import get_kernel
from .philox import RANK_LIMIT

__all__ = [
    "METHODS",
    "TRANSFORM_KERNELS",
    "RejectionSampler",
    "SamplerModule",
    "sample_standard_kernel",
]

METHODS: tuple[str, ...] = ("rejection", "transform")
# Kernels with an exact closed-form sampler (method='transform').
TRANSFORM_KERNELS: tuple[str, ...] = ("uniform", "triangular", "epanechnikov", "cosine")

_MIN_REFILL = 256  # candidates
_MAX_REFILL_FLOOR = 1 << 20
_REFILL_FRACTION = 32  # a refill is at least candidates_drawn / 32
_SLACK_SIGMAS = 4.0
_SEED_LIMIT = 1 << 64
_STATE_VERSION = 1


# The random stream of each backend: states load, and samplers move, within a stream.
_STREAMS = {"reference": "reference", "cpp": "philox", "triton": "philox"}


def _normalize_device(device) -> torch.device:
    try:
        device = torch.device(device)
    except (TypeError, RuntimeError) as exc:
        raise ValueError(f"invalid device {device!r}: {exc}") from None
    if device.type == "cpu":  # 'cpu:0' is 'cpu': tensors report no index
        return torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device} requested, but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def _check_float_dtype(dtype, name: str = "dtype") -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.is_complex:
        raise TypeError(f"{name} must be a real floating-point torch.dtype, got {dtype!r}")
    return dtype


# For each dtype: the signed integer type of its width, and the bits of its largest finite value.
_FLOAT_BITS = {
    torch.float64: (torch.int64, 0x7FEFFFFFFFFFFFFF),
    torch.float32: (torch.int32, 0x7F7FFFFF),
    torch.float16: (torch.int16, 0x7BFF),
    torch.bfloat16: (torch.int16, 0x7F7F),
}


def _positive_finite(x: torch.Tensor) -> bool:
    """All of x in (0, inf), NaN excluded: one integer min/max pass over its bits (a sync on CUDA).

    Read as signed integers of the same width, IEEE floats order like their
    values for x >= 0, and everything else falls outside: -0, negatives and
    negative NaNs have the sign bit (int < 0), +0 is 0, +inf and positive NaNs
    lie above the largest finite float. The integer min/max needs no NaN
    handling, and took ~35% less time than a float aminmax (benchmarks/bench_sampler.py).
    """
    if x.dtype not in _FLOAT_BITS:  # e.g. float8 formats: the plain comparison
        return bool(((x > 0) & (x < math.inf)).all())
    bits, largest = _FLOAT_BITS[x.dtype]
    low, high = torch.aminmax(x.view(bits))
    return bool((low >= 1) & (high <= largest))


class RejectionSampler:
    """Draws eps from a standard kernel on [-1, 1] (or N(0, 1)), with a persistent buffer.

    Args:
        proposal: a name in ``smoothing_kernels.PROPOSALS`` (the seven bounded
            kernels or 'gaussian').
        device: where draws, and the buffer, live (``to`` moves them).
        seed: int in [0, 2^64), or None for a seed drawn from torch's global RNG
            (so torch.manual_seed makes it reproducible).
        backend: 'auto' (triton for CUDA, cpp for CPU), 'reference', 'cpp' or
            'triton'. An unavailable backend raises; nothing falls back.
        method: 'rejection' (the paper's sampler, default) or 'transform' (exact
            closed forms for uniform, triangular, epanechnikov, cosine). For
            'gaussian' both give exact normal draws (Box-Muller in cpp/triton).
        dtype: floating dtype of ``sample``'s draws. cpp/triton draw in float32
            (the values are on a 2^-23 grid, exact in any wider dtype) and cast;
            'reference' draws in float64 when dtype is float64, else float32.
        rank: int in [0, 2^16): which stream of ``seed`` to draw, e.g. the
            process rank in distributed training. Ranks of one seed never share
            draws; rank 0 is the stream of ``seed`` alone.
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
        rank: int = 0,
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
        _check_float_dtype(dtype)
        rank = check_int(rank, "rank")
        if not 0 <= rank < RANK_LIMIT:
            raise ValueError(f"rank must be in [0, {RANK_LIMIT}), got {rank}")
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
        self.rank = rank
        self._mode = "gaussian" if not self.kernel.bounded else method
        self._acceptance = self.kernel.acceptance_rate if self._mode == "rejection" else 1.0
        self._source = self._make_source(self.backend, self.device, **source_options)
        self._work_dtype = self._source.work_dtype
        self._unit = self._source.unit
        # One lock per sampler: the buffer, the RNG position and the device are
        # shared state, so concurrent calls are serialised (never interleaved or
        # duplicated). Re-entrant: rsample calls sample and may call to.
        self._lock = threading.RLock()
        self._buffer = torch.empty(0, dtype=self._work_dtype, device=self.device)
        self._head = 0
        self._count = 0
        self._candidates = 0

    def _make_source(self, backend: str, device: torch.device, **source_options):
        source = implementation("sampler", backend)
        return source(
            self.proposal,
            self._mode,
            device,
            self.seed,
            self.dtype,
            rank=self.rank,
            **source_options,
        )

    def __getstate__(self) -> dict:
        """copy.deepcopy and pickle (e.g. of a model holding a SamplerModule): a
        snapshot taken under the lock, without the lock itself."""
        with self._lock:
            state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ properties
    @property
    def candidates_drawn(self) -> int:
        """Candidates generated so far (draws, for transforms and 'gaussian')."""
        with self._lock:  # read between calls, never halfway through a refill
            return self._candidates

    @property
    def buffered(self) -> int:
        """Accepted draws waiting in the buffer."""
        with self._lock:
            return self._count

    def __repr__(self) -> str:
        return (
            f"RejectionSampler({self.proposal!r}, backend={self.backend!r}, method={self.method!r}, "
            f"device={self.device}, dtype={self.dtype}, rank={self.rank}, buffered={self._count})"
        )

    # --------------------------------------------------------------------- moving
    def _backend_on(self, device: torch.device) -> str:
        """This sampler's backend if it runs on ``device``, else the other one of its stream."""
        if device.type not in ("cpu", "cuda"):  # the buffered draws need real storage
            raise ValueError(f"a sampler moves between CPU and CUDA devices only, not to {device}")
        if self.backend == "reference":
            return "reference"
        errors = []
        for backend in (self.backend,) + tuple(b for b in ("cpp", "triton") if b != self.backend):
            try:
                return resolve_backend(backend, device)
            except RuntimeError as exc:
                errors.append(str(exc))
        raise ValueError(
            f"no backend of this sampler's Philox stream (cpp, triton) runs on device {device}: "
            + "; ".join(errors)
        )

    def to(self, device=None, *, dtype: torch.dtype | None = None) -> RejectionSampler:
        """Moves the sampler to ``device`` and/or sets the dtype of ``sample``'s draws; returns self.

        The stream continues exactly where it was (RNG position and buffered
        draws carried over): 'reference' draws from a CPU generator wherever it
        lives, and a Philox sampler becomes 'triton' on CUDA and 'cpp' on CPU
        when its backend cannot run there (the two draw the same values, bit for
        bit). The dtype only changes what draws are cast to, never the stream.
        """
        if dtype is not None:
            _check_float_dtype(dtype)
        with self._lock:
            if device is not None:
                device = _normalize_device(device)
                if device != self.device:
                    backend = self._backend_on(device)
                    source = self._make_source(backend, device)
                    source.load_state(self._source.state())
                    live = self._buffer[self._head : self._head + self._count].to(device)
                    self._source, self.backend, self.device = source, backend, device
                    self._buffer = torch.empty(0, dtype=self._work_dtype, device=device)
                    self._ensure_buffer(live.numel())
                    self._buffer[: live.numel()].copy_(live)
                    self._head = 0
            if dtype is not None:
                self.dtype = dtype
        return self

    # --------------------------------------------------------------------- drawing
    def sample(self, shape) -> torch.Tensor:
        """Draws eps of the given shape from the standard kernel (support [-1, 1])."""
        shape = check_shape(shape)
        with self._lock:
            out = self._draw(shape.numel())
            dtype = self.dtype
        return out.to(dtype).view(shape)

    def _draw(self, n: int) -> torch.Tensor:
        """n draws in the work dtype, on the sampler's device (lock held).

        Outside any torch.func transform: the draws are constants of the
        computation (under jvp, eps has no tangent), and the compiled sources
        need plain tensors with storage.
        """
        with torch._C._DisableFuncTorch():
            out = torch.empty(n, dtype=self._work_dtype, device=self.device)
            self._fill(out)
        return out

    def rsample(self, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """z = mu + sigma * eps, differentiable in mu and sigma (dz/dsigma = eps).

        mu and sigma share one real floating dtype and one device; z has their
        dtype and their broadcast shape, and the sampler moves to their device
        (see ``to``). For a bounded kernel z lies in [mu - sigma, mu + sigma] as
        computed in floating point. Ordinary autograd: backward, double backward
        and forward mode all work; backward keeps only eps.
        """
        for name, t in (("mu", mu), ("sigma", sigma)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if not t.dtype.is_floating_point or t.is_complex():
                raise TypeError(f"{name} must be a real floating-point tensor, got {t.dtype}")
        if mu.dtype != sigma.dtype:
            raise TypeError(f"mu ({mu.dtype}) and sigma ({sigma.dtype}) must have one dtype")
        if mu.device != sigma.device:
            raise ValueError(f"mu ({mu.device}) and sigma ({sigma.device}) must be on one device")
        try:  # torch.broadcast_shapes is Python code: skip it in the common equal-shape case
            shape = (
                mu.shape
                if mu.shape == sigma.shape
                else torch.broadcast_shapes(mu.shape, sigma.shape)
            )
        except RuntimeError as exc:
            raise ValueError(
                f"mu {tuple(mu.shape)} and sigma {tuple(sigma.shape)} do not broadcast: {exc}"
            ) from None
        if mu.device != self.device:
            try:
                self._backend_on(_normalize_device(mu.device))  # refuses before any work
            except ValueError as exc:
                raise ValueError(f"mu and sigma are on device {mu.device}: {exc}") from None
        if sigma.numel() and not _positive_finite(sigma.detach()):
            raise ValueError("sigma must be finite and > 0 everywhere")
        with self._lock:
            if mu.device != self.device:
                self.to(mu.device)
            eps = self._draw(shape.numel()).view(shape)
        # Plain autograd: addcmul's backward saves only eps (sigma is saved only when
        # eps needs a gradient, which it never does). No clamp is needed for the
        # bound: |eps| <= 1 after the cast, rounding is monotone, so
        # fl(mu + fl(sigma eps)) (or the fused round(mu + sigma eps)) lies between
        # fl(mu - sigma) and fl(mu + sigma); tests/test_sampler.py checks it.
        return torch.addcmul(mu, sigma, eps.to(mu.dtype))

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
        """Everything needed to resume the stream: RNG position, rank and the buffered draws.

        Device-independent (the buffer is saved on the CPU): it loads into a
        sampler of the same stream on any device.
        """
        with self._lock:
            state = {
                "version": _STATE_VERSION,
                "proposal": self.proposal,
                "method": self.method,
                "backend": self.backend,
                "dtype": str(self.dtype),
                "seed": self.seed,
                "rank": self.rank,
                "candidates_drawn": self._candidates,
                "buffer": self._buffer[self._head : self._head + self._count]
                .detach()
                .to("cpu", copy=True),
            }
            state.update(self._source.state())
            return state

    def load_state_dict(self, state: dict) -> None:
        """Resume from ``state_dict()``; every entry is checked before any is applied.

        The state must come from the same stream: proposal, method, stream
        ('reference', or Philox = 'cpp' and 'triton', which load each other's
        states) and rank. The seed is taken from the state.
        """
        with self._lock:
            self._load_state_dict(state)

    def _load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        required = {"version", "proposal", "method", "backend", "candidates_drawn", "buffer"}
        missing = required - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}")
        # Compared as plain values only: a tensor or a list here is corrupt state.
        if type(state["version"]) is not int or state["version"] != _STATE_VERSION:
            raise ValueError(f"unsupported state version {state['version']!r}")
        for key in ("proposal", "method"):
            if not isinstance(state[key], str) or state[key] != getattr(self, key):
                raise ValueError(
                    f"state is for {key}={state[key]!r}, this sampler has {key}={getattr(self, key)!r}; "
                    "the random streams differ"
                )
        stream = _STREAMS.get(state["backend"]) if isinstance(state["backend"], str) else None
        if stream != _STREAMS[self.backend]:
            raise ValueError(
                f"state is for backend={state['backend']!r}, this sampler has "
                f"backend={self.backend!r}; the random streams differ"
            )
        missing = set(self._source.state()) - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}")
        rank = state.get("rank", 0)  # states saved before ranks existed are rank 0
        if type(rank) is not int or rank != self.rank:
            raise ValueError(
                f"state is for rank={rank!r}, this sampler has rank={self.rank}; loading it would "
                "repeat another rank's draws"
            )
        for key in ("candidates_drawn", "seed"):
            value = state.get(key, 0)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or not 0 <= value < _SEED_LIMIT
            ):
                raise ValueError(f"state[{key!r}] must be an int in [0, 2^64), got {value!r}")
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
        # The source checks its own entries (generator state, block offset within
        # the rank's range) before it applies them: the first change made.
        self._source.load_state(state)
        if "seed" in state:
            self.seed = int(state["seed"])
        self._candidates = int(state["candidates_drawn"])
        self._ensure_buffer(buffer.numel())
        self._buffer[: buffer.numel()].copy_(buffer)
        self._head = 0
        self._count = buffer.numel()


class SamplerModule(nn.Module):
    """A ``RejectionSampler`` as part of a model.

    ``model.state_dict()`` holds the sampler's state (as this module's extra
    state) and ``model.load_state_dict()`` resumes it; ``.to(device)``,
    ``.cuda()``, ``.double()`` and the like move the sampler and set the dtype of
    ``sample`` (see ``RejectionSampler.to``: the stream itself never changes).
    Calling the module is ``rsample``.

        sampler = SamplerModule("tricube", seed=0)        # or SamplerModule(RejectionSampler(...))
        z = sampler(mu, sigma)
    """

    def __init__(self, sampler: RejectionSampler | str, **options):
        super().__init__()
        if isinstance(sampler, str):
            sampler = RejectionSampler(sampler, **options)
        elif not isinstance(sampler, RejectionSampler):
            raise TypeError(
                f"sampler must be a RejectionSampler or a proposal name, got {type(sampler).__name__}"
            )
        elif options:
            raise TypeError(f"options {sorted(options)} apply only when a proposal name is given")
        self.sampler = sampler
        # An empty, unsaved buffer: nn.Module's own .to()/.double()/.cuda() move it,
        # and _apply reads where it went.
        self.register_buffer(
            "_placement",
            torch.empty(0, dtype=sampler.dtype, device=sampler.device),
            persistent=False,
        )

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.sampler.to(self._placement.device, dtype=self._placement.dtype)
        return self

    def forward(self, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.sampler.rsample(mu, sigma)

    def rsample(self, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.sampler.rsample(mu, sigma)

    def sample(self, shape) -> torch.Tensor:
        return self.sampler.sample(shape)

    def get_extra_state(self) -> dict:
        return self.sampler.state_dict()

    def set_extra_state(self, state: dict) -> None:
        self.sampler.load_state_dict(state)

    def extra_repr(self) -> str:
        return repr(self.sampler)


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
