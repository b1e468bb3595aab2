"""Compression as footprint transformations: worked byte counts and properties.

Every expected number below is computed by hand in a comment from the tensor shapes, not by the
code under test.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachefit.profile.activations import estimate_activations, estimate_flops_per_token
from cachefit.compress import (
    CANONICAL_ORDER,
    TECHNIQUES,
    CompressionConfig,
    compress_unit,
    compression_risk,
    explain_compression,
    resolve_techniques,
)
from cachefit.errors import ConfigError, UnsupportedCompressionError
from cachefit.units import Footprint, LayerShape, Mode, TensorSpec, Unit, Workload, dtype_bytes

# --------------------------------------------------------------------------------------------------
# Units built by hand


def _linear(prefix: str, out: int, inp: int, role: str, block: str, *, bias: bool) -> tuple[TensorSpec, ...]:
    specs = (TensorSpec(name=f"{prefix}.weight", shape=(out, inp), role=role, block=block),)
    if bias:
        specs += (TensorSpec(name=f"{prefix}.bias", shape=(out,), role=role, block=block),)
    return specs


def make_layer(
    workload: Workload,
    *,
    hidden: int = 64,
    heads: int = 4,
    inter: int = 256,
    gated: bool = False,
    bias: bool = False,
    norms: bool = True,
    experts: int = 0,
    name: str = "layers.0",
) -> Unit:
    """A decoder layer whose footprint is the tensors' bytes plus the activation estimate."""
    p = name
    tensors: tuple[TensorSpec, ...] = ()
    for proj in ("q_proj", "k_proj", "v_proj"):
        tensors += _linear(f"{p}.self_attn.{proj}", hidden, hidden, "qkv", "attn", bias=bias)
    tensors += _linear(f"{p}.self_attn.o_proj", hidden, hidden, "attn_out", "attn", bias=bias)
    if experts:
        tensors += (
            TensorSpec(name=f"{p}.mlp.gate.weight", shape=(experts, hidden), role="router", block="mlp"),
            TensorSpec(
                name=f"{p}.mlp.experts.gate_up_proj", shape=(experts, 2 * inter, hidden), role="experts", block="mlp"
            ),
            TensorSpec(name=f"{p}.mlp.experts.down_proj", shape=(experts, hidden, inter), role="experts", block="mlp"),
        )
    else:
        if gated:
            tensors += _linear(f"{p}.mlp.gate_proj", inter, hidden, "mlp", "mlp", bias=bias)
        tensors += _linear(f"{p}.mlp.up_proj", inter, hidden, "mlp", "mlp", bias=bias)
        tensors += _linear(f"{p}.mlp.down_proj", hidden, inter, "mlp", "mlp", bias=bias)
    if norms:
        tensors += (
            TensorSpec(name=f"{p}.input_layernorm.weight", shape=(hidden,), role="norm", block="attn"),
            TensorSpec(name=f"{p}.post_attention_layernorm.weight", shape=(hidden,), role="norm", block="mlp"),
        )
    shape = LayerShape(
        part="layer",
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=inter,
        gated_mlp=gated or bool(experts),
        num_experts=experts,
        experts_per_token=min(2, experts),
    )
    return _unit_from(name, "layer", tensors, shape, workload)


def _unit_from(name: str, kind: str, tensors, shape: LayerShape | None, workload: Workload) -> Unit:
    roles: dict[str, int] = {}
    for t in tensors:
        roles[t.role] = roles.get(t.role, 0) + dtype_bytes(workload.weight_dtype, t.numel)
    if shape is not None:
        est = estimate_activations(shape, workload)
        acts = dict(
            activation_bytes=est.activation_bytes,
            persistent_activation_bytes=est.persistent_bytes,
            buffer_bytes=est.buffer_bytes,
            activation_parts=tuple(est.parts),
            buffer_parts=tuple(est.buffer_parts),
        )
        flops = estimate_flops_per_token(shape, workload)
    else:
        acts = dict(activation_bytes=1000, persistent_activation_bytes=100, activation_parts=(("x", 600), ("y", 400)))
        flops = 0
    footprint = Footprint(weight_bytes=sum(roles.values()), weight_roles=tuple(roles.items()), **acts)
    return Unit(
        name=name,
        kind=kind,
        footprint=footprint,
        params=sum(t.numel for t in tensors),
        flops_per_token=flops,
        tensors=tuple(tensors),
        shape=shape,
    )


DECODE = Workload(batch=4, seq_len=128, mode="decode")
PREFILL = Workload(batch=4, seq_len=128, mode="prefill")
TRAIN = Workload(batch=4, seq_len=128, mode="train")

