"""Contiguous partitioning: equal to brute force, valid, monotone, fast, and clear when it fails."""

from __future__ import annotations

import subprocess
import sys
import time
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from cachefit.errors import ConfigError, InfeasiblePlanError
from cachefit.partition.contiguous import (
    InfeasiblePartition,
    Partition,
    balanced,
    choose_card_order,
    fewest_cards,
    footprint_cost_arrays,
)
from cachefit.partition.exact import (
    brute_force_balanced,
    brute_force_card_order,
    brute_force_fewest,
)
from cachefit.units import Footprint, stack_footprints

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---- strategies ------------------------------------------------------------------------------


@st.composite
def instances(draw, max_units: int = 9, transient: bool | None = None):
    """Small instances: sizes, and sometimes one or two rows of transient bytes."""
    n = draw(st.integers(1, max_units))
    sizes = draw(st.lists(st.integers(0, 40), min_size=n, max_size=n))
    with_transient = draw(st.booleans()) if transient is None else transient
    rows = None
    if with_transient:
        count = draw(st.integers(1, 2))
        rows = [draw(st.lists(st.integers(0, 30), min_size=n, max_size=n)) for _ in range(count)]
    return sizes, rows


def reference_cost(sizes, rows, a, b):
    """Independent interval cost: resident bytes add up, each transient row counts its maximum."""
    return sum(sizes[a:b]) + sum(max(r[a:b]) for r in (rows or []))


def assert_valid(part: Partition, sizes, rows, caps=None):
    """Every unit once, in order, contiguous, non-empty parts, each within its card."""
    n = len(sizes)
    assert part.parts[0][0] == 0 and part.parts[-1][1] == n
    for (a, b), (c, _) in zip(part.parts, part.parts[1:]):
        assert b == c
    assert all(b > a for a, b in part.parts)
    covered = [i for a, b in part.parts for i in range(a, b)]
    assert covered == list(range(n))
    assert part.part_sizes == tuple(reference_cost(sizes, rows, a, b) for a, b in part.parts)
    if caps is not None:
        caps = [caps] * part.cards if isinstance(caps, int) else caps
        assert part.capacities == tuple(caps[: part.cards])
        assert all(s <= c for s, c in zip(part.part_sizes, caps))


def max_util(part: Partition) -> Fraction:
    assert part.capacities is not None
    return max(Fraction(s, c) for s, c in zip(part.part_sizes, part.capacities))


# ---- fewest cards ----------------------------------------------------------------------------


@FAST
@given(inst=instances(), capacity=st.integers(1, 120), max_cards=st.none() | st.integers(1, 6))
def test_fewest_cards_equals_brute_force_homogeneous(inst, capacity, max_cards):
    sizes, rows = inst
    ref = brute_force_fewest(sizes, capacity, transient=rows, max_cards=max_cards)
    if ref is None:
        with pytest.raises(InfeasiblePlanError) as info:
            fewest_cards(sizes, capacity, transient=rows, max_cards=max_cards)
        assert isinstance(info.value.report, InfeasiblePartition)
        return
    got = fewest_cards(sizes, capacity, transient=rows, max_cards=max_cards)
    assert_valid(got, sizes, rows, capacity)
    assert (got.cards, got.bottleneck) == (ref.cards, ref.bottleneck)


@FAST
@given(
    inst=instances(max_units=8),
    caps=st.lists(st.integers(1, 90), min_size=1, max_size=7),
    max_cards=st.none() | st.integers(1, 7),
)
def test_fewest_cards_equals_brute_force_heterogeneous(inst, caps, max_cards):
    """Cards in a fixed order; greedy alone can stall on a small card, the sweep must not."""
    sizes, rows = inst
    ref = brute_force_fewest(sizes, caps, transient=rows, max_cards=max_cards)
    if ref is None:
        with pytest.raises(InfeasiblePlanError):
            fewest_cards(sizes, caps, transient=rows, max_cards=max_cards)
        return
    got = fewest_cards(sizes, caps, transient=rows, max_cards=max_cards)
    assert_valid(got, sizes, rows, caps)
    assert (got.cards, got.bottleneck) == (ref.cards, ref.bottleneck)


def test_greedy_stall_needs_the_sweep():
    # Cards 10, 1, 10 and units 5, 1, 5: greedy fills card 0 with 5 + 1 = 6 and then unit 2 (5 B)
    # cannot go on card 1 (1 B). Stopping card 0 after unit 0 fits: 5 | 1 | 5.
    got = fewest_cards([5, 1, 5], [10, 1, 10])
    assert got.parts == ((0, 1), (1, 2), (2, 3))


