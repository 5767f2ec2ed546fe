"""The MOSES experiment (`ddvae-fast moses`): protocol logic, configs, files, refusals.

Runs use a tiny model on a few dozen MOSES molecules. Where a test needs the
reconstruction to follow a given path (to reach 95%, then fall below each
threshold), the measurement is scripted per epoch and the sample scoring is
replaced by a recorder; the training itself is real.
"""

import csv
import json
import math
import zipfile

import pytest
import tomllib

from ddvae_fast.seqvae import cli
from ddvae_fast.seqvae import moses_experiment as mx
from ddvae_fast.seqvae.moses_metrics import MOSES_KEYS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = """
name = "tiny"
[data]
source = "moses"
tokenizer = "char"
[model]
embedding_dim = 8
hidden_size = 16
num_layers = 1
latent_dim = 4
prior = "gaussian"
proposal = "{proposal}"
mode = "{mode}"
[train]
epochs = {epochs}
batch_size = 32
lr = 1e-3
lr_gamma = 0.5
pretrain_epochs = 0
finetune_epochs = 0
beta_start = 0.001
beta_end = 0.011
tau_start = 0.2
tau_end = 0.1
seed = 3
[moses]
train_size = 64
max_length = 20
reconstruction_size = 12
n_samples = 30
pretrain_epochs = {pretrain_epochs}
beta_ramp_epochs = 4
tau_ramp_epochs = 2
{extra}
"""


def tiny_config(tmp_path, name="tiny.toml", mode="argmax", epochs=3, pretrain_epochs=1, extra=""):
    path = tmp_path / name
    proposal = "triweight" if mode == "argmax" else "gaussian"
    path.write_text(
        TINY.format(
            proposal=proposal,
            mode=mode,
            epochs=epochs,
            pretrain_epochs=pretrain_epochs,
            extra=extra,
        )
    )
    return path


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# ---------------------------------------------------------------------------
# Crossing detection


def test_first_crossings_on_a_scripted_sequence():
    values = [0.5, 0.96, 0.93, 0.89, 0.91, 0.75, 0.6, 0.95, 0.5]
    # 0.9: first below at 3 (0.89); 0.8: 5 (0.75); 0.7: 6 (0.6); later dips count no more.
    assert mx.first_crossings(values, (0.9, 0.8, 0.7), armed_from=1) == {0.9: 3, 0.8: 5, 0.7: 6}


def test_first_crossings_ignores_dips_before_it_is_armed():
    # Pretraining noise (0.85 at index 1) is not a crossing; the ramp starts at 2.
    assert mx.first_crossings([0.91, 0.85, 0.96, 0.95], (0.9, 0.8), armed_from=2) == {}
    assert mx.first_crossings([0.91, 0.85, 0.96, 0.7], (0.9, 0.8), armed_from=2) == {
        0.9: 3,
        0.8: 3,
    }


def test_first_crossings_needs_the_level_reached_before_and_strictly_left():
    # Never at or above 0.9: no crossing of it; 0.9 itself is not below 0.9.
    assert mx.first_crossings([0.85, 0.5], (0.9, 0.8, 0.7), armed_from=0) == {0.8: 1, 0.7: 1}
    assert mx.first_crossings([0.95, 0.9, 0.89], (0.9,), armed_from=0) == {0.9: 2}
    assert mx.first_crossings([], (0.9,), armed_from=0) == {}


# ---------------------------------------------------------------------------
# The paper configs hold the authors' values (issue 15, configs/moses/*.ini)


def linear_growth(start, end, start_epoch, end_epoch, epoch, log=False):
    """The authors' LinearGrowth (dd_vae/utils.py), restated."""
    if log:
        start, end = math.log10(start), math.log10(end)
    if epoch <= start_epoch:
        value = start
    elif epoch >= end_epoch:
        value = end
    else:
        value = start + (end - start) * (epoch - start_epoch) / (end_epoch - start_epoch)
    return 10**value if log else value


