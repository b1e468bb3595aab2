"""Hardware facts: memory levels, devices, cards and clusters; the catalog and device files.

Pure Python (no torch). A :class:`DeviceSpec` lists a chip's on-chip memory levels with exact byte
capacities, plus off-chip memory, peak dense FLOP/s per dtype and chip-to-chip bandwidth. Every
figure of the shipped catalog (``catalog.toml``, next to this module) carries its public source, the
date it was checked (``as_of``) and an ``uncertain`` flag; a figure nobody publishes stays ``None``.

A :class:`Card` is one device in a deployment, seen through the memory level a plan targets minus a
headroom fraction and a reserved byte count; a :class:`Cluster` is the ordered cards of a deployment
(possibly of different devices).

Device file format (TOML, YAML or JSON; the catalog uses the same format)::

    name = "my-gpu"                 # required (the probe's ``device`` key is accepted instead)
    base = "h100"                   # optional: a catalog device (or a device file) to start from
    full_name = "My GPU"            # optional
    default_level = "l2"            # optional: the level a plan targets
    offchip_capacity = "80GB"       # optional sizes: "50MB", "48KiB", or int bytes
    offchip_bandwidth = "3.35TB/s"  # optional rates: "7.0TB/s", "900 GB/s", or bytes/s as a number
    link_bandwidth = "900GB/s"      # chip-to-chip, both directions of all links added up
    kernel_overhead = "2.4us"       # fixed cost of one kernel (launch / dispatch): "2.4us", "0.005ms", s
    source = "my measurements"      # optional: provenance of the figures below without their own
    as_of = "2026-11-01"

    [[levels]]                      # nearest the compute first
    name = "l2"
    capacity = "50MiB"              # required unless the level overrides one of ``base``
    bandwidth = "7.0TB/s"           # optional
    scope = "chip"                  # "chip" (shared), or "per_<core kind>" with ``count``
    count = 1

    [peak_flops]                    # dense FLOP/s per dtype: numbers or "989TFLOPS"
    fp16 = "989TFLOPS"

Any scalar figure may instead be a table ``{value = ..., source = "...", as_of = "...",
uncertain = true, note = "..."}``; ``value`` may be omitted (unknown). A cluster file has
``[[cards]]`` entries with ``device`` (a catalog name, a device file relative to the cluster file, or
an inline device table) and optional ``count``, ``level``, ``headroom`` (fraction in [0, 1)) and
``reserved`` (a size); top-level ``level``, ``headroom`` and ``reserved`` are defaults for every card.
The probe's output ``{"device": name, "levels": [{"name", "capacity_bytes",
"bandwidth_bytes_per_s"}], "kernel_overhead": {...}}`` is a device file too.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import math
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from cachefit.errors import ConfigError
from cachefit.files import parse_json, read_text
from cachefit.limits import MAX_CLUSTER_CARDS, check_limit, limit_error
from cachefit.sizes import format_bytes, format_seconds, parse_bytes
from cachefit.units import DTYPE_BITS, normalize_dtype

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

log = logging.getLogger(__name__)

# dtypes a peak-FLOP/s figure may be given for: cachefit's dtypes plus fp4 (Blackwell publishes it).
FLOPS_DTYPES: tuple[str, ...] = (*DTYPE_BITS, "fp4")
# Device-level figures besides the memory levels, by the key their provenance is stored under.
_SCALAR_FIGURES: dict[str, str] = {
    "offchip_capacity": "offchip_capacity_bytes",
    "offchip_bandwidth": "offchip_bandwidth_bytes_per_s",
    "link_bandwidth": "link_bandwidth_bytes_per_s",
    "kernel_overhead": "kernel_overhead_s",
}
_LEVEL_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_SCOPE_RE = re.compile(r"^(chip|per_[a-z][a-z0-9_]*)$")
_NUMBER = r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)"
_SUFFIXES = (".toml", ".yaml", ".yml", ".json")


def _human_bytes(nbytes: int) -> str:
    # Binary units where the count is a whole number of MiB (or KiB below 1 MiB), else decimal:
    # 52,428,800 B reads "50.0 MiB", 44,000,000,000 B reads "44.0 GB".
    binary = nbytes % 2**20 == 0 or (nbytes < 2**20 and nbytes % 2**10 == 0)
    return format_bytes(nbytes, binary=binary)


def _level_key(name: object) -> str:
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

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise ConfigError(f"figure {self.value!r}: source must name where it comes from, got {self.source!r}")
        _check_positive(self.value, f"figure from {self.source!r}")

    def to_dict(self) -> dict[str, object]:
        return {
            "value": self.value,
            "source": self.source,
            "as_of": self.as_of,
            "uncertain": self.uncertain,
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
        if not isinstance(self.name, str) or not _LEVEL_NAME_RE.match(self.name):
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
            text = f"{self.name} {self.total_bytes:,} B ({_human_bytes(self.total_bytes)})"
        else:
            text = (
                f"{self.name} {self.count} x {self.capacity_bytes:,} B = {self.total_bytes:,} B "
                f"({_human_bytes(self.total_bytes)})"
            )
        return text + (" (uncertain)" if self.uncertain else "")


def _flops_key(dtype: str, *, what: str) -> str:
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
    unknown (the cost model then leaves the term out and says so)."""
    figures: tuple[tuple[str, Figure], ...] = ()
    """Provenance of the figures above: keys ``offchip_capacity``, ``offchip_bandwidth``,
    ``link_bandwidth``, ``kernel_overhead``, ``peak_flops.<dtype>``; a Figure with value None
    records a looked-for unknown."""
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
        _check_positive(self.kernel_overhead_s, f"{where}: kernel_overhead_s")
        seen: set[str] = set()
        for dtype, value in self.peak_flops_per_s:
            key = _flops_key(dtype, what=f"{where}: peak_flops_per_s")
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
            elif key in _SCALAR_FIGURES:
                value = getattr(self, _SCALAR_FIGURES[key])
            else:
                known = ", ".join([*_SCALAR_FIGURES, "peak_flops.<dtype>"])
                raise ConfigError(f"{where}: unknown figures key {key!r}; use one of {known}")
            if fig.value != value:
                raise ConfigError(f"{where}: figures[{key!r}] says {fig.value!r} but the field says {value!r}")

    def level(self, name: str | None = None) -> MemoryLevel:
        """The level named ``name`` (case-insensitive), or the default level for None."""
        if name is None:
            name = self.default_level
        key = _level_key(name)
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
        key = _flops_key(dtype, what=f"device {self.name!r}: peak_flops")
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
                f"{_human_bytes(total)} x (1 - {h}) - {r:,} B reserved = {self.capacity_bytes:,} B; "
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
# Rates: bandwidth and FLOP/s from text


