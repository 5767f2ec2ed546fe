"""The DD-VAE sequence model: a GRU encoder and a GRU decoder (Section 4.1).

The encoder reads ``tokens + eos`` (packed, so padding never reaches the GRU
state) and maps the final hidden states of all layers to the proposal's
location mu and log-scale log sigma. With a uniform prior, (mu, sigma) go
through Eq. 9-10 so that the proposal's support lies inside [-1, 1]^d.

The decoder is conditioned on z through the initial hidden state of every
layer (a linear map of z) and, by default, also reads z beside the token
embedding at every step (ModelConfig.z_every_step; the authors' model has
the initial states only). It reads ``bos + tokens`` and predicts
``tokens + eos``; being causal, positions past a string's end do not affect
the positions before it, so padded targets are simply ignored by the loss.

mode='argmax' trains the deterministic decoder with the relaxed arg-max loss
(Eq. 13); mode='sample' is the standard VAE with a cross-entropy decoder.
Decoding is always greedy and deterministic (Eq. 3): a tie for the maximal
logit is the undefined token and makes the string invalid (None).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from .._checks import check_finite_real
from ..decoding import UNDEFINED_TOKEN, deterministic_argmax
from ..distributions import KERNELS, PRIORS, PROPOSALS, kl_divergence, uniform_prior_transform
from ..loss import decoder_loss
from .data import SPECIAL_TOKENS, SequenceBatch, Vocabulary, encode_strings
from .gru import gru_final_states, gru_layers, tanh_in_place
from .io import atomic_torch_save, check_known_keys, check_torch_file

MODES = ("argmax", "sample")
DECODER_INPUTS = ("z", "atanh")
_FORMAT = "ddvae_fast.SequenceDDVAE/1"


@dataclass(frozen=True)
class ModelConfig:
    embedding_dim: int = 8
    hidden_size: int = 128
    num_layers: int = 2
    latent_dim: int = 2
    prior: str = "uniform"
    proposal: str = "tricube"
    mode: str = "argmax"
    max_length: int = 100  # tokens per string, eos not counted
    # Initial bias of the encoder's log-sigma outputs. log(1/2) starts every
    # proposal at the width the authors' sigmoid form of Eq. 9-10 has at
    # initialisation (it halves the encoder's outputs); with log sigma ~ 0 the
    # uniform-prior proposals start overlapping over ~3/4 of the square and a
    # short run often fails to separate them.
    initial_log_sigma: float = -0.6931471805599453
    # Uniform prior: the encoder's (mu, sigma) are multiplied by this before the
    # transform of Eq. 9-10. 0.5 is the authors' sigmoid form exactly (with
    # initial_log_sigma = 0 for the same starting widths); the optimum is the
    # same, but Adam's step per parameter is not, so mu moves half as fast.
    transform_input_scale: float = 1.0
    # What the decoder reads of z: "z" itself (the authors' model), or, under the
    # uniform prior, "atanh" of it: the coordinates before the tanh of Eq. 9-10,
    # in which the boxes squeezed into the square's edges are wide again.
    decoder_input: str = "z"
    # Whether the decoder's first GRU layer reads z at every step beside the
    # token embedding (True), or z only sets the initial hidden states (False:
    # the authors' model, the configs of Figure 5's panels).
    z_every_step: bool = True
    score: str = "logit"  # what the relaxed arg max compares: 'logit' or 'prob'
    backend: str = "auto"  # backend of the decoder loss

    def __post_init__(self):
        for name in ("embedding_dim", "hidden_size", "num_layers", "latent_dim", "max_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.prior not in PRIORS:
            raise ValueError(f"prior must be one of {PRIORS}, got {self.prior!r}")
        if self.proposal not in PROPOSALS:
            raise ValueError(f"proposal must be one of {PROPOSALS}, got {self.proposal!r}")
        if self.prior == "uniform" and self.proposal not in KERNELS:
            raise ValueError(
                f"a uniform prior needs a bounded proposal (one of {KERNELS}); "
                f"{self.proposal!r} has unbounded support"
            )
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        check_finite_real(self.initial_log_sigma, "initial_log_sigma")
        if not check_finite_real(self.transform_input_scale, "transform_input_scale") > 0:
            raise ValueError(
                f"transform_input_scale must be a number > 0, got {self.transform_input_scale!r}"
            )
        if self.decoder_input not in DECODER_INPUTS:
            raise ValueError(
                f"decoder_input must be one of {DECODER_INPUTS}, got {self.decoder_input!r}"
            )
        if self.decoder_input == "atanh" and self.prior != "uniform":
            raise ValueError(
                "decoder_input = 'atanh' needs the uniform prior (z in [-1, 1]); "
                f"the prior is {self.prior!r}"
            )
        if not isinstance(self.z_every_step, bool):
            raise ValueError(f"z_every_step must be true or false, got {self.z_every_step!r}")
        if self.score not in ("logit", "prob"):
            raise ValueError(f"score must be 'logit' or 'prob', got {self.score!r}")
        if not isinstance(self.backend, str):
            raise ValueError(f"backend must be a str, got {self.backend!r}")

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        check_known_keys(values, cls, "[model]")
        return cls(**values)


def unique_rows(rows: torch.Tensor, base: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.unique(rows, dim=0, return_inverse=True, return_counts=True)``
    for a 2-D integer tensor whose values lie in [0, base): the distinct rows
    in the same (lexicographic) order, the inverse and the counts.

    When a row fits one int64 in base ``base`` it is unique'd as that code:
    unique(dim=0) compares rows one pair at a time (a select and an equal
    per row), about 3x slower on a default-run batch's 512 x 7 tokens
    (benchmarks/results/synthetic_step.json). The first column is the most
    significant digit, so codes sort as the rows do.
    """
    if rows.numel():
        low, high = (int(v) for v in torch.aminmax(rows))  # one pass for both
        if low < 0 or high >= base:  # out of range, two different rows could share a code
            raise ValueError(f"row values must lie in [0, {base}), got {low}..{high}")
    width = rows.shape[1]
    if width == 0 or width * math.log2(max(base, 2)) >= 62:
        return torch.unique(rows, dim=0, return_inverse=True, return_counts=True)
    weights = base ** torch.arange(width - 1, -1, -1, device=rows.device)
    codes, inverse, counts = torch.unique(
        (rows * weights).sum(1), return_inverse=True, return_counts=True
    )
    distinct = codes.unsqueeze(1) // weights % base
    return distinct.to(rows.dtype), inverse, counts


