"""Qwen3 (``model_type`` ``qwen3``): transformers ``Qwen3ForCausalLM`` (models/qwen3/modeling_qwen3.py),
a Llama-like decoder with an RMSNorm of head_dim on every query and key head (``self_attn.q_norm``,
``self_attn.k_norm``) and Qwen2's sliding-window rule."""

from __future__ import annotations

from cachefit.families._blocks import full_rotary
from cachefit.families._llama_like import llama_like, read_decoder_dims
from cachefit.families.family_spec import FamilySpec
from cachefit.families.llama import GATED_MLP, LLAMA_ROLES, LLAMA_TENSOR_PARALLEL
from cachefit.families.qwen2 import qwen_window
from cachefit.families.reader import ConfigReader
from cachefit.profile.spec import TransformerSpec


def read_qwen3(cfg: ConfigReader) -> TransformerSpec:
    # Qwen3Config (transformers 5.x): num_key_value_heads 32, head_dim 128 (a field, not
    # hidden/heads), attention_bias False (q, k, v and o), tie_word_embeddings False,
    # max_position_embeddings 32768, use_sliding_window False, sliding_window 4096,
    # max_window_layers 28. Qwen3Attention adds q_norm and k_norm: Qwen3RMSNorm(head_dim).
    dims = read_decoder_dims(cfg, kv_absent=32, head_dim_absent=128)
    attn_bias = cfg.flag("attention_bias", absent=False)
    return llama_like(
        cfg,
        family="qwen3",
        dims=dims,
        tie=cfg.flag("tie_word_embeddings", absent=False),
        max_positions=cfg.integer("max_position_embeddings", absent=32768),
        rotary_dim=full_rotary(cfg, dims.head_dim, "Qwen3RotaryEmbedding"),
        mlp="gated",
        qkv_bias=attn_bias,
        o_bias=attn_bias,
        qk_norm=True,
        sliding_window=qwen_window(cfg, dims.layers),
    )


FAMILY = FamilySpec(
    name="qwen3",
    config_class="Qwen3Config",
    adapter=read_qwen3,
    causal=True,
    mlp_patterns=(GATED_MLP,),
    role_names=LLAMA_ROLES,
    architectures=("Qwen3ForCausalLM",),
    default_architecture="Qwen3ForCausalLM",
    base_model_prefix="model",
    # Qwen3DecoderLayer has Llama's layout (the q/k norms live inside self_attn), so the rotary decoder
    # stage runs it unchanged, cached decoding included (tests/deploy: test_runtime.py, test_decode.py),
    # and its shards as Llama's (q_norm / k_norm act on each head's head_dim, whole on every card).
    stage_adapter="rotary_decoder",
    tensor_parallel=LLAMA_TENSOR_PARALLEL,
    decode=True,
    loss="causal_lm",
)
