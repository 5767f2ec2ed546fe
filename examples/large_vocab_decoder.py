"""A decoder with a 32k vocabulary trained with the fused linear relaxed arg-max loss.

Run:  python examples/large_vocab_decoder.py [--steps 5] [--batch 16] [--length 32]

A randomly initialised GRU decoder (embedding 64, hidden 128) over V = 32000
tokens, trained for a few Adam steps on random token sequences (no tokenizer:
the point is the output layer, not the data) to predict each next token with
``ddf.linear_decoder_loss``: the (B*L, V) logits are never materialized, only
one chunk of rows at a time (ddvae_fast/loss/linear.py).

It prints the training losses and a table of memory: the logits and their
gradient that a materialized output layer holds, against the fused path's
chunk workspace, for this batch and larger ones (sizes by construction; the
measured peaks are in benchmarks/results/cpu_linear_loss.json, written by
benchmarks/bench_linear_loss.py).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from torch import nn

import ddvae_fast as ddf
from ddvae_fast.loss.linear import chunk_rows_for, linear_decoder_loss

VOCAB = 32000
TAU = 0.1
MIB = 2**20


class Decoder(nn.Module):
    def __init__(self, vocab=VOCAB, embed=64, hidden=128):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.gru = nn.GRU(embed, hidden, batch_first=True)
        self.out = nn.Linear(hidden, vocab)  # weight (V, H): what linear_decoder_loss takes

    def features(self, tokens):
        return self.gru(self.embed(tokens))[0]  # (B, L, H)


def fused_loss(model, inputs, target):
    h = model.features(inputs)
    return linear_decoder_loss(
        h, model.out.weight, target, TAU, bias=model.out.bias, nll_weight=0.1
    )


def materialized_loss(model, inputs, target):
    logits = model.out(model.features(inputs))  # (B, L, V) in memory
    return ddf.decoder_loss(logits, target, TAU, nll_weight=0.1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = Decoder()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    # a few fixed random sequences, so a few steps visibly lower the loss
    tokens = torch.randint(0, VOCAB, (args.batch, args.length + 1))
    inputs, target = tokens[:, :-1], tokens[:, 1:]

    print(f"decoder: V = {VOCAB}, B x L = {args.batch} x {args.length}, tau = {TAU}")
    print("step  loss        argmax_loss  nll      token_acc")
    for step in range(args.steps):
        out = fused_loss(model, inputs, target)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        print(
            f"{step:4d}  {float(out.loss.detach()):10.3f}  {float(out.argmax_loss):11.3f}  "
            f"{float(out.nll):7.3f}  {float(out.token_accuracy):9.4f}"
        )

    # the two ways agree (same model, same batch)
    with torch.no_grad():
        a = fused_loss(model, inputs, target).loss
        b = materialized_loss(model, inputs, target).loss
    print(f"\nfused loss {float(a):.6f} vs materialized logits {float(b):.6f}")

    print("\nmemory of the output layer's loss (float32), sizes by construction:")
    print("rows (B*L)   logits   logits + grad   fused chunk rows   fused workspace   saved")
    for rows in (args.batch * args.length, 4096, 16384, 65536):
        logits = rows * VOCAB * 4
        chunk = chunk_rows_for(rows, VOCAB, torch.float32)
        workspace = 2 * chunk * VOCAB * 4
        print(
            f"{rows:10d} {logits / MIB:7.0f} MiB {2 * logits / MIB:9.0f} MiB "
            f"{chunk:15d} {workspace / MIB:13.1f} MiB {(2 * logits - workspace) / MIB:7.0f} MiB"
        )


if __name__ == "__main__":
    main()
