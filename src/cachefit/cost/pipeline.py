"""Pipeline cost of a plan: stage times, transfers, the schedule, throughput, latency and bubbles.

A plan's stages run as a pipeline: pipeline stage ``g`` is one card, or the cards of one
tensor-parallel group (they run their shards at the same time). Each micro-batch crosses the
boundary between stages ``g`` and ``g + 1`` as an activation of ``tokens x hidden x act bytes``
(``B x T x hidden``), sent over one direction of the link in ``bytes / (link / 2) + hop latency`` (the
larger ``hop_latency_s`` of the two cards; see :mod:`cachefit.cost.roofline`); links are separate
engines, so a transfer overlaps the next micro-batch's compute, but a link carries one transfer at a
time. Where a figure a time needs is missing (a stage's, or a link's bandwidth or hop latency) the
plan's times are ``None`` and ``missing`` names the figures; the byte counts are still given.

The schedule is *simulated*, not read off a formula: every stage runs its operations in the order
its schedule fixes, each starting when the stage is free and its input has arrived.

* ``gpipe`` (Huang et al., "GPipe", NeurIPS 2019): all forward passes, then (train) all backward passes;
* ``1f1b`` (Narayanan et al., "Efficient Large-Scale Language Model Training on GPU Clusters Using
  Megatron-LM", SC 2021, sec. 2.2.1; PipeDream-Flush): stage ``i`` of ``p`` runs ``min(p - i - 1, m)``
  warm-up forwards, then alternates one forward and one backward, then drains the backwards.

In inference (prefill, decode) there is no backward pass and both schedules are the same. With equal
stage times ``t`` and no transfers both take ``(m + p - 1) t`` per step for ``m`` micro-batches, so
the idle ("bubble") fraction is ``(p - 1) / (m + p - 1)`` (Narayanan et al. 2021 eq. 1; Huang et al.
2019 sec. 2.3); 1F1B's advantage is memory (at most ``p - i`` micro-batches in flight on stage ``i``
instead of ``m``), not time. ``bubble_fraction`` is measured on the simulated schedule with the real,
unequal stage times; ``schedule_bubble_fraction`` is the formula.

**Throughput** (tokens/s), by mode:

* decode: a micro-batch's next token needs its previous one, so ``m`` micro-batches cycle through the
  pipeline: ``m n / max(latency, m x bottleneck)`` (one token per micro-batch per cycle; ``m = 1``
  gives ``n / latency``, enough micro-batches give ``n / bottleneck``);
* prefill: independent requests keep the pipeline full: ``n / bottleneck``;
* train: the optimizer step flushes the pipeline: ``m n / step``.

``n`` is the tokens of one micro-batch, ``bottleneck`` the slowest stage or link per micro-batch, and
``latency`` one micro-batch through the whole pipeline alone (forward, and backward in train). The
token sampled in decode is not sent back to the first stage (one index: negligible).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cachefit.compress.techniques import CompressionConfig, compress_unit
from cachefit.cost.roofline import (
    LINK_LATENCY_S,
    TRAIN_FLOP_FACTOR,
    StageCost,
    compute_dtype,
    estimate_stage,
    hop_latency_for,
    missing_figure,
    one_way_link_bytes_per_s,
    peak_flops_for,
)
from cachefit.errors import ConfigError
from cachefit.hardware.devices import Cluster, DeviceSpec, get_device
from cachefit.partition.split import ShardParts, max_shards, shard_unit, shard_unit_parts
from cachefit.plan import Plan, Stage
from cachefit.units import Mode, ModelProfile, Unit, dtype_bytes

log = logging.getLogger(__name__)

SCHEDULES: tuple[str, ...] = ("1f1b", "gpipe")


def schedule_bubble_fraction(pipeline_stages: int, micro_batches: int) -> float:
    """Idle fraction ``(p - 1) / (m + p - 1)`` of GPipe and 1F1B with equal stage times
    (Narayanan et al. 2021 eq. 1; Huang et al. 2019)."""
    if pipeline_stages < 1 or micro_batches < 1:
        raise ConfigError(
            f"bubble fraction: pipeline stages and micro-batches must be >= 1, got {pipeline_stages}, {micro_batches}"
        )
    return (pipeline_stages - 1) / (micro_batches + pipeline_stages - 1)


# ----------------------------------------------------------------------------------------------
# Schedule simulation


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduledOp:
    """One operation of the simulated schedule."""

    stage: int
    """Pipeline stage (for a transfer: the sending stage of the boundary ``stage -> stage + 1``)."""
    micro_batch: int
    kind: str
    """``forward``, ``backward``, ``send`` (activation forward) or ``send_grad`` (gradient backward)."""
    start_s: float
    end_s: float

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "micro_batch": self.micro_batch, "kind": self.kind,
                "start_s": self.start_s, "end_s": self.end_s}


def _stage_order(i: int, p: int, m: int, schedule: str, train: bool) -> list[tuple[str, int]]:
    if not train:
        return [("forward", k) for k in range(m)]
    if schedule == "gpipe":
        return [("forward", k) for k in range(m)] + [("backward", k) for k in range(m)]
    warmup = min(p - i - 1, m)
    order = [("forward", k) for k in range(warmup)]
    for k in range(m - warmup):
        order += [("forward", warmup + k), ("backward", k)]
    order += [("backward", k) for k in range(m - warmup, m)]
    return order


def simulate_schedule(
    forward_s: Sequence[float],
    *,
    micro_batches: int,
    schedule: str = "1f1b",
    backward_s: Sequence[float] | None = None,
    transfer_s: Sequence[float] | None = None,
) -> tuple[ScheduledOp, ...]:
    """Simulate one step of a pipeline and return every operation with its start and end.

    Args:
        forward_s: forward time of one micro-batch on each pipeline stage.
        micro_batches: micro-batches per step.
        schedule: ``1f1b`` or ``gpipe`` (the same without a backward pass).
        backward_s: backward time per stage (train); None for inference.
        transfer_s: time of one transfer over boundary ``g -> g + 1`` (``len(forward_s) - 1``
            values; gradients go back over the other direction in the same time); None: free.
    """
    p = len(forward_s)
    if p < 1:
        raise ConfigError("schedule: no pipeline stages")
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
        raise ConfigError(f"micro_batches must be a positive integer, got {micro_batches!r}")
    train = backward_s is not None
    if train and len(backward_s) != p:  # type: ignore[arg-type]
        raise ConfigError(f"schedule: {p} forward times but {len(backward_s)} backward times")  # type: ignore[arg-type]
    links = list(transfer_s) if transfer_s is not None else [0.0] * (p - 1)
    if len(links) != p - 1:
        raise ConfigError(f"schedule: {p} stages need {p - 1} transfer times, got {len(links)}")
    if any(t < 0 for t in (*forward_s, *(backward_s or ()), *links)):
        raise ConfigError("schedule: times must be >= 0")
    m = micro_batches
    orders = [_stage_order(i, p, m, schedule, train) for i in range(p)]
    pos = [0] * p
    stage_free = [0.0] * p
    link_free = {("send", g): 0.0 for g in range(p - 1)} | {("send_grad", g): 0.0 for g in range(p - 1)}
    done: dict[tuple[str, int, int], float] = {}  # (kind, stage, micro-batch) -> time its output is ready there
    arrive: dict[tuple[str, int, int], float] = {}  # input of (kind, stage, micro-batch) available at
    ops: list[ScheduledOp] = []

    def ready(kind: str, i: int, k: int) -> float | None:
        if kind == "forward":
            return 0.0 if i == 0 else arrive.get(("forward", i, k))
        if i == p - 1:
            return done.get(("forward", i, k))
        return arrive.get(("backward", i, k))

    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for i in range(p):
            while pos[i] < len(orders[i]):
                kind, k = orders[i][pos[i]]
                at = ready(kind, i, k)
                if at is None:
                    break
                start = max(stage_free[i], at)
                dur = forward_s[i] if kind == "forward" else backward_s[i]  # type: ignore[index]
                end = start + dur
                ops.append(ScheduledOp(stage=i, micro_batch=k, kind=kind, start_s=start, end_s=end))
                stage_free[i] = end
                done[(kind, i, k)] = end
                pos[i] += 1
                remaining -= 1
                progressed = True
                # send the output on: activations forward, gradients backward, one at a time per link
                if kind == "forward" and i < p - 1:
                    key = ("send", i)
                    t0 = max(end, link_free[key])
                    link_free[key] = t0 + links[i]
                    ops.append(ScheduledOp(stage=i, micro_batch=k, kind="send", start_s=t0, end_s=t0 + links[i]))
                    arrive[("forward", i + 1, k)] = t0 + links[i]
                elif kind == "backward" and i > 0:
                    key = ("send_grad", i - 1)
                    t0 = max(end, link_free[key])
                    link_free[key] = t0 + links[i - 1]
                    ops.append(ScheduledOp(stage=i - 1, micro_batch=k, kind="send_grad", start_s=t0,
                                           end_s=t0 + links[i - 1]))
                    arrive[("backward", i - 1, k)] = t0 + links[i - 1]
        if not progressed:  # pragma: no cover - the orders above never deadlock
            raise AssertionError("pipeline schedule deadlocked")
    return tuple(ops)


def makespan_s(ops: Sequence[ScheduledOp]) -> float:
    """Time from the first operation's start to the last one's end."""
    return max((op.end_s for op in ops), default=0.0)


def measured_bubble_fraction(ops: Sequence[ScheduledOp], pipeline_stages: int) -> float:
    """Idle fraction of the stages over the schedule: ``1 - busy / (stages x makespan)``."""
    span = makespan_s(ops)
    if span <= 0:
        return 0.0
    busy = sum(op.end_s - op.start_s for op in ops if op.kind in ("forward", "backward"))
    return max(0.0, 1.0 - busy / (pipeline_stages * span))


# ----------------------------------------------------------------------------------------------
# The plan's cost


@dataclass(frozen=True, slots=True, kw_only=True)
class TransferCost:
    """Activations crossing the boundary between pipeline stages ``stage`` and ``stage + 1``."""

    stage: int
    bytes_per_micro_batch: int
    """``tokens x hidden x act bytes``."""
    link_bytes_per_s: float | None
    """One direction of the slowest link among the sending and receiving cards."""
    time_s: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "bytes_per_micro_batch": self.bytes_per_micro_batch,
                "link_bytes_per_s": self.link_bytes_per_s, "time_s": self.time_s}


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanCost:
    """Predicted speed and traffic of a plan (see the module docstrings of ``cost``)."""

    model: str
    mode: str
    schedule: str
    micro_batches: int
    tokens_per_micro_batch: int
    steps_per_load: int | None
    """None: resident weights are loaded once and never charged per step."""
    link_latency_s: float | None
    """Latency of one chip-to-chip message given for every device; None: each device's own
    ``hop_latency_s``."""
    stages: tuple[StageCost, ...]
    """One per card, in plan order."""
    pipeline_stages: int
    transfers: tuple[TransferCost, ...]
    stage_times_s: tuple[float | None, ...]
    """Time of one micro-batch (forward + backward in train) on each pipeline stage."""
    possible: bool
    """False: some card cannot hold its stage and has nowhere to stream it from."""
    complete: bool
    """False: the plan cannot run, or a figure the times need is missing (they are then None)."""
    latency_s: float | None
    step_s: float | None
    bottleneck_s: float | None
    throughput_tokens_per_s: float | None
    bubble_fraction: float | None
    """Idle fraction of the simulated step (real stage times)."""
    schedule_bubble_fraction: float
    """``(p - 1) / (m + p - 1)``."""
    offchip_bytes_per_step: int
    offchip_bytes_per_token: float
    onchip_bytes_per_token: float
    load_bytes: int
    """Bytes brought on-chip once per load, all cards."""
    fits_on_chip: bool
    """Every card's stage fits its capacity."""
    mean_utilization: float
    """Mean of each card's bytes over its capacity (> 1 where stages do not fit)."""
    compute_utilization: float | None
    """Achieved FLOP/s at ``throughput`` over the cards' summed peak."""
    ops: tuple[ScheduledOp, ...] = ()
    """The simulated step (for the timeline chart)."""
    notes: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    """Figures the times need and the devices lack (``<device> <catalog key>``), each once; the
    times are None when any is missing."""

    def to_dict(self, *, with_ops: bool = False) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "model": self.model,
            "mode": self.mode,
            "schedule": self.schedule,
            "micro_batches": self.micro_batches,
            "tokens_per_micro_batch": self.tokens_per_micro_batch,
            "steps_per_load": self.steps_per_load,
            "link_latency_s": self.link_latency_s,
            "cards": len(self.stages),
            "pipeline_stages": self.pipeline_stages,
            "possible": self.possible,
            "complete": self.complete,
            "fits_on_chip": self.fits_on_chip,
            "latency_s": self.latency_s,
            "step_s": self.step_s,
            "bottleneck_s": self.bottleneck_s,
            "throughput_tokens_per_s": self.throughput_tokens_per_s,
            "bubble_fraction": self.bubble_fraction,
            "schedule_bubble_fraction": self.schedule_bubble_fraction,
            "offchip_bytes_per_step": self.offchip_bytes_per_step,
            "offchip_bytes_per_token": self.offchip_bytes_per_token,
            "onchip_bytes_per_token": self.onchip_bytes_per_token,
            "load_bytes": self.load_bytes,
            "mean_utilization": self.mean_utilization,
            "compute_utilization": self.compute_utilization,
            "stage_times_s": list(self.stage_times_s),
            "stages": [s.to_dict() for s in self.stages],
            "transfers": [t.to_dict() for t in self.transfers],
            "missing": list(self.missing),
            "notes": list(self.notes),
        }
        if with_ops:
            doc["ops"] = [op.to_dict() for op in self.ops]
        return doc


