"""Mixtral (``model_type`` ``mixtral``): transformers ``MixtralForCausalLM``
(models/mixtral/modeling_mixtral.py), a Llama-like decoder whose MLP is a mixture of experts."""

from __future__ import annotations

from cachefit.errors import ConfigError
from cachefit.families._blocks import full_rotary, sliding_window
from cachefit.families._llama_like import llama_like, read_decoder_dims
from cachefit.families.family_spec import FamilySpec, MlpPattern
from cachefit.families.llama import LLAMA_ROLES
from cachefit.families.reader import ConfigReader
from cachefit.profile.spec import TransformerSpec


def read_mixtral(cfg: ConfigReader) -> TransformerSpec:
    # MixtralConfig: num_key_value_heads 8, head_dim None (-> hidden/heads), num_local_experts 8
    # (alias num_experts; required here, it sizes most weights), num_experts_per_tok 2,
    # tie_word_embeddings False, max_position_embeddings 4096 * 32, sliding_window None.
    dims = read_decoder_dims(cfg, kv_absent=8)
    experts = cfg.integer("num_local_experts", aliases=("num_experts",))
    top_k = cfg.integer("num_experts_per_tok", absent=2, note=True)
    if top_k > experts:
        raise ConfigError(
            f'{cfg.where}: "num_experts_per_tok" ({top_k}) exceeds "num_local_experts" ({experts}); '
            f"a token cannot be routed to more experts than exist, lower num_experts_per_tok"
        )
    return llama_like(
        cfg,
        family="mixtral",
        dims=dims,
        tie=cfg.flag("tie_word_embeddings", absent=False),
        max_positions=cfg.integer("max_position_embeddings", absent=4096 * 32),
        rotary_dim=full_rotary(cfg, dims.head_dim, "MixtralRotaryEmbedding"),
        mlp="moe",
        sliding_window=sliding_window(cfg, absent=None),
        num_experts=experts,
        experts_per_token=top_k,
    )


FAMILY = FamilySpec(
    name="mixtral",
    config_class="MixtralConfig",
    adapter=read_mixtral,
    causal=True,
    mlp_patterns=(
        # transformers 5 MixtralExperts: 3-D parameters experts.gate_up_proj (E, 2I, H) and
        # experts.down_proj (E, H, I); techniques.py reads the names, apply.py prunes only Linears.
        MlpPattern(up="gate_up_proj", down="down_proj", fused_gate_up=True),
        # transformers 4 MixtralBlockSparseTop2MLP (and the original release): one Linear each.
        MlpPattern(up="w3", gate="w1", down="w2"),
    ),
    role_names=LLAMA_ROLES,
    architectures=("MixtralForCausalLM",),
    default_architecture="MixtralForCausalLM",
    base_model_prefix="model",
)
