"""The fit checked when a plan runs: each stage's measured peak beside the plan's bytes and its card's capacity."""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch")

from tiny_models import WORKLOAD, make_plan, model_dirs  # noqa: F401  (model_dirs: the fixture)

from cachefit.deploy.memory import LivePeak, weight_bytes
from cachefit.deploy.runtime import NodeConfig, RunConfig, launch
from cachefit.deploy.verify import check_run


def test_live_peak_counts_what_is_alive_at_once_and_not_the_weights():
    # independent count: a (4 kB, from outside) is read; b and c are made; b is dropped before d is made
    lin = torch.nn.Linear(1000, 1, bias=False)  # 4 kB of weights, not counted
    a = torch.ones(1000)
    with LivePeak(lin) as probe:
        b = a * 2
        c = b + 1
        del b
        d = c * 3
        e = lin(d)
    assert probe.peak_bytes == 3 * 4000 + 4  # a, c, d alive at once, then lin's 4-byte output
    assert e.shape == (1,)
    assert weight_bytes(lin) == 4000


@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_each_stage_reports_its_measured_peak_beside_the_plan(model_dirs, mode):
    plan = make_plan(model_dirs["llama"], "400KB")
    extra = {"new_tokens": 3, "kv_cache": "static"} if mode == "decode" else {}
    ids = torch.randint(0, 128, (4, 5 if mode == "decode" else 8), generator=torch.Generator().manual_seed(1))
    result = launch(model_dirs["llama"], plan, nodes=NodeConfig(nproc_per_node=2), launcher="fork", input_ids=ids,
                    config=RunConfig(micro_batches=2, mode=mode, **extra))
    for stage, planned in zip(result.report["stages"], plan.stages):
        assert stage["planned_total_bytes"] == planned.footprint.total_bytes
        assert stage["capacity_bytes"] == planned.capacity_bytes
        # weights as allocated (the plan's bytes plus the rotary table's buffer) and some activations on top
        assert stage["measured_weight_bytes_allocated"] >= stage["planned_weight_bytes"]
        assert stage["measured_peak_bytes"] > stage["measured_weight_bytes_allocated"]
        # the plan's bytes are an upper bound of what the stage really holds (its rotary table's 64 B aside)
        assert stage["measured_peak_bytes"] <= stage["planned_total_bytes"] + 64
        assert stage["over_capacity"] is False
    assert result.report["fit"]["over_capacity"] == []


@pytest.mark.multiprocess
def test_a_stage_over_its_capacity_is_named_and_fails_the_check(model_dirs, monkeypatch):
    # a stage that holds more than its plan says (here: 300 kB of weights more than allocated, through the
    # function every stage's weights are counted by; the forked ranks inherit the patch) is named, and fails
    # --check although its outputs are right
    from cachefit.deploy import memory

    counted = memory.weight_bytes
    monkeypatch.setattr(memory, "weight_bytes", lambda module: counted(module) + 300_000)
    plan = make_plan(model_dirs["llama"], "400KB")
    result = launch(model_dirs["llama"], plan, nodes=NodeConfig(nproc_per_node=2), launcher="fork",
                    config=RunConfig(micro_batches=2))
    over = result.report["fit"]["over_capacity"]
    assert result.report["fit"]["checked"] is True
    assert over == ["stage 0 (card 0: embed..layers.1)", "stage 1 (card 1: layers.2..head)"]
    verdict = check_run(result, model_dirs["llama"], mode="prefill", micro_batches=2)
    assert not verdict.passed
    assert all(c.max_rel_error <= verdict.tolerance for c in verdict.comparisons)  # the outputs themselves are right
    assert "exceeds its card's capacity" in verdict.describe() and verdict.to_dict()["over_capacity"] == over


@pytest.mark.multiprocess
def test_a_run_that_is_not_the_plans_workload_reports_its_bytes_without_failing(model_dirs):
    # planned for bf16 weights, run in fp32: twice the planned weight bytes, which the plan never claimed fit
    bf16 = dataclasses.replace(WORKLOAD, weight_dtype="bf16", act_dtype="bf16")
    plan = make_plan(model_dirs["llama"], "250KB", workload=bf16)
    doubled = [st for st in plan.stages if 2 * st.footprint.weight_bytes > st.capacity_bytes]
    assert doubled
    result = launch(model_dirs["llama"], plan, nodes=NodeConfig(nproc_per_node=plan.cards), launcher="fork",
                    config=RunConfig(micro_batches=2, dtype="fp32"))
    fit = result.report["fit"]
    assert fit["over_capacity"] and fit["checked"] is False and "--dtype fp32 on a bf16 plan" in fit["not_checked_because"]
    assert check_run(result, model_dirs["llama"], mode="prefill", micro_batches=2).passed


@pytest.mark.multiprocess
def test_a_plan_from_measured_bytes_runs_and_its_fit_is_checked(model_dirs):
    # `plan --measure`: the bytes of transformers' own forward on fake tensors; deploy re-measures to match it
    from cachefit.hardware.devices import device_from_capacity, make_cluster
    from cachefit.plan.search import plan_partition
    from cachefit.profile import profile_model

    profile = profile_model(model_dirs["llama"], WORKLOAD, measure=True)
    plan, _ = plan_partition(profile, make_cluster(device_from_capacity("400KB")))
    assert plan.memory_source == "measured" and plan.cards == 2
    result = launch(model_dirs["llama"], plan, nodes=NodeConfig(nproc_per_node=2), launcher="fork",
                    config=RunConfig(micro_batches=2))
    assert result.report["fit"]["checked"] is True and result.report["fit"]["over_capacity"] == []
    assert check_run(result, model_dirs["llama"], mode="prefill", micro_batches=2).passed
