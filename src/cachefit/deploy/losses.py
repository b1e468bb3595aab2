"""The training loss of the last stage and its target, by a family's ``loss`` kind."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from cachefit.deploy.config import check_choice
from cachefit.families import Loss


def _causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy (labels -100 where padded), the loss of ``*ForCausalLM``."""
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                       ignore_index=-100)


def _encoder_loss(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A synthetic loss for encoders (no labels): half the mean square of the unpadded hidden states."""
    weight = mask.unsqueeze(-1).to(hidden.dtype)
    return 0.5 * (hidden.float().pow(2) * weight).sum() / (weight.sum() * hidden.shape[-1])


_LOSS_FNS: Mapping[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "causal_lm": _causal_lm_loss,
    "encoder_mean": _encoder_loss,
}


def loss_for(loss: Loss) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training loss of the last stage, by a family's ``loss`` (its target: :func:`labels_for`)."""
    check_choice(loss, tuple(_LOSS_FNS), what="loss")
    return _LOSS_FNS[loss]


def labels_for(loss: Loss, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The target handed to the last stage: next-token labels (-100 where padded) for ``causal_lm``,
    the padding mask for ``encoder_mean`` (encoders have no labels)."""
    check_choice(loss, tuple(_LOSS_FNS), what="loss")
    if loss == "encoder_mean":
        return mask.clone()
    return input_ids.masked_fill(mask == 0, -100)
