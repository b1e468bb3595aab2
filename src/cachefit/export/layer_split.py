"""A plan as the training and serving engines run a pipeline: whole decoder layers per stage, one
tensor-parallel degree for every stage, every rank the same card.

Megatron-Core (``--pipeline-model-parallel-layout``) and vLLM (``VLLM_PP_LAYER_PARTITION``) both
describe a pipeline by how many decoder layers each stage builds, keep the embedding on the first
stage and the final norm and LM head on the last, and split every stage over the same number of
cards (``--tensor-model-parallel-size`` / ``--tensor-parallel-size``). A cachefit plan can say more:
a stage boundary inside a layer (block granularity), tensor-parallel groups of different sizes,
degrees that do not divide the heads, cards of different kinds. :func:`layer_split` reads the plan
in those terms and lists, in ``problems``, what the engine cannot run as planned; its layer counts
and degree are then the nearest split the engine *can* run (each cut layer whole on the stage that
holds most of its weights, the first degree at or above the largest planned one that the engine
accepts), which the exporters print in their refusal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cachefit.errors import ConfigError
from cachefit.export.modules import listing, pipeline_parts
from cachefit.plan import Plan
from cachefit.units import LayerShape, ModelProfile


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerSplit:
    """Decoder layers per pipeline stage and one tensor-parallel degree (the nearest the engine runs)."""

    num_layers: int
    """Decoder layers of the model."""
    layers_per_stage: tuple[int, ...]
    """Decoder layers each pipeline stage builds, in order (the embedding is on the first stage, the
    final norm and LM head on the last, whatever their counts)."""
    tensor_parallel: int
    """Cards every stage is split over."""
    planned_tensor_parallel: int
    """The most cards the plan splits a stage over."""
    stage_units: tuple[tuple[str, ...], ...]
    """The plan's unit names of each stage (for the comments of an export)."""
    stage_cards: tuple[tuple[int, ...], ...]
    """The plan's cards of each stage."""
    problems: tuple[str, ...] = ()
    """What the engine cannot run as planned; empty when the split is the plan itself."""

    @property
    def pipeline_parallel(self) -> int:
        return len(self.layers_per_stage)

    @property
    def num_cards(self) -> int:
        """Cards of one model replica: pipeline stages x tensor-parallel degree."""
        return self.pipeline_parallel * self.tensor_parallel


TensorParallelRule = Callable[[LayerShape, int], str | None]
"""The reason an engine refuses a tensor-parallel degree for a layer shape, or None when it accepts it."""


def _layer_shape(profile: ModelProfile) -> LayerShape | None:
    for unit in profile.units:
        if unit.layer is not None and unit.shape is not None and unit.shape.num_heads:
            return unit.shape
    return None


def _nearest_degree(shape: LayerShape | None, degree: int, rule: TensorParallelRule) -> int:
    """The first degree at or above ``degree`` that ``rule`` accepts (each shard no larger than
    planned), else the largest below it."""
    if shape is None or rule(shape, degree) is None:
        return degree
    top = max(degree, shape.num_heads)
    for d in range(degree + 1, top + 1):
        if rule(shape, d) is None:
            return d
    for d in range(degree - 1, 0, -1):
        if rule(shape, d) is None:
            return d
    return 1


