"""Stages from a plan: which processes run which units, and the real modules they own.

A :class:`~cachefit.plan.Plan` names units (``embed``, ``layers.3``, ``layers.3.attn``,
``layers.3.mlp``, ``head``). :func:`layout_from_plan` re-profiles the checkpoint's ``config.json``
at the plan's workload and granularity, which gives every unit's tensors by their ``transformers``
FQNs, and refuses, before any process starts, a plan that does not match the model: other unit
names, tensors missing from the checkpoint or of another shape, or a stage whose planned weight bytes
differ from the bytes recomputed from the model (split and compressed as the plan says).

:func:`build_stage` then turns one stage into a module, as torchtitan's pipeline split does: the
``transformers`` model is built on the meta device, everything the stage does not own is pruned, and
only the stage's tensors are read from the checkpoint. The stage's forward is written out per stage
adapter (:data:`STAGE_ADAPTERS`: rotary decoders such as Llama, GPT-2, BERT encoders; a family's
:class:`~cachefit.families.FamilySpec` names its adapter), down to the attention block and the MLP
block of a layer when the plan cuts inside one, with the side inputs (padding mask, position ids,
rotary tables) rebuilt on every stage from the 2-D attention mask that travels with the hidden states.

A unit split over several cards (``Stage.shard``) is run tensor-parallel (Megatron-LM's scheme,
Shoeybi et al. 2019, sec. 3; :mod:`cachefit.deploy.tensor_parallel`): q/k/v and MLP in column-parallel,
attention output and MLP out row-parallel, the embedding and the LM head split along the vocabulary,
with the modules each family names in its :class:`~cachefit.families.TensorParallelSpec`. Any card
count runs, even where it does not divide the heads: an even split follows the planner's balanced
sizes, a proportional split (cards of different sizes) the ranges each plan stage records in its
``shard_parts``, each card checked against its own planned bytes.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from torch import nn

from cachefit.errors import ConfigError, DeployError
from cachefit.families import FAMILIES, FamilySpec, get_family
from cachefit.partition.split import ShardParts
from cachefit.plan import Plan
from cachefit.sizes import format_bytes
from cachefit.units import ModelProfile, Unit, Workload, dtype_bytes, stack_footprints

if TYPE_CHECKING:
    from cachefit.deploy.models import ModelSource

logger = logging.getLogger(__name__)

_BLOCK_SUFFIXES = (".attn", ".mlp")

LayoutKind = Literal["transformer", "sequential"]
"""``transformer``: a Hugging Face checkpoint; ``sequential``: an ``nn.Sequential``'s children."""
Granularity = Literal["layer", "block"]
"""Units are whole layers, or attention and MLP blocks (``layers.3.attn``, ``layers.3.mlp``)."""
Stacking = Literal["reuse", "sum"]
"""How the plan stacks a stage's activation bytes (see :func:`cachefit.units.stack_footprints`)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StagePlacement:
    """One pipeline stage: a contiguous run of units on one card or on a tensor-parallel group."""
    stage_idx: int
    """Position in the pipeline (0 runs the embedding)."""
    ranks: tuple[int, ...]
    """Global ranks (= plan card indices) running it; several when the stage is split."""
    units: tuple[int, int]
    """``(start, end_exclusive)`` into the profile's units."""
    unit_names: tuple[str, ...]
    unit_tensors: tuple[tuple[str, ...], ...] = ()
    """Per unit, the FQNs of the tensors it owns (empty for live-module plans: children by name)."""
    tied: tuple[tuple[str, str], ...] = ()
    """``(fqn, tied_to)`` of tensors tied to another (a tied LM head reads the embedding)."""
    unit_compression: tuple[tuple[str, ...], ...] = ()
    """Per unit, the compression techniques the plan applies to it (empty: none)."""
    tensor_roles: tuple[tuple[str, str], ...] = ()
    """``(fqn, role)`` of the stage's tensors (what real compression selects by)."""
    planned_weight_bytes: int = 0
    """Weight bytes the plan gives the stage (when split: the first card's, which in an even split is
    every card's, the largest shard's; :meth:`planned_weight_bytes_of` gives each card's)."""
    expected_weight_bytes: int = 0
    """The same, recomputed from the model (must equal the plan's)."""
    planned_total_bytes: int = 0
    """Everything the plan counts on the stage's card: weights, activations (KV caches included) and
    buffers (when split, the first card's; :meth:`planned_total_bytes_of` gives each card's)."""
    capacity_bytes: int | None = None
    """The card's capacity at the plan's level (None for live-module plans without cards); when split,
    the smallest of its cards' (:meth:`capacity_bytes_of` gives each card's)."""
    shard_parts: tuple[tuple[ShardParts, ...], ...] = ()
    """A proportional split (cards of different sizes): per card in ``ranks`` order, the slices of
    each unit it holds, the plan stages' ``shard_parts``. Empty: not split, or split evenly (balanced
    sizes, every card padded to the largest shard)."""
    shard_weight_bytes: tuple[int, ...] = ()
    """Per card in ``ranks`` order, the weight bytes the plan gives it (empty: ``planned_weight_bytes``
    on every card)."""
    shard_total_bytes: tuple[int, ...] = ()
    """Per card, the plan's total bytes on it (empty: ``planned_total_bytes`` on every card)."""
    shard_capacity_bytes: tuple[int, ...] = ()
    """Per card, its own capacity (empty: ``capacity_bytes`` for every card)."""

    def __post_init__(self) -> None:
        for name in ("shard_parts", "shard_weight_bytes", "shard_total_bytes", "shard_capacity_bytes"):
            got = getattr(self, name)
            if got and len(got) != len(self.ranks):
                raise ConfigError(f"stage {self.stage_idx}: {name} has {len(got)} entries for {len(self.ranks)} cards")
        if self.shard_parts and any(len(p) != len(self.unit_names) for p in self.shard_parts):
            raise ConfigError(f"stage {self.stage_idx}: shard_parts need one entry per unit {list(self.unit_names)}")

    def planned_weight_bytes_of(self, shard: int) -> int:
        """Weight bytes the plan gives the stage's card ``shard`` (its index in ``ranks``)."""
        return self.shard_weight_bytes[shard] if self.shard_weight_bytes else self.planned_weight_bytes

    def planned_total_bytes_of(self, shard: int) -> int:
        """Total bytes the plan counts on the stage's card ``shard``."""
        return self.shard_total_bytes[shard] if self.shard_total_bytes else self.planned_total_bytes

    def capacity_bytes_of(self, shard: int) -> int | None:
        """The capacity of the stage's card ``shard``."""
        return self.shard_capacity_bytes[shard] if self.shard_capacity_bytes else self.capacity_bytes

    @property
    def proportional(self) -> bool:
        """Split over cards in the ranges the plan records (``shard_parts``), not in balanced sizes."""
        return bool(self.shard_parts)

    @property
    def unit_parts(self) -> tuple[tuple[ShardParts, ...], ...] | None:
        """Per unit, every card's slices of it (``shard_parts`` transposed); None: not proportional."""
        if not self.shard_parts:
            return None
        return tuple(zip(*self.shard_parts))

    @property
    def shards(self) -> int:
        return len(self.ranks)

    @property
    def leader(self) -> int:
        return self.ranks[0]

    @property
    def fqns(self) -> tuple[str, ...]:
        return tuple(name for names in self.unit_tensors for name in names)

    @property
    def compressed(self) -> bool:
        return any(self.unit_compression)

    def describe(self) -> str:
        """``stage 1 (card 1: layers.2..head)``: how messages name the stage."""
        cards = ",".join(str(r) for r in self.ranks)
        span = self.unit_names[0] if len(self.unit_names) == 1 else f"{self.unit_names[0]}..{self.unit_names[-1]}"
        return f"stage {self.stage_idx} (card{'s' if self.shards > 1 else ''} {cards}: {span})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage_idx,
            "ranks": list(self.ranks),
            "units": list(self.units),
            "unit_names": list(self.unit_names),
            "shards": self.shards,
            "compression": {n: list(c) for n, c in zip(self.unit_names, self.unit_compression) if c},
            "planned_weight_bytes": self.planned_weight_bytes,
            **({"shard_parts": [[p.to_dict() for p in card] for card in self.shard_parts],
                "shard_weight_bytes": list(self.shard_weight_bytes)} if self.shard_parts else {}),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class DeployLayout:
    """A plan as processes: one :class:`StagePlacement` per pipeline stage."""
    model: str
    kind: LayoutKind
    """``transformer`` (a Hugging Face checkpoint) or ``sequential`` (an ``nn.Sequential``)."""
    model_type: str | None
    """The checkpoint's ``model_type``, a deployable family of :mod:`cachefit.families`; None for an
    ``nn.Sequential``."""
    stages: tuple[StagePlacement, ...]
    weight_dtype: str
    """The plan's weight dtype (its bytes are counted in it)."""
    granularity: Granularity = "layer"
    stacking: Stacking = "reuse"

    def __post_init__(self) -> None:
        for name, allowed in (("kind", get_args(LayoutKind)), ("granularity", get_args(Granularity)),
                              ("stacking", get_args(Stacking))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"deploy layout of {self.model}: {name} must be one of {', '.join(allowed)}, "
                                  f"got {getattr(self, name)!r}")
        if (self.kind == "transformer") != (self.model_type is not None):
            raise ConfigError(f"deploy layout of {self.model}: a {self.kind} layout "
                              f"{'needs' if self.kind == 'transformer' else 'has no'} model_type")

    @property
    def family(self) -> FamilySpec | None:
        """The registry's facts on the checkpoint's family (None for an ``nn.Sequential``)."""
        return get_family(self.model_type) if self.model_type is not None else None

    @property
    def world_size(self) -> int:
        return sum(s.shards for s in self.stages)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def tensor_parallel(self) -> bool:
        return any(s.shards > 1 for s in self.stages)

    def placement_of(self, rank: int) -> tuple[StagePlacement, int]:
        """The stage ``rank`` runs and its shard index in it."""
        for st in self.stages:
            if rank in st.ranks:
                return st, st.ranks.index(rank)
        raise DeployError(f"rank {rank} has no stage: the plan has {self.world_size} cards")


