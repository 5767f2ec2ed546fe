"""The relaxed arg-max loss (Eq. 13): public functions in ``api``, one module per backend."""

from .api import DecoderLoss, decoder_loss, relaxed_argmax_loss
from .linear import linear_decoder_loss, linear_relaxed_argmax_loss
from .nn import RelaxedArgmaxLoss

__all__ = [
    "DecoderLoss",
    "RelaxedArgmaxLoss",
    "decoder_loss",
    "linear_decoder_loss",
    "linear_relaxed_argmax_loss",
    "relaxed_argmax_loss",
]