def parse_bandwidth(text: str | int | float, *, what: str = "bandwidth") -> float:
    """Parse a bandwidth such as ``7.0TB/s``, ``900 GB/s``, ``48KiB/s`` or a number of bytes/s.

    Units are the byte units of :func:`cachefit.sizes.parse_bytes` followed by ``/s``. Bits per
    second (``Gb/s``) are refused: a lower-case ``b`` is too easy to misread by 8x.

    Raises:
        ConfigError: not a positive rate with a known unit.
    """
    if isinstance(text, bool):
        raise ConfigError(f"{what}: expected a bandwidth such as 7.0TB/s, got {text!r}")
    if _is_number(text):
        _check_positive(text, what, allow_none=False)
        return float(text)
    match = re.fullmatch(rf"\s*{_NUMBER}\s*(?:([A-Za-z]+)\s*/\s*s)?\s*", str(text))
    if not match:
        raise ConfigError(
            f"{what}: cannot read {text!r} as a bandwidth; write a number with a unit per second, "
            "e.g. 7.0TB/s, 900GB/s, or bytes/s as a plain number"
        )
    value, unit = float(match.group(1)), match.group(2) or "B"
    if unit.endswith("b") and not unit.lower().endswith("ib"):
        raise ConfigError(
            f"{what}: {text!r} is in bits per second; write bytes, e.g. {value / 8:g}{unit[:-1].upper()}B/s"
        )
    try:
        scale = parse_bytes(f"1{unit}", what=what)
    except ConfigError:
        raise ConfigError(
            f"{what}: unknown unit {unit!r}/s in {text!r}; use B, KB, MB, GB, TB, PB, KiB, MiB, GiB or TiB per second"
        ) from None
    rate = value * scale
    _check_positive(rate, what, allow_none=False)
    return rate


_FLOPS_PREFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "p": 1e15}


def parse_flops(text: str | int | float, *, what: str = "peak_flops") -> float:
    """Parse a compute rate: ``989TFLOPS``, ``989 TFLOP/s``, ``750 TOPS``, ``2.25e15`` (FLOP/s)."""
    if isinstance(text, bool):
        raise ConfigError(f"{what}: expected a rate such as 989TFLOPS, got {text!r}")
    if _is_number(text):
        _check_positive(text, what, allow_none=False)
        return float(text)
    match = re.fullmatch(rf"\s*{_NUMBER}\s*([kKmMgGtTpP]?)\s*(flops|flop/s|ops|op/s)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ConfigError(
            f"{what}: cannot read {text!r} as a compute rate; write e.g. 989TFLOPS, 750TOPS or 9.89e14"
        )
    rate = float(match.group(1)) * _FLOPS_PREFIX[match.group(2).lower()]
    _check_positive(rate, what, allow_none=False)
    return rate


# per second: a time is divided by these (2.5 / 1e6 is exactly 2.5e-06; 2.5 * 1e-6 is not)
_DURATION_UNITS = {"s": 1.0, "ms": 1e3, "us": 1e6, "\u00b5s": 1e6, "\u03bcs": 1e6, "ns": 1e9}


def parse_duration(text: str | int | float, *, what: str = "duration") -> float:
    """Parse a time such as ``2.4us``, ``2.4 µs``, ``0.005ms``, ``3e-6 s`` or a number of seconds."""
    if isinstance(text, bool):
        raise ConfigError(f"{what}: expected a time such as 2.4us, got {text!r}")
    if _is_number(text):
        _check_positive(text, f"{what} (seconds)", allow_none=False)
        return float(text)
    match = re.fullmatch(rf"\s*{_NUMBER}\s*([a-zA-Z\u00b5\u03bc]+)?\s*", str(text))
    unit = (match.group(2) or "s") if match else ""
    if not match or unit.lower() not in _DURATION_UNITS:
        raise ConfigError(
            f"{what}: cannot read {text!r} as a time; write a number with s, ms, us (or \u00b5s) or ns, e.g. 2.4us, "
            "or seconds as a plain number"
        )
    seconds = float(match.group(1)) / _DURATION_UNITS[unit.lower()]
    _check_positive(seconds, what, allow_none=False)
    return seconds


def format_bandwidth(bytes_per_s: float) -> str:
    """``format_bandwidth(7.0e12) == '7.00 TB/s'``."""
    for unit, scale in (("PB/s", 1e15), ("TB/s", 1e12), ("GB/s", 1e9), ("MB/s", 1e6)):
        if bytes_per_s >= scale:
            return f"{bytes_per_s / scale:.2f} {unit}"
    return f"{bytes_per_s:.0f} B/s"


# ----------------------------------------------------------------------------------------------
# Parsing device and cluster descriptions (dicts read from TOML / YAML / JSON)

