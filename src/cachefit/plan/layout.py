"""Layouts of the units over cards, with tensor-parallel splits, and the dynamic programs that choose them.

A layout is a sequence of pipeline stages, each a contiguous range of units on ``s`` cards (``s = 1``:
no split; ``s > 1``: every unit of the stage split over the ``s`` cards, Megatron-style, each card
holding the largest shard). Four questions, each answered exactly over that space of layouts for the
split degrees given:

* :func:`fewest_cards_layout`: the fewest cards on which every stage fits;
* :func:`exact_cards_layout`: exactly K cards, every stage fitting, the smallest largest stage;
* :func:`fastest_layout`: exactly K cards, every stage fitting, the smallest predicted bottleneck
  stage time (the cost model's, handed in), then the smallest largest stage;
* :func:`partial_layouts`: exactly K cards when no layout fits them: the fewest bytes moved off-chip
  per micro-batch (:mod:`cachefit.plan.offchip`, the rule the cost model prices), then the shortest
  pipeline; and variants trading a few more off-chip bytes for time, for the cost model to price.

All four rely on the stage cost being monotone in the stage (a stage's stacked bytes never shrink as
it grows, see :func:`cachefit.units.stack_footprints`), so a stage is extended until it no longer fits.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fnmatch import fnmatchcase

import numpy as np

from cachefit.compress.techniques import GPT2_CONV1D_PATTERNS, CompressionConfig, compress_unit
from cachefit.errors import ConfigError
from cachefit.families import transposed_weight_patterns
from cachefit.hardware.devices import Card
from cachefit.partition.apportion import Apportioner
from cachefit.partition.split import Shard, ShardParts, max_shards, shard_unit, shard_unit_parts
from cachefit.plan.offchip import (
    StageBytes,
    embedding_read_bytes,
    is_embedding,
    offchip_split,
)
from cachefit.units import Footprint, ModelProfile, Unit, Workload, stack_footprints

# Name patterns splitting or compressing a tensor reads (transposed weights, over all families)
_TRANSPOSED_PATTERNS = (*transposed_weight_patterns(), *GPT2_CONV1D_PATTERNS)

DEGREES: tuple[int, ...] = (*range(1, 17), 24, 32, 48, 64)
"""Split degrees the fewest-cards search tries (every degree up to 16, then the common larger ones)."""


@dataclass(frozen=True, slots=True)
class Group:
    """One pipeline stage: units [start, end) on ``shards`` cards (1: no split)."""

    start: int
    end: int
    shards: int
    units: tuple[Unit, ...]
    """The stage's units as one card holds them (the largest shard when split)."""
    collective_bytes_per_token: int = 0
    per_card: tuple[tuple[Unit, ...], ...] | None = None
    """A proportional split over cards of different sizes (:func:`mixed_layout`): what each card
    holds, in card order (``units`` is then the largest of them); None: every card holds ``units``."""
    parts: tuple[tuple[ShardParts, ...], ...] | None = None
    """With ``per_card``: each card's slices of each unit (heads, KV heads, MLP columns, vocabulary)."""


@dataclass(frozen=True, slots=True)
class Layout:
    """Stages in pipeline order; ``offchip_bytes`` is set by :func:`partial_layout` (per micro-batch,
    all cards)."""

    groups: tuple[Group, ...]
    stacking: str
    offchip_bytes: int = 0

    @property
    def cards(self) -> int:
        return sum(g.shards for g in self.groups)

    def stage_bytes(self, g: Group) -> int:
        return stack_footprints((u.footprint for u in g.units), reuse=self.stacking == "reuse").total_bytes

    @property
    def bottleneck(self) -> int:
        return max(self.stage_bytes(g) for g in self.groups)


def _alike_units(units: Sequence[Unit], config: CompressionConfig) -> list[int]:
    """For each unit, the first unit alike it: the same kind, shape, footprint and split dimensions,
    and tensors of the same shapes, roles and names but for the layer number (a dot-separated part
    equal to the unit's ``layer``), matching the same patterns of transposed weights. Splitting and
    compressing look at a tensor's name only for its role words, its suffix and those patterns, so
    units alike have shards and compressed shards of the same bytes."""
    patterns = (*_TRANSPOSED_PATTERNS, *config.transposed_tensors)
    first: dict[object, int] = {}
    out: list[int] = []
    for i, u in enumerate(units):
        if u.layer is None:
            out.append(i)
            continue
        number = str(u.layer)

        def canonical(name: str | None) -> str | None:
            return None if name is None else ".".join("#" if p == number else p for p in name.split("."))

        key = (u.kind, u.shape, u.footprint, u.params, u.flops_per_token, u.split_dims, u.compression,
               tuple((canonical(t.name), t.shape, t.role, t.block, canonical(t.tied_to),
                      tuple(fnmatchcase(t.name, p) for p in patterns)) for t in u.tensors))
        out.append(first.setdefault(key, i))
    return out


def divides_evenly(unit: Unit, shards: int) -> bool:
    """Every split dimension of ``unit`` divides evenly over ``shards`` cards (KV heads: or the reverse)."""
    shape = unit.shape
    if shape is None:
        return False
    if shape.part in ("layer", "attention"):
        kv = shape.num_kv_heads
        if shape.num_heads % shards or (kv % shards and shards % kv):
            return False
    if shape.part in ("layer", "mlp") and shape.intermediate_size % shards:
        return False
    if shape.part in ("embedding", "head") and shape.vocab_size and shape.vocab_size % shards:
        return False
    return True


