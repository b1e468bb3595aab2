"""Hardware facts: memory levels, devices, cards and clusters; the catalog and device files.

The public face of four modules, one role each (import from here or from ``cachefit.hardware``):

- :mod:`cachefit.hardware.spec`: the data types (:class:`Figure`, :class:`MemoryLevel`,
  :class:`DeviceSpec`, :class:`Card`, :class:`Cluster`) and their JSON-ready dicts;
- :mod:`cachefit.hardware.files`: the device / cluster file format (TOML, YAML, JSON; documented
  there), :func:`parse_device`, :func:`load_device_file`, and reading ``catalog.toml``;
- :mod:`cachefit.hardware.catalog`: devices by name (:func:`get_device`, :func:`list_devices`),
  by name or file (:func:`resolve_device`, :func:`resolve_cluster`), and built in code
  (:func:`make_cluster`, :func:`device_from_capacity`);
- :mod:`cachefit.hardware.render`: :func:`format_bandwidth` and :func:`format_catalog_markdown`.

Rates and times from text (:func:`parse_bandwidth`, :func:`parse_flops`, :func:`parse_duration`) live
in :mod:`cachefit.sizes` beside the byte sizes. Pure Python (no torch).
"""

from __future__ import annotations

from cachefit.hardware.catalog import (
    device_from_capacity,
    get_device,
    list_devices,
    make_cluster,
    resolve_cluster,
    resolve_device,
)
from cachefit.hardware.files import load_device_file, parse_device
from cachefit.hardware.render import format_bandwidth, format_catalog_markdown
from cachefit.hardware.spec import (
    FLOPS_DTYPES,
    Card,
    Cluster,
    DeviceSpec,
    Figure,
    MemoryLevel,
    cluster_to_dict,
    device_to_dict,
)
from cachefit.sizes import parse_bandwidth, parse_duration, parse_flops

__all__ = [
    "FLOPS_DTYPES",
    "Card",
    "Cluster",
    "DeviceSpec",
    "Figure",
    "MemoryLevel",
    "cluster_to_dict",
    "device_from_capacity",
    "device_to_dict",
    "format_bandwidth",
    "format_catalog_markdown",
    "get_device",
    "list_devices",
    "load_device_file",
    "make_cluster",
    "parse_bandwidth",
    "parse_device",
    "parse_duration",
    "parse_flops",
    "resolve_cluster",
    "resolve_device",
]
