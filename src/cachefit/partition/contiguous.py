"""Contiguous partitioning: the fewest cards, and the optimal min-max split over K cards.

n units in execution order are cut into contiguous, order-preserving, non-empty parts; part ``t``
runs on card ``t`` and must fit that card's capacity. Two questions:

* :func:`fewest_cards`: the fewest parts that fit (ties broken by the smallest largest part);
* :func:`balanced`: at most (or, with ``exact``, exactly) K parts minimizing the largest part,
  the largest utilization ``part / capacity``, or the largest stage time.

**Interval cost.** Two cost models, both given as arrays:

* additive: ``cost[i, j) = sum(sizes[i:j])``, the seed paper's plain sum of ``size(l_j)``;
* resident + transient: ``cost[i, j) = sum(resident[i:j]) + sum_r max(transient[r, i:j])``. With
  one row ``transient = transient activations + buffers`` this is
  :func:`cachefit.units.stack_footprints` (weights and persistent activations add up; a unit's
  scratch and workspace live only while it runs, so a card needs only the largest). Use
  :func:`footprint_cost_arrays` to get the arrays from footprints; several rows model resources
  reused separately.

Both are *monotone under inclusion*: if ``[i, j)`` is inside ``[i', j')`` its cost is no larger
(sums of non-negative numbers grow, maxima do not shrink). That is the only property the algorithms
below rely on:

* **Greedy is optimal for the count** (cards in a fixed order, every unit fitting every card):
  let ``g_t`` be the position greedy reaches after ``t`` cards (each card filled as far as it goes)
  and ``o_t`` that of any other partition. If ``g_t >= o_t`` then ``[g_t, o_{t+1})`` lies inside
  ``[o_t, o_{t+1})``, so it fits card ``t + 1`` and greedy reaches ``g_{t+1} >= o_{t+1}``; by
  induction greedy ends first. When some unit does not fit some card alone (heterogeneous cards),
  greedy can stall on that card while a partition that stopped earlier goes on; then the exact
  reachable-set sweep (:func:`_sweep`) decides, still by the same monotonicity: a position ``q`` is
  reachable with ``t + 1`` parts iff the *largest* position ``p < q`` reachable with ``t`` parts
  has ``cost[p, q)`` within card ``t``.
* **Binary search over the answer is exact**: feasibility under a bound is monotone in the bound,
  and every optimum is an interval cost (or cost / capacity, or interval time). The search keeps
  ``lo <= optimum <= hi`` where ``hi`` is always an *achieved* value, and when greedy fails under a
  bound ``B`` it jumps ``lo`` to the smallest cost of a greedy part extended by one unit: below
  that, greedy makes exactly the same parts and fails again (the probe idea of Han, Narahari and
  Choi, "Efficient algorithms for the 1D partitioning problem", 1992; Pinar and Aykanat,
  "Fast optimal load balancing algorithms for 1D partitioning", JPDC 2004).
* **Exactly K parts cost nothing extra** when every unit fits every card under the bound: cutting
  a part in two gives two parts no larger than it (monotonicity), so a K' < K part optimum splits
  into exactly K parts with the same largest part when n >= K. With units that fit only some
  cards the exact-K answer can be larger; it is then searched separately with the sweep.

Complexity, additive model: each feasibility check is ``O(K log n)`` (one ``bisect`` over the
prefix sums per card) and the search needs at most ``log2`` of the answer's range checks, usually
far fewer thanks to the jumps: n = 1,000,000 units and K = 4,096 cards take a fraction of a second.
The resident + transient model finds each part's end with a galloping search over
``numpy.maximum.accumulate`` windows, ``O(part length)`` numpy work per part, so ``O(n)`` per
check: a few times slower, same answers. Heterogeneous cards on which some unit cannot fit alone
fall back to the sweep, ``O(K x (intervals + misfit units))`` per check.
"""

from __future__ import annotations

import logging
import math
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import numpy as np

from cachefit.errors import ConfigError, InfeasiblePlanError
from cachefit.sizes import format_bytes

if TYPE_CHECKING:  # annotations only: `cachefit partition` need not import the unit types
    from cachefit.units import Footprint

logger = logging.getLogger(__name__)

OBJECTIVES: tuple[str, ...] = ("max_part", "max_utilization", "max_time")
"""What :func:`balanced` minimizes: the largest part in bytes, the largest ``part / capacity``, or
the largest stage time (sum of ``weights_time`` over the part)."""

