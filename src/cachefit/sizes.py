"""Numbers from text and back: byte sizes, bandwidths, FLOP/s and durations.

Parse ``50MB`` / ``1.5GiB`` (bytes), ``7.0TB/s`` (bytes/s), ``989TFLOPS`` (FLOP/s) and ``2.4us``
(seconds); format bytes and seconds for humans. Decimal units (B, KB, MB, GB, TB) are powers of
10^3, binary units (KiB, MiB, GiB, TiB) powers of 2^10, on the command line as in every file
cachefit reads. Output always names its unit.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from typing import Any

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
_NUMBER = r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)"
_FLOPS_PREFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "p": 1e15}
# per second: a time is divided by these (2.5 / 1e6 is exactly 2.5e-06; 2.5 * 1e-6 is not)
_DURATION_UNITS = {"s": 1.0, "ms": 1e3, "us": 1e6, "\u00b5s": 1e6, "\u03bcs": 1e6, "ns": 1e9}


def _shown(text: object) -> str:
    """``repr(text)``, cut to 60 characters: messages stay one readable line whatever the input."""
    shown = repr(text)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_positive(value: object, what: str) -> None:
    if not (_is_number(value) and math.isfinite(value) and value > 0):  # type: ignore[arg-type]
        raise ConfigError(f"{what} must be a positive number, got {value!r}")


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


def _parse_items(items: list[str], where: str) -> list[int]:
    """Each item read by :func:`parse_bytes`, in order; the first bad one names its index."""
    return [parse_bytes(item.strip(), what=f"{where} item {i}") for i, item in enumerate(items)]


def parse_sizes(text: str, *, where: str = "--sizes") -> list[int]:
    """Comma-separated sizes (``3MB,5MB,2MB``), each read by :func:`parse_bytes`.

    Raises:
        ConfigError: more items than :data:`~cachefit.limits.MAX_SIZES_LINES` (counted before the
            text is split), none, or a bad one (the message gives its index from 0).
    """
    from cachefit.limits import check_limit

    check_limit(text.count(",") + 1, "MAX_SIZES_LINES", where=where, what="items")
    items = text.split(",")
    if not items:
        raise ConfigError(f"{where}: no sizes given")
    return _parse_items(items, where)


# A sizes file read whole. Lines of digits alone (``12345``, spaces and tabs around) are read by numpy
# in one pass; lines that add a unit (``3MB``, `` 5 MiB``) or ``#`` comments by a few regular-expression
# passes; anything else (decimals, exponents, other whitespace, a bad line) line by line by
# parse_bytes, which gives the same numbers and names the bad item.
_DIGITS_AND_SPACE = b"0123456789 \t\n"
_MAX_INT64_DIGITS = 18  # 10**18 - 1 < 2**63: numpy's int64 reads every such number exactly
_INT_LINES = re.compile(r"^[ \t]*([0-9]{1,300})[ \t]*$", re.MULTILINE)
_UNIT_LINES = re.compile(r"^[ \t]*([0-9]{1,300})[ \t]*([A-Za-z]*)[ \t]*$", re.MULTILINE)
_BLANK_LINES = re.compile(r"^[ \t]*$", re.MULTILINE)
_COMMENT_LINES = re.compile(r"^[ \t]*#", re.MULTILINE)
# ASCII whitespace other than space, tab and newline: str.strip() removes it, the patterns above do not
_OTHER_SPACE = (b"\x0b", b"\x0c", b"\x1c", b"\x1d", b"\x1e", b"\x1f")


def _count_runs(is_digit: Any) -> int:
    """Runs of True in a boolean array (numbers, where True marks a digit)."""
    import numpy as np

    return int(np.count_nonzero(is_digit[1:] > is_digit[:-1])) + int(is_digit[:1].sum())


def _integer_lines(data: bytes) -> list[int] | None:
    """The numbers of ASCII text made of digits, spaces, tabs and newlines only, read by numpy; None
    where a line holds two numbers, or a number is 0 or too long for int64 to read exactly."""
    import numpy as np

    buf = np.frombuffer(data, dtype=np.uint8)
    numbers = _count_runs(buf >= ord("0"))  # the other bytes (space, tab, newline) are all below "0"
    # two numbers on one line are two runs that removing the spaces and tabs joins into one
    if not numbers or _count_runs(buf[(buf != ord(" ")) & (buf != ord("\t"))] >= ord("0")) != numbers:
        return None
    values = np.fromstring(data, dtype=np.int64, sep=" ")  # any whitespace separates; C speed
    # a number of 19 digits or more may be clamped to 2**63 - 1: such sizes go through parse_bytes
    if len(values) != numbers or not values.all() or int(values.max()) >= 10**_MAX_INT64_DIGITS:
        return None
    return values.tolist()


def _whole_number_lines(text: str, num_lines: int) -> list[int] | None:
    """The sizes of a text whose every line is blank, a ``#`` comment or a positive whole number with
    an optional known unit, read with a few passes over the whole text; None for any other text."""
    if not text.isascii():
        return None
    data = text.encode("ascii")
    if not data.translate(None, _DIGITS_AND_SPACE):
        return _integer_lines(data)
    if any(c in data for c in _OTHER_SPACE):
        return None
    skipped = len(_BLANK_LINES.findall(text)) + len(_COMMENT_LINES.findall(text))
    numbers = _INT_LINES.findall(text)
    if len(numbers) + skipped == num_lines:
        values = list(map(int, numbers))
        return None if 0 in values else values
    pairs = _UNIT_LINES.findall(text)
    if len(pairs) + skipped != num_lines:
        return None
    scale = {unit: _UNITS.get(unit.lower() or "b") for unit in {unit for _, unit in pairs}}
    if None in scale.values():
        return None
    values = [int(number) * scale[unit] for number, unit in pairs]  # type: ignore[operator]
    return None if 0 in values else values


def read_sizes_file(path: str | os.PathLike[str], *, where: str | None = None) -> list[int]:
    """Sizes one a line, each read as :func:`parse_bytes` reads it; blank lines and lines that start
    with ``#`` are skipped.

    The file is read as :func:`cachefit.files.read_text` reads it (bounded, UTF-8, a byte-order mark
    dropped); ``\\r\\n`` and ``\\r`` end lines too. Whole numbers with or without a unit are read with a
    few passes over the whole text (a million lines in a fraction of a second); any other line sends
    the file through :func:`parse_bytes` line by line, which gives the same numbers and errors.

    Args:
        path: the file.
        where: how to name the file in messages (default ``--sizes-file PATH``).

    Raises:
        ConfigError: the file cannot be read, is over a limit of :mod:`cachefit.limits` (bytes, or
            :data:`~cachefit.limits.MAX_SIZES_LINES` lines, counted before the lines are split), holds
            no size, or a bad one (the message gives its index among the sizes, from 0).
    """
    from cachefit.files import read_text
    from cachefit.limits import check_limit

    where = where or f"--sizes-file {os.fspath(path)}"
    text = read_text(path, where=where)  # bounded, UTF-8 checked
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    num_lines = text.count("\n") + (not text.endswith("\n"))
    check_limit(num_lines, "MAX_SIZES_LINES", where=where, what="lines")
    # str.split keeps the empty last "line" after a final newline; the counts above see it too
    values = _whole_number_lines(text, text.count("\n") + 1)
    if values:
        return values
    items = [line for line in text.split("\n") if line.strip() and not line.lstrip().startswith("#")]
    if not items:
        raise ConfigError(f"{where}: no sizes given")
    return _parse_items(items, where)


def parse_bandwidth(text: str | int | float, *, what: str = "bandwidth") -> float:
    """Parse a bandwidth such as ``7.0TB/s``, ``900 GB/s``, ``48KiB/s`` or a number of bytes/s.

    Units are the byte units of :func:`parse_bytes` followed by ``/s``. Bits per second
    (``Gb/s``) are refused: a lower-case ``b`` is too easy to misread by 8x.

    Raises:
        ConfigError: not a positive rate with a known unit.
    """
    if isinstance(text, bool):
        raise ConfigError(f"{what}: expected a bandwidth such as 7.0TB/s, got {text!r}")
    if _is_number(text):
        _check_positive(text, what)
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
    _check_positive(rate, what)
    return rate


def parse_flops(text: str | int | float, *, what: str = "peak_flops") -> float:
    """Parse a compute rate: ``989TFLOPS``, ``989 TFLOP/s``, ``750 TOPS``, ``2.25e15`` (FLOP/s)."""
    if isinstance(text, bool):
        raise ConfigError(f"{what}: expected a rate such as 989TFLOPS, got {text!r}")
    if _is_number(text):
        _check_positive(text, what)
        return float(text)
    match = re.fullmatch(rf"\s*{_NUMBER}\s*([kKmMgGtTpP]?)\s*(flops|flop/s|ops|op/s)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ConfigError(
            f"{what}: cannot read {text!r} as a compute rate; write e.g. 989TFLOPS, 750TOPS or 9.89e14"
        )
    rate = float(match.group(1)) * _FLOPS_PREFIX[match.group(2).lower()]
    _check_positive(rate, what)
    return rate


def parse_duration(text: str | int | float, *, what: str = "duration") -> float:
    """Parse a time such as ``2.4us``, ``2.4 µs``, ``0.005ms``, ``3e-6 s`` or a number of seconds."""
    if isinstance(text, bool):
        raise ConfigError(f"{what}: expected a time such as 2.4us, got {text!r}")
    if _is_number(text):
        _check_positive(text, f"{what} (seconds)")
        return float(text)
    match = re.fullmatch(rf"\s*{_NUMBER}\s*([a-zA-Z\u00b5\u03bc]+)?\s*", str(text))
    unit = (match.group(2) or "s") if match else ""
    if not match or unit.lower() not in _DURATION_UNITS:
        raise ConfigError(
            f"{what}: cannot read {text!r} as a time; write a number with s, ms, us (or \u00b5s) or ns, e.g. 2.4us, "
            "or seconds as a plain number"
        )
    seconds = float(match.group(1)) / _DURATION_UNITS[unit.lower()]
    _check_positive(seconds, what)
    return seconds


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


def format_capacity(nbytes: int) -> str:
    """Bytes in the units they were likely written in: ``50.0 MiB`` for 52,428,800 B, ``44.0 GB`` for 44e9 B.

    Binary units where the count is a whole number of MiB (or KiB below 1 MiB), else decimal.
    """
    binary = nbytes % 2**20 == 0 or (nbytes < 2**20 and nbytes % 2**10 == 0)
    return format_bytes(nbytes, binary=binary)


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
