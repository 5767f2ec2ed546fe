"""seqvae.gru against nn.GRU as the oracle: outputs, final states and every
gradient (inputs, h0, each weight and bias), in one chunk and across chunks,
padded and packed (against nn.utils.rnn.pack_padded_sequence), with a
per-sequence input (against concatenating it to every step); gradcheck; its
refusals, its no-grad path, and the model's decoder against nn.GRU."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ddvae_fast.seqvae.data import Vocabulary, encode_strings
from ddvae_fast.seqvae.gru import gru, gru_final_states, gru_layer, gru_layers, tanh_in_place
from ddvae_fast.seqvae.model import ModelConfig, SequenceDDVAE

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# float64: a few roundings of values O(1) through T steps. float32: the same
# computation with a different order of operations (lerp, fused products), so
# differences of a few float32 epsilons per step, growing with T.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5}


def _both(steps, batch, inputs, hidden, layers, bias, dtype, seed=0, chunk_steps=None):
    """nn.GRU and seqvae.gru on the same module and data: (reference, ours) as
    (output, h_n, gradients of x, h0 and every parameter) under one random
    upstream gradient on both output and h_n. ``chunk_steps`` None: the
    default chunking (one chunk at these sizes)."""
    torch.manual_seed(seed)
    rnn = nn.GRU(inputs, hidden, layers, bias=bias).to(dtype)
    x = torch.randn(steps, batch, inputs, dtype=dtype, requires_grad=True)
    h0 = torch.randn(layers, batch, hidden, dtype=dtype, requires_grad=True)
    w_out = torch.randn(steps, batch, hidden, dtype=dtype)
    w_h = torch.randn(layers, batch, hidden, dtype=dtype)
    leaves = [x, h0, *rnn.parameters()]
    results = []
    for run in (rnn, lambda x, h: gru(rnn, x, h, chunk_steps)):
        out, h_n = run(x, h0)
        grads = torch.autograd.grad((out * w_out).sum() + (h_n * w_h).sum(), leaves)
        results.append((out, h_n, grads))
    return results


def _assert_close(reference, ours, tol):
    (out_ref, h_ref, g_ref), (out, h, g) = reference, ours
    assert (out - out_ref).abs().max() <= tol
    assert (h - h_ref).abs().max() <= tol
    assert len(g) == len(g_ref)
    for a, b in zip(g, g_ref):
        assert (a - b).abs().max() <= tol * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "steps, batch, inputs, hidden, layers, bias, chunk_steps",
    [
        (1, 1, 1, 1, 1, True, None),  # one step, one sequence, one unit
        (1, 5, 3, 4, 2, True, None),
        (7, 1, 3, 4, 3, True, None),
        (9, 6, 5, 8, 2, True, None),
        (9, 6, 5, 8, 2, False, None),
        (9, 6, 5, 8, 2, True, 1),  # chunks of one step
        (9, 6, 5, 8, 2, False, 4),  # a shorter last chunk
        (23, 4, 6, 16, 2, True, 5),
    ],
)
def test_equals_nn_gru_with_all_gradients(
    steps, batch, inputs, hidden, layers, bias, chunk_steps, dtype
):
    reference, ours = _both(steps, batch, inputs, hidden, layers, bias, dtype, 0, chunk_steps)
    _assert_close(reference, ours, TOLERANCE[dtype])


@settings(max_examples=25, deadline=None)
@given(
    steps=st.integers(1, 12),
    batch=st.integers(1, 5),
    inputs=st.integers(1, 6),
    hidden=st.integers(1, 9),
    layers=st.integers(1, 3),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
    chunk_steps=st.none() | st.integers(1, 5),
)
def test_equals_nn_gru_on_random_shapes(
    steps, batch, inputs, hidden, layers, bias, seed, chunk_steps
):
    reference, ours = _both(
        steps, batch, inputs, hidden, layers, bias, torch.float64, seed, chunk_steps
    )
    _assert_close(reference, ours, TOLERANCE[torch.float64])


@pytest.mark.parametrize("chunk_steps", [None, 2])
def test_gradcheck_of_one_layer(chunk_steps):
    """Finite differences on the Function itself: x, h0, both weights, both
    biases and the per-sequence gates, in one chunk and across chunks."""
    torch.manual_seed(1)
    steps, batch, width, hidden = 5, 3, 2, 2

    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    args = [
        leaf(steps, batch, width),
        leaf(batch, hidden),
        leaf(3 * hidden, width),
        leaf(3 * hidden, hidden),
        leaf(3 * hidden),
        leaf(3 * hidden),
        leaf(batch, 3 * hidden),
    ]
    assert torch.autograd.gradcheck(lambda *a: gru_layer(*a, chunk_steps=chunk_steps), args)
    no_bias = args[:4] + [None, None, args[6]]
    assert torch.autograd.gradcheck(
        lambda x, h, wi, wh, s: gru_layer(x, h, wi, wh, None, None, s, chunk_steps),
        [t for t in no_bias if t is not None],
    )


def test_gradient_of_some_steps_only():
    """An upstream gradient on a few steps (as the encoder's gather gives) and
    an expanded one (as .sum() gives) reach the same gradients as nn.GRU's."""
    torch.manual_seed(2)
    rnn = nn.GRU(3, 5, 2).double()
    x = torch.randn(8, 4, 3, dtype=torch.float64)
    index = torch.tensor([7, 2, 0, 5]).view(1, -1, 1).expand(1, -1, 5)
    for reduce in (lambda out: out.gather(0, index).square().sum(), lambda out: out.sum()):
        want = torch.autograd.grad(reduce(rnn(x)[0]), list(rnn.parameters()))
        got = torch.autograd.grad(reduce(gru(rnn, x)[0]), list(rnn.parameters()))
        for a, b in zip(got, want):
            assert (a - b).abs().max() <= 1e-12


@pytest.mark.parametrize("chunk_steps", [None, 3])
def test_sequence_input_equals_concatenating_it_to_every_step(chunk_steps):
    """gru_layers(x, sequence_input=s) is nn.GRU over [x_t; s] at every step,
    with the same gradients for x, s, h0 and every parameter."""
    torch.manual_seed(5)
    rnn = nn.GRU(4 + 3, 6, 2).double()
    x = torch.randn(7, 5, 4, dtype=torch.float64, requires_grad=True)
    s = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    leaves = [x, s, h0, *rnn.parameters()]
    want, _ = rnn(torch.cat([x, s.expand(7, -1, -1)], -1), h0)
    got = gru_layers(rnn, x, h0, sequence_input=s, chunk_steps=chunk_steps)[-1]
    assert (got - want).abs().max() <= 1e-12
    weights = torch.randn_like(want)
    for a, b in zip(
        torch.autograd.grad((got * weights).sum(), leaves),
        torch.autograd.grad((want * weights).sum(), leaves),
    ):
        assert (a - b).abs().max() <= 1e-12 * max(1.0, b.abs().max().item())


@settings(max_examples=20, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 9), min_size=1, max_size=7),
    extra_steps=st.integers(0, 2),
    layers=st.integers(1, 3),
    bias=st.booleans(),
    chunk_steps=st.none() | st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_final_states_equal_the_packed_nn_gru(
    lengths, extra_steps, layers, bias, chunk_steps, seed
):
    """gru_final_states on padded x is nn.GRU's h_n on the packed sequence, with
    the same gradients for x and every parameter; padding (here NaN) reaches
    neither the states nor the gradients."""
    torch.manual_seed(seed)
    rnn = nn.GRU(3, 4, layers, bias=bias).double()
    lengths = torch.tensor(lengths)
    steps = int(lengths.max()) + extra_steps
    x = torch.randn(steps, len(lengths), 3, dtype=torch.float64)
    padding = torch.arange(steps).unsqueeze(1) >= lengths.unsqueeze(0)
    x = x.masked_fill(padding.unsqueeze(2), float("nan")).requires_grad_()
    leaves = [x, *rnn.parameters()]
    clean = x.masked_fill(padding.unsqueeze(2), 0.0)  # nn.GRU's packing reads no padding either
    _, want = rnn(nn.utils.rnn.pack_padded_sequence(clean, lengths, enforce_sorted=False))
    got = gru_final_states(rnn, x, lengths, chunk_steps)
    assert (got - want).abs().max() <= 1e-12
    weights = torch.randn_like(want)
    g_want = torch.autograd.grad((want * weights).sum(), leaves)
    g_got = torch.autograd.grad((got * weights).sum(), leaves)
    assert torch.equal(g_got[0][padding], torch.zeros_like(g_got[0][padding]))
    for a, b in zip(g_got, g_want):
        assert (a - b).abs().max() <= 1e-12 * max(1.0, b.abs().max().item())


