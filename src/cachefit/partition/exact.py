"""Exact references for contiguous partitioning: brute force and a MILP.

Written independently of :mod:`cachefit.partition.contiguous` (plain Python loops, no prefix
sums, no search) so that tests and ``--verify`` can check the fast algorithms against them.

* ``brute_force_*`` enumerate every set of cut positions: ``2^(n-1)`` of them, so n <= 16.
* ``milp_*`` solve the problem as a mixed-integer program with ``scipy.optimize.milp`` (HiGHS):
  binary ``x[i, j]`` puts unit ``i`` on card ``j``; contiguity, order and a used prefix of
  non-empty cards come from two families of linear constraints on the cumulative sums
  ``X[i, j] = sum_{j' <= j} x[i, j']`` (1 when unit ``i`` sits on card ``j`` or earlier):
  ``X[i+1, j] <= X[i, j]`` (cards never go back) and ``X[i, j] <= X[i+1, j+1]`` (they advance by at
  most one per unit, so no card is skipped and every used card gets a unit). The bottleneck ``z``
  bounds each card's load from above and is minimized. A transient row ``r`` adds a variable
  ``m[r, j] >= transient[r, i] * x[i, j]`` per card, the max over the card's units.

scipy is imported inside the MILP functions only.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

from cachefit.errors import CachefitError, ConfigError
from cachefit.partition.contiguous import Partition

_BRUTE_FORCE_MAX_UNITS = 16


def _ints(values: Any, what: str) -> list[int]:
    try:
        out = [int(v) for v in values]
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: expected ints of bytes, got {values!r}") from None
    if any(isinstance(v, float) and not float(v).is_integer() for v in values):
        raise ConfigError(f"{what}: sizes are whole numbers of bytes")
    if any(v < 0 for v in out):
        raise ConfigError(f"{what}: sizes cannot be negative, got {out}")
    return out


def _transient_rows(transient: Any, n: int) -> list[list[int]]:
    if transient is None:
        return []
    rows = list(transient)
    if rows and not hasattr(rows[0], "__len__"):
        rows = [rows]
    out = [_ints(row, "transient") for row in rows]
    if any(len(row) != n for row in out):
        raise ConfigError(f"transient: every row needs {n} values, one per unit")
    return out


def _setup(sizes: Any, transient: Any) -> tuple[list[int], list[list[int]]]:
    resident = _ints(sizes, "sizes")
    if not resident:
        raise ConfigError("sizes: no units")
    return resident, _transient_rows(transient, len(resident))


def _cost(resident: list[int], rows: list[list[int]], i: int, j: int) -> int:
    """Bytes of part [i, j): resident bytes add up, each transient row counts its maximum."""
    return sum(resident[i:j]) + sum(max(row[i:j]) for row in rows)


def _card_capacities(capacity: Any, count: int) -> list[int] | None:
    """Capacities of the first ``count`` cards (None: unlimited)."""
    if capacity is None:
        return None
    if isinstance(capacity, numbers.Integral):
        if capacity <= 0:
            raise ConfigError(f"capacity must be positive, got {capacity}")
        return [int(capacity)] * count
    try:
        caps = [int(c) for c in capacity]
    except (TypeError, ValueError):
        raise ConfigError(f"capacity: an int of bytes or one int per card, got {capacity!r}") from None
    if not caps or any(c <= 0 for c in caps):
        raise ConfigError(f"capacity: one positive int per card, got {caps}")
    return caps[:count]


def _check_brute_force_size(n: int) -> None:
    if n > _BRUTE_FORCE_MAX_UNITS:
        raise ConfigError(
            f"brute force enumerates 2^(n-1) cut sets; n = {n} is over {_BRUTE_FORCE_MAX_UNITS}: "
            "use milp_balanced / milp_fewest"
        )


def _partitions(n: int, parts: int) -> Any:
    """Every way to cut range(n) into ``parts`` contiguous non-empty parts, as boundary lists."""
    for cut in itertools.combinations(range(1, n), parts - 1):
        yield (0, *cut, n)


def _partition_from(
    resident: list[int],
    rows: list[list[int]],
    bounds: Sequence[int],
    caps: list[int] | None,
    objective: str,
    times: list[float] | None = None,
) -> Partition:
    pairs = tuple(zip(bounds[:-1], bounds[1:]))
    return Partition(
        parts=pairs,
        part_sizes=tuple(_cost(resident, rows, a, b) for a, b in pairs),
        capacities=None if caps is None else tuple(caps[: len(pairs)]),
        objective=objective,
        part_times=None if times is None else tuple(sum(times[a:b]) for a, b in pairs),
    )


def brute_force_fewest(
    sizes: Sequence[int],
    capacity: int | Sequence[int],
    *,
    transient: Any = None,
    max_cards: int | None = None,
) -> Partition | None:
    """Fewest cards, then the smallest largest part, by enumeration; None if nothing fits."""
    resident, rows = _setup(sizes, transient)
    n = len(resident)
    _check_brute_force_size(n)
    limit = n if max_cards is None else min(max_cards, n)
    caps = _card_capacities(capacity, limit)
    assert caps is not None
    limit = min(limit, len(caps))
    for parts in range(1, limit + 1):
        best = None
        for bounds in _partitions(n, parts):
            costs = [_cost(resident, rows, a, b) for a, b in zip(bounds[:-1], bounds[1:])]
            if all(c <= cap for c, cap in zip(costs, caps)):
                if best is None or max(costs) < best[0]:
                    best = (max(costs), bounds)
        if best is not None:
            return _partition_from(resident, rows, best[1], caps, "fewest_cards")
    return None


def _objective_value(
    resident: list[int],
    rows: list[list[int]],
    bounds: Sequence[int],
    caps: list[int] | None,
    objective: str,
    times: list[float] | None,
) -> Any:
    pairs = list(zip(bounds[:-1], bounds[1:]))
    if objective == "max_part":
        return max(_cost(resident, rows, a, b) for a, b in pairs)
    if objective == "max_utilization":
        assert caps is not None
        return max(Fraction(_cost(resident, rows, a, b), caps[t]) for t, (a, b) in enumerate(pairs))
    assert times is not None
    return max(sum(times[a:b]) for a, b in pairs)


def brute_force_balanced(
    sizes: Sequence[int],
    num_cards: int,
    *,
    capacity: int | Sequence[int] | None = None,
    transient: Any = None,
    objective: str | None = None,
    weights_time: Sequence[float] | None = None,
    exact: bool = False,
) -> Partition | None:
    """At most (exactly, with ``exact``: ``min(K, n)``) K parts, best objective; None if none fits."""
    resident, rows = _setup(sizes, transient)
    n = len(resident)
    _check_brute_force_size(n)
    if num_cards < 1:
        raise ConfigError(f"num_cards must be >= 1, got {num_cards}")
    if objective is None:
        objective = "max_time" if weights_time is not None else "max_part"
    times = None if weights_time is None else [float(t) for t in weights_time]
    k = min(num_cards, n)
    caps = _card_capacities(capacity, k)
    if caps is not None and len(caps) < k:
        raise ConfigError(f"capacity lists {len(caps)} cards, fewer than num_cards = {num_cards}")
    best = None
    for parts in range(k if exact else 1, k + 1):
        for bounds in _partitions(n, parts):
            if caps is not None and any(
                _cost(resident, rows, a, b) > caps[t]
                for t, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))
            ):
                continue
            value = _objective_value(resident, rows, bounds, caps, objective, times)
            if best is None or value < best[0]:
                best = (value, bounds)
    if best is None:
        return None
    return _partition_from(resident, rows, best[1], caps, objective, times)


def brute_force_card_order(
    sizes: Sequence[int],
    capacities: Sequence[int],
    *,
    transient: Any = None,
    num_cards: int | None = None,
    objective: str = "max_part",
    exact: bool = False,
) -> Partition | None:
    """Best partition over every order of the cards (fewest cards then smallest largest part
    without ``num_cards``; the best ``objective`` over the first K cards with it)."""
    best = None
    for order in sorted(set(itertools.permutations(capacities))):
        if num_cards is None:
            part = brute_force_fewest(sizes, list(order), transient=transient)
            key: Any = None if part is None else (part.cards, part.bottleneck)
        else:
            part = brute_force_balanced(
                sizes, num_cards, capacity=list(order), transient=transient, objective=objective, exact=exact
            )
            if part is None:
                key = None
            elif objective == "max_utilization":
                assert part.capacities is not None
                key = max(Fraction(s, c) for s, c in zip(part.part_sizes, part.capacities))
            else:
                key = part.bottleneck
        if key is not None and (best is None or key < best[0]):
            best = (key, part)
    return None if best is None else best[1]


# --------------------------------------------------------------------------------------------
# MILP
# --------------------------------------------------------------------------------------------


def _solve_assignment(
    resident: list[int],
    rows: list[list[int]],
    num_cards: int,
    caps: list[int] | None,
    *,
    objective: str,
    times: list[float] | None,
    exact: bool,
    time_limit_s: float,
) -> list[int] | None:
    """Card index of every unit in an optimal solution (None: infeasible)."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    n, k, r = len(resident), num_cards, len(rows)
    # Bytes scaled by a power of two (exact in floating point) so HiGHS sees numbers near 1.
    largest = max(max(resident), *(max(row) for row in rows), 1)
    scale = 2.0 ** max(0, math.floor(math.log2(largest)) - 4)
    nx = n * k
    z = nx
    nvar = nx + 1 + r * k

    def x(i: int, j: int) -> int:
        return i * k + j

    def m(row: int, j: int) -> int:
        return nx + 1 + row * k + j

    data: list[float] = []
    row_idx: list[int] = []
    col_idx: list[int] = []
    lower: list[float] = []
    upper: list[float] = []

    def add(coeffs: list[tuple[int, float]], lo: float, hi: float) -> None:
        row_no = len(lower)
        for col, val in coeffs:
            row_idx.append(row_no)
            col_idx.append(col)
            data.append(val)
        lower.append(lo)
        upper.append(hi)

    for i in range(n):  # every unit on exactly one card
        add([(x(i, j), 1.0) for j in range(k)], 1.0, 1.0)
    for i in range(n - 1):
        for j in range(k - 1):
            # X[i+1, j] - X[i, j] <= 0: unit i+1 is on a card no earlier than unit i's
            add([(x(i + 1, jj), 1.0) for jj in range(j + 1)] + [(x(i, jj), -1.0) for jj in range(j + 1)], -np.inf, 0.0)
            # X[i, j] - X[i+1, j+1] <= 0: and at most one card later
            add([(x(i, jj), 1.0) for jj in range(j + 1)] + [(x(i + 1, jj), -1.0) for jj in range(j + 2)], -np.inf, 0.0)
    for row_no, row in enumerate(rows):  # m[row, j] >= transient[row, i] on unit i's card
        for i, val in enumerate(row):
            if val > 0:
                for j in range(k):
                    add([(x(i, j), val / scale), (m(row_no, j), -1.0)], -np.inf, 0.0)
    for j in range(k):
        load = [(x(i, j), resident[i] / scale) for i in range(n)] + [(m(row_no, j), 1.0) for row_no in range(r)]
        if caps is not None:
            add(load, -np.inf, caps[j] / scale)
        if objective == "last_card":
            continue
        if objective == "max_part":
            add(load + [(z, -1.0)], -np.inf, 0.0)
        elif objective == "max_utilization":
            assert caps is not None
            add([(col, val * scale / caps[j]) for col, val in load] + [(z, -1.0)], -np.inf, 0.0)
        else:
            assert times is not None
            add([(x(i, j), times[i]) for i in range(n)] + [(z, -1.0)], -np.inf, 0.0)
    lb = np.zeros(nvar)
    ub = np.ones(nvar)
    ub[nx:] = np.inf
    lb[x(0, 0)] = 1.0  # the first unit opens card 0
    if exact:
        lb[x(n - 1, k - 1)] = 1.0  # the last unit is on the last card: every card used
    integrality = np.zeros(nvar)
    integrality[:nx] = 1
    cost = np.zeros(nvar)
    if objective == "last_card":
        for j in range(k):
            cost[x(n - 1, j)] = float(j)
    else:
        cost[z] = 1.0
    matrix = coo_matrix((data, (row_idx, col_idx)), shape=(len(lower), nvar)).tocsr()
    res = milp(
        cost,
        integrality=integrality,
        bounds=Bounds(lb, ub),
        constraints=LinearConstraint(matrix, np.array(lower), np.array(upper)),
        options={"mip_rel_gap": 0.0, "time_limit": time_limit_s},
    )
    if res.status == 2:  # infeasible
        return None
    if res.status != 0 or res.x is None:
        raise CachefitError(
            f"MILP over {n} units and {k} cards stopped without a proven optimum "
            f"({res.message}); raise time_limit_s (now {time_limit_s} s) or use fewer units"
        )
    sol = np.asarray(res.x[:nx]).reshape(n, k)
    return [int(np.argmax(sol[i])) for i in range(n)]