_FIGURE_KEYS = {"value", "source", "as_of", "uncertain", "note"}
_DEVICE_KEYS = {
    "name", "base", "full_name", "vendor", "aliases", "default_level", "levels", "offchip_capacity",
    "offchip_bandwidth", "link_bandwidth", "kernel_overhead", "peak_flops", "source", "as_of", "note", "figures", "sources",
    "default_capacity_bytes",
}  # fmt: skip
_DEVICE_KEY_ALIASES = {
    "device": "name",
    "offchip_capacity_bytes": "offchip_capacity",
    "offchip_bandwidth_bytes_per_s": "offchip_bandwidth",
    "link_bandwidth_bytes_per_s": "link_bandwidth",
    "kernel_overhead_s": "kernel_overhead",
    "peak_flops_per_s": "peak_flops",
}
_LEVEL_KEYS = {
    "name", "capacity", "bandwidth", "scope", "count", "source", "as_of", "uncertain", "note",
    "bandwidth_source", "bandwidth_as_of", "bandwidth_uncertain", "bandwidth_note", "total_bytes",
}  # fmt: skip
_LEVEL_KEY_ALIASES = {"capacity_bytes": "capacity", "bandwidth_bytes_per_s": "bandwidth"}
_CARD_KEYS = {"device", "count", "level", "headroom", "reserved", "reserved_bytes"}
_CLUSTER_KEYS = {"name", "cards", "level", "headroom", "reserved", "reserved_bytes"}


@dataclass(frozen=True, slots=True)
class _Context:
    """Where a description comes from, for error messages and relative paths."""

    where: str
    """``device file cluster.toml`` / ``catalog.toml device[3] (h100)`` ..."""
    directory: Path | None
    """Directory relative device-file paths are read from."""
    strict: bool
    """Catalog: every figure must carry its own source and an as_of."""
    lenient_keys: bool = False
    """Probe output: unknown keys are logged, not refused."""
    seen: tuple[str, ...] = ()
    """Files being read (to refuse a base that includes itself)."""