class ShardTable:
    """Each unit's largest shard for every split degree, compressed with one technique set.

    ``raw`` marks units kept uncompressed (the revert pass flips them one at a time).
    """

    def __init__(self, profile: ModelProfile, combo: tuple[str, ...], config: CompressionConfig,
                 compressed: Sequence[Unit], shards: dict[tuple[int, int], Shard] | None = None) -> None:
        self.profile, self.combo, self.config = profile, combo, config
        self.shards = shards if shards is not None else {}  # uncompressed shards, shared across sets
        self.keep_whole: frozenset[int] = frozenset()
        self.even_splits = False
        self.forbid: Mapping[int, frozenset[str]] = {}
        self.raw: set[int] = set()
        self.apportioners: dict[object, Apportioner] = {}
        self.cache: dict[tuple[int, int, bool], tuple[Unit, int]] = {
            (i, 1, False): (u, 0) for i, u in enumerate(compressed)
        }
        for i, u in enumerate(profile.units):
            self.cache[(i, 1, True)] = (u, 0)
        self._alike: list[int] | None = None
        self._figures: dict[tuple[object, ...], tuple[Footprint, int] | None] = {}

    def figures(self, i: int, shards: int) -> tuple[Footprint, int] | None:
        """(the footprint of :meth:`get`'s shard, its collective bytes per token), or None where
        :meth:`get` gives None. The searches ask this of every unit for every degree: units alike
        (:func:`_alike_units`: the layers of a model, but for their number) share one computation."""
        if shards == 1:
            got = self.get(i, 1)
            return None if got is None else (got[0].footprint, got[1])
        if self._alike is None:
            self._alike = _alike_units(self.profile.units, self.config)
        raw = i in self.raw or not self.combo
        forbidden = self.forbid.get(i, frozenset())
        key = (self._alike[i], shards, raw, None if raw else forbidden & set(self.combo), i in self.keep_whole)
        if key not in self._figures:
            got = self.get(i, shards)
            self._figures[key] = None if got is None else (got[0].footprint, got[1])
        return self._figures[key]

    def get(self, i: int, shards: int) -> tuple[Unit, int] | None:
        """(unit ``i``'s largest shard over ``shards`` cards as a card holds it, collective bytes per
        token), or None when it cannot be split that way."""
        raw = i in self.raw or not self.combo
        key = (i, shards, raw)
        if key not in self.cache:
            unit = self.profile.units[i]
            if shards > max_shards(unit) or (shards > 1 and i in self.keep_whole):
                return None
            if shards > 1 and self.even_splits and not divides_evenly(unit, shards):
                return None
            shard = self.shards.get((i, shards))
            if shard is None:
                shard = self.shards[(i, shards)] = shard_unit(unit, shards, self.profile.workload)
            forbidden = self.forbid.get(i, frozenset())
            combo = tuple(t for t in self.combo if t not in forbidden)
            got = shard.unit if raw or not combo else compress_unit(shard.unit, combo, self.profile.workload,
                                                                    self.config)
            self.cache[key] = (got, shard.collective_bytes_per_token)
        return self.cache[key]

    def apportioner(self, i: int) -> Apportioner:
        """Proportional splits of unit ``i`` as this table compresses it (identical units share one)."""
        raw = i in self.raw or not self.combo
        unit = self.profile.units[i]
        forbidden = self.forbid.get(i, frozenset())
        combo = () if raw else tuple(t for t in self.combo if t not in forbidden)
        key = (unit.shape, unit.footprint, tuple((t.role, t.shape, t.tied_to is None) for t in unit.tensors), combo)
        got = self.apportioners.get(key)
        if got is None:
            got = self.apportioners[key] = Apportioner(unit, lambda parts: self._shard(unit, parts, 2, combo).total_bytes)
        return got

    def _shard(self, unit: Unit, parts: ShardParts, shards: int, combo: tuple[str, ...]) -> Unit:
        got = shard_unit_parts(unit, parts, shards, self.profile.workload).unit
        return compress_unit(got, combo, self.profile.workload, self.config) if combo else got

    def mixed_group(self, i: int, parts: Sequence[ShardParts]) -> Group:
        """Unit ``i`` split over ``len(parts)`` cards of different sizes, card r holding ``parts[r]``."""
        raw = i in self.raw or not self.combo
        forbidden = self.forbid.get(i, frozenset())
        combo = () if raw else tuple(t for t in self.combo if t not in forbidden)
        unit = self.profile.units[i]
        s = len(parts)
        held = tuple(self._shard(unit, p, s, combo) for p in parts)
        traffic = shard_unit_parts(unit, parts[0], s, self.profile.workload).collective_bytes_per_token
        largest = max(held, key=lambda u: u.total_bytes)
        return Group(i, i + 1, s, (largest,), traffic, per_card=tuple((u,) for u in held),
                     parts=tuple((p,) for p in parts))

    def group(self, start: int, end: int, shards: int) -> Group:
        members = tuple(self.get(k, shards)[0] for k in range(start, end))  # type: ignore[index]
        traffic = sum(self.get(k, shards)[1] for k in range(start, end))  # type: ignore[index]
        return Group(start, end, shards, members, traffic)