@pytest.mark.parametrize(
    ("model", "proposal", "mode", "beta"),
    [("ddvae", "triweight", "argmax", (0.0015, 0.02)), ("vae", "gaussian", "sample", (5e-4, 0.01))],
)
def test_paper_configs_hold_the_authors_values(model, proposal, mode, beta):
    path = mx.builtin_moses_config(model, "paper")
    raw = tomllib.loads(path.read_text())
    assert raw["model"] == {
        "embedding_dim": 64,
        "hidden_size": 512,
        "num_layers": 2,
        "latent_dim": 64,
        "prior": "gaussian",
        "proposal": proposal,
        "mode": mode,
    }
    t = raw["train"]
    assert (t["epochs"], t["batch_size"], t["lr"], t["lr_gamma"]) == (200, 512, 5e-4, 0.5)
    assert t["clip_grad_value"] == 10.0  # the element-wise clamp, their `clamp = 10`
    assert (t["beta_start"], t["beta_end"]) == beta
    assert (t["tau_start"], t["tau_end"]) == (0.2, 0.1)
    m = raw["moses"]
    assert (m["pretrain_epochs"], m["beta_ramp_epochs"], m["tau_ramp_epochs"]) == (20, 180, 10)
    assert m["n_samples"] == 10000 and m["thresholds"] == [0.9, 0.8, 0.7]
    assert "train_size" not in m and "max_length" not in m  # the whole train split

    # The schedules the trainer applies, against the authors' formulas.
    config = mx.load_moses_config(path)
    small = config.experiment.with_overrides(model={"hidden_size": 8, "embedding_dim": 4})
    trainer = mx.MosesTrainer(small, "unused", progress=False, strings=["CCO", "c1ccccc1"])
    trainer.protocol = config.protocol
    trainer.ramp_begin = 20  # the fixed-beta phase of the paper config
    for epoch in (0, 5, 19, 20, 21, 100, 199, 200):
        assert trainer.beta(epoch) == pytest.approx(linear_growth(*beta, 20, 200, epoch))
        assert trainer.tau(epoch) == pytest.approx(linear_growth(0.2, 0.1, 0, 10, epoch, log=True))
        assert trainer.lr(epoch) == (5e-4 if epoch < 20 else 2.5e-4)  # MultiStepLR([20], 0.5)
    assert config.experiment.train.clip_grad_value == 10.0


def test_small_configs_load_and_pair_up():
    ddvae = mx.load_moses_config(mx.builtin_moses_config("ddvae", "small"))
    vae = mx.load_moses_config(mx.builtin_moses_config("vae", "small"))
    assert (ddvae.model_name, vae.model_name) == ("ddvae", "vae")
    # Same data, model size and protocol: only the objective and its beta differ.
    assert ddvae.protocol == vae.protocol
    assert ddvae.experiment.data == vae.experiment.data
    for key in ("embedding_dim", "hidden_size", "num_layers", "latent_dim", "prior"):
        assert getattr(ddvae.experiment.model, key) == getattr(vae.experiment.model, key)
    assert ddvae.protocol.n_samples == 10000 and ddvae.protocol.pretrain_target == 0.95


# ---------------------------------------------------------------------------
# End to end