def _canonical_keys(
    data: Mapping[str, Any], aliases: Mapping[str, str], known: set[str], ctx: _Context, what: str
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        canon = aliases.get(key, key)
        if canon not in known:
            if ctx.lenient_keys:
                log.warning("%s: %s: ignoring unknown key %r", ctx.where, what, key)
                continue
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{ctx.where}: {what}: unknown key {key!r}{hint}; known keys: {', '.join(sorted(known))}")
        if canon in out:
            raise ConfigError(f"{ctx.where}: {what}: {key!r} repeats {canon!r}; give it once")
        out[canon] = value
    return out


def _parse_figure(
    raw: Any,
    parse: Callable[[Any], float | int],
    ctx: _Context,
    what: str,
    *,
    source: str,
    as_of: str,
) -> Figure:
    """A scalar, or a ``{value, source, as_of, uncertain, note}`` table; ``source``/``as_of`` are defaults."""
    if isinstance(raw, Mapping):
        unknown = set(raw) - _FIGURE_KEYS
        if unknown:
            raise ConfigError(
                f"{ctx.where}: {what}: unknown key(s) {sorted(unknown)} in a figure table; "
                f"use {', '.join(sorted(_FIGURE_KEYS))}"
            )
        value = raw.get("value")
        fig_source = raw.get("source") or ("" if ctx.strict else source)
        fig_as_of = raw["as_of"] if "as_of" in raw else as_of
        uncertain, note = raw.get("uncertain", False), raw.get("note", "")
        if not isinstance(uncertain, bool):
            raise ConfigError(f"{ctx.where}: {what}.uncertain must be true or false, got {uncertain!r}")
    else:
        value, fig_source, fig_as_of, uncertain, note = raw, source, as_of, False, ""
    if ctx.strict and not (fig_source and fig_as_of):
        raise ConfigError(f"{ctx.where}: {what}: every catalog figure needs its own source and an as_of date")
    if value is not None:
        value = parse(value)
    try:
        return Figure(value=value, source=fig_source, as_of=str(fig_as_of), uncertain=uncertain, note=str(note))
    except ConfigError as exc:
        raise ConfigError(f"{ctx.where}: {what}: {exc}; give a source (URL or document) for it") from None


def _parse_size(what: str) -> Callable[[Any], int]:
    return lambda raw: parse_bytes(raw, what=what)


def _parse_level(
    raw: Any, index: int, base_levels: Mapping[str, MemoryLevel], ctx: _Context, *, source: str, as_of: str
) -> MemoryLevel:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{ctx.where}: levels[{index}] must be a table with name and capacity, got {raw!r}")
    label = f"levels[{index}]"
    data = _canonical_keys(raw, _LEVEL_KEY_ALIASES, _LEVEL_KEYS, ctx, label)
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{ctx.where}: {label}: missing name; give e.g. name = \"l2\"")
    name = _level_key(name)
    label = f"levels[{index}] ({name})"
    base = base_levels.get(name)
    lvl_source = data.get("source") or (base.source if base and "capacity" not in data else source)
    if "as_of" in data:  # given, even empty (device_to_dict writes what it has)
        lvl_as_of = str(data["as_of"])
    else:
        lvl_as_of = base.as_of if base and "capacity" not in data else as_of
    if ctx.strict and not (data.get("source") and lvl_as_of):
        raise ConfigError(f"{ctx.where}: {label}: every catalog level needs its own source and an as_of date")
    fields: dict[str, Any] = dataclasses.asdict(base) if base else {}
    fields.update(name=name, source=lvl_source, as_of=lvl_as_of)
    if "capacity" in data:
        fields["capacity_bytes"] = parse_bytes(data["capacity"], what=f"{ctx.where}: {label}.capacity")
        if base:
            # A new capacity replaces the base's figure and its caveats; the base's bandwidth stays,
            # with its own provenance. For a per-core level the capacity is one instance's bytes.
            fields.update(
                uncertain=False,
                note=f"replaces the {base.total_bytes:,} B of the base device",
                bandwidth_source=base.bandwidth_source or base.source,
                bandwidth_as_of=base.bandwidth_as_of or base.as_of,
            )
    elif not base:
        raise ConfigError(
            f"{ctx.where}: {label}: missing capacity; give the level's bytes, e.g. capacity = \"50MB\" or \"48KiB\""
        )
    for key in ("scope", "note"):
        if key in data:
            if not isinstance(data[key], str):
                raise ConfigError(f"{ctx.where}: {label}.{key} must be a string, got {data[key]!r}")
            fields[key] = data[key]
    if "count" in data:
        fields["count"] = data["count"]
    if "uncertain" in data:
        if not isinstance(data["uncertain"], bool):
            raise ConfigError(f"{ctx.where}: {label}.uncertain must be true or false, got {data['uncertain']!r}")
        fields["uncertain"] = data["uncertain"]
    if "bandwidth" in data:
        fig = _parse_figure(
            data["bandwidth"],
            lambda v: parse_bandwidth(v, what=f"{ctx.where}: {label}.bandwidth"),
            ctx if isinstance(data["bandwidth"], Mapping) else dataclasses.replace(ctx, strict=False),
            f"{label}.bandwidth",
            # a bandwidth written here comes from this description, not from a base it overrides
            source=data.get("source") or source,
            as_of=str(data["as_of"]) if "as_of" in data else as_of,
        )
        fields.update(
            bandwidth_bytes_per_s=fig.value,
            bandwidth_source=fig.source if fig.source != lvl_source else "",
            bandwidth_as_of=fig.as_of if fig.as_of != lvl_as_of else "",
            bandwidth_uncertain=fig.uncertain,
            bandwidth_note=fig.note,
        )
    for key in ("bandwidth_source", "bandwidth_as_of", "bandwidth_note"):
        if key in data:
            fields[key] = str(data[key])
    if "bandwidth_uncertain" in data:
        fields["bandwidth_uncertain"] = bool(data["bandwidth_uncertain"])
    try:
        level = MemoryLevel(**fields)
    except TypeError as exc:  # a field the level needs is missing
        raise ConfigError(f"{ctx.where}: {label}: {exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"{ctx.where}: {label}: {exc}") from None
    if "total_bytes" in data and data["total_bytes"] != level.total_bytes:
        raise ConfigError(
            f"{ctx.where}: {label}: total_bytes {data['total_bytes']!r} != capacity x count = {level.total_bytes}"
        )
    return level


def _pick_default_level(levels: Sequence[MemoryLevel]) -> str:
    # The farthest chip-wide level (the shared one a partition lives in), else the last level.
    chip = [lvl for lvl in levels if lvl.scope == "chip"]
    return (chip or list(levels))[-1].name


def parse_device(
    data: Mapping[str, Any], *, where: str = "device description", directory: Path | None = None
) -> DeviceSpec:
    """Build a :class:`DeviceSpec` from a device description (the file format above, already read).

    Also accepts :func:`device_to_dict`'s output and the probe's output, so both round-trip.
    ``directory`` is where a relative ``base`` path is looked up.
    """
    return _parse_device(data, _Context(where=where, directory=directory, strict=False))


def _parse_device(data: Any, ctx: _Context) -> DeviceSpec:
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{ctx.where}: expected a table of device fields (name, levels, ...), got {type(data).__name__}"
        )
    probe = isinstance(data.get("device"), str) and "name" not in data and "base" not in data
    if probe:
        ctx = dataclasses.replace(ctx, lenient_keys=True)
    d = _canonical_keys(data, _DEVICE_KEY_ALIASES, _DEVICE_KEYS, ctx, "device")
    name = d.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{ctx.where}: missing name; give the device a name, e.g. name = \"my-card\"")
    name = name.strip()
    ctx = dataclasses.replace(ctx, where=f"{ctx.where} ({name})") if ctx.strict else ctx

    base: DeviceSpec | None = None
    if "base" in d:
        base = _resolve_base(d["base"], ctx)
    source = str(d.get("source") or ("" if ctx.strict else f"{ctx.where}"))
    as_of = str(d.get("as_of") or "")

    # Levels: those of the base, each replaced by a level of the same name, then the new ones.
    raw_levels = d.get("levels", [])
    if not isinstance(raw_levels, (list, tuple)):
        raise ConfigError(
            f"{ctx.where}: levels must be a list of tables ([[levels]]), got {type(raw_levels).__name__}"
        )
    if not raw_levels and base is None:
        raise ConfigError(f"{ctx.where}: no levels; add [[levels]] with name and capacity, or a base device")
    base_levels = {lvl.name: lvl for lvl in base.levels} if base else {}
    parsed = [
        _parse_level(raw, i, base_levels, ctx, source=source, as_of=as_of) for i, raw in enumerate(raw_levels)
    ]
    names = [lvl.name for lvl in parsed]
    if len(set(names)) != len(names):
        raise ConfigError(f"{ctx.where}: level names repeat in {names}; give each level once")
    by_name = {lvl.name: lvl for lvl in parsed}
    levels = [by_name.pop(lvl.name, lvl) for lvl in (base.levels if base else ())]
    levels += [lvl for lvl in parsed if lvl.name in by_name]

    default_level = d.get("default_level")
    if default_level is None:
        if base is not None and base.default_level in {lvl.name for lvl in levels}:
            default_level = base.default_level
        else:
            default_level = _pick_default_level(levels)
    elif not isinstance(default_level, str) or _level_key(default_level) not in {lvl.name for lvl in levels}:
        raise ConfigError(
            f"{ctx.where}: default_level {default_level!r} is not one of the levels "
            f"{', '.join(lvl.name for lvl in levels)}; name one of them"
        )
    else:
        default_level = _level_key(default_level)

    # Device-level figures.
    figures: dict[str, Figure] = dict(base.figures) if base else {}
    values: dict[str, Any] = {}
    if base:
        values = {field: getattr(base, field) for field in _SCALAR_FIGURES.values()}
    parsers: dict[str, Callable[[Any], Any]] = {
        "offchip_capacity": _parse_size(f"{ctx.where}: offchip_capacity"),
        "offchip_bandwidth": lambda v: parse_bandwidth(v, what=f"{ctx.where}: offchip_bandwidth"),
        "link_bandwidth": lambda v: parse_bandwidth(v, what=f"{ctx.where}: link_bandwidth"),
        "kernel_overhead": lambda v: parse_duration(v, what=f"{ctx.where}: kernel_overhead"),
    }
    provenance = d.get("figures") or {}
    if not isinstance(provenance, Mapping):
        raise ConfigError(f"{ctx.where}: figures must be a table of figure tables, got {type(provenance).__name__}")
    for key, field in _SCALAR_FIGURES.items():
        prov = provenance.get(key)
        if d.get(key) is not None:
            raw = d[key]
            if not isinstance(raw, Mapping) and isinstance(prov, Mapping):
                raw = {**prov, "value": raw}  # device_to_dict's output: value beside its provenance
        elif prov is not None:
            raw = prov
        elif key in d:  # an explicit null: no such figure (e.g. no off-chip memory)
            values[field] = None
            figures.pop(key, None)
            continue
        else:
            continue
        fig = _parse_figure(raw, parsers[key], ctx, key, source=source, as_of=as_of)
        values[field] = fig.value
        figures[key] = fig

    flops: dict[str, float] = dict(base.peak_flops_per_s) if base else {}
    raw_flops = d.get("peak_flops") or {}
    if not isinstance(raw_flops, Mapping):
        raise ConfigError(f"{ctx.where}: peak_flops must be a table of dtype = rate, e.g. fp16 = \"989TFLOPS\"")
    flops_provenance = {k.removeprefix("peak_flops."): v for k, v in provenance.items() if k.startswith("peak_flops.")}
    for dtype in list(raw_flops) + [k for k in flops_provenance if k not in raw_flops]:
        key = _flops_key(dtype, what=f"{ctx.where}: peak_flops")
        raw = raw_flops.get(dtype, flops_provenance.get(dtype))
        if not isinstance(raw, Mapping) and dtype in flops_provenance and raw is not None:
            raw = {**flops_provenance[dtype], "value": raw}
        what = f"peak_flops.{key}"
        parse = functools.partial(parse_flops, what=f"{ctx.where}: {what}")
        fig = _parse_figure(raw, parse, ctx, what, source=source, as_of=as_of)
        if fig.value is None:
            flops.pop(key, None)
        else:
            flops[key] = float(fig.value)
        figures[f"peak_flops.{key}"] = fig

    aliases = d.get("aliases", base.aliases if base and name == base.name else ())
    if not isinstance(aliases, (list, tuple)) or not all(isinstance(a, str) for a in aliases):
        raise ConfigError(f"{ctx.where}: aliases must be a list of strings, got {aliases!r}")
    for key in ("full_name", "vendor", "note"):
        if key in d and not isinstance(d[key], str):
            raise ConfigError(f"{ctx.where}: {key} must be a string, got {d[key]!r}")

    given_sources = d.get("sources", ())
    if not isinstance(given_sources, (list, tuple)) or not all(isinstance(x, str) for x in given_sources):
        raise ConfigError(f"{ctx.where}: sources must be a list of strings, got {given_sources!r}")
    all_sources: dict[str, None] = dict.fromkeys(given_sources)
    cited = [lvl.source for lvl in levels] + [lvl.bandwidth_source for lvl in levels if lvl.bandwidth_source]
    for text in cited + [fig.source for fig in figures.values()]:
        all_sources.update(dict.fromkeys(part.strip() for part in text.split("; ") if part.strip()))
    try:
        return DeviceSpec(
            name=name,
            full_name=d.get("full_name", base.full_name if base else ""),
            vendor=d.get("vendor", base.vendor if base else ""),
            aliases=tuple(aliases),
            levels=tuple(levels),
            default_level=default_level,
            offchip_capacity_bytes=values.get("offchip_capacity_bytes"),
            offchip_bandwidth_bytes_per_s=values.get("offchip_bandwidth_bytes_per_s"),
            link_bandwidth_bytes_per_s=values.get("link_bandwidth_bytes_per_s"),
            kernel_overhead_s=values.get("kernel_overhead_s"),
            peak_flops_per_s=tuple(sorted(flops.items(), key=lambda kv: FLOPS_DTYPES.index(kv[0]))),
            figures=tuple(figures.items()),
            sources=tuple(all_sources),
            as_of=as_of or (base.as_of if base else ""),
            note=d.get("note", base.note if base else ""),
        )
    except ConfigError as exc:
        raise ConfigError(f"{ctx.where}: {exc}") from None


