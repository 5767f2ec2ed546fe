"""Triton backend of the fused relaxed arg-max loss (DD-VAE, Section 2.2, Eq. 11-13).

Contract: docs/loss_backend_contract.md. Per row n with target t, logits l (length V),
tau in (0, 1) and c = log(1/tau - 1):

- 'logit' mode: z_s = (l_s - l_t)/tau + c, argmax_row = sum_{s != t} softplus(z_s)
  (= -sum log sigma_tau(l_t - l_s), the authors' log-softmax form);
  d/dl_s = sigmoid(z_s)/tau, d/dl_t = -sum_{s != t} sigmoid(z_s)/tau.
- 'prob' mode: the same on p = softmax(l); the gradient goes through the
  softmax backward p_s (g_s - sum_j p_j g_j).
- nll_row = logsumexp(l) - l_t, correct_row = [l_t > l_s for every s != t] and
  no NaN in the row.

Kernel shape (the Liger-Kernel cross-entropy layout): one program per row, the
gradient is written during the forward pass, row offsets are int64
(program_id * row_stride), every load and store is masked, arithmetic is fp32
for fp32/bf16/fp16 inputs and the gradient is stored in the input dtype.

Memory traffic per row (V elements; "read" = one pass over the logits row):

    mode   V <= BLOCK_V (one block)   V > BLOCK_V (looped in BLOCK_V chunks)
    logit  1 read  (+1 grad write)    1 read (+1 write) if the nll gradient is
                                      off (nll_weight == 0 or need_grad False);
                                      2 reads + 1 write with the nll gradient,
                                      whose softmax needs the final logsumexp
    prob   1 read  (+1 grad write)    2 reads without the gradient, 3 reads +
                                      1 write with it: (1) online max/sum-exp,
                                      (2) losses and the row sums behind
                                      A = sum_j p_j g_j, (3) recompute p, z and
                                      write p (g - A)

plus one scalar load of l_t per row. Lanes past V load l_t, so like the
target's lane (excluded from every sum) they keep all intermediates finite.
The one-block path keeps the whole row in registers. MAX_BLOCK_V = 8192 with
16 warps gives 16 fp32 values per thread per live row vector (a 512-thread
block may use at most 65536 / 512 = 128 registers per thread); below it, and
for the chunked path's 4096-column chunks, ddvae_fast/loss/triton.py picks
warps for at most 8 values per thread. tests/test_aot_compile.py compiles
every specialization for sm_80 and sm_90a (Triton 3.9) and requires zero
spills: with 16 values per thread the chunked path at 8192 / 16 warps spilled
8-24 B, and so did the 512-column block on one warp (sm_80); at 8 per thread
the worst of those compiled to 82-89 registers and no spills.
DD-VAE vocabularies (SMILES ~30-100 tokens, binary MNIST 2) are far below it.

Numerics (fp32 throughout, float64-checked in tests/test_triton_relaxed_argmax.py):
- softplus(z) = max(z, 0) + log1p(exp(-|z|)) and sigmoid from exp(-|z|): no
  overflow (tau = 1e-4 with |logits| = 1e4 gives |z| ~ 2e8, finite in fp32).
- log1p and expm1 are not portable tl functions (libdevice has them on CUDA,
  but the interpreter cannot run libdevice), so `_log1p` and `_expm1` use
  Goldberg's and Kahan's corrections; both need an accurate log, and tl.log
  lowers to libdevice __nv_logf on NVIDIA GPUs (only tl.exp is approximate).
- nll of a row whose target is the max is log1p(sum_{s != t} exp(l_s - l_t)),
  so confident rows keep relative accuracy; 1 - p_t is the sum of the others.
- The target's own gradient is formed after the row from fp32 accumulators
  and stored once.
- 'prob' mode: p_s - p_t is p_t expm1(l_s - l_t) when |l_s - l_t| < 1 (else
  1/tau would magnify p's rounding), and the softmax backward avoids
  subtracting near-equal sums (see _prob_grad).
"""

