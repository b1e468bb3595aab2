"""config.json -> TransformerSpec, checked against the transformers models built on the meta device.

For every family, several configs (GQA, MQA, explicit head_dim, tied and untied heads, biases on
and off, parallel attention, partial rotary, OPT projections, Falcon's new architecture, ...): the
(FQN, shape) set of the spec equals ``named_parameters()`` exactly, each layer's parameter count
equals the real layer module's, a tied head points at the real shared parameter, and the dims
(KV heads, head_dim, rotary dims, sliding window) equal what the built model uses. The same config
is read again from the directory ``save_pretrained`` writes, in transformers' own spelling.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from cachefit.errors import CachefitError, ConfigError, ProfileError
from cachefit.profile.hf_config import SUPPORTED_FAMILIES, load_transformer_spec
from cachefit.profile.spec import TransformerSpec

# Tiny configs, one list per family; each a (id, config) pair.
T = dict(vocab_size=101, num_hidden_layers=2)
CASES: list[tuple[str, dict]] = [
    # llama
    ("llama-gqa", dict(model_type="llama", hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, **T)),
    ("llama-mha-tied-biases", dict(model_type="llama", hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                   tie_word_embeddings=True, attention_bias=True, mlp_bias=True, **T)),
    ("llama-mqa-headdim", dict(model_type="llama", hidden_size=32, intermediate_size=48, num_attention_heads=4,
                               num_key_value_heads=1, head_dim=16, **T)),
    ("llama-nulls", dict(model_type="llama", hidden_size=32, intermediate_size=48, num_attention_heads=4,
                         num_key_value_heads=None, head_dim=None, **T)),
    # mistral (absent num_key_value_heads -> MistralConfig default 8)
    ("mistral-default-kv", dict(model_type="mistral", hidden_size=64, intermediate_size=96, num_attention_heads=8, **T)),
    ("mistral-headdim-tied", dict(model_type="mistral", hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=12, sliding_window=None, tie_word_embeddings=True, **T)),
    # qwen2
    ("qwen2-gqa", dict(model_type="qwen2", hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, **T)),
    ("qwen2-tied-window", dict(model_type="qwen2", hidden_size=32, intermediate_size=48, num_attention_heads=4,
                               num_key_value_heads=1, tie_word_embeddings=True, use_sliding_window=True,
                               sliding_window=16, max_window_layers=0, **T)),
    ("qwen2-partial-window", dict(model_type="qwen2", hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                  num_key_value_heads=4, use_sliding_window=True, sliding_window=16,
                                  max_window_layers=1, **T)),
    # qwen3 (q_norm / k_norm of head_dim; absent head_dim -> Qwen3Config default 128)
    ("qwen3-gqa", dict(model_type="qwen3", hidden_size=32, intermediate_size=48, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, **T)),
    ("qwen3-default-headdim-tied-bias", dict(model_type="qwen3", hidden_size=32, intermediate_size=48,
                                             num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
                                             attention_bias=True, **T)),
    ("qwen3-mqa-odd-headdim-partial-window", dict(model_type="qwen3", hidden_size=32, intermediate_size=40,
                                                  num_attention_heads=6, num_key_value_heads=1, head_dim=12,
                                                  use_sliding_window=True, sliding_window=16, max_window_layers=1,
                                                  **T)),
    ("qwen3-all-sliding-nulls", dict(model_type="qwen3", hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                     num_key_value_heads=None, head_dim=8, use_sliding_window=True, sliding_window=8,
                                     layer_types=["sliding_attention", "sliding_attention"], **T)),
    # gemma (head_dim absent -> GemmaConfig default 256)
    ("gemma-default-headdim", dict(model_type="gemma", hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                   num_key_value_heads=1, **T)),
    ("gemma-untied-bias", dict(model_type="gemma", hidden_size=32, intermediate_size=48, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=8, attention_bias=True, tie_word_embeddings=False, **T)),
    # gemma2 (four norms a layer; absent head_dim -> 256, absent KV heads -> 4; alternating windows)
    ("gemma2-defaults", dict(model_type="gemma2", hidden_size=32, intermediate_size=48, num_attention_heads=4, **T)),
    ("gemma2-untied-bias-odd-headdim", dict(model_type="gemma2", hidden_size=32, intermediate_size=48,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                                            attention_bias=True, tie_word_embeddings=False, num_hidden_layers=3,
                                            vocab_size=101)),
    ("gemma2-mqa-all-sliding", dict(model_type="gemma2", hidden_size=32, intermediate_size=40, num_attention_heads=4,
                                    num_key_value_heads=1, head_dim=16, sliding_window=8,
                                    layer_types=["sliding_attention", "sliding_attention"], **T)),
    ("gemma2-no-window", dict(model_type="gemma2", hidden_size=32, intermediate_size=48, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=8, sliding_window=None, **T)),
    # phi3
    ("phi3-partial", dict(model_type="phi3", hidden_size=32, intermediate_size=48, num_attention_heads=4,
                          num_key_value_heads=2, partial_rotary_factor=0.5, pad_token_id=0, **T)),
    ("phi3-mha-tied", dict(model_type="phi3", hidden_size=32, intermediate_size=48, num_attention_heads=4,
                           tie_word_embeddings=True, sliding_window=7, pad_token_id=0, **T)),
    ("phi3-rope-dict-headdim", dict(model_type="phi3", hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                    num_key_value_heads=1, head_dim=16, pad_token_id=0,
                                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                     "partial_rotary_factor": 0.75}, **T)),
    # mixtral (experts fused into 3-D tensors in transformers 5)
    ("mixtral-gqa", dict(model_type="mixtral", hidden_size=32, intermediate_size=48, num_attention_heads=4,
                         num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **T)),
    ("mixtral-alias-top1", dict(model_type="mixtral", hidden_size=32, intermediate_size=40, num_attention_heads=4,
                                num_key_value_heads=1, num_experts=3, num_experts_per_tok=1, head_dim=16,
                                tie_word_embeddings=True, sliding_window=32, **T)),
    # gpt2 (Conv1D, fused c_attn)
    ("gpt2-tied", dict(model_type="gpt2", n_embd=32, n_head=4, n_layer=2, n_positions=64, vocab_size=101)),
    ("gpt2-inner-untied", dict(model_type="gpt2", n_embd=32, n_head=4, n_layer=3, n_positions=40, n_inner=40,
                               vocab_size=101, tie_word_embeddings=False)),
    ("gpt2-aliases", dict(model_type="gpt2", hidden_size=32, num_attention_heads=2, num_hidden_layers=2,
                          max_position_embeddings=16, n_inner=None, vocab_size=101)),
    # gpt_neox
    ("neox-default", dict(model_type="gpt_neox", hidden_size=32, intermediate_size=64, num_attention_heads=4, **T)),
    ("neox-pct-serial-tied", dict(model_type="gpt_neox", hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                  rotary_pct=0.5, use_parallel_residual=False, attention_bias=False,
                                  tie_word_embeddings=True, **T)),
    ("neox-rope-dict", dict(model_type="gpt_neox", hidden_size=32, intermediate_size=64, num_attention_heads=4,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0},
                            **T)),
    # opt
    ("opt-project", dict(model_type="opt", hidden_size=32, ffn_dim=64, num_attention_heads=4, word_embed_proj_dim=16,
                         max_position_embeddings=64, **T)),
    ("opt-postln-nobias-untied", dict(model_type="opt", hidden_size=32, ffn_dim=64, num_attention_heads=4,
                                      do_layer_norm_before=False, enable_bias=False, tie_word_embeddings=False,
                                      word_embed_proj_dim=24, max_position_embeddings=30, **T)),
    ("opt-no-affine", dict(model_type="opt", hidden_size=32, ffn_dim=64, num_attention_heads=4,
                           layer_norm_elementwise_affine=False, max_position_embeddings=30, **T)),
    ("opt-removed-final-norm", dict(model_type="opt", hidden_size=32, ffn_dim=64, num_attention_heads=4,
                                    _remove_final_layer_norm=True, word_embed_proj_dim=None,
                                    max_position_embeddings=30, **T)),
    # bert
    ("bert-model", dict(model_type="bert", hidden_size=32, intermediate_size=64, num_attention_heads=4,
                        max_position_embeddings=64, **T)),
    ("bert-mlm-tied", dict(model_type="bert", architectures=["BertForMaskedLM"], hidden_size=32, intermediate_size=64,
                           num_attention_heads=4, max_position_embeddings=64, **T)),
    ("bert-mlm-untied", dict(model_type="bert", architectures=["BertForMaskedLM"], hidden_size=32, intermediate_size=64,
                             num_attention_heads=4, max_position_embeddings=64, tie_word_embeddings=False, **T)),
    ("bert-other-arch", dict(model_type="bert", architectures=["BertForSequenceClassification"], hidden_size=32,
                             intermediate_size=48, num_attention_heads=2, max_position_embeddings=20,
                             type_vocab_size=1, is_decoder=True, **T)),
    # falcon
    ("falcon-default-mqa", dict(model_type="falcon", hidden_size=32, num_attention_heads=4, **T)),
    ("falcon-new-arch", dict(model_type="falcon", hidden_size=32, num_attention_heads=4, num_kv_heads=2,
                             new_decoder_architecture=True, bias=True, **T)),
    ("falcon-serial-mha-alibi", dict(model_type="falcon", hidden_size=32, num_attention_heads=4, multi_query=False,
                                     parallel_attn=False, alibi=True, tie_word_embeddings=False, **T)),
    ("falcon-new-arch-one-ln", dict(model_type="falcon", hidden_size=32, num_attention_heads=4, num_kv_heads=1,
                                    new_decoder_architecture=True, num_ln_in_parallel_attn=1, ffn_hidden_size=40, **T)),
    ("falcon-mha-parallel-bias", dict(model_type="falcon", hidden_size=32, num_attention_heads=2, multi_query=False,
                                      bias=True, **T)),
]


def _build(config: dict):
    """The transformers model a spec of ``config`` mirrors, built on the meta device."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    kwargs = dict(config)
    model_type = kwargs.pop("model_type")
    cfg = transformers.AutoConfig.for_model(model_type, **kwargs)
    with torch.device("meta"):
        if model_type == "bert":
            arch = (config.get("architectures") or [None])[0]
            cls = transformers.BertForMaskedLM if arch == "BertForMaskedLM" else transformers.BertModel
            return cls(cfg), cfg
        return transformers.AutoModelForCausalLM.from_config(cfg), cfg


