"""MOSES distribution learning (Section 4.3, Table 3, Figure 7): the paper's protocol.

A model is pretrained at a small fixed KL weight ``beta_start`` until its
sequence reconstruction accuracy on held-out MOSES molecules is about 95%;
then beta grows linearly, and whenever the reconstruction first falls below
each threshold (90%, 80%, 70%) the model decodes ``n_samples`` latent codes
drawn from the prior and the samples are scored with the MOSES metrics against
the test split (:func:`ddvae_fast.seqvae.moses_metrics.moses_metrics`). The
fixed-beta phase lasts ``pretrain_epochs`` epochs (the paper's 20), or, with
``pretrain_target``, until the reconstruction first reaches that target (at
most ``pretrain_epochs``); the run stops once every threshold is crossed.

Files of a run directory: ``checkpoint.pt`` and ``metrics.csv`` (the Trainer's),
``moses_state.json`` (the protocol's state, from which the CSVs are rendered),
``reconstruction.csv`` (one row per epoch), ``moses_curve.csv`` (one row per
evaluation: Figure 7's points, with every MOSES metric), ``samples_epochNNN.smi``
(the scored samples; an undecodable one is written as ``<invalid>``) and
``figure7.png``. Epoch numbers in the files count completed epochs (from 1);
``ramp_begin`` in the state is an epoch index (from 0).

Choices that follow the authors' public code (insilicomedicine/DD-VAE) where
the paper's text is silent:

- Reconstruction is the exact-match rate of greedy (arg max) decoding on held-out
  molecules of the MOSES test split, for both models. Their x-axis,
  ``string_accuracy/test``, decodes a code drawn from the proposal q(z|x)
  (``reconstruction_z = "sample"``, the default here); teacher-forced arg-max
  string accuracy equals the exact-match rate of free-running greedy decoding.
  ``reconstruction_z = "mu"`` decodes the proposal's mean instead. Both are
  measured and written every epoch; the setting picks the one the protocol uses.
- Prior samples are decoded deterministically (arg max) for the VAE too: their
  metric notebook calls ``model.sample``, whose default mode is 'argmax', and
  Table 3 is titled "distribution learning with deterministic decoding".
- The learning rate is multiplied by ``lr_gamma`` once, when the beta ramp begins
  (their MultiStepLR at epoch 20 = the KL ramp's start; the paper: "we halved
  the learning rate after pretraining"); TrainConfig.lr_step_epochs is unused.
  ``pretrain_lr_step_epochs`` (not the paper's; the small configs use it) also
  multiplies it by ``lr_gamma`` every that many epochs of the fixed-beta phase,
  and ``ramp_lr`` (likewise) sets the ramp's rate outright.
- beta is ``beta_start`` up to and including the ramp's first epoch B, then
  ``beta_start + (beta_end - beta_start) (e - B) / beta_ramp_epochs`` (their
  LinearGrowth); tau goes log-linearly from tau_start at epoch 0 to tau_end at
  ``tau_ramp_epochs`` (the same, in log space).

The run is driven through :class:`ddvae_fast.seqvae.trainer.Trainer` (a subclass
overriding only its schedules), so its checkpoint makes the run resumable: the
protocol's state (per-epoch reconstruction, the ramp's start, the evaluations)
is written to ``moses_state.json`` after each epoch, and evaluation draws come
from seeds of (seed, epoch), not from the training streams.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import time
import warnings
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .._checks import check_bool, check_finite_real, check_int
from ..sampling import RejectionSampler
from ..schedules import LinearSchedule, LogLinearSchedule
from .data import Vocabulary
from .io import atomic_write, check_known_keys, write_text_atomic
from .moses_metrics import MOSES_KEYS
from .trainer import CONFIG_DIR, ExperimentConfig, Trainer, read_config_file

__all__ = [
    "CURVE_COLUMNS",
    "CURVE_CSV_NAME",
    "MODELS",
    "RECONSTRUCTION_CSV_NAME",
    "RUN_FILES",
    "SCALES",
    "STATE_NAME",
    "MosesConfig",
    "MosesProtocol",
    "MosesRun",
    "MosesTrainer",
    "builtin_moses_config",
    "first_crossings",
    "load_moses_config",
    "plot_figure7",
    "read_curve",
    "run_experiment",
]

MODELS = {"ddvae": "argmax", "vae": "sample"}  # --model -> ModelConfig.mode
SCALES = ("small", "paper")
STATE_NAME = "moses_state.json"
CURVE_CSV_NAME = "moses_curve.csv"
RECONSTRUCTION_CSV_NAME = "reconstruction.csv"
FIGURE_NAME = "figure7.png"
SAMPLES_GLOB = "samples_epoch*.smi"
# The files of a run besides the Trainer's (checkpoint.pt, metrics.csv); samples_epoch*.smi too.
RUN_FILES = (STATE_NAME, CURVE_CSV_NAME, RECONSTRUCTION_CSV_NAME, FIGURE_NAME)
_STATE_FORMAT = "ddvae_fast.MosesState/1"
INVALID_SAMPLE = "<invalid>"  # how an undecodable sample is written: RDKit does not parse it


# ---------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class MosesProtocol:
    """The ``[moses]`` table of a MOSES config: data subset, schedule and evaluation."""

    train_size: int | None = None  # molecules drawn from the train split; None: all of it
    max_length: int | None = None  # keep molecules of at most this many tokens; None: all
    subset_seed: int = 0  # which molecules the subsets hold
    reconstruction_size: int = 10_000  # held-out molecules (from the test split)
    reconstruction_z: str = "sample"  # 'sample' (z ~ q(z|x), the authors') or 'mu'
    n_samples: int = 10_000  # prior samples per evaluation
    thresholds: tuple = (0.9, 0.8, 0.7)
    pretrain_target: float | None = None  # start the ramp once reconstruction >= this
    pretrain_epochs: int = 20  # ramp start when no target is set, else the latest start
    # lr * lr_gamma every this many epochs of the fixed-beta phase; None: constant (the paper's)
    pretrain_lr_step_epochs: int | None = None
    # lr during the ramp; None: one halving (lr_gamma) below the fixed-beta phase's last rate
    ramp_lr: float | None = None
    beta_ramp_epochs: int = 180
    tau_ramp_epochs: int = 10
    evaluate_pretrained: bool = True  # also score samples at the ramp's start
    stop_after_last_threshold: bool = True

    def __post_init__(self):
        for name in ("train_size", "max_length"):
            value = getattr(self, name)
            if value is not None and check_int(value, name) < 1:
                raise ValueError(f"{name} must be a positive int or absent, got {value!r}")
        if check_int(self.subset_seed, "subset_seed") < 0:
            raise ValueError(f"subset_seed must be >= 0, got {self.subset_seed}")
        for name in ("reconstruction_size", "n_samples", "beta_ramp_epochs", "pretrain_epochs"):
            if check_int(getattr(self, name), name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        step = self.pretrain_lr_step_epochs
        if step is not None and check_int(step, "pretrain_lr_step_epochs") < 1:
            raise ValueError(
                f"pretrain_lr_step_epochs must be a positive int or absent, got {step}"
            )
        if self.ramp_lr is not None and not check_finite_real(self.ramp_lr, "ramp_lr") > 0:
            raise ValueError(f"ramp_lr must be a number > 0 or absent, got {self.ramp_lr!r}")
        if check_int(self.tau_ramp_epochs, "tau_ramp_epochs") < 0:
            raise ValueError(f"tau_ramp_epochs must be >= 0, got {self.tau_ramp_epochs}")
        if self.reconstruction_z not in ("sample", "mu"):
            raise ValueError(
                f"reconstruction_z must be 'sample' or 'mu', got {self.reconstruction_z!r}"
            )
        if not isinstance(self.thresholds, (list, tuple)) or not self.thresholds:
            raise ValueError(f"thresholds must be a non-empty list, got {self.thresholds!r}")
        values = [check_finite_real(t, "a threshold") for t in self.thresholds]
        if any(not 0 < t < 1 for t in values) or values != sorted(set(values), reverse=True):
            raise ValueError(
                f"thresholds must be distinct, in (0, 1) and decreasing, got {self.thresholds!r}"
            )
        object.__setattr__(self, "thresholds", tuple(float(t) for t in values))
        if self.pretrain_target is not None:
            target = check_finite_real(self.pretrain_target, "pretrain_target")
            if not values[0] < target <= 1:
                raise ValueError(
                    f"pretrain_target must lie in (highest threshold {values[0]}, 1], got {target}"
                )
        for name in ("evaluate_pretrained", "stop_after_last_threshold"):
            check_bool(getattr(self, name), name)

    def to_dict(self) -> dict:
        values = asdict(self)
        values["thresholds"] = list(self.thresholds)
        return values

    @classmethod
    def from_dict(cls, values: dict, where: str = "[moses]") -> MosesProtocol:
        check_known_keys(values, cls, where)
        try:
            return cls(**values)
        except TypeError as exc:  # a value of the wrong type is an input error
            raise ValueError(f"{where} {exc}") from None


@dataclass(frozen=True)
class MosesConfig:
    experiment: ExperimentConfig
    protocol: MosesProtocol = field(default_factory=MosesProtocol)

    @property
    def model_name(self) -> str:
        return next(k for k, mode in MODELS.items() if mode == self.experiment.model.mode)

    def to_dict(self) -> dict:
        return {**self.experiment.to_dict(), "moses": self.protocol.to_dict()}

    @classmethod
    def from_dict(cls, values: dict) -> MosesConfig:
        if not isinstance(values, dict):
            raise ValueError(f"a MOSES config must be a table, got {type(values).__name__}")
        values = dict(values)
        protocol = MosesProtocol.from_dict(values.pop("moses", {}))
        experiment = ExperimentConfig.from_dict(values).resolve()
        tc = experiment.train
        if tc.pretrain_epochs or tc.finetune_epochs:
            # The protocol schedules beta itself; the Trainer's beta-0 pretraining
            # stage and its encoder-frozen fine-tuning would change the objective.
            raise ValueError(
                "a MOSES config needs [train] pretrain_epochs = 0 and finetune_epochs = 0 "
                "([moses] pretrain_epochs sets the fixed-beta phase)"
            )
        if not tc.beta_start <= tc.beta_end:
            raise ValueError(f"need beta_start <= beta_end, got {tc.beta_start}, {tc.beta_end}")
        if protocol.pretrain_epochs >= tc.epochs:
            raise ValueError(
                f"[moses] pretrain_epochs ({protocol.pretrain_epochs}) must be below "
                f"[train] epochs ({tc.epochs})"
            )
        return cls(experiment, protocol)


def load_moses_config(path) -> MosesConfig:
    """A MosesConfig from a TOML file: an ExperimentConfig plus a ``[moses]`` table."""
    path = Path(path)
    values = read_config_file(path)
    try:
        return MosesConfig.from_dict(values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"config file {str(path)!r}: {exc}") from None


def builtin_moses_config(model: str, scale: str) -> Path:
    """The shipped config of ``model`` ('ddvae' or 'vae') at ``scale`` ('small' or 'paper')."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; expected one of {tuple(MODELS)}")
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {SCALES}")
    return CONFIG_DIR / f"moses_{model}_{scale}.toml"


