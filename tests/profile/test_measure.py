"""Measured profiles: the real module's forward on fake tensors, cut into the analytic profile's units.

Small worked cases with the arithmetic in a comment, the pieces that a measured profile promises
(weights, other layers' KV caches left out, the tensors at a peak, ``memory_source`` in plans and on
the command line), and a property over random small configs of ten families: the analytic bytes are
never below the measured ones.
"""

from __future__ import annotations

import json
import sys

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from torch import nn  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from cachefit.cli import app  # noqa: E402
from cachefit.errors import ConfigError, ProfileError  # noqa: E402
from cachefit.hardware import device_from_capacity, make_cluster  # noqa: E402
from cachefit.plan import Plan  # noqa: E402
from cachefit.plan.search import plan_partition  # noqa: E402
from cachefit.profile import (  # noqa: E402
    MeasuredProfile,
    measure_profile,
    memory_source,
    profile_model,
)
from cachefit.units import Workload  # noqa: E402

F32 = 4
# A Llama small enough to count by hand: h 64, 4 heads of 16, 2 KV heads, f 128, 2 layers, vocab 100.
LLAMA = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=100)


def _wl(mode: str = "prefill", **kw) -> Workload:
    return Workload(batch=kw.pop("batch", 2), seq_len=kw.pop("seq_len", 16), mode=mode, weight_dtype="fp32",
                    act_dtype="fp32", **kw)


# --- worked cases -----------------------------------------------------------------------------


def test_a_generic_module_by_hand():
    # Linear(16, 32) -> ReLU -> Linear(32, 8) on x of 4 x 16, fp32; x stays alive (the caller holds it).
    #   unit "0": x 4*16*4 = 256 + addmm out 4*32*4 = 512                      -> 768
    #   unit "1": x 256 + the Linear's output 512 (Sequential still holds it) + relu out 512 -> 1280
    #   unit "2": x 256 + relu out 512 + addmm out 4*8*4 = 128                 -> 896
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    prof = measure_profile(model, example_inputs=torch.randn(4, 16))
    assert [u.name for u in prof.units] == ["0", "1", "2"]
    assert [u.footprint.activation_bytes for u in prof.units] == [768, 1280, 896]
    assert [u.footprint.weight_bytes for u in prof.units] == [(16 * 32 + 32) * F32, 0, (32 * 8 + 8) * F32]
    assert isinstance(model[0].weight, nn.Parameter) and not isinstance(
        model[0].weight.data, torch._subclasses.fake_tensor.FakeTensor)  # the real weights are back


def test_units_weights_and_tensors_are_the_analytic_profile_s():
    wl = _wl()
    measured = profile_model(LLAMA, wl, measure=True)
    analytic = profile_model(LLAMA, wl)
    assert isinstance(measured, MeasuredProfile) and memory_source(measured) == "measured"
    assert memory_source(analytic) == "analytic"
    assert [u.name for u in measured.units] == ["embed", "layers.0", "layers.1", "head"]
    for m, a in zip(measured.units, analytic.units):
        assert (m.name, m.kind, m.params, m.tensors, m.flops_per_token) == (a.name, a.kind, a.params, a.tensors,
                                                                           a.flops_per_token)
        # every Llama weight is a parameter the analytic profile lists: the bytes agree exactly
        assert m.footprint.weight_bytes == a.footprint.weight_bytes
        assert m.shape is None and m.footprint.buffer_bytes == 0
    assert [p.unit for p in measured.peaks] == [u.name for u in measured.units]
    assert "LlamaForCausalLM" in measured.method and "FakeTensorMode" in measured.method
    # one layer: its module list holds only that layer, but the unit is the layer (the list never runs)
    one = profile_model(dict(LLAMA, num_hidden_layers=1), wl, measure=True)
    assert all(p.ops > 0 for p in one.peaks)