from __future__ import annotations

import triton
import triton.language as tl

# Largest one-block row (a power of two): the largest V for the fused
# single-read paths. See the module docstring for why 8192.
MAX_BLOCK_V = 8192
MIN_BLOCK_V = 16


# --------------------------------------------------------------------------- #
# Device helpers
# --------------------------------------------------------------------------- #
@triton.jit
def _log1p(x):
    """log(1 + x) for x >= 0 without losing the low digits of a tiny x."""
    u = 1.0 + x
    # u - 1 is exact, so x / (u - 1) corrects the rounding of 1 + x; the inner
    # where keeps the unused lane free of 0/0.
    return tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _expm1(x):
    """exp(x) - 1 to a few ulp for |x| <= 1 (Kahan): (u - 1) / log(u) is
    insensitive to the rounding of u = exp(x), even an approximate exp."""
    u = tl.exp(x)
    um1 = u - 1.0
    return tl.where(um1 == 0.0, x, um1 * (x / tl.log(tl.where(um1 == 0.0, 2.0, u))))


@triton.jit
def _prob_z(l, l_t, p, p_t, inv_tau, log_odds):
    """z = (p - p_t)/tau + c. For |l - l_t| < 1 the difference is taken as
    p_t expm1(l - l_t): p - p_t would cancel, and 1/tau magnifies the fp32
    rounding of p (eps p / tau = 6e-4 p at tau = 1e-4) into z."""
    x = l - l_t
    near = tl.minimum(tl.maximum(x, -1.0), 1.0)  # keeps the unused lanes finite
    diff = tl.where(tl.abs(x) < 1.0, p_t * _expm1(near), p - p_t)
    return diff * inv_tau + log_odds


@triton.jit
def _softplus_sigmoid(z):
    """softplus(z), sigmoid(z) and sigmoid(-z) = 1 - sigmoid(z), each to full
    relative precision, from e = exp(-|z|) in (0, 1]: never overflows."""
    e = tl.exp(-tl.abs(z))
    r = 1.0 / (1.0 + e)  # the compiler shares 1 + e with _log1p
    softplus = tl.maximum(z, 0.0) + _log1p(e)
    sigmoid = tl.where(z >= 0.0, r, e * r)
    complement = tl.where(z >= 0.0, e * r, r)
    return softplus, sigmoid, complement


@triton.jit
def _prob_grad(
    p, sigmoid, complement, p_t, p_other, g_sum, ps_sum, pq_sum, inv_tau, w_argmax, w_nll
):
    """Gradient of a non-target logit in 'prob' mode: p_s (g_s - A) + nll part.

    A = sum_j p_j g_j is close to g_s when every sigmoid is near 1 (small tau,
    target not on top), so g_s - A is rewritten exactly as
    p_t (g_s + G) + sum_{j != t} p_j (sigma_s - sigma_j) / tau, and the last sum
    as sigma_s P_o - sum p_j sigma_j, or (sigma_s >= 1/2) as
    sum p_j (1 - sigma_j) - (1 - sigma_s) P_o: no difference of near-1 numbers."""
    spread = tl.where(sigmoid >= 0.5, pq_sum - complement * p_other, sigmoid * p_other - ps_sum)
    g_minus_a = p_t * (sigmoid * inv_tau + g_sum) + spread * inv_tau
    return w_argmax * (p * g_minus_a) + w_nll * p


@triton.jit
def _prob_target_grad(p_t, p_other, g_sum, ps_sum, inv_tau, w_argmax, w_nll):
    """p_t (-G - A) = -p_t (S + G (1 - p_t)), all terms positive; nll part -(1 - p_t)."""
    return -w_argmax * (p_t * (ps_sum * inv_tau + g_sum * p_other)) - w_nll * p_other


