"""Gemma (``model_type`` ``gemma``): transformers ``GemmaForCausalLM`` (models/gemma/modeling_gemma.py),
a Llama-like decoder with a head_dim of 256 by default and a tied head."""

from __future__ import annotations

from cachefit.families._blocks import full_rotary
from cachefit.families._llama_like import llama_like, read_decoder_dims
from cachefit.families.family_spec import FamilySpec
from cachefit.families.llama import GATED_MLP, LLAMA_ROLES
from cachefit.families.reader import ConfigReader
from cachefit.profile.spec import TransformerSpec
from cachefit.units import ForwardSpec


def read_gemma(cfg: ConfigReader) -> TransformerSpec:
    # GemmaConfig: num_key_value_heads 16, head_dim 256 (not hidden/heads), attention_bias False,
    # tie_word_embeddings True, max_position_embeddings 8192. GemmaRMSNorm has a weight only.
    dims = read_decoder_dims(cfg, kv_absent=16, head_dim_absent=256)
    attn_bias = cfg.flag("attention_bias", absent=False)
    return llama_like(
        cfg,
        family="gemma",
        dims=dims,
        tie=cfg.flag("tie_word_embeddings", absent=True),
        max_positions=cfg.integer("max_position_embeddings", absent=8192),
        rotary_dim=full_rotary(cfg, dims.head_dim, "GemmaRotaryEmbedding"),
        mlp="gated",
        qkv_bias=attn_bias,
        o_bias=attn_bias,
        # GemmaRMSNorm in fp32 to the end; GemmaTextScaledWordEmbedding: embedding(ids) * sqrt(hidden),
        # out of place.
        forward=ForwardSpec(norm="rms_fp32", embedding_scale=True),
    )


FAMILY = FamilySpec(
    name="gemma",
    config_class="GemmaConfig",
    adapter=read_gemma,
    causal=True,
    mlp_patterns=(GATED_MLP,),
    role_names=LLAMA_ROLES,
    architectures=("GemmaForCausalLM",),
    default_architecture="GemmaForCausalLM",
    base_model_prefix="model",
)
