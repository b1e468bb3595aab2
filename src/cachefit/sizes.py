"""Byte sizes and durations: parse ``50MB`` / ``1.5GiB``, format bytes and seconds for humans.

Decimal units (B, KB, MB, GB, TB) are powers of 10^3, binary units (KiB, MiB, GiB, TiB) powers of
2^10, as DESIGN.md fixes for the command line. Output always names its unit.
"""

from __future__ import annotations

import math
import re

from cachefit.errors import ConfigError

_UNITS: dict[str, int] = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "pb": 10**15,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_bytes(text: str | int | float, *, what: str = "size") -> int:
    """Parse a byte size such as ``50MB``, ``48 KiB``, ``1e6`` or ``123`` into an int of bytes.

    Raises:
        ConfigError: the text is not a positive size with a known unit.
    """
    if isinstance(text, bool):
        raise ConfigError(f"{what}: expected a size such as 50MB, got {text!r}")
    if isinstance(text, (int, float)):
        value, unit = float(text), "b"
    else:
        match = _SIZE_RE.match(str(text))
        if not match:
            raise ConfigError(
                f"{what}: cannot read {text!r} as a size; write a number with a unit, e.g. 50MB, 48KiB, 1.5GiB"
            )
        value, unit = float(match.group(1)), (match.group(2) or "b").lower()
    if unit not in _UNITS:
        known = ", ".join(["B", "KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB"])
        raise ConfigError(f"{what}: unknown unit {unit!r} in {text!r}; use one of {known}")
    nbytes = value * _UNITS[unit]
    if not math.isfinite(nbytes) or nbytes <= 0:
        raise ConfigError(f"{what}: must be a positive size, got {text!r}")
    if abs(nbytes - round(nbytes)) > 1e-6 * max(1.0, nbytes):
        raise ConfigError(f"{what}: {text!r} is not a whole number of bytes ({nbytes:g} B)")
    return int(round(nbytes))


def format_bytes(nbytes: int | float, *, binary: bool = False, digits: int = 1) -> str:
    """Format bytes with a unit: ``format_bytes(50_000_000) == '50.0 MB'``."""
    units = ("B", "KiB", "MiB", "GiB", "TiB") if binary else ("B", "KB", "MB", "GB", "TB")
    base = 1024.0 if binary else 1000.0
    value = float(nbytes)
    sign = "-" if value < 0 else ""
    value = abs(value)
    for unit in units:
        if value < base or unit == units[-1]:
            if unit == "B":
                return f"{sign}{int(value)} B"
            return f"{sign}{value:.{digits}f} {unit}"
        value /= base
    raise AssertionError("unreachable")


def format_seconds(seconds: float | None, *, unknown: str = "-", digits: int = 3) -> str:
    """Format a duration with a unit: ``format_seconds(0.0021) == '2.100 ms'``; None gives ``unknown``."""
    if seconds is None:
        return unknown
    if seconds == 0:
        return "0"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("\u00b5s", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.{digits}f} {unit}"
    return f"{seconds / 1e-9:.0f} ns"
