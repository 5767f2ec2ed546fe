"""`ddvae-fast train`: outputs, presets, resume, SMILES data, errors (tiny runs)."""

import json

import pytest
import torch

from ddvae_fast.seqvae import cli

# The models under test are tiny; see one_torch_thread in conftest.py.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


TINY = """
name = "tiny"
[data]
source = "synthetic"
n_samples = 1024
length = 6
p_one = 0.8
[model]
embedding_dim = 4
hidden_size = 16
num_layers = 1
latent_dim = 2
prior = "uniform"
proposal = "tricube"
mode = "argmax"
[train]
epochs = 2
batch_size = 256
lr = 1e-2
pretrain_epochs = 1
finetune_epochs = 1
beta_end = 0.05
[[rules]]
when = { mode = "sample" }
set = { beta_end = 0.1 }
"""

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


def test_train_writes_checkpoint_metrics_and_map(tmp_path, tiny_config, capsys):
    out = tmp_path / "run"
    code = cli.main(
        [
            "train",
            "--config",
            str(tiny_config),
            "--epochs",
            "2",
            "--out",
            str(out),
            "--no-progress",
            "--divergence-samples",
            "5000",
            "--seed",
            "3",
        ]
    )
    assert code == 0
    assert (out / "checkpoint.pt").is_file()
    assert (out / "latent_map.png").read_bytes()[:8] == PNG
    assert len((out / "metrics.csv").read_text().strip().splitlines()) == 1 + 2 + 1
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("reconstruction_accuracy", "sampled_reconstruction_accuracy", "prior_decoding_tv"):
        assert 0.0 <= metrics[key] <= 1.0 + 1e-12  # sums of 64 float64 probabilities
    assert len(metrics["per_string"]) == 64
    assert sum(r["true_probability"] for r in metrics["per_string"]) == pytest.approx(1.0)
    decoded = sum(r["decoded_probability"] for r in metrics["per_string"])
    assert decoded + metrics["prior_decoding_lost_mass"] == pytest.approx(1.0)
    assert metrics["config"]["train"]["seed"] == 3 and metrics["epochs_completed"] == 3
    assert metrics["prior_decoding_divergence_samples"] == 5000
    assert metrics["prior_decoding_js"] >= 0 and metrics["prior_decoding_kl"] >= 0
    printed = capsys.readouterr().out
    assert "true" in printed and "decoded" in printed and "111111" in printed

    # Resuming a finished run trains nothing more and re-evaluates the same model.
    resume = [
        "train",
        "--resume",
        "--out",
        str(out),
        "--no-progress",
        "--divergence-samples",
        "5000",
    ]
    assert cli.main(resume) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert again["epochs_this_run"] == 0
    assert again["reconstruction_accuracy"] == metrics["reconstruction_accuracy"]
    assert again["prior_decoding_tv"] == metrics["prior_decoding_tv"]
    assert cli.main(["train", "--resume", "--out", str(out), "--epochs", "5"]) == 2
    assert "--resume continues" in capsys.readouterr().err


def test_resume_through_the_cli_matches_an_uninterrupted_run(tmp_path, tiny_config):
    from ddvae_fast.seqvae.trainer import Trainer

    args = ["train", "--config", str(tiny_config), "--epochs", "2", "--no-progress"]
    args += ["--divergence-samples", "5000"]
    assert cli.main(args + ["--out", str(tmp_path / "straight")]) == 0
    # The same run killed after its first epoch, then resumed from the command line.
    config = cli._config_from_args(cli._parser().parse_args(args))
    Trainer(config, tmp_path / "resumed", progress=False).fit(stop_after=1)
    resume = ["train", "--resume", "--out", str(tmp_path / "resumed"), "--no-progress"]
    assert cli.main(resume + ["--divergence-samples", "5000"]) == 0
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    for k, v in a["model"]["state_dict"].items():
        assert torch.equal(v, b["model"]["state_dict"][k]), k
    ma = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert ma["per_string"] == mb["per_string"]


def test_vae_baseline_on_a_gaussian_square(tmp_path, tiny_config):
    out = tmp_path / "vae"
    code = cli.main(
        [
            "train",
            "--config",
            str(tiny_config),
            "--prior",
            "gaussian",
            "--proposal",
            "gaussian",
            "--mode",
            "sample",
            "--epochs",
            "1",
            "--out",
            str(out),
            "--no-progress",
            "--eval-samples",
            "2000",
            "--divergence-samples",
            "5000",
        ]
    )
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["model"]["mode"] == "sample"
    assert metrics["config"]["train"]["beta_end"] == 0.1  # the config's rule for mode = sample
    assert (out / "latent_map.png").read_bytes()[:8] == PNG


