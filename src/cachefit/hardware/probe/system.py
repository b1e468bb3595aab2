"""What the operating system reports: cache sizes (Linux sysfs), the processor's name, the memory."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from cachefit.hardware.probe.analysis import KiB, MiB

def _parse_sysfs_size(text: str) -> int | None:
    text = text.strip()
    units = {"K": KiB, "M": MiB, "G": 2**30}
    try:
        if text and text[-1].upper() in units:
            return int(text[:-1]) * units[text[-1].upper()]
        return int(text)
    except ValueError:
        return None


def reported_cpu_caches(root: str | os.PathLike = "/sys/devices/system/cpu/cpu0/cache") -> dict[str, int]:
    """Data and unified cache sizes of CPU 0 from Linux sysfs: ``{"l1": 49152, "l2": ..., "l3": ...}``.

    Empty where sysfs is absent (macOS, Windows, some containers).
    """
    out: dict[str, int] = {}
    base = Path(root)
    if not base.is_dir():
        return out
    for entry in sorted(base.glob("index*")):
        try:
            kind = (entry / "type").read_text().strip()
            level = int((entry / "level").read_text().strip())
            size = _parse_sysfs_size((entry / "size").read_text())
        except (OSError, ValueError):
            continue
        if kind in ("Data", "Unified") and size:
            out[f"l{level}"] = size
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def physical_memory_bytes() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None
