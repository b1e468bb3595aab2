"""Pruning real modules: structured MLP sparsity (``sparse50`` / ``sparse75``) and 2:4 masks (``sparse24``).

* Structured: :func:`find_mlps` finds the MLPs by the family registry's patterns
  (``FamilySpec.mlp_patterns``); :func:`prune_mlp_` removes the intermediate neurons with the
  smallest score, leaving smaller dense matrices with as many neurons as ``techniques.py`` keeps.
  The score is ``||up_i|| * ||gate_i|| * ||down_:,i||`` (magnitude), or with calibration
  statistics Wanda's ``||X_i|| * ||down_:,i||`` (:func:`wanda_neuron_scores`), optionally with
  the removed neurons' mean folded into the down projection's bias, or the down projection refit
  by least squares (``sparsity_method="sparsegpt"``).
* 2:4: :func:`sparse24_mask` keeps the 2 largest ``|w|`` (or Wanda's ``|w| ||X_j||``) of every 4
  consecutive inputs of a row; :func:`mask_24_` zeroes the rest in place (stored densely), and on
  CUDA :func:`to_semi_structured_` stores the masked weight as torch's semi-structured sparse
  tensor. SparseGPT's 2:4 (mask and weight update together) is in :mod:`cachefit.compress.gptq`.

Why Wanda is cachefit's own and not ``torchao.sparsity.WandaSparsifier`` (torchao 0.18, which runs
on CPU): its observer accumulates ``sum_t x_tj^2`` and scores ``|W| * sum_t x_tj^2``, not the
paper's ``|W| * ||X_j||_2`` (a different ranking; on MiniLM 2:4 it measured 0.249 ``1 - cos``
against 0.224 for the paper's score; tests/compress/test_calibrated.py shows the two masks agree
once fed the same statistic); its prepare / forward / step flow runs the model per sparsifier where
cachefit gathers statistics once for every method and unit; and it has no structured variant.

Which layers to prune is :func:`cachefit.compress.apply.compress_module_`'s choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cachefit.compress.calibration import InputStats
from cachefit.compress.linear import as_out_in, is_conv1d, is_linear_like, join_fqn
from cachefit.errors import UnsupportedCompressionError
from cachefit.families import MlpPattern, mlp_patterns

__all__ = [
    "MlpMatch",
    "find_mlps",
    "mask_24_",
    "prune_mlp_",
    "sparse24_mask",
    "to_semi_structured_",
    "wanda_neuron_scores",
]


# --------------------------------------------------------------------------------------------------
# Structured MLP sparsity


# Relative paths, from the module that owns them, of the MLP matrices that share the intermediate
# dimension (transformers' module names): every family's FamilySpec.mlp_patterns, gated ones first.
_MLP_PATTERNS: tuple[MlpPattern, ...] = mlp_patterns()


@dataclass(frozen=True, slots=True)
class MlpMatch:
    """One MLP of a module: the submodule that owns it and its linear layers, found by a pattern."""

    fqn: str
    """FQN of the owning module (``model.layers.0.mlp``)."""
    owner: nn.Module
    pattern: MlpPattern
    up: nn.Module
    down: nn.Module
    gate: nn.Module | None

    @property
    def pruned(self) -> bool:
        """True once :func:`prune_mlp_` has pruned it (a second pruning would compound)."""
        return getattr(self.owner, "_cachefit_pruned", False)

    def weight_fqns(self) -> list[str]:
        """FQNs of its weights, relative to the module it was found in: up, down, then gate."""
        names = [self.pattern.up, self.pattern.down] + ([self.pattern.gate] if self.pattern.gate else [])
        return [join_fqn(self.fqn, f"{n}.weight") for n in names]


def _get(owner: nn.Module, path: str) -> nn.Module | None:
    try:
        mod = owner.get_submodule(path)
    except AttributeError:
        return None
    return mod if is_linear_like(mod) else None


def find_mlps(root: nn.Module) -> list[MlpMatch]:
    """Every MLP under ``root`` (``root`` itself included) that a family pattern matches, the first
    matching pattern per module."""
    found = []
    for name, mod in root.named_modules():
        for pattern in _MLP_PATTERNS:
            up, down = _get(mod, pattern.up), _get(mod, pattern.down)
            gate = _get(mod, pattern.gate) if pattern.gate else None
            if up is None or down is None or (pattern.gate and gate is None):
                continue
            found.append(MlpMatch(fqn=name, owner=mod, pattern=pattern, up=up, down=down, gate=gate))
            break
    return found


def _out_rows_norm(module: nn.Module) -> torch.Tensor:
    return as_out_in(module).float().norm(dim=1)


def _set_weight_(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


def _keep_rows_(module: nn.Module, index: torch.Tensor) -> None:
    """Keep output features ``index`` of a Linear / Conv1D (weight rows, bias entries).

    The kept slices are copied (``contiguous``), so the old, larger storages are freed.
    """
    with torch.no_grad():
        if is_conv1d(module):
            _set_weight_(module, "weight", module.weight.detach()[:, index])
            module.nf = int(index.numel())
        else:
            _set_weight_(module, "weight", module.weight.detach()[index])
            module.out_features = int(index.numel())
        if getattr(module, "bias", None) is not None:
            _set_weight_(module, "bias", module.bias.detach()[index])


def _keep_cols_(module: nn.Module, index: torch.Tensor) -> None:
    """Keep input features ``index`` of a Linear / Conv1D (weight columns; the bias is per output)."""
    with torch.no_grad():
        if is_conv1d(module):
            _set_weight_(module, "weight", module.weight.detach()[index])
            module.nx = int(index.numel())
        else:
            _set_weight_(module, "weight", module.weight.detach()[:, index])
            module.in_features = int(index.numel())


def prune_mlp_(
    mlp: MlpMatch,
    removed_fraction: float,
    *,
    down_inputs: InputStats | None = None,
    compensate: bool = False,
    reconstruct: bool = False,
) -> tuple[int, int]:
    """Remove the lowest-scoring intermediate neurons of one MLP; returns (width before, kept).

    Args:
        mlp: the MLP.
        removed_fraction: the fraction of intermediate neurons removed (rounded as ``techniques.py``).
        down_inputs: calibration statistics of the down projection's input (the neurons' outputs):
            given, the score is Wanda's ``||X_i|| ||down_:,i||`` (see :func:`wanda_neuron_scores`);
            None, the weights-only magnitude score.
        compensate: with ``down_inputs``, add the removed neurons' mean contribution
            ``down_:,removed @ mean(X_removed)`` to the down projection's bias, where it has one
            (FLAP's bias compensation; no bias, nothing is added: a new bias would cost bytes the
            plan does not count).
        reconstruct: with ``down_inputs`` holding ``X^T X``, refit the down projection's kept
            columns (and its bias, where it has one) by least squares to the original output over
            the calibration tokens (:func:`cachefit.compress.gptq.reconstruct_columns`).
    """
    width = as_out_in(mlp.down).shape[1]
    if down_inputs is not None:
        score = wanda_neuron_scores(mlp, down_inputs)
        kept = width - math.floor(width * removed_fraction)
        index = torch.topk(score, kept).indices.sort().values.to(as_out_in(mlp.down).device)
        original = as_out_in(mlp.down).float().clone() if reconstruct else None
        if compensate and not reconstruct:
            _compensate_bias_(mlp.down, _removed_columns(width, index), down_inputs.mean)
        result = _keep_neurons_(mlp, index, width)
        if original is not None:
            _refit_down_(mlp.down, original, index, down_inputs)
        return result
    up_rows = _out_rows_norm(mlp.up)
    if mlp.pattern.fused_gate_up:
        if up_rows.numel() != 2 * width:
            raise UnsupportedCompressionError(
                f"structured sparsity on {mlp.fqn}: fused gate_up has {up_rows.numel()} outputs, expected "
                f"2 x {width} (the down projection's inputs)"
            )
        score = up_rows[:width] * up_rows[width:]
    else:
        score = up_rows
        if score.numel() != width:
            raise UnsupportedCompressionError(
                f"structured sparsity on {mlp.fqn}: the up projection has {score.numel()} outputs but the down "
                f"projection {width} inputs; not an MLP cachefit can prune"
            )
        if mlp.gate is not None:
            score = score * _out_rows_norm(mlp.gate)
    # Neuron i's contribution is bounded by ||up_i|| ||gate_i|| ||down_:,i|| (its input rows and its
    # output column): a magnitude criterion in the spirit of LLM-Pruner's first-order importance
    # without gradients (Ma et al. 2023).
    score = score * as_out_in(mlp.down).float().norm(dim=0)
    # Same count as techniques.py: floor(width * fraction) neurons removed.
    kept = width - math.floor(width * removed_fraction)
    index = torch.topk(score, kept).indices.sort().values.to(as_out_in(mlp.down).device)
    return _keep_neurons_(mlp, index, width)


def _check_fused_width(mlp: MlpMatch, width: int) -> None:
    rows = as_out_in(mlp.up).shape[0]
    if rows != (2 * width if mlp.pattern.fused_gate_up else width):
        raise UnsupportedCompressionError(
            f"structured sparsity on {mlp.fqn}: the up projection has {rows} outputs but the down projection "
            f"{width} inputs; not an MLP cachefit can prune"
        )


def wanda_neuron_scores(mlp: MlpMatch, down_inputs: InputStats) -> torch.Tensor:
    """Wanda's score of each intermediate neuron, ``||X_i||_2 ||down_:,i||_2``.

    ``X_i`` is the neuron's output over the calibration tokens (the down projection's input ``i``):
    the norm of the column ``i`` of ``|W_down| * ||X||`` that Wanda (Sun et al., "A Simple and
    Effective Pruning Approach for Large Language Models", ICLR 2024, arXiv:2306.11695) scores
    weight by weight, summed over the column in L2, as the structured variant ("Wanda-sp") that
    FLAP (An et al., AAAI 2024, arXiv:2312.11983) compares against. It needs no up / gate weights:
    the activation already carries them.
    """
    down = as_out_in(mlp.down).float()
    width = down.shape[1]
    _check_fused_width(mlp, width)
    norm = down_inputs.norm.to(down.device)
    if norm.numel() != width:
        raise UnsupportedCompressionError(
            f"structured sparsity on {mlp.fqn}: calibration statistics of {norm.numel()} channels for a down "
            f"projection of {width} inputs; gather them on this model"
        )
    return down.norm(dim=0) * norm


def _removed_columns(width: int, kept: torch.Tensor) -> torch.Tensor:
    removed = torch.ones(width, dtype=torch.bool, device=kept.device)
    removed[kept] = False
    return removed


def _compensate_bias_(module: nn.Module, removed: torch.Tensor, mean: torch.Tensor) -> bool:
    """``bias += W[:, removed] @ mean[removed]``: the removed inputs' average contribution, kept.

    Returns False (and changes nothing) when the layer has no bias.
    """
    bias = getattr(module, "bias", None)
    if bias is None:
        return False
    with torch.no_grad():
        w = as_out_in(module).float()
        delta = w[:, removed] @ mean.to(w.device)[removed]
        bias.add_(delta.to(device=bias.device, dtype=bias.dtype))
    return True


def _refit_down_(down: nn.Module, original: torch.Tensor, kept: torch.Tensor, inputs: InputStats) -> None:
    from cachefit.compress.gptq import reconstruct_columns  # the same damped Hessian as GPTQ's

    bias = getattr(down, "bias", None)
    weight, delta = reconstruct_columns(original, kept, inputs, with_bias=bias is not None)
    with torch.no_grad():
        down.weight.copy_((weight.t() if is_conv1d(down) else weight).to(down.weight.dtype))
        if bias is not None and delta is not None:
            bias.add_(delta.to(device=bias.device, dtype=bias.dtype))


def _keep_neurons_(mlp: MlpMatch, index: torch.Tensor, width: int) -> tuple[int, int]:
    kept = int(index.numel())
    if mlp.pattern.fused_gate_up:
        _keep_rows_(mlp.up, torch.cat([index, index + width]))
    else:
        _keep_rows_(mlp.up, index)
        if mlp.gate is not None:
            _keep_rows_(mlp.gate, index)
    _keep_cols_(mlp.down, index)
    # Modules that remember the width (transformers' LlamaMLP.intermediate_size) follow it.
    if isinstance(getattr(mlp.owner, "intermediate_size", None), int):
        mlp.owner.intermediate_size = kept
    mlp.owner._cachefit_pruned = True  # pruned once: a second call would compound (the planner refuses that too)
    return width, kept


# --------------------------------------------------------------------------------------------------
# 2:4 masks


def sparse24_mask(weight_out_in: torch.Tensor, input_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean 2:4 mask of an (out, in) matrix: in every 4 consecutive inputs of a row the 2 largest
    scores are kept (ties: the first). A last partial group keeps at most 2.

    The score is ``|w|`` (magnitude), or with ``input_norm`` (``||X_j||_2`` per input channel over
    calibration tokens) Wanda's ``|w_ij| ||X_j||_2`` (Sun et al., ICLR 2024, arXiv:2306.11695).
    """
    rows, cols = weight_out_in.shape
    cols4 = -(-cols // 4) * 4
    score = weight_out_in.detach().abs().float()
    if input_norm is not None:
        if input_norm.numel() != cols:
            raise UnsupportedCompressionError(
                f"2:4 with Wanda: {input_norm.numel()} input norms for a matrix of {cols} inputs"
            )
        score = score * input_norm.to(score.device).float().reshape(1, cols)
    mag = F.pad(score, (0, cols4 - cols), value=-1.0)  # padding never wins
    groups = mag.reshape(rows, cols4 // 4, 4)
    top = groups.topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return mask.reshape(rows, cols4)[:, :cols]


def mask_24_(module: nn.Module, inputs: InputStats | None = None, *, compensate: bool = False) -> None:
    """Zero the weight of a Linear / Conv1D outside its 2:4 mask, in place (the weight stays dense).

    Args:
        module: the layer.
        inputs: calibration statistics of its input: given, Wanda's mask; None, magnitude.
        compensate: with ``inputs``, add the zeroed weights' mean contribution
            ``sum_j w_ij mean(X_j)`` to the bias, where the layer has one.
    """
    with torch.no_grad():
        mask = sparse24_mask(as_out_in(module), None if inputs is None else inputs.norm)
        if compensate and inputs is not None:
            bias = getattr(module, "bias", None)
            if bias is not None:
                dropped = as_out_in(module).float() * (~mask).to(torch.float32)
                bias.add_((dropped @ inputs.mean.to(dropped.device)).to(device=bias.device, dtype=bias.dtype))
        if is_conv1d(module):
            mask = mask.t()
        module.weight.mul_(mask.to(module.weight.dtype))


def to_semi_structured_(module: nn.Module) -> str:
    """CUDA: store a masked nn.Linear weight as torch's semi-structured sparse tensor."""
    from torch.sparse import to_sparse_semi_structured

    sparse = to_sparse_semi_structured(module.weight.detach())
    module.weight = nn.Parameter(sparse, requires_grad=False)
    return "torch.sparse semi-structured (CUDA)"

