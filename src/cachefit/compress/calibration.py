"""Calibration: what each linear layer of a model sees at its input, gathered once on sample inputs.

The calibrated methods read these statistics instead of running the model themselves, so one pass
over the calibration inputs serves every method and every unit:

* Wanda (``sparsity_method="wanda"``, :mod:`cachefit.compress.pruning`) reads the L2 norm of each
  input channel, ``||X_j||``;
* GPTQ (``quantize_method="gptq"``, :mod:`cachefit.compress.gptq`) reads ``X^T X``, the Hessian of
  the layer's squared output error up to a factor ``2``;
* bias compensation reads the mean of each input channel.

::

    stats = collect_input_stats(model, batches, gram=True)
    compress_module_(model, ["int4"], config=CompressionConfig(quantize_method="gptq"), calibration=stats)

The statistics come from the uncompressed model (one-shot, as torchao's ``GPTQConfig`` observes by
default); the papers' sequential variant (each layer calibrated on the outputs of the layers
already compressed) is not done. Padding tokens (``attention_mask == 0``) are left out.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cachefit.compress.linear import is_linear_like
from cachefit.errors import ConfigError

__all__ = ["CalibrationStats", "InputStats", "collect_input_stats"]


@dataclass(frozen=True, slots=True, kw_only=True)
class InputStats:
    """The inputs one linear layer saw over the calibration tokens (fp32 sums on the CPU)."""

    rows: int
    """Input vectors (tokens) seen."""
    sum: torch.Tensor
    """``sum_t x_t`` per input channel, shape (in,)."""
    sum_sq: torch.Tensor
    """``sum_t x_tj^2`` per input channel, shape (in,)."""
    gram: torch.Tensor | None = None
    """``sum_t x_t x_t^T``, shape (in, in); None unless gathered with ``gram=True``."""
    derived: dict[Any, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)
    """What methods compute from these statistics and reuse (GPTQ's inverse Hessian factor, by
    damping): the same layer is compressed alone and with the others, and by int8 and int4."""

    @property
    def norm(self) -> torch.Tensor:
        """``||X_j||_2`` per input channel: Wanda's activation factor."""
        return self.sum_sq.sqrt()

    @property
    def mean(self) -> torch.Tensor:
        """Mean input per channel."""
        return self.sum / max(self.rows, 1)


class CalibrationStats(Mapping[str, InputStats]):
    """Input statistics by linear-module FQN (``encoder.layer.0.intermediate.dense``)."""

    def __init__(self, by_module: Mapping[str, InputStats]) -> None:
        self._by_module = dict(by_module)

    def __getitem__(self, fqn: str) -> InputStats:
        return self._by_module[fqn]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_module)

    def __len__(self) -> int:
        return len(self._by_module)

    def under(self, prefix: str) -> CalibrationStats:
        """The statistics of the modules under ``prefix``, named relative to it (for compressing a
        submodule such as one layer on its own)."""
        if not prefix:
            return self
        start = prefix + "."
        return CalibrationStats({k[len(start):]: v for k, v in self._by_module.items() if k.startswith(start)})

    def require(self, fqn: str, *, method: str, gram: bool = False) -> InputStats:
        """The statistics of module ``fqn``, or a ConfigError that says how to gather them."""
        stats = self._by_module.get(fqn)
        if stats is None or stats.rows == 0:
            raise ConfigError(
                f"{method}: no calibration statistics for the linear layer {fqn!r}; gather them on the same "
                f"module with collect_input_stats(module, batches) and pass calibration=..."
            )
        if gram and stats.gram is None:
            raise ConfigError(f"{method}: the calibration statistics of {fqn!r} hold no X^T X; gather them with gram=True")
        return stats


class _Accumulator:
    def __init__(self, gram: bool) -> None:
        self.gram = gram
        self.rows = 0
        self.sum: torch.Tensor | None = None
        self.sum_sq: torch.Tensor | None = None
        self.xtx: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float().cpu()
        if self.sum is None:
            width = x.shape[-1]
            self.sum, self.sum_sq = torch.zeros(width), torch.zeros(width)
            self.xtx = torch.zeros(width, width) if self.gram else None
        self.rows += x.shape[0]
        self.sum += x.sum(dim=0)
        self.sum_sq += (x * x).sum(dim=0)
        if self.xtx is not None:
            self.xtx += x.t() @ x

    def stats(self) -> InputStats:
        if self.sum is None:
            return InputStats(rows=0, sum=torch.zeros(0), sum_sq=torch.zeros(0))
        return InputStats(rows=self.rows, sum=self.sum, sum_sq=self.sum_sq, gram=self.xtx)


def collect_input_stats(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    modules: Collection[str] | None = None,
    gram: bool = False,
) -> CalibrationStats:
    """Run ``model`` on ``batches`` and gather the inputs of its linear layers (nn.Linear, Conv1D).

    Args:
        model: the uncompressed model (it is run, not changed).
        batches: keyword inputs of the model (``input_ids``, ``attention_mask``, ...); rows whose
            ``attention_mask`` is 0 (padding) are left out.
        modules: FQNs of the linear layers to watch; None: all of them.
        gram: also gather ``X^T X`` (in x in floats per layer: GPTQ needs it).

    Raises:
        ConfigError: no batch, or ``modules`` names no linear layer of the model.
    """
    linears = {name: mod for name, mod in model.named_modules() if is_linear_like(mod)}
    if modules is not None:
        unknown = sorted(set(modules) - set(linears))
        if unknown:
            raise ConfigError(f"collect_input_stats: {unknown[:3]} name no linear layer of {type(model).__name__}")
        linears = {name: linears[name] for name in modules}
    accumulators = {name: _Accumulator(gram) for name in linears}
    keep: list[torch.Tensor | None] = [None]  # the current batch's non-padding positions

    def hook(name: str):
        def record(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            mask = keep[0]
            if mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                x = x[mask.to(x.device)]
            accumulators[name].add(x)

        return record

    handles = [mod.register_forward_pre_hook(hook(name)) for name, mod in linears.items()]
    seen = 0
    try:
        with torch.no_grad():
            for batch in batches:
                mask = batch.get("attention_mask")
                keep[0] = None if mask is None else mask.bool()
                device = next(model.parameters()).device
                model(**{k: v.to(device) for k, v in batch.items()})
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
    if not seen:
        raise ConfigError("collect_input_stats: no calibration batch given")
    return CalibrationStats({name: acc.stats() for name, acc in accumulators.items()})
