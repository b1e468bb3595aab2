"""Hardware facts as data: figures with provenance, memory levels, devices, cards and clusters.

Pure Python (no torch). A :class:`DeviceSpec` lists a chip's on-chip memory levels with exact byte
capacities, plus off-chip memory, peak dense FLOP/s per dtype and chip-to-chip bandwidth; every
figure may carry its source, the date it was checked and an ``uncertain`` flag (a :class:`Figure`).

A :class:`Card` is one device in a deployment, seen through the memory level a plan targets minus a
headroom fraction and a reserved byte count; a :class:`Cluster` is the ordered cards of a deployment
(possibly of different devices). :func:`device_to_dict` and :func:`cluster_to_dict` give their
JSON-ready forms (:func:`cachefit.hardware.files.parse_device` reads a device's back).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from cachefit.errors import ConfigError
from cachefit.sizes import format_bytes, format_capacity
from cachefit.units import DTYPE_BITS, normalize_dtype

# dtypes a peak-FLOP/s figure may be given for: cachefit's dtypes plus fp4 (Blackwell publishes it).
FLOPS_DTYPES: tuple[str, ...] = (*DTYPE_BITS, "fp4")
# Device-level figures besides the memory levels, by the key their provenance is stored under.
SCALAR_FIGURES: dict[str, str] = {
    "offchip_capacity": "offchip_capacity_bytes",
    "offchip_bandwidth": "offchip_bandwidth_bytes_per_s",
    "link_bandwidth": "link_bandwidth_bytes_per_s",
    "kernel_overhead": "kernel_overhead_s",
    "hop_latency": "hop_latency_s",
    "layer_latency": "layer_latency_s",
}
# A memory level's name: lower-case letters, digits and '_' (l2, infinity_cache, sram).
LEVEL_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_SCOPE_RE = re.compile(r"^(chip|per_[a-z][a-z0-9_]*)$")


def level_key(name: object) -> str:
    """Level names are matched case-insensitively, with ``-`` read as ``_`` (``L2``, ``infinity-cache``)."""
    return str(name).strip().lower().replace("-", "_")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_positive(value: object, what: str, *, integer: bool = False, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if integer:
        ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
        kind = "a positive int"
    else:
        ok = _is_number(value) and math.isfinite(value) and value > 0  # type: ignore[arg-type]
        kind = "a positive number"
    if not ok:
        raise ConfigError(f"{what} must be {kind}, got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Figure:
    """A number with its provenance."""

    value: float | int | None
    """The figure in base units (bytes, bytes/s, FLOP/s); None when no public source gives it."""
    source: str
    """Where it comes from: URLs (``; ``-separated), a document, or ``device file X``."""
    as_of: str = ""
    """When the source was checked or published (``YYYY-MM`` or ``YYYY-MM-DD``)."""
    uncertain: bool = False
    """Vendor-only, third-party, derived by an assumption, or measured on a sibling product."""
    note: str = ""
    """How the value was read or derived, and the caveats."""
    calibrated: bool = False
    """Fitted to one published end-to-end result (``source`` names it; ``note`` says how), not read
    from a specification or a measurement of the figure itself: ``docs/validation.md`` checks it on
    other published results."""

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise ConfigError(f"figure {self.value!r}: source must name where it comes from, got {self.source!r}")
        _check_positive(self.value, f"figure from {self.source!r}")
        if not isinstance(self.calibrated, bool):
            raise ConfigError(f"figure from {self.source!r}: calibrated must be True or False, got {self.calibrated!r}")

    def to_dict(self) -> dict[str, object]:
        return {
            "value": self.value,
            "source": self.source,
            "as_of": self.as_of,
            "uncertain": self.uncertain,
            "calibrated": self.calibrated,
            "note": self.note,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryLevel:
    """One on-chip memory level (registers, smem, L2, SRAM, Infinity Cache, VMEM...)."""

    name: str
    """Lower-case name: ``registers``, ``smem``, ``l1``, ``l2``, ``infinity_cache``, ``sram``, ``vmem``."""
    capacity_bytes: int
    """Bytes of one instance (one per chip for ``scope="chip"``, one per core otherwise), exact."""
    source: str
    """Public source of the capacity."""
    as_of: str = ""
    """When the capacity's source was checked."""
    bandwidth_bytes_per_s: float | None = None
    """Aggregate bandwidth of the level over all its instances (reads), None where unknown."""
    scope: str = "chip"
    """``chip``: one instance shared by the whole chip; ``per_sm``, ``per_cu``, ``per_tensix``...: one each."""
    count: int = 1
    """Instances of the level on the chip (1 for ``chip`` scope)."""
    uncertain: bool = False
    """The capacity is uncertain (see ``note``)."""
    note: str = ""
    """How the capacity was read, and caveats (such as the part usable at full bandwidth)."""
    bandwidth_source: str = ""
    """Source of the bandwidth; empty: the same as ``source``."""
    bandwidth_as_of: str = ""
    """When the bandwidth's source was checked; empty: ``as_of``."""
    bandwidth_uncertain: bool = False
    bandwidth_note: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not LEVEL_NAME_RE.match(self.name):
            raise ConfigError(
                f"memory level name must be lower-case letters, digits and '_' (e.g. l2, sram), got {self.name!r}"
            )
        where = f"memory level {self.name!r}"
        _check_positive(self.capacity_bytes, f"{where}: capacity_bytes", integer=True, allow_none=False)
        _check_positive(self.count, f"{where}: count", integer=True, allow_none=False)
        _check_positive(self.bandwidth_bytes_per_s, f"{where}: bandwidth_bytes_per_s")
        if not isinstance(self.scope, str) or not _SCOPE_RE.match(self.scope):
            raise ConfigError(f"{where}: scope must be 'chip' or 'per_<core kind>' (e.g. per_sm), got {self.scope!r}")
        if self.scope == "chip" and self.count != 1:
            raise ConfigError(
                f"{where}: a chip-wide level has count 1, got {self.count}; "
                "give the per-instance capacity with scope 'per_<core kind>' instead"
            )
        if not isinstance(self.source, str) or not self.source.strip():
            raise ConfigError(f"{where}: source must say where the capacity comes from")

    @property
    def total_bytes(self) -> int:
        """Bytes of the level on the whole chip: ``capacity_bytes * count``."""
        return self.capacity_bytes * self.count

    @property
    def capacity_figure(self) -> Figure:
        """The chip total with its provenance."""
        return Figure(
            value=self.total_bytes, source=self.source, as_of=self.as_of, uncertain=self.uncertain, note=self.note
        )

    @property
    def bandwidth_figure(self) -> Figure:
        """The bandwidth with its provenance (value None where unknown)."""
        return Figure(
            value=self.bandwidth_bytes_per_s,
            source=self.bandwidth_source or self.source,
            as_of=self.bandwidth_as_of or self.as_of,
            uncertain=self.bandwidth_uncertain,
            note=self.bandwidth_note,
        )

    def describe(self) -> str:
        """``l2 52,428,800 B (50.0 MiB)`` or ``smem 132 x 233,472 B = ...``."""
        if self.scope == "chip":
            text = f"{self.name} {self.total_bytes:,} B ({format_capacity(self.total_bytes)})"
        else:
            text = (
                f"{self.name} {self.count} x {self.capacity_bytes:,} B = {self.total_bytes:,} B "
                f"({format_capacity(self.total_bytes)})"
            )
        return text + (" (uncertain)" if self.uncertain else "")


