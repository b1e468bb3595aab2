"""cachefit-dense (``model_type`` ``cachefit-dense``): cachefit's own family for the seed paper's
model, a pre-norm decoder with weight-only RMS norms, no biases, a two-matrix MLP (up, down) and
Llama's module names. No ``transformers`` class exists for it: the spec is Llama's minus gate_proj."""

from __future__ import annotations

from cachefit.families._blocks import sliding_window
from cachefit.families._llama_like import llama_like, read_decoder_dims
from cachefit.families.family_spec import FamilySpec, MlpPattern
from cachefit.families.llama import LLAMA_ROLES
from cachefit.families.reader import ConfigReader
from cachefit.profile.spec import TransformerSpec


def read_dense(cfg: ConfigReader) -> TransformerSpec:
    # cachefit's own family: Llama module names, two-matrix MLP, no biases. Defaults: KV heads =
    # heads, head_dim = hidden/heads, untied head, no rotary (partial_rotary_factor 0: the seed
    # paper names no position scheme), max_position_embeddings 0 (unknown), no sliding window.
    dims = read_decoder_dims(cfg, kv_absent=None)
    factor = cfg.raw("partial_rotary_factor")
    rotary = 0 if factor in (None, 0) else int(dims.head_dim * cfg.fraction("partial_rotary_factor", factor))
    return llama_like(
        cfg,
        family="dense",
        dims=dims,
        tie=cfg.flag("tie_word_embeddings", absent=False),
        max_positions=cfg.integer("max_position_embeddings", absent=0, minimum=0),
        rotary_dim=rotary,
        mlp="plain",
        sliding_window=sliding_window(cfg, absent=None),
    )


FAMILY = FamilySpec(
    name="cachefit-dense",
    config_class="cachefit-dense",
    adapter=read_dense,
    causal=True,
    mlp_patterns=(MlpPattern(up="up_proj", down="down_proj"),),
    role_names=LLAMA_ROLES,
    architectures=(),  # no transformers class; the tensor names are LlamaForCausalLM's
    default_architecture=None,
    base_model_prefix="model",
)
