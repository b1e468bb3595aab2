"""Proportional splits over cards of different sizes, against brute force over every apportionment."""

import itertools

import pytest
from hypothesis import given, settings, strategies as st

from cachefit.partition.apportion import Apportioner
from cachefit.partition.split import ShardParts, kv_heads_read, shard_unit, shard_unit_parts
from cachefit.errors import ConfigError
from cachefit.profile import profile_model
from cachefit.units import Workload

WL = Workload(batch=1, seq_len=4, mode="decode")
CONFIG = ('{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, '
          '"num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 8, '
          '"vocab_size": 6, "tie_word_embeddings": false, "torch_dtype": "float16"}')


@pytest.fixture(scope="module")
def units(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "config.json"
    path.write_text(CONFIG)
    return profile_model(str(path), WL).units  # embed (vocab 6), layers.0 (4 heads, 2 KV, 8 columns), head


def _bytes(unit, parts):
    return shard_unit_parts(unit, parts, 2, WL).unit.total_bytes


def _compositions(total, k):
    for cuts in itertools.combinations(range(1, total), k - 1):
        bounds = (0, *cuts, total)
        yield [(bounds[i], bounds[i + 1]) for i in range(k)]


def _brute(unit, caps):
    """Some apportionment of every split dimension (contiguous ranges, every card at least one slice;
    query heads whole KV groups or within one) whose shards all fit; None if none does."""
    shape = unit.shape
    k = len(caps)
    if shape.part in ("embedding", "head"):
        for rows in _compositions(shape.vocab_size, k):
            parts = [ShardParts(vocab=r) for r in rows]
            if all(_bytes(unit, p) <= c for p, c in zip(parts, caps)):
                return parts
        return None
    per = shape.num_heads // shape.num_kv_heads
    for heads in _compositions(shape.num_heads, k):
        kvs = [kv_heads_read(shape, h) for h in heads]
        if any(kv[1] - kv[0] > 1 and (h[0] % per or h[1] % per) for h, kv in zip(heads, kvs)):
            continue
        for cols in _compositions(shape.intermediate_size, k):
            parts = [ShardParts(heads=h, kv_heads=kv, mlp_columns=c) for h, kv, c in zip(heads, kvs, cols)]
            if all(_bytes(unit, p) <= c for p, c in zip(parts, caps)):
                return parts
    return None


@settings(max_examples=60, deadline=None)
@given(which=st.integers(0, 2), fractions=st.lists(st.integers(10, 100), min_size=2, max_size=4))
def test_apportion_finds_a_fit_exactly_when_brute_force_does(units, which, fractions):
    unit = units[which]
    caps = tuple(unit.total_bytes * f // 100 for f in fractions)
    got = Apportioner(unit, lambda p: _bytes(unit, p)).apportion(caps)
    brute = _brute(unit, caps)
    assert (got is None) == (brute is None)
    if got is not None:
        # every card within its capacity, every slice held once, in order
        assert all(_bytes(unit, p) <= c for p, c in zip(got, caps))
        for dim in ("heads", "mlp_columns", "vocab"):
            ranges = [getattr(p, dim) for p in got]
            if ranges[0] is not None:
                assert ranges[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_shards_add_up_to_the_unit_and_even_parts_match_the_even_split(units):
    layer = units[1]
    # 4 heads in 2 KV groups over 2 cards: one group each (2 query heads, 1 KV head), 4 columns each
    parts = [ShardParts(heads=(0, 2), kv_heads=(0, 1), mlp_columns=(0, 4)),
             ShardParts(heads=(2, 4), kv_heads=(1, 2), mlp_columns=(4, 8))]
    even = shard_unit(layer, 2, WL).unit
    for p in parts:
        assert shard_unit_parts(layer, p, 2, WL).unit.footprint == even.footprint
    # the split weights add up to the whole; norms (64 fp16 each, two of them) are replicated
    split_weights = sum(shard_unit_parts(layer, p, 2, WL).unit.footprint.weight_bytes for p in parts)
    assert split_weights == layer.footprint.weight_bytes + 2 * 64 * 2


def test_proportional_shares_follow_capacity(units):
    head = units[2]
    caps = (head.total_bytes, head.total_bytes * 3 // 4)
    got = Apportioner(head, lambda p: _bytes(head, p)).apportion(caps)
    assert got is not None and got[0].count("vocab") > got[1].count("vocab")
    assert Apportioner(head, lambda p: _bytes(head, p)).apportion((head.total_bytes // 2,) * 2) is None


def test_shard_parts_round_trip_and_bad_input():
    parts = ShardParts(heads=(2, 4), kv_heads=(1, 2), mlp_columns=(4, 8))
    assert ShardParts.from_dict(parts.to_dict()) == parts
    with pytest.raises(ConfigError, match="non-empty range"):
        ShardParts(vocab=(3, 3))
    with pytest.raises(ConfigError, match="ranges among"):
        ShardParts.from_dict({"rows": [0, 1]})
    with pytest.raises(ConfigError, match="integers"):
        ShardParts.from_dict({"vocab": ["a", 1]})