def _all_tensors(spec: TransformerSpec):
    return (*spec.embedding_tensors, *(t for layer in spec.layer_tensors for t in layer), *spec.head_tensors)


def _layer_list(model, num_layers: int):
    """(prefix, ModuleList) of the model's transformer layers."""
    torch = pytest.importorskip("torch")
    found = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h", "layer")
    ]
    assert len(found) == 1, found
    assert len(found[0][1]) == num_layers
    return found[0]


def assert_spec_matches_model(spec: TransformerSpec, model) -> None:
    """Tensor-level equality between a spec and a built transformers model."""
    tensors = _all_tensors(spec)
    names = [t.name for t in tensors]
    assert len(names) == len(set(names)), "duplicate FQNs in the spec"
    own = {(t.name, t.shape) for t in tensors if t.tied_to is None}
    real = {(n, tuple(p.shape)) for n, p in model.named_parameters()}
    assert own == real, f"missing {sorted(real - own)}; extra {sorted(own - real)}"
    # Tied copies are not parameters of their own, and share the real tensor.
    for t in tensors:
        if t.tied_to is not None:
            assert t.name not in dict(model.named_parameters())
            assert model.get_parameter(t.name) is model.get_parameter(t.tied_to)
            assert tuple(model.get_parameter(t.tied_to).shape) == t.shape
    # Untied twins really are distinct.
    for t in tensors:
        if t.tied_to is None:
            assert model.get_parameter(t.name).shape == t.shape
    # Per layer: the spec's tensors are exactly the layer module's parameters.
    prefix, layers = _layer_list(model, spec.num_layers)
    for i, (layer_spec, layer) in enumerate(zip(spec.layer_tensors, layers)):
        assert sum(t.numel for t in layer_spec) == sum(p.numel() for p in layer.parameters())
        assert {(t.name, t.shape) for t in layer_spec} == {
            (f"{prefix}.{i}.{n}", tuple(p.shape)) for n, p in layer.named_parameters()
        }
        assert all(t.block in ("attn", "mlp") and t.tied_to is None for t in layer_spec)
    assert all(t.block is None for t in (*spec.embedding_tensors, *spec.head_tensors))
    assert sum(t.numel for t in tensors if t.tied_to is None) == sum(p.numel() for p in model.parameters())


