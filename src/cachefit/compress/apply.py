"""Compression applied to real modules: the techniques of ``techniques.py`` on live ``nn.Module``s.

The torch edge of ``cachefit.compress``: :mod:`cachefit.compress.techniques` says how many bytes a
technique leaves (pure arithmetic, used by the planner); this module does it to real tensors, in
place, so that deploy can compress each pipeline stage and check its real bytes against the plan.
The API follows torchao: a config (:class:`~cachefit.compress.techniques.CompressionConfig`, the same
one the planner reads) and in-place functions with a trailing ``_``::

    report = compress_module_(model, ["sparse50", "int8"])
    measured = measure_module_bytes(model, fqns=[t.name for t in unit.tensors])
    check_bytes(sum(measured.values()), planned, what="layers.0").ok

This module is the orchestration: which layers each technique acts on, the handler of each
technique (checkpointing and SDPA whole, they are a few lines each), the report, the byte check
against the plan and the torchao backend. The work itself
lives by role next to it, and the public names are re-exported here:

* :mod:`cachefit.compress.quantized`: the int8 / int4 weight-only linear modules.
* :mod:`cachefit.compress.pruning`: structured MLP sparsity and 2:4 masks.
* :mod:`cachefit.compress.measure`: real bytes of a module (by FQN, by role) and embedding cosine.
* :mod:`cachefit.compress.linear`: what counts as a linear layer (``nn.Linear``, GPT-2 ``Conv1D``).
* :mod:`cachefit.compress.calibration`: input statistics of each linear layer, gathered once.
* :mod:`cachefit.compress.gptq`: GPTQ and SparseGPT (error-compensating column sweeps).

Calibrated methods (``CompressionConfig(sparsity_method="wanda" | "sparsegpt",
quantize_method="gptq")``) take ``calibration=collect_input_stats(module, batches, gram=...)`` and
store exactly the format, and bytes, of magnitude pruning and round to nearest::

    stats = collect_input_stats(model, batches, gram=True)
    compress_module_(model, ["sparse24", "int4"], config=CompressionConfig(sparsity_method="sparsegpt",
                     quantize_method="gptq"), calibration=stats)

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
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from cachefit.compress.calibration import CalibrationStats
from cachefit.compress.gptq import gptq_quantize, sparsegpt_24
from cachefit.compress.linear import as_out_in, check_fqns, is_conv1d, is_linear_like, join_fqn
from cachefit.compress.measure import base_fqn, bytes_by_role, embedding_cosine, measure_module_bytes
from cachefit.compress.pruning import find_mlps, mask_24_, prune_mlp_, sparse24_mask, to_semi_structured_
from cachefit.compress.quantized import Int4WeightOnlyLinear, Int8WeightOnlyLinear
from cachefit.compress.techniques import CompressionConfig, compress_unit, resolve_techniques
from cachefit.errors import ConfigError, UnsupportedCompressionError
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
                total += t.counted_bytes - sum(v for k, v in measured.items() if base_fqn(k) == t.fqn)
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
# Finding the layers


def _role_guesser(root: nn.Module, roles: Mapping[str, str] | None) -> Callable[[str], str]:
    from cachefit.profile.module import guess_role  # the profiler's rules, so plan and module agree

    given = dict(roles or {})

    def role(fqn: str) -> str:
        if fqn in given:
            return given[fqn]
        return guess_role(root, fqn)

    return role


def _linear_targets(
    root: nn.Module,
    allowed_roles: Collection[str],
    fqns: frozenset[str] | None,
    role: Callable[[str], str],
) -> list[tuple[str, nn.Module]]:
    """(module FQN, module) of the linear layers whose weight FQN is selected and has an allowed role."""
    out = []
    for name, mod in root.named_modules():
        if not is_linear_like(mod) or not isinstance(getattr(mod, "weight", None), torch.Tensor):
            continue
        weight_fqn = join_fqn(name, "weight")
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
    for fqn in check_fqns(fqns, "checkpoint_modules_: fqns"):
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
            child_fqn = join_fqn(name, str(index))
            if fqns is not None:
                owned = {join_fqn(child_fqn, n) for n, _ in child.named_parameters(remove_duplicate=False)}
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
    calibration: CalibrationStats | None = None
    records: dict[str, _Record] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    checkpointed: tuple[str, ...] = ()

    def record(self, weight_fqn: str, mod: nn.Module) -> _Record:
        if weight_fqn not in self.records:
            w = mod.weight
            self.records[weight_fqn] = _Record(
                shape_before=tuple(as_out_in(mod).shape),
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
        for m in find_mlps(run.module)
        if (run.selected is None or join_fqn(m.fqn, f"{m.pattern.up}.weight") in run.selected)
        and not m.pruned
        and not any(_is_compressed(x) for x in (m.up, m.down, m.gate) if x is not None)
    ]
    if not mlps:
        return "no unpruned float MLP (up / gate / down linear layers of a known family) among the selected weights"
    widths = set()
    method = run.config.sparsity_method
    for mlp in mlps:
        down_inputs = None
        if method != "magnitude":
            down_inputs = _calibration(run).require(
                join_fqn(mlp.fqn, mlp.pattern.down), method=f"{name} ({method})", gram=method == "sparsegpt"
            )
        for weight_fqn in mlp.weight_fqns():
            run.record(weight_fqn, run.module.get_submodule(weight_fqn.rpartition(".")[0])).techniques.append(name)
        widths.add(prune_mlp_(mlp, fraction, down_inputs=down_inputs, compensate=run.config.bias_correction,
                              reconstruct=method == "sparsegpt"))
    shown = ", ".join(f"{w} -> {k}" for w, k in sorted(widths))
    how = {
        "magnitude": "magnitude scores",
        "wanda": "Wanda scores (||X_i|| ||down_:,i||)",
        "sparsegpt": "Wanda scores, down projection refit by least squares",
    }[method]
    run.notes.append(f"{name}: {len(mlps)} MLP(s) pruned by {how}, intermediate neurons {shown}")
    return None


def _apply_sparse24(run: _Run, name: str) -> str | None:
    targets = [
        (f, m)
        for f, m in _linear_targets(run.module, run.config.sparse24_roles, run.selected, run.role)
        if not _is_compressed(m)
    ]
    if not targets:
        return f"no float linear layer with a role in {run.config.sparse24_roles} among the selected weights"
    method = run.config.sparsity_method
    for mod_fqn, mod in targets:
        rec = run.record(join_fqn(mod_fqn, "weight"), mod)
        inputs = None
        if method != "magnitude":
            inputs = _calibration(run).require(mod_fqn, method=f"{name} ({method})", gram=method == "sparsegpt")
        if method == "sparsegpt":
            assert inputs is not None
            pruned, _ = sparsegpt_24(as_out_in(mod), inputs)
            with torch.no_grad():
                mod.weight.copy_((pruned.t() if is_conv1d(mod) else pruned).to(mod.weight.dtype))
        else:
            mask_24_(mod, inputs, compensate=run.config.bias_correction)
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
        rec = run.record(join_fqn(mod_fqn, "weight"), mod)
        rec.techniques.append(name)
        if run.backend == "torchao":
            rec.kernel = _torchao_quantize_(mod, name, run.config, run.device)
            continue
        new = _quantized_linear(run, mod_fqn, mod, bits)
        _replace_module(run.module, mod_fqn, new)
        rec.kernel = new.kernel
    return None


def _quantized_linear(run: _Run, mod_fqn: str, mod: nn.Module, bits: int) -> nn.Module:
    weight, bias = as_out_in(mod), getattr(mod, "bias", None)
    if run.config.quantize_method == "rtn":
        cls = Int8WeightOnlyLinear if bits == 8 else Int4WeightOnlyLinear
        return cls(weight, bias, config=run.config)
    stats = _calibration(run).require(mod_fqn, method=f"int{bits} (gptq)", gram=True)
    record = run.records.get(join_fqn(mod_fqn, "weight"))
    zero_mask = (weight == 0) if record is not None and record.sparse24_masked else None  # keep 2:4 zeros
    values, (scale, zero) = gptq_quantize(weight, stats, bits=bits, config=run.config,
                                          zero_mask=None if zero_mask is None else zero_mask.cpu())
    values, scale = values.to(weight.device), scale.to(weight.device)  # built where it runs (the kernels differ)
    zero = None if zero is None else zero.to(weight.device)
    if bits == 8:
        return Int8WeightOnlyLinear(values, bias, config=run.config, scale=scale)
    return Int4WeightOnlyLinear(values, bias, config=run.config, qparams=(scale, zero))


def _calibration(run: _Run) -> CalibrationStats:
    if run.calibration is None:  # compress_module_ checks this up front; kept for direct handler use
        raise ConfigError("calibrated compression needs calibration=collect_input_stats(module, batches)")
    return run.calibration


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
            rec.kernel = to_semi_structured_(mod)
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
            out_in = tuple(as_out_in(mod).shape)
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
    calibration: CalibrationStats | None = None,
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
        calibration: input statistics of the module's linear layers, named as in ``module``
            (:func:`~cachefit.compress.calibration.collect_input_stats`, ``gram=True`` for GPTQ);
            needed when ``config`` asks for a calibrated method (``sparsity_method="wanda"``,
            ``sparsity_method="sparsegpt"``, ``quantize_method="gptq"``).

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
    if config.calibrated and calibration is None:
        raise ConfigError(
            f"compress_module_: sparsity_method={config.sparsity_method!r} / quantize_method="
            f"{config.quantize_method!r} need calibration statistics; pass calibration="
            f"collect_input_stats(module, batches, gram=True) or use the magnitude / rtn methods"
        )
    if calibration is not None and not isinstance(calibration, CalibrationStats):
        raise ConfigError(
            f"compress_module_: calibration must be CalibrationStats (collect_input_stats), got {type(calibration).__name__}"
        )
    if backend == "torchao" and config.quantize_method != "rtn":
        raise UnsupportedCompressionError(
            "backend 'torchao' rounds to nearest; GPTQ runs on the cachefit backend (its own format)"
        )
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
        selected = frozenset(check_fqns(fqns, "compress_module_: fqns"))
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
        calibration=calibration,
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
    if is_conv1d(mod):
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

