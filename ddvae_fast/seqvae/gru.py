"""A time-major GRU layer as one autograd.Function, for training on CPU.

nn.GRU on CPU runs its cell as about a dozen ATen ops per time step and
autograd records each of them; its backward replays some thirty small ops per
step (a per-step dW_hh product and its accumulation, chunk/cat, ...). On a
busy 2-core box each small parallel op costs a scheduling round, and large
freshly allocated buffers cost page faults (glibc maps allocations over 32 MiB
afresh each time), so op count and allocation size decide much of a training
step's time (benchmarks/bench_train_step.py).

Here one layer is one autograd.Function. Time is cut into chunks of a few
steps (``chunk_steps``, sized to a few MiB so that buffers stay cache-sized
and the allocator recycles them):

- forward, per chunk: the input gates of the chunk's steps, one product per
  gate; per step one product h W_hh^T + b_hh and five elementwise ops; then,
  while the chunk is in cache, the coefficients its backward needs;
- backward, per chunk: three ops per step (the gate gradients, dh z, and one
  product for dh_prev), then dW_hh, dW_ih, the biases and dX each as one
  product or reduction over the chunk.

Sequences of different lengths can run packed (:func:`gru_final_states`):
sorted by decreasing length, step t holds only the sequences longer than t,
so no work is spent on padding, as with nn.utils.rnn.PackedSequence.

The equations are nn.GRU's (PyTorch's gate order r, z, n):

    r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
    z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
    h' = (1 - z) * n + z * h

on the module's own parameters, so checkpoints and state_dict keys do not
change. A layer may also take a per-sequence input s (B, S) appended to every
step's input, [x_t; s], as the decoder feeds its latent code: its gates
W_is s are computed once per sequence instead of once per step.

Double backward (``once_differentiable``) and forward-mode AD are not
implemented: both raise.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

# Bytes of one chunk's (rows, 3H) buffer: well under glibc's 32 MiB ceiling
# for recycling freed memory. In one interleaved run of the training step
# (B = 512, H = 128, 2 threads) 4 MiB chunks (5 steps) beat 1, 2, 8 and 16 MiB
# by 3-13%; one chunk for a whole 50-step sequence took ~6x the page faults.
CHUNK_BYTES = 4 * 2**20


def tanh_in_place(t: torch.Tensor) -> torch.Tensor:
    """tanh of ``t``, written into ``t`` (not differentiable: for the GRU's
    own forward and for greedy decoding, both outside autograd's graph).

    On CPU as 2 sigmoid(2t) - 1: ATen's CPU tanh is slow next to its sigmoid,
    and this form, four cheap passes, took a quarter of its time on a
    (4096, 128) float32 block (benchmarks/results/synthetic_step.json, which
    also has its effect on a training step and on greedy decoding). It
    differs from tanh by at most 2.5e-7 in float32 (tests/test_gru.py), below
    the GRU's own rounding across steps; the backward's 1 - n^2 reads the
    value computed here, so forward and backward stay consistent. Other
    dtypes (float16, bfloat16), whose few bits would double tanh's error in
    this form, and other devices (one kernel on a GPU against four) use tanh.
    """
    if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64):
        return t.tanh_()
    return t.mul_(2).sigmoid_().mul_(2).sub_(1)


def check_gru_module(rnn) -> nn.GRU:
    """``rnn`` if this module can run it, else a clear error (before any work)."""
    if not isinstance(rnn, nn.GRU):
        raise TypeError(f"expected an nn.GRU, got {type(rnn).__name__}")
    if rnn.bidirectional:
        raise ValueError("a bidirectional GRU is not supported (the recurrence runs forward only)")
    if rnn.dropout:
        raise ValueError(
            f"a GRU with dropout ({rnn.dropout}) between layers is not supported; "
            "use dropout=0 or nn.GRU itself"
        )
    if rnn.batch_first:
        raise ValueError("the GRU runs time-major: pass a module with batch_first=False")
    return rnn


def gru_layers(
    rnn: nn.GRU,
    x: torch.Tensor,
    hx: torch.Tensor | None = None,
    *,
    sequence_input: torch.Tensor | None = None,
    chunk_steps: int | None = None,
) -> list[torch.Tensor]:
    """Each layer's output sequence (T, B, H) of ``rnn`` on time-major ``x``.

    ``hx`` (num_layers, B, H) is the initial state (zeros if None). With
    ``sequence_input`` s (B, S), the first layer's input at every step is
    [x_t; s] (so x is (T, B, input_size - S)), as if s were concatenated to
    each step. The last layer's output is nn.GRU's output, and each layer's
    last step is its row of nn.GRU's h_n.
    """
    check_gru_module(rnn)
    width = rnn.input_size
    if sequence_input is not None:
        if not isinstance(sequence_input, torch.Tensor) or sequence_input.dim() != 2:
            raise ValueError("sequence_input must be a (B, S) tensor")
        width -= sequence_input.shape[1]
        if width < 1:
            raise ValueError(
                f"sequence_input has {sequence_input.shape[1]} features but the GRU's input "
                f"has {rnn.input_size}: no room left for x"
            )
    _check_input(rnn, x, width, {"hx": hx, "sequence_input": sequence_input})
    steps, batch, hidden = x.shape[0], x.shape[1], rnn.hidden_size
    if sequence_input is not None and sequence_input.shape[0] != batch:
        raise ValueError(
            f"sequence_input has {sequence_input.shape[0]} rows but x has a batch of {batch}"
        )
    if hx is None:
        hx = x.new_zeros(rnn.num_layers, batch, hidden)
    elif hx.shape != (rnn.num_layers, batch, hidden):
        raise ValueError(
            f"hx must have shape {(rnn.num_layers, batch, hidden)}, got {tuple(hx.shape)}"
        )
    layout = _Layout.uniform(steps, batch, _chunk_steps(chunk_steps, batch, hidden, x))
    rows = x.reshape(steps * batch, width)
    outputs = []
    for layer in range(rnn.num_layers):
        weights = _layer_weights(rnn, layer)
        sequence_gates = None
        if layer == 0 and sequence_input is not None:
            w_ih = weights[0]
            sequence_gates = F.linear(sequence_input, w_ih[:, width:])
            weights = (w_ih[:, :width], *weights[1:])
        rows = _run_layer(rows, hx[layer], *weights, sequence_gates, layout)
        outputs.append(rows.view(steps, batch, hidden))
    return outputs


def gru(
    rnn: nn.GRU, x: torch.Tensor, hx: torch.Tensor | None = None, chunk_steps: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rnn(x, hx)`` for a time-major (T, B, I) ``x``: (output (T, B, H), h_n (L, B, H))."""
    outputs = gru_layers(rnn, x, hx, chunk_steps=chunk_steps)
    return outputs[-1], torch.stack([out[-1] for out in outputs])


def gru_final_states(
    rnn: nn.GRU, x: torch.Tensor, lengths: torch.Tensor, chunk_steps: int | None = None
) -> torch.Tensor:
    """nn.GRU's h_n (num_layers, B, H) for padded time-major ``x`` (T, B, I)
    whose sequence b has ``lengths[b]`` valid steps, from a zero state: what
    ``rnn`` gives on nn.utils.rnn.pack_padded_sequence(x, lengths). The steps
    run packed, so padding costs nothing and never reaches a state."""
    check_gru_module(rnn)
    _check_input(rnn, x, rnn.input_size, {})
    steps, batch, hidden = x.shape[0], x.shape[1], rnn.hidden_size
    if (
        not isinstance(lengths, torch.Tensor)
        or lengths.shape != (batch,)
        or lengths.dtype.is_floating_point
        or lengths.dtype.is_complex
        or lengths.dtype == torch.bool
    ):
        raise ValueError(f"lengths must be an integer tensor of shape ({batch},)")
    if batch == 0:
        return x.new_zeros(rnn.num_layers, 0, hidden)
    lengths = lengths.to(device=x.device, dtype=torch.long)
    if int(lengths.min()) < 1 or int(lengths.max()) > steps:
        raise ValueError(
            f"lengths must lie in [1, {steps}], got values from {int(lengths.min())} "
            f"to {int(lengths.max())}"
        )
    order = torch.argsort(lengths, descending=True, stable=True)
    sorted_lengths = lengths[order]
    positions = torch.arange(batch, device=x.device)
    longest = int(sorted_lengths[0])
    # Step t holds the sequences longer than t: a prefix of the sorted batch.
    times = torch.arange(longest, device=x.device)
    sizes = (sorted_lengths.unsqueeze(0) > times.unsqueeze(1)).sum(1)
    layout = _Layout.packed(sizes.tolist(), batch, _chunk_steps(chunk_steps, batch, hidden, x))
    take = positions.unsqueeze(0) < sizes.unsqueeze(1)  # (longest, B) in packed order
    source = times.unsqueeze(1) * batch + order.unsqueeze(0)
    rows = x.reshape(steps * batch, -1).index_select(0, source[take])
    # Row of sequence b's last step: offsets[lengths[b] - 1] + its sorted position.
    offsets = torch.tensor(layout.offsets, device=x.device)
    rank = torch.empty_like(order)
    rank[order] = positions
    last = offsets[lengths - 1] + rank
    h0 = x.new_zeros(batch, hidden)
    finals = []
    for layer in range(rnn.num_layers):
        rows = _run_layer(rows, h0, *_layer_weights(rnn, layer), None, layout)
        finals.append(rows.index_select(0, last))
    return torch.stack(finals)


def gru_layer(
    x: torch.Tensor,
    h0: torch.Tensor,
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    bias_ih: torch.Tensor | None = None,
    bias_hh: torch.Tensor | None = None,
    sequence_gates: torch.Tensor | None = None,
    chunk_steps: int | None = None,
) -> torch.Tensor:
    """The states h_1..h_T (T, B, H) of one GRU layer on time-major ``x`` (T, B, I)
    from ``h0`` (B, H). ``sequence_gates`` (B, 3H), if given, is added to every
    step's input gates W_ih x_t + b_ih. ``chunk_steps`` overrides the number of
    steps per chunk (a performance setting; results do not depend on it).

    Without autograd (no_grad, or nothing requires grad) it keeps one chunk's
    scratch and saves nothing for backward.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[0] == 0:
        raise ValueError("x must be a (T, B, I) tensor with T >= 1")
    steps, batch, width = x.shape
    three_h, hidden = weight_hh.shape[0], weight_hh.shape[-1]
    if weight_hh.shape != (3 * hidden, hidden) or weight_ih.shape != (three_h, width):
        raise ValueError(
            f"weight_ih {tuple(weight_ih.shape)} and weight_hh {tuple(weight_hh.shape)} are not "
            f"a GRU layer's (3H, {width}) and (3H, H)"
        )
    expected = {
        "h0": (batch, hidden),
        "bias_ih": (three_h,),
        "bias_hh": (three_h,),
        "sequence_gates": (batch, three_h),
    }
    given = {"h0": h0, "bias_ih": bias_ih, "bias_hh": bias_hh, "sequence_gates": sequence_gates}
    for name, t in given.items():
        if t is not None and t.shape != expected[name]:
            raise ValueError(f"{name} must have shape {expected[name]}, got {tuple(t.shape)}")
    tensors = [x, weight_ih, weight_hh, *(t for t in given.values() if t is not None)]
    if any(t.dtype != x.dtype or t.device != x.device for t in tensors):
        raise ValueError(
            "x, h0, the weights, biases and sequence_gates must share one dtype and device, "
            "got " + ", ".join(f"{t.dtype} on {t.device}" for t in tensors)
        )
    layout = _Layout.uniform(steps, batch, _chunk_steps(chunk_steps, batch, hidden, x))
    rows = x.reshape(steps * batch, width)
    out = _run_layer(rows, h0, weight_ih, weight_hh, bias_ih, bias_hh, sequence_gates, layout)
    return out.view(steps, batch, hidden)


# -- internals ----------------------------------------------------------------


def _check_input(rnn: nn.GRU, x, width: int, others: dict) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[2] != width:
        raise ValueError(
            f"x must be a time-major (T, B, {width}) tensor, "
            f"got {tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
        )
    if x.shape[0] == 0:
        raise ValueError("x has no time steps")
    weight = rnn.weight_ih_l0
    for name, t in {"x": x, **others}.items():
        if t is not None and (t.dtype != weight.dtype or t.device != weight.device):
            raise ValueError(
                f"{name} is {t.dtype} on {t.device} but the GRU's weights are "
                f"{weight.dtype} on {weight.device}"
            )


def _chunk_steps(chunk_steps, batch: int, hidden: int, x: torch.Tensor) -> int:
    if chunk_steps is None:
        return max(1, CHUNK_BYTES // max(1, batch * 3 * hidden * x.element_size()))
    if not isinstance(chunk_steps, int) or isinstance(chunk_steps, bool) or chunk_steps < 1:
        raise ValueError(f"chunk_steps must be a positive int, got {chunk_steps!r}")
    return chunk_steps


def _layer_weights(rnn: nn.GRU, layer: int):
    """(weight_ih, weight_hh, bias_ih, bias_hh) of one layer; biases None without bias."""
    w_ih, w_hh = getattr(rnn, f"weight_ih_l{layer}"), getattr(rnn, f"weight_hh_l{layer}")
    if not rnn.bias:
        return w_ih, w_hh, None, None
    return w_ih, w_hh, getattr(rnn, f"bias_ih_l{layer}"), getattr(rnn, f"bias_hh_l{layer}")


@dataclass(frozen=True)
class _Layout:
    """Where each step's rows lie in a time-major row matrix: step t holds
    ``sizes[t]`` sequences (the first ones of the batch, which is sorted by
    decreasing length when packed) in rows offsets[t] .. offsets[t] + sizes[t];
    ``chunks`` are (first step, end step) pairs."""

    batch: int
    sizes: tuple[int, ...]
    offsets: tuple[int, ...]
    chunks: tuple[tuple[int, int], ...]

    @classmethod
    def uniform(cls, steps: int, batch: int, chunk_steps: int) -> _Layout:
        return cls.packed([batch] * steps, batch, chunk_steps)

    @classmethod
    def packed(cls, sizes: list[int], batch: int, chunk_steps: int) -> _Layout:
        offsets = [0]
        for size in sizes[:-1]:
            offsets.append(offsets[-1] + size)
        steps = len(sizes)
        chunks = tuple((t, min(t + chunk_steps, steps)) for t in range(0, steps, chunk_steps))
        return cls(batch, tuple(sizes), tuple(offsets), chunks)

    @property
    def rows(self) -> int:
        return self.offsets[-1] + self.sizes[-1]

    def span(self, start: int, stop: int) -> tuple[int, int]:
        """Rows of steps start .. stop - 1."""
        return self.offsets[start], self.offsets[stop - 1] + self.sizes[stop - 1]

    def previous(self, t: int) -> int:
        """First row, in the states matrix (h0's rows, then every step's), of the
        state that step t reads: its first sizes[t] rows are the sequences of step t."""
        return 0 if t == 0 else self.batch + self.offsets[t - 1]

    def previous_rows(self, states: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """The states that steps start .. stop - 1 read, stacked as their rows are:
        a view when each step reads all of the rows the step before wrote."""
        pieces = [(self.previous(t), self.sizes[t]) for t in range(start, stop)]
        if all(p + s == q for (p, s), (q, _) in pairwise(pieces)):
            return states[pieces[0][0] : pieces[0][0] + sum(s for _, s in pieces)]
        index = torch.cat([torch.arange(p, p + s) for p, s in pieces])
        return states.index_select(0, index.to(states.device))


def _run_layer(rows, h0, w_ih, w_hh, b_ih, b_hh, sequence_gates, layout):
    """One layer's output rows (N, H) on input rows (N, I) laid out by ``layout``."""
    args = (rows, h0, w_ih, w_hh, b_ih, b_hh, sequence_gates, layout)
    tensors = [t for t in args[:7] if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _GRULayer.apply(*args)
    return _forward(*args, keep=False)[0][layout.batch :]


def _forward(x, h0, w_ih, w_hh, b_ih, b_hh, sequence_gates, layout, keep: bool):
    """(states (B + N, H): h0's rows then each step's, and per chunk what
    backward needs: ``gates`` (3, rows, H) holding r, z and a = (1 - z)(1 - n^2),
    and the gate-gradient coefficients (rows, 3H)); with ``keep`` False one
    chunk's buffers are reused and the lists are empty."""
    hidden, batch = w_hh.shape[1], layout.batch
    x = x.contiguous()
    states = x.new_empty(batch + layout.rows, hidden)
    states[:batch] = h0
    w_hh_t = w_hh.t()
    # Per-gate input weights, so that each gate's input product writes one
    # contiguous block and the per-step elementwise ops run on whole blocks.
    w_ih_gates = [w.t() for w in w_ih.chunk(3)]
    b_ih_gates = [None] * 3 if b_ih is None else list(b_ih.chunk(3))
    seq_gates = None
    if sequence_gates is not None:
        if set(layout.sizes) != {batch}:
            raise ValueError("sequence_gates need every step to hold the whole batch")
        seq_gates = sequence_gates.view(batch, 3, hidden).transpose(0, 1).unsqueeze(1)
    kept_gates, kept_coefficients = [], []
    scratch = None
    for start, stop in layout.chunks:
        first, last = layout.span(start, stop)
        n_rows = last - first
        if keep or scratch is None or scratch[1].shape[0] != n_rows:
            scratch = (x.new_empty(3, n_rows, hidden), x.new_empty(n_rows, 3 * hidden))
        gates, hidden_gates = scratch
        for g in range(3):
            if b_ih_gates[g] is None:
                torch.mm(x[first:last], w_ih_gates[g], out=gates[g])
            else:
                torch.addmm(b_ih_gates[g], x[first:last], w_ih_gates[g], out=gates[g])
        if seq_gates is not None:
            gates.view(3, stop - start, batch, hidden).add_(seq_gates)
        for t in range(start, stop):
            size, here = layout.sizes[t], layout.offsets[t] - first
            block = slice(here, here + size)
            h = states[layout.previous(t) : layout.previous(t) + size]
            gh = hidden_gates[block]
            if b_hh is None:
                torch.mm(h, w_hh_t, out=gh)
            else:
                torch.addmm(b_hh, h, w_hh_t, out=gh)
            gh3 = gh.view(size, 3, hidden)
            reset_update = gates[:2, block]
            torch.add(reset_update, gh3[:, :2].transpose(0, 1), out=reset_update).sigmoid_()
            new = gates[2, block]
            tanh_in_place(torch.addcmul(new, gates[0, block], gh3[:, 2], out=new))
            # h' = n + z (h - n), nn.GRU's (1 - z) n + z h.
            out = states[batch + layout.offsets[t] : batch + layout.offsets[t] + size]
            torch.lerp(new, h, gates[1, block], out=out)
        if keep:
            _coefficients(gates, hidden_gates, layout.previous_rows(states, start, stop))
            kept_gates.append(gates)
            kept_coefficients.append(hidden_gates)
    return states, kept_gates, kept_coefficients


def _coefficients(gates, hidden_gates, h_prev):
    """Turn a chunk's forward buffers, while they are in cache, into what its
    backward needs: with dh the gradient of a step's output h', every gate
    gradient is dh times a coefficient that does not depend on dh

        d(W_in x + b_in) = dh (1 - z)(1 - n^2)                  = dh a
        d(W_hn h + b_hn) = dh a r
        d(r pre-act.)    = dh a (W_hn h + b_hn) r (1 - r)
        d(z pre-act.)    = dh (h - n) z (1 - z)

    so the backward time loop only multiplies. In place: ``hidden_gates``
    (rows, 3H) becomes the hidden gates' coefficients [r, z, n] and ``gates``
    (3, rows, H) becomes [r, z, a]."""
    r, z, n = gates.unbind(0)
    c_r, c_z, c_n = hidden_gates.view(r.shape[0], 3, r.shape[1]).unbind(1)
    one_minus_z = 1 - z
    torch.sub(h_prev, n, out=c_z).mul_(z).mul_(one_minus_z)
    a = torch.addcmul(one_minus_z, n, n * one_minus_z, value=-1, out=n)  # n is not needed again
    torch.mul(c_n, a, out=c_r).mul_(torch.addcmul(r, r, r, value=-1))  # c_n holds W_hn h + b_hn
    torch.mul(a, r, out=c_n)


class _GRULayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, sequence_gates, layout):
        states, gates, coefficients = _forward(
            x, h0, w_ih, w_hh, b_ih, b_hh, sequence_gates, layout, keep=True
        )
        ctx.save_for_backward(x, w_ih, w_hh, states, *gates, *coefficients)
        ctx.layout = layout
        ctx.has_bias = (b_ih is not None, b_hh is not None)
        return states[layout.batch :]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_states):
        x, w_ih, w_hh, states, *kept = ctx.saved_tensors
        layout = ctx.layout
        n_chunks = len(layout.chunks)
        kept_gates, kept_coefficients = kept[:n_chunks], kept[n_chunks:]
        width, hidden, batch = x.shape[1], w_hh.shape[1], layout.batch
        need = ctx.needs_input_grad
        x = x.contiguous()
        grad_x = x.new_empty(layout.rows, width) if need[0] else None
        grad_w_ih = torch.zeros_like(w_ih) if need[2] else None
        grad_w_hh = torch.zeros_like(w_hh) if need[3] else None
        # Bias gradients: one row of partial sums per chunk, summed at the end.
        grad_b_ih = x.new_empty(n_chunks, 3 * hidden) if ctx.has_bias[0] and need[4] else None
        grad_b_hh = x.new_empty(n_chunks, 3 * hidden) if ctx.has_bias[1] and need[5] else None
        grad_seq = x.new_zeros(batch, 3 * hidden) if need[6] else None
        grad_gates_in = need[0] or need[2] or need[4] or need[6]
        grad_gates = None
        carry = None  # the gradient reaching the states that the next chunk read
        for index in range(n_chunks - 1, -1, -1):
            start, stop = layout.chunks[index]
            first, last = layout.span(start, stop)
            n_rows = last - first
            z, a = kept_gates[index][1], kept_gates[index][2]
            coefficients = kept_coefficients[index].view(n_rows, 3, hidden)
            grad_h = grad_states[first:last].clone(memory_format=torch.contiguous_format)
            if carry is not None:
                tail = layout.offsets[stop - 1] - first
                grad_h[tail : tail + carry.shape[0]] += carry
            if grad_gates is None or grad_gates.shape[0] != n_rows:
                grad_gates = x.new_empty(n_rows, 3 * hidden)
            for t in range(stop - 1, start - 1, -1):
                size, here = layout.sizes[t], layout.offsets[t] - first
                dh = grad_h[here : here + size]
                gate_grad = grad_gates[here : here + size]
                torch.mul(
                    coefficients[here : here + size],
                    dh.unsqueeze(1),
                    out=gate_grad.view(size, 3, hidden),
                )
                if t > start:
                    before = layout.offsets[t - 1] - first
                    grad_h[before : before + size].addcmul_(dh, z[here : here + size]).addmm_(
                        gate_grad, w_hh
                    )
                else:
                    carry = torch.addmm(dh * z[here : here + size], gate_grad, w_hh)
            if grad_w_hh is not None:
                h_prev = layout.previous_rows(states, start, stop)
                grad_w_hh.addmm_(grad_gates.t(), h_prev)
            if grad_b_hh is not None:
                torch.sum(grad_gates, 0, out=grad_b_hh[index])
            if not grad_gates_in:
                continue
            # The input gates' gradient differs from the hidden gates' in n only.
            torch.mul(grad_h, a, out=grad_gates.view(n_rows, 3, hidden)[:, 2])
            if grad_x is not None:
                torch.mm(grad_gates, w_ih, out=grad_x[first:last])
            if grad_w_ih is not None:
                grad_w_ih.addmm_(grad_gates.t(), x[first:last])
            if grad_b_ih is not None:
                torch.sum(grad_gates, 0, out=grad_b_ih[index])
            if grad_seq is not None:
                grad_seq += grad_gates.view(stop - start, batch, 3 * hidden).sum(0)
        grad_h0 = None
        if need[1]:
            grad_h0 = carry
            if carry.shape[0] < batch:  # sequences that start empty get no gradient
                grad_h0 = torch.cat([carry, carry.new_zeros(batch - carry.shape[0], hidden)])
        grad_b_ih = None if grad_b_ih is None else grad_b_ih.sum(0)
        grad_b_hh = None if grad_b_hh is None else grad_b_hh.sum(0)
        return grad_x, grad_h0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, grad_seq, None
