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
from cachefit.units import LayerShape, Workload

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
# Prefill, eager attention


def test_prefill_eager_layer_peak_is_the_mlp_product() -> None:
    # N = B x S = 16 tokens. Tensors (bytes, fp16):
    #   residual stream N x h = 1024 el = 2048 B; gate / act / up / hidden N x f = 2048 el = 4096 B each.
    # MLP walk (Llama order: gate, act, up, product): at the product op the live tensors are
    #   attn_residual_out 2048 + act 4096 + up 4096 + hidden 4096 = 14336 B,
    # which beats the attention block's peak (9216 B, next test).
    est = estimate_activations(llama(), wl())
    assert est.activation_bytes == 14336
    assert est.parts == (("attn_residual_out", 2048), ("act", 4096), ("up", 4096), ("hidden", 4096))
    assert est.persistent_bytes == 0  # prefill keeps no KV cache
    # Buffers: additive mask B x 1 x S x S = 128 el = 256 B; rotary cos + sin 2 x N x 16 = 512 el = 1024 B.
    assert est.buffer_parts == (("attention_mask", 256), ("rotary_cos_sin", 1024))
    assert est.buffer_bytes == 1280


def test_prefill_eager_attention_block_with_gqa_repeat() -> None:
    # q, q_rot: N x a x d = 1024 el = 2048 B; k, v, k_rot: N x kv x d = 512 el = 1024 B;
    # repeat_kv copies k_rep, v_rep: B x a x S x d = 1024 el = 2048 B; scores/probs B x a x S x S = 1024 B.
    # At repeat_v: residual 2048 + v 1024 + q_rot 2048 + k_rep 2048 + v_rep 2048 = 9216 B
    # (QK^T ties it: residual + q_rot + k_rep + v_rep + scores = 9216 B; the first op wins).
    est = estimate_activations(llama("attention"), wl())
    assert est.activation_bytes == 9216
    assert dict(est.parts) == {"residual": 2048, "v": 1024, "q_rot": 2048, "k_rep": 2048, "v_rep": 2048}
    assert est.buffer_bytes == 1280


def test_prefill_without_buffer_reuse_sums_the_two_scratches() -> None:
    # residual 2048 + attention scratch (9216 - 2048) + MLP scratch (14336 - 2048) = 21504 B.
    est = estimate_activations(llama(), wl(buffer_reuse=False))
    assert est.activation_bytes == 2048 + 7168 + 12288 == 21504
    assert est.parts[0] == ("residual", 2048)
    assert sum(nb for name, nb in est.parts if name.startswith("attn.")) == 7168
    assert sum(nb for name, nb in est.parts if name.startswith("mlp.")) == 12288
    # Reuse only ever helps.
    assert est.activation_bytes >= estimate_activations(llama(), wl()).activation_bytes


def test_prefill_flash_and_fused_mlp() -> None:
    # Flash: no scores/probs/repeat copies. At the flash op: residual 2048 + q_rot 2048 + k_rot 1024
    # + v 1024 + context 2048 + fp32 log-sum-exp B x a x S x 4 B = 256 B  -> 8448 B.
    # Fused MLP materializes only hidden (4096 B): its peak is residual 2048 + norm 2048 + hidden 4096
    # = 8192 B < 8448 B, so the attention now makes the layer's peak.
    est = estimate_activations(llama(), wl(attention="flash", fused_mlp=True))
    assert est.activation_bytes == 8448
    assert dict(est.parts) == {"residual": 2048, "q_rot": 2048, "k_rot": 1024, "v": 1024, "context": 2048, "lse": 256}
    # Causal flash needs no mask; rotary tables stay.
    assert est.buffer_parts == (("rotary_cos_sin", 1024),)
    # Fused MLP alone: peak 8192 B.
    assert estimate_activations(llama("mlp"), wl(fused_mlp=True)).activation_bytes == 8192


def test_encoder_flash_keeps_a_padding_mask() -> None:
    # Non-causal flash: a B x S boolean key-padding mask (16 B), no rotary here.
    est = estimate_activations(llama("attention", causal=False, rotary_dim=0), wl(attention="flash"))
    assert est.buffer_parts == (("padding_mask", B * S),)


# ---------------------------------------------------------------------------------------------
# Decode with a KV cache


