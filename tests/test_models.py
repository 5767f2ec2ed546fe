"""SequenceDDVAE: encoder/decoder shapes, deterministic decoding with ties,
the training objective against an independent computation, save/load."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import ddvae_fast as ddf
from ddvae_fast.seqvae.data import Vocabulary, encode_strings
from ddvae_fast.seqvae.model import ModelConfig, SequenceDDVAE, unique_rows

STRINGS = ["0110", "1", "", "111111", "010"]


# The models under test are tiny; see one_torch_thread in conftest.py.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(
        embedding_dim=4,
        hidden_size=16,
        num_layers=2,
        latent_dim=2,
        max_length=6,
        backend="reference",
    )
    cfg.update(kw)
    return SequenceDDVAE(Vocabulary.build(["01"], "char"), **cfg)


class _MeanSampler:
    """Stands in for the rejection sampler: z = mu, so a loss can be recomputed."""

    def rsample(self, mu, sigma):
        return mu


@pytest.mark.parametrize(
    "prior,proposal",
    [
        ("uniform", "tricube"),
        ("uniform", "uniform"),
        ("gaussian", "gaussian"),
        ("gaussian", "triweight"),
    ],
)
def test_encode_shapes_and_support(prior, proposal):
    model = _model(prior=prior, proposal=proposal)
    with torch.no_grad():
        # Large encoder outputs push the uniform transform to its edges.
        model.encoder_to_latent.bias.fill_(3.0)
        mu, sigma = model.encode(STRINGS)
    assert mu.shape == sigma.shape == (len(STRINGS), 2)
    assert (sigma > 0).all()
    if prior == "uniform":
        assert ((mu - sigma) >= -1).all() and ((mu + sigma) <= 1).all()
        kl = model.kl(mu, sigma)
        assert torch.isfinite(kl).all()


def test_initial_log_sigma_sets_the_starting_proposal_width():
    model = _model(prior="gaussian", proposal="gaussian", initial_log_sigma=-1.5)
    assert torch.equal(model.encoder_to_latent.bias[2:], torch.full((2,), -1.5))
    with torch.no_grad():
        model.encoder_to_latent.weight.zero_()
        _, sigma = model.encode(STRINGS)
    torch.testing.assert_close(sigma, torch.full_like(sigma, math.exp(-1.5)))


def test_encoder_ignores_padding():
    # A string's code must not depend on what it is batched with (packing).
    model = _model()
    with torch.no_grad():
        mu_alone, sigma_alone = model.encode(["1"])
        mu_batch, sigma_batch = model.encode(["1", "111111"])
    torch.testing.assert_close(mu_alone[0], mu_batch[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sigma_alone[0], sigma_batch[0], rtol=1e-6, atol=1e-6)


@settings(max_examples=15, deadline=None)
@given(
    rows=st.lists(st.sampled_from(["", "0", "1", "01", "110", "010101"]), min_size=2, max_size=24),
    prior=st.sampled_from(["uniform", "gaussian"]),
)
def test_repeated_strings_are_encoded_once_with_the_same_values_and_gradients(rows, prior):
    # encode_batch encodes each distinct row once on CPU and repeats it; the
    # values and the parameter gradients must be those of encoding every row
    # (_encode_rows), up to the float32 rounding of a different row count in
    # the GRU's matrix products and of adding the repeated rows' gradients.
    model = _model(prior=prior, proposal="tricube" if prior == "uniform" else "gaussian")
    batch = encode_strings(rows, model.vocabulary, model.config.max_length)
    weights = torch.linspace(-1.0, 1.0, 2 * len(rows)).view(len(rows), 2)

    def values_and_grads(encode):
        model.zero_grad()
        mu, sigma = encode()
        ((mu * weights).sum() + (sigma.log() * weights.flip(0)).sum()).backward()
        grads = [p.grad.clone() for p in model.encoder_modules().parameters()]
        return mu.detach(), sigma.detach(), grads

    fast = values_and_grads(lambda: model.encode_batch(batch))
    every_row = values_and_grads(lambda: model._encode_rows(batch.tokens, batch.lengths))
    torch.testing.assert_close(fast[0], every_row[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast[1], every_row[1], rtol=1e-6, atol=1e-6)
    for a, b in zip(fast[2], every_row[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    base=st.integers(1, 300),
    n=st.integers(0, 40),
    width=st.integers(1, 12),
    seed=st.integers(0, 2**16),
    repeats=st.integers(1, 4),
)
def test_unique_rows_is_torch_unique_over_rows(base, n, width, seed, repeats):
    # The oracle is torch.unique(dim=0): the same distinct rows in the same
    # order, inverse and counts, whether the rows fit one int64 code (small
    # base and width) or not (base 300, width 8 and more: 66+ bits).
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, base, (n, width), generator=g).repeat(repeats, 1)
    rows = rows[torch.randperm(rows.shape[0], generator=g)]
    got = unique_rows(rows, base)
    want = torch.unique(rows, dim=0, return_inverse=True, return_counts=True)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        assert torch.equal(a, b)


def test_unique_rows_refuses_values_outside_its_base():
    # Out of range, [0, 6] and [1, 0] would share the code 6 in base 6.
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        unique_rows(torch.tensor([[0, 6], [1, 0]]), 6)
    with pytest.raises(ValueError, match="must lie in"):
        unique_rows(torch.tensor([[0, -1]]), 6)


def _set_constant_logits(model, bias):
    with torch.no_grad():
        model.decoder_to_logits.weight.zero_()
        model.decoder_to_logits.bias.copy_(torch.tensor(bias, dtype=torch.float32))


def test_decode_tie_is_invalid():
    model = _model()
    vocab = model.vocabulary
    bias = [0.0] * len(vocab)
    bias[vocab.stoi["0"]] = 2.0
    bias[vocab.stoi["1"]] = 2.0  # two tokens share the maximal logit: undefined
    _set_constant_logits(model, bias)
    z = torch.randn(5, 2)
    logits = model.decoder_to_logits(torch.zeros(1, model.config.hidden_size))
    assert ddf.deterministic_argmax(logits).item() == -1
    assert model.decode(z) == [None] * 5


def test_decode_tie_after_a_valid_prefix_is_invalid():
    # A hand-set one-layer decoder whose hidden unit 0 is on exactly when the
    # previous token is bos: step 1 then picks '1', and step 2 ties '0' with '1'.
    model = _model(num_layers=1)
    vocab = model.vocabulary
    h = model.config.hidden_size
    with torch.no_grad():
        for p in model.decoder_rnn.parameters():
            p.zero_()
        model.latent_to_hidden.weight.zero_()
        model.latent_to_hidden.bias.zero_()
        emb = model.decoder_embedding.weight
        emb.zero_()
        emb[vocab.bos, 0] = 1.0
        # GRU: h' = (1 - u) n + u h. Update gate u = sigmoid(-30) ~ 1e-13 makes
        # h' = n = tanh(10 * x_0): unit 0 is ~1 after bos and 0 after any other token.
        model.decoder_rnn.bias_ih_l0[h : 2 * h] = -30.0
        model.decoder_rnn.weight_ih_l0[2 * h + 0, 0] = 10.0
        model.decoder_to_logits.weight.zero_()
        model.decoder_to_logits.weight[vocab.stoi["1"], 0] = 1.0
        bias = torch.zeros(len(vocab))
        bias[vocab.stoi["0"]] = 1.0
        bias[vocab.stoi["1"]] = 1.0
        model.decoder_to_logits.bias.copy_(bias)
    assert model.decode(torch.zeros(3, 2)) == [None] * 3
    with torch.no_grad():
        model.decoder_to_logits.bias[vocab.eos] = 1.5  # below '1' at step 1, the max at step 2
    assert model.decode(torch.zeros(3, 2)) == ["1"] * 3


def test_decode_special_tokens_and_missing_eos():
    model = _model()
    vocab = model.vocabulary
    for winner, expected in [
        (vocab.eos, ""),
        (vocab.pad, None),
        (vocab.bos, None),
        (vocab.unk, None),
        (vocab.stoi["1"], None),
    ]:
        bias = [0.0] * len(vocab)
        bias[winner] = 1.0
        _set_constant_logits(model, bias)
        # Always '1' never ends: no eos within max_length -> None as well.
        assert model.decode(torch.zeros(2, 2)) == [expected, expected]


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    scale=st.floats(0.1, 20.0),
    decoder_input=st.sampled_from(["z", "atanh"]),
    z_every_step=st.booleans(),
)
def test_greedy_decode_matches_teacher_forced_argmax(seed, scale, decoder_input, z_every_step):
    # Independent check of decode(): feeding a decoded string back with teacher
    # forcing must give a unique arg max equal to each of its tokens and eos.
    model = _model(seed=seed % 7, decoder_input=decoder_input, z_every_step=z_every_step)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(32, 2, generator=g) * scale
    if decoder_input == "atanh":  # codes of the uniform prior, the square's edges included
        z = torch.tanh(z)
        z[:4] = torch.tensor([[1.0, -1.0], [-1.0, 1.0], [1.0, 0.5], [0.0, -1.0]])
    decoded = model.decode(z)
    vocab = model.vocabulary
    for i, s in enumerate(decoded):
        if s is None:
            continue
        batch = encode_strings([s], vocab)
        with torch.no_grad():
            logits = model.decoder_logits(z[i : i + 1], batch)[0]
        assert ddf.deterministic_argmax(logits).tolist() == batch.tokens[0].tolist()


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(0.1, 30.0))
def test_decode_counts_match_decode(seed, scale):
    # decode_counts counts token-id rows; decode builds the strings: the same
    # decoding, so the counts must equal a Counter of decode's outputs, with
    # chunk boundaries anywhere.
    model = _model(seed=seed % 5)
    z = torch.randn(300, 2, generator=torch.Generator().manual_seed(seed)) * scale
    expected = {}
    for s in model.decode(z):
        expected[s] = expected.get(s, 0) + 1
    assert model.decode_counts(z, chunk_size=77) == expected
    assert model.decode_counts(z[:0]) == {}


def test_encode_refuses_a_single_string():
    model = _model()
    with pytest.raises(TypeError, match="list of str"):
        model.encode("0110")
    mu, _ = model.encode(["0110"])
    assert mu.shape == (1, 2)


def test_decode_validates_z():
    model = _model()
    with pytest.raises(ValueError, match="shape"):
        model.decode(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="NaN"):
        model.decode(torch.full((1, 2), float("nan")))
    with pytest.raises(TypeError):
        model.decode(torch.zeros(1, 2, dtype=torch.long))


def _independent_argmax_loss(logits, target, tau):
    # Eq. 13 on logits: sum_{s != t} -log sigma_tau(l_t - l_s), token mean.
    mask = target >= 0
    l = logits[mask].double()
    t = target[mask]
    lt = l.gather(1, t[:, None])
    z = (l - lt) / tau + math.log(1 / tau - 1)
    per = F.softplus(z)
    per = per.masked_fill(F.one_hot(t, l.shape[1]).bool(), 0.0)
    return per.sum() / mask.sum()


@pytest.mark.parametrize("mode", ["argmax", "sample"])
@pytest.mark.parametrize("prior,proposal", [("uniform", "tricube"), ("gaussian", "gaussian")])
def test_loss_terms_match_independent_computation(mode, prior, proposal):
    model = _model(mode=mode, prior=prior, proposal=proposal)
    batch = encode_strings(STRINGS, model.vocabulary)
    tau, beta = 0.05, 0.3
    terms = model.loss_terms(batch, _MeanSampler(), tau=tau, beta=beta, nll_weight=0.25)
    with torch.no_grad():
        mu, sigma = model.encode_batch(batch)
        logits = model.decoder_logits(mu, batch)
    target = model.targets(batch)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), target.reshape(-1))
    kl = ddf.kl_divergence(proposal, mu.double(), sigma.double(), prior=prior).sum(-1).mean()
    if mode == "argmax":
        rec = _independent_argmax_loss(logits, target, tau) + 0.25 * ce
    else:
        rec = ce  # the VAE ignores tau and nll_weight
    # float32 model, float64 check: a few ulps of sums of O(10) terms.
    torch.testing.assert_close(terms.reconstruction.double(), rec, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(terms.kl.double(), kl, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(terms.loss.double(), rec + beta * kl, rtol=1e-5, atol=1e-5)
    terms.loss.backward()
    assert model.encoder_rnn.weight_ih_l0.grad.abs().sum() > 0
    assert model.decoder_rnn.weight_ih_l0.grad.abs().sum() > 0


def test_reconstruction_terms_train_the_decoder_only():
    model = _model()
    batch = encode_strings(STRINGS, model.vocabulary)
    terms = model.reconstruction_terms(batch, _MeanSampler())
    with torch.no_grad():
        mu, _ = model.encode_batch(batch)
        logits = model.decoder_logits(mu, batch)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), model.targets(batch).reshape(-1))
    torch.testing.assert_close(terms.loss, ce, rtol=1e-5, atol=1e-6)
    terms.loss.backward()
    assert all(p.grad is None for p in model.encoder_modules().parameters())
    assert all(p.grad is not None for p in model.decoder_modules().parameters())


def test_save_load_round_trip(tmp_path):
    model = _model(prior="gaussian", proposal="cosine", mode="sample")
    path = tmp_path / "model.pt"
    model.save(path)
    loaded = SequenceDDVAE.load(path)
    assert loaded.config == model.config
    assert loaded.vocabulary == model.vocabulary
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    with torch.no_grad():
        mu_a, sigma_a = model.encode(STRINGS)
        mu_b, sigma_b = loaded.encode(STRINGS)
    assert torch.equal(mu_a, mu_b) and torch.equal(sigma_a, sigma_b)
    z = torch.randn(200, 2) * 3
    assert model.decode(z) == loaded.decode(z)
    assert model.sample(50, seed=1) == loaded.sample(50, seed=1)
    assert not list(tmp_path.glob(".tmp-*"))  # the atomic write cleaned up
    with pytest.raises(ValueError, match="not a saved SequenceDDVAE"):
        torch.save({"x": 1}, tmp_path / "other.pt")
        SequenceDDVAE.load(tmp_path / "other.pt")


def test_sample_from_prior_is_seeded_and_in_support():
    model = _model(prior="uniform")
    z = model.sample_prior(10_000, torch.Generator().manual_seed(0))
    assert z.abs().max() <= 1 and z.min() < -0.99 and z.max() > 0.99
    assert model.sample(20, seed=3) == model.sample(20, seed=3)
    gaussian = _model(prior="gaussian", proposal="gaussian")
    zg = gaussian.sample_prior(20_000, torch.Generator().manual_seed(0))
    assert abs(zg.std().item() - 1) < 0.03 and abs(zg.mean().item()) < 0.03


def test_transform_input_scale_is_the_authors_sigmoid_form():
    # Their encoder output (m, log s) gives left = sigmoid(m - s), right =
    # sigmoid(m + s), mu' = left + right - 1, sigma' = right - left, computed
    # here independently of ddvae_fast's transform.
    model = _model(transform_input_scale=0.5, initial_log_sigma=0.0)
    batch = encode_strings(STRINGS, model.vocabulary)
    with torch.no_grad():
        mu, sigma = model.encode_batch(batch)
        emb = model.encoder_embedding(batch.tokens.t())
        h = model._final_states(emb, batch.lengths).transpose(0, 1).reshape(len(STRINGS), -1)
        m, log_s = model.encoder_to_latent(h).double().chunk(2, dim=-1)
    left, right = torch.sigmoid(m - log_s.exp()), torch.sigmoid(m + log_s.exp())
    torch.testing.assert_close(mu.double(), left + right - 1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sigma.double(), right - left, rtol=1e-5, atol=1e-6)
    for bad in (0.0, -1.0, math.inf, True, "0.5"):
        with pytest.raises((ValueError, TypeError), match="transform_input_scale"):
            ModelConfig(transform_input_scale=bad)
    for bad in (math.nan, -math.inf, True, "0.5", None):
        with pytest.raises((ValueError, TypeError), match="initial_log_sigma"):
            ModelConfig(initial_log_sigma=bad)


def test_atanh_decoder_input_is_the_z_decoder_at_atanh_z():
    # decoder_input = "atanh" must be the same decoder evaluated at atanh(z),
    # computed here in float64 by the "z" model with the same weights; codes on
    # the square's edge (tanh rounds to 1 in float32) read as finite values.
    z_model = _model(seed=3)
    atanh_model = _model(seed=3, decoder_input="atanh")
    atanh_model.load_state_dict(z_model.state_dict())
    batch = encode_strings(STRINGS, z_model.vocabulary)
    g = torch.Generator().manual_seed(0)
    z = torch.tanh(torch.randn(len(STRINGS), 2, generator=g) * 3)
    z[0] = torch.tensor([1.0, -1.0])
    with torch.no_grad():
        got = atanh_model.decoder_logits(z, batch)
        bound = 1 - torch.finfo(torch.float32).eps
        expected = z_model.double().decoder_logits(
            torch.atanh(z.double().clamp(-bound, bound)), batch
        )
    assert torch.isfinite(got).all()
    # float32 against float64 through a 2-layer GRU of width 16: the logits are
    # O(1) and differ by float32 rounding (measured 2.7e-7); leaving out the
    # atanh moves them by up to 3.3 at these codes.
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="decoder_input = 'atanh' needs the uniform prior"):
        _model(prior="gaussian", proposal="gaussian", decoder_input="atanh")
    with pytest.raises(ValueError, match="decoder_input must be one of"):
        _model(decoder_input="tanh")


@pytest.mark.parametrize("z_every_step", [True, False])
def test_decoder_logits_equal_nn_gru_over_the_concatenated_or_bare_input(z_every_step):
    """Teacher-forced logits against nn.GRU called as the authors' model calls
    it (z only in the initial state) or over [emb; z] at every step, in float64
    (a few roundings of the GRU cell: 1e-12)."""
    model = _model(seed=5, z_every_step=z_every_step).double()
    batch = encode_strings(STRINGS, model.vocabulary)
    z = torch.rand(len(STRINGS), 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    z = z * 2 - 1
    tokens = batch.tokens.t()
    inputs = model.decoder_embedding(
        torch.cat([torch.full_like(tokens[:1], model.vocabulary.bos), tokens[:-1]])
    )
    assert model.decoder_rnn.input_size == inputs.shape[-1] + (2 if z_every_step else 0)
    if z_every_step:
        inputs = torch.cat([inputs, z.expand(tokens.shape[0], -1, -1)], dim=-1)
    h0 = model.latent_to_hidden(z).view(len(STRINGS), 2, -1).transpose(0, 1).contiguous()
    out, _ = model.decoder_rnn(inputs, h0)
    want = model.decoder_to_logits(out).transpose(0, 1)
    torch.testing.assert_close(model.decoder_logits(z, batch), want, rtol=0, atol=1e-12)


def test_config_errors():
    with pytest.raises(ValueError, match="z_every_step must be true or false"):
        _model(z_every_step=0)
    with pytest.raises(ValueError, match="bounded proposal"):
        _model(prior="uniform", proposal="gaussian")
    with pytest.raises(ValueError, match="mode"):
        _model(mode="greedy")
    with pytest.raises(ValueError, match="proposal"):
        _model(proposal="boxcar")
    with pytest.raises(ValueError, match="hidden_size"):
        _model(hidden_size=0)
    with pytest.raises(ValueError, match=r"unknown settings .* in \[model\]"):
        ModelConfig.from_dict({"hidden": 3})
    with pytest.raises(TypeError):
        SequenceDDVAE(["0", "1"])


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float64, 1e-13)])
def test_encoder_final_states_equal_the_packed_gru(dtype, tol):
    """The unpacked encoder (each layer over the padded batch, gathered at each
    sequence's last token) gives the packed GRU's h_n and gradients; tolerances
    are a few roundings of the GRU cell in each dtype."""
    from torch import nn

    torch.manual_seed(0)
    strings = ["C", "CCO", "c1ccccc1O", "CC(=O)OC1=CC=CC=C1C(=O)O", "N#N", "CCCCCCCCCC"]
    vocab = Vocabulary.build(strings)
    config = ModelConfig(embedding_dim=8, hidden_size=16, num_layers=3, latent_dim=3)
    model = SequenceDDVAE(vocab, config).to(dtype)
    batch = encode_strings(strings, vocab)
    emb = model.encoder_embedding(batch.tokens)
    packed = nn.utils.rnn.pack_padded_sequence(
        emb, batch.lengths, batch_first=True, enforce_sorted=False
    )
    _, want = model.encoder_rnn(packed)
    got = model._final_states(emb.transpose(0, 1), batch.lengths)  # it reads (T, B, E)
    assert (got - want).abs().max() <= tol
    (g_want,) = torch.autograd.grad(want.square().sum(), model.encoder_rnn.weight_hh_l0)
    (g_got,) = torch.autograd.grad(got.square().sum(), model.encoder_rnn.weight_hh_l0)
    assert (g_got - g_want).abs().max() <= 10 * tol * max(1.0, g_want.abs().max().item())
