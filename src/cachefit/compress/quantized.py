"""Weight-only quantized linear layers: int8 (:class:`Int8WeightOnlyLinear`) and int4
(:class:`Int4WeightOnlyLinear`), stored in exactly the format ``techniques.py`` counts.

* int8: symmetric values ``(out, in)`` and one scale per output row (or per ``int8_group_size``
  inputs) in ``config.scale_dtype``; aten's ``_weight_int8pack_mm`` on CPU (per-row scales), else
  dequantize on the fly.
* int4: groups of ``int4_group_size`` inputs with a scale and a zero point per group (torchao /
  gpt-fast ``scales_and_zeros`` layout), two values a byte: packed by aten's CPU int4 kernel where it
  accepts the shape, else by cachefit's own nibble packing and dequantized on the fly. Same bytes
  either way.

Each replaces an ``nn.Linear`` / GPT-2 ``Conv1D`` given its weight as (out, in)
(:func:`cachefit.compress.linear.as_out_in`); :func:`cachefit.compress.apply.compress_module_`
decides which layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cachefit.compress.techniques import CompressionConfig
from cachefit.errors import UnsupportedCompressionError
from cachefit.units import torch_dtype

__all__ = [
    "Int4WeightOnlyLinear",
    "Int8WeightOnlyLinear",
    "int4_qparams",
    "int4_values",
    "int8_scales",
    "int8_values",
]

# The CPU int4 kernel (aten _weight_int4pack_mm_for_cpu) accepts these group sizes and needs the
# output rows in multiples of 16 (its own checks: "expect qGroupSize to be 32, 64, 128 or 256",
# "expect N to be dividable by 16"), seen on torch 2.13.
_CPU_INT4_GROUPS = (32, 64, 128, 256)
_CPU_INT4_ROW_MULTIPLE = 16
_FLOAT_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _scale_dtype(config: CompressionConfig) -> torch.dtype:
    return torch_dtype(config.scale_dtype, what="compression config: scale_dtype")


# --------------------------------------------------------------------------------------------------
# The grids: scales (and zero points) of a group of weights, and the values on that grid. Shared by
# the modules below (round to nearest) and by GPTQ (cachefit.compress.gptq), which picks the grid
# group by group and rounds weights it has updated, so both store exactly the same format.


def int8_scales(w: torch.Tensor, config: CompressionConfig) -> torch.Tensor:
    """Symmetric int8 scales ``max |w| / 127`` of ``w`` (out, groups, g), in the stored dtype."""
    scale_dtype = _scale_dtype(config)
    # rounded to the stored dtype here, so that values and stored scale agree exactly
    return (w.abs().amax(dim=-1) / 127.0).clamp(min=torch.finfo(scale_dtype).tiny).to(scale_dtype)


def int8_values(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 values in [-127, 127] (as floats) of ``w`` (out, groups, g) on the grid of ``scale`` (out, groups)."""
    return torch.round(w / scale.float().unsqueeze(-1)).clamp(-127, 127)