def _bounds_from_cards(cards: list[int], n: int) -> list[int]:
    bounds = [0]
    for i in range(1, n):
        if cards[i] != cards[i - 1]:
            if cards[i] != cards[i - 1] + 1:
                raise CachefitError(f"MILP solution skips a card between units {i - 1} and {i}: {cards}")
            bounds.append(i)
    bounds.append(n)
    return bounds


def milp_balanced(
    sizes: Sequence[int],
    num_cards: int,
    capacity: int | Sequence[int] | None = None,
    *,
    transient: Any = None,
    objective: str | None = None,
    weights_time: Sequence[float] | None = None,
    exact: bool = False,
    time_limit_s: float = 60.0,
) -> Partition | None:
    """Optimal partition over at most (exactly) K cards by MILP (HiGHS); None if none fits.

    Raises:
        CachefitError: the solver stopped (time limit) before proving an optimum.
    """
    resident, rows = _setup(sizes, transient)
    n = len(resident)
    if num_cards < 1:
        raise ConfigError(f"num_cards must be >= 1, got {num_cards}")
    if objective is None:
        objective = "max_time" if weights_time is not None else "max_part"
    times = None if weights_time is None else [float(t) for t in weights_time]
    k = min(num_cards, n)
    caps = _card_capacities(capacity, k)
    if caps is not None and len(caps) < k:
        raise ConfigError(f"capacity lists {len(caps)} cards, fewer than num_cards = {num_cards}")
    cards = _solve_assignment(
        resident, rows, k, caps, objective=objective, times=times, exact=exact, time_limit_s=time_limit_s
    )
    if cards is None:
        return None
    return _partition_from(resident, rows, _bounds_from_cards(cards, n), caps, objective, times)


