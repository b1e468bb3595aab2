"""Roofline cost of one stage: tiny worked cases with the hand calculation in comments.

The toy device has round figures so every number can be checked by hand: on-chip level 1,000 B at
1,000 B/s, off-chip 100 B/s, 1,000 FLOP/s in fp16, links 200 B/s both ways (100 B/s one way), 5 us
per chip-to-chip message, and no per-kernel cost (0 s, declared) unless a test gives one.
"""

import pytest

from cachefit.cost.roofline import estimate_stage
from cachefit.errors import ConfigError
from cachefit.hardware.devices import DeviceSpec, MemoryLevel
from cachefit.partition.split import shard_unit
from cachefit.profile import profile_model
from cachefit.units import Footprint, LayerShape, Unit, Workload


HOP_S = 5e-6
"""The toy device's latency of one chip-to-chip message."""


def toy_device(*, offchip: bool = True, onchip_bw: float | None = 1000.0, flops: bool = True) -> DeviceSpec:
    return DeviceSpec(
        name="toy",
        levels=(MemoryLevel(name="sram", capacity_bytes=1000, bandwidth_bytes_per_s=onchip_bw, source="test"),),
        default_level="sram",
        offchip_capacity_bytes=10**6 if offchip else None,
        offchip_bandwidth_bytes_per_s=100.0 if offchip else None,
        peak_flops_per_s=(("fp16", 1000.0),) if flops else (),
        link_bandwidth_bytes_per_s=200.0,
        kernel_overhead_s=0.0,
        hop_latency_s=HOP_S,
    )


def unit(weight: int, activation: int, persistent: int = 0, flops: int = 50, name: str = "u") -> Unit:
    return Unit(
        name=name,
        kind="layer",
        footprint=Footprint(weight_bytes=weight, activation_bytes=activation, persistent_activation_bytes=persistent),
        params=weight // 2,
        flops_per_token=flops,
    )


def stage_cost(u: Unit, *, capacity: int = 1000, device: DeviceSpec | None = None, workload: Workload | None = None,
               tokens: int = 2, **kw):
    fp = u.footprint
    return estimate_stage(
        card=0, pipeline_stage=0, device=device or toy_device(), level="sram", units=(0, 1), shard=None,
        weight_bytes=fp.weight_bytes, activation_bytes=fp.activation_bytes,
        persistent_activation_bytes=fp.persistent_activation_bytes, buffer_bytes=fp.buffer_bytes,
        capacity_bytes=capacity, stage_units=(u,), workload=workload or Workload(mode="prefill", seq_len=2),
        tokens_per_micro_batch=tokens, **kw,
    )


def test_stage_that_fits_reads_weights_on_chip_and_loads_them_once():
    # 600 B weights + 100 B scratch <= 1,000 B: nothing streamed.
    cost = stage_cost(unit(600, 100))
    assert cost.fits and cost.possible
    assert cost.streamed_weight_bytes == 0 and cost.resident_weight_bytes == 600
    # compute: 2 tokens x 50 FLOP = 100 FLOP / 1,000 FLOP/s = 0.1 s
    assert cost.compute_s == pytest.approx(0.1)
    # on-chip: weights 600 + scratch written and read 2 x 100 = 800 B / 1,000 B/s = 0.8 s
    assert cost.onchip_bytes_per_micro_batch == 800
    assert cost.onchip_s == pytest.approx(0.8)
    # resident weights are a one-time load by default: no off-chip traffic per micro-batch
    assert cost.offchip_bytes_per_micro_batch == 0 and cost.offchip_s == 0
    assert cost.load_bytes == 600
    assert cost.time_s == pytest.approx(0.8) and cost.bound == "on-chip"