def _device_lookup(devices: Cluster | DeviceSpec | Sequence[DeviceSpec] | Mapping[str, DeviceSpec] | None):
    if devices is None:
        return None
    if isinstance(devices, Cluster):
        return {d.name: d for d in devices.devices}
    if isinstance(devices, DeviceSpec):
        return {devices.name: devices}
    if isinstance(devices, Mapping):
        return dict(devices)
    out: dict[str, DeviceSpec] = {}
    for d in devices:
        if not isinstance(d, DeviceSpec):
            raise ConfigError(f"cost: devices must be DeviceSpec values, got {type(d).__name__}")
        out[d.name] = d
    return out


def _device_for(name: str, lookup: Mapping[str, DeviceSpec] | None) -> DeviceSpec:
    if lookup is not None and name in lookup:
        return lookup[name]
    try:
        return get_device(name)
    except ConfigError:
        raise ConfigError(
            f"cost: the plan names device {name!r}, which is neither among the devices given nor in the catalog; "
            "pass its DeviceSpec (or the cluster the plan was made for)"
        ) from None


def _check_plan_matches(plan: Plan, profile: ModelProfile) -> None:
    if plan.num_units != len(profile.units):
        raise ConfigError(
            f"cost: the plan covers {plan.num_units} units but the profile of {profile.model} has "
            f"{len(profile.units)}; profile the model at the plan's granularity"
        )
    for stage in plan.stages:
        start, end = stage.units
        names = tuple(u.name for u in profile.units[start:end])
        if names != stage.unit_names:
            raise ConfigError(
                f"cost: stage on card {stage.card} holds {list(stage.unit_names)[:3]}... but the profile has "
                f"{list(names)[:3]}... at units {start}..{end - 1}; the plan was made for another profile"
            )
    if dict(plan.workload) != profile.workload.to_dict():
        raise ConfigError(
            f"cost: the plan was made for workload {dict(plan.workload)} but the profile is for "
            f"{profile.workload.to_dict()}; profile the model with the plan's workload"
        )