# ---- balanced ---------------------------------------------------------------------------------


@FAST
@given(
    inst=instances(),
    num_cards=st.integers(1, 6),
    capacity=st.none() | st.integers(1, 150),
    exact=st.booleans(),
)
def test_balanced_equals_brute_force_homogeneous(inst, num_cards, capacity, exact):
    sizes, rows = inst
    ref = brute_force_balanced(sizes, num_cards, capacity=capacity, transient=rows, exact=exact)
    if ref is None:
        with pytest.raises(InfeasiblePlanError):
            balanced(sizes, num_cards, capacity=capacity, transient=rows, exact=exact)
        return
    got = balanced(sizes, num_cards, capacity=capacity, transient=rows, exact=exact)
    assert_valid(got, sizes, rows, capacity)
    assert got.bottleneck == ref.bottleneck
    assert got.cards <= num_cards
    if exact:
        assert got.cards == min(num_cards, len(sizes))


@FAST
@given(
    inst=instances(max_units=8),
    caps=st.lists(st.integers(1, 90), min_size=6, max_size=6),
    num_cards=st.integers(1, 6),
    exact=st.booleans(),
    objective=st.sampled_from(["max_part", "max_utilization"]),
)
def test_balanced_equals_brute_force_heterogeneous(inst, caps, num_cards, exact, objective):
    sizes, rows = inst
    kwargs = dict(capacity=caps, transient=rows, exact=exact, objective=objective)
    ref = brute_force_balanced(sizes, num_cards, **kwargs)
    if ref is None:
        with pytest.raises(InfeasiblePlanError):
            balanced(sizes, num_cards, **kwargs)
        return
    got = balanced(sizes, num_cards, **kwargs)
    assert_valid(got, sizes, rows, caps)
    if objective == "max_part":
        assert got.bottleneck == ref.bottleneck
    else:
        assert max_util(got) == max_util(ref)
    if exact:
        assert got.cards == min(num_cards, len(sizes))


@FAST
@given(
    inst=instances(max_units=8),
    halves=st.data(),
    num_cards=st.integers(1, 5),
    capacity=st.none() | st.integers(20, 150) | st.lists(st.integers(5, 120), min_size=5, max_size=5),
    exact=st.booleans(),
)
def test_time_balancing_equals_brute_force(inst, halves, num_cards, capacity, exact):
    """Time is the objective, memory the constraint; times are multiples of 1/2 (exact floats)."""
    sizes, rows = inst
    times = [t / 2 for t in halves.draw(st.lists(st.integers(0, 20), min_size=len(sizes), max_size=len(sizes)))]
    kwargs = dict(capacity=capacity, transient=rows, weights_time=times, exact=exact)
    ref = brute_force_balanced(sizes, num_cards, **kwargs)
    if ref is None:
        with pytest.raises(InfeasiblePlanError):
            balanced(sizes, num_cards, **kwargs)
        return
    got = balanced(sizes, num_cards, **kwargs)
    assert_valid(got, sizes, rows, capacity)
    assert got.objective == "max_time"
    assert got.part_times == tuple(sum(times[a:b]) for a, b in got.parts)
    assert got.bottleneck_time_s == ref.bottleneck_time_s


def test_time_balancing_with_fractional_times():
    # Stage times 0.1 s ... : the optimum is checked against every cut set.
    sizes = [1] * 8
    times = [0.1, 0.7, 0.2, 0.3, 0.9, 0.05, 0.4, 0.6]
    got = balanced(sizes, 3, weights_time=times)
    ref = brute_force_balanced(sizes, 3, weights_time=times)
    assert got.bottleneck_time_s == pytest.approx(ref.bottleneck_time_s, rel=1e-12)


def test_exact_k_on_equal_cards_keeps_the_at_most_k_optimum():
    # 9 | 1 1 1 1 with K = 3: at most 3 parts reach 9 with two parts (9 | 4); exactly 3 too (9 | 2 | 2).
    sizes = [9, 1, 1, 1, 1]
    at_most = balanced(sizes, 3)
    exactly = balanced(sizes, 3, exact=True)
    assert at_most.bottleneck == exactly.bottleneck == 9
    assert exactly.cards == 3


