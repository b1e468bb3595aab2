"""Megatron-Core layout: parsed back by Megatron-Core's own parser where it is installed, and always by
the documented grammar; refusals name the nearest layout Megatron runs."""

import json
import re
import shlex
import subprocess
import sys
from dataclasses import replace

import pytest
from conftest import plan_of, profile_of, split_over
from hypothesis import given, settings
from hypothesis import strategies as st

from cachefit.errors import ConfigError
from cachefit.export import export_plan, to_megatron
from cachefit.export.layer_split import LayerSplit
from cachefit.export.megatron import megatron_tp_refusal, pipeline_layout


def parse_layout(layout: str) -> list[list[str]]:
    """The documented grammar (Megatron-LM docs/api-guide/pipeline_parallel_layout.md; the rules of
    ``PipelineParallelLayerLayout.parse_str_to_list``): commas dropped, ``(...)*n`` unrolled, then
    ``x*n``, stages split on ``|``, each symbol one of E, t, m, L."""
    text = layout.replace(",", "")
    text = re.sub(r"\(([^)]+)\)\*(\d+)", lambda m: m.group(1) * int(m.group(2)), text)
    text = re.sub(r"(.)\*(\d+)", lambda m: m.group(1) * int(m.group(2)), text)
    stages = [list(stage) for stage in text.split("|")]
    assert all(c in "EtmL" for stage in stages for c in stage), layout
    return stages


def check_layout(layout: str, layers_per_stage: list[int]) -> None:
    """``validate_layer_layout``'s rules: E first and L last, once each; the decoder layers per stage."""
    stages = parse_layout(layout)
    flat = [c for stage in stages for c in stage]
    assert flat[0] == "E" and flat[-1] == "L" and flat.count("E") == 1 and flat.count("L") == 1
    assert stages[0][0] == "E" and stages[-1][-1] == "L"
    assert [stage.count("t") for stage in stages] == layers_per_stage


_MEGATRON_SCRIPT = """
import json, sys, warnings
warnings.simplefilter("ignore")
from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout
out = []
for layout, pp, num_layers in json.load(sys.stdin):
    parsed = PipelineParallelLayerLayout(layout, pp)
    parsed.validate_layer_layout(num_layers=num_layers, mtp_num_layers=None)
    out.append([parsed.get_layer_id_list(pp_rank=r) for r in range(pp)])
json.dump(out, sys.stdout)
"""


def megatron_layer_ids(cases: list[tuple[str, int, int]]) -> list[list[list[int]]]:
    """Decoder layer ids of each pipeline rank, by Megatron-Core itself (in a child process: its import
    takes seconds and sets up state this process does not want)."""
    pytest.importorskip("megatron.core", reason="Megatron-Core is not installed (pip install megatron-core)")
    result = subprocess.run([sys.executable, "-c", _MEGATRON_SCRIPT], input=json.dumps(cases),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def _planned_layers(plan, profile):
    """Decoder layers of each pipeline part of the plan, from its unit names."""
    counts = []
    for stage in plan.stages:
        if stage.shard is not None and stage.shard[0] > 0:
            continue
        counts.append(sum(1 for i in range(*stage.units) if profile.units[i].layer is not None))
    return counts


def _split(counts):
    return LayerSplit(num_layers=sum(counts), layers_per_stage=tuple(counts), tensor_parallel=1,
                      planned_tensor_parallel=1, stage_units=(), stage_cards=())


CASES = [(name, n) for name in ("llama", "gpt2", "llama-tied") for n in (1, 2, 3, 4, 5, 6)]


@pytest.mark.parametrize("name, num_cards", CASES)
def test_layout_builds_the_planned_layers_on_each_stage(name, num_cards):
    profile = profile_of(name, "layer")
    plan = plan_of(profile, num_cards)
    doc = to_megatron(plan, profile).document
    planned = _planned_layers(plan, profile)
    assert doc["pipeline_model_parallel_size"] == num_cards and doc["tensor_model_parallel_size"] == 1
    assert doc["layers_per_stage"] == planned and doc["num_layers"] == 4
    check_layout(doc["pipeline_model_parallel_layout"], planned)


def test_megatron_core_reads_every_layout_as_planned():
    """Megatron-Core's own parser and validator on every plan above: rank r builds the plan's layers."""
    cases, expected = [], []
    for name, num_cards in CASES:
        profile = profile_of(name, "layer")
        plan = plan_of(profile, num_cards)
        doc = to_megatron(plan, profile).document
        cases.append((doc["pipeline_model_parallel_layout"], doc["pipeline_model_parallel_size"], doc["num_layers"]))
        ids, start = [], 0
        for n in _planned_layers(plan, profile):
            ids.append(list(range(start, start + n)))
            start += n
        expected.append(ids)
    # and long runs of equal stages, written with the (...)*k repetition
    for counts in ([3, 4, 4, 4, 4, 4, 4, 2], [0, 5, 5, 5, 0], [1] * 40, [61]):
        cases.append((pipeline_layout(_split(counts)), len(counts), sum(counts)))
        starts = [sum(counts[:r]) for r in range(len(counts))]
        expected.append([list(range(s, s + n)) for s, n in zip(starts, counts)])
    assert megatron_layer_ids(cases) == expected


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=12), min_size=1, max_size=40))
def test_any_layer_counts_round_trip_through_the_grammar(counts):
    layout = pipeline_layout(_split(counts))
    check_layout(layout, counts)
    assert "((" not in layout  # the grammar unrolls no nested groups


