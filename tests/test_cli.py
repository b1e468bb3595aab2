"""The command line: JSON contracts (docs/plan-schema.md, docs/cli.md), exit codes, no tracebacks on bad input."""

import json

import pytest
from typer.testing import CliRunner

from cachefit.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, list(args))


def test_profile_paper_json_reproduces_the_seed_weight_figures():
    result = run("profile", "paper-16l", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert set(doc) >= {"model", "workload", "units", "totals"}
    unit_keys = {"name", "kind", "params", "weight_bytes", "activation_bytes", "buffer_bytes", "total_bytes", "flops"}
    assert all(unit_keys <= set(u) for u in doc["units"])
    layer = next(u for u in doc["units"] if u["name"] == "layers.0")
    roles = layer["weight_roles"]
    # FP16: QKV 3 x 4096 x 4096 x 2 = 100.7 MB; MLP 2 x 4096 x 16384 x 2 = 268.4 MB; other (attention
    # output) 4096 x 4096 x 2 = 33.6 MB
    assert roles["qkv"] == 100_663_296
    assert roles["mlp"] == 268_435_456
    assert roles["attn_out"] == 33_554_432
    assert [u["name"] for u in doc["units"]][:3] == ["embed", "layers.0", "layers.1"]
    totals = doc["totals"]
    assert totals["total_bytes"] == sum(u["total_bytes"] for u in doc["units"])
    for u in doc["units"]:
        assert u["total_bytes"] == u["weight_bytes"] + u["activation_bytes"] + u["buffer_bytes"]


def test_profile_table_and_block_granularity():
    result = run("profile", "gpt2", "-g", "block", "--mode", "prefill", "--seq", "128")
    assert result.exit_code == 0, result.output
    assert "layers.0.attn" in result.stdout and "layers.0.mlp" in result.stdout


def test_profile_lists_presets():
    result = run("profile", "--list", "--json")
    names = {p["name"] for p in json.loads(result.stdout)}
    assert {"paper-16l", "llama-2-7b", "llama-3.1-8b", "llama-3.1-70b", "mistral-7b", "qwen2.5-7b", "gpt2",
            "bert-base-uncased"} <= names


@pytest.mark.parametrize(
    "args, needle",
    [
        (("profile", "no-such-model"), "preset"),
        (("profile", "paper-16l", "--batch", "0"), "batch"),
        (("plan", "gpt2", "--capacity", "50XB"), "unit"),
        (("plan", "gpt2", "--device", "h1000"), "h100"),
        (("partition", "--sizes", "3,-5,2", "--capacity", "10"), "--sizes"),
        (("partition", "--sizes", "3,5,2"), "--capacity"),
        (("plan", "gpt2", "--device", "h100", "--headroom", "1.5"), "headroom"),
        (("plan", "gpt2", "--device", "h100", "--allow", "int9"), "int9"),
    ],
)
def test_bad_input_exits_2_with_a_message_not_a_traceback(args, needle):
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert needle in result.output


def test_bad_config_file_exits_2(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "llama", "hidden_size": 100, "num_attention_heads": 3,
                               "num_hidden_layers": 2, "intermediate_size": 64, "vocab_size": 10}))
    result = run("profile", str(cfg))
    assert result.exit_code == 2 and "head" in result.output
    (tmp_path / "bad.json").write_text("{not json")
    assert run("profile", str(tmp_path / "bad.json")).exit_code == 2