def test_exact_k_can_cost_more_on_heterogeneous_cards():
    # Units 1, 1, 9, 4 on cards of 30, 4, 30 B. At most 3 parts: 1 1 9 | 4 (the 4 B unit fits
    # card 1) peaks at 11 B. Exactly 3: card 1 holds one unit of <= 4 B and card 2 the rest after
    # it; 1 | 1 | 9 4 peaks at 13 B, the best there is.
    assert balanced([1, 1, 9, 4], 3, capacity=[30, 4, 30]).bottleneck == 11
    exactly = balanced([1, 1, 9, 4], 3, capacity=[30, 4, 30], exact=True)
    assert exactly.parts == ((0, 1), (1, 2), (2, 4)) and exactly.bottleneck == 13
    # Cards 100, 5, 100 and units of 10 B: card 1 can hold none, so exactly 3 parts is impossible.
    with pytest.raises(InfeasiblePlanError) as info:
        balanced([10, 10, 10], 3, capacity=[100, 5, 100], exact=True)
    assert info.value.report.reason == "exact_cards"
    assert "exact=False" in str(info.value)


def test_balanced_ignores_capacity_of_unused_tail_cards():
    # 4 capacities listed, K = 2: only the first two are cards of this plan.
    got = balanced([4, 4, 4, 4], 2, capacity=[8, 8, 1, 1])
    assert got.parts == ((0, 2), (2, 4)) and got.capacities == (8, 8)


# ---- monotonicity -------------------------------------------------------------------------------


@FAST
@given(inst=instances(), data=st.data())
def test_interval_cost_is_monotone_under_inclusion(inst, data):
    """The one property greedy and the binary search rely on."""
    sizes, rows = inst
    n = len(sizes)
    a = data.draw(st.integers(0, n - 1))
    b = data.draw(st.integers(a + 1, n))
    a2 = data.draw(st.integers(0, a))
    b2 = data.draw(st.integers(b, n))
    inner = balanced(sizes[a:b], 1, transient=None if rows is None else [r[a:b] for r in rows])
    outer = balanced(sizes[a2:b2], 1, transient=None if rows is None else [r[a2:b2] for r in rows])
    assert inner.bottleneck <= outer.bottleneck


@FAST
@given(inst=instances(), capacity=st.integers(1, 100), extra=st.integers(1, 60), num_cards=st.integers(1, 5))
def test_more_capacity_never_hurts(inst, capacity, extra, num_cards):
    sizes, rows = inst
    try:
        small = fewest_cards(sizes, capacity, transient=rows)
    except InfeasiblePlanError:
        small = None
    big = None
    try:
        big = fewest_cards(sizes, capacity + extra, transient=rows)
    except InfeasiblePlanError:
        assert small is None  # more capacity cannot make a feasible instance infeasible
    if small is not None:
        assert big is not None and big.cards <= small.cards
    try:
        tight = balanced(sizes, num_cards, capacity=capacity, transient=rows)
    except InfeasiblePlanError:
        return
    loose = balanced(sizes, num_cards, capacity=capacity + extra, transient=rows)
    assert loose.bottleneck <= tight.bottleneck


@FAST
@given(inst=instances(), num_cards=st.integers(1, 6), capacity=st.none() | st.integers(1, 150))
def test_more_cards_never_raise_the_bottleneck(inst, num_cards, capacity):
    sizes, rows = inst
    try:
        fewer = balanced(sizes, num_cards, capacity=capacity, transient=rows)
    except InfeasiblePlanError:
        return
    more = balanced(sizes, num_cards + 1, capacity=capacity, transient=rows)
    assert more.bottleneck <= fewer.bottleneck
    more_exact = balanced(sizes, num_cards + 1, capacity=capacity, transient=rows, exact=True)
    assert more_exact.bottleneck == more.bottleneck  # equal cards: exact K is free


# ---- footprints ---------------------------------------------------------------------------------


footprints = st.builds(
    lambda w, p, t, b: Footprint(weight_bytes=w, activation_bytes=p + t, persistent_activation_bytes=p, buffer_bytes=b),
    st.integers(0, 1000),
    st.integers(0, 300),
    st.integers(0, 500),
    st.integers(0, 200),
)


@FAST
@given(fps=st.lists(footprints, min_size=1, max_size=8), reuse=st.booleans(), num_cards=st.integers(1, 4))
def test_footprint_costs_match_stack_footprints(fps, reuse, num_cards):
    resident, transient = footprint_cost_arrays(fps, reuse=reuse)
    part = balanced(resident, num_cards, transient=transient)
    for (a, b), size in zip(part.parts, part.part_sizes):
        assert size == stack_footprints(fps[a:b], reuse=reuse).total_bytes


