"""Compression as explicit transformations of a unit's footprint: bytes and quality risk.

Pure core (no torch). Every technique is a function of the unit's own tensors (``unit.tensors``,
shapes as the model stores them) and of its :class:`~cachefit.units.LayerShape` and workload:

* ``int8``: weight-only, symmetric, one scale per output row (or per group along the input).
* ``int4``: weight-only, groups of ``int4_group_size`` along the input, a scale and a zero point
  per group (torchao's int4 weight-only layout packs them as bf16 ``scales_and_zeros``).
* ``sparse50`` / ``sparse75``: structured MLP sparsity: half / three quarters of the MLP
  intermediate neurons removed (smaller dense matrices, no metadata, smaller MLP activations).
* ``sparse24``: 2:4 semi-structured sparsity: half the values kept plus a 2-bit index per kept
  value (the CUTLASS / cuSPARSELt format of ``torch.sparse.to_sparse_semi_structured``).
* ``ckpt``: activation checkpointing (saves bytes in ``train`` only; 0 B in prefill / decode).
* ``fuse``: fused kernels: flash attention (no score matrix) and a fused MLP (no pre-activation).
* ``batch``: run at a smaller batch (``CompressionConfig.target_batch``); quality unchanged,
  throughput lost.

Techniques are applied in one canonical order whatever order they are listed in (structure first,
then the values, then the activations): ``sparse50``/``sparse75`` -> ``sparse24`` -> ``int8`` /
``int4`` -> ``fuse`` -> ``ckpt`` -> ``batch``. So ``int8`` after ``sparse50`` quantizes the half that
remains, and 2:4 with ``int8`` keeps 1-byte values. The final footprint is computed from the
composed state of every tensor, so it does not depend on the order the names were given in.

A technique that does not apply to a unit (``sparse50`` on an embedding, ``int8`` on weights that
are int8 already, ``batch`` at batch 1) is a recorded no-op that saves 0 B, so one list of allowed
techniques can be tried on every unit of a model; ``CompressionConfig(strict=True)`` raises
:class:`~cachefit.errors.UnsupportedCompressionError` instead. A technique that applies but saves
nothing (``ckpt`` in decode) is applied, recorded, and reported as saving 0 B.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from fractions import Fraction
from types import MappingProxyType

from cachefit.profile.activations import estimate_activations, estimate_flops_per_token
from cachefit.errors import ConfigError, UnsupportedCompressionError
from cachefit.families import mlp_down_names, mlp_up_names, transposed_weight_patterns
from cachefit.units import (
    COLLECTIVE_BUFFER_PARTS,
    DTYPE_BITS,
    WEIGHT_ROLES,
    Attention,
    Footprint,
    LayerShape,
    Mode,
    TensorSpec,
    Unit,
    Workload,
    dtype_bytes,
    normalize_dtype,
)

_log = logging.getLogger(__name__)

TECHNIQUE_KINDS: tuple[str, ...] = ("weights", "activations", "workload")


@dataclass(frozen=True, slots=True, kw_only=True)
class Technique:
    """One compression technique: what it changes and how much quality it risks."""

    name: str
    """Short name used in plans and on the command line (``int8``, ``sparse50``, ...)."""
    title: str
    """Human-readable name."""
    risk: float
    """Quality-risk score in [0, 1]: 0 is exact; a judgement from the evidence in ``rationale``,
    not a measured probability."""
    rationale: str
    """One line: why this risk score, with the evidence."""
    kind: str
    """``weights`` (changes stored weights), ``activations`` (changes what is live while running)
    or ``workload`` (changes how the unit is run)."""
    requires: str = ""
    """What a real run needs (kernels, hardware), where that limits its use."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.risk <= 1.0:
            raise ConfigError(f"technique {self.name}: risk must be in [0, 1], got {self.risk}")
        if self.kind not in TECHNIQUE_KINDS:
            raise ConfigError(f"technique {self.name}: kind must be one of {TECHNIQUE_KINDS}, got {self.kind!r}")


