"""Byte sizes and durations: parse ``50MB`` / ``1.5GiB``, format bytes and seconds for humans.

Decimal units (B, KB, MB, GB, TB) are powers of 10^3, binary units (KiB, MiB, GiB, TiB) powers of
2^10, on the command line as in every file cachefit reads. Output always names its unit.
"""

from __future__ import annotations

import math
import numbers
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


def _shown(text: object) -> str:
    """``repr(text)``, cut to 60 characters: messages stay one readable line whatever the input."""
    shown = repr(text)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def parse_bytes(text: str | int | float, *, what: str = "size") -> int:
    """Parse a byte size such as ``50MB``, ``48 KiB``, ``1e6`` or ``123`` into an int of bytes.

    Raises:
        ConfigError: the text is not a positive size with a known unit.
    """
    shown = _shown(text)
    if isinstance(text, bool) or not isinstance(text, (str, numbers.Real)):
        raise ConfigError(f"{what}: expected a size such as 50MB, got {shown}")
    if isinstance(text, numbers.Integral):  # exact, however large (no detour through float)
        if text <= 0:
            raise ConfigError(f"{what}: must be a positive size, got {shown}")
        return int(text)
    if isinstance(text, numbers.Real):
        number, unit = float(text), "b"
    else:
        match = _SIZE_RE.match(text)
        if not match:
            raise ConfigError(
                f"{what}: cannot read {shown} as a size; write a number with a unit, e.g. 50MB, 48KiB, 1.5GiB"
            )
        digits, unit = match.group(1), (match.group(2) or "b").lower()
        # whole numbers exactly (a float would round 20-digit counts); absurdly long ones as floats
        number = int(digits) if digits.isdigit() and len(digits) <= 300 else float(digits)
    if unit not in _UNITS:
        known = ", ".join(["B", "KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB"])
        raise ConfigError(f"{what}: unknown unit {unit!r} in {shown}; use one of {known}")
    if isinstance(number, int):
        if number <= 0:
            raise ConfigError(f"{what}: must be a positive size, got {shown}")
        return number * _UNITS[unit]
    nbytes = number * _UNITS[unit]
    if math.isinf(nbytes):
        raise ConfigError(f"{what}: {shown} is too large to be a size; give a finite number of bytes")
    if not math.isfinite(nbytes) or nbytes <= 0:
        raise ConfigError(f"{what}: must be a positive size, got {shown}")
    if abs(nbytes - round(nbytes)) > 1e-6 * max(1.0, nbytes):
        raise ConfigError(f"{what}: {shown} is not a whole number of bytes ({nbytes:g} B)")
    if round(nbytes) < 1:
        raise ConfigError(f"{what}: {shown} is less than one byte; give at least 1 B")
    return int(round(nbytes))


def format_bytes(nbytes: int | float, *, binary: bool = False, digits: int = 1) -> str:
    """Format bytes with a unit: ``format_bytes(50_000_000) == '50.0 MB'``."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, numbers.Real):
        raise ConfigError(f"format_bytes: expected a number of bytes, got {_shown(nbytes)}")
    units = ("B", "KiB", "MiB", "GiB", "TiB") if binary else ("B", "KB", "MB", "GB", "TB")
    base = 1024.0 if binary else 1000.0
    try:
        value = float(nbytes)
    except OverflowError:  # an int beyond floats (over 10**308 bytes)
        value = math.inf if nbytes > 0 else -math.inf
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
