"""Proportional splits: one unit's heads, MLP columns or vocabulary rows shared out over cards of
different capacities so that every card's shard fits it.

An even split (:func:`cachefit.partition.split.shard_unit`) gives every card the largest shard, so
over a small and a large card it is the small card that decides. Here each card takes what it offers:
card ``r`` can hold at most ``m_r`` slices of a dimension (the most for which its shard still fits,
found by bisection: a shard's bytes never shrink as it takes more slices), and the slices are shared
out in proportion to those ``m_r``, every card at least one and none above its own ``m_r``. A whole
layer has two dimensions (query heads and MLP columns); its query heads are shared out first by a
small dynamic program over the cards in order (contiguous head ranges, each either whole KV groups
or part of one group, whose KV head the card then holds a copy of, as the even split does), keeping for every split point the most MLP columns the cards so far can take;
the columns are then shared out as above. Both steps are exact: a layout of slices that fits exists
if and only if :func:`apportion` finds one.

The caller hands in ``shard_bytes(counts)``, the bytes of the shard holding ``counts`` (the
compressed shard where the plan compresses), so the same search serves every technique set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from cachefit.partition.split import ShardParts, kv_heads_read, split_dimensions
from cachefit.units import Unit

ShardBytes = Callable[[ShardParts], int]
"""Bytes a card needs for the shard holding the given parts (only their counts matter)."""

MAX_HEADS_FOR_SEARCH = 512
"""Query heads beyond which the head ranges are not searched (the dynamic program is quadratic in
them; no published model has more than 128)."""


def _share(total: int, most: Sequence[int]) -> list[int] | None:
    """``total`` slices over cards taking at most ``most[r]`` each, at least one each, in proportion
    to what each takes at most (largest remainders first); None if they cannot take them all."""
    s = len(most)
    if total < s or any(m < 1 for m in most) or sum(most) < total:
        return None
    spare = total - s
    room = [m - 1 for m in most]
    whole = sum(room)
    got = [1 + (spare * r // whole if whole else 0) for r in room]
    left = total - sum(got)
    order = sorted(range(s), key=lambda r: (-((spare * room[r]) % whole if whole else 0), r))
    while left:
        for r in order:
            if left and got[r] < most[r]:
                got[r] += 1
                left -= 1
    return got


def _ranges(counts: Sequence[int]) -> list[tuple[int, int]]:
    out, start = [], 0
    for c in counts:
        out.append((start, start + c))
        start += c
    return out


class Apportioner:
    """Proportional splits of one unit, with the bytes of every shard it tried remembered (a unit's
    shards depend only on their counts, so identical layers can share one apportioner)."""

    def __init__(self, unit: Unit, shard_bytes: ShardBytes) -> None:
        self.unit = unit
        self.dims = split_dimensions(unit)
        self._bytes = shard_bytes
        self._seen: dict[tuple[int, int, int], int] = {}
        self._most: dict[tuple[int, int, int, str], int] = {}
        self._found: dict[tuple[int, ...], tuple[ShardParts, ...] | None] = {}

    def _parts(self, heads: int, kv: int, cols: int, rows: int) -> ShardParts:
        return ShardParts(heads=(0, heads) if heads else None, kv_heads=(0, kv) if kv else None,
                          mlp_columns=(0, cols) if cols else None, vocab=(0, rows) if rows else None)

    def _fits(self, capacity: int, heads: int, kv: int, other: int, dim: str) -> bool:
        key = (heads, kv, other) if dim == "mlp_columns" else (heads, kv, -other)
        if key not in self._seen:
            cols = other if dim == "mlp_columns" else 0
            rows = other if dim == "vocab" else 0
            self._seen[key] = self._bytes(self._parts(heads, kv, cols, rows))
        return self._seen[key] <= capacity

    def most(self, capacity: int, dim: str, heads: int = 0, kv: int = 0) -> int:
        """The most slices of ``dim`` (``mlp_columns`` or ``vocab``) a card of ``capacity`` bytes holds
        beside ``heads`` query and ``kv`` KV heads (0: not even one)."""
        key = (capacity, heads, kv, dim)
        if key not in self._most:
            size = self.dims[dim]
            if not self._fits(capacity, heads, kv, 1, dim):
                got = 0
            else:
                lo, hi = 1, size  # bisection: the bytes never shrink as the shard takes more
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    if self._fits(capacity, heads, kv, mid, dim):
                        lo = mid
                    else:
                        hi = mid - 1
                got = lo
            self._most[key] = got
        return self._most[key]

    def apportion(self, capacities: Sequence[int]) -> tuple[ShardParts, ...] | None:
        """Each card's parts (in card order) so that every shard fits its card, or None if no split
        of the unit over these cards (every card at least one slice of each dimension) fits."""
        key = tuple(capacities)
        if key not in self._found:
            self._found[key] = self._search(key)
        return self._found[key]

    def _search(self, caps: tuple[int, ...]) -> tuple[ShardParts, ...] | None:
        s = len(caps)
        dims = self.dims
        if not dims or s < 1 or any(size < s for size in dims.values()):
            return None
        if "heads" not in dims:
            (dim, size), = dims.items()
            got = _share(size, [self.most(c, dim) for c in caps])
            if got is None:
                return None
            return tuple(ShardParts(**{dim: r}) for r in _ranges(got))
        shape = self.unit.shape
        assert shape is not None
        a = dims["heads"]
        if a > MAX_HEADS_FOR_SEARCH:
            return None
        cols = dims.get("mlp_columns", 0)
        per = max(1, a // max(1, shape.num_kv_heads))
        heads = self._proportional_heads(shape, caps, per)
        if heads is not None:
            got = self._columns(shape, caps, heads, cols)
            if got is not None:
                return got
        # best[r][h]: the most MLP columns cards 0..r-1 take holding heads [0, h); -1: cannot
        best = [[-1] * (a + 1) for _ in range(s + 1)]
        back = [[0] * (a + 1) for _ in range(s + 1)]
        best[0][0] = 0
        for r in range(s):
            for h in range(a):
                if best[r][h] < 0:
                    continue
                for h2 in range(h + 1, a - (s - r - 1) + 1):
                    lo, hi = kv_heads_read(shape, (h, h2))
                    kv = hi - lo
                    if kv > 1 and (h % per or h2 % per):
                        continue  # query heads travel with their KV heads: whole groups, or within one
                    if cols:
                        m = self.most(caps[r], "mlp_columns", h2 - h, kv)
                    else:
                        m = 1 if self._fits(caps[r], h2 - h, kv, 0, "mlp_columns") else 0
                    if m < 1:
                        break  # more heads only make the shard larger
                    if best[r][h] + m > best[r + 1][h2]:
                        best[r + 1][h2] = best[r][h] + m
                        back[r + 1][h2] = h
        if best[s][a] < max(cols, 0):
            return None
        bounds = [a]
        for r in range(s, 0, -1):
            bounds.append(back[r][bounds[-1]])
        heads = list(zip(reversed(bounds[1:]), reversed(bounds[:-1])))
        got = self._columns(shape, caps, heads, cols)
        assert got is not None, "the head ranges were chosen so the cards take every column"
        return got

    def _proportional_heads(self, shape, caps: tuple[int, ...], per: int) -> list[tuple[int, int]] | None:
        """Query-head ranges in proportion to the cards' capacities (whole KV groups where there are
        at least as many groups as cards), or None where such ranges would cut a group unevenly."""
        s, a = len(caps), self.dims["heads"]
        groups = a // per
        step, total = (per, groups) if s <= groups else (1, a)
        counts = _share(total, [max(1, total * c // sum(caps)) + 1 for c in caps])
        if counts is None:
            return None
        ranges = [(lo * step, hi * step) for lo, hi in _ranges(counts)]
        for h in ranges:
            lo, hi = kv_heads_read(shape, h)
            if hi - lo > 1 and (h[0] % per or h[1] % per):
                return None
        return ranges

    def _columns(self, shape, caps: tuple[int, ...], heads: Sequence[tuple[int, int]],
                 cols: int) -> tuple[ShardParts, ...] | None:
        """With these head ranges, the MLP columns shared out (None: the cards cannot take them)."""
        kvs = [kv_heads_read(shape, h) for h in heads]
        if not cols:
            if all(self._fits(c, h[1] - h[0], kv[1] - kv[0], 0, "mlp_columns") for c, h, kv in zip(caps, heads, kvs)):
                return tuple(ShardParts(heads=h, kv_heads=kv) for h, kv in zip(heads, kvs))
            return None
        got = _share(cols, [self.most(c, "mlp_columns", h[1] - h[0], kv[1] - kv[0])
                            for c, h, kv in zip(caps, heads, kvs)])
        if got is None:
            return None
        return tuple(ShardParts(heads=h, kv_heads=kv, mlp_columns=c) for h, kv, c in zip(heads, kvs, _ranges(got)))


__all__ = ["MAX_HEADS_FOR_SEARCH", "Apportioner", "ShardBytes"]