# ---------------------------------------------------------------------------
# Data


def _split(name: str) -> list[str]:
    """A MOSES split; an unreadable file of the molsets wheel is one clear error."""
    from .moses_data import load_split

    try:
        return load_split(name)
    except (EOFError, zlib.error, gzip.BadGzipFile, UnicodeDecodeError) as exc:
        raise ValueError(f"the MOSES {name} split cannot be read ({exc})") from None


def _seeded_order(n: int, seed: int) -> np.ndarray:
    return np.random.Generator(np.random.PCG64(seed)).permutation(n)


def _take(pool: list[str], keep: Callable[[str], bool], n: int, seed: int, what: str) -> list[str]:
    """``n`` molecules of ``pool`` that ``keep`` accepts, in a seeded random order: a
    uniform sample of the accepted ones, found without testing the whole pool."""
    chosen = []
    for i in _seeded_order(len(pool), seed).tolist():
        if keep(pool[i]):
            chosen.append(pool[i])
            if len(chosen) == n:
                return chosen
    raise ValueError(f"{what} is {n}, but only {len(chosen)} molecules qualify")


def _token_length(tokenizer: str) -> Callable[[str], int]:
    from .data import TOKENIZERS

    if tokenizer == "char":
        return len  # one token per character
    tokenize = TOKENIZERS[tokenizer]
    return lambda s: len(tokenize(s))


