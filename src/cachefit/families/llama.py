"""Llama (``model_type`` ``llama``): transformers ``LlamaForCausalLM`` (models/llama/modeling_llama.py)."""

from __future__ import annotations

from cachefit.families._blocks import full_rotary
from cachefit.families._llama_like import llama_like, read_decoder_dims
from cachefit.families.family_spec import (
    FamilySpec,
    MlpPattern,
    RoleNames,
    TensorParallelSpec,
)
from cachefit.families.reader import ConfigReader
from cachefit.profile.spec import TransformerSpec

GATED_MLP = MlpPattern(up="up_proj", gate="gate_proj", down="down_proj")
"""The gated MLP of the Llama-like families (``LlamaMLP``: gate_proj, up_proj, down_proj)."""
LLAMA_ROLES = RoleNames(qkv=("q_proj", "k_proj", "v_proj"), attn_out=("o_proj",), head=("lm_head",))
"""Module names of the Llama-like families' attention and head."""
LLAMA_TENSOR_PARALLEL = TensorParallelSpec(
    layer="model.layers.{i}",
    attention="self_attn",  # LlamaAttention: view(..., -1, head_dim), GQA by num_key_value_groups
    query="self_attn.q_proj",
    key_value=("self_attn.k_proj", "self_attn.v_proj"),
    attention_out="self_attn.o_proj",
    mlp_in=("mlp.gate_proj", "mlp.up_proj"),
    mlp_out="mlp.down_proj",
    embedding="model.embed_tokens",
    head="lm_head",
    group_attr="num_key_value_groups",
)
"""How a split unit of a Llama-like decoder is sharded (torchtitan's llama plan, Megatron's pairs)."""


def read_llama(cfg: ConfigReader) -> TransformerSpec:
    # LlamaConfig: num_key_value_heads None (-> heads), head_dim None (-> hidden/heads),
    # attention_bias False (q, k, v and o), mlp_bias False, tie_word_embeddings False,
    # max_position_embeddings 2048.
    dims = read_decoder_dims(cfg, kv_absent=None)
    attn_bias = cfg.flag("attention_bias", absent=False)
    return llama_like(
        cfg,
        family="llama",
        dims=dims,
        tie=cfg.flag("tie_word_embeddings", absent=False),
        max_positions=cfg.integer("max_position_embeddings", absent=2048),
        rotary_dim=full_rotary(cfg, dims.head_dim, "LlamaRotaryEmbedding"),
        mlp="gated",
        qkv_bias=attn_bias,
        o_bias=attn_bias,
        mlp_bias=cfg.flag("mlp_bias", absent=False),
    )


FAMILY = FamilySpec(
    name="llama",
    config_class="LlamaConfig",
    adapter=read_llama,
    causal=True,
    mlp_patterns=(GATED_MLP,),
    role_names=LLAMA_ROLES,
    architectures=("LlamaForCausalLM",),
    default_architecture="LlamaForCausalLM",
    base_model_prefix="model",
    stage_adapter="rotary_decoder",
    tensor_parallel=LLAMA_TENSOR_PARALLEL,
    decode=True,
    loss="causal_lm",
)
