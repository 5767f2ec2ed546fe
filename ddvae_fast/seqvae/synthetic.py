"""The synthetic data of Section 4.1 and the measurements behind Figure 5.

Strings of ``length`` independent bits with P(bit = 1) = ``p_one`` (6 bits,
0.8 in the paper). With every string's true probability known, a trained
model is judged by how it decodes: its reconstructions from mu and from
z ~ q(z|x), and the distribution of strings it decodes from prior samples,
compared with the true one in total variation and, as the authors score
Figure 5, in KL and Jensen-Shannon divergence over a million prior draws.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch


def bernoulli_distribution(length: int = 6, p_one: float = 0.8) -> dict[str, float]:
    """Every string of ``length`` bits and its probability, in lexicographic order."""
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")
    if not 0.0 <= p_one <= 1.0:
        raise ValueError(f"p_one must lie in [0, 1], got {p_one!r}")
    out = {}
    for bits in itertools.product("01", repeat=length):
        ones = bits.count("1")
        out["".join(bits)] = p_one**ones * (1 - p_one) ** (length - ones)
    return out


def sample_bernoulli_strings(
    n: int, length: int = 6, p_one: float = 0.8, seed: int = 0
) -> list[str]:
    """n strings of independent bits from a fixed seed (the training set)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    bernoulli_distribution(length, p_one)  # validates length and p_one
    rng = np.random.Generator(np.random.PCG64(seed))
    bits = rng.random((n, length)) < p_one
    chars = np.where(bits, "1", "0")
    return ["".join(row) for row in chars]


def total_variation(true: dict[str, float], decoded: dict[str | None, float]) -> float:
    """TV distance between the true distribution and the decoded one.

    Decoded mass on strings outside the true support (including invalid
    decodes, key None) is mass the model lost; it counts in full.
    """
    keys = set(true) | set(decoded)
    return 0.5 * sum(abs(true.get(k, 0.0) - decoded.get(k, 0.0)) for k in keys)


def prior_decoding_divergences(
    true: dict[str, float], decoded: dict[str | None, float]
) -> tuple[float, float]:
    """(KL, JS) between the true distribution P and the decoded one Q, as the
    authors score Figure 5 (their synthetic.ipynb), in nats:

        KL = sum P log(P / Q + 1e-9)
        JS = 0.5 sum P log(P / M + 1e-9) + 0.5 sum Q log(Q / M + 1e-9),  M = (P + Q) / 2

    over every outcome: the strings of ``true`` and each distinct decoded
    output (``decoded`` maps outputs to frequencies; None, the invalid decode,
    is one outcome). Terms with a zero weight are 0. KL is +inf if a true
    string is never decoded (P / 0), as in the authors' definition. An output
    with P = 0 adds Q log(2 + 1e-9) to 2 JS, linear in Q, so how invalid
    outputs are grouped into outcomes does not change JS.
    """
    keys = list(true) + [k for k in decoded if k not in true]
    p = np.array([true.get(k, 0.0) for k in keys], dtype=np.float64)
    q = np.array([decoded.get(k, 0.0) for k in keys], dtype=np.float64)
    total = p + q
    # P / M and Q / M written as 2P / (P + Q) and 2Q / (P + Q): the same
    # numbers, but (P + Q) / 2 would underflow to 0 for a subnormal Q.
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_terms = np.where(p > 0, p * np.log(p / q + 1e-9), 0.0)
        js_p = np.where(p > 0, p * np.log(2 * p / total + 1e-9), 0.0)
        js_q = np.where(q > 0, q * np.log(2 * q / total + 1e-9), 0.0)
    return float(kl_terms.sum()), float(0.5 * js_p.sum() + 0.5 * js_q.sum())


def prior_draw_frequencies(model, n_samples: int, seed: int) -> dict[str | None, float]:
    """Frequency of each output decoded from ``n_samples`` seeded prior draws."""
    z = model.sample_prior(n_samples, torch.Generator().manual_seed(seed))
    counts = model.decode_counts(z)
    return {s: c / n_samples for s, c in counts.items()}


def _frequencies(decoded: Sequence[str | None]) -> dict:
    counts: dict[str | None, int] = {}
    for s in decoded:
        counts[s] = counts.get(s, 0) + 1
    return {s: c / len(decoded) for s, c in counts.items()}