# ---- card order ---------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 30), min_size=1, max_size=6),
    caps=st.lists(st.sampled_from([10, 25, 40, 60]), min_size=1, max_size=4),
    num_cards=st.none() | st.integers(1, 4),
    objective=st.sampled_from(["max_part", "max_utilization"]),
)
def test_card_order_equals_brute_force(sizes, caps, num_cards, objective):
    assume(num_cards is None or num_cards <= len(caps))
    ref = brute_force_card_order(sizes, caps, num_cards=num_cards, objective=objective)
    if ref is None:
        with pytest.raises(InfeasiblePlanError):
            choose_card_order(sizes, caps, num_cards=num_cards, objective=objective)
        return
    got = choose_card_order(sizes, caps, num_cards=num_cards, objective=objective)
    assert got.exhaustive
    assert sorted(got.order) == list(range(len(caps)))
    ordered = [caps[i] for i in got.order]
    assert got.partition.capacities == tuple(ordered[: got.partition.cards])
    assert_valid(got.partition, sizes, None, ordered)
    if num_cards is None:
        assert (got.partition.cards, got.partition.bottleneck) == (ref.cards, ref.bottleneck)
    elif objective == "max_part":
        assert got.partition.bottleneck == ref.bottleneck
    else:
        assert max_util(got.partition) == max_util(ref)


def test_card_order_puts_the_big_card_where_the_big_unit_is():
    # A 50 B head at the end: cards 60, 20, 20 in that order need the 60 B card last.
    got = choose_card_order([10, 10, 10, 10, 50], [60, 20, 20])
    assert [([60, 20, 20])[i] for i in got.order] == [20, 20, 60]
    assert got.partition.cards == 3


def test_card_order_heuristic_beyond_max_orders_is_valid():
    rng = np.random.default_rng(3)
    sizes = rng.integers(1, 100, 60).tolist()
    caps = [200, 300, 400, 500, 600, 700, 800, 900]  # 8! = 40320 orders, more than max_orders
    got = choose_card_order(sizes, caps, num_cards=8, max_orders=200)
    assert not got.exhaustive and got.orders_tried <= 200
    assert_valid(got.partition, sizes, None, [caps[i] for i in got.order])
    # never worse than largest-first
    assert got.partition.bottleneck <= balanced(sizes, 8, capacity=sorted(caps, reverse=True)).bottleneck


# ---- errors -------------------------------------------------------------------------------------


def test_unit_larger_than_every_card_names_the_unit_and_the_fix():
    mb = 1_000_000
    with pytest.raises(InfeasiblePlanError) as info:
        fewest_cards([10 * mb, 20 * mb, 5 * mb, 412 * mb, 1 * mb], 50 * mb)
    msg = str(info.value)
    assert "unit 3 (412.0 MB) exceeds every card (largest 50.0 MB)" in msg
    assert "split it over >= 9 cards or compress it" in msg  # ceil(412 / 50) = 9
    report = info.value.report
    assert (report.unit_index, report.unit_bytes, report.shards_needed) == (3, 412 * mb, 9)
    assert info.value.exit_code == 3


def test_too_few_cards_says_how_many_are_needed():
    mb = 1_000_000
    # 7 units of 30 MB on 50 MB cards: one unit per card, so 7 cards; 6 allowed.
    with pytest.raises(InfeasiblePlanError) as info:
        fewest_cards([30 * mb] * 7, 50 * mb, max_cards=6)
    msg = str(info.value)
    assert "need 7 cards of 50.0 MB; 6 given" in msg
    # With 6 cards, the best largest part is 2 x 30 MB = 60 MB: cards of 60 MB would do.
    assert info.value.report.capacity_needed_bytes == 60 * mb
    assert "60.0 MB" in msg
    with pytest.raises(InfeasiblePlanError, match="need 7 cards of 50.0 MB; 6 given"):
        balanced([30 * mb] * 7, 6, capacity=50 * mb)


def test_heterogeneous_order_failure_suggests_reordering():
    with pytest.raises(InfeasiblePlanError) as info:
        fewest_cards([5, 5, 5, 5], [10, 1, 10])
    assert info.value.report.reason == "card_order"
    assert "choose_card_order" in str(info.value)


