"""``Stage`` and ``Plan``: the planner's decision as a plain, serializable value.

``cost``, ``report`` and ``deploy`` read a Plan; nothing downstream re-decides it. The JSON form is
versioned (``schema``: ``cachefit.plan/1``) and documented in ``docs/plan-schema.md``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cachefit.errors import ConfigError
from cachefit.limits import check_limit
from cachefit.partition.split import ShardParts
from cachefit.profile.measure import MEMORY_SOURCES
from cachefit.units import Footprint

PLAN_SCHEMA = "cachefit.plan/1"


@dataclass(frozen=True, slots=True, kw_only=True)
class Stage:
    """What one card holds: a contiguous range of units (or one shard of a split unit)."""

    card: int
    """Index of the card in the cluster."""
    device: str
    """Catalog name of the card's device."""
    level: str
    """The on-chip memory level the stage must fit (e.g. ``l2``)."""
    units: tuple[int, int]
    """``(start, end_exclusive)`` indices into the profile's units."""
    unit_names: tuple[str, ...]
    footprint: Footprint
    """Bytes the card needs for the stage, stacked as :func:`cachefit.units.stack_footprints` does."""
    capacity_bytes: int
    """What the card offers after headroom and reserved bytes."""
    shard: tuple[int, int] | None = None
    """``(index, count)`` when the stage holds one shard of a unit split over ``count`` cards."""
    compression: tuple[str, ...] = ()
    """Techniques applied to any of the stage's units (canonical order)."""
    unit_compression: tuple[tuple[str, ...], ...] = ()
    """Techniques applied to each unit of the stage (aligned with ``unit_names``; empty: none)."""
    collective_bytes_per_token: int = 0
    """Bytes this card sends per token in the collectives of a split stage (0 when not split)."""
    shard_parts: tuple[ShardParts, ...] = ()
    """Where the split is proportional (cards of different sizes): the slices of each unit of the
    stage this card holds (heads, KV heads, MLP columns, vocabulary rows), aligned with
    ``unit_names``; its bytes are this shard's own. Empty: not split, or split evenly (every card the
    balanced sizes of :func:`cachefit.partition.split.shard_unit`, bytes the largest shard's)."""
    predicted_time_s: float | None = None
    """The cost model's time of one micro-batch through this card's stage (forward, and backward in
    train; :func:`cachefit.cost.estimate_cost`, the figure ``cachefit compare`` reports for the card);
    None where the plan was made without the cost model or a figure it needs is unknown."""

    def __post_init__(self) -> None:
        start, end = self.units
        if not 0 <= start < end:
            raise ConfigError(f"stage on card {self.card}: empty or negative unit range {self.units}")
        if len(self.unit_names) != end - start:
            raise ConfigError(f"stage on card {self.card}: {len(self.unit_names)} names for units {self.units}")
        if self.unit_compression and len(self.unit_compression) != end - start:
            raise ConfigError(f"stage on card {self.card}: unit_compression does not match units {self.units}")
        if self.shard_parts and (self.shard is None or len(self.shard_parts) != end - start):
            raise ConfigError(f"stage on card {self.card}: shard_parts need a shard and one entry per unit {self.units}")
        if self.capacity_bytes <= 0:
            raise ConfigError(f"stage on card {self.card}: capacity must be positive")
        if self.predicted_time_s is not None and not (math.isfinite(self.predicted_time_s)
                                                      and self.predicted_time_s >= 0):
            raise ConfigError(f"stage on card {self.card}: predicted_time_s must be a finite number of seconds >= 0, "
                              f"got {self.predicted_time_s!r}")

    @property
    def total_bytes(self) -> int:
        return self.footprint.total_bytes

    @property
    def utilization(self) -> float:
        return self.footprint.total_bytes / self.capacity_bytes

    @property
    def fits(self) -> bool:
        return self.footprint.total_bytes <= self.capacity_bytes

    @property
    def overflow_bytes(self) -> int:
        """Bytes beyond the card's capacity, streamed from off-chip memory (0: the stage fits)."""
        return max(0, self.footprint.total_bytes - self.capacity_bytes)

    @property
    def onchip_bytes(self) -> int:
        """Bytes the card holds on-chip: the stage's bytes up to its capacity."""
        return min(self.footprint.total_bytes, self.capacity_bytes)

    def to_dict(self) -> dict[str, Any]:
        fp = self.footprint
        return {
            "card": self.card,
            "device": self.device,
            "level": self.level,
            "units": [self.units[0], self.units[1]],
            "unit_names": list(self.unit_names),
            "shard": list(self.shard) if self.shard else None,
            "compression": list(self.compression),
            "unit_compression": {
                name: list(techs) for name, techs in zip(self.unit_names, self.unit_compression) if techs
            },
            **fp.to_dict(),
            "capacity_bytes": self.capacity_bytes,
            "utilization": round(self.utilization, 6),
            "onchip_bytes": self.onchip_bytes,
            "overflow_bytes": self.overflow_bytes,
            "collective_bytes_per_token": self.collective_bytes_per_token,
            **({"shard_parts": [p.to_dict() for p in self.shard_parts]} if self.shard_parts else {}),
            "predicted_time_s": self.predicted_time_s,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """A deployment: one stage per card, in pipeline order."""

    model: str
    workload: Mapping[str, Any]
    devices: tuple[str, ...]
    """Device name of each card, in order."""
    objective: str
    """``fewest_cards``, ``balanced``, ``min_time`` (the smallest predicted bottleneck stage time),
    ``fewest_offchip_bytes`` (a partial fit) or ``least_loss``."""
    stages: tuple[Stage, ...]
    num_units: int
    stacking: str = "reuse"
    """How a card's bytes are stacked: ``reuse`` (transient scratch shared) or ``sum`` (the seed's plain sum)."""
    notes: tuple[str, ...] = ()
    provenance: Mapping[str, str] | None = None
    """SHA-256 digests of what the plan was made from: ``profile`` (units, bytes, workload),
    ``cluster`` (cards, capacities, device figures), and the cachefit ``version``."""
    cards_to_fit: int | None = None
    """The fewest cards (copies of the first card) on which a plan fits with the same options; None:
    not known, or no number of cards fits."""
    compress_roles: tuple[str, ...] = ()
    """Weight roles the weight techniques (int8, int4, sparse24) were allowed to touch beyond the
    attention and MLP matrices, e.g. ``head``, ``embed`` (``cachefit plan --compress-roles``)."""
    memory_source: str = "analytic"
    """Where the units' bytes come from: ``analytic`` (:mod:`cachefit.profile.activations`) or
    ``measured`` (the real module run on fake tensors: ``--measure``, ``cachefit.profile.measure``)."""
    predicted_quality: Mapping[str, Any] | None = None
    """A plan made with a quality file (``plan --quality``): ``{"loss": the sum of each compressed
    unit's measured loss, "metric": "kl" | "1-cos", "source": the quality file or None}``; None
    otherwise (and for plans written before the field: :func:`cachefit.deploy.verify.predicted_quality_loss`
    reads their notes)."""

    def __post_init__(self) -> None:
        if self.memory_source not in MEMORY_SOURCES:
            raise ConfigError(
                f"plan of {self.model}: memory_source must be one of {', '.join(MEMORY_SOURCES)}, "
                f"got {self.memory_source!r}"
            )
        expected = 0
        for stage in self.stages:
            start, end = stage.units
            if stage.shard is None or stage.shard[0] == 0:
                if start != expected:
                    raise ConfigError(
                        f"plan of {self.model}: stage on card {stage.card} starts at unit {start}, expected {expected}"
                    )
                expected = end
        if self.stages and expected != self.num_units:
            raise ConfigError(f"plan of {self.model}: stages cover units 0..{expected}, model has {self.num_units}")

    @property
    def cards(self) -> int:
        return len(self.stages)

    @property
    def feasible(self) -> bool:
        return all(stage.fits for stage in self.stages)

    @property
    def bottleneck_bytes(self) -> int:
        return max(stage.total_bytes for stage in self.stages)

    @property
    def mean_utilization(self) -> float:
        return sum(s.utilization for s in self.stages) / len(self.stages)

    def to_dict(self) -> dict[str, Any]:
        from cachefit.version import __version__

        utils = [s.utilization for s in self.stages]
        return {
            "schema": PLAN_SCHEMA,
            "cachefit_version": __version__,
            "model": self.model,
            "workload": dict(self.workload),
            "devices": list(self.devices),
            "objective": self.objective,
            "stacking": self.stacking,
            "memory_source": self.memory_source,
            "feasible": self.feasible,
            "cards": self.cards,
            "cards_to_fit": self.cards_to_fit,
            "num_units": self.num_units,
            "compress_roles": list(self.compress_roles),
            "summary": {
                "bottleneck_bytes": self.bottleneck_bytes,
                "mean_utilization": round(self.mean_utilization, 6),
                "min_utilization": round(min(utils), 6),
                "max_utilization": round(max(utils), 6),
                "spread": round(max(utils) - min(utils), 6),
                "overflow_bytes": sum(s.overflow_bytes for s in self.stages),
            },
            "stages": [s.to_dict() for s in self.stages],
            "notes": list(self.notes),
            "predicted_quality": dict(self.predicted_quality) if self.predicted_quality else None,
            "provenance": dict(self.provenance) if self.provenance else None,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "plan") -> Plan:
        """Read a plan back from its JSON form (``schema`` must be ``cachefit.plan/1``)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a JSON object, got {type(data).__name__}")
        if data.get("schema") != PLAN_SCHEMA:
            raise ConfigError(
                f"{where}: schema is {data.get('schema')!r}, expected {PLAN_SCHEMA!r}; write it with `cachefit plan --json`"
            )
        _check_sizes(data, where)
        try:
            stages = tuple(
                Stage(
                    card=int(st["card"]),
                    device=str(st["device"]),
                    level=str(st["level"]),
                    units=(int(st["units"][0]), int(st["units"][1])),
                    unit_names=tuple(st["unit_names"]),
                    unit_compression=tuple(
                        tuple(st.get("unit_compression", {}).get(name, ())) for name in st["unit_names"]
                    ),
                    footprint=Footprint(
                        weight_bytes=int(st["weight_bytes"]),
                        activation_bytes=int(st["activation_bytes"]),
                        buffer_bytes=int(st["buffer_bytes"]),
                        persistent_activation_bytes=int(st.get("persistent_activation_bytes", 0)),
                    ),
                    capacity_bytes=int(st["capacity_bytes"]),
                    shard=(int(st["shard"][0]), int(st["shard"][1])) if st.get("shard") else None,
                    compression=tuple(st.get("compression", ())),
                    collective_bytes_per_token=int(st.get("collective_bytes_per_token", 0)),
                    shard_parts=tuple(ShardParts.from_dict(p, where=f"{where}: stage on card {st['card']}")
                                      for p in (st.get("shard_parts") or ())),
                    predicted_time_s=None if st.get("predicted_time_s") is None else float(st["predicted_time_s"]),
                )
                for st in data["stages"]
            )
            plan = cls(
                model=str(data["model"]),
                workload=dict(data["workload"]),
                devices=tuple(data["devices"]),
                objective=str(data["objective"]),
                stages=stages,
                num_units=int(data["num_units"]),
                stacking=str(data.get("stacking", "reuse")),
                notes=tuple(data.get("notes", ())),
                provenance=dict(data["provenance"]) if data.get("provenance") else None,
                cards_to_fit=None if data.get("cards_to_fit") is None else int(data["cards_to_fit"]),
                compress_roles=tuple(str(r) for r in data.get("compress_roles", ())),
                memory_source=str(data.get("memory_source", "analytic")),  # plans made before it: analytic
                predicted_quality=_predicted_quality(data.get("predicted_quality"), where),
            )
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as exc:
            raise ConfigError(f"{where}: malformed plan ({type(exc).__name__}: {exc}); regenerate it with `cachefit plan --json`") from None
        return plan


def _predicted_quality(value: Any, where: str) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping) or not isinstance(value.get("metric"), str):
        raise ConfigError(f"{where}: predicted_quality must be an object with loss, metric and source "
                          "(or null); regenerate the plan with `cachefit plan --json`")
    source = value.get("source")
    return {"loss": float(value["loss"]), "metric": value["metric"],
            "source": None if source is None else str(source)}


def _check_sizes(data: Mapping[str, Any], where: str) -> None:
    """Stage and unit counts within cachefit's limits, and no NaN or infinity anywhere, before any
    stage is built."""
    stages, num_units = data.get("stages"), data.get("num_units")
    if isinstance(stages, list):
        check_limit(len(stages), "MAX_CARDS", where=where, what="stages")
    if isinstance(num_units, int) and not isinstance(num_units, bool):
        check_limit(num_units, "MAX_UNITS", where=where, what="num_units")
    todo: list[tuple[str, Any]] = [("", data)]
    while todo:  # iterative: a plan handed in as a dict was not depth-checked by the JSON reader
        path, value = todo.pop()
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}: {path or 'the plan'} is {value}, not a finite number; "
                              "regenerate the plan with `cachefit plan --json`")
        if isinstance(value, Mapping):
            todo.extend((f"{path}.{key}" if path else str(key), item) for key, item in value.items())
        elif isinstance(value, (list, tuple)):
            todo.extend((f"{path}[{i}]", item) for i, item in enumerate(value))


def load_plan(path: str | os.PathLike) -> Plan:
    """Read a plan JSON file written by ``cachefit plan --json``.

    Raises:
        ConfigError: the file is unreadable, over a limit of :mod:`cachefit.limits`, not JSON,
            holds NaN or infinity, or is not a valid plan; the message names the file.
    """
    from cachefit.files import read_json

    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"load_plan: expected a path to a plan JSON file, got {type(path).__name__}")
    data = read_json(path, what="plan file")
    return Plan.from_dict(data, where=f"plan file {os.fspath(path)!r}")


def cluster_digest(cluster_dict: Mapping[str, Any]) -> str:
    """SHA-256 of a cluster's canonical JSON (``cachefit.hardware.devices.cluster_to_dict``)."""
    text = json.dumps(cluster_dict, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def check_provenance(plan: Plan, *, profile_digest: str | None = None, cluster_digest_: str | None = None) -> None:
    """Refuse a plan made for another model, workload or set of cards, saying what differs.

    Raises:
        ConfigError: the plan has no provenance, or a digest differs.
    """
    if not plan.provenance:
        raise ConfigError(
            f"plan of {plan.model}: records no provenance (made by an older cachefit?); re-run `cachefit plan --json`"
        )
    problems = []
    if profile_digest is not None and plan.provenance.get("profile") != profile_digest:
        problems.append(
            "the model or workload differs from the one the plan was made for (profile digest "
            f"{plan.provenance.get('profile', '?')[:12]} in the plan, {profile_digest[:12]} now)"
        )
    if cluster_digest_ is not None and plan.provenance.get("cluster") != cluster_digest_:
        problems.append(
            "the cards differ from the ones the plan was made for (cluster digest "
            f"{plan.provenance.get('cluster', '?')[:12]} in the plan, {cluster_digest_[:12]} now)"
        )
    if problems:
        raise ConfigError(f"plan of {plan.model}: " + "; ".join(problems) + "; re-plan with `cachefit plan`")
