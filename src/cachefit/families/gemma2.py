"""Gemma 2 (``model_type`` ``gemma2``): transformers ``Gemma2ForCausalLM`` (models/gemma2/modeling_gemma2.py),
a Gemma-like decoder with four norms per layer and sliding-window attention on alternate layers.

Its attention and final logit soft-capping (``attn_logit_softcapping``,
``final_logit_softcapping``) and ``query_pre_attn_scalar`` change the computation, not the weights.
"""

from __future__ import annotations

from cachefit.families._blocks import full_rotary, layered_window
from cachefit.families._llama_like import llama_like, read_decoder_dims
from cachefit.families.family_spec import FamilySpec
from cachefit.families.llama import GATED_MLP, LLAMA_ROLES
from cachefit.families.reader import ConfigReader
from cachefit.profile.spec import TransformerSpec
from cachefit.units import ForwardSpec


def read_gemma2(cfg: ConfigReader) -> TransformerSpec:
    # Gemma2Config (transformers 5.x): num_key_value_heads 4, head_dim 256, attention_bias False
    # (q, k, v and o), tie_word_embeddings True, max_position_embeddings 8192, sliding_window 4096;
    # layer_types None -> sliding on even layers, full on odd ones (`(i + 1) % 2`).
    # Gemma2DecoderLayer: input_layernorm, post_attention_layernorm, pre_feedforward_layernorm,
    # post_feedforward_layernorm, all Gemma2RMSNorm(hidden) with a weight only.
    dims = read_decoder_dims(cfg, kv_absent=4, head_dim_absent=256)
    attn_bias = cfg.flag("attention_bias", absent=False)
    return llama_like(
        cfg,
        family="gemma2",
        dims=dims,
        tie=cfg.flag("tie_word_embeddings", absent=True),
        max_positions=cfg.integer("max_position_embeddings", absent=8192),
        rotary_dim=full_rotary(cfg, dims.head_dim, "Gemma2RotaryEmbedding"),
        mlp="gated",
        qkv_bias=attn_bias,
        o_bias=attn_bias,
        sandwich_norms=True,
        sliding_window=layered_window(
            cfg,
            dims.layers,
            cfg.integer("sliding_window", absent=4096, null=None),
            default_types=lambda: [i % 2 == 0 for i in range(dims.layers)],
        ),
        # Gemma2RMSNorm in fp32 to the end; Gemma2Model builds a full and a sliding-window mask;
        # Gemma2ForCausalLM soft-caps the logits out of place unless final_logit_softcapping is null
        # (default 30.0).
        forward=ForwardSpec(
            norm="rms_fp32",
            embedding_scale=True,
            attention_masks=2,
            logit_softcap=cfg.raw("final_logit_softcapping", 30.0) is not None,
        ),
    )


FAMILY = FamilySpec(
    name="gemma2",
    config_class="Gemma2Config",
    adapter=read_gemma2,
    causal=True,
    mlp_patterns=(GATED_MLP,),
    role_names=LLAMA_ROLES,
    architectures=("Gemma2ForCausalLM",),
    default_architecture="Gemma2ForCausalLM",
    base_model_prefix="model",
    # Not the Llama stage: its layer halves differ (post-attention and post-MLP norms before the
    # residual adds) and the head soft-caps the logits.
    stage_adapter=None,
)
