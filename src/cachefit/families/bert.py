"""BERT (``model_type`` ``bert``): transformers ``BertModel`` or ``BertForMaskedLM``
(models/bert/modeling_bert.py), a post-LN encoder.

Which class a spec mirrors: ``BertForMaskedLM`` when ``architectures[0]`` names it (no pooler; the
MLM head: transform dense + LayerNorm, a decoder tied to the word embeddings, an output bias),
otherwise ``BertModel`` with its pooler (what ``AutoModel`` builds; ``architectures`` absent,
``BertModel``, or a task class whose head is then left out, which a note says).
"""

from __future__ import annotations

from cachefit.errors import ProfileError
from cachefit.families._blocks import common_dims, derived_head_dim, linear, norm, tensor
from cachefit.families.family_spec import FamilySpec, MlpPattern, RoleNames, TensorParallelSpec
from cachefit.families.reader import ConfigReader
from cachefit.profile.spec import TransformerSpec
from cachefit.units import ForwardSpec

_PROFILED = ("BertModel", "BertForMaskedLM")  # the classes whose every tensor the spec lists


def read_bert(cfg: ConfigReader) -> TransformerSpec:
    # BertConfig: type_vocab_size 2, is_decoder False, add_cross_attention False,
    # tie_word_embeddings True. BertSelfOutput's LayerNorm closes the attention block and
    # BertOutput's LayerNorm the MLP block (post-LN).
    hidden, layers, heads, inter, vocab = common_dims(cfg)
    positions = cfg.integer("max_position_embeddings")
    type_vocab = cfg.integer("type_vocab_size", absent=2, minimum=0)
    causal = cfg.flag("is_decoder", absent=False)
    if cfg.flag("add_cross_attention", absent=False):
        raise ProfileError(
            f"{cfg.where}: add_cross_attention is set (BERT as an encoder-decoder's decoder); cachefit "
            f"profiles BERT encoders: remove the key or set it to false"
        )
    head_dim = derived_head_dim(cfg, hidden, heads, "hidden_size", "num_attention_heads", explicit=False)
    tie = cfg.flag("tie_word_embeddings", absent=True)
    architectures = cfg.raw("architectures") or []
    arch = architectures[0] if isinstance(architectures, list) and architectures else None
    masked_lm = arch == "BertForMaskedLM"
    if arch is not None and arch not in _PROFILED:
        cfg.notes.append(
            f"architectures[0] is {arch}: profiled as BertModel (pooler included), its task head left out"
        )
    base = "bert." if masked_lm else ""
    embed = f"{base}embeddings.word_embeddings.weight"
    embedding = (
        tensor(embed, (vocab, hidden), "embed"),
        tensor(f"{base}embeddings.position_embeddings.weight", (positions, hidden), "pos_embed"),
        tensor(f"{base}embeddings.token_type_embeddings.weight", (type_vocab, hidden), "pos_embed"),
        *norm(f"{base}embeddings.LayerNorm", hidden, block=None, bias=True),
    )
    all_layers = []
    for i in range(layers):
        p = f"{base}encoder.layer.{i}"
        all_layers.append(
            (
                *linear(f"{p}.attention.self.query", hidden, hidden, role="qkv", block="attn", bias=True),
                *linear(f"{p}.attention.self.key", hidden, hidden, role="qkv", block="attn", bias=True),
                *linear(f"{p}.attention.self.value", hidden, hidden, role="qkv", block="attn", bias=True),
                *linear(f"{p}.attention.output.dense", hidden, hidden, role="attn_out", block="attn", bias=True),
                *norm(f"{p}.attention.output.LayerNorm", hidden, block="attn", bias=True),
                *linear(f"{p}.intermediate.dense", hidden, inter, role="mlp", block="mlp", bias=True),
                *linear(f"{p}.output.dense", inter, hidden, role="mlp", block="mlp", bias=True),
                *norm(f"{p}.output.LayerNorm", hidden, block="mlp", bias=True),
            )
        )
    if masked_lm:
        # BertLMPredictionHead: transform (dense + LayerNorm), decoder Linear(hidden, vocab) with a
        # bias, and its own `bias` parameter; tied, decoder.weight is the word embedding and
        # decoder.bias is cls.predictions.bias (BertForMaskedLM._tied_weights_keys).
        p = "cls.predictions"
        head = (
            *linear(f"{p}.transform.dense", hidden, hidden, role="head", block=None, bias=True),
            *norm(f"{p}.transform.LayerNorm", hidden, block=None, bias=True),
            tensor(f"{p}.decoder.weight", (vocab, hidden), "head", None, embed if tie else None),
            tensor(f"{p}.decoder.bias", (vocab,), "head", None, f"{p}.bias" if tie else None),
            tensor(f"{p}.bias", (vocab,), "head"),
        )
    else:
        head = linear("pooler.dense", hidden, hidden, role="head", block=None, bias=True)
    return TransformerSpec(
        name=cfg.name,
        source=cfg.source,
        family="bert",
        causal=causal,
        num_layers=layers,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim,
        intermediate_size=inter,
        vocab_size=vocab,
        gated_mlp=False,
        rotary_dim=0,
        max_position_embeddings=positions,
        tie_word_embeddings=tie,
        embedding_tensors=embedding,
        layer_tensors=tuple(all_layers),
        head_tensors=head,
        notes=tuple(cfg.notes),
        # Post-LN nn.LayerNorm; eager softmax in the activation dtype; BertEmbeddings sums the word,
        # token-type and (1 x T x h, broadcast) position lookups and norms them.
        forward=ForwardSpec(
            norm="layer", softmax_fp32=False, position_lookup="broadcast", embedding_norm=True, post_norm=True
        ),
    )


FAMILY = FamilySpec(
    name="bert",
    config_class="BertConfig",
    adapter=read_bert,
    causal=False,
    mlp_patterns=(MlpPattern(up="intermediate.dense", down="output.dense"),),  # BertLayer's
    # cls: BertForMaskedLM's prediction head (transform, decoder), as the spec's "head" role says
    role_names=RoleNames(qkv=("query", "key", "value"), attn_out=("dense",), head=("pooler", "cls")),
    architectures=("BertModel",),  # what deploy builds: the encoder, its last hidden state out
    default_architecture="BertModel",
    base_model_prefix="bert",
    stage_adapter="bert_encoder",
    # BertSelfAttention views heads of attention_head_size; the pooler (the head unit) and the
    # position / token-type embeddings stay whole on every card
    tensor_parallel=TensorParallelSpec(
        layer="encoder.layer.{i}",
        attention="attention.self",
        query="attention.self.query",
        key_value=("attention.self.key", "attention.self.value"),
        attention_out="attention.output.dense",
        mlp_in=("intermediate.dense",),
        mlp_out="output.dense",
        embedding="embeddings.word_embeddings",
        head_count_attrs=("num_attention_heads",),
        head_width_attrs=("all_head_size",),
    ),
    loss="encoder_mean",
)