def flops_key(dtype: str, *, what: str) -> str:
    """The dtype a peak-FLOP/s figure is stored under (``float16`` -> ``fp16``; ``fp4`` as is)."""
    key = str(dtype).strip().lower()
    if key in FLOPS_DTYPES:
        return key
    try:
        return normalize_dtype(key, what=what)
    except ConfigError:
        raise ConfigError(f"{what}: unknown dtype {dtype!r}; use one of {', '.join(FLOPS_DTYPES)}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceSpec:
    """Hardware facts about one accelerator chip (or card): memory levels, bandwidths, peak FLOP/s."""

    name: str
    """Catalog key, e.g. ``h100``; for a device file, its ``name``."""
    levels: tuple[MemoryLevel, ...]
    """On-chip levels, nearest the compute first."""
    default_level: str
    """The on-chip level a plan targets unless told otherwise
    (GPUs: l2; MI300X: infinity_cache; SRAM machines: sram)."""
    full_name: str = ""
    vendor: str = ""
    aliases: tuple[str, ...] = ()
    """Other names :func:`get_device` accepts (case-insensitive; ``-``, ``_`` and spaces alike)."""
    offchip_capacity_bytes: int | None = None
    """HBM / DRAM capacity; None where there is none (Groq) or it is unknown."""
    offchip_bandwidth_bytes_per_s: float | None = None
    peak_flops_per_s: tuple[tuple[str, float], ...] = ()
    """Dense (not sparse) peak FLOP/s (or OP/s for int dtypes) per dtype, where published."""
    link_bandwidth_bytes_per_s: float | None = None
    """Chip-to-chip bandwidth of one device, both directions of all links added up."""
    kernel_overhead_s: float | None = None
    """Fixed time one kernel costs besides its bytes and FLOPs (launch, dispatch, the gap between
    dependent kernels on one stream): ``a`` of the small-kernel model ``T = a + V / b``. None where
    unknown: a stage that launches kernels then has no predicted time (the cost model names the
    missing figure) unless the device runs whole layers as one compiled program (``layer_latency_s``)."""
    hop_latency_s: float | None = None
    """Fixed time of one chip-to-chip message besides its bytes (one step of a collective, one
    activation sent to the next pipeline stage). None where unknown: a plan that sends messages
    between these cards then has no predicted time."""
    layer_latency_s: float | None = None
    """Fixed time one decoder layer adds per pass on a device that runs the model as one compiled,
    statically scheduled program instead of launching kernels from a host (wafer-scale and
    dataflow chips: Cerebras, Groq): the pipeline latency of a token through the layer beyond its
    bytes and FLOPs. Where set it replaces the per-kernel term."""
    figures: tuple[tuple[str, Figure], ...] = ()
    """Provenance of the figures above: keys ``offchip_capacity``, ``offchip_bandwidth``,
    ``link_bandwidth``, ``kernel_overhead``, ``hop_latency``, ``layer_latency``, ``peak_flops.<dtype>``;
    a Figure with value None records a looked-for unknown."""
    sources: tuple[str, ...] = ()
    """Every source the figures cite."""
    as_of: str = ""
    """When the device's entry was last checked."""
    note: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError(f"device: name must be a non-empty string, got {self.name!r}")
        where = f"device {self.name!r}"
        for attr in ("levels", "aliases", "peak_flops_per_s", "figures", "sources"):
            if not isinstance(getattr(self, attr), tuple):
                raise ConfigError(f"{where}: {attr} must be a tuple, got {type(getattr(self, attr)).__name__}")
        if not self.levels:
            raise ConfigError(f"{where}: needs at least one memory level")
        names = [lvl.name for lvl in self.levels]
        if any(not isinstance(lvl, MemoryLevel) for lvl in self.levels):
            raise ConfigError(f"{where}: levels must be MemoryLevel values")
        if len(set(names)) != len(names):
            raise ConfigError(f"{where}: level names repeat in {names}")
        if self.default_level not in names:
            raise ConfigError(f"{where}: default_level {self.default_level!r} is not one of its levels {names}")
        _check_positive(self.offchip_capacity_bytes, f"{where}: offchip_capacity_bytes", integer=True)
        _check_positive(self.offchip_bandwidth_bytes_per_s, f"{where}: offchip_bandwidth_bytes_per_s")
        _check_positive(self.link_bandwidth_bytes_per_s, f"{where}: link_bandwidth_bytes_per_s")
        # the fixed costs may be declared 0 (a device file saying there is none), never negative
        for attr in ("kernel_overhead_s", "hop_latency_s", "layer_latency_s"):
            value = getattr(self, attr)
            if value is not None and not (_is_number(value) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"{where}: {attr} must be a number of seconds >= 0, got {value!r}")
        seen: set[str] = set()
        for dtype, value in self.peak_flops_per_s:
            key = flops_key(dtype, what=f"{where}: peak_flops_per_s")
            if key != dtype:
                raise ConfigError(f"{where}: peak_flops_per_s: write the canonical dtype {key!r}, not {dtype!r}")
            if key in seen:
                raise ConfigError(f"{where}: peak_flops_per_s gives {key} twice")
            seen.add(key)
            _check_positive(value, f"{where}: peak_flops_per_s[{key}]", allow_none=False)
        flops = dict(self.peak_flops_per_s)
        for key, fig in self.figures:
            if not isinstance(fig, Figure):
                raise ConfigError(f"{where}: figures[{key!r}] must be a Figure")
            if key.startswith("peak_flops."):
                value = flops.get(key.removeprefix("peak_flops."))
                if key.removeprefix("peak_flops.") not in FLOPS_DTYPES:
                    raise ConfigError(f"{where}: figures key {key!r} names an unknown dtype")
            elif key in SCALAR_FIGURES:
                value = getattr(self, SCALAR_FIGURES[key])
            else:
                known = ", ".join([*SCALAR_FIGURES, "peak_flops.<dtype>"])
                raise ConfigError(f"{where}: unknown figures key {key!r}; use one of {known}")
            if fig.value != value:
                raise ConfigError(f"{where}: figures[{key!r}] says {fig.value!r} but the field says {value!r}")

    def level(self, name: str | None = None) -> MemoryLevel:
        """The level named ``name`` (case-insensitive), or the default level for None."""
        if name is None:
            name = self.default_level
        key = level_key(name)
        for lvl in self.levels:
            if lvl.name == key:
                return lvl
        raise ConfigError(
            f"device {self.name!r} has no memory level {name!r}; its levels are "
            f"{', '.join(lvl.name for lvl in self.levels)} (default {self.default_level})"
        )

    def capacity_bytes(self, level: str | None = None) -> int:
        """Bytes of ``level`` on the whole chip (all instances of a per-core level), default level for None."""
        return self.level(level).total_bytes

    def peak_flops(self, dtype: str) -> float | None:
        """Dense peak FLOP/s for ``dtype`` (``fp16``, ``bfloat16``, ``int8``...), None where unpublished."""
        key = flops_key(dtype, what=f"device {self.name!r}: peak_flops")
        return dict(self.peak_flops_per_s).get(key)

    def figure(self, key: str) -> Figure | None:
        """Provenance of a device-level figure (``offchip_capacity``, ``peak_flops.fp16``...), if recorded."""
        return dict(self.figures).get(key)

    def iter_figures(self) -> Iterator[tuple[str, Figure]]:
        """Every figure of the device with its provenance: levels first, then the device-level ones."""
        for lvl in self.levels:
            yield f"levels.{lvl.name}.capacity", lvl.capacity_figure
            if lvl.bandwidth_bytes_per_s is not None or lvl.bandwidth_note or lvl.bandwidth_source:
                yield f"levels.{lvl.name}.bandwidth", lvl.bandwidth_figure
        yield from self.figures

    def to_dict(self) -> dict[str, Any]:
        return device_to_dict(self)


def _exact_fraction(value: float) -> Fraction:
    # Fraction(repr(0.1)) == 1/10: the headroom as the decimal the user wrote, so the floor below is
    # exact (floor(100 * (1 - 0.07)) is 93, not 92 from binary rounding).
    return Fraction(repr(float(value)))


@dataclass(frozen=True, slots=True, kw_only=True)
class Card:
    """One card of a deployment: a device, the memory level its partition must fit, and margins."""

    device: DeviceSpec
    level: str | None = None
    """Memory level the card's partition must fit; None: the device's default level."""
    headroom: float = 0.0
    """Fraction of the level kept free, in [0, 1) (runtime scratch, fragmentation, other tenants)."""
    reserved_bytes: int = 0
    """Bytes kept free on top of the headroom (e.g. a runtime's fixed allocation)."""

    def __post_init__(self) -> None:
        if not isinstance(self.device, DeviceSpec):
            raise ConfigError(f"card: device must be a DeviceSpec, got {type(self.device).__name__}")
        self.device.level(self.level)  # raises ConfigError naming the device's levels
        h = self.headroom
        if not _is_number(h) or not math.isfinite(h) or not 0 <= h < 1:
            raise ConfigError(
                f"card ({self.device.name}): headroom must be a fraction in [0, 1) such as 0.1 (10%), got {h!r}"
            )
        r = self.reserved_bytes
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ConfigError(f"card ({self.device.name}): reserved_bytes must be an int >= 0, got {r!r}")
        if self.capacity_bytes <= 0:
            total = self.total_bytes
            raise ConfigError(
                f"card ({self.device.name}:{self.level_name}): nothing left to plan with: "
                f"{format_capacity(total)} x (1 - {h}) - {r:,} B reserved = {self.capacity_bytes:,} B; "
                "lower the headroom or the reserved bytes"
            )

    @property
    def level_name(self) -> str:
        return self.device.level(self.level).name

    @property
    def memory_level(self) -> MemoryLevel:
        return self.device.level(self.level)

    @property
    def total_bytes(self) -> int:
        """Bytes of the level before headroom and reservation."""
        return self.memory_level.total_bytes

    @property
    def capacity_bytes(self) -> int:
        """What a partition may use: ``floor(total * (1 - headroom)) - reserved_bytes``."""
        if not self.headroom:  # most cards: no exact fraction to build (read per card on thousands of cards)
            return self.total_bytes - self.reserved_bytes
        return math.floor(self.total_bytes * (1 - _exact_fraction(self.headroom))) - self.reserved_bytes

    def describe(self) -> str:
        text = f"{self.device.name}:{self.level_name} {format_bytes(self.capacity_bytes)} ({self.capacity_bytes:,} B)"
        if self.headroom or self.reserved_bytes:
            text += f" of {format_bytes(self.total_bytes)}"
            if self.headroom:
                text += f", {self.headroom:.0%} headroom"
            if self.reserved_bytes:
                text += f", {format_bytes(self.reserved_bytes)} reserved"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device.name,
            "level": self.level_name,
            "total_bytes": self.total_bytes,
            "headroom": self.headroom,
            "reserved_bytes": self.reserved_bytes,
            "capacity_bytes": self.capacity_bytes,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Cluster:
    """The cards of a deployment, in pipeline order (they may be different devices)."""

    cards: tuple[Card, ...]
    name: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.cards, tuple) or not self.cards:
            raise ConfigError("cluster: needs a non-empty tuple of cards")
        for i, card in enumerate(self.cards):
            if not isinstance(card, Card):
                raise ConfigError(f"cluster: cards[{i}] must be a Card, got {type(card).__name__}")

    def __len__(self) -> int:
        return len(self.cards)

    def __iter__(self) -> Iterator[Card]:
        return iter(self.cards)

    def __getitem__(self, index: int) -> Card:
        return self.cards[index]

    def capacities(self) -> tuple[int, ...]:
        """Bytes each card offers a partition, in card order."""
        return tuple(card.capacity_bytes for card in self.cards)

    @property
    def devices(self) -> tuple[DeviceSpec, ...]:
        """The distinct devices, in order of first appearance."""
        out: dict[str, DeviceSpec] = {}
        for card in self.cards:
            out.setdefault(card.device.name, card.device)
        return tuple(out.values())

    @property
    def is_homogeneous(self) -> bool:
        first = self.cards[0]
        return all(
            (c.device, c.level_name, c.capacity_bytes) == (first.device, first.level_name, first.capacity_bytes)
            for c in self.cards
        )

    def describe(self) -> str:
        """One line per run of identical cards: ``cards 0-3: h100:l2 52.4 MB (52,428,800 B)``."""
        lines: list[str] = []
        start = 0
        for i in range(1, len(self.cards) + 1):
            if i == len(self.cards) or self.cards[i] != self.cards[start]:
                span = f"card {start}" if i - 1 == start else f"cards {start}-{i - 1}"
                lines.append(f"{span}: {self.cards[start].describe()}")
                start = i
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return cluster_to_dict(self)