def _rotary_dim_of(model, cfg, family: str) -> int:
    """Rotary dims per head that the built model uses (inv_freq holds one entry per pair)."""
    if family == "falcon" and cfg.alibi:
        return 0
    for name, buf in model.named_buffers():
        if name.endswith("rotary_emb.inv_freq"):
            return 2 * buf.shape[0]
    return 0


def _first_attention(model):
    for name, mod in model.named_modules():
        if name.endswith(("self_attn", "attention", "self_attention", "attn")) and hasattr(mod, "head_dim"):
            return mod
    return None


@pytest.mark.parametrize("case_id, config", CASES, ids=[c[0] for c in CASES])
def test_spec_equals_transformers_model(case_id, config, tmp_path):
    spec = load_transformer_spec(config, name=case_id)
    model, cfg = _build(config)
    assert_spec_matches_model(spec, model)
    family = config["model_type"]
    assert spec.family == family and spec.name == case_id
    assert spec.causal is (family != "bert" or bool(config.get("is_decoder")))
    # Dims the model really uses.
    attn = _first_attention(model)
    if attn is not None:
        assert spec.head_dim == attn.head_dim
    if hasattr(attn, "num_key_value_heads"):
        assert spec.num_kv_heads == attn.num_key_value_heads
    if family == "falcon":
        assert spec.num_kv_heads == attn.num_kv_heads
    assert spec.rotary_dim == _rotary_dim_of(model, cfg, family)
    assert spec.tie_word_embeddings == bool(cfg.tie_word_embeddings)
    # Sliding window: the window every layer's attention uses, else None.
    _, layers = _layer_list(model, spec.num_layers)
    windows = {getattr(getattr(layer, "self_attn", None), "sliding_window", None) for layer in layers}
    if family in ("mistral", "mixtral", "phi3"):
        windows = {cfg.sliding_window}
    assert spec.sliding_window == (windows.pop() if len(windows) == 1 else None)
    # The same config in the spelling transformers itself writes (save_pretrained, v5 keys).
    cfg.save_pretrained(tmp_path)
    again = load_transformer_spec(tmp_path)
    assert again.source.endswith("config.json") and again.name == str(tmp_path)
    assert {(t.name, t.shape, t.tied_to) for t in _all_tensors(again)} == {
        (t.name, t.shape, t.tied_to) for t in _all_tensors(spec)
    }
    assert (again.rotary_dim, again.num_kv_heads, again.head_dim, again.sliding_window) == (
        spec.rotary_dim, spec.num_kv_heads, spec.head_dim, spec.sliding_window
    )