def _resolve_base(raw: Any, ctx: _Context, what: str = "base") -> DeviceSpec:
    if isinstance(raw, Mapping):
        return _parse_device(raw, dataclasses.replace(ctx, where=f"{ctx.where}: {what}"))
    if not isinstance(raw, str) or not raw.strip():
        raise ConfigError(f"{ctx.where}: {what} must be a catalog device name or a device file, got {raw!r}")
    found = _find_in_catalog(raw)
    if found is not None:
        return found
    path = Path(raw)
    if not path.is_absolute() and ctx.directory is not None:
        path = ctx.directory / path
    if path.exists():
        loaded = _load_file(path, ctx.seen)
        if isinstance(loaded, Cluster):
            raise ConfigError(f"{ctx.where}: {what} {raw!r} is a cluster file; give one device")
        return loaded
    if _looks_like_path(raw):
        raise ConfigError(f"{ctx.where}: {what}: device file {path} not found; check the path (relative to this file)")
    raise _unknown_device_error(raw, what=f"{ctx.where}: {what}")


def _parse_reserved(raw: Any, what: str) -> int:
    if raw is None or (_is_number(raw) and raw == 0) or (isinstance(raw, str) and raw.strip() in {"0", "0B"}):
        return 0
    return parse_bytes(raw, what=what)


