"""Reading a sweep: sizes, plateaus, cliffs and the levels they make (plain Python and numpy).

See :mod:`cachefit.hardware.probe` for the method; this module only reads curves, it measures nothing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cachefit.errors import ConfigError

KiB = 2**10
MiB = 2**20
OFFCHIP_NAME = "dram"
"""Name of the plateau after the last cliff."""

# Largest factor between a detected capacity and a reported cache size for the detected level to
# take the reported level's name (2 octaves: wide, because a shared cache's usable share can be far
# below its size on a busy or virtualized machine).
_NAME_MATCH_OCTAVES = 2.0


@dataclass(frozen=True, slots=True, kw_only=True)
class DetectedLevel:
    """One plateau of the bandwidth curve: a memory level as the sweep sees it."""

    name: str
    """``l1``, ``l2``, ``l3`` ... or ``dram`` for the plateau after the last cliff."""
    capacity_bytes: int | None
    """Largest measured working set before the level's cliff; None for the last plateau."""
    bandwidth_bytes_per_s: float
    """Highest smoothed bandwidth on the plateau."""
    first_index: int
    """Index of the plateau's first sample in the sweep."""
    last_index: int
    """Index of the plateau's last sample (for a cache, the sample at ``capacity_bytes``)."""
    drop_fraction: float | None = None
    """How much the smoothed bandwidth falls across the cliff after this level (0.4: by 40%)."""
    reported_bytes: int | None = None
    """The size the operating system or driver reports for the level this one was named after."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def sweep_sizes(min_bytes: int, max_bytes: int, points_per_octave: int) -> tuple[int, ...]:
    """Working-set sizes ``min_bytes * 2**(k / points_per_octave)`` up to ``max_bytes``, rounded to 4 KiB.

    >>> sweep_sizes(16 * 1024, 64 * 1024, 2)
    (16384, 24576, 32768, 45056, 65536)
    """
    if min_bytes < 1 or max_bytes < min_bytes or points_per_octave < 1:
        raise ConfigError(
            f"sweep sizes: need 0 < min_bytes <= max_bytes and points_per_octave >= 1, got "
            f"{min_bytes}, {max_bytes}, {points_per_octave}"
        )
    octaves = math.log2(max_bytes / min_bytes)
    count = int(math.floor(octaves * points_per_octave + 1e-9)) + 1
    out: list[int] = []
    for k in range(count):
        size = int(round(min_bytes * 2 ** (k / points_per_octave) / (4 * KiB))) * 4 * KiB
        size = max(size, 4 * KiB)
        if not out or size > out[-1]:
            out.append(size)
    return tuple(out)


def gemv_shape(weight_bytes: int, itemsize: int) -> tuple[int, int]:
    """Rows and columns of the sweep's ``W``: rows of up to 1,024 elements, at least 16 rows.

    A transformer's linear layers have rows of thousands of elements; 1,024 keeps that shape from
    64 KiB up (fp32) while the smallest matrices still have 16 rows.
    """
    elements = max(weight_bytes // itemsize, 16)
    cols = 1024
    while cols > 16 and elements // cols < 16:
        cols //= 2
    return elements // cols, cols


def octave_index(sizes: Sequence[int], i: int) -> int | None:
    """First index whose size is at least twice ``sizes[i]`` (None past the end)."""
    for j in range(i + 1, len(sizes)):
        if sizes[j] >= 2 * sizes[i] * (1 - 1e-9):
            return j
    return None


def plateau_level(values: Sequence[float]) -> float:
    """The level of a plateau: the 75th percentile of its log-bandwidths.

    Not the mean: the first sizes of a sweep are held back by per-call overhead (a rise), and the
    first sizes past a cliff are still partly served by the faster level; the upper quartile is the
    plateau proper in both cases.
    """
    return float(np.percentile(values, 75))


def segment_plateaus(log_bandwidths: Sequence[float], *, drop_fraction: float = 0.30,
                     min_points: int = 2) -> list[tuple[int, int]]:
    """Split a log-bandwidth curve into plateaus separated by drops of more than ``drop_fraction``.

    Constrained agglomerative segmentation (Ward's criterion with an adjacency constraint, as in
    contiguity-constrained hierarchical clustering): every point starts as its own segment; while
    some adjacent pair *must* merge, the pair whose merge raises the squared error least,
    ``n1 * n2 / (n1 + n2) * (m1 - m2)**2`` with ``m`` the mean log-bandwidth, is merged. A pair must
    merge when the right segment's level (:func:`plateau_level`) is not below the left's by more
    than ``drop_fraction`` (a rise or a small step is never a cliff) or either has fewer than
    ``min_points`` points (an outlier is not a plateau). Merging the closest pairs first lets a cliff
    that is a gradual ramp over a few octaves survive as one drop between the plateaus on each side.

    Returns:
        ``(first, last)`` index pairs (inclusive), in order, covering every point once.
    """
    threshold = -math.log(1 - drop_fraction)
    values = [float(v) for v in log_bandwidths]
    segs = [(i, i) for i in range(len(values))]

    def must_merge(left: tuple[int, int], right: tuple[int, int]) -> bool:
        if left[1] - left[0] + 1 < min_points or right[1] - right[0] + 1 < min_points:
            return True
        drop = plateau_level(values[left[0]: left[1] + 1]) - plateau_level(values[right[0]: right[1] + 1])
        return drop <= threshold

    while len(segs) > 1:
        best: tuple[float, int] | None = None
        for k in range(len(segs) - 1):
            left, right = segs[k], segs[k + 1]
            if not must_merge(left, right):
                continue
            n1, n2 = left[1] - left[0] + 1, right[1] - right[0] + 1
            m1, m2 = np.mean(values[left[0]: left[1] + 1]), np.mean(values[right[0]: right[1] + 1])
            cost = n1 * n2 / (n1 + n2) * float(m1 - m2) ** 2
            if best is None or cost < best[0]:
                best = (cost, k)
        if best is None:
            break
        k = best[1]
        segs[k: k + 2] = [(segs[k][0], segs[k + 1][1])]
    return segs


def _name_levels(capacities: Sequence[int], reported: Mapping[str, int]) -> list[tuple[str, int | None]]:
    """Names for detected capacities (ascending): a reported level within a factor of 4, else by order."""
    # Reported names such as l1, l2, l3 in size order; detected levels are named in increasing order.
    ranked = sorted(reported.items(), key=lambda kv: kv[1])
    out: list[tuple[str, int | None]] = []
    last_number = 0
    used: set[str] = set()
    for cap in capacities:
        best: tuple[float, str, int] | None = None
        for name, size in ranked:
            number = _level_number(name)
            if name in used or (number is not None and number <= last_number):
                continue
            distance = abs(math.log2(cap / size))
            if distance <= _NAME_MATCH_OCTAVES and (best is None or distance < best[0]):
                best = (distance, name, size)
        if best is not None:
            _, name, size = best
            out.append((name, size))
            used.add(name)
            last_number = _level_number(name) or last_number + 1
            continue
        # No reported level near it: the next number after the previous level and after every
        # reported level far smaller than it (a 40 MB level above a 2 MiB l2 is an l3).
        below = [_level_number(n) or 0 for n, size in ranked if size * 2**_NAME_MATCH_OCTAVES < cap]
        last_number = max(last_number + 1, max(below, default=0) + 1)
        name = f"l{last_number}"
        while name in used:
            last_number += 1
            name = f"l{last_number}"
        used.add(name)
        out.append((name, None))
    return out


def _level_number(name: str) -> int | None:
    return int(name[1:]) if len(name) > 1 and name[0] == "l" and name[1:].isdigit() else None


def detect_levels(
    sizes: Sequence[int],
    bandwidths: Sequence[float],
    *,
    drop_fraction: float = 0.30,
    min_octaves: float = 1.0,
    reported: Mapping[str, int] | None = None,
    last_name: str = OFFCHIP_NAME,
) -> tuple[DetectedLevel, ...]:
    """Find the cache levels in a bandwidth-vs-working-set curve.

    The curve is split into plateaus by :func:`segment_plateaus` (adjacent plateaus differ by a
    fall of more than ``drop_fraction``); each plateau but the last is a cache. Its capacity is the
    largest working set whose bandwidth is still above the midpoint (in log) between its plateau and
    the next, near their boundary: the last size "before the drop", read the same way on a vertical
    cliff and on a ramp. A cache's bandwidth is the 75th percentile of its points (the plateau
    proper: small sizes are held back by per-call overhead, and the first sizes past the previous
    cliff are still partly served by the faster level); the last plateau's bandwidth is the median of
    its points from one octave past its start (the sizes right after a cliff are still partly cached).

    Args:
        sizes: working-set bytes, strictly increasing (a geometric sweep).
        bandwidths: bytes/s measured at each size.
        drop_fraction: the smallest fall between plateaus that counts as a cliff (0.3: by 30%).
        min_octaves: how far a plateau must extend, from its first size to its last, to be one
            (shorter is an outlier or a step of a ramp, and is merged into a neighbour). Memory
            levels differ in size by far more than a factor of 2.
        reported: cache sizes the system reports (``{"l2": 2097152, ...}``), used only to name levels.
        last_name: name of the plateau after the last cliff.

    Returns:
        The levels in order: one per cliff (with its capacity), then the last plateau
        (``capacity_bytes=None``).
    """
    n = len(sizes)
    if n != len(bandwidths):
        raise ConfigError(f"detect_levels: {n} sizes but {len(bandwidths)} bandwidths; give one bandwidth per size")
    if n < 3:
        raise ConfigError(f"detect_levels: need at least 3 sizes, got {n}")
    if sizes[0] <= 0 or any(b <= a for a, b in zip(sizes[:-1], sizes[1:])):
        raise ConfigError("detect_levels: sizes must be positive and strictly increasing")
    if any(not (isinstance(b, (int, float)) and b > 0 and math.isfinite(b)) for b in bandwidths):
        raise ConfigError("detect_levels: bandwidths must be positive finite bytes/s")
    if not 0 < drop_fraction < 1:
        raise ConfigError(f"detect_levels: drop_fraction must be in (0, 1), got {drop_fraction!r}")
    if not (isinstance(min_octaves, (int, float)) and 0 <= min_octaves < 16):
        raise ConfigError(f"detect_levels: min_octaves must be in [0, 16), got {min_octaves!r}")
    # Sizes per octave of the sweep (geometric), hence the points a plateau of min_octaves spans.
    per_octave = (n - 1) / math.log2(sizes[-1] / sizes[0])
    min_points = max(2, 1 + math.ceil(min_octaves * per_octave - 1e-6))

    logs = [math.log(b) for b in bandwidths]
    plateaus = segment_plateaus(logs, drop_fraction=drop_fraction, min_points=min_points)
    caches = plateaus[:-1]
    # Where each cliff is: the last size, from an octave before the plateaus' boundary to an octave
    # after it, whose log-bandwidth (a running median of 3, against single outliers) is still above
    # the midpoint between the plateau before (its upper quartile) and the one after (its median).
    # The boundary the segmentation drew can sit anywhere on a ramp; the midpoint is a property of
    # the curve itself.
    smooth = [float(np.median(logs[max(0, i - 1): i + 2])) for i in range(n)]
    reach = max(1, round(per_octave))
    edges: list[int] = []
    for k, (lo, hi) in enumerate(caches):
        nxt_lo, nxt_hi = plateaus[k + 1]
        mid = (plateau_level(logs[lo: hi + 1]) + float(np.median(logs[nxt_lo: nxt_hi + 1]))) / 2
        first = max(lo, hi - reach, edges[-1] + 1 if edges else 0)
        last = min(nxt_hi - 1, nxt_lo + reach)
        above = [j for j in range(first, last + 1) if smooth[j] >= mid]
        edges.append(max(above) if above else hi)

    names = _name_levels([sizes[edge] for edge in edges], reported or {})
    levels: list[DetectedLevel] = []
    start = 0
    for k, ((lo, hi), edge, (name, reported_bytes)) in enumerate(zip(caches, edges, names)):
        nxt_lo, nxt_hi = plateaus[k + 1]
        here = plateau_level(logs[lo: hi + 1])
        after = plateau_level(logs[nxt_lo: nxt_hi + 1])
        levels.append(DetectedLevel(
            name=name, capacity_bytes=sizes[edge],
            bandwidth_bytes_per_s=math.exp(here),
            first_index=start, last_index=edge, drop_fraction=1 - math.exp(after - here),
            reported_bytes=reported_bytes,
        ))
        start = edge + 1
    lo, hi = plateaus[-1]
    tail_start = (octave_index(sizes, lo) or lo) if caches else lo
    tail = bandwidths[tail_start: hi + 1] if tail_start <= hi - 1 else bandwidths[lo: hi + 1]
    levels.append(DetectedLevel(name=last_name, capacity_bytes=None, bandwidth_bytes_per_s=float(np.median(tail)),
                                first_index=start, last_index=n - 1))
    return tuple(levels)
