"""Exact references: brute force on hand-worked cases, and the MILP equal to brute force."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cachefit.errors import ConfigError
from cachefit.partition.exact import (
    brute_force_balanced,
    brute_force_card_order,
    brute_force_fewest,
    milp_balanced,
    milp_fewest,
)

pytest.importorskip("scipy")

MILP = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_brute_force_fewest_by_hand():
    # Units 3 5 2 7 1 1 9 on cards of 10: 3+5+2 = 10 | 7+1+1 = 9 | 9: three cards; no two cards
    # hold 28 B. Among three-card splits the largest part cannot go below 10 (28 / 3 > 9).
    part = brute_force_fewest([3, 5, 2, 7, 1, 1, 9], 10)
    assert part is not None and part.cards == 3 and part.bottleneck == 10
    assert brute_force_fewest([3, 5, 2, 7, 1, 1, 9], 10, max_cards=2) is None
    assert brute_force_fewest([11], 10) is None


def test_brute_force_balanced_by_hand():
    # Two parts of 3 5 2 7: 3 | 5 2 7 = 14, 3 5 | 2 7 = 9, 3 5 2 | 7 = 10: optimum 9.
    part = brute_force_balanced([3, 5, 2, 7], 2)
    assert part is not None and part.parts == ((0, 2), (2, 4)) and part.bottleneck == 9
    # Utilization on cards of 10 and 20 B: 3 5 | 2 7 gives 8/10 and 9/20 -> 0.8;
    # 3 | 5 2 7 gives 0.3 and 14/20 = 0.7: better although its largest part is larger.
    util = brute_force_balanced([3, 5, 2, 7], 2, capacity=[10, 20], objective="max_utilization")
    assert util is not None and util.parts == ((0, 1), (1, 4))


def test_brute_force_transient_cost_by_hand():
    # resident 1 2 3, transient 5 0 1: one card holds 1+2+3 + max(5, 0, 1) = 11 B.
    part = brute_force_balanced([1, 2, 3], 1, transient=[5, 0, 1])
    assert part is not None and part.part_sizes == (11,)
    # two rows reused separately: + max(5, 0, 1) + max(0, 7, 0) = 18 B
    part = brute_force_balanced([1, 2, 3], 1, transient=[[5, 0, 1], [0, 7, 0]])
    assert part is not None and part.part_sizes == (18,)


def test_brute_force_card_order_by_hand():
    # A 50 B unit last: the 60 B card must come last; 10 10 | 10 10 | 50 on 20, 20, 60.
    part = brute_force_card_order([10, 10, 10, 10, 50], [60, 20, 20])
    assert part is not None and part.capacities == (20, 20, 60) and part.cards == 3


def test_brute_force_refuses_large_inputs():
    with pytest.raises(ConfigError, match="milp"):
        brute_force_balanced([1] * 17, 2)


@st.composite
def small(draw):
    n = draw(st.integers(1, 7))
    sizes = draw(st.lists(st.integers(0, 30), min_size=n, max_size=n))
    rows = None
    if draw(st.booleans()):
        rows = [draw(st.lists(st.integers(0, 20), min_size=n, max_size=n))]
    return sizes, rows


@MILP
@given(
    inst=small(),
    num_cards=st.integers(1, 4),
    capacity=st.none() | st.integers(10, 80) | st.lists(st.integers(5, 80), min_size=4, max_size=4),
    exact=st.booleans(),
)
def test_milp_balanced_equals_brute_force(inst, num_cards, capacity, exact):
    sizes, rows = inst
    ref = brute_force_balanced(sizes, num_cards, capacity=capacity, transient=rows, exact=exact)
    got = milp_balanced(sizes, num_cards, capacity, transient=rows, exact=exact)
    assert (got is None) == (ref is None)
    if ref is not None:
        assert got.bottleneck == ref.bottleneck
        if exact:
            assert got.cards == min(num_cards, len(sizes))


@MILP
@given(inst=small(), caps=st.lists(st.integers(5, 80), min_size=3, max_size=3), num_cards=st.integers(1, 3))
def test_milp_utilization_equals_brute_force(inst, caps, num_cards):
    sizes, rows = inst
    ref = brute_force_balanced(sizes, num_cards, capacity=caps, transient=rows, objective="max_utilization")
    got = milp_balanced(sizes, num_cards, caps, transient=rows, objective="max_utilization")
    assert (got is None) == (ref is None)
    if ref is not None:

        def util(p):
            return max(Fraction(s, c) for s, c in zip(p.part_sizes, p.capacities))

        assert util(got) == util(ref)


@MILP
@given(inst=small(), capacity=st.integers(10, 80) | st.lists(st.integers(5, 80), min_size=1, max_size=5))
def test_milp_fewest_equals_brute_force(inst, capacity):
    sizes, rows = inst
    ref = brute_force_fewest(sizes, capacity, transient=rows)
    got = milp_fewest(sizes, capacity, transient=rows)
    assert (got is None) == (ref is None)
    if ref is not None:
        assert (got.cards, got.bottleneck) == (ref.cards, ref.bottleneck)


def test_milp_time_objective_by_hand():
    # Times 1 1 1 1 1 1 1.5 s over 3 cards. Below 3 s the last card holds at most 1 + 1.5 = 2.5 s,
    # leaving five 1 s units for two cards, one of which then takes 3 s: the optimum is 3.0 s.
    times = [1, 1, 1, 1, 1, 1, 1.5]
    part = milp_balanced([1] * 7, 3, 20, weights_time=times)
    assert part is not None and part.bottleneck_time_s == 3.0
    assert brute_force_balanced([1] * 7, 3, weights_time=times).bottleneck_time_s == 3.0


def test_milp_large_byte_counts_stay_exact():
    # 40 MB-scale units: the MILP scales bytes by a power of two and recomputes parts exactly.
    mb = 1_000_000
    sizes = [37 * mb + 1, 12 * mb, 29 * mb + 7, 41 * mb, 8 * mb, 33 * mb + 3]
    got = milp_balanced(sizes, 3, 80 * mb)
    ref = brute_force_balanced(sizes, 3, capacity=80 * mb)
    assert got is not None and ref is not None and got.bottleneck == ref.bottleneck
