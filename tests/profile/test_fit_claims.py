"""Fits that cachefit once claimed and the real forward refutes, and the ``--kv-cache`` option.

The claim: ``cachefit plan CONFIG --capacity 400MB --mode prefill --seq 2048 --batch 1 --dtype bf16
--attention eager`` for a two-layer Llama of width 1024 (8 heads, MLP 3584, vocabulary 32000, untied)
said one card fits at 86% (343.9 MB: the idealized walk). transformers' forward of that model holds
191.9 MB of weights and, measured op by op (tests/profile/test_activation_peaks.py's tracker), an
activation peak of 370,163,712 B while ``layers.1`` runs: the eager scores in bf16, their fp32 copy
and fp32 softmax beside them, the keys and values, the held layer input, ``inputs_embeds`` and the
attention's normed input, the mask and the rotary tables.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cachefit.cli import app
from cachefit.profile.hf_config import load_transformer_spec
from cachefit.profile.transformer import build_units
from cachefit.units import Workload

CONFIG = {
    "model_type": "llama", "hidden_size": 1024, "num_attention_heads": 8, "num_key_value_heads": 8,
    "intermediate_size": 3584, "num_hidden_layers": 2, "vocab_size": 32000, "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}  # fmt: skip
WORKLOAD = Workload(batch=1, seq_len=2048, mode="prefill", weight_dtype="bf16", act_dtype="bf16", attention="eager")
# Measured by test_the_claimed_config_matches_its_measured_peak (slow: about 10 s on 2 CPU cores).
MEASURED_LAYER_PEAK = 370_163_712
MEASURED_WEIGHTS = 191_899_648

runner = CliRunner()


@pytest.fixture
def config_path(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(CONFIG))
    return str(path)


def test_the_plan_no_longer_fits_one_card(config_path: str) -> None:
    result = runner.invoke(app, [
        "plan", config_path, "--capacity", "400MB", "--mode", "prefill", "--seq", "2048", "--batch", "1",
        "--dtype", "bf16", "--attention", "eager", "--json",
    ])  # fmt: skip
    assert result.exit_code in (0, 3), result.output
    if result.exit_code == 0:
        plan = json.loads(result.stdout)
        # 191.9 MB of weights + a 370.2 MB peak > 400 MB: one card cannot hold the whole forward.
        assert plan["cards"] >= 2
        assert all(stage["total_bytes"] <= stage["capacity_bytes"] for stage in plan["stages"])


def test_the_profile_is_not_below_the_measured_peak() -> None:
    units = {u.name: u for u in build_units(load_transformer_spec(CONFIG, name="claim"), WORKLOAD)}
    peak = max(u.footprint.activation_bytes + u.footprint.buffer_bytes for u in units.values())
    weights = sum(u.footprint.weight_bytes for u in units.values())
    assert weights == MEASURED_WEIGHTS
    assert MEASURED_LAYER_PEAK <= peak <= 1.35 * MEASURED_LAYER_PEAK
    # One card would need the weights and that peak at once: 562 MB, not 344 MB.
    assert weights + MEASURED_LAYER_PEAK > 400_000_000


@pytest.mark.slow
def test_the_claimed_config_matches_its_measured_peak() -> None:
    """Measure the claimed model itself (random bf16 weights): every unit within [1.0, 1.35]."""
    transformers = pytest.importorskip("transformers")
    from test_activation_peaks import Case, analytic, measured  # this folder's tracker

    config = transformers.LlamaConfig(**{k: v for k, v in CONFIG.items() if k != "model_type"})
    case = Case("llama", "bf16", "eager", "prefill", batch=1, seq=2048, hidden=1024, heads=8, kv_heads=8)
    real, model = measured(case, config), analytic(case, config)
    assert real["layers.1"] == MEASURED_LAYER_PEAK
    for unit, nbytes in model.items():
        assert 1.0 <= nbytes / real[unit] <= 1.35, (unit, nbytes, real[unit])


@pytest.mark.parametrize("kv_cache", ["static", "dynamic"])
def test_profile_takes_a_kv_cache_kind(config_path: str, kv_cache: str) -> None:
    result = runner.invoke(app, [
        "profile", config_path, "--mode", "decode", "--seq", "512", "--attention", "flash", "--kv-cache", kv_cache,
        "--json",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    # The workload names the kind only when it is not the default, so older digests stay the same.
    assert doc["workload"].get("kv_cache", "static") == kv_cache
    layer = next(u for u in doc["units"] if u["name"] == "layers.0")
    workload = Workload(seq_len=512, mode="decode", attention="flash", kv_cache=kv_cache)
    unit = build_units(load_transformer_spec(CONFIG), workload)[1]
    assert layer["activation_bytes"] == unit.footprint.activation_bytes
    # A DynamicCache grows by torch.cat: while the values are joined, one more S-token half of the
    # cache (512 x 8 heads x 128 x 2 B = 1 MiB) is alive beside it, which makes the layer's peak.
    grown = dict(unit.footprint.activation_parts).get("kv_cache.grown", 0)
    assert grown == (1_048_576 if kv_cache == "dynamic" else 0)


def test_a_bad_kv_cache_kind_is_a_usage_error(config_path: str) -> None:
    result = runner.invoke(app, ["profile", config_path, "--kv-cache", "paged"])
    assert result.exit_code == 2
