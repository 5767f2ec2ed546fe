"""Training recipe of Appendix B: configs, schedules, fine-tuning, exact resume.

One epoch index runs over the whole schedule: epochs [0, pretrain_epochs)
pretrain (beta = 0, optionally cross-entropy blended into the arg-max loss),
epochs [pretrain_epochs, epochs) train the full objective with beta growing
linearly and tau annealed log-linearly, and epochs [epochs, epochs +
finetune_epochs) fine-tune the decoder with the encoder frozen (Section 2.3,
Eq. 21/24: cross-entropy of x at z ~ q(z|x)). The learning rate is
``lr * lr_gamma ** (epoch // lr_step_epochs)``, and fine-tuning restarts that
step schedule from ``finetune_lr``; gradients are clamped by value. Every
schedule is a function of the epoch index, and the data order of an epoch is a
function of (seed, epoch), so a run resumed from a checkpoint (model,
optimizers, sampler and RNG states, history) retraces the
uninterrupted run exactly.

Under torchrun the same trainer runs one process per rank with
DistributedDataParallel (``distributed.py`` states the rules: the global
batch, each rank's part of it, the loss weights that make the averaged
gradient the global batch's, one sampler stream per rank). Without torchrun
nothing of that runs: the single-process numbers are unchanged.
"""

from __future__ import annotations

import csv
import gc
import hashlib
import io
import random
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import tomllib
import torch
from torch import nn
from tqdm.auto import tqdm

from .._checks import check_bool, check_finite_real, check_int
from ..sampling import RejectionSampler
from ..schedules import LinearSchedule, LogLinearSchedule
from . import distributed
from .data import EncodedStrings, Vocabulary, batch_order, check_tokenizer, load_strings
from .io import atomic_torch_save, check_known_keys, check_torch_file, write_text_atomic
from .model import ModelConfig, SequenceDDVAE
from .synthetic import sample_bernoulli_strings

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_CSV_NAME = "metrics.csv"
# Every file a run writes into its directory (the CLI adds metrics.json and the map).
RUN_FILES = (CHECKPOINT_NAME, METRICS_CSV_NAME, "metrics.json", "latent_map.png")
_CHECKPOINT_FORMAT = "ddvae_fast.TrainingCheckpoint/1"
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


# ---------------------------------------------------------------------------
# Configuration


def _check_seed(value, name: str) -> int:
    """A seed every RNG used here accepts: numpy's SeedSequence needs >= 0 and
    torch.manual_seed < 2**64; int64 keeps it storable everywhere."""
    value = check_int(value, name)
    if value < 0:
        raise ValueError(f"{name} must be a non-negative int below 2**63, got {value}")
    return value


def _from_dict(cls, values: dict, section: str):
    check_known_keys(values, cls, f"[{section}]")
    try:
        return cls(**values)
    except TypeError as exc:  # a value of the wrong type: an input error like any other
        raise ValueError(f"[{section}] {exc}") from None