def _parse_cluster(data: Mapping[str, Any], ctx: _Context) -> Cluster:
    d = _canonical_keys(data, {"reserved_bytes": "reserved"}, _CLUSTER_KEYS - {"reserved_bytes"}, ctx, "cluster")
    raw_cards = d.get("cards")
    if not isinstance(raw_cards, (list, tuple)) or not raw_cards:
        raise ConfigError(f"{ctx.where}: cards must be a non-empty list of [[cards]] tables with a device")
    default_level = d.get("level")
    default_headroom = d.get("headroom", 0.0)
    default_reserved = _parse_reserved(d.get("reserved"), f"{ctx.where}: reserved")
    cards: list[Card] = []
    total = 0  # cards so far, checked against limits.MAX_CLUSTER_CARDS before any list is built
    for i, raw in enumerate(raw_cards):
        label = f"cards[{i}]"
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{ctx.where}: {label} must be a table with a device, got {raw!r}")
        c = _canonical_keys(raw, {"reserved_bytes": "reserved"}, _CARD_KEYS - {"reserved_bytes"}, ctx, label)
        count = c.get("count", 1)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigError(f"{ctx.where}: {label}.count must be a positive integer, got {count!r}")
        total += count
        if total > MAX_CLUSTER_CARDS:
            raise limit_error("MAX_CLUSTER_CARDS", where=ctx.where, value=total,
                              what=f"the card count through {label}")
        if "device" not in c:
            raise ConfigError(f"{ctx.where}: {label}: missing device; give a catalog name, a device file or a table")
        device_raw = c["device"]
        if isinstance(device_raw, Mapping):
            device = _parse_device(device_raw, dataclasses.replace(ctx, where=f"{ctx.where}: {label}.device"))
        elif isinstance(device_raw, str):
            device = _resolve_base(device_raw, ctx, what=f"{label}.device")
        else:
            raise ConfigError(f"{ctx.where}: {label}.device must be a name, a path or a table, got {device_raw!r}")
        reserved = default_reserved
        if "reserved" in c:
            reserved = _parse_reserved(c["reserved"], f"{ctx.where}: {label}.reserved")
        try:
            card = Card(
                device=device,
                level=c.get("level", default_level),
                headroom=c.get("headroom", default_headroom),
                reserved_bytes=reserved,
            )
        except ConfigError as exc:
            raise ConfigError(f"{ctx.where}: {label}: {exc}") from None
        cards.extend([card] * count)
    name = d.get("name", "")
    if not isinstance(name, str):
        raise ConfigError(f"{ctx.where}: name must be a string, got {name!r}")
    return Cluster(cards=tuple(cards), name=name)


# ----------------------------------------------------------------------------------------------
# Files


def _read_mapping(path: Path) -> Mapping[str, Any]:
    suffix = path.suffix.lower()
    where = f"device file {path}"
    if suffix not in _SUFFIXES:
        raise ConfigError(f"{where}: unknown suffix {path.suffix!r}; name it .toml, .yaml, .yml or .json")
    text = read_text(path, where=where)  # bounded and UTF-8 checked (cachefit.limits)
    if suffix == ".json":
        data: Any = parse_json(text, where=where)  # nesting depth checked before parsing
    else:
        data = _parse_toml_or_yaml(text, suffix, where)
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{where}: expected a table of fields (name, levels, ... or cards), got {type(data).__name__}"
        )
    return data


def _parse_toml_or_yaml(text: str, suffix: str, where: str) -> Any:
    try:
        if suffix == ".toml":
            return tomllib.loads(text)
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{where}: reading YAML needs pyyaml (pip install pyyaml), or use TOML") from None
        return yaml.safe_load(text)
    except ConfigError:
        raise
    except RecursionError:  # both parsers recurse once per level of nesting
        raise limit_error("MAX_JSON_DEPTH", where=where, what="nesting depth") from None
    except Exception as exc:  # the parsers' own error types (TOMLDecodeError, YAMLError)
        detail = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
        raise ConfigError(f"{where}: not valid {suffix.lstrip('.').upper()}: {detail[:300]}; fix the syntax") from None


def _load_file(path: Path, seen: tuple[str, ...] = ()) -> DeviceSpec | Cluster:
    if not path.exists():
        raise ConfigError(
            f"device file {path}: not found; give an existing .toml/.yaml/.json file or a catalog device "
            f"({', '.join(d.name for d in list_devices())})"
        )
    key = str(path.resolve())
    if key in seen:
        raise ConfigError(f"device file {path}: its base chain includes itself ({' -> '.join([*seen, key])})")
    data = _read_mapping(path)
    ctx = _Context(where=f"device file {path}", directory=path.parent, strict=False, seen=(*seen, key))
    if "cards" in data:
        return _parse_cluster(data, ctx)
    return _parse_device(data, ctx)


def load_device_file(path: str | Path) -> DeviceSpec | Cluster:
    """Read a device file or a cluster file (TOML, YAML or JSON by suffix; format in the module doc).

    Raises:
        ConfigError: file not found, unreadable or malformed, or a field missing or out of range;
            the message names the file, the field and what to change.
    """
    return _load_file(Path(path))


# ----------------------------------------------------------------------------------------------
# The catalog


def _name_key(name: str) -> str:
    return re.sub(r"[\s_]+", "-", str(name).strip().lower())