def test_the_embedding_peak_by_hand():
    # prefill, batch 2 x 16 tokens: the ids 2*16*8 = 256 B and the lookup 2*16*64*4 = 8192 B
    prof = measure_profile(LLAMA, _wl(), granularity="block")
    embed = prof.peaks[0]
    assert embed.peak_bytes == 256 + 8192
    assert [(t.op, t.shape, t.dtype) for t in embed.live] == [("aten.embedding", (2, 16, 64), "float32"),
                                                              ("input", (2, 16), "int64")]
    assert [u.name for u in prof.units][1:3] == ["layers.0.attn", "layers.0.mlp"]


def test_decode_keeps_its_own_kv_cache_and_not_the_other_layers():
    # decode, batch 2, a static cache of 16 positions: per layer K and V of 2 x 2 KV heads x 16 x 16 fp32
    # = 2 * 2*2*16*16*4 = 16384 B, and the layer's int64 fill counter (StaticLayer.cumulative_length) 8 B:
    # this layer's persistent bytes; layer 1 never counts layer 0's cache
    prof = measure_profile(LLAMA, _wl("decode"))
    kv = 2 * (2 * 2 * 16 * 16 * F32) + 8
    for name in ("layers.0", "layers.1"):
        unit = prof.unit(name)
        assert unit.footprint.persistent_activation_bytes == kv
        assert unit.footprint.activation_bytes >= kv
    layer1 = prof.peaks[2]
    caches = [t for t in layer1.live if t.kind == "kv_cache" and t.shape]  # K and V (the counter is 0-d)
    assert len(caches) == 2 and all(t.module == "model.layers.1.self_attn" for t in caches)
    assert not any(t.module == "model.layers.0.self_attn" for t in layer1.live)  # only its output reaches it
    assert prof.unit("embed").footprint.persistent_activation_bytes == 0


def test_micro_batches_multiply_the_kv_cache_in_decode():
    one = measure_profile(LLAMA, _wl("decode"))
    four = measure_profile(LLAMA, _wl("decode", micro_batches=4))
    for a, b in zip(one.units, four.units):
        kv = a.footprint.persistent_activation_bytes
        assert b.footprint.persistent_activation_bytes == 4 * kv
        assert b.footprint.activation_bytes == a.footprint.activation_bytes + 3 * kv


def test_the_live_tensors_add_up_to_the_peak():
    prof = measure_profile(LLAMA, _wl("decode"))
    for peak, unit in zip(prof.peaks, prof.units):
        assert sum(t.nbytes for t in peak.live) + peak.other_bytes == peak.peak_bytes
        assert [t.nbytes for t in peak.live] == sorted((t.nbytes for t in peak.live), reverse=True)
        assert sum(n for _, n in unit.footprint.activation_parts) == unit.footprint.activation_bytes
        doc = peak.to_dict()
        assert set(doc["live_at_peak"][0]) == {"shape", "dtype", "bytes", "op", "module", "kind"}


def test_train_counts_what_autograd_saves_for_the_unit():
    prof = measure_profile(LLAMA, _wl("train"))
    # the embedding's backward keeps its int64 indices: 2*16*8 = 256 B
    assert prof.unit("embed").footprint.persistent_activation_bytes == 256
    for unit in prof.units[1:]:
        assert 0 < unit.footprint.persistent_activation_bytes <= unit.footprint.activation_bytes


def test_a_live_transformers_model_measures_like_its_config():
    config = transformers.LlamaConfig(**{k: v for k, v in LLAMA.items() if k != "model_type"})
    model = transformers.LlamaForCausalLM(config)  # real weights, sdpa attention, train mode
    wl = _wl("decode")
    live = measure_profile(model, wl)
    built = measure_profile(LLAMA, wl)
    assert [u.footprint for u in live.units] == [u.footprint for u in built.units]
    assert model.training and model.config._attn_implementation == "sdpa"  # restored
    assert not isinstance(model.lm_head.weight.data, torch._subclasses.fake_tensor.FakeTensor)