@pytest.mark.parametrize(
    "call, field",
    [
        (lambda: fewest_cards([], 10), "no units"),
        (lambda: fewest_cards([1, -2, 3], 10), r"sizes\[1\] = -2"),
        (lambda: fewest_cards([1.5, 2], 10), "whole numbers"),
        (lambda: fewest_cards([1, 2], 0), "capacity"),
        (lambda: fewest_cards([1, 2], -5), "capacity"),
        (lambda: fewest_cards([1, 2], [10, 0]), r"capacity\[1\]"),
        (lambda: fewest_cards([1, 2], "50MB"), "parse_bytes"),
        (lambda: fewest_cards([1, 2], 10, max_cards=0), "max_cards"),
        (lambda: fewest_cards([1, 2], 10, transient=[1, 2, 3]), "transient"),
        (lambda: balanced([1, 2], 0), "num_cards"),
        (lambda: balanced([1, 2], True), "num_cards"),
        (lambda: balanced([1, 2], 2, objective="fastest"), "objective"),
        (lambda: balanced([1, 2], 2, objective="max_time"), "weights_time"),
        (lambda: balanced([1, 2], 2, objective="max_utilization"), "capacity per card"),
        (lambda: balanced([1, 2], 3, capacity=[5, 5]), "num_cards is 3"),
        (lambda: balanced([1, 2], 2, weights_time=[1.0]), "weights_time"),
        (lambda: balanced([1, 2], 2, weights_time=[1.0, float("nan")]), r"weights_time\[1\]"),
        (lambda: choose_card_order([1, 2], 10), "one capacity per card"),
        (lambda: Partition(parts=((0, 2), (3, 4)), part_sizes=(1, 1)), "contiguous"),
        (lambda: Partition(parts=((0, 2),), part_sizes=(9,), capacities=(8,)), "offers"),
    ],
)
def test_bad_input_raises_config_error(call, field):
    with pytest.raises(ConfigError, match=field):
        call()


def test_to_dict_matches_the_cli_contract():
    part = fewest_cards([3, 5, 2], 8)
    # 3 + 5 = 8 fits, then 2: two cards; ties: 3 | 5 2 (7) beats 3 5 | 2 (8).
    assert part.to_dict()["parts"] == [[0, 1], [1, 3]]
    out = part.to_dict()
    assert out["part_sizes"] == [3, 7] and out["bottleneck"] == 7 and out["cards"] == 2
    assert part.utilization == (3 / 8, 7 / 8)
    assert part.spread == pytest.approx(0.5)


def test_numpy_inputs_are_accepted():
    sizes = np.array([3, 5, 2, 7], dtype=np.uint32)
    # cuts: 3 | 5 2 7 peaks at 14, 3 5 | 2 7 at 9, 3 5 2 | 7 at 10: the optimum is 9.
    assert balanced(sizes, 2).bottleneck == 9


# ---- scale ---------------------------------------------------------------------------------------


def _greedy_parts(prefix: np.ndarray, bound: int, limit: int) -> int:
    """Independent check: parts greedy needs under ``bound`` (searchsorted on prefix sums)."""
    n = len(prefix) - 1
    start, parts = 0, 0
    while start < n:
        end = int(np.searchsorted(prefix, prefix[start] + bound, side="right")) - 1
        if end == start:
            return limit + 1
        start, parts = end, parts + 1
        if parts > limit:
            return parts
    return parts


@pytest.mark.parametrize("n, k", [(1000, 7), (50_000, 300)])
def test_optimality_certificate_on_larger_instances(n, k):
    """B* is optimal iff K parts suffice under B* and not under B* - 1 (independent greedy)."""
    rng = np.random.default_rng(n)
    sizes = rng.lognormal(10, 2, n).astype(np.int64) + 1
    part = balanced(sizes, k)
    prefix = np.concatenate([[0], np.cumsum(sizes)])
    assert _greedy_parts(prefix, part.bottleneck, k) <= k
    assert _greedy_parts(prefix, part.bottleneck - 1, k) > k
    assert part.part_sizes == tuple(int(prefix[b] - prefix[a]) for a, b in part.parts)


@pytest.mark.slow
def test_a_million_units_on_4096_cards_is_optimal():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 10**8, 1_000_000)
    part = balanced(sizes, 4096)
    prefix = np.concatenate([[0], np.cumsum(sizes)])
    assert part.cards == 4096
    assert _greedy_parts(prefix, part.bottleneck - 1, 4096) > 4096


@pytest.mark.hardware
def test_a_million_units_on_4096_cards_is_fast():
    # about 0.3 s on one 2-core EPYC core; a timing, so kept out of the default run (bench/ has the numbers)
    sizes = np.random.default_rng(0).integers(1, 10**8, 1_000_000)
    start = time.perf_counter()
    balanced(sizes, 4096)
    assert time.perf_counter() - start < 3.0


def test_core_import_pulls_in_neither_torch_nor_scipy():
    code = (
        "import sys, cachefit.partition.contiguous, cachefit.partition.exact;"
        "bad = [m for m in ('torch', 'transformers', 'scipy') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
