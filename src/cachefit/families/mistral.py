"""Mistral (``model_type`` ``mistral``): transformers ``MistralForCausalLM``
(models/mistral/modeling_mistral.py), a Llama-like decoder with a sliding window on every layer."""

from __future__ import annotations

from cachefit.families._blocks import full_rotary, sliding_window
from cachefit.families._llama_like import llama_like, read_decoder_dims
from cachefit.families.family_spec import FamilySpec
from cachefit.families.llama import GATED_MLP, LLAMA_ROLES, LLAMA_TENSOR_PARALLEL
from cachefit.families.reader import ConfigReader
from cachefit.profile.spec import TransformerSpec


def read_mistral(cfg: ConfigReader) -> TransformerSpec:
    # MistralConfig: num_key_value_heads 8, head_dim None (-> hidden/heads), no biases,
    # tie_word_embeddings False, max_position_embeddings 4096 * 32, sliding_window 4096 (every layer).
    dims = read_decoder_dims(cfg, kv_absent=8)
    return llama_like(
        cfg,
        family="mistral",
        dims=dims,
        tie=cfg.flag("tie_word_embeddings", absent=False),
        max_positions=cfg.integer("max_position_embeddings", absent=4096 * 32),
        rotary_dim=full_rotary(cfg, dims.head_dim, "MistralRotaryEmbedding"),
        mlp="gated",
        sliding_window=sliding_window(cfg, absent=4096),
    )


FAMILY = FamilySpec(
    name="mistral",
    config_class="MistralConfig",
    adapter=read_mistral,
    causal=True,
    mlp_patterns=(GATED_MLP,),
    role_names=LLAMA_ROLES,
    architectures=("MistralForCausalLM",),
    default_architecture="MistralForCausalLM",
    base_model_prefix="model",
    stage_adapter="rotary_decoder",
    tensor_parallel=LLAMA_TENSOR_PARALLEL,
    decode=True,
    loss="causal_lm",
)