def test_stage_that_fits_with_a_load_every_step_reads_weights_once_per_step():
    # steps_per_load=1, 2 micro-batches: the 600 B load is split over the step's micro-batches,
    # 300 B each; per step 2 x 300 = 600 B = the weights, once.
    cost = stage_cost(unit(600, 100), steps_per_load=1, micro_batches=2)
    assert cost.offchip_bytes_per_micro_batch == 300
    assert 2 * cost.offchip_bytes_per_micro_batch == 600
    # 300 B / 100 B/s = 3 s > on-chip 0.8 s: the load dominates
    assert cost.offchip_s == pytest.approx(3.0)
    assert cost.time_s == pytest.approx(3.0) and cost.bound == "off-chip"


def test_stage_that_misses_streams_every_weight_each_micro_batch():
    # 3,000 B weights + 100 B scratch on a card offering 100 B: overflow 3,000 B >= the weights,
    # so all 3,000 B stream from DRAM and the scratch stays on-chip.
    cost = stage_cost(unit(3000, 100), capacity=100)
    assert not cost.fits
    assert cost.streamed_weight_bytes == 3000 and cost.resident_weight_bytes == 0
    assert cost.spilled_activation_bytes == 0
    assert cost.offchip_bytes_per_micro_batch == 3000
    assert cost.offchip_s == pytest.approx(30.0)  # 3,000 B / 100 B/s
    assert cost.onchip_bytes_per_micro_batch == 200  # the scratch: 2 x 100 B
    assert cost.time_s == pytest.approx(30.0) and cost.bound == "off-chip"


def test_partial_fit_streams_only_the_overflow():
    # 1,500 + 100 = 1,600 B on 1,000 B: overflow 600 B streamed, 900 B of weights stay on-chip.
    cost = stage_cost(unit(1500, 100))
    assert cost.streamed_weight_bytes == 600 and cost.resident_weight_bytes == 900
    assert cost.offchip_bytes_per_micro_batch == 600
    assert cost.offchip_s == pytest.approx(6.0)  # 600 / 100
    assert cost.onchip_bytes_per_micro_batch == 900 + 200
    assert cost.onchip_s == pytest.approx(1.1)
    assert cost.load_bytes == 900
    assert cost.time_s == pytest.approx(6.0)


def test_decode_kv_cache_is_read_each_token_and_spills_after_the_weights():
    wl = Workload(mode="decode", seq_len=8, batch=1)
    # weights 100, activations 500 of which 400 KV cache; capacity 300: overflow 300 B takes all
    # 100 B of weights, then 200 B of the KV cache.
    cost = stage_cost(unit(100, 500, persistent=400, flops=0), capacity=300, workload=wl, tokens=1)
    assert cost.streamed_weight_bytes == 100
    assert cost.spilled_activation_bytes == 200
    # off-chip: weights 100 + spilled KV read 200 = 300 B; on-chip: KV 200 + scratch 2 x 100 = 400 B
    assert cost.offchip_bytes_per_micro_batch == 300
    assert cost.onchip_bytes_per_micro_batch == 400
    assert cost.time_s == pytest.approx(3.0)  # 300 B / 100 B/s


def test_train_counts_three_times_the_flops_and_reads_weights_twice():
    wl = Workload(mode="train", seq_len=2)
    cost = stage_cost(unit(600, 100, persistent=50), workload=wl)
    # FLOPs: 3 x 2 tokens x 50 = 300 -> 0.3 s
    assert cost.flops_per_micro_batch == 300
    # on-chip: weights 2 x 600 + saved 2 x 50 + scratch 2 x 2 x (100 - 50) = 1,200 + 100 + 200
    assert cost.onchip_bytes_per_micro_batch == 1500


def test_split_stage_pays_its_collectives_over_one_link_direction():
    # 1,000 B per token x 2 tokens = 2,000 B over 100 B/s (half of 200 B/s) = 20 s, plus 4 message
    # steps of the device's hop latency.
    cost = stage_cost(unit(600, 100), collective_bytes_per_token=1000, collective_latency_steps=4)
    assert cost.collective_bytes_per_micro_batch == 2000
    assert cost.collective_s == pytest.approx(20.0 + 4 * HOP_S)
    assert cost.time_s == pytest.approx(0.8 + 20.0 + 4 * HOP_S)
    assert cost.bound == "collectives"


