"""Kernel counts of units, by hand from the Hugging Face modelling code, and against the real modules."""

from __future__ import annotations

import collections

import pytest

from cachefit.cost.kernels import count_forward_kernels, count_kernels, count_unit_kernels, list_kernels
from cachefit.errors import ConfigError
from cachefit.profile import profile_model
from cachefit.units import Footprint, LayerShape, Unit, Workload


def llama(heads: int = 4, kv_heads: int = 4, *, part: str = "layer") -> LayerShape:
    return LayerShape(part=part, hidden_size=64, num_heads=heads, num_kv_heads=kv_heads, head_dim=16,
                      intermediate_size=172, gated_mlp=True, rotary_dim=16)


def gpt2(part: str = "layer") -> LayerShape:
    return LayerShape(part=part, hidden_size=64, num_heads=4, num_kv_heads=4, head_dim=16, intermediate_size=256)


FP32_TOKEN = Workload(batch=1, seq_len=1, mode="prefill", weight_dtype="fp32", act_dtype="fp32")


def test_llama_layer_by_hand():
    # LlamaDecoderLayer, eager attention, fp32, one token per sequence (no cache):
    #   input RMSNorm            6  pow, mean, + eps, rsqrt, x * rsqrt, weight * x (casts are no-ops in fp32)
    #   q, k, v projections      3
    #   rotary on q and k       10  per tensor: x * cos, neg + cat (rotate_half), * sin, +
    #   eager attention          5  q k^T, * scale, + mask, softmax, p v (no copies: one token, MHA)
    #   o projection             1
    #   residual add             1
    #   post-attention RMSNorm   6
    #   MLP                      5  gate, SiLU, up, product, down
    #   residual add             1
    #                           --
    #                           38
    assert count_kernels(llama(), FP32_TOKEN) == 38
    assert sum(n for _, n in list_kernels(llama(), FP32_TOKEN)) == 38
    # bf16: each RMSNorm casts to fp32 and back (+4), the softmax runs in fp32 (+2)
    bf16 = Workload(batch=1, seq_len=1, mode="prefill", weight_dtype="bf16", act_dtype="bf16")
    assert count_kernels(llama(), bf16) == 38 + 4 + 2
    # flash (SDPA): q k^T, scale, mask, softmax and p v are one kernel: 38 - 5 + 1
    flash = Workload(batch=1, seq_len=1, mode="prefill", weight_dtype="fp32", act_dtype="fp32", attention="flash")
    assert count_kernels(llama(), flash) == 34
    # decode with a cache: the new key and value appended (+2)
    decode = Workload(batch=1, seq_len=16, mode="decode", weight_dtype="fp32", act_dtype="fp32")
    assert count_kernels(llama(), decode) == 40
    # GQA at one query token: repeat_kv copies keys and values (+2); flash handles GQA inside (+0)
    assert count_kernels(llama(4, 2), decode) == 42
    assert count_kernels(llama(4, 2), Workload(batch=1, seq_len=16, mode="decode", weight_dtype="fp32",
                                                act_dtype="fp32", attention="flash")) == 36
    # more than one query token: q, k, v and the output are made contiguous for the batched matmuls (+4)
    prefill = Workload(batch=2, seq_len=8, mode="prefill", weight_dtype="fp32", act_dtype="fp32")
    assert count_kernels(llama(), prefill) == 42
    assert count_kernels(llama(4, 2), prefill) == 42  # the repeat_kv copies replace the k, v copies
    # a fused MLP: gate, SiLU, up and product are one kernel (5 -> 2)
    fused = Workload(batch=1, seq_len=1, mode="prefill", weight_dtype="fp32", act_dtype="fp32", fused_mlp=True)
    assert count_kernels(llama(), fused) == 35


def test_gpt2_style_layer_by_hand():
    # LayerNorm (1 kernel) x 2, q k v 3, no rotary, eager decode in fp16: cache append 2, attention 5,
    # softmax casts 2, o 1, MLP up / GELU / down 3, two residual adds: 2 + 3 + 2 + 5 + 2 + 1 + 3 + 2 = 20
    decode = Workload(batch=1, seq_len=1024, mode="decode")
    assert count_kernels(gpt2(), decode) == 20
    assert count_kernels(profile_model("paper-16l").unit("layers.0").shape, decode) == 20


def test_parts_sum_to_the_layer():
    wl = Workload(batch=1, seq_len=16, mode="decode")
    attention, mlp = count_kernels(llama(part="attention"), wl), count_kernels(llama(part="mlp"), wl)
    assert attention + mlp == count_kernels(llama(), wl)
    assert mlp == 6 + 2 + 5 + 1  # RMSNorm with fp16 casts, the gated MLP, the residual add


