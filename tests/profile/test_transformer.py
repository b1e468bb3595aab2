"""The unit builder: TransformerSpec + Workload -> units, and profile_model.

Specs are built by hand here (Llama-like, GPT-2-like, BERT-like, MoE, the seed paper's model) so
these tests do not depend on the config loader; the arithmetic is in the comments.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachefit.profile.activations import estimate_activations
from cachefit.errors import ConfigError, ProfileError
from cachefit.profile import profile_model
from cachefit.profile.spec import TransformerSpec
from cachefit.profile.transformer import build_units, profile_transformer
from cachefit.units import LayerShape, TensorSpec, Workload


def _t(
    name: str, shape: tuple[int, ...], role: str, block: str | None = None, tied_to: str | None = None
) -> TensorSpec:
    return TensorSpec(name=name, shape=shape, role=role, block=block, tied_to=tied_to)


def llama_spec(
    *,
    layers: int = 2,
    h: int = 64,
    heads: int = 4,
    kv: int = 2,
    d: int = 16,
    f: int = 128,
    vocab: int = 100,
    gated: bool = True,
    tie: bool = False,
    experts: int = 0,
    name: str = "tiny-llama",
) -> TransformerSpec:
    """A Llama-style decoder with transformers' FQNs (MoE: Mixtral-style fused 3-D expert tensors)."""
    per_layer = []
    for i in range(layers):
        p = f"model.layers.{i}"
        ts = [
            _t(f"{p}.input_layernorm.weight", (h,), "norm", "attn"),
            _t(f"{p}.self_attn.q_proj.weight", (heads * d, h), "qkv", "attn"),
            _t(f"{p}.self_attn.k_proj.weight", (kv * d, h), "qkv", "attn"),
            _t(f"{p}.self_attn.v_proj.weight", (kv * d, h), "qkv", "attn"),
            _t(f"{p}.self_attn.o_proj.weight", (h, heads * d), "attn_out", "attn"),
            _t(f"{p}.post_attention_layernorm.weight", (h,), "norm", "mlp"),
        ]
        if experts:
            ts += [
                _t(f"{p}.mlp.gate.weight", (experts, h), "router", "mlp"),
                _t(f"{p}.mlp.experts.gate_up_proj", (experts, 2 * f, h), "experts", "mlp"),
                _t(f"{p}.mlp.experts.down_proj", (experts, h, f), "experts", "mlp"),
            ]
        else:
            if gated:
                ts.append(_t(f"{p}.mlp.gate_proj.weight", (f, h), "mlp", "mlp"))
            ts += [
                _t(f"{p}.mlp.up_proj.weight", (f, h), "mlp", "mlp"),
                _t(f"{p}.mlp.down_proj.weight", (h, f), "mlp", "mlp"),
            ]
        per_layer.append(tuple(ts))
    head = (
        _t("model.norm.weight", (h,), "norm"),
        _t("lm_head.weight", (vocab, h), "head", tied_to="model.embed_tokens.weight" if tie else None),
    )
    return TransformerSpec(
        name=name,
        family="mixtral" if experts else "llama",
        causal=True,
        num_layers=layers,
        hidden_size=h,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=d,
        intermediate_size=f,
        vocab_size=vocab,
        gated_mlp=gated,
        num_experts=experts,
        experts_per_token=2 if experts else 0,
        rotary_dim=d,
        tie_word_embeddings=tie,
        embedding_tensors=(_t("model.embed_tokens.weight", (vocab, h), "embed"),),
        layer_tensors=tuple(per_layer),
        head_tensors=head,
    )


def paper_spec() -> TransformerSpec:
    """The seed paper's model: 16 layers, h 4096, MLP 16384 (up, down), 32 heads, no biases; the
    paper gives no vocabulary, 32000 is assumed."""
    return llama_spec(layers=16, h=4096, heads=32, kv=32, d=128, f=16384, vocab=32000, gated=False, name="paper-16l")


