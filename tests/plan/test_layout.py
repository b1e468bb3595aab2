"""The partial-fit search stays bounded: its space narrows past a named budget of stage evaluations;
the longest stages from every start, found in one pass, are those grown one unit at a time."""

from hypothesis import given, settings
from hypothesis import strategies as st

from cachefit.plan.layout import PARTIAL_SEARCH_BUDGET, _OrWindow, narrow_partial_search, stage_ends


def test_small_searches_are_exact():
    degrees = tuple(range(1, 9))
    assert narrow_partial_search(20, 64, degrees) == (degrees, None)


def test_large_searches_keep_the_degrees_near_cards_per_unit_and_short_stages():
    # Llama-3.1-405B at block granularity: 254 units on 4,096 cards, about 16 cards a unit
    degrees = tuple(range(1, 129))
    assert 254 * 255 // 2 * len(degrees) > PARTIAL_SEARCH_BUDGET
    kept, longest = narrow_partial_search(254, 4096, degrees)
    assert 1 in kept and 16 in kept and len(kept) <= 9
    assert all(12 <= d <= 21 for d in kept if d != 1)
    assert longest == 2
    # fewer cards than units: longer stages, small degrees
    kept, longest = narrow_partial_search(254, 4, degrees)
    assert set(kept) <= set(range(1, 9)) and longest == 254
    assert 254 * longest * len(kept) < 254 * 255 // 2 * len(degrees)


def _grown_ends(costs, a, n, capacity):
    out = []
    for i in range(a, n):
        resident = peak = 0
        end = i
        for j in range(i, n):
            if costs[j] is None:
                break
            resident += costs[j][0]
            peak = max(peak, costs[j][1])
            if resident + peak > capacity:
                break
            end = j + 1
        out.append(end)
    return out


@settings(max_examples=400, deadline=None)
@given(st.lists(st.none() | st.tuples(st.integers(0, 10), st.integers(0, 10)), max_size=14),
       st.integers(0, 14), st.integers(0, 45))
def test_stage_ends_match_stages_grown_one_unit_at_a_time(costs, a, capacity):
    a = min(a, len(costs))
    assert stage_ends(costs, a, len(costs), capacity) == _grown_ends(costs, a, len(costs), capacity)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 255)), max_size=40), st.data())
def test_or_window_is_the_or_of_the_values_that_reach(steps, data):
    # pushes with ends that never decrease, queries at points that never decrease, interleaved:
    # against the OR of every pushed value whose end reaches the point
    window, pushed, end, j = _OrWindow(), [], 0, 0
    for grow, value in steps:
        if data.draw(st.booleans()):
            end += grow
            window.push(end, value)
            pushed.append((end, value))
        else:
            j += data.draw(st.integers(0, 3))
            expected = 0
            for e, v in pushed:
                if e >= j:
                    expected |= v
            assert window.reaching(j) == expected