def training_molecules(protocol: MosesProtocol, tokenizer: str) -> list[str]:
    """The training molecules: the train split, length-filtered, optionally subsampled."""
    pool = _split("train")
    length = _token_length(tokenizer)
    limit = protocol.max_length

    def keep(s: str) -> bool:
        return limit is None or length(s) <= limit

    if protocol.train_size is None:
        return pool if limit is None else [s for s in pool if keep(s)]
    what = f"[moses] train_size (molecules of at most {limit} tokens)"
    return _take(pool, keep, protocol.train_size, protocol.subset_seed, what)


def reconstruction_molecules(
    protocol: MosesProtocol, vocabulary: Vocabulary, max_length: int
) -> list[str]:
    """Held-out molecules of the training distribution: a seeded sample of the test split,
    restricted to what the model can encode (its tokens, at most ``max_length`` of them)."""
    known = set(vocabulary.regular_tokens)
    limit = max_length if protocol.max_length is None else min(max_length, protocol.max_length)

    def keep(s: str) -> bool:
        tokens = vocabulary.tokenize(s)
        return len(tokens) <= limit and known.issuperset(tokens)

    what = "[moses] reconstruction_size (test molecules the model can encode)"
    return _take(_split("test"), keep, protocol.reconstruction_size, protocol.subset_seed, what)