def test_what_cannot_be_measured_says_why(monkeypatch):
    with pytest.raises(ProfileError, match="no transformers class"):
        measure_profile("paper-16l", Workload(mode="prefill", seq_len=8))
    with pytest.raises(ConfigError, match="one dtype"):
        measure_profile(LLAMA, Workload(weight_dtype="fp16", act_dtype="fp32"))
    with pytest.raises(ConfigError, match="encoder"):
        measure_profile(dict(model_type="bert", hidden_size=32, intermediate_size=48, num_attention_heads=4,
                             num_hidden_layers=1, vocab_size=50, max_position_embeddings=16), _wl("decode"))
    with pytest.raises(ConfigError, match="example_inputs"):
        measure_profile(nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="preset"):
        measure_profile("no-such-model")
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    with pytest.raises(ConfigError, match="transformers"):
        measure_profile(LLAMA, _wl())


# --- plans -------------------------------------------------------------------------------------


def test_a_plan_records_where_its_bytes_came_from():
    cluster = make_cluster(device_from_capacity("1MB"))
    wl = _wl()
    measured, _ = plan_partition(profile_model(LLAMA, wl, measure=True), cluster)
    analytic, _ = plan_partition(profile_model(LLAMA, wl), cluster)
    assert (measured.memory_source, analytic.memory_source) == ("measured", "analytic")
    # the measured plan's stages carry the measured footprints
    prof = profile_model(LLAMA, wl, measure=True)
    assert measured.stages[0].footprint.weight_bytes == sum(
        u.footprint.weight_bytes for u in prof.units[slice(*measured.stages[0].units)])
    doc = measured.to_dict()
    assert doc["memory_source"] == "measured"
    assert Plan.from_dict(json.loads(json.dumps(doc))).memory_source == "measured"
    del doc["memory_source"]  # a plan written before the field existed
    assert Plan.from_dict(doc).memory_source == "analytic"
    doc["memory_source"] = "guessed"
    with pytest.raises(ConfigError, match="memory_source"):
        Plan.from_dict(doc)


# --- command line ------------------------------------------------------------------------------

runner = CliRunner()


