"""GPT-2 (``model_type`` ``gpt2``): transformers ``GPT2LMHeadModel`` (models/gpt2/modeling_gpt2.py),
with ``Conv1D`` layers that store their weights (in, out) and a fused ``c_attn``."""

from __future__ import annotations

from cachefit.errors import ProfileError
from cachefit.families._blocks import conv1d, derived_head_dim, lm_head, norm, tensor
from cachefit.families.family_spec import (
    FamilySpec,
    MlpPattern,
    RoleNames,
    TensorParallelSpec,
)
from cachefit.families.reader import ConfigReader
from cachefit.profile.spec import TransformerSpec
from cachefit.units import ForwardSpec

# Activations that transformers writes in Python (transformers/activations.py), by the MLP-width
# temporaries they hold besides their input and output (counted op by op); the others are one kernel.
_ACTIVATION_TEMPORARIES = {"gelu_new": 2, "gelu_fast": 3, "quick_gelu": 1}


def read_gpt2(cfg: ConfigReader) -> TransformerSpec:
    # GPT2Config: attribute_map hidden_size -> n_embd, num_attention_heads -> n_head,
    # num_hidden_layers -> n_layer, max_position_embeddings -> n_positions; n_inner None
    # (-> 4 * n_embd, GPT2Block), tie_word_embeddings True. Fused c_attn (q, k, v) in Conv1D.
    hidden = cfg.integer("n_embd", aliases=("hidden_size",))
    layers = cfg.integer("n_layer", aliases=("num_hidden_layers",))
    heads = cfg.integer("n_head", aliases=("num_attention_heads",))
    vocab = cfg.integer("vocab_size")
    positions = cfg.integer("n_positions", aliases=("max_position_embeddings",))
    inner = cfg.integer("n_inner", absent=4 * hidden, null=4 * hidden)
    if cfg.flag("add_cross_attention", absent=False):
        raise ProfileError(
            f"{cfg.where}: add_cross_attention is set (GPT-2 as an encoder-decoder's decoder); cachefit "
            f"profiles decoder-only GPT-2: remove the key or set it to false"
        )
    head_dim = derived_head_dim(cfg, hidden, heads, "n_embd", "n_head", explicit=False)
    tie = cfg.flag("tie_word_embeddings", absent=True)
    embed = "transformer.wte.weight"
    all_layers = []
    for i in range(layers):
        p = f"transformer.h.{i}"
        all_layers.append(
            (
                *norm(f"{p}.ln_1", hidden, block="attn", bias=True),
                *conv1d(f"{p}.attn.c_attn", hidden, 3 * hidden, role="qkv", block="attn"),
                *conv1d(f"{p}.attn.c_proj", hidden, hidden, role="attn_out", block="attn"),
                *norm(f"{p}.ln_2", hidden, block="mlp", bias=True),
                *conv1d(f"{p}.mlp.c_fc", hidden, inner, role="mlp", block="mlp"),
                *conv1d(f"{p}.mlp.c_proj", inner, hidden, role="mlp", block="mlp"),
            )
        )
    return TransformerSpec(
        name=cfg.name,
        source=cfg.source,
        family="gpt2",
        causal=True,
        num_layers=layers,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim,
        intermediate_size=inner,
        vocab_size=vocab,
        gated_mlp=False,
        rotary_dim=0,
        max_position_embeddings=positions,
        tie_word_embeddings=tie,
        embedding_tensors=(
            tensor(embed, (vocab, hidden), "embed"),
            tensor("transformer.wpe.weight", (positions, hidden), "pos_embed"),
        ),
        layer_tensors=tuple(all_layers),
        head_tensors=(
            *norm("transformer.ln_f", hidden, block=None, bias=True),
            lm_head("lm_head.weight", vocab, hidden, tie_to=embed if tie else None),
        ),
        notes=tuple(cfg.notes),
        # nn.LayerNorm; eager softmax in the activation dtype; q, k, v views of c_attn's output; the
        # position lookup of 1 x T x h broadcast over the batch and kept by GPT2Model.forward.
        forward=ForwardSpec(
            norm="layer",
            softmax_fp32=False,
            fused_qkv=True,
            activation_temporaries=_ACTIVATION_TEMPORARIES.get(str(cfg.raw("activation_function", "gelu_new")), 0),
            position_lookup="broadcast",
        ),
    )


FAMILY = FamilySpec(
    name="gpt2",
    config_class="GPT2Config",
    adapter=read_gpt2,
    causal=True,
    mlp_patterns=(MlpPattern(up="c_fc", down="c_proj"),),
    # Conv1D (transformers.pytorch_utils) stores (in, out); q_attn is the cross-attention query.
    transposed_weights=("*.c_attn.weight", "*.q_attn.weight", "*.c_proj.weight", "*.c_fc.weight"),
    role_names=RoleNames(qkv=("c_attn",), attn_out=("c_proj",), head=("lm_head",)),
    architectures=("GPT2LMHeadModel",),
    default_architecture="GPT2LMHeadModel",
    base_model_prefix="transformer",
    stage_adapter="gpt2_decoder",
    # GPT2Attention splits c_attn's output into q, k, v by split_size and views heads of head_dim;
    # Conv1D weights are (in, out), so column-parallel cuts columns and row-parallel rows
    tensor_parallel=TensorParallelSpec(
        layer="transformer.h.{i}",
        attention="attn",
        fused_qkv="attn.c_attn",
        attention_out="attn.c_proj",
        mlp_in=("mlp.c_fc",),
        mlp_out="mlp.c_proj",
        embedding="transformer.wte",  # wpe (positions) stays whole on every card
        head="lm_head",
        head_count_attrs=("num_heads",),
        head_width_attrs=("split_size",),
    ),
    loss="causal_lm",
)