# --------------------------------------------------------------------------------------------
# Checking a plan against a model (no torch)
# --------------------------------------------------------------------------------------------


def plan_workload(plan: Plan) -> Workload:
    fields = ("batch", "seq_len", "mode", "weight_dtype", "act_dtype", "kv_dtype", "kv_cache", "micro_batches",
              "attention", "fused_mlp", "checkpointing", "buffer_reuse", "dropout")
    try:
        return Workload(**{k: plan.workload[k] for k in fields if k in plan.workload})
    except TypeError as exc:
        raise ConfigError(f"plan of {plan.model}: workload is malformed ({exc}); regenerate the plan") from None


def plan_granularity(plan: Plan) -> Granularity:
    """``block`` if the plan cuts layers into attention / MLP units, else ``layer``."""
    names = (n for st in plan.stages for n in st.unit_names)
    return "block" if any(n.endswith(_BLOCK_SUFFIXES) for n in names) else "layer"


def _group_stages(plan: Plan) -> list[tuple[int, ...]]:
    """Indices of plan stages forming each pipeline stage (a split unit's shards form one)."""
    groups: list[tuple[int, ...]] = []
    i = 0
    stages = plan.stages
    while i < len(stages):
        st = stages[i]
        if st.shard is None:
            groups.append((i,))
            i += 1
            continue
        index, count = st.shard
        members = stages[i:i + count]
        if index != 0 or len(members) != count or any(
            m.shard != (k, count) or m.units != st.units for k, m in enumerate(members)
        ):
            raise ConfigError(
                f"plan of {plan.model}: the shards of units {st.units} are not listed as cards "
                f"0..{count - 1} of {count} in a row; regenerate the plan"
            )
        groups.append(tuple(range(i, i + count)))
        i += count
    return groups


def _stage_units(profile: ModelProfile, start: int, end: int, shards: int,
                 compression: Sequence[Sequence[str]], parts: Sequence[ShardParts] = ()) -> list[Unit]:
    """The units one card of the stage holds: whole, the largest of ``shards`` balanced shards, or
    (``parts``, a proportional split) the shard holding exactly those slices; then compressed."""
    from cachefit.compress.techniques import compress_unit
    from cachefit.partition.split import shard_unit, shard_unit_parts

    out = []
    for k, unit in enumerate(profile.units[start:end]):
        if parts:
            unit = shard_unit_parts(unit, parts[k], shards, profile.workload).unit
        elif shards > 1:
            unit = shard_unit(unit, shards, profile.workload).unit
        techs = tuple(compression[k]) if compression else ()
        if techs:
            unit = compress_unit(unit, techs, profile.workload)
        out.append(unit)
    return out


