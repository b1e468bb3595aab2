"""Phi-3 (``model_type`` ``phi3``): transformers ``Phi3ForCausalLM`` (models/phi3/modeling_phi3.py),
a Llama-like decoder with fused qkv_proj and gate_up_proj and partial rotary embeddings."""

from __future__ import annotations

from cachefit.families._blocks import partial_rotary, sliding_window
from cachefit.families._llama_like import llama_like, read_decoder_dims
from cachefit.families.family_spec import FamilySpec, MlpPattern, RoleNames
from cachefit.families.reader import ConfigReader
from cachefit.profile.spec import TransformerSpec


def read_phi3(cfg: ConfigReader) -> TransformerSpec:
    # Phi3Config: num_key_value_heads None (-> heads), no head_dim field (read with getattr),
    # no biases, fused qkv_proj and gate_up_proj, tie_word_embeddings False,
    # max_position_embeddings 4096, sliding_window None; Phi3RotaryEmbedding rotates
    # int(head_dim * partial_rotary_factor) dimensions (default 1.0).
    dims = read_decoder_dims(cfg, kv_absent=None)
    return llama_like(
        cfg,
        family="phi3",
        dims=dims,
        tie=cfg.flag("tie_word_embeddings", absent=False),
        max_positions=cfg.integer("max_position_embeddings", absent=4096),
        rotary_dim=partial_rotary(cfg, dims.head_dim, default=1.0),
        mlp="fused_gated",
        fused_qkv=True,
        sliding_window=sliding_window(cfg, absent=None),
    )


FAMILY = FamilySpec(
    name="phi3",
    config_class="Phi3Config",
    adapter=read_phi3,
    causal=True,
    # Phi3MLP.gate_up_proj: gate rows first, then up rows
    mlp_patterns=(MlpPattern(up="gate_up_proj", down="down_proj", fused_gate_up=True),),
    role_names=RoleNames(qkv=("qkv_proj",), attn_out=("o_proj",), head=("lm_head",)),
    architectures=("Phi3ForCausalLM",),
    default_architecture="Phi3ForCausalLM",
    base_model_prefix="model",
)
