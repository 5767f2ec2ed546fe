"""End-to-end DD-VAE training throughput on MOSES SMILES: the library against a baseline.

    .venv/bin/python benchmarks/bench_train_step.py [--hidden 128] [--steps 6] [--threads 2]

The model is the paper's MOSES configuration (2-layer GRU, embedding 64,
latent 64, batch 512, triweight proposal, Gaussian prior, arg-max mode) with
a reduced hidden size (default 128, not the paper's 512: a 512 step takes
about 11 s on this 2-core box), trained on real MOSES SMILES.

- baseline: a plain-PyTorch step written the way the authors' public code
  works, from the paper and the facts in issue 13: time-major GRUs, padding to
  the batch maximum, the relaxed loss computed eagerly on log-softmax scores,
  a host-side NumPy rejection sampler with a buffer and a copy to the device,
  and `.item()` reads of the statistics every step.
- library: ``SequenceDDVAE`` stages with ``decoder_loss`` (fused cpp loss and
  statistics) and ``RejectionSampler`` (cpp), statistics kept on the device.
- library+buckets: the same, with ``TrainConfig.bucket_batches``'s
  length-bucketed epoch order (less padding), one lever issue 13 asks to
  measure.

Each variant runs interleaved with the others; per-stage times are medians
over the timed steps. Writes benchmarks/results/train_step.json; with
--epochs N also benchmarks/results/train_step_curves.json, the accuracy of
each variant after each of N epochs (fresh models, same molecules).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ddvae_fast.loss import decoder_loss
from ddvae_fast.sampling import RejectionSampler
from ddvae_fast.seqvae.data import Vocabulary, batch_order, encode_strings
from ddvae_fast.seqvae.model import ModelConfig, SequenceDDVAE
from ddvae_fast.seqvae.moses_data import load_split

STAGES = ("data", "encoder", "sampler", "decoder", "loss", "backward", "optimizer")
TAU, BETA = 0.1, 0.01


class _Clock:
    def __init__(self):
        self.times = dict.fromkeys(STAGES, 0.0)
        self.last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.times[stage] += now - self.last
        self.last = now


# ----------------------------------------------------------------- the baseline
class _NumpyRejectionSampler:
    """Host-side rejection sampler of the triweight kernel with a NumPy buffer."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.buffer = np.empty(0)
        self.k0 = 35 / 32

    def sample(self, n: int) -> np.ndarray:
        while self.buffer.size < n:
            m = int((n - self.buffer.size) * 2 * self.k0 * 1.1) + 64
            u = self.rng.uniform(-1, 1, m)
            v = self.rng.uniform(0, 1, m)
            keep = u[35 / 32 * (1 - u**2) ** 3 > self.k0 * v]
            self.buffer = np.concatenate([self.buffer, keep])
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out


class _BaselineVAE(nn.Module):
    def __init__(self, vocab_size: int, pad: int, hidden: int, emb: int = 64, latent: int = 64):
        super().__init__()
        self.pad = pad
        self.embedding = nn.Embedding(vocab_size, emb, padding_idx=pad)
        self.encoder = nn.GRU(emb, hidden, 2)  # time-major
        self.to_latent = nn.Linear(2 * hidden, 2 * latent)
        self.to_hidden = nn.Linear(latent, 2 * hidden)
        self.decoder = nn.GRU(emb + latent, hidden, 2)
        self.to_logits = nn.Linear(hidden, vocab_size)
        self.hidden = hidden