def test_every_family_is_covered():
    covered = {c[1]["model_type"] for c in CASES}
    assert covered == set(SUPPORTED_FAMILIES) - {"cachefit-dense"}


def _spec(case_id: str) -> TransformerSpec:
    return load_transformer_spec(dict(CASES)[case_id], name=case_id)


def test_dims_of_odd_configs():
    # Mistral: an absent num_key_value_heads means MistralConfig's default 8, and the spec says so.
    s = _spec("mistral-default-kv")
    assert s.num_kv_heads == 8 and s.sliding_window == 4096 and s.head_dim == 8
    assert any("num_key_value_heads" in n and "8" in n for n in s.notes)
    # Gemma: absent head_dim means 256 (GemmaConfig), not hidden / heads = 8.
    s = _spec("gemma-default-headdim")
    assert s.head_dim == 256 and s.num_kv_heads == 1 and s.tie_word_embeddings
    assert s.layer_tensors[0][1].shape == (4 * 256, 32)  # q_proj
    # Explicit head_dim != hidden / heads.
    s = _spec("llama-mqa-headdim")
    assert (s.head_dim, s.num_kv_heads, s.rotary_dim) == (16, 1, 16)
    # Phi-3 partial rotary, from the top-level key and from the rope dict.
    assert _spec("phi3-partial").rotary_dim == 4  # head_dim 8 * 0.5
    assert _spec("phi3-rope-dict-headdim").rotary_dim == 12  # head_dim 16 * 0.75
    # GPT-NeoX: rotary_pct absent -> 0.25 of head_dim 8.
    s = _spec("neox-default")
    assert s.rotary_dim == 2 and s.parallel_attn_mlp and not s.tie_word_embeddings
    assert _spec("neox-pct-serial-tied").rotary_dim == 8 and not _spec("neox-pct-serial-tied").parallel_attn_mlp
    # GPT-2: n_inner absent -> 4 * n_embd; learned positions, no rotary.
    s = _spec("gpt2-tied")
    assert (s.intermediate_size, s.rotary_dim, s.max_position_embeddings) == (128, 0, 64)
    # Falcon: MQA by default, GQA with the new architecture, parallel attention/MLP.
    s = _spec("falcon-default-mqa")
    assert (s.num_kv_heads, s.parallel_attn_mlp, s.intermediate_size, s.rotary_dim) == (1, True, 128, 8)
    s = _spec("falcon-new-arch")
    assert s.num_kv_heads == 2 and s.parallel_attn_mlp
    s = _spec("falcon-serial-mha-alibi")
    assert (s.num_kv_heads, s.parallel_attn_mlp, s.rotary_dim) == (4, False, 0)
    # Mixtral.
    s = _spec("mixtral-alias-top1")
    assert (s.num_experts, s.experts_per_token, s.sliding_window, s.gated_mlp) == (3, 1, 32, True)
    # Qwen2 sliding window: every layer -> the window; only some -> None and a note.
    assert _spec("qwen2-gqa").sliding_window is None
    assert _spec("qwen2-tied-window").sliding_window == 16
    s = _spec("qwen2-partial-window")
    assert s.sliding_window is None and any("1 of 2 layers" in n for n in s.notes)
    # BERT: encoder, post-LN blocks, task heads left out with a note.
    s = _spec("bert-other-arch")
    assert s.causal and any("BertForSequenceClassification" in n for n in s.notes)
    assert _spec("bert-model").causal is False


