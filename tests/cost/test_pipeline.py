"""Pipeline schedule simulation and the cost of whole plans."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachefit.cost import estimate_cost, uniform_layers_plan
from cachefit.cost.pipeline import (
    makespan_s,
    measured_bubble_fraction,
    schedule_bubble_fraction,
    simulate_schedule,
)
from cachefit.errors import ConfigError
from cachefit.hardware import get_device, make_cluster
from cachefit.hardware.devices import DeviceSpec, MemoryLevel
from cachefit.plan.search import plan_partition
from cachefit.plan import Plan, Stage
from cachefit.profile import profile_model
from cachefit.units import Footprint, LayerShape, ModelProfile, Unit, Workload


# ---------------------------------------------------------------------------------------------
# bubbles and the simulated schedule


@pytest.mark.parametrize(("p", "m", "expected"), [(1, 1, 0.0), (4, 1, 3 / 4), (4, 8, 3 / 11), (8, 32, 7 / 39)])
def test_bubble_fraction_formula(p, m, expected):
    # (p - 1) / (m + p - 1), Narayanan et al. 2021 eq. 1
    assert schedule_bubble_fraction(p, m) == pytest.approx(expected)


def test_forward_only_pipeline_takes_m_plus_p_minus_1_stage_times():
    ops = simulate_schedule([1.0] * 4, micro_batches=8)
    # (8 + 4 - 1) x 1 s = 11 s; busy 4 x 8 = 32 stage-seconds of 44: idle 12/44 = 3/11
    assert makespan_s(ops) == pytest.approx(11.0)
    assert measured_bubble_fraction(ops, 4) == pytest.approx(3 / 11)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_train_schedules_take_m_plus_p_minus_1_forward_backward_times(schedule):
    # forward 1 s, backward 2 s, p = 4, m = 8: (8 + 4 - 1) x 3 s = 33 s for GPipe and 1F1B alike
    ops = simulate_schedule([1.0] * 4, backward_s=[2.0] * 4, micro_batches=8, schedule=schedule)
    assert makespan_s(ops) == pytest.approx(33.0)
    assert measured_bubble_fraction(ops, 4) == pytest.approx(3 / 11)


def test_one_f_one_b_keeps_at_most_p_minus_i_micro_batches_in_flight():
    p, m = 4, 8
    ops = simulate_schedule([1.0] * p, backward_s=[2.0] * p, micro_batches=m, schedule="1f1b")
    for i in range(p):
        mine = sorted((op.start_s, op.kind) for op in ops if op.stage == i and op.kind in ("forward", "backward"))
        in_flight = peak = 0
        for _, kind in mine:
            in_flight += 1 if kind == "forward" else -1
            peak = max(peak, in_flight)
        assert peak == min(p - i, m)
    gpipe = simulate_schedule([1.0] * p, backward_s=[2.0] * p, micro_batches=m, schedule="gpipe")
    first = sorted((op.start_s, op.kind) for op in gpipe if op.stage == 0 and op.kind != "send")
    assert [k for _, k in first[:m]] == ["forward"] * m  # GPipe: all forwards first


def test_transfers_add_to_latency_and_a_slow_link_is_the_bottleneck():
    # stage 1 s, link 0.5 s: one micro-batch 1 + 0.5 + 1 = 2.5 s
    assert makespan_s(simulate_schedule([1.0, 1.0], micro_batches=1, transfer_s=[0.5])) == pytest.approx(2.5)
    # link 3 s per transfer, 3 micro-batches: transfers queue on the link: 1 + 3 x 3 + 1 = 11 s
    assert makespan_s(simulate_schedule([1.0, 1.0], micro_batches=3, transfer_s=[3.0])) == pytest.approx(11.0)


def test_bad_schedule_inputs():
    with pytest.raises(ConfigError, match="schedule"):
        simulate_schedule([1.0], micro_batches=1, schedule="zigzag")
    with pytest.raises(ConfigError, match="transfer"):
        simulate_schedule([1.0, 1.0], micro_batches=1, transfer_s=[])
    with pytest.raises(ConfigError, match="micro_batches"):
        simulate_schedule([1.0], micro_batches=0)


@settings(max_examples=60, deadline=None)
@given(
    times=st.lists(st.floats(min_value=0.01, max_value=5.0), min_size=1, max_size=6),
    m=st.integers(min_value=1, max_value=6),
    train=st.booleans(),
    schedule=st.sampled_from(["gpipe", "1f1b"]),
    link=st.floats(min_value=0.0, max_value=2.0),
)
def test_simulated_schedules_respect_dependencies_and_bounds(times, m, train, schedule, link):
    p = len(times)
    bwd = [2 * t for t in times] if train else None
    ops = simulate_schedule(times, micro_batches=m, schedule=schedule, backward_s=bwd, transfer_s=[link] * (p - 1))
    compute = [op for op in ops if op.kind in ("forward", "backward")]
    assert len(compute) == p * m * (2 if train else 1)
    # a stage runs one thing at a time
    for i in range(p):
        mine = sorted((op.start_s, op.end_s) for op in compute if op.stage == i)
        assert all(a[1] <= b[0] + 1e-9 for a, b in zip(mine, mine[1:]))
    end = {(op.kind, op.stage, op.micro_batch): op.end_s for op in compute}
    start = {(op.kind, op.stage, op.micro_batch): op.start_s for op in compute}
    for k in range(m):
        for i in range(1, p):  # forward of stage i after forward of stage i-1 plus the transfer
            assert start[("forward", i, k)] >= end[("forward", i - 1, k)] + link - 1e-9
        if train:
            assert start[("backward", p - 1, k)] >= end[("forward", p - 1, k)] - 1e-9
            for i in range(p - 1):
                assert start[("backward", i, k)] >= end[("backward", i + 1, k)] + link - 1e-9
    per_stage = [t * (3 if train else 1) for t in times]
    span = makespan_s(ops)
    assert span >= m * max(per_stage) - 1e-9  # the slowest stage works m times
    assert span >= sum(per_stage) + (2 if train else 1) * link * (p - 1) - 1e-9  # one micro-batch end to end
    assert 0.0 <= measured_bubble_fraction(ops, p) < 1.0


# ---------------------------------------------------------------------------------------------
# whole plans


HOP_S = 5e-6
"""The toy device's latency of one chip-to-chip message."""