def gpt2_spec(
    *, layers: int = 2, h: int = 64, heads: int = 4, vocab: int = 100, positions: int = 32
) -> TransformerSpec:
    """GPT-2: Conv1D weights stored (in, out), fused c_attn, biases, learned positions, tied head."""
    per_layer = []
    for i in range(layers):
        p = f"transformer.h.{i}"
        per_layer.append(
            (
                _t(f"{p}.ln_1.weight", (h,), "norm", "attn"),
                _t(f"{p}.ln_1.bias", (h,), "norm", "attn"),
                _t(f"{p}.attn.c_attn.weight", (h, 3 * h), "qkv", "attn"),
                _t(f"{p}.attn.c_attn.bias", (3 * h,), "qkv", "attn"),
                _t(f"{p}.attn.c_proj.weight", (h, h), "attn_out", "attn"),
                _t(f"{p}.attn.c_proj.bias", (h,), "attn_out", "attn"),
                _t(f"{p}.ln_2.weight", (h,), "norm", "mlp"),
                _t(f"{p}.ln_2.bias", (h,), "norm", "mlp"),
                _t(f"{p}.mlp.c_fc.weight", (h, 4 * h), "mlp", "mlp"),
                _t(f"{p}.mlp.c_fc.bias", (4 * h,), "mlp", "mlp"),
                _t(f"{p}.mlp.c_proj.weight", (4 * h, h), "mlp", "mlp"),
                _t(f"{p}.mlp.c_proj.bias", (h,), "mlp", "mlp"),
            )
        )
    return TransformerSpec(
        name="tiny-gpt2",
        family="gpt2",
        causal=True,
        num_layers=layers,
        hidden_size=h,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=h // heads,
        intermediate_size=4 * h,
        vocab_size=vocab,
        gated_mlp=False,
        max_position_embeddings=positions,
        tie_word_embeddings=True,
        embedding_tensors=(
            _t("transformer.wte.weight", (vocab, h), "embed"),
            _t("transformer.wpe.weight", (positions, h), "pos_embed"),
        ),
        layer_tensors=tuple(per_layer),
        head_tensors=(
            _t("transformer.ln_f.weight", (h,), "norm"),
            _t("transformer.ln_f.bias", (h,), "norm"),
            _t("lm_head.weight", (vocab, h), "head", tied_to="transformer.wte.weight"),
        ),
    )


def bert_spec(*, h: int = 64, heads: int = 4, vocab: int = 100) -> TransformerSpec:
    """BertModel: word + position + token-type embeddings, post-LN layer, pooler head (no LM head)."""
    p = "encoder.layer.0"
    layer = (
        _t(f"{p}.attention.self.query.weight", (h, h), "qkv", "attn"),
        _t(f"{p}.attention.self.key.weight", (h, h), "qkv", "attn"),
        _t(f"{p}.attention.self.value.weight", (h, h), "qkv", "attn"),
        _t(f"{p}.attention.output.dense.weight", (h, h), "attn_out", "attn"),
        _t(f"{p}.attention.output.LayerNorm.weight", (h,), "norm", "attn"),
        _t(f"{p}.intermediate.dense.weight", (4 * h, h), "mlp", "mlp"),
        _t(f"{p}.output.dense.weight", (h, 4 * h), "mlp", "mlp"),
        _t(f"{p}.output.LayerNorm.weight", (h,), "norm", "mlp"),
    )
    return TransformerSpec(
        name="tiny-bert",
        family="bert",
        causal=False,
        num_layers=1,
        hidden_size=h,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=h // heads,
        intermediate_size=4 * h,
        vocab_size=vocab,
        gated_mlp=False,
        embedding_tensors=(
            _t("embeddings.word_embeddings.weight", (vocab, h), "embed"),
            _t("embeddings.position_embeddings.weight", (32, h), "pos_embed"),
            _t("embeddings.token_type_embeddings.weight", (2, h), "pos_embed"),
            _t("embeddings.LayerNorm.weight", (h,), "norm"),
        ),
        layer_tensors=(layer,),
        head_tensors=(_t("pooler.dense.weight", (h, h), "head"), _t("pooler.dense.bias", (h,), "head")),
    )


PREFILL = Workload(batch=2, seq_len=8, mode="prefill")


# ---------------------------------------------------------------------------------------------
# The seed paper's model


def test_paper_16l_weight_roles_per_layer() -> None:
    prof = profile_transformer(paper_spec(), Workload(mode="prefill", seq_len=128))
    assert [u.name for u in prof.units] == ["embed", *[f"layers.{i}" for i in range(16)], "head"]
    roles = prof.unit("layers.0").footprint.roles
    assert roles["qkv"] == 3 * 4096 * 4096 * 2 == 100_663_296
    assert roles["mlp"] == 2 * 4096 * 16384 * 2 == 268_435_456
    assert roles["attn_out"] == 4096 * 4096 * 2 == 33_554_432
    assert roles["norm"] == 2 * 4096 * 2  # two RMS norm weights
    layer = prof.unit("layers.7")
    assert layer.params == 4 * 4096 * 4096 + 2 * 4096 * 16384 + 2 * 4096
    assert layer.layer == 7
    # Prefill, eager, batch 1, 128 tokens: the MLP's activation makes the peak. Six tensors of
    # 128 x 4096 x 2 B = 1 MiB (the layer input, inputs_embeds, the eager probabilities 32 x 128 x 128
    # x 2 B, the attention output, its residual sum, the MLP's normed input), the int64 position ids
    # and token ids 2 x 128 x 8 B, and up + act 2 x 128 x 16384 x 2 B = 8 MiB.
    assert layer.footprint.activation_bytes == 6 * 2**20 + 2 * 128 * 8 + 2 * 128 * 16384 * 2 == 14_682_112
    # 2 FLOPs per MAC: 2 x (4 h^2 + 2 h f) + attention 4 x a x d x 128.
    assert layer.flops_per_token == 2 * (4 * 4096**2 + 2 * 4096 * 16384) + 4 * 4096 * 128