# The catalog, in canonical application order. Risk scores are judgements anchored on measurements
# (cachefit's own trial runs on MiniLM-L6 against fp32: relative output error and the minimum
# cosine of sentence embeddings) and on the cited literature.
TECHNIQUES: Mapping[str, Technique] = MappingProxyType(
    {
        t.name: t
        for t in (
            Technique(
                name="sparse50",
                title="Structured MLP sparsity, 50% of intermediate neurons removed",
                risk=0.6,
                rationale=(
                    "removes half the MLP neurons; without recovery fine-tuning structured pruning "
                    "loses accuracy fast (LLM-Pruner, Ma et al. 2023, needs LoRA recovery already at "
                    "20% of parameters)"
                ),
                kind="weights",
            ),
            Technique(
                name="sparse75",
                title="Structured MLP sparsity, 75% of intermediate neurons removed",
                risk=0.85,
                rationale=(
                    "removes three quarters of the MLP neurons: far beyond what one-shot structured "
                    "pruning keeps without retraining (LLM-Pruner, Ma et al. 2023)"
                ),
                kind="weights",
            ),
            Technique(
                name="sparse24",
                title="2:4 semi-structured sparsity (2 of every 4 weights kept, 2-bit indices)",
                risk=0.7,
                rationale=(
                    "2:4 magnitude pruning without fine-tuning measured MiniLM embedding cosine 0.56 vs "
                    "fp32; SparseGPT / Wanda (2023) keep large LLMs usable at 2:4 only with calibration"
                ),
                kind="weights",
                requires=(
                    "CUDA sparse tensor cores (Ampere or newer): torch.sparse.to_sparse_semi_structured "
                    "has no CPU kernel"
                ),
            ),
            Technique(
                name="int8",
                title="INT8 weight-only quantization, symmetric, per output channel",
                risk=0.05,
                rationale=(
                    "near-lossless: relative output error 3.9e-3 and MiniLM embedding cosine 0.9996 "
                    "vs fp32 measured with torchao Int8WeightOnlyConfig"
                ),
                kind="weights",
            ),
            Technique(
                name="int4",
                title="INT4 weight-only quantization, grouped, with scales and zero points",
                risk=0.3,
                rationale=(
                    "round-to-nearest 4-bit, groups of 128: relative output error 1e-1 and MiniLM "
                    "embedding cosine 0.963 measured; GPTQ / AWQ need calibration to stay close at 4 bits"
                ),
                kind="weights",
                requires="an int4 matmul kernel (tinygemm on CUDA; aten _weight_int4pack_mm_for_cpu on CPU)",
            ),
            Technique(
                name="fuse",
                title="Fused kernels: flash attention and fused MLP",
                risk=0.01,
                rationale=(
                    "same math, another summation order (online softmax, FlashAttention, Dao et al. "
                    "2022): outputs differ at the rounding level only"
                ),
                kind="activations",
            ),
            Technique(
                name="ckpt",
                title="Activation checkpointing",
                risk=0.0,
                rationale=(
                    "exact recomputation: a training step measured identical gradients with "
                    "torch.utils.checkpoint; costs one extra forward pass in backward"
                ),
                kind="activations",
            ),
            Technique(
                name="batch",
                title="Batch reduction",
                risk=0.0,
                rationale="outputs per sequence are unchanged; the cost is throughput (fewer sequences per step)",
                kind="workload",
            ),
        )
    }
)
CANONICAL_ORDER: tuple[str, ...] = tuple(TECHNIQUES)
"""Order in which techniques are applied, whatever order they are listed in."""
_EXCLUSIVE: tuple[tuple[str, str], ...] = (("int8", "int4"), ("sparse50", "sparse75"))
_SPARSE_FRACTION: Mapping[str, Fraction] = MappingProxyType(
    {"sparse50": Fraction(1, 2), "sparse75": Fraction(3, 4)}
)

# Roles quantized / 2:4-sparsified by default: the linear layers of attention and MLP. The LM head
# and the embeddings stay in the original dtype, as common practice does (torchao's quantize_
# filter only touches nn.Linear and users exclude lm_head; GPTQ / AWQ keep lm_head and embeddings
# unquantized); the MoE router is tiny (hidden x experts) and routing is sensitive, so it stays too.
DEFAULT_MATRIX_ROLES: tuple[str, ...] = ("qkv", "attn_out", "mlp", "experts")
_MATRIX_ROLE_CHOICES = tuple(r for r in WEIGHT_ROLES if r not in ("scales", "metadata"))

# GPT-2's ``Conv1D`` (transformers.pytorch_utils.Conv1D) stores its weight as (in, out), the
# transpose of nn.Linear: its output channels are the *last* dimension. Matched by FQN pattern; the
# patterns are the family registry's (``FamilySpec.transposed_weights``, today GPT-2's alone).
# GPTBigCode reuses these names on plain nn.Linear: pass ``transposed_tensors=()`` there.
GPT2_CONV1D_PATTERNS: tuple[str, ...] = transposed_weight_patterns()