def test_decode_gqa_eager_counts_the_cache_and_its_repeated_copies() -> None:
    # T = 1, N = 2 tokens, cache of S = 8 positions.
    # KV cache: 2 (k, v) x B x 8 x kv 2 x d 16 = 2 x 512 el = 2 x 1024 B = 2048 B, persistent.
    # Walk: k_rep, v_rep B x a x 8 x d = 1024 el = 2048 B each; scores B x a x 1 x 8 = 64 el = 128 B.
    # At QK^T: residual 256 + q_rot 256 + k_rep 2048 + v_rep 2048 + scores 128 = 4736 B.
    est = estimate_activations(llama(), wl("decode"))
    assert est.persistent_bytes == 2048
    assert est.activation_bytes == 2048 + 4736
    assert est.parts == (
        ("kv_cache", 2048),
        ("residual", 256),
        ("q_rot", 256),
        ("k_rep", 2048),
        ("v_rep", 2048),
        ("scores", 128),
    )
    # Mask B x 1 x 1 x 8 = 16 el = 32 B; rotary 2 x N x 16 = 64 el = 128 B.
    assert est.buffer_parts == (("attention_mask", 32), ("rotary_cos_sin", 128))


def test_decode_flash_reads_the_cache_in_place() -> None:
    # No repeat copies: the MLP product is the peak: attn_residual_out 256 + 3 x (N x f = 256 el = 512 B)
    # = 1792 B, plus the 2048 B cache.
    est = estimate_activations(llama(), wl("decode", attention="flash"))
    assert est.activation_bytes == 2048 + 1792
    assert est.buffer_parts == (("rotary_cos_sin", 128),)


def test_decode_mlp_block_has_no_cache() -> None:
    est = estimate_activations(llama("mlp"), wl("decode"))
    assert est.persistent_bytes == 0
    assert est.activation_bytes == 1792
    assert est.buffer_bytes == 0


def test_decode_sliding_window_caps_the_cache() -> None:
    # Window 4 < 8: cache 2 x B x 4 x 2 x 16 x 2 B = 1024 B; mask B x 1 x 1 x 4 x 2 B = 16 B.
    est = estimate_activations(llama(sliding_window=4), wl("decode"))
    assert est.persistent_bytes == 1024
    assert dict(est.buffer_parts)["attention_mask"] == 16


def test_decode_int8_cache_is_read_through_dequantized_copies() -> None:
    # int8 cache: 2 x (B x 8 x 2 x 16 = 512 el) x 1 B = 1024 B. Attention reads fp16 copies
    # k_dequant, v_dequant of 512 el = 1024 B each; eager then repeats them (2048 B each).
    # At repeat_v: residual 256 + q_rot 256 + v_dequant 1024 + k_rep 2048 + v_rep 2048 = 5632 B.
    est = estimate_activations(llama("attention"), wl("decode", kv_dtype="int8"))
    assert est.persistent_bytes == 1024
    assert est.activation_bytes == 1024 + 5632
    assert dict(est.parts) == {
        "kv_cache": 1024, "residual": 256, "q_rot": 256, "v_dequant": 1024, "k_rep": 2048, "v_rep": 2048,
    }  # fmt: skip
    # Flash reads the copies directly: residual 256 + q_rot 256 + 2 x 1024 + context 256 + lse 32 = 2848 B.
    flash = estimate_activations(llama("attention"), wl("decode", kv_dtype="int8", attention="flash"))
    assert flash.activation_bytes == 1024 + 2848


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
    # Gradients mirror the forward walk, so the transient equals the prefill peak (14336 B).
    assert est.activation_bytes == 13312 + 20480 + 14336
    # A fused gated MLP recomputes act(gate) in backward: one f-sized tensor less.
    fused = estimate_activations(llama(), wl("train", fused_mlp=True))
    assert est.persistent_bytes - fused.persistent_bytes == 4096


def test_train_checkpointing_keeps_only_the_input() -> None:
    plain = estimate_activations(llama(), wl("train"))
    ckpt = estimate_activations(llama(), wl("train", checkpointing=True))
    assert ckpt.persistent_bytes == 2048  # the layer input N x h
    assert ckpt.parts[0] == ("input.residual", 2048)
    # The unit alone still peaks as high (backward recomputes the saved set), it just keeps less
    # after it returns, which is what lets several checkpointed units share a card.
    assert ckpt.activation_bytes == plain.activation_bytes


def test_train_mlp_block_checkpoint_input_is_the_attention_output() -> None:
    ckpt = estimate_activations(llama("mlp"), wl("train", checkpointing=True))
    assert ckpt.persistent_bytes == 2048
    assert ckpt.parts[0] == ("input.attn_residual_out", 2048)


# ---------------------------------------------------------------------------------------------
# MoE


