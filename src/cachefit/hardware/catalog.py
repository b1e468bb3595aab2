"""The device catalog by name, devices and clusters from a name or a file, clusters built in code.

Pure Python (no torch). :func:`get_device` and :func:`list_devices` read the shipped catalog
(``catalog.toml``, parsed by :mod:`cachefit.hardware.files`); :func:`resolve_device` and
:func:`resolve_cluster` accept a catalog name or a device / cluster file, as the command line does;
:func:`make_cluster` and :func:`device_from_capacity` build clusters and devices in code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from cachefit.errors import ConfigError
from cachefit.hardware.files import (
    catalog_devices,
    find_catalog_device,
    load_device_file,
    looks_like_device_path,
    unknown_device_error,
)
from cachefit.hardware.spec import (
    LEVEL_NAME_RE,
    Card,
    Cluster,
    DeviceSpec,
    MemoryLevel,
    level_key,
)
from cachefit.limits import check_limit
from cachefit.sizes import format_bytes, parse_bandwidth, parse_bytes


def list_devices() -> tuple[DeviceSpec, ...]:
    """Every device of the catalog, in catalog order."""
    return catalog_devices()


def get_device(name: str) -> DeviceSpec:
    """A catalog device by name or alias, case-insensitive (``H100``, ``h100-sxm``, ``NVIDIA H100 80GB HBM3``).

    Raises:
        ConfigError: unknown name; the message suggests close names and lists the catalog.
    """
    if isinstance(name, DeviceSpec):
        return name
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"device: expected a device name such as h100, got {name!r}")
    found = find_catalog_device(name)
    if found is None:
        raise unknown_device_error(name)
    return found


def _resolve_spec(spec: str | Path) -> DeviceSpec | Cluster:
    if isinstance(spec, str):
        if not spec.strip():
            raise ConfigError("device: empty; give a catalog name such as h100 or a device file")
        found = find_catalog_device(spec)
        if found is not None:
            return found
        if not Path(spec).exists() and not looks_like_device_path(spec):
            raise unknown_device_error(spec)
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
    key = level_key(level)
    if not LEVEL_NAME_RE.match(key):
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