# ----------------------------------------------------------------------------------------------
# JSON-ready forms


def device_to_dict(device: DeviceSpec) -> dict[str, Any]:
    """A JSON-ready dict of the device.

    :func:`cachefit.hardware.files.parse_device` reads it back to an equal DeviceSpec.
    """
    levels = []
    for lvl in device.levels:
        levels.append(
            {
                "name": lvl.name,
                "scope": lvl.scope,
                "count": lvl.count,
                "capacity_bytes": lvl.capacity_bytes,
                "total_bytes": lvl.total_bytes,
                "bandwidth_bytes_per_s": lvl.bandwidth_bytes_per_s,
                "source": lvl.source,
                "as_of": lvl.as_of,
                "uncertain": lvl.uncertain,
                "note": lvl.note,
                "bandwidth_source": lvl.bandwidth_source,
                "bandwidth_as_of": lvl.bandwidth_as_of,
                "bandwidth_uncertain": lvl.bandwidth_uncertain,
                "bandwidth_note": lvl.bandwidth_note,
            }
        )
    return {
        "name": device.name,
        "full_name": device.full_name,
        "vendor": device.vendor,
        "aliases": list(device.aliases),
        "default_level": device.default_level,
        "default_capacity_bytes": device.capacity_bytes(),
        "levels": levels,
        "offchip_capacity_bytes": device.offchip_capacity_bytes,
        "offchip_bandwidth_bytes_per_s": device.offchip_bandwidth_bytes_per_s,
        "link_bandwidth_bytes_per_s": device.link_bandwidth_bytes_per_s,
        "kernel_overhead_s": device.kernel_overhead_s,
        "hop_latency_s": device.hop_latency_s,
        "layer_latency_s": device.layer_latency_s,
        "peak_flops_per_s": dict(device.peak_flops_per_s),
        "figures": {key: fig.to_dict() for key, fig in device.figures},
        "sources": list(device.sources),
        "as_of": device.as_of,
        "note": device.note,
    }


def cluster_to_dict(cluster: Cluster) -> dict[str, Any]:
    """A JSON-ready dict: the cards (device name, level, capacity after headroom) and the devices."""
    return {
        "name": cluster.name,
        "cards": [card.to_dict() for card in cluster.cards],
        "devices": [device_to_dict(d) for d in cluster.devices],
    }