def toy_device() -> DeviceSpec:
    return DeviceSpec(
        name="toy",
        levels=(MemoryLevel(name="sram", capacity_bytes=1000, bandwidth_bytes_per_s=1000.0, source="test"),),
        default_level="sram",
        offchip_capacity_bytes=10**6,
        offchip_bandwidth_bytes_per_s=100.0,
        peak_flops_per_s=(("fp16", 1000.0),),
        link_bandwidth_bytes_per_s=200.0,
        kernel_overhead_s=0.0,  # declared: no per-kernel cost, so the hand calculations stay round
        hop_latency_s=HOP_S,
    )


def toy_plan(micro_batches: int = 1) -> tuple[Plan, ModelProfile]:
    wl = Workload(mode="decode", seq_len=4, batch=1, micro_batches=micro_batches)
    shape = LayerShape(part="layer", hidden_size=8)
    units = tuple(
        Unit(name=f"layers.{i}", kind="layer", footprint=Footprint(weight_bytes=500, activation_bytes=0),
             params=250, flops_per_token=0, shape=shape)
        for i in range(2)
    )
    profile = ModelProfile(model="toy", workload=wl, units=units)
    stages = tuple(
        Stage(card=i, device="toy", level="sram", units=(i, i + 1), unit_names=(f"layers.{i}",),
              footprint=units[i].footprint, capacity_bytes=1000)
        for i in range(2)
    )
    plan = Plan(model="toy", workload=wl.to_dict(), devices=("toy", "toy"), objective="fewest_cards",
                stages=stages, num_units=2)
    return plan, profile


def test_two_stage_plan_by_hand():
    plan, profile = toy_plan()
    cost = estimate_cost(plan, profile, toy_device())
    # each stage reads its 500 B of weights on-chip: 500 / 1,000 B/s = 0.5 s
    assert cost.stage_times_s == (pytest.approx(0.5), pytest.approx(0.5))
    # boundary: 1 token x hidden 8 x 2 B = 16 B over 100 B/s one way = 0.16 s + latency
    assert cost.transfers[0].bytes_per_micro_batch == 16
    transfer = 0.16 + HOP_S
    assert cost.transfers[0].time_s == pytest.approx(transfer)
    assert cost.latency_s == pytest.approx(0.5 + transfer + 0.5)
    # decode with one micro-batch: one token per latency
    assert cost.throughput_tokens_per_s == pytest.approx(1 / (1.0 + transfer))
    assert cost.offchip_bytes_per_token == 0 and cost.load_bytes == 1000
    assert cost.fits_on_chip and cost.possible and cost.complete
    assert cost.bubble_fraction == pytest.approx(1 - 1.0 / (2 * (1.0 + transfer)))
    assert cost.schedule_bubble_fraction == pytest.approx(1 / 2)