@triton.jit
def _nll_and_softmax_terms(l_t, m, d_other):
    """From the row max m and d_other = sum_{s != t} exp(l_s - m):
    nll = logsumexp(l) - l_t, 1/sum exp(l - m), p_t and 1 - p_t (as sum of others)."""
    d = d_other + tl.exp(l_t - m)
    inv_d = 1.0 / d
    # When l_t is the max, nll = log1p(d_other): keeps confident rows accurate.
    # An infinite l_t that is the max gives NaN, as logsumexp(l) - l_t does in
    # the reference (inf - inf), not the limit 0.
    top = tl.where(l_t - l_t == 0.0, _log1p(d_other), float("nan"))
    # A +inf rival: logsumexp(l) = inf (torch.logsumexp's value), d is NaN.
    rest = tl.where(m == float("inf"), float("inf"), (m - l_t) + tl.log(d))
    nll = tl.where(m == l_t, top, rest)
    p_t = tl.exp(l_t - m) * inv_d
    p_other = d_other * inv_d
    return nll, inv_d, p_t, p_other


@triton.jit
def _unique_max(l_t, max_other, nan_others, V):
    """correct_rows of ddvae_fast/loss/reference.py: every other logit strictly
    below l_t, and no NaN in the row (a tie or a NaN is never correct). NaNs are
    counted, not left to max: tl.max/tl.maximum keep a NaN under the interpreter
    but drop it (maxnum) in the GPU backend."""
    return ((max_other < l_t) | (V == 1)) & (l_t == l_t) & (nan_others == 0)


@triton.jit
def _store_row_outputs(argmax_ptr, nll_ptr, correct_ptr, row, t_ok, loss, nll, correct):
    # An out-of-range target never reaches here through the public API; if it
    # does, NaN losses flag it instead of a silent number.
    nan = float("nan")
    tl.store(argmax_ptr + row, tl.where(t_ok, loss, nan))
    tl.store(nll_ptr + row, tl.where(t_ok, nll, nan))
    tl.store(correct_ptr + row, t_ok & correct)


@triton.jit
def _store_ignored_row(
    argmax_ptr,
    nll_ptr,
    correct_ptr,
    grad_row,
    row,
    V,
    BLOCK_V: tl.constexpr,
    NEED_GRAD: tl.constexpr,
):
    tl.store(argmax_ptr + row, 0.0)
    tl.store(nll_ptr + row, 0.0)
    tl.store(correct_ptr + row, True)
    if NEED_GRAD:
        cols = tl.arange(0, BLOCK_V)
        zero = tl.zeros([BLOCK_V], dtype=grad_row.dtype.element_ty)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            tl.store(grad_row + offs, zero, mask=offs < V)


