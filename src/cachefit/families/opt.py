"""OPT (``model_type`` ``opt``): transformers ``OPTForCausalLM`` (models/opt/modeling_opt.py), with
learned positions offset by 2 and optional projections around a narrower embedding."""

from __future__ import annotations

from cachefit.families._blocks import derived_head_dim, linear, lm_head, norm, tensor
from cachefit.families.family_spec import FamilySpec, MlpPattern, RoleNames
from cachefit.families.reader import ConfigReader
from cachefit.profile.spec import TransformerSpec
from cachefit.units import ForwardSpec, TensorSpec


def read_opt(cfg: ConfigReader) -> TransformerSpec:
    # OPTConfig: word_embed_proj_dim None (-> hidden_size), enable_bias True,
    # layer_norm_elementwise_affine True, do_layer_norm_before True, _remove_final_layer_norm False,
    # tie_word_embeddings True. OPTLearnedPositionalEmbedding keeps max_position_embeddings + 2 rows
    # (positions are offset by 2). project_in / project_out exist when word_embed_proj_dim != hidden.
    hidden = cfg.integer("hidden_size")
    layers = cfg.integer("num_hidden_layers")
    heads = cfg.integer("num_attention_heads")
    ffn = cfg.integer("ffn_dim")
    vocab = cfg.integer("vocab_size")
    positions = cfg.integer("max_position_embeddings")
    proj = cfg.integer("word_embed_proj_dim", absent=hidden, null=hidden)
    bias = cfg.flag("enable_bias", absent=True)
    affine = cfg.flag("layer_norm_elementwise_affine", absent=True)
    pre_norm = cfg.flag("do_layer_norm_before", absent=True)
    final_norm = pre_norm and not cfg.flag("_remove_final_layer_norm", absent=False)
    tie = cfg.flag("tie_word_embeddings", absent=True)
    head_dim = derived_head_dim(cfg, hidden, heads, "hidden_size", "num_attention_heads", explicit=False)
    embed = "model.decoder.embed_tokens.weight"
    embedding: list[TensorSpec] = [
        tensor(embed, (vocab, proj), "embed"),
        tensor("model.decoder.embed_positions.weight", (positions + 2, hidden), "pos_embed"),
    ]
    head: list[TensorSpec] = []
    if final_norm:
        head += norm("model.decoder.final_layer_norm", hidden, block=None, bias=True, affine=affine)
    if proj != hidden:
        embedding += linear("model.decoder.project_in", proj, hidden, role="embed", block=None, bias=False)
        head += linear("model.decoder.project_out", hidden, proj, role="head", block=None, bias=False)
    head.append(lm_head("lm_head.weight", vocab, proj, tie_to=embed if tie else None))
    all_layers = []
    for i in range(layers):
        p = f"model.decoder.layers.{i}"
        all_layers.append(
            (
                *norm(f"{p}.self_attn_layer_norm", hidden, block="attn", bias=True, affine=affine),
                *linear(f"{p}.self_attn.q_proj", hidden, hidden, role="qkv", block="attn", bias=bias),
                *linear(f"{p}.self_attn.k_proj", hidden, hidden, role="qkv", block="attn", bias=bias),
                *linear(f"{p}.self_attn.v_proj", hidden, hidden, role="qkv", block="attn", bias=bias),
                *linear(f"{p}.self_attn.out_proj", hidden, hidden, role="attn_out", block="attn", bias=bias),
                *norm(f"{p}.final_layer_norm", hidden, block="mlp", bias=True, affine=affine),
                *linear(f"{p}.fc1", hidden, ffn, role="mlp", block="mlp", bias=bias),
                *linear(f"{p}.fc2", ffn, hidden, role="mlp", block="mlp", bias=bias),
            )
        )
    return TransformerSpec(
        name=cfg.name,
        source=cfg.source,
        family="opt",
        causal=True,
        num_layers=layers,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim,
        intermediate_size=ffn,
        vocab_size=vocab,
        gated_mlp=False,
        rotary_dim=0,
        max_position_embeddings=positions,
        tie_word_embeddings=tie,
        embedding_tensors=tuple(embedding),
        layer_tensors=tuple(all_layers),
        head_tensors=tuple(head),
        notes=tuple(cfg.notes),
        # nn.LayerNorm; OPTDecoder derives positions from a cumsum over a B x S mask and looks them
        # up per sequence (B x T x h); project_in maps a narrower (or wider) token lookup to h.
        forward=ForwardSpec(norm="layer", position_lookup="batched", embed_proj_dim=proj if proj != hidden else 0),
    )


FAMILY = FamilySpec(
    name="opt",
    config_class="OPTConfig",
    adapter=read_opt,
    causal=True,
    mlp_patterns=(MlpPattern(up="fc1", down="fc2"),),  # also Phi-1/2's PhiMLP
    role_names=RoleNames(qkv=("q_proj", "k_proj", "v_proj"), attn_out=("out_proj",), head=("lm_head",)),
    architectures=("OPTForCausalLM",),
    default_architecture="OPTForCausalLM",
    base_model_prefix="model",
)
