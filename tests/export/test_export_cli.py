"""``cachefit export``: every format from a real plan file, JSON envelope, exit codes."""

import json
import subprocess
import sys

import pytest
from conftest import CONFIGS
from typer.testing import CliRunner

from cachefit.cli import app

runner = CliRunner()


@pytest.fixture()
def plan_file(tmp_path, monkeypatch):
    """A plan of the tiny llama (4 layers) on 200 KB cards, made from its config.json by `cachefit plan`."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS["llama"]))
    result = runner.invoke(app, ["plan", "config.json", "--capacity", "200KB", "--seq", "64", "--json"])
    assert result.exit_code == 0, result.output
    path = tmp_path / "plan.json"
    path.write_text(result.stdout)
    return path


def test_accelerate_prints_the_bare_device_map(plan_file):
    result = runner.invoke(app, ["export", str(plan_file), "--to", "accelerate"])
    assert result.exit_code == 0, result.output
    # 200 KB cards: [embed, layers.0], [layers.1, layers.2], [layers.3, head] (99,520 B a layer)
    assert json.loads(result.stdout) == {
        "model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "model.layers.2": 1,
        "model.layers.3": 2, "model.norm": 2, "lm_head": 2,
    }


def test_every_format_and_the_json_envelope(plan_file):
    for fmt in ("accelerate", "pipelining", "deepspeed", "llamacpp", "megatron", "vllm"):
        result = runner.invoke(app, ["export", str(plan_file), "--to", fmt, "--json"])
        assert result.exit_code == 0, result.output
        doc = json.loads(result.stdout)
        assert doc["schema"] == "cachefit.export/1" and doc["format"] == fmt and doc["model"] == "config.json"
        assert isinstance(doc["warnings"], list)
    result = runner.invoke(app, ["export", str(plan_file), "--to", "llamacpp"])
    assert result.stdout.splitlines()[0] == "--split-mode layer --n-gpu-layers 5 --tensor-split 1,2,2"
    result = runner.invoke(app, ["export", str(plan_file), "--to", "deepspeed"])
    compile(result.stdout, "<snippet>", "exec")
    assert "PARTS = [0, 2, 4, 6]" in result.stdout
    result = runner.invoke(app, ["export", str(plan_file), "--to", "megatron"])
    assert result.stdout.splitlines()[0] == ("--tensor-model-parallel-size 1 --pipeline-model-parallel-size 3 "
                                             "--pipeline-model-parallel-layout 'Et|t*2|tL'")
    result = runner.invoke(app, ["export", str(plan_file), "--to", "vllm"])
    assert result.stdout.startswith("VLLM_PP_LAYER_PARTITION=1,2,1 vllm serve MODEL --tensor-parallel-size 1 ")


def test_an_engine_refusal_is_one_line_and_exit_2(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS["llama"]))
    result = runner.invoke(app, ["plan", "config.json", "-g", "block", "--capacity", "150KB", "--seq", "64", "--json"])
    assert result.exit_code == 0, result.output
    (tmp_path / "plan.json").write_text(result.stdout)
    for fmt in ("megatron", "vllm"):
        result = runner.invoke(app, ["export", "plan.json", "--to", fmt])
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert "inside decoder layer" in result.output and "the nearest" in result.output


def test_out_file_and_model_override(plan_file, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the plan's model, "config.json", is not here
    result = runner.invoke(app, ["export", str(plan_file), "--to", "pipelining"])
    assert result.exit_code == 2 and "--model" in result.output
    out = tmp_path / "split.json"
    result = runner.invoke(app, ["export", str(plan_file), "--to", "pipelining", "--model",
                                 str(tmp_path / "config.json"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["split_spec"] == {"model.layers.1": "BEGINNING", "model.layers.3": "BEGINNING"}


@pytest.mark.parametrize("args, needle", [
    (["--to", "onnx"], "accelerate"),
    (["--to", "accelerate", "--model", "gpt2"], "units"),
])
def test_bad_input_is_one_line_and_exit_2(plan_file, args, needle):
    result = runner.invoke(app, ["export", str(plan_file), *args])
    assert result.exit_code == 2
    assert needle in result.output and "Traceback" not in result.output


def test_malformed_plan_is_exit_2(tmp_path):
    bad = tmp_path / "plan.json"
    bad.write_text('{"schema": "cachefit.plan/1", "stages": 3}')
    result = runner.invoke(app, ["export", str(bad), "--to", "accelerate"])
    assert result.exit_code == 2 and "malformed plan" in result.output


def test_export_and_audit_import_no_torch():
    code = (
        "import sys\n"
        "import cachefit.export, cachefit.audit\n"
        "from cachefit.export import export_plan\n"
        "from cachefit.plan.search import plan_partition\n"
        "from cachefit.profile import profile_model\n"
        "from cachefit.hardware import device_from_capacity, make_cluster\n"
        "plan, _ = plan_partition(profile_model('gpt2'), make_cluster(device_from_capacity('100MB')), num_cards=4)\n"
        "for fmt in ('accelerate', 'pipelining', 'deepspeed', 'llamacpp'): export_plan(plan, fmt)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'accelerate'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
