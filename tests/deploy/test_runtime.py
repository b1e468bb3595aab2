"""Real multi-process pipelines (gloo on CPU) against the unsplit model, and their faults.

Most runs use the ``fork`` launcher (torch's elastic launcher, the agent torchrun runs, with workers
forked from this process: a run starts in about a second); ``test_run_command.py`` runs the CLI under
a real ``torchrun`` subprocess.
"""

from __future__ import annotations

import time

import pytest

torch = pytest.importorskip("torch")

from tiny_models import make_plan, padded_inputs, model_dirs  # noqa: E402,F401

from cachefit.deploy.models import inspect_model_dir  # noqa: E402
from cachefit.deploy.runtime import (  # noqa: E402
    FAULT_ENV,
    NodeConfig,
    RunConfig,
    check_world,
    deploy_plan,
    launch,
)
from cachefit.deploy.stages import layout_from_plan  # noqa: E402
from cachefit.deploy.verify import check_run  # noqa: E402
from cachefit.errors import ConfigError, DeployError  # noqa: E402

pytestmark = pytest.mark.multiprocess


def _run(model_dir, plan, config, *, left=True, batch=4, **kwargs):
    ids, mask = padded_inputs(batch=batch, left=left)
    layout = layout_from_plan(plan, inspect_model_dir(model_dir))
    result = launch(model_dir, plan, nodes=NodeConfig(nproc_per_node=kwargs.pop("nproc", layout.world_size)),
                    config=config, input_ids=ids, attention_mask=mask, launcher="fork", **kwargs)
    return layout, result


def test_llama_two_cards_gpipe_matches_unsplit(model_dirs):
    plan = make_plan(model_dirs["llama"], "400KB")
    layout, result = _run(model_dirs["llama"], plan, RunConfig(micro_batches=2, steps=2, warmup=1))
    assert result.outputs.shape == (4, 8, 128)
    verdict = check_run(result, model_dirs["llama"], layout=layout)
    assert verdict.passed and verdict.comparisons[0].max_rel_error <= 1e-5, verdict.describe()
    report = result.report
    assert len(report["timings"]["step_s"]) == 2 and all(t > 0 for t in report["timings"]["step_s"])
    for stage in report["stages"]:
        assert stage["measured_weight_bytes"] == stage["planned_weight_bytes"]
        assert len(stage["forward_s_per_microbatch"]) == 4  # 2 timed steps x 2 micro-batches
    assert [s["unit_names"] for s in report["stages"]] == [["embed", "layers.0", "layers.1"], ["layers.2", "head"]]


def test_qwen3_two_cards_matches_unsplit_and_trains_like_it(model_dirs):
    # Qwen3 is deployed by the registry's word alone: its FamilySpec names the rotary decoder adapter
    # (Llama's layer layout; the per-head q/k norms live inside self_attn), no deploy table lists it
    model_dir = model_dirs["qwen3"]
    assert inspect_model_dir(model_dir).family.stage_adapter == "rotary_decoder"
    plan = make_plan(model_dir, "400KB")
    layout, result = _run(model_dir, plan, RunConfig(micro_batches=2))
    assert [s["unit_names"] for s in result.report["stages"]] == [["embed", "layers.0", "layers.1"], ["layers.2", "head"]]
    assert result.report["run"]["mode"] == "prefill"
    for stage in result.report["stages"]:
        assert stage["measured_weight_bytes"] == stage["planned_weight_bytes"]
    verdict = check_run(result, model_dir, layout=layout)
    assert verdict.passed and verdict.comparisons[0].max_rel_error <= 1e-5, verdict.describe()
    assert result.outputs.shape == (4, 8, 128)
    # training steps: losses and every gradient (q_norm / k_norm included) as the unsplit model's;
    # two steps, each from cleared gradients (the report's are the last step's, not their sum)
    config = RunConfig(micro_batches=2, schedule="1f1b", mode="train", save_grads=True, steps=2)
    layout, result = _run(model_dir, plan, config)
    verdict = check_run(result, model_dir, layout=layout, mode="train", micro_batches=2)
    assert verdict.passed, verdict.describe()
    what = {c.what: c for c in verdict.comparisons}
    # embedding, 3 layers x (q, k, v, o, q_norm, k_norm, gate, up, down, 2 norms), final norm, head
    assert what["gradients"].tensors == 1 + 3 * 11 + 1 + 1


def test_bf16_run_holds_half_the_bytes_and_is_checked_loosely(model_dirs):
    plan = make_plan(model_dirs["llama"], "400KB")  # planned in fp32
    layout, result = _run(model_dirs["llama"], plan, RunConfig(micro_batches=2, dtype="bf16"))
    for stage in result.report["stages"]:
        # counted at the plan's dtype (fp32) they match the plan; allocated in bf16, half of it
        assert stage["measured_weight_bytes"] == stage["planned_weight_bytes"]
        assert stage["shards"][0]["allocated_weight_bytes"] * 2 == stage["planned_weight_bytes"]
    verdict = check_run(result, model_dirs["llama"], layout=layout, dtype="bf16")
    # bf16 keeps 8 bits of mantissa: errors of about 1e-2 of the largest logit, far above fp32's
    assert verdict.passed and 1e-4 < verdict.comparisons[0].max_rel_error < 5e-2, verdict.describe()


