"""nn.Module wrappers of the library's losses."""

from __future__ import annotations

from torch import Tensor, nn

from .._checks import check_choice, check_int, check_tau
from ..backends import BACKENDS
from .api import REDUCTIONS, SCORES, relaxed_argmax_loss


class RelaxedArgmaxLoss(nn.Module):
    """Module form of :func:`ddvae_fast.relaxed_argmax_loss`.

    ``tau`` is a plain attribute (validated on assignment) so a temperature
    schedule can change it between epochs without rebuilding the module.
    """

    def __init__(
        self,
        tau,
        *,
        score: str = "logit",
        ignore_index: int = -100,
        reduction: str = "mean",
        backend: str = "auto",
    ):
        super().__init__()
        self.tau = tau
        self.score = check_choice(score, "score", SCORES)
        self.ignore_index = check_int(ignore_index, "ignore_index")
        self.reduction = check_choice(reduction, "reduction", REDUCTIONS)
        self.backend = check_choice(backend, "backend", ("auto",) + BACKENDS)

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
        )

    def extra_repr(self) -> str:
        return (
            f"tau={self._tau}, score={self.score!r}, ignore_index={self.ignore_index}, "
            f"reduction={self.reduction!r}, backend={self.backend!r}"
        )