def int4_qparams(w: torch.Tensor, config: CompressionConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale, zero point) per group of ``w`` (out, groups, g) in the stored dtype: asymmetric
    ``scale = (max - min) / 15``, ``zero = min + 8 scale``; symmetric (``int4_zero_points=False``)
    ``scale = 2 max |w| / 15`` and no zero point."""
    scale_dtype = _scale_dtype(config)
    tiny = torch.finfo(scale_dtype).tiny
    if not config.int4_zero_points:
        return (2.0 * w.abs().amax(dim=-1) / 15.0).clamp(min=tiny).to(scale_dtype), None
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((hi - lo) / 15.0).clamp(min=tiny).to(scale_dtype)
    return scale, (lo + 8.0 * scale.float()).to(scale_dtype)


def int4_values(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """4-bit values in [0, 15] (as floats) of ``w`` (out, groups, g) on the grid ``(q - 8) scale + zero``.

    The stored (rounded) scale and zero define the grid, so dequantizing gives back exactly what the
    kernels compute.
    """
    if zero is None:  # symmetric: the grid is centred on 0 (the offset added after rounding)
        return (torch.round(w / scale.float().unsqueeze(-1)) + 8.0).clamp(0, 15)
    base = zero.float() - 8.0 * scale.float()
    return torch.round((w - base.unsqueeze(-1)) / scale.float().unsqueeze(-1)).clamp(0, 15)


def _checked_int4_qparams(
    qparams: tuple[torch.Tensor, torch.Tensor | None], shape: tuple[int, int], config: CompressionConfig
) -> tuple[torch.Tensor, torch.Tensor | None]:
    scale, zero = qparams
    if tuple(scale.shape) != shape or (zero is not None and tuple(zero.shape) != shape):
        raise UnsupportedCompressionError(f"int4: given scales / zero points do not have the shape {shape} (out, groups)")
    if (zero is None) == config.int4_zero_points:
        raise UnsupportedCompressionError(
            f"int4: zero points {'missing' if zero is None else 'given'} but int4_zero_points={config.int4_zero_points}"
        )
    scale_dtype = _scale_dtype(config)
    return scale.to(scale_dtype), None if zero is None else zero.to(scale_dtype)


class Int8WeightOnlyLinear(nn.Module):
    """``y = x W^T + b`` with W stored as symmetric int8 and one scale per output row (or group).

    Stored: ``weight`` int8 (out, in), ``weight_scale`` (out, groups) in the config's scale dtype,
    ``bias`` as it was. Bytes: ``out * in + out * groups * s`` (``techniques.py``).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        config: CompressionConfig,
        scale: torch.Tensor | None = None,
    ) -> None:
        """``scale``: (out, groups) scales chosen elsewhere (GPTQ picks them as it goes); None: from
        ``max |w|`` per group (round to nearest)."""
        super().__init__()
        out_features, in_features = weight.shape
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.group_size = config.int8_group_size or in_features
        groups = -(-in_features // self.group_size)
        w = weight.detach().float()
        padded = F.pad(w, (0, groups * self.group_size - in_features)).reshape(out_features, groups, self.group_size)
        if scale is None:
            scale = int8_scales(padded, config)
        elif tuple(scale.shape) != (out_features, groups):
            raise UnsupportedCompressionError(
                f"int8: given scales have shape {tuple(scale.shape)}, expected ({out_features}, {groups})"
            )
        scale = scale.to(_scale_dtype(config))
        q = int8_values(padded, scale).to(torch.int8)
        self.register_buffer("weight", q.reshape(out_features, -1)[:, :in_features].contiguous())
        self.register_buffer("weight_scale", scale.contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.exact_fp32 = False  # True: fp32 activations stay fp32 in aten's kernel (slow, no bf16 rounding)

    @property
    def kernel(self) -> str:
        if self.weight.device.type == "cpu" and self.group_size == self.in_features:
            return "aten _weight_int8pack_mm (CPU, per-row scales; bf16 activations when aligned)"
        return "dequantize on the fly"

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as (out, in) floats: int8 value x its scale."""
        scale = self.weight_scale.to(dtype).repeat_interleave(self.group_size, dim=1)[:, : self.in_features]
        return self.weight.to(dtype) * scale

    def _kernel_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """Activation dtype for aten's CPU int8 kernel.

        Its vectorized path is bf16 only: with fp32 activations it runs a scalar loop about 4x slower
        than the fp32 GEMV it replaces (bench/cachefit_demo.py), so fp32 runs in bf16 (relative error
        ~1e-2 on top of the int8 rounding) unless ``exact_fp32``. The bf16 path crashes (SIGSEGV,
        torch 2.13 CPU) for more than one row when in_features is not a multiple of 16: those shapes
        stay fp32.
        """
        aligned = self.in_features % 16 == 0
        if dtype == torch.bfloat16 and not aligned:
            return torch.float32
        if dtype == torch.float32 and aligned and not self.exact_fp32:
            return torch.bfloat16
        return dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.device.type == "cpu"
            and self.group_size == self.in_features
            and x.dtype in _FLOAT_KERNEL_DTYPES
            and hasattr(torch, "_weight_int8pack_mm")
        ):
            kdtype = self._kernel_dtype(x.dtype)
            flat = x.reshape(-1, self.in_features).to(kdtype).contiguous()
            y = torch._weight_int8pack_mm(flat, self.weight, self.weight_scale.reshape(-1).to(kdtype))
            y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        else:
            y = F.linear(x, self.dequantize(x.dtype))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Values in [0, 15] -> flat uint8, two per byte (element 2k in the high nibble), zero-padded."""
    flat = q.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return (flat[0::2] << 4) | flat[1::2]


def _unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`_pack_nibbles`: the first ``numel`` values as uint8."""
    out = torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(-1)
    return out[:numel]


class Int4WeightOnlyLinear(nn.Module):
    """``y = x W^T + b`` with W stored in 4 bits, groups of ``g`` inputs, a scale (and zero point)
    per group and output row.

    Quantization (gpt-fast / torchao ``groupwise_affine_quantize``, asymmetric): per group
    ``scale = (max - min) / 15``, ``zero = min + 8 scale``, ``q = round((w - min) / scale)`` in
    [0, 15]; the weight is ``(q - 8) scale + zero``, the form aten's int4 kernels use. Symmetric
    (``int4_zero_points=False``): ``scale = 2 max|w| / 15``, zero 0, no zero points stored.
    Input features that are not a multiple of ``g`` are padded with zeros (stored and counted, as
    ``techniques.py`` counts them with ``pad_groups``).

    Stored: ``weight`` uint8 (two values a byte: aten's CPU packing ``(out, in_padded / 2)`` or
    cachefit's flat packing), ``weight_scales_and_zeros`` ``(groups, out, 2)`` or ``weight_scale``
    ``(groups, out)`` in the scale dtype, ``bias`` as it was.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        config: CompressionConfig,
        qparams: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    ) -> None:
        """``qparams``: (scale, zero point) per (out, group), chosen elsewhere (GPTQ picks them as it
        goes; zero None when symmetric); None: from each group's min and max (round to nearest)."""
        super().__init__()
        out_features, in_features = weight.shape
        group = config.int4_group_size
        if in_features % group and not config.pad_groups:
            raise UnsupportedCompressionError(
                f"int4: {in_features} input features are not a multiple of the group size {group}; choose "
                f"int4_group_size dividing {in_features}, or allow padding (pad_groups=True)"
            )
        self.in_features, self.out_features, self.group_size = int(in_features), int(out_features), group
        padded_in = -(-in_features // group) * group
        self.padded_in_features = padded_in
        groups = padded_in // group
        w = F.pad(weight.detach().float(), (0, padded_in - in_features)).reshape(out_features, groups, group)
        self.zero_points = config.int4_zero_points
        if qparams is None:
            qparams = int4_qparams(w, config)
        scale, zero = _checked_int4_qparams(qparams, (out_features, groups), config)
        q = int4_values(w, scale, zero)
        if self.zero_points:
            scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1)  # (groups, out, 2)
            self.register_buffer("weight_scales_and_zeros", scales_and_zeros.contiguous())
        else:
            self.register_buffer("weight_scale", scale.t().contiguous())
        q = q.reshape(out_features, padded_in).to(torch.int32)
        self.aten_packed = (
            weight.device.type == "cpu"
            and out_features % _CPU_INT4_ROW_MULTIPLE == 0
            and group in _CPU_INT4_GROUPS
            and hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")
        )
        if self.aten_packed:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
        else:
            packed = _pack_nibbles(q)
        self.register_buffer("weight", packed.contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def kernel(self) -> str:
        if self.aten_packed:
            return "aten _weight_int4pack_mm_for_cpu"
        return "dequantize on the fly (cachefit nibble packing)"

    def _scales_and_zeros(self, dtype: torch.dtype) -> torch.Tensor:
        if self.zero_points:
            return self.weight_scales_and_zeros.to(dtype)
        scale = self.weight_scale.to(dtype)
        return torch.stack([scale, torch.zeros_like(scale)], dim=-1)

    def _values(self) -> torch.Tensor:
        """The 4-bit values in [0, 15] as (out, in_padded) uint8."""
        if not self.aten_packed:
            return _unpack_nibbles(self.weight, self.out_features * self.padded_in_features).reshape(
                self.out_features, self.padded_in_features
            )
        # aten's CPU packing is opaque: recover the values by multiplying identity rows through the
        # kernel with unit scales and zero points 8, (q - 8) * 1 + 8 = q, a slice of inputs at a
        # time. Used by dequantize() only, not by forward. In bf16, which holds the integers 0..15
        # exactly (one non-zero product per output): the kernel's fp32 path is about 20x slower
        # (0.66 s against 0.04 s for a 1536 x 384 matrix, torch 2.13 CPU).
        k = self.padded_in_features
        unit = torch.ones(k // self.group_size, self.out_features, 2, dtype=torch.bfloat16)
        unit[..., 1] = 8.0
        cols = []
        for start in range(0, k, 512):
            eye = torch.eye(k, dtype=torch.bfloat16)[start : start + 512]
            cols.append(torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.weight, self.group_size, unit))
        return torch.cat(cols).t().round().to(torch.uint8)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as (out, in) floats: ``(q - 8) scale + zero`` per group."""
        sz = self._scales_and_zeros(torch.float32)  # (groups, out, 2)
        scale = sz[..., 0].t().repeat_interleave(self.group_size, dim=1)
        zero = sz[..., 1].t().repeat_interleave(self.group_size, dim=1)
        w = (self._values().float() - 8.0) * scale + zero
        return w[:, : self.in_features].to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.aten_packed and self.weight.device.type != "cpu":
            raise UnsupportedCompressionError(
                f"int4 weights packed for aten's CPU kernel were moved to {self.weight.device}; compress the "
                f"module on the device it runs on (compress_module_(..., device=...))"
            )
        if self.aten_packed and x.device.type == "cpu" and x.dtype in _FLOAT_KERNEL_DTYPES:
            flat = x.reshape(-1, self.in_features)
            if self.padded_in_features != self.in_features:
                flat = F.pad(flat, (0, self.padded_in_features - self.in_features))
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                flat.contiguous(), self.weight, self.group_size, self._scales_and_zeros(x.dtype)
            )
            y = y.reshape(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.dequantize(x.dtype))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
            f"zero_points={self.zero_points}"
        )

