"""Pipelined greedy decoding with a KV cache per stage, against ``generate`` of the unsplit model."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from tiny_models import make_plan, model_dirs, padded_inputs  # noqa: E402,F401

from cachefit.deploy.models import inspect_model_dir  # noqa: E402
from cachefit.deploy.runtime import NodeConfig, RunConfig, check_world, launch  # noqa: E402
from cachefit.deploy.stages import layout_from_plan  # noqa: E402
from cachefit.deploy.verify import check_run  # noqa: E402
from cachefit.errors import ConfigError  # noqa: E402
from cachefit.families import FAMILIES  # noqa: E402

NEW_TOKENS = 4


def _prompt(batch: int = 2, seq: int = 8):
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(3))


@pytest.mark.multiprocess
@pytest.mark.parametrize(("name", "granularity", "capacity"),
                         [("llama", "layer", "400KB"), ("llama", "block", "420KB"), ("qwen3", "layer", "400KB")])
def test_pipelined_decode_matches_generate(model_dirs, name, granularity, capacity):
    model_dir = model_dirs[name]
    plan = make_plan(model_dir, capacity, granularity=granularity)
    layout = layout_from_plan(plan, inspect_model_dir(model_dir))
    assert layout.num_stages == 2 and layout.granularity == granularity
    ids = _prompt()
    result = launch(model_dir, plan, nodes=NodeConfig(nproc_per_node=2), launcher="fork", input_ids=ids,
                    config=RunConfig(mode="decode", new_tokens=NEW_TOKENS, micro_batches=1))
    assert result.outputs.shape == (2, NEW_TOKENS, 128)
    # independently: greedy generate of the whole model in one process
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        out = ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW_TOKENS,
                           output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    assert result.report["generated_ids"] == out.sequences[:, ids.shape[1]:].tolist()
    expected = torch.stack(out.logits, dim=1)
    assert float((result.outputs - expected).abs().max() / expected.abs().max()) <= 1e-5
    verdict = check_run(result, model_dir, layout=layout, mode="decode")
    assert verdict.passed, verdict.describe()
    assert verdict.comparisons[0].max_abs_error == 0.0
    timings = result.report["timings"]
    assert len(timings["token_s"]) == NEW_TOKENS - 1 and timings["ms_per_token"] > 0
    assert timings["ms_per_token"] == pytest.approx(1e3 * sum(timings["token_s"]) / (NEW_TOKENS - 1))
    assert result.report["run"]["new_tokens"] == NEW_TOKENS
    for stage in result.report["stages"]:
        assert stage["measured_weight_bytes"] == stage["planned_weight_bytes"]
        assert len(stage["forward_s_per_microbatch"]) == NEW_TOKENS  # prefill + one forward per later token


def test_decode_config_is_checked(model_dirs):
    with pytest.raises(ConfigError, match="new-tokens"):
        RunConfig(mode="decode")
    with pytest.raises(ConfigError, match="for --mode decode"):
        RunConfig(mode="prefill", new_tokens=3)
    plan = make_plan(model_dirs["llama"], "400KB")
    layout = layout_from_plan(plan, inspect_model_dir(model_dirs["llama"]))
    with pytest.raises(ConfigError, match="multiple of --micro-batches"):  # 3 sequences in 2 groups
        launch(model_dirs["llama"], plan, nodes=NodeConfig(nproc_per_node=2), launcher="fork",
               input_ids=_prompt(batch=3), config=RunConfig(mode="decode", new_tokens=2, micro_batches=2))
    with pytest.raises(ConfigError, match="--kv-cache"):
        RunConfig(mode="decode", new_tokens=2, kv_cache="paged")
    bert = make_plan(model_dirs["bert"], "400KB")
    bert_layout = layout_from_plan(bert, inspect_model_dir(model_dirs["bert"]))
    # the families that decode come from the registry (FamilySpec.decode), and the message lists them
    decoding = [n for n, f in FAMILIES.items() if f.decode]
    with pytest.raises(ConfigError, match=f"runs {', '.join(decoding)} checkpoints, not bert; use --mode prefill"):
        check_world(bert_layout, NodeConfig(nproc_per_node=bert_layout.world_size), RunConfig(mode="decode", new_tokens=2))
    ids, mask = padded_inputs(batch=2)
    with pytest.raises(ConfigError, match="padding"):
        launch(model_dirs["llama"], plan, nodes=NodeConfig(nproc_per_node=2), launcher="fork", input_ids=ids,
               attention_mask=mask, config=RunConfig(mode="decode", new_tokens=2))
    with pytest.raises(ConfigError, match="at most 64"):
        launch(model_dirs["llama"], plan, nodes=NodeConfig(nproc_per_node=2), launcher="fork", input_ids=ids,
               config=RunConfig(mode="decode", new_tokens=60))


def _generate(model_dir, ids, kv_cache):
    """Greedy ``generate`` of the whole model in one process (the independent reference)."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW_TOKENS,
                            output_logits=True, return_dict_in_generate=True, pad_token_id=0,
                            cache_implementation=kv_cache)


@pytest.mark.multiprocess
@pytest.mark.parametrize(("groups", "kv_cache", "nproc"),
                         [(2, "dynamic", 2), (4, "static", 2), (2, "static", 2), (4, "dynamic", 2), (2, "static", 1)])