def test_presets_resolve_to_the_paper_recipe():
    parse = cli._parser().parse_args
    default = cli._config_from_args(parse(["train"]))
    # The default: Figure 5's U_U panel compressed (its beta and tau end points),
    # with fine-tuning; with --proposal tricube the U_T panel's end points.
    assert (
        default.data.is_synthetic
        and default.model.proposal == "uniform"
        and default.model.prior == "uniform"
    )
    assert (default.train.beta_end, default.train.tau_end) == (1.0, 1e-3)
    assert default.model.decoder_input == "atanh"
    assert default.train.finetune_epochs >= 1 and default.train.epochs < 100
    tricube = cli._config_from_args(parse(["train", "--proposal", "tricube"]))
    assert (tricube.train.beta_end, tricube.train.tau_end) == (0.1, 1e-2)
    paper = cli._config_from_args(parse(["train", "--preset", "paper"]))
    # Figure 5's U_T run as published: beta 0 -> 0.1, no fine-tuning (issue 8's table).
    assert (paper.train.epochs, paper.train.finetune_epochs) == (100, 0)
    assert (paper.train.beta_end, paper.train.tau_end) == (0.1, 1e-2)
    vae = cli._config_from_args(
        parse(
            [
                "train",
                "--preset",
                "paper",
                "--prior",
                "gaussian",
                "--proposal",
                "gaussian",
                "--mode",
                "sample",
            ]
        )
    )
    assert (vae.model.mode, vae.train.beta_end) == ("sample", 0.1)
    # The default's rule gives a Gaussian prior the decoder that reads z itself.
    default_vae = cli._config_from_args(
        parse(["train", "--prior", "gaussian", "--proposal", "gaussian", "--mode", "sample"])
    )
    assert (default_vae.model.prior, default_vae.model.decoder_input) == ("gaussian", "z")
    assert paper.model.decoder_input == "z"  # the published runs' decoder reads z
    uniform = cli._config_from_args(
        parse(["train", "--preset", "paper", "--proposal", "uniform", "--epochs", "7"])
    )
    assert (uniform.train.beta_end, uniform.train.tau_end, uniform.train.epochs) == (1.0, 1e-3, 7)
    # The default --out is one directory per configuration, not one for all runs.
    assert cli._default_out(default) != cli._default_out(paper) != cli._default_out(uniform)
    seeded = cli._config_from_args(parse(["train", "--seed", "4"]))
    assert cli._default_out(seeded) != cli._default_out(default)
    smiles = cli._config_from_args(parse(["train", "--data", "x.smi"]))
    assert smiles.data.tokenizer == "smiles" and smiles.data.source == "x.smi"


def test_train_on_smiles(tmp_path):
    data = tmp_path / "mols.smi"
    data.write_text(
        "\n".join(
            [
                "CCO",
                "c1ccccc1O",
                "Clc1ccc(Br)cc1",
                "C[C@@H](N)C(=O)O",
                "c1cc[nH]c1",
                "CC(=O)Nc1ccc(O)cc1",
                "C1CCCCC1",
                "O=C([O-])CC[NH3+]",
            ]
            * 8
        )
        + "\n"
    )
    config = tmp_path / "smiles.toml"
    config.write_text(
        "[data]\ntokenizer = 'smiles'\n[model]\nembedding_dim = 8\nhidden_size = 16\nnum_layers = 1\n"
        "latent_dim = 4\nprior = 'gaussian'\nproposal = 'tricube'\n[train]\nepochs = 2\nbatch_size = 16\n"
        "pretrain_epochs = 1\nfinetune_epochs = 1\ntau_start = 0.2\ntau_end = 0.1\nbeta_end = 0.01\n"
    )
    out = tmp_path / "smiles_run"
    code = cli.main(
        [
            "train",
            "--config",
            str(config),
            "--data",
            str(data),
            "--out",
            str(out),
            "--no-progress",
            "--eval-samples",
            "50",
        ]
    )
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("validity", "uniqueness", "novelty", "reconstruction_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0 + 1e-12  # sums of 64 float64 probabilities
    assert metrics["n_samples"] == 50
    assert not (out / "latent_map.png").exists()  # 4-D latent, not synthetic


def test_data_errors_exit_with_a_message(tmp_path, capsys):
    empty = tmp_path / "empty.smi"
    empty.write_text("\n")
    assert (
        cli.main(["train", "--data", str(empty), "--out", str(tmp_path / "o"), "--no-progress"])
        == 2
    )
    assert "contains no strings" in capsys.readouterr().err
    assert (
        cli.main(["train", "--data", str(tmp_path / "missing.smi"), "--out", str(tmp_path / "o")])
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["train", "--resume", "--out", str(tmp_path / "never")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "--mode", "greedy"])  # argparse rejects it


def test_default_threads_use_at_most_two_usable_cores_shared_among_processes(monkeypatch):
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert cli.default_threads() == 2  # the synthetic model's matrices are small
    assert cli.default_threads(processes=8) == 2
    assert cli.default_threads(processes=16) == 1
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert cli.default_threads() == 1
    assert cli.default_threads(processes=4) == 1  # never 0
