"""Core values of cachefit: workloads, tensors, footprints, units and model profiles.

Pure Python, frozen dataclasses, bytes as ``int``. A ``Unit`` is one schedulable block in execution
order (an embedding, a decoder layer, or an attention / MLP block of one); its ``Footprint`` is the
seed paper's ``size(l_j) = weights + activations + buffers``, with the parts that make it.

Stacking units on one card is *not* a plain sum here: weights and the persistent part of the
activations (KV cache in decode, saved-for-backward tensors in train) stay resident, while the
transient part (scratch a unit frees when it returns) and its workspace buffers are reused by the
next unit, so a card needs the largest of them, not their sum (see :func:`stack_footprints`). The plain
sum, the seed paper's accounting, is available with ``reuse=False`` for comparison.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cachefit.errors import ConfigError

# Bits per element of each dtype cachefit knows. int4 is half a byte: byte counts of int4 tensors
# round up per tensor (an odd element count still needs a whole last byte).
DTYPE_BITS: Mapping[str, int] = {
    "fp32": 32,
    "tf32": 32,
    "fp16": 16,
    "bf16": 16,
    "fp8": 8,
    "int8": 8,
    "int4": 4,
}
_DTYPE_ALIASES = {
    "float32": "fp32",
    "float": "fp32",
    "float16": "fp16",
    "half": "fp16",
    "bfloat16": "bf16",
    "float8": "fp8",
    "float8_e4m3fn": "fp8",
}


def normalize_dtype(name: str, *, what: str = "dtype") -> str:
    """Return the canonical dtype name (``fp16``, ``bf16``, ...) or raise ConfigError."""
    key = str(name).strip().lower().removeprefix("torch.")
    key = _DTYPE_ALIASES.get(key, key)
    if key not in DTYPE_BITS:
        raise ConfigError(f"{what}: unknown dtype {name!r}; use one of {', '.join(DTYPE_BITS)}")
    return key


_TORCH_DTYPE_NAMES: Mapping[str, str] = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64",
                                          "int8": "int8"}


def torch_dtype(name: str, *, what: str = "dtype"):  # noqa: ANN201 - a torch.dtype; torch is imported here only
    """The ``torch.dtype`` of a cachefit dtype name (``fp32``, ``fp16``, ``bf16``; ``fp64``, ``int8``).

    The one table from cachefit's dtype names to torch's: the torch edges (probe, compression,
    deploy) all ask here. torch is imported on the call, so the core stays torch-free.
    """
    key = "fp64" if str(name).strip().lower() in ("fp64", "float64", "double") else normalize_dtype(name, what=what)
    if key not in _TORCH_DTYPE_NAMES:
        usable = ", ".join(_TORCH_DTYPE_NAMES)
        raise ConfigError(f"{what}: {name!r} has no torch dtype of its own here; use one of {usable}")
    import torch

    return getattr(torch, _TORCH_DTYPE_NAMES[key])


def dtype_bytes(name: str, numel: int) -> int:
    """Bytes that ``numel`` elements of dtype ``name`` occupy (int4 rounds up to whole bytes)."""
    bits = DTYPE_BITS[normalize_dtype(name)]
    return (numel * bits + 7) // 8


class Mode(str, enum.Enum):
    """What the model is doing: the activation accounting depends on it."""

    PREFILL = "prefill"  # one forward pass over ``seq_len`` tokens per sequence, nothing kept
    DECODE = "decode"  # one new token per sequence, attending to a KV cache of ``seq_len`` tokens
    TRAIN = "train"  # forward + backward: activations saved for backward stay resident


class Attention(str, enum.Enum):
    """Attention kernel: eager materializes the score matrix, flash (fused) does not."""

    EAGER = "eager"
    FLASH = "flash"


class KVCache(str, enum.Enum):
    """How the decode KV cache is held: pre-allocated once, or grown every step."""

    STATIC = "static"  # pre-allocated for the whole context, written in place (transformers StaticCache)
    DYNAMIC = "dynamic"  # grown by torch.cat every step: old and new cache alive together (DynamicCache)


@dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    """The workload a profile is computed for."""

    batch: int = 1
    """Sequences per step (per micro-batch when ``micro_batches`` > 1)."""
    seq_len: int = 1024
    """Tokens per sequence in prefill / train; the KV-cache length (context) in decode."""
    mode: Mode = Mode.DECODE
    """prefill, decode (with KV cache) or train (with activations saved for backward)."""
    weight_dtype: str = "fp16"
    """dtype the weights are stored in before any compression."""
    act_dtype: str = "fp16"
    """dtype of activations."""
    kv_dtype: str | None = None
    """dtype of the KV cache; None means ``act_dtype``."""
    micro_batches: int = 1
    """Micro-batches per step in a pipeline (each of ``batch`` sequences)."""
    attention: Attention = Attention.EAGER
    """eager (scores of batch x heads x q_len x kv_len materialized) or flash (fused, no scores)."""
    fused_mlp: bool = False
    """MLP up/gate projection and activation fused into one kernel (no separate pre-activation)."""
    checkpointing: bool = False
    """Activation checkpointing (train): keep only each unit's input, recompute the rest."""
    buffer_reuse: bool = True
    """The MLP's intermediates reuse the attention's scratch (peak = max, not sum), as in the seed."""
    dropout: bool = False
    """Train only: dropout layers present, so their 1-byte masks are saved for backward."""
    kv_cache: KVCache = KVCache.STATIC
    """Decode: ``static``, a cache pre-allocated for the whole context (what a deployment sizes once),
    or ``dynamic``, one that grows by ``torch.cat`` each step and so briefly holds the old and the new
    cache together."""

    def __post_init__(self) -> None:
        for name in ("batch", "seq_len", "micro_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"workload.{name} must be a positive integer, got {value!r}")
        try:
            object.__setattr__(self, "mode", Mode(self.mode))
        except ValueError:
            raise ConfigError(
                f"workload.mode must be one of {', '.join(m.value for m in Mode)}, got {self.mode!r}"
            ) from None
        try:
            object.__setattr__(self, "attention", Attention(self.attention))
        except ValueError:
            raise ConfigError(
                f"workload.attention must be eager or flash, got {self.attention!r}"
            ) from None
        try:
            object.__setattr__(self, "kv_cache", KVCache(self.kv_cache))
        except ValueError:
            raise ConfigError(
                f"workload.kv_cache must be static or dynamic, got {self.kv_cache!r}"
            ) from None
        for name in ("weight_dtype", "act_dtype"):
            if normalize_dtype(getattr(self, name), what=f"workload.{name}") != getattr(self, name):
                raise ConfigError(
                    f"workload.{name}: write the canonical name "
                    f"{normalize_dtype(getattr(self, name))!r}, not {getattr(self, name)!r}"
                )
        if self.kv_dtype is not None and normalize_dtype(self.kv_dtype, what="workload.kv_dtype") != self.kv_dtype:
            raise ConfigError(f"workload.kv_dtype: write the canonical name {normalize_dtype(self.kv_dtype)!r}")

    @property
    def query_len(self) -> int:
        """Tokens per sequence processed in one step (1 in decode)."""
        return 1 if self.mode is Mode.DECODE else self.seq_len

    @property
    def kv_len(self) -> int:
        """Keys/values each query attends to (before any sliding window)."""
        return self.seq_len

    @property
    def tokens(self) -> int:
        """Tokens processed per step per micro-batch: batch x query_len."""
        return self.batch * self.query_len

    @property
    def kv_cache_dtype(self) -> str:
        return self.kv_dtype or self.act_dtype

    def to_dict(self) -> dict[str, object]:
        """The workload as JSON data. ``kv_cache`` appears only when it is not the default (static),
        so the digests of plans and profiles made before it existed stay the same."""
        out: dict[str, object] = {
            "batch": self.batch,
            "seq_len": self.seq_len,
            "mode": self.mode.value,
            "weight_dtype": self.weight_dtype,
            "act_dtype": self.act_dtype,
            "kv_dtype": self.kv_cache_dtype,
            "micro_batches": self.micro_batches,
            "attention": self.attention.value,
            "fused_mlp": self.fused_mlp,
            "checkpointing": self.checkpointing,
            "buffer_reuse": self.buffer_reuse,
            "dropout": self.dropout,
        }
        if self.kv_cache is not KVCache.STATIC:
            out["kv_cache"] = self.kv_cache.value
        return out


# Roles a weight tensor can play; compression and reports group bytes by them.
WEIGHT_ROLES: tuple[str, ...] = (
    "qkv",  # query/key/value projections (fused or not), their biases
    "attn_out",  # attention output projection
    "mlp",  # dense MLP matrices (up, gate, down) and biases
    "experts",  # MoE expert MLP matrices
    "router",  # MoE gate / router
    "norm",  # layer norms / RMS norms
    "embed",  # token embeddings
    "pos_embed",  # learned position / token-type embeddings
    "head",  # LM head, pooler, classifier
    "conv",  # convolution kernels (live-module profiles)
    "other",  # anything else (live-module profiles)
    "scales",  # quantization scales / zero points (added by compression)
    "metadata",  # sparsity indices / masks (added by compression)
)


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorSpec:
    """One weight tensor a unit owns, named by its fully qualified name in the real model."""

    name: str
    """FQN in the source model, e.g. ``model.layers.0.self_attn.q_proj.weight``."""
    shape: tuple[int, ...]
    """Shape as the model stores it (``nn.Linear`` weights are ``(out_features, in_features)``)."""
    role: str
    """One of :data:`WEIGHT_ROLES`."""
    block: str | None = None
    """``"attn"`` or ``"mlp"`` for tensors inside a layer (where a block split may cut), else None."""
    tied_to: str | None = None
    """FQN of the tensor this one shares storage with (a tied LM head): counted once in params."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if any(d < 0 for d in self.shape):
            raise ConfigError(f"tensor {self.name}: negative dimension in shape {self.shape}")
        if self.role not in WEIGHT_ROLES:
            raise ConfigError(f"tensor {self.name}: unknown role {self.role!r}; use one of {WEIGHT_ROLES}")
        if self.block not in (None, "attn", "mlp"):
            raise ConfigError(f"tensor {self.name}: block must be 'attn', 'mlp' or None, got {self.block!r}")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _check_parts(owner: str, total: int, parts: tuple[tuple[str, int], ...]) -> None:
    if any(v < 0 for _, v in parts):
        raise ConfigError(f"{owner}: negative part in {parts}")
    if parts and sum(v for _, v in parts) != total:
        raise ConfigError(f"{owner}: parts sum to {sum(v for _, v in parts)} B, not {total} B")


@dataclass(frozen=True, slots=True, kw_only=True)
class Footprint:
    """Bytes a unit needs on the card that runs it: the seed's ``size(l_j)``, with its parts."""

    weight_bytes: int
    """Resident weights (and, after compression, their scales and metadata)."""
    activation_bytes: int
    """Peak of the activations live at once while the unit runs (persistent part included)."""
    buffer_bytes: int = 0
    """Workspace: masks, rotary tables, kernel scratch; shared by consecutive units on a card."""
    persistent_activation_bytes: int = 0
    """The part of ``activation_bytes`` that stays resident after the unit returns
    (KV cache in decode, tensors saved for backward in train)."""
    weight_roles: tuple[tuple[str, int], ...] = ()
    """Weight bytes by role (``("qkv", n), ("mlp", m), ...``); sums to ``weight_bytes`` when given."""
    activation_parts: tuple[tuple[str, int], ...] = ()
    """The tensors that make the activation peak, by name; sums to ``activation_bytes`` when given."""
    buffer_parts: tuple[tuple[str, int], ...] = ()
    """The buffers, by name; sums to ``buffer_bytes`` when given."""

    def __post_init__(self) -> None:
        for name in ("weight_bytes", "activation_bytes", "buffer_bytes", "persistent_activation_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"footprint.{name} must be a non-negative int of bytes, got {value!r}")
        if self.persistent_activation_bytes > self.activation_bytes:
            raise ConfigError(
                f"footprint: persistent activations ({self.persistent_activation_bytes} B) exceed "
                f"the activation peak ({self.activation_bytes} B)"
            )
        _check_parts("footprint.weight_roles", self.weight_bytes, self.weight_roles)
        _check_parts("footprint.activation_parts", self.activation_bytes, self.activation_parts)
        _check_parts("footprint.buffer_parts", self.buffer_bytes, self.buffer_parts)

    @property
    def total_bytes(self) -> int:
        """``weights + activations + buffers``: the unit's size when it runs alone."""
        return self.weight_bytes + self.activation_bytes + self.buffer_bytes

    @property
    def transient_activation_bytes(self) -> int:
        """Scratch the unit frees when it returns."""
        return self.activation_bytes - self.persistent_activation_bytes

    def to_dict(self) -> dict[str, int]:
        """The byte counts as the JSON documents spell them (plans, profiles, audits)."""
        return {
            "weight_bytes": self.weight_bytes,
            "activation_bytes": self.activation_bytes,
            "persistent_activation_bytes": self.persistent_activation_bytes,
            "buffer_bytes": self.buffer_bytes,
            "total_bytes": self.total_bytes,
        }

    @property
    def roles(self) -> dict[str, int]:
        """Weight bytes by role as a dict."""
        out: dict[str, int] = {}
        for role, nbytes in self.weight_roles:
            out[role] = out.get(role, 0) + nbytes
        return out


def stack_footprints(footprints: Iterable[Footprint], *, reuse: bool = True) -> Footprint:
    """Bytes a card needs to hold several units and run them one after another.

    With ``reuse`` (the default) weights and persistent activations add up, while a unit's transient
    activations and its buffers live only while it runs: the card's peak is reached while its most
    demanding unit runs, so it needs ``max_i(transient_i + buffers_i)`` on top of the resident bytes,
    not the sum. The stacked footprint reports that unit's transient part as activations and its
    buffers as buffers. ``reuse=False`` is the seed paper's plain sum of ``size(l_j)``.
    """
    fps = tuple(footprints)
    weights = sum(f.weight_bytes for f in fps)
    persistent = sum(f.persistent_activation_bytes for f in fps)
    roles: dict[str, int] = {}
    for f in fps:
        for role, nbytes in f.weight_roles:
            roles[role] = roles.get(role, 0) + nbytes
    if not fps:
        transient = buffers = 0
    elif reuse:
        peak = max(fps, key=lambda f: f.transient_activation_bytes + f.buffer_bytes)
        transient, buffers = peak.transient_activation_bytes, peak.buffer_bytes
    else:
        transient = sum(f.transient_activation_bytes for f in fps)
        buffers = sum(f.buffer_bytes for f in fps)
    return Footprint(
        weight_bytes=weights,
        activation_bytes=persistent + transient,
        buffer_bytes=buffers,
        persistent_activation_bytes=persistent,
        weight_roles=tuple(sorted(roles.items())) if all(f.weight_roles for f in fps) else (),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class SplitDim:
    """A dimension a unit may be split along across cards (tensor / expert parallel)."""

    name: str
    """``heads``, ``kv_heads``, ``mlp_columns``, ``experts``, ``vocab``, ``channels``."""
    size: int
    """How many slices exist along it (e.g. 32 heads)."""

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ConfigError(f"split dimension {self.name}: size must be >= 1, got {self.size}")


_NORMS: tuple[str, ...] = ("rms", "rms_fp32", "layer")
_POSITION_LOOKUPS: tuple[str, ...] = ("none", "broadcast", "batched")


@dataclass(frozen=True, slots=True, kw_only=True)
class ForwardSpec:
    """How a family's reference forward (its ``transformers`` modules) holds tensors, beyond the
    shapes: the facts that change the bytes live at once. The defaults describe a Llama-style decoder
    (``LlamaForCausalLM``); each family adapter states where its model differs.
    ``cachefit.profile.activations`` reads them (docs/activations.md)."""

    norm: str = "rms"
    """``rms``: an RMSNorm normalizing in fp32, weighted in the activation dtype (``LlamaRMSNorm``);
    ``rms_fp32``: one computed in fp32 to the end, weight included (``GemmaRMSNorm``:
    ``(x * (1 + weight.float())).type_as(x)``); ``layer``: ``nn.LayerNorm``."""
    softmax_fp32: bool = True
    """Eager attention's softmax runs in fp32: ``softmax(scores, dtype=torch.float32).to(dtype)``
    (Llama and most families); False where it runs in the activation dtype (GPT-2, BERT)."""
    fused_qkv: bool = False
    """Queries, keys and values are views of one projection's output (``c_attn``, ``query_key_value``,
    ``qkv_proj``), which stays alive until the attention returns."""
    qk_norm: bool = False
    """An RMSNorm over every query and key head before rotary (Qwen3's ``q_norm`` / ``k_norm``)."""
    fused_gate_up: bool = False
    """Gate and up projections are one matrix (Phi-3's ``gate_up_proj``) whose output stays alive
    through the MLP."""
    activation_temporaries: int = 0
    """MLP-width tensors the MLP activation holds besides its input and output (GPT-2's Python
    ``gelu_new``: 2)."""
    position_lookup: str = "none"
    """Learned positions: ``none`` (rotary or none), ``broadcast`` (a ``1 x T x h`` lookup added to
    every sequence: GPT-2, BERT), ``batched`` (``B x T x h`` from per-sequence positions: OPT)."""
    embed_proj_dim: int = 0
    """Width of the token lookup where a linear maps it to the hidden size before the layers (OPT's
    ``project_in`` when ``word_embed_proj_dim != hidden_size``; 0: none, the lookup is ``hidden_size``
    wide)."""
    embedding_norm: bool = False
    """A norm closes the embedding (BERT's ``embeddings.LayerNorm``)."""
    embedding_scale: bool = False
    """The token lookup is scaled out of place (Gemma's ``embed_tokens * sqrt(h)``)."""
    post_norm: bool = False
    """Norms follow each residual add (BERT): none before the attention, the MLP or the head."""
    attention_masks: int = 1
    """Eager attention masks the model's forward builds and holds (Gemma 2: one for its full and one for
    its sliding-window layers)."""
    sdpa_mask: bool = False
    """SDPA always gets a materialized boolean mask, even where ``is_causal`` would do (Falcon:
    ``allow_is_causal_skip=False``), so grouped keys and values are repeated for it in prefill."""
    caller_holds_probs: bool = False
    """The model's forward holds each layer's returned attention probabilities through the next layer
    (Falcon: ``outputs = block(...)``)."""
    layer_holds_attn_norm: bool = False
    """The layer keeps its attention norm's output in a local of its own name through the MLP (Falcon:
    ``attention_layernorm_out``, never rebound), where Llama-style layers rebind ``hidden_states``."""
    logit_softcap: bool = False
    """The logits are soft-capped out of place (Gemma 2's ``final_logit_softcapping``)."""

    def __post_init__(self) -> None:
        if self.norm not in _NORMS:
            raise ConfigError(f"forward spec: norm must be one of {', '.join(_NORMS)}, got {self.norm!r}")
        if self.position_lookup not in _POSITION_LOOKUPS:
            raise ConfigError(
                f"forward spec: position_lookup must be one of {', '.join(_POSITION_LOOKUPS)}, "
                f"got {self.position_lookup!r}"
            )
        for name, least in (("activation_temporaries", 0), ("attention_masks", 1), ("embed_proj_dim", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"forward spec: {name} must be an int >= {least}, got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerShape:
    """The dimensions of a transformer unit, enough to recompute its activations and FLOPs
    under another workload (a smaller batch, flash attention, checkpointing)."""

    part: str
    """What the unit computes: ``embedding``, ``layer`` (attention + MLP), ``attention``, ``mlp``, ``head``."""
    hidden_size: int
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    intermediate_size: int = 0
    """MLP intermediate width (per expert for MoE)."""
    gated_mlp: bool = False
    """SwiGLU-style gate and up projections (three matrices) instead of up / down (two)."""
    num_experts: int = 0
    """0 for a dense MLP; every expert is resident."""
    experts_per_token: int = 0
    """Experts each token is routed to (FLOPs count only these)."""
    parallel_attn_mlp: bool = False
    """Attention and MLP read the same input and their outputs are summed (GPT-J / Falcon style)."""
    causal: bool = True
    """Causal (decoder) attention; encoders attend both ways and need a padding mask."""
    rotary_dim: int = 0
    """Dimensions per head under rotary embedding (0: none)."""
    sliding_window: int | None = None
    """Attention window (KV-cache length cap) where the model has one."""
    vocab_size: int = 0
    """Vocabulary (embedding and head units)."""
    embedding_tables: int = 1
    """Embedding unit: lookup tables summed into its output (token, learned position, token type)."""
    forward: ForwardSpec = ForwardSpec()
    """How the family's reference forward holds tensors (the same for every unit of a model)."""
    first_layer: bool = False
    """The model's first layer (or a block of it): its input is the embedding output itself, and no
    earlier layer's outputs are held beside it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Unit:
    """One schedulable block, in execution order."""

    name: str
    """Short unique name, e.g. ``embed``, ``layers.7``, ``layers.7.attn``, ``head``."""
    kind: str
    """``embedding``, ``layer``, ``attention``, ``mlp``, ``head``, or a module class name for live profiles."""
    footprint: Footprint
    params: int
    """Parameters it owns, each tied tensor counted once in the whole model (as ``model.parameters()``)."""
    flops_per_token: int
    """Forward FLOPs per token at this workload (2 per multiply-accumulate; attention over the context)."""
    tensors: tuple[TensorSpec, ...] = ()
    """The weight tensors it owns (FQNs in the real model), so deploy can map it to modules."""
    split_dims: tuple[SplitDim, ...] = ()
    """Dimensions it may be split along across cards."""
    shape: LayerShape | None = None
    """Transformer dimensions, where known (None for live-module profiles)."""
    layer: int | None = None
    """Index of the transformer layer it belongs to, if any."""
    compression: tuple[str, ...] = ()
    """Names of the compression techniques applied to it, in order (empty: as profiled)."""

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("unit: name must not be empty")
        if self.params < 0 or self.flops_per_token < 0:
            raise ConfigError(f"unit {self.name}: params and flops must be >= 0")

    @property
    def total_bytes(self) -> int:
        return self.footprint.total_bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelProfile:
    """A model as an ordered tuple of units, for one workload."""

    model: str
    """Name of the model (preset name, config path, or module class)."""
    workload: Workload
    units: tuple[Unit, ...]
    granularity: str = "layer"
    """``layer`` or ``block`` (attention and MLP blocks as separate units)."""
    source: str = ""
    """Where the model description came from (a URL, a file path, ``nn.Module``)."""

    def __post_init__(self) -> None:
        if not self.units:
            raise ConfigError(f"profile of {self.model}: no units")
        names = [u.name for u in self.units]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ConfigError(f"profile of {self.model}: duplicate unit names {dup}")

    @property
    def params(self) -> int:
        return sum(u.params for u in self.units)

    @property
    def sizes(self) -> tuple[int, ...]:
        """``size(l_j)`` of every unit, in order."""
        return tuple(u.total_bytes for u in self.units)

    def totals(self) -> dict[str, int]:
        """Sums over units (a tied tensor's bytes count in each unit that reads it; params once)."""
        return {
            "params": self.params,
            "weight_bytes": sum(u.footprint.weight_bytes for u in self.units),
            "activation_bytes": sum(u.footprint.activation_bytes for u in self.units),
            "buffer_bytes": sum(u.footprint.buffer_bytes for u in self.units),
            "total_bytes": sum(u.total_bytes for u in self.units),
        }

    def digest(self) -> str:
        """SHA-256 of everything a plan depends on: units, their tensors, bytes and FLOPs, the workload.

        Two profiles with the same digest plan identically; a changed model (a layer, a shape, a
        dtype) changes it. The model's name and source are left out: the same model loaded from a
        preset or from its config.json gives the same digest.
        """
        canonical = {
            "granularity": self.granularity,
            "workload": self.workload.to_dict(),
            "units": [
                [u.name, u.kind, u.params, u.flops_per_token, list(u.compression),
                 [u.footprint.weight_bytes, u.footprint.activation_bytes, u.footprint.buffer_bytes,
                  u.footprint.persistent_activation_bytes],
                 [[t.name, list(t.shape), t.role, t.tied_to] for t in u.tensors]]
                for u in self.units
            ],
        }
        text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def unit(self, name: str) -> Unit:
        for u in self.units:
            if u.name == name:
                return u
        raise ConfigError(f"profile of {self.model}: no unit named {name!r}")


COLLECTIVE_BUFFER_PARTS: frozenset[str] = frozenset({"gathered_logits", "all_reduce_copy"})
"""Buffer parts a tensor-parallel shard holds for its collectives (:mod:`cachefit.partition.split`),
not derived from its shape: a re-estimate of a shard's activations (compression) carries them over."""


__all__ = [
    "COLLECTIVE_BUFFER_PARTS",
    "DTYPE_BITS",
    "WEIGHT_ROLES",
    "Attention",
    "Footprint",
    "ForwardSpec",
    "KVCache",
    "LayerShape",
    "Mode",
    "ModelProfile",
    "SplitDim",
    "TensorSpec",
    "Unit",
    "Workload",
    "dtype_bytes",
    "torch_dtype",
    "normalize_dtype",
    "stack_footprints",
]