def _baseline_step(model, opt, sampler, tokens_tm, bos: int, clock: _Clock) -> float:
    """One step; tokens_tm is (L, B) time-major, padded to the batch maximum."""
    length, batch = tokens_tm.shape
    clock.lap("data")
    _, h = model.encoder(model.embedding(tokens_tm))
    mu, log_sigma = model.to_latent(h.transpose(0, 1).reshape(batch, -1)).chunk(2, -1)
    sigma = log_sigma.exp()
    clock.lap("encoder")
    eps = torch.from_numpy(sampler.sample(mu.numel()).reshape(mu.shape)).float()
    z = mu + sigma * eps
    clock.lap("sampler")
    inputs = torch.cat([torch.full_like(tokens_tm[:1], bos), tokens_tm[:-1]], 0)
    emb = torch.cat([model.embedding(inputs), z.unsqueeze(0).expand(length, -1, -1)], -1)
    h0 = model.to_hidden(z).view(batch, 2, model.hidden).transpose(0, 1).contiguous()
    out, _ = model.decoder(emb, h0)
    logits = model.to_logits(out)
    clock.lap("decoder")
    # The relaxed arg-max loss on log-softmax scores, eagerly, with the masks and
    # statistics read back to the host every step.
    scores = F.log_softmax(logits, -1)
    target = tokens_tm
    mask = target != model.pad
    score_t = scores.gather(-1, target.unsqueeze(-1))
    c = np.log(1 / TAU - 1)
    pair = -F.logsigmoid((score_t - scores) / TAU - c)
    others = torch.ones_like(pair).scatter_(-1, target.unsqueeze(-1), 0.0)
    rows = (pair * others).sum(-1)
    rec = (rows * mask).sum() / mask.sum()
    kl = (0.5 * (mu**2 + sigma**2 * (1 / 9)) - torch.log(sigma) - 0.5).sum(-1).mean()
    loss = rec + BETA * kl
    correct = scores.argmax(-1) == target
    accuracy = (correct | ~mask).all(0).float().mean().item()
    token_accuracy = (correct & mask).sum() / mask.sum()  # for the curves; no host read
    clock.lap("loss")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    clock.lap("backward")
    for p in model.parameters():
        p.grad.clamp_(-10, 10)
    opt.step()
    clock.lap("optimizer")
    return token_accuracy, accuracy


# ----------------------------------------------------------------- the library
def _library_step(model, opt, sampler, batch, clock: _Clock) -> torch.Tensor:
    clock.lap("data")
    mu, sigma = model.encode_batch(batch)
    clock.lap("encoder")
    z = sampler.rsample(mu, sigma)
    clock.lap("sampler")
    logits = model.decoder_logits(z, batch, batch_first=False)  # (T, B, V), as loss_terms
    clock.lap("decoder")
    rec = decoder_loss(logits, model.targets(batch).t(), TAU, batch_first=False)
    loss = rec.loss + BETA * model.kl(mu, sigma).mean()
    clock.lap("loss")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    clock.lap("backward")
    for p in model.parameters():
        p.grad.clamp_(-10, 10)
    opt.step()
    clock.lap("optimizer")
    return rec.token_accuracy, rec.sequence_accuracy  # on the device: no host read per step


def _batches(strings, batch_size: int, bucketed: bool, epoch: int = 0):
    """The library's epoch order (seqvae.data.batch_order), plain or length-bucketed."""
    lengths = np.array([len(x) for x in strings]) if bucketed else None
    return batch_order(len(strings), batch_size, seed=1, epoch=epoch, lengths=lengths)


