"""Falcon (``model_type`` ``falcon``): transformers ``FalconForCausalLM`` (models/falcon/modeling_falcon.py),
with multi-query or grouped attention through one fused ``query_key_value`` and parallel attention/MLP."""

from __future__ import annotations

from cachefit.families._blocks import check_kv, derived_head_dim, full_rotary, linear, lm_head, norm, tensor
from cachefit.families.family_spec import FamilySpec
from cachefit.families.gpt_neox import DENSE_4H_MLP, FUSED_QKV_ROLES
from cachefit.families.reader import ConfigReader
from cachefit.profile.spec import TransformerSpec
from cachefit.units import ForwardSpec


def read_falcon(cfg: ConfigReader) -> TransformerSpec:
    # FalconConfig: n_embed overrides hidden_size; num_kv_heads None (-> heads), alibi False,
    # new_decoder_architecture False, multi_query True, parallel_attn True, bias False,
    # num_ln_in_parallel_attn None (-> 2 with the new architecture, FalconDecoderLayer),
    # ffn_hidden_size None (-> 4 * hidden), max_position_embeddings 2048, tie_word_embeddings True.
    # The `bool | None` keys treat null as false, as the model's `if config.x` does.
    hidden = cfg.integer("hidden_size", aliases=("n_embed",))
    layers = cfg.integer("num_hidden_layers")
    heads = cfg.integer("num_attention_heads")
    vocab = cfg.integer("vocab_size")
    ffn = cfg.integer("ffn_hidden_size", absent=4 * hidden, null=4 * hidden)
    head_dim = derived_head_dim(cfg, hidden, heads, "hidden_size", "num_attention_heads", explicit=False)
    new_arch = cfg.flag("new_decoder_architecture", absent=False, null=False)
    multi_query = cfg.flag("multi_query", absent=True, null=False)
    parallel = cfg.flag("parallel_attn", absent=True, null=False)
    bias = cfg.flag("bias", absent=False, null=False)
    alibi = cfg.flag("alibi", absent=False, null=False)
    tie = cfg.flag("tie_word_embeddings", absent=True)
    num_ln = cfg.integer("num_ln_in_parallel_attn", absent=None, null=None)
    if num_ln is None and new_arch:
        num_ln = 2
    # FalconAttention: query_key_value rows and the KV heads it serves.
    if new_arch:
        kv = cfg.integer("num_kv_heads", absent=heads, null=heads)
        check_kv(cfg, heads, kv, "num_attention_heads", "num_kv_heads")
        qkv_out = (heads + 2 * kv) * head_dim
    elif multi_query:
        kv, qkv_out = 1, hidden + 2 * head_dim
    else:
        kv, qkv_out = heads, 3 * hidden
    if parallel:
        norm_names = (("ln_attn", "attn"), ("ln_mlp", "mlp")) if num_ln == 2 else (("input_layernorm", "attn"),)
    else:
        norm_names = (("input_layernorm", "attn"), ("post_attention_layernorm", "mlp"))
    embed = "transformer.word_embeddings.weight"
    all_layers = []
    for i in range(layers):
        p = f"transformer.h.{i}"
        norms = {block: norm(f"{p}.{name}", hidden, block=block, bias=True) for name, block in norm_names}
        all_layers.append(
            (
                *norms["attn"],
                *linear(
                    f"{p}.self_attention.query_key_value", hidden, qkv_out, role="qkv", block="attn", bias=bias
                ),
                *linear(f"{p}.self_attention.dense", hidden, hidden, role="attn_out", block="attn", bias=bias),
                *norms.get("mlp", ()),
                *linear(f"{p}.mlp.dense_h_to_4h", hidden, ffn, role="mlp", block="mlp", bias=bias),
                *linear(f"{p}.mlp.dense_4h_to_h", ffn, hidden, role="mlp", block="mlp", bias=bias),
            )
        )
    max_positions = cfg.integer("max_position_embeddings", absent=2048)
    rotary_dim = 0 if alibi else full_rotary(cfg, head_dim, "FalconRotaryEmbedding")
    return TransformerSpec(
        name=cfg.name,
        source=cfg.source,
        family="falcon",
        causal=True,
        num_layers=layers,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        intermediate_size=ffn,
        vocab_size=vocab,
        gated_mlp=False,
        parallel_attn_mlp=new_arch or parallel,
        rotary_dim=rotary_dim,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie,
        embedding_tensors=(tensor(embed, (vocab, hidden), "embed"),),
        layer_tensors=tuple(all_layers),
        head_tensors=(
            *norm("transformer.ln_f", hidden, block=None, bias=True),
            lm_head("lm_head.weight", vocab, hidden, tie_to=embed if tie else None),
        ),
        notes=tuple(cfg.notes),
        # nn.LayerNorm; q, k, v views of query_key_value's output; FalconModel keeps each block's
        # (output, attn_weights) until the next block returns, and materializes the SDPA mask
        # (create_causal_mask(..., allow_is_causal_skip=False)); FalconDecoderLayer keeps
        # attention_layernorm_out until it returns.
        forward=ForwardSpec(norm="layer", fused_qkv=True, caller_holds_probs=True, sdpa_mask=True,
                            layer_holds_attn_norm=True),
    )


FAMILY = FamilySpec(
    name="falcon",
    config_class="FalconConfig",
    adapter=read_falcon,
    causal=True,
    mlp_patterns=(DENSE_4H_MLP,),
    role_names=FUSED_QKV_ROLES,
    architectures=("FalconForCausalLM",),
    default_architecture="FalconForCausalLM",
    base_model_prefix="transformer",
)
