"""Device and cluster descriptions: the file format, device and cluster files, and the catalog file.

Pure Python (no torch). A description (a dict read from TOML, YAML or JSON) becomes a
:class:`~cachefit.hardware.spec.DeviceSpec` or a :class:`~cachefit.hardware.spec.Cluster`. The shipped
catalog (``catalog.toml``, next to this module) is written in the same format, read strictly: every
figure carries its public source, the date it was checked (``as_of``) and an ``uncertain`` flag; a
figure nobody publishes stays ``None``. Catalog names are looked up here too, since a description may
start from one (``base = "h100"``, a card's ``device``).

Device file format (TOML, YAML or JSON; the catalog uses the same format)::

    name = "my-gpu"                 # required (the probe's ``device`` key is accepted instead)
    base = "h100"                   # optional: a catalog device (or a device file) to start from
    full_name = "My GPU"            # optional
    default_level = "l2"            # optional: the level a plan targets
    offchip_capacity = "80GB"       # optional sizes: "50MB", "48KiB", or int bytes
    offchip_bandwidth = "3.35TB/s"  # optional rates: "7.0TB/s", "900 GB/s", or bytes/s as a number
    link_bandwidth = "900GB/s"      # chip-to-chip, both directions of all links added up
    kernel_overhead = "2.4us"       # fixed cost of one kernel (launch / dispatch): "2.4us", "0.005ms", s
    hop_latency = "3us"             # fixed cost of one chip-to-chip message (a collective step, a send)
    layer_latency = "17us"          # compiled dataflow devices: fixed cost of one decoder layer per pass
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
uncertain = true, calibrated = true, note = "..."}``; ``value`` may be omitted (unknown);
``calibrated`` marks a figure fitted to one published end-to-end result (the source) rather than read
from a specification or measured. A cluster file has
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
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from cachefit.errors import ConfigError
from cachefit.files import parse_json, read_text
from cachefit.hardware.spec import (
    FLOPS_DTYPES,
    SCALAR_FIGURES,
    Card,
    Cluster,
    DeviceSpec,
    Figure,
    MemoryLevel,
    flops_key,
    level_key,
)
from cachefit.limits import MAX_CLUSTER_CARDS, limit_error
from cachefit.sizes import parse_bandwidth, parse_bytes, parse_duration, parse_flops

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

log = logging.getLogger(__name__)

_SUFFIXES = (".toml", ".yaml", ".yml", ".json")

# ----------------------------------------------------------------------------------------------
# Parsing device and cluster descriptions (dicts read from TOML / YAML / JSON)

_FIGURE_KEYS = {"value", "source", "as_of", "uncertain", "calibrated", "note"}
_DEVICE_KEYS = {
    "name", "base", "full_name", "vendor", "aliases", "default_level", "levels", "offchip_capacity",
    "offchip_bandwidth", "link_bandwidth", "kernel_overhead", "hop_latency", "layer_latency", "peak_flops", "source",
    "as_of", "note", "figures", "sources",
    "default_capacity_bytes",
}  # fmt: skip
_DEVICE_KEY_ALIASES = {
    "device": "name",
    "offchip_capacity_bytes": "offchip_capacity",
    "offchip_bandwidth_bytes_per_s": "offchip_bandwidth",
    "link_bandwidth_bytes_per_s": "link_bandwidth",
    "kernel_overhead_s": "kernel_overhead",
    "hop_latency_s": "hop_latency",
    "layer_latency_s": "layer_latency",
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
    """A scalar, or a ``{value, source, as_of, uncertain, calibrated, note}`` table; ``source``/``as_of``
    are defaults."""
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
        calibrated = raw.get("calibrated", False)
        for flag, flag_value in (("uncertain", uncertain), ("calibrated", calibrated)):
            if not isinstance(flag_value, bool):
                raise ConfigError(f"{ctx.where}: {what}.{flag} must be true or false, got {flag_value!r}")
    else:
        value, fig_source, fig_as_of, uncertain, calibrated, note = raw, source, as_of, False, False, ""
    if ctx.strict and not (fig_source and fig_as_of):
        raise ConfigError(f"{ctx.where}: {what}: every catalog figure needs its own source and an as_of date")
    if value is not None:
        value = parse(value)
    try:
        return Figure(value=value, source=fig_source, as_of=str(fig_as_of), uncertain=uncertain,
                      calibrated=calibrated, note=str(note))
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
    name = level_key(name)
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
    elif not isinstance(default_level, str) or level_key(default_level) not in {lvl.name for lvl in levels}:
        raise ConfigError(
            f"{ctx.where}: default_level {default_level!r} is not one of the levels "
            f"{', '.join(lvl.name for lvl in levels)}; name one of them"
        )
    else:
        default_level = level_key(default_level)

    # Device-level figures.
    figures: dict[str, Figure] = dict(base.figures) if base else {}
    values: dict[str, Any] = {}
    if base:
        values = {field: getattr(base, field) for field in SCALAR_FIGURES.values()}
    parsers: dict[str, Callable[[Any], Any]] = {
        "offchip_capacity": _parse_size(f"{ctx.where}: offchip_capacity"),
        "offchip_bandwidth": lambda v: parse_bandwidth(v, what=f"{ctx.where}: offchip_bandwidth"),
        "link_bandwidth": lambda v: parse_bandwidth(v, what=f"{ctx.where}: link_bandwidth"),
        "kernel_overhead": lambda v: parse_duration(v, what=f"{ctx.where}: kernel_overhead"),
        "hop_latency": lambda v: parse_duration(v, what=f"{ctx.where}: hop_latency"),
        "layer_latency": lambda v: parse_duration(v, what=f"{ctx.where}: layer_latency"),
    }
    provenance = d.get("figures") or {}
    if not isinstance(provenance, Mapping):
        raise ConfigError(f"{ctx.where}: figures must be a table of figure tables, got {type(provenance).__name__}")
    for key, field in SCALAR_FIGURES.items():
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
        key = flops_key(dtype, what=f"{ctx.where}: peak_flops")
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
            hop_latency_s=values.get("hop_latency_s"),
            layer_latency_s=values.get("layer_latency_s"),
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
    found = find_catalog_device(raw)
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
    if looks_like_device_path(raw):
        raise ConfigError(f"{ctx.where}: {what}: device file {path} not found; check the path (relative to this file)")
    raise unknown_device_error(raw, what=f"{ctx.where}: {what}")


def _parse_reserved(raw: Any, what: str) -> int:
    is_number = isinstance(raw, (int, float)) and not isinstance(raw, bool)
    if raw is None or (is_number and raw == 0) or (isinstance(raw, str) and raw.strip() in {"0", "0B"}):
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
            f"({', '.join(d.name for d in catalog_devices())})"
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
# The catalog: catalog.toml, a device file of many devices, each figure with its own source


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


def catalog_devices() -> tuple[DeviceSpec, ...]:
    """Every device of ``catalog.toml``, in catalog order (read and checked once)."""
    return _catalog()[0]


def find_catalog_device(name: str) -> DeviceSpec | None:
    """The catalog device named or aliased ``name`` (case-insensitive; ``-``, ``_`` and spaces alike), or None."""
    return _catalog()[1].get(_name_key(name))


def unknown_device_error(name: str, *, what: str = "device") -> ConfigError:
    """The error for a device name the catalog lacks: close names suggested, the catalog listed."""
    index = _catalog()[1]
    close = difflib.get_close_matches(_name_key(name), list(index), n=3, cutoff=0.7)
    suggestions = sorted({index[c].name for c in close})
    hint = f"did you mean {' or '.join(repr(s) for s in suggestions)}? " if suggestions else ""
    return ConfigError(
        f"{what}: unknown device {name!r}; {hint}known devices: {', '.join(d.name for d in catalog_devices())}; "
        "or give a device file (.toml, .yaml, .json)"
    )


def looks_like_device_path(spec: str) -> bool:
    """Whether ``spec`` is meant as a file (a path separator or a device-file suffix), not a catalog name."""
    return any(sep in spec for sep in ("/", "\\")) or spec.lower().endswith(_SUFFIXES)