@functools.lru_cache(maxsize=1)
def _catalog() -> tuple[tuple[DeviceSpec, ...], dict[str, DeviceSpec]]:
    text = resources.files("cachefit.hardware").joinpath("catalog.toml").read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # pragma: no cover - a broken package
        raise ConfigError(f"catalog.toml: not valid TOML: {exc}") from None
    entries = data.get("device", [])
    devices: list[DeviceSpec] = []
    index: dict[str, DeviceSpec] = {}
    for i, entry in enumerate(entries):
        ctx = _Context(where=f"catalog.toml device[{i}]", directory=None, strict=True)
        if "base" in entry:
            raise ConfigError(f"{ctx.where}: catalog entries do not use base; write every figure with its source")
        device = _parse_device(entry, ctx)
        for key in (device.name, *device.aliases):
            k = _name_key(key)
            if k in index:
                raise ConfigError(f"{ctx.where}: name or alias {key!r} already belongs to {index[k].name!r}")
            index[k] = device
        devices.append(device)
    return tuple(devices), index


def list_devices() -> tuple[DeviceSpec, ...]:
    """Every device of the catalog, in catalog order."""
    return _catalog()[0]


def _find_in_catalog(name: str) -> DeviceSpec | None:
    return _catalog()[1].get(_name_key(name))


def _unknown_device_error(name: str, *, what: str = "device") -> ConfigError:
    index = _catalog()[1]
    close = difflib.get_close_matches(_name_key(name), list(index), n=3, cutoff=0.7)
    suggestions = sorted({index[c].name for c in close})
    hint = f"did you mean {' or '.join(repr(s) for s in suggestions)}? " if suggestions else ""
    return ConfigError(
        f"{what}: unknown device {name!r}; {hint}known devices: {', '.join(d.name for d in list_devices())}; "
        "or give a device file (.toml, .yaml, .json)"
    )


def get_device(name: str) -> DeviceSpec:
    """A catalog device by name or alias, case-insensitive (``H100``, ``h100-sxm``, ``NVIDIA H100 80GB HBM3``).

    Raises:
        ConfigError: unknown name; the message suggests close names and lists the catalog.
    """
    if isinstance(name, DeviceSpec):
        return name
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"device: expected a device name such as h100, got {name!r}")
    found = _find_in_catalog(name)
    if found is None:
        raise _unknown_device_error(name)
    return found


def _looks_like_path(spec: str) -> bool:
    return any(sep in spec for sep in ("/", "\\")) or spec.lower().endswith(_SUFFIXES)


def _resolve_spec(spec: str | Path) -> DeviceSpec | Cluster:
    if isinstance(spec, str):
        if not spec.strip():
            raise ConfigError("device: empty; give a catalog name such as h100 or a device file")
        found = _find_in_catalog(spec)
        if found is not None:
            return found
        if not Path(spec).exists() and not _looks_like_path(spec):
            raise _unknown_device_error(spec)
    elif not isinstance(spec, Path):
        raise ConfigError(f"device: expected a catalog name or a device file path, got {spec!r}")
    return load_device_file(spec)


def resolve_device(spec: str | Path | DeviceSpec) -> DeviceSpec:
    """A catalog name or a path to a device file (not a cluster file)."""
    loaded = spec if isinstance(spec, DeviceSpec) else _resolve_spec(spec)
    if isinstance(loaded, Cluster):
        raise ConfigError(
            f"device file {spec}: is a cluster file ([[cards]]), where one device is expected; "
            "pass it where a cluster is accepted, or give one device"
        )
    return loaded


def resolve_cluster(
    spec: str | Path | DeviceSpec | Cluster,
    *,
    count: int | None = None,
    level: str | None = None,
    headroom: float = 0.0,
    reserved_bytes: int = 0,
) -> Cluster:
    """A cluster from a catalog name, a device file (``count`` cards of it) or a cluster file.

    For a cluster file the cards are as written: ``count`` may only repeat their number, and
    ``level``/``headroom``/``reserved_bytes`` must be left at their defaults (set them in the file).
    """
    loaded = spec if isinstance(spec, (Cluster, DeviceSpec)) else _resolve_spec(spec)
    if isinstance(loaded, DeviceSpec):
        return make_cluster(loaded, count=count, level=level, headroom=headroom, reserved_bytes=reserved_bytes)
    if count is not None and count != len(loaded):
        raise ConfigError(
            f"cluster {spec}: has {len(loaded)} cards but {count} were asked for; "
            "change the counts in the cluster file or drop the card count"
        )
    if level is not None or headroom != 0.0 or reserved_bytes != 0:
        raise ConfigError(
            f"cluster {spec}: level, headroom and reserved bytes come from the cluster file; set them there"
        )
    return loaded


# ----------------------------------------------------------------------------------------------
# Building devices and clusters in code