def _check_tensor_parallel(plan: Plan, family: FamilySpec, profile: ModelProfile, start: int, end: int,
                           shards: int, where: str,
                           parts: Sequence[Sequence[ShardParts]] = ()) -> None:
    """Refuse, before launch, a split deploy cannot run with the bytes the plan counts for it.

    Any card count runs (:mod:`cachefit.deploy.tensor_parallel` splits heads, KV groups, MLP columns
    and the vocabulary as the planner counts them), provided each card's query heads can read key /
    value heads it holds within the plan's count: with more cards than KV heads a card keeps one KV
    head, so each group's query heads are dealt to that group's cards. ``parts``: a proportional
    split, per card the slices of each unit (the plan stages' ``shard_parts``), checked by
    :func:`_check_shard_parts`.
    """
    from cachefit.deploy.tensor_parallel import split_heads
    from cachefit.partition.split import shard_unit

    if not family.tensor_parallel:
        split = ", ".join(name for name, f in FAMILIES.items() if f.tensor_parallel)
        raise ConfigError(
            f"{where} splits units over {shards} cards, but tensor-parallel stages are deployed only for "
            f"{split} models, not {family.name}; plan with a larger --capacity or more cards so that no unit is split"
        )
    if parts:
        _check_shard_parts(family, profile, start, end, parts, where)
        return
    for unit in profile.units[start:end]:
        shape = unit.shape
        if shape is None or shape.part not in ("layer", "attention") or not shape.num_heads:
            continue
        heads, kv = shape.num_heads, shape.num_kv_heads
        try:
            split = split_heads(heads, kv, shards)
        except ConfigError as exc:
            raise ConfigError(f"{where}: unit {unit.name}: {exc}") from None
        planned = shard_unit(unit, shards, profile.workload).unit.shape
        assert planned is not None  # a transformer unit's shard keeps its shape
        if (split.query_slots, split.kv_slots) != (planned.num_heads, planned.num_kv_heads):
            raise ConfigError(
                f"{where}: unit {unit.name} has {heads} attention heads reading {kv} key/value heads; the plan counts "
                f"{planned.num_heads} query and {planned.num_kv_heads} key/value head(s) on each of {shards} cards, "
                f"but with each card's query heads reading key/value heads it holds the fullest card needs "
                f"{split.query_slots} and {split.kv_slots}; re-plan with `cachefit plan ... --even-splits`, or on "
                f"a card count that is at most {kv} or a multiple of it"
            )


def _check_shard_parts(family: FamilySpec, profile: ModelProfile, start: int, end: int,
                       parts: Sequence[Sequence[ShardParts]], where: str) -> None:
    """Refuse a proportional split deploy cannot run as recorded: for each unit, every dimension it is
    split along (:func:`cachefit.partition.split.split_dimensions`) covered once by the cards' ranges
    in card order, no range of a dimension the unit does not split, and each card's query heads whole
    KV groups or inside one group, holding the KV heads they read (a fused q/k/v projection, GPT-2's,
    needs as many KV heads as query heads on each card)."""
    from cachefit.deploy.tensor_parallel import part_ranges, split_heads_from_parts
    from cachefit.partition.split import split_dimensions

    spec = family.tensor_parallel
    assert spec is not None
    for k, unit in enumerate(profile.units[start:end]):
        cards = [p[k] for p in parts]
        dims = split_dimensions(unit)
        here = f"{where}: unit {unit.name}"
        if not dims:
            raise ConfigError(f"{here} cannot be split, but the plan records shard_parts for it; regenerate the plan")
        named = {name for p in cards for name in ("heads", "mlp_columns", "vocab") if getattr(p, name) is not None}
        if extra := sorted(named - set(dims)):
            raise ConfigError(f"{here} is split along {', '.join(sorted(dims))}, but the plan's shard_parts give "
                              f"{', '.join(extra)} ranges too; regenerate the plan")
        try:
            for name, size in dims.items():
                if name == "heads":
                    assert unit.shape is not None  # split_dimensions gives heads only with a shape
                    heads = split_heads_from_parts(unit.shape.num_heads, unit.shape.num_kv_heads, cards)
                    if spec.fused_qkv is not None and any(len(q) != len(kv) for q, kv in zip(heads.query, heads.kv)):
                        raise ConfigError(f"{spec.fused_qkv} splits into equal q, k, v widths, but the plan gives a "
                                          "card more query than key/value heads; re-plan with --even-splits")
                else:
                    part_ranges(cards, name, size)
        except ConfigError as exc:
            raise ConfigError(f"{here}: {exc}") from None


def plan_profile(plan: Plan, model_path: str | os.PathLike[str]) -> ModelProfile:
    """The model's profile as the plan was made: its workload, granularity and memory source (a measured
    plan, ``plan --measure``, is re-measured), so its units, bytes and digest can be compared."""
    from cachefit.profile import profile_model

    return profile_model(model_path, plan_workload(plan), granularity=plan_granularity(plan),
                         measure=getattr(plan, "memory_source", "analytic") == "measured")