# Bytes are int64 inside; refuse totals that could overflow it (2^62 B is 4.6 EB).
_MAX_TOTAL_BYTES = 2**62
# Bisection steps before giving up on an exact optimum (int and Fraction bounds need < 200; float
# times need at most ~1,100 halvings to run through every float exponent).
_MAX_SEARCH_STEPS = 4000


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Partition:
    """Contiguous parts of the units, part ``t`` on card ``t``."""

    parts: tuple[tuple[int, int], ...]
    """``(start, end_exclusive)`` unit indices of each part, in card order, covering every unit."""
    part_sizes: tuple[int, ...]
    """Bytes each part needs on its card (the interval cost, see the module docstring)."""
    capacities: tuple[int, ...] | None = None
    """Capacity in bytes of the card each part is on; None when no capacity was given."""
    objective: str = "max_part"
    """What the partition was optimized for (one of :data:`OBJECTIVES`, or ``fewest_cards``)."""
    part_times: tuple[float, ...] | None = None
    """Sum of the per-unit time estimates of each part, in seconds, when times were given."""

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "parts", tuple((int(a), int(b)) for a, b in self.parts))
            object.__setattr__(self, "part_sizes", tuple(int(s) for s in self.part_sizes))
        except (TypeError, ValueError):
            raise ConfigError(
                "partition: parts must be (start, end_exclusive) pairs of ints and part_sizes ints, "
                f"got parts={self.parts!r}, part_sizes={self.part_sizes!r}"
            ) from None
        if not self.parts:
            raise ConfigError("partition: no parts")
        if len(self.part_sizes) != len(self.parts):
            raise ConfigError(
                f"partition: {len(self.parts)} parts but {len(self.part_sizes)} part_sizes"
            )
        expected_start = 0
        for idx, (start, end) in enumerate(self.parts):
            if start != expected_start or end <= start:
                raise ConfigError(
                    f"partition: part {idx} is [{start}, {end}); parts must be non-empty and "
                    f"contiguous from unit 0 (expected a part starting at {expected_start})"
                )
            expected_start = end
        if any(s < 0 for s in self.part_sizes):
            raise ConfigError(f"partition: negative part size in {self.part_sizes}")
        if self.capacities is not None:
            object.__setattr__(self, "capacities", tuple(int(c) for c in self.capacities))
            if len(self.capacities) != len(self.parts):
                raise ConfigError(
                    f"partition: {len(self.parts)} parts but {len(self.capacities)} capacities"
                )
            for idx, (size, cap) in enumerate(zip(self.part_sizes, self.capacities)):
                if size > cap:
                    raise ConfigError(
                        f"partition: part {idx} needs {format_bytes(size)} ({size} B) but its card "
                        f"offers {format_bytes(cap)} ({cap} B)"
                    )
        if self.part_times is not None:
            object.__setattr__(self, "part_times", tuple(float(t) for t in self.part_times))
            if len(self.part_times) != len(self.parts):
                raise ConfigError(
                    f"partition: {len(self.parts)} parts but {len(self.part_times)} part_times"
                )

    @property
    def cards(self) -> int:
        """Cards used (= parts)."""
        return len(self.parts)

    @property
    def num_units(self) -> int:
        return self.parts[-1][1]

    @property
    def cuts(self) -> tuple[int, ...]:
        """Unit index where each part after the first starts."""
        return tuple(start for start, _ in self.parts[1:])

    @property
    def bottleneck(self) -> int:
        """The largest part, in bytes."""
        return max(self.part_sizes)

    @property
    def total_bytes(self) -> int:
        return sum(self.part_sizes)

    @property
    def utilization(self) -> tuple[float, ...] | None:
        """``part_size / capacity`` of each part (None without capacities)."""
        if self.capacities is None:
            return None
        return tuple(s / c for s, c in zip(self.part_sizes, self.capacities))

    @property
    def max_utilization(self) -> float | None:
        util = self.utilization
        return None if util is None else max(util)

    @property
    def min_utilization(self) -> float | None:
        util = self.utilization
        return None if util is None else min(util)

    @property
    def mean_utilization(self) -> float | None:
        util = self.utilization
        return None if util is None else sum(util) / len(util)

    @property
    def spread(self) -> float | None:
        """``max - min`` utilization: 0 for a perfectly even plan."""
        util = self.utilization
        return None if util is None else max(util) - min(util)

    @property
    def bottleneck_time_s(self) -> float | None:
        """The slowest part's time, when times were given."""
        return None if self.part_times is None else max(self.part_times)

    def to_dict(self) -> dict[str, Any]:
        """The ``cachefit partition --json`` shape (plus capacities and utilization when known)."""
        out: dict[str, Any] = {
            "parts": [[a, b] for a, b in self.parts],
            "part_sizes": list(self.part_sizes),
            "bottleneck": self.bottleneck,
            "cards": self.cards,
        }
        if self.capacities is not None:
            out["capacities"] = list(self.capacities)
            out["utilization"] = list(self.utilization or ())
        if self.part_times is not None:
            out["part_times_s"] = list(self.part_times)
        out["objective"] = self.objective
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class InfeasiblePartition:
    """Why no partition fits, and the smallest change that would make one fit."""

    reason: str
    """``unit_exceeds_every_card``, ``too_few_cards`` (homogeneous cards), ``card_order``
    (heterogeneous cards in the given order cannot hold the units) or ``exact_cards``
    (each of the K cards cannot get a non-empty part)."""
    num_units: int
    cards_given: int
    """Cards the partition could use (``max_cards``, ``num_cards`` or the capacity list)."""
    capacities: tuple[int, ...]
    """Capacity in bytes of each card that could be used, in order (one entry if all equal)."""
    units_placed: int
    """Length of the longest prefix of the units that the given cards can hold in order."""
    unit_index: int | None = None
    """The first unit that exceeds every card, if any."""
    unit_bytes: int | None = None
    oversized_units: tuple[int, ...] = ()
    """Every unit larger than the largest card."""
    shards_needed: int | None = None
    """Cards of the largest capacity the oversized unit would need if split evenly."""
    cards_needed: int | None = None
    """Fewest cards that fit with more cards like the largest given (None: no count helps)."""
    capacity_needed_bytes: int | None = None
    """Optimal largest part with the given number of cards and no capacity limit: cards of at
    least this capacity would fit."""

    @property
    def largest_capacity_bytes(self) -> int:
        return max(self.capacities)

    @property
    def message(self) -> str:
        largest = format_bytes(self.largest_capacity_bytes)
        if self.reason == "unit_exceeds_every_card":
            assert self.unit_index is not None and self.unit_bytes is not None
            text = (
                f"unit {self.unit_index} ({format_bytes(self.unit_bytes)}) exceeds every card "
                f"(largest {largest}): split it over >= {self.shards_needed} cards or compress it"
            )
            others = len(self.oversized_units) - 1
            if others > 0:
                text += f" ({others} more unit{'s' if others > 1 else ''} exceed every card)"
            return text
        fix = []
        if self.cards_needed is not None:
            fix.append(f"allow {self.cards_needed} cards")
        if self.capacity_needed_bytes is not None:
            need = format_bytes(self.capacity_needed_bytes)
            if need != f"{self.capacity_needed_bytes} B":
                need += f" ({self.capacity_needed_bytes} B)"
            fix.append(f"use {self.cards_given} cards of >= {need} each")
        fix_text = " or ".join(fix) if fix else "add cards or compress units"
        if self.reason == "too_few_cards":
            needed = f"need {self.cards_needed} cards" if self.cards_needed else "need more cards"
            return (
                f"{self.num_units} units {needed} of {largest}; {self.cards_given} given "
                f"(they hold units [0, {self.units_placed}) at most): {fix_text}"
            )
        caps = ", ".join(format_bytes(c) for c in self.capacities[:8])
        if len(self.capacities) > 8:
            caps += ", ..."
        if self.reason == "exact_cards":
            return (
                f"the {self.cards_given} cards ({caps}) cannot each get a non-empty contiguous part "
                f"of the {self.num_units} units in card order; allow fewer cards (exact=False), "
                f"reorder the cards (`cachefit plan --any-order`, or choose_card_order) or {fix_text}"
            )
        return (
            f"the {self.cards_given} cards in the given order ({caps}) hold units "
            f"[0, {self.units_placed}) of {self.num_units} at most: {fix_text}, "
            f"or reorder the cards (`cachefit plan --any-order`, or choose_card_order)"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class CardOrder:
    """The best order of interchangeable cards, and the partition it gives."""

    order: tuple[int, ...]
    """Indices into the capacities given, first card first (every card; the partition uses the
    first ``partition.cards`` of them)."""
    partition: Partition
    exhaustive: bool
    """True when every distinct order was tried (the result is optimal), False for the heuristic."""
    orders_tried: int


# --------------------------------------------------------------------------------------------
# Input normalization
# --------------------------------------------------------------------------------------------


def _as_bytes_array(values: Any, *, what: str, ndim: int = 1) -> np.ndarray:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise ConfigError(f"{what}: expected a sequence of byte counts, got {type(values).__name__}")
    try:
        arr = np.asarray(values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{what}: cannot read as a list of byte counts ({exc})") from None
    if ndim == 1 and arr.ndim != 1:
        raise ConfigError(f"{what}: expected a flat sequence of byte counts, got shape {arr.shape}")
    if arr.size == 0:
        raise ConfigError(f"{what}: no units; give at least one size")
    if arr.dtype.kind == "u":
        if int(arr.max()) >= _MAX_TOTAL_BYTES:
            raise ConfigError(f"{what}: a size of {int(arr.max())} B is beyond 2^62 B")
        arr = arr.astype(np.int64)
    elif arr.dtype.kind != "i":
        if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.floor(arr)):
            hint = "pass ints (whole bytes), e.g. [int(s) for s in sizes]"
        else:
            hint = "sizes are whole numbers of bytes (non-negative ints)"
        raise ConfigError(f"{what}: got values of type {arr.dtype}; {hint}")
    if arr.dtype != np.int64:
        arr = arr.astype(np.int64)
    if (arr < 0).any():
        flat = arr.reshape(-1)
        i = int(np.flatnonzero(flat < 0)[0])
        where = f"[{i}]" if arr.ndim == 1 else f"[{np.unravel_index(i, arr.shape)}]"
        raise ConfigError(f"{what}{where} = {int(flat[i])} B: a size cannot be negative")
    return arr


def _as_times_array(values: Any, n: int) -> np.ndarray:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise ConfigError(f"weights_time: expected a sequence of seconds, got {type(values).__name__}")
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"weights_time: cannot read as seconds ({exc})") from None
    if arr.ndim != 1 or arr.size != n:
        raise ConfigError(f"weights_time: expected {n} per-unit times (one per unit), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or (arr < 0).any():
        i = int(np.flatnonzero(~np.isfinite(arr) | (arr < 0))[0])
        raise ConfigError(f"weights_time[{i}] = {arr[i]!r}: times must be finite and >= 0 seconds")
    return arr


def _as_positive_int(value: Any, *, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _as_capacities(capacity: Any, *, what: str = "capacity") -> tuple[tuple[int, ...], bool]:
    """``(capacities, homogeneous)``: one capacity for every card, or one per card in order."""
    if isinstance(capacity, (int, np.integer)) and not isinstance(capacity, bool):
        if int(capacity) <= 0:
            raise ConfigError(f"{what} must be a positive number of bytes, got {capacity!r}")
        return (int(capacity),), True
    if isinstance(capacity, (str, bytes)) or not isinstance(capacity, (Sequence, np.ndarray)):
        raise ConfigError(
            f"{what}: expected bytes (an int) or one int per card, got {type(capacity).__name__}; "
            "parse sizes such as '50MB' with cachefit.sizes.parse_bytes first"
        )
    caps = []
    for i, c in enumerate(capacity):
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or int(c) <= 0:
            raise ConfigError(f"{what}[{i}] must be a positive int of bytes, got {c!r}")
        caps.append(int(c))
    if not caps:
        raise ConfigError(f"{what}: empty list of cards; give at least one capacity")
    return tuple(caps), False


# --------------------------------------------------------------------------------------------
# Interval costs
# --------------------------------------------------------------------------------------------


class _Costs:
    """Interval costs of the units: additive, or resident + per-row maxima of transient bytes."""

    __slots__ = ("n", "prefix", "prefix_list", "rows", "single", "single_list", "slack", "_guess")

    def __init__(self, sizes: Any, transient: Any = None) -> None:
        resident = _as_bytes_array(sizes, what="sizes")
        n = int(resident.size)
        rows = None
        if transient is not None:
            rows = _as_bytes_array(transient, what="transient", ndim=2)
            if rows.ndim == 1:
                rows = rows.reshape(1, -1)
            if rows.ndim != 2 or rows.shape[1] != n:
                raise ConfigError(
                    f"transient: expected {n} values per row (one per unit, like sizes), got shape "
                    f"{rows.shape}"
                )
        # float estimate with a 2x margin: enough to rule out int64 overflow of any interval cost
        estimate = float(resident.sum(dtype=np.float64))
        if rows is not None:
            estimate += float(rows.max(axis=1).sum(dtype=np.float64))
        if estimate >= _MAX_TOTAL_BYTES:
            raise ConfigError(f"sizes: the units add up to {estimate:.3g} B, beyond 2^62 B")
        self.n = n
        self.prefix = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(resident, out=self.prefix[1:])
        self.prefix_list: list[int] = self.prefix.tolist()
        self.rows = rows
        self.single = resident if rows is None else resident + rows.sum(axis=0)
        # per-unit costs as Python ints, for the galloping search (transient model only)
        self.single_list: list[int] = [] if rows is None else self.single.tolist()
        # Adding one unit to a part raises its cost by at most this (its resident bytes plus the
        # largest transient of each row).
        self.slack = int(resident.max()) + (0 if rows is None else int(rows.max(axis=1).sum()))
        self._guess = 16

    def cost(self, i: int, j: int) -> int:
        """Bytes of the part ``[i, j)``."""
        c = self.prefix_list[j] - self.prefix_list[i]
        if self.rows is not None and j > i:
            c += int(self.rows[:, i:j].max(axis=1).sum())
        return c

    def part_costs(self, cuts: Sequence[int], *, grown: bool = False) -> np.ndarray:
        """Costs of the parts ``[cuts[t], cuts[t+1])``, or with ``grown`` of each part extended by
        its next unit (then every ``cuts[t+1] < n``), vectorized."""
        starts = np.asarray(cuts[:-1], dtype=np.int64)
        ends = np.asarray(cuts[1:], dtype=np.int64) + (1 if grown else 0)
        out = self.prefix[ends] - self.prefix[starts]
        if self.rows is not None:
            stop = int(ends[-1])
            for row in self.rows:
                # maximum.reduceat over [starts[t], starts[t+1]) then the last part up to `stop`;
                # grown parts overlap their successor by one unit, so add that unit back.
                seg = np.maximum.reduceat(row[:stop], starts) if not grown else np.maximum(
                    np.maximum.reduceat(row[: int(cuts[-1])], starts), row[ends - 1]
                )
                out = out + seg
        return out

    def reach(self, p: int, cap: int) -> int:
        """The largest ``q >= p`` with ``cost[p, q) <= cap`` (``q == p``: unit ``p`` does not fit)."""
        n = self.n
        if self.rows is None:
            prefix = self.prefix_list
            target = prefix[p] + cap
            # Look in a window about twice the last part first (fewer, cache-local comparisons).
            hi = p + self._guess
            if hi >= n:
                q = bisect_right(prefix, target, p, n + 1) - 1
            elif prefix[hi] > target:
                q = bisect_right(prefix, target, p, hi) - 1
            else:
                q = bisect_right(prefix, target, hi, n + 1) - 1
            self._guess = 2 * (q - p) + 2
            return q
        if p >= n or self.single_list[p] > cap:
            return p
        # Galloping: costs of [p, p+1), ..., [p, end) in one vectorized pass; they are
        # non-decreasing, so searchsorted finds the last that fits. Window grows 4x when needed.
        width = self._guess
        base = self.prefix_list[p]
        rows = self.rows
        while True:
            end = min(n, p + width)
            costs = self.prefix[p + 1 : end + 1] - base
            if len(rows) == 1:
                costs += np.maximum.accumulate(rows[0, p:end])
            else:
                costs += np.maximum.accumulate(rows[:, p:end], axis=1).sum(axis=0)
            fit = int(np.searchsorted(costs, cap, side="right"))
            if fit < end - p or end == n:
                self._guess = max(16, 2 * fit)
                return p + fit
            width *= 4


class _Times:
    """Per-unit time estimates; a part's time is ``prefix[q] - prefix[p]`` in float64.

    That float difference is monotone in ``q`` and in ``p`` (rounding is monotone), so greedy and
    the search stay exact with respect to it.
    """

    __slots__ = ("n", "prefix", "single", "single_array")

    def __init__(self, times: np.ndarray) -> None:
        self.n = int(times.size)
        prefix = np.zeros(self.n + 1, dtype=np.float64)
        np.cumsum(times, out=prefix[1:])  # sequential, so prefix[q] - prefix[p] is reproducible
        self.prefix: list[float] = prefix.tolist()
        self.single: list[float] = [self.prefix[i + 1] - self.prefix[i] for i in range(self.n)]
        self.single_array = np.asarray(self.single)

    def time(self, i: int, j: int) -> float:
        return self.prefix[j] - self.prefix[i]

    def reach(self, p: int, tau: float) -> int:
        prefix, n = self.prefix, self.n
        if math.isinf(tau):
            return n
        q = bisect_right(prefix, prefix[p] + tau, p, n + 1) - 1
        while q < n and prefix[q + 1] - prefix[p] <= tau:
            q += 1
        while q > p and prefix[q] - prefix[p] > tau:
            q -= 1
        return q


def footprint_cost_arrays(
    footprints: Sequence[Footprint], *, reuse: bool = True
) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...] | None]:
    """``(resident, transient)`` arrays whose interval cost equals :func:`stack_footprints`.

    With ``reuse`` a part's bytes are ``sum(weights + persistent activations)`` plus the largest
    ``transient activations + buffers`` of one unit (a unit's scratch and workspace live only while
    it runs), so ``transient`` is one row. Without reuse the cost is the plain sum of
    ``total_bytes`` and ``transient`` is None. Pass them as
    ``fewest_cards(resident, capacity, transient=transient)``.
    """
    fps = tuple(footprints)
    if not fps:
        raise ConfigError("footprints: no units")
    if not reuse:
        return tuple(f.total_bytes for f in fps), None
    resident = tuple(f.weight_bytes + f.persistent_activation_bytes for f in fps)
    transient = (tuple(f.transient_activation_bytes + f.buffer_bytes for f in fps),)
    return resident, transient


