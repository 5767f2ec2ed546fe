"""`ddvae-fast train` refuses bad input before the first epoch: one line
"error: ...", exit code 2, and nothing in --out changed (file bytes and mtimes)."""

import gzip
import os
import sys
from pathlib import Path

import pytest
import torch

from ddvae_fast.seqvae import cli
from ddvae_fast.seqvae.model import SequenceDDVAE

# The models under test are tiny; see one_torch_thread in conftest.py.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = """
name = "tiny"
[data]
source = "synthetic"
n_samples = 256
length = 6
p_one = 0.8
[model]
embedding_dim = 4
hidden_size = 8
num_layers = 1
latent_dim = 2
[train]
epochs = 1
batch_size = 128
pretrain_epochs = 0
finetune_epochs = 0
beta_end = 0.05
"""

FAST = ["--no-progress", "--divergence-samples", "2000"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished tiny run: its directory, reused (read-only) by the tests."""
    root = tmp_path_factory.mktemp("run")
    config = root / "tiny.toml"
    config.write_text(TINY)
    out = root / "out"
    before = torch.get_num_threads()
    assert cli.main(["train", "--config", str(config), "--out", str(out), *FAST]) == 0
    torch.set_num_threads(before)
    return config, out


def _snapshot(directory: Path) -> dict:
    return {
        p.name: (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


def _refused(capsys, argv, *messages) -> None:
    """main(argv) exits 2 with one line on stderr naming each of ``messages``."""
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for message in messages:
        assert message in lines[0], (message, lines[0])


def _copy_run(finished_run, tmp_path) -> Path:
    _, out = finished_run
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in out.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    return copy


def test_an_existing_run_is_refused_without_resume_or_overwrite(finished_run, tmp_path, capsys):
    config, _ = finished_run
    out = _copy_run(finished_run, tmp_path)
    before = _snapshot(out)
    _refused(
        capsys,
        ["train", "--config", str(config), "--out", str(out), *FAST],
        "already holds a run",
        "--resume",
        "--overwrite",
    )
    _refused(
        capsys,
        ["train", "--config", str(config), "--out", str(out), "--resume", "--overwrite"],
        "pick one",
    )
    assert _snapshot(out) == before


def test_overwrite_replaces_the_run_and_stale_temporaries_are_removed(
    finished_run, tmp_path, capsys
):
    config, _ = finished_run
    out = _copy_run(finished_run, tmp_path)
    # What a write killed between mkstemp and rename leaves behind (io.atomic_write).
    (out / ".tmp-abc123").write_bytes(b"half a checkpoint")
    old = (out / "checkpoint.pt").stat().st_mtime_ns
    argv = ["train", "--config", str(config), "--out", str(out), "--overwrite", "--seed", "1"]
    assert cli.main([*argv, *FAST]) == 0
    capsys.readouterr()
    assert not (out / ".tmp-abc123").exists()
    assert (out / "checkpoint.pt").stat().st_mtime_ns != old
    assert not list(out.glob(".tmp-*"))


def test_resume_removes_stale_temporaries(finished_run, tmp_path, capsys):
    out = _copy_run(finished_run, tmp_path)
    (out / ".tmp-killed").write_bytes(b"")
    assert cli.main(["train", "--resume", "--out", str(out), *FAST]) == 0
    capsys.readouterr()
    assert not (out / ".tmp-killed").exists()


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda b: b[: len(b) // 2], "checkpoint is corrupt"),  # truncated
        (lambda b: b"", "checkpoint is corrupt"),  # empty
        (lambda b: b"not a zip file at all", "checkpoint is corrupt"),
    ],
    ids=["truncated", "empty", "garbage"],
)
def test_a_damaged_checkpoint_is_one_line_and_exit_2(
    finished_run, tmp_path, capsys, damage, message
):
    out = _copy_run(finished_run, tmp_path)
    path = out / "checkpoint.pt"
    path.write_bytes(damage(path.read_bytes()))
    before = _snapshot(out)
    _refused(capsys, ["train", "--resume", "--out", str(out), *FAST], message)
    assert _snapshot(out) == before


def test_a_flipped_byte_in_tensor_data_is_caught(finished_run, tmp_path, capsys):
    # torch.load reads such a file without complaint; only the digest stored
    # in the checkpoint (trainer._state_digest) notices.
    out = _copy_run(finished_run, tmp_path)
    path = out / "checkpoint.pt"
    data = bytearray(path.read_bytes())
    weight = torch.load(path, weights_only=True)["model"]["state_dict"]["decoder_rnn.weight_hh_l0"]
    start = bytes(data).find(weight.numpy().tobytes())
    assert start > 0
    data[start + 17] ^= 0x01
    path.write_bytes(bytes(data))
    torch.load(path, weights_only=True)  # loads: the damage is invisible to torch
    before = _snapshot(out)
    _refused(capsys, ["train", "--resume", "--out", str(out), *FAST], "checkpoint is corrupt")
    assert _snapshot(out) == before


def test_any_flipped_byte_is_caught_or_harmless(finished_run, tmp_path):
    # Property over many positions: load_checkpoint either raises
    # CorruptCheckpointError or returns exactly the saved state (a flip in zip
    # padding or an unused header field changes nothing that is read).
    from ddvae_fast.seqvae.trainer import CorruptCheckpointError, _state_digest, load_checkpoint

    _, out = finished_run
    original = (out / "checkpoint.pt").read_bytes()
    expected = _state_digest(load_checkpoint(out / "checkpoint.pt"))
    path = tmp_path / "checkpoint.pt"
    generator = torch.Generator().manual_seed(0)
    positions = torch.randint(0, len(original), (150,), generator=generator).tolist()
    caught = 0
    for i in positions:
        data = bytearray(original)
        data[i] ^= 0xFF
        path.write_bytes(bytes(data))
        try:
            state = load_checkpoint(path)
        except CorruptCheckpointError:
            caught += 1
            continue
        assert _state_digest(state) == expected, i
    assert caught > 0


def test_resume_refuses_changed_data(tmp_path, capsys):
    data = tmp_path / "strings.txt"
    data.write_text("\n".join(["0110", "1", "111", "0101", "10"] * 20) + "\n")
    config = tmp_path / "tiny.toml"
    config.write_text(
        TINY.replace('source = "synthetic"', 'source = "x"').replace("n_samples = 256\n", "")
    )
    out = tmp_path / "out"
    argv = ["train", "--config", str(config), "--data", str(data), "--out", str(out)]
    # A finished run; resuming it would re-evaluate, but the data changed meanwhile.
    assert cli.main([*argv, "--epochs", "2", *FAST]) == 0
    capsys.readouterr()
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["data_fingerprint"]
    data.write_text("\n".join(["0110", "1", "111", "0101", "11"] * 20) + "\n")
    before = _snapshot(out)
    _refused(capsys, ["train", "--resume", "--out", str(out), *FAST], "training data changed")
    assert _snapshot(out) == before


BAD_CONFIGS = {
    "lr_inf": ("[train]\nlr = inf\n", "lr must be finite"),
    "lr_nan": ("[train]\nlr = nan\n", "lr must be finite"),
    "epochs_bool": ("[train]\nepochs = true\n", "epochs must be an int"),
    "beta_str": ('[train]\nbeta_end = "0.05"\n', "beta_end must be a real number"),
    "seed_negative": ("[train]\nseed = -1\n", "seed must be a non-negative int"),
    "p_one_str": ('[data]\np_one = "0.8"\n', "p_one must be a real number"),
    "hidden_float": ("[model]\nhidden_size = 8.5\n", "hidden_size must be a positive int"),
    "rules_not_array": ("rules = 3\n", "rules must be an array"),
    "rule_no_set": ("[[rules]]\nwhen = { proposal = 'uniform' }\n", "rules[0]"),
    "rule_bad_value": (
        "[[rules]]\nwhen = { proposal = 'uniform' }\nset = { lr = -1.0 }\n",
        "rules[0].set",
    ),
    "rule_bad_model_value": (
        "[[rules]]\nwhen = { prior = 'gaussian' }\nset = { decoder_input = 'atanh' }\n",
        "rules[0].set",
    ),
    "rule_bad_key": ("[[rules]]\nwhen = { colour = 1 }\nset = { lr = 1e-3 }\n", "rules[0].when"),
    "not_toml": ("[train\n", "not valid TOML"),
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_bad_config_values_are_refused_before_training(name, tmp_path, capsys):
    text, message = BAD_CONFIGS[name]
    config = tmp_path / "bad.toml"
    config.write_text(text)
    out = tmp_path / "out"
    _refused(capsys, ["train", "--config", str(config), "--out", str(out), *FAST], message)
    assert not out.exists()  # nothing was created


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--eval-samples", "0"], "--eval-samples must be a positive int"),
        (["--eval-samples", "-5"], "--eval-samples must be a positive int"),
        (["--divergence-samples", "0"], "--divergence-samples must be a positive int"),
        (["--seed", "-1"], "--seed must lie in"),
        (["--seed", str(2**64)], "--seed must lie in"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--epochs", "0"], "--epochs must be a positive int"),
        (["--device", "banana"], "--device 'banana' is not a torch device"),
        (["--device", "meta"], "--device must be cpu"),
        (["--column", "smiles"], "--column needs --data"),
    ],
)
def test_bad_flags_are_refused_before_training(flags, message, tmp_path, capsys):
    out = tmp_path / "out"
    _refused(capsys, ["train", "--out", str(out), *FAST, *flags], message)  # flags win
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the device works")
def test_cuda_without_cuda_is_refused(tmp_path, capsys):
    _refused(capsys, ["train", "--out", str(tmp_path / "o"), "--device", "cuda"], "CUDA")


def test_paths_of_the_wrong_kind_are_refused(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    a_dir = tmp_path / "a_dir"
    a_dir.mkdir()
    _refused(capsys, ["train", "--out", str(a_file), *FAST], "is a file")
    _refused(capsys, ["train", "--out", str(a_file / "below"), *FAST], "is a file")
    _refused(capsys, ["train", "--config", str(a_dir), "--out", str(tmp_path / "o")], "directory")
    _refused(capsys, ["train", "--data", str(a_dir), "--out", str(tmp_path / "o")], "directory")
    _refused(capsys, ["train", "--resume", "--out", str(a_dir)], "no checkpoint")
    (a_dir / "checkpoint.pt").mkdir()
    _refused(capsys, ["train", "--resume", "--out", str(a_dir)], "is a directory")
    assert a_file.read_text() == "x"


@pytest.mark.skipif(sys.platform != "linux", reason="needs /proc, where nothing can be created")
def test_an_out_that_cannot_be_written_is_refused(tmp_path, capsys):
    # /proc refuses new directories even to root, who may write into any
    # chmod-read-only directory: the one unwritable place a test can count on.
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    out = "/proc/ddvae-fast-test-out"
    _refused(capsys, ["train", "--config", str(config), "--out", out, *FAST], "is not writable")
    assert not os.path.exists(out)


def test_a_read_only_out_is_refused_when_permissions_apply(tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only directories; see the /proc test above")
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        _refused(capsys, ["train", "--config", str(config), "--out", str(out)], "not writable")
    finally:
        out.chmod(0o755)


def test_corrupt_gzip_data_is_refused(tmp_path, capsys):
    good = gzip.compress(("\n".join(["0110", "1", "111"] * 50) + "\n").encode())
    truncated = tmp_path / "strings.txt.gz"
    truncated.write_bytes(good[: len(good) // 2])
    out = tmp_path / "out"
    argv = ["train", "--data", str(truncated), "--out", str(out), *FAST]
    _refused(capsys, argv, "cannot be read")
    not_gzip = tmp_path / "plain.txt.gz"
    not_gzip.write_bytes(b"0110\n1\n")
    _refused(capsys, ["train", "--data", str(not_gzip), "--out", str(out), *FAST], "cannot be read")
    assert not out.exists()


def test_encode_refuses_a_single_string(finished_run):
    _, out = finished_run
    model = SequenceDDVAE.load(out / "checkpoint.pt")
    with pytest.raises(TypeError, match="list of str"):
        model.encode("101010")