def latent_grid(prior: str, resolution: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Cell centres of a square grid over the plotted latent square (2-D only).

    The square is [-1, 1]^2 for the uniform prior and [-3, 3]^2 for the
    Gaussian one. Returns (axis values, points (resolution^2, 2) row-major
    with y the slow axis, half-width).
    """
    half = 1.0 if prior == "uniform" else 3.0
    step = 2 * half / resolution
    axis = -half + step * (np.arange(resolution) + 0.5)
    yy, xx = np.meshgrid(axis, axis, indexing="ij")
    return axis, np.stack([xx.ravel(), yy.ravel()], axis=1), half


@torch.no_grad()
def decode_latent_grid(model, resolution: int) -> list[str | None]:
    """Strings decoded at the cell centres of ``latent_grid(prior, resolution)``."""
    _, points, _ = latent_grid(model.config.prior, resolution)
    return model.decode(torch.from_numpy(points).float())


def prior_decoding_distribution(
    model, n_samples: int = 100_000, grid: int = 400, seed: int = 0, grid_decoded=None
) -> dict:
    """Distribution of the strings decoded from the prior.

    For a uniform prior in 2-D the prior is integrated on a ``grid`` x ``grid``
    midpoint grid over [-1, 1]^2 (exact up to the cell size; ``grid_decoded``
    may pass that grid's decodes in); otherwise ``n_samples`` prior samples
    from a fixed seed are decoded.
    """
    if model.config.prior == "uniform" and model.config.latent_dim == 2:
        decoded = decode_latent_grid(model, grid) if grid_decoded is None else grid_decoded
        if len(decoded) != grid * grid:
            raise ValueError(f"grid_decoded has {len(decoded)} entries, expected {grid * grid}")
        return _frequencies(decoded)
    return prior_draw_frequencies(model, n_samples, seed)


@torch.no_grad()
def evaluate_synthetic(
    model,
    distribution: dict[str, float],
    *,
    draws_per_string: int = 200,
    n_prior_samples: int = 100_000,
    n_divergence_samples: int = 1_000_000,
    grid: int = 400,
    seed: int = 0,
    grid_decoded=None,
) -> dict:
    """Figure-5 measurements of a model trained on bit strings.

    - reconstruction_accuracy: fraction of all strings decoded correctly from mu;
    - sampled_reconstruction_accuracy: P(decode(z) = x) with z ~ q(z|x),
      ``draws_per_string`` draws each, averaged with weights p(x) (1 - Eq. 14);
    - prior_decoding_tv: TV between the strings decoded from prior samples and
      the true distribution, invalid decodes counted as lost mass;
    - prior_decoding_kl, prior_decoding_js: :func:`prior_decoding_divergences`
      of the outputs decoded from ``n_divergence_samples`` prior draws (seeded);
    - per_string: each string's true and decoded probability, mu and sigma.
    """
    # Local import: the sampler module is only needed here, not to import this file.
    from ..sampling import RejectionSampler

    was_training = model.training
    model.eval()
    strings = list(distribution)
    p_true = np.array([distribution[s] for s in strings])
    mu, sigma = model.encode(strings)
    from_mu = model.decode(mu)
    rec_ok = np.array([d == s for d, s in zip(from_mu, strings)])

    sampler = RejectionSampler(
        model.config.proposal, device=model.device, seed=seed, backend=model.config.backend
    )
    mu_rep = mu.repeat_interleave(draws_per_string, dim=0)
    sigma_rep = sigma.repeat_interleave(draws_per_string, dim=0)
    decoded = model.decode(sampler.rsample(mu_rep, sigma_rep))
    hits = np.array([d == s for d, s in zip(decoded, np.repeat(strings, draws_per_string))])
    per_string_sampled = hits.reshape(len(strings), draws_per_string).mean(axis=1)

    decoded_dist = prior_decoding_distribution(model, n_prior_samples, grid, seed, grid_decoded)
    tv = total_variation(distribution, decoded_dist)
    lost = sum(p for s, p in decoded_dist.items() if s not in distribution)
    kl, js = prior_decoding_divergences(
        distribution, prior_draw_frequencies(model, n_divergence_samples, seed)
    )
    model.train(was_training)
    return {
        "reconstruction_accuracy": float(rec_ok.mean()),
        "sampled_reconstruction_accuracy": float(
            (per_string_sampled * p_true).sum() / p_true.sum()
        ),
        "prior_decoding_kl": kl,
        "prior_decoding_js": js,
        "prior_decoding_divergence_samples": n_divergence_samples,
        "prior_decoding_tv": float(tv),
        "prior_decoding_lost_mass": float(lost),
        "prior_decoding_invalid_mass": float(decoded_dist.get(None, 0.0)),
        "per_string": [
            {
                "string": s,
                "true_probability": float(distribution[s]),
                "decoded_probability": float(decoded_dist.get(s, 0.0)),
                "reconstructed_from_mu": bool(ok),
                "sampled_reconstruction_accuracy": float(acc),
                "mu": [float(x) for x in m],
                "sigma": [float(x) for x in sg],
            }
            for s, ok, acc, m, sg in zip(
                strings, rec_ok, per_string_sampled, mu.cpu().tolist(), sigma.cpu().tolist()
            )
        ],
    }


def format_probability_table(metrics: dict) -> str:
    """A short text table: string, true probability, decoded probability."""
    rows = sorted(metrics["per_string"], key=lambda r: -r["true_probability"])
    lines = [f"{'string':<10} {'true':>8} {'decoded':>8} {'from mu':>8}"]
    for r in rows:
        ok = "ok" if r["reconstructed_from_mu"] else "WRONG"
        lines.append(
            f"{r['string']:<10} {r['true_probability']:>8.4f} {r['decoded_probability']:>8.4f} {ok:>8}"
        )
    lost = metrics.get("prior_decoding_lost_mass", 0.0)
    lines.append(f"{'(other)':<10} {0.0:>8.4f} {lost:>8.4f}")
    return "\n".join(lines)


@torch.no_grad()
def plot_latent_map(
    model,
    distribution: dict[str, float],
    path,
    *,
    resolution: int = 300,
    per_string=None,
    grid_decoded=None,
    divergences: tuple[float, float] | None = None,
) -> None:
    """Figure 5: the latent square coloured by decoded string.

    Solid lines are decoding boundaries, dashed boxes are the proposals'
    supports mu +- sigma (for a Gaussian proposal, +- one standard deviation),
    and each region is labelled with its string and that string's probability
    under deterministic decoding from the plotted prior. ``divergences``
    (KL, JS), if given, go in the title as in the authors' figures.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Rectangle

    if model.config.latent_dim != 2:
        raise ValueError(f"the latent map needs a 2-D latent space, got {model.config.latent_dim}")
    prior = model.config.prior
    _, points, half = latent_grid(prior, resolution)
    decoded = decode_latent_grid(model, resolution) if grid_decoded is None else grid_decoded
    if len(decoded) != resolution * resolution:
        raise ValueError(f"grid_decoded has {len(decoded)} entries, expected {resolution**2}")
    strings = list(distribution)
    label_of = {s: i for i, s in enumerate(strings)}
    other = len(strings)  # invalid decodes and strings outside the data
    labels = np.array([label_of.get(d, other) for d in decoded]).reshape(resolution, resolution)

    # Probability of each region under the plotted prior (a grid-cell weight).
    if prior == "uniform":
        cell_mass = np.full(points.shape[0], 1.0 / points.shape[0])
    else:
        density = np.exp(-0.5 * (points**2).sum(1))
        cell_mass = density / density.sum()  # restricted to the plotted square
    mass = np.bincount(labels.ravel(), weights=cell_mass, minlength=other + 1)

    rng = np.random.Generator(np.random.PCG64(1))
    palette = plt.get_cmap("tab20")(np.arange(20))
    palette = np.concatenate(
        [
            palette,
            plt.get_cmap("tab20b")(np.arange(20)),
            plt.get_cmap("tab20c")(np.arange(20)),
            plt.get_cmap("Set3")(np.arange(12)),
        ]
    )
    colours = palette[rng.permutation(len(palette))[: len(strings)]]
    colours = np.concatenate([colours, [[0.15, 0.15, 0.15, 1.0]]])  # 'other' is dark grey
    fig, ax = plt.subplots(figsize=(8, 8))
    ax.imshow(
        labels,
        origin="lower",
        extent=(-half, half, -half, half),
        cmap=ListedColormap(colours),
        vmin=-0.5,
        vmax=other + 0.5,
        interpolation="nearest",
    )
    boundary = np.zeros_like(labels, dtype=bool)
    boundary[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    boundary[1:, :] |= labels[1:, :] != labels[:-1, :]
    overlay = np.zeros((*labels.shape, 4))
    overlay[boundary] = (0, 0, 0, 1)
    ax.imshow(overlay, origin="lower", extent=(-half, half, -half, half), interpolation="nearest")

    if per_string is None:
        mu, sigma = model.encode(strings)
        per_string = [
            {"string": s, "mu": m, "sigma": sg}
            for s, m, sg in zip(strings, mu.cpu().tolist(), sigma.cpu().tolist())
        ]
    for row in per_string:
        (mx, my), (sx, sy) = row["mu"], row["sigma"]
        ax.add_patch(
            Rectangle(
                (mx - sx, my - sy),
                2 * sx,
                2 * sy,
                fill=False,
                linestyle="--",
                linewidth=0.8,
                edgecolor="black",
            )
        )

    ys, xs = np.divmod(np.arange(labels.size), resolution)
    step = 2 * half / resolution
    for label in np.unique(labels):
        where = labels.ravel() == label
        cx = -half + step * (xs[where].mean() + 0.5)
        cy = -half + step * (ys[where].mean() + 0.5)
        name = "other" if label == other else strings[label]
        ax.text(
            cx,
            cy,
            f"{name}\n{mass[label]:.3f}",
            ha="center",
            va="center",
            fontsize=6,
            color="white" if label == other else "black",
        )
    c = model.config
    title = f"{'DD-VAE' if c.mode == 'argmax' else 'VAE'}: prior {c.prior}, proposal {c.proposal}"
    if divergences is not None:
        title += f"\nKL {divergences[0]:.4g}, JS {divergences[1]:.4g}"
    ax.set_title(title)
    ax.set_xlim(-half, half)
    ax.set_ylim(-half, half)
    ax.set_xlabel("$z_1$")
    ax.set_ylabel("$z_2$")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = [
    "bernoulli_distribution",
    "decode_latent_grid",
    "evaluate_synthetic",
    "format_probability_table",
    "latent_grid",
    "plot_latent_map",
    "prior_decoding_distribution",
    "prior_decoding_divergences",
    "prior_draw_frequencies",
    "sample_bernoulli_strings",
    "total_variation",
]
