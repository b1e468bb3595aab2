import pytest
from hypothesis import given, strategies as st

from cachefit.errors import ConfigError
from cachefit.units import (
    Footprint,
    ModelProfile,
    Mode,
    TensorSpec,
    Unit,
    Workload,
    dtype_bytes,
    normalize_dtype,
    stack_footprints,
)


def test_workload_defaults_and_derived_lengths():
    wl = Workload(batch=4, seq_len=128, mode="prefill")
    assert wl.mode is Mode.PREFILL and wl.query_len == 128 and wl.tokens == 512
    dec = Workload(batch=4, seq_len=128, mode="decode")
    assert dec.query_len == 1 and dec.kv_len == 128 and dec.tokens == 4
    assert dec.kv_cache_dtype == "fp16"


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"batch": 0}, "batch"),
        ({"seq_len": -1}, "seq_len"),
        ({"mode": "serve"}, "mode"),
        ({"weight_dtype": "fp13"}, "weight_dtype"),
        ({"attention": "sparse"}, "attention"),
        ({"batch": True}, "batch"),
    ],
)
def test_workload_rejects_bad_fields(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        Workload(**kwargs)


def test_dtypes():
    assert normalize_dtype("torch.bfloat16") == "bf16"
    assert dtype_bytes("fp16", 10) == 20
    assert dtype_bytes("int4", 3) == 2  # 12 bits round up to 2 bytes
    with pytest.raises(ConfigError):
        normalize_dtype("fp12")


def test_footprint_checks_parts_and_persistent():
    with pytest.raises(ConfigError, match="parts sum"):
        Footprint(weight_bytes=10, activation_bytes=0, weight_roles=(("qkv", 4),))
    with pytest.raises(ConfigError, match="persistent"):
        Footprint(weight_bytes=0, activation_bytes=5, persistent_activation_bytes=6)
    with pytest.raises(ConfigError):
        Footprint(weight_bytes=-1, activation_bytes=0)


def test_tensor_spec_validation():
    t = TensorSpec(name="w", shape=(4, 8), role="mlp", block="mlp")
    assert t.numel == 32
    with pytest.raises(ConfigError, match="role"):
        TensorSpec(name="w", shape=(4,), role="weights")
    with pytest.raises(ConfigError, match="block"):
        TensorSpec(name="w", shape=(4,), role="mlp", block="ffn")


fp_strategy = st.builds(
    lambda w, p, t, b: Footprint(weight_bytes=w, activation_bytes=p + t, persistent_activation_bytes=p, buffer_bytes=b),
    st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 10**6),
)


@given(st.lists(fp_strategy, min_size=1, max_size=8))
def test_stack_reuse_is_between_max_and_sum(fps):
    stacked = stack_footprints(fps)
    summed = stack_footprints(fps, reuse=False)
    assert summed.total_bytes == sum(f.total_bytes for f in fps)
    assert max(f.total_bytes for f in fps) <= stacked.total_bytes <= summed.total_bytes
    # resident bytes always add up
    assert stacked.weight_bytes == sum(f.weight_bytes for f in fps)
    assert stacked.persistent_activation_bytes == sum(f.persistent_activation_bytes for f in fps)
    # exact: resident + the worst unit's transient + buffers
    resident = sum(f.weight_bytes + f.persistent_activation_bytes for f in fps)
    assert stacked.total_bytes == resident + max(f.transient_activation_bytes + f.buffer_bytes for f in fps)


@given(st.lists(fp_strategy, min_size=2, max_size=8))
def test_stack_is_monotone_under_extension(fps):
    # adding a unit to a card never makes it need fewer bytes (greedy partitioning relies on this)
    assert stack_footprints(fps[:-1]).total_bytes <= stack_footprints(fps).total_bytes


def _unit(name):
    return Unit(name=name, kind="layer", footprint=Footprint(weight_bytes=1, activation_bytes=0), params=1, flops_per_token=0)


def test_profile_rejects_duplicates_and_empty():
    with pytest.raises(ConfigError, match="duplicate"):
        ModelProfile(model="m", workload=Workload(), units=(_unit("a"), _unit("a")))
    with pytest.raises(ConfigError, match="no units"):
        ModelProfile(model="m", workload=Workload(), units=())


def test_torch_dtype_is_the_one_table_from_names_to_torch():
    torch = pytest.importorskip("torch")
    from cachefit.units import torch_dtype

    assert [torch_dtype(n) for n in ("fp32", "fp16", "bf16", "float16", "torch.bfloat16")] == [
        torch.float32, torch.float16, torch.bfloat16, torch.float16, torch.bfloat16]
    with pytest.raises(ConfigError, match="no torch dtype"):
        torch_dtype("int4")
    with pytest.raises(ConfigError, match="unknown dtype"):
        torch_dtype("fp7")