def device_from_capacity(
    capacity: str | int,
    *,
    level: str = "sram",
    name: str | None = None,
    bandwidth: str | float | None = None,
    base: DeviceSpec | None = None,
) -> DeviceSpec:
    """A device whose planning level holds ``capacity`` (``--capacity 50MB --level l2``).

    Without ``base``: a device with that one level, named ``name`` or ``custom``. With ``base``: the
    base device with ``level`` replaced (or added) as a chip-wide level of ``capacity`` bytes and made
    the default, named ``name`` or ``<base>-custom``; the base's other figures are kept, and its
    bandwidth of that level unless ``bandwidth`` is given.
    """
    cap = parse_bytes(capacity, what="capacity")
    key = _level_key(level)
    if not _LEVEL_NAME_RE.match(key):
        raise ConfigError(f"level: must be lower-case letters, digits and '_' such as l2 or sram, got {level!r}")
    bw = parse_bandwidth(bandwidth, what="bandwidth") if bandwidth is not None else None
    source = "capacity given by the user"
    if base is None:
        lvl = MemoryLevel(name=key, capacity_bytes=cap, bandwidth_bytes_per_s=bw, source=source)
        return DeviceSpec(
            name=name or "custom",
            full_name=f"custom device ({key} {format_bytes(cap)})",
            levels=(lvl,),
            default_level=key,
            sources=(source,),
        )
    old = next((lvl for lvl in base.levels if lvl.name == key), None)
    note = f"replaces the {base.name} figure of {old.total_bytes:,} B" if old else f"added to {base.name}"
    if bw is None and old is not None:
        new = dataclasses.replace(old, capacity_bytes=cap, scope="chip", count=1, source=source, as_of="",
                                  uncertain=False, note=note,
                                  bandwidth_source=old.bandwidth_source or old.source,
                                  bandwidth_as_of=old.bandwidth_as_of or old.as_of)  # fmt: skip
    else:
        new = MemoryLevel(name=key, capacity_bytes=cap, bandwidth_bytes_per_s=bw, source=source, note=note)
    levels = tuple(new if lvl.name == key else lvl for lvl in base.levels) if old else (*base.levels, new)
    return dataclasses.replace(
        base,
        name=name or f"{base.name}-custom",
        full_name=f"{base.full_name or base.name} with {key} = {format_bytes(cap)}",
        aliases=(),
        levels=levels,
        default_level=key,
        sources=(*base.sources, source),
    )


def make_cluster(
    devices: Sequence[DeviceSpec] | DeviceSpec,
    *,
    count: int | None = None,
    level: str | None = None,
    headroom: float = 0.0,
    reserved_bytes: int = 0,
) -> Cluster:
    """Cards in order: ``count`` cards of one device (default 1), or one card per listed device.

    ``level`` (default: each device's default level), ``headroom`` and ``reserved_bytes`` apply to
    every card. A heterogeneous cluster lists each card's device (repeat a device to use it twice).
    """
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ConfigError(f"cards: must be a positive integer, got {count!r}")
    if count is not None:
        check_limit(count, "MAX_CLUSTER_CARDS", where="make_cluster", what="count")
    if isinstance(devices, DeviceSpec):
        seq: tuple[DeviceSpec, ...] = (devices,) * (count or 1)
    else:
        seq = tuple(devices)
        if not seq:
            raise ConfigError("cluster: no devices given; list at least one")
        check_limit(len(seq), "MAX_CLUSTER_CARDS", where="make_cluster", what="devices listed")
        if count is not None and count != len(seq):
            raise ConfigError(
                f"cluster: {len(seq)} devices listed but {count} cards asked for; "
                "count applies to a single device, so list each card's device instead"
            )
    cards: list[Card] = []
    for i, device in enumerate(seq):
        if not isinstance(device, DeviceSpec):
            raise ConfigError(f"cluster: devices[{i}] must be a DeviceSpec, got {type(device).__name__}")
        try:
            cards.append(Card(device=device, level=level, headroom=headroom, reserved_bytes=reserved_bytes))
        except ConfigError as exc:
            raise ConfigError(f"cluster card {i}: {exc}") from None
    return Cluster(cards=tuple(cards))


# ----------------------------------------------------------------------------------------------
# Serialization and docs


def device_to_dict(device: DeviceSpec) -> dict[str, Any]:
    """A JSON-ready dict of the device; :func:`parse_device` reads it back to an equal DeviceSpec."""
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


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _fmt_value(key: str, value: float | int | None) -> str:
    if value is None:
        return "unknown"
    if key.endswith("capacity"):
        return f"{int(value):,} B ({_human_bytes(int(value))})"
    if key.endswith("bandwidth"):
        return format_bandwidth(value)
    if key.startswith("peak_flops."):
        return f"{value / 1e12:,.1f} T{'OP' if 'int' in key else 'FLOP'}/s"
    if key == "kernel_overhead":
        return format_seconds(value, digits=2)
    return str(value)


def format_catalog_markdown(devices: Sequence[DeviceSpec] | None = None) -> str:
    """Markdown tables of the catalog: a summary, then every figure with its source and date."""
    devs = tuple(devices) if devices is not None else list_devices()
    out = [
        "| name | device | planning level | other on-chip levels | off-chip | dense FP16/BF16 |",
        "|---|---|---|---|---|---|",
    ]
    for dev in devs:
        lvl = dev.level()
        others = "; ".join(o.describe() for o in dev.levels if o.name != lvl.name) or "none"
        off = "none"
        if dev.offchip_capacity_bytes:
            off = _human_bytes(dev.offchip_capacity_bytes)
            if dev.offchip_bandwidth_bytes_per_s:
                off += f" @ {format_bandwidth(dev.offchip_bandwidth_bytes_per_s)}"
        fp16 = dev.peak_flops("fp16") or dev.peak_flops("bf16")
        out.append(
            f"| `{dev.name}` | {_md(dev.full_name)} | **{_md(lvl.describe())}** | {_md(others)} | {off} | "
            f"{f'{fp16 / 1e12:,.0f} TFLOP/s' if fp16 else 'unknown'} |"
        )
    out += ["", "Every figure, with its source (U: uncertain):", ""]
    for dev in devs:
        out += [
            f"#### `{dev.name}`: {_md(dev.full_name)}"
            + (f" (aliases: {', '.join(dev.aliases)})" if dev.aliases else ""),
            "",
        ]
        if dev.note:
            out += [_md(dev.note), ""]
        out += ["| figure | value | U | as of | source | note |", "|---|---|---|---|---|---|"]
        for key, fig in dev.iter_figures():
            value = _fmt_value(key, fig.value)
            if key.endswith(".capacity"):
                lvl = dev.level(key.split(".")[1])
                if lvl.scope != "chip":
                    value = f"{lvl.count} x {lvl.capacity_bytes:,} B = {value}"
            mark = "U" if fig.uncertain else ""
            out.append(f"| {key} | {value} | {mark} | {fig.as_of} | {_md(fig.source)} | {_md(fig.note)} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"
