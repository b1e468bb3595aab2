"""Activation bytes and FLOPs of transformer units: hand-computed worked cases, the Korthikanti
et al. 2022 reproduction, properties, and a check of the saved-for-backward model against autograd.

Most cases use one tiny Llama-like layer in fp16 (2 bytes per element):
    h = 64, heads a = 4, kv heads = 2 (GQA), head_dim d = 16, gated MLP f = 128, rotary on all 16 dims,
    batch B = 2, seq_len S = 8.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachefit.profile.activations import ActivationEstimate, estimate_activations, estimate_flops_per_token
from cachefit.errors import ConfigError
from cachefit.units import ForwardSpec, LayerShape, Workload

H, A, KV, D, F = 64, 4, 2, 16, 128
B, S = 2, 8


def llama(part: str = "layer", **changes: object) -> LayerShape:
    fields = dict(
        part=part,
        hidden_size=H,
        num_heads=A,
        num_kv_heads=KV,
        head_dim=D,
        intermediate_size=F,
        gated_mlp=True,
        rotary_dim=D,
    )
    fields.update(changes)
    return LayerShape(**fields)


def wl(mode: str = "prefill", **changes: object) -> Workload:
    return Workload(batch=B, seq_len=S, mode=mode, **changes)


# ---------------------------------------------------------------------------------------------
# Prefill, eager attention (the reference forward: transformers' modules, docs/activations.md)
#
# N = B x S = 16 tokens, fp16. Sizes used below:
#   N x h = 1024 el = 2048 B (residual stream, inputs_embeds, norms, attention output);
#   q, q_rot N x a x d = 2048 B; k, v, k_rot N x kv x d = 1024 B; k_rep, v_rep B x a x S x d = 2048 B;
#   scores B x a x S x S = 512 el = 1024 B in fp16, 2048 B in fp32; N x f = 2048 el = 4096 B;
#   position_ids 1 x S int64 = 64 B; the token ids B x S int64 = 128 B. Held through the whole layer: its
#   input (residual, held by the caller), inputs_embeds and position_ids (held by the model's forward) and
#   the token ids (the forward's argument): 2048 + 2048 + 64 + 128 = 4288 B.
HELD = 2048 + 2048 + 64 + 128


def test_prefill_eager_layer_peak_is_the_mlp_product() -> None:
    # MLP product op (Llama: act(gate(x)) * up(x)): beside the held 4288 B, the eager probabilities
    # (the layer keeps them in `_`) 1024, the attention output 2048 (GPT-2 keeps it; an upper bound
    # here), the attention residual 2048, the MLP's normed input (its argument) 2048, and act, up,
    # hidden 3 x 4096: 4288 + 1024 + 3 x 2048 + 12288 = 23744 B.
    est = estimate_activations(llama(), wl())
    assert est.activation_bytes == HELD + 1024 + 3 * 2048 + 3 * 4096 == 23744
    assert dict(est.parts) == {
        "residual": 2048, "input_ids": 128, "inputs_embeds": 2048, "position_ids": 64, "probs": 1024, "attn_out": 2048,
        "attn_residual_out": 2048, "mlp_norm": 2048, "act": 4096, "up": 4096, "hidden": 4096,
    }  # fmt: skip
    assert est.persistent_bytes == 0  # prefill keeps no KV cache
    # Buffers: additive mask B x 1 x S x S = 128 el = 256 B; rotary cos + sin, each 1 x S x 16:
    # 2 x 128 el = 512 B.
    assert est.buffer_parts == (("attention_mask", 256), ("rotary_cos_sin", 512))
    assert est.buffer_bytes == 768


def test_prefill_eager_attention_block_with_gqa_repeat_and_fp32_softmax() -> None:
    # The softmax op, softmax(x, dtype=float32): beside the held 4288 B, the normed input 2048 (the
    # attention's argument), v 1024, q_rot 2048, k_rot 1024, the repeat_kv copies 2 x 2048, the fp16
    # masked scores 1024, and the fp32 copy and fp32 output 2 x 2048: 4288 + 14336 + 1024 = 19648 B.
    est = estimate_activations(llama("attention"), wl())
    assert est.activation_bytes == HELD + 2048 + 1024 + 2048 + 1024 + 2 * 2048 + 1024 + 2 * 2048 == 19648
    assert dict(est.parts) == {
        "residual": 2048, "input_ids": 128, "inputs_embeds": 2048, "position_ids": 64, "attn_norm": 2048, "v": 1024,
        "q_rot": 2048, "k_rot": 1024, "k_rep": 2048, "v_rep": 2048, "scores_masked": 1024,
        "probs_fp32": 2048, "softmax.fp32_input": 2048,
    }  # fmt: skip
    # In fp32 the upcast is a no-op (no copy): the masked scores (4 B) and the probabilities (4 B).
    fp32 = estimate_activations(llama("attention"), wl(act_dtype="fp32"))
    assert "softmax.fp32_input" not in dict(fp32.parts)
    # A family whose softmax stays in fp16 (GPT-2, BERT) holds no fp32 scores at all.
    plain = estimate_activations(llama("attention", forward=ForwardSpec(softmax_fp32=False)), wl())
    assert not any("fp32" in name for name, _ in plain.parts)
    assert plain.activation_bytes <= est.activation_bytes


def test_prefill_first_layer_input_is_the_embedding_output() -> None:
    # Layer 0's input is inputs_embeds itself: 2048 B less than any later layer.
    later = estimate_activations(llama(), wl()).activation_bytes
    assert estimate_activations(llama(first_layer=True), wl()).activation_bytes == later - 2048


def test_prefill_without_buffer_reuse_sums_the_two_scratches() -> None:
    # What the layer holds from its start (4160 B) once, then each block's live tensors at its own
    # peak not counted yet: attention 19648 - 4288 = 15360, MLP 23744 - 4288 = 19456 -> 39104 B.
    est = estimate_activations(llama(), wl(buffer_reuse=False))
    assert est.activation_bytes == HELD + 15360 + 19456 == 39104
    assert est.parts[:4] == (("residual", 2048), ("input_ids", 128), ("inputs_embeds", 2048), ("position_ids", 64))
    assert sum(nb for name, nb in est.parts if name.startswith("attn.")) == 15360
    assert sum(nb for name, nb in est.parts if name.startswith("mlp.")) == 19456
    # Reuse only ever helps.
    assert est.activation_bytes >= estimate_activations(llama(), wl()).activation_bytes


def test_prefill_flash_and_fused_mlp() -> None:
    # Flash and a fused MLP (one 4096 B intermediate): the MLP's RMSNorm makes the peak. LlamaRMSNorm
    # normalizes in fp32: beside its 2048 B input two input-sized fp32 tensors (8 B x 1024 el = 8192 B,
    # the 2048 B output included), plus the fp32 variance and rsqrt per row (8 x 16 = 128 B):
    # workspace 8192 - 2048 + 128 = 6272 B.
    # At that op: held 4288 + attention output 2048 + its input 2048 + output 2048 + 6272 = 16704 B.
    est = estimate_activations(llama(), wl(attention="flash", fused_mlp=True))
    assert est.activation_bytes == HELD + 3 * 2048 + 6272 == 16704
    assert dict(est.parts)["mlp_norm.workspace"] == 6272
    # Causal flash prefill needs no mask; rotary tables stay.
    assert est.buffer_parts == (("rotary_cos_sin", 512),)
    # The fused product op alone: held 4288 + probs 1024 (eager) + attn_out, attn_residual_out,
    # mlp_norm 3 x 2048 + hidden 4096 = 15552 B < its norm op (4288 + 1024 + 3 x 2048 + 6272).
    assert estimate_activations(llama("mlp"), wl(fused_mlp=True)).activation_bytes == HELD + 1024 + 3 * 2048 + 6272
    # GemmaRMSNorm multiplies in fp32 by (1 + weight.float()): that 4 x 64 = 256 B row beside the
    # normalized tensor and the product outweighs the 128 B of row statistics: 128 B more.
    gemma = llama(forward=ForwardSpec(norm="rms_fp32"))
    assert estimate_activations(gemma, wl(attention="flash", fused_mlp=True)).activation_bytes == 16704 + 128


def test_encoder_flash_keeps_a_padding_mask() -> None:
    # Non-causal flash: a B x S boolean key-padding mask (16 B), no rotary here.
    est = estimate_activations(llama("attention", causal=False, rotary_dim=0), wl(attention="flash"))
    assert est.buffer_parts == (("padding_mask", B * S),)


# ---------------------------------------------------------------------------------------------
# Decode with a KV cache
#
# T = 1, N = 2 tokens, a cache of S = 8 positions. N x h = 256 B; q_rot N x a x d = 256 B; k_rot, v
# 128 B; held through the layer: residual 256 + inputs_embeds 256 + position_ids 8 + the token ids
# B x 1 int64 16 = 536 B, and with a static cache its int64 fill counter 8 B: 544 B.
# KV cache: 2 (k, v) x B x 8 x kv 2 x d 16 = 2 x 512 el = 2048 B, persistent.


def test_decode_gqa_eager_counts_the_cache_and_its_repeated_copies() -> None:
    # Softmax op: held 544 + attn_norm 256 + v 128 + q_rot 256 + k_rot 128 + k_rep, v_rep
    # (B x a x 8 x d = 1024 el) 2 x 2048 + masked scores B x a x 1 x 8 = 64 el = 128 B + fp32 copy
    # and output 2 x 256 = 6048 B.
    est = estimate_activations(llama(), wl("decode"))
    assert est.persistent_bytes == 2048
    assert est.activation_bytes == 2048 + 544 + 256 + 128 + 256 + 128 + 2 * 2048 + 128 + 2 * 256 == 2048 + 6048
    assert est.parts[0] == ("kv_cache", 2048)
    assert dict(est.parts)["k_rep"] == dict(est.parts)["v_rep"] == 2048
    # Mask B x 1 x 1 x 8 = 16 el = 32 B; rotary 2 x 1 x 1 x 16 = 32 el = 64 B.
    assert est.buffer_parts == (("attention_mask", 32), ("rotary_cos_sin", 64))


def test_decode_with_one_kv_head_repeats_by_view() -> None:
    # One KV head: repeat_kv's reshape is a view. Over B = 2 sequences each matmul copies its expanded
    # operand (2048 B) only while it runs; never both copies at once, and never with one sequence.
    mqa = llama(num_kv_heads=1)
    parts = dict(estimate_activations(mqa, wl("decode")).parts)
    assert "k_rep" not in parts and "v_rep" not in parts
    assert parts.get("qk.k_copy", parts.get("pv.v_copy")) == 2048
    single = estimate_activations(mqa, Workload(batch=1, seq_len=S, mode="decode"))
    assert not any(name.endswith("_copy") for name, _ in single.parts)


def test_decode_dynamic_cache_holds_old_and_new_together() -> None:
    # DynamicCache: torch.cat(old, new) for keys, then values; while the values are joined, the new
    # keys, the old and the new values are alive: one half (B x 8 x 2 x 16 x 2 B = 1024 B) more than
    # the cache. With flash attention that op is the layer's peak: held 536 (no fill counter) + attn_norm
    # 256 + v 128 + q_rot 256 + k_rot 128 + 1024 = 2328 B beside the 2048 B cache.
    static = estimate_activations(llama("attention"), wl("decode", attention="flash"))
    dynamic = estimate_activations(llama("attention"), wl("decode", attention="flash", kv_cache="dynamic"))
    assert dict(dynamic.parts)["kv_cache.grown"] == 1024
    assert dynamic.activation_bytes == 2048 + 536 + 256 + 128 + 256 + 128 + 1024 == 4376
    assert static.activation_bytes < dynamic.activation_bytes
    assert dynamic.persistent_bytes == static.persistent_bytes == 2048


def test_decode_flash_reads_the_cache_in_place() -> None:
    # No repeat copies: the MLP product is the peak: held 544 + attn_out, attn_residual_out, mlp_norm
    # 3 x 256 + act, up, hidden 3 x (N x f = 256 el = 512 B) = 2848 B, plus the 2048 B cache.
    est = estimate_activations(llama(), wl("decode", attention="flash"))
    assert est.activation_bytes == 2048 + 544 + 3 * 256 + 3 * 512 == 2048 + 2848
    # SDPA over a cache gets a boolean mask B x 1 x 1 x 8 = 16 B.
    assert est.buffer_parts == (("attention_mask", 16), ("rotary_cos_sin", 64))


def test_decode_mlp_block_has_no_cache() -> None:
    # The eager layer's probabilities (B x a x 1 x 8 fp16 = 128 B) are held through its MLP.
    est = estimate_activations(llama("mlp"), wl("decode"))
    assert est.persistent_bytes == 0
    assert est.activation_bytes == 2848 + 128
    assert est.buffer_bytes == 0


def test_decode_sliding_window_caps_the_cache() -> None:
    # Window 4 < 8: cache 2 x B x 4 x 2 x 16 x 2 B = 1024 B; mask B x 1 x 1 x 4 x 2 B = 16 B.
    est = estimate_activations(llama(sliding_window=4), wl("decode"))
    assert est.persistent_bytes == 1024
    assert dict(est.buffer_parts)["attention_mask"] == 16


def test_decode_int8_cache_is_read_through_dequantized_copies() -> None:
    # int8 cache: 2 x (B x 8 x 2 x 16 = 512 el) x 1 B = 1024 B. Attention reads fp16 copies
    # k_dequant, v_dequant of 512 el = 1024 B each; eager then repeats them (2048 B each).
    # At repeat_v: held 544 + attn_norm 256 + v 128 + q_rot 256 + k_rot 128 + v_dequant 1024
    # + k_rep 2048 + v_rep 2048 = 6432 B.
    est = estimate_activations(llama("attention"), wl("decode", kv_dtype="int8"))
    assert est.persistent_bytes == 1024
    assert est.activation_bytes == 1024 + 6432
    assert dict(est.parts)["v_dequant"] == 1024
    # Flash reads the copies directly; its peak is the context's contiguous copy: held 544 + 256 + 128
    # + 256 + 128 + 2 x 1024 + context 256 + its copy 256 = 3872 B.
    flash = estimate_activations(llama("attention"), wl("decode", kv_dtype="int8", attention="flash"))
    assert flash.activation_bytes == 1024 + 3872


def test_decode_cache_grows_with_micro_batches_in_flight() -> None:
    est = estimate_activations(llama(), wl("decode", micro_batches=3))
    assert est.persistent_bytes == 3 * 2048


def test_checkpointing_changes_nothing_in_inference() -> None:
    for mode in ("prefill", "decode"):
        assert estimate_activations(llama(), wl(mode, checkpointing=True)) == estimate_activations(llama(), wl(mode))


# ---------------------------------------------------------------------------------------------
# Train: Korthikanti et al. 2022, sec. 4.1


def gpt_shape(h: int, a: int, **changes: object) -> LayerShape:
    fields = dict(part="layer", hidden_size=h, num_heads=a, num_kv_heads=a, head_dim=h // a, intermediate_size=4 * h)
    fields.update(changes)
    return LayerShape(**fields)


@pytest.mark.parametrize(("b", "s", "h", "a"), [(1, 128, 256, 4), (2, 16, 64, 4), (3, 10, 96, 8), (4, 2048, 4096, 32)])
def test_train_saved_bytes_reproduce_korthikanti(b: int, s: int, h: int, a: int) -> None:
    # Paper setting: fp16, MHA, f = 4h, dropout, eager softmax: sbh(34 + 5as/h) bytes per layer.
    est = estimate_activations(gpt_shape(h, a), Workload(batch=b, seq_len=s, mode="train", dropout=True))
    assert est.persistent_bytes == 34 * s * b * h + 5 * a * s * s * b


@pytest.mark.parametrize(("b", "s", "h", "a"), [(2, 16, 64, 4), (1, 100, 96, 8)])
def test_train_saved_bytes_without_dropout_and_with_flash(b: int, s: int, h: int, a: int) -> None:
    # No dropout: the three masks (as^2b + 2 x sbh) and the dropout output (2as^2b) go: 32sbh + 2as^2b.
    eager = estimate_activations(gpt_shape(h, a), Workload(batch=b, seq_len=s, mode="train"))
    assert eager.persistent_bytes == 32 * s * b * h + 2 * a * s * s * b
    # Flash: no s^2 term, a fp32 log-sum-exp of b x a x s x 4 B instead.
    flash = estimate_activations(gpt_shape(h, a), Workload(batch=b, seq_len=s, mode="train", attention="flash"))
    assert flash.persistent_bytes == 32 * s * b * h + 4 * a * s * b


def test_train_gated_gqa_saved_set_term_by_term() -> None:
    # N = 16 tokens, fp16. Attention: norm input 2048 + q/k/v input 2048 + q_rot 2048
    #   + k_rep 2048 + v_rep 2048 (eager GQA keeps the repeated copies) + softmax out B a S S = 1024
    #   + o_proj input 2048 = 13312 B.
    # MLP: norm input 2048 + gate/up input 2048 + gate, act, up, product 4 x 4096 = 20480 B.
    est = estimate_activations(llama(), wl("train"))
    assert est.persistent_bytes == 13312 + 20480
    # The saved set plus the gradients (which mirror the forward walk: the prefill peak, 14336 B) bound the
    # backward; the forward as the modules really run it holds more, and that is the unit's peak: what
    # autograd keeps (docs/activations.md, "Train") alive to the unit's end, besides the reference walk.
    parts = dict(est.parts)
    assert est.activation_bytes == sum(parts.values()) > 13312 + 20480 + 14336
    assert parts["forward.attn_norm.saved"] == parts["forward.mlp_norm.saved"] == 4096 + 64 + 2048  # RMSNorm: fp32
    # input copy N h 4, its rsqrt N x 4, the normalized states N h 2 that `weight *` keeps
    assert parts["forward.qk.saved"] == 2 * 2048  # the 4-D matmul's copies of q and k^T
    assert parts["forward.probs_fp32"] == 2 * 1024 and parts["forward.probs"] == 1024  # softmax in fp32, then fp16
    assert [parts[f"forward.{t}"] for t in ("gate", "act", "up", "hidden")] == [4096] * 4
    # A fused gated MLP recomputes act(gate) in backward: one f-sized tensor less.
    fused = estimate_activations(llama(), wl("train", fused_mlp=True))
    assert est.persistent_bytes - fused.persistent_bytes == 4096


def test_train_checkpointing_keeps_only_the_input() -> None:
    plain = estimate_activations(llama(), wl("train"))
    ckpt = estimate_activations(llama(), wl("train", checkpointing=True))
    assert ckpt.persistent_bytes == 2048  # the layer input N x h
    assert ("forward.residual", 2048) in ckpt.parts
    # The unit alone still peaks as high (backward recomputes the saved set), it just keeps less
    # after it returns, which is what lets several checkpointed units share a card.
    assert ckpt.activation_bytes == plain.activation_bytes


def test_train_mlp_block_checkpoint_input_is_the_attention_output() -> None:
    ckpt = estimate_activations(llama("mlp"), wl("train", checkpointing=True))
    assert ckpt.persistent_bytes == 2048  # the block's input, the attention's residual output
    assert ("forward.attn_residual_out", 2048) in ckpt.parts


# ---------------------------------------------------------------------------------------------
# MoE


def moe(part: str = "mlp") -> LayerShape:
    return llama(part, intermediate_size=32, num_experts=4, experts_per_token=2)


def test_moe_prefill_routes_token_expert_pairs() -> None:
    # N = 16 tokens, 2 experts each: P = 32 pairs. Router logits / probs N x E = 64 el = 128 B;
    # routing weights P = 64 B; int64 indices 32 x 8 = 256 B; gathered input P x h = 2048 el = 4096 B;
    # gate / act / up / product P x f = 1024 el = 2048 B each.
    # At the product: held 4288 + probs 1024 + attn_out, attn_residual_out, mlp_norm 3 x 2048
    # + weights 64 + index 256 + expert_in 4096 + act, up, hidden 3 x 2048 = 21888 B.
    est = estimate_activations(moe(), wl())
    assert est.activation_bytes == HELD + 1024 + 3 * 2048 + 64 + 256 + 4096 + 3 * 2048 == 22016
    parts = dict(est.parts)
    assert {k: parts[k] for k in ("routing_weights", "expert_index", "expert_in", "expert_act", "expert_up",
                                  "expert_hidden")} == {
        "routing_weights": 64, "expert_index": 256, "expert_in": 4096, "expert_act": 2048, "expert_up": 2048,
        "expert_hidden": 2048,
    }  # fmt: skip
    # FLOPs: router 2 h E = 512; 2 routed experts x 3 matrices x 2 h f = 2 x 12288 = 24576.
    assert estimate_flops_per_token(moe(), wl()) == 512 + 24576


def test_moe_train_saved_set() -> None:
    # norm input 2048 + router/expert input 2048 + router probs 128 + indices 256 + routing weights 64
    # + gathered input 4096 + 4 x 2048 (gate, act, up, product) + expert outputs P x h 4096 = 20928 B.
    est = estimate_activations(moe(), wl("train"))
    assert est.persistent_bytes == 20928


# ---------------------------------------------------------------------------------------------
# Parallel attention / MLP, embedding, head


def test_parallel_layer_keeps_both_outputs_until_the_sum() -> None:
    shape = gpt_shape(64, 4, parallel_attn_mlp=True, rotary_dim=0)
    est = estimate_activations(shape, Workload(batch=2, seq_len=8, mode="prefill"))
    # The MLP runs while the residual, both normed inputs (Falcon norms for the MLP before the
    # attention), the eager probabilities and the attention output are held (f = 256: 8192 B):
    # at the activation held 4288 + 2 x 2048 + probs 1024 + attn_out 2048 + up 8192 + act 8192 = 27840 B.
    assert dict(est.parts) == {
        "residual": 2048, "input_ids": 128, "inputs_embeds": 2048, "position_ids": 64, "attn_norm": 2048, "mlp_norm": 2048,
        "probs": 1024, "attn_out": 2048, "up": 8192, "act": 8192,
    }  # fmt: skip
    assert est.activation_bytes == 27840


def test_embedding_unit() -> None:
    # Token table only: the token ids (B x S int64, 128 B, the forward's argument), the output N x h =
    # 2048 B and the int64 position ids (arange, then + offset: 2 x 64 B while they are made).
    assert estimate_activations(llama("embedding", vocab_size=100), wl()).activation_bytes == 128 + 2048 + 2 * 64
    # A second table, summed out of place: both lookups and their sum live at once (3 x 2048 B), the
    # position ids (64 B) beside them.
    two = estimate_activations(llama("embedding", vocab_size=100, embedding_tables=2), wl())
    assert two.activation_bytes == 128 + 3 * 2048 + 64
    assert two.buffer_bytes == 0
    # GPT-2's learned positions are one 1 x S x h lookup broadcast over the batch: 1024 B, not 2048 B.
    gpt2 = ForwardSpec(position_lookup="broadcast")
    broadcast = estimate_activations(llama("embedding", embedding_tables=2, forward=gpt2), wl())
    assert dict(broadcast.parts)["position_embeds"] == 1024
    assert broadcast.activation_bytes == 128 + 2 * 2048 + 1024 + 64
    # BERT's embedding ends in a LayerNorm (its output beside the sum: one more 2048 B and the fp32
    # mean and rstd per row, 8 x 16 = 128 B); Gemma scales the lookup out of place (2 x 2048 B, before
    # the position ids exist).
    bert = ForwardSpec(norm="layer", position_lookup="broadcast", embedding_norm=True)
    normed = estimate_activations(llama("embedding", embedding_tables=3, forward=bert), wl())
    assert normed.activation_bytes == 128 + 2048 + 1024 + 2048 + 2048 + 2048 + 128 + 64
    scaled = estimate_activations(llama("embedding", forward=ForwardSpec(embedding_scale=True)), wl())
    assert scaled.activation_bytes == 128 + 2 * 2048
    # Train: backward keeps only the int64 indices, one tensor per table: 2 x 16 x 8 B.
    assert estimate_activations(llama("embedding", embedding_tables=2), wl("train")).persistent_bytes == 256
    assert estimate_flops_per_token(llama("embedding", vocab_size=100), wl()) == 0


def test_head_unit_prefill_decode_train() -> None:
    head = llama("head", vocab_size=1000)
    # Prefill: the LM head op, the token ids 128 (held by the forward's caller) + final norm 2048 + logits
    # N x V = 16000 el = 32000 B = 34176 B (the norm op before it: held 4288 + norm output 2048 + its
    # fp32 workspace 6272 = 12608 B).
    assert estimate_activations(head, wl()).activation_bytes == 128 + 2048 + 32000
    # Decode, N = 2: token ids 16 + norm output 256 + logits 2 x 1000 x 2 B = 4272 B.
    assert estimate_activations(head, wl("decode")).activation_bytes == 16 + 256 + 4000
    # Gemma 2 soft-caps the logits out of place: two logits-sized tensors at once.
    capped = estimate_activations(llama("head", vocab_size=1000, forward=ForwardSpec(logit_softcap=True)), wl())
    assert capped.activation_bytes == 128 + 2048 + 2 * 32000
    # Train (V = 100): saved norm input 2048 + norm output 2048 + fp32 log-probs N x V x 4 = 6400
    # -> 10496 B. The forward as it runs holds more: the loss's fp32 copy of the logits and its
    # log-softmax (6400 B each) beside the fp16 logits (3200 B), the norm's fp32 copies (6208 B).
    est = estimate_activations(llama("head", vocab_size=100), wl("train"))
    assert est.persistent_bytes == 10496
    parts = dict(est.parts)
    assert est.activation_bytes == sum(parts.values()) > 10496 + 12800
    assert (parts["forward.logits"], parts["forward.logits_fp32"], parts["forward.log_probs"]) == (3200, 6400, 6400)
    assert estimate_flops_per_token(head, wl()) == 2 * H * 1000


# ---------------------------------------------------------------------------------------------
# FLOPs


def test_flops_per_token_llama_layer() -> None:
    # Q, K, V: 2 h (a + 2 kv) d = 2 x 64 x 8 x 16 = 16384; output 2 a d h = 8192;
    # MLP 3 matrices 2 h f x 3 = 49152; attention 4 a d x context.
    dense = 16384 + 8192 + 49152
    assert estimate_flops_per_token(llama(), wl()) == dense + 4 * A * D * S  # eager: full S x S
    assert estimate_flops_per_token(llama(), wl("decode")) == dense + 4 * A * D * S  # context S
    # Causal flash prefill: mean context (S + 1) / 2 -> 2 a d (S + 1) = 1152.
    assert estimate_flops_per_token(llama(), wl(attention="flash")) == dense + 1152
    # Window 4: contexts 1, 2, 3, 4, 4, 4, 4, 4 sum to 26; 4 a d 26 / 8 = 832.
    assert estimate_flops_per_token(llama(sliding_window=4), wl(attention="flash")) == dense + 832
    assert estimate_flops_per_token(llama("attention"), wl()) + estimate_flops_per_token(
        llama("mlp"), wl()
    ) == estimate_flops_per_token(llama(), wl())


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "changes",
    [
        {"part": "conv"},
        {"num_kv_heads": 3},
        {"num_heads": 0},
        {"intermediate_size": 0},
        {"num_experts": 4, "experts_per_token": 5},
        {"rotary_dim": 17},
        {"embedding_tables": 0},
    ],
)
def test_bad_shapes_raise_config_error(changes: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        estimate_activations(dataclasses.replace(llama(), **changes), wl())


def test_estimate_validates_its_parts() -> None:
    with pytest.raises(ConfigError):
        ActivationEstimate(activation_bytes=10, persistent_bytes=0, buffer_bytes=0, parts=(("x", 9),))
    with pytest.raises(ConfigError):
        ActivationEstimate(activation_bytes=10, persistent_bytes=11, buffer_bytes=0, parts=(("x", 10),))


# ---------------------------------------------------------------------------------------------
# Properties

shapes = st.builds(
    lambda part, kv, groups, d, f, gated, rot, experts, parallel, causal, window: LayerShape(
        part=part,
        hidden_size=kv * groups * d,
        num_heads=kv * groups,
        num_kv_heads=kv,
        head_dim=d,
        intermediate_size=f,
        gated_mlp=gated,
        rotary_dim=d if rot else 0,
        num_experts=experts,
        experts_per_token=min(2, experts),
        parallel_attn_mlp=parallel,
        causal=causal,
        sliding_window=window,
        vocab_size=50,
    ),
    st.sampled_from(["layer", "attention", "mlp", "embedding", "head"]),
    st.integers(1, 4),
    st.integers(1, 4),
    st.sampled_from([8, 16]),
    st.integers(1, 96),
    st.booleans(),
    st.booleans(),
    st.sampled_from([0, 0, 4]),
    st.booleans(),
    st.booleans(),
    st.sampled_from([None, 3]),
)
workloads = st.builds(
    Workload,
    batch=st.integers(1, 3),
    seq_len=st.integers(1, 24),
    mode=st.sampled_from(["prefill", "decode", "train"]),
    act_dtype=st.sampled_from(["fp16", "bf16", "fp32"]),
    attention=st.sampled_from(["eager", "flash"]),
    fused_mlp=st.booleans(),
    checkpointing=st.booleans(),
    buffer_reuse=st.booleans(),
    dropout=st.booleans(),
)


@settings(max_examples=150, deadline=None)
@given(shapes, workloads)
def test_bytes_grow_with_batch_at_most_linearly(shape: LayerShape, workload: Workload) -> None:
    # Per-sequence tensors double with the batch; tables broadcast over it (rotary cos/sin, position
    # ids, GPT-2's position lookup) do not. (From one sequence to two, a matmul over one KV head
    # starts copying its expanded operand: compare from two on.)
    workload = dataclasses.replace(workload, batch=max(2, workload.batch))
    one = estimate_activations(shape, workload)
    double = estimate_activations(shape, dataclasses.replace(workload, batch=2 * workload.batch))
    assert one.activation_bytes <= double.activation_bytes <= 2 * one.activation_bytes
    assert double.persistent_bytes == 2 * one.persistent_bytes
    assert one.buffer_bytes <= double.buffer_bytes <= 2 * one.buffer_bytes
    assert 0 <= one.persistent_bytes <= one.activation_bytes


@settings(max_examples=150, deadline=None)
@given(shapes, workloads, st.integers(1, 8))
def test_more_tokens_never_need_less(shape: LayerShape, workload: Workload, extra: int) -> None:
    longer = dataclasses.replace(workload, seq_len=workload.seq_len + extra)
    shorter_bytes = estimate_activations(shape, workload).activation_bytes
    assert estimate_activations(shape, longer).activation_bytes >= shorter_bytes
    assert estimate_flops_per_token(shape, longer) >= estimate_flops_per_token(shape, workload)


@settings(max_examples=100, deadline=None)
@given(shapes, workloads)
def test_reuse_and_checkpointing_never_cost_memory(shape: LayerShape, workload: Workload) -> None:
    reuse = estimate_activations(shape, dataclasses.replace(workload, buffer_reuse=True))
    no_reuse = estimate_activations(shape, dataclasses.replace(workload, buffer_reuse=False))
    assert reuse.activation_bytes <= no_reuse.activation_bytes
    if shape.part == "mlp" and shape.parallel_attn_mlp:
        # The MLP block of a parallel layer has three inputs (residual, shared norm output, attention
        # output); checkpointing keeps all three, more than it saves without (tested below).
        return
    plain = estimate_activations(shape, dataclasses.replace(workload, checkpointing=False))
    ckpt = estimate_activations(shape, dataclasses.replace(workload, checkpointing=True))
    assert ckpt.persistent_bytes <= plain.persistent_bytes
    assert ckpt.activation_bytes == plain.activation_bytes


def test_checkpointing_a_parallel_mlp_block_keeps_its_three_inputs() -> None:
    shape = gpt_shape(64, 4, parallel_attn_mlp=True, part="mlp")
    workload = Workload(batch=2, seq_len=8, mode="train", checkpointing=True)
    est = estimate_activations(shape, workload)
    assert [name for name, _ in est.parts[:3]] == ["input.residual", "input.attn_norm", "input.attn_out"]
    assert est.persistent_bytes == 3 * 2048


# ---------------------------------------------------------------------------------------------
# The saved-for-backward model against autograd


def _measure_saved_bytes(forward, exclude) -> int:  # type: ignore[no-untyped-def]
    """Bytes of distinct storages autograd saves in ``forward()``, excluding ``exclude`` and the
    per-row norm statistics (shape [..., 1], which the paper's accounting leaves out)."""
    import torch

    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):  # type: ignore[no-untyped-def]
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip and t.shape[-1] != 1:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(seen.values())