def test_partition_contract():
    result = run("partition", "--sizes", "3,5,2,4,4", "--capacity", "9", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    # 18 bytes on cards of 9: no two parts fit (3+5+2 > 9), three do; among three-part splits the
    # smallest largest part is 8 (e.g. 3+5 | 2+4 | 4)
    assert doc["cards"] == 3 and doc["bottleneck"] == 8
    assert doc["parts"][0][0] == 0 and doc["parts"][-1][1] == 5
    assert all(a[1] == b[0] for a, b in zip(doc["parts"], doc["parts"][1:]))
    assert doc["part_sizes"] == [sum([3, 5, 2, 4, 4][a:b]) for a, b in doc["parts"]]


def test_partition_infeasible_exits_3():
    result = run("partition", "--sizes", "3,12,2", "--capacity", "10", "--json")
    assert result.exit_code == 3
    assert "12" in result.output


def test_plan_json_contract_every_card_within_capacity(tmp_path):
    png = tmp_path / "plan.png"
    result = run("plan", "paper-16l", "--device", "h100", "--json", "--plot", str(png))
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["schema"] == "cachefit.plan/1" and doc["feasible"] is True
    assert doc["cards"] == len(doc["stages"])
    for st in doc["stages"]:
        assert st["total_bytes"] == st["weight_bytes"] + st["activation_bytes"] + st["buffer_bytes"]
        assert st["total_bytes"] <= st["capacity_bytes"]
        assert st["capacity_bytes"] == 52_428_800  # H100 L2, 50 MiB as CUDA reports it
    assert png.stat().st_size > 10_000


def test_plan_with_fixed_cards_balances_over_all_of_them():
    result = run("plan", "gpt2", "--capacity", "200MB", "--cards", "4", "--json")
    doc = json.loads(result.stdout)
    assert result.exit_code == 0 and doc["cards"] == 4 and doc["objective"] == "balanced"


def test_plan_infeasible_exits_3_and_names_the_fix():
    result = run("plan", "gpt2", "--capacity", "100MB", "--cards", "1")
    assert result.exit_code == 3
    assert "cards" in result.output


def test_plan_on_too_few_cards_is_a_partial_fit_with_exit_0():
    # a device with off-chip memory to stream from: the best partial fit, marked, exit 0
    result = run("plan", "gpt2", "--device", "h100", "--cards", "1")
    assert result.exit_code == 0, result.output
    assert "DOES NOT FIT" in result.stdout and "a fit needs" in result.stdout
    doc = json.loads(run("plan", "gpt2", "--device", "h100", "--cards", "1", "--json").stdout)
    assert doc["feasible"] is False and doc["cards"] == 1 and doc["cards_to_fit"] > 1
    assert doc["objective"] == "fewest_offchip_bytes"
    assert doc["stages"][0]["overflow_bytes"] == doc["stages"][0]["total_bytes"] - doc["stages"][0]["capacity_bytes"]


def test_plan_on_more_cards_than_units_splits_them():
    doc = json.loads(run("plan", "gpt2", "--device", "h100", "--cards", "40", "--json").stdout)
    assert doc["cards"] == 40 and doc["feasible"] is True
    assert any(s["shard"] for s in doc["stages"])


def test_compress_roles_reach_the_head_only_with_the_opt_in():
    plain = json.loads(run("plan", "gpt2", "--device", "h100", "--cards", "2", "--allow", "int8", "--json").stdout)
    both = json.loads(run("plan", "gpt2", "--device", "h100", "--cards", "2", "--allow", "int8",
                          "--compress-roles", "head,embed", "--json").stdout)
    assert plain["compress_roles"] == [] and both["compress_roles"] == ["head", "embed"]
    compressed = {name for s in both["stages"] for name in s["unit_compression"]}
    assert compressed & {"head", "embed"}
    assert not {name for s in plain["stages"] for name in s["unit_compression"]} & {"head", "embed"}
    assert run("plan", "gpt2", "--device", "h100", "--compress-roles", "lm").exit_code == 2


def test_devices_json_has_sources():
    result = run("devices", "--json")
    assert result.exit_code == 0
    devices = json.loads(result.stdout)
    names = {d["name"] for d in devices}
    assert {"a100", "h100", "h200", "b200", "mi300x", "groq-lpu", "cerebras-wse3", "graphcore-ipu-mk2",
            "tenstorrent-wormhole-n150"} <= names
    one = run("devices", "h100")
    assert one.exit_code == 0 and "52,428,800" in one.stdout


def test_plan_writes_an_html_report(tmp_path):
    result = run("plan", "gpt2", "--capacity", "100MB", "--report", str(tmp_path / "rep"))
    assert result.exit_code == 0, result.output
    html = (tmp_path / "rep" / "index.html").read_text()
    assert "<table" in html and "gpt2" in html and "data:image/png;base64," in html


def test_ci_runs_the_readme_test_command():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    command = 'pip install torch==2.13.0 -e ".[test]" && python -m pytest -q'
    assert command in readme
    assert command in (root / ".ci" / "run").read_text()


def test_partition_verify_against_the_milp():
    result = run("partition", "--sizes", "3,5,2,4,4,7,1,2", "--cards", "3", "--verify", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["verified"]["bottleneck"] == doc["bottleneck"] == 10


def test_partition_table_shows_the_first_and_last_parts_of_many(tmp_path):
    sizes = tmp_path / "sizes.txt"
    sizes.write_text("\n".join(["7"] * 100) + "\n")
    result = run("partition", "--sizes-file", str(sizes), "--cards", "100")
    assert result.exit_code == 0, result.output
    rows = [line.split("│")[1].strip() for line in result.stdout.splitlines() if line.startswith("│")]
    assert rows == [*map(str, range(20)), "...", *map(str, range(80, 100))]
    assert "60 more parts (--json lists all)" in result.stdout
    assert len(json.loads(run("partition", "--sizes-file", str(sizes), "--cards", "100", "--json").stdout)["parts"]) == 100