def degrees_for(units: Sequence[Unit], num_cards: int | None) -> tuple[int, ...]:
    """Split degrees worth trying: :data:`DEGREES`, and with ``num_cards`` K also ``floor(K / t)`` and
    ``ceil(K / t)`` for every stage count ``t`` up to the units, so that any K the units can be split
    over is reachable (t stages of those two sizes add up to K)."""
    limit = max((max_shards(u) for u in units), default=1)
    found = set(DEGREES)
    if num_cards is not None:
        for t in range(1, len(units) + 1):
            found.update((num_cards // t, -(-num_cards // t)))
        found = {d for d in found if d <= num_cards}
    return tuple(sorted(d for d in found if 1 <= d <= limit))


def fewest_cards_layout(table: ShardTable, capacity: int, stacking: str, degrees: Sequence[int]) -> Layout | None:
    """Fewest cards when stages may be split over several cards (tensor parallel), by dynamic programming.

    ``best[j]`` is the cheapest layout of units [0, j): (cards, largest stage utilization). A stage
    [i, j) split over s cards holds the largest shard of each of its units; extending it is monotone
    (``stack_footprints`` never shrinks), so the inner loop stops at the first unit that overflows.
    """
    n = len(table.profile.units)
    inf = (float("inf"), float("inf"))
    best: list[tuple[float, float]] = [inf] * (n + 1)
    back: list[tuple[int, int] | None] = [None] * (n + 1)
    best[0] = (0, 0.0)
    totals = _stage_totals(table, stacking, degrees, capacity)
    for i in range(n):
        if best[i] == inf:
            continue
        for s in degrees:
            for j, total in enumerate(totals.get((i, s), ()), start=i):
                cand = (best[i][0] + s, max(best[i][1], total / capacity))
                if cand < best[j + 1]:
                    best[j + 1], back[j + 1] = cand, (i, s)
    if best[n] == inf:
        return None
    groups: list[Group] = []
    j = n
    while j > 0:
        i, s = back[j]  # type: ignore[misc]
        groups.append(table.group(i, j, s))
        j = i
    return Layout(tuple(reversed(groups)), stacking)


def _stage_totals(table: ShardTable, stacking: str, degrees: Sequence[int],
                  limit: int | None) -> dict[tuple[int, int], list[int]]:
    """For every start ``i`` and degree ``s``: the stacked bytes of stages [i, i + 1), [i, i + 2), ...
    split ``s`` ways, as long as every unit can be split so (and, with ``limit``, the stage fits it)."""
    n = len(table.profile.units)
    reuse = stacking == "reuse"
    out: dict[tuple[int, int], list[int]] = {}
    for i in range(n):
        for s in degrees:
            totals: list[int] = []
            resident = peak = 0
            for j in range(i, n):
                got = table.figures(j, s)
                if got is None:
                    break
                fp = got[0]
                if reuse:
                    resident += fp.weight_bytes + fp.persistent_activation_bytes
                    peak = max(peak, fp.transient_activation_bytes + fp.buffer_bytes)
                else:
                    resident += fp.total_bytes
                if limit is not None and resident + peak > limit:
                    break
                totals.append(resident + peak)
            if totals:
                out[(i, s)] = totals
    return out


def exact_cards_layout(table: ShardTable, capacity: int, stacking: str, degrees: Sequence[int],
                       num_cards: int) -> Layout | None:
    """Exactly ``num_cards`` cards, every stage within ``capacity``, the smallest largest stage; None if
    no such layout exists.

    Feasibility under a bound is monotone in the bound, so the optimum is found by bisection over the
    distinct stage sizes; each check is a reachability sweep in which ``reach[j]`` is a bit set of the
    card counts that can hold units [0, j) (bit c: c cards), and a stage [i, j) on s cards shifts
    ``reach[i]`` left by s into ``reach[j]``.
    """
    n = len(table.profile.units)
    totals = _stage_totals(table, stacking, degrees, capacity)
    mask = (1 << (num_cards + 1)) - 1

    def reach_under(bound: int) -> list[int]:
        reach = [0] * (n + 1)
        reach[0] = 1
        for i in range(n):
            if not reach[i]:
                continue
            for s in degrees:
                sizes = totals.get((i, s))
                if not sizes:
                    continue
                shifted = (reach[i] << s) & mask
                if not shifted:
                    continue
                for k, size in enumerate(sizes):
                    if size > bound:
                        break
                    reach[i + k + 1] |= shifted
        return reach

    if not reach_under(capacity)[n] >> num_cards & 1:
        return None
    values = sorted({v for sizes in totals.values() for v in sizes})
    lo, hi = 0, len(values) - 1  # the optimum is one of the stage sizes
    while lo < hi:
        mid = (lo + hi) // 2
        if reach_under(values[mid])[n] >> num_cards & 1:
            hi = mid
        else:
            lo = mid + 1
    bound = values[lo]
    reach = reach_under(bound)
    groups: list[Group] = []
    j, left = n, num_cards
    while j > 0:  # walk back: the longest stage on the fewest cards that leaves a reachable rest
        chosen = None
        for s in degrees:
            if s > left:
                break
            for i in range(j):
                sizes = totals.get((i, s))
                if sizes and len(sizes) >= j - i and sizes[j - i - 1] <= bound and reach[i] >> (left - s) & 1:
                    chosen = (i, s)
                    break
            if chosen:
                break
        assert chosen is not None, "a reachable layout has a last stage"
        i, s = chosen
        groups.append(table.group(i, j, s))
        j, left = i, left - s
    return Layout(tuple(reversed(groups)), stacking)


MIXED_MAX_SHARDS = 8
"""Most consecutive cards of different sizes one unit is split over proportionally (bounds the
search: a unit that needs more is split evenly over identical cards, or compressed)."""


@dataclass(frozen=True, slots=True)
class MixedSearch:
    """What :func:`mixed_layout` found: the layout (None: none fits) and, for the error message, the
    most leading units any layout of the cards' prefixes holds."""

    layout: Layout | None
    units_placed: int
    cards: int | None = None
    """The cards the layout found uses (None: none fits); with ``count_only``, the layout itself is
    not built and only this is set."""


def stage_ends(costs: Sequence[tuple[int, int] | None], a: int, n: int, capacity: int) -> list[int]:
    """For each start i in [a, n): the end of the longest stage [i, end) within ``capacity``, where
    ``costs[j]`` is unit j's (resident, transient) bytes (a stage holds the sum of the resident and
    the largest transient) or None for a unit no stage may hold.

    A stage's bytes never shrink as it grows at either end, so the ends never move back as the start
    moves on: one pass with two pointers and a running maximum (a deque of the transients that can
    still be the largest), instead of growing every stage from its start.
    """
    out: list[int] = []
    end = a
    resident = 0
    window: deque[int] = deque()  # indices in [i, end) with decreasing transients: the front is the largest
    for i in range(a, n):
        if end < i:
            end, resident = i, 0
            window.clear()
        while window and window[0] < i:
            window.popleft()
        while end < n and costs[end] is not None:
            res, trans = costs[end]  # type: ignore[misc]
            peak = max(trans, costs[window[0]][1]) if window else trans  # type: ignore[index]
            if resident + res + peak > capacity:
                break
            resident += res
            while window and costs[window[-1]][1] <= trans:  # type: ignore[index]
                window.pop()
            window.append(end)
            end += 1
        out.append(end)
        if end > i:
            resident -= costs[i][0]  # type: ignore[index]
    return out


def card_kinds(cards: Sequence[Card]) -> tuple[list[Card], list[int]]:
    """The distinct cards in order of first appearance, and each card's index among them (equal cards
    are one kind; a cluster repeats the same card object, so identity settles most cards at once)."""
    kinds: list[Card] = []
    kind_of: list[int] = []
    by_id: dict[int, int] = {}
    for card in cards:
        kind = by_id.get(id(card))
        if kind is None:
            kind = next((t for t, known in enumerate(kinds) if known == card), None)
            if kind is None:
                kinds.append(card)
                kind = len(kinds) - 1
            by_id[id(card)] = kind
        kind_of.append(kind)
    return kinds, kind_of


class _OrWindow:
    """The OR of the values pushed with an end >= j, for j that never decreases, where the ends of
    the pushed values never decrease either (a sliding window: two stacks, each value ORed about twice)."""

    __slots__ = ("back", "back_or", "front")

    def __init__(self) -> None:
        self.back: list[tuple[int, int]] = []  # (end, value), oldest first
        self.back_or = 0
        self.front: list[tuple[int, int]] = []  # (end, OR of it and every newer one in front), oldest last

    def push(self, end: int, value: int) -> None:
        self.back.append((end, value))
        self.back_or |= value

    def reaching(self, j: int) -> int:
        """Drop the values whose end is before ``j``; the OR of the rest."""
        while True:
            if not self.front:
                if not self.back:
                    return 0
                acc = 0
                for end, value in reversed(self.back):
                    acc |= value
                    self.front.append((end, acc))
                self.back, self.back_or = [], 0
            if self.front[-1][0] >= j:
                return self.front[-1][1] | self.back_or
            self.front.pop()


def mixed_layout(table: ShardTable, cards: Sequence[Card], stacking: str, degrees: Sequence[int],
                 num_cards: int | None, *, max_mixed: int = MIXED_MAX_SHARDS,
                 proportional: bool = True, unit_range: tuple[int, int] | None = None,
                 count_only: bool = False) -> MixedSearch:
    """Units over the cards of a mixed cluster in the given order: the fewest cards (a prefix of
    ``cards``), or with ``num_cards`` exactly that many, every stage fitting its card(s).

    A stage is (a) a contiguous range of whole units on one card, (b) a range of units split evenly
    over a run of identical cards (``degrees``, the even path's largest shards), or (c) one unit split
    proportionally over a run of 2 .. ``max_mixed`` consecutive cards not all alike
    (:class:`cachefit.partition.apportion.Apportioner`: each card takes heads / columns / rows in
    proportion to what it holds). Exact over that space: ``reach[j]`` is a bit set of the card counts
    c such that units [0, j) fill cards [0, c) exactly; each kind of stage shifts the bits of the
    cards it may start on (a mask per kind of card, run or window of capacities) by its card count.
    ``proportional=False`` leaves (c) out (even splits only, as ``cachefit run`` deploys);
    ``unit_range`` places only units [a, b) (the layout's groups then cover just those).
    ``count_only``: how many cards the layout takes, without building it (the walk back through the
    reachable sets, most of the time on thousands of cards).
    """
    a, n = unit_range if unit_range is not None else (0, len(table.profile.units))
    k_all = len(cards)
    limit = k_all if num_cards is None else min(num_cards, k_all)
    cards = list(cards[:limit])
    reuse = stacking == "reuse"
    kinds, kind_of = card_kinds(cards)
    kind_caps = [card.capacity_bytes for card in kinds]

    def stage_costs(shards: int) -> list[tuple[int, int] | None]:
        """Per unit split ``shards`` ways (1: whole): (resident, transient) bytes as a stage stacks
        them; None where the unit cannot be split so."""
        out: list[tuple[int, int] | None] = [None] * n
        for j in range(a, n):
            got = table.figures(j, shards)
            if got is not None:
                fp = got[0]
                out[j] = ((fp.weight_bytes + fp.persistent_activation_bytes,
                           fp.transient_activation_bytes + fp.buffer_bytes) if reuse else (fp.total_bytes, 0))
        return out

    # masks of the cards a stage may start on: (shards, kind) for whole units and even splits over a
    # run of identical cards; (window of capacities) for proportional splits over mixed runs
    # blocks: maximal runs of identical cards, (first card, end, kind); a run of s identical cards
    # starts at c exactly where c's block has at least s cards from c on
    blocks: list[tuple[int, int, int]] = []
    for c in range(limit):
        if blocks and kind_of[c] == blocks[-1][2]:
            blocks[-1] = (blocks[-1][0], c + 1, kind_of[c])
        else:
            blocks.append((c, c + 1, kind_of[c]))
    runs: dict[tuple[int, int], int] = {}
    for s in sorted({1, *(d for d in degrees if 1 < d <= limit)}):
        for first, end, kind in blocks:
            if end - first >= s:  # starts first .. end - s
                runs[(s, kind)] = runs.get((s, kind), 0) | (((1 << (end - s - first + 1)) - 1) << first)
    windows: dict[tuple[int, ...], int] = {}
    if proportional:
        caps_of = [kind_caps[kind] for kind in kind_of]
        changes = [first for first, _, _ in blocks[1:]]  # a window is mixed iff it spans a block's start
        for s in range(2, min(max_mixed, limit) + 1):
            starts = sorted({c for b in changes for c in range(max(0, b - s + 1), min(b, limit - s + 1))})
            for c in starts:
                caps = tuple(caps_of[c:c + s])
                windows[caps] = windows.get(caps, 0) | (1 << c)
    ends: dict[tuple[int, int, int], int] = {}
    for s in sorted({s for s, _ in runs}):
        costs = stage_costs(s)
        for kind in sorted({kind for s_, kind in runs if s_ == s}):
            for i, end in enumerate(stage_ends(costs, a, n, kind_caps[kind]), start=a):
                ends[(i, s, kind)] = end
    splittable = [i >= a and bool(table.apportioner(i).dims) and (i not in table.keep_whole)
                  for i in range(n)] if windows else [False] * n
    mask_all = (1 << (limit + 1)) - 1
    reach = [0] * (n + 1)
    reach[a] = 1
    # a stage of kind (s, kind) from unit i reaches every end in (i, ends[i]]; the ends never move back
    # as i moves on, so the starts whose stages reach end j form a window [lo_j, j) sliding forward:
    # its OR is kept in a queue (_OrWindow), two ORs per start instead of one per start and end
    pending = {key: _OrWindow() for key in runs}
    for i in range(a, n):
        here = reach[i]
        got = 0
        for (s, kind), starts in runs.items():
            queue = pending[(s, kind)]
            if here:
                end = ends[(i, s, kind)]
                shifted = ((here & starts) << s) & mask_all
                if shifted and end > i:
                    queue.push(end, shifted)
            got |= queue.reaching(i + 1)
        reach[i + 1] = got
        if here and splittable[i]:
            apportioner = table.apportioner(i)
            for caps, starts in windows.items():
                shifted = ((here & starts) << len(caps)) & mask_all
                if shifted & ~reach[i + 1] and apportioner.apportion(caps) is not None:
                    reach[i + 1] |= shifted
    placed = max(j for j in range(a, n + 1) if reach[j])
    if num_cards is None:
        if not reach[n]:
            return MixedSearch(None, placed)
        used = (reach[n] & -reach[n]).bit_length() - 1  # the fewest cards
    else:
        if num_cards > k_all or not reach[n] >> num_cards & 1:
            return MixedSearch(None, placed)
        used = num_cards
    if count_only:
        return MixedSearch(None, placed, used)
    groups: list[Group] = []
    j, c = n, used
    while j > a:  # walk back: a stage ending at (j, c) whose start is reachable
        chosen: Group | None = None
        for (s, kind), starts in sorted(runs.items()):
            first = c - s
            if first < 0 or not starts >> first & 1:
                continue
            for i in range(a, j):
                if reach[i] >> first & 1 and ends[(i, s, kind)] >= j:
                    chosen = table.group(i, j, s)
                    break
            if chosen is not None:
                break
        if chosen is None and splittable[j - 1]:
            for caps, starts in windows.items():
                first = c - len(caps)
                if first >= 0 and starts >> first & 1 and reach[j - 1] >> first & 1:
                    parts = table.apportioner(j - 1).apportion(caps)
                    if parts is not None:
                        chosen = table.mixed_group(j - 1, parts)
                        break
        assert chosen is not None, "a reachable layout has a last stage"
        groups.append(chosen)
        j, c = chosen.start, c - chosen.shards
    return MixedSearch(Layout(tuple(reversed(groups)), stacking), placed, used)


StageTime = Callable[[int, Sequence[Unit], Footprint, int, int, Card], "float | None"]
"""Predicted time of one stage, in seconds: ``(start, units as a card runs them, their stacked
footprint, shards, collective bytes per token, the stage's first card)``; None if unknown. The cost
model provides it (:class:`cachefit.cost.LayoutPricing`); the planner only adds it up."""


# Stage evaluations (start, degree, end) one partial-fit search may price before it narrows its space:
# each costs the off-chip rule and, with a pricing, the cost model's stage time (tens of microseconds),
# and the search runs once per technique set and once per unit the revert pass tries.
PARTIAL_SEARCH_BUDGET = 100_000


def narrow_partial_search(num_units: int, num_cards: int, degrees: Sequence[int]
                          ) -> tuple[tuple[int, ...], int | None]:
    """The degrees and the longest stage (in units; None: any) a partial-fit search over ``num_units``
    units on ``num_cards`` cards tries, within :data:`PARTIAL_SEARCH_BUDGET` stage evaluations.

    Within the budget: every degree, any length (the exact search). Beyond it (Llama-3.1-405B's 254
    block units on 4,096 cards would need tens of millions): the eight degrees nearest the cards per
    unit ``K / n`` (by ratio) and 1, and stages of at most four times the units per card ``n / K``
    (at least 2): where a layout spreads n units over K cards evenly, the best ones stay near that.
    """
    full = num_units * (num_units + 1) // 2 * max(1, len(degrees))
    if full <= PARTIAL_SEARCH_BUDGET:
        return tuple(degrees), None
    target = num_cards / max(1, num_units)
    near = sorted(degrees, key=lambda d: abs(math.log(d / target)) if target > 0 else d)[:8]
    kept = tuple(sorted(set(near) | ({1} & set(degrees))))
    return kept, max(2, math.ceil(4 * num_units / max(1, num_cards)))


@dataclass(slots=True)
class _Growing:
    """A stage from unit ``start`` to unit ``end`` (inclusive) over ``degree`` cards, as it grows."""
    end: int
    unit: Unit
    """Its last unit (the shard a card holds)."""
    members: tuple[Unit, ...]
    traffic: int
    """Collective bytes per token of its shards."""
    weight_bytes: int
    persistent_bytes: int
    scratch: tuple[int, int]
    """(transient activations, buffers) as the stage stacks them: the largest unit's, or all summed."""

    @property
    def footprint(self) -> Footprint:
        return Footprint(weight_bytes=self.weight_bytes, activation_bytes=self.persistent_bytes + self.scratch[0],
                         buffer_bytes=self.scratch[1], persistent_activation_bytes=self.persistent_bytes)


def _growing_stages(table: ShardTable, start: int, degree: int, n: int, max_stage_units: int | None,
                    reuse: bool) -> Iterator[_Growing]:
    """The stages from unit ``start`` over ``degree`` cards, one unit longer each (as
    :func:`~cachefit.units.stack_footprints` stacks them), until a unit cannot be split so or the
    stage reaches ``max_stage_units``."""
    wb = p = traffic = 0
    peak: tuple[int, int] = (0, 0)  # (transient, buffers) of the unit with the largest sum
    summed = (0, 0)
    members: list[Unit] = []
    for j in range(start, n):
        if max_stage_units is not None and j - start >= max_stage_units:
            return
        got = table.get(j, degree)
        if got is None:
            return
        unit = got[0]
        traffic += got[1]
        members.append(unit)
        fp = unit.footprint
        wb += fp.weight_bytes
        p += fp.persistent_activation_bytes
        t, b = fp.transient_activation_bytes, fp.buffer_bytes
        if t + b > sum(peak):
            peak = (t, b)
        summed = (summed[0] + t, summed[1] + b)
        yield _Growing(end=j, unit=unit, members=tuple(members), traffic=traffic, weight_bytes=wb, persistent_bytes=p,
                       scratch=peak if reuse else summed)


def partial_layouts(table: ShardTable, cards: Sequence[Card], stacking: str, degrees: Sequence[int],
                    num_cards: int, workload: Workload, *, stage_time: StageTime | None = None,
                    weights: Sequence[float] = (0.0,), max_stage_units: int | None = None) -> list[Layout]:
    """Layouts on exactly ``num_cards`` cards when none fits them, one per weight in ``weights``
    (duplicates dropped); empty if the units cannot be spread over that many cards.

    Weight 0 gives the fewest bytes off-chip per micro-batch (all cards,
    :func:`cachefit.plan.offchip.offchip_split`), then the shortest pipeline (the summed stage times,
    what one token waits for in decode). A weight w > 0 minimizes ``off-chip bytes + w x time x the
    card's off-chip bandwidth`` (the bytes it could have streamed meanwhile): layouts that stream a
    little more but run faster, for the caller to price. Without ``stage_time`` a stage's time is its
    largest shard's off-chip bytes over the off-chip bandwidth.

    ``cards[c]`` is card c (one card: every card alike; a split stage is priced on its first card, so
    split only over equal cards). Dynamic programming over (units placed, cards used), vectorized over
    the cards: a stage [i, j) on s cards moves ``s`` times its largest shard's off-chip bytes.
    ``max_stage_units`` bounds a stage's length (see :func:`narrow_partial_search`).
    """
    n = len(table.profile.units)
    k = num_cards
    kinds, kind_list = card_kinds(cards[:k])  # distinct cards, in order
    kind_of = np.asarray(kind_list if len(cards) > 1 else [0] * k, dtype=np.int64)
    kind_caps = [card.capacity_bytes for card in kinds]
    tokens = workload.tokens
    reuse = stacking == "reuse"

    def bandwidth(card: Card) -> float:
        return card.device.offchip_bandwidth_bytes_per_s or 1e12  # unknown: any constant ranks alike

    # every stage once: (start, degree) -> per end: (off-chip bytes per card, time) for each kind of card
    stages: dict[tuple[int, int], list[tuple[np.ndarray, np.ndarray]]] = {}
    for i in range(n):
        for s in degrees:
            if s > k:
                break
            rows: list[tuple[np.ndarray, np.ndarray]] = []
            tables = read = transient = 0
            for grown in _growing_stages(table, i, s, n, max_stage_units, reuse):
                unit, members, traffic, footprint = grown.unit, grown.members, grown.traffic, grown.footprint
                wb, p, scratch = grown.weight_bytes, grown.persistent_bytes, grown.scratch
                fp = unit.footprint
                transient += fp.transient_activation_bytes
                if is_embedding(unit):
                    tables += fp.weight_bytes
                    read += embedding_read_bytes(unit, tokens)
                stats = StageBytes(weight_bytes=wb, persistent_activation_bytes=p, other_bytes=sum(scratch),
                                   table_bytes=min(wb, tables), table_read_bytes=min(wb, tables, read),
                                   transient_traffic_bytes=transient)
                offs, times = [], []
                for kind, card in enumerate(kinds):
                    off = offchip_split(stats, kind_caps[kind], workload).offchip_bytes_per_micro_batch
                    took = None if stage_time is None else stage_time(i, tuple(members), footprint, s, traffic, card)
                    offs.append(off)
                    times.append(off / bandwidth(card) if took is None else took)
                rows.append((np.asarray(offs, dtype=np.float64), np.asarray(times, dtype=np.float64)))
            if rows:
                stages[(i, s)] = rows

    found: list[Layout] = []
    for weight in weights:
        layout = _partial_dp(n, k, degrees, stages, kind_of, [bandwidth(c) for c in kinds], weight, table, stacking)
        if layout is not None and all(layout.groups != f.groups for f in found):
            found.append(layout)
    return found


def _dp_starts(value: np.ndarray, stages: Mapping[tuple[int, int], Sequence[Any]], degrees: Sequence[int],
               kind_of: np.ndarray) -> Iterator[tuple[int, int, Sequence[Any], int, np.ndarray, np.ndarray]]:
    """The stages a dynamic program over (units placed, cards used) extends from, in order:
    ``(start i, degree s, its stages' rows, width, live, kinds)`` for every start reached
    (``value[i]`` finite somewhere) and degree with stages, ``live`` the card counts ``c < width``
    (``width = k + 1 - s``) that reach it and ``kinds`` their cards' kinds. Lazy: the caller's
    updates of later rows are seen when their start comes."""
    n, k = value.shape[0] - 1, value.shape[1] - 1
    for i in range(n):
        if not np.isfinite(value[i]).any():
            continue
        for s in degrees:
            if s > k:
                break
            rows = stages.get((i, s))
            if not rows:
                continue
            width = k + 1 - s
            live = np.isfinite(value[i, :width])
            if live.any():
                yield i, s, rows, width, live, kind_of[:width]


def _walk_back(table: ShardTable, back_i: np.ndarray, back_s: np.ndarray, n: int, k: int) -> tuple[Group, ...]:
    """The groups of a dynamic program's layout of ``n`` units on ``k`` cards, from its back pointers
    (``back_i[j, c]``, ``back_s[j, c]``: the start and cards of the last stage placing units [0, j) on c)."""
    groups: list[Group] = []
    j, left = n, k
    while j > 0:
        i, s = int(back_i[j, left]), int(back_s[j, left])
        groups.append(table.group(i, j, s))
        j, left = i, left - s
    return tuple(reversed(groups))


def _partial_dp(n: int, k: int, degrees: Sequence[int], stages: Mapping[tuple[int, int], list[tuple[np.ndarray,
                np.ndarray]]], kind_of: np.ndarray, bandwidths: Sequence[float], weight: float, table: ShardTable,
                stacking: str) -> Layout | None:
    """One dynamic program of :func:`partial_layouts`: objective ``off + weight x time x bandwidth``, then
    time; state (units placed, cards used), vectorized over the cards used."""
    inf = float("inf")
    obj = np.full((n + 1, k + 1), inf)
    tie = np.full((n + 1, k + 1), inf)
    total = np.full((n + 1, k + 1), inf)
    back_i = np.full((n + 1, k + 1), -1, dtype=np.int64)
    back_s = np.zeros((n + 1, k + 1), dtype=np.int64)
    obj[0, 0] = tie[0, 0] = total[0, 0] = 0.0
    bw = np.asarray(bandwidths, dtype=np.float64)
    for i, s, rows, width, live, kinds in _dp_starts(obj, stages, degrees, kind_of):
        for offset, (offs, times) in enumerate(rows):
            j = i + offset + 1
            stage_off = s * offs[kinds]  # every shard moves what the largest one does
            stage_time = times[kinds]
            cand_obj = obj[i, :width] + stage_off + weight * stage_time * bw[kinds]
            cand_tie = tie[i, :width] + stage_time
            tgt_obj, tgt_tie = obj[j, s:], tie[j, s:]
            better = live & ((cand_obj < tgt_obj) | ((cand_obj == tgt_obj) & (cand_tie < tgt_tie)))
            if better.any():
                tgt_obj[better] = cand_obj[better]
                tgt_tie[better] = cand_tie[better]
                total[j, s:][better] = (total[i, :width] + stage_off)[better]
                back_i[j, s:][better] = i
                back_s[j, s:][better] = s
    if not np.isfinite(obj[n, k]):
        return None
    return Layout(_walk_back(table, back_i, back_s, n, k), stacking, offchip_bytes=int(round(total[n, k])))


def fastest_layout(table: ShardTable, cards: Sequence[Card], stacking: str, degrees: Sequence[int], num_cards: int,
                   stage_time: StageTime, *, max_stage_units: int | None = None) -> Layout | None:
    """Exactly ``num_cards`` cards, every stage fitting its card, the smallest predicted bottleneck
    stage time, then the smallest largest stage in bytes; None if no such layout exists.

    ``cards[c]`` is card c (one card: every card alike); a stage split over ``s`` cards is timed and
    sized on its first card, so split only over equal cards. ``stage_time`` is the cost model's time
    of one stage (:class:`cachefit.cost.LayoutPricing`); it is asked once per stage and kind of card,
    and the stage's bytes stop it from growing once they exceed every card (bytes never shrink as a
    stage grows). Two min-max dynamic programs over (units placed, cards used), vectorized over the
    cards used: the first finds the least bottleneck time ``T``; the second, allowing only stages of
    at most ``T``, the least largest stage in bytes, and gives the layout. A min-max objective splits
    into its stages exactly (the max over a prefix and one more stage), so both are exact; the
    lexicographic pair does not (a prefix with a larger time may allow fewer bytes), hence two passes.

    Raises:
        ConfigError: ``stage_time`` cannot time a stage that fits (a figure the cost model needs is
            missing from the device description).
    """
    n = len(table.profile.units)
    k = num_cards
    kinds, kind_list = card_kinds([cards[c] if len(cards) > 1 else cards[0] for c in range(k)])
    kind_of = np.asarray(kind_list, dtype=np.int64)
    kind_caps = [card.capacity_bytes for card in kinds]
    largest = max(kind_caps)
    reuse = stacking == "reuse"
    inf = float("inf")
    # (start, degree) -> per end: (stacked bytes, time on each kind of card; inf where it does not fit)
    stages: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}
    for i in range(n):
        for s in degrees:
            if s > k:
                break
            rows: list[tuple[int, np.ndarray]] = []
            for grown in _growing_stages(table, i, s, n, max_stage_units, reuse):
                j, members, traffic, footprint = grown.end, grown.members, grown.traffic, grown.footprint
                total = footprint.total_bytes
                if total > largest:
                    break
                times = np.full(len(kinds), inf)
                for kind, card in enumerate(kinds):
                    if total > kind_caps[kind]:
                        continue
                    took = stage_time(i, tuple(members), footprint, s, traffic, card)
                    if took is None:
                        names = table.profile.units
                        what = names[i].name if i == j else f"{names[i].name}..{names[j].name}"
                        raise ConfigError(
                            f"--objective time: the cost model cannot time {what} on device {card.device.name}: a "
                            "figure it needs (peak FLOP/s, a bandwidth) is missing from the device description; add "
                            "it with a device file (cachefit probe --out, or --device FILE), or use --objective cards"
                        )
                    times[kind] = took
                rows.append((total, times))
            if rows:
                stages[(i, s)] = rows

    def sweep(bound_s: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        # value[j, c]: the least (max time | max bytes) placing units [0, j) on exactly c cards
        value = np.full((n + 1, k + 1), inf)
        back_i = np.full((n + 1, k + 1), -1, dtype=np.int64)
        back_s = np.zeros((n + 1, k + 1), dtype=np.int64)
        value[0, 0] = 0.0
        for i, s, rows, width, live, kinds_here in _dp_starts(value, stages, degrees, kind_of):
            here = value[i, :width]
            for offset, (total, times) in enumerate(rows):
                j = i + offset + 1
                took = times[kinds_here]
                ok = live & np.isfinite(took)
                if bound_s is None:
                    cand = np.maximum(here, took)
                else:
                    ok &= took <= bound_s
                    cand = np.maximum(here, float(total))
                target = value[j, s:]
                better = ok & (cand < target)
                if better.any():
                    target[better] = cand[better]
                    back_i[j, s:][better] = i
                    back_s[j, s:][better] = s
        if not np.isfinite(value[n, k]):
            return None
        return value, back_i, back_s

    first = sweep(None)
    if first is None:
        return None
    bottleneck_s = float(first[0][n, k])
    second = sweep(bottleneck_s)
    assert second is not None, "the time-optimal layout itself passes its own bound"
    _, back_i, back_s = second
    return Layout(_walk_back(table, back_i, back_s, n, k), stacking)


__all__ = [
    "DEGREES",
    "PARTIAL_SEARCH_BUDGET",
    "Group",
    "Layout",
    "MIXED_MAX_SHARDS",
    "MixedSearch",
    "ShardTable",
    "StageTime",
    "degrees_for",
    "divides_evenly",
    "exact_cards_layout",
    "fastest_layout",
    "fewest_cards_layout",
    "mixed_layout",
    "narrow_partial_search",
    "partial_layouts",
]
