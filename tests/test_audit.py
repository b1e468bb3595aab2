"""``cachefit check``: a device map made by accelerate, checked against hand-computed on-chip fits."""

import json
import warnings

import pytest
from typer.testing import CliRunner

from cachefit.audit import audit_device_map, load_device_map, parse_device_map, place_tensors
from cachefit.cli import app
from cachefit.errors import ConfigError
from cachefit.export import to_accelerate
from cachefit.hardware.devices import device_from_capacity, make_cluster
from cachefit.plan.search import plan_partition
from cachefit.profile import profile_model
from cachefit.units import Workload

# GPT-2 small (GPT2Config() defaults: vocab 50,257, 1,024 positions, hidden 768, 12 layers), FP16:
#   wte  50,257 x 768 x 2 B = 77,194,752 B      wpe 1,024 x 768 x 2 B = 1,572,864 B
#   one block: ln_1 + ln_2 (2 x 2 x 768) + c_attn (768 x 2,304 + 2,304) + attn c_proj (768 x 768 + 768)
#              + c_fc (768 x 3,072 + 3,072) + mlp c_proj (3,072 x 768 + 768) = 7,087,872 params = 14,175,744 B
#   ln_f 2 x 768 x 2 B = 3,072 B; lm_head is tied to wte (the same matrix)
WTE, WPE, BLOCK, LN = 77_194_752, 1_572_864, 14_175_744, 3_072
# Decode, batch 1, a 1,024-token context (cachefit's default workload):
#   KV cache of a layer: 2 (K, V) x 1,024 tokens x 768 x 2 B = 3,145,728 B (persistent)
#   a layer's transient peak (eager attention), what transformers' GPT2Model holds while it runs: the
#   layer input (residual), inputs_embeds and the position lookup kept by the model's forward, the
#   position id (8 B), ln_1's output, c_attn's q, k, v (3 x 1,536), scores and scaled scores 12 heads x
#   1,024 x 2 B each, the int64 token id the caller holds (8 B) and the static cache's int64 fill counter
#   of the layer (8 B): 4 x 1,536 + 8 + 4,608 + 2 x 24,576 + 8 + 8 = 59,928 B; its buffer, the mask row
#   1,024 x 2 B = 2,048 B
#   embed's peak: the token id, the token lookup, the position id, the position lookup and their sum,
#   3 x 1,536 + 8 + 8 = 4,624 B; the head's: the token id 8 B, the final norm 1,536 B and the logits
#   50,257 x 2 B = 100,514 B, 102,058 B
KV, LAYER_PEAK, MASK, EMBED_PEAK, HEAD_PEAK = 3_145_728, 59_928, 2_048, 4_624, 102_058


@pytest.fixture(scope="module")
def gpt2_small():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config()
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    return model, profile_model(cfg.to_dict(), Workload())


def _infer(model, max_memory, **kwargs):
    torch = pytest.importorskip("torch")
    from accelerate import infer_auto_device_map

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Device 0 is not available" on a machine without accelerators
        return dict(infer_auto_device_map(model, max_memory=max_memory, dtype=torch.float16, **kwargs))


def test_profile_matches_the_hand_arithmetic(gpt2_small):
    _, profile = gpt2_small
    assert profile.unit("layers.0").footprint.weight_bytes == BLOCK
    assert profile.unit("embed").footprint.weight_bytes == WTE + WPE
    assert profile.unit("layers.0").footprint.persistent_activation_bytes == KV
    assert profile.unit("layers.0").footprint.transient_activation_bytes == LAYER_PEAK
    assert profile.unit("layers.0").footprint.buffer_bytes == MASK
    assert profile.unit("head").footprint.transient_activation_bytes == HEAD_PEAK