def _pipeline_groups(plan: Plan) -> list[list[Stage]]:
    groups: list[list[Stage]] = []
    for stage in plan.stages:
        if stage.shard is not None and stage.shard[0] > 0 and groups:
            groups[-1].append(stage)
        else:
            groups.append([stage])
    return groups


def collective_latency_steps(collectives: Sequence[str], shards: int) -> int:
    """Message steps on the critical path of a split unit's collectives: ``2 ceil(log2 s)`` per
    all-reduce, ``ceil(log2 s)`` per all-gather (recursive halving / doubling, Thakur et al. 2005; see
    :data:`cachefit.cost.roofline.LINK_LATENCY_S`)."""
    if shards <= 1:
        return 0
    return sum((2 if name.startswith("all-reduce") else 1) * math.ceil(math.log2(shards)) for name in collectives)


class _UnitCache:
    """Each unit as a card runs it: its shard of a split, then its compression (recomputed)."""

    def __init__(self, profile: ModelProfile, config: CompressionConfig) -> None:
        self.profile, self.config = profile, config
        self.cache: dict[tuple[int, int, tuple[str, ...], ShardParts | None], tuple[Unit, int]] = {}

    def get(self, i: int, shards: int, techniques: tuple[str, ...],
            parts: ShardParts | None = None) -> tuple[Unit, int]:
        """(unit, latency steps of its collectives) for unit ``i`` split ``shards`` ways, compressed:
        the largest of an even split, or with ``parts`` (a proportional split over cards of different
        sizes) the slice this card holds, whose FLOPs and traffic are its own."""
        key = (i, shards, techniques, parts)
        if key not in self.cache:
            unit = self.profile.units[i]
            wl = self.profile.workload
            degree = min(shards, max_shards(unit))
            steps = 0
            if degree > 1:
                shard = shard_unit_parts(unit, parts, degree, wl) if parts is not None else shard_unit(unit, degree, wl)
                unit = shard.unit
                steps = collective_latency_steps(shard.collectives, degree)
            if techniques:
                unit = compress_unit(unit, techniques, wl, self.config)
            self.cache[key] = (unit, steps)
        return self.cache[key]