def test_real_two_way_shard_of_a_paper_layer_has_two_all_reduces_per_token():
    wl = Workload(mode="decode", seq_len=1024)
    layer = profile_model("paper-16l", wl).unit("layers.0")
    shard = shard_unit(layer, 2, wl)
    # two ring all-reduces of the hidden state: 2 x 2 (s-1)/s x 4096 x 2 B = 16,384 B per token
    assert shard.collective_bytes_per_token == 16_384
    fp = shard.unit.footprint
    cost = estimate_stage(
        card=0, pipeline_stage=0, device=toy_device(), level="sram", units=(1, 2), shard=(0, 2),
        weight_bytes=fp.weight_bytes, activation_bytes=fp.activation_bytes,
        persistent_activation_bytes=fp.persistent_activation_bytes, buffer_bytes=fp.buffer_bytes,
        capacity_bytes=10**10, stage_units=(shard.unit,), workload=wl, tokens_per_micro_batch=1,
        collective_bytes_per_token=shard.collective_bytes_per_token, collective_latency_steps=4,
    )
    assert cost.collective_bytes_per_micro_batch == 16_384
    assert cost.collective_s == pytest.approx(16_384 / 100 + 4 * HOP_S)
    # half the heads and MLP columns: the shard's FLOPs are about half the layer's
    assert cost.flops_per_micro_batch == shard.unit.flops_per_token
    assert abs(shard.unit.flops_per_token / layer.flops_per_token - 0.5) < 0.01


def test_embedding_reads_only_its_rows_and_is_streamed_first():
    shape = LayerShape(part="embedding", hidden_size=4, vocab_size=100)
    emb = Unit(name="embed", kind="embedding", footprint=Footprint(weight_bytes=800, activation_bytes=8),
               params=400, flops_per_token=0, shape=shape)
    # 2 tokens of a 100-row table: 2/100 of 800 B = 16 B read per micro-batch
    cost = stage_cost(emb, capacity=1000)
    assert cost.onchip_bytes_per_micro_batch == 16 + 2 * 8
    # capacity 408 B: overflow 400 B comes out of the table: half its rows off-chip, 8 B of reads
    cost = stage_cost(emb, capacity=408)
    assert cost.streamed_weight_bytes == 400
    assert cost.offchip_bytes_per_micro_batch == 8


def test_sram_only_card_cannot_run_a_stage_that_does_not_fit():
    cost = stage_cost(unit(1500, 100), device=toy_device(offchip=False))
    assert not cost.possible and cost.time_s is None and cost.bound == "impossible"
    assert any("no off-chip memory" in n for n in cost.notes)
    # but a stage that fits runs
    assert stage_cost(unit(600, 100), device=toy_device(offchip=False)).time_s == pytest.approx(0.8)


def test_a_time_that_needs_an_unknown_figure_is_unknown_and_names_it():
    # no on-chip bandwidth: at the off-chip rate its 800 B would take 8 s, more than the 0.1 s of
    # compute, so the time depends on it: unknown, and the figure is named
    cost = stage_cost(unit(600, 100), device=toy_device(onchip_bw=None))
    assert cost.onchip_s is None and cost.time_s is None and cost.bound == "unknown"
    assert cost.missing == ("toy levels.sram.bandwidth",)
    # no fp16 peak: compute time unknown, and so the stage's (never the largest known term)
    cost = stage_cost(unit(600, 100), device=toy_device(flops=False))
    assert cost.compute_s is None and cost.time_s is None
    assert cost.missing == ("toy peak_flops.fp16",)
    assert cost.to_dict()["missing"] == ["toy peak_flops.fp16"]