def test_repeated_stages_are_grouped():
    assert pipeline_layout(_split([3, 4, 4, 4, 4, 2])) == "Et*3|(t*4|)*4,t*2L"
    assert pipeline_layout(_split([1, 1, 1])) == "Et|t|tL"  # a group would be longer
    assert pipeline_layout(_split([0, 4, 0])) == "E|t*4|L"


def test_text_is_the_flags_then_comments():
    # llama, 4 layers on 3 cards: [embed, layers.0], [layers.1, layers.2], [layers.3, head]
    profile = profile_of("llama", "layer")
    export = to_megatron(plan_of(profile, 3), profile)
    first, *rest = export.text.splitlines()
    assert shlex.split(first) == ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "3",
                                  "--pipeline-model-parallel-layout", "Et|t*2|tL"]
    assert all(line.startswith("# ") for line in rest)
    assert "--untie-embeddings-and-output-weights" in rest[0]  # the tiny llama's head is not tied
    assert export.document["untie_embeddings_and_output_weights"] is True


def test_uniform_tensor_parallel_is_one_size():
    # every unit of the tiny llama over 2 cards (4 heads, 2 KV heads, 128 MLP columns: all divide by 2)
    profile = profile_of("llama", "layer")
    plan = split_over(plan_of(profile, 1), [2])
    doc = to_megatron(plan, profile).document
    assert doc["tensor_model_parallel_size"] == 2 and doc["pipeline_model_parallel_size"] == 1
    assert doc["cards_per_stage"] == [[0, 1]] and doc["pipeline_model_parallel_layout"] == "Et*4L"


def _one_line_refusal(plan, profile):
    with pytest.raises(ConfigError) as info:
        to_megatron(plan, profile)
    message = str(info.value)
    assert "\n" not in message and "the nearest Megatron-Core runs: --tensor-model-parallel-size" in message
    return message


def test_a_boundary_inside_a_layer_is_refused_with_whole_layers():
    profile = profile_of("llama", "block")
    plan = plan_of(profile, 3)  # layer 1 cut: attention on card 0, MLP (the heavier block) on card 1
    message = _one_line_refusal(plan, profile)
    assert "inside decoder layer(s) 1" in message
    assert "--pipeline-model-parallel-layout 'Et|t*2|tL'" in message


def test_different_degrees_per_stage_are_refused_with_one_degree():
    profile = profile_of("llama", "layer")
    plan = split_over(plan_of(profile, 2), [2, 4])  # [embed, layers.0, layers.1] on 2 cards, the rest on 4
    message = _one_line_refusal(plan, profile)
    assert "over 2 and 4 cards" in message and "--tensor-model-parallel-size 4" in message


def test_uneven_shards_are_refused_with_the_next_degree_that_divides():
    profile = profile_of("llama", "layer")
    plan = split_over(plan_of(profile, 1), [3])
    message = _one_line_refusal(plan, profile)
    # 4 heads, 2 query groups, 128 MLP columns: 3 divides none; 4 divides the heads and the columns and is
    # a multiple of the groups
    assert "uneven shards: tensor-parallel degree 3" in message
    assert "--tensor-model-parallel-size 4 --pipeline-model-parallel-size 1" in message


def test_mixed_cards_are_refused():
    profile = profile_of("llama", "layer")
    plan = plan_of(profile, 3)
    small = replace(plan.stages[2], device="other", capacity_bytes=plan.stages[2].capacity_bytes // 2)
    mixed = replace(plan, stages=(*plan.stages[:2], small), devices=(*plan.devices[:2], "other"))
    message = _one_line_refusal(mixed, profile)
    assert "mixes 2 kinds of card" in message and "'Et|t*2|tL'" in message


def test_encoders_are_refused():
    profile = profile_of("bert", "layer")
    with pytest.raises(ConfigError, match="encoder"):
        to_megatron(plan_of(profile, 2), profile)


def test_degree_rule_matches_megatron_core():
    """megatron_tp_refusal accepts exactly the degrees Megatron-Core's TransformerConfig accepts for the
    heads and query groups (the MLP width, 720,720 = lcm(1..16), divides by every degree tried: the
    config does not check it)."""
    from cachefit.units import LayerShape

    pytest.importorskip("megatron.core", reason="Megatron-Core is not installed (pip install megatron-core)")
    heads_kv = [(4, 2), (32, 8), (28, 4), (12, 12), (6, 1)]
    degrees = list(range(1, 17))
    script = (
        "import json, sys, warnings\nwarnings.simplefilter('ignore')\n"
        "from megatron.core.transformer.transformer_config import TransformerConfig\n"
        "def ok(h, g, d):\n"
        "    try:\n"
        "        TransformerConfig(num_layers=1, hidden_size=64 * h, num_attention_heads=h, num_query_groups=g,\n"
        "                          ffn_hidden_size=720720, tensor_model_parallel_size=d)\n"
        "    except ValueError:\n"
        "        return False\n"
        "    return True\n"
        f"json.dump([[ok(h, g, d) for d in {degrees}] for h, g in {heads_kv}], sys.stdout)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    ours = [[megatron_tp_refusal(LayerShape(part="layer", hidden_size=64 * h, num_heads=h, num_kv_heads=g,
                                            intermediate_size=720720), d) is None for d in degrees]
            for h, g in heads_kv]
    assert ours == json.loads(result.stdout)


def test_export_plan_knows_the_format_and_its_aliases():
    profile = profile_of("llama", "layer")
    plan = plan_of(profile, 2)
    for name in ("megatron", "Megatron-LM", "mcore"):
        assert export_plan(plan, name, profile=profile).format == "megatron"
