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

Each backend is a draw source (``backends.REGISTRY['sampler']``,
docs/sampler_stream_contract.md). 'reference' and 'cpp' have one method,
``refill(n_units, out, need, buffer)``, and this module owns the rejection
loop, the buffer, the seeding and the state on the host. 'triton' keeps the
same bookkeeping on the device (``fill``, below): the same refill sizes, so
the same states, as 'cpp'.

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

The reparametrised draw. For float32 and float64 mu on 'cpp' (float32 on
'triton'), ``rsample`` writes z = mu + sigma * eps where the draws are made,
rounded once (fma), and keeps eps only when sigma needs a gradient: eps is
never written out and read back, and backward is the closed form (an autograd
Function that saves eps). 'cpp' checks 0 < sigma < inf in the same pass and
rewinds the stream if it fails (its refills then write their surplus to a
spare buffer), so a refused call changes nothing. Other dtypes, 'reference',
torch.compile, torch.func transforms and forward-mode tangents take the plain
graph: eps, then addcmul.

Host syncs: none on 'reference' and 'cpp' (CPU). On 'triton' a call reads
nothing back: the buffer's head and count, the Philox block offset and the
candidates count live in a device tensor (``_counters``) that the kernels read
and update (kernels/rejection_sampler.py), and the host sizes grids and the
buffer from upper bounds it keeps (``_fill_on_device``). They are read back
only when the host needs them (state_dict, candidates_drawn, buffered, repr,
moving, pickling), and for every call once a rank has fewer than
``_DEVICE_HEADROOM_BLOCKS`` blocks to spare. ``rsample`` on CUDA reads one
value: the check 0 < sigma < inf (benchmarks/gpu_check.py times it).
"""

from __future__ import annotations

import functools
import math
import threading

import torch
from torch import nn
from torch.autograd import forward_ad

from .._checks import check_int, check_shape
from ..backends import implementation, resolve_backend
from ..distributions.smoothing import get_kernel
from .philox import BLOCKS_PER_RANK, RANK_LIMIT

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
# Device bookkeeping (the 'triton' source): a call runs without a host read only
# while this many Philox blocks of its rank are left beyond the call's largest
# refill, so that the short refills of kernels/rejection_sampler.py cannot run
# out of blocks (they would need ~2^32 blocks); closer to the end every call
# reads the counters back and checks exactly, as the host loop does.
_DEVICE_HEADROOM_BLOCKS = 1 << 32
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


def _needs_plain_graph(mu: torch.Tensor, sigma: torch.Tensor) -> bool:
    """True where rsample's fused draw does not apply and the plain graph
    (eps, then addcmul) runs: under torch.compile (dynamo traces the plain ops),
    a torch.func transform (jvp, vmap, ...) or a forward-mode tangent. The fused
    draw's autograd Function has a reverse-mode formula only.
    """
    if torch.compiler.is_compiling():
        return True
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return True
    return forward_ad._current_level >= 0 and any(
        forward_ad.unpack_dual(t).tangent is not None for t in (mu, sigma)
    )


class _Reparametrize(torch.autograd.Function):
    """z = mu + sigma * eps with eps drawn inside (rsample's fused path).

    Backward is the closed form, dz/dmu = 1 and dz/dsigma = eps, reduced to the
    shapes of mu and sigma; it saves only eps (and only when sigma needs a
    gradient), and it is written in differentiable ops, so double backward
    works (the second derivative is 0).
    """

    @staticmethod
    def forward(ctx, mu, sigma, draw_z):
        z, eps = draw_z(mu.detach(), sigma.detach(), keep_eps=ctx.needs_input_grad[1])
        if eps is not None:
            ctx.save_for_backward(eps)
        ctx.mu_shape, ctx.sigma_shape = mu.shape, sigma.shape
        return z

    @staticmethod
    def backward(ctx, grad):
        grad_mu = grad.sum_to_size(ctx.mu_shape) if ctx.needs_input_grad[0] else None
        grad_sigma = None
        if ctx.needs_input_grad[1]:
            (eps,) = ctx.saved_tensors
            grad_sigma = (grad * eps.to(grad.dtype)).sum_to_size(ctx.sigma_shape)
        return grad_mu, grad_sigma, None


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
        # rsample's fused refills write their surplus here, then swap it in: a
        # refused call (bad sigma) leaves the buffered draws untouched.
        self._spare = torch.empty(0, dtype=self._work_dtype, device=self.device)
        self._head = 0
        self._count = 0
        self._candidates = 0
        # Sources with device bookkeeping ('triton'): head, count, the block offset
        # and the candidates count live in a device tensor, read back only when the
        # host needs them (_sync_counters); the host keeps upper bounds to size
        # the grid and the buffer.
        self._counters = None
        if getattr(self._source, "device_bookkeeping", False):
            self._push_counters()

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
            self._sync_counters()
            state = self.__dict__.copy()
        del state["_lock"]
        state["_spare"] = self._spare.new_empty(0)  # scratch space, not state
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ properties
    @property
    def candidates_drawn(self) -> int:
        """Candidates generated so far (draws, for transforms and 'gaussian')."""
        with self._lock:  # read between calls, never halfway through a refill
            self._sync_counters()
            return self._candidates

    @property
    def buffered(self) -> int:
        """Accepted draws waiting in the buffer."""
        with self._lock:
            self._sync_counters()
            return self._count

    def __repr__(self) -> str:
        with self._lock:
            self._sync_counters()
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
                    self._sync_counters()
                    backend = self._backend_on(device)
                    source = self._make_source(backend, device)
                    source.load_state(self._source.state())
                    live = self._buffer[self._head : self._head + self._count].to(device)
                    self._source, self.backend, self.device = source, backend, device
                    self._buffer = torch.empty(0, dtype=self._work_dtype, device=device)
                    self._spare = torch.empty(0, dtype=self._work_dtype, device=device)
                    self._ensure_buffer(live.numel())
                    self._buffer[: live.numel()].copy_(live)
                    self._head = 0
                    self._counters = None
                    if getattr(source, "device_bookkeeping", False):
                        self._push_counters()
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
        fused = mu.dtype in getattr(self._source, "affine_dtypes", ()) and not _needs_plain_graph(
            mu, sigma
        )
        # The fused draw checks sigma in the same pass and rewinds the stream if it
        # fails; otherwise (or before a device move) sigma is checked first.
        fused_check = fused and getattr(self._source, "checks_sigma", False)
        checked_first = not fused_check or mu.device != self.device
        if checked_first and sigma.numel() and not _positive_finite(sigma.detach()):
            raise ValueError("sigma must be finite and > 0 everywhere")
        with self._lock:
            if mu.device != self.device:
                self.to(mu.device)
                fused = mu.dtype in getattr(self._source, "affine_dtypes", ()) and fused
            if fused:
                return _Reparametrize.apply(mu, sigma, functools.partial(self._draw_z, shape))
            eps = self._draw(shape.numel()).view(shape)
        # Plain autograd: addcmul's backward saves only eps (sigma is saved only when
        # eps needs a gradient, which it never does). No clamp is needed for the
        # bound: |eps| <= 1 after the cast, rounding is monotone, so
        # fl(mu + fl(sigma eps)) (or the fused round(mu + sigma eps)) lies between
        # fl(mu - sigma) and fl(mu + sigma); tests/test_sampler.py checks it.
        return torch.addcmul(mu, sigma, eps.to(mu.dtype))

    def _draw_z(self, shape: torch.Size, mu, sigma, keep_eps: bool):
        """(z, eps or None): the fused draw of ``rsample`` (lock held, mu and sigma detached).

        z = fma(sigma, eps, mu) is written where the draws are made, so eps is
        never stored and read back; eps itself is stored only when the gradient
        with respect to sigma needs it. Broadcast or strided mu and sigma are
        copied to the output's contiguous layout first.
        """
        # (expand only where needed: it costs microseconds of Python per call)
        mu = (mu if mu.shape == shape else mu.expand(shape)).contiguous().view(-1)
        sigma = (sigma if sigma.shape == shape else sigma.expand(shape)).contiguous().view(-1)
        z = torch.empty(shape, dtype=mu.dtype, device=self.device)
        eps = torch.empty(shape, dtype=self._work_dtype, device=self.device) if keep_eps else None
        if z.numel():
            with torch._C._DisableFuncTorch():
                self._fill(None if eps is None else eps.view(-1), (mu, sigma, z.view(-1)))
        return z, eps

    def _fill(self, out: torch.Tensor | None, affine=None) -> None:
        """Fill ``out`` with the next draws: the buffer's first, then refills.

        ``affine`` = (mu, sigma, z), 1-D of one length (``rsample``'s fused path,
        sources with ``affine_dtypes``): z = mu + sigma * eps is written too, and
        ``out`` (eps) may be None. The source checks sigma as it goes and raises
        ValueError; the stream is then rewound to where it was, as if the call had
        been refused up front: its refills wrote their surplus to the spare buffer,
        so the buffered draws are untouched.
        """
        if self._counters is not None:
            self._fill_on_device(out, affine)
            return
        if affine is None:
            self._fill_from(out, None, spare=False)
            return
        before = (self._head, self._count, self._candidates, self._source.state())
        try:
            refilled = self._fill_from(out, affine, spare=True)
        except ValueError:
            self._head, self._count, self._candidates = before[:3]
            self._source.load_state(before[3])
            raise
        if refilled:  # the surplus lies in the spare buffer
            self._buffer, self._spare = self._spare, self._buffer

    def _fill_from(self, out, affine, *, spare: bool) -> bool:
        """_fill's loop: the buffer first, then refills whose surplus goes to the
        spare buffer if ``spare``. Returns whether a refill ran."""
        n = out.numel() if out is not None else affine[2].numel()
        take = min(self._count, n)
        if take < n and hasattr(self._source, "check_blocks"):
            # A rank without the blocks for the refill refuses before any work.
            self._source.check_blocks(self._refill_units(n - take) // self._unit)
        if take:
            served = self._buffer[self._head : self._head + take]
            if affine is not None:
                self._source.affine(served, affine)
            if out is not None:
                out[:take].copy_(served)
            self._head += take
            self._count -= take
        filled = take
        while filled < n:
            if affine is None:
                filled += self._refill(out[filled:], n - filled, spare=spare)
            else:
                filled += self._refill(out, n - filled, affine, filled, spare=spare)
        return filled > take

    def _refill_units(self, need: int, candidates: int | None = None) -> int:
        """Candidates of a refill for ``need`` draws, after ``candidates`` (default:
        those drawn so far). kernels/rejection_sampler.py repeats this on the device."""
        a = self._acceptance
        candidates = self._candidates if candidates is None else candidates
        expected = need / a + _SLACK_SIGMAS * math.sqrt(need * (1.0 - a)) / a
        floor = max(_MIN_REFILL, min(_MAX_REFILL_FLOOR, candidates // _REFILL_FRACTION))
        units = max(math.ceil(expected), floor)
        return -(-units // self._unit) * self._unit

    def _ensure_buffer(self, capacity: int, name: str = "_buffer") -> torch.Tensor:
        """The buffer ``name`` (``_buffer``, or ``_spare`` for rsample's refills)
        with room for ``capacity`` draws; its contents are kept only if it fits."""
        if getattr(self, name).numel() < capacity:
            capacity = -(-capacity // 4096) * 4096
            setattr(self, name, torch.empty(capacity, dtype=self._work_dtype, device=self.device))
        return getattr(self, name)

    def _refill(
        self, out: torch.Tensor | None, need: int, affine=None, offset=0, *, spare=False
    ) -> int:
        """One refill for ``need`` draws (buffer empty): returns how many went to ``out``.

        With ``affine`` the draws go to elements [offset, offset + need) of out
        and z (the source's refill). The surplus goes to the sampler's buffer,
        or to its spare one if ``spare`` (``_fill`` with ``affine``), grown first
        to the largest possible surplus.
        """
        units = self._refill_units(need)
        buffer = self._ensure_buffer(max(units - need, 1), "_spare" if spare else "_buffer")
        if affine is None:
            kept = self._source.refill(units, out, need, buffer)
        else:
            kept = self._source.refill(units, out, need, buffer, affine, offset)
        self._candidates += units
        self._head = 0
        self._count = max(kept - need, 0)
        return min(kept, need)

    # -------------------------------------------------------- device bookkeeping
    def _push_counters(self) -> None:
        """Host values (head, count, block offset, candidates) -> the device counters."""
        offset = self._source.block_offset
        signed = offset - (1 << 64) if offset >= 1 << 63 else offset  # int64 storage
        values = [self._head, self._count, signed, self._candidates, 0]
        self._counters = torch.tensor(values, dtype=torch.int64).to(self.device)
        self._host_current = True
        self._candidates_bound, self._offset_bound = self._candidates, offset

    def _sync_counters(self) -> None:
        """Device counters -> host values: the one host read of a device-bookkept
        sampler, made only when the host needs them (state, properties, moves)."""
        if self._counters is None or self._host_current:
            return
        head, count, offset, candidates, error = self._counters.tolist()
        self._head, self._count, self._candidates = head, count, candidates
        self._source.block_offset = offset & ((1 << 64) - 1)
        self._host_current = True
        self._candidates_bound, self._offset_bound = candidates, self._source.block_offset
        if error:  # a short refill found its rank's blocks used up (kernels/rejection_sampler.py)
            self._push_counters()  # clears the flag; the stream stays where it stopped
            raise self._source.used_up()

    def _fill_on_device(self, out: torch.Tensor | None, affine) -> None:
        """_fill for a device-bookkept source: launches only, no host read.

        The host sizes the refill and the buffer from upper bounds: the refill
        for all n draws (need <= n) after at most ``_candidates_bound``
        candidates. The device computes the exact size and never exceeds it.
        Near the end of the rank's Philox blocks the counters are read first,
        the refill checked exactly, and read again after (see
        _DEVICE_HEADROOM_BLOCKS).
        """
        n = out.numel() if out is not None else affine[2].numel()
        if n == 0:
            return
        cap = self._refill_units(n, self._candidates_bound)
        first = self._source._range()[0]
        checked = (
            self._offset_bound - first + cap // self._unit + _DEVICE_HEADROOM_BLOCKS
            > BLOCKS_PER_RANK
        )
        if checked:
            self._sync_counters()
            need = n - min(self._count, n)
            if need:  # refuse before any work, as the host loop does
                self._source.check_blocks(self._refill_units(need) // self._unit)
        if self._buffer.numel() < cap:  # grow, keeping the buffered draws
            old = self._buffer
            self._buffer = torch.empty(-(-cap // 4096) * 4096, dtype=old.dtype, device=old.device)
            self._buffer[: old.numel()].copy_(old)
        self._source.fill(self._counters, self._buffer, n, cap, self._acceptance, out, affine)
        self._host_current = False
        self._candidates_bound += cap
        self._offset_bound += cap // self._unit
        if checked:
            self._sync_counters()

    # ---------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Everything needed to resume the stream: RNG position, rank and the buffered draws.

        Device-independent (the buffer is saved on the CPU): it loads into a
        sampler of the same stream on any device.
        """
        with self._lock:
            self._sync_counters()
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
        if self._counters is not None:
            self._push_counters()


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