def test_decode_with_groups_in_flight_matches_generate(model_dirs, groups, kv_cache, nproc):
    # the batch cut into groups that circulate through the stages, each with its own KV caches: every
    # sequence's ids equal greedy generate of the unsplit model, its per-step logits within fp32 rounding
    model_dir = model_dirs["llama"]
    plan = make_plan(model_dir, "400KB" if nproc == 2 else "4MB")
    layout = layout_from_plan(plan, inspect_model_dir(model_dir))
    assert layout.num_stages == nproc
    ids = _prompt(batch=4)
    result = launch(model_dir, plan, nodes=NodeConfig(nproc_per_node=nproc), launcher="fork", input_ids=ids,
                    config=RunConfig(mode="decode", new_tokens=NEW_TOKENS, micro_batches=groups, kv_cache=kv_cache))
    out = _generate(model_dir, ids, "static" if kv_cache == "static" else None)
    assert result.report["generated_ids"] == out.sequences[:, ids.shape[1]:].tolist()
    expected = torch.stack(out.logits, dim=1)
    assert result.outputs.shape == expected.shape
    assert float((result.outputs - expected).abs().max() / expected.abs().max()) <= 1e-5
    verdict = check_run(result, model_dir, layout=layout, mode="decode")
    assert verdict.passed, verdict.describe()
    timings = result.report["timings"]
    assert timings["micro_batches"] == groups and timings["kv_cache"] == kv_cache
    # one interval per sequence group and later token; every stage ran prefill + one forward per token, per group
    assert len(timings["token_s"]) == groups * (NEW_TOKENS - 1)
    assert timings["tokens_per_s"] > 0 and timings["ms_per_token"] > 0
    for stage in result.report["stages"]:
        assert len(stage["forward_s_per_microbatch"]) == groups * NEW_TOKENS
        assert 0 < stage["busy_fraction"] <= 1


@pytest.mark.multiprocess
def test_decode_report_puts_the_prediction_beside_the_measurement(model_dirs):
    from cachefit.hardware.catalog import device_from_capacity
    from cachefit.hardware.devices import get_device, make_cluster
    from cachefit.plan.search import plan_partition
    from cachefit.profile import profile_model
    from cachefit.units import Workload

    model_dir = model_dirs["llama"]
    # bf16 planned (the catalog's H100 has no fp32 peak, and a prediction from an unknown is none), run in fp32
    wl = Workload(batch=1, seq_len=8 + NEW_TOKENS, mode="decode", weight_dtype="bf16", act_dtype="bf16",
                  micro_batches=2)
    card = device_from_capacity("200KB", level="l2", base=get_device("h100"))  # an H100's figures, a tiny cache
    plan, _ = plan_partition(profile_model(model_dir, wl), make_cluster(card))
    assert plan.cards == 2
    result = launch(model_dir, plan, nodes=NodeConfig(nproc_per_node=2), launcher="fork", input_ids=_prompt(batch=2),
                    devices=card, config=RunConfig(mode="decode", new_tokens=NEW_TOKENS, micro_batches=2))
    predicted = result.report["predicted"]["prediction"]
    assert predicted["micro_batches"] == 2 and len(predicted["busy_fractions"]) == 2
    assert predicted["tokens_per_s"] > 0 and predicted["ms_per_token"] > 0
    versus = result.report["predicted"]["measured_vs_predicted"]
    assert versus["tokens_per_s_measured_over_predicted"] == pytest.approx(
        result.report["timings"]["tokens_per_s"] / predicted["tokens_per_s"])
    assert len(versus["busy_fraction_measured"]) == 2
    # without the plan's cards (a custom device is in no catalog) the report says why there is no prediction
    bare = launch(model_dir, plan, nodes=NodeConfig(nproc_per_node=2), launcher="fork", input_ids=_prompt(batch=2),
                  config=RunConfig(mode="decode", new_tokens=NEW_TOKENS, micro_batches=2))
    assert "--device" in bare.report["predicted"]["unavailable"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("kv_cache", ["static", "dynamic"])
def test_decode_through_tensor_parallel_stages_matches_generate(model_dirs, kv_cache):
    # 2 stages of 2 shards each (4 processes): each shard decodes its own heads with its own KV caches,
    # the leaders pass the hidden states and the tokens on
    model_dir = model_dirs["llama_tp"]
    plan = make_plan(model_dir, "150KB")
    layout = layout_from_plan(plan, inspect_model_dir(model_dir))
    assert [p.shards for p in layout.stages] == [2, 2]
    ids = _prompt(batch=4)
    result = launch(model_dir, plan, nodes=NodeConfig(nproc_per_node=4), launcher="fork", input_ids=ids,
                    config=RunConfig(mode="decode", new_tokens=NEW_TOKENS, micro_batches=2, kv_cache=kv_cache))
    out = _generate(model_dir, ids, "static" if kv_cache == "static" else None)
    assert result.report["generated_ids"] == out.sequences[:, ids.shape[1]:].tolist()
    expected = torch.stack(out.logits, dim=1)
    assert float((result.outputs - expected).abs().max() / expected.abs().max()) <= 1e-5
    assert check_run(result, model_dir, layout=layout, mode="decode").passed
    assert [len(stage["shards"]) for stage in result.report["stages"]] == [2, 2]
