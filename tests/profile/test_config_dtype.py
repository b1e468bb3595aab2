"""The checkpoint's dtype by default: a plan or profile made from a config.json or a model directory
takes its ``dtype`` / ``torch_dtype`` unless ``--dtype`` is given, and says so on stderr and in --json."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cachefit.cli import app
from cachefit.profile.hf_config import read_config_dtype

runner = CliRunner()

# a small Llama config (sizes only matter for the profile to run)
LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128, "hidden_size": 64,
         "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 64}


def _write(tmp_path, **keys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**LLAMA, **keys}))
    return path


@pytest.mark.parametrize("keys,dtype,key", [
    ({"torch_dtype": "bfloat16"}, "bf16", "torch_dtype"),
    ({"dtype": "float32"}, "fp32", "dtype"),
    ({"torch_dtype": "float16"}, "fp16", "torch_dtype"),
    ({"torch_dtype": "torch.bfloat16"}, "bf16", "torch_dtype"),
    # transformers 5 reads `dtype` where both are written
    ({"dtype": "float32", "torch_dtype": "bfloat16"}, "fp32", "dtype"),
    ({"dtype": None, "torch_dtype": "bfloat16"}, "bf16", "torch_dtype"),
])
def test_config_dtype_is_read(tmp_path, keys, dtype, key):
    found = read_config_dtype(_write(tmp_path, **keys))
    assert (found.dtype, found.key) == (dtype, key)


@pytest.mark.parametrize("keys", [{}, {"torch_dtype": "auto"}, {"torch_dtype": "float64"}, {"dtype": 3},
                                  {"torch_dtype": "int8"}])
def test_a_config_without_a_planned_dtype_gives_none(tmp_path, keys):
    found = read_config_dtype(_write(tmp_path, **keys))
    assert found.dtype is None
    assert ("no torch_dtype / dtype" in found.describe()) == (not keys)


def _profile(*args):
    result = runner.invoke(app, ["profile", *args, "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    return json.loads(result.stdout), result.stderr


def test_profile_of_a_config_file_takes_its_torch_dtype(tmp_path):
    doc, err = _profile(str(_write(tmp_path, torch_dtype="bfloat16")))
    assert doc["workload"]["weight_dtype"] == doc["workload"]["act_dtype"] == "bf16"
    assert doc["dtype_source"] == {"dtype": "bf16", "source": "checkpoint",
                                   "note": "dtype bf16 from the checkpoint's config (torch_dtype); --dtype overrides"}
    assert err.strip() == "note: dtype bf16 from the checkpoint's config (torch_dtype); --dtype overrides"


def test_plan_of_a_model_directory_takes_its_dtype(tmp_path):
    _write(tmp_path, dtype="float32")
    result = runner.invoke(app, ["plan", str(tmp_path), "--capacity", "400KB", "--mode", "prefill", "--seq", "8",
                                 "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    doc = json.loads(result.stdout)
    assert doc["workload"]["weight_dtype"] == "fp32" and doc["dtype_source"]["source"] == "checkpoint"
    assert "dtype fp32 from the checkpoint's config (dtype)" in result.stderr
    # the table output says the same on stderr, nothing on stdout
    table = runner.invoke(app, ["plan", str(tmp_path), "--capacity", "400KB", "--mode", "prefill", "--seq", "8"])
    assert table.exit_code == 0 and "--dtype overrides" in table.stderr and "--dtype overrides" not in table.stdout


def test_an_explicit_dtype_overrides_the_checkpoint_silently(tmp_path):
    doc, err = _profile(str(_write(tmp_path, torch_dtype="bfloat16")), "--dtype", "fp16")
    assert doc["workload"]["weight_dtype"] == "fp16"
    assert doc["dtype_source"] == {"dtype": "fp16", "source": "--dtype", "note": None}
    assert err == ""


def test_a_config_without_a_dtype_keeps_the_default_and_says_so(tmp_path):
    doc, err = _profile(str(_write(tmp_path)))
    assert doc["workload"]["weight_dtype"] == "fp16" and doc["dtype_source"]["source"] == "default"
    assert "dtype fp16: no torch_dtype / dtype in the checkpoint's config" in err and "--dtype overrides" in err
    doc, err = _profile(str(_write(tmp_path, torch_dtype="auto")))
    assert doc["workload"]["weight_dtype"] == "fp16" and "'auto', which cachefit does not plan in" in err


def test_a_preset_keeps_the_default_without_a_note():
    doc, err = _profile("gpt2")
    assert doc["workload"]["weight_dtype"] == "fp16"
    assert doc["dtype_source"] == {"dtype": "fp16", "source": "default", "note": None} and err == ""


def test_compare_takes_the_checkpoints_dtype(tmp_path):
    config = str(_write(tmp_path, torch_dtype="bfloat16"))
    result = runner.invoke(app, ["compare", config, "--device", "h100", "--cards", "1", "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    assert "dtype bf16 from the checkpoint's config" in result.stderr
