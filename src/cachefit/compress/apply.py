"""Compression applied to real modules: the techniques of ``techniques.py`` on live ``nn.Module``s.

The torch edge of ``cachefit.compress``: :mod:`cachefit.compress.techniques` says how many bytes a
technique leaves (pure arithmetic, used by the planner); this module does it to real tensors, in
place, so that deploy can compress each pipeline stage and check its real bytes against the plan.
The API follows torchao: a config (:class:`~cachefit.compress.techniques.CompressionConfig`, the same
one the planner reads) and in-place functions with a trailing ``_``::

    report = compress_module_(model, ["sparse50", "int8"])
    measured = measure_module_bytes(model, fqns=[t.name for t in unit.tensors])
    check_bytes(sum(measured.values()), planned, what="layers.0").ok

What each technique does here (the byte formulas are those of ``techniques.py``, and the stored
bytes match them: ``measure_module_bytes`` after ``compress_module_`` equals ``compress_unit``'s
weight bytes, tested per family):

* ``int8``: :class:`Int8WeightOnlyLinear`, symmetric int8 values ``(out, in)`` and one scale per
  output row (or per ``int8_group_size`` inputs) in ``config.scale_dtype``; the matmul is aten's
  ``_weight_int8pack_mm`` on CPU (per-row scales), else dequantize-on-the-fly. ``backend="torchao"``
  uses torchao's ``Int8WeightOnlyConfig`` instead, whose layout stores an fp32 scale and an int8 zero
  point per row (5 B per row where the plan counts 2: measured as stored, not hidden).
* ``int4``: :class:`Int4WeightOnlyLinear`, groups of ``int4_group_size`` inputs with a scale and a
  zero point per group (torchao / gpt-fast ``scales_and_zeros`` layout), two values per byte. On CPU
  the values are packed by aten ``_convert_weight_to_int4pack_for_cpu`` and multiplied by
  ``_weight_int4pack_mm_for_cpu`` where that kernel accepts the shape (output rows a multiple of 16,
  group size 32 / 64 / 128 / 256); otherwise (and on other devices) they are packed two per byte by
  cachefit and dequantized on the fly. Same bytes either way. ``backend="torchao"`` on CUDA uses
  torchao's ``Int4WeightOnlyConfig``.
* ``sparse50`` / ``sparse75``: structured MLP pruning. The intermediate neurons with the smallest
  score ``||up_i|| * ||gate_i|| * ||down_:,i||`` (L2 norms of the neuron's input rows and output
  column) are removed, leaving smaller dense matrices, as many neurons as ``techniques.py`` keeps.
  The MLPs are found by the family registry's patterns (``FamilySpec.mlp_patterns``): gated
  (``gate_proj`` / ``up_proj`` / ``down_proj``, fused ``gate_up_proj``), GPT-2 (``c_fc`` /
  ``c_proj`` Conv1D), BERT (``intermediate.dense`` / ``output.dense``), OPT / Phi (``fc1`` / ``fc2``),
  GPT-NeoX / Falcon (``dense_h_to_4h`` / ``dense_4h_to_h``), cachefit-dense (``up_proj`` /
  ``down_proj``) and GPT-J (``fc_in`` / ``fc_out``).
* ``sparse24``: 2:4 magnitude masks (of every 4 consecutive inputs of a row, the 2 largest |w|
  stay). On CPU the weight stays dense with zeros: its compressed size (values / 2 + 2-bit indices,
  ``techniques.py``'s formula) is *counted*, not measured, and the report gives both. On CUDA the
  masked weight becomes ``torch.sparse.to_sparse_semi_structured`` where torch accepts it.
* ``ckpt``: :func:`checkpoint_modules_` wraps the layers' forward in ``torch.utils.checkpoint``.
* ``fuse``: scaled-dot-product attention (``attn_implementation="sdpa"``) for Hugging Face models;
  ``compile_module=True`` also runs ``nn.Module.compile``. There is no separate fused-MLP kernel.
* ``batch``: a workload change (run at ``config.target_batch``), nothing to change in the module.

Which layers: ``nn.Linear`` and GPT-2's ``Conv1D`` whose weight has a role in
``config.quantize_roles`` (int8 / int4) or ``config.sparse24_roles`` (2:4); by default the roles of
attention and MLP, not embeddings or the LM head, as the planner assumes. Roles come from the
``roles`` argument (FQN -> role, e.g. from a profile's ``TensorSpec``s) or are guessed from module
types and names as the live-module profiler does.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from cachefit.compress.techniques import CompressionConfig, compress_unit, resolve_techniques
from cachefit.errors import ConfigError, UnsupportedCompressionError
from cachefit.families import MlpPattern, mlp_patterns
from cachefit.units import DTYPE_BITS, Footprint, TensorSpec, Unit, Workload, normalize_dtype

_log = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "BytesCheck",
    "CompressionReport",
    "Int4WeightOnlyLinear",
    "Int8WeightOnlyLinear",
    "TensorChange",
    "bytes_by_role",
    "check_bytes",
    "checkpoint_modules_",
    "compress_module_",
    "embedding_cosine",
    "measure_module_bytes",
    "sparse24_mask",
]

BACKENDS: tuple[str, ...] = ("cachefit", "torchao")
"""``cachefit``: cachefit's own modules, stored exactly in the format the planner counts, on any
device. ``torchao``: torchao's configs where they run (int8 anywhere, int4 on CUDA), bytes as
torchao stores them."""

_TORCH_DTYPES: Mapping[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
# The CPU int4 kernel (aten _weight_int4pack_mm_for_cpu) accepts these group sizes and needs the
# output rows in multiples of 16 (its own checks: "expect qGroupSize to be 32, 64, 128 or 256",
# "expect N to be dividable by 16"), seen on torch 2.13.
_CPU_INT4_GROUPS = (32, 64, 128, 256)
_CPU_INT4_ROW_MULTIPLE = 16
_FLOAT_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# Reports


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorChange:
    """One weight matrix as compression left it."""

    fqn: str
    """FQN of the weight in the module (``model.layers.0.mlp.up_proj.weight``); its scales and
    zero points sit next to it as ``<fqn>_scale`` / ``<fqn>_scales_and_zeros``."""
    techniques: tuple[str, ...]
    """Techniques that changed it, in the order applied."""
    shape_before: tuple[int, ...]
    shape_after: tuple[int, ...]
    """Logical (out, in) shape after structured pruning; the stored shape of packed values differs."""
    bytes_before: int
    """Measured bytes of the weight before compression."""
    measured_bytes: int
    """Measured bytes now: stored values, scales, zero points and metadata."""
    counted_bytes: int
    """Bytes in the compressed format per ``techniques.py``; equals ``measured_bytes`` unless the
    tensor is stored in a form larger than its format (2:4 as a masked dense weight on CPU)."""
    kernel: str
    """How it runs (``aten _weight_int8pack_mm``, ``dequantize on the fly``, ``masked dense``, ...)."""

    @property
    def counted_not_measured(self) -> bool:
        """True where the compressed size is counted because the stored form is larger."""
        return self.counted_bytes != self.measured_bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class CompressionReport:
    """What :func:`compress_module_` did."""

    techniques: tuple[str, ...]
    """Techniques requested, in canonical order."""
    applied: tuple[str, ...]
    """Techniques that changed something."""
    skipped: tuple[tuple[str, str], ...] = ()
    """(technique, why it did not apply)."""
    tensors: tuple[TensorChange, ...] = ()
    checkpointed: tuple[str, ...] = ()
    """FQNs of the modules whose forward is checkpointed."""
    notes: tuple[str, ...] = ()
    bytes_before: int = 0
    """Measured bytes of every parameter and buffer of the module before (each storage once)."""
    bytes_after: int = 0
    """Measured bytes after."""

    @property
    def counted_bytes_after(self) -> int:
        """``bytes_after`` with counted sizes where the stored form is larger than the format."""
        return self.bytes_after - sum(t.measured_bytes - t.counted_bytes for t in self.tensors)

    def counted_total(self, measured: Mapping[str, int]) -> int:
        """Total of ``measured`` (from :func:`measure_module_bytes`) with each changed weight's
        measured bytes (values and companions) replaced by its counted bytes."""
        total = sum(measured.values())
        for t in self.tensors:
            if t.counted_not_measured and t.fqn in measured:
                total += t.counted_bytes - sum(v for k, v in measured.items() if _base_fqn(k) == t.fqn)
        return total

    def describe(self) -> str:
        """A few lines for logs: bytes before and after, what was skipped."""
        lines = [
            f"compressed with {', '.join(self.applied) or 'nothing'}: {self.bytes_before} B -> "
            f"{self.bytes_after} B measured ({self.counted_bytes_after} B counted)"
        ]
        lines += [f"  {name} skipped: {why}" for name, why in self.skipped]
        lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines)


@dataclass(frozen=True, slots=True, kw_only=True)
class BytesCheck:
    """Measured bytes against planned bytes."""

    what: str
    measured_bytes: int
    planned_bytes: int
    tolerance: float
    """Largest accepted |measured - planned| / planned."""

    @property
    def difference_bytes(self) -> int:
        """measured - planned (positive: more than planned)."""
        return self.measured_bytes - self.planned_bytes

    @property
    def difference_pct(self) -> float:
        """Difference in percent of the planned bytes."""
        if self.planned_bytes == 0:
            return 0.0 if self.measured_bytes == 0 else math.inf
        return 100.0 * self.difference_bytes / self.planned_bytes

    @property
    def ok(self) -> bool:
        return abs(self.difference_pct) <= 100.0 * self.tolerance

    def describe(self) -> str:
        verdict = "within" if self.ok else "outside"
        return (
            f"{self.what}: measured {self.measured_bytes} B, planned {self.planned_bytes} B, difference "
            f"{self.difference_bytes:+d} B ({self.difference_pct:+.2f}%), {verdict} the "
            f"{100 * self.tolerance:g}% tolerance"
        )


def check_bytes(measured: int, planned: int, *, tolerance: float = 0.02, what: str) -> BytesCheck:
    """Compare measured bytes with planned bytes; ``.ok`` is True within ``tolerance`` (relative).

    Raises:
        ConfigError: negative byte counts or a tolerance outside [0, 1).
    """
    for name, value in (("measured", measured), ("planned", planned)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"check_bytes({what}): {name} must be a non-negative int of bytes, got {value!r}")
    if not 0.0 <= tolerance < 1.0:
        raise ConfigError(f"check_bytes({what}): tolerance must be in [0, 1), got {tolerance!r} (0.02 is 2%)")
    return BytesCheck(what=what, measured_bytes=measured, planned_bytes=planned, tolerance=float(tolerance))


# --------------------------------------------------------------------------------------------------
# Measuring real bytes

# Suffixes of the tensors stored next to a weight ``<fqn>``: ``<fqn>_scale``, ``<fqn>_zero_point``,
# ``<fqn>_scales_and_zeros`` (role "scales"), ``<fqn>_meta`` / bitmasks (role "metadata").
_SCALE_MARKERS = ("scale", "zero")
_METADATA_MARKERS = ("meta", "bitmask")


def _companion_role(suffix: str) -> str | None:
    lowered = suffix.lower()
    if any(m in lowered for m in _METADATA_MARKERS):
        return "metadata"
    if any(m in lowered for m in _SCALE_MARKERS):
        return "scales"
    return None


def _base_fqn(key: str) -> str:
    """``a.weight_scale`` -> ``a.weight``; any other key is its own base."""
    owner, _, name = key.rpartition(".")
    stem, sep, suffix = name.partition("_")
    if sep and _companion_role(suffix) is not None:
        return f"{owner}.{stem}" if owner else stem
    return key


def _storage_parts(fqn: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """(key, plain tensor) pairs holding the storages of ``tensor``; wrapper subclasses (torchao's
    quantized tensors, semi-structured sparse) are opened to their inner tensors: values under
    ``fqn``, scales / zero points / metadata under ``fqn_<inner name>``."""
    if is_traceable_wrapper_subclass(tensor):
        inner_names, _ = tensor.__tensor_flatten__()
        parts = []
        for inner in inner_names:
            value = getattr(tensor, inner)
            if value is None:
                continue
            key = f"{fqn}_{inner}" if _companion_role(inner) is not None else fqn
            parts += _storage_parts(key, value)
        return parts
    return [(fqn, tensor)]


def measure_module_bytes(module: nn.Module, fqns: Collection[str] | None = None) -> dict[str, int]:
    """Real bytes of a module's parameters and buffers, by FQN, each storage counted once.

    Bytes are the storages' sizes (a view of a larger tensor counts the whole storage it keeps
    alive). Quantized weights appear as their values under the weight's FQN and their scales / zero
    points / metadata under ``<fqn>_scale``, ``<fqn>_scales_and_zeros``, ``<fqn>_zero_point``,
    ``<fqn>_meta``. A storage shared by several FQNs (a tied LM head) is counted under the first
    FQN that ``named_parameters(remove_duplicate=False)`` gives.

    Args:
        module: the module to measure.
        fqns: keep only these FQNs (and the scales / metadata stored next to them); None keeps all.
            Names of weights that were compressed still select their values and scales.
    """
    wanted = None if fqns is None else frozenset(_check_names(fqns, "measure_module_bytes: fqns"))
    seen: set[int] = set()
    out: dict[str, int] = {}
    named = [
        *module.named_parameters(remove_duplicate=False),
        *module.named_buffers(remove_duplicate=False),
    ]
    for fqn, tensor in named:
        if tensor is None:
            continue
        for key, part in _storage_parts(fqn, tensor):
            if wanted is not None and key not in wanted and _base_fqn(key) not in wanted:
                continue
            storage = part.untyped_storage()
            ident = storage._cdata  # one StorageImpl per real allocation, whatever Python object wraps it
            if ident in seen:
                continue
            seen.add(ident)
            out[key] = out.get(key, 0) + storage.nbytes()
    return out


def bytes_by_role(measured: Mapping[str, int], tensors: Sequence[TensorSpec]) -> dict[str, int]:
    """Group measured bytes by the roles of ``tensors`` (a unit's ``TensorSpec``s): scales and zero
    points go to ``scales``, sparsity metadata to ``metadata`` (as ``Footprint.weight_roles`` does);
    FQNs not among ``tensors`` go to ``other``."""
    role_of = {t.name: t.role for t in tensors}
    out: dict[str, int] = {}
    for key, nbytes in measured.items():
        base = _base_fqn(key)
        if base != key and base in role_of:
            role = _companion_role(key[len(base) + 1 :]) or role_of[base]
        else:
            role = role_of.get(key, "other")
        out[role] = out.get(role, 0) + nbytes
    return out


# --------------------------------------------------------------------------------------------------
# Quantized linear modules


def _scale_dtype(config: CompressionConfig) -> torch.dtype:
    return _TORCH_DTYPES[config.scale_dtype]


def _as_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features), whatever the module stores (Conv1D: (in, out))."""
    weight = module.weight.detach()
    return weight.t() if _is_conv1d(module) else weight


def _is_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D (GPT-2): weight (nx=in, nf=out), matched by name so that
    # cachefit does not import transformers.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def _is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


class Int8WeightOnlyLinear(nn.Module):
    """``y = x W^T + b`` with W stored as symmetric int8 and one scale per output row (or group).

    Stored: ``weight`` int8 (out, in), ``weight_scale`` (out, groups) in the config's scale dtype,
    ``bias`` as it was. Bytes: ``out * in + out * groups * s`` (``techniques.py``).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, config: CompressionConfig) -> None:
        super().__init__()
        out_features, in_features = weight.shape
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.group_size = config.int8_group_size or in_features
        groups = -(-in_features // self.group_size)
        w = weight.detach().float()
        padded = F.pad(w, (0, groups * self.group_size - in_features)).reshape(out_features, groups, self.group_size)
        scale_dtype = _scale_dtype(config)
        # Symmetric: scale = max|w| / 127 per row (group), values in [-127, 127]. The scale is
        # rounded to its stored dtype first so that values and stored scale agree exactly.
        amax = padded.abs().amax(dim=-1)
        scale = (amax / 127.0).clamp(min=torch.finfo(scale_dtype).tiny).to(scale_dtype)
        q = torch.round(padded / scale.float().unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
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

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, config: CompressionConfig) -> None:
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
        scale_dtype = _scale_dtype(config)
        tiny = torch.finfo(scale_dtype).tiny
        self.zero_points = config.int4_zero_points
        if self.zero_points:
            lo, hi = w.amin(dim=-1), w.amax(dim=-1)
            scale = ((hi - lo) / 15.0).clamp(min=tiny).to(scale_dtype)
            zero = (lo + 8.0 * scale.float()).to(scale_dtype)
            # the stored (rounded) scale and zero define the grid: w ~ (q - 8) scale + zero
            base = zero.float() - 8.0 * scale.float()
            q = torch.round((w - base.unsqueeze(-1)) / scale.float().unsqueeze(-1)).clamp(0, 15)
            scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1)  # (groups, out, 2)
            self.register_buffer("weight_scales_and_zeros", scales_and_zeros.contiguous())
        else:
            scale = (2.0 * w.abs().amax(dim=-1) / 15.0).clamp(min=tiny).to(scale_dtype)
            q = (torch.round(w / scale.float().unsqueeze(-1)) + 8.0).clamp(0, 15)
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
        # kernel with unit scales and zero points 8, (q - 8) * 1 + 8 = q (exact in fp32), a slice of
        # inputs at a time. Used by dequantize() only, not by forward.
        k = self.padded_in_features
        unit = torch.ones(k // self.group_size, self.out_features, 2)
        unit[..., 1] = 8.0
        cols = []
        for start in range(0, k, 512):
            eye = torch.eye(k, dtype=torch.float32)[start : start + 512]
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


# --------------------------------------------------------------------------------------------------
# Finding the layers


def _check_names(names: Collection[str], what: str) -> list[str]:
    if isinstance(names, str):
        raise ConfigError(f"{what} must be a collection of FQNs, got the string {names!r}; wrap it in a list")
    out = list(names)
    bad = [n for n in out if not isinstance(n, str)]
    if bad:
        raise ConfigError(f"{what} must hold FQN strings, got {bad[:3]!r}")
    return out


def _role_guesser(root: nn.Module, roles: Mapping[str, str] | None) -> Callable[[str], str]:
    from cachefit.profile.module import guess_role  # the profiler's rules, so plan and module agree

    given = dict(roles or {})

    def role(fqn: str) -> str:
        if fqn in given:
            return given[fqn]
        return guess_role(root, fqn)

    return role


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _linear_targets(
    root: nn.Module,
    allowed_roles: Collection[str],
    fqns: frozenset[str] | None,
    role: Callable[[str], str],
) -> list[tuple[str, nn.Module]]:
    """(module FQN, module) of the linear layers whose weight FQN is selected and has an allowed role."""
    out = []
    for name, mod in root.named_modules():
        if not _is_linear_like(mod) or not isinstance(getattr(mod, "weight", None), torch.Tensor):
            continue
        weight_fqn = _join(name, "weight")
        if fqns is not None and weight_fqn not in fqns:
            continue
        if role(weight_fqn) in allowed_roles:
            out.append((name, mod))
    return out


def _replace_module(root: nn.Module, fqn: str, new: nn.Module) -> None:
    if not fqn:
        raise UnsupportedCompressionError(
            f"cannot replace the root module ({type(root).__name__}) in place; wrap it in a container "
            f"(nn.Sequential(layer)) and compress that"
        )
    parent_fqn, _, child = fqn.rpartition(".")
    parent = root.get_submodule(parent_fqn) if parent_fqn else root
    setattr(parent, child, new)


@dataclass(slots=True)
class _Record:
    """A weight's history while compress_module_ runs."""

    shape_before: tuple[int, ...]
    bytes_before: int
    dtype: str
    role: str
    techniques: list[str] = field(default_factory=list)
    sparse24_masked: bool = False
    kernel: str = "dense"


# --------------------------------------------------------------------------------------------------
# Structured MLP sparsity


# Relative paths, from the module that owns them, of the MLP matrices that share the intermediate
# dimension (transformers' module names): every family's FamilySpec.mlp_patterns, gated ones first.
_MLP_PATTERNS: tuple[MlpPattern, ...] = mlp_patterns()


@dataclass(frozen=True, slots=True)
class _Mlp:
    fqn: str
    owner: nn.Module
    pattern: MlpPattern
    up: nn.Module
    down: nn.Module
    gate: nn.Module | None

    def weight_fqns(self) -> list[str]:
        names = [self.pattern.up, self.pattern.down] + ([self.pattern.gate] if self.pattern.gate else [])
        return [_join(self.fqn, f"{n}.weight") for n in names]


def _get(owner: nn.Module, path: str) -> nn.Module | None:
    try:
        mod = owner.get_submodule(path)
    except AttributeError:
        return None
    return mod if _is_linear_like(mod) else None


def _find_mlps(root: nn.Module) -> list[_Mlp]:
    found = []
    for name, mod in root.named_modules():
        for pattern in _MLP_PATTERNS:
            up, down = _get(mod, pattern.up), _get(mod, pattern.down)
            gate = _get(mod, pattern.gate) if pattern.gate else None
            if up is None or down is None or (pattern.gate and gate is None):
                continue
            found.append(_Mlp(fqn=name, owner=mod, pattern=pattern, up=up, down=down, gate=gate))
            break
    return found


def _out_rows_norm(module: nn.Module) -> torch.Tensor:
    return _as_out_in(module).float().norm(dim=1)


def _set_weight_(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


def _keep_rows_(module: nn.Module, index: torch.Tensor) -> None:
    """Keep output features ``index`` of a Linear / Conv1D (weight rows, bias entries).

    The kept slices are copied (``contiguous``), so the old, larger storages are freed.
    """
    with torch.no_grad():
        if _is_conv1d(module):
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
        if _is_conv1d(module):
            _set_weight_(module, "weight", module.weight.detach()[index])
            module.nx = int(index.numel())
        else:
            _set_weight_(module, "weight", module.weight.detach()[:, index])
            module.in_features = int(index.numel())


def _prune_mlp_(mlp: _Mlp, removed_fraction: float) -> tuple[int, int]:
    """Remove the lowest-scoring intermediate neurons of one MLP; returns (width before, kept)."""
    up_rows = _out_rows_norm(mlp.up)
    width = _as_out_in(mlp.down).shape[1]
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
    score = score * _as_out_in(mlp.down).float().norm(dim=0)
    # Same count as techniques.py: floor(width * fraction) neurons removed.
    kept = width - math.floor(width * removed_fraction)
    index = torch.topk(score, kept).indices.sort().values.to(_as_out_in(mlp.down).device)
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


def _mask_24_(module: nn.Module) -> None:
    with torch.no_grad():
        mask = sparse24_mask(_as_out_in(module))
        if _is_conv1d(module):
            mask = mask.t()
        module.weight.mul_(mask.to(module.weight.dtype))


def _to_semi_structured_(module: nn.Module) -> str:
    """CUDA: store a masked nn.Linear weight as torch's semi-structured sparse tensor."""
    from torch.sparse import to_sparse_semi_structured

    sparse = to_sparse_semi_structured(module.weight.detach())
    module.weight = nn.Parameter(sparse, requires_grad=False)
    return "torch.sparse semi-structured (CUDA)"


# --------------------------------------------------------------------------------------------------
# Checkpointing and fusion


def _checkpointed_forward(original: Callable[..., Any], module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    if module.training and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        return checkpoint(original, *args, use_reentrant=False, **kwargs)
    return original(*args, **kwargs)


def checkpoint_modules_(module: nn.Module, fqns: Collection[str]) -> tuple[str, ...]:
    """Checkpoint the forward of the submodules ``fqns`` (``""`` is ``module`` itself), in place.

    In training mode with gradients enabled, each listed submodule keeps only its inputs for
    backward and recomputes its forward then (``torch.utils.checkpoint``, non-reentrant); in eval
    mode or under ``no_grad`` it runs as before. FQNs, parameters and hooks are unchanged. Returns
    the FQNs newly wrapped (already checkpointed ones are left as they are).

    Raises:
        ConfigError: an FQN that names no submodule.
    """
    wrapped = []
    for fqn in _check_names(fqns, "checkpoint_modules_: fqns"):
        try:
            sub = module.get_submodule(fqn)
        except AttributeError:
            raise ConfigError(
                f"checkpoint_modules_: {fqn!r} is not a submodule of {type(module).__name__}; give module FQNs "
                f"such as {[n for n, _ in module.named_children()][:3]}"
            ) from None
        if getattr(sub, "_cachefit_checkpointed", False):
            continue
        original = sub.forward
        sub.forward = functools.partial(_checkpointed_forward, original, sub)
        sub._cachefit_checkpointed = True
        wrapped.append(fqn)
    return tuple(wrapped)


def _layer_stack_fqns(root: nn.Module, fqns: frozenset[str] | None) -> list[str]:
    """The modules of the model's layer stacks (ModuleLists of one repeated class: ``model.layers``,
    ``transformer.h``, ``encoder.layer``); with ``fqns``, only layers owning one of them."""
    out = []
    for name, mod in root.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(child) for child in mod}) != 1:
            continue
        for index, child in enumerate(mod):
            child_fqn = _join(name, str(index))
            if fqns is not None:
                owned = {_join(child_fqn, n) for n, _ in child.named_parameters(remove_duplicate=False)}
                if not owned & fqns:
                    continue
            out.append(child_fqn)
    # nested stacks: keep the outermost layers only
    return [f for f in out if not any(f != g and f.startswith(g + ".") for g in out)]


def _set_sdpa_(root: nn.Module) -> str | None:
    """Switch Hugging Face attention to SDPA; returns what changed, None if nothing could."""
    if hasattr(root, "set_attn_implementation") and hasattr(root, "config"):
        before = getattr(root.config, "_attn_implementation", None)
        root.set_attn_implementation("sdpa")
        return f"attention implementation {before} -> {root.config._attn_implementation}"
    configs = {}
    for mod in root.modules():
        config = getattr(mod, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            configs[id(config)] = config
    if not configs:
        return None
    before = sorted({str(c._attn_implementation) for c in configs.values()})
    for config in configs.values():
        config._attn_implementation = "sdpa"
    return f"attention implementation {', '.join(before)} -> sdpa ({len(configs)} config object(s))"


# --------------------------------------------------------------------------------------------------
# The entry point


def _counted_bytes(record: _Record, shape: tuple[int, int], config: CompressionConfig, fqn: str) -> int:
    """Bytes of one (out, in) matrix in its compressed format, from the planner's own formulas."""
    spec = TensorSpec(name=fqn, shape=shape, role=record.role)
    dense = math.prod(shape) * DTYPE_BITS[record.dtype] // 8
    unit = Unit(
        name=fqn,
        kind="linear",
        footprint=Footprint(weight_bytes=dense, activation_bytes=0, weight_roles=((record.role, dense),)),
        params=math.prod(shape),
        flops_per_token=0,
        tensors=(spec,),
    )
    names = [t for t in record.techniques if t in ("sparse24", "int8", "int4")]
    counted = compress_unit(
        unit,
        names,
        Workload(weight_dtype=record.dtype, act_dtype=record.dtype),
        replace(config, transposed_tensors=(), strict=False),
    )
    return counted.footprint.weight_bytes


def _dtype_name(dtype: torch.dtype) -> str:
    return normalize_dtype(str(dtype), what="weight dtype")


@dataclass(slots=True)
class _Run:
    """The state of one compress_module_ call, shared by the technique handlers."""

    module: nn.Module
    config: CompressionConfig
    selected: frozenset[str] | None
    role: Callable[[str], str]
    device: torch.device
    backend: str
    compile_module: bool
    records: dict[str, _Record] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    checkpointed: tuple[str, ...] = ()

    def record(self, weight_fqn: str, mod: nn.Module) -> _Record:
        if weight_fqn not in self.records:
            w = mod.weight
            self.records[weight_fqn] = _Record(
                shape_before=tuple(_as_out_in(mod).shape),
                bytes_before=sum(measure_module_bytes(mod, fqns=["weight"]).values()),
                dtype=_dtype_name(w.dtype),
                role=self.role(weight_fqn),
            )
        return self.records[weight_fqn]


def _is_compressed(mod: nn.Module) -> bool:
    """Quantized already (by cachefit or torchao): not a float matrix to compress again."""
    if isinstance(mod, (Int8WeightOnlyLinear, Int4WeightOnlyLinear)):
        return True
    return is_traceable_wrapper_subclass(mod.weight)


# Each handler applies one technique to run.module and returns None, or why it did not apply.


def _apply_prune(run: _Run, name: str) -> str | None:
    fraction = {"sparse50": 0.5, "sparse75": 0.75}[name]
    mlps = [
        m
        for m in _find_mlps(run.module)
        if (run.selected is None or _join(m.fqn, f"{m.pattern.up}.weight") in run.selected)
        and not getattr(m.owner, "_cachefit_pruned", False)
        and not any(_is_compressed(x) for x in (m.up, m.down, m.gate) if x is not None)
    ]
    if not mlps:
        return "no unpruned float MLP (up / gate / down linear layers of a known family) among the selected weights"
    widths = set()
    for mlp in mlps:
        for weight_fqn in mlp.weight_fqns():
            run.record(weight_fqn, run.module.get_submodule(weight_fqn.rpartition(".")[0])).techniques.append(name)
        widths.add(_prune_mlp_(mlp, fraction))
    shown = ", ".join(f"{w} -> {k}" for w, k in sorted(widths))
    run.notes.append(f"{name}: {len(mlps)} MLP(s) pruned, intermediate neurons {shown}")
    return None


def _apply_sparse24(run: _Run, name: str) -> str | None:
    targets = [
        (f, m)
        for f, m in _linear_targets(run.module, run.config.sparse24_roles, run.selected, run.role)
        if not _is_compressed(m)
    ]
    if not targets:
        return f"no float linear layer with a role in {run.config.sparse24_roles} among the selected weights"
    for mod_fqn, mod in targets:
        rec = run.record(_join(mod_fqn, "weight"), mod)
        _mask_24_(mod)
        rec.techniques.append(name)
        rec.sparse24_masked = True
        rec.kernel = "masked dense (2:4 zeros stored densely; compressed size counted)"
    return None


def _apply_quantize(run: _Run, name: str) -> str | None:
    bits = 8 if name == "int8" else 4
    targets = [
        (f, m)
        for f, m in _linear_targets(run.module, run.config.quantize_roles, run.selected, run.role)
        if not _is_compressed(m) and DTYPE_BITS[_dtype_name(m.weight.dtype)] > bits
    ]
    if not targets:
        return (
            f"no float linear layer wider than {bits} bits with a role in {run.config.quantize_roles} among the "
            f"selected weights"
        )
    for mod_fqn, mod in targets:
        rec = run.record(_join(mod_fqn, "weight"), mod)
        rec.techniques.append(name)
        if run.backend == "torchao":
            rec.kernel = _torchao_quantize_(mod, name, run.config, run.device)
            continue
        cls = Int8WeightOnlyLinear if name == "int8" else Int4WeightOnlyLinear
        new = cls(_as_out_in(mod), getattr(mod, "bias", None), config=run.config)
        _replace_module(run.module, mod_fqn, new)
        rec.kernel = new.kernel
    return None


def _apply_fuse(run: _Run, name: str) -> str | None:
    what = _set_sdpa_(run.module)
    if run.compile_module:
        run.module.compile()
        what = (what + "; " if what else "") + "torch.compile (compiles on the first call)"
    if what is None:
        return (
            "not a Hugging Face model (no config with an attention implementation); write its attention with "
            "torch.nn.functional.scaled_dot_product_attention or pass compile_module=True"
        )
    run.notes.append(f"{name}: {what}; no separate fused-MLP kernel is applied")
    return None


def _apply_ckpt(run: _Run, name: str) -> str | None:
    layers = _layer_stack_fqns(run.module, run.selected) or [""]  # no layer stack: the module as a whole
    run.checkpointed = checkpoint_modules_(run.module, layers)
    run.notes.append(f"{name}: {len(layers)} module(s) checkpointed (saves activations in training only)")
    return None


def _apply_batch(run: _Run, name: str) -> str | None:
    return f"a workload change, not a module change: run this module at batch {run.config.target_batch}"


_HANDLERS: Mapping[str, Callable[[_Run, str], str | None]] = {
    "sparse50": _apply_prune,
    "sparse75": _apply_prune,
    "sparse24": _apply_sparse24,
    "int8": _apply_quantize,
    "int4": _apply_quantize,
    "fuse": _apply_fuse,
    "ckpt": _apply_ckpt,
    "batch": _apply_batch,
}


def _semi_structured_on_cuda_(run: _Run) -> None:
    """CUDA: 2:4-masked float nn.Linear weights become semi-structured sparse tensors where torch
    accepts them (fp16 / bf16, shapes its kernels support); the rest stay masked dense."""
    for weight_fqn, rec in run.records.items():
        mod = run.module.get_submodule(weight_fqn.rpartition(".")[0])
        if not rec.sparse24_masked or not isinstance(mod, nn.Linear) or _is_compressed(mod):
            continue
        try:
            rec.kernel = _to_semi_structured_(mod)
        except (RuntimeError, ValueError, NotImplementedError, TypeError) as exc:
            run.notes.append(f"sparse24: {weight_fqn} stays masked dense on CUDA ({exc})")


def _tensor_changes(run: _Run) -> tuple[TensorChange, ...]:
    changes = []
    for weight_fqn, rec in run.records.items():
        if not rec.techniques:
            continue
        mod = run.module.get_submodule(weight_fqn.rpartition(".")[0])
        measured = sum(measure_module_bytes(mod, fqns=["weight"]).values())
        if isinstance(mod, (Int8WeightOnlyLinear, Int4WeightOnlyLinear)):
            out_in = (mod.out_features, mod.in_features)
        else:
            out_in = tuple(_as_out_in(mod).shape)
        counted = measured
        if rec.sparse24_masked and not is_traceable_wrapper_subclass(getattr(mod, "weight", None)):
            counted = _counted_bytes(rec, out_in, run.config, weight_fqn)
        changes.append(
            TensorChange(
                fqn=weight_fqn,
                techniques=tuple(rec.techniques),
                shape_before=rec.shape_before,
                shape_after=out_in,
                bytes_before=rec.bytes_before,
                measured_bytes=measured,
                counted_bytes=counted,
                kernel=rec.kernel,
            )
        )
    return tuple(changes)


def compress_module_(
    module: nn.Module,
    techniques: Sequence[str] | str,
    *,
    config: CompressionConfig | None = None,
    fqns: Collection[str] | None = None,
    device: str | torch.device = "cpu",
    roles: Mapping[str, str] | None = None,
    backend: str = "cachefit",
    compile_module: bool = False,
) -> CompressionReport:
    """Compress ``module`` in place with ``techniques`` (applied in canonical order) and report.

    Args:
        module: the model (or a pipeline stage of it); moved to ``device`` first.
        techniques: names from ``cachefit.compress.TECHNIQUES`` (a list or ``"int8,fuse"``).
        config: the planner's compression options (group sizes, scale dtype, roles).
        fqns: weight FQNs to compress (``model.layers.0.mlp.up_proj.weight``); None: every weight
            with an allowed role. Roles are always checked, so the LM head and embeddings stay
            uncompressed unless ``config`` lists their roles, as in the plan. Structured sparsity
            prunes an MLP when its up-projection weight is selected; checkpointing wraps the layers
            owning a selected weight.
        device: where the compressed module will run (picks the kernels).
        roles: FQN -> role for weights (e.g. ``{t.name: t.role for t in unit.tensors}``); weights
            not in it get the role the live-module profiler guesses.
        backend: ``cachefit`` (own modules, the planner's exact format) or ``torchao``.
        compile_module: with ``fuse``, also ``module.compile()`` (the first call then compiles,
            seconds to minutes).

    Raises:
        UnsupportedCompressionError: unknown or exclusive techniques; with ``config.strict``, a
            technique that finds nothing to act on; a backend that cannot run here.
        ConfigError: FQNs that name no tensor of the module, weights on the meta device, an
            unknown backend or device.
    """
    if not isinstance(module, nn.Module):
        raise ConfigError(f"compress_module_: expected an nn.Module, got {type(module).__name__}")
    config = config or CompressionConfig()
    if not isinstance(config, CompressionConfig):
        raise ConfigError(f"compress_module_: config must be a CompressionConfig, got {type(config).__name__}")
    if backend not in BACKENDS:
        raise ConfigError(f"compress_module_: unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    names = resolve_techniques(techniques)
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"compress_module_: cannot read device {device!r} ({exc}); use 'cpu' or 'cuda'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"compress_module_: device {device} asked for, but torch sees no CUDA device here; use 'cpu'")
    if any(t.is_meta for t in [*module.parameters(), *module.buffers()]):
        raise ConfigError(
            "compress_module_: the module has tensors on the meta device (shapes only); load real weights first "
            "(e.g. from_pretrained or load_state_dict(..., assign=True))"
        )
    selected: frozenset[str] | None = None
    if fqns is not None:
        selected = frozenset(_check_names(fqns, "compress_module_: fqns"))
        known = {n for n, _ in module.named_parameters(remove_duplicate=False)}
        known |= {n for n, _ in module.named_buffers(remove_duplicate=False)}
        unknown = sorted(selected - known)
        if unknown:
            raise ConfigError(
                f"compress_module_: {len(unknown)} FQN(s) name no tensor of {type(module).__name__}, e.g. "
                f"{unknown[:3]}; its tensors are named like {sorted(known)[:2]} (a stage module's FQNs may lack "
                f"the full model's prefix)"
            )
    module.to(device)
    run = _Run(
        module=module,
        config=config,
        selected=selected,
        role=_role_guesser(module, roles),
        device=device,
        backend=backend,
        compile_module=compile_module,
    )
    bytes_before = sum(measure_module_bytes(module).values())
    applied: list[str] = []
    skipped: list[tuple[str, str]] = []
    for name in names:
        why_not = _HANDLERS[name](run, name)
        if why_not is None:
            applied.append(name)
            continue
        if config.strict:
            raise UnsupportedCompressionError(
                f"{name} does not apply to {type(module).__name__}: {why_not}; drop {name} or use strict=False"
            )
        _log.info("compress_module_: %s skipped: %s", name, why_not)
        skipped.append((name, why_not))
    if device.type == "cuda" and backend == "cachefit":
        _semi_structured_on_cuda_(run)
    report = CompressionReport(
        techniques=names,
        applied=tuple(applied),
        skipped=tuple(skipped),
        tensors=_tensor_changes(run),
        checkpointed=run.checkpointed,
        notes=tuple(run.notes),
        bytes_before=bytes_before,
        bytes_after=sum(measure_module_bytes(module).values()),
    )
    _log.info("%s", report.describe())
    return report


def _torchao_quantize_(mod: nn.Module, name: str, config: CompressionConfig, device: torch.device) -> str:
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError as exc:
        raise UnsupportedCompressionError(
            f"backend 'torchao' needs torchao ({exc}); install it (pip install torchao) or use backend='cachefit'"
        ) from None
    if _is_conv1d(mod):
        raise UnsupportedCompressionError(
            "backend 'torchao' quantizes nn.Linear only, not GPT-2's Conv1D; use backend='cachefit' for GPT-2"
        )
    if name == "int4":
        if device.type != "cuda":
            raise UnsupportedCompressionError(
                "torchao Int4WeightOnlyConfig needs CUDA (its CPU layouts store one int4 per byte); use "
                "backend='cachefit', whose int4 packs two values a byte on CPU"
            )
        ao_config: Any = Int4WeightOnlyConfig(group_size=config.int4_group_size)
    else:
        if config.int8_group_size is not None:
            raise UnsupportedCompressionError(
                "backend 'torchao': Int8WeightOnlyConfig is per output channel; set int8_group_size=None or use "
                "backend='cachefit'"
            )
        ao_config = Int8WeightOnlyConfig()
    quantize_(mod, ao_config)
    return f"torchao {type(ao_config).__name__}"


# --------------------------------------------------------------------------------------------------
# Quality


def embedding_cosine(
    model_fp32: nn.Module,
    model_q: nn.Module,
    sentences: Sequence[str] | Mapping[str, torch.Tensor],
    *,
    tokenizer: Any = None,
) -> float:
    """Smallest cosine similarity, over sentences, of mean-pooled embeddings of two encoders.

    Mean pooling over the tokens the attention mask keeps (sentence-transformers' pooling for
    all-MiniLM-L6-v2). ``sentences`` are strings (tokenized with ``tokenizer``, by default the
    tokenizer saved next to ``model_fp32``'s checkpoint, loaded offline) or an already tokenized
    batch (``input_ids``, ``attention_mask``).

    Raises:
        ConfigError: no sentences, or strings without a tokenizer to read them.
    """
    if isinstance(sentences, Mapping):
        batch = dict(sentences)
    else:
        sentences = list(sentences)
        if not sentences or not all(isinstance(s, str) for s in sentences):
            raise ConfigError("embedding_cosine: give a non-empty list of sentences (strings) or a tokenized batch")
        if tokenizer is None:
            path = getattr(getattr(model_fp32, "config", None), "_name_or_path", "")
            if not path:
                raise ConfigError(
                    "embedding_cosine: no tokenizer given and the model does not say where it was loaded from; "
                    "pass tokenizer=AutoTokenizer.from_pretrained(...)"
                )
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        batch = dict(tokenizer(sentences, padding=True, truncation=True, return_tensors="pt"))
    if "input_ids" not in batch:
        raise ConfigError(f"embedding_cosine: the tokenized batch has no input_ids (keys: {sorted(batch)})")
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(batch["input_ids"])

    def embed(model: nn.Module) -> torch.Tensor:
        param = next(iter(model.parameters()), None)
        dev = param.device if param is not None else torch.device("cpu")
        with torch.no_grad():
            out = model(**{k: v.to(dev) for k, v in batch.items()})
        hidden = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
        m = mask.to(hidden.device).unsqueeze(-1).to(hidden.dtype)
        return ((hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)).float().cpu()

    a, b = embed(model_fp32), embed(model_q)
    return float(F.cosine_similarity(a, b, dim=-1).min())