def test_an_unknown_onchip_bandwidth_is_settled_where_offchip_traffic_dominates():
    # 3,000 B of weights on 1,000 B of capacity: 2,000 B streamed at 100 B/s = 20 s; the 1,000 B read
    # on-chip would take at most 10 s at the off-chip rate (an on-chip level is no slower), so the
    # time is 20 s whatever the on-chip bandwidth, and a note says why
    cost = stage_cost(unit(3000, 0, flops=0), device=toy_device(onchip_bw=None))
    assert cost.offchip_s == pytest.approx(20.0) and cost.onchip_s is None
    assert cost.time_s == pytest.approx(20.0) and not cost.missing
    assert any("does not depend on it" in n for n in cost.notes)


def test_collectives_need_the_hop_latency_and_the_link_bandwidth():
    import dataclasses

    no_hop = dataclasses.replace(toy_device(), hop_latency_s=None)
    cost = stage_cost(unit(600, 100), device=no_hop, collective_bytes_per_token=1000, collective_latency_steps=4)
    assert cost.collective_s is None and cost.time_s is None and cost.missing == ("toy hop_latency",)
    # a latency given for every device (an assumption the caller owns) stands in: 20 s + 4 x 1 us
    given = stage_cost(unit(600, 100), device=no_hop, collective_bytes_per_token=1000, collective_latency_steps=4,
                       link_latency_s=1e-6)
    assert given.collective_s == pytest.approx(20.0 + 4e-6)
    no_link = dataclasses.replace(toy_device(), link_bandwidth_bytes_per_s=None)
    cost = stage_cost(unit(600, 100), device=no_link, collective_bytes_per_token=1000, collective_latency_steps=4)
    assert cost.time_s is None and cost.missing == ("toy link_bandwidth",)


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="steps_per_load"):
        stage_cost(unit(600, 100), steps_per_load=0)
    with pytest.raises(ConfigError, match="latency"):
        stage_cost(unit(600, 100), link_latency_s=-1.0)


# ------------------------------------------------------------------------------------------------
# The per-kernel overhead


def mlp_unit() -> Unit:
    """A non-gated MLP block: LayerNorm, up, GELU, down, residual add = 5 kernels per forward."""
    shape = LayerShape(part="mlp", hidden_size=8, intermediate_size=32)
    return Unit(name="mlp", kind="mlp", footprint=Footprint(weight_bytes=600, activation_bytes=100), params=300,
                flops_per_token=50, shape=shape)


def with_overhead(seconds: float | None) -> DeviceSpec:
    import dataclasses

    return dataclasses.replace(toy_device(), kernel_overhead_s=seconds)


def test_kernel_overhead_adds_to_the_roofline():
    # The roofline of the fitting case above: on-chip 600 + 2 x 100 = 800 B / 1,000 B/s = 0.8 s.
    # 5 kernels x 0.1 s = 0.5 s added after it (one stream: the kernels run one after another):
    # 0.8 + 0.5 = 1.3 s, still on-chip bound.
    cost = stage_cost(mlp_unit(), device=with_overhead(0.1))
    assert cost.kernels_per_micro_batch == 5
    assert cost.onchip_s == pytest.approx(0.8) and cost.kernel_s == pytest.approx(0.5)
    assert cost.time_s == pytest.approx(1.3) and cost.bound == "on-chip"
    assert cost.to_dict()["kernel_s"] == pytest.approx(0.5) and cost.to_dict()["kernels_per_micro_batch"] == 5
    # 5 x 0.2 s = 1.0 s > 0.8 s: launch-bound, 1.8 s
    slow = stage_cost(mlp_unit(), device=with_overhead(0.2))
    assert slow.time_s == pytest.approx(1.8) and slow.bound == "kernels"