@pytest.mark.slow
def test_saved_set_matches_autograd_for_a_gpt_layer() -> None:
    torch = pytest.importorskip("torch")
    fn = torch.nn.functional
    torch.manual_seed(0)
    b, s, h, a = 2, 16, 64, 4
    d, f = h // a, 4 * h

    def param(*shape: int):  # type: ignore[no-untyped-def]
        return torch.randn(*shape, dtype=torch.bfloat16, requires_grad=True)

    w = {"ln1": param(h), "qkv": param(3 * h, h), "o": param(h, h)}
    w |= {"ln2": param(h), "up": param(f, h), "down": param(h, f)}
    x = torch.randn(b, s, h, dtype=torch.bfloat16, requires_grad=True)

    def forward():  # type: ignore[no-untyped-def]
        n1 = fn.layer_norm(x, (h,), w["ln1"])
        q, k, v = fn.linear(n1, w["qkv"]).view(b, s, 3, a, d).permute(2, 0, 3, 1, 4)
        probs = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * d**-0.5, -1)
        ctx = torch.matmul(probs, v).transpose(1, 2).reshape(b, s, h)
        x2 = x + fn.linear(ctx, w["o"])
        n2 = fn.layer_norm(x2, (h,), w["ln2"])
        return x2 + fn.linear(fn.gelu(fn.linear(n2, w["up"])), w["down"])

    measured = _measure_saved_bytes(forward, w.values())
    est = estimate_activations(gpt_shape(h, a), Workload(batch=b, seq_len=s, mode="train", act_dtype="bf16"))
    assert measured == est.persistent_bytes == 32 * s * b * h + 2 * a * s * s * b