@dataclass(frozen=True)
class DataConfig:
    source: str = "synthetic"  # 'synthetic' or the path of a .txt/.smi/.csv(.gz) file
    # synthetic bit strings (Section 4.1)
    n_samples: int = 100_000
    length: int = 6
    p_one: float = 0.8
    data_seed: int = 0  # fixed: the data set does not change with the training seed
    # files
    column: str | None = None  # CSV column (default: the first)
    csv_header: bool = True  # whether a CSV file's first row names its columns
    tokenizer: str = "char"  # 'char' or 'smiles'
    max_length: int | None = None  # tokens per string; default: the longest string's

    def __post_init__(self):
        if not isinstance(self.source, str) or not self.source:
            raise TypeError(f"source must be a non-empty str, got {self.source!r}")
        for name in ("n_samples", "length"):
            if check_int(getattr(self, name), name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        p_one = check_finite_real(self.p_one, "p_one")
        if not 0.0 <= p_one <= 1.0:
            raise ValueError(f"p_one must lie in [0, 1], got {p_one}")
        _check_seed(self.data_seed, "data_seed")
        if self.column is not None and not isinstance(self.column, str):
            raise TypeError(f"column must be a str, got {type(self.column).__name__}")
        check_bool(self.csv_header, "csv_header")
        if not isinstance(self.tokenizer, str):
            raise TypeError(f"tokenizer must be a str, got {type(self.tokenizer).__name__}")
        check_tokenizer(self.tokenizer)
        if self.max_length is not None and check_int(self.max_length, "max_length") < 1:
            raise ValueError(f"max_length must be positive, got {self.max_length}")

    @property
    def is_synthetic(self) -> bool:
        return self.source == "synthetic"


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 100  # main training epochs, pretraining included
    batch_size: int = 512
    lr: float = 5e-3
    lr_step_epochs: int = 20
    lr_gamma: float = 0.5
    clip_grad_value: float | None = 2.0
    pretrain_epochs: int = 2
    pretrain_nll_weight: float = 0.0
    beta_start: float = 0.0
    beta_end: float = 1.0
    tau_start: float = 0.1
    tau_end: float = 1e-2
    finetune_epochs: int = 10
    finetune_lr: float | None = None  # default: the learning rate of the last main epoch
    seed: int = 0
    # Length-bucketed batches (data.batch_order): less padding for variable-length
    # data such as SMILES (26% -> 2% on MOSES, benchmarks/bench_train_step.py).
    bucket_batches: bool = False

    def __post_init__(self):
        # Types first (TOML gives bools, strings and inf as easily as numbers),
        # so that a bad value fails here, before any data is loaded.
        for name in ("epochs", "batch_size", "lr_step_epochs"):
            if check_int(getattr(self, name), name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        for name in ("pretrain_epochs", "finetune_epochs"):
            if check_int(getattr(self, name), name) < 0:
                raise ValueError(f"{name} must be a non-negative int, got {getattr(self, name)!r}")
        _check_seed(self.seed, "seed")
        if not isinstance(self.bucket_batches, bool):
            raise TypeError(f"bucket_batches must be true or false, got {self.bucket_batches!r}")
        for name in ("lr", "lr_gamma", "beta_start", "beta_end", "tau_start", "tau_end"):
            check_finite_real(getattr(self, name), name)
        check_finite_real(self.pretrain_nll_weight, "pretrain_nll_weight")
        for name in ("finetune_lr", "clip_grad_value"):
            if getattr(self, name) is not None:
                check_finite_real(getattr(self, name), name)
        if not self.lr > 0 or not 0 < self.lr_gamma <= 1:
            raise ValueError(f"need lr > 0 and 0 < lr_gamma <= 1, got {self.lr}, {self.lr_gamma}")
        if self.finetune_lr is not None and not self.finetune_lr > 0:
            raise ValueError(f"finetune_lr must be > 0, got {self.finetune_lr}")
        if self.clip_grad_value is not None and not self.clip_grad_value > 0:
            raise ValueError(f"clip_grad_value must be > 0 or absent, got {self.clip_grad_value}")
        for name in ("tau_start", "tau_end"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must lie in (0, 1), got {getattr(self, name)}")
        if self.beta_start < 0 or self.beta_end < 0 or self.pretrain_nll_weight < 0:
            raise ValueError("beta_start, beta_end and pretrain_nll_weight must be >= 0")

    @property
    def total_epochs(self) -> int:
        return self.epochs + self.finetune_epochs


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "experiment"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # Settings that depend on the model's choices (the authors' configs: the
    # tricube proposal uses beta_end 0.1 and tau_end 1e-2, ...): a list of
    # {"when": {model setting: value}, "set": {train or model setting: value}}.
    # Model settings are applied by with_overrides (so that an override such as
    # a Gaussian prior can bring the model settings it needs), train settings
    # by resolve(); both in order.
    rules: tuple = ()

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "data": asdict(self.data),
            "model": asdict(self.model),
            "train": asdict(self.train),
            "rules": [dict(r) for r in self.rules],
        }

    @classmethod
    def from_dict(cls, values: dict) -> ExperimentConfig:
        check_known_keys(values, ("name", "data", "model", "train", "rules"), "the config")
        rules = values.get("rules", [])
        if not isinstance(rules, (list, tuple)):
            raise ValueError(f"rules must be an array of tables ([[rules]]), got {rules!r}")
        name = values.get("name", "experiment")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty str, got {name!r}")
        train = _from_dict(TrainConfig, values.get("train", {}), "train")
        for i, rule in enumerate(rules):
            where = f"rules[{i}]"
            if not isinstance(rule, dict) or set(rule) != {"when", "set"}:
                raise ValueError(
                    f"{where} must be a table with exactly 'when' and 'set' tables, got {rule!r}"
                )
            check_known_keys(rule["when"], ModelConfig, f"{where}.when")
            check_known_keys(rule["set"], _RULE_SETTINGS, f"{where}.set")
            train_part, model_part = _split_rule(rule)
            try:
                # A rule's values must be valid settings: train ones alone, model
                # ones together with the rule's own condition.
                replace(train, **train_part)
                if model_part:
                    ModelConfig(**{**asdict(ModelConfig()), **rule["when"], **model_part})
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{where}.set: {exc}") from None
        try:
            return cls(
                name=name,
                data=_from_dict(DataConfig, values.get("data", {}), "data"),
                model=_model_config(values.get("model", {}), rules),
                train=train,
                rules=tuple(rules),
            )
        except TypeError as exc:
            raise ValueError(str(exc)) from None

    def with_overrides(self, *, data=None, model=None, train=None) -> ExperimentConfig:
        """A copy with some settings replaced (``None`` values are ignored)."""

        def clean(d):
            return {k: v for k, v in (d or {}).items() if v is not None}

        return replace(
            self,
            data=replace(self.data, **clean(data)),
            model=_model_config({**asdict(self.model), **clean(model)}, self.rules),
            train=replace(self.train, **clean(train)),
        )

    def resolve(self) -> ExperimentConfig:
        """Apply the train settings of the rules whose ``when`` matches the model settings."""
        train = self.train
        for rule in self.rules:
            if all(getattr(self.model, k) == v for k, v in rule["when"].items()):
                train = replace(train, **_split_rule(rule)[0])
        return replace(self, train=train)


_TRAIN_SETTINGS = frozenset(f.name for f in fields(TrainConfig))
_RULE_SETTINGS = _TRAIN_SETTINGS | {f.name for f in fields(ModelConfig)}


def _model_config(values: dict, rules) -> ModelConfig:
    """ModelConfig from ``values`` with the model settings of the matching rules."""
    check_known_keys(values, ModelConfig, "[model]")
    values = {**asdict(ModelConfig()), **values}
    for rule in rules:
        if all(values[k] == v for k, v in rule["when"].items()):
            values.update(_split_rule(rule)[1])
    return ModelConfig(**values)


def _split_rule(rule: dict) -> tuple[dict, dict]:
    """A rule's ``set`` as (train settings, model settings)."""
    train = {k: v for k, v in rule["set"].items() if k in _TRAIN_SETTINGS}
    return train, {k: v for k, v in rule["set"].items() if k not in _TRAIN_SETTINGS}


def read_config_file(path) -> dict:
    """The tables of a TOML config file; a missing, unreadable or invalid file is a
    ValueError or FileNotFoundError naming it.

    A top-level ``base = "NAME"`` starts from the built-in config NAME (one of
    ddvae_fast/seqvae/configs/, which have no base themselves) and overrides it
    key by key within each table, so that a variant states only what it changes.
    """
    values = _read_toml(path)
    if "base" not in values:
        return values
    base_name = values.pop("base")
    if not isinstance(base_name, str):
        raise ValueError(f"config file {str(path)!r}: base must be a built-in config name")
    merged = _read_toml(builtin_config(base_name))
    if "base" in merged:
        raise ValueError(f"built-in config {base_name!r} has a base itself")
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def _read_toml(path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"config file {str(path)!r} is a directory, expected a TOML file")
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"config file {str(path)!r} is not valid TOML: {exc}") from None


def load_config(path) -> ExperimentConfig:
    """An ExperimentConfig from a TOML file (see ddvae_fast/seqvae/configs/)."""
    return ExperimentConfig.from_dict(read_config_file(path))


def builtin_config(name: str) -> Path:
    """Path of a config shipped with the package (e.g. 'synthetic', 'synthetic_paper')."""
    path = CONFIG_DIR / f"{name}.toml"
    if not path.is_file():
        available = sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))
        raise ValueError(f"no built-in config {name!r}; available: {available}")
    return path