def test_command_runs_end_to_end(tmp_path, capsys):
    """A real tiny run: the pretrained point is scored (the tiny model never reaches
    the thresholds), the files hold the documented columns, and a second run into
    the same directory is refused."""
    config = tiny_config(tmp_path)
    out = tmp_path / "run"
    args = ["moses", "--model", "ddvae", "--config", str(config), "--out", str(out)]
    assert cli.main([*args, "--no-progress"]) == 0
    curve = read_csv(out / mx.CURVE_CSV_NAME)
    assert tuple(curve[0]) == mx.CURVE_COLUMNS
    assert set(MOSES_KEYS) <= set(curve[0]) and "FCD/Test" in curve[0]
    assert [(r["event"], r["epoch"]) for r in curve] == [("pretrained", "2")]
    assert curve[0]["model"] == "DD-VAE (triweight)" and curve[0]["n_samples"] == "30"
    per_epoch = read_csv(out / mx.RECONSTRUCTION_CSV_NAME)
    assert [r["epoch"] for r in per_epoch] == ["1", "2", "3"]
    assert [float(r["beta"]) for r in per_epoch] == pytest.approx([0.001, 0.001, 0.0035])
    samples = (out / "samples_epoch002.smi").read_text().splitlines()
    assert len(samples) == 30
    decoded = sum(s != mx.INVALID_SAMPLE for s in samples)
    assert float(curve[0]["valid"]) * 30 == int(curve[0]["n_valid"]) <= decoded
    assert (out / mx.FIGURE_NAME).read_bytes()[:4] == b"\x89PNG"
    state = json.loads((out / mx.STATE_NAME).read_text())
    assert state["finished"] and state["stopped"] == "the last epoch was trained"

    capsys.readouterr()
    assert cli.main([*args, "--no-progress"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    # --resume of a finished run does nothing and changes nothing.
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    resume = ["moses", "--model", "ddvae", "--out", str(out), "--resume", "--no-progress"]
    assert cli.main(resume) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    figure = tmp_path / "fig.png"
    assert cli.main(["moses-figure", "--runs", str(out), str(out), "--out", str(figure)]) == 0
    assert figure.read_bytes()[:4] == b"\x89PNG"


class Scripted:
    """Reconstruction per epoch from a script; sample scoring recorded, not run."""

    def __init__(self, monkeypatch, seed, script):
        self.by_seed = {mx._seed(seed, e, 1): v for e, v in enumerate(script)}
        self.scored = []
        monkeypatch.setattr(mx, "measure_reconstruction", self.measure)
        monkeypatch.setattr(mx, "evaluate_samples", self.evaluate)
        monkeypatch.setattr(mx, "plot_figure7", lambda curves, path: None)  # tested end to end
        self.seed = seed

    def measure(self, model, molecules, seed):
        value = self.by_seed[seed]
        return {"reconstruction_mu": value, "reconstruction_sample": value}

    def evaluate(self, model, n, seed, n_jobs):
        epoch = next(e for e in range(100) if mx._seed(self.seed, e, 2) == seed)
        self.scored.append(epoch)
        metrics = {key: 0.5 for key in MOSES_KEYS}
        return ["C"] * n, {**metrics, "n_valid": n}


SCRIPT = [0.5, 0.96, 0.93, 0.89, 0.91, 0.75, 0.6, 0.99, 0.99, 0.99]
ADAPTIVE = "pretrain_target = 0.95"


def test_protocol_follows_the_reconstruction(tmp_path, monkeypatch):
    """The ramp starts at the epoch that reaches 95% (lr halved from the next one),
    samples are scored there and at each first fall below 90/80/70%, and the run
    stops after the last: epochs (from 1) 2, 4, 6 and 7 of SCRIPT."""
    scripted = Scripted(monkeypatch, 3, SCRIPT)
    config = mx.load_moses_config(
        tiny_config(tmp_path, epochs=10, pretrain_epochs=5, extra=ADAPTIVE)
    )
    state = mx.run_experiment(config, tmp_path / "run", progress=False, log=lambda _: None)
    assert state["ramp_begin"] == 1 and state["finished"]
    assert [(e["event"], e["epoch"]) for e in state["evaluations"]] == [
        ("pretrained", 2),
        ("below 90%", 4),
        ("below 80%", 6),
        ("below 70%", 7),
    ]
    assert scripted.scored == [1, 3, 5, 6]
    rows = state["epochs"]
    assert len(rows) == 7  # stopped after the last threshold, not at [train] epochs = 10
    want_beta = [0.001 + 0.01 * min(max(e - 1, 0), 4) / 4 for e in range(7)]
    assert [r["beta"] for r in rows] == pytest.approx(want_beta)
    assert [r["lr"] for r in rows] == pytest.approx([1e-3, 1e-3] + [5e-4] * 5)
    curve = read_csv(tmp_path / "run" / mx.CURVE_CSV_NAME)
    assert [float(r["reconstruction"]) for r in curve] == [0.96, 0.89, 0.75, 0.6]
    assert [float(r["beta"]) for r in curve] == pytest.approx([want_beta[e] for e in (1, 3, 5, 6)])


def test_pretrain_lr_steps_then_one_more_halving_at_the_ramp(tmp_path, monkeypatch):
    # lr halves every 2 fixed-beta epochs; 95% is reached after epoch index 4,
    # so epochs 0-4 train at 1e-3 * 0.5 ** (e // 2) and the ramp at one halving more.
    Scripted(monkeypatch, 3, [0.5, 0.6, 0.7, 0.8, 0.96, 0.89, 0.75, 0.6])
    config = mx.load_moses_config(
        tiny_config(
            tmp_path, epochs=10, pretrain_epochs=8, extra=ADAPTIVE + "\npretrain_lr_step_epochs = 2"
        )
    )
    state = mx.run_experiment(config, tmp_path / "run", progress=False, log=lambda _: None)
    assert state["ramp_begin"] == 4
    want = [1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4] + [1.25e-4] * (len(state["epochs"]) - 5)
    assert [r["lr"] for r in state["epochs"]] == pytest.approx(want)
    with pytest.raises(ValueError, match="pretrain_lr_step_epochs"):
        mx.MosesProtocol(pretrain_lr_step_epochs=0)
    for bad in (0.0, -1e-3, math.nan, "1e-3"):
        with pytest.raises((ValueError, TypeError), match="ramp_lr"):
            mx.MosesProtocol(ramp_lr=bad)


def test_ramp_lr_sets_the_ramps_rate(tmp_path, monkeypatch):
    Scripted(monkeypatch, 3, [0.5, 0.6, 0.7, 0.8, 0.96, 0.89, 0.75, 0.6])
    extra = ADAPTIVE + "\npretrain_lr_step_epochs = 2\nramp_lr = 3e-4"
    config = mx.load_moses_config(tiny_config(tmp_path, epochs=10, pretrain_epochs=8, extra=extra))
    state = mx.run_experiment(config, tmp_path / "run", progress=False, log=lambda _: None)
    want = [1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4] + [3e-4] * (len(state["epochs"]) - 5)
    assert [r["lr"] for r in state["epochs"]] == pytest.approx(want)


def test_the_fixed_beta_phase_ends_at_pretrain_epochs_if_the_target_is_never_reached(
    tmp_path, monkeypatch
):
    Scripted(monkeypatch, 3, [0.5, 0.6, 0.7, 0.6, 0.5])
    config = mx.load_moses_config(
        tiny_config(tmp_path, epochs=5, pretrain_epochs=2, extra=ADAPTIVE)
    )
    state = mx.run_experiment(config, tmp_path / "run", progress=False, log=lambda _: None)
    assert state["ramp_begin"] == 2
    # Scored at the ramp's start; 0.7 was reached only during the ramp and left at 0.6.
    assert [(e["event"], e["epoch"]) for e in state["evaluations"]] == [
        ("pretrained", 3),
        ("below 70%", 4),
    ]
    assert state["stopped"] == "the last epoch was trained"


def test_an_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    config = mx.load_moses_config(
        tiny_config(tmp_path, epochs=10, pretrain_epochs=5, extra=ADAPTIVE)
    )
    quiet = {"progress": False, "log": lambda _: None}
    Scripted(monkeypatch, 3, SCRIPT)
    whole = mx.run_experiment(config, tmp_path / "whole", **quiet)
    Scripted(monkeypatch, 3, SCRIPT)
    mx.run_experiment(config, tmp_path / "cut", stop_after_epochs=3, **quiet)
    # A stop between training an epoch and measuring it: drop the last measurement.
    state = json.loads((tmp_path / "cut" / mx.STATE_NAME).read_text())
    state["epochs"].pop()
    (tmp_path / "cut" / mx.STATE_NAME).write_text(json.dumps(state))
    resumed = mx.run_experiment(None, tmp_path / "cut", resume=True, **quiet)

    def timeless(rows):
        return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]

    assert timeless(resumed["epochs"]) == timeless(whole["epochs"])
    assert timeless(resumed["evaluations"]) == timeless(whole["evaluations"])


# ---------------------------------------------------------------------------
# Refusals: one line on stderr, exit code 2, before any training


def refused(argv, capsys, match):
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert match in err, err


def test_argument_errors(tmp_path, capsys):
    config = tiny_config(tmp_path)
    out = ["--out", str(tmp_path / "run")]
    base = ["moses", "--model", "ddvae", *out]
    refused([*base, "--threads", "0"], capsys, "--threads must be >= 1")
    refused([*base, "--resume", "--overwrite"], capsys, "pick one")
    refused([*base, "--resume", "--config", str(config)], capsys, "drop --config")
    refused([*base, "--device", "tpu"], capsys, "--device")
    refused([*base, "--resume"], capsys, "holds no MOSES run")
    refused(["moses", "--model", "vae", "--config", str(config), *out], capsys, "trains a ddvae")
    bad = tmp_path / "bad.toml"
    bad.write_text("[moses\n")
    refused(["moses", "--model", "ddvae", "--config", str(bad), *out], capsys, "not valid TOML")
    bad.write_text(tiny_config(tmp_path).read_text() + "colour = 1\n")
    refused(["moses", "--model", "ddvae", "--config", str(bad), *out], capsys, "unknown settings")
    bad.write_text(tiny_config(tmp_path, extra="thresholds = [0.7, 0.9]").read_text())
    refused(["moses", "--model", "ddvae", "--config", str(bad), *out], capsys, "decreasing")
    bad.write_text(
        tiny_config(tmp_path).read_text().replace("pretrain_epochs = 0", "pretrain_epochs = 1")
    )
    refused(
        ["moses", "--model", "ddvae", "--config", str(bad), *out], capsys, "pretrain_epochs = 0"
    )
    assert not (tmp_path / "run").exists()  # nothing was created by a refused command
    refused(["moses-figure", "--runs", str(tmp_path), "--out", "x.png"], capsys, "does not exist")
    refused(["moses-figure", "--runs", str(tmp_path), "--out", str(tmp_path)], capsys, "directory")


def test_corrupt_run_files_are_refused_on_resume(tmp_path, capsys, monkeypatch):
    Scripted(monkeypatch, 3, SCRIPT)
    config = tiny_config(tmp_path, epochs=4, pretrain_epochs=3, extra=ADAPTIVE)
    out = tmp_path / "run"
    mx.run_experiment(
        mx.load_moses_config(config), out, stop_after_epochs=2, progress=False, log=lambda _: None
    )
    resume = ["moses", "--model", "ddvae", "--out", str(out), "--resume", "--no-progress"]
    state = (out / mx.STATE_NAME).read_bytes()
    (out / mx.STATE_NAME).write_bytes(state[: len(state) // 2])
    refused(resume, capsys, "is corrupt")
    (out / mx.STATE_NAME).write_bytes(state)
    checkpoint = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(checkpoint[: len(checkpoint) // 2])
    refused(resume, capsys, "checkpoint is corrupt")
    (out / "checkpoint.pt").write_bytes(checkpoint)
    refused(["moses", "--model", "vae", "--out", str(out), "--resume"], capsys, "trains a ddvae")
    curve = out / mx.CURVE_CSV_NAME
    curve.write_text("model,reconstruction,FCD/Test,SNN/Test\nDD-VAE,0.9,abc,0.5\n")
    refused(
        ["moses-figure", "--runs", str(out), "--out", str(tmp_path / "f.png")], capsys, "line 2"
    )


@pytest.mark.parametrize(
    ("target", "error", "match"),
    [
        ("load_split", EOFError("Compressed file ended early"), "split cannot be read"),
        ("load_statistics", zipfile.BadZipFile("File is not a zip file"), "statistics cannot"),
    ],
)
def test_damaged_moses_files_fail_before_training(
    tmp_path, capsys, monkeypatch, target, error, match
):
    """What the molsets wheel ships is read before the first epoch: a damaged file
    is one line, exit 2, and --out is not created."""
    from ddvae_fast.seqvae import moses_data

    def damaged(name):
        raise error

    monkeypatch.setattr(moses_data, target, damaged)
    out = tmp_path / "run"
    argv = ["moses", "--model", "ddvae", "--config", str(tiny_config(tmp_path)), "--out", str(out)]
    refused(argv, capsys, match)
    assert not out.exists()
