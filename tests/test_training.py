"""The training recipe: schedules, configs, fine-tuning, exact resume, and the
synthetic-data evaluation (checked against a hand-built model with known answers)."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ddvae_fast.seqvae.synthetic import (
    bernoulli_distribution,
    evaluate_synthetic,
    plot_latent_map,
    prior_decoding_divergences,
)
from ddvae_fast.seqvae.trainer import (
    CONFIG_DIR,
    ExperimentConfig,
    Trainer,
    builtin_config,
    load_config,
)

# The models under test are tiny; see one_torch_thread in conftest.py.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(model=None, data=None, **train):
    values = {
        "name": "tiny",
        "data": {"source": "synthetic", "n_samples": 512, "length": 6, "p_one": 0.5},
        "model": {
            "embedding_dim": 4,
            "hidden_size": 16,
            "num_layers": 1,
            "latent_dim": 2,
            "prior": "uniform",
            "proposal": "tricube",
            "mode": "argmax",
        },
        "train": {
            "epochs": 3,
            "batch_size": 128,
            "lr": 1e-2,
            "lr_step_epochs": 2,
            "pretrain_epochs": 1,
            "pretrain_nll_weight": 0.5,
            "beta_end": 0.05,
            "tau_start": 0.1,
            "tau_end": 0.01,
            "finetune_epochs": 2,
            "seed": 0,
        },
    }
    values["model"].update(model or {})
    values["data"].update(data or {})
    values["train"].update(train)
    return ExperimentConfig.from_dict(values)


def test_tiny_model_reconstructs_every_string(tmp_path):
    # All 64 six-bit strings (p_one = 0.5 puts each ~64 times in the training
    # set), a one-layer GRU with 64 units, 640 Adam steps and 3 epochs of
    # decoder fine-tuning: every string must decode back from its mu.
    # (~10 s on one core. Whether the last few strings separate depends on
    # float32 rounding: on seeds 0-13, 12 runs reach 100% with seqvae.gru and
    # 13 with nn.GRU; the others end at 58-59 of 64. Seed 1 reaches 100% with both.)
    config = _config(
        model={"hidden_size": 64},
        data={"n_samples": 4096},
        epochs=10,
        batch_size=64,
        lr=5e-3,
        lr_step_epochs=4,
        pretrain_epochs=0,
        beta_start=0.01,
        beta_end=0.05,
        finetune_epochs=3,
        finetune_lr=3e-3,
        seed=1,
    )
    trainer = Trainer(config, tmp_path, progress=False)
    trainer.fit()
    strings = list(bernoulli_distribution(6, 0.5))
    with torch.no_grad():
        mu, _ = trainer.model.encode(strings)
    assert trainer.model.decode(mu) == strings
    assert trainer.history[-1]["sequence_accuracy"] > 0.95  # at z ~ q(z|x), fine-tuned


def test_schedules_follow_appendix_b(tmp_path):
    config = _config(
        epochs=10,
        pretrain_epochs=2,
        lr_step_epochs=3,
        beta_start=0.0,
        beta_end=0.7,
        tau_start=0.1,
        tau_end=1e-3,
        finetune_epochs=3,
    )
    trainer = Trainer(config, tmp_path, progress=False)
    assert [trainer.stage(e) for e in range(13)] == ["pretrain"] * 2 + ["train"] * 8 + [
        "finetune"
    ] * 3
    # beta: 0 while pretraining, then linear from beta_start to beta_end at the last epoch.
    for e in range(10):
        expected = 0.0 if e < 2 else 0.7 * (e - 2) / 7
        assert trainer.beta(e) == pytest.approx(expected, abs=1e-12)
    assert trainer.beta(11) == 0.0  # fine-tuning has no KL term
    # tau: log-linear from 0.1 (epoch 0) to 1e-3 (epoch 9).
    for e in range(10):
        assert math.log(trainer.tau(e)) == pytest.approx(
            math.log(0.1) + (math.log(1e-3) - math.log(0.1)) * e / 9
        )
    # lr halves every lr_step_epochs; fine-tuning restarts the step schedule
    # from the last training rate (or from finetune_lr).
    assert [trainer.lr(e) for e in range(10)] == [1e-2 * 0.5 ** (e // 3) for e in range(10)]
    assert [trainer.lr(e) for e in (10, 11, 12)] == [trainer.lr(9)] * 3
    all_pretrain = Trainer(
        _config(epochs=2, pretrain_epochs=5, finetune_epochs=1), tmp_path, progress=False
    )
    assert [all_pretrain.stage(e) for e in range(3)] == ["pretrain", "pretrain", "finetune"]
    fixed = Trainer(
        _config(finetune_lr=3e-4, lr_step_epochs=2, finetune_epochs=3), tmp_path, progress=False
    )
    assert [fixed.lr(e) for e in range(6)] == [1e-2, 1e-2, 5e-3, 3e-4, 3e-4, 1.5e-4]


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_finetuning_changes_the_decoder_only(tmp_path):
    trainer = Trainer(_config(epochs=2, finetune_epochs=1), tmp_path, progress=False)
    trainer.fit(stop_after=2)
    encoder = _snapshot(trainer.model.encoder_modules())
    decoder = _snapshot(trainer.model.decoder_modules())
    trainer.fit()
    assert trainer.history[-1]["stage"] == "finetune"
    for k, v in trainer.model.encoder_modules().state_dict().items():
        assert torch.equal(v, encoder[k]), k
    for k, v in trainer.model.decoder_modules().state_dict().items():
        assert not torch.equal(v, decoder[k]), k  # every decoder tensor moved
    # The fine-tuning optimizer holds exactly the decoder's parameters.
    held = {id(p) for g in trainer.finetune_optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in trainer.model.decoder_modules().parameters()}


def _without_time(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


@pytest.mark.parametrize("interrupt_after", [1, 4])  # during training; during fine-tuning
def test_resume_is_bit_identical(tmp_path, interrupt_after):
    config = _config(epochs=3, finetune_epochs=2)
    straight = Trainer(config, tmp_path / "straight", progress=False)
    straight.fit()

    first = Trainer(config, tmp_path / "resumed", progress=False)
    first.fit(stop_after=interrupt_after)
    # Scramble the global RNGs, as a new process would have them.
    torch.manual_seed(12345)
    np.random.seed(54321)
    resumed = Trainer.resume(tmp_path / "resumed", progress=False)
    assert resumed.epoch == interrupt_after
    resumed.fit()

    assert resumed.finished and straight.finished
    for (k, a), (k2, b) in zip(
        straight.model.state_dict().items(), resumed.model.state_dict().items()
    ):
        assert k == k2 and torch.equal(a, b), k
    for opt_a, opt_b in [
        (straight.optimizer, resumed.optimizer),
        (straight.finetune_optimizer, resumed.finetune_optimizer),
    ]:
        sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
        assert sa.keys() == sb.keys()
        for i in sa:
            for name in sa[i]:
                assert torch.equal(sa[i][name], sb[i][name])
    assert _without_time(straight.history) == _without_time(resumed.history)
    assert torch.equal(straight.sampler.sample((100,)), resumed.sampler.sample((100,)))
    csv_rows = (tmp_path / "resumed" / "metrics.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 1 + config.train.total_epochs


def test_checkpoint_contents_and_atomic_write(tmp_path):
    trainer = Trainer(_config(epochs=2, finetune_epochs=0), tmp_path, progress=False)
    trainer.fit()
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2
    assert {
        "model",
        "optimizer",
        "finetune_optimizer",
        "sampler",
        "rng",
        "history",
        "config",
    } <= set(state)
    assert ExperimentConfig.from_dict(state["config"]) == trainer.config
    assert not list(Path(tmp_path).glob(".tmp-*"))
    from ddvae_fast.seqvae.model import SequenceDDVAE

    model = SequenceDDVAE.load(tmp_path / "checkpoint.pt")  # the model inside a checkpoint
    z = torch.rand(100, 2) * 2 - 1
    assert model.decode(z) == trainer.model.decode(z)
    with pytest.raises(FileNotFoundError):
        Trainer.resume(tmp_path / "nothing-here")


def test_shipped_configs_and_rules():
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))
    assert {"synthetic", "synthetic_paper", "figure5_uu", "figure5_ut", "figure5_nn"} <= set(names)
    for name in names:  # every shipped config parses and validates
        if name.startswith("moses_"):  # `ddvae-fast moses` configs: a [moses] table too
            from ddvae_fast.seqvae.moses_experiment import load_moses_config

            load_moses_config(builtin_config(name))
        else:
            load_config(builtin_config(name))
    paper = load_config(builtin_config("synthetic_paper"))
    # The authors' public configs (issue 8's table; NOTES.md): the preset resolves
    # to exactly the panel's config for each prior/proposal/mode of Figure 5.
    panels = {
        "figure5_uu": {"prior": "uniform", "proposal": "uniform", "mode": "argmax"},
        "figure5_ut": {"prior": "uniform", "proposal": "tricube", "mode": "argmax"},
        "figure5_nn": {"prior": "gaussian", "proposal": "gaussian", "mode": "sample"},
    }
    expected = {"figure5_uu": (1.0, 1e-3), "figure5_ut": (0.1, 1e-2), "figure5_nn": (0.1, None)}
    for name, model in panels.items():
        shipped = load_config(builtin_config(name)).resolve()
        preset = paper.with_overrides(model=model).resolve()
        assert shipped.model == preset.model
        t = shipped.train
        assert (t.epochs, t.batch_size, t.lr, t.lr_step_epochs, t.lr_gamma) == (
            100,
            512,
            5e-3,
            20,
            0.5,
        )
        assert (t.clip_grad_value, t.pretrain_epochs, t.beta_start) == (2.0, 2, 0.0)
        assert t.finetune_epochs == 0  # the published runs had no fine-tuning
        beta_end, tau_end = expected[name]
        assert t.beta_end == preset.train.beta_end == beta_end
        if tau_end is not None:  # sample mode has no temperature
            assert (t.tau_start, t.tau_end) == (0.1, tau_end)
            assert t == preset.train
        m = shipped.model
        assert (m.num_layers, m.hidden_size, m.embedding_dim, m.latent_dim) == (2, 128, 8, 2)
        assert m.z_every_step is False  # their decoder reads z through its initial states only
        assert shipped.data.n_samples == 100_000 and shipped.data.p_one == 0.8


def test_a_config_with_a_base_overrides_the_built_in_config_key_by_key(tmp_path):
    path = tmp_path / "variant.toml"
    path.write_text(
        'base = "figure5_ut"\nname = "v"\n[train]\nseed = 7\n[model]\nz_every_step = true\n'
    )
    variant = load_config(path)
    base = load_config(builtin_config("figure5_ut"))
    assert (variant.name, variant.train.seed, variant.model.z_every_step) == ("v", 7, True)
    assert variant.train.beta_end == base.train.beta_end and variant.data == base.data
    assert base.train.seed != 7 and base.model.z_every_step is False  # both really changed
    path.write_text("base = 3\n")
    with pytest.raises(ValueError, match="base must be a built-in config name"):
        load_config(path)
    path.write_text('base = "no_such_config"\n')
    with pytest.raises(ValueError, match="no built-in config 'no_such_config'"):
        load_config(path)


def test_benchmark_ablation_configs_are_their_panels_preset_but_for_their_factors():
    """benchmarks/configs/figure5_<panel>_<factor>.toml each train the panel of
    the preset they are named after (same prior, proposal, mode, sizes, data
    size) and differ from it somewhere (else they would ablate nothing)."""
    paths = sorted((Path(__file__).parent.parent / "benchmarks" / "configs").glob("*.toml"))
    assert paths
    for path in paths:
        panel = "_".join(path.stem.split("_")[:2])  # figure5_ut_no_clamp -> figure5_ut
        base = load_config(builtin_config(panel)).resolve()
        ablation = load_config(path).resolve()
        fields = ("prior", "proposal", "mode", "hidden_size", "num_layers", "latent_dim")
        for field in fields:
            assert getattr(ablation.model, field) == getattr(base.model, field), (path, field)
        assert ablation.data.n_samples == base.data.n_samples, path
        assert (ablation.model, ablation.train, ablation.data) != (
            base.model,
            base.train,
            base.data,
        ), path


def test_rules_set_model_settings_on_load_and_on_override(tmp_path):
    # A rule's model settings apply whenever the ModelConfig is built: from the
    # file itself (whose own decoder_input would be refused with this prior)
    # and from an override; its train settings only through resolve().
    path = tmp_path / "rules.toml"
    path.write_text(
        '[model]\nprior = "gaussian"\nproposal = "gaussian"\ndecoder_input = "atanh"\n'
        "[[rules]]\nwhen = { prior = 'gaussian' }\n"
        "set = { decoder_input = 'z', beta_end = 0.25 }\n"
    )
    loaded = load_config(path)
    assert loaded.model.decoder_input == "z"
    assert loaded.train.beta_end != 0.25 and loaded.resolve().train.beta_end == 0.25
    uniform = loaded.with_overrides(
        model={"prior": "uniform", "proposal": "uniform", "decoder_input": "atanh"}
    )
    assert uniform.model.decoder_input == "atanh"  # the rule does not match
    assert uniform.resolve().train.beta_end == loaded.train.beta_end
    again = uniform.with_overrides(model={"prior": "gaussian", "proposal": "gaussian"})
    assert again.model.decoder_input == "z"


def test_config_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nepoch = 3\n")
    with pytest.raises(ValueError, match=r"unknown settings \['epoch'\] in \[train\]"):
        load_config(bad)
    bad.write_text("[[rules]]\nwhen = { proposal = 'uniform' }\nset = { beta = 1 }\n")
    with pytest.raises(ValueError, match=r"rules\[0\]\.set"):
        load_config(bad)
    bad.write_text("[train\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ValueError, match="tau_end"):
        _config(tau_end=1.0)
    with pytest.raises(ValueError, match="no built-in config"):
        builtin_config("nope")


class _QuadrantModel(torch.nn.Module):
    """Four strings on the four quadrants of [-1, 1]^2, with known answers.

    'a' (p=0.4) owns x>0,y>0; 'b' (0.3) x<0,y>0; 'c' (0.2) x<0,y<0; the
    quadrant x>0,y<0 decodes to None although it is d's (0.1) proposal box.
    """

    def __init__(self):
        super().__init__()
        from ddvae_fast.seqvae.model import ModelConfig

        self.config = ModelConfig(prior="uniform", proposal="uniform", latent_dim=2)
        self.centres = {"a": (0.5, 0.5), "b": (-0.5, 0.5), "c": (-0.5, -0.5), "d": (0.5, -0.5)}

    @property
    def device(self):
        return torch.device("cpu")

    def encode(self, strings):
        mu = torch.tensor([self.centres[s] for s in strings])
        return mu, torch.full_like(mu, 0.5)

    def sample_prior(self, n, generator=None):
        return torch.rand((n, 2), generator=generator) * 2 - 1

    def decode_counts(self, z):
        counts = {}
        for s in self.decode(z):
            counts[s] = counts.get(s, 0) + 1
        return counts

    def decode(self, z):
        out = []
        for x, y in z.tolist():
            if x > 0 and y > 0:
                out.append("a")
            elif x < 0 < y:
                out.append("b")
            elif x < 0 and y < 0:
                out.append("c")
            else:
                out.append(None)
        return out


def test_evaluation_against_known_answers(tmp_path):
    model = _QuadrantModel()
    truth = {"a": 0.4, "b": 0.3, "c": 0.2, "d": 0.1}
    metrics = evaluate_synthetic(
        model, truth, draws_per_string=50, grid=40, n_divergence_samples=20_000
    )
    assert metrics["reconstruction_accuracy"] == 0.75  # d's mu decodes to None
    # Draws from q(.|x) stay in x's quadrant: a, b, c always right, d never.
    assert metrics["sampled_reconstruction_accuracy"] == pytest.approx(0.9)
    # Decoded: a, b, c 1/4 each, None 1/4 -> TV = (0.15 + 0.05 + 0.05 + 0.1 + 0.25) / 2.
    assert metrics["prior_decoding_tv"] == pytest.approx(0.3)
    assert metrics["prior_decoding_invalid_mass"] == pytest.approx(0.25)
    # 'd' is never decoded: Q(d) = 0, so the authors' KL is infinite. JS with
    # Q = 1/4 on a, b, c, None, by hand; 20,000 draws put each frequency within
    # ~0.01 of 1/4 (4.6 standard deviations), moving JS by less than 0.005.
    assert metrics["prior_decoding_kl"] == math.inf
    q = 0.25
    js = 0.5 * sum(p * math.log(p / ((p + q) / 2)) for p in (0.4, 0.3, 0.2)) + 0.5 * (
        0.1 * math.log(2)  # d: P = 0.1, Q = 0
        + sum(q * math.log(q / ((p + q) / 2)) for p in (0.4, 0.3, 0.2))
        + q * math.log(2)  # None: P = 0
    )
    assert metrics["prior_decoding_js"] == pytest.approx(js, abs=0.005)
    rows = {r["string"]: r for r in metrics["per_string"]}
    assert rows["d"]["decoded_probability"] == 0.0 and rows["a"]["decoded_probability"] == 0.25
    plot_latent_map(model, truth, tmp_path / "map.png", resolution=40)
    assert (tmp_path / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prior_decoding_divergences_by_hand():
    # The authors' definition (issue 8; NOTES.md) on two strings, written out:
    # P = (0.2, 0.8) on "0", "1"; Q = 0.5 on "0", 0.25 on "1", 0.15 on the
    # invalid output, 0.1 on "00" (outside the data).
    true = bernoulli_distribution(1, 0.8)
    decoded = {"0": 0.5, "1": 0.25, None: 0.15, "00": 0.1}
    kl, js = prior_decoding_divergences(true, decoded)
    e = 1e-9
    kl_hand = 0.2 * math.log(0.2 / 0.5 + e) + 0.8 * math.log(0.8 / 0.25 + e)
    m0, m1, mn, m00 = 0.35, 0.525, 0.075, 0.05
    js_hand = 0.5 * (0.2 * math.log(0.2 / m0 + e) + 0.8 * math.log(0.8 / m1 + e)) + 0.5 * (
        0.5 * math.log(0.5 / m0 + e)
        + 0.25 * math.log(0.25 / m1 + e)
        + 0.15 * math.log(0.15 / mn + e)
        + 0.1 * math.log(0.1 / m00 + e)
    )
    assert kl == pytest.approx(kl_hand, rel=1e-12)
    assert js == pytest.approx(js_hand, rel=1e-12)
    # Q = P: both vanish up to the 1e-9 inside the log.
    kl0, js0 = prior_decoding_divergences(true, dict(true))
    assert abs(kl0) < 1e-8 and abs(js0) < 1e-8
    # A true string never decoded makes the KL infinite (P / 0), not NaN.
    assert prior_decoding_divergences(true, {"1": 1.0})[0] == math.inf


@settings(max_examples=30, deadline=None)
@given(
    weights=st.lists(st.floats(0.01, 1.0), min_size=5, max_size=5),
    split=st.floats(0.0, 1.0),
)
def test_js_does_not_depend_on_how_outside_outputs_are_grouped(weights, split):
    # Outputs outside the data (P = 0) add Q log(2) each, linear in Q: one
    # outcome or two with the same total mass give the same JS; KL ignores them.
    true = bernoulli_distribution(2, 0.7)
    w = np.array(weights) / sum(weights)
    q = dict(zip(list(true), w[:4].tolist()))
    one = {**q, None: float(w[4])}
    two = {**q, None: float(w[4] * split), "000": float(w[4] * (1 - split))}
    two = {k: v for k, v in two.items() if v > 0}
    kl1, js1 = prior_decoding_divergences(true, one)
    kl2, js2 = prior_decoding_divergences(true, two)
    assert kl1 == kl2
    assert js1 == pytest.approx(js2, rel=1e-9, abs=1e-12)
    assert 0 <= js1 <= math.log(2) + 1e-9  # JS is bounded by log 2


def test_bucket_batches_is_a_checked_train_setting():
    from ddvae_fast.seqvae.trainer import TrainConfig

    assert TrainConfig(bucket_batches=True).bucket_batches is True
    with pytest.raises(TypeError, match="bucket_batches"):
        TrainConfig(bucket_batches="yes")
