"""The cost model's decode prediction with groups in flight: what ``cachefit run`` reports beside its measurement."""

from __future__ import annotations

import pytest

from cachefit.cost import estimate_cost
from cachefit.cost.decode import predict_decode
from cachefit.hardware.devices import get_device, make_cluster
from cachefit.plan.search import plan_partition
from cachefit.profile import profile_model
from cachefit.units import Workload


def _decode_plan(groups: int, cards: int):
    wl = Workload(batch=2, seq_len=1024, mode="decode", weight_dtype="fp16", act_dtype="fp16", micro_batches=groups)
    profile = profile_model("llama-3.1-8b", wl)
    plan, _ = plan_partition(profile, make_cluster(get_device("h100")), num_cards=cards)
    return plan, profile


@pytest.mark.parametrize("cards", [4, 8])
def test_groups_in_flight_fill_the_pipeline_as_the_cycle_says(cards):
    one = None
    plan, profile = _decode_plan(8, cards)  # one plan (its cards hold 8 groups' KV caches), priced with m groups
    for m in (1, 2, 4, 8):
        cost = estimate_cost(plan, profile, micro_batches=m)
        p = predict_decode(cost)
        assert p is not None and p.micro_batches == m
        times = p.stage_times_s
        # a cycle: at least one group's pass through every stage, and at least m x the slowest stage
        assert p.token_interval_s >= p.latency_s * (1 - 1e-12)
        assert p.token_interval_s >= m * max(times) * (1 - 1e-12)
        assert p.tokens_per_s == pytest.approx(m * cost.tokens_per_micro_batch / p.token_interval_s)
        assert p.busy_fractions == pytest.approx(tuple(m * t / p.token_interval_s for t in times))
        assert all(0 < b <= 1 for b in p.busy_fractions)
        if m == 1:
            one = p
            # one group: a stage works only while the group is on it
            assert sum(times) <= p.latency_s * (1 + 1e-12)
        else:
            # more groups never lower throughput, and cannot beat m x one group's, nor one token per slowest stage
            assert one is not None
            assert p.tokens_per_s >= one.tokens_per_s * (1 - 1e-9)
            assert p.tokens_per_s <= m * one.tokens_per_s * (1 + 1e-9)
            assert p.tokens_per_s <= cost.tokens_per_micro_batch / max(times) * (1 + 1e-9)


def test_prediction_needs_a_decode_cost_and_known_times():
    wl = Workload(batch=1, seq_len=16, mode="prefill", weight_dtype="fp16", act_dtype="fp16")
    profile = profile_model("llama-3.1-8b", wl)
    plan, _ = plan_partition(profile, make_cluster(get_device("h100")))
    with pytest.raises(ValueError, match="decode"):
        predict_decode(estimate_cost(plan, profile))
    # a device with a figure missing: no prediction rather than a number from an unknown
    from cachefit.hardware.catalog import device_from_capacity

    dwl = Workload(batch=1, seq_len=64, mode="decode", weight_dtype="fp16", act_dtype="fp16")
    dprofile = profile_model("gpt2", dwl)
    bare = device_from_capacity("1GB", name="bare")
    dplan, _ = plan_partition(dprofile, make_cluster(bare))
    assert predict_decode(estimate_cost(dplan, dprofile, bare)) is None
