"""Hardware: the device catalog, device and cluster files, cards and clusters (pure Python).

``probe`` (measuring the local device) imports torch and is not re-exported here.
"""

from cachefit.hardware.devices import (
    FLOPS_DTYPES,
    Card,
    Cluster,
    DeviceSpec,
    Figure,
    MemoryLevel,
    cluster_to_dict,
    device_from_capacity,
    device_to_dict,
    format_bandwidth,
    format_catalog_markdown,
    get_device,
    list_devices,
    load_device_file,
    make_cluster,
    parse_bandwidth,
    parse_device,
    parse_flops,
    resolve_cluster,
    resolve_device,
)

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
    "parse_flops",
    "resolve_cluster",
    "resolve_device",
]
