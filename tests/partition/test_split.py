import math

import pytest

from cachefit.errors import ConfigError
from cachefit.partition.split import max_shards, shard_unit
from cachefit.profile import profile_model
from cachefit.units import Workload

WL = Workload(batch=1, seq_len=1024, mode="decode")


def _tensor(unit, suffix):
    return next(t for t in unit.tensors if t.name.endswith(suffix))


def test_even_split_of_a_paper_layer_divides_matrices_and_replicates_norms():
    layer = profile_model("paper-16l", WL).unit("layers.0")
    shard = shard_unit(layer, 8, WL)
    roles = dict(shard.unit.footprint.weight_roles)
    # 32 heads over 8 cards: 4 heads each, an eighth of every projection (fp16, 2 bytes)
    assert roles["qkv"] == 3 * 4096 * 512 * 2
    assert roles["attn_out"] == 4096 * 512 * 2
    # MLP 16384 columns over 8: 2048 each, up (2048 x 4096) and down (4096 x 2048)
    assert roles["mlp"] == 2 * 2048 * 4096 * 2
    # the two RMS norms (4096 each) are replicated on every card
    assert roles["norm"] == 2 * 4096 * 2
    assert _tensor(shard.unit, "o_proj.weight").shape == (4096, 512)
    assert _tensor(shard.unit, "up_proj.weight").shape == (2048, 4096)
    assert shard.unit.shape.num_heads == 4 and shard.unit.shape.intermediate_size == 2048
    # the KV cache is split by heads too: 2 x 1024 tokens x 4 heads x 128 x 2 bytes
    assert shard.unit.footprint.persistent_activation_bytes == 2 * 1024 * 4 * 128 * 2
    # two ring all-reduces of the hidden state per token: 2 x 2 (s-1)/s x 4096 x 2 bytes
    assert shard.collective_bytes_per_token == math.ceil(2 * 2 * 7 / 8 * 4096 * 2)
    assert len(shard.collectives) == 2


def test_uneven_split_reports_the_largest_shard():
    layer = profile_model("paper-16l", WL).unit("layers.0")
    shard = shard_unit(layer, 3, WL)
    # 32 heads over 3 cards: the largest shard has 11 heads
    assert shard.unit.shape.num_heads == 11
    assert _tensor(shard.unit, "q_proj.weight").shape == (11 * 128, 4096)
    assert _tensor(shard.unit, "up_proj.weight").shape == (math.ceil(16384 / 3), 4096)
    # three shards hold at least the whole layer (nothing is lost by rounding up)
    assert 3 * shard.unit.footprint.weight_bytes >= layer.footprint.weight_bytes


def test_gqa_with_more_shards_than_kv_heads_replicates_kv():
    layer = profile_model("llama-3.1-8b", WL).unit("layers.0")  # 32 query heads, 8 KV heads
    shard = shard_unit(layer, 16, WL)
    assert shard.unit.shape.num_heads == 2
    assert shard.unit.shape.num_kv_heads == 1  # each card keeps (a copy of) one KV head
    assert _tensor(shard.unit, "k_proj.weight").shape == (128, 4096)
    assert _tensor(shard.unit, "q_proj.weight").shape == (256, 4096)


def test_head_splits_along_the_vocabulary_and_all_gathers_logits():
    head = profile_model("paper-16l", WL).unit("head")
    shard = shard_unit(head, 4, WL)
    assert _tensor(shard.unit, "lm_head.weight").shape == (8000, 4096)
    assert _tensor(shard.unit, "norm.weight").shape == (4096,)
    assert shard.collectives == ("all-gather logits",)
    assert shard.collective_bytes_per_token == math.ceil(3 / 4 * 32000 * 2)


def test_split_limits_and_errors():
    layer = profile_model("paper-16l", WL).unit("layers.0")
    assert max_shards(layer) == 16384
    assert shard_unit(layer, 1, WL).unit is layer
    with pytest.raises(ConfigError, match="at most"):
        shard_unit(layer, 20000, WL)
    with pytest.raises(ConfigError):
        shard_unit(layer, 0, WL)


def test_shards_compress_like_units():
    from cachefit.compress import compress_unit

    layer = profile_model("paper-16l", WL).unit("layers.0")
    shard = shard_unit(layer, 4, WL).unit
    int8 = compress_unit(shard, ["int8"], WL)
    roles = dict(int8.footprint.weight_roles)
    # int8 q/k/v of 8 heads: 3 x (1024 x 4096) bytes
    assert roles["qkv"] == 3 * 1024 * 4096
    # one fp16 scale per output row: q/k/v 3 x 1024, o_proj 4096, up 4096, down 4096
    assert roles["scales"] == (3 * 1024 + 3 * 4096) * 2


def test_uneven_gqa_split_keeps_query_heads_with_their_kv_head():
    layer = profile_model("llama-3.1-8b", WL).unit("layers.0")  # 32 query heads in 8 groups of 4
    shard = shard_unit(layer, 3, WL)
    # 8 KV groups over 3 cards: the largest shard has 3 groups = 12 query heads
    assert (shard.unit.shape.num_heads, shard.unit.shape.num_kv_heads) == (12, 3)
    assert _tensor(shard.unit, "q_proj.weight").shape == (12 * 128, 4096)
    assert _tensor(shard.unit, "o_proj.weight").shape == (4096, 12 * 128)
    assert _tensor(shard.unit, "v_proj.weight").shape == (3 * 128, 4096)


from hypothesis import given, settings, strategies as st  # noqa: E402

from cachefit.profile.hf_config import load_transformer_spec  # noqa: E402
from cachefit.profile.transformer import profile_transformer  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([(8, 8), (8, 4), (8, 2), (8, 1), (12, 4), (6, 3)]), st.integers(1, 24))
def test_any_split_of_a_gqa_layer_covers_the_layer(heads, shards):
    a, g = heads
    cfg = {"model_type": "llama", "hidden_size": 16 * a, "num_attention_heads": a, "num_key_value_heads": g,
           "num_hidden_layers": 1, "intermediate_size": 48, "vocab_size": 64}
    prof = profile_transformer(load_transformer_spec(cfg), WL)
    layer = prof.unit("layers.0")
    if shards > max_shards(layer):
        return
    shard = shard_unit(layer, shards, WL).unit
    sa, sg = shard.shape.num_heads, shard.shape.num_kv_heads
    assert sa % sg == 0 and sa * shards >= a and sg <= g
    # the shards together hold at least the whole layer, and each at most all of it
    assert shards * shard.footprint.weight_bytes >= layer.footprint.weight_bytes
    assert shard.footprint.weight_bytes <= layer.footprint.weight_bytes