def layer_split(plan: Plan, profile: ModelProfile, *, engine: str, tp_rule: TensorParallelRule) -> LayerSplit:
    """The plan as whole layers per stage and one tensor-parallel degree, with what ``engine`` cannot run.

    Args:
        plan: the plan.
        profile: the profile the plan was made from.
        engine: the engine's name, for messages (``Megatron-Core``, ``vLLM``).
        tp_rule: why the engine refuses a tensor-parallel degree for the model's layer shape, or None.

    Raises:
        ConfigError: the profile's units are not an embedding, numbered decoder layers and a head (a
            live-module profile), so no engine layout can name them.
    """
    units = profile.units
    layers = sorted({u.layer for u in units if u.layer is not None})
    n_layer = len(layers)
    middle = units[1:-1]
    if (not n_layer or layers != list(range(n_layer)) or units[0].layer is not None or units[-1].layer is not None
            or any(u.layer is None for u in middle)):
        raise ConfigError(
            f"profile of {profile.model}: {engine} places an embedding, numbered decoder layers and a head, and the "
            f"units are {listing([u.name for u in units], 5)}; export a plan made from a config.json, a model "
            "directory or a preset"
        )
    if any(u.shape is not None and not u.shape.causal for u in middle):
        raise ConfigError(
            f"{profile.model} is an encoder (bidirectional attention); {engine}'s pipeline layouts are for decoder "
            "language models: use --to pipelining or --to accelerate"
        )
    parts = pipeline_parts(plan)
    part_of_unit = [p.index for p in parts for _ in range(*p.units)]
    per_part: dict[int, dict[int, int]] = {}  # layer -> part -> weight bytes of its units there
    for i, unit in enumerate(units):
        if unit.layer is not None:
            share = per_part.setdefault(unit.layer, {})
            share[part_of_unit[i]] = share.get(part_of_unit[i], 0) + unit.footprint.weight_bytes
    # a layer the plan cuts goes whole to the stage holding most of its weights (the earlier on a tie);
    # the stages stay in order, as a layer spans at most two neighbouring stages
    home = [max(per_part[il], key=lambda p: (per_part[il][p], -p)) for il in range(n_layer)]
    counts = [0] * len(parts)
    for p in home:
        counts[p] += 1

    problems: list[str] = []
    cut = [str(il) for il in range(n_layer) if len(per_part[il]) > 1]
    if cut:
        problems.append(
            f"{len(cut)} stage boundar{'y falls' if len(cut) == 1 else 'ies fall'} inside decoder layer(s) "
            f"{listing(cut, 6)} (block granularity), and {engine} builds whole layers per stage"
        )
    kinds = sorted({(s.device, s.level, s.capacity_bytes) for s in plan.stages})
    if len(kinds) > 1:
        names = sorted({f"{d} {lv} ({c:,} B)" for d, lv, c in kinds})
        problems.append(
            f"the plan mixes {len(kinds)} kinds of card ({listing(names, 3)}) and {engine} runs every rank alike; "
            "re-plan on one kind for a split balanced for it"
        )
    degrees = sorted({p.tensor_parallel for p in parts})
    if len(degrees) > 1:
        problems.append(
            f"stages are split tensor-parallel over {', '.join(map(str, degrees[:-1]))} and {degrees[-1]} cards, "
            f"and {engine} splits every stage over the same number"
        )
    shape = _layer_shape(profile)
    planned = degrees[-1]
    refused = tp_rule(shape, planned) if shape is not None else None
    if refused:
        problems.append(f"uneven shards: {refused}")
    return LayerSplit(
        num_layers=n_layer,
        layers_per_stage=tuple(counts),
        tensor_parallel=_nearest_degree(shape, planned, tp_rule),
        planned_tensor_parallel=planned,
        stage_units=tuple(p.unit_names for p in parts),
        stage_cards=tuple(p.cards for p in parts),
        problems=tuple(problems),
    )


def stage_layers_text(split: LayerSplit, stage: int) -> str:
    """``embed, layers 0-2`` / ``layers 3-5, head``: what a stage of the split builds."""
    start = sum(split.layers_per_stage[:stage])
    n = split.layers_per_stage[stage]
    what = [f"layers {start}-{start + n - 1}" if n > 1 else f"layer {start}"] if n else []
    if stage == 0:
        what.insert(0, "embed")
    if stage == split.pipeline_parallel - 1:
        what.append("head")
    return ", ".join(what) or "no layers"


def refusal(plan: Plan, split: LayerSplit, engine: str, nearest: str) -> ConfigError:
    """The one-line error for a plan the engine cannot run as planned, naming the nearest it can."""
    fewer = ("; its stages split over fewer cards than planned, so the largest shards hold more than the plan's"
             if split.tensor_parallel < split.planned_tensor_parallel else "")
    return ConfigError(
        f"plan of {plan.model} cannot run on {engine} as planned: {'; '.join(split.problems)}; the nearest "
        f"{engine} runs: {nearest} ({split.num_cards} cards: {split.pipeline_parallel} stage(s) x "
        f"{split.tensor_parallel}-way tensor parallel{fewer})"
    )


__all__ = ["LayerSplit", "TensorParallelRule", "layer_split", "refusal", "stage_layers_text"]