def test_without_the_figure_a_stage_that_launches_kernels_has_no_time():
    cost = stage_cost(mlp_unit(), device=with_overhead(None))
    assert cost.kernels_per_micro_batch == 5 and cost.kernel_s is None
    assert cost.time_s is None and cost.bound == "unknown"
    assert cost.missing == ("toy kernel_overhead",)
    # an explicit 0 (e.g. CUDA graphs) turns the term off without a note; a value overrides the device's
    off = stage_cost(mlp_unit(), device=with_overhead(0.1), kernel_overhead_s=0.0)
    assert off.time_s == pytest.approx(0.8) and off.kernel_s == 0 and not off.notes
    assert stage_cost(mlp_unit(), device=with_overhead(None), kernel_overhead_s=0.1).time_s == pytest.approx(1.3)
    with pytest.raises(ConfigError, match="kernel overhead"):
        stage_cost(mlp_unit(), kernel_overhead_s=-1.0)


def test_a_compiled_device_pays_per_layer_not_per_kernel():
    import dataclasses

    # a per-layer latency of 0.3 s replaces the kernels: the MLP block is half a layer, 0.15 s on top
    # of the 0.8 s roofline; the device needs no per-kernel figure
    dataflow = dataclasses.replace(toy_device(), kernel_overhead_s=None, layer_latency_s=0.3)
    cost = stage_cost(mlp_unit(), device=dataflow)
    assert cost.layer_s == pytest.approx(0.15) and cost.kernel_s == 0 and not cost.missing
    assert cost.time_s == pytest.approx(0.95) and cost.bound == "on-chip"
    # a whole layer of 1 s: 1.8 s, bound by its layers
    shape = LayerShape(part="layer", hidden_size=8, intermediate_size=32)
    layer = Unit(name="l", kind="layer", footprint=Footprint(weight_bytes=600, activation_bytes=100), params=300,
                 flops_per_token=50, shape=shape)
    slow = stage_cost(layer, device=dataclasses.replace(dataflow, layer_latency_s=1.0))
    assert slow.layer_s == pytest.approx(1.0) and slow.time_s == pytest.approx(1.8) and slow.bound == "layers"


def test_kernel_overhead_in_train_and_for_units_without_a_shape():
    # train: 3 x 5 = 15 kernels x 0.1 s = 1.5 s on top of the roofline
    wl = Workload(mode="train", seq_len=2)
    plain = stage_cost(mlp_unit(), workload=wl)  # the toy device's per-kernel cost is 0
    cost = stage_cost(mlp_unit(), workload=wl, device=with_overhead(0.1))
    assert cost.kernels_per_micro_batch == 15
    assert cost.time_s == pytest.approx(plain.time_s + 1.5)
    # a unit without a shape (a live-module profile) counts no kernels, and the note says so
    shapeless = stage_cost(unit(600, 100), device=with_overhead(0.1))
    assert shapeless.kernels_per_micro_batch == 0 and shapeless.time_s == pytest.approx(0.8)
    assert any("without a transformer shape" in n for n in shapeless.notes)


def test_kernel_overhead_on_a_catalog_gpu():
    # paper-16l layer 0 on an H200, decode at batch 1: 20 kernels (see tests/cost/test_kernels.py)
    # x 2.4 us = 48 us on top of the roofline term.
    from cachefit.hardware import get_device

    profile = profile_model("paper-16l")
    u = profile.unit("layers.0")
    h200 = get_device("h200")
    fp = u.footprint
    cost = estimate_stage(
        card=0, pipeline_stage=0, device=h200, level="l2", units=(1, 2), shard=None,
        weight_bytes=fp.weight_bytes, activation_bytes=fp.activation_bytes,
        persistent_activation_bytes=fp.persistent_activation_bytes, buffer_bytes=fp.buffer_bytes,
        capacity_bytes=h200.capacity_bytes("l2"), stage_units=(u,), workload=profile.workload,
        tokens_per_micro_batch=1,
    )
    roof = max(cost.compute_s, cost.onchip_s, cost.offchip_s)
    assert cost.kernels_per_micro_batch == 20 and cost.kernel_s == pytest.approx(48e-6)
    assert cost.time_s == pytest.approx(roof + 48e-6)
