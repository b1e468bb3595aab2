"""Analytic profile of a transformer: ``TransformerSpec`` + ``Workload`` -> units in execution order.

Weights come from the spec's real tensors (bytes = numel x weight dtype, per tensor); activations,
buffers and FLOPs from :mod:`cachefit.profile.activations`, a pure function of each unit's shape. A tied LM
head counts its bytes in the head unit too (the card that runs the head needs the matrix), but its
parameters only once (as ``model.parameters()`` does).
"""

from __future__ import annotations

from collections.abc import Iterable

from cachefit.profile.activations import estimate_activations, estimate_flops_per_token
from cachefit.errors import ConfigError, ProfileError
from cachefit.profile.spec import TransformerSpec
from cachefit.units import (
    WEIGHT_ROLES,
    Footprint,
    LayerShape,
    ModelProfile,
    SplitDim,
    TensorSpec,
    Unit,
    Workload,
    dtype_bytes,
)

GRANULARITIES: tuple[str, ...] = ("layer", "block")


def _weight_roles(tensors: Iterable[TensorSpec], weight_dtype: str) -> tuple[tuple[str, int], ...]:
    """Weight bytes by role, in :data:`WEIGHT_ROLES` order (int4 rounds up per tensor)."""
    by_role: dict[str, int] = {}
    for t in tensors:
        by_role[t.role] = by_role.get(t.role, 0) + dtype_bytes(weight_dtype, t.numel)
    return tuple((role, by_role[role]) for role in WEIGHT_ROLES if role in by_role)


def _shape(
    spec: TransformerSpec, part: str, *, vocab_size: int = 0, embedding_tables: int = 1, first_layer: bool = False
) -> LayerShape:
    return LayerShape(
        part=part,
        hidden_size=spec.hidden_size,
        num_heads=spec.num_heads,
        num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        intermediate_size=spec.intermediate_size,
        gated_mlp=spec.gated_mlp,
        num_experts=spec.num_experts,
        experts_per_token=spec.experts_per_token,
        parallel_attn_mlp=spec.parallel_attn_mlp,
        causal=spec.causal,
        rotary_dim=spec.rotary_dim,
        sliding_window=spec.sliding_window,
        vocab_size=vocab_size,
        embedding_tables=embedding_tables,
        forward=spec.forward,
        first_layer=first_layer,
    )


def _split_dims(spec: TransformerSpec, part: str, vocab_size: int) -> tuple[SplitDim, ...]:
    dims: list[SplitDim] = []
    if part in ("layer", "attention"):
        dims += [SplitDim(name="heads", size=spec.num_heads), SplitDim(name="kv_heads", size=spec.num_kv_heads)]
    if part in ("layer", "mlp"):
        dims.append(SplitDim(name="mlp_columns", size=spec.intermediate_size))
        if spec.num_experts:
            dims.append(SplitDim(name="experts", size=spec.num_experts))
    if part in ("embedding", "head") and vocab_size:
        dims.append(SplitDim(name="vocab", size=vocab_size))
    return tuple(dims)


def _unit(
    spec: TransformerSpec,
    workload: Workload,
    *,
    name: str,
    kind: str,
    part: str,
    tensors: tuple[TensorSpec, ...],
    layer: int | None = None,
    vocab_size: int = 0,
    embedding_tables: int = 1,
) -> Unit:
    shape = _shape(spec, part, vocab_size=vocab_size, embedding_tables=embedding_tables, first_layer=layer == 0)
    estimate = estimate_activations(shape, workload)
    roles = _weight_roles(tensors, workload.weight_dtype)
    footprint = Footprint(
        weight_bytes=sum(nbytes for _, nbytes in roles),
        activation_bytes=estimate.activation_bytes,
        buffer_bytes=estimate.buffer_bytes,
        persistent_activation_bytes=estimate.persistent_bytes,
        weight_roles=roles,
        activation_parts=estimate.parts,
        buffer_parts=estimate.buffer_parts,
    )
    return Unit(
        name=name,
        kind=kind,
        footprint=footprint,
        params=sum(t.numel for t in tensors if t.tied_to is None),
        flops_per_token=estimate_flops_per_token(shape, workload),
        tensors=tensors,
        split_dims=_split_dims(spec, part, vocab_size),
        shape=shape,
        layer=layer,
    )