def test_cli_profile_plan_and_compare_take_measure(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(LLAMA))
    result = runner.invoke(app, ["profile", str(tmp_path), "--measure", "--json", "--mode", "prefill", "--seq", "16",
                                 "--dtype", "fp32"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["memory_source"] == "measured"
    assert [u["name"] for u in doc["measured"]["units"]] == [u["name"] for u in doc["units"]]
    assert doc["measured"]["units"][0]["live_at_peak"][0]["op"] == "aten.embedding"
    plain = json.loads(runner.invoke(app, ["profile", str(cfg), "--json"]).stdout)
    assert plain["memory_source"] == "analytic"

    result = runner.invoke(app, ["plan", str(cfg), "--measure", "--capacity", "1MB", "--json", "--seq", "16"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["memory_source"] == "measured"
    result = runner.invoke(app, ["compare", str(cfg), "--measure", "--capacity", "1MB", "--cards", "2", "--json",
                                 "--seq", "16"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["memory_source"] == "measured"

    result = runner.invoke(app, ["profile", str(cfg), "--measure", "--seq", "16"])
    assert result.exit_code == 0 and "memory: measured" in result.stdout and "largest activation peak" in result.stdout
    result = runner.invoke(app, ["profile", "paper-16l", "--measure"])
    assert result.exit_code == 2 and "no transformers class" in result.output


@pytest.mark.slow
def test_cli_measures_llama_3_1_70b(hang_guard):
    # the bound (under 30 s on the 2-core machine) is recorded in docs/benchmarks.md; here only
    # that it completes, whole: 80 layers, each with its own 8 KV heads x 1024 x 128 fp16 cache (and its
    # int64 fill counter)
    with hang_guard():
        result = runner.invoke(app, ["profile", "llama-3.1-70b", "--measure", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert len(doc["units"]) == 82 and doc["measured"]["method"].startswith("transformers LlamaForCausalLM")
    assert doc["units"][1]["persistent_activation_bytes"] == 2 * 8 * 1024 * 128 * 2 + 8


# --- analytic >= measured, over random small configs -----------------------------------------

FAMILIES = ("llama", "mistral", "qwen2", "gemma", "phi3", "gpt2", "gpt_neox", "opt", "bert", "falcon")


@st.composite
def _configs(draw, family: str) -> dict:
    heads = draw(st.sampled_from([2, 4]))
    head_dim = 8
    hidden = heads * head_dim
    kv = draw(st.sampled_from([d for d in (1, 2, 4) if heads % d == 0]))
    inter = draw(st.sampled_from([16, 24, 48]))
    layers = draw(st.integers(1, 2))
    vocab = draw(st.integers(11, 67))
    common = dict(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads, num_hidden_layers=layers,
                  vocab_size=vocab)
    if family in ("llama", "mistral", "qwen2"):
        return dict(model_type=family, num_key_value_heads=kv, **common)
    if family == "gemma":
        return dict(model_type="gemma", num_key_value_heads=kv, head_dim=head_dim, **common)
    if family == "phi3":
        return dict(model_type="phi3", num_key_value_heads=kv, pad_token_id=0, **common)
    if family == "gpt2":
        return dict(model_type="gpt2", n_embd=hidden, n_head=heads, n_layer=layers, n_positions=64, vocab_size=vocab,
                    n_inner=draw(st.sampled_from([None, inter])))
    if family == "gpt_neox":
        return dict(model_type="gpt_neox", use_parallel_residual=draw(st.booleans()), **common)
    if family == "opt":
        return dict(model_type="opt", hidden_size=hidden, ffn_dim=inter, num_attention_heads=heads,
                    num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=64,
                    word_embed_proj_dim=draw(st.sampled_from([hidden, hidden // 2])))
    if family == "bert":
        arch = draw(st.sampled_from(["BertModel", "BertForMaskedLM"]))
        return dict(model_type="bert", architectures=[arch], max_position_embeddings=64, **common)
    return dict(model_type="falcon", hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers,
                vocab_size=vocab, multi_query=draw(st.booleans()), parallel_attn=draw(st.booleans()))


def _workloads(encoder: bool):
    modes = ["prefill", "train"] if encoder else ["prefill", "decode", "train"]
    return st.builds(
        lambda mode, batch, seq, attention, dtype: Workload(batch=batch, seq_len=seq, mode=mode, attention=attention,
                                                            weight_dtype=dtype, act_dtype=dtype),
        st.sampled_from(modes), st.integers(1, 3), st.integers(2, 24), st.sampled_from(["eager", "flash"]),
        st.sampled_from(["fp32", "bf16"]),
    )


# Where the analytic model (cachefit.profile.activations) is still below the real modules' peak. Each
# entry: what the measured run held that the model leaves out (drop an entry once its family passes).
PENDING_ANALYTIC: dict[str, str] = {}


@pytest.mark.slow
@pytest.mark.parametrize("family", [
    pytest.param(f, marks=pytest.mark.xfail(reason=PENDING_ANALYTIC[f], strict=False)) if f in PENDING_ANALYTIC
    else f
    for f in FAMILIES
])
def test_analytic_bytes_are_never_below_the_measured(family):
    # no shrinking: each example builds and runs a model (a failure names its unit and tensors instead)
    @settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True,
              phases=[Phase.explicit, Phase.generate])
    @given(config=_configs(family), workload=_workloads(family == "bert"), granularity=st.sampled_from(["layer", "block"]))
    def check(config, workload, granularity):
        measured = profile_model(config, workload, granularity=granularity, measure=True)
        analytic = profile_model(config, workload, granularity=granularity)
        for m, a in zip(measured.units, analytic.units, strict=True):
            modelled = a.footprint.activation_bytes + a.footprint.buffer_bytes
            assert modelled >= m.footprint.activation_bytes, (
                f"{a.name}: analytic {modelled} B < measured {m.footprint.activation_bytes} B; live at the peak: "
                + ", ".join(f"{t.op} {t.shape} {t.dtype} in {t.module or 'the model'}"
                            for t in measured.peaks[measured.units.index(m)].live)
            )

    check()
