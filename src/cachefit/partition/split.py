"""Intra-layer splits: one unit's tensors sharded over ``s`` cards (tensor / vocabulary parallel).

A shard is itself a :class:`~cachefit.units.Unit`: the same tensor names with the split axis cut
(Megatron-LM's scheme, Shoeybi et al. 2019, sec. 3: Q/K/V and MLP up/gate column-parallel, attention
output and MLP down row-parallel, embedding and LM head split along the vocabulary), with the parts
that cannot be split replicated on every shard (norms, output biases, the residual stream, KV heads
when there are fewer than shards). Because a shard is a unit, compression applies to it unchanged and
its bytes are counted from its tensors like any other unit's.

Splits may be uneven: with 32 heads over 3 cards the largest shard has 11 heads; every figure of
:func:`shard_unit` is the **largest** shard's, the one that must fit. Over cards of different sizes a
split is proportional instead (:mod:`cachefit.partition.apportion`): :func:`shard_unit_parts` gives
the shard holding exactly the slices a :class:`ShardParts` names (a range of query heads with the KV
heads they read, of MLP columns, of vocabulary rows), each card its own.

Collectives per token (forward): a row-parallel layer ends in an all-reduce of the hidden state
(``hidden x act bytes``): one after attention, one after the MLP; a vocabulary-parallel embedding ends
in an all-reduce of its output; a vocabulary-parallel head all-gathers its logits
(``vocab x act bytes``). A ring all-reduce moves ``2 (s-1)/s`` times the tensor per card, an all-gather
``(s-1)/s`` (Patarasuk and Yuan 2009; NCCL's performance notes use the same factors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase

from cachefit.profile.activations import estimate_activations, estimate_flops_per_token
from cachefit.errors import ConfigError
from cachefit.families import transposed_weight_patterns
from cachefit.units import Footprint, LayerShape, TensorSpec, Unit, Workload, dtype_bytes

# Matrices stored (in, out) instead of nn.Linear's (out, in): the registry's transposed weights
# (``FamilySpec.transposed_weights``: GPT-2's Conv1D).
_TRANSPOSED = transposed_weight_patterns()
_KV_NAMES = ("k_proj", "v_proj", ".key.", ".value.", "k_lin", "v_lin")
_Q_NAMES = ("q_proj", ".query.", "q_lin")


@dataclass(frozen=True, slots=True, kw_only=True)
class Shard:
    """The largest of ``count`` shards of a unit, and what the split costs in traffic."""

    unit: Unit
    """The largest shard as a unit (same tensor names, split shapes)."""
    count: int
    collective_bytes_per_token: int
    """Bytes each card sends per token in the shard's collectives (forward)."""
    collectives: tuple[str, ...]
    """What they are, e.g. ``all-reduce hidden after attention``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardParts:
    """The slices of one unit a card holds in a proportional split: half-open ``(start, end)`` ranges,
    None where the unit has no such dimension."""

    heads: tuple[int, int] | None = None
    """Query heads (attention and whole layers)."""
    kv_heads: tuple[int, int] | None = None
    """KV heads those query heads read (grouped-query attention: every group they touch, a copy of a
    KV head shared with the neighbouring card)."""
    mlp_columns: tuple[int, int] | None = None
    """MLP intermediate columns (up / gate rows, down columns; per expert for MoE)."""
    vocab: tuple[int, int] | None = None
    """Vocabulary rows (embedding and LM head)."""

    def __post_init__(self) -> None:
        for name in ("heads", "kv_heads", "mlp_columns", "vocab"):
            got = getattr(self, name)
            if got is not None and not (len(got) == 2 and 0 <= got[0] < got[1]):
                raise ConfigError(f"shard parts: {name} must be a non-empty range [start, end), got {got!r}")

    def count(self, name: str) -> int:
        """How many slices of dimension ``name`` the shard holds (0: none)."""
        got = getattr(self, name)
        return 0 if got is None else got[1] - got[0]

    def to_dict(self) -> dict[str, list[int]]:
        return {name: [got[0], got[1]] for name in ("heads", "kv_heads", "mlp_columns", "vocab")
                if (got := getattr(self, name)) is not None}

    @classmethod
    def from_dict(cls, data: object, *, where: str = "shard parts") -> ShardParts:
        known = ("heads", "kv_heads", "mlp_columns", "vocab")
        if not isinstance(data, dict) or any(k not in known for k in data):
            raise ConfigError(f"{where}: expected an object with ranges among {', '.join(known)}, got {data!r}")
        try:
            return cls(**{k: (int(v[0]), int(v[1])) for k, v in data.items()})
        except (TypeError, ValueError, IndexError, KeyError):
            raise ConfigError(f"{where}: every range must be [start, end) of integers, got {data!r}") from None


def _ceil_frac(size: int, shards: int) -> tuple[int, int]:
    """(largest slice, whole) of a dimension of ``size`` split over ``shards``."""
    return -(-size // shards), size


def _split_axis(t: TensorSpec, shape: LayerShape) -> int | None:
    """Axis of ``t`` a split cuts, or None if the tensor is replicated."""
    dims = t.shape
    transposed = any(fnmatchcase(t.name, pat) for pat in _TRANSPOSED)
    if t.role in ("norm", "router", "pos_embed", "other", "conv", "scales", "metadata"):
        return None
    if t.role in ("embed", "head"):
        if len(dims) == 2 and shape.vocab_size and shape.vocab_size in dims:
            return dims.index(shape.vocab_size)
        return None  # a head's norm or pooler bias etc. stays whole
    if len(dims) == 1:
        # biases: those of column-parallel projections are split, output biases (hidden) are not
        return None if dims[0] == shape.hidden_size and t.role in ("attn_out", "mlp", "experts") else 0
    if t.role == "qkv":
        return (1 if transposed else 0) if len(dims) == 2 else None
    if t.role == "attn_out":
        return (0 if transposed else 1) if len(dims) == 2 else None
    if t.role in ("mlp", "experts"):
        f = shape.intermediate_size
        axes = [i for i, d in enumerate(dims) if i >= len(dims) - 2 and f and d % f == 0 and d != shape.hidden_size]
        if not axes:
            axes = [i for i, d in enumerate(dims) if i >= len(dims) - 2 and f and d % f == 0]
        return axes[0] if axes else None
    return None


def _heads_per_shard(shape: LayerShape, shards: int) -> tuple[int, int]:
    """(query heads, KV heads) on the largest shard.

    Query heads travel with their KV head (grouped-query attention): with no more shards than KV
    heads a shard takes ceil(g / s) whole groups; with more, each shard keeps (a copy of) one KV head
    and ceil(a / s) of its query heads.
    """
    a, g = shape.num_heads, shape.num_kv_heads
    if shards <= g:
        groups = -(-g // shards)
        return groups * (a // g), groups
    return -(-a // shards), 1


def _qkv_fraction(t: TensorSpec, shape: LayerShape, shards: int) -> tuple[int, int]:
    a, g = shape.num_heads, shape.num_kv_heads
    qa, qg = _heads_per_shard(shape, shards)
    if any(k in t.name for k in _KV_NAMES):
        return qg, g
    if any(k in t.name for k in _Q_NAMES):
        return qa, a
    return qa + 2 * qg, a + 2 * g  # fused q, k, v


def _shard_tensor(t: TensorSpec, shape: LayerShape, shards: int) -> TensorSpec:
    axis = _split_axis(t, shape)
    if axis is None or shards == 1:
        return t
    if t.role == "qkv" and shape.num_heads:
        part, whole = _qkv_fraction(t, shape, shards)
    elif t.role in ("attn_out",) and shape.num_heads:
        part, whole = _heads_per_shard(shape, shards)[0], shape.num_heads
    elif t.role in ("embed", "head"):
        part, whole = _ceil_frac(shape.vocab_size, shards)
    else:
        part, whole = _ceil_frac(shape.intermediate_size, shards)
    dims = list(t.shape)
    dims[axis] = -(-dims[axis] * part // whole)
    return replace(t, shape=tuple(dims))


def _shard_shape(shape: LayerShape, shards: int) -> LayerShape:
    heads, kv_heads = _heads_per_shard(shape, shards) if shape.num_heads else (0, 0)
    return replace(
        shape,
        num_heads=heads,
        num_kv_heads=kv_heads,
        intermediate_size=-(-shape.intermediate_size // shards) if shape.intermediate_size else 0,
        vocab_size=-(-shape.vocab_size // shards) if shape.vocab_size else 0,
    )


def max_shards(unit: Unit) -> int:
    """How many shards a unit can be split into at most (1: not splittable)."""
    sizes = [d.size for d in unit.split_dims if d.name in ("heads", "mlp_columns", "vocab", "experts")]
    return max(sizes, default=1) if unit.shape is not None else 1


def _collectives(unit: Unit, shape: LayerShape, shards: int, workload: Workload) -> tuple[int, tuple[str, ...]]:
    if shards == 1:
        return 0, ()
    e = dtype_bytes(workload.act_dtype, 1)
    ring = 2 * (shards - 1) / shards
    gather = (shards - 1) / shards
    h = shape.hidden_size
    items: list[tuple[str, float]] = []
    if shape.part in ("layer", "attention"):
        items.append(("all-reduce hidden after attention", ring * h * e))
    if shape.part in ("layer", "mlp") and not (shape.part == "layer" and shape.parallel_attn_mlp):
        items.append(("all-reduce hidden after the MLP", ring * h * e))
    if shape.part == "embedding":
        items.append(("all-reduce embedding output", ring * h * e))
    if shape.part == "head":
        items.append(("all-gather logits", gather * shape.vocab_size * e))
    return int(math.ceil(sum(v for _, v in items))), tuple(name for name, _ in items)


def split_dimensions(unit: Unit) -> dict[str, int]:
    """The dimensions a proportional split of ``unit`` cuts, with their sizes (empty: not splittable):
    ``heads`` (query heads) for attention, ``mlp_columns`` for the MLP, ``vocab`` for the embedding
    and the head."""
    shape = unit.shape
    if shape is None:
        return {}
    dims: dict[str, int] = {}
    if shape.part in ("layer", "attention") and shape.num_heads:
        dims["heads"] = shape.num_heads
    if shape.part in ("layer", "mlp") and shape.intermediate_size:
        dims["mlp_columns"] = shape.intermediate_size
    if shape.part in ("embedding", "head") and shape.vocab_size:
        dims["vocab"] = shape.vocab_size
    return dims


def kv_heads_read(shape: LayerShape, heads: tuple[int, int]) -> tuple[int, int]:
    """The KV heads query heads ``[start, end)`` read (grouped-query attention: head h reads KV head
    ``h // (heads / kv_heads)``)."""
    per = max(1, shape.num_heads // max(1, shape.num_kv_heads))
    return heads[0] // per, (heads[1] - 1) // per + 1


def shard_unit_parts(unit: Unit, parts: ShardParts, shards: int, workload: Workload) -> Shard:
    """The shard of ``unit`` (uncompressed) that holds exactly ``parts``, one of ``shards``.

    Tensors are cut as :func:`shard_unit` cuts them, by the shard's own counts instead of the
    largest shard's; replicated tensors stay whole; activations and FLOPs are those of the shard's
    shape. Collectives are those of a ``shards``-way split.

    Raises:
        ConfigError: the unit cannot be split (no transformer shape, compressed), or ``parts`` misses
            a dimension the unit is split along or goes beyond its size.
    """
    if unit.shape is None:
        raise ConfigError(f"unit {unit.name}: has no transformer shape, so cachefit cannot split it across cards")
    if unit.compression:
        raise ConfigError(f"unit {unit.name}: is compressed; split the profiled unit first, then compress each shard")
    dims = split_dimensions(unit)
    for name, size in dims.items():
        got = getattr(parts, name)
        if got is None or got[1] > size:
            raise ConfigError(f"unit {unit.name}: shard parts need {name} within [0, {size}), got {got!r}")
    shape = unit.shape
    heads = parts.count("heads") if "heads" in dims else shape.num_heads
    if "heads" in dims:
        kv = kv_heads_read(shape, parts.heads)  # type: ignore[arg-type]
        kv_count = kv[1] - kv[0]
    else:
        kv_count = shape.num_kv_heads
    cols = parts.count("mlp_columns") if "mlp_columns" in dims else shape.intermediate_size
    rows = parts.count("vocab") if "vocab" in dims else shape.vocab_size
    tensors = []
    for t in unit.tensors:
        axis = _split_axis(t, shape)
        if axis is None:
            tensors.append(t)
            continue
        if t.role == "qkv" and shape.num_heads:
            if any(k in t.name for k in _KV_NAMES):
                part, whole = kv_count, shape.num_kv_heads
            elif any(k in t.name for k in _Q_NAMES):
                part, whole = heads, shape.num_heads
            else:
                part, whole = heads + 2 * kv_count, shape.num_heads + 2 * shape.num_kv_heads
        elif t.role == "attn_out" and shape.num_heads:
            part, whole = heads, shape.num_heads
        elif t.role in ("embed", "head"):
            part, whole = rows, shape.vocab_size
        else:
            part, whole = cols, shape.intermediate_size
        if not whole:
            tensors.append(t)
            continue
        dims_t = list(t.shape)
        dims_t[axis] = -(-dims_t[axis] * part // whole)
        tensors.append(replace(t, shape=tuple(dims_t)))
    new_shape = replace(shape, num_heads=heads if shape.num_heads else 0,
                        num_kv_heads=kv_count if shape.num_heads else shape.num_kv_heads,
                        intermediate_size=cols, vocab_size=rows)
    return _as_shard(unit, new_shape, tuple(tensors), shards, workload)


def _as_shard(unit: Unit, shape: LayerShape, tensors: tuple[TensorSpec, ...], shards: int,
              workload: Workload) -> Shard:
    """A unit's shard from its cut shape and tensors: bytes, activations and FLOPs recomputed."""
    wdt = workload.weight_dtype
    roles: dict[str, int] = {}
    for t in tensors:
        roles[t.role] = roles.get(t.role, 0) + dtype_bytes(wdt, t.numel)
    act = estimate_activations(shape, workload)
    buffer_parts = act.buffer_parts
    assert unit.shape is not None
    if shards > 1 and shape.part == "head" and unit.shape.vocab_size and shape.vocab_size != unit.shape.vocab_size:
        # a vocabulary-parallel head all-gathers its logits: every card then holds the gathered parts
        # (shards x the largest slice) and their concatenation, beside its own slice (measured on the
        # deployed stages: without this a split head's card held 2-3 % more than planned)
        # (a proportional split's card gathers the whole vocabulary beside its own rows: at most twice the
        # larger of the two)
        rows = max(unit.shape.vocab_size, shards * shape.vocab_size)
        gathered = dtype_bytes(workload.act_dtype, workload.tokens * rows)
        buffer_parts = (*buffer_parts, ("gathered_logits", 2 * gathered))
    if shards > 1 and shape.part in ("layer", "attention", "mlp", "embedding") and shape.hidden_size:
        # a row-parallel output (or a vocabulary-parallel embedding's) is summed by an all-reduce that
        # works on its own copy of the hidden state, held until the collective completes (measured on the
        # deployed stages: one hidden state more than the unsplit unit's peak, at times)
        copy = dtype_bytes(workload.act_dtype, workload.tokens * shape.hidden_size)
        buffer_parts = (*buffer_parts, ("all_reduce_copy", copy))
    footprint = Footprint(
        weight_bytes=sum(roles.values()),
        activation_bytes=act.activation_bytes,
        buffer_bytes=sum(v for _, v in buffer_parts),
        persistent_activation_bytes=act.persistent_bytes,
        weight_roles=tuple(sorted(roles.items())),
        activation_parts=act.parts,
        buffer_parts=buffer_parts,
    )
    params = sum(t.numel for t in tensors if t.tied_to is None)
    flops = estimate_flops_per_token(shape, workload)
    shard = replace(unit, footprint=footprint, params=params, flops_per_token=flops, tensors=tensors, shape=shape)
    assert unit.shape is not None
    traffic, names = _collectives(unit, unit.shape, shards, workload)
    return Shard(unit=shard, count=shards, collective_bytes_per_token=traffic, collectives=names)


def shard_unit(unit: Unit, shards: int, workload: Workload) -> Shard:
    """The largest of ``shards`` tensor-parallel shards of ``unit`` (uncompressed).

    Raises:
        ConfigError: the unit has no transformer shape (live-module profile) or ``shards`` exceeds
            what its split dimensions allow.
    """
    if shards < 1:
        raise ConfigError(f"unit {unit.name}: shards must be >= 1, got {shards}")
    if shards == 1:
        return Shard(unit=unit, count=1, collective_bytes_per_token=0, collectives=())
    if unit.shape is None:
        raise ConfigError(f"unit {unit.name}: has no transformer shape, so cachefit cannot split it across cards")
    if unit.compression:
        raise ConfigError(
            f"unit {unit.name}: is compressed ({', '.join(unit.compression)}); split the profiled unit first, "
            "then compress each shard"
        )
    limit = max_shards(unit)
    if shards > limit:
        raise ConfigError(
            f"unit {unit.name}: cannot be split over {shards} cards; its split dimensions allow at most {limit}"
        )
    shape = _shard_shape(unit.shape, shards)
    tensors = tuple(_shard_tensor(t, unit.shape, shards) for t in unit.tensors)
    return _as_shard(unit, shape, tensors, shards, workload)