def test_decode_throughput_with_enough_micro_batches_reaches_the_bottleneck():
    plan, profile = toy_plan(micro_batches=4)
    cost = estimate_cost(plan, profile, toy_device())
    # cycle = max(latency 1.16 s, 4 x 0.5 s) = 2 s for 4 tokens: 2 tokens/s
    assert cost.throughput_tokens_per_s == pytest.approx(2.0)
    # per step: 0.5 + transfer + 4 x 0.5 (the last stage runs the 4 micro-batches back to back)
    assert cost.step_s == pytest.approx(0.5 + 0.16 + HOP_S + 2.0)


def test_reload_every_step_charges_the_weights_once_per_step():
    plan, profile = toy_plan(micro_batches=2)
    cost = estimate_cost(plan, profile, toy_device(), steps_per_load=1)
    # per step each card reads its 500 B once (250 B per micro-batch): 1,000 B per step of 2 tokens
    assert cost.offchip_bytes_per_step == 1000
    assert cost.offchip_bytes_per_token == pytest.approx(500)


def test_plan_that_does_not_match_the_profile_is_refused():
    plan, profile = toy_plan()
    other = profile_model("gpt2")
    with pytest.raises(ConfigError, match="units"):
        estimate_cost(plan, other, toy_device())
    plan2, profile2 = toy_plan(micro_batches=2)
    with pytest.raises(ConfigError, match="workload"):
        estimate_cost(plan2, profile, toy_device())
    with pytest.raises(ConfigError, match="neither among the devices given nor in the catalog"):
        estimate_cost(plan, profile, None)


def test_paper_plan_that_fits_reads_nothing_off_chip_and_greedy_dram_streams_the_model():
    h100 = get_device("h100")
    profile = profile_model("paper-16l")
    plan, _ = plan_partition(profile, make_cluster(h100), allow=["int8"])
    cost = estimate_cost(plan, profile, h100)
    assert cost.fits_on_chip and cost.offchip_bytes_per_token == 0
    assert cost.pipeline_stages == len({(s.units, s.shard and s.shard[1]) for s in plan.stages})
    # the one-time load is every card's resident weights
    assert cost.load_bytes == sum(s.footprint.weight_bytes for s in plan.stages)
    # decode, batch 1: latency = stage times + transfers
    assert cost.latency_s == pytest.approx(sum(cost.stage_times_s) + sum(t.time_s for t in cost.transfers))
    assert cost.throughput_tokens_per_s == pytest.approx(1 / cost.latency_s)


def test_train_cost_on_gpt2_uses_the_simulated_step():
    wl = Workload(mode="train", seq_len=64, micro_batches=4)
    profile = profile_model("gpt2", wl)
    h100 = get_device("h100")
    plan = uniform_layers_plan(profile, make_cluster(h100), 3)  # 14 units: 5, 5, 4
    for schedule in ("gpipe", "1f1b"):
        cost = estimate_cost(plan, profile, h100, schedule=schedule)
        assert cost.step_s is not None and cost.step_s >= cost.latency_s
        # train throughput: the step's tokens over the step's time
        assert cost.throughput_tokens_per_s == pytest.approx(4 * 64 / cost.step_s)
        assert {op.kind for op in cost.ops} >= {"forward", "backward"}
        assert math.isclose(cost.schedule_bubble_fraction, 2 / 6)


def test_cost_to_dict_is_json_ready():
    import json

    plan, profile = toy_plan()
    doc = estimate_cost(plan, profile, toy_device()).to_dict(with_ops=True)
    text = json.dumps(doc)
    assert '"throughput_tokens_per_s"' in text and doc["ops"]


def test_every_catalog_device_gives_a_finite_time_or_names_what_it_lacks():
    # gpt2 decode on every catalog device, on the fewest cards that hold it on-chip: a prediction is
    # either a positive, finite time, or unknown with the missing figures named, never 0 or infinite
    import math

    from cachefit.cost import cachefit_plan, min_cards_to_fit
    from cachefit.hardware import list_devices, make_cluster

    profile = profile_model("gpt2", Workload(mode="decode", seq_len=128))
    for device in list_devices():
        cluster = make_cluster(device)
        cards = min_cards_to_fit(profile, cluster) or 1
        cost = estimate_cost(cachefit_plan(profile, cluster, cards), profile, device)
        if cost.throughput_tokens_per_s is None:
            assert cost.missing or not cost.possible, device.name
            assert all(m.startswith(device.name + " ") for m in cost.missing), cost.missing
            assert cost.latency_s is None and cost.step_s is None
        else:
            assert not cost.missing and cost.complete, device.name
            assert 0 < cost.latency_s < math.inf and 0 < cost.throughput_tokens_per_s < math.inf, device.name
            assert all(t is not None and t > 0 for t in cost.stage_times_s), device.name