def test_qwen3_and_gemma2_defaults_and_norms():
    # Qwen3: absent head_dim -> Qwen3Config's 128 (not hidden / heads = 8), with a note; q_norm and
    # k_norm are RMSNorms of head_dim inside the attention block; the bias flag covers o_proj too.
    s = _spec("qwen3-default-headdim-tied-bias")
    assert s.head_dim == 128 and s.tie_word_embeddings and any("head_dim" in n and "128" in n for n in s.notes)
    layer = {t.name: t for t in s.layer_tensors[0]}
    assert layer["model.layers.0.self_attn.q_norm.weight"].shape == (128,)
    assert layer["model.layers.0.self_attn.k_norm.weight"].block == "attn"
    assert "model.layers.0.self_attn.o_proj.bias" in layer
    # Qwen3 windows follow Qwen2's rule.
    assert _spec("qwen3-all-sliding-nulls").sliding_window == 8
    s = _spec("qwen3-mqa-odd-headdim-partial-window")
    assert s.sliding_window is None and any("1 of 2 layers" in n for n in s.notes)
    # Gemma 2: absent KV heads -> 4 and head_dim -> 256, noted; tied by default; four norms a layer,
    # post_attention_layernorm closing the attention block (it norms the attention output).
    s = _spec("gemma2-defaults")
    assert (s.num_kv_heads, s.head_dim, s.tie_word_embeddings) == (4, 256, True)
    assert any("num_key_value_heads" in n and "4" in n for n in s.notes)
    blocks = {t.name.rsplit(".", 2)[-2]: t.block for t in s.layer_tensors[0] if t.role == "norm"}
    assert blocks == {"input_layernorm": "attn", "post_attention_layernorm": "attn",
                      "pre_feedforward_layernorm": "mlp", "post_feedforward_layernorm": "mlp"}
    # Alternating sliding / full layers: sized for full attention, with a note.
    assert s.sliding_window is None and any("1 of 2 layers" in n for n in s.notes)
    assert _spec("gemma2-mqa-all-sliding").sliding_window == 8
    assert _spec("gemma2-no-window").sliding_window is None and not _spec("gemma2-no-window").notes


