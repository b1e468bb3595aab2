"""Cache-oblivious baselines beside cachefit's plan on the same cards."""

import dataclasses

import pytest

from cachefit.cost import (
    cachefit_plan,
    compare_layouts,
    greedy_dram_plan,
    min_cards_to_fit,
    tensor_parallel_plan,
    uniform_layers_plan,
)
from cachefit.errors import ConfigError
from cachefit.hardware import get_device, make_cluster
from cachefit.hardware.devices import device_from_capacity
from cachefit.profile import profile_model

H100 = make_cluster(get_device("h100"))

# paper-16l, decode batch 1, 1024 tokens, fp16 (profile figures):
EMBED_W = 262_144_000  # 32,000 x 4,096 x 2 B
LAYER_W = 402_669_568  # 4 x 4096^2 + 2 x 4096 x 16384 matrices x 2 B, plus norms
HEAD_W = 262_152_192  # 32,000 x 4,096 x 2 B + the final norm


@pytest.fixture(scope="module")
def paper():
    return profile_model("paper-16l")


def test_paper_weights_are_what_these_tests_assume(paper):
    assert paper.units[0].footprint.weight_bytes == EMBED_W
    assert all(u.footprint.weight_bytes == LAYER_W for u in paper.units[1:-1])
    assert paper.units[-1].footprint.weight_bytes == HEAD_W
    assert len(paper.units) == 18


def test_uniform_layers_puts_the_same_number_of_units_on_every_card(paper):
    plan = uniform_layers_plan(paper, H100, 4)
    # 18 units over 4 cards: 5, 5, 4, 4
    assert [s.units for s in plan.stages] == [(0, 5), (5, 10), (10, 14), (14, 18)]
    assert plan.cards == 4 and not plan.feasible
    more = uniform_layers_plan(paper, H100, 20)
    assert more.cards == 18 and any("idle" in n for n in more.notes)


def test_greedy_dram_fills_each_cards_dram_in_order(paper):
    # 80 GB of HBM per H100 holds all 7.1 GB of weights: everything lands on card 0
    plan = greedy_dram_plan(paper, H100, 4)
    assert [s.units for s in plan.stages] == [(0, 18)]
    # with 1 GB of DRAM: card 0 takes embed + layers.0 (664.8 MB; + layers.1 would be 1,067.5 MB),
    # then two layers a card (805.3 MB; a third is 1,208 MB), and the head joins the last layer
    # (402.7 + 262.2 = 664.8 MB)
    small = dataclasses.replace(get_device("h100"), name="h100-1gb", figures=(), offchip_capacity_bytes=10**9)
    plan = greedy_dram_plan(paper, make_cluster(small), 16)
    assert [s.units for s in plan.stages] == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 12), (12, 14),
                                              (14, 16), (16, 18)]
    with pytest.raises(ConfigError, match="offload"):
        greedy_dram_plan(paper, make_cluster(small), 4)
    with pytest.raises(ConfigError, match="no off-chip memory"):
        greedy_dram_plan(paper, make_cluster(get_device("groq-lpu")), 4)


def test_tensor_parallel_splits_every_unit_over_all_cards(paper):
    plan = tensor_parallel_plan(paper, H100, 2)
    assert plan.cards == 2
    assert all(s.units == (0, 18) and s.shard == (i, 2) for i, s in enumerate(plan.stages))
    # collectives per token, 2 cards (ring factors 2(s-1)/s = 1 for all-reduce, (s-1)/s = 1/2 for
    # all-gather), fp16: embedding all-reduce 4096 x 2 = 8,192 B; each layer 2 all-reduces
    # 2 x 8,192 = 16,384 B; the head all-gathers its logits 1/2 x 32,000 x 2 = 32,000 B
    assert plan.stages[0].collective_bytes_per_token == 8_192 + 16 * 16_384 + 32_000
    # each card holds about half the weights
    total = EMBED_W + 16 * LAYER_W + HEAD_W
    assert abs(plan.stages[0].footprint.weight_bytes / total - 0.5) < 0.001


def test_cachefit_on_too_few_cards_is_its_best_partial_fit(paper):
    # Was: the balanced contiguous partition with capacity ignored, whatever it streamed. The partial
    # fit is now the planner's: exactly 4 cards, the fewest off-chip bytes, priced beside the baselines.
    plan = cachefit_plan(paper, H100, 4)
    assert plan.cards == 4 and not plan.feasible
    assert plan.objective == "fewest_offchip_bytes"
    assert any("DOES NOT FIT" in n for n in plan.notes)
    assert plan.cards_to_fit == 154
    assert sum(s.overflow_bytes for s in plan.stages) > 0


def test_cachefit_on_cards_without_offchip_memory_falls_back_to_a_layout_that_cannot_run():
    gpt2 = profile_model("gpt2")
    tiny = make_cluster(device_from_capacity("20MB", level="sram"))  # no off-chip memory to stream from
    plan = cachefit_plan(gpt2, tiny, 2)
    assert plan.objective == "balanced_ignoring_capacity" and not plan.feasible
    assert any("cannot run" in n for n in plan.notes)


def test_min_cards_to_fit_matches_the_planner(paper):
    # the seed's model needs 154 H100 L2s uncompressed and 82 with int8 (FINDINGS / cachefit paper)
    assert min_cards_to_fit(paper, H100) == 154
    assert min_cards_to_fit(paper, H100, allow=["int8"]) == 82


def test_comparison_on_too_few_cards_streams_and_on_enough_cards_fits(paper):
    few = compare_layouts(paper, H100, 4)
    assert [x.name for x in few.layouts] == ["cachefit", "uniform-layers", "greedy-dram", "tensor-parallel"]
    own = few.layout("cachefit")
    assert not own.fits_on_chip and own.cost.offchip_bytes_per_token > 0
    assert few.min_cards_to_fit == 154
    enough = compare_layouts(paper, H100, 82, ["int8"])
    own = enough.layout("cachefit")
    assert own.fits_on_chip and own.cost.offchip_bytes_per_token == 0
    greedy = enough.layout("greedy-dram")
    # greedy-dram streams nearly the whole model per token: every weight beyond the 52.4 MB L2,
    # except the embedding table, of which one 8,192 B row is read
    assert greedy.cards == 1
    stage = greedy.plan.stages[0]
    overflow = stage.total_bytes - stage.capacity_bytes
    assert greedy.cost.offchip_bytes_per_token == pytest.approx(overflow - EMBED_W + 8_192, rel=1e-6)
    assert own.cost.throughput_tokens_per_s > greedy.cost.throughput_tokens_per_s


def test_comparison_json_has_the_contract_keys(paper):
    doc = compare_layouts(paper, H100, 4).to_dict()
    keys = {"name", "cards", "offchip_bytes_per_token", "throughput_tokens_per_s", "latency_s", "mean_utilization"}
    assert all(keys <= set(item) for item in doc["layouts"])
    assert doc["layouts"][0]["name"] == "cachefit"


def test_sram_only_device_skips_the_dram_baseline():
    gpt2 = profile_model("gpt2")
    comp = compare_layouts(gpt2, make_cluster(get_device("groq-lpu")), 2)
    greedy = comp.layout("greedy-dram")
    assert greedy.plan is None and "no off-chip memory" in greedy.skipped
    assert comp.layout("cachefit").fits_on_chip


def test_cluster_of_another_size_is_refused(paper):
    two = make_cluster(get_device("h100"), count=2)
    with pytest.raises(ConfigError, match="2 cards"):
        compare_layouts(paper, two, 4)
