"""llama.cpp flags: ratios sum to 1, and llama.cpp's own placement rule puts every layer where planned."""

import bisect

import numpy as np
import pytest
from conftest import plan_of, profile_of
from hypothesis import given, settings
from hypothesis import strategies as st

from cachefit.export import to_llamacpp
from cachefit.hardware.devices import device_from_capacity, make_cluster
from cachefit.plan.search import plan_partition


def llamacpp_devices(tensor_split, n_layer, n_gpu_layers):
    """Device of each position 0..n_layer (the last is the output layer), as ``llama-model.cpp`` computes
    it in single precision: cumulative ``splits`` normalized by their sum, ``i_gpu_start =
    max(n_layer + 1 - n_gpu_layers, 0)``, ``act_gpu_layers = min(n_gpu_layers, n_layer + 1)`` and
    ``layer_gpu = upper_bound(splits, float(il - i_gpu_start) / act_gpu_layers)``; None is the CPU."""
    f32 = np.float32
    splits, total = [], f32(0)
    for x in tensor_split:
        total = f32(total + f32(x))
        splits.append(total)
    splits = [f32(s / total) for s in splits]
    start = max(n_layer + 1 - n_gpu_layers, 0)
    act = min(n_gpu_layers, n_layer + 1)
    out = []
    for il in range(n_layer + 1):
        if il < start or il - start >= act:
            out.append(None)
        else:
            out.append(bisect.bisect_right(splits, f32(f32(il - start) / f32(act))))
    return out


def _planned(plan, profile):
    """The card of each layer (by its unit) and of the head, from the plan."""
    card_of_unit = {u: s.card for s in plan.stages if s.shard is None or s.shard[0] == 0 for u in range(*s.units)}
    layers = [card_of_unit[i] for i, u in enumerate(profile.units) if u.layer is not None]
    return layers, card_of_unit[len(profile.units) - 1]


@pytest.mark.parametrize("name", ["llama", "gpt2", "llama-tied"])
@pytest.mark.parametrize("num_cards", [1, 2, 3, 4, 5])
def test_llamacpp_places_every_layer_on_its_planned_card(name, num_cards):
    profile = profile_of(name, "layer")
    plan = plan_of(profile, num_cards)
    doc = to_llamacpp(plan, profile).document
    n_layer = 4
    assert doc["n_gpu_layers"] == n_layer + 1 and doc["split_mode"] == "layer"
    assert sum(doc["ratios"]) == pytest.approx(1.0, abs=1e-12)
    assert sum(doc["weight_fractions"]) == pytest.approx(1.0, abs=1e-12)
    assert sum(doc["weight_bytes_per_device"]) == sum(s.footprint.weight_bytes for s in plan.stages)
    devices = llamacpp_devices(doc["tensor_split"], n_layer, doc["n_gpu_layers"])
    layers, head = _planned(plan, profile)
    assert devices[:n_layer] == layers
    assert devices[n_layer] == head == doc["output_device"]
    assert doc["layers_per_device"] == [layers.count(c) for c in range(plan.cards)]


def test_text_is_the_flags_then_comments():
    # llama, 4 layers on 3 cards: [embed, layers.0], [layers.1, layers.2], [layers.3, head]
    profile = profile_of("llama", "layer")
    export = to_llamacpp(plan_of(profile, 3), profile)
    first, *rest = export.text.splitlines()
    assert first == "--split-mode layer --n-gpu-layers 5 --tensor-split 1,2,2"
    assert all(line.startswith("# ") for line in rest)
    assert export.document["layers_per_device"] == [1, 2, 1]
    assert any("input layer (embed" in w for w in export.warnings)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=12).filter(lambda c: sum(c) >= 2))
def test_whole_position_counts_reproduce_the_contiguous_split_exactly(counts):
    """Proportions given as whole position counts put position il on the first device whose cumulative
    count exceeds il, even in float32 arithmetic (the boundaries compare equal values exactly)."""
    n_positions = sum(counts)
    n_layer = n_positions - 1
    devices = llamacpp_devices(counts, n_layer, n_layer + 1)
    expected = [d for d, c in enumerate(counts) for _ in range(c)]
    assert devices == expected


def test_block_plan_cutting_layers_is_warned_and_layers_go_where_most_weight_is():
    profile = profile_of("llama", "block")
    plan = plan_of(profile, 3)  # layer 1 cut: attention on card 0, MLP (the heavier block) on card 1
    export = to_llamacpp(plan, profile)
    assert any("cuts layer(s) 1" in w for w in export.warnings)
    devices = llamacpp_devices(export.document["tensor_split"], 4, 5)
    # the MLP (gate, up, down: 3 x 64 x 128 = 24,576 weights) outweighs attention (q, o: 64 x 64; k, v: 64 x 32;
    # 12,288 weights)
    assert devices[1] == 1


def test_tensor_parallel_cards_get_nothing():
    profile = profile_of("llama", "layer")
    plan, _ = plan_partition(profile, make_cluster(device_from_capacity("60KB")))
    export = to_llamacpp(plan, profile)
    secondary = {s.card for s in plan.stages if s.shard and s.shard[0] > 0}
    assert secondary and all(export.document["tensor_split"][c] == 0 for c in secondary)
    assert any("tensor-parallel" in w for w in export.warnings)