def layout_from_plan(plan: Plan, source: ModelSource, *, profile: ModelProfile | None = None) -> DeployLayout:
    """Check ``plan`` against the checkpoint ``source`` and place its stages on ranks.

    ``profile``: the model's :func:`plan_profile`, when the caller has it already.

    Raises:
        ConfigError: the plan was made for another model (unit names, tensor shapes or bytes differ),
            it splits a unit in a way cachefit cannot run, or it compresses units and real
            compression is not available.
    """
    from cachefit.deploy.models import FLOAT_DTYPES

    workload = plan_workload(plan)
    granularity = plan_granularity(plan)
    profile = profile if profile is not None else plan_profile(plan, source.path)
    names = tuple(u.name for u in profile.units)
    where_model = f"model {source.path}"
    if len(names) != plan.num_units:
        raise ConfigError(
            f"plan of {plan.model!r} has {plan.num_units} units but {where_model} has {len(names)} at granularity "
            f"{granularity!r}; make the plan from this model (`cachefit plan {source.path} ...`)"
        )
    # every tensor the profile names must be in the checkpoint, with the profiled shape
    for unit in profile.units:
        for t in unit.tensors:
            stored = source.tensors.get(t.name) or (source.tensors.get(t.tied_to) if t.tied_to else None)
            if stored is None:
                from cachefit.deploy.models import stored_name  # prefix-tolerant lookup, no torch

                alt = stored_name(source, t.name)
                stored = source.tensors.get(alt) if alt else None
            if stored is None:
                raise ConfigError(
                    f"{source.path}: tensor {t.name!r} of unit {unit.name} is not in the safetensors files"
                    + (f" (nor {t.tied_to!r} it is tied to)" if t.tied_to else "")
                    + "; the weights do not belong to this config.json, or a weight file is missing"
                )
            if tuple(stored.shape) != tuple(t.shape):
                raise ConfigError(
                    f"{stored.file}: tensor {stored.name!r} has shape {tuple(stored.shape)}, but config.json gives "
                    f"{tuple(t.shape)} for unit {unit.name}; the weights do not match the config"
                )
            if stored.dtype not in FLOAT_DTYPES:
                declared = source.config.get("torch_dtype") or source.config.get("dtype")
                raise ConfigError(
                    f"{stored.file}: tensor {stored.name!r} of unit {unit.name} is stored as {stored.dtype}, but "
                    f"config.json makes it a floating-point weight{f' ({declared})' if declared else ''}; the "
                    "weights do not match the config (a quantized checkpoint? cachefit reads float weights)"
                )
    placements: list[StagePlacement] = []
    for stage_idx, members in enumerate(_group_stages(plan)):
        first = plan.stages[members[0]]
        start, end = first.units
        where = f"plan stage on card {first.card} (units {start}..{end - 1})"
        if tuple(first.unit_names) != names[start:end]:
            raise ConfigError(
                f"{where} lists units {list(first.unit_names)} but {where_model} has {list(names[start:end])} "
                "there; the plan was made for another model or granularity"
            )
        shards = len(members)
        compression = first.unit_compression
        parts = tuple(plan.stages[m].shard_parts for m in members)
        if any(parts) and (shards < 2 or not all(parts)):
            raise ConfigError(
                f"{where}: shard_parts are given for {sum(1 for p in parts if p)} of its {shards} card(s); a "
                "proportional split records them on every card of a unit split over 2 or more; regenerate the plan"
            )
        if not any(parts):
            parts = ()
        if shards > 1:
            _check_tensor_parallel(plan, source.family, profile, start, end, shards, where, parts)
            if any(compression):
                raise ConfigError(
                    f"{where} is split over {shards} cards and compressed; cachefit deploys compressed stages or "
                    "split stages, not both: re-plan with more or larger cards, or without --allow"
                )
        expected_per_card: list[int] = []
        # an even split's cards all hold the largest shard; a proportional split's each its own slices
        for k, m in enumerate(members):
            card = plan.stages[m]
            if parts or not expected_per_card:
                units = _stage_units(profile, start, end, shards, compression, parts[k] if parts else ())
                expected = stack_footprints((u.footprint for u in units), reuse=plan.stacking != "sum").weight_bytes
            if expected != card.footprint.weight_bytes:
                split = (f" (its shard_parts {[p.to_dict() for p in card.shard_parts]} of a split over {shards} cards)"
                         if parts else f" split over {shards} cards" if shards > 1 else "")
                raise ConfigError(
                    f"{where}: the plan gives card {card.card} {card.footprint.weight_bytes:,} B of weights "
                    f"({format_bytes(card.footprint.weight_bytes)}), but {where_model} needs {expected:,} B "
                    f"({format_bytes(expected)}) for units {list(first.unit_names)} at {workload.weight_dtype}"
                    f"{split}; re-plan this model"
                )
            expected_per_card.append(expected)
        expected = expected_per_card[0]
        unit_tensors = tuple(tuple(t.name for t in u.tensors) for u in profile.units[start:end])
        tied = tuple((t.name, t.tied_to) for u in profile.units[start:end] for t in u.tensors if t.tied_to)
        roles = tuple((t.name, t.role) for u in profile.units[start:end] for t in u.tensors)
        placements.append(
            StagePlacement(
                stage_idx=stage_idx,
                ranks=tuple(plan.stages[m].card for m in members),
                units=(start, end),
                unit_names=tuple(first.unit_names),
                unit_tensors=unit_tensors,
                tied=tied,
                unit_compression=tuple(tuple(c) for c in compression) if compression else (),
                tensor_roles=roles,
                planned_weight_bytes=first.footprint.weight_bytes,
                expected_weight_bytes=expected,
                planned_total_bytes=first.footprint.total_bytes,
                capacity_bytes=min(plan.stages[m].capacity_bytes for m in members),
                shard_parts=tuple(tuple(p) for p in parts),
                shard_weight_bytes=tuple(plan.stages[m].footprint.weight_bytes for m in members) if shards > 1 else (),
                shard_total_bytes=tuple(plan.stages[m].footprint.total_bytes for m in members) if shards > 1 else (),
                shard_capacity_bytes=tuple(plan.stages[m].capacity_bytes for m in members) if shards > 1 else (),
            )
        )
    ranks = [r for p in placements for r in p.ranks]
    if sorted(ranks) != list(range(len(ranks))):
        raise ConfigError(f"plan of {plan.model}: cards are numbered {ranks}, expected 0..{len(ranks) - 1}")
    layout = DeployLayout(
        model=str(source.path),
        kind="transformer",
        model_type=source.model_type,
        stages=tuple(placements),
        weight_dtype=workload.weight_dtype,
        granularity=granularity,
        stacking=plan.stacking,  # checked by DeployLayout
    )
    if plan.provenance and plan.provenance.get("profile"):
        from cachefit.plan import check_provenance

        # names, shapes and bytes agree (checked above, stage by stage); the digest also
        # covers activations, FLOPs, roles and the workload, so a plan made for another variant of this model is refused too
        check_provenance(plan, profile_digest=profile.digest())
    _check_compression_available(layout)
    return layout


def _check_compression_available(layout: DeployLayout) -> None:
    compressed = [p for p in layout.stages if p.compressed]
    if not compressed:
        return
    try:
        from cachefit.compress import apply as _apply  # noqa: F401
    except ImportError:
        techs = sorted({t for p in compressed for c in p.unit_compression for t in c})
        raise ConfigError(
            f"the plan compresses units ({', '.join(techs)}) on {compressed[0].describe()}, and this cachefit "
            "has no real compression to apply (cachefit.compress.apply); plan without --allow to deploy "
            "uncompressed"
        ) from None


def layout_from_module(plan: Plan, module: nn.Module) -> DeployLayout:
    """Check a plan made with ``profile_module`` against an ``nn.Sequential`` and place its stages.

    Units are the Sequential's children by name; a stage's weight bytes are the bytes of its
    children's parameters and buffers (as ``profile_module`` counts them).

    Raises:
        ConfigError: the module is not an ``nn.Sequential``, a unit is not one of its children, a stage
            is split, or the weight bytes differ from the plan's.
    """

    if not isinstance(module, nn.Sequential):
        raise ConfigError(
            f"deploy_plan takes an nn.Sequential (a sequence of blocks) or a model directory, not a "
            f"{type(module).__name__}; wrap the blocks in nn.Sequential and plan that"
        )
    children = list(module._modules)
    if plan.num_units != len(children):
        raise ConfigError(
            f"plan of {plan.model!r} has {plan.num_units} units but the nn.Sequential has {len(children)} children; "
            "make the plan from profile_module(this module)"
        )
    placements = []
    weight_dtype = str(plan.workload.get("weight_dtype", "fp32"))
    for stage_idx, members in enumerate(_group_stages(plan)):
        first = plan.stages[members[0]]
        start, end = first.units
        if len(members) > 1:
            raise ConfigError(
                f"plan stage on card {first.card} splits units over {len(members)} cards; an nn.Sequential is "
                "deployed as a pipeline only (no tensor parallelism): re-plan with larger cards"
            )
        if tuple(first.unit_names) != tuple(children[start:end]):
            raise ConfigError(
                f"plan stage on card {first.card} lists units {list(first.unit_names)} but the nn.Sequential's "
                f"children {start}..{end - 1} are {children[start:end]}"
            )
        if any(first.unit_compression):
            raise ConfigError("plans that compress units are deployed for model directories only")
        expected = sum(_module_bytes(module._modules[n]) for n in first.unit_names)
        if expected != first.footprint.weight_bytes:
            raise ConfigError(
                f"plan stage on card {first.card}: the plan gives it {first.footprint.weight_bytes:,} B of weights "
                f"but the module's children {list(first.unit_names)} hold {expected:,} B; re-plan this module"
            )
        placements.append(
            StagePlacement(
                stage_idx=stage_idx,
                ranks=(first.card,),
                units=(start, end),
                unit_names=tuple(first.unit_names),
                planned_weight_bytes=first.footprint.weight_bytes,
                expected_weight_bytes=expected,
                planned_total_bytes=first.footprint.total_bytes,
                capacity_bytes=min(plan.stages[m].capacity_bytes for m in members),
            )
        )
    return DeployLayout(model=plan.model, kind="sequential", model_type=None, stages=tuple(placements),
                        weight_dtype=weight_dtype, stacking=plan.stacking)


