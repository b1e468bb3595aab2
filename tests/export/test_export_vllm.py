"""vLLM launch: ``VLLM_PP_LAYER_PARTITION`` read back by vLLM's documented rule puts every layer on its
planned rank; refusals name the nearest launch vLLM runs. vLLM itself is not installed here (its wheel
pins its own torch and CUDA libraries), so the rule is re-implemented from its source."""

import argparse
import shlex
from dataclasses import replace

import pytest
from conftest import plan_of, profile_of, split_over
from hypothesis import given, settings
from hypothesis import strategies as st

from cachefit.errors import ConfigError
from cachefit.export import to_vllm
from cachefit.export.layer_split import LayerSplit
from cachefit.export.vllm import layer_partition, vllm_tp_refusal
from cachefit.units import LayerShape


def get_pp_indices(partition: str, num_hidden_layers: int, pp_rank: int, pp_size: int) -> tuple[int, int]:
    """vLLM's ``get_pp_indices`` (``vllm/distributed/utils.py``) with ``VLLM_PP_LAYER_PARTITION`` set:
    ``int()`` of each comma-separated item; as many items as ranks, summing to the layers, else
    ``ValueError``; rank r builds ``[sum(items[:r]), sum(items[:r + 1]))``."""
    try:
        partitions = [int(layer) for layer in partition.split(",")]
    except ValueError as err:
        raise ValueError(f"Invalid partition string: {partition}") from err
    if len(partitions) != pp_size:
        raise ValueError(f"{len(partitions)=} does not match {pp_size=}.")
    if sum(partitions) != num_hidden_layers:
        raise ValueError(f"{sum(partitions)=} does not match {num_hidden_layers=}.")
    start = sum(partitions[:pp_rank])
    return start, start + partitions[pp_rank]


def read_launch(line: str) -> tuple[str, argparse.Namespace]:
    """The partition and the parallel sizes of ``VLLM_PP_LAYER_PARTITION=... vllm serve MODEL ...``."""
    words = shlex.split(line)
    env, rest = words[0], words[1:]
    name, _, value = env.partition("=")
    assert name == "VLLM_PP_LAYER_PARTITION" and rest[:3] == ["vllm", "serve", "MODEL"]
    parser = argparse.ArgumentParser()
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    parser.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    return value, parser.parse_args(rest[3:])


def _planned_layer_ranges(plan, profile):
    ranges, start = [], 0
    for stage in plan.stages:
        if stage.shard is not None and stage.shard[0] > 0:
            continue
        n = sum(1 for i in range(*stage.units) if profile.units[i].layer is not None)
        ranges.append((start, start + n))
        start += n
    return ranges


@pytest.mark.parametrize("name", ["llama", "gpt2", "llama-tied"])
@pytest.mark.parametrize("num_cards", [1, 2, 3, 4, 5, 6])
def test_every_rank_builds_its_planned_layers(name, num_cards):
    profile = profile_of(name, "layer")
    plan = plan_of(profile, num_cards)
    export = to_vllm(plan, profile)
    partition, args = read_launch(export.text.splitlines()[0])
    assert args.pipeline_parallel_size == num_cards and args.tensor_parallel_size == 1
    assert partition == export.document["env"]["VLLM_PP_LAYER_PARTITION"]
    ranks = [get_pp_indices(partition, 4, r, args.pipeline_parallel_size) for r in range(num_cards)]
    assert ranks == _planned_layer_ranges(plan, profile)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=200), min_size=1, max_size=64))
def test_any_layer_counts_round_trip(counts):
    split = LayerSplit(num_layers=sum(counts), layers_per_stage=tuple(counts), tensor_parallel=1,
                       planned_tensor_parallel=1, stage_units=(), stage_cards=())
    value = layer_partition(split)
    starts = [get_pp_indices(value, sum(counts), r, len(counts))[0] for r in range(len(counts))]
    assert starts == [sum(counts[:r]) for r in range(len(counts))]


def test_text_is_the_launch_then_comments():
    # llama, 4 layers on 3 cards: [embed, layers.0], [layers.1, layers.2], [layers.3, head]
    profile = profile_of("llama", "layer")
    first, *rest = to_vllm(plan_of(profile, 3), profile).text.splitlines()
    assert first == "VLLM_PP_LAYER_PARTITION=1,2,1 vllm serve MODEL --tensor-parallel-size 1 --pipeline-parallel-size 3"
    assert all(line.startswith("# ") for line in rest)
    assert rest[1:] == ["# rank 0 (card 0): embed, layer 0", "# rank 1 (card 1): layers 1-2",
                        "# rank 2 (card 2): layer 3, head"]


def _one_line_refusal(plan, profile):
    with pytest.raises(ConfigError) as info:
        to_vllm(plan, profile)
    message = str(info.value)
    assert "\n" not in message and "the nearest vLLM runs: VLLM_PP_LAYER_PARTITION=" in message
    return message


def test_a_boundary_inside_a_layer_is_refused_with_whole_layers():
    profile = profile_of("llama", "block")
    message = _one_line_refusal(plan_of(profile, 3), profile)  # layer 1 cut between cards 0 and 1
    assert "inside decoder layer(s) 1" in message and "VLLM_PP_LAYER_PARTITION=1,2,1 vllm serve" in message


def test_different_degrees_per_rank_are_refused_with_one_degree():
    profile = profile_of("llama", "layer")
    plan = split_over(plan_of(profile, 2), [2, 4])  # [embed, layers.0, layers.1] on 2 cards, the rest on 4
    message = _one_line_refusal(plan, profile)
    assert "over 2 and 4 cards" in message and "--tensor-parallel-size 4 --pipeline-parallel-size 2" in message


def test_uneven_shards_are_refused():
    profile = profile_of("llama", "layer")
    plan = split_over(plan_of(profile, 1), [3])
    message = _one_line_refusal(plan, profile)
    assert "tensor-parallel degree 3 does not divide the 4 attention heads" in message
    assert "--tensor-parallel-size 4 --pipeline-parallel-size 1" in message


def test_mixed_cards_are_refused():
    profile = profile_of("llama", "layer")
    plan = plan_of(profile, 3)
    small = replace(plan.stages[0], device="other", capacity_bytes=plan.stages[0].capacity_bytes // 2)
    message = _one_line_refusal(replace(plan, stages=(small, *plan.stages[1:])), profile)
    assert "mixes 2 kinds of card" in message


@pytest.mark.parametrize("degree, refused", [(1, False), (2, False), (3, True), (4, False), (8, True)])
def test_degree_rule(degree, refused):
    # the tiny llama: 4 heads, 2 KV heads (replicated when there are more cards), 128 MLP columns
    shape = LayerShape(part="layer", hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=128)
    assert (vllm_tp_refusal(shape, degree) is not None) is refused