def test_gpt2_cut_inside_layers_trains_like_unsplit(model_dirs):
    # block granularity: 7 stages, cuts between attention and MLP blocks; GPT-2's head is tied to the
    # embedding on another card, so their gradients must add up to the unsplit model's
    profile_cap = "230KB"  # the fewest cards with no unit split: GPT-2's gelu_new and eager softmax hold more
    plan = make_plan(model_dirs["gpt2"], profile_cap, granularity="block")
    assert plan.cards >= 4
    config = RunConfig(micro_batches=plan.cards, schedule="1f1b", mode="train", save_grads=True)
    layout, result = _run(model_dirs["gpt2"], plan, config, batch=plan.cards)
    verdict = check_run(result, model_dirs["gpt2"], layout=layout, mode="train", micro_batches=plan.cards)
    assert verdict.passed, verdict.describe()
    what = {c.what: c for c in verdict.comparisons}
    # every parameter once: wte, wpe, 12 per layer x 3, ln_f weight and bias; the tied head folded into wte
    assert what["gradients"].tensors == 2 + 12 * 3 + 2
    assert what["losses"].max_rel_error <= 1e-5 and len(result.report["losses"]) == plan.cards


def test_bert_with_padding_matches_unsplit(model_dirs):
    plan = make_plan(model_dirs["bert"], "200KB", granularity="block")
    layout, result = _run(model_dirs["bert"], plan, RunConfig(micro_batches=2), left=False)
    assert any(st.unit_names[0].endswith(".mlp") for st in layout.stages)
    verdict = check_run(result, model_dirs["bert"], layout=layout)
    assert verdict.passed and verdict.comparisons[0].max_rel_error <= 1e-5, verdict.describe()
    assert result.outputs.shape == (4, 8, 64)  # the last hidden state


def test_tensor_parallel_stages_match_unsplit(model_dirs):
    # every unit split over 2 cards: 4 processes, 2 pipeline stages of 2 shards (vocabulary-parallel
    # embedding and head, Megatron attention / MLP), leaders exchanging activations
    plan = make_plan(model_dirs["llama_tp"], "150KB")
    layout, result = _run(model_dirs["llama_tp"], plan, RunConfig(micro_batches=2))
    assert [len(s["ranks"]) for s in result.report["stages"]] == [2, 2]
    for stage in result.report["stages"]:
        assert [s["measured_weight_bytes"] for s in stage["shards"]] == [stage["planned_weight_bytes"]] * 2
    verdict = check_run(result, model_dirs["llama_tp"], layout=layout)
    assert verdict.passed and verdict.comparisons[0].max_rel_error <= 1e-5, verdict.describe()


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_tensor_parallel_stages_train_like_the_unsplit_model(model_dirs, schedule):
    # training steps through 2 pipeline stages of 2 shards each: the followers run each micro-batch's
    # backward when their leader's gradient arrives; losses and every gradient (the shards' parts
    # put back together) as the unsplit model's, after a second step from cleared gradients
    plan = make_plan(model_dirs["llama_tp"], "150KB")
    config = RunConfig(micro_batches=2, schedule=schedule, mode="train", save_grads=True, steps=2)
    layout, result = _run(model_dirs["llama_tp"], plan, config)
    assert [len(s["ranks"]) for s in result.report["stages"]] == [2, 2]
    verdict = check_run(result, model_dirs["llama_tp"], layout=layout, mode="train", micro_batches=2)
    assert verdict.passed, verdict.describe()
    assert {c.what for c in verdict.comparisons} >= {"losses", "gradients"}, verdict.describe()


def test_tensor_parallel_with_fewer_kv_heads_than_shards(model_dirs):
    # 4 shards of 4 query heads and 2 KV heads: each shard keeps the KV head its query head reads,
    # as the planner counts it (8 processes: 2 stages x 4 shards)
    plan = make_plan(model_dirs["llama_tp"], "88KB")
    assert {st.shard for st in plan.stages} == {(k, 4) for k in range(4)}
    layout, result = _run(model_dirs["llama_tp"], plan, RunConfig(micro_batches=2))
    for stage in result.report["stages"]:
        assert [s["measured_weight_bytes"] for s in stage["shards"]] == [stage["planned_weight_bytes"]] * 4
    verdict = check_run(result, model_dirs["llama_tp"], layout=layout)
    assert verdict.passed and verdict.comparisons[0].max_rel_error <= 1e-5, verdict.describe()


def test_interleaved_puts_two_stages_per_process(model_dirs):
    plan = make_plan(model_dirs["llama"], "200KB", granularity="block")
    assert plan.cards == 4
    config = RunConfig(micro_batches=4, schedule="interleaved", mode="train", save_grads=True)
    layout, result = _run(model_dirs["llama"], plan, config, nproc=2)
    assert [s["ranks"] for s in result.report["stages"]] == [[0], [1], [0], [1]]
    verdict = check_run(result, model_dirs["llama"], layout=layout, mode="train", micro_batches=4)
    assert verdict.passed, verdict.describe()