def check_metric_inputs() -> None:
    """Load what the evaluations need (fcd_torch, the test sets' statistics, the
    filter lists), so that a missing package or a damaged file fails before training."""
    from .moses_data import STATISTICS, load_statistics
    from .moses_metrics import _filter_patterns

    try:
        import fcd_torch  # noqa: F401  (the ChemNet weights ship in the wheel)
    except ImportError as exc:
        raise ImportError(f"the FCD metric needs fcd_torch ({exc})") from None
    for name in STATISTICS:
        try:
            load_statistics(name)
        except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
            raise ValueError(f"the MOSES {name} statistics cannot be read ({exc})") from None
    try:
        _filter_patterns()
    except (OSError, KeyError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"the MOSES filter lists cannot be read ({exc})") from None


# ---------------------------------------------------------------------------
# The protocol


def first_crossings(
    values: Sequence[float], thresholds: Sequence[float], armed_from: int
) -> dict[float, int]:
    """For each threshold t, the first index i >= ``armed_from`` with values[i] < t
    while some earlier value (any j < i) was >= t: where the reconstruction first
    falls below t. Thresholds never reached, or never left, are absent."""
    out: dict[float, int] = {}
    best = -math.inf
    for i, value in enumerate(values):
        if i >= armed_from:
            for t in thresholds:
                if t not in out and best >= t > value:
                    out[t] = i
        best = max(best, value)
    return out


