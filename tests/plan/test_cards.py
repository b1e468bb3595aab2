"""Plans on exactly K cards, for any K: splits where K exceeds the units, partial fits where K is too few.

The properties on small instances, and the brute force the partial fit is checked against: every
layout the planner's space can express (contiguous stages, each on s cards from the split degrees,
the degrees adding up to K) with its off-chip bytes per micro-batch by the one rule
(:func:`cachefit.plan.offchip.offchip_split`).
"""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cachefit.compress.techniques import CompressionConfig
from cachefit.cost import compare_layouts, estimate_cost, layout_pricing
from cachefit.hardware import device_from_capacity, get_device, make_cluster
from cachefit.plan import Plan
from cachefit.plan.layout import ShardTable, degrees_for
from cachefit.plan.offchip import StageBytes, offchip_split
from cachefit.plan.search import plan_partition
from cachefit.profile import profile_model
from cachefit.units import Workload, stack_footprints

WL = Workload(batch=1, seq_len=64, mode="decode")

# A small Llama: embed, 2 layers, head (4 units); hidden 64, 4 heads / 2 KV heads, MLP 128, vocab 256.
TINY = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
    "max_position_embeddings": 128, "tie_word_embeddings": False, "rms_norm_eps": 1e-5,
}

# Llama-3.2-1B as its config.json has it (hidden 2048, 16 layers, vocabulary 128,256, tied embeddings)
LLAMA_32_1B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
    "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
    "vocab_size": 128256, "tie_word_embeddings": True, "max_position_embeddings": 131072,
    "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "hidden_act": "silu", "torch_dtype": "bfloat16",
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}

H100 = make_cluster(get_device("h100"))


@pytest.fixture(scope="module")
def tiny():
    return profile_model(TINY, WL)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama") / "config.json"
    path.write_text(json.dumps(LLAMA_32_1B))
    return path, profile_model(str(path), Workload(batch=1, seq_len=1024, mode="decode"))


def _cards(capacity: int):
    # the H100's figures (off-chip memory to stream from) with another on-chip capacity
    return make_cluster(device_from_capacity(capacity, level="l2", base=get_device("h100")))


def _offchip(plan: Plan, profile) -> int:
    """Off-chip bytes of one micro-batch, all cards: the cost model's figure."""
    cost = estimate_cost(plan, profile, _cards(plan.stages[0].capacity_bytes))
    return round(cost.offchip_bytes_per_token * cost.tokens_per_micro_batch)


def _brute_partial(profile, capacity: int, k: int) -> int | None:
    """The fewest off-chip bytes per micro-batch of any layout the planner's space expresses on k cards."""
    table = ShardTable(profile, (), CompressionConfig(), profile.units)
    degrees = degrees_for(profile.units, k)
    n = len(profile.units)
    tokens = profile.workload.tokens
    best = None
    for cut_count in range(n):
        for cuts in itertools.combinations(range(1, n), cut_count):
            bounds = (0, *cuts, n)
            spans = list(zip(bounds, bounds[1:]))
            for shards in itertools.product(degrees, repeat=len(spans)):
                if sum(shards) != k:
                    continue
                total = 0
                for (a, b), s in zip(spans, shards):
                    got = [table.get(i, s) for i in range(a, b)]
                    if any(g is None for g in got):
                        break
                    units = [g[0] for g in got]
                    fp = stack_footprints(u.footprint for u in units)
                    split = offchip_split(StageBytes.of(fp, units, tokens), capacity, profile.workload)
                    total += s * split.offchip_bytes_per_micro_batch
                else:
                    best = total if best is None else min(best, total)
    return best


def _check_covers(plan: Plan, n: int) -> None:
    """Every unit once, in order; a split stage's shards side by side."""
    expected = 0
    for stage in plan.stages:
        start, end = stage.units
        if stage.shard is None or stage.shard[0] == 0:
            assert start == expected
            expected = end
        else:
            assert stage.shard[0] < stage.shard[1]
    assert expected == n


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(k=st.integers(1, 9), capacity=st.integers(20_000, 400_000))
def test_any_k_uses_exactly_k_cards_and_covers_every_unit_once(tiny, k, capacity):
    plan, _ = plan_partition(tiny, _cards(capacity), num_cards=k)
    assert plan.cards == k
    _check_covers(plan, len(tiny.units))
    assert plan.feasible == all(s.total_bytes <= s.capacity_bytes for s in plan.stages)
    assert all(s.overflow_bytes == max(0, s.total_bytes - s.capacity_bytes) for s in plan.stages)
    if not plan.feasible:
        assert plan.objective == "fewest_offchip_bytes"
        assert plan.cards_to_fit is None or plan.cards_to_fit > k or plan.cards_to_fit == 0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(k=st.integers(1, 6), capacity=st.integers(20_000, 200_000))