def test_compressed_plan_runs_and_holds_planned_bytes(model_dirs):
    pytest.importorskip("cachefit.compress.apply")
    plan = make_plan(model_dirs["llama"], "90KB", allow=("sparse50", "int8"))
    # 2 micro-batches of 2 sequences: the plan's workload (more per micro-batch is refused before launch)
    layout, result = _run(model_dirs["llama"], plan, RunConfig(micro_batches=2))
    for stage in result.report["stages"]:
        assert stage["measured_weight_bytes"] == stage["planned_weight_bytes"]
    verdict = check_run(result, model_dirs["llama"], layout=layout)
    # against the unsplit model compressed the same way: exact; against the uncompressed one: the
    # error compression itself brings, reported (pruning half the MLP without fine-tuning is large)
    assert verdict.passed and verdict.quality is not None and verdict.quality.max_rel_error > 1e-3


def test_sequential_module_through_the_python_api():
    from torch import nn

    from cachefit.hardware.devices import device_from_capacity, make_cluster
    from cachefit.plan.search import plan_partition
    from cachefit.profile.module import profile_module

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(32, 32), nn.GELU()) for _ in range(4)], nn.Linear(32, 3))
    x, target = torch.randn(8, 32), torch.randn(8, 3)
    plan, _ = plan_partition(profile_module(model, x[:4]), make_cluster(device_from_capacity("10KB")))
    assert plan.cards == 3
    result = deploy_plan(model, plan, inputs=x, config=RunConfig(micro_batches=2))
    with torch.no_grad():
        assert torch.equal(result.outputs, model(x))

    def loss_fn(out, tgt):
        return ((out - tgt) ** 2).mean()

    config = RunConfig(micro_batches=2, mode="train", save_grads=True)
    result = deploy_plan(model, plan, inputs=x, config=config, loss_fn=loss_fn, target=target)
    verdict = check_run(result, model, mode="train", micro_batches=2, inputs=x, loss_fn=loss_fn, target=target)
    assert verdict.passed, verdict.describe()


def test_wrong_process_counts_are_refused_before_launch(model_dirs):
    plan = make_plan(model_dirs["llama"], "400KB")
    layout = layout_from_plan(plan, inspect_model_dir(model_dirs["llama"]))
    with pytest.raises(ConfigError, match="3 processes but the plan has only 2 cards"):
        check_world(layout, NodeConfig(nproc_per_node=3), RunConfig())
    with pytest.raises(ConfigError, match="run with --nproc 2"):
        check_world(layout, NodeConfig(nproc_per_node=1), RunConfig())
    with pytest.raises(ConfigError, match="at least as many micro-batches as stages"):
        check_world(layout, NodeConfig(nproc_per_node=2), RunConfig(schedule="1f1b", micro_batches=1))
    with pytest.raises(ConfigError, match="cannot be cut into 3 equal micro-batches"):
        launch(model_dirs["llama"], plan, nodes=NodeConfig(nproc_per_node=2), config=RunConfig(micro_batches=3),
               input_ids=torch.zeros(4, 8, dtype=torch.long), launcher="fork")


@pytest.mark.parametrize("kind,expect", [
    ("kill", r"stage 1 \(card 1: layers.2..head\) died without a report"),
    ("hang", r"stage 1 \(card 1: layers.2..head\) was still running.*stage 0 \(card 0: embed..layers.1\) timed out"),
])
def test_a_failing_rank_ends_the_run_with_the_stage_named(model_dirs, monkeypatch, kind, expect, hang_guard):
    plan = make_plan(model_dirs["llama"], "400KB")
    monkeypatch.setenv(FAULT_ENV, f"1:{kind}")
    # bounded: a hang is noticed after the 3 s timeout, then the launcher ends the hung rank
    with hang_guard(), pytest.raises(DeployError, match=expect):
        _run(model_dirs["llama"], plan, RunConfig(micro_batches=2, timeout_s=3))


def test_a_rank_that_starts_late_is_waited_for_beyond_the_run_timeout(model_dirs, monkeypatch):
    # joining and building stages are bounded by startup_timeout_s, not timeout_s: a rank that joins
    # 4 s late (8 ranks importing torch on 2 cores cold can take a minute) does not fail a run whose
    # waits are bounded by 2 s once every rank has built its stage
    from cachefit.deploy import worker

    joined = worker.write_pid

    def late(run_dir, rank):
        if rank == 1:
            time.sleep(4)
        joined(run_dir, rank)

    monkeypatch.setattr(worker, "write_pid", late)  # the forked workers inherit it
    plan = make_plan(model_dirs["llama"], "400KB")
    _, result = _run(model_dirs["llama"], plan, RunConfig(micro_batches=2, timeout_s=2, startup_timeout_s=60))
    assert result.outputs.shape == (4, 8, 128)
    assert result.report["run"]["startup_timeout_s"] == 60
