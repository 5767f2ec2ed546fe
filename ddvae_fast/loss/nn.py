"""nn.Module wrappers of the library's losses."""

from __future__ import annotations

from torch import Tensor, nn

from .._checks import check_choice, check_int, check_tau
from ..backends import BACKENDS
from .api import REDUCTIONS, SCORES, _refuse_cross_entropy_options, relaxed_argmax_loss


class RelaxedArgmaxLoss(nn.Module):
    """Module form of :func:`ddvae_fast.relaxed_argmax_loss`.

    ``tau`` is a plain attribute (validated on assignment) so a temperature
    schedule can change it between epochs without rebuilding the module.

    A one-line replacement for ``nn.CrossEntropyLoss(ignore_index=pad)`` with
    (N, C) or (N, C, d1, ...) input: ``RelaxedArgmaxLoss(tau, ignore_index=pad,
    class_dim=1)``, called the same way. ``weight`` and ``label_smoothing``
    are accepted only at their defaults: they have no meaning for this loss
    (see :func:`ddvae_fast.relaxed_argmax_loss`).
    """

    def __init__(
        self,
        tau,
        *,
        score: str = "logit",
        ignore_index: int = -100,
        reduction: str = "mean",
        backend: str = "auto",
        class_dim: int | None = None,
        weight=None,
        label_smoothing=None,
    ):
        super().__init__()
        _refuse_cross_entropy_options(weight, label_smoothing)
        self.tau = tau
        self.score = check_choice(score, "score", SCORES)
        self.ignore_index = check_int(ignore_index, "ignore_index")
        self.reduction = check_choice(reduction, "reduction", REDUCTIONS)
        self.backend = check_choice(backend, "backend", ("auto",) + BACKENDS)
        self.class_dim = None if class_dim is None else check_int(class_dim, "class_dim")

    @property
    def tau(self) -> float:
        return self._tau

    @tau.setter
    def tau(self, value) -> None:
        self._tau = check_tau(value)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return relaxed_argmax_loss(
            logits,
            target,
            self._tau,
            score=self.score,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            backend=self.backend,
            class_dim=self.class_dim,
        )

    def extra_repr(self) -> str:
        return (
            f"tau={self._tau}, score={self.score!r}, ignore_index={self.ignore_index}, "
            f"reduction={self.reduction!r}, backend={self.backend!r}, class_dim={self.class_dim}"
        )