def _head_vocab(spec: TransformerSpec) -> int:
    """The vocabulary the head projects to: spec.vocab_size if a head matrix has it, else 0 (pooler / none)."""
    if not spec.vocab_size:
        return 0
    for t in spec.head_tensors:
        if t.role == "head" and len(t.shape) == 2 and spec.vocab_size in t.shape:
            return spec.vocab_size
    return 0


def _embedding_tables(spec: TransformerSpec) -> int:
    """Lookup tables summed into the embedding output: the token table plus learned position /
    token-type tables (2-D ``pos_embed`` tensors)."""
    return 1 + sum(1 for t in spec.embedding_tensors if t.role == "pos_embed" and len(t.shape) == 2)


def build_units(spec: TransformerSpec, workload: Workload, *, granularity: str = "layer") -> tuple[Unit, ...]:
    """Units of ``spec`` in execution order: ``embed``, ``layers.{i}`` (or ``layers.{i}.attn`` and
    ``layers.{i}.mlp`` with granularity ``block``), ``head``.

    Raises:
        ConfigError: unknown granularity.
        ProfileError: the spec lacks per-layer tensors, or a layer tensor has no block.
    """
    if granularity not in GRANULARITIES:
        raise ConfigError(
            f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}; "
            "use 'layer' for whole decoder layers or 'block' for attention and MLP blocks as separate units"
        )
    if not spec.layer_tensors:
        raise ProfileError(
            f"{spec.name}: the spec lists no per-layer tensors, so weights cannot be sized; "
            "build it with cachefit.profile.hf_config.load_transformer_spec or a preset"
        )
    units: list[Unit] = []
    if spec.embedding_tensors or spec.vocab_size:
        embed = _unit(
            spec,
            workload,
            name="embed",
            kind="embedding",
            part="embedding",
            tensors=spec.embedding_tensors,
            vocab_size=spec.vocab_size,
            embedding_tables=_embedding_tables(spec),
        )
        units.append(embed)
    for i, tensors in enumerate(spec.layer_tensors):
        if granularity == "layer":
            units.append(
                _unit(spec, workload, name=f"layers.{i}", kind="layer", part="layer", tensors=tensors, layer=i)
            )
            continue
        loose = [t.name for t in tensors if t.block not in ("attn", "mlp")]
        if loose:
            raise ProfileError(
                f"{spec.name}: layer {i} tensors {loose} have no block ('attn' or 'mlp'), so the layer "
                "cannot be split into blocks; set TensorSpec.block or profile with granularity 'layer'"
            )
        attn = tuple(t for t in tensors if t.block == "attn")
        mlp = tuple(t for t in tensors if t.block == "mlp")
        units.append(
            _unit(spec, workload, name=f"layers.{i}.attn", kind="attention", part="attention", tensors=attn, layer=i)
        )
        units.append(_unit(spec, workload, name=f"layers.{i}.mlp", kind="mlp", part="mlp", tensors=mlp, layer=i))
    if spec.head_tensors or spec.vocab_size:
        # Without head tensors (a headless spec with a vocabulary) the head is sized as an LM head.
        head_vocab = _head_vocab(spec) if spec.head_tensors else spec.vocab_size
        head = _unit(
            spec, workload, name="head", kind="head", part="head", tensors=spec.head_tensors, vocab_size=head_vocab
        )
        units.append(head)
    return tuple(units)


def profile_transformer(spec: TransformerSpec, workload: Workload, *, granularity: str = "layer") -> ModelProfile:
    """Profile ``spec`` under ``workload``: its units with weights, activations, buffers and FLOPs."""
    return ModelProfile(
        model=spec.name,
        workload=workload,
        units=build_units(spec, workload, granularity=granularity),
        granularity=granularity,
        source=spec.source,
    )


__all__ = ["GRANULARITIES", "build_units", "profile_transformer"]
