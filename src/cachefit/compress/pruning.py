"""Pruning real modules: structured MLP sparsity (``sparse50`` / ``sparse75``) and 2:4 masks (``sparse24``).

* Structured: :func:`find_mlps` finds the MLPs by the family registry's patterns
  (``FamilySpec.mlp_patterns``); :func:`prune_mlp_` removes the intermediate neurons with the
  smallest score ``||up_i|| * ||gate_i|| * ||down_:,i||``, leaving smaller dense matrices with as
  many neurons as ``techniques.py`` keeps.
* 2:4: :func:`sparse24_mask` keeps the 2 largest |w| of every 4 consecutive inputs of a row;
  :func:`mask_24_` zeroes the rest in place (stored densely), and on CUDA
  :func:`to_semi_structured_` stores the masked weight as torch's semi-structured sparse tensor.

Which layers to prune is :func:`cachefit.compress.apply.compress_module_`'s choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cachefit.compress.linear import as_out_in, is_conv1d, is_linear_like, join_fqn
from cachefit.errors import UnsupportedCompressionError
from cachefit.families import MlpPattern, mlp_patterns

__all__ = ["MlpMatch", "find_mlps", "mask_24_", "prune_mlp_", "sparse24_mask", "to_semi_structured_"]


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


def prune_mlp_(mlp: MlpMatch, removed_fraction: float) -> tuple[int, int]:
    """Remove the lowest-scoring intermediate neurons of one MLP; returns (width before, kept)."""
    up_rows = _out_rows_norm(mlp.up)
    width = as_out_in(mlp.down).shape[1]
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


def sparse24_mask(weight_out_in: torch.Tensor) -> torch.Tensor:
    """Boolean 2:4 mask of an (out, in) matrix: in every 4 consecutive inputs of a row the 2 largest
    |w| are kept (ties: the first). A last partial group keeps at most 2."""
    rows, cols = weight_out_in.shape
    cols4 = -(-cols // 4) * 4
    mag = F.pad(weight_out_in.detach().abs().float(), (0, cols4 - cols), value=-1.0)  # padding never wins
    groups = mag.reshape(rows, cols4 // 4, 4)
    top = groups.topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return mask.reshape(rows, cols4)[:, :cols]


def mask_24_(module: nn.Module) -> None:
    """Zero the weight of a Linear / Conv1D outside its 2:4 mask, in place (the weight stays dense)."""
    with torch.no_grad():
        mask = sparse24_mask(as_out_in(module))
        if is_conv1d(module):
            mask = mask.t()
        module.weight.mul_(mask.to(module.weight.dtype))


def to_semi_structured_(module: nn.Module) -> str:
    """CUDA: store a masked nn.Linear weight as torch's semi-structured sparse tensor."""
    from torch.sparse import to_sparse_semi_structured

    sparse = to_sparse_semi_structured(module.weight.detach())
    module.weight = nn.Parameter(sparse, requires_grad=False)
    return "torch.sparse semi-structured (CUDA)"