def test_paper_16l_decode_kv_cache() -> None:
    # Decode, batch 1, context 1024, fp16: K and V of 1024 x 4096 x 2 B each = 16 MiB per layer.
    prof = profile_transformer(paper_spec(), Workload(mode="decode", seq_len=1024))
    fp = prof.unit("layers.3").footprint
    assert fp.persistent_activation_bytes == 2 * 1024 * 4096 * 2 == 16_777_216
    assert prof.unit("embed").footprint.persistent_activation_bytes == 0


# ---------------------------------------------------------------------------------------------
# Units, granularity, params and bytes


def test_layer_units_carry_tensors_shapes_and_split_dims() -> None:
    spec = llama_spec()
    units = build_units(spec, PREFILL)
    assert [(u.name, u.kind) for u in units] == [
        ("embed", "embedding"),
        ("layers.0", "layer"),
        ("layers.1", "layer"),
        ("head", "head"),
    ]
    layer = units[1]
    assert layer.tensors == spec.layer_tensors[0]
    assert {(s.name, s.size) for s in layer.split_dims} == {("heads", 4), ("kv_heads", 2), ("mlp_columns", 128)}
    assert layer.shape == LayerShape(
        part="layer", hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128,
        gated_mlp=True, rotary_dim=16, first_layer=True,
    )  # fmt: skip
    # Weights, fp16: q 64x64 + k, v 32x64 each + o 64x64 = 12288 el; MLP 3 x 128 x 64 = 24576 el;
    # norms 2 x 64 = 128 el: 36992 el = 73984 B.
    assert layer.params == 36992
    assert layer.footprint.weight_bytes == 73984
    assert dict(layer.footprint.weight_roles) == {"qkv": 16384, "attn_out": 8192, "mlp": 49152, "norm": 256}
    # Activations and buffers come straight from the activation model (tests/profile/test_activations.py
    # derives 23744 B for a later layer; the first one's input is inputs_embeds itself, 2048 B less).
    est = estimate_activations(layer.shape, PREFILL)
    assert layer.footprint.activation_bytes == est.activation_bytes == 23744 - 2048
    assert units[2].footprint.activation_bytes == 23744
    assert layer.footprint.buffer_bytes == est.buffer_bytes == 768
    assert layer.footprint.activation_parts == est.parts
    assert units[0].split_dims[0].name == "vocab" and units[-1].split_dims[0].size == 100


def test_block_granularity_splits_layers_and_keeps_the_weights() -> None:
    spec = llama_spec()
    layer_prof = profile_transformer(spec, PREFILL)
    block_prof = profile_transformer(spec, PREFILL, granularity="block")
    assert [(u.name, u.kind) for u in block_prof.units] == [
        ("embed", "embedding"),
        ("layers.0.attn", "attention"),
        ("layers.0.mlp", "mlp"),
        ("layers.1.attn", "attention"),
        ("layers.1.mlp", "mlp"),
        ("head", "head"),
    ]
    assert block_prof.granularity == "block"
    attn, mlp = block_prof.unit("layers.0.attn"), block_prof.unit("layers.0.mlp")
    layer = layer_prof.unit("layers.0")
    assert attn.footprint.weight_bytes + mlp.footprint.weight_bytes == layer.footprint.weight_bytes
    assert attn.params + mlp.params == layer_prof.unit("layers.0").params
    assert attn.flops_per_token + mlp.flops_per_token == layer_prof.unit("layers.0").flops_per_token
    assert block_prof.params == layer_prof.params
    assert {s.name for s in attn.split_dims} == {"heads", "kv_heads"}
    assert {s.name for s in mlp.split_dims} == {"mlp_columns"}
    # Only attention blocks hold the mask and rotary tables (B x 1 x 8 x 8 x 2 B + 2 x 1 x 8 x 16 x 2 B).
    assert attn.footprint.buffer_bytes == 768 and mlp.footprint.buffer_bytes == 0
    # The layer's peak (with buffer reuse) is the larger of its blocks' peaks.
    assert layer_prof.unit("layers.0").footprint.activation_bytes == max(
        attn.footprint.activation_bytes, mlp.footprint.activation_bytes
    )