def moe(part: str = "mlp") -> LayerShape:
    return llama(part, intermediate_size=32, num_experts=4, experts_per_token=2)


def test_moe_prefill_routes_token_expert_pairs() -> None:
    # N = 16 tokens, 2 experts each: P = 32 pairs. Router logits / probs N x E = 64 el = 128 B;
    # routing weights P = 64 B; int64 indices 32 x 8 = 256 B; gathered input P x h = 2048 el = 4096 B;
    # gate / act / up / product P x f = 1024 el = 2048 B each.
    # At the activation: attn_residual_out 2048 + weights 64 + index 256 + expert_in 4096 + gate 2048 + act 2048
    # = 10560 B (the up op ties it).
    est = estimate_activations(moe(), wl())
    assert est.activation_bytes == 10560
    assert dict(est.parts) == {
        "attn_residual_out": 2048,
        "routing_weights": 64,
        "expert_index": 256,
        "expert_in": 4096,
        "expert_gate": 2048,
        "expert_act": 2048,
    }
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
    names = dict(est.parts)
    # The MLP runs while the residual and the attention output are still held (f = 256: 8192 B):
    # at the activation op residual 2048 + attn_out 2048 + up 8192 + act 8192 = 20480 B
    # (the shared norm output was last read by the up projection: 3 x 2048 + 8192 = 14336 B there).
    assert names == {"residual": 2048, "attn_out": 2048, "up": 8192, "act": 8192}
    assert est.activation_bytes == 20480


def test_embedding_unit() -> None:
    # Token table only: the output N x h = 2048 B. With a learned position table, the two lookups and
    # their sum are live at once: 3 x 2048 B.
    assert estimate_activations(llama("embedding", vocab_size=100), wl()).activation_bytes == 2048
    two = estimate_activations(llama("embedding", vocab_size=100, embedding_tables=2), wl())
    assert two.activation_bytes == 3 * 2048
    assert two.buffer_bytes == 0
    # Train: backward keeps only the int64 indices, one tensor per table: 2 x 16 x 8 B.
    assert estimate_activations(llama("embedding", embedding_tables=2), wl("train")).persistent_bytes == 256
    assert estimate_flops_per_token(llama("embedding", vocab_size=100), wl()) == 0


def test_head_unit_prefill_decode_train() -> None:
    head = llama("head", vocab_size=100)
    # Prefill: final norm (2048) + logits N x V = 1600 el = 3200 B at the LM head: 5248 B.
    assert estimate_activations(head, wl()).activation_bytes == 5248
    # Decode, N = 2: norm step 256 + 256 = 512 < LM head step 256 + 400 = 656 B.
    assert estimate_activations(head, wl("decode")).activation_bytes == 656
    # Train: saved norm input 2048 + norm output 2048 + fp32 log-probs N x V x 4 = 6400 -> 10496 B;
    # transient: the fp32 upcast and log-softmax live together, 6400 + 6400 = 12800 B.
    est = estimate_activations(head, wl("train"))
    assert est.persistent_bytes == 10496
    assert est.activation_bytes == 10496 + 12800
    assert estimate_flops_per_token(head, wl()) == 2 * H * 100


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
def test_bytes_scale_linearly_with_batch(shape: LayerShape, workload: Workload) -> None:
    one = estimate_activations(shape, workload)
    double = estimate_activations(shape, dataclasses.replace(workload, batch=2 * workload.batch))
    assert double.activation_bytes == 2 * one.activation_bytes
    assert double.persistent_bytes == 2 * one.persistent_bytes
    assert double.buffer_bytes == 2 * one.buffer_bytes
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
def test_walk_matches_a_transformers_llama_layer(impl: str, kv: int) -> None:
    """Prefill of a real LlamaDecoderLayer (fp32), measured op by op. The walk is the idealized
    lower bound; transformers keeps a little more alive through Python references: the layer input
    (held by the caller), the MLP's normed input (the MLP's argument), and, in eager mode, the
    attention probabilities, which the attention returns and the decoder layer keeps in ``_`` until
    it returns (its out-of-place score scaling stays within that allowance here)."""
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
        intermediate_size=f, gated_mlp=True, rotary_dim=h // a,
    )  # fmt: skip
    attention = "eager" if impl == "eager" else "flash"
    workload = Workload(batch=b, seq_len=s, mode="prefill", act_dtype="fp32", attention=attention)
    model = estimate_activations(shape, workload).activation_bytes
    extras = 2 * b * s * h * 4 + (b * a * s * s * 4 if impl == "eager" else 0)
    assert model <= measured <= model + extras
