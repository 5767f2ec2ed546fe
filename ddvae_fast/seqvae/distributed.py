"""Training under torchrun: the process group, each rank's share of a batch, its loss weights.

    torchrun --nproc_per_node N -m ddvae_fast.seqvae.cli train ...

The rules (README, "Training on several processes"):

- Batches. The configured ``batch_size`` is the global batch. Every rank
  computes the same epoch order (``data.batch_order``, a function of (seed,
  epoch), length-bucketed or not) and takes the ``rank``-th of ``world_size``
  contiguous, near-equal parts of each global batch (``numpy.array_split``):
  ``batch_size / world_size`` strings per full batch. ``batch_size`` must be a
  multiple of the world size, and the epoch's last, partial batch (``n %
  batch_size`` strings) must give every rank at least one string.
- Loss. The objective is the single-process one of the global batch: the
  decoder loss is the mean over the non-pad tokens of the whole global batch
  and the KL the mean over its strings, not a mean of per-rank means. DDP
  averages gradients over the W ranks, so rank r scales its token mean by ``W
  T_r / T`` and its string mean by ``W n_r / b`` (T, b: tokens and strings of
  the global batch; T_r, n_r: of rank r's part). Every rank knows T and b from
  the shared batch order, so this costs no communication.
- Noise. Rank r's ``RejectionSampler`` draws stream (seed, r), disjoint from
  every other rank's; a checkpoint holds every rank's sampler state, so a
  resume needs the same world size (a different one is refused).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 1800.0  # torch's own default for gloo: a stalled rank fails after this


@dataclass(frozen=True)
class World:
    """This process's place in the job: global rank, number of processes, rank on its host."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"environment variable {name}={value!r} is not an int; run under torchrun, "
            "which sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT"
        ) from None


def world_from_env() -> World | None:
    """The World torchrun describes in the environment, or None outside torchrun
    (no WORLD_SIZE): then training is the single-process code path, unchanged."""
    if "WORLD_SIZE" not in os.environ:
        return None
    world_size = _env_int("WORLD_SIZE")
    rank = _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise ValueError(
            f"inconsistent torchrun environment: RANK={rank}, LOCAL_RANK={local_rank}, "
            f"WORLD_SIZE={world_size}"
        )
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ValueError(
            f"WORLD_SIZE is set but {', '.join(missing)} is not: run under torchrun "
            "(or set every variable of PyTorch's env:// initialisation)"
        )
    return World(rank, world_size, local_rank)


def current_world() -> World | None:
    """The World of the initialised default process group, or None (single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    rank = dist.get_rank()
    return World(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", rank)))


def rank_device(world: World, device: torch.device) -> torch.device:
    """The device of this rank: cuda:LOCAL_RANK for a CUDA run, the CPU for a CPU run."""
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(
            f"training on several processes runs on cpu (gloo) or cuda (nccl), not {device}"
        )
    if device.index is not None and world.world_size > 1:
        raise ValueError(
            f"--device {device} under torchrun: each process uses cuda:LOCAL_RANK; "
            "pass --device cuda"
        )
    count = torch.cuda.device_count()
    if world.local_rank >= count:
        raise ValueError(
            f"LOCAL_RANK {world.local_rank} has no GPU: this host has {count}; "
            f"start at most {count} processes per node"
        )
    return torch.device("cuda", world.local_rank)


def init_process_group(
    world: World, device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S
) -> None:
    """Join the job: nccl for CUDA, gloo for the CPU. A collective that waits longer
    than ``timeout_s`` for a peer (a rank stalled or dead) raises instead of hanging."""
    if not timeout_s > 0:
        raise ValueError(f"the process-group timeout must be > 0 seconds, got {timeout_s}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        rank=world.rank,
        world_size=world.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_batch_split(batch_size: int, world_size: int, n_strings: int | None = None) -> None:
    """Refuse a batch size that does not give every rank an equal, non-empty share
    (the last batch's check needs ``n_strings``)."""
    if batch_size % world_size:
        raise ValueError(
            f"batch_size {batch_size} does not split over {world_size} processes: the "
            "configured batch_size is the global batch and each process takes batch_size / "
            f"world size strings; choose a batch_size divisible by {world_size}"
        )
    last = 0 if n_strings is None else n_strings % batch_size
    if 0 < last < world_size:
        raise ValueError(
            f"the last batch of every epoch holds {last} of the {n_strings} strings "
            f"({n_strings} % batch_size {batch_size}), fewer than the {world_size} "
            "processes, so some process would get no string; choose another batch_size"
        )


def shard(global_index: np.ndarray, world: World) -> np.ndarray:
    """Rank ``world.rank``'s part of a global batch: the rank-th of world_size
    contiguous parts whose sizes differ by at most one."""
    return np.array_split(global_index, world.world_size)[world.rank]


def loss_weights(
    token_counts: np.ndarray, global_index: np.ndarray, local_index: np.ndarray, world_size: int
) -> tuple[float, float]:
    """(token weight, string weight) of a rank's token-mean and string-mean losses:
    ``W T_r / T`` and ``W n_r / b``. With DDP's gradient average over the W ranks,
    the weighted per-rank means sum to the means over the global batch."""
    tokens_global = int(token_counts[global_index].sum())
    tokens_local = int(token_counts[local_index].sum())
    return (
        world_size * tokens_local / tokens_global,
        world_size * len(local_index) / len(global_index),
    )