def test_tied_head_counts_bytes_but_not_params() -> None:
    tied = profile_transformer(llama_spec(tie=True), PREFILL)
    untied = profile_transformer(llama_spec(tie=False), PREFILL)
    head = tied.unit("head")
    assert head.params == 64  # the final norm only; lm_head.weight is embed_tokens.weight
    assert head.footprint.weight_bytes == (100 * 64 + 64) * 2  # the card running the head needs the matrix
    assert untied.params - tied.params == 100 * 64
    assert tied.totals()["weight_bytes"] == untied.totals()["weight_bytes"]


def test_gpt2_like_embedding_has_two_tables_and_tied_head() -> None:
    prof = profile_transformer(gpt2_spec(), PREFILL)
    embed = prof.unit("embed")
    assert embed.shape is not None and embed.shape.embedding_tables == 2
    # token + position lookups and their sum live together: 3 x (16 tokens x 64 x 2 B), beside the
    # int64 token ids (16 x 8 B) and position ids (8 x 8 B). (This hand-built spec keeps the default
    # forward facts, so its position lookup counts per sequence; the GPT-2 adapter says it broadcasts.)
    assert embed.footprint.activation_bytes == 3 * 2048 + 128 + 64
    assert embed.params == 100 * 64 + 32 * 64
    # GPT-2 small formula per layer: 12 h^2 + 13 h (with biases and two LayerNorms).
    assert prof.unit("layers.0").params == 12 * 64**2 + 13 * 64
    assert prof.unit("head").params == 2 * 64
    assert prof.unit("head").shape.vocab_size == 100  # type: ignore[union-attr]
    # No rotary: the only buffer is the causal mask, B x 1 x 8 x 8 x 2 B.
    assert prof.unit("layers.0").footprint.buffer_parts == (("attention_mask", 256),)


def test_bert_like_pooler_head_and_three_embedding_tables() -> None:
    prof = profile_transformer(bert_spec(), PREFILL)
    assert prof.unit("embed").shape.embedding_tables == 3  # type: ignore[union-attr]
    head = prof.unit("head")
    assert head.shape is not None and head.shape.vocab_size == 0  # a pooler, not an LM head
    assert head.split_dims == ()
    assert head.flops_per_token == 2 * 64 * 64 // 8  # one h x h matmul per sequence of 8 tokens


def test_moe_units_split_on_experts_and_count_routed_flops() -> None:
    spec = llama_spec(experts=4, f=32)
    units = build_units(spec, PREFILL, granularity="block")
    mlp = units[2]
    assert mlp.name == "layers.0.mlp"
    assert {(s.name, s.size) for s in mlp.split_dims} == {("mlp_columns", 32), ("experts", 4)}
    # All experts are resident: router 4 x 64 + experts 4 x 3 x 32 x 64 + norm 64 = 24896 el.
    assert mlp.params == 4 * 64 + 4 * 3 * 32 * 64 + 64
    assert dict(mlp.footprint.weight_roles) == {"experts": 2 * 4 * 3 * 32 * 64, "router": 2 * 256, "norm": 128}
    # FLOPs count only the 2 routed experts: router 2 x 64 x 4 + 2 x (3 x 2 x 64 x 32).
    assert mlp.flops_per_token == 512 + 2 * 12288


def test_decode_profile_puts_the_kv_cache_on_attention_units() -> None:
    wl = Workload(batch=2, seq_len=8, mode="decode")
    prof = profile_transformer(llama_spec(), wl, granularity="block")
    # K, V cache: 2 x B 2 x 8 x kv 2 x d 16 x 2 B = 2048 B per layer.
    assert [u.footprint.persistent_activation_bytes for u in prof.units] == [0, 2048, 0, 2048, 0, 0]
    head = prof.unit("head")
    # The final norm makes the head's peak (2 tokens, a 100-word vocabulary): its input 256 B, beside
    # the token ids 16 B, inputs_embeds 256 B, the position ids 8 B, the mask 32 B and rotary tables 64 B
    # the model's forward still holds, its output 256 B and fp32 workspace 8 x 128 - 256 + 8 x 2 = 784 B:
    # 1672 B (> the LM head: token ids 16 + norm output 256 + logits 2 x 100 x 2 = 672 B).
    assert head.footprint.activation_bytes == 256 + 16 + 256 + 8 + 32 + 64 + 256 + 784 == 1672