def milp_fewest(
    sizes: Sequence[int],
    capacity: int | Sequence[int],
    *,
    transient: Any = None,
    max_cards: int | None = None,
    time_limit_s: float = 60.0,
) -> Partition | None:
    """Fewest cards by MILP (minimize the last unit's card), then the smallest largest part."""
    resident, rows = _setup(sizes, transient)
    n = len(resident)
    limit = n if max_cards is None else min(max_cards, n)
    caps = _card_capacities(capacity, limit)
    assert caps is not None
    k = min(limit, len(caps))
    # Stage 1: cards form a used prefix, so the count is 1 + the card index of the last unit.
    cards = _solve_assignment(
        resident, rows, k, caps[:k], objective="last_card", times=None, exact=False,
        time_limit_s=time_limit_s,
    )
    if cards is None:
        return None
    count = cards[-1] + 1
    # Stage 2: the smallest largest part with exactly that many cards.
    best = milp_balanced(
        resident, count, caps[:count], transient=rows or None, exact=True, time_limit_s=time_limit_s
    )
    if best is None:  # pragma: no cover - the count was just shown feasible
        raise CachefitError("MILP: a feasible card count became infeasible")
    return Partition(
        parts=best.parts,
        part_sizes=best.part_sizes,
        capacities=best.capacities,
        objective="fewest_cards",
    )


__all__ = [
    "brute_force_balanced",
    "brute_force_card_order",
    "brute_force_fewest",
    "milp_balanced",
    "milp_fewest",
]