def load_training_strings(data: DataConfig) -> list[str]:
    if data.is_synthetic:
        return sample_bernoulli_strings(data.n_samples, data.length, data.p_one, data.data_seed)
    return load_strings(data.source, column=data.column, header=data.csv_header)


# ---------------------------------------------------------------------------
# Helpers


class CorruptCheckpointError(ValueError):
    """A checkpoint file that cannot be read back as the state it claims to hold."""

    def __init__(self, path, reason: str):
        super().__init__(f"checkpoint is corrupt: {str(path)!r}: {reason}")


def data_fingerprint(strings: list[str]) -> str:
    """SHA-256 of the training strings in order: what --resume checks the data against."""
    digest = hashlib.sha256()
    for s in strings:
        encoded = s.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))  # length-prefixed: no ambiguity
        digest.update(encoded)
    return digest.hexdigest()


def _state_digest(obj, digest=None) -> str:
    """SHA-256 over a checkpoint's contents (tensors by dtype, shape and bytes).

    torch.load does not notice a flipped byte inside tensor data; this does.
    """
    top = digest is None
    digest = hashlib.sha256() if top else digest
    if isinstance(obj, dict):
        digest.update(b"d%d" % len(obj))
        for key in sorted(obj, key=repr):
            digest.update(repr(key).encode())
            _state_digest(obj[key], digest)
    elif isinstance(obj, (list, tuple)):
        digest.update(b"l%d" % len(obj))
        for item in obj:
            _state_digest(item, digest)
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        digest.update(f"t{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    else:
        digest.update(repr(obj).encode())
    return digest.hexdigest() if top else ""


def _rng_state(cuda_device: torch.device | None = None) -> dict:
    """The global RNGs' states; with ``cuda_device`` (a rank of a CUDA job) only that
    GPU's, so that no process touches (and allocates a context on) the others."""
    np_state = np.random.get_state()
    if cuda_device is not None:
        cuda = [torch.cuda.get_rng_state(cuda_device)]
    else:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict, cuda_device: torch.device | None = None) -> None:
    torch.set_rng_state(state["torch"])
    if cuda_device is not None:
        if state["cuda"]:  # rank 0's GPU state: every rank's is the same (same seed, same ops)
            torch.cuda.set_rng_state(state["cuda"][0], cuda_device)
    elif state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