# --------------------------------------------------------------------------- #
# Kernels: one program per row
# --------------------------------------------------------------------------- #
# ignore_index is only compared, so specializing on its value (== 1, divisible
# by 16) would add compiled variants for nothing; need_nll only zeroes an
# output, a runtime flag rather than a second compiled variant.
@triton.jit(
    do_not_specialize=["ignore_index", "need_nll"],
    do_not_specialize_on_alignment=["target_ptr", "grad_scale_ptr"],
)
def relaxed_argmax_logit_kernel(
    logits_ptr,
    target_ptr,
    grad_scale_ptr,
    argmax_ptr,
    nll_ptr,
    correct_ptr,
    grad_ptr,
    V,
    stride_row,
    ignore_index,
    inv_tau,
    log_odds,
    argmax_weight,
    nll_weight,
    need_nll,
    BLOCK_V: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    NLL_GRAD: tl.constexpr,
    COMPUTE_LSE: tl.constexpr,
):
    """'logit' mode. NLL_GRAD: need_grad and nll_weight != 0 (the gradient then
    contains softmax(l)); COMPUTE_LSE: need_nll or NLL_GRAD (otherwise no exp
    is spent on the logsumexp)."""
    row = tl.program_id(0).to(tl.int64)
    t = tl.load(target_ptr + row)
    logits_row = logits_ptr + row * stride_row
    grad_row = grad_ptr + row * V
    if t == ignore_index:
        _store_ignored_row(argmax_ptr, nll_ptr, correct_ptr, grad_row, row, V, BLOCK_V, NEED_GRAD)
        return

    t_ok = (t >= 0) & (t < V)
    l_t = tl.load(logits_row + t, mask=t_ok, other=float("nan")).to(tl.float32)
    grad_scale = tl.load(grad_scale_ptr).to(tl.float32)
    w_argmax = grad_scale * argmax_weight
    w_nll = grad_scale * nll_weight
    cols = tl.arange(0, BLOCK_V)
    nll = 0.0

    if ONE_BLOCK:
        mask = cols < V
        keep = mask & (cols != t)
        l = tl.load(logits_row + cols, mask=mask, other=l_t).to(tl.float32)
        z = (l - l_t) * inv_tau + log_odds
        softplus, sigmoid, _complement = _softplus_sigmoid(z)
        g = sigmoid * inv_tau
        loss = tl.sum(tl.where(keep, softplus, 0.0), axis=0)
        g_sum = tl.sum(tl.where(keep, g, 0.0), axis=0)
        max_other = tl.max(tl.where(keep, l, float("-inf")), axis=0)
        nan_others = tl.sum((keep & (l != l)).to(tl.int32), axis=0)
        if COMPUTE_LSE:
            m = tl.maximum(l_t, max_other)
            e = tl.where(keep, tl.exp(l - m), 0.0)
            nll, inv_d, _p_t, p_other = _nll_and_softmax_terms(l_t, m, tl.sum(e, axis=0))
        if NEED_GRAD:
            grad = w_argmax * g
            target_grad = -w_argmax * g_sum
            if NLL_GRAD:
                grad += w_nll * (e * inv_d)
                target_grad -= w_nll * p_other
            grad = tl.where(cols == t, target_grad, grad)
            # A NaN logit makes the target's gradient NaN; the reference's whole row is.
            grad = tl.where(target_grad != target_grad, float("nan"), grad)
            tl.store(grad_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)
    else:
        loss_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
        g_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
        max_other = float("-inf")
        nan_others = 0
        m = l_t
        d_other = 0.0
        # Pass 1: losses, sum of sigmoids, online max / sum-exp; without the
        # nll gradient this is the only pass and writes the gradient too.
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            keep = mask & (offs != t)
            l = tl.load(logits_row + offs, mask=mask, other=l_t).to(tl.float32)
            z = (l - l_t) * inv_tau + log_odds
            softplus, sigmoid, _complement = _softplus_sigmoid(z)
            g = sigmoid * inv_tau
            loss_acc += tl.where(keep, softplus, 0.0)
            g_acc += tl.where(keep, g, 0.0)
            max_other = tl.maximum(max_other, tl.max(tl.where(keep, l, float("-inf")), axis=0))
            nan_others += tl.sum((keep & (l != l)).to(tl.int32), axis=0)
            if COMPUTE_LSE:
                m_new = tl.maximum(m, max_other)
                d_other = d_other * tl.exp(m - m_new) + tl.sum(
                    tl.where(keep, tl.exp(l - m_new), 0.0), axis=0
                )
                m = m_new
            if NEED_GRAD and not NLL_GRAD:
                # The target's element is written once after the row.
                tl.store(grad_row + offs, (w_argmax * g).to(grad_ptr.dtype.element_ty), mask=keep)
        loss = tl.sum(loss_acc, axis=0)
        g_sum = tl.sum(g_acc, axis=0)
        if COMPUTE_LSE:
            nll, inv_d, _p_t, p_other = _nll_and_softmax_terms(l_t, m, d_other)
        if NEED_GRAD:
            target_grad = -w_argmax * g_sum
            if NLL_GRAD:
                target_grad -= w_nll * p_other
                # Pass 2: softmax(l) needs the final logsumexp; recompute and
                # write every element once (the target's from the accumulators).
                for start in range(0, V, BLOCK_V):
                    offs = start + cols
                    mask = offs < V
                    l = tl.load(logits_row + offs, mask=mask, other=l_t).to(tl.float32)
                    z = (l - l_t) * inv_tau + log_odds
                    softplus, sigmoid, _complement = _softplus_sigmoid(z)
                    grad = w_argmax * (sigmoid * inv_tau) + w_nll * (tl.exp(l - m) * inv_d)
                    grad = tl.where(offs == t, target_grad, grad)
                    tl.store(grad_row + offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)
            else:
                tl.store(grad_row + t, target_grad.to(grad_ptr.dtype.element_ty), mask=t_ok)
            if target_grad != target_grad:
                # A NaN logit: the reference's whole gradient row is NaN (rare
                # path: pass 1 already wrote finite values for the others).
                nan_row = tl.full([BLOCK_V], float("nan"), grad_ptr.dtype.element_ty)
                for start in range(0, V, BLOCK_V):
                    offs = start + cols
                    tl.store(grad_row + offs, nan_row, mask=offs < V)

    # A NaN anywhere makes logsumexp(l) NaN (the GPU's max drops NaNs, and a +inf
    # rival would otherwise give inf).
    nll = tl.where(need_nll, tl.where((nan_others == 0) & (l_t == l_t), nll, float("nan")), 0.0)
    correct = _unique_max(l_t, max_other, nan_others, V)
    _store_row_outputs(argmax_ptr, nll_ptr, correct_ptr, row, t_ok, loss, nll, correct)


