"""The relaxed arg-max loss (Eq. 13): public functions in ``api``, one module per backend."""

from .api import DecoderLoss, decoder_loss, relaxed_argmax_loss
from .nn import RelaxedArgmaxLoss

__all__ = ["DecoderLoss", "RelaxedArgmaxLoss", "decoder_loss", "relaxed_argmax_loss"]