# The seed paper's 16-layer model, one layer: hidden 4096, MLP 16384 (up / down only), FP16, no biases.
PAPER = Workload(batch=1, seq_len=2048, mode="decode", weight_dtype="fp16", act_dtype="fp16")


@pytest.fixture(scope="module")
def paper_layer() -> Unit:
    return make_layer(PAPER, hidden=4096, heads=32, inter=16384, norms=False)


# --------------------------------------------------------------------------------------------------
# Catalog, names, risk


def test_catalog_has_the_documented_techniques():
    assert set(TECHNIQUES) == {"int8", "int4", "sparse50", "sparse75", "sparse24", "ckpt", "fuse", "batch"}
    assert CANONICAL_ORDER == tuple(TECHNIQUES)
    for t in TECHNIQUES.values():
        assert 0.0 <= t.risk <= 1.0 and t.rationale and t.title
        assert t.kind in ("weights", "activations", "workload")
    # exact techniques carry no risk; pruning without fine-tuning carries more than quantization
    assert TECHNIQUES["ckpt"].risk == 0 and TECHNIQUES["batch"].risk == 0
    assert TECHNIQUES["int8"].risk < TECHNIQUES["int4"].risk < TECHNIQUES["sparse24"].risk
    assert TECHNIQUES["sparse50"].risk < TECHNIQUES["sparse75"].risk
    assert "CUDA" in TECHNIQUES["sparse24"].requires


def test_resolve_orders_canonically_and_reads_comma_lists():
    assert resolve_techniques(["batch", "int8", "sparse50", "fuse"]) == ("sparse50", "int8", "fuse", "batch")
    assert resolve_techniques("ckpt, INT4") == ("int4", "ckpt")
    assert resolve_techniques([]) == ()


def test_resolve_rejects_unknown_exclusive_and_duplicate_names():
    with pytest.raises(UnsupportedCompressionError, match="int3.*known techniques: .*int8"):
        resolve_techniques(["int3"])
    with pytest.raises(UnsupportedCompressionError, match="'int8' and 'int4'"):
        resolve_techniques(["int4", "int8"])
    with pytest.raises(UnsupportedCompressionError, match="'sparse50' and 'sparse75'"):
        resolve_techniques(["sparse75", "sparse50"])
    with pytest.raises(ConfigError, match="twice"):
        resolve_techniques(["fuse", "fuse"])
    with pytest.raises(ConfigError):
        resolve_techniques([8])