def test_norms_go_to_the_block_that_uses_them():
    llama = {t.name: t.block for t in _spec("llama-gqa").layer_tensors[0]}
    assert llama["model.layers.0.input_layernorm.weight"] == "attn"
    assert llama["model.layers.0.post_attention_layernorm.weight"] == "mlp"
    bert = {t.name: t.block for t in _spec("bert-model").layer_tensors[0]}
    assert bert["encoder.layer.0.attention.output.LayerNorm.weight"] == "attn"
    assert bert["encoder.layer.0.output.LayerNorm.weight"] == "mlp"
    falcon = {t.name: t.block for t in _spec("falcon-default-mqa").layer_tensors[0]}
    assert falcon["transformer.h.0.input_layernorm.weight"] == "attn"  # one shared norm
    new = {t.name: t.block for t in _spec("falcon-new-arch").layer_tensors[0]}
    assert new["transformer.h.0.ln_attn.weight"] == "attn" and new["transformer.h.0.ln_mlp.weight"] == "mlp"
    opt = {t.name: t.block for t in _spec("opt-project").layer_tensors[0]}
    assert opt["model.decoder.layers.0.self_attn_layer_norm.weight"] == "attn"
    assert opt["model.decoder.layers.0.final_layer_norm.weight"] == "mlp"