_CSV_FIELDS = (
    "epoch",
    "stage",
    "lr",
    "beta",
    "tau",
    "loss",
    "reconstruction",
    "kl",
    "token_accuracy",
    "sequence_accuracy",
    "seconds",
)


# ---------------------------------------------------------------------------
# The objective as a module: DistributedDataParallel synchronises the gradients
# of what runs inside its forward().


class _TrainingObjective(nn.Module):
    """The pretraining and training loss (every parameter gets a gradient)."""

    def __init__(self, model: SequenceDDVAE):
        super().__init__()
        self.model = model

    def forward(self, batch, sampler, tau: float, beta: float, nll_weight: float):
        return self.model.loss_terms(batch, sampler, tau=tau, beta=beta, nll_weight=nll_weight)


class _FinetuneObjective(nn.Module):
    """The fine-tuning loss. Only the decoder is registered, so DDP expects (and
    averages) the decoder's gradients alone; the frozen encoder runs unregistered."""

    def __init__(self, model: SequenceDDVAE):
        super().__init__()
        self.decoder = model.decoder_modules()
        object.__setattr__(self, "_model", model)  # not a submodule: DDP must not see it

    def forward(self, batch, sampler, tau: float, beta: float, nll_weight: float):
        return self._model.reconstruction_terms(batch, sampler)