def _hidden_size(unit: Unit) -> int | None:
    return unit.shape.hidden_size if unit.shape is not None else None


def estimate_cost(
    plan: Plan,
    profile: ModelProfile,
    devices: Cluster | DeviceSpec | Sequence[DeviceSpec] | Mapping[str, DeviceSpec] | None = None,
    *,
    micro_batches: int | None = None,
    schedule: str = "1f1b",
    steps_per_load: int | None = None,
    config: CompressionConfig | None = None,
    link_latency_s: float | None = LINK_LATENCY_S,
) -> PlanCost:
    """Predict the speed and memory traffic of ``plan`` (roofline per card, simulated pipeline).

    Args:
        plan: the plan (made for ``profile``; the cost model never re-decides it).
        profile: the profile the plan was made from (same units and workload).
        devices: the cluster, a device, devices or a name -> device mapping for the plan's device
            names; None: look them up in the catalog.
        micro_batches: micro-batches per step; None: the workload's.
        schedule: ``1f1b`` or ``gpipe`` (identical in inference).
        steps_per_load: charge the load of on-chip weights once every this many steps; None: once
            ever (weights stay resident).
        config: compression options the plan was made with (default: the default config).
        link_latency_s: latency of one chip-to-chip message for every device (an assumption the caller
            owns); None (default): each device's ``hop_latency_s``.

    Raises:
        ConfigError: the plan does not match the profile, a device is unknown, or a bad option.
    """
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    wl = profile.workload
    m = wl.micro_batches if micro_batches is None else micro_batches
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ConfigError(f"micro_batches must be a positive integer, got {micro_batches!r}")
    if steps_per_load is not None and (isinstance(steps_per_load, bool) or not isinstance(steps_per_load, int)
                                       or steps_per_load < 1):
        raise ConfigError(f"steps_per_load must be a positive integer or None, got {steps_per_load!r}")
    _check_plan_matches(plan, profile)
    config = config or CompressionConfig()
    lookup = _device_lookup(devices)
    units_cache = _UnitCache(profile, config)
    notes: list[str] = []
    train = wl.mode is Mode.TRAIN

    tokens = wl.tokens
    if any("batch" in s.compression for s in plan.stages):
        tokens = min(wl.batch, config.target_batch) * wl.query_len
        notes.append(
            f"batch reduced to {config.target_batch} by compression: a micro-batch carries {tokens} tokens, "
            f"not {wl.tokens}"
        )
    if micro_batches is not None and micro_batches != wl.micro_batches and wl.mode is Mode.DECODE:
        notes.append(
            f"the KV cache was profiled for {wl.micro_batches} micro-batch(es) in flight, the cost for {m}; "
            "profile with the same micro-batches for consistent bytes"
        )

    groups = _pipeline_groups(plan)
    stage_costs: list[StageCost] = []
    group_times: list[float | None] = []
    hidden_out: list[int | None] = []
    group_devices: list[list[DeviceSpec]] = []
    for g, members in enumerate(groups):
        times: list[float | None] = []
        devs: list[DeviceSpec] = []
        for stage in members:
            device = _device_for(stage.device, lookup)
            devs.append(device)
            start, end = stage.units
            shards = stage.shard[1] if stage.shard else 1
            techs = stage.unit_compression or ((),) * (end - start)
            parts = stage.shard_parts or (None,) * (end - start)
            got = [units_cache.get(i, shards, tuple(techs[i - start]), parts[i - start]) for i in range(start, end)]
            fp = stage.footprint
            cost = estimate_stage(
                card=stage.card,
                pipeline_stage=g,
                device=device,
                level=stage.level,
                units=stage.units,
                shard=stage.shard,
                weight_bytes=fp.weight_bytes,
                activation_bytes=fp.activation_bytes,
                persistent_activation_bytes=fp.persistent_activation_bytes,
                buffer_bytes=fp.buffer_bytes,
                capacity_bytes=stage.capacity_bytes,
                stage_units=tuple(u for u, _ in got),
                workload=wl,
                tokens_per_micro_batch=tokens,
                collective_bytes_per_token=stage.collective_bytes_per_token,
                collective_latency_steps=sum(steps for _, steps in got),
                steps_per_load=steps_per_load,
                micro_batches=m,
                link_latency_s=link_latency_s,
            )
            stage_costs.append(cost)
            times.append(cost.time_s)
        known = [t for t in times if t is not None]
        group_times.append(max(known) if known and all(c.possible for c in stage_costs[-len(members):]) else None)
        last = members[0].units[1] - 1
        hidden_out.append(_hidden_size(profile.units[last]))
        group_devices.append(devs)

    # -- transfers between pipeline stages
    act_bytes = dtype_bytes(wl.act_dtype, 1)
    transfers: list[TransferCost] = []
    link_missing: list[str] = []
    for g in range(len(groups) - 1):
        hidden = hidden_out[g]
        ends = (*group_devices[g], *group_devices[g + 1])
        links = [one_way_link_bytes_per_s(d) for d in ends]
        link = None if any(bw is None for bw in links) else min(links)  # type: ignore[type-var]
        hop = hop_latency_for(tuple(ends), link_latency_s)
        for d in ends:
            if d.link_bandwidth_bytes_per_s is None:
                link_missing.append(missing_figure(d, "link_bandwidth"))
            if link_latency_s is None and d.hop_latency_s is None:
                link_missing.append(missing_figure(d, "hop_latency"))
        if hidden is None:
            notes.append(f"stage {g}: its last unit has no transformer shape, so the activation it sends is unknown")
            transfers.append(TransferCost(stage=g, bytes_per_micro_batch=0, link_bytes_per_s=link, time_s=None))
            link_missing.append(f"stage {g} activation size (a unit without a transformer shape)")
            continue
        nbytes = tokens * hidden * act_bytes
        t = None if link is None or hop is None else nbytes / link + hop
        transfers.append(TransferCost(stage=g, bytes_per_micro_batch=nbytes, link_bytes_per_s=link, time_s=t))

    possible = all(c.possible for c in stage_costs)
    missing = list(dict.fromkeys([m for c in stage_costs if c.possible for m in c.missing] + link_missing))
    complete = possible and not missing
    for c in stage_costs:
        for note in c.notes:
            if note not in notes and not note.startswith("time unknown: needs"):
                notes.append(note)
    if missing and possible:
        notes.append(f"times unknown: the estimate needs {', '.join(missing)} (not in the device description)")

    p = len(groups)
    latency = step = bottleneck = throughput = bubble = None
    ops: tuple[ScheduledOp, ...] = ()
    if possible and not missing and all(t is not None for t in group_times):
        totals = [float(t) for t in group_times]  # type: ignore[arg-type]
        links_s = [t.time_s or 0.0 for t in transfers]
        if train:
            # forward : backward = 1 : 2 (the FLOP ratio of TRAIN_FLOP_FACTOR)
            fwd = [t / TRAIN_FLOP_FACTOR for t in totals]
            bwd = [t - f for t, f in zip(totals, fwd)]
        else:
            fwd, bwd = totals, None
        one = simulate_schedule(fwd, micro_batches=1, schedule=schedule, backward_s=bwd, transfer_s=links_s)
        ops = simulate_schedule(fwd, micro_batches=m, schedule=schedule, backward_s=bwd, transfer_s=links_s)
        latency = makespan_s(one)
        step = makespan_s(ops)
        bottleneck = max([*totals, *links_s])
        bubble = measured_bubble_fraction(ops, p)
        if wl.mode is Mode.DECODE:
            cycle = max(latency, m * bottleneck)
            throughput = m * tokens / cycle if cycle > 0 else None
        elif wl.mode is Mode.PREFILL:
            throughput = tokens / bottleneck if bottleneck > 0 else None
        else:
            throughput = m * tokens / step if step > 0 else None
    elif not possible:
        notes.append("the plan cannot run: a card without off-chip memory cannot hold its stage")

    step_tokens = m * tokens
    offchip_step = sum(c.offchip_bytes_per_micro_batch for c in stage_costs) * m
    onchip_step = sum(c.onchip_bytes_per_micro_batch for c in stage_costs) * m
    compute_util = None
    if throughput is not None:
        peaks = []
        for stage in plan.stages:
            peak, _ = peak_flops_for(_device_for(stage.device, lookup), compute_dtype(wl))
            peaks.append(peak)
        if all(pk is not None for pk in peaks) and sum(peaks):  # type: ignore[arg-type]
            flops_per_token = sum(c.flops_per_micro_batch for c in stage_costs) / tokens
            compute_util = flops_per_token * throughput / sum(peaks)  # type: ignore[arg-type]
    if steps_per_load is None and any(c.load_bytes for c in stage_costs):
        notes.append("weights that fit stay resident: their one-time load is reported (load_bytes), not charged per step")
    return PlanCost(
        model=plan.model,
        mode=wl.mode.value,
        schedule=schedule,
        micro_batches=m,
        tokens_per_micro_batch=tokens,
        steps_per_load=steps_per_load,
        link_latency_s=link_latency_s,
        stages=tuple(stage_costs),
        pipeline_stages=p,
        transfers=tuple(transfers),
        stage_times_s=tuple(group_times),
        possible=possible,
        complete=complete,
        latency_s=latency,
        step_s=step,
        bottleneck_s=bottleneck,
        throughput_tokens_per_s=throughput,
        bubble_fraction=bubble,
        schedule_bubble_fraction=schedule_bubble_fraction(p, m),
        offchip_bytes_per_step=offchip_step,
        offchip_bytes_per_token=offchip_step / step_tokens,
        onchip_bytes_per_token=onchip_step / step_tokens,
        load_bytes=sum(c.load_bytes for c in stage_costs),
        fits_on_chip=all(c.fits for c in stage_costs),
        mean_utilization=plan.mean_utilization,
        compute_utilization=compute_util,
        ops=ops,
        notes=tuple(notes),
        missing=tuple(missing),
    )


__all__ = [
    "SCHEDULES",
    "collective_latency_steps",
    "PlanCost",
    "ScheduledOp",
    "TransferCost",
    "estimate_cost",
    "makespan_s",
    "measured_bubble_fraction",
    "schedule_bubble_fraction",
    "simulate_schedule",
]