def test_weights_follow_the_weight_dtype() -> None:
    fp16 = profile_transformer(llama_spec(), PREFILL).unit("layers.0").footprint.weight_bytes
    int8 = profile_transformer(llama_spec(), dataclasses.replace(PREFILL, weight_dtype="int8"))
    assert int8.unit("layers.0").footprint.weight_bytes * 2 == fp16
    fp32 = profile_transformer(llama_spec(), dataclasses.replace(PREFILL, weight_dtype="fp32"))
    assert fp32.unit("layers.0").footprint.weight_bytes == 2 * fp16


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 3),
    st.integers(1, 4),
    st.sampled_from([1, 2]),
    st.integers(1, 64),
    st.booleans(),
    st.sampled_from(["prefill", "decode", "train"]),
)
def test_block_and_layer_profiles_agree(layers: int, heads: int, groups: int, f: int, tie: bool, mode: str) -> None:
    spec = llama_spec(layers=layers, heads=heads * groups, kv=heads, d=8, h=8 * heads * groups, f=f, tie=tie)
    wl = Workload(batch=1, seq_len=4, mode=mode)
    by_layer = profile_transformer(spec, wl)
    by_block = profile_transformer(spec, wl, granularity="block")
    assert by_layer.totals()["weight_bytes"] == by_block.totals()["weight_bytes"]
    assert by_layer.params == by_block.params
    assert len(by_block.units) == len(by_layer.units) + layers
    for u in by_layer.units:
        if u.kind == "layer":
            attn, mlp = by_block.unit(f"{u.name}.attn"), by_block.unit(f"{u.name}.mlp")
            assert u.footprint.persistent_activation_bytes == (
                attn.footprint.persistent_activation_bytes + mlp.footprint.persistent_activation_bytes
            )


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_granularity_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="granularity"):
        build_units(llama_spec(), PREFILL, granularity="tensor")


def test_spec_without_layer_tensors_is_a_profile_error() -> None:
    spec = dataclasses.replace(llama_spec(), layer_tensors=())
    with pytest.raises(ProfileError, match="no per-layer tensors"):
        build_units(spec, PREFILL)


def test_block_split_needs_every_layer_tensor_in_a_block() -> None:
    spec = llama_spec(layers=1)
    loose = (*spec.layer_tensors[0], _t("model.layers.0.extra.weight", (4,), "other"))
    spec = dataclasses.replace(spec, layer_tensors=(loose,))
    assert len(build_units(spec, PREFILL)) == 3  # fine as a whole layer
    with pytest.raises(ProfileError, match="model.layers.0.extra.weight"):
        build_units(spec, PREFILL, granularity="block")


def test_embed_and_head_are_skipped_when_empty() -> None:
    spec = dataclasses.replace(llama_spec(), embedding_tensors=(), head_tensors=(), vocab_size=0)
    assert [u.name for u in build_units(spec, PREFILL)] == ["layers.0", "layers.1"]


# ---------------------------------------------------------------------------------------------
# profile_model


def test_profile_model_takes_a_spec_and_defaults_the_workload() -> None:
    prof = profile_model(llama_spec())
    assert prof.workload == Workload()
    assert prof.model == "tiny-llama"
    assert prof.params == 2 * 100 * 64 + 2 * 36992 + 64


def test_profile_model_unknown_name_names_both_possibilities(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as info:
        profile_model(str(tmp_path / "no-such-model"))
    message = str(info.value)
    assert "config.json" in message and "preset" in message and "--list" in message


def test_profile_model_rejects_other_types_pointing_at_profile_module() -> None:
    with pytest.raises(ConfigError, match="profile_module"):
        profile_model(42)  # type: ignore[arg-type]


def test_profile_model_reads_a_preset_and_a_config_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    presets = pytest.importorskip("cachefit.profile.presets")
    if "paper-16l" not in {p.name for p in presets.list_presets()}:
        pytest.skip("paper-16l preset not installed")
    prof = profile_model("paper-16l", Workload(mode="prefill", seq_len=128))
    roles = prof.unit("layers.0").footprint.roles
    assert (roles["qkv"], roles["mlp"], roles["attn_out"]) == (100_663_296, 268_435_456, 33_554_432)
    # The same model through a config.json file and through a parsed dict.
    import json
    from pathlib import Path

    config = json.loads((Path(presets.__file__).parent / "paper-16l.json").read_text())["config"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    for source in (path, tmp_path, config):
        other = profile_model(source, Workload(mode="prefill", seq_len=128))
        assert other.sizes == prof.sizes