def test_roles_and_fused_shapes():
    gpt2 = {t.name: t for t in _spec("gpt2-tied").layer_tensors[0]}
    # Conv1D stores (in, out): the fused q, k, v projection is (n_embd, 3 * n_embd).
    assert gpt2["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)
    assert gpt2["transformer.h.0.attn.c_attn.weight"].role == "qkv"
    assert gpt2["transformer.h.0.attn.c_proj.weight"].role == "attn_out"
    assert gpt2["transformer.h.0.mlp.c_fc.weight"].shape == (32, 128)
    phi = {t.name: t for t in _spec("phi3-partial").layer_tensors[0]}
    assert phi["model.layers.0.self_attn.qkv_proj.weight"].shape == (32 + 2 * 2 * 8, 32)
    assert phi["model.layers.0.mlp.gate_up_proj.weight"].shape == (2 * 48, 32)
    moe = {t.name: t for t in _spec("mixtral-gqa").layer_tensors[0]}
    assert moe["model.layers.0.mlp.gate.weight"].role == "router"
    assert moe["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 96, 32)
    assert moe["model.layers.0.mlp.experts.down_proj"].role == "experts"
    opt = _spec("opt-project")
    assert [t.name for t in opt.embedding_tensors] == [
        "model.decoder.embed_tokens.weight",
        "model.decoder.embed_positions.weight",
        "model.decoder.project_in.weight",
    ]
    assert opt.embedding_tensors[1].shape == (64 + 2, 32)  # OPT's learned positions: offset 2
    assert opt.head_tensors[-1].shape == (101, 16) and opt.head_tensors[-1].tied_to == "model.decoder.embed_tokens.weight"
    roles = {t.role for t in _all_tensors(_spec("bert-mlm-tied"))}
    assert roles == {"embed", "pos_embed", "norm", "qkv", "attn_out", "mlp", "head"}


def test_bert_mlm_head_tied_and_untied():
    tied = {t.name: t for t in _spec("bert-mlm-tied").head_tensors}
    assert tied["cls.predictions.decoder.weight"].tied_to == "bert.embeddings.word_embeddings.weight"
    assert tied["cls.predictions.decoder.bias"].tied_to == "cls.predictions.bias"
    untied = {t.name: t for t in _spec("bert-mlm-untied").head_tensors}
    assert all(t.tied_to is None for t in untied.values())
    assert not any(t.name.startswith("pooler") for t in _all_tensors(_spec("bert-mlm-tied")))
    assert [t.name for t in _spec("bert-model").head_tensors] == ["pooler.dense.weight", "pooler.dense.bias"]


# ---- cachefit-dense (the seed paper's family) --------------------------------------------------


def test_dense_family_is_llama_without_the_gate():
    dense_cfg = dict(model_type="cachefit-dense", hidden_size=32, intermediate_size=48, num_attention_heads=4,
                     num_key_value_heads=2, **T)
    spec = load_transformer_spec(dense_cfg)
    assert spec.family == "dense" and not spec.gated_mlp and spec.rotary_dim == 0
    # Same names and shapes as a Llama of these dims, minus gate_proj: llama-like FQNs.
    llama, _ = _build(dict(dense_cfg, model_type="llama"))
    expected = {(n, tuple(p.shape)) for n, p in llama.named_parameters() if "gate_proj" not in n}
    assert {(t.name, t.shape) for t in _all_tensors(spec)} == expected
    assert all(".bias" not in t.name for t in _all_tensors(spec))


def test_dense_paper_layer_bytes():
    spec = load_transformer_spec(dict(model_type="cachefit-dense", hidden_size=4096, intermediate_size=16384,
                                      num_hidden_layers=16, num_attention_heads=32, vocab_size=32000))
    assert spec.num_layers == 16 and spec.head_dim == 128
    fp16 = 2
    for layer in spec.layer_tensors:
        by_role: dict[str, int] = {}
        for t in layer:
            by_role[t.role] = by_role.get(t.role, 0) + t.numel * fp16
        assert by_role == {"qkv": 3 * 4096 * 4096 * 2, "attn_out": 4096 * 4096 * 2,
                           "mlp": 2 * 4096 * 16384 * 2, "norm": 2 * 4096 * 2}
        assert by_role["qkv"] == 100_663_296 and by_role["mlp"] == 268_435_456 and by_role["attn_out"] == 33_554_432
    assert spec.head_tensors[-1].name == "lm_head.weight" and spec.head_tensors[-1].tied_to is None


def test_real_bert_base_uncased_config_is_the_masked_lm():
    # The published config names BertForMaskedLM: pooler out, MLM head in.
    # BertModel 109,482,240 - pooler (768*768 + 768) + transform (768*768 + 768) + LayerNorm 2*768
    # + output bias 30,522 = 109,514,298.
    config = dict(model_type="bert", architectures=["BertForMaskedLM"], hidden_size=768, intermediate_size=3072,
                  num_attention_heads=12, num_hidden_layers=12, max_position_embeddings=512, type_vocab_size=2,
                  vocab_size=30522)
    spec = load_transformer_spec(config)
    params = sum(t.numel for t in _all_tensors(spec) if t.tied_to is None)
    assert params == 109_482_240 - (768 * 768 + 768) + (768 * 768 + 768) + 2 * 768 + 30522 == 109_514_298
    model, _ = _build(config)
    assert params == sum(p.numel() for p in model.parameters())


# ---- sources -----------------------------------------------------------------------------------


def test_reads_file_and_directory(tmp_path):
    config = dict(CASES)["llama-gqa"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    from_dir = load_transformer_spec(tmp_path)
    from_file = load_transformer_spec(tmp_path / "config.json", name="mine")
    assert from_dir.source == from_file.source == str(tmp_path / "config.json")
    assert from_file.name == "mine" and from_dir.name == str(tmp_path)
    assert from_dir.layer_tensors == from_file.layer_tensors
    named = load_transformer_spec(dict(config, _name_or_path="org/model"))
    assert named.name == "org/model" and named.source == ""


# ---- bad input ---------------------------------------------------------------------------------

BASE = dict(CASES)


def _bad(config: dict, error=ConfigError) -> str:
    with pytest.raises(error) as info:
        load_transformer_spec(config)
    return str(info.value)


def test_unknown_model_type_lists_supported():
    msg = _bad(dict(BASE["llama-gqa"], model_type="t5"), ProfileError)
    assert "'t5'" in msg and "llama" in msg and "falcon" in msg
    assert "model_type" in _bad({k: v for k, v in BASE["llama-gqa"].items() if k != "model_type"})
    _bad(dict(BASE["llama-gqa"], model_type=["llama"]))


def test_missing_required_key_names_key_and_file(tmp_path):
    config = {k: v for k, v in BASE["llama-gqa"].items() if k != "hidden_size"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError) as info:
        load_transformer_spec(path)
    assert '"hidden_size"' in str(info.value) and str(path) in str(info.value)
    for key in ("n_positions", "vocab_size", "n_layer"):
        assert key in _bad({k: v for k, v in BASE["gpt2-tied"].items() if k != key})
    assert "num_local_experts" in _bad({k: v for k, v in BASE["mixtral-gqa"].items() if k != "num_local_experts"})
    assert "ffn_dim" in _bad({k: v for k, v in BASE["opt-project"].items() if k != "ffn_dim"})


@pytest.mark.parametrize("value", [0, -4, "32", 32.0, True, None, [32]])
def test_non_positive_or_non_integer_sizes(value):
    msg = _bad(dict(BASE["llama-gqa"], hidden_size=value))
    assert "hidden_size" in msg


def test_indivisible_heads():
    msg = _bad(dict(BASE["llama-gqa"], hidden_size=30))
    assert "hidden_size" in msg and "num_attention_heads" in msg and "head_dim" in msg
    # With an explicit head_dim it is fine for Llama-like families ...
    assert load_transformer_spec(dict(BASE["mistral-headdim-tied"], hidden_size=30)).head_dim == 12
    # ... but GPT-2, NeoX, OPT, BERT and Falcon always derive it.
    assert "n_embd" in _bad(dict(BASE["gpt2-tied"], n_embd=30))
    assert "hidden_size" in _bad(dict(BASE["falcon-default-mqa"], hidden_size=30))
    msg = _bad(dict(BASE["llama-gqa"], num_key_value_heads=3))
    assert "num_key_value_heads" in msg and "(3)" in msg
    assert "num_kv_heads" in _bad(dict(BASE["falcon-new-arch"], num_kv_heads=3))
    # Mistral's absent KV heads default to 8, which 4 heads cannot share.
    assert "num_key_value_heads" in _bad({k: v for k, v in BASE["mistral-headdim-tied"].items() if k != "num_key_value_heads"})


def test_experts_per_token_above_experts():
    msg = _bad(dict(BASE["mixtral-gqa"], num_experts_per_tok=5))
    assert "num_experts_per_tok" in msg and "num_local_experts" in msg


def test_other_bad_values():
    assert "partial_rotary_factor" in _bad(dict(BASE["phi3-partial"], partial_rotary_factor=1.5))
    assert "rotary_pct" in _bad(dict(BASE["neox-default"], rotary_pct=0))
    assert "tie_word_embeddings" in _bad(dict(BASE["llama-gqa"], tie_word_embeddings="yes"))
    assert "layer_types" in _bad(dict(BASE["qwen2-tied-window"], layer_types=["full_attention"]))
    assert "conflicting" in _bad(dict(BASE["gpt2-tied"], hidden_size=64))
    assert "cross" in _bad(dict(BASE["gpt2-tied"], add_cross_attention=True), ProfileError)
    assert "cross" in _bad(dict(BASE["bert-model"], add_cross_attention=True), ProfileError)
    _bad(42)


def test_bad_files(tmp_path):
    assert "no such file" in _bad(str(tmp_path / "nope.json"))
    assert "no config.json" in _bad(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert "not JSON" in _bad(bad)
    bad.write_text("[1, 2]")
    assert "JSON object" in _bad(bad)
    bad.write_bytes(b"\xff\xfe\x00")
    assert "byte 0xff at offset 0 is not UTF-8" in _bad(bad)


_JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 300), st.floats(allow_nan=True), st.text(max_size=5),
    st.lists(st.integers(0, 3), max_size=3), st.dictionaries(st.sampled_from(["partial_rotary_factor", "rope_type"]),
                                                            st.one_of(st.floats(), st.text(max_size=3)), max_size=2),
)


@settings(max_examples=300, deadline=None)
@given(case=st.sampled_from([c[1] for c in CASES]), key=st.data(), value=_JSON_VALUES)
def test_mutated_configs_raise_only_cachefit_errors(case, key, value):
    keys = sorted({*case, "head_dim", "rope_scaling", "rope_parameters", "architectures", "layer_types",
                   "partial_rotary_factor", "num_ln_in_parallel_attn", "model_type"})
    config = dict(case)
    config[key.draw(st.sampled_from(keys))] = value
    try:
        spec = load_transformer_spec(config)
    except CachefitError as exc:
        assert str(exc)
        return
    assert isinstance(spec, TransformerSpec)
    assert all(d >= 0 for t in _all_tensors(spec) for d in t.shape)
    assert 0 <= spec.rotary_dim <= spec.head_dim