def test_embedding_and_head():
    wl = Workload(batch=1, seq_len=16, mode="decode")
    emb = LayerShape(part="embedding", hidden_size=64, vocab_size=100, embedding_tables=2)
    assert count_kernels(emb, wl) == 3  # two lookups and their sum
    head = LayerShape(part="head", hidden_size=64, vocab_size=100, gated_mlp=True)
    assert count_kernels(head, wl) == 8 + 1  # RMSNorm with fp16 casts, LM head
    pooler = LayerShape(part="head", hidden_size=64)
    assert count_kernels(pooler, wl) == 1 + 2  # LayerNorm, dense + tanh
    train = Workload(batch=1, seq_len=16, mode="train")
    assert count_forward_kernels(head, train) == 9 + 3  # + upcast, log-softmax, NLL


def test_train_counts_backward_and_recompute():
    train = Workload(batch=1, seq_len=16, mode="train")
    forward = count_forward_kernels(llama(), train)
    assert forward == count_kernels(llama(), Workload(batch=1, seq_len=16, mode="prefill"))
    assert count_kernels(llama(), train) == 3 * forward
    checkpointed = Workload(batch=1, seq_len=16, mode="train", checkpointing=True)
    assert count_kernels(llama(), checkpointed) == 4 * forward
    dropout = Workload(batch=1, seq_len=16, mode="train", dropout=True)
    assert count_forward_kernels(llama(), dropout) == forward + 3  # probabilities, attention out, MLP out


def test_moe_counts_the_experts_that_receive_tokens():
    shape = LayerShape(part="mlp", hidden_size=64, intermediate_size=128, gated_mlp=True, num_experts=8,
                       experts_per_token=2)
    one = Workload(batch=1, seq_len=16, mode="decode")  # 1 token x 2 experts
    # norm 8 + router 6 + 2 experts x (gather, 5 MLP, weight, index_add = 8) + residual 1
    assert count_kernels(shape, one) == 8 + 6 + 16 + 1
    many = Workload(batch=64, seq_len=16, mode="decode")  # 128 token-expert pairs: every expert is hit
    assert count_kernels(shape, many) == 8 + 6 + 8 * 8 + 1


def test_units_without_a_shape_and_bad_parts():
    unit = Unit(name="x", kind="Linear", footprint=Footprint(weight_bytes=8, activation_bytes=0), params=2, flops_per_token=4)
    assert count_unit_kernels(unit, FP32_TOKEN) is None
    with pytest.raises(ConfigError, match="unknown part"):
        list_kernels(LayerShape(part="conv", hidden_size=8), FP32_TOKEN)


# ------------------------------------------------------------------------------------------------
# Against the real modules


def _compute_ops(ops) -> list[str]:
    """Names of the ops that launch a kernel: everything a dispatch mode sees except views."""
    return [str(f.overloadpacket.__name__) for f in ops
            if not f.is_view and f.overloadpacket.__name__ not in ("_unsafe_view", "detach", "alias")]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers renames past_key_values; both work
@pytest.mark.parametrize(
    "attn, heads, kv_heads, dtype, seq, cache",
    [
        ("eager", 4, 4, "fp32", 1, False),
        ("eager", 4, 4, "fp32", 5, False),
        ("eager", 4, 4, "fp32", 1, True),
        ("eager", 4, 2, "bf16", 1, True),
        ("sdpa", 4, 2, "fp32", 1, True),
        ("sdpa", 4, 4, "bf16", 5, False),
    ],
)
def test_counts_match_the_transformers_llama_layer(attn, heads, kv_heads, dtype, seq, cache):
    """A layer's kernels = the non-view ATen ops of a 2-layer model minus those of a 1-layer model."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    counts = []
    for layers in (1, 2):
        config = transformers.LlamaConfig(
            hidden_size=64, intermediate_size=172, num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=kv_heads, head_dim=16, vocab_size=256, max_position_embeddings=64,
            attn_implementation=attn)
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).eval().to(torch_dtype)
        ids = torch.randint(0, 256, (2, seq))
        with torch.no_grad():
            past = model(torch.randint(0, 256, (2, 4)), use_cache=True).past_key_values if cache else None
            with Count() as counter:
                model(ids, use_cache=cache, past_key_values=past)
        counts.append(collections.Counter(_compute_ops(counter.ops)))
    layer = counts[1] - counts[0]
    shape = LayerShape(part="layer", hidden_size=64, num_heads=heads, num_kv_heads=kv_heads, head_dim=16,
                       intermediate_size=172, gated_mlp=True, rotary_dim=16)
    workload = Workload(batch=2, seq_len=4 + seq if cache else seq, mode="decode" if cache else "prefill",
                        weight_dtype=dtype, act_dtype=dtype, attention="eager" if attn == "eager" else "flash")
    if cache:
        assert workload.query_len == seq == 1
    assert sum(layer.values()) == count_kernels(shape, workload), dict(layer)