@pytest.mark.slow
def test_saved_set_matches_autograd_for_a_llama_layer() -> None:
    torch = pytest.importorskip("torch")
    fn = torch.nn.functional
    torch.manual_seed(0)
    b, s, h, a, kv, d, f = 2, 16, 64, 4, 2, 16, 96

    def param(*shape: int):  # type: ignore[no-untyped-def]
        return torch.randn(*shape, dtype=torch.bfloat16, requires_grad=True)

    w = {
        "ln1": param(h), "q": param(a * d, h), "k": param(kv * d, h), "v": param(kv * d, h), "o": param(h, a * d),
        "ln2": param(h), "gate": param(f, h), "up": param(f, h), "down": param(h, f),
    }  # fmt: skip
    cos = torch.randn(1, 1, s, d, dtype=torch.bfloat16)
    sin = torch.randn(1, 1, s, d, dtype=torch.bfloat16)
    x = torch.randn(b, s, h, dtype=torch.bfloat16, requires_grad=True)

    def rotate(t):  # type: ignore[no-untyped-def]
        t1, t2 = t.chunk(2, -1)
        return t * cos + torch.cat((-t2, t1), -1) * sin

    def repeat(t):  # type: ignore[no-untyped-def]
        return t[:, :, None].expand(b, kv, a // kv, s, d).reshape(b, a, s, d)

    def forward():  # type: ignore[no-untyped-def]
        n1 = fn.layer_norm(x, (h,), w["ln1"])
        q = rotate(fn.linear(n1, w["q"]).view(b, s, a, d).transpose(1, 2))
        k = repeat(rotate(fn.linear(n1, w["k"]).view(b, s, kv, d).transpose(1, 2)))
        v = repeat(fn.linear(n1, w["v"]).view(b, s, kv, d).transpose(1, 2))
        probs = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * d**-0.5, -1)
        x2 = x + fn.linear(torch.matmul(probs, v).transpose(1, 2).reshape(b, s, a * d), w["o"])
        n2 = fn.layer_norm(x2, (h,), w["ln2"])
        return x2 + fn.linear(fn.silu(fn.linear(n2, w["gate"])) * fn.linear(n2, w["up"]), w["down"])

    measured = _measure_saved_bytes(forward, [*w.values(), cos, sin])
    shape = LayerShape(
        part="layer", hidden_size=h, num_heads=a, num_kv_heads=kv, head_dim=d,
        intermediate_size=f, gated_mlp=True, rotary_dim=d,
    )  # fmt: skip
    est = estimate_activations(shape, Workload(batch=b, seq_len=s, mode="train", act_dtype="bf16"))
    assert measured == est.persistent_bytes