def test_accelerate_map_with_whole_blocks(gpt2_small):
    model, profile = gpt2_small
    device_map = _infer(model, {0: 100_000_000, 1: 200_000_000}, no_split_module_classes=["GPT2Block"])
    # accelerate keeps the tied lm_head with wte on card 0 and sends every block to card 1
    assert device_map == {"transformer.wte": 0, "lm_head": 0, "transformer.wpe": 0, "transformer.drop": 0,
                          "transformer.ln_f": 1, "transformer.h": 1}, "accelerate placed GPT-2 differently"
    audit = audit_device_map(profile, device_map, make_cluster(device_from_capacity("100MB")))
    card0, card1 = audit.cards
    # card 0: wte + wpe (lm_head is the same matrix as wte: counted once) = 78,767,616 B of weights; it runs
    # embed and the head (77,194,752 B of the head's weights are here, 3,072 B of ln_f on card 1), so its
    # activations are the larger peak, the head's 102,050 B: 78,869,666 B, which fits 100,000,000 B
    assert card0.weight_bytes == WTE + WPE == 78_767_616
    assert card0.units == ("embed", "head")
    assert card0.total_bytes == WTE + WPE + max(EMBED_PEAK, HEAD_PEAK) == 78_869_674
    assert card0.fits and card0.spill_bytes == 0 and card0.offchip_bytes_per_token == 0
    # card 1: 12 blocks + ln_f = 170,108,928 + 3,072 = 170,112,000 B of weights, 12 KV caches 37,748,736 B,
    # one layer's transient peak and mask 59,912 + 2,048 B: 207,922,696 B, 107,922,696 B beyond 100 MB
    assert card1.weight_bytes == 12 * BLOCK + LN == 170_112_000
    assert card1.footprint.persistent_activation_bytes == 12 * KV == 37_748_736
    assert card1.total_bytes == 170_112_000 + 37_748_736 + LAYER_PEAK + MASK == 207_922_712
    assert card1.spill_bytes == 107_922_712 and card1.onchip_bytes == 100_000_000
    # the spill comes out of the weights (170 MB of them), read from DRAM once per decode step of 1 token
    assert card1.streamed_weight_bytes == 107_922_712 and card1.spilled_activation_bytes == 0
    assert audit.offchip_bytes_per_token == 107_922_712
    assert not audit.fits
    assert audit.split_units == ("head",) and audit.unmatched_keys == ("transformer.drop",)
    # 286.7 MB in all cannot fit two 100 MB cards: the fix is the fewest cards that fit
    assert audit.plan is not None and audit.plan.feasible and audit.plan.cards >= 3
    assert "no plan fits 2 card(s)" in audit.plan_note


def test_accelerate_map_that_cuts_blocks(gpt2_small):
    model, profile = gpt2_small
    device_map = _infer(model, {0: 100_000_000, 1: 100_000_000, 2: 100_000_000})
    assert device_map["transformer.h.1.ln_1"] == 0 and device_map["transformer.h.1.attn"] == 1, device_map
    audit = audit_device_map(profile, device_map, make_cluster(device_from_capacity("100MB")))
    # card 0: wte + wpe + h.0 + h.1.ln_1 (3,072 B) = 78,767,616 + 14,175,744 + 3,072 = 92,946,432 B
    # card 1: the rest of h.1 (14,172,672 B) + h.2..h.7 (6 x 14,175,744) + h.8.ln_1 (3,072 B) = 99,230,208 B
    # card 2: the rest of h.8 + h.9..h.11 + ln_f = 14,172,672 + 42,527,232 + 3,072 = 56,702,976 B
    assert [c.weight_bytes for c in audit.cards] == [92_946_432, 99_230_208, 56_702_976]
    assert sum(c.weight_bytes for c in audit.cards) == WTE + WPE + 12 * BLOCK + LN
    # a cut layer runs where most of its weights are: layers.1 on card 1, layers.8 on card 2
    assert audit.cards[1].units[0] == "layers.1" and audit.cards[2].units[0] == "layers.8"
    assert set(audit.split_units) == {"layers.1", "layers.8", "head"}
    # card 1: 99,230,208 + 7 KV caches (layers.1..7) 22,020,096 + 61,960 = 121,312,264 B: spills 21,312,264 B
    assert audit.cards[1].total_bytes == 99_230_208 + 7 * KV + LAYER_PEAK + MASK == 121_312_280
    assert audit.cards[1].streamed_weight_bytes == 21_312_280


def test_offloaded_weights_stream_every_step(gpt2_small):
    model, profile = gpt2_small
    device_map = _infer(model, {0: 60_000_000, 1: 60_000_000, "cpu": 10**9}, no_split_module_classes=["GPT2Block"])
    assert device_map == {"": "cpu"}  # the embedding (78.8 MB) fits neither card
    audit = audit_device_map(profile, device_map, make_cluster(device_from_capacity("60MB")))
    assert audit.cards == ()
    (cpu,) = audit.offloaded
    # every weight, the tied matrix once: 77,194,752 + 1,572,864 + 170,108,928 + 3,072 = 248,879,616 B a token
    assert cpu.weight_bytes == 248_879_616 == audit.offchip_bytes_per_token
    assert not audit.fits
    assert audit.plan is not None and audit.plan.feasible


