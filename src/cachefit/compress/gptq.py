"""GPTQ: weight-only quantization that rounds one input column at a time and pushes each column's
rounding error onto the columns not yet rounded, weighted by the inverse Hessian of the layer's
output error (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", ICLR 2023, arXiv:2210.17323; the algorithm of its reference code, IST-DASLab/gptq).

The result is stored in exactly the format of round to nearest (:mod:`cachefit.compress.quantized`:
the same values, scales and zero points per group), so the bytes are those ``techniques.py``
counts; only which grid point each weight lands on differs.

Why cachefit's own: torchao 0.18's ``torchao.prototype.gptq.GPTQConfig`` produces torchao's
``Int4Tensor`` (its int4 path needs the ``mslk`` package and a CUDA kernel; its ``__post_init__``
refuses int4 without ``mslk``), not the CPU-packed two-values-a-byte layout the planner counts, and
torchao's AWQ (``torchao.prototype.awq``) needs a base config whose weight takes an activation
pre-scale (stored per input channel: bytes the plan does not count) and an int4 layout that runs
on CPU, which torchao 0.18 does not have (``Int4WeightOnlyConfig`` needs CUDA; ``IntxWeightOnlyConfig``
stores one int4 per byte).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from cachefit.compress.calibration import InputStats
from cachefit.compress.quantized import int4_qparams, int4_values, int8_scales, int8_values
from cachefit.compress.techniques import CompressionConfig
from cachefit.errors import ConfigError
from cachefit.units import torch_dtype

__all__ = ["GPTQ_DAMPING", "gptq_quantize", "reconstruct_columns", "sparsegpt_24"]

GPTQ_DAMPING = 0.1
"""Added to the Hessian's diagonal, as a fraction of its mean (the reference code's ``percdamp``,
whose default 0.01 suits its 128 x 2,048 calibration tokens). With few tokens ``X^T X`` of a wide
input is far from full rank and 0.01 fits the calibration inputs: on MiniLM int4 fitted on 32
sentences (~450 tokens), ``1 - cos`` on held-out sentences was 0.0249 at 0.01, 0.0187 at 0.1 and
0.0241 at 1.0 (round to nearest: 0.0518); fitted on the 128 built-in calibration sentences, 0.0147
at 0.01 and 0.0146 at 0.1. The least-squares refit of structured pruning uses it too (there 0.01
measured 0.085 against 0.103 at 0.1 for sparse50: left at one constant)."""
_BLOCK = 128  # columns updated lazily together (the reference code's ``blocksize``)


def _inverse_hessian_factor(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damping * mean(diag H) I)^-1``, in float64 for stability.

    Channels that never fired on the calibration tokens (``H_jj = 0``) get ``H_jj = 1``: their
    columns are rounded to nearest and pass no error on (the reference code also zeroes their
    weights; cachefit keeps them, since other inputs may use them).
    """
    h = gram.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    h += damping * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    for _ in range(6):  # a near-singular H: more damping until Cholesky succeeds
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            break
        h += damping * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    else:
        raise ConfigError("GPTQ: the calibration Hessian is not positive definite even after damping; give more calibration tokens")
    return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)


def _factor(gram: torch.Tensor | InputStats, cols: int, damping: float, what: str) -> torch.Tensor:
    """The inverse Hessian factor of a layer, kept on its statistics for the next call."""
    stats = gram if isinstance(gram, InputStats) else None
    if stats is not None:
        if stats.gram is None:
            raise ConfigError(f"{what}: the calibration statistics hold no X^T X; gather them with gram=True")
        gram = stats.gram
    assert isinstance(gram, torch.Tensor)
    if tuple(gram.shape) != (cols, cols):
        raise ConfigError(f"{what}: X^T X has shape {tuple(gram.shape)} but the weight has {cols} inputs")
    key = ("hinv", damping)
    hinv = stats.derived.get(key) if stats is not None else None
    if hinv is None:
        hinv = _inverse_hessian_factor(gram, damping).float()
        if stats is not None:
            stats.derived[key] = hinv
    return hinv