def test_compression_risk_combines_as_independent_chances():
    assert compression_risk([]) == 0.0
    assert compression_risk(["ckpt", "fuse", "batch"]) == pytest.approx(TECHNIQUES["fuse"].risk)
    # 1 - (1 - 0.05)(1 - 0.6) = 1 - 0.95 * 0.4 = 0.62
    r8, r50 = TECHNIQUES["int8"].risk, TECHNIQUES["sparse50"].risk
    assert compression_risk(["int8", "sparse50"]) == pytest.approx(1 - (1 - r8) * (1 - r50))
    assert compression_risk(["sparse50", "int8"]) == compression_risk(["int8", "sparse50"])
    assert compression_risk(["int8", "sparse50"]) >= max(r8, r50)
    with pytest.raises(UnsupportedCompressionError):
        compression_risk(["int8", "int4"])


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"int4_group_size": 0}, "int4_group_size"),
        ({"int8_group_size": -4}, "int8_group_size"),
        ({"scale_dtype": "int8"}, "scale_dtype"),
        ({"scale_dtype": "fp12"}, "scale_dtype"),
        ({"quantize_roles": ("qkv", "scales")}, "quantize_roles"),
        ({"quantize_roles": "qkv"}, "quantize_roles"),
        ({"target_batch": 0}, "target_batch"),
    ],
)
def test_config_rejects_bad_fields(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        CompressionConfig(**kwargs)


def test_config_normalizes_scale_dtype():
    assert CompressionConfig(scale_dtype="bfloat16").scale_dtype == "bf16"


# --------------------------------------------------------------------------------------------------
# Worked cases on the paper-16l layer (hidden 4096, MLP 16384, FP16)

QKV_FP16 = 3 * 4096 * 4096 * 2  # 100,663,296 B
OUT_FP16 = 4096 * 4096 * 2  # 33,554,432 B
MLP_FP16 = 2 * 4096 * 16384 * 2  # 268,435,456 B (up (16384, 4096) + down (4096, 16384))


def test_paper_layer_as_profiled(paper_layer):
    assert paper_layer.footprint.roles == {"qkv": QKV_FP16, "attn_out": OUT_FP16, "mlp": MLP_FP16}
    assert paper_layer.footprint.weight_bytes == 402_653_184


def test_int8_per_channel_on_paper_layer(paper_layer):
    fp = compress_unit(paper_layer, ["int8"], PAPER).footprint
    roles = fp.roles
    # 1 byte per weight; one fp16 scale per output row
    assert roles["qkv"] == 3 * 4096 * 4096  # 50,331,648
    assert roles["attn_out"] == 4096 * 4096
    assert roles["mlp"] == 2 * 4096 * 16384
    # scales: q, k, v, o: 4 x 4096 rows; up: 16384 rows; down: 4096 rows; 2 B each
    assert roles["scales"] == (4 * 4096 + 16384 + 4096) * 2 == 73_728
    assert fp.weight_bytes == 201_326_592 + 73_728
    assert "metadata" not in roles
    # activations are untouched by weight-only quantization
    assert fp.activation_bytes == paper_layer.footprint.activation_bytes
    assert fp.buffer_bytes == paper_layer.footprint.buffer_bytes


def test_int8_with_fp32_scales_and_groups(paper_layer):
    fp32 = compress_unit(paper_layer, ["int8"], PAPER, CompressionConfig(scale_dtype="fp32")).footprint
    assert fp32.roles["scales"] == 73_728 * 2
    grouped = compress_unit(paper_layer, ["int8"], PAPER, CompressionConfig(int8_group_size=1024)).footprint
    # q, k, v, o: 4096 rows x 4 groups; up: 16384 x 4; down: 4096 x 16 groups; 2 B each
    assert grouped.roles["scales"] == (4 * 4096 * 4 + 16384 * 4 + 4096 * 16) * 2


def test_int4_grouped_on_paper_layer(paper_layer):
    roles = compress_unit(paper_layer, ["int4"], PAPER).footprint.roles
    assert roles["qkv"] == 3 * 4096 * 4096 // 2
    assert roles["mlp"] == 2 * 4096 * 16384 // 2
    # per 128 input features and output row: a bf16/fp16 scale and a zero point, 4 B
    # q, k, v, o: 4096 rows x 32 groups; up: 16384 x 32; down: 4096 x 128
    assert roles["scales"] == (4 * 4096 * 32 + 16384 * 32 + 4096 * 128) * 4 == 6_291_456
    sym = compress_unit(paper_layer, ["int4"], PAPER, CompressionConfig(int4_zero_points=False)).footprint
    assert sym.roles["scales"] == 6_291_456 // 2


def test_sparse50_and_sparse75_shrink_the_mlp_only(paper_layer):
    r50 = compress_unit(paper_layer, ["sparse50"], PAPER)
    assert r50.footprint.roles == {"qkv": QKV_FP16, "attn_out": OUT_FP16, "mlp": MLP_FP16 // 2}
    r75 = compress_unit(paper_layer, ["sparse75"], PAPER)
    assert r75.footprint.roles["mlp"] == 2 * 4096 * 4096 * 2  # 4096 of 16384 neurons left
    # parameters really removed: 2 x 4096 x 8192 for sparse50
    assert paper_layer.params - r50.params == 2 * 4096 * 8192
    assert r50.compression == ("sparse50",)


def test_sparse24_fp16_is_0_5625_of_dense(paper_layer):
    fp = compress_unit(paper_layer, ["sparse24"], PAPER).footprint
    dense = 402_653_184
    # half the 2-byte values, plus 2 bits per kept value = 1 bit per dense element
    assert fp.roles["metadata"] == 201_326_592 // 8
    assert fp.weight_bytes == dense // 2 + 201_326_592 // 8
    assert fp.weight_bytes / dense == 0.5625
    assert fp.activation_bytes == paper_layer.footprint.activation_bytes


def test_sparse24_with_int8_counts_1_byte_values(paper_layer):
    fp = compress_unit(paper_layer, ["int8", "sparse24"], PAPER).footprint
    elements = 201_326_592
    values = elements // 2  # 1 byte each
    meta = elements // 8
    assert fp.roles["metadata"] == meta
    assert fp.roles["scales"] == 73_728
    assert fp.weight_bytes == values + meta + 73_728
    assert (values + meta) / elements == 0.625  # of int8 dense


def test_paper_chain_int8_sparse50_ckpt_fuse(paper_layer):
    """The seed's chain: what INT8 + 50% MLP sparsity + checkpointing + fusion really give."""
    steps = explain_compression(paper_layer, ["int8", "sparse50", "ckpt", "fuse"], PAPER)
    assert [s.technique for s in steps] == ["sparse50", "int8", "fuse", "ckpt"]
    assert all(s.applied for s in steps)
    for a, b in itertools.pairwise(steps):
        assert a.after == b.before
    final = steps[-1].after
    # attention 4 x 4096 x 4096 at 1 B + 4 x 4096 fp16 scales
    # MLP up (8192, 4096) + down (4096, 8192) at 1 B + (8192 + 4096) fp16 scales
    attn = 4 * 4096 * 4096 + 4 * 4096 * 2
    mlp = 2 * 4096 * 8192 + (8192 + 4096) * 2
    assert final.weight_bytes == attn + mlp == 134_275_072
    assert steps[0].saved_weight_bytes == MLP_FP16 // 2
    # checkpointing in decode: applicable, saves exactly nothing
    ckpt = steps[3]
    assert ckpt.saved_bytes == 0 and "nothing is saved for backward" in ckpt.reason
    unit = compress_unit(paper_layer, ["int8", "sparse50", "ckpt", "fuse"], PAPER)
    assert unit.footprint == final
    assert unit.compression == ("sparse50", "int8", "fuse", "ckpt")
    # far above the paper's claimed 49.5 MB per layer
    assert final.weight_bytes > 2.5 * 49_500_000


# --------------------------------------------------------------------------------------------------
# Layout details: biases, Conv1D, experts, padding


def test_biases_and_norms_stay_in_the_original_dtype():
    wl = Workload(batch=1, seq_len=16, mode="decode", weight_dtype="fp32")
    unit = make_layer(wl, hidden=64, heads=4, inter=256, bias=True)
    roles = compress_unit(unit, ["int8"], wl).footprint.roles
    # q, k, v: 3 x (64 x 64 at 1 B + 64 fp32 biases x 4 B); scales 3 x 64 x 2 B (fp16 by default)
    assert roles["qkv"] == 3 * (64 * 64 + 64 * 4)
    assert roles["norm"] == 2 * 64 * 4
    # mlp: up (256, 64) + down (64, 256) at 1 B, biases 256 + 64 at 4 B
    assert roles["mlp"] == 2 * 64 * 256 + (256 + 64) * 4
    assert roles["scales"] == (4 * 64 + 256 + 64) * 2


def _gpt2_block(wl: Workload, hidden: int = 768) -> Unit:
    p = "transformer.h.0"
    tensors = (
        TensorSpec(name=f"{p}.attn.c_attn.weight", shape=(hidden, 3 * hidden), role="qkv", block="attn"),
        TensorSpec(name=f"{p}.attn.c_attn.bias", shape=(3 * hidden,), role="qkv", block="attn"),
        TensorSpec(name=f"{p}.attn.c_proj.weight", shape=(hidden, hidden), role="attn_out", block="attn"),
        TensorSpec(name=f"{p}.mlp.c_fc.weight", shape=(hidden, 4 * hidden), role="mlp", block="mlp"),
        TensorSpec(name=f"{p}.mlp.c_fc.bias", shape=(4 * hidden,), role="mlp", block="mlp"),
        TensorSpec(name=f"{p}.mlp.c_proj.weight", shape=(4 * hidden, hidden), role="mlp", block="mlp"),
    )
    shape = LayerShape(
        part="layer", hidden_size=hidden, num_heads=12, num_kv_heads=12, head_dim=hidden // 12,
        intermediate_size=4 * hidden,
    )
    return _unit_from(p, "layer", tensors, shape, wl)


def test_gpt2_conv1d_weights_are_read_input_first():
    wl = Workload(batch=1, seq_len=64, mode="decode", weight_dtype="fp32")
    unit = _gpt2_block(wl)
    scales = compress_unit(unit, ["int8"], wl).footprint.roles["scales"]
    # Conv1D (in, out): one scale per output = last dim: 2304 + 768 + 3072 + 768 outputs, 2 B each
    assert scales == (2304 + 768 + 3072 + 768) * 2
    as_linear = compress_unit(unit, ["int8"], wl, CompressionConfig(transposed_tensors=())).footprint
    # read as nn.Linear (out, in): first dims 768 + 768 + 768 + 3072
    assert as_linear.roles["scales"] == (768 + 768 + 768 + 3072) * 2


def test_gpt2_sparse50_finds_the_intermediate_axis_in_either_layout():
    wl = Workload(batch=1, seq_len=64, mode="decode", weight_dtype="fp32")
    unit = _gpt2_block(wl)
    roles = compress_unit(unit, ["sparse50"], wl).footprint.roles
    # c_fc (768, 3072) -> (768, 1536); its bias 3072 -> 1536; c_proj (3072, 768) -> (1536, 768); fp32
    assert roles["mlp"] == (768 * 1536 + 1536 + 1536 * 768) * 4


def test_experts_3d_int8_and_sparse50():
    wl = Workload(batch=1, seq_len=32, mode="decode")
    unit = make_layer(wl, hidden=64, heads=4, inter=128, experts=4)
    roles = compress_unit(unit, ["int8"], wl).footprint.roles
    # gate_up (4, 256, 64) + down (4, 64, 128) at 1 B; router (4, 64) stays fp16
    assert roles["experts"] == 4 * 256 * 64 + 4 * 64 * 128
    assert roles["router"] == 4 * 64 * 2
    # rows: 4 x 256 + 4 x 64 experts rows, plus q, k, v, o 4 x 64; 2 B each
    assert roles["scales"] == (4 * 256 + 4 * 64 + 4 * 64) * 2
    pruned = compress_unit(unit, ["sparse50"], wl).footprint.roles
    # gate_up (4, 2 x 64, 64), down (4, 64, 64) in fp16
    assert pruned["experts"] == (4 * 128 * 64 + 4 * 64 * 64) * 2
    assert pruned["router"] == 4 * 64 * 2


def test_int4_pads_the_last_group_or_raises():
    wl = Workload(batch=1, seq_len=8, mode="decode")
    tensors = (TensorSpec(name="fc.weight", shape=(8, 100), role="mlp", block="mlp"),)
    unit = _unit_from("fc", "Linear", tensors, None, wl)
    roles = compress_unit(unit, ["int4"], wl).footprint.roles
    # 100 inputs padded to one group of 128: 8 x 128 / 2 values; 8 rows x 1 group x 4 B
    assert roles["mlp"] == 8 * 128 // 2 and roles["scales"] == 8 * 4
    with pytest.raises(UnsupportedCompressionError, match="100 input features.*group size 128"):
        compress_unit(unit, ["int4"], wl, CompressionConfig(pad_groups=False))


def test_tiny_matrices_can_grow_and_the_step_says_so():
    # A (4, 1) fp16 matrix: 8 B dense; int8: 4 B values + 4 fp16 scales = 12 B. Reported, not hidden.
    wl = Workload(batch=1, seq_len=8, mode="decode")
    unit = _unit_from("tiny", "Linear", (TensorSpec(name="t.weight", shape=(4, 1), role="mlp"),), None, wl)
    (step,) = explain_compression(unit, ["int8"], wl)
    assert step.applied and step.after.weight_bytes == 12 and step.saved_weight_bytes == -4


def test_fp32_base_2_4_uses_the_1_2_pattern_metadata():
    wl = Workload(batch=1, seq_len=8, mode="decode", weight_dtype="fp32")
    unit = _unit_from("fc", "Linear", (TensorSpec(name="fc.weight", shape=(32, 64), role="mlp"),), None, wl)
    roles = compress_unit(unit, ["sparse24"], wl).footprint.roles
    # half of 32 x 64 fp32 values; 4 bits per pair = 2 bits per dense element
    assert roles["mlp"] == 32 * 64 // 2 * 4 and roles["metadata"] == 32 * 64 * 2 // 8


def test_quantizing_head_and_embeddings_is_opt_in():
    wl = Workload(batch=1, seq_len=8, mode="decode")
    tensors = (
        TensorSpec(name="model.norm.weight", shape=(64,), role="norm"),
        TensorSpec(name="lm_head.weight", shape=(1000, 64), role="head"),
    )
    unit = _unit_from("head", "head", tensors, None, wl)
    (step,) = explain_compression(unit, ["int8"], wl)
    assert not step.applied and step.saved_bytes == 0 and "no matrix" in step.reason
    assert compress_unit(unit, ["int8"], wl) is unit
    cfg = CompressionConfig(quantize_roles=("head",))
    roles = compress_unit(unit, ["int8"], wl, cfg).footprint.roles
    assert roles["head"] == 1000 * 64 and roles["scales"] == 1000 * 2 and roles["norm"] == 128


# --------------------------------------------------------------------------------------------------
# Techniques that do not apply, errors


def test_not_applicable_is_a_recorded_no_op_or_an_error_when_strict():
    wl = Workload(batch=1, seq_len=8, mode="decode")
    tensors = (TensorSpec(name="embed_tokens.weight", shape=(1000, 64), role="embed"),)
    shape = LayerShape(part="embedding", hidden_size=64, vocab_size=1000)
    unit = _unit_from("embed", "embedding", tensors, shape, wl)
    steps = explain_compression(unit, ["sparse50", "int8", "batch"], wl)
    assert [s.applied for s in steps] == [False, False, False]
    assert all(s.saved_bytes == 0 for s in steps)
    assert "no MLP" in steps[0].reason and "target batch 1" in steps[2].reason
    assert compress_unit(unit, ["sparse50", "int8", "batch"], wl).compression == ()
    with pytest.raises(UnsupportedCompressionError, match="sparse50 does not apply to unit embed"):
        compress_unit(unit, ["sparse50"], wl, CompressionConfig(strict=True))


def test_int8_on_int8_weights_does_not_apply():
    wl = Workload(batch=1, seq_len=8, mode="decode", weight_dtype="int8")
    unit = make_layer(wl)
    (step,) = explain_compression(unit, ["int8"], wl)
    assert not step.applied and "already int8" in step.reason
    (step4,) = explain_compression(unit, ["int4"], wl)
    assert step4.applied and step4.saved_weight_bytes > 0


def test_compressing_twice_is_refused():
    unit = make_layer(DECODE)
    once = compress_unit(unit, ["int8"], DECODE)
    with pytest.raises(UnsupportedCompressionError, match="already compressed \\(int8\\)"):
        compress_unit(once, ["fuse"], DECODE)
    assert compress_unit(once, [], DECODE) is once


def test_wrong_workload_is_caught_before_reestimating():
    unit = make_layer(DECODE)
    other = replace(DECODE, batch=2)
    with pytest.raises(ConfigError, match="profiled with"):
        compress_unit(unit, ["fuse"], other)
    # weight-only techniques do not depend on activations
    assert compress_unit(unit, ["int8"], other).footprint.weight_bytes < unit.footprint.weight_bytes


def test_bad_arguments_raise_cachefit_errors():
    with pytest.raises(ConfigError, match="expected a Unit"):
        compress_unit("layers.0", ["int8"], DECODE)
    with pytest.raises(ConfigError, match="expected a Workload"):
        compress_unit(make_layer(DECODE), ["int8"], {"batch": 1})


def test_ambiguous_intermediate_axis_is_resolved_by_name_or_raises():
    # hidden == intermediate (a tensor-parallel shard, say): a (64, 64) MLP matrix could be pruned
    # along either axis; the projection's name decides (up/gate: rows, down: columns)
    unit = make_layer(DECODE, hidden=64, inter=64)
    pruned = compress_unit(unit, ["sparse50"], DECODE)
    mlp = {t.name: t for t in unit.tensors if t.role == "mlp" and len(t.shape) == 2}
    assert mlp and any("up_proj" in n or "down_proj" in n for n in mlp)
    # half the neurons go: every MLP matrix loses half of one axis
    assert pruned.footprint.roles["mlp"] == unit.footprint.roles["mlp"] // 2
    anonymous = replace(
        unit,
        tensors=tuple(replace(t, name=f"mlp.m{i}.weight") if t.role == "mlp" else t for i, t in enumerate(unit.tensors)),
    )
    with pytest.raises(UnsupportedCompressionError, match="cannot tell which dimension"):
        compress_unit(anonymous, ["sparse50"], DECODE)


# --------------------------------------------------------------------------------------------------
# Activation techniques, checked against the activation estimate under the changed workload


def _acts(fp: Footprint) -> tuple[int, int, int]:
    return fp.activation_bytes, fp.persistent_activation_bytes, fp.buffer_bytes


def _est(shape: LayerShape, wl: Workload) -> tuple[int, int, int]:
    e = estimate_activations(shape, wl)
    return e.activation_bytes, e.persistent_bytes, e.buffer_bytes


@pytest.mark.parametrize("wl", [DECODE, PREFILL, TRAIN], ids=lambda w: w.mode.value)
def test_fuse_reestimates_with_flash_attention_and_fused_mlp(wl):
    unit = make_layer(wl)
    fp = compress_unit(unit, ["fuse"], wl).footprint
    assert _acts(fp) == _est(unit.shape, replace(wl, attention="flash", fused_mlp=True))
    assert fp.weight_bytes == unit.footprint.weight_bytes and fp.weight_roles == unit.footprint.weight_roles
    assert fp.activation_bytes <= unit.footprint.activation_bytes


def test_fuse_saves_in_prefill_where_eager_scores_are_materialized():
    unit = make_layer(PREFILL)
    (step,) = explain_compression(unit, ["fuse"], PREFILL)
    assert step.saved_activation_bytes > 0


@pytest.mark.parametrize("wl", [DECODE, PREFILL], ids=lambda w: w.mode.value)
def test_ckpt_saves_nothing_in_inference(wl):
    unit = make_layer(wl)
    (step,) = explain_compression(unit, ["ckpt"], wl)
    assert step.applied and step.saved_bytes == 0
    assert compress_unit(unit, ["ckpt"], wl).compression == ("ckpt",)


def test_ckpt_in_train_matches_the_checkpointed_estimate():
    unit = make_layer(TRAIN)
    (step,) = explain_compression(unit, ["ckpt"], TRAIN)
    assert _acts(step.after) == _est(unit.shape, replace(TRAIN, checkpointing=True))
    # the unit's input is all that stays resident: what adds up over the units of a card
    assert step.after.persistent_activation_bytes == 4 * 128 * 64 * 2  # B x T x h at fp16
    assert step.saved_persistent_bytes > 0
    checkpointed = replace(TRAIN, checkpointing=True)
    (again,) = explain_compression(make_layer(checkpointed), ["ckpt"], checkpointed)
    assert not again.applied


def test_batch_reduction_reestimates_at_the_target_batch():
    unit = make_layer(DECODE)  # batch 4
    fp = compress_unit(unit, ["batch"], DECODE).footprint
    assert _acts(fp) == _est(unit.shape, replace(DECODE, batch=1))
    fp2 = compress_unit(unit, ["batch"], DECODE, CompressionConfig(target_batch=2)).footprint
    assert _acts(fp2) == _est(unit.shape, replace(DECODE, batch=2))
    assert fp.total_bytes <= fp2.total_bytes <= unit.total_bytes


def test_batch_on_a_live_unit_scales_linearly():
    wl = Workload(batch=8, seq_len=8, mode="decode")
    unit = _unit_from("m", "Linear", (TensorSpec(name="m.weight", shape=(8, 8), role="other"),), None, wl)
    (step,) = explain_compression(unit, ["batch"], wl, CompressionConfig(target_batch=3))
    # parts 600 and 400 B at batch 8 -> ceil(600 x 3 / 8) = 225, ceil(400 x 3 / 8) = 150; persistent ceil(37.5)
    assert step.after.activation_parts == (("x", 225), ("y", 150))
    assert step.after.activation_bytes == 375 and step.after.persistent_activation_bytes == 38
    assert "approximation" in step.reason
    # without a shape, activation techniques do not apply
    steps = explain_compression(unit, ["fuse", "ckpt", "sparse50"], wl)
    assert not any(s.applied for s in steps)


def test_sparse50_shrinks_mlp_activations_and_flops():
    unit = make_layer(PREFILL, hidden=64, inter=256)
    out = compress_unit(unit, ["sparse50"], PREFILL)
    half = replace(unit.shape, intermediate_size=128)
    assert _acts(out.footprint) == _est(half, PREFILL)
    # MLP FLOPs per token: up + down, 2 x (2 x 64 x 256) = 65,536 -> half of it removed
    assert unit.flops_per_token - out.flops_per_token == 2 * 2 * 64 * 128
    assert out.flops_per_token == estimate_flops_per_token(half, PREFILL)


def test_weight_techniques_do_not_touch_flops_or_params():
    unit = make_layer(DECODE)
    out = compress_unit(unit, ["int4", "sparse24"], DECODE)
    assert out.flops_per_token == unit.flops_per_token and out.params == unit.params
    assert out.tensors == unit.tensors and out.shape == unit.shape and out.name == unit.name


# --------------------------------------------------------------------------------------------------
# Properties

_WEIGHT = ["sparse50", "sparse75", "sparse24", "int8", "int4"]
_ACTIVATION = ["fuse", "ckpt", "batch"]


@st.composite
def layers(draw, inter_multiples=(2, 3, 4)):
    heads = draw(st.sampled_from([2, 4, 8]))
    head_dim = draw(st.sampled_from([16, 32, 64]))
    hidden = heads * head_dim
    inter = draw(st.sampled_from(inter_multiples)) * hidden  # never equal to hidden: axis unambiguous
    wl = Workload(
        batch=draw(st.integers(1, 4)),
        seq_len=draw(st.sampled_from([8, 64, 256])),
        mode=draw(st.sampled_from(list(Mode))),
        weight_dtype=draw(st.sampled_from(["fp16", "bf16", "fp32"])),
    )
    unit = make_layer(wl, hidden=hidden, heads=heads, inter=inter, gated=draw(st.booleans()), bias=draw(st.booleans()))
    return unit, wl


def _valid_subsets(pool):
    return st.lists(st.sampled_from(pool), unique=True).filter(
        lambda names: not ({"int8", "int4"} <= set(names) or {"sparse50", "sparse75"} <= set(names))
    )


@settings(max_examples=40, deadline=None)
@given(layers(), _valid_subsets(_WEIGHT + _ACTIVATION), st.randoms(use_true_random=False))
def test_property_order_does_not_matter_and_steps_chain(layer, names, rnd):
    unit, wl = layer
    shuffled = list(names)
    rnd.shuffle(shuffled)
    a = compress_unit(unit, names, wl)
    b = compress_unit(unit, shuffled, wl)
    assert a == b
    steps = explain_compression(unit, names, wl)
    for s, t in itertools.pairwise(steps):
        assert s.after == t.before
    if steps:
        assert steps[0].before == unit.footprint and steps[-1].after == a.footprint
    # roles add up (Footprint checks it too) and a step that does not apply saves nothing
    assert sum(v for _, v in a.footprint.weight_roles) == a.footprint.weight_bytes
    assert all(s.saved_bytes == 0 for s in steps if not s.applied)


@settings(max_examples=40, deadline=None)
@given(layers(inter_multiples=(2, 4)), _valid_subsets(_WEIGHT))
def test_property_weight_techniques_never_grow_realistic_weights(layer, names):
    # Realistic settings: the int4 group (16 here) divides every input width, also after sparse75
    # (hidden is a multiple of 32, inter of 64). With tiny groups or padded ones int4 can cost more
    # than int8: per element 0.5 B + 4 B / group (e.g. group 8: 1 B, above int8's 1 B + 2 B / row).
    unit, wl = layer
    cfg = CompressionConfig(int4_group_size=16)
    out = compress_unit(unit, names, wl, cfg).footprint
    assert out.weight_bytes <= unit.footprint.weight_bytes
    base = [n for n in names if n not in ("int8", "int4")]
    plain = compress_unit(unit, base, wl, cfg).footprint.weight_bytes
    w8 = compress_unit(unit, base + ["int8"], wl, cfg).footprint.weight_bytes
    w4 = compress_unit(unit, base + ["int4"], wl, cfg).footprint.weight_bytes
    assert w4 <= w8 <= plain <= unit.footprint.weight_bytes


@settings(max_examples=40, deadline=None)
@given(layers(), _valid_subsets(["sparse24", "int8", "int4"]), _valid_subsets(_ACTIVATION))
def test_property_weight_and_activation_techniques_are_independent(layer, wnames, anames):
    unit, wl = layer
    both = compress_unit(unit, wnames + anames, wl).footprint
    weights_only = compress_unit(unit, wnames, wl).footprint
    acts_only = compress_unit(unit, anames, wl).footprint
    assert (both.weight_bytes, both.weight_roles) == (weights_only.weight_bytes, weights_only.weight_roles)
    assert _acts(both) == _acts(acts_only)
    assert both.activation_parts == acts_only.activation_parts


# --------------------------------------------------------------------------------------------------
# The shipped presets (the numbers of docs/compression.md)


def test_paper16l_preset_chain_matches_the_documented_numbers():
    from cachefit.profile import profile_model

    wl = Workload(batch=1, seq_len=2048, mode="decode")
    layer = profile_model("paper-16l", wl).unit("layers.0")
    # the preset adds two RMS norm gains, 2 x 4096 x 2 B, to the hand-built layer
    assert layer.footprint.weight_bytes == 402_653_184 + 16_384
    steps = explain_compression(layer, ["int8", "sparse50", "ckpt", "fuse"], wl)
    totals = [s.after.total_bytes for s in steps]
    # Activations (docs/compression.md): the 33,554,432 B KV cache; beside it at the eager softmax
    # 6 x 8,192 B (layer input, normed input, q, k, v; 8 B of position ids) and the fp16 masked scores
    # 1 x 32 x 1 x 2048 x 2 = 131,072 B with their fp32 copy and fp32 softmax 2 x 262,144 B, the int64
    # token id the caller holds and the static cache's int64 fill counter (8 B each): 34,250,776 B, + the
    # 4,096 B mask. Fusion (flash, fused MLP): the MLP's RMSNorm makes the peak, 4 x 8,192 + 8 + its fp32
    # workspace 8 x 4096 - 8192 + 8, + the same 16 B = 24,600 B: 33,611,808 B, + SDPA's 2,048 B boolean
    # mask over the cache.
    assert totals == [
        268_451_840 + 34_250_776 + 4_096, 134_291_456 + 34_250_776 + 4_096,
        134_291_456 + 33_611_808 + 2_048, 134_291_456 + 33_611_808 + 2_048,
    ] == [302_706_712, 168_546_328, 167_905_312, 167_905_312]
    assert steps[-1].after.weight_bytes == 134_275_072 + 16_384
    # the KV cache, 2 x 2048 x 4096 x 2 B, is untouched by the chain
    assert steps[-1].after.persistent_activation_bytes == 2 * 2048 * 4096 * 2
    assert steps[-1].after.weight_bytes > 49_500_000  # the paper's claim is not reached


def test_every_preset_unit_compresses_without_growing():
    from cachefit.profile import profile_model
    from cachefit.profile.presets import list_presets

    wl = Workload(batch=2, seq_len=64, mode="prefill")
    for preset in list_presets():
        for unit in profile_model(preset.name, wl).units:
            for names in (["sparse50", "int8", "fuse", "ckpt", "batch"], ["sparse75", "int4", "sparse24"]):
                out = compress_unit(unit, names, wl)
                assert out.footprint.weight_bytes <= unit.footprint.weight_bytes, (preset.name, unit.name)
                assert out.footprint.total_bytes <= unit.total_bytes, (preset.name, unit.name)


def test_importing_the_technique_model_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, cachefit.compress.techniques; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