def test_final_states_refusals():
    rnn = nn.GRU(3, 4)
    x = torch.randn(5, 2, 3)
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 5\]"):
        gru_final_states(rnn, x, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 5\]"):
        gru_final_states(rnn, x, torch.tensor([6, 3]))
    with pytest.raises(ValueError, match="integer tensor of shape"):
        gru_final_states(rnn, x, torch.tensor([2.0, 3.0]))
    with pytest.raises(ValueError, match="integer tensor of shape"):
        gru_final_states(rnn, x, torch.tensor([2, 3, 1]))
    with pytest.raises(ValueError, match=r"\(T, B, 3\)"):
        gru_final_states(rnn, x[..., :2], torch.tensor([2, 3]))
    assert gru_final_states(rnn, x[:, :0], torch.tensor([], dtype=torch.long)).shape == (1, 0, 4)


def test_empty_batch_equals_nn_gru():
    rnn = nn.GRU(3, 4, 2)
    x = torch.randn(5, 0, 3, requires_grad=True)
    out, h_n = gru(rnn, x)
    want_out, want_h = rnn(x)
    assert out.shape == want_out.shape and h_n.shape == want_h.shape
    (out.sum() + h_n.sum()).backward()
    assert x.grad.shape == x.shape


def test_no_grad_saves_nothing():
    """Under no_grad nothing is saved for backward and the result has no graph;
    with grad enabled the same call does save (so the count can tell)."""
    rnn = nn.GRU(3, 4, 2)
    x = torch.randn(6, 2, 3)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.no_grad():
            out, h_n = gru(rnn, x, chunk_steps=4)  # reuses one chunk's buffers, then a shorter one
            finals = gru_final_states(rnn, x, torch.tensor([6, 2]), chunk_steps=4)
        assert out.grad_fn is None and h_n.grad_fn is None and finals.grad_fn is None
        assert not saved
        with_grad, _ = gru(rnn, x, chunk_steps=4)
    assert with_grad.grad_fn is not None and saved
    assert torch.equal(out, with_grad.detach())