def _sweep(
    w: torch.Tensor, hinv: torch.Tensor, block: int, column: Callable[[int, torch.Tensor, torch.Tensor, int], torch.Tensor]
) -> torch.Tensor:
    """The column sweep GPTQ and SparseGPT share: column by column, replace the weights by what
    ``column(col, w1, h1, i)`` gives (rounded or pruned; ``w1`` is the current block as updated so
    far, ``i`` the column in it), and spread the error over the columns not yet done through the
    inverse Hessian factor, lazily a block at a time (the reference code's structure)."""
    rows, cols = w.shape
    out = torch.empty_like(w)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1, h1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            new = column(i1 + i, w1, h1, i)
            out[:, i1 + i] = new
            e = (w1[:, i] - new) / h1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * h1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return out


def gptq_quantize(
    weight: torch.Tensor,
    gram: torch.Tensor | InputStats,
    *,
    bits: int,
    config: CompressionConfig,
    damping: float = GPTQ_DAMPING,
    zero_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None]]:
    """Quantize an (out, in) weight with GPTQ onto cachefit's int8 / int4 grid.

    Args:
        weight: the float weight as (out, in).
        gram: ``X^T X`` of the layer's calibration inputs (in, in), or the layer's
            :class:`~cachefit.compress.calibration.InputStats` (which keep the inverse Hessian
            factor for the next call on the same layer).
        bits: 8 (symmetric, one scale per row or per ``int8_group_size``) or 4 (groups of
            ``int4_group_size``, scale and zero point per group).
        config: group sizes, scale dtype, zero points.
        zero_mask: (out, in) booleans of weights that stay exactly 0 (pruned by 2:4 before):
            GPTQ's updates would otherwise fill them in.

    Returns:
        The quantized weight (out, in), dequantized (each value on its group's grid, 0 where
        ``zero_mask``), and the grid: (scales, zero points or None) of shape (out, groups) in the
        scale dtype, to hand to :class:`~cachefit.compress.quantized.Int4WeightOnlyLinear`
        (``qparams``) or :class:`~cachefit.compress.quantized.Int8WeightOnlyLinear` (``scale``).
    """
    if bits not in (4, 8):
        raise ConfigError(f"GPTQ: bits must be 4 or 8, got {bits!r}")
    w = weight.detach().float().cpu().clone()  # the statistics live on the CPU; callers move the result
    rows, cols = w.shape
    hinv = _factor(gram, cols, damping, "GPTQ")
    group = (config.int4_group_size if bits == 4 else config.int8_group_size) or cols
    groups = -(-cols // group)
    scales = torch.empty(rows, groups)
    zeros = torch.empty(rows, groups) if bits == 4 and config.int4_zero_points else None

    def set_grid(k: int, source: torch.Tensor) -> None:
        part = F.pad(source, (0, group - source.shape[1])).unsqueeze(1)  # the module pads with zeros too
        if bits == 4:
            scale, zero = int4_qparams(part, config)
            scales[:, k] = scale[:, 0].float()
            if zeros is not None and zero is not None:
                zeros[:, k] = zero[:, 0].float()
        else:
            scales[:, k] = int8_scales(part, config)[:, 0].float()

    if group >= cols:  # one group per row: its grid from the original row, as the reference code does
        set_grid(0, w)

    def round_column(col: int, w1: torch.Tensor, h1: torch.Tensor, i: int) -> torch.Tensor:
        k = col // group
        if group < cols and col % group == 0:  # a group starts: its grid from its weights as updated so far
            set_grid(k, w1[:, i : i + group])
        value = w1[:, i].reshape(rows, 1, 1)
        scale_k = scales[:, k : k + 1]
        if bits == 4:
            zero_k = None if zeros is None else zeros[:, k : k + 1]
            q = int4_values(value, scale_k, zero_k).reshape(rows)
            new = (q - 8.0) * scale_k[:, 0] + (0.0 if zero_k is None else zero_k[:, 0])
        else:
            new = int8_values(value, scale_k).reshape(rows) * scale_k[:, 0]
        if zero_mask is not None:
            new = new.masked_fill(zero_mask[:, col], 0.0)
        return new

    # blocks hold whole groups, so each group's grid is chosen from its weights as updated so far
    block = group * max(1, _BLOCK // group) if group < cols else _BLOCK
    out = _sweep(w, hinv, block, round_column)
    dtype = torch_dtype(config.scale_dtype, what="compression config: scale_dtype")
    return out, (scales.to(dtype), None if zeros is None else zeros.to(dtype))


def sparsegpt_24(
    weight: torch.Tensor, gram: torch.Tensor | InputStats, *, damping: float = GPTQ_DAMPING
) -> tuple[torch.Tensor, torch.Tensor]:
    """2:4-prune an (out, in) weight with SparseGPT and update the weights kept.

    SparseGPT (Frantar and Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned
    in One-Shot", ICML 2023, arXiv:2301.00774): at the first column of every 4, each row keeps the 2
    weights of the 4 with the largest ``w^2 / [H^-1]_jj^2`` (the OBS saliency with the inverse
    Hessian factor's diagonal), and the error of zeroing the others is spread over the columns not
    yet done, as GPTQ spreads rounding error. A last partial group keeps at most 2 (as
    :func:`~cachefit.compress.pruning.sparse24_mask`).

    Returns:
        The new weight (out, in), zero outside the mask, and the mask (True: kept).
    """
    w = weight.detach().float().cpu().clone()  # the statistics live on the CPU; callers move the result
    rows, cols = w.shape
    hinv = _factor(gram, cols, damping, "SparseGPT")
    kept = torch.ones(rows, cols, dtype=torch.bool)

    def prune_column(col: int, w1: torch.Tensor, h1: torch.Tensor, i: int) -> torch.Tensor:
        if col % 4 == 0:
            width = min(4, w1.shape[1] - i)
            if width > 2:
                saliency = w1[:, i : i + width] ** 2 / torch.diagonal(h1)[i : i + width].reshape(1, -1) ** 2
                drop = torch.topk(saliency, width - 2, dim=1, largest=False).indices
                kept[:, col : col + width].scatter_(1, drop, False)
        return w1[:, i].masked_fill(~kept[:, col], 0.0)

    return _sweep(w, hinv, _BLOCK, prune_column), kept


def reconstruct_columns(
    weight: torch.Tensor, kept: torch.Tensor, stats: InputStats, *, with_bias: bool, damping: float = GPTQ_DAMPING
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Least-squares weights for the input channels ``kept`` of an (out, in) layer.

    The layer keeps only some inputs (the MLP neurons structured pruning leaves); the weights on them
    (and, with ``with_bias``, a bias change) that best reproduce its original output over the
    calibration tokens solve the normal equations ``[W' d] [[H_kk, s_k], [s_k^T, n]] =
    [W H_:k, W s]`` (``H = X^T X``, ``s`` the input sums, ``n`` the tokens), damped like GPTQ's
    Hessian. This is the reconstruction step of layer-wise pruning methods (the OBS update for a set
    of removed inputs; SparseGPT's update done at once for whole columns).

    Returns:
        The new weight (out, len(kept)) and the bias change (out,) or None.
    """
    if stats.gram is None:
        raise ConfigError("structured reconstruction: the calibration statistics hold no X^T X; gather them with gram=True")
    h = stats.gram.double()
    w = weight.detach().double().cpu()
    k = kept.to(torch.long).cpu()
    h_kk = h[k][:, k]
    rhs = w @ h[:, k]
    if with_bias:
        s = stats.sum.double()
        n = float(stats.rows)
        top = torch.cat([h_kk, s[k].unsqueeze(1)], dim=1)
        bottom = torch.cat([s[k], torch.tensor([n], dtype=h.dtype)]).unsqueeze(0)
        h_kk = torch.cat([top, bottom], dim=0)
        rhs = torch.cat([rhs, (w @ s).unsqueeze(1)], dim=1)
    diag = torch.diagonal(h_kk)
    h_kk = h_kk + damping * diag.mean() * torch.eye(h_kk.shape[0], dtype=h.dtype)
    solution = torch.linalg.solve(h_kk, rhs.t()).t()  # h_kk is symmetric: X A = B  <=>  A X^T = B^T
    if with_bias:
        return solution[:, :-1].float(), solution[:, -1].float()
    return solution.float(), None