# ---------------------------------------------------------------------------------------------
# The inference walk against a real Hugging Face layer


def _measure_forward_peak(forward, existing) -> int:  # type: ignore[no-untyped-def]
    """Peak bytes of the storages created while ``forward()`` runs, op by op (aten level), tracked
    with weak references so a storage counts until it is really freed. ``existing`` tensors
    (weights, inputs, masks) are not counted."""
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class LiveBytes(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.known = {id(t.untyped_storage()) for t in existing}
            self.live: set[int] = set()
            self.current = 0
            self.peak = 0

        def _free(self, key: int, nbytes: int) -> None:
            self.live.discard(key)
            self.current -= nbytes

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    storage = t.untyped_storage()
                    key = id(storage)
                    if key in self.known or key in self.live:
                        continue
                    self.live.add(key)
                    self.current += storage.nbytes()
                    weakref.finalize(storage, self._free, key, storage.nbytes())
            self.peak = max(self.peak, self.current)
            return out

    mode = LiveBytes()
    with torch.no_grad(), mode:
        forward()
    return mode.peak


@pytest.mark.slow
@pytest.mark.parametrize(("impl", "kv"), [("eager", 8), ("eager", 2), ("sdpa", 8), ("sdpa", 2)])
def test_walk_bounds_a_transformers_llama_layer(impl: str, kv: int) -> None:
    """Prefill of one real LlamaDecoderLayer (fp32), measured op by op, against the walk of the
    reference forward for a first layer (tests/profile/test_activation_peaks.py runs whole models):
    never below, at most 1.35x. The walk's only term the lone layer lacks is the model's position
    ids (8 B a token)."""
    torch = pytest.importorskip("torch")
    llama_mod = pytest.importorskip("transformers.models.llama.modeling_llama")
    from transformers import LlamaConfig

    b, s, h, a, f = 4, 128, 128, 8, 512
    cfg = LlamaConfig(
        hidden_size=h, num_attention_heads=a, num_key_value_heads=kv, intermediate_size=f,
        num_hidden_layers=1, vocab_size=16,
    )  # fmt: skip
    cfg._attn_implementation = impl
    layer = llama_mod.LlamaDecoderLayer(cfg, 0).eval()
    x = torch.randn(b, s, h)
    positions = torch.arange(s)[None].expand(b, s)
    cos_sin = llama_mod.LlamaRotaryEmbedding(cfg)(x, positions)
    mask = torch.full((b, 1, s, s), float("-inf")).triu(1) if impl == "eager" else None
    existing = [*layer.parameters(), *layer.buffers(), x, *cos_sin, positions] + ([mask] if mask is not None else [])

    def forward() -> None:
        layer(x, attention_mask=mask, position_embeddings=cos_sin, position_ids=positions)

    measured = _measure_forward_peak(forward, existing) + x.numel() * 4  # the input is live throughout
    shape = LayerShape(
        part="layer", hidden_size=h, num_heads=a, num_kv_heads=kv, head_dim=h // a,
        intermediate_size=f, gated_mlp=True, rotary_dim=h // a, first_layer=True,
    )  # fmt: skip
    attention = "eager" if impl == "eager" else "flash"
    workload = Workload(batch=b, seq_len=s, mode="prefill", act_dtype="fp32", attention=attention)
    model = estimate_activations(shape, workload).activation_bytes
    assert measured <= model <= 1.35 * measured