# --------------------------------------------------------------------------------------------
# Feasibility: greedy chain, and the exact reachable-set sweep
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Check:
    cuts: list[int] | None = None
    """Feasible: part boundaries ``0 = c_0 < c_1 < ... < c_m = n``."""
    greedy: list[int] | None = None
    """Infeasible and greedy never stalled: its boundaries over all K cards (for the jump)."""
    furthest: int = 0
    """Longest prefix of units placed."""


@dataclass(slots=True)
class _Limits:
    """What each card accepts under one bound: bytes per card, and a time cap (or None)."""

    mem: list[int]
    tau: float | None = None
    _misfits: dict[tuple[int, float | None], list[int]] = field(default_factory=dict)


class _Problem:
    """One search: the costs, the K cards' capacities, and the objective's number domain."""

    def __init__(
        self, costs: _Costs, caps: Sequence[int], objective: str, times: _Times | None = None
    ) -> None:
        self.costs = costs
        self.caps = list(caps)
        self.objective = objective
        self.times = times
        self.n = costs.n

    # ---- per-bound limits -------------------------------------------------------------------
    def limits(self, bound: Any) -> _Limits:
        if self.objective == "max_part":
            return _Limits(mem=[c if c <= bound else bound for c in self.caps])
        if self.objective == "max_utilization":
            num, den = bound.numerator, bound.denominator
            return _Limits(mem=[min(c, num * c // den) for c in self.caps])
        return _Limits(mem=self.caps, tau=bound)

    def reach(self, lim: _Limits, p: int, t: int) -> int:
        q = self.costs.reach(p, lim.mem[t])
        if lim.tau is not None and q > p:
            q = min(q, self.times.reach(p, lim.tau))  # type: ignore[union-attr]
        return q

    def misfits(self, lim: _Limits, t: int) -> list[int]:
        """Units that do not fit card ``t`` alone under ``lim``, sorted."""
        key = (lim.mem[t], lim.tau)
        found = lim._misfits.get(key)
        if found is None:
            bad = self.costs.single > lim.mem[t]
            if lim.tau is not None and self.times is not None:
                bad |= self.times.single_array > lim.tau
            found = np.flatnonzero(bad).tolist()
            lim._misfits[key] = found
        return found

    # ---- feasibility --------------------------------------------------------------------------
    def check(self, bound: Any, *, num_cards: int, exact: bool = False) -> _Check:
        lim = self.limits(bound)
        if exact:
            return _sweep(self, lim, num_cards, exact=True)
        n, cuts, g = self.n, [0], 0
        for t in range(num_cards):
            q = self.reach(lim, g, t)
            if q == g:  # unit g does not fit card t alone: greedy stalls, decide exactly
                return _sweep(self, lim, num_cards, exact=False)
            g = q
            cuts.append(g)
            if g == n:
                return _Check(cuts=cuts, furthest=n)
        return _Check(greedy=cuts, furthest=g)

    # ---- the objective's numbers ----------------------------------------------------------------
    def value(self, cuts: Sequence[int]) -> Any:
        if self.objective == "max_part":
            return int(self.costs.part_costs(cuts).max())
        if self.objective == "max_utilization":
            costs = self.costs.part_costs(cuts).tolist()
            return max(Fraction(c, self.caps[t]) for t, c in enumerate(costs))
        pairs = zip(cuts[:-1], cuts[1:])
        return max(self.times.time(a, b) for a, b in pairs)  # type: ignore[union-attr]

    def jump(self, greedy: Sequence[int]) -> Any:
        """Smallest bound under which some greedy part grows by one unit (None: none can)."""
        grown = self.costs.part_costs(greedy, grown=True)
        room = grown <= np.asarray(self.caps[: len(greedy) - 1])  # else the card itself is full
        if not room.any():
            return None
        if self.objective == "max_part":
            return int(grown[room].min())
        if self.objective == "max_utilization":
            return min(Fraction(int(grown[t]), self.caps[t]) for t in np.flatnonzero(room).tolist())
        return min(
            self.times.time(greedy[t], greedy[t + 1] + 1)  # type: ignore[union-attr]
            for t in np.flatnonzero(room).tolist()
        )

    def top(self) -> Any:
        if self.objective == "max_part":
            return max(self.caps)
        if self.objective == "max_utilization":
            return Fraction(1)
        return math.inf

    def lower(self, num_cards: int) -> Any:
        if self.objective == "max_part":
            total = self.costs.prefix_list[-1]
            return max(int(self.costs.single.max()), -(-total // num_cards))
        if self.objective == "max_utilization":
            return Fraction(int(self.costs.single.max()), max(self.caps))
        return max(self.times.single)  # type: ignore[union-attr]

    def above(self, mid: Any) -> Any:
        """The smallest value the optimum can take that is strictly above ``mid``."""
        if self.objective == "max_part":
            return mid + 1
        if self.objective == "max_utilization":
            # every optimum is cost / C for an int cost and a capacity C among the cards
            return min(Fraction(mid.numerator * c // mid.denominator + 1, c) for c in set(self.caps))
        return math.nextafter(mid, math.inf)

    def midpoint(self, lo: Any, hi: Any) -> Any:
        if self.objective == "max_part":
            return (lo + hi) // 2
        if self.objective == "max_utilization":
            return (lo + hi) / 2
        mid = lo + (hi - lo) / 2
        return lo if mid >= hi else mid


def _sweep(problem: _Problem, lim: _Limits, num_cards: int, *, exact: bool) -> _Check:
    """Exact feasibility by the sets of positions reachable after t parts (see module docstring).

    ``F(t)`` is kept as sorted disjoint intervals. For ``q`` in an interval ``(a, b]`` of ``F(t)``
    the best predecessor is ``q - 1`` (reachable iff unit ``q - 1`` fits card ``t`` alone); past
    ``b`` up to the next interval's start it is ``b`` (reachable iff ``q <= reach(b)``).
    """
    n = problem.n
    layers: list[list[tuple[int, int]]] = [[(0, 0)]]
    furthest = 0
    for t in range(num_cards):
        prev = layers[-1]
        mis = problem.misfits(lim, t)
        limit = n - (num_cards - t - 1) if exact else n  # leave a unit for every later card
        out: list[list[int]] = []

        def add(lo: int, hi: int) -> None:
            if out and lo <= out[-1][1] + 1:
                if hi > out[-1][1]:
                    out[-1][1] = hi
            else:
                out.append([lo, hi])

        for idx, (a, b) in enumerate(prev):
            if b > a:
                start = a + 1
                for k in range(bisect_left(mis, a), bisect_left(mis, b)):
                    m = mis[k]  # q = m + 1 has predecessor m, which does not fit alone
                    if m >= start:
                        add(start, m)
                    start = m + 2
                if start <= b:
                    add(start, b)
            if b < n:
                end = problem.reach(lim, b, t)
                if idx + 1 < len(prev):
                    end = min(end, prev[idx + 1][0])
                if end > b:
                    add(b + 1, end)
        clipped = []
        for lo, hi in out:
            if lo > limit:
                break
            clipped.append((lo, min(hi, limit)))
        if not clipped:
            return _Check(furthest=furthest)
        layers.append(clipped)
        furthest = max(furthest, clipped[-1][1])
        if not exact and clipped[-1][1] == n:
            return _Check(cuts=_backtrack(layers, n), furthest=n)
    if exact and layers[-1][-1][1] == n and len(layers) == num_cards + 1:
        return _Check(cuts=_backtrack(layers, n), furthest=n)
    return _Check(furthest=furthest)


def _backtrack(layers: list[list[tuple[int, int]]], n: int) -> list[int]:
    cuts, q = [n], n
    for t in range(len(layers) - 2, -1, -1):
        layer = layers[t]
        i = bisect_left([lo for lo, _ in layer], q) - 1
        q = min(layer[i][1], q - 1)  # the largest position of F(t) below q
        cuts.append(q)
    if q != 0:
        raise AssertionError(f"partition sweep: backtrack ended at {q}, not 0")
    cuts.reverse()
    return cuts


def _minimize(problem: _Problem, num_cards: int, *, exact: bool) -> list[int] | None:
    """Optimal cut positions with at most (exactly, with ``exact``) ``num_cards`` parts."""
    top = problem.top()
    lower = problem.lower(num_cards)
    first = None
    probe = lower + problem.costs.slack if problem.objective == "max_part" else top
    if probe < top:
        # Greedy under B = sum(resident) / K + slack fits in K parts: every closed part plus its
        # next unit exceeds B, so its resident bytes exceed B - slack >= sum(resident) / K, and K
        # closed parts would hold more than everything. A cheap first upper bound when every card
        # offers B; a probe only (small heterogeneous cards may fail it; the top check decides).
        first = problem.check(probe, num_cards=num_cards)
    if first is None or first.cuts is None:
        first = problem.check(top, num_cards=num_cards)
    if first.cuts is None:
        return None
    hi_cuts, hi = first.cuts, problem.value(first.cuts)
    lo = min(lower, hi)
    steps = 0
    while lo < hi and steps < _MAX_SEARCH_STEPS:
        steps += 1
        mid = problem.midpoint(lo, hi)
        chk = problem.check(mid, num_cards=num_cards)
        if chk.cuts is not None:
            hi_cuts, hi = chk.cuts, problem.value(chk.cuts)
        else:
            lo = max(lo, problem.above(mid))
            if chk.greedy is not None:
                jump = problem.jump(chk.greedy)
                if jump is not None and jump > lo:
                    lo = jump
    logger.debug("partition search: %s over %d cards, %d checks", problem.objective, num_cards, steps)
    if steps >= _MAX_SEARCH_STEPS:
        logger.warning("partition search stopped after %d steps; the result may not be optimal", steps)
    if not exact or len(hi_cuts) - 1 == num_cards:
        return hi_cuts
    # Exactly num_cards parts: free when every unit fits every card (module docstring), else search.
    chk = problem.check(hi, num_cards=num_cards, exact=True)
    if chk.cuts is not None:
        return chk.cuts
    chk = problem.check(top, num_cards=num_cards, exact=True)
    if chk.cuts is None:
        return None
    lo, hi_cuts, hi = problem.above(hi), chk.cuts, problem.value(chk.cuts)
    steps = 0
    while lo < hi and steps < _MAX_SEARCH_STEPS:
        steps += 1
        mid = problem.midpoint(lo, hi)
        chk = problem.check(mid, num_cards=num_cards, exact=True)
        if chk.cuts is not None:
            hi_cuts, hi = chk.cuts, problem.value(chk.cuts)
        else:
            lo = max(lo, problem.above(mid))
    return hi_cuts


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _make_partition(
    costs: _Costs,
    cuts: Sequence[int],
    capacities: Sequence[int] | None,
    objective: str,
    times: _Times | None = None,
) -> Partition:
    pairs = tuple(zip(cuts[:-1], cuts[1:]))
    return Partition(
        parts=pairs,
        part_sizes=tuple(costs.cost(a, b) for a, b in pairs),
        capacities=None if capacities is None else tuple(capacities[: len(pairs)]),
        objective=objective,
        part_times=None if times is None else tuple(times.time(a, b) for a, b in pairs),
    )


def _raise_oversized(costs: _Costs, caps: Sequence[int]) -> None:
    largest = max(caps)
    if int(costs.single.max()) <= largest:
        return
    over = tuple(np.flatnonzero(costs.single > largest).tolist())
    first = over[0]
    size = int(costs.single[first])
    report = InfeasiblePartition(
        reason="unit_exceeds_every_card",
        num_units=costs.n,
        cards_given=len(caps),
        capacities=_compact(caps),
        units_placed=first,
        unit_index=first,
        unit_bytes=size,
        oversized_units=over,
        shards_needed=-(-size // largest),
    )
    raise InfeasiblePlanError(report.message, report)


def _compact(caps: Sequence[int]) -> tuple[int, ...]:
    return (caps[0],) if len(set(caps)) == 1 else tuple(caps)


def _raise_too_few(
    costs: _Costs, caps: Sequence[int], homogeneous: bool, furthest: int, *, exact: bool = False
) -> None:
    """Build the report for ``len(caps)`` cards that cannot hold the units, and raise it."""
    n, k = costs.n, len(caps)
    largest = max(caps)
    # cards needed: the given cards followed by as many of the largest as it takes
    more = _Problem(costs, list(caps) + [largest] * n, "max_part")
    chk = more.check(largest, num_cards=k + n)
    cards_needed = None if chk.cuts is None else len(chk.cuts) - 1
    # capacity needed: the optimal largest part over the same number of cards, no capacity limit
    free = _Problem(costs, [costs.cost(0, n)] * k, "max_part")
    free_cuts = _minimize(free, k, exact=exact)
    capacity_needed = None if free_cuts is None else free.value(free_cuts)
    if exact:
        reason = "exact_cards"
    else:
        reason = "too_few_cards" if homogeneous else "card_order"
    report = InfeasiblePartition(
        reason=reason,
        num_units=n,
        cards_given=k,
        capacities=_compact(caps),
        units_placed=furthest,
        cards_needed=cards_needed if cards_needed is not None and cards_needed > k else None,
        capacity_needed_bytes=capacity_needed,
    )
    raise InfeasiblePlanError(report.message, report)


def fewest_cards(
    sizes: Sequence[int] | np.ndarray,
    capacity: int | Sequence[int],
    *,
    transient: Sequence[int] | Sequence[Sequence[int]] | np.ndarray | None = None,
    max_cards: int | None = None,
) -> Partition:
    """The fewest contiguous parts that fit, ties broken by the smallest largest part.

    Args:
        sizes: bytes of each unit in order (with ``transient``: the resident bytes).
        capacity: bytes per card, or one capacity per card in a fixed order (part ``t`` goes on
            card ``t``; a prefix of the cards is used).
        transient: reused bytes per unit (one row, or several rows each reused separately); a
            part then costs ``sum(sizes) + sum over rows of max(transient)``.
        max_cards: at most this many cards (default: as many as needed / as listed).

    Raises:
        ConfigError: bad input (empty or negative sizes, capacity <= 0, max_cards < 1).
        InfeasiblePlanError: no partition fits; ``.report`` is an :class:`InfeasiblePartition`.
    """
    costs = _Costs(sizes, transient)
    caps_given, homogeneous = _as_capacities(capacity)
    n = costs.n
    limit = n if max_cards is None else min(_as_positive_int(max_cards, what="max_cards"), n)
    if homogeneous:
        caps = [caps_given[0]] * limit
    else:
        caps = list(caps_given[: min(limit, len(caps_given))])
    _raise_oversized(costs, caps)
    problem = _Problem(costs, caps, "max_part")
    chk = problem.check(problem.top(), num_cards=len(caps))
    if chk.cuts is None:
        _raise_too_few(costs, caps, homogeneous, chk.furthest)
    assert chk.cuts is not None
    count = len(chk.cuts) - 1
    # tie-break: the smallest largest part among partitions with `count` cards
    best = _Problem(costs, caps[:count], "max_part")
    cuts = _minimize(best, count, exact=False)
    assert cuts is not None and len(cuts) - 1 == count
    return _make_partition(costs, cuts, caps, "fewest_cards")


def balanced(
    sizes: Sequence[int] | np.ndarray,
    num_cards: int,
    *,
    capacity: int | Sequence[int] | None = None,
    transient: Sequence[int] | Sequence[Sequence[int]] | np.ndarray | None = None,
    objective: str | None = None,
    weights_time: Sequence[float] | np.ndarray | None = None,
    exact: bool = False,
) -> Partition:
    """At most ``num_cards`` contiguous parts minimizing the largest one; provably optimal.

    Args:
        sizes: bytes of each unit in order (with ``transient``: the resident bytes).
        num_cards: K, the most parts (cards) to use.
        capacity: None (no limit), bytes per card, or one capacity per card in order (part ``t``
            on card ``t``; at least ``num_cards`` entries, the first ``num_cards`` are used).
        transient: reused bytes per unit, see :func:`fewest_cards`.
        objective: ``max_part`` (default: the largest part in bytes, each part within its card),
            ``max_utilization`` (the largest ``part / capacity``; differs from ``max_part`` only
            for heterogeneous cards), or ``max_time`` (default when ``weights_time`` is given: the
            slowest part, with capacities as constraints).
        weights_time: per-unit stage time estimates in seconds, for ``max_time``.
        exact: exactly ``min(K, n)`` non-empty parts. The optimum is the same as with at most K
            parts whenever every unit fits every card; otherwise it may be larger.

    Raises:
        ConfigError: bad input.
        InfeasiblePlanError: no partition fits; ``.report`` is an :class:`InfeasiblePartition`.
    """
    costs = _Costs(sizes, transient)
    n = costs.n
    k_given = _as_positive_int(num_cards, what="num_cards")
    times = None
    if weights_time is not None:
        times = _Times(_as_times_array(weights_time, n))
    if objective is None:
        objective = "max_time" if times is not None else "max_part"
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if objective == "max_time" and times is None:
        raise ConfigError("objective 'max_time' needs weights_time (one time in seconds per unit)")
    if objective != "max_time" and times is not None:
        raise ConfigError(f"weights_time is given but objective is {objective!r}; use 'max_time'")
    k = min(k_given, n)  # more than n non-empty parts cannot exist
    if capacity is None:
        if objective == "max_utilization":
            raise ConfigError("objective 'max_utilization' needs a capacity per card")
        caps = [costs.cost(0, n)] * k  # every part fits: no constraint
        capacities = None
    else:
        caps_given, homogeneous = _as_capacities(capacity)
        if homogeneous:
            caps = [caps_given[0]] * k
        else:
            if len(caps_given) < k_given:
                raise ConfigError(
                    f"capacity lists {len(caps_given)} cards but num_cards is {k_given}; give one "
                    "capacity per card or lower num_cards"
                )
            caps = list(caps_given[:k])
        capacities = caps
        _raise_oversized(costs, caps)
    search_objective = objective
    if objective == "max_utilization" and len(set(caps)) == 1:
        search_objective = "max_part"  # same argmin on equal cards, integer search
    problem = _Problem(costs, caps, search_objective, times)
    cuts = _minimize(problem, k, exact=exact)
    if cuts is None:
        furthest = problem.check(problem.top(), num_cards=k).furthest
        feasible_at_most = furthest == n
        _raise_too_few(
            costs,
            caps,
            capacity is None or len(set(caps)) == 1,
            furthest,
            exact=exact and feasible_at_most,
        )
    assert cuts is not None
    return _make_partition(costs, cuts, capacities, objective, times)


def _distinct_orders(values: list[int]) -> Any:
    """Distinct permutations of ``values`` in lexicographic order (next-permutation)."""
    seq = sorted(values)
    while True:
        yield tuple(seq)
        i = len(seq) - 2
        while i >= 0 and seq[i] >= seq[i + 1]:
            i -= 1
        if i < 0:
            return
        j = len(seq) - 1
        while seq[j] <= seq[i]:
            j -= 1
        seq[i], seq[j] = seq[j], seq[i]
        seq[i + 1 :] = reversed(seq[i + 1 :])


def _count_orders(values: Sequence[int]) -> int:
    count = math.factorial(len(values))
    for v in set(values):
        count //= math.factorial(values.count(v))  # type: ignore[attr-defined]
    return count


def choose_card_order(
    sizes: Sequence[int] | np.ndarray,
    capacities: Sequence[int],
    *,
    transient: Sequence[int] | Sequence[Sequence[int]] | np.ndarray | None = None,
    num_cards: int | None = None,
    objective: str = "max_part",
    exact: bool = False,
    max_orders: int = 5040,
) -> CardOrder:
    """The best order for a multiset of interchangeable cards of different capacities.

    Without ``num_cards``: the order needing the fewest cards (then the smallest largest part),
    as :func:`fewest_cards` on the ordered capacities. With ``num_cards`` K: the order whose first
    K cards give the best :func:`balanced` partition for ``objective``.

    Every distinct order is tried when there are at most ``max_orders`` of them (exhaustive,
    optimal). Beyond that a heuristic: largest-first, smallest-first, and an order matching card
    sizes to the parts of an equal-card partition, then swaps of two cards of different capacity
    while one improves, within ``max_orders`` evaluations (``exhaustive=False``, not guaranteed
    optimal). Without ``num_cards``, ``objective`` is not used (ties go to the smallest part).

    Raises:
        ConfigError: bad input.
        InfeasiblePlanError: no order fits; ``.report`` is that of the largest-first order.
    """
    if isinstance(capacities, (int, np.integer)):
        raise ConfigError("capacities: give one capacity per card (a list), not a single number")
    caps_all, _ = _as_capacities(list(capacities), what="capacities")
    max_orders = _as_positive_int(max_orders, what="max_orders")
    if num_cards is not None:
        num_cards = _as_positive_int(num_cards, what="num_cards")
        if num_cards > len(caps_all):
            raise ConfigError(
                f"num_cards is {num_cards} but only {len(caps_all)} capacities are given"
            )
    if objective not in ("max_part", "max_utilization"):
        raise ConfigError(f"objective must be 'max_part' or 'max_utilization', got {objective!r}")

    def evaluate(order_values: tuple[int, ...]) -> tuple[Any, Partition] | None:
        try:
            if num_cards is None:
                part = fewest_cards(sizes, list(order_values), transient=transient)
                return (part.cards, part.bottleneck), part
            part = balanced(
                sizes,
                num_cards,
                capacity=list(order_values),
                transient=transient,
                objective=objective,
                exact=exact,
            )
        except InfeasiblePlanError:
            return None
        if objective == "max_utilization":
            assert part.capacities is not None
            key: Any = max(Fraction(s, c) for s, c in zip(part.part_sizes, part.capacities))
        else:
            key = part.bottleneck
        return key, part

    best: tuple[Any, tuple[int, ...], Partition] | None = None
    tried = 0
    seen: set[tuple[int, ...]] = set()

    def consider(order_values: tuple[int, ...]) -> bool:
        nonlocal best, tried
        probe = order_values if num_cards is None else order_values[:num_cards]
        if probe in seen:
            return False
        seen.add(probe)
        tried += 1
        result = evaluate(order_values)
        if result is not None and (best is None or result[0] < best[0]):
            best = (result[0], order_values, result[1])
            return True
        return False

    exhaustive = _count_orders(list(caps_all)) <= max_orders
    if exhaustive:
        for order_values in _distinct_orders(list(caps_all)):
            consider(order_values)
    else:
        descending = tuple(sorted(caps_all, reverse=True))
        consider(descending)
        consider(tuple(sorted(caps_all)))
        consider(_matched_order(sizes, transient, caps_all, num_cards))
        improved = True
        while improved and tried < max_orders and best is not None:
            improved = False
            current = list(best[1])
            for i in range(len(current)):
                for j in range(i + 1, len(current)):
                    if current[i] == current[j] or tried >= max_orders:
                        continue
                    swapped = current.copy()
                    swapped[i], swapped[j] = swapped[j], swapped[i]
                    if consider(tuple(swapped)):
                        improved = True
                        break
                if improved:
                    break
    if best is None:
        descending = sorted(caps_all, reverse=True)
        if num_cards is None:
            fewest_cards(sizes, descending, transient=transient)
        else:
            balanced(
                sizes,
                num_cards,
                capacity=descending,
                transient=transient,
                objective=objective,
                exact=exact,
            )
        raise AssertionError("an order failed but largest-first did not raise")  # pragma: no cover
    _, order_values, partition = best
    return CardOrder(
        order=_indices_for(order_values, caps_all),
        partition=partition,
        exhaustive=exhaustive,
        orders_tried=tried,
    )


def _indices_for(order_values: Sequence[int], caps: Sequence[int]) -> tuple[int, ...]:
    """Map an order of capacity values to card indices (equal cards in their given order)."""
    pools: dict[int, list[int]] = {}
    for idx, cap in enumerate(caps):
        pools.setdefault(cap, []).append(idx)
    for pool in pools.values():
        pool.reverse()
    return tuple(pools[v].pop() for v in order_values)


def _matched_order(
    sizes: Any, transient: Any, caps: Sequence[int], num_cards: int | None
) -> tuple[int, ...]:
    """Largest cards where an equal-card partition puts the largest parts."""
    k = num_cards or len(caps)
    part = balanced(sizes, k, transient=transient)
    ranked = sorted(range(part.cards), key=lambda t: -part.part_sizes[t])
    desc = sorted(caps, reverse=True)
    slots: list[int | None] = [None] * part.cards
    for rank, t in enumerate(ranked):
        slots[t] = desc[rank]
    rest = desc[part.cards :]
    return tuple(v for v in slots if v is not None) + tuple(rest)


__all__ = [
    "OBJECTIVES",
    "CardOrder",
    "InfeasiblePartition",
    "Partition",
    "balanced",
    "choose_card_order",
    "fewest_cards",
    "footprint_cost_arrays",
]