# ---------------------------------------------------------------------------
# Trainer


class Trainer:
    """Trains a SequenceDDVAE by the recipe of an ExperimentConfig into ``out_dir``.

    Writes ``checkpoint.pt`` (after every epoch, atomically) and
    ``metrics.csv`` (one row per epoch). ``Trainer.resume(out_dir)`` continues
    from the checkpoint.

    If a torch.distributed process group is initialised (the CLI does so under
    torchrun), every rank constructs a Trainer and calls the same methods:
    each trains on its part of every global batch through DDP with its own
    sampler stream, and rank 0 alone shows progress and writes files.
    """

    def __init__(
        self,
        config: ExperimentConfig,
        out_dir,
        *,
        device="cpu",
        progress: bool = True,
        log_epochs: bool = False,
        strings: list[str] | None = None,
        _vocabulary: Vocabulary | None = None,
    ):
        self.config = config
        self.out_dir = Path(out_dir)
        self.device = torch.device(device)
        tc = config.train
        self.world = distributed.current_world()  # None: one process, no DDP
        rank = 0 if self.world is None else self.world.rank
        if self.world is not None:
            distributed.check_batch_split(tc.batch_size, self.world.world_size)
        self.log_epochs = log_epochs and rank == 0
        self.progress = progress and rank == 0
        self.strings = (
            load_training_strings(config.data) if strings is None else load_strings(strings)
        )
        vocabulary = _vocabulary or Vocabulary.build(self.strings, config.data.tokenizer)
        data = EncodedStrings(self.strings, vocabulary, config.data.max_length)
        max_length = config.data.max_length or int(data.lengths.max()) - 1
        if config.model.max_length != max_length:
            config = replace(config, model=replace(config.model, max_length=max_length))
            self.config = config
        if self.world is not None:
            distributed.check_batch_split(tc.batch_size, self.world.world_size, len(data))
        # Tokens (non-pad targets) per string, on the host: the batch order and the
        # ranks' loss weights are computed from it.
        self._token_counts = data.lengths.cpu().numpy()
        self.data = data.to(self.device)
        self.data_fingerprint = data_fingerprint(self.strings)

        # The global RNGs seed the weights; they are checkpointed too.
        torch.manual_seed(tc.seed)
        np.random.seed(tc.seed % 2**32)
        random.seed(tc.seed)
        self.model = SequenceDDVAE(vocabulary, config.model).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=tc.lr)
        self.finetune_optimizer: torch.optim.Optimizer | None = None
        self.sampler = RejectionSampler(
            config.model.proposal,
            device=self.device,
            seed=tc.seed,
            backend=config.model.backend,
            rank=rank,  # stream (seed, rank): disjoint from every other rank's
        )
        self._ddp: nn.parallel.DistributedDataParallel | None = None
        self._ddp_stage_kind: str | None = None
        self.epoch = 0  # epochs completed
        self.history: list[dict] = []
        self.beta_schedule = LinearSchedule(
            tc.beta_start,
            tc.beta_end,
            duration=max(tc.epochs - 1 - tc.pretrain_epochs, 0),
            begin=tc.pretrain_epochs,
        )
        self.tau_schedule = LogLinearSchedule(
            tc.tau_start, tc.tau_end, duration=max(tc.epochs - 1, 0)
        )

    # -- schedules -----------------------------------------------------------

    def stage(self, epoch: int) -> str:
        tc = self.config.train
        if epoch >= tc.epochs:
            return "finetune"
        return "pretrain" if epoch < tc.pretrain_epochs else "train"

    def beta(self, epoch: int) -> float:
        """KL weight: 0 while pretraining and fine-tuning (Eq. 24 has no KL term)."""
        if self.stage(epoch) != "train":
            return 0.0
        return self.beta_schedule(epoch)

    def tau(self, epoch: int) -> float:
        return self.tau_schedule(min(epoch, self.config.train.epochs - 1))

    def lr(self, epoch: int) -> float:
        """lr * lr_gamma^(epoch // lr_step_epochs) while training; fine-tuning
        restarts the same step schedule from finetune_lr (default: the last
        training rate)."""
        tc = self.config.train
        if epoch < tc.epochs:
            return tc.lr * tc.lr_gamma ** (epoch // tc.lr_step_epochs)
        start = self.lr(tc.epochs - 1) if tc.finetune_lr is None else tc.finetune_lr
        return start * tc.lr_gamma ** ((epoch - tc.epochs) // tc.lr_step_epochs)

    # -- training ------------------------------------------------------------

    def _optimizer_for(self, epoch: int) -> torch.optim.Optimizer:
        if self.stage(epoch) != "finetune":
            return self.optimizer
        if self.finetune_optimizer is None:
            # Only decoder parameters: the encoder is fixed (Eq. 21).
            self.finetune_optimizer = torch.optim.Adam(
                self.model.decoder_modules().parameters(), lr=self.lr(epoch)
            )
        return self.finetune_optimizer

    def train_epoch(self, epoch: int) -> dict:
        tc = self.config.train
        stage = self.stage(epoch)
        beta, tau, lr = self.beta(epoch), self.tau(epoch), self.lr(epoch)
        optimizer = self._optimizer_for(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        params = [p for g in optimizer.param_groups for p in g["params"]]
        nll_weight = tc.pretrain_nll_weight if stage == "pretrain" else 0.0
        self.model.train()
        world = self.world
        objective = None if world is None else self._objective_for(stage)
        sums = torch.zeros(5, dtype=torch.float64, device=self.device)
        count = 0
        start = time.perf_counter()
        # The global batches (what EncodedStrings.batches yields, as row indices).
        order = batch_order(
            len(self.data),
            tc.batch_size,
            tc.seed,
            epoch,
            lengths=self._token_counts if tc.bucket_batches else None,
        )
        n_batches = len(order)
        bar = tqdm(
            order,
            total=n_batches,
            desc=f"epoch {epoch + 1}/{tc.total_epochs} {stage}",
            disable=not self.progress,
            dynamic_ncols=True,
            mininterval=0.5,
        )
        for i, index in enumerate(bar):
            if world is None:
                batch = self.data.batch(index)
                if stage == "finetune":
                    terms = self.model.reconstruction_terms(batch, self.sampler)
                else:
                    terms = self.model.loss_terms(
                        batch, self.sampler, tau=tau, beta=beta, nll_weight=nll_weight
                    )
                loss = terms.loss
            else:
                local = distributed.shard(index, world)
                token_weight, string_weight = distributed.loss_weights(
                    self._token_counts, index, local, world.world_size
                )
                batch = self.data.batch(local)
                # token_weight * (rec + beta' kl) with beta' = beta * string_weight /
                # token_weight weighs the token mean and the string mean each by its own
                # weight (distributed.py); every rank holds >= 1 string, so token_weight > 0.
                terms = objective(
                    batch,
                    self.sampler,
                    tau=tau,
                    beta=beta * string_weight / token_weight,
                    nll_weight=nll_weight,
                )
                loss = terms.loss * token_weight
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tc.clip_grad_value is not None:
                torch.nn.utils.clip_grad_value_(params, tc.clip_grad_value)
            optimizer.step()
            n = len(index)
            values = torch.stack([t.detach().double() for t in terms])
            if world is not None:
                # This rank's share of the global batch's loss, reconstruction, KL,
                # token and sequence accuracy; the all_reduce below adds the shares.
                shares = [token_weight, token_weight, string_weight, token_weight, string_weight]
                values = values * values.new_tensor(shares) / world.world_size
            sums += n * values
            count += n
            if self.progress and (i % 20 == 0 or i == n_batches - 1):
                # Under torchrun: rank 0's part of the batch, at the schedule's beta.
                shown = terms.loss if world is None else terms.reconstruction + beta * terms.kl
                bar.set_postfix(
                    loss=f"{shown.item():.4f}",
                    acc=f"{terms.sequence_accuracy.item():.3f}",
                    beta=f"{beta:.3g}",
                    tau=f"{tau:.3g}",
                    refresh=False,
                )
        if world is not None:
            torch.distributed.all_reduce(sums)
        means = (sums / max(count, 1)).tolist()
        return {
            "epoch": epoch + 1,
            "stage": stage,
            "lr": lr,
            "beta": beta,
            "tau": tau,
            "loss": means[0],
            "reconstruction": means[1],
            "kl": means[2],
            "token_accuracy": means[3],
            "sequence_accuracy": means[4],
            "seconds": time.perf_counter() - start,
        }

    def _objective_for(self, stage: str) -> nn.parallel.DistributedDataParallel:
        """The DDP-wrapped objective of ``stage``: one for pretraining and training,
        one (decoder only) for fine-tuning."""
        kind = "finetune" if stage == "finetune" else "train"
        if self._ddp_stage_kind != kind:
            # One DDP at a time: a second over the same parameters would also hook
            # their gradients. Dropping the first removes its hooks.
            self._ddp = None
            gc.collect()
            module = (_FinetuneObjective if kind == "finetune" else _TrainingObjective)(self.model)
            self._ddp = nn.parallel.DistributedDataParallel(module)
            self._ddp_stage_kind = kind
        return self._ddp

    def fit(self, stop_after: int | None = None) -> list[dict]:
        """Train until all epochs are done (or until ``stop_after`` epochs are
        completed, counting from the start of the run), checkpointing each epoch."""
        total = self.config.train.total_epochs
        end = total if stop_after is None else min(stop_after, total)
        for epoch in range(self.epoch, end):
            row = self.train_epoch(epoch)
            self.history.append(row)
            self.epoch = epoch + 1
            if self.is_main:
                self.write_metrics_csv()
            self.save_checkpoint()
            if self.log_epochs:
                tqdm.write(
                    f"epoch {row['epoch']:>3} {row['stage']:<8} loss {row['loss']:.4f} "
                    f"kl {row['kl']:.3f} seq acc {row['sequence_accuracy']:.4f} "
                    f"beta {row['beta']:.3g} tau {row['tau']:.3g} lr {row['lr']:.3g} "
                    f"({row['seconds']:.1f}s)"
                )
        return self.history

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and shows progress (rank 0, or the only one)."""
        return self.world is None or self.world.is_main

    @property
    def finished(self) -> bool:
        return self.epoch >= self.config.train.total_epochs

    # -- persistence ---------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_NAME

    def write_metrics_csv(self) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=_CSV_FIELDS)
        writer.writeheader()
        for row in self.history:
            writer.writerow(row)
        write_text_atomic(self.out_dir / METRICS_CSV_NAME, buffer.getvalue())

    @property
    def _rank_cuda_device(self) -> torch.device | None:
        """This rank's GPU in a CUDA job, whose RNG state alone is saved."""
        return self.device if self.world is not None and self.device.type == "cuda" else None

    def state_dict(self) -> dict:
        """The checkpoint's contents. Under torchrun a collective (call it on every
        rank): it gathers every rank's sampler state, and is the same on every rank."""
        if self.world is None:
            sampler_states = [self.sampler.state_dict()]
        else:
            sampler_states = [None] * self.world.world_size
            torch.distributed.all_gather_object(sampler_states, self.sampler.state_dict())
        state = {
            "format": _CHECKPOINT_FORMAT,
            "config": self.config.to_dict(),
            "epoch": self.epoch,
            "model": self.model.to_state(),
            "optimizer": self.optimizer.state_dict(),
            "finetune_optimizer": (
                None if self.finetune_optimizer is None else self.finetune_optimizer.state_dict()
            ),
            "sampler": sampler_states[0],
            "rng": _rng_state(self._rank_cuda_device),
            "history": list(self.history),
            "data_fingerprint": self.data_fingerprint,
        }
        if self.world is not None:
            state["world_size"] = self.world.world_size
            state["rank_samplers"] = sampler_states
        return state

    def save_checkpoint(self) -> None:
        """Write the checkpoint atomically (under torchrun: every rank calls it, rank 0
        writes once all ranks have finished the epoch)."""
        if self.world is not None:
            torch.distributed.barrier()
        state = self.state_dict()
        if not self.is_main:
            return
        state["digest"] = _state_digest(state)
        atomic_torch_save(state, self.checkpoint_path)

    @classmethod
    def resume(
        cls,
        out_dir,
        *,
        device="cpu",
        progress: bool = True,
        log_epochs: bool = False,
        strings: list[str] | None = None,
    ) -> Trainer:
        """The trainer saved in ``out_dir/checkpoint.pt``, ready to continue.

        Under torchrun every rank calls it; the checkpoint must come from a run of
        the same number of processes (each continues its own sampler stream).
        """
        path = Path(out_dir) / CHECKPOINT_NAME
        state = load_checkpoint(path)
        check_world_size(state, path)
        try:
            config = ExperimentConfig.from_dict(state["config"])
            vocabulary = Vocabulary.from_dict(state["model"]["vocabulary"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCheckpointError(path, f"bad config or vocabulary ({exc})") from None
        trainer = cls(
            config,
            out_dir,
            device=device,
            progress=progress,
            log_epochs=log_epochs,
            strings=strings,
            _vocabulary=vocabulary,
        )
        stored = state.get("data_fingerprint")
        if stored is not None and stored != trainer.data_fingerprint:
            raise ValueError(
                f"the training data changed since {str(path)!r} was written "
                f"({config.data.source!r}: {len(trainer.strings)} strings, fingerprint "
                f"{trainer.data_fingerprint[:12]}, checkpoint {str(stored)[:12]}); "
                "resuming would continue on other data. Restore the data, or start a new run"
            )
        try:
            trainer.model.load_state_dict(state["model"]["state_dict"])
            trainer.optimizer.load_state_dict(state["optimizer"])
            trainer.epoch = int(state["epoch"])
            if state["finetune_optimizer"] is not None:
                trainer._optimizer_for(config.train.epochs).load_state_dict(
                    state["finetune_optimizer"]
                )
            rank_samplers = state.get("rank_samplers", [state["sampler"]])
            trainer.sampler.load_state_dict(rank_samplers[trainer.sampler.rank])
            _set_rng_state(state["rng"], trainer._rank_cuda_device)
            trainer.history = list(state["history"])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
            raise CorruptCheckpointError(path, f"{type(exc).__name__}: {exc}") from None
        if not 0 <= trainer.epoch <= config.train.total_epochs:
            raise CorruptCheckpointError(path, f"epoch {trainer.epoch} is out of range")
        return trainer


def check_world_size(state: dict, path) -> None:
    """Refuse a checkpoint written by another number of processes than this run has."""
    world = distributed.current_world()
    processes = 1 if world is None else world.world_size
    stored = state.get("world_size", 1)  # single-process checkpoints do not say
    if type(stored) is not int or stored < 1:
        raise CorruptCheckpointError(path, f"world_size {stored!r} is not a positive int")
    if stored != processes:
        how = (
            "on one process (without torchrun, or --nproc_per_node 1)"
            if stored == 1
            else f"under torchrun --nproc_per_node {stored}"
        )
        raise ValueError(
            f"{str(path)!r} was written by {stored} process(es) and this run has {processes}: "
            f"resume it {how}. Each process continues its own sampler stream, and the "
            "streams of one world size cannot be split or merged into another's exactly"
        )


def load_checkpoint(path) -> dict:
    """The state in a training checkpoint, checked: a file that torch cannot read,
    that is not a ddvae_fast checkpoint, or whose contents do not match the digest
    stored with them raises CorruptCheckpointError (a ValueError)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a directory, expected a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume at {str(path)!r}")
    damage = check_torch_file(path)
    if damage is not None:
        raise CorruptCheckpointError(path, damage)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CorruptCheckpointError(path, reason) from None
    if not isinstance(state, dict) or state.get("format") != _CHECKPOINT_FORMAT:
        raise CorruptCheckpointError(path, "not a training checkpoint of ddvae_fast")
    stored = state.pop("digest", None)
    # Checkpoints written before the digest existed have none; they load unchecked.
    if stored is not None and stored != _state_digest(state):
        raise CorruptCheckpointError(path, "its contents do not match the stored digest")
    return state
