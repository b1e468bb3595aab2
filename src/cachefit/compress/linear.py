"""The layers compression acts on: ``nn.Linear`` and GPT-2's ``Conv1D``, their weights as (out, in).

Read by the quantized modules' callers, pruning and the orchestration in
:mod:`cachefit.compress.apply`, so that all three agree on what a linear layer is and how its FQNs
are written.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn

from cachefit.errors import ConfigError

__all__ = ["as_out_in", "check_fqns", "is_conv1d", "is_linear_like", "join_fqn"]


def is_conv1d(module: nn.Module) -> bool:
    """True for ``transformers.pytorch_utils.Conv1D`` (GPT-2), whose weight is (in, out)."""
    # matched by name (weight (nx=in, nf=out)) so that cachefit does not import transformers
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def is_linear_like(module: nn.Module) -> bool:
    """True for the modules compression treats as a weight matrix: ``nn.Linear`` and ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def as_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features), whatever the module stores (Conv1D: (in, out))."""
    weight = module.weight.detach()
    return weight.t() if is_conv1d(module) else weight


def join_fqn(prefix: str, name: str) -> str:
    """``prefix.name``; just ``name`` under the root module (empty prefix)."""
    return f"{prefix}.{name}" if prefix else name


def check_fqns(names: Collection[str], what: str) -> list[str]:
    """``names`` as a list of FQN strings.

    Raises:
        ConfigError: a bare string (one FQN, not a collection of them) or a name that is not a string.
    """
    if isinstance(names, str):
        raise ConfigError(f"{what} must be a collection of FQNs, got the string {names!r}; wrap it in a list")
    out = list(names)
    bad = [n for n in out if not isinstance(n, str)]
    if bad:
        raise ConfigError(f"{what} must hold FQN strings, got {bad[:3]!r}")
    return out
