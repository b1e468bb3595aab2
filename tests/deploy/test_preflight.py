"""What a run is refused for before any process starts: the plan file, the fit, the workload, the options.

None of these tests starts a process: every refusal comes from the launcher's checks (a patched
``run_supervised`` fails the test if torchrun would have been started).
"""

from __future__ import annotations

import dataclasses
import json

import pytest

torch = pytest.importorskip("torch")

from tiny_models import WORKLOAD, make_plan, model_dirs  # noqa: E402,F401

from cachefit.deploy import launcher  # noqa: E402
from cachefit.deploy.preflight import check_workload, load_checked_plan  # noqa: E402
from cachefit.deploy.runtime import NodeConfig, RunConfig, launch  # noqa: E402
from cachefit.deploy.verify import check_tolerance  # noqa: E402
from cachefit.errors import ConfigError  # noqa: E402


@pytest.fixture(scope="module")
def plan(model_dirs):
    return make_plan(model_dirs["llama"], "400KB")  # 2 stages; 2 sequences x 8 tokens per micro-batch, 2 micro-batches


@pytest.fixture
def no_launch(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("torchrun was started: the run should have been refused before")

    monkeypatch.setattr(launcher, "run_supervised", boom)


def _edited(plan, tmp_path, edit, name="edited.json"):
    doc = json.loads(plan.to_json())
    edit(doc)
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


def test_an_untouched_plan_file_passes(plan, tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    assert load_checked_plan(path).to_dict() == plan.to_dict()


@pytest.mark.parametrize("edit,match", [
    (lambda d: d.__setitem__("cards", 5), r'"cards": 5 but 2 stages; it was edited or damaged'),
    (lambda d: d.__setitem__("devices", ["custom"]), r'"devices" \[\'custom\'\] but the stages run on'),
    (lambda d: d["stages"][1].__setitem__("total_bytes", 1), "card 1 says total_bytes 1 but its weights"),
    (lambda d: d["stages"][0].__setitem__("utilization", 0.1), "card 0 says utilization 0.1"),
    (lambda d: d["summary"].__setitem__("bottleneck_bytes", 7), "summary.bottleneck_bytes 7"),
])
def test_derived_fields_must_agree_with_the_stages(plan, tmp_path, edit, match):
    with pytest.raises(ConfigError, match=match):
        load_checked_plan(_edited(plan, tmp_path, edit))


def test_a_plan_that_does_not_fit_is_refused_saying_how_to_get_one(plan, tmp_path):
    # the file says so
    with pytest.raises(ConfigError, match=r'does not fit its cards \(its file says "feasible": false\).*`cachefit '):
        load_checked_plan(_edited(plan, tmp_path, lambda d: d.__setitem__("feasible", False)))

    # its stages say so: more activation bytes than the card offers (the file's totals edited to match)
    def grow(d):
        st = d["stages"][0]
        st["activation_bytes"] += 100_000
        st["total_bytes"] += 100_000

    with pytest.raises(ConfigError, match=r"does not fit its cards \(card 0 needs .* but offers 400.0 KB\)"):
        load_checked_plan(_edited(plan, tmp_path, grow))
    # a Plan object (the Python API) as well, before any process starts
    stage = dataclasses.replace(plan.stages[0], capacity_bytes=1000)
    with pytest.raises(ConfigError, match="does not fit its cards"):
        launcher.check_run_inputs(".", dataclasses.replace(plan, stages=(stage, *plan.stages[1:])),
                                 nodes=NodeConfig(nproc_per_node=2), config=RunConfig())


def test_cluster_digest_is_recomputed_from_the_stages_or_the_cards_given(plan, tmp_path):
    from cachefit.hardware.devices import cluster_to_dict, device_from_capacity, make_cluster
    from cachefit.plan import cluster_digest

    edited = _edited(plan, tmp_path, lambda d: d["provenance"].__setitem__("cluster", "1" * 64))
    with pytest.raises(ConfigError, match=r"cluster digest \(111111111111\) is not that of the cards its stages "
                                          r"name \(custom:sram 400,000 B\)"):
        load_checked_plan(edited)
    # the cards the plan was made for, given: compared with them instead
    cards = cluster_digest(cluster_to_dict(make_cluster(device_from_capacity("400KB"))))
    with pytest.raises(ConfigError, match="cards differ"):
        load_checked_plan(edited, cluster_digest_=cards)
    untouched = _edited(plan, tmp_path, lambda d: None, "plan.json")
    assert load_checked_plan(untouched, cluster_digest_=cards).to_dict() == plan.to_dict()
    with pytest.raises(ConfigError, match="provenance records no valid profile or cluster digest"):
        load_checked_plan(_edited(plan, tmp_path, lambda d: d.__setitem__("provenance", None)))
    # a changed profile digest is caught against the checkpoint (layout_from_plan, tested in test_run_command)


def test_plans_for_catalog_devices_and_with_headroom(model_dirs, tmp_path):
    from cachefit.hardware.devices import cluster_to_dict, make_cluster, resolve_device
    from cachefit.plan.search import plan_partition
    from cachefit.plan import cluster_digest
    from cachefit.profile import profile_model

    profile = profile_model(model_dirs["llama"], WORKLOAD)
    device = resolve_device("h100")
    plain, _ = plan_partition(profile, make_cluster(device))
    path = tmp_path / "h100.json"
    path.write_text(plain.to_json())
    assert load_checked_plan(path).to_dict() == plain.to_dict()  # rebuilt from the catalog: the digest matches
    cluster = make_cluster(device, headroom=0.1)
    spared, _ = plan_partition(profile, cluster)
    path.write_text(spared.to_json())
    with pytest.raises(ConfigError, match="made with --headroom"):
        load_checked_plan(path)  # cannot be rebuilt from the stages: give the cards
    assert load_checked_plan(path, cluster_digest_=cluster_digest(cluster_to_dict(cluster))).cards == spared.cards


def test_inputs_larger_than_the_plans_workload_are_refused_saying_what_differs(model_dirs, plan, no_launch):
    nodes = NodeConfig(nproc_per_node=2)
    ids = torch.zeros(8, 32, dtype=torch.long)  # 4 per micro-batch x 32 tokens vs the plan's 2 x 8
    with pytest.raises(ConfigError, match=r"4 sequences per micro-batch where the plan has 2; 32 tokens per "
                                          r"sequence where the plan has 8.*--batch 4 --seq 8.*"
                                          r"--batch 4 --seq 32 --micro-batches 2"):
        launch(model_dirs["llama"], plan, nodes=nodes, config=RunConfig(micro_batches=2), input_ids=ids)
    with pytest.raises(ConfigError, match="3 sequences per micro-batch where the plan has 2"):
        launch(model_dirs["llama"], plan, nodes=nodes, config=RunConfig(),
               input_ids=torch.zeros(3, 8, dtype=torch.long))
    # refused before any process: `no_launch` fails the test if torchrun would have started


def test_workload_notes_say_what_differs():
    from cachefit.plan import Plan, Stage
    from cachefit.units import Footprint

    def plan_for(**workload):
        stage = Stage(card=0, device="custom", level="sram", units=(0, 1), unit_names=("u",),
                      footprint=Footprint(weight_bytes=1, activation_bytes=0, buffer_bytes=0), capacity_bytes=10)
        wl = {"batch": 2, "seq_len": 8, "mode": "prefill", "micro_batches": 2, "weight_dtype": "fp32", **workload}
        return Plan(model="m", workload=wl, devices=("custom",), objective="fewest_cards", stages=(stage,), num_units=1)

    assert check_workload(plan_for(), (4, 8), RunConfig(micro_batches=2)) == ()
    notes = check_workload(plan_for(), (2, 4), RunConfig(micro_batches=2, mode="train", dtype="bf16"))
    assert any("1 x 4 per micro-batch, smaller than the plan's 2 x 8" in n for n in notes)
    assert any("a training step on a prefill plan" in n for n in notes)
    assert any("run in bf16; the plan counts its bytes in fp32" in n for n in notes)
    # decode: the prompt and the tokens made must fit a decode plan's KV cache (8 positions)
    decode = plan_for(mode="decode", micro_batches=1)
    # (the prompts' prefill is said to hold more than the plan's one-token step, which the fit is checked on)
    assert [n[:41] for n in check_workload(decode, (2, 5), RunConfig(mode="decode", new_tokens=4))] == [
        "the prompts' prefill (5 tokens a sequence"]
    with pytest.raises(ConfigError, match=r"KV cache of 9 positions \(6 prompt tokens \+ 3 generated before the "
                                          r"last\) where the plan's holds 8.*--seq 5"):
        check_workload(decode, (2, 6), RunConfig(mode="decode", new_tokens=4))
    # on a prefill plan the cache was never counted: said, not refused
    notes = check_workload(plan_for(), (2, 8), RunConfig(mode="decode", new_tokens=4))
    assert any("decoding on a prefill plan" in n for n in notes)


def test_options_out_of_range_are_refused():
    for bad in (-1.0, 0.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="--tolerance"):
            check_tolerance(bad)
        with pytest.raises(ConfigError, match="--timeout must be a number of seconds > 0"):
            RunConfig(timeout_s=bad)
        with pytest.raises(ConfigError, match="--startup-timeout must be a number of seconds > 0"):
            RunConfig(startup_timeout_s=bad)
    assert check_tolerance(None, "bf16") == 5e-2 and check_tolerance(1e-3) == 1e-3
    with pytest.raises(ConfigError, match="HOST:PORT"):
        NodeConfig(nproc_per_node=1, nnodes=2, rdzv_endpoint="localhost")
    with pytest.raises(ConfigError, match="port in 1..65535"):
        NodeConfig(nproc_per_node=1, nnodes=2, rdzv_endpoint="10.0.0.1:99999")
