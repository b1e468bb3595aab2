"""What every export needs: the real module names of a profile's units, and a plan's pipeline parts.

A unit lists the tensors it owns by their FQNs in the ``transformers`` model
(``model.layers.3.self_attn.q_proj.weight``). Other tools place *modules*, not tensors, so each unit is
named by the fewest modules that hold exactly its tensors: the longest common module prefix of its
tensors (``model.layers.3``; raised to the highest ancestor that holds nothing else, so ``pooler``
rather than ``pooler.dense``), or, where that module also holds another unit's tensors (a block unit
cut inside a layer, an embedding unit whose tables sit beside the layers), its children, recursively
(``model.layers.3.input_layernorm`` and ``model.layers.3.self_attn``; ``transformer.wte`` and
``transformer.wpe``). A tensor owned directly by a module that is shared with another unit keeps its
own FQN (a fallback no supported family needs; accelerate's ``check_device_map`` matches a key equal
to a tensor name). When both blocks of a layer go to the same card or stage, the layer is named by its
own module (:func:`placement_keys`).

A plan's stages are grouped into *pipeline parts*: one card, or the cards of a tensor-parallel group
(stages with the same unit range and a ``shard``), in pipeline order.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cachefit.errors import CachefitError, ConfigError
from cachefit.plan import Plan, Stage
from cachefit.units import ModelProfile, Workload

_BLOCK_SUFFIXES = (".attn", ".mlp")


def _module_path(fqn: str) -> tuple[str, ...]:
    """The module that owns a tensor: its FQN without the last component."""
    return tuple(fqn.split(".")[:-1])


def _prefixes(path: tuple[str, ...]) -> list[str]:
    """Every module on the way to ``path``, the root ``""`` first."""
    return [".".join(path[:i]) for i in range(len(path) + 1)]


def _common(paths: Sequence[tuple[str, ...]]) -> tuple[str, ...]:
    first = paths[0]
    n = len(first)
    for path in paths[1:]:
        n = min(n, len(path))
        for i in range(n):
            if path[i] != first[i]:
                n = i
                break
    return first[:n]


def _modules_for(fqns: Sequence[str], unit: int, owners: Mapping[str, set[int]]) -> list[str]:
    """The fewest module names (or tensor FQNs) that cover ``fqns`` and nothing of another unit."""
    common = _common([_module_path(f) for f in fqns])
    name = ".".join(common)
    if owners[name] == {unit}:
        # Climb to the highest module that still holds nothing of another unit (``pooler`` rather
        # than ``pooler.dense``), so parameter-free siblings and buffers go with the unit.
        while common and owners[".".join(common[:-1])] == {unit}:
            common = common[:-1]
        return [".".join(common)]
    # The common module holds another unit's tensors too: descend one level, keeping the order in
    # which the unit lists its tensors (execution order, near enough).
    out: list[str] = []
    groups: dict[str, list[str]] = {}
    order: list[tuple[str, str]] = []  # ("tensor", fqn) or ("child", name)
    for fqn in fqns:
        parts = fqn.split(".")
        if len(parts) - 1 == len(common):
            order.append(("tensor", fqn))  # owned directly by the shared module: name the tensor
        else:
            child = parts[len(common)]
            if child not in groups:
                groups[child] = []
                order.append(("child", child))
            groups[child].append(fqn)
    for kind, key in order:
        if kind == "tensor":
            out.append(key)
        else:
            out.extend(_modules_for(groups[key], unit, owners))
    return out


def _owners(profile: ModelProfile) -> dict[str, set[int]]:
    """Module name (and tensor FQN) -> indices of the units with a tensor under it."""
    owners: dict[str, set[int]] = {}
    seen: dict[str, str] = {}
    for i, unit in enumerate(profile.units):
        if not unit.tensors:
            raise ConfigError(
                f"profile of {profile.model}: unit {unit.name!r} lists no tensors, so its modules cannot be "
                "named; export from a profile built from a config.json, a model directory or a preset"
            )
        for t in unit.tensors:
            if t.name in seen:
                raise ConfigError(
                    f"profile of {profile.model}: tensor {t.name!r} is listed by units {seen[t.name]!r} and "
                    f"{unit.name!r}; each tensor must belong to one unit"
                )
            seen[t.name] = unit.name
            for prefix in _prefixes(_module_path(t.name)):
                owners.setdefault(prefix, set()).add(i)
            owners.setdefault(t.name, set()).add(i)
    return owners


def unit_modules(profile: ModelProfile) -> tuple[tuple[str, ...], ...]:
    """For each unit of ``profile``, the module names of the real model that hold exactly its tensors.

    Raises:
        ConfigError: a unit lists no tensors (a profile without FQNs cannot name modules) or two units
            list the same tensor.
    """
    owners = _owners(profile)
    return tuple(tuple(_modules_for([t.name for t in u.tensors], i, owners)) for i, u in enumerate(profile.units))


def placement_keys(profile: ModelProfile, group_of_unit: Sequence[int]) -> list[tuple[str, int]]:
    """Module names in execution order, each with the group (card, stage) of its unit.

    At block granularity a layer is two units; when both land in the same group the layer is named by
    its own module (``model.layers.3``) rather than by its blocks' submodules, which stay only for a
    layer the plan cuts.
    """
    owners = _owners(profile)
    modules = unit_modules(profile)
    layer_units: dict[int, list[int]] = {}
    for i, unit in enumerate(profile.units):
        if unit.layer is not None:
            layer_units.setdefault(unit.layer, []).append(i)
    merged: dict[int, str] = {}  # first unit of a merged layer -> the layer's module
    skip: set[int] = set()
    for units in layer_units.values():
        if len(units) < 2 or len({group_of_unit[u] for u in units}) > 1:
            continue
        paths = [_module_path(t.name) for u in units for t in profile.units[u].tensors]
        name = ".".join(_common(paths))
        if name and owners[name] <= set(units):
            merged[units[0]] = name
            skip.update(units[1:])
    out: list[tuple[str, int]] = []
    for i in range(len(profile.units)):
        if i in skip:
            continue
        if i in merged:
            out.append((merged[i], group_of_unit[i]))
        else:
            out += [(key, group_of_unit[i]) for key in modules[i]]
    return out


def key_covers(key: str, fqn: str) -> bool:
    """accelerate's rule: a device-map key covers a tensor equal to it or under it (``""`` covers all)."""
    return key == "" or fqn == key or fqn.startswith(key + ".")


