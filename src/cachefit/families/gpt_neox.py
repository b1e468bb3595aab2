"""GPT-NeoX (``model_type`` ``gpt_neox``): transformers ``GPTNeoXForCausalLM``
(models/gpt_neox/modeling_gpt_neox.py), with parallel attention and MLP by default."""

from __future__ import annotations

from cachefit.families._blocks import common_dims, derived_head_dim, linear, lm_head, norm, partial_rotary, tensor
from cachefit.families.family_spec import FamilySpec, MlpPattern, RoleNames
from cachefit.families.reader import ConfigReader
from cachefit.profile.spec import TransformerSpec
from cachefit.units import ForwardSpec

DENSE_4H_MLP = MlpPattern(up="dense_h_to_4h", down="dense_4h_to_h")
"""The MLP of GPT-NeoX, Falcon and BLOOM."""
FUSED_QKV_ROLES = RoleNames(qkv=("query_key_value",), attn_out=("dense",), head=("lm_head",))
"""Module names of GPT-NeoX's and Falcon's attention (one fused query_key_value) and head."""


def read_gpt_neox(cfg: ConfigReader) -> TransformerSpec:
    # GPTNeoXConfig: attention_bias True, use_parallel_residual True, tie_word_embeddings False,
    # max_position_embeddings 2048, rotary_pct 0.25. The MLP always has biases. transformers 5
    # names the (untied) LM head `lm_head` (checkpoints call it `embed_out`; loading renames it).
    hidden, layers, heads, inter, vocab = common_dims(cfg)
    head_dim = derived_head_dim(cfg, hidden, heads, "hidden_size", "num_attention_heads", explicit=False)
    attn_bias = cfg.flag("attention_bias", absent=True)
    parallel = cfg.flag("use_parallel_residual", absent=True)
    tie = cfg.flag("tie_word_embeddings", absent=False)
    embed = "gpt_neox.embed_in.weight"
    all_layers = []
    for i in range(layers):
        p = f"gpt_neox.layers.{i}"
        all_layers.append(
            (
                *norm(f"{p}.input_layernorm", hidden, block="attn", bias=True),
                *linear(
                    f"{p}.attention.query_key_value", hidden, 3 * hidden, role="qkv", block="attn", bias=attn_bias
                ),
                *linear(f"{p}.attention.dense", hidden, hidden, role="attn_out", block="attn", bias=attn_bias),
                *norm(f"{p}.post_attention_layernorm", hidden, block="mlp", bias=True),
                *linear(f"{p}.mlp.dense_h_to_4h", hidden, inter, role="mlp", block="mlp", bias=True),
                *linear(f"{p}.mlp.dense_4h_to_h", inter, hidden, role="mlp", block="mlp", bias=True),
            )
        )
    max_positions = cfg.integer("max_position_embeddings", absent=2048)
    rotary_dim = partial_rotary(cfg, head_dim, default=0.25, legacy_key="rotary_pct")
    return TransformerSpec(
        name=cfg.name,
        source=cfg.source,
        family="gpt_neox",
        causal=True,
        num_layers=layers,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim,
        intermediate_size=inter,
        vocab_size=vocab,
        gated_mlp=False,
        parallel_attn_mlp=parallel,
        rotary_dim=rotary_dim,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie,
        embedding_tensors=(tensor(embed, (vocab, hidden), "embed"),),
        layer_tensors=tuple(all_layers),
        head_tensors=(
            *norm("gpt_neox.final_layer_norm", hidden, block=None, bias=True),
            lm_head("lm_head.weight", vocab, hidden, tie_to=embed if tie else None),
        ),
        notes=tuple(cfg.notes),
        # nn.LayerNorm; q, k, v are views of query_key_value's output.
        forward=ForwardSpec(norm="layer", fused_qkv=True),
    )


FAMILY = FamilySpec(
    name="gpt_neox",
    config_class="GPTNeoXConfig",
    adapter=read_gpt_neox,
    causal=True,
    mlp_patterns=(DENSE_4H_MLP,),
    role_names=FUSED_QKV_ROLES,
    architectures=("GPTNeoXForCausalLM",),
    default_architecture="GPTNeoXForCausalLM",
    base_model_prefix="gpt_neox",
)