# torch's forward-AD set-up (make_dual) scripts its decompositions with the
# deprecated torch.jit.script; the warning is torch's own.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_double_backward_and_forward_mode_raise_clear_errors():
    torch.manual_seed(3)
    rnn = nn.GRU(2, 3, 1).double()
    x = torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True)
    out, _ = gru(rnn, x)
    (g,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.sum().backward()
    with fwAD.dual_level():
        dual = fwAD.make_dual(x.detach(), torch.ones_like(x))
        with pytest.raises(RuntimeError, match="jvp"):
            gru(rnn, dual)


def test_refusals_come_before_any_work():
    x = torch.randn(3, 2, 4)
    with pytest.raises(ValueError, match="bidirectional"):
        gru(nn.GRU(4, 5, bidirectional=True), x)
    with pytest.raises(ValueError, match="dropout"):
        gru(nn.GRU(4, 5, 2, dropout=0.5), x)
    with pytest.raises(ValueError, match="time-major"):
        gru(nn.GRU(4, 5, batch_first=True), x)
    with pytest.raises(TypeError, match="nn.GRU"):
        gru(nn.LSTM(4, 5), x)
    rnn = nn.GRU(4, 5, 2)
    with pytest.raises(ValueError, match=r"\(T, B, 4\)"):
        gru(rnn, torch.randn(3, 2, 3))
    with pytest.raises(ValueError, match="no time steps"):
        gru(rnn, torch.randn(0, 2, 4))
    with pytest.raises(ValueError, match="float64"):
        gru(rnn, x.double())
    with pytest.raises(ValueError, match="hx"):
        gru(rnn, x, torch.zeros(1, 2, 5))
    with pytest.raises(ValueError, match="sequence_input"):
        gru_layers(rnn, x, sequence_input=torch.zeros(3, 4))  # no room left for x
    with pytest.raises(ValueError, match=r"\(T, B, 1\)"):
        gru_layers(rnn, x, sequence_input=torch.zeros(2, 3))  # x must have 4 - 3 features
    with pytest.raises(ValueError, match="rows"):
        gru_layers(rnn, x[..., :1], sequence_input=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="chunk_steps"):
        gru(rnn, x, chunk_steps=0)
    with pytest.raises(ValueError, match="weight_hh"):
        gru_layer(x, torch.zeros(2, 5), torch.zeros(15, 4), torch.zeros(15, 4))
    with pytest.raises(ValueError, match="h0"):
        gru_layer(x, torch.zeros(3, 5), torch.zeros(15, 4), torch.zeros(15, 5))
    with pytest.raises(ValueError, match="sequence_gates"):
        gru_layer(x, torch.zeros(2, 5), torch.zeros(15, 4), torch.zeros(15, 5), None, None,
                  torch.zeros(2, 5))  # fmt: skip


def _decoder_reference(model, z, batch):
    """The decoder as nn.GRU over [emb(bos + tokens); z] at every step."""
    tokens = batch.tokens.t()
    bos = torch.full_like(tokens[:1], model.vocabulary.bos)
    emb = model.decoder_embedding(torch.cat([bos, tokens[:-1]], dim=0))
    inputs = torch.cat([emb, z.unsqueeze(0).expand(tokens.shape[0], -1, -1)], dim=-1)
    out, _ = model.decoder_rnn(inputs, model._initial_state(z))
    return model.decoder_to_logits(out)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_model_decoder_equals_nn_gru_on_the_concatenated_input(dtype, tol):
    """decoder_logits (latent gates once per sequence, seqvae.gru) gives nn.GRU's
    logits over [emb; z] and the same gradients for z and every parameter."""
    torch.manual_seed(4)
    strings = ["C", "CCO", "c1ccccc1O", "N#N", "CCCCCCCCCC"]
    vocab = Vocabulary.build(strings)
    config = ModelConfig(embedding_dim=5, hidden_size=8, num_layers=2, latent_dim=3)
    model = SequenceDDVAE(vocab, config).to(dtype)
    batch = encode_strings(strings, vocab)
    z = torch.randn(len(strings), 3, dtype=dtype, requires_grad=True)
    leaves = [z, *model.decoder_modules().parameters()]
    want = _decoder_reference(model, z, batch)
    got = model.decoder_logits(z, batch, batch_first=False)
    assert (got - want).abs().max() <= tol
    weights = torch.randn_like(want)
    g_want = torch.autograd.grad((want * weights).sum(), leaves)
    g_got = torch.autograd.grad((got * weights).sum(), leaves)
    for a, b in zip(g_got, g_want):
        assert (a - b).abs().max() <= tol * max(1.0, b.abs().max().item())


# tanh_in_place's bound against tanh in float64: float32's sigmoid and the
# two roundings of 2 s - 1 are each within an epsilon of 1 (1.2e-7) at most,
# so 2.5e-7 absolute (measured: 1.8e-7 on 4096 x 128 normal draws).
TANH_BOUND = {torch.float32: 2.5e-7, torch.float64: 5e-16}


@settings(max_examples=50, deadline=None)
@given(
    values=st.lists(
        st.floats(allow_nan=False, allow_infinity=True, width=32), min_size=1, max_size=64
    ),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_tanh_in_place_is_tanh_within_its_bound(values, dtype):
    """The GRU's tanh (2 sigmoid(2t) - 1 on CPU) against float64 tanh: within
    TANH_BOUND everywhere, exact at the edges (+-inf -> +-1, 0 -> 0), NaN
    kept, and written into its argument."""
    edges = [0.0, -0.0, 1e-30, -1e-30, 20.0, -20.0, 3e38, -3e38, float("inf"), float("-inf")]
    x = torch.tensor(values + edges, dtype=dtype)
    want = torch.tanh(x.double())
    t = x.clone()
    got = tanh_in_place(t)
    assert got.data_ptr() == t.data_ptr()
    assert (got.double() - want).abs().max().item() <= TANH_BOUND[dtype]
    tail = got[-len(edges) :].tolist()
    assert tail[0] == 0.0 and tail[1] == 0.0
    assert tail[-4:] == [1.0, -1.0, 1.0, -1.0]
    assert torch.isnan(tanh_in_place(torch.tensor([float("nan")], dtype=dtype))).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tanh_in_place_is_aten_tanh_in_half_precision(dtype):
    # With 8 or 11 bits of mantissa the sigmoid form would add its own
    # roundings to tanh's: these dtypes get ATen's tanh, bit for bit.
    x = torch.linspace(-6, 6, 1001).to(dtype)
    got = tanh_in_place(x.clone())
    assert torch.equal(got, torch.tanh(x))