@triton.jit(
    do_not_specialize=["ignore_index", "need_nll"],
    do_not_specialize_on_alignment=["target_ptr", "grad_scale_ptr"],
)
def relaxed_argmax_prob_kernel(
    logits_ptr,
    target_ptr,
    grad_scale_ptr,
    argmax_ptr,
    nll_ptr,
    correct_ptr,
    grad_ptr,
    V,
    stride_row,
    ignore_index,
    inv_tau,
    log_odds,
    argmax_weight,
    nll_weight,
    need_nll,
    BLOCK_V: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    NEED_GRAD: tl.constexpr,
):
    """'prob' mode: the relaxed arg max on p = softmax(l).

    With g_s = sigmoid(z_s)/tau (s != t), G = sum_{s != t} g_s, S = sum_{s != t}
    p_s g_s and A = sum_j p_j g_j = S - p_t G, the logits gradient is
    p_s (g_s - A) for s != t and p_t (-G - A) for t, both evaluated in forms
    free of cancellation (_prob_grad, _prob_target_grad)."""
    row = tl.program_id(0).to(tl.int64)
    t = tl.load(target_ptr + row)
    logits_row = logits_ptr + row * stride_row
    grad_row = grad_ptr + row * V
    if t == ignore_index:
        _store_ignored_row(argmax_ptr, nll_ptr, correct_ptr, grad_row, row, V, BLOCK_V, NEED_GRAD)
        return

    t_ok = (t >= 0) & (t < V)
    l_t = tl.load(logits_row + t, mask=t_ok, other=float("nan")).to(tl.float32)
    grad_scale = tl.load(grad_scale_ptr).to(tl.float32)
    w_argmax = grad_scale * argmax_weight
    w_nll = grad_scale * nll_weight
    cols = tl.arange(0, BLOCK_V)

    if ONE_BLOCK:
        mask = cols < V
        keep = mask & (cols != t)
        l = tl.load(logits_row + cols, mask=mask, other=l_t).to(tl.float32)
        max_other = tl.max(tl.where(keep, l, float("-inf")), axis=0)
        nan_others = tl.sum((keep & (l != l)).to(tl.int32), axis=0)
        m = tl.maximum(l_t, max_other)
        e = tl.where(keep, tl.exp(l - m), 0.0)
        nll, inv_d, p_t, p_other = _nll_and_softmax_terms(l_t, m, tl.sum(e, axis=0))
        p = e * inv_d
        z = _prob_z(l, l_t, p, p_t, inv_tau, log_odds)
        softplus, sigmoid, complement = _softplus_sigmoid(z)
        loss = tl.sum(tl.where(keep, softplus, 0.0), axis=0)
        g_sum = tl.sum(tl.where(keep, sigmoid, 0.0), axis=0) * inv_tau
        ps_sum = tl.sum(p * sigmoid, axis=0)  # p is 0 off `keep`
        pq_sum = tl.sum(p * complement, axis=0)
        if NEED_GRAD:
            grad = _prob_grad(
                p,
                sigmoid,
                complement,
                p_t,
                p_other,
                g_sum,
                ps_sum,
                pq_sum,
                inv_tau,
                w_argmax,
                w_nll,
            )
            target_grad = _prob_target_grad(p_t, p_other, g_sum, ps_sum, inv_tau, w_argmax, w_nll)
            grad = tl.where(cols == t, target_grad, grad)
            tl.store(grad_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)
    else:
        # Pass 1: online row max and sum of exp over s != t.
        max_other = float("-inf")
        nan_others = 0
        m = l_t
        d_other = 0.0
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            keep = mask & (offs != t)
            l = tl.load(logits_row + offs, mask=mask, other=l_t).to(tl.float32)
            max_other = tl.maximum(max_other, tl.max(tl.where(keep, l, float("-inf")), axis=0))
            nan_others += tl.sum((keep & (l != l)).to(tl.int32), axis=0)
            m_new = tl.maximum(m, max_other)
            d_other = d_other * tl.exp(m - m_new) + tl.sum(
                tl.where(keep, tl.exp(l - m_new), 0.0), axis=0
            )
            m = m_new
        nll, inv_d, p_t, p_other = _nll_and_softmax_terms(l_t, m, d_other)
        # Pass 2: losses and the row sums of sigmoid, p sigmoid, p (1 - sigmoid).
        loss_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
        s_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
        ps_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
        pq_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            keep = mask & (offs != t)
            l = tl.load(logits_row + offs, mask=mask, other=l_t).to(tl.float32)
            p = tl.exp(l - m) * inv_d
            z = _prob_z(l, l_t, p, p_t, inv_tau, log_odds)
            softplus, sigmoid, complement = _softplus_sigmoid(z)
            p = tl.where(keep, p, 0.0)
            loss_acc += tl.where(keep, softplus, 0.0)
            s_acc += tl.where(keep, sigmoid, 0.0)
            ps_acc += p * sigmoid
            pq_acc += p * complement
        loss = tl.sum(loss_acc, axis=0)
        g_sum = tl.sum(s_acc, axis=0) * inv_tau
        ps_sum = tl.sum(ps_acc, axis=0)
        pq_sum = tl.sum(pq_acc, axis=0)
        if NEED_GRAD:
            # Pass 3: recompute p and the sigmoids, write the softmax-backward gradient.
            target_grad = _prob_target_grad(p_t, p_other, g_sum, ps_sum, inv_tau, w_argmax, w_nll)
            for start in range(0, V, BLOCK_V):
                offs = start + cols
                mask = offs < V
                l = tl.load(logits_row + offs, mask=mask, other=l_t).to(tl.float32)
                p = tl.exp(l - m) * inv_d
                z = _prob_z(l, l_t, p, p_t, inv_tau, log_odds)
                softplus, sigmoid, complement = _softplus_sigmoid(z)
                grad = _prob_grad(
                    p,
                    sigmoid,
                    complement,
                    p_t,
                    p_other,
                    g_sum,
                    ps_sum,
                    pq_sum,
                    inv_tau,
                    w_argmax,
                    w_nll,
                )
                grad = tl.where(offs == t, target_grad, grad)
                tl.store(grad_row + offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)

    # A NaN anywhere makes logsumexp(l) NaN (the GPU's max drops NaNs, and a +inf
    # rival would otherwise give inf).
    nll = tl.where(need_nll, tl.where((nan_others == 0) & (l_t == l_t), nll, float("nan")), 0.0)
    correct = _unique_max(l_t, max_other, nan_others, V)
    _store_row_outputs(argmax_ptr, nll_ptr, correct_ptr, row, t_ok, loss, nll, correct)
