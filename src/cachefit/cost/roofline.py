"""Roofline time of one card's stage: compute, on-chip traffic and off-chip traffic.

Per micro-batch, a card running its stage needs

* ``compute_s = FLOPs / peak FLOP/s`` for the dtype the matmuls run in;
* ``onchip_s = bytes read from the on-chip level / its bandwidth``;
* ``offchip_s = bytes read from DRAM / HBM / off-chip bandwidth``;

and takes ``max(compute_s, onchip_s, offchip_s)`` (the roofline: Williams, Waterman and Patterson,
"Roofline: an insightful visual performance model for multicore architectures", CACM 2009), plus a
fixed cost per kernel, plus the time of the collectives of a tensor-parallel stage, which are not
overlapped with compute here (the conservative choice; Megatron-LM's all-reduces sit on the critical
path, Shoeybi et al. 2019 sec. 3).

**Fixed costs.** A kernel of ``V`` bytes takes ``T = a + V / b`` (the small-kernel model fitted to
the RRZE ``gpu-small-kernels`` measurements: ``a`` about 2.4 us per kernel on an H200 on one stream,
1.2 us under CUDA graphs). The stage launches ``k`` kernels per micro-batch
(:func:`cachefit.cost.kernels.count_kernels`, counted from each unit's shape and the workload), so
``kernel_s = k x DeviceSpec.kernel_overhead_s`` is *added* to the roofline term, not overlapped with
it: the stage's kernels run one after another on one stream (each depends on the previous one's
output), and the fixed part of each is time in which that kernel moves no bytes and does no
arithmetic. The roofline term already charges the bytes and FLOPs at full rate, so this is the
launch-bound part the roofline has no term for; it dominates small stages (a layer whose bytes take
a few microseconds on a GPU, or any layer of a small model on a CPU). Units without a shape
(live-module profiles) count no kernels.

A device that runs the whole model as one compiled, statically scheduled program (wafer-scale and
dataflow chips: Cerebras, Groq) launches no kernels from a host; what it has instead is the time a
token takes to cross a decoder layer's part of the chip beyond its bytes and FLOPs (the pipeline
latency of the layer: operands crossing the fabric, partial sums reduced over the cores that hold
the layer). Where the catalog gives ``DeviceSpec.layer_latency_s`` it replaces the per-kernel term:
``layer_s = layers x layer_latency_s`` per pass (a block-granularity attention or MLP unit counts half
a layer; embeddings and heads none). Such figures are calibrated on one published result and checked
on others (``docs/validation.md``).

A chip-to-chip message costs ``DeviceSpec.hop_latency_s`` besides its bytes: each message step of a
collective (``2 ceil(log2 s)`` steps for an all-reduce over ``s`` cards, ``ceil(log2 s)`` for an
all-gather: the latency term of recursive halving / doubling, Thakur, Rabenseifner and Gropp,
"Optimization of collective communication operations in MPICH", IJHPCA 2005; the bandwidth term is
the ring's ``2 (s - 1) / s`` of the message, which ``Stage.collective_bytes_per_token`` already
carries) and each activation sent to the next pipeline stage (:mod:`cachefit.cost.pipeline`). A
caller may give one latency for every device instead (``link_latency_s``, an assumption it owns).

**Which bytes are off-chip.** One rule, shared with the planner (:mod:`cachefit.plan.offchip`): the
stage's footprint (weights + activations + buffers, stacked as the plan stacked them) is compared
with the capacity its card offers. The part beyond capacity (``total - capacity``, clipped at 0) is
taken from the weights first (at most all of them): those weights are *streamed* from DRAM on every
micro-batch, the rest stay on-chip (a partial fit). Only if the overflow is larger than the weights
does the persistent activation state (the KV cache in decode, saved tensors in train) spill, then the
transient scratch. The model assumes the resident part stays pinned (explicit SRAM, or a persisting
L2 access window such as CUDA's ``cudaAccessPolicyWindow``); an LRU cache streaming a working set
larger than itself may keep far less, so for partial fits on caches this is optimistic.

**Loads.** Weights that fit are read from DRAM once per *load* (``load_bytes``). By default
(``steps_per_load=None``) they stay resident, as with the seed's pre-allocation: the load is a
one-time cost, reported but not charged per step. ``steps_per_load=n`` charges it once every ``n``
steps, amortized over the micro-batches of a step (``n = 1``: reloaded every step).

**Traffic per micro-batch** (``W`` resident weights, ``P`` persistent activations, ``T`` transient):

* weights: every weight is read once per forward pass (twice in train: forward and backward),
  except embedding tables, of which a lookup reads only the rows of the micro-batch's tokens; they
  are also the first weights left off-chip when a stage overflows (the cheapest to stream);
* decode: the micro-batch's own KV cache is read once per token (``P / micro-batches profiled``; the
  new token's keys and values, one row, are not counted);
* train: saved activations are written in the forward pass and read in the backward pass (``2 P``);
* transient activations: each unit's scratch written once and read once (``2 x sum of the units'
  transient peaks``, twice that in train): a lower bound on the true activation traffic.

**FLOPs**: each unit's forward FLOPs per token (``Unit.flops_per_token``, recomputed for its shard and
its compression) times the tokens of a micro-batch; train counts 3x (backward = 2x forward,
Kaplan et al. 2020 sec. 2.1; Narayanan et al. 2021 eq. 3 use the same factor). Weight-only int8 /
int4 dequantize to the activation dtype before the matmul, so they run at the activation dtype's
peak (int8 peak only with int8 activations too, which cachefit's techniques never make). 2:4 sparse
weights are costed at the dense peak (no sparse tensor-core speed-up assumed).

**No number from an unknown.** A time that needs a figure the device does not have (a peak FLOP/s, a
bandwidth, a per-kernel, per-layer or per-hop latency) is not computed: the term is ``None``, the
stage's ``time_s`` is ``None`` and ``missing`` names each figure by its catalog key
(``cerebras-wse3 peak_flops.fp16``), so a device file can add it. The one exception is a bound that
settles the answer: an on-chip level without a published bandwidth is at least as fast as the
device's off-chip memory (true of every catalog device that gives both), so where its traffic at the
off-chip rate still takes no longer than the largest known term, the time does not depend on it and
is given. A device without off-chip memory (Groq, Cerebras) cannot stream: a stage that does not fit
is *impossible*, not slow.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from cachefit.cost.kernels import count_unit_kernels
from cachefit.errors import ConfigError
from cachefit.hardware.devices import DeviceSpec
from cachefit.plan.offchip import StageBytes, offchip_split
from cachefit.units import Footprint, Mode, Unit, Workload

log = logging.getLogger(__name__)

LINK_LATENCY_S: float | None = None
"""Default ``link_latency_s`` of the cost functions: None, each device's own ``hop_latency_s`` from
the catalog (a message between two cards costs the larger of theirs). A number replaces it for every
device (an assumption the caller owns, e.g. ``cachefit compare --link-latency-us``)."""

LAYER_WEIGHT: dict[str, float] = {"layer": 1.0, "attention": 0.5, "mlp": 0.5}
"""Decoder layers a unit counts for the per-layer latency, by ``LayerShape.part`` (a block-granularity
attention or MLP unit is half a layer; embeddings and heads count none)."""

TRAIN_FLOP_FACTOR = 3
"""Forward + backward FLOPs over forward FLOPs (backward ~ 2x forward: Kaplan et al. 2020, sec. 2.1)."""

# dtypes whose matmuls run at the same published rate on every catalog device that lists both
_SAME_RATE = {"fp16": "bf16", "bf16": "fp16"}


def one_way_link_bytes_per_s(device: DeviceSpec) -> float | None:
    """Bandwidth of one direction of a card's links: half the both-directions figure of the catalog
    (NVLink 4 on H100: 18 links x 50 GB/s = 900 GB/s both ways, 450 GB/s each way)."""
    bw = device.link_bandwidth_bytes_per_s
    return None if bw is None else bw / 2


def compute_dtype(workload: Workload) -> str:
    """The dtype the matmuls run in: the activation dtype (weight-only quantization dequantizes to it)."""
    return workload.act_dtype


def peak_flops_for(device: DeviceSpec, dtype: str) -> tuple[float | None, str]:
    """Peak FLOP/s for ``dtype`` and a note when a stand-in was used or none is known."""
    peak = device.peak_flops(dtype)
    if peak is not None:
        return peak, ""
    other = _SAME_RATE.get(dtype)
    if other is not None and device.peak_flops(other) is not None:
        return device.peak_flops(other), f"{device.name}: no {dtype} peak published, used its {other} peak (same rate)"
    return None, f"{device.name}: no {dtype} peak FLOP/s published: compute time unknown"


def hop_latency_for(devices: DeviceSpec | tuple[DeviceSpec, ...], override: float | None = None) -> float | None:
    """Latency of one message between ``devices`` (the largest of their ``hop_latency_s``), or
    ``override`` for every device; None where a device has no such figure."""
    if override is not None:
        return float(override)
    devs = devices if isinstance(devices, tuple) else (devices,)
    values = [d.hop_latency_s for d in devs]
    return None if any(v is None for v in values) else max(values)  # type: ignore[type-var]


def missing_figure(device: DeviceSpec, key: str) -> str:
    """How a missing figure is named: the device and the catalog key a device file would set."""
    return f"{device.name} {key}"


def layers_in(units: tuple[Unit, ...]) -> float:
    """Decoder layers the units hold, for the per-layer latency (:data:`LAYER_WEIGHT`)."""
    return sum(LAYER_WEIGHT.get(u.shape.part, 0.0) for u in units if u.shape is not None)


@dataclass(frozen=True, slots=True, kw_only=True)
class StageCost:
    """Roofline cost of one card's stage for one micro-batch (all times in seconds)."""

    card: int
    """Index of the card in the plan."""
    pipeline_stage: int
    """Index of the pipeline stage (the cards of a tensor-parallel group share one)."""
    device: str
    shard: tuple[int, int] | None
    units: tuple[int, int]
    fits: bool
    """The stage's bytes fit its card's capacity (nothing streamed or spilled)."""
    possible: bool
    """False when bytes do not fit and the card has no off-chip memory to stream them from."""
    flops_per_micro_batch: int
    compute_s: float | None
    resident_weight_bytes: int
    """Weights kept on-chip."""
    streamed_weight_bytes: int
    """Weights beyond capacity, read from off-chip memory on every micro-batch."""
    spilled_activation_bytes: int
    """Activations (persistent first, then transient) that do not fit on-chip even with every weight
    streamed."""
    load_bytes: int
    """Bytes read from off-chip memory once per load (the resident weights)."""
    onchip_bytes_per_micro_batch: int
    onchip_s: float | None
    offchip_bytes_per_micro_batch: int
    """Includes the amortized load when ``steps_per_load`` is set."""
    offchip_s: float | None
    collective_bytes_per_micro_batch: int
    collective_s: float | None
    time_s: float | None
    """``max(compute, on-chip, off-chip) + kernels (or layers) + collectives``; None if impossible or a
    figure it needs is missing."""
    bound: str
    """What dominates the time: ``compute``, ``on-chip`` or ``off-chip`` (the roofline term), or
    ``kernels`` / ``layers`` (the fixed per-kernel or per-layer cost) or ``collectives`` when they
    take longer than it; ``unknown`` or ``impossible`` without a time."""
    notes: tuple[str, ...] = ()
    kernels_per_micro_batch: int = 0
    """Kernels the stage's units launch per micro-batch (:func:`cachefit.cost.kernels.count_kernels`)."""
    kernel_s: float | None = 0.0
    """``kernels_per_micro_batch x kernel_overhead_s``; None where the device has no such figure
    (the time is then unknown), 0 where the per-layer term takes its place."""
    layer_s: float = 0.0
    """``layers x layer_latency_s`` on a device with a per-layer latency (else 0)."""
    missing: tuple[str, ...] = ()
    """Figures the time needs and the device lacks (``<device> <catalog key>``); ``time_s`` is None
    when any is missing."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "card": self.card,
            "pipeline_stage": self.pipeline_stage,
            "device": self.device,
            "shard": list(self.shard) if self.shard else None,
            "units": list(self.units),
            "fits": self.fits,
            "possible": self.possible,
            "flops_per_micro_batch": self.flops_per_micro_batch,
            "compute_s": self.compute_s,
            "resident_weight_bytes": self.resident_weight_bytes,
            "streamed_weight_bytes": self.streamed_weight_bytes,
            "spilled_activation_bytes": self.spilled_activation_bytes,
            "load_bytes": self.load_bytes,
            "onchip_bytes_per_micro_batch": self.onchip_bytes_per_micro_batch,
            "onchip_s": self.onchip_s,
            "offchip_bytes_per_micro_batch": self.offchip_bytes_per_micro_batch,
            "offchip_s": self.offchip_s,
            "collective_bytes_per_micro_batch": self.collective_bytes_per_micro_batch,
            "collective_s": self.collective_s,
            "kernels_per_micro_batch": self.kernels_per_micro_batch,
            "kernel_s": self.kernel_s,
            "layer_s": self.layer_s,
            "time_s": self.time_s,
            "bound": self.bound,
            "missing": list(self.missing),
            "notes": list(self.notes),
        }


def _div(nbytes: float, rate: float | None) -> float | None:
    if nbytes == 0:
        return 0.0
    return None if rate is None else nbytes / rate


def estimate_stage(
    *,
    card: int,
    pipeline_stage: int,
    device: DeviceSpec,
    level: str,
    units: tuple[int, int],
    shard: tuple[int, int] | None,
    weight_bytes: int,
    activation_bytes: int,
    persistent_activation_bytes: int,
    buffer_bytes: int,
    capacity_bytes: int,
    stage_units: tuple[Unit, ...],
    workload: Workload,
    tokens_per_micro_batch: int,
    collective_bytes_per_token: int = 0,
    collective_latency_steps: int = 0,
    steps_per_load: int | None = None,
    micro_batches: int = 1,
    link_latency_s: float | None = LINK_LATENCY_S,
    kernel_overhead_s: float | None = None,
) -> StageCost:
    """Roofline cost of one card's stage for one micro-batch (see the module docstring).

    Args:
        weight_bytes, activation_bytes, persistent_activation_bytes, buffer_bytes: the stage's
            stacked footprint as the plan records it.
        capacity_bytes: what the card offers the stage (after headroom).
        stage_units: the units as this card runs them (its shard, compressed), for FLOPs and the
            transient activation traffic.
        tokens_per_micro_batch: tokens one micro-batch processes (batch x query length).
        collective_latency_steps: message steps on the critical path of the stage's collectives per
            forward pass (each adds one hop latency).
        steps_per_load: charge the load of resident weights once every this many steps (None: never,
            weights stay resident).
        micro_batches: micro-batches per step (to amortize a load over them).
        link_latency_s: latency of one message step; None (default): the device's ``hop_latency_s``.
        kernel_overhead_s: fixed cost of one kernel; None: the device's ``kernel_overhead_s`` (0 turns
            the term off, e.g. for stages replayed from a CUDA graph or compiled into few kernels,
            whose launch cost the catalog's stream figure overstates).
    """
    if capacity_bytes <= 0:
        raise ConfigError(f"card {card}: capacity must be positive, got {capacity_bytes} B")
    if link_latency_s is not None and not link_latency_s >= 0:
        raise ConfigError(f"link latency must be >= 0 seconds, got {link_latency_s!r}")
    if kernel_overhead_s is not None and (isinstance(kernel_overhead_s, bool)
                                          or not isinstance(kernel_overhead_s, (int, float))
                                          or not 0 <= kernel_overhead_s < 1):
        raise ConfigError(f"kernel overhead must be >= 0 and below 1 second, got {kernel_overhead_s!r}")
    if steps_per_load is not None and steps_per_load < 1:
        raise ConfigError(f"steps_per_load must be a positive integer or None, got {steps_per_load!r}")
    notes: list[str] = []
    train = workload.mode is Mode.TRAIN
    passes = 2 if train else 1  # weights (and scratch) touched in forward, and again in backward

    # -- what fits and what streams: one rule with the planner's (cachefit.plan.offchip)
    total = weight_bytes + activation_bytes + buffer_bytes
    split = offchip_split(
        StageBytes.of(
            Footprint(weight_bytes=weight_bytes, activation_bytes=activation_bytes, buffer_bytes=buffer_bytes,
                      persistent_activation_bytes=persistent_activation_bytes),
            stage_units, tokens_per_micro_batch,
        ),
        capacity_bytes, workload,
    )
    overflow, streamed = split.overflow_bytes, split.streamed_weight_bytes
    spilled_persistent, spilled_transient = split.spilled_persistent_bytes, split.spilled_transient_bytes
    resident = weight_bytes - streamed
    has_offchip = device.offchip_capacity_bytes is not None or device.offchip_bandwidth_bytes_per_s is not None
    possible = overflow == 0 or has_offchip
    if not possible:
        notes.append(
            f"card {card} ({device.name}) has no off-chip memory: the stage needs {total:,} B but the card offers "
            f"{capacity_bytes:,} B, so it cannot run"
        )
    onchip_bytes = split.onchip_bytes_per_micro_batch
    offchip_bytes = split.offchip_bytes_per_micro_batch
    load_share = 0
    if steps_per_load is not None and resident and has_offchip:
        load_share = -(-resident // (steps_per_load * micro_batches))  # ceil: bytes never vanish
        offchip_bytes += load_share

    missing: list[str] = []

    # -- bandwidths
    lvl = device.level(level)
    onchip_bw = lvl.bandwidth_bytes_per_s
    # an on-chip level with no published bandwidth: its traffic at the off-chip rate bounds its time
    # from above (settles the time only where a known term is larger; checked below)
    onchip_bound_s: float | None = None
    if onchip_bw is None and onchip_bytes and device.offchip_bandwidth_bytes_per_s is not None:
        onchip_bound_s = onchip_bytes / device.offchip_bandwidth_bytes_per_s
    onchip_s = _div(onchip_bytes, onchip_bw)
    if possible:
        offchip_s = _div(offchip_bytes, device.offchip_bandwidth_bytes_per_s)
        if offchip_s is None:
            missing.append(missing_figure(device, "offchip_bandwidth"))
    else:
        offchip_s = None

    # -- compute
    dtype = compute_dtype(workload)
    factor = TRAIN_FLOP_FACTOR if train else 1
    flops = factor * tokens_per_micro_batch * sum(u.flops_per_token for u in stage_units)
    peak, peak_note = peak_flops_for(device, dtype)
    if peak is not None and peak_note and flops:
        notes.append(peak_note)
    compute_s = _div(flops, peak)
    if compute_s is None:
        missing.append(missing_figure(device, f"peak_flops.{dtype}"))

    # -- the on-chip term, where its bandwidth is unknown: settled by the bound, or missing
    if onchip_s is None:
        largest_known = max((t for t in (compute_s, offchip_s) if t is not None), default=None)
        if onchip_bound_s is not None and largest_known is not None and onchip_bound_s <= largest_known:
            notes.append(
                f"{device.name}: no {lvl.name} bandwidth published; at the off-chip rate its traffic would take "
                f"{onchip_bound_s * 1e6:.3g} us, no longer than the stage's {largest_known * 1e6:.3g} us, so the time "
                "does not depend on it"
            )
        else:
            missing.append(missing_figure(device, f"levels.{lvl.name}.bandwidth"))

    # -- collectives of a tensor-parallel stage (backward mirrors forward in train)
    coll_bytes = passes * collective_bytes_per_token * tokens_per_micro_batch
    coll_s: float | None = 0.0
    if coll_bytes:
        link = one_way_link_bytes_per_s(device)
        hop = hop_latency_for(device, link_latency_s) if collective_latency_steps else 0.0
        if link is None:
            missing.append(missing_figure(device, "link_bandwidth"))
        if hop is None:
            missing.append(missing_figure(device, "hop_latency"))
        coll_s = None if link is None or hop is None else (
            coll_bytes / link + passes * collective_latency_steps * hop)

    # -- fixed costs: per kernel (host-launched, one after another on one stream), or per layer on a
    #    device that runs the model as one compiled program
    counts = [count_unit_kernels(u, workload) for u in stage_units]
    kernels = sum(c for c in counts if c is not None)
    shapeless = sum(1 for c in counts if c is None)
    layer_s = 0.0
    kernel_s: float | None = 0.0
    if kernel_overhead_s is None and device.layer_latency_s is not None:
        layers = layers_in(stage_units)
        layer_s = (TRAIN_FLOP_FACTOR if train else 1) * layers * device.layer_latency_s
    else:
        per_kernel = device.kernel_overhead_s if kernel_overhead_s is None else float(kernel_overhead_s)
        if per_kernel is None:
            if kernels:
                kernel_s = None
                missing.append(missing_figure(device, "kernel_overhead"))
        else:
            kernel_s = kernels * per_kernel
            if shapeless and per_kernel:
                notes.append(
                    f"{shapeless} unit(s) without a transformer shape: their kernels are not counted, so the "
                    f"per-kernel overhead ({per_kernel * 1e6:.2f} us each) leaves them out"
                )

    terms = {"compute": compute_s, "on-chip": onchip_s, "off-chip": offchip_s}
    known = {k: v for k, v in terms.items() if v is not None}
    if not possible:
        time_s, bound = None, "impossible"
    elif missing or not known:
        time_s, bound = None, "unknown"
        notes.append(f"time unknown: needs {', '.join(missing)}")
    else:
        bound = max(known, key=lambda k: known[k])
        roof = known[bound]
        fixed = (kernel_s or 0.0) + layer_s
        time_s = roof + fixed + (coll_s or 0.0)
        if fixed > roof and fixed >= (coll_s or 0.0):
            bound = "layers" if layer_s else "kernels"  # the fixed costs exceed the bytes and FLOPs
        elif coll_s and coll_s > roof:
            bound = "collectives"  # the all-reduces take longer than the roofline term they follow
    return StageCost(
        card=card,
        pipeline_stage=pipeline_stage,
        device=device.name,
        shard=shard,
        units=units,
        fits=overflow == 0,
        possible=possible,
        flops_per_micro_batch=flops,
        compute_s=compute_s,
        resident_weight_bytes=resident,
        streamed_weight_bytes=streamed,
        spilled_activation_bytes=spilled_persistent + spilled_transient,
        load_bytes=resident,
        onchip_bytes_per_micro_batch=onchip_bytes,
        onchip_s=onchip_s,
        offchip_bytes_per_micro_batch=offchip_bytes,
        offchip_s=offchip_s,
        collective_bytes_per_micro_batch=coll_bytes,
        collective_s=coll_s,
        time_s=time_s,
        bound=bound,
        notes=tuple(notes),
        kernels_per_micro_batch=kernels,
        kernel_s=kernel_s,
        layer_s=layer_s,
        missing=tuple(missing),
    )


__all__ = [
    "LAYER_WEIGHT",
    "LINK_LATENCY_S",
    "TRAIN_FLOP_FACTOR",
    "StageCost",
    "compute_dtype",
    "estimate_stage",
    "hop_latency_for",
    "layers_in",
    "missing_figure",
    "one_way_link_bytes_per_s",
    "peak_flops_for",
]