def test_partial_fit_has_the_fewest_offchip_bytes_of_the_space(tiny, k, capacity):
    plan, _ = plan_partition(tiny, _cards(capacity), num_cards=k)
    want = _brute_partial(tiny, capacity, k)
    assert want is not None
    if plan.feasible:
        assert want == 0  # a fit exists exactly when the brute force streams nothing
    else:
        assert want > 0 or plan.cards_to_fit is not None
        assert _offchip(plan, tiny) == want


def test_feasible_exactly_when_a_fitting_layout_exists(tiny):
    for capacity in (30_000, 60_000, 90_000, 150_000, 400_000):
        for k in range(1, 7):
            plan, _ = plan_partition(tiny, _cards(capacity), num_cards=k)
            assert plan.feasible == (_brute_partial(tiny, capacity, k) == 0), (capacity, k)


@pytest.mark.parametrize("k", [4, 18, 63, 70])
def test_llama_32_1b_plans_on_exactly_k_cards(llama, k):
    _, prof = llama
    plan, _ = plan_partition(prof, H100, num_cards=k)
    assert plan.cards == k
    _check_covers(plan, len(prof.units))
    fewest, _ = plan_partition(prof, H100)
    assert plan.feasible == (k >= fewest.cards)
    if not plan.feasible:
        assert plan.cards_to_fit == fewest.cards
        doc = plan.to_dict()
        assert doc["feasible"] is False and doc["cards_to_fit"] == fewest.cards
        assert all("overflow_bytes" in s and "onchip_bytes" in s for s in doc["stages"])
        assert sum(s["overflow_bytes"] for s in doc["stages"]) > 0


@pytest.mark.parametrize("model, k", [("paper-16l", 64), ("llama", 24)])
def test_compare_cachefit_uses_every_card_and_beats_every_baseline(llama, model, k):
    prof = llama[1] if model == "llama" else profile_model("paper-16l")
    comp = compare_layouts(prof, H100, k)
    own = comp.layout("cachefit")
    assert own.cards == k
    others = [x for x in comp.layouts if x.name != "cachefit" and x.cost is not None]
    assert others
    for other in others:
        assert own.cost.offchip_bytes_per_token <= other.cost.offchip_bytes_per_token, other.name
        assert own.cost.throughput_tokens_per_s >= other.cost.throughput_tokens_per_s, other.name


def test_plan_with_pricing_is_the_compare_layout(llama):
    _, prof = llama
    pricing = layout_pricing(prof, H100, 24)
    plan, _ = plan_partition(prof, H100, num_cards=24, pricing=pricing)
    own = compare_layouts(prof, H100, 24).layout("cachefit").plan
    assert [s.to_dict() for s in plan.stages] == [s.to_dict() for s in own.stages]


def test_partial_plan_round_trips_through_json(llama):
    _, prof = llama
    plan, _ = plan_partition(prof, H100, num_cards=4)
    back = Plan.from_dict(json.loads(plan.to_json()))
    assert back.to_dict() == plan.to_dict()


def test_compress_roles_reach_head_and_embedding(llama):
    _, prof = llama
    config = CompressionConfig(quantize_roles=("qkv", "attn_out", "mlp", "experts", "head", "embed"))
    plain, _ = plan_partition(prof, H100, num_cards=8, allow="int8")
    both, _ = plan_partition(prof, H100, num_cards=8, allow="int8", config=config)
    assert plain.compress_roles == () and both.compress_roles == ("head", "embed")
    names = {n for s in both.stages for n, t in zip(s.unit_names, s.unit_compression) if t}
    assert "head" in names  # quantized only with the opt-in
    assert "head" not in {n for s in plain.stages for n, t in zip(s.unit_names, s.unit_compression) if t}
    assert both.to_dict()["compress_roles"] == ["head", "embed"]


def test_candidates_read_the_plans_stages():
    # Regression: the candidate was measured before compression was undone where not needed, so
    # int8 on 10 cards said 436.5 MB / 82.0% in the table and 480.5 MB / 86.1% in the plan.
    paper = profile_model("paper-16l")
    plan, tried = plan_partition(paper, make_cluster(device_from_capacity("490MB")), num_cards=10, allow="int8")
    chosen = next(c for c in tried if c.cards is not None)
    assert chosen.techniques == ("int8",)
    assert (chosen.cards, chosen.bottleneck_bytes) == (plan.cards, plan.bottleneck_bytes)
    assert chosen.mean_utilization == pytest.approx(plan.mean_utilization)
    compressed = sum(1 for s in plan.stages for t in s.unit_compression if t)
    assert chosen.compressed_units == compressed < len(paper.units)