def _seed(seed: int, epoch: int, stream: int) -> int:
    """A seed for an evaluation draw: a function of (seed, epoch, stream) only."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0])


class MosesTrainer(Trainer):
    """The Trainer with the protocol's schedules (see the module docstring).

    ``protocol`` and ``ramp_begin`` are set by :func:`run_experiment` before
    training; ``ramp_begin`` is None until the fixed-beta phase ends.
    """

    protocol: MosesProtocol | None = None
    ramp_begin: int | None = None

    def _protocol(self) -> MosesProtocol:
        if self.protocol is None:
            raise RuntimeError("MosesTrainer.protocol must be set before training")
        return self.protocol

    def beta(self, epoch: int) -> float:
        tc = self.config.train
        if self.ramp_begin is None:
            return tc.beta_start
        ramp = LinearSchedule(
            tc.beta_start,
            tc.beta_end,
            duration=self._protocol().beta_ramp_epochs,
            begin=self.ramp_begin,
        )
        return ramp(epoch)

    def tau(self, epoch: int) -> float:
        tc = self.config.train
        return LogLinearSchedule(
            tc.tau_start, tc.tau_end, duration=self._protocol().tau_ramp_epochs
        )(epoch)

    def lr(self, epoch: int) -> float:
        tc = self.config.train
        step = self._protocol().pretrain_lr_step_epochs
        if self.ramp_begin is not None and epoch >= self.ramp_begin:
            if self._protocol().ramp_lr is not None:
                return self._protocol().ramp_lr
            # One halving more than epoch ramp_begin had (it trained before the
            # ramp was decided, at the fixed-beta rate).
            return tc.lr * tc.lr_gamma ** ((self.ramp_begin // step if step else 0) + 1)
        return tc.lr * tc.lr_gamma ** (epoch // step if step else 0)


@torch.no_grad()
def measure_reconstruction(model, molecules: Sequence[str], seed: int) -> dict:
    """Exact-match rates of greedy decoding from mu and from one z ~ q(z|x) per molecule."""
    model.eval()
    hits_mu = hits_sample = 0
    sampler = RejectionSampler(model.config.proposal, device=model.device, seed=seed)
    for start in range(0, len(molecules), 4096):
        chunk = list(molecules[start : start + 4096])
        mu, sigma = model.encode(chunk)
        hits_mu += sum(d == s for d, s in zip(model.decode(mu), chunk))
        z = sampler.rsample(mu, sigma)
        hits_sample += sum(d == s for d, s in zip(model.decode(z), chunk))
    n = len(molecules)
    return {"reconstruction_mu": hits_mu / n, "reconstruction_sample": hits_sample / n}


def evaluate_samples(model, n: int, seed: int, n_jobs: int) -> tuple[list, dict]:
    """``n`` prior samples decoded by arg max, and their MOSES metrics against the test sets."""
    from .chem import is_valid
    from .moses_metrics import moses_metrics

    model.eval()
    samples = model.sample(n, seed=seed)
    strings = [s if s is not None else INVALID_SAMPLE for s in samples]
    n_valid = sum(map(is_valid, strings))
    if n_valid < 2:
        # FCD needs a covariance of two or more molecules; with fewer, every
        # distribution metric is undefined: recorded as NaN beside the validity.
        metrics = {**dict.fromkeys(MOSES_KEYS, math.nan), "valid": n_valid / n}
    else:
        with warnings.catch_warnings():
            # unique@10000 over fewer valid samples is expected; n_valid says how many.
            warnings.filterwarnings("ignore", message=r"unique@\d+ from only")
            metrics = moses_metrics(strings, n_jobs=n_jobs)
    metrics["n_valid"] = n_valid
    return strings, metrics


# ---------------------------------------------------------------------------
# Outputs

RECONSTRUCTION_COLUMNS = (
    "epoch",
    "phase",
    "beta",
    "tau",
    "lr",
    "train_sequence_accuracy",
    "reconstruction",
    "reconstruction_mu",
    "reconstruction_sample",
    "train_seconds",
    "measure_seconds",
)


CURVE_COLUMNS = (
    "model",
    "event",
    "epoch",
    "beta",
    "tau",
    "reconstruction",
    "reconstruction_mu",
    "reconstruction_sample",
    "n_samples",
    "n_valid",
    *MOSES_KEYS,
    "eval_seconds",
)


def _csv_text(columns: Sequence[str], rows: Sequence[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return buffer.getvalue()


def _label(state: dict) -> str:
    model = state["config"]["model"]
    name = "DD-VAE" if model["mode"] == "argmax" else "VAE"
    return f"{name} ({model['proposal']})"


def _write_outputs(out: Path, state: dict) -> None:
    """The state and the two CSVs rendered from it (each written atomically)."""
    write_text_atomic(out / STATE_NAME, json.dumps(state, indent=1) + "\n")
    write_text_atomic(
        out / RECONSTRUCTION_CSV_NAME, _csv_text(RECONSTRUCTION_COLUMNS, state["epochs"])
    )
    write_text_atomic(out / CURVE_CSV_NAME, _csv_text(CURVE_COLUMNS, state["evaluations"]))


def load_state(out: Path) -> dict:
    """The protocol state of the run in ``out``, checked enough to continue it."""
    path = Path(out) / STATE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no MOSES run to resume: {str(path)!r} does not exist")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{str(path)!r} is corrupt: {exc}") from None
    keys = {"format", "config", "epochs", "evaluations", "ramp_begin", "finished"}
    if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT or keys - set(state):
        raise ValueError(f"{str(path)!r} is not the state of a ddvae-fast MOSES run")
    try:
        MosesConfig.from_dict(state["config"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{str(path)!r} holds a bad config: {exc}") from None
    if not isinstance(state["epochs"], list) or not isinstance(state["evaluations"], list):
        raise ValueError(f"{str(path)!r} is corrupt: epochs/evaluations are not lists")
    return state


def check_resumable(out: Path) -> dict:
    """The state of ``out`` after checking that its checkpoint loads and matches it."""
    from .trainer import CHECKPOINT_NAME, load_checkpoint

    state = load_state(out)
    checkpoint = load_checkpoint(Path(out) / CHECKPOINT_NAME)
    experiment = {k: v for k, v in state["config"].items() if k != "moses"}
    if checkpoint.get("config") != experiment:
        raise ValueError(
            f"{str(out)!r}: the checkpoint's config differs from the one in {STATE_NAME}; "
            "the run's files do not belong together"
        )
    measured = len(state["epochs"])
    if checkpoint.get("epoch") not in (measured, measured + 1):
        raise ValueError(
            f"{str(out)!r}: the checkpoint is at epoch {checkpoint.get('epoch')} but "
            f"{STATE_NAME} measured {measured} epochs; the run's files do not belong together"
        )
    return state


# ---------------------------------------------------------------------------
# The run


def _new_state(trainer: MosesTrainer, protocol: MosesProtocol, n_molecules: int) -> dict:
    return {
        "format": _STATE_FORMAT,
        # The Trainer's config (max_length resolved from the data) plus the protocol.
        "config": {**trainer.config.to_dict(), "moses": protocol.to_dict()},
        "training_molecules": n_molecules,
        "epochs": [],  # one row per trained epoch (RECONSTRUCTION_COLUMNS)
        "evaluations": [],  # one row per scored sample set (CURVE_COLUMNS)
        # Index (from 0) of the ramp's first epoch B: beta_start up to and including B.
        "ramp_begin": None if protocol.pretrain_target is not None else protocol.pretrain_epochs,
        "finished": False,
        "stopped": None,
    }


class MosesRun:
    """One run of the protocol in ``out``, prepared without writing anything.

    Construction reads the data (and, with ``resume``, the run's state and
    checkpoint), so that bad input fails before any file is touched; ``run``
    trains, measures, evaluates and writes. ``config`` is ignored when resuming
    (the run's own is used).
    """

    def __init__(
        self,
        config: MosesConfig | None,
        out,
        *,
        device="cpu",
        resume: bool = False,
        progress: bool = True,
    ):
        self.out = Path(out)
        self.resumed = resume
        if resume:
            self.state = check_resumable(self.out)
            config = MosesConfig.from_dict(self.state["config"])
        elif config is None:
            raise ValueError("a new MOSES run needs a config")
        self.config = config
        self.trainer: MosesTrainer | None = None
        if resume and self.state["finished"]:
            return  # nothing left to train: nothing else to load
        protocol = config.protocol
        check_metric_inputs()
        strings = training_molecules(protocol, config.experiment.data.tokenizer)
        if resume:
            trainer = MosesTrainer.resume(
                self.out, device=device, progress=progress, strings=strings
            )
        else:
            trainer = MosesTrainer(
                config.experiment, self.out, device=device, progress=progress, strings=strings
            )
            self.state = _new_state(trainer, protocol, len(strings))
        trainer.protocol = protocol
        trainer.ramp_begin = self.state["ramp_begin"]
        self.trainer = trainer
        model = trainer.model
        self.held_out = reconstruction_molecules(
            protocol, model.vocabulary, model.config.max_length
        )

    @property
    def finished(self) -> bool:
        return bool(self.state["finished"])

    def run(
        self,
        *,
        n_jobs: int = 1,
        log: Callable[[str], None] = print,
        stop_after_epochs: int | None = None,
    ) -> dict:
        """Train until the protocol ends; returns the state. ``stop_after_epochs``
        returns once that many epochs are trained and measured, as an interruption
        would (for tests)."""
        started = time.perf_counter()
        out, state, trainer = self.out, self.state, self.trainer
        if state["finished"]:
            log(f"{str(out)!r} is finished ({state['stopped']}): nothing to do")
            return state
        protocol = self.config.protocol
        model = trainer.model
        log(
            f"{_label(state)}: {state['training_molecules']} training molecules (at most "
            f"{model.config.max_length} tokens), {len(self.held_out)} held-out for "
            f"reconstruction, {protocol.n_samples} prior samples per evaluation, at most "
            f"{trainer.config.train.epochs} epochs -> {out}"
            + (f" (resuming after epoch {trainer.epoch})" if self.resumed else "")
        )
        # Nothing is written before the first epoch's checkpoint: a run stopped
        # earlier leaves no run behind, and a plain rerun starts it afresh.
        while True:
            if len(state["epochs"]) < trainer.epoch:
                pass  # a stop came between training the last epoch and measuring it
            elif trainer.epoch >= trainer.config.train.epochs:
                state["finished"], state["stopped"] = True, "the last epoch was trained"
                _write_outputs(out, state)
                break
            elif stop_after_epochs is not None and trainer.epoch >= stop_after_epochs:
                return state
            else:
                trainer.fit(stop_after=trainer.epoch + 1)
            _after_epoch(trainer, state, self.held_out, out, n_jobs, log)
            if state["finished"]:
                break
        evaluations = state["evaluations"]
        if evaluations:
            plot_figure7([(_label(state), evaluations)], out / FIGURE_NAME)
        missing = sorted(set(protocol.thresholds) - _crossed(state), reverse=True)
        log(
            f"finished ({state['stopped']}) after epoch {len(state['epochs'])}: "
            f"{len(evaluations)} evaluations"
            + (f", never fell below {', '.join(f'{t:.0%}' for t in missing)}" if missing else "")
            + f"; wall time {time.perf_counter() - started:.0f}s"
        )
        return state


def run_experiment(config: MosesConfig | None, out, *, device="cpu", resume=False, **run_options):
    """Prepare and run the protocol in ``out`` (see MosesRun); returns the state."""
    progress = run_options.pop("progress", True)
    return MosesRun(config, out, device=device, resume=resume, progress=progress).run(**run_options)


def _crossed(state: dict) -> set[float]:
    return {t for e in state["evaluations"] for t in e["thresholds"]}


def _after_epoch(trainer: MosesTrainer, state: dict, held_out, out: Path, n_jobs: int, log):
    """Measure the epoch just trained, move the schedule on, score samples when due."""
    protocol = trainer.protocol
    epoch = trainer.epoch - 1  # index of the epoch just trained
    trained = trainer.history[epoch]
    started = time.perf_counter()
    seed = trainer.config.train.seed
    with torch.random.fork_rng(devices=[]):  # evaluation never moves the training RNGs
        measured = measure_reconstruction(trainer.model, held_out, _seed(seed, epoch, 1))
    reconstruction = measured[f"reconstruction_{protocol.reconstruction_z}"]
    if state["ramp_begin"] is None:  # an adaptive fixed-beta phase
        if reconstruction >= protocol.pretrain_target:
            state["ramp_begin"] = epoch
        elif epoch + 1 >= protocol.pretrain_epochs:
            state["ramp_begin"] = protocol.pretrain_epochs
        trainer.ramp_begin = state["ramp_begin"]
    ramp_begin = state["ramp_begin"]
    row = {
        "epoch": epoch + 1,
        "phase": "ramp" if ramp_begin is not None and epoch > ramp_begin else "fixed beta",
        "beta": trained["beta"],
        "tau": trained["tau"],
        "lr": trained["lr"],
        "train_sequence_accuracy": trained["sequence_accuracy"],
        "reconstruction": reconstruction,
        **measured,
        "train_seconds": trained["seconds"],
        "measure_seconds": time.perf_counter() - started,
    }
    state["epochs"].append(row)
    log(
        f"epoch {epoch + 1:>3} beta {row['beta']:.4g} tau {row['tau']:.3g} lr {row['lr']:.3g} "
        f"train loss {trained['loss']:.4f} acc {trained['sequence_accuracy']:.4f} | held-out "
        f"reconstruction {reconstruction:.4f} (mu {measured['reconstruction_mu']:.4f}, "
        f"z~q {measured['reconstruction_sample']:.4f}) ({trained['seconds']:.0f}s)"
    )
    due = []
    if protocol.evaluate_pretrained and epoch == ramp_begin:
        due.append([])
    if ramp_begin is not None:
        history = [r["reconstruction"] for r in state["epochs"]]
        crossings = first_crossings(history, protocol.thresholds, ramp_begin)
        new = [t for t, i in crossings.items() if i == epoch and t not in _crossed(state)]
        if new:
            due.append(new)
    for thresholds in due:
        state["evaluations"].append(
            _evaluate(trainer.model, row, thresholds, out, protocol.n_samples, seed, n_jobs, log)
        )
        state["evaluations"][-1]["model"] = _label(state)
    if protocol.stop_after_last_threshold and _crossed(state) == set(protocol.thresholds):
        state["finished"], state["stopped"] = True, "reconstruction fell below every threshold"
    _write_outputs(out, state)


def _evaluate(model, row: dict, thresholds, out: Path, n: int, seed: int, n_jobs: int, log):
    """Score ``n`` prior samples of the model as it is after ``row``'s epoch (and keep them)."""
    started = time.perf_counter()
    epoch = row["epoch"]
    with torch.random.fork_rng(devices=[]):
        samples, metrics = evaluate_samples(model, n, _seed(seed, epoch - 1, 2), n_jobs)
    write_text_atomic(out / f"samples_epoch{epoch:03d}.smi", "\n".join(samples) + "\n")
    event = "below " + ", ".join(f"{t:.0%}" for t in thresholds) if thresholds else "pretrained"
    result = {
        "event": event,
        "thresholds": list(thresholds),
        "epoch": epoch,
        "beta": row["beta"],
        "tau": row["tau"],
        "reconstruction": row["reconstruction"],
        "reconstruction_mu": row["reconstruction_mu"],
        "reconstruction_sample": row["reconstruction_sample"],
        "n_samples": n,
        **metrics,
        "eval_seconds": time.perf_counter() - started,
    }
    log(
        f"  {event} (epoch {epoch}): FCD/Test {metrics['FCD/Test']:.3f} SNN/Test "
        f"{metrics['SNN/Test']:.4f} valid {metrics['valid']:.3f} "
        f"unique@10000 {metrics['unique@10000']:.3f} ({result['eval_seconds']:.0f}s)"
    )
    return result


# ---------------------------------------------------------------------------
# Figure 7


def read_curve(path) -> tuple[str, list[dict]]:
    """(label, rows) of a run's moses_curve.csv (``path``: the run directory or the file)."""
    path = Path(path)
    if path.is_dir():
        path = path / CURVE_CSV_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist (not a finished MOSES run?)")
    try:
        rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{str(path)!r} is not a readable CSV: {exc}") from None
    needed = ("model", "reconstruction", "FCD/Test", "SNN/Test")
    if not rows:
        raise ValueError(f"{str(path)!r} holds no evaluations")
    missing = [c for c in needed if c not in rows[0]]
    if missing:
        raise ValueError(f"{str(path)!r} lacks the columns {missing}: not a MOSES curve")
    parsed = []
    for lineno, row in enumerate(rows, start=2):
        try:
            values = {c: float(row[c]) for c in needed[1:]}
        except (TypeError, ValueError):
            raise ValueError(f"{str(path)!r} line {lineno}: a value is not a number") from None
        parsed.append({**row, **values})
    labels = {row["model"] for row in parsed}
    if len(labels) != 1:
        raise ValueError(f"{str(path)!r} mixes models {sorted(labels)}")
    return labels.pop(), parsed


def plot_figure7(curves: Sequence[tuple[str, Sequence[dict]]], path) -> None:
    """Figure 7: FCD/Test and SNN/Test against reconstruction, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for (label, rows), colour in zip(curves, ("tab:red", "tab:blue", "tab:green", "tab:purple")):
        rows = sorted(rows, key=lambda r: float(r["reconstruction"]))
        x = [float(r["reconstruction"]) for r in rows]
        for ax, key in zip(axes, ("FCD/Test", "SNN/Test")):
            ax.plot(x, [float(r[key]) for r in rows], "o-", color=colour, label=label)
    for ax, key, better in zip(axes, ("FCD/Test", "SNN/Test"), ("lower", "higher")):
        ax.set_xlabel("sequence reconstruction accuracy (held-out)")
        ax.set_ylabel(f"{key} ({better} is better)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("MOSES distribution learning (Figure 7)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, lambda handle: handle.write(buffer.getvalue()), binary=True)
