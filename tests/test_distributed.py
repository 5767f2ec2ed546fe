"""Training under torchrun (2 CPU processes, gloo): the global batch's gradient, one
sampler stream per rank, kill and resume, a failing or stalled rank.

Every run is a real ``torchrun --standalone`` (a free port is picked by the
rendezvous) of ``python -m ddvae_fast.seqvae.cli train`` on 301 strings of 1-12
characters with a 16-unit GRU: batches of 32 give 10 steps per epoch, the
partial batch (13 strings) is split 7/6, and with length-bucketed batches
(sorted by length, then cut into the ranks' contiguous parts) the ranks' token
counts differ in every batch, so the loss normalisation is exercised in full.
Four launches in all.
"""

import json
import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ddvae_fast.sampling import RejectionSampler
from ddvae_fast.sampling.philox import BLOCKS_PER_RANK
from ddvae_fast.seqvae import cli, distributed
from ddvae_fast.seqvae.data import batch_order
from ddvae_fast.seqvae.trainer import Trainer, load_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
N_STRINGS, BATCH = 301, 32
STEPS_PER_EPOCH = -(-N_STRINGS // BATCH)  # 10
# pretrain 1 + train 2 (KL weighted) + fine-tune 1 (decoder only, its own DDP)
CONFIG = """
name = "ddp"
[data]
source = "{source}"
tokenizer = "char"
[model]
embedding_dim = 4
hidden_size = 16
num_layers = 1
latent_dim = 2
prior = "uniform"
proposal = "tricube"
mode = "argmax"
[train]
epochs = 3
batch_size = 32
lr = 1e-2
lr_step_epochs = 2
pretrain_epochs = 1
pretrain_nll_weight = 0.5
beta_start = 0.01
beta_end = 0.05
finetune_epochs = 1
seed = 0
bucket_batches = true
"""
TOTAL_EPOCHS = 4
# Max |difference| of any parameter between the 2-process run and the 1-process run
# of the same global batches and noise, after 40 Adam steps in fp32. Measured:
# 3.6e-7 (summation order only); weighting the ranks' means equally (the mean of
# per-rank means) instead gives 4.4e-2: the bound separates the two by 4000x.
PARAMETER_ATOL = 1e-5

# Runs the train command with a fault in rank 1's k-th call of loss_terms.
FAULTY_ENTRY = """
import os, sys, time
from ddvae_fast.seqvae import cli
from ddvae_fast.seqvae.model import SequenceDDVAE

fault, at_call = os.environ["FAULT"], int(os.environ["FAULT_AT_CALL"])
calls = 0
loss_terms = SequenceDDVAE.loss_terms


def faulty_loss_terms(self, *args, **kwargs):
    global calls
    calls += 1
    if os.environ["RANK"] == "1" and calls == at_call:
        if fault == "raise":
            raise RuntimeError("injected failure on rank 1")
        time.sleep(3600)  # stalled: rank 0 waits for it in the gradient all-reduce
    return loss_terms(self, *args, **kwargs)


SequenceDDVAE.loss_terms = faulty_loss_terms
sys.exit(cli.main(sys.argv[1:]))
"""


def _strings() -> list[str]:
    rng = random.Random(0)
    return ["".join(rng.choice("abcdef") for _ in range(rng.randint(1, 12))) for _ in range(301)]


def _start_torchrun(*args: str, entry=None, env=None) -> subprocess.Popen:
    """torchrun of the train command (or of ``entry``, a script calling it)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", str(WORLD), "--monitor-interval", "0.1"]
    command += [str(entry)] if entry is not None else ["-m", "ddvae_fast.seqvae.cli"]
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE"}
    environment.update(env or {})
    return subprocess.Popen(
        command + ["train", *args, "--no-progress", "--eval-samples", "50"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=environment,
    )


def _finish(process: subprocess.Popen, timeout=600) -> subprocess.CompletedProcess:
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()  # torchrun's workers get SIGKILL from their agent's death signal
        process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _torchrun(*args: str, entry=None, env=None) -> subprocess.CompletedProcess:
    return _finish(_start_torchrun(*args, entry=entry, env=env))


def _checkpoint(out: Path) -> dict:
    return torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The data, the config, an uninterrupted 2-process run and, at the same time
    (the launches are mostly start-up), a run whose rank 1 fails in the second
    step of epoch 3."""
    root = tmp_path_factory.mktemp("ddp")
    (root / "strings.txt").write_text("\n".join(_strings()) + "\n")
    config = root / "ddp.toml"
    config.write_text(CONFIG.format(source=root / "strings.txt"))
    entry = root / "faulty_entry.py"
    entry.write_text(textwrap.dedent(FAULTY_ENTRY))
    out, killed_out = root / "uninterrupted", root / "killed"
    fault = {"FAULT": "raise", "FAULT_AT_CALL": str(2 * STEPS_PER_EPOCH + 2)}
    runs = [
        _start_torchrun("--config", str(config), "--out", str(out)),
        _start_torchrun("--config", str(config), "--out", str(killed_out), entry=entry, env=fault),
    ]
    result, killed = (_finish(run) for run in runs)
    assert result.returncode == 0, result.stderr[-3000:]
    return {
        "root": root,
        "config": config,
        "entry": entry,
        "out": out,
        "stdout": result.stdout,
        "killed": killed,
        "killed_out": killed_out,
    }


def _rank_parts(batch: int) -> list[int]:
    """Strings per rank of a global batch: contiguous near-equal parts (README's rule)."""
    return [len(p) for p in np.array_split(np.arange(batch), WORLD)]


def _global_batch_sizes(epoch: int) -> list[int]:
    """Sizes of the epoch's global batches in order (length-bucketed: the partial
    batch may come anywhere)."""
    lengths = np.array([len(s) + 1 for s in _strings()])  # characters + eos
    return [len(b) for b in batch_order(N_STRINGS, BATCH, 0, epoch, lengths=lengths)]


class _RankNoise:
    """The noise a 2-process run draws, for a 1-process run: the rows of rank r's part
    of each batch take their eps from rank r's stream, as that rank does."""

    def __init__(self, proposal: str, seed: int):
        self.streams = [RejectionSampler(proposal, seed=seed, rank=r) for r in range(WORLD)]

    def rsample(self, mu, sigma):
        parts = np.array_split(np.arange(mu.shape[0]), WORLD)
        return torch.cat([s.rsample(mu[p], sigma[p]) for s, p in zip(self.streams, parts)])

    def state_dict(self) -> dict:
        return {}


def test_two_processes_equal_one_process_on_the_same_global_batch(setup, tmp_path):
    # Oracle: the single-process trainer (no DDP, one loss over the whole global
    # batch: mean over all its non-pad tokens, KL mean over all its strings) with
    # the ranks' noise.
    config = load_config(setup["config"])
    single = Trainer(config, tmp_path, progress=False)
    single.sampler = _RankNoise(config.model.proposal, config.train.seed)
    single.fit()
    state = _checkpoint(setup["out"])
    assert state["world_size"] == WORLD and state["epoch"] == TOTAL_EPOCHS
    for name, value in single.model.state_dict().items():
        torch.testing.assert_close(
            state["model"]["state_dict"][name], value, rtol=0, atol=PARAMETER_ATOL, msg=name
        )
    # Metrics are reduced over the ranks: the global batch's, as one process has them.
    for two, one in zip(state["history"], single.history):
        for key in ("loss", "reconstruction", "kl", "token_accuracy", "sequence_accuracy"):
            assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key
    # Rank 0 alone prints and writes.
    assert setup["stdout"].count("epoch   1 pretrain") == 1
    assert setup["stdout"].count("on 2 processes") == 1
    metrics = json.loads((setup["out"] / "metrics.json").read_text())
    assert metrics["processes"] == WORLD
    assert len((setup["out"] / "metrics.csv").read_text().strip().splitlines()) == 1 + 4


def test_each_rank_draws_its_own_stream(setup):
    state = _checkpoint(setup["out"])
    latent = load_config(setup["config"]).model.latent_dim
    draws = []
    for rank, saved in enumerate(state["rank_samplers"]):
        # Independent replay: a fresh sampler of stream (seed, rank) asked for what
        # rank `rank` asked for, one call per step, must end in the saved state.
        replay = RejectionSampler("tricube", seed=0, rank=rank)
        values = []
        for epoch in range(TOTAL_EPOCHS):
            for batch in _global_batch_sizes(epoch):
                n = _rank_parts(batch)[rank]
                values.append(replay.rsample(torch.zeros(n, latent), torch.ones(n, latent)))
        expected = replay.state_dict()
        assert saved["rank"] == rank
        assert saved["block_offset"] == expected["block_offset"]
        assert saved["candidates_drawn"] == expected["candidates_drawn"]
        assert torch.equal(saved["buffer"], expected["buffer"])
        # Rank r's Philox blocks lie in [r 2^48, (r + 1) 2^48): disjoint ranges.
        assert rank * BLOCKS_PER_RANK < saved["block_offset"] <= (rank + 1) * BLOCKS_PER_RANK
        draws.append(torch.cat([v.reshape(-1) for v in values]))
    assert state["sampler"]["rank"] == 0  # rank 0's state, where one process keeps it
    n = min(len(d) for d in draws)
    assert (draws[0][:n] != draws[1][:n]).float().mean() > 0.99  # the streams differ


def test_killed_run_resumes_to_the_uninterrupted_result(setup):
    # Rank 1 failed in the second step of epoch 3; torchrun then killed rank 0,
    # which waited for it in the gradient all-reduce. The job ended non-zero with
    # rank 1's error, and the checkpoint of epoch 2 stayed.
    killed, out = setup["killed"], setup["killed_out"]
    assert killed.returncode != 0
    assert "RuntimeError: injected failure on rank 1" in killed.stderr
    assert _checkpoint(out)["epoch"] == 2

    resumed = _torchrun("--resume", "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    a, b = _checkpoint(setup["out"]), _checkpoint(out)
    for name, value in a["model"]["state_dict"].items():
        assert torch.equal(b["model"]["state_dict"][name], value), name  # bit for bit
    for sa, sb in zip(a["rank_samplers"], b["rank_samplers"]):
        assert sa["block_offset"] == sb["block_offset"] and torch.equal(sa["buffer"], sb["buffer"])
    for ra, rb in zip(a["history"], b["history"], strict=True):
        assert {k: v for k, v in ra.items() if k != "seconds"} == {
            k: v for k, v in rb.items() if k != "seconds"
        }


def test_a_stalled_rank_ends_the_job_at_the_process_group_timeout(setup):
    # Rank 1 sleeps in its second step; rank 0 waits for it in the gradient
    # all-reduce until the process-group timeout, fails, and torchrun kills rank 1.
    # The timeout also bounds the wait for the other rank at start-up, so it must
    # exceed the ranks' start-up skew: 10 s, several times that of a loaded box.
    started = time.monotonic()
    args = ("--config", str(setup["config"]), "--out", str(setup["root"] / "stalled"))
    result = _torchrun(
        *args,
        "--dist-timeout",
        "10",
        entry=setup["entry"],
        env={"FAULT": "stall", "FAULT_AT_CALL": "2"},
    )
    assert result.returncode != 0
    assert "on 2 processes" in result.stdout  # training had started: the stall timed out
    assert "Timed out" in result.stderr  # rank 0's error from gloo
    assert time.monotonic() - started < 600  # far below the 3600 s stall


def test_resume_under_another_world_size_is_refused(setup, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in setup["out"].iterdir()}
    code = cli.main(["train", "--resume", "--out", str(setup["out"]), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "written by 2 process(es) and this run has 1" in err
    assert "torchrun --nproc_per_node 2" in err
    assert {p.name: p.stat().st_mtime_ns for p in setup["out"].iterdir()} == before


def test_batch_split_rule():
    distributed.check_batch_split(32, 2, 301)  # last batch 13: 7 + 6
    distributed.check_batch_split(32, 4, 320)  # no partial batch
    with pytest.raises(ValueError, match="batch_size 33 does not split over 2 processes"):
        distributed.check_batch_split(33, 2)
    with pytest.raises(ValueError, match="last batch of every epoch holds 1 of the 301"):
        distributed.check_batch_split(30, 2, 301)
    world = distributed.World(rank=1, world_size=2, local_rank=1)
    assert distributed.shard(np.arange(13), world).tolist() == list(range(7, 13))
    # Weights: W * tokens_r / tokens and W * strings_r / strings of the global batch.
    counts = np.array([1, 2, 3, 10])
    tokens, strings = distributed.loss_weights(counts, np.arange(4), np.array([2, 3]), 2)
    assert (tokens, strings) == (2 * 13 / 16, 1.0)