def _curves(args, strings, vocab, make) -> list[dict]:
    """Each variant trained for ``args.epochs`` epochs on the same molecules from
    its own fresh model, epochs interleaved across variants: the mean training
    token and sequence accuracy (teacher-forced arg max at z ~ q(z|x), as each
    step returns them; batch means weighted by batch size) and the wall time
    of each epoch."""
    variants = make()
    rows = []
    for epoch in range(args.epochs):
        row = {"epoch": epoch + 1}
        for name, (model, opt, sampler) in variants.items():
            plan = _batches(strings, args.batch, name == "library+buckets", epoch)
            token, sequence, start = [], [], time.perf_counter()
            for index in plan:
                batch = encode_strings([strings[i] for i in index], vocab)
                clock = _Clock()
                if name == "baseline":
                    tokens = batch.tokens.t().contiguous()
                    acc = _baseline_step(model, opt, sampler, tokens, vocab.bos, clock)
                else:
                    acc = _library_step(model, opt, sampler, batch, clock)
                token.append(float(acc[0]) * len(index))
                sequence.append(float(acc[1]) * len(index))
            row[f"{name} token accuracy"] = round(sum(token) / len(strings), 4)
            row[f"{name} sequence accuracy"] = round(sum(sequence) / len(strings), 4)
            row[f"{name} s"] = round(time.perf_counter() - start, 1)
        print(row, flush=True)
        rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--molecules", type=int, default=8192)
    parser.add_argument(
        "--epochs", type=int, default=0,
        help="also train each variant this many epochs and record the accuracy curves",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = random.Random(0)
    strings = rng.sample(load_split("train"), args.molecules)
    vocab = Vocabulary.build(strings, tokenizer="char")
    lengths = [len(s) for s in strings]

    config = ModelConfig(
        embedding_dim=64, hidden_size=args.hidden, num_layers=2, latent_dim=64,
        prior="gaussian", proposal="triweight", mode="argmax", max_length=max(lengths) + 2,
    )  # fmt: skip

    def make():
        """Fresh models: name -> (model, optimizer, sampler), seeded alike."""
        torch.manual_seed(0)
        out = {}
        for name in ("baseline", "library", "library+buckets"):
            if name == "baseline":
                model = _BaselineVAE(len(vocab), vocab.pad, args.hidden)
                sampler = _NumpyRejectionSampler(0)
            else:
                model = SequenceDDVAE(vocab, config)
                sampler = RejectionSampler("triweight", seed=0, backend="cpp")
            out[name] = (model, torch.optim.Adam(model.parameters(), 5e-4), sampler)
        return out

    variants = make()
    baseline, opts, np_sampler = variants["baseline"][0], {}, variants["baseline"][2]
    library, lib_sampler = variants["library"][0], variants["library"][2]
    opts["baseline"], opts["library"] = variants["baseline"][1], variants["library"][1]
    opts["library+buckets"] = opts["library"]
    plans = {
        "baseline": _batches(strings, args.batch, False),
        "library": _batches(strings, args.batch, False),
        "library+buckets": _batches(strings, args.batch, True),
    }
    per_step = {name: [] for name in plans}
    stages = {name: {s: [] for s in STAGES} for name in plans}
    padding = {name: [] for name in plans}
    for step in range(args.steps + 1):  # step 0 warms up
        for name, plan in plans.items():
            index = plan[step % len(plan)]
            clock = _Clock()
            chunk = [strings[i] for i in index]
            batch = encode_strings(chunk, vocab)
            real = sum(len(s) + 1 for s in chunk)
            padding[name].append(1 - real / batch.tokens.numel())
            start = clock.last
            if name == "baseline":
                _baseline_step(
                    baseline, opts[name], np_sampler, batch.tokens.t().contiguous(), vocab.bos,
                    clock,
                )  # fmt: skip
            else:
                _library_step(library, opts[name], lib_sampler, batch, clock)
            if step:
                per_step[name].append(clock.last - start)
                for s in STAGES:
                    stages[name][s].append(clock.times[s])
    rows = []
    for name in plans:
        median = statistics.median(per_step[name])
        rows.append(
            {
                "variant": name,
                "median_step_s": round(median, 4),
                "molecules_per_s": round(args.batch / median, 1),
                "padding_fraction": round(statistics.mean(padding[name]), 3),
                **{f"{s}_ms": round(1e3 * statistics.median(stages[name][s]), 2) for s in STAGES},
            }
        )
    base = rows[0]["molecules_per_s"]
    for r in rows:
        r["speedup_vs_baseline"] = round(r["molecules_per_s"] / base, 2)
        print(r)
    out = {
        "machine": f"{platform.node()} {platform.machine()}, {torch.get_num_threads()} threads",
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python", *sys.argv]),
        "config": {**vars(args), "embedding": 64, "latent": 64, "layers": 2},
        "peak_rss_mb": _peak_rss_mb(),
        "rows": rows,
    }

    path = Path(__file__).parent / "results" / "train_step.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    if args.epochs:
        curves = {**out, "rows": _curves(args, strings, vocab, make)}
        curves.pop("peak_rss_mb")
        path.with_name("train_step_curves.json").write_text(json.dumps(curves, indent=2) + "\n")
    return 0


def _peak_rss_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


if __name__ == "__main__":
    raise SystemExit(main())