SPARSITY_METHODS: tuple[str, ...] = ("magnitude", "wanda", "sparsegpt")
"""How pruning chooses and what it leaves: by magnitude alone; by magnitude times input norm
(Wanda, calibrated); or with the weights left updated to make up for what was removed (SparseGPT
for 2:4, a least-squares refit of the down projection for structured sparsity; calibrated)."""
QUANTIZE_METHODS: tuple[str, ...] = ("rtn", "gptq")
"""How quantization rounds: to nearest, or GPTQ's error-compensating order (calibrated)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CompressionConfig:
    """Options of the compression techniques (the defaults follow torchao's weight-only configs)."""

    int4_group_size: int = 128
    """Input features per int4 group (torchao Int4WeightOnlyConfig default: 128)."""
    int4_zero_points: bool = True
    """Asymmetric int4 with a zero point per group as torchao packs it (``scales_and_zeros``);
    False for symmetric int4 (one scale per group, as GPTQ ``sym=True`` or Marlin)."""
    int8_group_size: int | None = None
    """None: one scale per output channel (torchao Int8WeightOnlyConfig); else one scale per
    group of this many input features."""
    scale_dtype: str = "fp16"
    """dtype of scales and zero points (fp16 / bf16: 2 bytes, fp32: 4 bytes)."""
    pad_groups: bool = True
    """int4 with input features not a multiple of the group size: pad the last group with zeros
    (its padded values, scale and zero point are counted); False raises instead."""
    quantize_roles: tuple[str, ...] = DEFAULT_MATRIX_ROLES
    """Weight roles int8 / int4 quantize (add ``head``, ``embed``, ``router`` to quantize them too)."""
    sparse24_roles: tuple[str, ...] = DEFAULT_MATRIX_ROLES
    """Weight roles 2:4 sparsity prunes."""
    transposed_tensors: tuple[str, ...] = GPT2_CONV1D_PATTERNS
    """FQN patterns (fnmatch) of matrices stored (in, out) instead of nn.Linear's (out, in); for
    3-D expert tensors, (experts, in, out) instead of (experts, out, in) (e.g. gpt-oss)."""
    target_batch: int = 1
    """Batch the ``batch`` technique reduces to."""
    sparsity_method: str = "magnitude"
    """How ``sparse50`` / ``sparse75`` / ``sparse24`` choose what to remove: ``magnitude`` (weights
    only), ``wanda`` (weights times input activation norms, Sun et al. 2024) or ``sparsegpt``
    (2:4: SparseGPT, Frantar and Alistarh 2023; structured: Wanda's neurons, then the down
    projection refit by least squares); the last two need calibration inputs. The same bytes
    whichever."""
    quantize_method: str = "rtn"
    """How ``int8`` / ``int4`` round: ``rtn`` (round to nearest) or ``gptq`` (Frantar et al. 2023;
    needs calibration inputs). The same format and bytes either way."""
    bias_correction: bool = True
    """With a calibrated method, fold the mean contribution of what pruning removes into the layer's
    bias where it has one (no bytes added; layers without a bias are left as they are)."""
    strict: bool = False
    """Raise UnsupportedCompressionError when a listed technique does not apply to a unit,
    instead of recording a no-op that saves 0 B."""

    def __post_init__(self) -> None:
        for name in ("int4_group_size", "target_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"compression config: {name} must be a positive integer, got {value!r}")
        g8 = self.int8_group_size
        if g8 is not None and (isinstance(g8, bool) or not isinstance(g8, int) or g8 < 1):
            raise ConfigError(f"compression config: int8_group_size must be None or a positive integer, got {g8!r}")
        scale = normalize_dtype(self.scale_dtype, what="compression config: scale_dtype")
        if scale not in ("fp16", "bf16", "fp32"):
            raise ConfigError(f"compression config: scale_dtype must be fp16, bf16 or fp32, got {self.scale_dtype!r}")
        object.__setattr__(self, "scale_dtype", scale)
        for name in ("quantize_roles", "sparse24_roles", "transposed_tensors"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise ConfigError(f"compression config: {name} must be a tuple of names, got the string {value!r}")
            object.__setattr__(self, name, tuple(value))
        for name, choices in (("sparsity_method", SPARSITY_METHODS), ("quantize_method", QUANTIZE_METHODS)):
            if getattr(self, name) not in choices:
                raise ConfigError(
                    f"compression config: {name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}"
                )
        for name in ("quantize_roles", "sparse24_roles"):
            bad = [r for r in getattr(self, name) if r not in _MATRIX_ROLE_CHOICES]
            if bad:
                raise ConfigError(
                    f"compression config: {name} has unknown role(s) {bad}; "
                    f"use some of {', '.join(_MATRIX_ROLE_CHOICES)}"
                )


    @property
    def calibrated(self) -> bool:
        """True when a method needs calibration inputs (``wanda``, ``sparsegpt`` or ``gptq``)."""
        return self.sparsity_method != "magnitude" or self.quantize_method != "rtn"

    @property
    def needs_hessian(self) -> bool:
        """True when a method needs each layer's ``X^T X`` (``sparsegpt``, ``gptq``), not just norms."""
        return self.sparsity_method == "sparsegpt" or self.quantize_method == "gptq"


@dataclass(frozen=True, slots=True, kw_only=True)
class Step:
    """One technique's effect on one unit, as :func:`explain_compression` reports it."""

    technique: str
    applied: bool
    """False: the technique does not apply to this unit and changed nothing."""
    before: Footprint
    after: Footprint
    reason: str
    """Why it saved what it saved (or why it did not apply)."""
    flops_per_token_before: int = 0
    flops_per_token_after: int = 0

    @property
    def saved_bytes(self) -> int:
        """Total bytes saved (negative if the technique made the unit larger)."""
        return self.before.total_bytes - self.after.total_bytes

    @property
    def saved_weight_bytes(self) -> int:
        return self.before.weight_bytes - self.after.weight_bytes

    @property
    def saved_activation_bytes(self) -> int:
        return self.before.activation_bytes - self.after.activation_bytes

    @property
    def saved_buffer_bytes(self) -> int:
        return self.before.buffer_bytes - self.after.buffer_bytes

    @property
    def saved_persistent_bytes(self) -> int:
        """Resident activations saved: what adds up when several units share a card
        (:func:`cachefit.units.stack_footprints`), checkpointing's real saving."""
        return self.before.persistent_activation_bytes - self.after.persistent_activation_bytes


def resolve_techniques(techniques: Sequence[str] | str) -> tuple[str, ...]:
    """Validate technique names and return them in canonical application order.

    A string is read as a comma-separated list (``"int8,fuse"``).

    Raises:
        UnsupportedCompressionError: an unknown name, or two techniques that exclude each other.
        ConfigError: a name listed twice.
    """
    if isinstance(techniques, str):
        techniques = [t for t in techniques.split(",") if t.strip()]
    names: list[str] = []
    for raw in techniques:
        if not isinstance(raw, str):
            raise ConfigError(f"compression technique names must be strings, got {raw!r}")
        name = raw.strip().lower()
        if name not in TECHNIQUES:
            raise UnsupportedCompressionError(
                f"unknown compression technique {raw!r}; known techniques: {', '.join(TECHNIQUES)}"
            )
        if name in names:
            raise ConfigError(f"compression technique {name!r} is listed twice; list each technique once")
        names.append(name)
    for a, b in _EXCLUSIVE:
        if a in names and b in names:
            raise UnsupportedCompressionError(
                f"compression techniques {a!r} and {b!r} exclude each other; keep one of them"
            )
    return tuple(n for n in CANONICAL_ORDER if n in names)


def compression_risk(names: Sequence[str] | str) -> float:
    """Combined quality risk of several techniques: ``1 - prod(1 - risk_i)``.

    The rule treats the risks as independent chances of an unacceptable quality loss: the combined
    score is never below the largest single risk, grows with every risky technique added, and is 0
    only if every technique is exact. Scores are judgements (see :data:`TECHNIQUES`), not
    measurements; the combination is a ranking aid, not a probability.
    """
    keep = 1.0
    for name in resolve_techniques(names):
        keep *= 1.0 - TECHNIQUES[name].risk
    return 1.0 - keep


# --------------------------------------------------------------------------------------------------
# Per-tensor state and byte formulas


@dataclass(frozen=True, slots=True)
class _TensorState:
    """A weight tensor as compression leaves it."""

    spec: TensorSpec
    shape: tuple[int, ...]
    """Stored shape after structured pruning (== spec.shape otherwise)."""
    sparse24: bool = False
    values: str | None = None
    """``int8`` / ``int4`` once quantized; None: still in the workload's weight dtype."""


@dataclass(frozen=True, slots=True)
class _TensorBytes:
    values: int
    scales: int
    metadata: int


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _is_matrix(spec: TensorSpec) -> bool:
    """Matrices are what quantization and 2:4 act on; biases, norms and gains stay as they are.

    Expert tensors are matrices when 3-D (experts, out, in); their 2-D tensors are per-expert
    biases (experts, out) (gpt-oss). Other roles: any tensor of 2 or more dimensions.
    """
    if spec.name.endswith("bias"):
        return False
    if spec.role == "experts":
        return len(spec.shape) == 3
    return len(spec.shape) >= 2


def _rows_cols(spec: TensorSpec, shape: tuple[int, ...], config: CompressionConfig) -> tuple[int, int]:
    """(output rows, input columns) of a matrix: scales are per output row, groups run along the input.

    nn.Linear stores (out, in) and 3-D experts (experts, out, in); tensors matching
    ``config.transposed_tensors`` store the input first. Conv kernels (out, in, kh, kw) flatten
    their input dimensions.
    """
    transposed = any(fnmatchcase(spec.name, p) for p in config.transposed_tensors)
    if spec.role == "experts" and len(shape) == 3:
        e, a, b = shape
        return (e * b, a) if transposed else (e * a, b)
    if len(shape) == 2:
        a, b = shape
        return (b, a) if transposed else (a, b)
    return shape[0], _numel(shape[1:])


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _tensor_bytes(state: _TensorState, base_dtype: str, config: CompressionConfig) -> _TensorBytes:
    """Bytes of one tensor in its compressed state: values, scales / zero points, 2:4 metadata."""
    if state.values is None and not state.sparse24:
        return _TensorBytes(dtype_bytes(base_dtype, _numel(state.shape)), 0, 0)
    rows, cols = _rows_cols(state.spec, state.shape, config)
    scale_bytes = DTYPE_BITS[config.scale_dtype] // 8
    scales = 0
    if state.values == "int4":
        group = config.int4_group_size
        if cols % group and not config.pad_groups:
            raise UnsupportedCompressionError(
                f"int4 on tensor {state.spec.name}: {cols} input features are not a multiple of the group "
                f"size {group}; choose int4_group_size dividing {cols}, or allow padding (pad_groups=True)"
            )
        groups_per_row = _ceil_div(cols, group)
        cols = groups_per_row * group  # the padded last group is stored like any other
        # torchao's int4 weight-only layout: per group and output row a scale and a zero point
        # (``scales_and_zeros`` of shape (in / group, out, 2)).
        scales = rows * groups_per_row * (2 if config.int4_zero_points else 1) * scale_bytes
    elif state.values == "int8":
        groups_per_row = 1 if config.int8_group_size is None else _ceil_div(cols, config.int8_group_size)
        scales = rows * groups_per_row * scale_bytes  # symmetric: no zero points
    value_bits = 4 if state.values == "int4" else 8 if state.values == "int8" else DTYPE_BITS[base_dtype]
    if not state.sparse24:
        return _TensorBytes(_ceil_div(rows * cols * value_bits, 8), scales, 0)
    # 2:4 along the input: of every 4 consecutive values 2 are kept, each with a 2-bit index, i.e.
    # 1 metadata bit per dense element (torch.sparse._semi_structured_conversions: int16 metadata for
    # 16-bit values, k/16 per row; int32 for int8, k/32 per row: both k/8 bytes per row). 32-bit values
    # use the 1:2 pattern with 4 bits per pair (k/4 bytes per row): 2 bits per dense element.
    # A last partial group of 4 is padded.
    cols4 = _ceil_div(cols, 4) * 4
    kept = rows * cols4 // 2
    meta_bits_per_dense = 2 if value_bits == 32 else 1
    return _TensorBytes(
        _ceil_div(kept * value_bits, 8), scales, _ceil_div(rows * cols4 * meta_bits_per_dense, 8)
    )


# --------------------------------------------------------------------------------------------------
# The unit's composed state and its footprint


@dataclass(frozen=True, slots=True)
class _State:
    tensors: tuple[_TensorState, ...]
    shape: LayerShape | None
    workload: Workload
    activations_changed: bool = False
    """True once a technique changed the shape or workload the activations depend on."""
    params_removed: int = 0


def _base_roles(unit: Unit, base_dtype: str) -> dict[str, int]:
    """The unit's weight bytes by role, as profiled (from its tensors if the footprint lacks roles)."""
    fp = unit.footprint
    if fp.weight_roles:
        return fp.roles
    roles: dict[str, int] = {}
    for spec in unit.tensors:
        roles[spec.role] = roles.get(spec.role, 0) + dtype_bytes(base_dtype, spec.numel)
    if sum(roles.values()) != fp.weight_bytes:
        if unit.tensors:
            raise ConfigError(
                f"unit {unit.name}: its tensors hold {sum(roles.values())} B in {base_dtype} but its footprint "
                f"has {fp.weight_bytes} B of weights and no weight_roles; profile it with the workload's "
                f"weight dtype or give the footprint its weight_roles"
            )
        roles = {"other": fp.weight_bytes} if fp.weight_bytes else {}
    return roles


def _weights(unit: Unit, state: _State, config: CompressionConfig) -> tuple[int, tuple[tuple[str, int], ...]]:
    base = unit.footprint.weight_bytes
    base_dtype = state.workload.weight_dtype
    roles = _base_roles(unit, base_dtype)
    changed = False
    for t in state.tensors:
        if t.shape == t.spec.shape and not t.sparse24 and t.values is None:
            continue
        changed = True
        nbytes = _tensor_bytes(t, base_dtype, config)
        original = dtype_bytes(base_dtype, t.spec.numel)
        roles[t.spec.role] = roles.get(t.spec.role, 0) - original + nbytes.values
        if roles[t.spec.role] < 0:
            raise ConfigError(
                f"unit {unit.name}: its footprint counts fewer {t.spec.role!r} bytes than its tensors hold in "
                f"{base_dtype} ({original} B for {t.spec.name}); profile the unit with the workload it is "
                f"compressed for"
            )
        for role, extra in (("scales", nbytes.scales), ("metadata", nbytes.metadata)):
            if extra:
                roles[role] = roles.get(role, 0) + extra
    if not changed:
        return base, unit.footprint.weight_roles
    order = {r: i for i, r in enumerate(WEIGHT_ROLES)}
    items = tuple(sorted(roles.items(), key=lambda kv: order.get(kv[0], len(order))))
    return sum(v for _, v in items), items


def _activations(unit: Unit, state: _State, original_workload: Workload) -> dict[str, object]:
    fp = unit.footprint
    if not state.activations_changed:
        return {
            "activation_bytes": fp.activation_bytes,
            "persistent_activation_bytes": fp.persistent_activation_bytes,
            "activation_parts": fp.activation_parts,
            "buffer_bytes": fp.buffer_bytes,
            "buffer_parts": fp.buffer_parts,
        }
    if state.shape is None:
        # Live-module unit (no LayerShape): only ``batch`` changes activations here, and it scales
        # them linearly with the batch -- an approximation (a score matrix or a KV cache is linear
        # in the batch too, so it holds for transformer blocks; buffers are left as they are).
        # Rounded up so the estimate never undercounts.
        num, den = state.workload.batch, original_workload.batch
        parts = tuple((name, _ceil_div(v * num, den)) for name, v in fp.activation_parts)
        total = sum(v for _, v in parts) if parts else _ceil_div(fp.activation_bytes * num, den)
        return {
            "activation_bytes": total,
            "persistent_activation_bytes": min(total, _ceil_div(fp.persistent_activation_bytes * num, den)),
            "activation_parts": parts,
            "buffer_bytes": fp.buffer_bytes,
            "buffer_parts": fp.buffer_parts,
        }
    est = estimate_activations(state.shape, state.workload)
    # a tensor-parallel shard's collective buffers come from the split, not the shape: carried over,
    # scaled with the batch (they hold the micro-batch's tokens)
    extra = tuple((name, _ceil_div(v * state.workload.batch, original_workload.batch))
                  for name, v in fp.buffer_parts if name in COLLECTIVE_BUFFER_PARTS)
    return {
        "activation_bytes": est.activation_bytes,
        "persistent_activation_bytes": est.persistent_bytes,
        "activation_parts": tuple(est.parts),
        "buffer_bytes": est.buffer_bytes + sum(v for _, v in extra),
        "buffer_parts": (*est.buffer_parts, *extra),
    }


def _footprint(unit: Unit, state: _State, config: CompressionConfig, original_workload: Workload) -> Footprint:
    weight_bytes, roles = _weights(unit, state, config)
    return Footprint(weight_bytes=weight_bytes, weight_roles=roles, **_activations(unit, state, original_workload))


def _flops(unit: Unit, state: _State, original_shape: LayerShape | None, workload: Workload) -> int:
    """FLOPs per token after structured sparsity: the unit's count minus what the removed MLP
    neurons computed (2:4 and quantization do not change the dense-equivalent count)."""
    if state.shape is None or original_shape is None or state.shape == original_shape:
        return unit.flops_per_token
    removed = estimate_flops_per_token(original_shape, workload) - estimate_flops_per_token(state.shape, workload)
    return max(0, unit.flops_per_token - removed)


# --------------------------------------------------------------------------------------------------
# The techniques: each takes the state and returns (new state, reason) or (None, why not)


def _quantize(state: _State, name: str, config: CompressionConfig) -> tuple[_State | None, str]:
    bits = 8 if name == "int8" else 4
    base_dtype = state.workload.weight_dtype
    if DTYPE_BITS[base_dtype] <= bits:
        return None, f"weights are already {base_dtype} ({DTYPE_BITS[base_dtype]} bits); {name} would not shrink them"
    new, count = [], 0
    for t in state.tensors:
        if t.spec.role in config.quantize_roles and _is_matrix(t.spec):
            new.append(replace(t, values=name))
            count += 1
        else:
            new.append(t)
    if not count:
        return None, f"no matrix of the quantized roles ({', '.join(config.quantize_roles)}) in this unit"
    if name == "int8":
        granularity = (
            "one scale per output channel"
            if config.int8_group_size is None
            else f"one scale per {config.int8_group_size} input features"
        )
        how = f"1 byte per weight + {granularity} ({config.scale_dtype})"
    else:
        zeros = " and a zero point" if config.int4_zero_points else ""
        how = (
            f"half a byte per weight + a {config.scale_dtype} scale{zeros} per {config.int4_group_size} "
            f"input features"
        )
    return replace(state, tensors=tuple(new)), (
        f"{count} matrices from {base_dtype} to {name}: {how}; biases, norms and roles outside "
        f"({', '.join(config.quantize_roles)}) stay {base_dtype}"
    )


# MLP projections into (up, gate) and out of (down) the intermediate, from the family registry's
# MLP patterns (``FamilySpec.mlp_patterns``), the same ones compress/pruning.py prunes by.
_UP_NAMES = mlp_up_names()
_DOWN_NAMES = mlp_down_names()


def _mlp_side(name: str) -> str | None:
    """``up`` for projections into the intermediate, ``down`` for the one out of it, by FQN."""
    parts = name.split(".")
    for i in range(len(parts)):
        tail = ".".join(parts[i:i + 2])
        if parts[i] in _DOWN_NAMES or tail in _DOWN_NAMES:
            return "down"
        if parts[i] in _UP_NAMES or tail in _UP_NAMES:
            return "up"
    return None


def _intermediate_axes(t: TensorSpec, shape: LayerShape) -> tuple[int, int] | None:
    """(axis, multiple of the intermediate width) of an MLP tensor's intermediate dimension, or None.

    Up/gate rows, down columns and up/gate biases carry the intermediate width I; a fused
    gate_up (Phi-3, transformers' MoE experts) carries 2 I. The axis is found by size, so the
    stored layout ((out, in), (in, out), (experts, ...)) does not matter.
    """
    width = shape.intermediate_size
    first = 1 if t.role == "experts" and len(t.shape) >= 2 else 0  # axis 0 of an expert tensor is the expert
    hits = []
    for axis in range(first, len(t.shape)):
        if t.shape[axis] == width:
            hits.append((axis, 1))
        elif shape.gated_mlp and t.shape[axis] == 2 * width:
            hits.append((axis, 2))
    if len(hits) > 1:
        # hidden == intermediate (e.g. a tensor-parallel shard): decide by the projection's name
        side = _mlp_side(t.name)
        if side is not None and len(t.shape) >= 2:
            transposed = any(fnmatchcase(t.name, pat) for pat in GPT2_CONV1D_PATTERNS)
            out_axis, in_axis = len(t.shape) - 2, len(t.shape) - 1
            if transposed:
                out_axis, in_axis = in_axis, out_axis
            axis = out_axis if side == "up" else in_axis
            chosen = [hit for hit in hits if hit[0] == axis]
            if chosen:
                return chosen[0]
        raise UnsupportedCompressionError(
            f"structured sparsity: cannot tell which dimension of {t.name} {t.shape} is the MLP intermediate "
            f"({width}): axes {[ax for ax, _ in hits]} all match (the hidden size equals the intermediate "
            f"width); use sparse24 or quantization for this model instead"
        )
    return hits[0] if hits else None


def _prune_mlp(state: _State, name: str) -> tuple[_State | None, str]:
    shape = state.shape
    if shape is None:
        return None, (
            "the unit has no LayerShape (live-module profile): its MLP intermediate and activations are unknown"
        )
    if shape.intermediate_size <= 0:
        return None, f"the unit ({shape.part}) has no MLP"
    width = shape.intermediate_size
    removed_frac = _SPARSE_FRACTION[name]
    kept = width - math.floor(width * removed_frac)
    new, count, removed_params, left = [], 0, 0, []
    for t in state.tensors:
        if t.spec.role not in ("mlp", "experts"):
            new.append(t)
            continue
        hit = _intermediate_axes(t.spec, shape)
        if hit is None:
            new.append(t)
            if len(t.spec.shape) >= 2:
                left.append(t.spec.name)
            continue
        axis, multiple = hit
        dims = list(t.shape)
        dims[axis] = multiple * kept
        pruned = tuple(dims)
        new.append(replace(t, shape=pruned))
        if not t.spec.tied_to:
            removed_params += _numel(t.shape) - _numel(pruned)
        count += 1
    if not count:
        return None, f"no MLP tensor of this unit carries the intermediate width {width}"
    reason = (
        f"{width - kept} of {width} MLP intermediate neurons removed ({count} tensors shrink: up/gate rows, "
        f"down columns, their biases); dense matrices, no metadata; MLP activations re-estimated at width {kept}"
    )
    if left:
        reason += f"; left dense (no intermediate dimension of width {width}): {', '.join(left)}"
    return (
        replace(
            state,
            tensors=tuple(new),
            shape=replace(shape, intermediate_size=kept),
            activations_changed=True,
            params_removed=state.params_removed + removed_params,
        ),
        reason,
    )


def _sparse24(state: _State, config: CompressionConfig) -> tuple[_State | None, str]:
    new, count = [], 0
    for t in state.tensors:
        if t.spec.role in config.sparse24_roles and _is_matrix(t.spec):
            new.append(replace(t, sparse24=True))
            count += 1
        else:
            new.append(t)
    if not count:
        return None, f"no matrix of the 2:4 roles ({', '.join(config.sparse24_roles)}) in this unit"
    return replace(state, tensors=tuple(new)), (
        f"{count} matrices keep 2 of every 4 values along the input plus a 2-bit index per kept value; "
        f"activations unchanged; needs CUDA sparse tensor cores"
    )


def _fuse(state: _State) -> tuple[_State | None, str]:
    wl = state.workload
    if state.shape is None:
        return None, "the unit has no LayerShape (live-module profile): fused activations cannot be re-estimated"
    if state.shape.part not in ("layer", "attention", "mlp"):
        return None, f"a {state.shape.part} unit has no attention or MLP to fuse"
    if wl.attention is Attention.FLASH and wl.fused_mlp:
        return None, "the workload already uses flash attention and a fused MLP"
    return (
        replace(state, workload=replace(wl, attention=Attention.FLASH, fused_mlp=True), activations_changed=True),
        "flash attention (no batch x heads x q x kv score / probability matrices) and a fused MLP "
        "(no separate pre-activation); activations re-estimated",
    )


def _ckpt(state: _State) -> tuple[_State | None, str]:
    wl = state.workload
    if state.shape is None:
        return None, "the unit has no LayerShape (live-module profile): saved activations cannot be re-estimated"
    if wl.checkpointing:
        return None, "the workload already checkpoints activations"
    if wl.mode is Mode.TRAIN:
        why = (
            "only the unit's input stays resident for backward, the saved set is recomputed (one extra "
            "forward); the unit's own peak keeps the recomputed set, the saving is in the persistent "
            "bytes that add up across the units of a card"
        )
    else:
        why = f"in {wl.mode.value} nothing is saved for backward, so checkpointing has nothing to drop"
    return replace(state, workload=replace(wl, checkpointing=True), activations_changed=True), why


def _batch(state: _State, config: CompressionConfig) -> tuple[_State | None, str]:
    wl = state.workload
    target = config.target_batch
    if wl.batch <= target:
        return None, f"batch is {wl.batch}, not above the target batch {target}"
    approx = ""
    if state.shape is None:
        approx = " (live-module unit: activations scaled linearly with the batch, an approximation)"
    return (
        replace(state, workload=replace(wl, batch=target), activations_changed=True),
        f"batch {wl.batch} -> {target}: activations re-estimated{approx}; {wl.batch / target:g}x fewer "
        f"sequences per step",
    )


def _apply(state: _State, name: str, config: CompressionConfig) -> tuple[_State | None, str]:
    if name in ("int8", "int4"):
        return _quantize(state, name, config)
    if name in _SPARSE_FRACTION:
        return _prune_mlp(state, name)
    if name == "sparse24":
        return _sparse24(state, config)
    if name == "fuse":
        return _fuse(state)
    if name == "ckpt":
        return _ckpt(state)
    if name == "batch":
        return _batch(state, config)
    raise AssertionError(f"technique {name} has no handler")  # unreachable: names are resolved first


def _check_profiled_activations(unit: Unit, workload: Workload) -> None:
    """Re-estimating activations is only sound if the unit was profiled under ``workload``."""
    if unit.shape is None:
        return
    est = estimate_activations(unit.shape, workload)
    fp = unit.footprint
    collective = sum(v for name, v in fp.buffer_parts if name in COLLECTIVE_BUFFER_PARTS)
    profiled = (fp.activation_bytes, fp.persistent_activation_bytes, fp.buffer_bytes - collective)
    if (est.activation_bytes, est.persistent_bytes, est.buffer_bytes) != profiled:
        raise ConfigError(
            f"unit {unit.name}: its footprint has {fp.activation_bytes} B of activations "
            f"({fp.persistent_activation_bytes} B persistent) and {fp.buffer_bytes} B of buffers, but its shape "
            f"under the given workload (batch {workload.batch}, seq {workload.seq_len}, {workload.mode.value}) "
            f"gives {est.activation_bytes} B ({est.persistent_bytes} B persistent) and {est.buffer_bytes} B; "
            f"pass the workload the unit was profiled with (ModelProfile.workload)"
        )


def _run(
    unit: Unit, techniques: Sequence[str] | str, workload: Workload, config: CompressionConfig | None
) -> tuple[tuple[Step, ...], _State]:
    if not isinstance(unit, Unit):
        raise ConfigError(f"compress: expected a Unit, got {type(unit).__name__}")
    if not isinstance(workload, Workload):
        raise ConfigError(f"compress: expected a Workload, got {type(workload).__name__}")
    config = config or CompressionConfig()
    names = resolve_techniques(techniques)
    if unit.compression and names:
        raise UnsupportedCompressionError(
            f"unit {unit.name} is already compressed ({', '.join(unit.compression)}); compress the profiled "
            f"unit with the whole list of techniques instead"
        )
    state = _State(
        tensors=tuple(_TensorState(t, t.shape) for t in unit.tensors), shape=unit.shape, workload=workload
    )
    steps: list[Step] = []
    before = unit.footprint
    flops_before = unit.flops_per_token
    for name in names:
        new_state, reason = _apply(state, name, config)
        if new_state is None:
            if config.strict:
                raise UnsupportedCompressionError(
                    f"{name} does not apply to unit {unit.name}: {reason}; drop {name} for this unit or use "
                    f"strict=False to record it as a no-op"
                )
            _log.debug("compress %s: %s is a no-op: %s", unit.name, name, reason)
            steps.append(
                Step(technique=name, applied=False, before=before, after=before, reason=reason,
                     flops_per_token_before=flops_before, flops_per_token_after=flops_before)
            )
            continue
        if new_state.activations_changed and not state.activations_changed:
            _check_profiled_activations(unit, workload)
        state = new_state
        after = _footprint(unit, state, config, workload)
        flops_after = _flops(unit, state, unit.shape, workload)
        steps.append(
            Step(technique=name, applied=True, before=before, after=after, reason=reason,
                 flops_per_token_before=flops_before, flops_per_token_after=flops_after)
        )
        before, flops_before = after, flops_after
    return tuple(steps), state


def explain_compression(
    unit: Unit,
    techniques: Sequence[str] | str,
    workload: Workload,
    config: CompressionConfig | None = None,
) -> tuple[Step, ...]:
    """Apply techniques to a profiled unit one at a time, in canonical order, and say what each saved.

    Each step's ``before`` is the previous step's ``after``; techniques that do not apply appear
    with ``applied=False`` and save 0 B.

    Raises:
        UnsupportedCompressionError: unknown or mutually exclusive techniques, an already compressed
            unit, or (with ``config.strict``) a technique that does not apply.
        ConfigError: ``workload`` is not the workload the unit was profiled with.
    """
    steps, _ = _run(unit, techniques, workload, config)
    return steps


def compress_unit(
    unit: Unit,
    techniques: Sequence[str] | str,
    workload: Workload,
    config: CompressionConfig | None = None,
) -> Unit:
    """Return ``unit`` with its footprint after the techniques (see :func:`explain_compression`).

    The new unit keeps the name, tensors (FQNs and shapes as stored in the source model, so deploy
    finds its modules) and ``shape`` of the profiled one; its footprint's ``weight_roles`` gain
    ``scales`` and ``metadata`` where quantization or 2:4 add them; ``params`` drop by the weights
    structured sparsity removes; ``flops_per_token`` drops by the FLOPs of removed MLP neurons;
    ``compression`` lists the techniques that applied, in canonical order.
    """
    steps, state = _run(unit, techniques, workload, config)
    applied = tuple(s.technique for s in steps if s.applied)
    if not applied:
        return unit
    last = steps[-1] if steps[-1].applied else next(s for s in reversed(steps) if s.applied)
    return replace(
        unit,
        footprint=last.after,
        params=unit.params - state.params_removed,
        flops_per_token=last.flops_per_token_after,
        compression=applied,
    )


__all__ = [
    "CANONICAL_ORDER",
    "DEFAULT_MATRIX_ROLES",
    "GPT2_CONV1D_PATTERNS",
    "QUANTIZE_METHODS",
    "SPARSITY_METHODS",
    "TECHNIQUES",
    "TECHNIQUE_KINDS",
    "CompressionConfig",
    "Step",
    "Technique",
    "compress_unit",
    "compression_risk",
    "explain_compression",
    "resolve_techniques",
]