@dataclass(frozen=True, slots=True, kw_only=True)
class PipelinePart:
    """One pipeline stage of a plan: a card, or the cards of a tensor-parallel group."""

    index: int
    """Position in the pipeline (0 first)."""
    units: tuple[int, int]
    """``(start, end_exclusive)`` indices into the profile's units."""
    unit_names: tuple[str, ...]
    cards: tuple[int, ...]
    """The card, or the group's cards in shard order."""
    stages: tuple[Stage, ...]
    """The plan's stages of the part (one per card)."""

    @property
    def tensor_parallel(self) -> int:
        """Cards the part's units are split over (1: not split)."""
        return len(self.cards)

    @property
    def weight_bytes(self) -> int:
        """Weight bytes of the whole part (every shard's)."""
        return sum(s.footprint.weight_bytes for s in self.stages)


def pipeline_parts(plan: Plan) -> tuple[PipelinePart, ...]:
    """Group a plan's stages into pipeline parts (tensor-parallel shards of one unit range together)."""
    parts: list[PipelinePart] = []
    group: list[Stage] = []

    def close() -> None:
        if group:
            first = group[0]
            parts.append(PipelinePart(index=len(parts), units=first.units, unit_names=first.unit_names,
                                      cards=tuple(s.card for s in group), stages=tuple(group)))
            group.clear()

    for stage in plan.stages:
        joins = bool(group) and stage.shard is not None and stage.shard[0] > 0 and stage.units == group[0].units
        if not joins:
            close()
        group.append(stage)
    close()
    return tuple(parts)


def plan_granularity(plan: Plan) -> str:
    """``block`` when the plan's units are attention / MLP blocks, else ``layer``."""
    names = (n for s in plan.stages for n in s.unit_names)
    return "block" if any(n.endswith(_BLOCK_SUFFIXES) for n in names) else "layer"


def _plan_workload(plan: Plan) -> Workload:
    fields = {f.name for f in dataclasses.fields(Workload)}
    try:
        return Workload(**{k: v for k, v in dict(plan.workload).items() if k in fields})
    except (CachefitError, TypeError, ValueError):
        return Workload()  # the names of the modules do not depend on the workload


def profile_for_plan(plan: Plan, model: str | os.PathLike[str] | None = None) -> ModelProfile:
    """Profile the model a plan was made for again, to get its tensors' FQNs.

    Args:
        plan: the plan (its ``model`` is a preset name or the config path it was planned from).
        model: a preset name, ``config.json`` or model directory to use instead of ``plan.model``
            (the plan was made elsewhere, or from a path relative to another directory).

    Raises:
        ConfigError: the model cannot be found, or its units do not match the plan's.
    """
    from cachefit.profile import profile_model

    source = plan.model if model is None else model
    granularity = plan_granularity(plan)
    try:
        profile = profile_model(source, _plan_workload(plan), granularity=granularity)
    except CachefitError as exc:
        hint = "" if model is not None else "; give the model with --model CONFIG.json|MODEL_DIR|PRESET"
        raise ConfigError(f"cannot profile {str(source)!r}, the model of the plan, again: {exc}{hint}") from None
    if len(profile.units) != plan.num_units:
        raise ConfigError(
            f"plan of {plan.model}: {plan.num_units} units, but {str(source)!r} at {granularity} granularity has "
            f"{len(profile.units)}; give the model the plan was made for with --model"
        )
    for stage in plan.stages:
        start, end = stage.units
        names = tuple(u.name for u in profile.units[start:end])
        if names != stage.unit_names:
            raise ConfigError(
                f"plan of {plan.model}: card {stage.card} holds units {list(stage.unit_names)}, but units "
                f"{start}..{end - 1} of {str(source)!r} are {list(names)}; give the model the plan was made for "
                "with --model"
            )
    return profile


