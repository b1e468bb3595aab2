"""Qwen2 (``model_type`` ``qwen2``): transformers ``Qwen2ForCausalLM`` (models/qwen2/modeling_qwen2.py),
a Llama-like decoder with q/k/v biases and a sliding window on some layers."""

from __future__ import annotations

from cachefit.families._blocks import full_rotary, layered_window, sliding_window
from cachefit.families._llama_like import llama_like, read_decoder_dims
from cachefit.families.family_spec import FamilySpec
from cachefit.families.llama import GATED_MLP, LLAMA_ROLES, LLAMA_TENSOR_PARALLEL
from cachefit.families.reader import ConfigReader
from cachefit.profile.spec import TransformerSpec


def qwen_window(cfg: ConfigReader, layers: int) -> int | None:
    """Qwen2Config / Qwen3Config ``__post_init__``: the window applies only with
    ``use_sliding_window``, and only to the layers ``layer_types`` marks ``sliding_attention``
    (default: index >= max_window_layers)."""
    window = sliding_window(cfg, absent=4096) if cfg.flag("use_sliding_window", absent=False) else None

    def default_types() -> list[bool]:
        first = cfg.integer("max_window_layers", absent=28, minimum=0)
        return [i >= first for i in range(layers)]

    return layered_window(cfg, layers, window, default_types=default_types)


def read_qwen2(cfg: ConfigReader) -> TransformerSpec:
    # Qwen2Config: num_key_value_heads 32, no head_dim field (Qwen2Attention reads
    # getattr(config, "head_dim", hidden/heads)), q/k/v biases True and o_proj bias False
    # (hard-coded in Qwen2Attention), tie_word_embeddings False, max_position_embeddings 32768.
    dims = read_decoder_dims(cfg, kv_absent=32)
    return llama_like(
        cfg,
        family="qwen2",
        dims=dims,
        tie=cfg.flag("tie_word_embeddings", absent=False),
        max_positions=cfg.integer("max_position_embeddings", absent=32768),
        rotary_dim=full_rotary(cfg, dims.head_dim, "Qwen2RotaryEmbedding"),
        mlp="gated",
        qkv_bias=True,
        sliding_window=qwen_window(cfg, dims.layers),
    )


FAMILY = FamilySpec(
    name="qwen2",
    config_class="Qwen2Config",
    adapter=read_qwen2,
    causal=True,
    mlp_patterns=(GATED_MLP,),
    role_names=LLAMA_ROLES,
    architectures=("Qwen2ForCausalLM",),
    default_architecture="Qwen2ForCausalLM",
    base_model_prefix="model",
    stage_adapter="rotary_decoder",
    tensor_parallel=LLAMA_TENSOR_PARALLEL,
    decode=True,
    loss="causal_lm",
)