def test_tied_matrix_on_two_cards_counts_on_both(gpt2_small):
    _, profile = gpt2_small
    device_map = {"transformer.wte": 0, "transformer.wpe": 0, "transformer.h": 0, "transformer.ln_f": 1,
                  "lm_head": 1}
    audit = audit_device_map(profile, device_map, make_cluster(device_from_capacity("1GB")), fix=False)
    assert audit.cards[0].weight_bytes == WTE + WPE + 12 * BLOCK
    assert audit.cards[1].weight_bytes == LN + WTE  # lm_head reads the whole wte matrix on card 1
    assert audit.fits


def test_a_cachefit_export_audits_to_the_plan():
    # round trip: plan -> accelerate map -> audit gives back every card's planned bytes (untied model)
    profile = profile_model("llama-3.1-8b", Workload(seq_len=512))
    cluster = make_cluster(device_from_capacity("3GB"))
    plan, _ = plan_partition(profile, cluster, num_cards=6)
    audit = audit_device_map(profile, to_accelerate(plan, profile).document, cluster, fix=False)
    def parts(fp):
        return fp.weight_bytes, fp.activation_bytes, fp.persistent_activation_bytes, fp.buffer_bytes

    assert [parts(c.footprint) for c in audit.cards] == [parts(s.footprint) for s in plan.stages]
    assert audit.fits == plan.feasible


@pytest.mark.parametrize("raw, needle", [
    ({"transformer": 0}, "lm_head.weight"),
    ({"": "meta"}, "'meta'"),
    ({"": True}, "card index"),
    ({"": -1}, "start at 0"),
    ({}, "non-empty"),
    ([1, 2], "non-empty"),
])
def test_bad_maps_say_what_to_change(raw, needle):
    profile = profile_model("gpt2")
    with pytest.raises(ConfigError, match=needle):
        audit_device_map(profile, raw, make_cluster(device_from_capacity("1GB")), fix=False)


def test_parse_accepts_accelerate_spellings():
    assert parse_device_map({"a": "cuda:1", "b": "2", "c": "CPU", "d": "disk", "e": 0, "f": "mps"}) == {
        "a": 1, "b": 2, "c": "cpu", "d": "disk", "e": 0, "f": 0}
    envelope = {"schema": "cachefit.export/1", "format": "accelerate", "document": {"": 0}}
    assert parse_device_map(envelope) == {"": 0}
    assert parse_device_map({"device_map": {"x": 1}}) == {"x": 1}


def test_longest_key_wins():
    profile = profile_model("gpt2")
    placed = place_tensors(profile, {"": 0, "transformer.h.3": 1, "transformer.h.3.mlp": "cpu"})
    assert placed["transformer.h.3.attn.c_attn.weight"] == 1
    assert placed["transformer.h.3.mlp.c_fc.weight"] == "cpu"
    assert placed["transformer.h.4.mlp.c_fc.weight"] == 0


def test_map_beyond_the_cluster_is_refused():
    profile = profile_model("gpt2")
    dev = device_from_capacity("1GB")
    with pytest.raises(ConfigError, match="cluster has 2 card"):
        audit_device_map(profile, {"": 2}, make_cluster([dev, dev]), fix=False)


def test_check_cli_json_and_table(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"transformer.wte": 0, "lm_head": 0, "transformer.wpe": 0, "transformer.drop": 0,
                                "transformer.ln_f": 1, "transformer.h": 1}))
    assert load_device_map(path)["transformer.h"] == 1
    runner = CliRunner()
    result = runner.invoke(app, ["check", "gpt2", "--device-map", str(path), "--capacity", "100MB", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["schema"] == "cachefit.check/1"
    # the gpt2 preset is GPT-2 small: the same numbers as above
    assert [c["total_bytes"] for c in doc["cards"]] == [78_869_674, 207_922_712]
    assert doc["spill_bytes"] == 107_922_712 and doc["offchip_bytes_per_token"] == 107_922_712
    assert doc["fix"]["feasible"] and doc["fix"]["plan"]["schema"] == "cachefit.plan/1"
    result = runner.invoke(app, ["check", "gpt2", "--device-map", str(path), "--capacity", "100MB"])
    assert result.exit_code == 0 and "does not fit" in result.stdout and "fix:" in result.stdout
    path.write_text("{not json")
    result = runner.invoke(app, ["check", "gpt2", "--device-map", str(path), "--capacity", "100MB"])
    assert result.exit_code == 2 and "not JSON" in result.output and "Traceback" not in result.output