def compression_warning(plan: Plan, tool: str, how: str) -> str | None:
    """A warning naming the units the plan compresses (the exported placement does not compress)."""
    compressed: list[str] = []
    for stage in plan.stages:
        if stage.shard is not None and stage.shard[0] > 0:
            continue
        if stage.unit_compression:
            compressed += [f"{n} ({'+'.join(c)})" for n, c in zip(stage.unit_names, stage.unit_compression) if c]
        elif stage.compression:
            compressed += [f"{n} ({'+'.join(stage.compression)})" for n in stage.unit_names]
    if not compressed:
        return None
    shown = listing(compressed, 6)
    return (f"the plan compresses {len(compressed)} unit(s): {shown}; {tool} only places modules, so {how}, "
            "or the cards hold more bytes than planned")


EXPORT_SCHEMA = "cachefit.export/1"


@dataclass(frozen=True, slots=True, kw_only=True)
class Export:
    """A plan in another tool's terms."""

    format: str
    """``accelerate``, ``pipelining``, ``deepspeed``, ``llamacpp``, ``megatron`` or ``vllm``."""
    model: str
    """The model the plan was made for."""
    document: Mapping[str, Any]
    """The export as JSON-ready data (for accelerate: the device map itself)."""
    text: str
    """What the tool reads: the JSON text, a code snippet or command-line flags (ends with a newline)."""
    warnings: tuple[str, ...] = ()
    """What the tool cannot express of the plan, and what was done instead."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": EXPORT_SCHEMA,
            "format": self.format,
            "model": self.model,
            "document": dict(self.document),
            "warnings": list(self.warnings),
        }


def render_json(document: Any) -> str:
    """JSON with one line per list of numbers or strings (``json.dumps(indent=2)`` gives one per item)."""

    def render(value: Any, indent: int) -> str:
        pad = " " * indent
        if isinstance(value, Mapping):
            if not value:
                return "{}"
            items = [f'{pad}  {json.dumps(str(k))}: {render(v, indent + 2)}' for k, v in value.items()]
            return "{\n" + ",\n".join(items) + f"\n{pad}}}"
        if isinstance(value, (list, tuple)):
            if all(not isinstance(v, (Mapping, list, tuple)) for v in value):
                return json.dumps(list(value))
            items = [f"{pad}  {render(v, indent + 2)}" for v in value]
            return "[\n" + ",\n".join(items) + f"\n{pad}]"
        return json.dumps(value)

    return render(document, 0) + "\n"


def card_span(cards: Sequence[int]) -> str:
    """``"3-5"`` for consecutive cards, else ``"3, 7"``."""
    cards = list(cards)
    if len(cards) > 1 and cards == list(range(cards[0], cards[0] + len(cards))):
        return f"{cards[0]}-{cards[-1]}"
    return ", ".join(map(str, cards))


def listing(items: Sequence[str], limit: int = 4) -> str:
    """The first ``limit`` items, then how many more."""
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def split_parts_text(parts: Sequence[PipelinePart]) -> str | None:
    """``"embed..layers.0.attn over cards 0-23, ..."`` for the tensor-parallel parts, or None."""
    split = [f"{p.unit_names[0]}..{p.unit_names[-1]} over cards {card_span(p.cards)}" if len(p.unit_names) > 1
             else f"{p.unit_names[0]} over cards {card_span(p.cards)}" for p in parts if p.tensor_parallel > 1]
    if not split:
        return None
    return f"{len(split)} stage(s) split tensor-parallel ({listing(split, 3)})"


def tied_tensors(profile: ModelProfile) -> tuple[tuple[int, str, str], ...]:
    """``(unit index, tensor FQN, FQN it is tied to)`` of every tied tensor (a tied LM head)."""
    return tuple((i, t.name, t.tied_to) for i, u in enumerate(profile.units) for t in u.tensors if t.tied_to)


def unit_of_tensor(profile: ModelProfile) -> dict[str, int]:
    """Index of the unit that lists each tensor FQN."""
    return {t.name: i for i, u in enumerate(profile.units) for t in u.tensors}


__all__ = [
    "EXPORT_SCHEMA",
    "Export",
    "PipelinePart",
    "card_span",
    "compression_warning",
    "key_covers",
    "listing",
    "pipeline_parts",
    "placement_keys",
    "plan_granularity",
    "profile_for_plan",
    "render_json",
    "split_parts_text",
    "tied_tensors",
    "unit_modules",
    "unit_of_tensor",
]