class LossTerms(NamedTuple):
    """One training step's objective and statistics (all but ``loss`` detached)."""

    loss: torch.Tensor
    reconstruction: torch.Tensor  # the weighted decoder loss, token mean
    kl: torch.Tensor  # KL(q(z|x) || p(z)), summed over latent dims, batch mean
    token_accuracy: torch.Tensor
    sequence_accuracy: torch.Tensor


class SequenceDDVAE(nn.Module):
    def __init__(self, vocabulary: Vocabulary, config: ModelConfig | None = None, **overrides):
        super().__init__()
        if not isinstance(vocabulary, Vocabulary):
            raise TypeError(f"vocabulary must be a Vocabulary, got {type(vocabulary).__name__}")
        if config is None:
            config = ModelConfig(**overrides)
        elif overrides:
            config = ModelConfig(**{**asdict(config), **overrides})
        self.config = config
        self.vocabulary = vocabulary
        c = config
        v = len(vocabulary)
        self.encoder_embedding = nn.Embedding(v, c.embedding_dim, padding_idx=vocabulary.pad)
        # Both GRUs run time-major, (T, B, features): nn.GRU on CPU transposes a
        # batch-first input and output around its time loop, forward and backward
        # (benchmarks/bench_train_step.py). Parameters do not depend on the layout.
        self.encoder_rnn = nn.GRU(c.embedding_dim, c.hidden_size, c.num_layers)
        self.encoder_to_latent = nn.Linear(c.num_layers * c.hidden_size, 2 * c.latent_dim)
        with torch.no_grad():
            self.encoder_to_latent.bias[c.latent_dim :].fill_(c.initial_log_sigma)
        self.latent_to_hidden = nn.Linear(c.latent_dim, c.num_layers * c.hidden_size)
        self.decoder_embedding = nn.Embedding(v, c.embedding_dim, padding_idx=vocabulary.pad)
        z_inputs = c.latent_dim if c.z_every_step else 0
        self.decoder_rnn = nn.GRU(c.embedding_dim + z_inputs, c.hidden_size, c.num_layers)
        self.decoder_to_logits = nn.Linear(c.hidden_size, v)

    # -- parameter groups (the fine-tuning stage trains the decoder only) ----

    def encoder_modules(self) -> nn.ModuleList:
        return nn.ModuleList([self.encoder_embedding, self.encoder_rnn, self.encoder_to_latent])

    def decoder_modules(self) -> nn.ModuleList:
        return nn.ModuleList(
            [
                self.latent_to_hidden,
                self.decoder_embedding,
                self.decoder_rnn,
                self.decoder_to_logits,
            ]
        )

    @property
    def device(self) -> torch.device:
        return self.decoder_to_logits.weight.device

    # -- encoder -------------------------------------------------------------

    def encode_batch(self, batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, sigma) of q(z|x) for a batch, after the prior's transform.

        On CPU a string that occurs several times in the batch is encoded once
        and its (mu, sigma) repeated: the same values, and the repeated rows'
        gradients add up in the index's backward. The synthetic data has 64
        distinct strings, so a batch of 512 runs the encoder on at most 64 rows.
        Elsewhere the batch is encoded as is: finding the distinct rows would
        need the device to report their number to the host at every step."""
        if batch.tokens.device.type == "cpu" and batch.tokens.shape[0] > 1:
            distinct, inverse, _ = unique_rows(batch.tokens, len(self.vocabulary))
            if distinct.shape[0] < batch.tokens.shape[0]:
                # Equal rows (padding included) have equal lengths: any one will do.
                first = inverse.new_empty(distinct.shape[0])
                first.scatter_(0, inverse, torch.arange(inverse.shape[0]))
                mu, sigma = self._encode_rows(distinct, batch.lengths[first])
                return mu[inverse], sigma[inverse]
        return self._encode_rows(batch.tokens, batch.lengths)

    def _encode_rows(
        self, tokens: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.encoder_embedding(tokens.t())  # (T, B, E)
        if (
            emb.device.type != "cpu"
            and tokens.shape[0]
            and bool((lengths == tokens.shape[1]).all())
        ):
            _, h = self.encoder_rnn(emb)  # no padding: skip the packing overhead
        else:
            h = self._final_states(emb, lengths)
        h = h.transpose(0, 1).reshape(tokens.shape[0], -1)
        mu, log_sigma = self.encoder_to_latent(h).chunk(2, dim=-1)
        sigma = log_sigma.exp()
        if self.config.prior == "uniform":
            scale = self.config.transform_input_scale
            if scale != 1.0:
                mu, sigma = mu * scale, sigma * scale
            mu, sigma = uniform_prior_transform(mu, sigma)
        return mu, sigma

    def _final_states(self, emb: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Each encoder layer's state at each sequence's last token, as nn.GRU's h_n,
        from time-major embeddings ``emb`` (T, B, E). The layers run on the
        module's own weights, so checkpoints are unchanged.

        On CPU, seqvae.gru runs them packed: step t holds only the sequences
        longer than t, so padding costs nothing, in fewer and larger ops than
        nn.GRU's (benchmarks/bench_train_step.py). Elsewhere each layer runs as
        nn.GRU over the padded batch and the state at position length - 1 is
        gathered: padding follows the tokens, so the states at valid positions
        do not depend on it, and this avoids the packed nn.GRU's per-step batches.
        """
        rnn = self.encoder_rnn
        if emb.device.type == "cpu":
            return gru_final_states(rnn, emb, lengths)
        weights = rnn._flat_weights
        per_layer = len(weights) // rnn.num_layers
        index = (lengths - 1).clamp(min=0).view(1, -1, 1).expand(1, -1, rnn.hidden_size)
        out, finals = emb, []
        for layer in range(rnn.num_layers):
            hx = emb.new_zeros(1, emb.shape[1], rnn.hidden_size)
            params = weights[layer * per_layer : (layer + 1) * per_layer]
            # The call nn.GRU.forward makes, one layer at a time (dropout is 0 here).
            out, _ = torch._VF.gru(out, hx, params, rnn.bias, 1, 0.0, self.training, False, False)
            finals.append(out.gather(0, index).squeeze(0))
        return torch.stack(finals)

    def encode(self, strings: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, sigma), each (len(strings), latent_dim), of q(z|x) for each string."""
        if isinstance(strings, (str, bytes)):
            # A str is a sequence of one-character strings: refuse rather than
            # silently encode each character as its own string.
            raise TypeError(
                f"strings must be a list of str, got a single {type(strings).__name__} "
                f"{strings[:60]!r}; pass [{strings[:60]!r}] to encode one string"
            )
        batch = encode_strings(strings, self.vocabulary, self.config.max_length)
        return self.encode_batch(batch.to(self.device))

    # -- decoder -------------------------------------------------------------

    def _decoder_latent(self, z: torch.Tensor) -> torch.Tensor:
        """What the decoder reads of z (ModelConfig.decoder_input)."""
        if self.config.decoder_input == "z":
            return z
        # Clamped inside (-1, 1) so that a code on the square's edge (tanh rounds
        # to 1 in float32 from about 9) reads as a large finite value.
        bound = 1.0 - torch.finfo(z.dtype).eps
        return torch.atanh(z.clamp(-bound, bound))

    def _initial_state(self, z: torch.Tensor) -> torch.Tensor:
        c = self.config
        h = self.latent_to_hidden(z).view(z.shape[0], c.num_layers, c.hidden_size)
        return h.transpose(0, 1).contiguous()

    def decoder_logits(
        self, z: torch.Tensor, batch: SequenceBatch, batch_first: bool = True
    ) -> torch.Tensor:
        """Teacher-forced logits: position i predicts batch.tokens[:, i].

        The model computes them time-major, (T, B, V) and contiguous, which is
        what ``batch_first=False`` returns (pass it on to ``decoder_loss`` with
        the targets transposed); the default is a (B, T, V) view of them."""
        z = self._decoder_latent(z)
        tokens = batch.tokens.t()
        bos = torch.full_like(tokens[:1], self.vocabulary.bos)
        emb = self.decoder_embedding(torch.cat([bos, tokens[:-1]], dim=0))
        rnn, h0 = self.decoder_rnn, self._initial_state(z)
        every_step = z if self.config.z_every_step else None
        if z.device.type == "cpu":
            # seqvae.gru's layers (fewer, larger ops than nn.GRU's on CPU). z is
            # the same at every step: its part of the first layer's input gates
            # is computed once per sequence instead of concatenating z to each step.
            out = gru_layers(rnn, emb, h0, sequence_input=every_step)[-1]
        else:
            if every_step is not None:
                emb = torch.cat([emb, z.unsqueeze(0).expand(tokens.shape[0], -1, -1)], dim=-1)
            out, _ = rnn(emb, h0)
        logits = self.decoder_to_logits(out)
        return logits.transpose(0, 1) if batch_first else logits

    def targets(self, batch: SequenceBatch, ignore_index: int = -100) -> torch.Tensor:
        return batch.tokens.masked_fill(batch.tokens == self.vocabulary.pad, ignore_index)

    def _check_z(self, z) -> torch.Tensor:
        if not isinstance(z, torch.Tensor) or not z.is_floating_point():
            raise TypeError("z must be a floating-point tensor")
        if z.dim() != 2 or z.shape[1] != self.config.latent_dim:
            raise ValueError(
                f"z must have shape (n, {self.config.latent_dim}), got {tuple(z.shape)}"
            )
        if not torch.isfinite(z).all():
            raise ValueError("z contains NaN or infinity")
        return z.to(self.device, self.decoder_to_logits.weight.dtype)

    @torch.no_grad()
    def decode(
        self, z: torch.Tensor, max_length: int | None = None, chunk_size: int = 4096
    ) -> list[str | None]:
        """Greedy deterministic decoding of each row of ``z`` (Eq. 3).

        A string ends at eos. It is invalid (None) if some step's maximal logit
        is not unique (the undefined token), if a step picks a special token
        other than eos, or if no eos comes within ``max_length`` tokens.
        """
        z = self._check_z(z)
        max_length = self.config.max_length if max_length is None else max_length
        out: list[str | None] = []
        itos = self.vocabulary.itos
        for start in range(0, z.shape[0], chunk_size):
            ids, valid = self._decode_chunk(z[start : start + chunk_size], max_length)
            out.extend(
                "".join(itos[i] for i in row if i >= 0) if ok else None
                for row, ok in zip(ids.cpu().tolist(), valid.cpu().tolist())
            )
        return out

    @torch.no_grad()
    def decode_counts(
        self, z: torch.Tensor, max_length: int | None = None, chunk_size: int = 4096
    ) -> dict[str | None, int]:
        """How often each output of :meth:`decode` occurs among the rows of ``z``.

        The same decoding, counted on token-id rows (torch.unique per chunk), so
        that a million codes never become a million Python strings.
        """
        z = self._check_z(z)
        max_length = self.config.max_length if max_length is None else max_length
        itos = self.vocabulary.itos
        counts: dict[str | None, int] = {}
        for start in range(0, z.shape[0], chunk_size):
            ids, valid = self._decode_chunk(z[start : start + chunk_size], max_length)
            ids = torch.where(valid.unsqueeze(1), ids, torch.full_like(ids, -2))
            # ids -2 (invalid), -1 (ended), 0.. shifted to 0..
            distinct, _, n = unique_rows(ids + 2, len(itos) + 2)
            for row, c in zip((distinct - 2).cpu().tolist(), n.cpu().tolist()):
                key = None if row[0] == -2 else "".join(itos[i] for i in row if i >= 0)
                counts[key] = counts.get(key, 0) + c
        return counts

    def _decode_chunk(self, z: torch.Tensor, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (n, steps) with -1 after the end, valid (n,)) of the greedy decoding of z."""
        vocab = self.vocabulary
        n = z.shape[0]
        z = self._decoder_latent(z)
        h = list(self._initial_state(z).unbind(0))
        token = torch.full((n,), vocab.bos, dtype=torch.long, device=z.device)
        steps = []
        finished = torch.zeros(n, dtype=torch.bool, device=z.device)
        valid = torch.ones(n, dtype=torch.bool, device=z.device)
        n_special = len(SPECIAL_TOKENS)  # ids 0..3: pad, bos, eos, unk
        token_gates, latent_gates = self._first_layer_input_gates(z)
        for _ in range(max_length + 1):
            gates_in = token_gates.index_select(0, token)
            if latent_gates is not None:
                gates_in += latent_gates
            x = self._greedy_step(gates_in, h)
            index = deterministic_argmax(self.decoder_to_logits(x))
            is_eos = index == vocab.eos
            bad = (index == UNDEFINED_TOKEN) | ((index < n_special) & ~is_eos)
            valid &= finished | ~bad
            finished |= is_eos | bad
            steps.append(torch.where(finished, torch.full_like(index, -1), index))
            if bool(finished.all()):
                break
            token = index.clamp(min=0)
        valid &= finished  # no eos within max_length tokens
        return torch.stack(steps, dim=1), valid

    def _first_layer_input_gates(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The decoder's first-layer input gates W_ih [emb(token); z] + b_ih in two
        parts: a (V, 3H) table over tokens and the (n, 3H) latent part, which is
        the same at every step (None when the decoder does not read z at every
        step). Greedy decoding adds one row of each per step instead of a matrix
        product over the concatenated input."""
        rnn, e = self.decoder_rnn, self.decoder_embedding.embedding_dim
        w = rnn.weight_ih_l0
        table = F.linear(self.decoder_embedding.weight, w[:, :e], rnn.bias_ih_l0)
        return table, F.linear(z, w[:, e:]) if self.config.z_every_step else None

    def _greedy_step(self, gates_in: torch.Tensor, h: list[torch.Tensor]) -> torch.Tensor:
        """One step of the decoder GRU (nn.GRU's equations, updating ``h`` in
        place per layer) from the first layer's input gates; returns the top
        layer's output. Written out because nn.GRU called on one step at a
        time spends about a third of greedy decoding in copies and launches."""
        rnn, hidden = self.decoder_rnn, self.decoder_rnn.hidden_size
        for layer in range(rnn.num_layers):
            if layer:
                gates_in = F.linear(
                    h[layer - 1],
                    getattr(rnn, f"weight_ih_l{layer}"),
                    getattr(rnn, f"bias_ih_l{layer}"),
                )
            gates_h = F.linear(
                h[layer], getattr(rnn, f"weight_hh_l{layer}"), getattr(rnn, f"bias_hh_l{layer}")
            )
            reset_update = torch.sigmoid_(gates_in[:, : 2 * hidden] + gates_h[:, : 2 * hidden])
            reset, update = reset_update.chunk(2, dim=1)
            new = tanh_in_place(
                torch.addcmul(gates_in[:, 2 * hidden :], reset, gates_h[:, 2 * hidden :])
            )
            h[layer] = torch.lerp(new, h[layer], update)  # (1 - u) n + u h
        return h[-1]

    # -- prior ---------------------------------------------------------------

    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n latent codes from p(z): N(0, I) or U[-1, 1]^d."""
        shape = (n, self.config.latent_dim)
        if self.config.prior == "gaussian":
            z = torch.randn(shape, generator=generator)
        else:
            z = torch.rand(shape, generator=generator) * 2 - 1
        return z.to(self.device)

    def sample(self, n: int, seed: int | None = None) -> list[str | None]:
        """Decode n latent codes drawn from the prior (seeded if ``seed`` is given)."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        return self.decode(self.sample_prior(n, generator))

    # -- objective -----------------------------------------------------------

    def kl(self, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """KL(q(z|x) || p(z)) per row (summed over latent dims, Eq. 8)."""
        return kl_divergence(self.config.proposal, mu, sigma, prior=self.config.prior).sum(-1)

    def loss_terms(
        self,
        batch: SequenceBatch,
        sampler,
        *,
        tau: float,
        beta: float,
        nll_weight: float = 0.0,
    ) -> LossTerms:
        """-ELBO estimate with one z ~ q(z|x) per string (Eq. 13 or Eq. 2).

        mode='argmax': relaxed arg-max loss at temperature tau, plus
        ``nll_weight`` times the cross-entropy (the pretraining blend).
        mode='sample': cross-entropy only (tau unused).
        """
        mu, sigma = self.encode_batch(batch)
        z = sampler.rsample(mu, sigma)
        logits = self.decoder_logits(z, batch, batch_first=False)
        if self.config.mode == "argmax":
            weights = {"argmax_weight": 1.0, "nll_weight": float(nll_weight)}
        else:
            weights = {"argmax_weight": 0.0, "nll_weight": 1.0}
        rec = decoder_loss(
            logits,
            self.targets(batch).t(),
            tau,
            score=self.config.score,
            backend=self.config.backend,
            batch_first=False,
            **weights,
        )
        kl = self.kl(mu, sigma).mean()
        loss = rec.loss + beta * kl if beta else rec.loss
        return LossTerms(
            loss, rec.loss.detach(), kl.detach(), rec.token_accuracy, rec.sequence_accuracy
        )

    def reconstruction_terms(self, batch: SequenceBatch, sampler) -> LossTerms:
        """Eq. 24 with the encoder fixed: cross-entropy of x at z ~ q(z|x).

        The encoder runs without autograd, so only decoder parameters get
        gradients: the fine-tuning stage of Section 2.3 (Eq. 21).
        """
        with torch.no_grad():
            mu, sigma = self.encode_batch(batch)
            z = sampler.rsample(mu, sigma)
        logits = self.decoder_logits(z, batch, batch_first=False)
        rec = decoder_loss(
            logits,
            self.targets(batch).t(),
            0.5,
            argmax_weight=0.0,
            nll_weight=1.0,
            score=self.config.score,
            backend=self.config.backend,
            batch_first=False,
        )
        zero = rec.loss.new_zeros(())
        return LossTerms(
            rec.loss, rec.loss.detach(), zero, rec.token_accuracy, rec.sequence_accuracy
        )

    # -- persistence ---------------------------------------------------------

    def to_state(self) -> dict:
        return {
            "format": _FORMAT,
            "config": asdict(self.config),
            "vocabulary": self.vocabulary.to_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
        }

    @classmethod
    def from_state(cls, state: dict, map_location="cpu") -> SequenceDDVAE:
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError(f"not a saved SequenceDDVAE (expected format {_FORMAT!r})")
        model = cls(
            Vocabulary.from_dict(state["vocabulary"]), ModelConfig.from_dict(state["config"])
        )
        model.load_state_dict(state["state_dict"])
        return model.to(map_location)

    def save(self, path) -> None:
        """Write weights, config and vocabulary to ``path`` (atomically)."""
        atomic_torch_save(self.to_state(), path)

    @classmethod
    def load(cls, path, map_location="cpu") -> SequenceDDVAE:
        """A model saved by :meth:`save`, or the model inside a training checkpoint."""
        damage = check_torch_file(path)
        if damage is not None:
            raise ValueError(f"{str(path)!r} is corrupt: {damage}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "model" in state and state.get("format") != _FORMAT:
            state = state["model"]
        return cls.from_state(state, map_location)
