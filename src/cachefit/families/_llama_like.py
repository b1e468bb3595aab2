"""The Llama-like decoder layer, shared by llama, mistral, qwen2, qwen3, gemma, gemma2, phi3,
mixtral and cachefit-dense.

transformers: models/<family>/modeling_<family>.py; ``<Family>DecoderLayer`` holds
``input_layernorm``, ``self_attn``, ``post_attention_layernorm``, ``mlp``; ``<Family>Model`` holds
``embed_tokens`` and ``norm``; ``<Family>ForCausalLM`` adds ``lm_head``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from cachefit.families._blocks import common_dims, head_dim, kv_heads, linear, lm_head, norm, tensor
from cachefit.families.reader import ConfigReader
from cachefit.profile.spec import TransformerSpec
from cachefit.units import ForwardSpec, TensorSpec

Mlp = Literal["gated", "fused_gated", "plain", "moe"]

_LLAMA_FORWARD = ForwardSpec()
"""Llama's forward: the defaults of ForwardSpec."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DecoderDims:
    """The dimensions every Llama-like config gives (the keys that size its weights)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int


def read_decoder_dims(cfg: ConfigReader, *, kv_absent: int | None, head_dim_absent: int | None = None
                      ) -> DecoderDims:
    """Width, depth, heads, KV heads, head dim, MLP width and vocabulary, read as every Llama-like
    family reads them; ``kv_absent`` / ``head_dim_absent``: the config class's defaults (None: = heads,
    = hidden / heads)."""
    hidden, layers, heads, inter, vocab = common_dims(cfg)
    kv = kv_heads(cfg, heads, absent=kv_absent)
    dim = head_dim(cfg, hidden, heads, absent=head_dim_absent)
    return DecoderDims(hidden=hidden, layers=layers, heads=heads, kv_heads=kv, head_dim=dim, intermediate=inter,
                       vocab=vocab)


def llama_like(
    cfg: ConfigReader,
    *,
    family: str,
    dims: DecoderDims,
    tie: bool,
    max_positions: int,
    rotary_dim: int,
    mlp: Mlp,
    qkv_bias: bool = False,
    o_bias: bool = False,
    mlp_bias: bool = False,
    fused_qkv: bool = False,
    qk_norm: bool = False,
    sandwich_norms: bool = False,
    sliding_window: int | None = None,
    num_experts: int = 0,
    experts_per_token: int = 0,
    forward: ForwardSpec = _LLAMA_FORWARD,
) -> TransformerSpec:
    """The spec of a Llama-style pre-norm decoder.

    ``mlp``: ``gated`` (gate_proj, up_proj, down_proj), ``fused_gated`` (Phi-3 gate_up_proj of
    2 x intermediate rows, down_proj), ``plain`` (up_proj, down_proj: cachefit-dense) or ``moe``
    (Mixtral in transformers 5: router ``mlp.gate`` and the experts fused into 3-D parameters
    ``mlp.experts.gate_up_proj`` (E, 2I, H) and ``mlp.experts.down_proj`` (E, H, I)).
    ``qk_norm``: an RMSNorm of head_dim on each query and key head (Qwen3 ``self_attn.q_norm`` /
    ``k_norm``). ``sandwich_norms``: Gemma 2's four norms per layer, the attention's output normed
    by ``post_attention_layernorm`` before its residual add, the MLP's input by
    ``pre_feedforward_layernorm`` and its output by ``post_feedforward_layernorm``.
    ``forward``: how the family's forward differs from Llama's beyond these (its fused
    projections and q/k norms are set here from the arguments above).
    """
    hidden, layers, heads, head_dim, intermediate, vocab = (dims.hidden, dims.layers, dims.heads, dims.head_dim,
                                                            dims.intermediate, dims.vocab)
    kv_heads = dims.kv_heads
    embed = "model.embed_tokens.weight"
    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    all_layers = []
    for i in range(layers):
        p = f"model.layers.{i}"
        tensors: list[TensorSpec] = [*norm(f"{p}.input_layernorm", hidden, block="attn", bias=False)]
        if fused_qkv:  # Phi3Attention.qkv_proj: rows = q, then k, then v
            tensors += linear(
                f"{p}.self_attn.qkv_proj", hidden, q_out + 2 * kv_out, role="qkv", block="attn", bias=qkv_bias
            )
        else:
            tensors += linear(f"{p}.self_attn.q_proj", hidden, q_out, role="qkv", block="attn", bias=qkv_bias)
            tensors += linear(f"{p}.self_attn.k_proj", hidden, kv_out, role="qkv", block="attn", bias=qkv_bias)
            tensors += linear(f"{p}.self_attn.v_proj", hidden, kv_out, role="qkv", block="attn", bias=qkv_bias)
        tensors += linear(f"{p}.self_attn.o_proj", q_out, hidden, role="attn_out", block="attn", bias=o_bias)
        if qk_norm:  # Qwen3Attention: Qwen3RMSNorm(head_dim), weight only
            tensors += norm(f"{p}.self_attn.q_norm", head_dim, block="attn", bias=False)
            tensors += norm(f"{p}.self_attn.k_norm", head_dim, block="attn", bias=False)
        if sandwich_norms:  # Gemma2DecoderLayer
            tensors += norm(f"{p}.post_attention_layernorm", hidden, block="attn", bias=False)
            tensors += norm(f"{p}.pre_feedforward_layernorm", hidden, block="mlp", bias=False)
            tensors += norm(f"{p}.post_feedforward_layernorm", hidden, block="mlp", bias=False)
        else:
            tensors += norm(f"{p}.post_attention_layernorm", hidden, block="mlp", bias=False)
        if mlp == "gated":
            tensors += linear(f"{p}.mlp.gate_proj", hidden, intermediate, role="mlp", block="mlp", bias=mlp_bias)
            tensors += linear(f"{p}.mlp.up_proj", hidden, intermediate, role="mlp", block="mlp", bias=mlp_bias)
            tensors += linear(f"{p}.mlp.down_proj", intermediate, hidden, role="mlp", block="mlp", bias=mlp_bias)
        elif mlp == "fused_gated":
            tensors += linear(
                f"{p}.mlp.gate_up_proj", hidden, 2 * intermediate, role="mlp", block="mlp", bias=False
            )
            tensors += linear(f"{p}.mlp.down_proj", intermediate, hidden, role="mlp", block="mlp", bias=False)
        elif mlp == "plain":
            tensors += linear(f"{p}.mlp.up_proj", hidden, intermediate, role="mlp", block="mlp", bias=False)
            tensors += linear(f"{p}.mlp.down_proj", intermediate, hidden, role="mlp", block="mlp", bias=False)
        elif mlp == "moe":
            tensors.append(tensor(f"{p}.mlp.gate.weight", (num_experts, hidden), "router", "mlp"))
            tensors.append(
                tensor(f"{p}.mlp.experts.gate_up_proj", (num_experts, 2 * intermediate, hidden), "experts", "mlp")
            )
            tensors.append(
                tensor(f"{p}.mlp.experts.down_proj", (num_experts, hidden, intermediate), "experts", "mlp")
            )
        else:  # pragma: no cover - internal
            raise AssertionError(mlp)
        all_layers.append(tuple(tensors))
    return TransformerSpec(
        name=cfg.name,
        source=cfg.source,
        family=family,
        causal=True,
        num_layers=layers,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate,
        vocab_size=vocab,
        gated_mlp=mlp in ("gated", "fused_gated", "moe"),
        num_experts=num_experts,
        experts_per_token=experts_per_token,
        rotary_dim=rotary_dim,
        sliding_window=sliding_window,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie,
        embedding_tensors=(tensor(embed, (vocab, hidden), "embed"),),
        layer_tensors=tuple(all_layers),
        head_tensors=(
            *norm("model.norm", hidden, block=None, bias=False),
            lm_head("lm_head.weight", vocab, hidden, tie_to=embed if tie else None),
        ),
        notes=tuple(cfg.notes),
        forward=dataclasses.replace(
            forward, fused_qkv=fused_qkv, qk_norm=qk_norm, fused_gate_up=mlp == "fused_gated"
        ),
    )