def _module_bytes(module: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


# --------------------------------------------------------------------------------------------
# Stage adapters: the forward of each unit kind, with side inputs passed explicitly. A family's
# FamilySpec.stage_adapter names which one runs it (STAGE_ADAPTERS below).
# --------------------------------------------------------------------------------------------


def _mask_kwargs(fn: Callable[..., Any], seq_len: int, device: torch.device) -> dict[str, Any]:
    """Keyword arguments for transformers' mask builders across versions (``cache`` vs ``past_key_values``)."""
    params = inspect.signature(fn).parameters
    kwargs: dict[str, Any] = {}
    if "cache" in params:
        kwargs["cache"] = None
    elif "past_key_values" in params:
        kwargs["past_key_values"] = None
    if "cache_position" in params:
        kwargs["cache_position"] = torch.arange(seq_len, device=device)
    return kwargs


def _cache_mask_kwargs(fn: Callable[..., Any], cache: Any, layer_idx: int, position: int, q: int,
                       device: torch.device) -> dict[str, Any]:
    """Keyword arguments that hand transformers' mask builders a cache, across versions."""
    params = inspect.signature(fn).parameters
    kwargs: dict[str, Any] = {"cache" if "cache" in params else "past_key_values": cache}
    if "layer_idx" in params:
        kwargs["layer_idx"] = layer_idx
    if "cache_position" in params:
        kwargs["cache_position"] = torch.arange(position, position + q, device=device)
    return kwargs


def _first(out: Any) -> Any:
    return out[0] if isinstance(out, tuple) else out


class _RotaryDecoder:
    """Llama-like decoders with rotary positions: ``transformers`` ``*ForCausalLM`` whose layers are
    ``LlamaDecoderLayer``'s (models/llama/modeling_llama.py): pre-norm ``self_attn`` and ``mlp``, the
    rotary table in ``model.rotary_emb``, optional sliding windows per ``layer_types``. Runs cached
    decoding too (:meth:`decode_context`)."""
    @staticmethod
    def embed(root: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        return root.model.embed_tokens(input_ids)

    @staticmethod
    def context(root: nn.Module, hidden: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
        from transformers import masking_utils

        seq = hidden.shape[1]
        position_ids = torch.arange(seq, device=hidden.device).unsqueeze(0)
        config = root.config
        common = {"config": config, "inputs_embeds": hidden, "attention_mask": mask, "position_ids": position_ids}
        masks = {"full_attention": masking_utils.create_causal_mask(
            **common, **_mask_kwargs(masking_utils.create_causal_mask, seq, hidden.device))}
        layer_types = getattr(config, "layer_types", None)
        sliding = getattr(config, "sliding_window", None)
        if (layer_types and "sliding_attention" in layer_types) or (sliding and not layer_types):
            fn = masking_utils.create_sliding_window_causal_mask
            masks["sliding_attention"] = fn(**common, **_mask_kwargs(fn, seq, hidden.device))
        return {
            "position_ids": position_ids,
            "position_embeddings": root.model.rotary_emb(hidden, position_ids),
            "masks": masks,
            "layer_types": layer_types,
        }

    @staticmethod
    def decode_context(root: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None, cache: Any,
                       position: int, layer_idx: int = 0) -> dict[str, Any]:
        """Side inputs of one step of cached decoding: ``hidden`` holds the tokens at positions
        ``position ..``; ``cache`` (a ``DynamicCache`` or ``StaticCache``) holds the keys / values of
        the earlier ones for the stage's layers, the first of which is ``layer_idx``.

        The masks are transformers' own (``create_causal_mask`` and, with sliding layers,
        ``create_sliding_window_causal_mask``) built from the cache, as ``LlamaModel.forward`` builds
        them: the cache gives the key length (the tokens so far for a dynamic cache, every slot of a
        static one, whose unwritten slots lie after the query and so are masked) and the query's
        offset, read at the stage's first layer (a later stage's cache holds no earlier layers).
        Prompts are unpadded (the runtime refuses padding in decode), so no 2-D mask is needed.
        Position ids continue from the tokens done (``arange(q) + past_seen_tokens``).
        """
        from transformers import masking_utils

        q = hidden.shape[1]
        position_ids = torch.arange(position, position + q, device=hidden.device).unsqueeze(0)
        config = root.config
        layer_types = getattr(config, "layer_types", None)
        sliding = getattr(config, "sliding_window", None)
        builders = {"full_attention": masking_utils.create_causal_mask}
        if (layer_types and "sliding_attention" in layer_types) or (sliding and not layer_types):
            builders["sliding_attention"] = masking_utils.create_sliding_window_causal_mask
        masks = {}
        for kind, fn in builders.items():
            first = layer_idx
            if layer_types:  # the stage's first layer of this kind (its cache layer gives the sizes)
                first = next((i for i in range(layer_idx, len(layer_types)) if layer_types[i] == kind), layer_idx)
            masks[kind] = fn(config=config, inputs_embeds=hidden, attention_mask=None, position_ids=position_ids,
                             **_cache_mask_kwargs(fn, cache, first, position, q, hidden.device))
        return {"position_ids": position_ids, "position_embeddings": root.model.rotary_emb(hidden, position_ids),
                "masks": masks, "layer_types": layer_types, "cache": cache}

    @staticmethod
    def _mask(ctx: Mapping[str, Any], i: int) -> Any:
        masks = ctx["masks"]
        if ctx["layer_types"]:
            return masks[ctx["layer_types"][i]]
        return masks.get("sliding_attention", masks["full_attention"])

    @staticmethod
    def layer(root: nn.Module, i: int, hidden: torch.Tensor, ctx: Mapping[str, Any]) -> torch.Tensor:
        cache = ctx.get("cache")
        extra = {"cache": cache, "use_cache": True} if cache is not None else {}
        return _first(root.model.layers[i](
            hidden, attention_mask=_RotaryDecoder._mask(ctx, i), position_ids=ctx["position_ids"],
            position_embeddings=ctx["position_embeddings"], **extra))

    @staticmethod
    def attn(root: nn.Module, i: int, hidden: torch.Tensor, ctx: Mapping[str, Any]) -> torch.Tensor:
        # LlamaDecoderLayer.forward, first half: pre-norm, self-attention, residual
        layer = root.model.layers[i]
        out = layer.self_attn(hidden_states=layer.input_layernorm(hidden), attention_mask=_RotaryDecoder._mask(ctx, i),
                              position_ids=ctx["position_ids"], position_embeddings=ctx["position_embeddings"],
                              **({"cache": ctx["cache"]} if ctx.get("cache") is not None else {}))
        return hidden + _first(out)

    @staticmethod
    def mlp(root: nn.Module, i: int, hidden: torch.Tensor, ctx: Mapping[str, Any]) -> torch.Tensor:
        # second half: post-attention norm, MLP, residual
        layer = root.model.layers[i]
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    @staticmethod
    def head(root: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return root.lm_head(root.model.norm(hidden))

    @staticmethod
    def output_width(config: Any) -> int:
        return config.vocab_size


class _GPT2Decoder:
    """GPT-2: ``transformers`` ``GPT2LMHeadModel`` (models/gpt2/modeling_gpt2.py)."""
    @staticmethod
    def embed(root: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:

        tr = root.transformer
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        return tr.drop(tr.wte(input_ids) + tr.wpe(position_ids))

    @staticmethod
    def context(root: nn.Module, hidden: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
        from transformers import masking_utils

        seq = hidden.shape[1]
        position_ids = torch.arange(seq, device=hidden.device).unsqueeze(0)
        fn = masking_utils.create_causal_mask
        causal = fn(config=root.config, inputs_embeds=hidden, attention_mask=mask, position_ids=position_ids,
                    **_mask_kwargs(fn, seq, hidden.device))
        return {"mask": causal, "position_ids": position_ids}

    @staticmethod
    def layer(root: nn.Module, i: int, hidden: torch.Tensor, ctx: Mapping[str, Any]) -> torch.Tensor:
        return _first(root.transformer.h[i](hidden, attention_mask=ctx["mask"], position_ids=ctx["position_ids"]))

    @staticmethod
    def attn(root: nn.Module, i: int, hidden: torch.Tensor, ctx: Mapping[str, Any]) -> torch.Tensor:
        # GPT2Block.forward, first half: ln_1, attention, residual
        block = root.transformer.h[i]
        return hidden + _first(block.attn(block.ln_1(hidden), attention_mask=ctx["mask"]))

    @staticmethod
    def mlp(root: nn.Module, i: int, hidden: torch.Tensor, ctx: Mapping[str, Any]) -> torch.Tensor:
        block = root.transformer.h[i]
        return hidden + block.mlp(block.ln_2(hidden))

    @staticmethod
    def head(root: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return root.lm_head(root.transformer.ln_f(hidden))

    @staticmethod
    def output_width(config: Any) -> int:
        return config.vocab_size


class _BertEncoder:
    """BERT encoders: ``transformers`` ``BertModel`` (models/bert/modeling_bert.py). The output is the
    last hidden state; the pooler (the ``head`` unit) runs on its card and its output is dropped."""

    @staticmethod
    def embed(root: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        return root.embeddings(input_ids=input_ids)

    @staticmethod
    def context(root: nn.Module, hidden: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
        from transformers import masking_utils

        fn = masking_utils.create_bidirectional_mask
        return {"mask": fn(config=root.config, inputs_embeds=hidden, attention_mask=mask)}

    @staticmethod
    def layer(root: nn.Module, i: int, hidden: torch.Tensor, ctx: Mapping[str, Any]) -> torch.Tensor:
        return _first(root.encoder.layer[i](hidden, attention_mask=ctx["mask"]))

    @staticmethod
    def attn(root: nn.Module, i: int, hidden: torch.Tensor, ctx: Mapping[str, Any]) -> torch.Tensor:
        # BertLayer: BertAttention = self-attention, output dense, dropout, residual + LayerNorm
        return _first(root.encoder.layer[i].attention(hidden, ctx["mask"]))

    @staticmethod
    def mlp(root: nn.Module, i: int, hidden: torch.Tensor, ctx: Mapping[str, Any]) -> torch.Tensor:
        # BertLayer.feed_forward_chunk: intermediate dense + act, output dense, residual + LayerNorm
        layer = root.encoder.layer[i]
        return layer.output(layer.intermediate(hidden), hidden)

    @staticmethod
    def head(root: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if getattr(root, "pooler", None) is not None:
            root.pooler(hidden)  # planned on this card, so it runs; BertModel's main output is `hidden`
        return hidden

    @staticmethod
    def output_width(config: Any) -> int:
        return config.hidden_size


STAGE_ADAPTERS: Mapping[str, type] = {
    "rotary_decoder": _RotaryDecoder,
    "gpt2_decoder": _GPT2Decoder,
    "bert_encoder": _BertEncoder,
}
"""Stage implementations by :data:`~cachefit.families.family_spec.StageAdapter` key: the one place
that maps a family's ``stage_adapter`` to torch code."""


def _parse_unit(name: str) -> tuple[str, int | None]:
    """(``embed`` | ``layer`` | ``attn`` | ``mlp`` | ``head``, layer index)."""
    if name in ("embed", "head"):
        return name, None
    parts = name.split(".")
    if len(parts) >= 2 and parts[0] == "layers" and parts[1].isdigit():
        if len(parts) == 2:
            return "layer", int(parts[1])
        if len(parts) == 3 and parts[2] in ("attn", "mlp"):
            return parts[2], int(parts[1])
    raise DeployError(f"unit {name!r}: cachefit does not know which module runs it")


# --------------------------------------------------------------------------------------------
# Stage modules
# --------------------------------------------------------------------------------------------


class TransformerStage(nn.Module):
    """The units of one stage of a Hugging Face model, with the model's own submodules.

    ``forward(x, attention_mask)``: ``x`` is the token ids on the first stage and the hidden states
    elsewhere; every stage but the last returns ``(hidden, attention_mask)`` so the 2-D padding mask
    travels down the pipeline, the last returns the logits (decoders) or the last hidden state
    (encoders). Forward times of real (non-meta) calls are kept in ``forward_times_s``.
    """

    def __init__(self, root: nn.Module, adapter: str | None, placement: StagePlacement, *, is_first: bool,
                 is_last: bool) -> None:
        super().__init__()
        if adapter not in STAGE_ADAPTERS:
            raise DeployError(f"{placement.describe()}: stage adapter {adapter!r} is not one of "
                              f"{', '.join(STAGE_ADAPTERS)}; the family's FamilySpec.stage_adapter names none that exists")
        self.model = root
        self.adapter_name = adapter
        """The :data:`STAGE_ADAPTERS` key whose forward runs the units."""
        self.placement = placement
        self.is_first = is_first
        self.is_last = is_last
        self.steps = tuple(_parse_unit(n) for n in placement.unit_names)
        self.forward_times_s: list[float] = []
        self.pre_forward: Callable[..., tuple[Any, ...]] | None = None
        """Set by the runtime on a tensor-parallel leader: shares the inputs with its followers."""
        self.post_forward: Callable[[Any], Any] | None = None
        """Set by the runtime on a tensor-parallel leader in a training step: its output's gradient
        goes to its followers (:meth:`cachefit.deploy.tp_sync.TensorParallelSync.share_grad`)."""
        self.compression_reports: tuple[Any, ...] = ()
        """What real compression did to the stage's units (empty: uncompressed)."""

    @property
    def adapter(self) -> type:
        return STAGE_ADAPTERS[self.adapter_name]

    def _meta_outputs(self, x: torch.Tensor, mask: torch.Tensor) -> Any:
        """Output shapes alone, for the meta-device shape inference of some torch versions."""

        cfg = self.model.config
        batch, seq = mask.shape[0], mask.shape[1]
        dtype = next((p.dtype for p in self.model.parameters()), torch.float32)
        width = self.adapter.output_width(cfg) if self.is_last else cfg.hidden_size
        hidden = torch.empty(batch, seq, width, dtype=dtype, device="meta")
        return hidden if self.is_last else (hidden, mask)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        if x.device.type == "meta":
            return self._meta_outputs(x, attention_mask)
        if self.pre_forward is not None:
            x, attention_mask = self.pre_forward(x, attention_mask)
        out = self.compute(x, attention_mask)
        return self.post_forward(out) if self.post_forward is not None else out

    def compute(self, x: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        """The stage's units on real tensors (tensor-parallel followers call this directly)."""
        start = time.perf_counter()
        fam = self.adapter
        hidden = x
        ctx: dict[str, Any] | None = None
        for kind, i in self.steps:
            if kind == "embed":
                hidden = fam.embed(self.model, x)
            elif kind == "head":
                hidden = fam.head(self.model, hidden)
            else:
                if ctx is None:
                    ctx = fam.context(self.model, hidden, attention_mask)
                hidden = getattr(fam, kind)(self.model, i, hidden, ctx)
        self.forward_times_s.append(time.perf_counter() - start)
        return hidden if self.is_last else (hidden, attention_mask)


    def decode(self, x: torch.Tensor, attention_mask: torch.Tensor | None, cache: Any, position: int) -> torch.Tensor:
        """One step of cached decoding through the stage's units (adapters with a cached step).

        ``x``: token ids ``(batch, q)`` on the first stage, hidden states ``(batch, q, hidden)``
        elsewhere, for the positions ``position .. position + q - 1``; ``cache``: this stage's
        ``DynamicCache`` or ``StaticCache`` (of one group of sequences), which holds the keys / values of its own layers only (the attention of
        layer ``i`` writes slot ``i``). Returns the hidden states, or on the last stage the logits of
        the last position ``(batch, 1, vocab)`` (the only ones greedy decoding reads).
        """
        if not hasattr(self.adapter, "decode_context"):
            raise DeployError(f"{self.placement.describe()}: the {self.adapter_name} stage adapter runs no cached "
                              "decoding step")
        start = time.perf_counter()
        fam = self.adapter
        hidden = x
        ctx: dict[str, Any] | None = None
        for kind, i in self.steps:
            if kind == "embed":
                hidden = fam.embed(self.model, x)
            elif kind == "head":
                hidden = fam.head(self.model, hidden[:, -1:])
            else:
                if ctx is None:
                    first_layer = next(j for _, j in self.steps if j is not None)
                    ctx = fam.decode_context(self.model, hidden, attention_mask, cache, position, first_layer)
                hidden = getattr(fam, kind)(self.model, i, hidden, ctx)
        self.forward_times_s.append(time.perf_counter() - start)
        return hidden


class SequentialStage(nn.Module):
    """Children of an ``nn.Sequential`` run in order; one tensor in, one out."""
    def __init__(self, children: Sequence[tuple[str, nn.Module]]) -> None:
        super().__init__()
        self.blocks = nn.ModuleDict(dict(children))
        self.forward_times_s: list[float] = []
        self.pre_forward = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "meta":
            raise DeployError("nn.Sequential stages need a torch whose pipelining infers shapes on real tensors")
        start = time.perf_counter()
        for block in self.blocks.values():
            x = block(x)
        self.forward_times_s.append(time.perf_counter() - start)
        return x


def prune_(root: nn.Module, owned: set[str]) -> None:
    """Remove from ``root`` every submodule holding parameters none of which ``owned`` names.

    What remains is the stage (as torchtitan's ``pipeline_module_split`` deletes the layers of other
    stages); modules without parameters (rotary tables, dropout, activations) stay.
    """
    params_of: dict[str, list[str]] = {}
    for fqn, _ in root.named_parameters(remove_duplicate=False):
        parts = fqn.split(".")
        for k in range(len(parts)):
            params_of.setdefault(".".join(parts[:k]), []).append(fqn)
    # visit parents before children; drop the highest module with no owned parameter
    for name, _module in sorted(root.named_modules(remove_duplicate=False), key=lambda kv: kv[0].count(".")):
        if not name:
            continue
        held = params_of.get(name, [])
        if held and not any(p in owned for p in held):
            parent_name, _, attr = name.rpartition(".")
            try:
                parent = root.get_submodule(parent_name) if parent_name else root
            except AttributeError:
                continue  # an ancestor was dropped already
            if attr in parent._modules:
                parent._modules[attr] = None


def build_stage(layout: DeployLayout, placement: StagePlacement, source: ModelSource, *, dtype: str = "fp32",
                device: str = "cpu", mesh: Any = None) -> TransformerStage:
    """The module of one stage: the model built on meta, pruned to the stage, its tensors read.

    ``mesh``: a 1-D ``DeviceMesh`` of the stage's ranks when it is split (tensor parallel).

    Raises:
        DeployError: the pruned model still holds tensors the stage does not own (or lacks one).
    """

    from cachefit.deploy.models import build_skeleton, materialize_, torch_dtype

    root = build_skeleton(source)
    owned = set(placement.fqns)
    prune_(root, owned)
    held = {n for n, _ in root.named_parameters(remove_duplicate=False)}
    extra, missing = held - owned, owned - held
    if extra or missing:
        raise DeployError(
            f"{placement.describe()}: pruning the model left tensors {sorted(extra)[:4]} it does not own "
            f"and lacks {sorted(missing)[:4]} it does; the profile's tensor names do not match the model's"
        )
    if placement.shards > 1:
        _untie_(root)  # each shard of a vocabulary-split embedding / head gets its own tensor
    materialize_(root, source, dtype=torch_dtype(dtype), device=torch.device(device), aliases=dict(placement.tied))
    stage_reports: tuple[Any, ...] = ()
    if placement.compressed:
        stage_reports = compress_units_(root, placement, device=device)
    if placement.shards > 1:
        if mesh is None:
            raise DeployError(f"{placement.describe()} is split over {placement.shards} cards but no device mesh was given")
        apply_tensor_parallel_(root, placement, mesh)
    stage = TransformerStage(root, source.family.stage_adapter, placement, is_first=placement.stage_idx == 0,
                             is_last=placement.stage_idx == layout.num_stages - 1)
    stage.compression_reports = stage_reports
    return stage


def _untie_(root: nn.Module) -> None:

    seen: dict[int, str] = {}
    for fqn, p in list(root.named_parameters(remove_duplicate=False)):
        if id(p) in seen:
            owner_name, _, attr = fqn.rpartition(".")
            owner = root.get_submodule(owner_name)
            setattr(owner, attr, nn.Parameter(_meta_like(p), requires_grad=p.requires_grad))
        else:
            seen[id(p)] = fqn


def _meta_like(p: torch.Tensor) -> torch.Tensor:

    return torch.empty(p.shape, dtype=p.dtype, device="meta")


def compress_units_(root: nn.Module, placement: StagePlacement, *, device: str = "cpu") -> tuple[Any, ...]:
    """Apply the plan's compression to each of the stage's units, in place (cachefit.compress.apply).

    The same call on the unsplit model gives the reference a compressed pipeline is checked against.
    Returns the compression reports, one per compressed unit.
    """
    from cachefit.compress.apply import compress_module_

    roles = dict(placement.tensor_roles)
    reports = []
    for names, techs in zip(placement.unit_tensors, placement.unit_compression):
        if not techs:
            continue
        reports.append(compress_module_(root, techs, fqns=names, roles={n: roles[n] for n in names if n in roles},
                                        device=device))
    return tuple(reports)


def compressed_weight_bytes(stage: TransformerStage, dtype_name: str) -> int:
    """Weight bytes of a compressed stage as the plan counts them.

    Stored bytes of every tensor the stage owns and of the scales / zero points / metadata stored
    beside them (``measure_module_bytes``), with two conversions to the plan's terms: floating-point
    tensors compression left alone are counted at the plan's weight dtype (the run may use another),
    and a format stored larger than it is (2:4 as masked dense on CPU) at its counted size.
    """
    from cachefit.compress.apply import measure_module_bytes

    measured = measure_module_bytes(stage.model, fqns=stage.placement.fqns)
    tensors = {**dict(stage.model.named_parameters(remove_duplicate=False)),
               **dict(stage.model.named_buffers(remove_duplicate=False))}
    owned = set(stage.placement.fqns)
    total = 0
    for key, nbytes in measured.items():
        t = tensors.get(key)
        # an owned float tensor compression left alone; scales (``<fqn>_scale``) stay as stored
        if key in owned and t is not None and t.is_floating_point() and not _is_compressed_tensor(stage, key):
            total += dtype_bytes(dtype_name, t.numel())
        else:
            total += nbytes
    for report in getattr(stage, "compression_reports", ()):
        total -= sum(c.measured_bytes - c.counted_bytes for c in report.tensors if c.counted_not_measured)
    return total


def _is_compressed_tensor(stage: TransformerStage, key: str) -> bool:
    return any(key == c.fqn for r in getattr(stage, "compression_reports", ()) for c in r.tensors)


def tensor_parallel_plan(placement: StagePlacement, family: FamilySpec) -> dict[str, str]:
    """How each module of a split stage is sharded (module FQN -> style), from the family's spec.

    Styles: ``column`` (output features by heads / MLP columns), ``row`` (input features, outputs
    summed over the cards), ``vocab_embedding`` and ``vocab_head`` (a range of the vocabulary, the
    logits gathered); modules not listed run whole on every card.
    """
    spec = family.tensor_parallel
    if spec is None:
        return {}
    plan: dict[str, str] = {}
    for kind, i in (_parse_unit(n) for n in placement.unit_names):
        if kind == "embed" and spec.embedding is not None:
            plan[spec.embedding] = "vocab_embedding"
        if kind == "head" and spec.head is not None:
            plan[spec.head] = "vocab_head"
        layer = spec.layer.format(i=i)
        if kind in ("layer", "attn"):
            for name in (spec.query, *spec.key_value, spec.fused_qkv):
                if name is not None:
                    plan[f"{layer}.{name}"] = "column"
            plan[f"{layer}.{spec.attention_out}"] = "row"
        if kind in ("layer", "mlp"):
            for name in spec.mlp_in:
                plan[f"{layer}.{name}"] = "column"
            plan[f"{layer}.{spec.mlp_out}"] = "row"
    return plan


def apply_tensor_parallel_(root: nn.Module, placement: StagePlacement, mesh: Any) -> None:
    """Cut the stage's split units down to this card's shard, in place (Megatron's column / row pairs).

    ``mesh``: the 1-D ``DeviceMesh`` of the stage's ranks; the card's shard is its index in the mesh.
    Heads, KV groups, MLP columns and vocabulary rows are split as the planner counts them
    (:mod:`cachefit.deploy.tensor_parallel`), for any card count the plan gives: in balanced sizes, or
    in the ranges a proportional split records (``placement.shard_parts``); the modules to cut are
    the family's :class:`~cachefit.families.TensorParallelSpec`.
    """
    from cachefit.deploy.tensor_parallel import shard_stage_

    shard_stage_(root, [_parse_unit(n) for n in placement.unit_names], get_family(root.config.model_type),
                 rank=mesh.get_local_rank(), shards=placement.shards, group=mesh.get_group(),
                 where=placement.describe(), parts=placement.unit_parts)


def stage_weight_bytes(stage: TransformerStage, dtype_name: str) -> dict[str, int]:
    """Weight bytes the stage really holds: counted as the plan counts them and as allocated.

    ``planned_dtype``: per unit, the elements of every tensor it owns (the local shard of a split
    tensor; a tied tensor in each unit reading it) times the bytes of ``dtype_name`` (the plan's
    weight dtype): comparable to the plan's ``weight_bytes``. ``allocated``: the bytes of the distinct
    storages in the run dtype. A card of an evenly split stage holds the largest shard's shapes (smaller
    shards padded with zeros, :mod:`cachefit.deploy.tensor_parallel`), one of a proportional split its
    own slices, so on every card both are what the plan gives that card.
    """
    params = dict(stage.model.named_parameters(remove_duplicate=False))
    planned = 0
    for fqn in stage.placement.fqns:
        planned += dtype_bytes(dtype_name, params[fqn].numel())
    allocated = 0
    seen: set[int] = set()
    for p in params.values():
        key = p.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        allocated += p.numel() * p.element_size()
    return {"planned_dtype": planned, "allocated": allocated}


def build_sequential_stage(module: nn.Module, placement: StagePlacement) -> SequentialStage:
    """A stage of an ``nn.Sequential``: its children named by the plan's units."""
    return SequentialStage([(name, module._modules[name]) for name in placement.unit_names])


def run_stages_locally(stages: Sequence[Any], input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Any:
    """Run stages one after another in this process (a pipeline of one micro-batch, no processes)."""
    if isinstance(stages[0], SequentialStage):
        out = input_ids
        for st in stages:
            out = st(out)
        return out
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    out: Any = (input_ids, mask)
    for st in stages:
        out = st(*out) if isinstance(out, tuple) else st(out)
    return out


__all__ = [
    "STAGE_ADAPTERS",
    "DeployLayout",
    "SequentialStage",
    "StagePlacement",
    "TransformerStage",
    "apply_tensor_parallel_",
    "build_sequential_stage",
    "build_stage",
    "compress_units_",
    "compressed_weight_bytes",
    "layout_from_module",
    "layout_from_plan",
    "plan_granularity",
    "prune_",
    "run_stages_locally",
    "stage_weight_bytes",
    "tensor_parallel_plan",
]
