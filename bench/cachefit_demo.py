"""Cache-fit demonstration on this CPU: batch-1 decode of a model whose fp32 weights exceed the cache a
core keeps but whose INT8 partitions fit it, against the same partitions uncompressed.

Not a test. Steps:

1. Probe this CPU 3 times (``cachefit.hardware.probe``: the GEMV bandwidth sweep, one thread) and keep
   the probe with the median L3 (one core's share of the L3 moves with other load, from probe to
   probe), or read a device file written earlier by ``cachefit probe --out``. A "card" is one core with
   the share of the L3 the probe measured for it.
2. Size a Llama-like ``LlamaForCausalLM`` from the probe: hidden 1,024, 4 layers, grouped-query
   attention with 4 KV heads, a 512-word vocabulary (so that the embedding and the LM head, which INT8
   leaves in fp32, stay small), and the widest MLP (a multiple of 128, at most 4,096) for which
   cachefit's INT8 plan on 2 cards fills at most 75% of the probed cache: the usable L3 of this machine
   moves with other load, so the plan keeps a quarter free. Build it with random weights (178 MB in
   fp32 for a probed 32 MiB) and save it with safetensors.
3. Plan it with cachefit on 2 of these cards for batch-1 decode with a 64-position KV cache:
   uncompressed it has no plan (each layer alone is larger than the probed cache); with ``--allow int8``
   each card holds two layers in INT8 and fits. The uncompressed layout with the same cuts (about 2.7
   times the cache a card) is the baseline.
4. Build the stages as ``cachefit run`` builds them (``cachefit.deploy.stages.build_stage``: the model
   pruned to the stage, INT8 by ``compress_module_``, bytes checked against the plan), and time one
   decode step of each stage on one token with its own KV cache (``DynamicCache``, 63 random past
   positions; the step's new position is dropped again after each call) on one thread:

   * ``fp32``: the uncompressed stage, looped (larger than the cache: mostly streamed from DRAM);
   * ``int8``: the INT8 stage, with the activation entering each ``Int8WeightOnlyLinear`` cast to bf16
     (and its output back to fp32): aten's ``_weight_int8pack_mm`` has a vectorized kernel for bf16
     activations only; stored bytes are the same (the per-row scales are kept as bf16 instead of fp16);
   * ``int8-cold``: the same INT8 stage, but each call uses another of several copies whose total is
     twice the L3 the OS reports, so its weights come from DRAM: what INT8 gains by reading fewer
     bytes, without the cache fit;
   * ``fp32-cold``: the same for the fp32 stage (does the fp32 stage already miss the cache?);
   * ``int8-fp32act``: the INT8 stage exactly as ``cachefit run`` deploys it, with fp32 activations
     (since the follow-up in docs/benchmarks.md, cast to bf16 inside the module when in_features % 16 == 0)
     (``_weight_int8pack_mm`` then runs a scalar loop);
   * ``floor``: the same decode step on a 64-wide model of the same structure (0.2 MB): the framework's
     fixed cost per step (dispatch, rotary tables, cache update), which no byte or FLOP count sees.

   Two modes, on two worker processes pinned to the two cores: *solo* (one stage runs, the other core
   is idle: a card with its own cache) and *pair* (both stages run at once, one per core: two cards that
   share this machine's L3 and DRAM). Blocks of ``--block-s`` seconds of one (mode, stage,
   configuration) run in a fresh random order every round, so that drift in the machine's load falls
   on every configuration alike; each block starts with two untimed calls.
5. Predict the same with cachefit's cost model (``cachefit.cost.estimate_stage``, the roofline) on the
   probed device: the INT8 stage in L3, the fp32 stage and the cold INT8 stage streamed from DRAM,
   and the fp32 stage as the planner's partial fit sees it (as much as fits kept in L3, the rest
   streamed).

    python bench/cachefit_demo.py                                  # 3 probes, then about 3 minutes
    python bench/cachefit_demo.py --device cpu.json --quick        # a probe file; fewer rounds
    python bench/cachefit_demo.py --markdown docs/benchmarks.md    # rewrite the section
    python bench/cachefit_demo.py --render out/results.json --markdown docs/benchmarks.md  # no measuring

Time per token is the sum of the two stages' step times: one sequence decoding through a two-card
pipeline, without the transfer of the 4 KB hidden state between the cards (the same for every
configuration; over gloo on this CPU about a millisecond, see docs/benchmarks.md's pipeline section).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SECTION_START = "<!-- cachefit-demo:start -->"
SECTION_END = "<!-- cachefit-demo:end -->"
SECTION_TITLE = "## INT8 cache fit on this CPU (`bench/cachefit_demo.py`)"

log = logging.getLogger("cachefit_demo")


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int


# The model is sized from the probe (``size_model``): hidden 1,024, 4 layers, 16 heads with 4 KV heads,
# a 512-word vocabulary, and the widest MLP (a multiple of 128, at most 4,096) for which cachefit's INT8
# plan on 2 cards fills at most TARGET_UTILIZATION of the probed cache. fp32 bytes of one layer:
# (q, o: 2 h^2; k, v: 2 h (h / 4); gate, up, down: 3 h i) x 4 B + 2 norms x h x 4 B; with i = 2,560:
#   (2 * 1024^2 + 2 * 1024 * 256 + 3 * 1024 * 2560) * 4 + 2 * 1024 * 4 = 41,951,232 B (42.0 MB);
# INT8: 1 B per matrix weight + a 2-byte scale per output row (1024 + 256 + 256 + 1024 + 2 * 2560 + 1024
# rows) + the fp32 norms: 10,485,760 + 17,408 + 8,192 = 10,511,360 B. A card of two layers plus the
# embedding or the LM head (512 x 1024 x 4 B = 2.1 MB, left fp32) then holds 87 MB in fp32, 24 MB in INT8:
# the fp32 card holds about 3.6 times the INT8 one (4 x its matrices, the same fp32 tables): an INT8 card
# at 75% of the cache is an fp32 card at about 2.7 times the cache.
BASE = ModelShape(hidden=1024, intermediate=2560, layers=4, heads=16, kv_heads=4, vocab=512)
MLP_WIDTHS = range(4096, 511, -128)
TARGET_UTILIZATION = 0.75
"""Largest share of the probed cache an INT8 card may fill: one core's usable share of this machine's L3
moves with other load (probes minutes apart found 16 to 76 MiB), so the plan keeps a quarter of it free."""
# the same structure, 64 wide: 0.2 MB of weights, for the framework's fixed cost per decode step
FLOOR = ModelShape(hidden=64, intermediate=160, layers=4, heads=4, kv_heads=1, vocab=512)
CONTEXT = 64
"""KV-cache positions of the decode workload: 63 cached, the step's token the 64th."""
CARDS = 2
CONFIGS = ("fp32", "fp32-cold", "int8", "int8-cold", "int8-fp32act", "floor")
COLD_FACTOR = 2
"""Cold configurations cycle over copies whose bytes total this many times the L3 the OS reports."""


# ---- model, plans and predictions (parent process) -----------------------------------------------


def llama_config(shape: ModelShape):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=4 * CONTEXT, tie_word_embeddings=False,
    )


def save_model(shape: ModelShape, path: Path, seed: int = 0) -> None:
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.no_grad():
        model = LlamaForCausalLM(llama_config(shape))
    model.save_pretrained(path, safe_serialization=True)


def demo_workload():
    from cachefit.units import Workload

    # batch-1 decode: one new token against a KV cache of CONTEXT positions, fp32 weights and activations
    return Workload(batch=1, seq_len=CONTEXT, mode="decode", weight_dtype="fp32", act_dtype="fp32")


def size_model(device: Any, work: Path) -> ModelShape:
    """The widest MLP of :data:`MLP_WIDTHS` whose INT8 plan on :data:`CARDS` cards of ``device`` fills
    at most :data:`TARGET_UTILIZATION` of each card (cachefit's own plan decides, from ``config.json``)."""
    import dataclasses

    from cachefit.errors import InfeasiblePlanError
    from cachefit.hardware.devices import make_cluster
    from cachefit.plan.search import plan_partition
    from cachefit.profile import profile_model

    cluster = make_cluster(device)
    for width in MLP_WIDTHS:
        shape = dataclasses.replace(BASE, intermediate=width)
        path = work / f"config-{width}"
        llama_config(shape).save_pretrained(path)
        profile = profile_model(path / "config.json", demo_workload())
        try:
            plan, _ = plan_partition(profile, cluster, num_cards=CARDS, allow=("int8",))
        except InfeasiblePlanError:
            continue
        if not all(s.compression for s in plan.stages):
            raise SystemExit(f"the probed {device.default_level} holds the uncompressed cards of a model with MLP "
                             f"{width}: it is too large for this demonstration (pass a device file with less)")
        if max(s.utilization for s in plan.stages) <= TARGET_UTILIZATION:
            return shape
    cap = device.level(device.default_level).total_bytes
    raise SystemExit(f"no MLP width down to {MLP_WIDTHS[-1]} gives INT8 cards within {TARGET_UTILIZATION:.0%} of "
                     f"the probed {device.default_level} ({cap:,} B); the probe found too little cache: run again")


def make_plans(model_dir: Path, device: Any) -> dict[str, Any]:
    """The INT8 plan on the probed cards, the fp32 verdict there, and fp32 with the INT8 plan's cuts."""
    from cachefit.errors import InfeasiblePlanError
    from cachefit.hardware.devices import device_from_capacity, make_cluster
    from cachefit.plan.search import plan_partition
    from cachefit.profile import profile_model

    profile = profile_model(model_dir, demo_workload())
    cluster = make_cluster(device)
    try:
        plan_partition(profile, cluster, num_cards=CARDS)
        fp32_verdict = "fits"
    except InfeasiblePlanError as exc:
        fp32_verdict = str(exc).splitlines()[0]
    plan8, _ = plan_partition(profile, cluster, num_cards=CARDS, allow=("int8",))
    # The baseline: the same cuts, uncompressed, on cards as large as DRAM (it does not fit the cache)
    big = sum(u.total_bytes for u in profile.units) + 1
    plan32, _ = plan_partition(profile, make_cluster(device_from_capacity(big, level="dram", base=device)),
                               num_cards=CARDS)
    if [s.units for s in plan32.stages] != [s.units for s in plan8.stages]:
        raise SystemExit(f"the fp32 plan cut the model at {[s.units for s in plan32.stages]}, the INT8 plan at "
                         f"{[s.units for s in plan8.stages]}; this benchmark needs the same cuts")
    return {"profile": profile, "plan8": plan8, "plan32": plan32, "fp32_verdict": fp32_verdict}


def _stage_cost(device: Any, profile: Any, stage: Any, *, level: str, compressed: bool):
    from cachefit.compress.techniques import compress_unit
    from cachefit.cost import estimate_stage
    from cachefit.units import stack_footprints

    start, end = stage.units
    units = list(profile.units[start:end])
    if compressed:
        units = [compress_unit(u, tuple(t), profile.workload) if t else u
                 for u, t in zip(units, stage.unit_compression or [()] * len(units))]
    fp = stack_footprints([u.footprint for u in units])
    return estimate_stage(
        card=stage.card, pipeline_stage=stage.card, device=device, level=level, units=stage.units, shard=None,
        weight_bytes=fp.weight_bytes, activation_bytes=fp.activation_bytes,
        persistent_activation_bytes=fp.persistent_activation_bytes, buffer_bytes=fp.buffer_bytes,
        capacity_bytes=device.level(level).total_bytes, stage_units=tuple(units), workload=profile.workload,
        tokens_per_micro_batch=profile.workload.batch,
    ), fp


def predict(plans: dict[str, Any], device: Any) -> list[dict[str, Any]]:
    """Per stage: the cost model's time of each configuration, and the bytes it reads per token."""
    plan8, profile = plans["plan8"], plans["profile"]
    plan_level = device.default_level
    offchip = device.levels[-1].name
    out = []
    for stage in plan8.stages:
        int8_fit, fp8 = _stage_cost(device, profile, stage, level=plan_level, compressed=True)
        int8_dram, _ = _stage_cost(device, profile, stage, level=offchip, compressed=True)
        fp32_dram, fp32 = _stage_cost(device, profile, stage, level=offchip, compressed=False)
        fp32_partial, _ = _stage_cost(device, profile, stage, level=plan_level, compressed=False)

        def read(cost) -> int:
            return cost.onchip_bytes_per_micro_batch + cost.offchip_bytes_per_micro_batch

        out.append({
            "card": stage.card,
            "units": list(stage.unit_names),
            "capacity_bytes": device.level(plan_level).total_bytes,
            "int8_total_bytes": fp8.total_bytes,
            "fp32_total_bytes": fp32.total_bytes,
            "int8_fits": int8_fit.fits,
            "fp32_fits": fp32_partial.fits,
            "int8_read_bytes": read(int8_fit),
            "fp32_read_bytes": read(fp32_dram),
            "predicted_s": {
                "int8": int8_fit.time_s,
                "int8-cold": int8_dram.time_s,
                "int8-fp32act": int8_fit.time_s,
                "fp32": fp32_dram.time_s,
                "fp32-cold": fp32_dram.time_s,
                "fp32-partial": fp32_partial.time_s,
            },
            "bounds": {"int8": int8_fit.bound, "int8-cold": int8_dram.bound, "fp32": fp32_dram.bound,
                       "fp32-partial": fp32_partial.bound},
        })
    return out


# ---- stage modules and the decode step (worker processes) ----------------------------------------


def _to_bf16(module, args):
    import torch

    return (args[0].to(torch.bfloat16), *args[1:])


def _to_fp32(module, args, output):
    import torch

    return output.to(torch.float32)


def run_int8_gemv_in_bf16_(root) -> int:
    """Feed every ``Int8WeightOnlyLinear`` of ``root`` bf16 activations (aten's vectorized int8 kernel)
    and hand fp32 back; the per-row scales are stored as bf16 (2 bytes, as the fp16 the plan counts).
    Returns the number of modules changed."""
    import torch

    from cachefit.compress.apply import Int8WeightOnlyLinear

    n = 0
    for module in root.modules():
        if isinstance(module, Int8WeightOnlyLinear):
            module.weight_scale = module.weight_scale.to(torch.bfloat16)
            module.register_forward_pre_hook(_to_bf16)
            module.register_forward_hook(_to_fp32)
            n += 1
    return n


class DecodeStep:
    """One decode step of a pipeline stage: the units of ``unit_names`` of ``root`` (a pruned
    ``LlamaForCausalLM``) on one token at position ``CONTEXT - 1``, with its own KV cache."""

    def __init__(self, root, unit_names, *, seed: int = 0) -> None:
        import torch
        from transformers import DynamicCache

        self.root = root
        self.unit_names = tuple(unit_names)
        config = root.config
        self.position = torch.tensor([[CONTEXT - 1]])
        self.cache = DynamicCache(config=config)
        head_dim = config.hidden_size // config.num_attention_heads
        gen = torch.Generator().manual_seed(seed)
        for name in self.unit_names:
            if name.startswith("layers."):
                i = int(name.split(".")[1])
                # 63 past positions of random keys and values (the same for every variant of a stage)
                k = torch.randn(1, config.num_key_value_heads, CONTEXT - 1, head_dim, generator=gen)
                v = torch.randn(1, config.num_key_value_heads, CONTEXT - 1, head_dim, generator=gen)
                self.cache.update(k, v, i)
        self.first = self.unit_names[0] == "embed"
        if self.first:
            self.x = torch.tensor([[1]])
        else:
            self.x = torch.randn(1, 1, config.hidden_size, generator=gen)

    def __call__(self, x=None):
        root = self.root
        h = self.x if x is None else x
        pe = None
        for name in self.unit_names:
            if name == "embed":
                h = root.model.embed_tokens(h)
            elif name == "head":
                h = root.lm_head(root.model.norm(h))
            else:
                if pe is None:
                    pe = root.model.rotary_emb(h, self.position)
                layer = root.model.layers[int(name.split(".")[1])]
                h = layer(h, position_embeddings=pe, position_ids=self.position, cache=self.cache, use_cache=True)
        return h

    def reset(self) -> None:
        """Drop the position the last call appended, so every call sees the same cache."""
        self.cache.crop(-1)


class Variant:
    """A configuration of one stage: one module (hot), or several copies used in turn (cold)."""

    def __init__(self, steps: list[DecodeStep]) -> None:
        self.steps = steps
        self.k = 0

    def call(self) -> float:
        step = self.steps[self.k % len(self.steps)]
        self.k += 1
        t0 = time.perf_counter()
        step()
        dt = time.perf_counter() - t0
        step.reset()
        return dt


def _rel_error(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def build_variants(model_dir: str, plan_docs: dict[str, Any], stage_idx: int, cold_bytes: int,
                   floor_dir: str) -> tuple[dict[str, Variant], dict[str, Any]]:
    """Every configuration of stage ``stage_idx``, built as ``cachefit run`` builds stages."""
    from cachefit.deploy.models import inspect_model_dir, load_model
    from cachefit.deploy.stages import build_stage, compressed_weight_bytes, layout_from_plan, stage_weight_bytes
    from cachefit.plan import Plan

    source = inspect_model_dir(model_dir)
    info: dict[str, Any] = {}
    stages = {}
    for key in ("plan32", "plan8"):
        layout = layout_from_plan(Plan.from_dict(plan_docs[key]), source)
        placement = layout.stages[stage_idx]
        stage = build_stage(layout, placement, source, dtype="fp32")
        stages[key] = stage
        held = compressed_weight_bytes(stage, "fp32") if placement.compressed \
            else stage_weight_bytes(stage, "fp32")["allocated"]
        info[key] = {"planned_weight_bytes": placement.planned_weight_bytes, "held_weight_bytes": held}
    names = stages["plan8"].placement.unit_names
    fp32_root = stages["plan32"].model
    int8_root = stages["plan8"].model  # as cachefit run deploys it: fp32 activations
    int8_bf16_root = copy.deepcopy(int8_root)
    info["int8_modules"] = run_int8_gemv_in_bf16_(int8_bf16_root)
    seed = 1000 + stage_idx
    variants = {
        "fp32": Variant([DecodeStep(fp32_root, names, seed=seed)]),
        "int8": Variant([DecodeStep(int8_bf16_root, names, seed=seed)]),
        "int8-fp32act": Variant([DecodeStep(int8_root, names, seed=seed)]),
    }
    for name, root, planned in (("fp32-cold", fp32_root, info["plan32"]["planned_weight_bytes"]),
                                ("int8-cold", int8_bf16_root, info["plan8"]["planned_weight_bytes"])):
        copies = max(2, math.ceil(cold_bytes / planned))
        variants[name] = Variant([DecodeStep(copy.deepcopy(root), names, seed=seed) for _ in range(copies)])
        info[f"{name}_copies"] = copies
    floor_root = load_model(floor_dir, dtype="fp32")
    variants["floor"] = Variant([DecodeStep(floor_root, names, seed=seed)])
    return variants, info


def check_outputs(variants_by_stage: dict[int, dict[str, Variant]]) -> dict[str, float]:
    """Logits of the two stages run in turn, INT8 against fp32 (same token, same KV caches)."""
    import torch

    out = {}
    with torch.inference_mode():
        for name in ("fp32", "int8", "int8-fp32act"):
            s0, s1 = variants_by_stage[0][name].steps[0], variants_by_stage[1][name].steps[0]
            out[name] = s1(s0())
            s0.reset()
            s1.reset()
    return {"int8": _rel_error(out["int8"], out["fp32"]), "int8-fp32act": _rel_error(out["int8-fp32act"], out["fp32"]),
            "bf16-activations": _rel_error(out["int8"], out["int8-fp32act"])}


def schedule(rounds: int, seed: int) -> list[tuple[int, str, str, int | None]]:
    """Blocks ``(round, mode, config, stage)``: every (mode, stage, config) once a round, shuffled."""
    import random

    rng = random.Random(seed)
    blocks = []
    for r in range(rounds):
        one = [("solo", c, s) for c in CONFIGS for s in range(CARDS)]
        one += [("pair", c, None) for c in CONFIGS if c != "floor"]
        rng.shuffle(one)
        blocks += [(r, *b) for b in one]
    return blocks


def worker(rank: int, cpu: int | None, args: dict[str, Any], barrier, queue) -> None:
    """Rank 0 holds both stages (solo blocks of either, stage 0 in pairs); rank 1 holds stage 1."""
    try:
        if cpu is not None and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {cpu})
        import torch

        torch.set_num_threads(1)
        logging.basicConfig(level=logging.WARNING)
        mine = (0, 1) if rank == 0 else (1,)
        variants: dict[int, dict[str, Variant]] = {}
        infos = {}
        for s in mine:
            variants[s], infos[s] = build_variants(args["model_dir"], args["plans"], s, args["cold_bytes"],
                                                   args["floor_dir"])
        check = check_outputs(variants) if rank == 0 else None
        queue.put(("ready", rank, {"info": infos, "check": check}))
        times: dict[str, list[float]] = {}
        block_medians: dict[str, list[float]] = {}
        with torch.inference_mode():
            for _r, mode, config, stage in schedule(args["rounds"], args["seed"]):
                if mode == "solo":
                    run = stage if rank == 0 else None
                else:
                    run = 0 if rank == 0 else 1
                barrier.wait()
                if run is not None:
                    v = variants[run][config]
                    v.call()  # two untimed calls: the stage's weights back into whatever level holds them
                    v.call()
                barrier.wait()
                if run is None:
                    barrier.wait()
                    continue
                key = f"{mode}/{run}/{config}"
                got = []
                deadline = time.perf_counter() + args["block_s"]
                while time.perf_counter() < deadline or len(got) < 3:
                    got.append(v.call())
                times.setdefault(key, []).extend(got)
                block_medians.setdefault(key, []).append(statistics.median(got))
                barrier.wait()
        queue.put(("done", rank, {"times": times, "block_medians": block_medians}))
    except BaseException as exc:  # noqa: BLE001 - report any failure to the parent, then stop
        import traceback

        queue.put(("error", rank, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        barrier.abort()


# ---- statistics and report -----------------------------------------------------------------------


def quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    pos = q * (len(values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def summarize(times: dict[str, list[float]], block_medians: dict[str, list[float]], q: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, values in times.items():
        blocks = block_medians[key]
        out[key] = {
            "calls": len(values),
            "median_s": statistics.median(values),
            "low_s": quantile(values, q),
            "block_spread": (max(blocks) - min(blocks)) / statistics.median(blocks),
            "block_iqr": (quantile(blocks, 0.75) - quantile(blocks, 0.25)) / statistics.median(blocks),
        }
    return out


def per_token(stats: dict[str, Any], mode: str, config: str, field: str) -> float | None:
    keys = [f"{mode}/{s}/{config}" for s in range(CARDS)]
    if not all(k in stats for k in keys):
        return None
    return sum(stats[k][field] for k in keys)


def cpu_name() -> str:
    """The CPU's model name as Linux reports it (``/proc/cpuinfo``), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    import torch

    from cachefit.hardware.probe import reported_cpu_caches

    caches = reported_cpu_caches()
    cache_text = ", ".join(f"{k.upper()} {v / 2**20:,.0f} MiB" if v >= 2**20 else f"{k.upper()} {v // 1024} KiB"
                           for k, v in caches.items())
    return (f"{cpu_name()}, {os.cpu_count()} logical CPUs ({cache_text} as the OS reports them), "
            f"{platform.system()} {platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}")


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:,.2f}"


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:,.1f} MB"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def analyse(report: dict[str, Any]) -> dict[str, Any]:
    stats, pred = report["stats"], report["predictions"]
    t: dict[str, dict[str, float | None]] = {}
    for mode in ("solo", "pair"):
        for field in ("median_s", "low_s"):
            t[f"{mode}/{field}"] = {c: per_token(stats, mode, c, field) for c in CONFIGS}
    p = {c: sum(s["predicted_s"][c] for s in pred) for c in ("int8", "int8-cold", "fp32", "fp32-partial")}
    floor = t["solo/median_s"]["floor"] or 0.0
    speed = {}
    for key, series in t.items():
        # total = (fp32 / fp32-cold) x (fp32-cold / int8-cold) x (int8-cold / int8)
        speed[key] = {
            "total": _ratio(series["fp32"], series["int8"]),
            "baseline": _ratio(series["fp32"], series["fp32-cold"]),
            "bytes": _ratio(series["fp32-cold"], series["int8-cold"]),
            "cache": _ratio(series["int8-cold"], series["int8"]),
            "deployed": _ratio(series["fp32"], series["int8-fp32act"]),
        }
    speed["predicted"] = {"total": p["fp32"] / p["int8"], "baseline": 1.0, "bytes": p["fp32"] / p["int8-cold"],
                          "cache": p["int8-cold"] / p["int8"], "deployed": p["fp32"] / p["int8"]}
    speed["predicted+floor"] = {"total": (p["fp32"] + floor) / (p["int8"] + floor), "baseline": 1.0,
                                "bytes": (p["fp32"] + floor) / (p["int8-cold"] + floor),
                                "cache": (p["int8-cold"] + floor) / (p["int8"] + floor),
                                "deployed": (p["fp32"] + floor) / (p["int8"] + floor)}
    speed["planner (partial fit)"] = {"total": p["fp32-partial"] / p["int8"], "baseline": p["fp32-partial"] / p["fp32"],
                                      "bytes": None, "cache": None, "deployed": None}
    return {"per_token": t, "predicted": p, "floor_s": floor, "speedups": speed}


def render(report: dict[str, Any]) -> str:
    a = analyse(report)
    pred, dev = report["predictions"], report["device"]
    levels = {lvl["name"]: lvl for lvl in dev["levels"]}
    plan_level = dev.get("default_level", "l3")
    cap = levels[plan_level]["capacity_bytes"]
    offchip = dev["levels"][-1]
    t, p, sp = a["per_token"], a["predicted"], a["speedups"]
    floor = a["floor_s"]
    shape = report["shape"]
    lines = [
        SECTION_START,
        SECTION_TITLE,
        "",
        *summary_lines([*report.get("other_runs", []), report]),
        "",
        f"Machine: {report['machine']}. Run {report['date']} with `{report['command']}` "
        f"({report['elapsed_s'] / 60:.1f} min).",
        "",
        f"Model: Llama-like `LlamaForCausalLM`, hidden {shape['hidden']:,}, {shape['layers']} layers, MLP "
        f"{shape['intermediate']:,} (the widest multiple of 128 whose INT8 cards fill at most "
        f"{TARGET_UTILIZATION:.0%} of the probed cache), {shape['heads']} heads with {shape['kv_heads']} KV "
        f"heads, vocabulary {shape['vocab']:,}, random weights: {report['fp32_weight_bytes'] / 1e6:,.0f} MB in "
        "fp32. "
        f"Workload: batch-1 decode, one token against a KV cache of {CONTEXT} positions, one thread per "
        f"process. Device: this CPU, {report['device_source']}: {plan_level} {cap / 2**20:,.1f} MiB at "
        f"{levels[plan_level]['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, DRAM "
        f"{offchip['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s (one core).",
        "",
        f"**The plan.** Uncompressed on {CARDS} cards: "
        + (f"*{report['fp32_verdict']}*." if report["fp32_verdict"] != "fits" else
           "it fits (this run's probe found a cache larger than the fp32 partitions: the premise of the "
           "demonstration does not hold, read the numbers with that in mind).")
        + " With `--allow int8` "
        "(`cachefit plan MODEL --device cpu.json --cards 2 --allow int8 --mode decode --seq 64 --batch 1 "
        "--dtype fp32`):",
        "",
        "| card | units | INT8 bytes (plan) | fits? | same cut in fp32 | fits? | INT8 weights held / planned |",
        "|---|---|---|---|---|---|---|",
    ]
    for s, held in zip(pred, report["held"]):
        lines.append(
            f"| {s['card']} | {s['units'][0]}..{s['units'][-1]} | {_mb(s['int8_total_bytes'])} "
            f"({100 * s['int8_total_bytes'] / s['capacity_bytes']:.0f}% of {cap / 1e6:,.1f} MB) | "
            f"{'yes' if s['int8_fits'] else 'no'} | {_mb(s['fp32_total_bytes'])} "
            f"({100 * s['fp32_total_bytes'] / s['capacity_bytes']:.0f}%) | {'yes' if s['fp32_fits'] else 'no'} | "
            f"{held['plan8']['held_weight_bytes']:,} / {held['plan8']['planned_weight_bytes']:,} B |")
    check = report["check"]
    cold = report["cold_copies"]
    lines += [
        "",
        f"Output check (the logits of both stages run in turn, same token and KV caches, `max|a - b| / max|b|`): "
        f"INT8 with bf16 GEMV activations against fp32 {check['int8']:.1e}, INT8 as deployed (fp32 activations) "
        f"against fp32 {check['int8-fp32act']:.1e}, the two INT8 variants against each other (the bf16 "
        f"activations alone) {check['bf16-activations']:.1e}. The weights are random: this checks that the stages "
        "compute the model, not INT8's quality on a trained one (docs/compression.md).",
        "",
        f"**Time per token** (sum of the two stages' decode steps; {report['rounds']} rounds of blocks of "
        f"{report['block_s']:g} s, every (mode, stage, configuration) once a round in a random order; median and "
        f"{int(report['quantile'] * 100)}% quantile of all calls). *solo*: one stage at a time, the other core "
        "idle (a card with its own cache); *pair*: both stages at once, one per core (two cards sharing this "
        "machine's L3 and DRAM). Predicted: cachefit's roofline (`estimate_stage`) on the probed device; "
        "*+ floor* adds the measured `floor` step.",
        "",
        "| configuration | bytes read per token (cost model) | solo median (ms) | solo q (ms) | pair median (ms) | pair q (ms) "
        "| effective GB/s (solo median) | predicted (ms) | predicted + floor (ms) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    read8 = sum(s["int8_read_bytes"] for s in pred)
    read32 = sum(s["fp32_read_bytes"] for s in pred)
    rows = [
        ("fp32", "`fp32`: uncompressed, same cuts, looped", read32, p["fp32"]),
        ("fp32-cold", f"`fp32-cold`: cycling {cold['fp32-cold']} copies a stage", read32, p["fp32"]),
        ("int8", "`int8`: cache fit (bf16 GEMV activations)", read8, p["int8"]),
        ("int8-cold", f"`int8-cold`: cycling {cold['int8-cold']} copies a stage (from DRAM)", read8, p["int8-cold"]),
        ("int8-fp32act", "`int8-fp32act`: as `cachefit run` deploys it", read8, p["int8"]),
        ("floor", "`floor`: 64-wide model, same structure", None, None),
    ]
    for config, label, nbytes, predicted in rows:
        med = t["solo/median_s"][config]
        bw = "-" if nbytes is None or not med else f"{nbytes / med / 1e9:.1f}"
        lines.append(
            f"| {label} | {'-' if nbytes is None else _mb(nbytes)} | {_ms(med)} | {_ms(t['solo/low_s'][config])} | "
            f"{_ms(t['pair/median_s'][config])} | {_ms(t['pair/low_s'][config])} | {bw} | {_ms(predicted)} | "
            f"{_ms(None if predicted is None else predicted + floor)} |")
    lines += [
        "",
        "**Speedups** over fp32 (time ratios). The total splits into three factors whose product it is: the "
        "fp32 baseline looped against streamed (`fp32` / `fp32-cold`, below 1 where the looped fp32 stage "
        "keeps part of itself in the cache), *fewer bytes* with both from DRAM (`fp32-cold` / `int8-cold`) and "
        "the *cache fit* (`int8-cold` / `int8`):",
        "",
        "| | total: fp32 / int8 | fp32 looped / streamed | fewer bytes (both from DRAM) | cache fit "
        "| INT8 as deployed (fp32 activations) |",
        "|---|---|---|---|---|---|",
    ]
    labels = {
        "solo/median_s": "measured, solo, medians",
        "solo/low_s": "measured, solo, quantiles",
        "pair/median_s": "measured, pair, medians",
        "pair/low_s": "measured, pair, quantiles",
        "predicted": "predicted (roofline)",
        "predicted+floor": "predicted + measured floor",
        "planner (partial fit)": "planner's view of fp32 (L3 share resident, rest streamed)",
    }
    for key, label in labels.items():
        s = sp[key]
        lines.append(f"| {label} | **{_x(s['total'])}** | {_x(s['baseline'])} | {_x(s['bytes'])} | {_x(s['cache'])} "
                     f"| {_x(s['deployed'])} |")
    lines += ["", *interpretation(report, a)]
    if report.get("other_runs"):
        lines += ["", *runs_table([*report["other_runs"], report])]
    lines.append(SECTION_END)
    return "\n".join(lines) + "\n"


def _span(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.2f}x" if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}-{hi:.2f}x"


def summary_lines(reports: list[dict[str, Any]]) -> list[str]:
    """The headline over every run: ranges of the measured and predicted factors."""
    sp = [analyse(r)["speedups"] for r in reports]

    def span(key: str, factor: str) -> str:
        return _span([s[key][factor] for s in sp if s[key][factor] is not None])

    runs = f"{len(reports)} runs" if len(reports) > 1 else "one run"
    cache_ok = all(_close(s["solo/median_s"]["cache"], s["predicted"]["cache"]) for s in sp)
    bytes_ok = all(_close(s["solo/median_s"]["bytes"], s["predicted"]["bytes"]) for s in sp)
    return [
        f"In short ({runs}; ranges over the runs, solo medians; details of the last run below): in the same "
        f"two-card layout, **INT8 decodes a token {span('solo/median_s', 'total')} faster than fp32 where the "
        f"cost model predicts {span('predicted', 'total')}**. "
        + ("The cache fit itself behaves as predicted: " if cache_ok
           else "The cache fit itself differs from its prediction: ")
        + f"INT8 read from the cache against INT8 read from DRAM is {span('solo/median_s', 'cache')} faster, "
        f"predicted {span('predicted', 'cache')} (the probed L3 bandwidth over DRAM's). "
        f"The other factor, a quarter of the bytes with both read from DRAM, gives {span('solo/median_s', 'bytes')} "
        f"where {span('predicted', 'bytes')} was predicted"
        + (", because aten's INT8 GEMV kernel dequantizes on the fly and streams DRAM far more slowly than an "
           "fp32 GEMV" if not bytes_ok else "")
        + "; the framework's fixed cost per step, which the "
        "cost model has no term for, dilutes every ratio. INT8 as `cachefit run` deploys it today (fp32 "
        f"activations, aten's scalar path) is {span('solo/median_s', 'deployed')} the speed of fp32 here."
    ]


def runs_table(reports: list[dict[str, Any]]) -> list[str]:
    """One line per run (the one detailed above last): how far the headline numbers move between runs."""
    lines = [
        f"All {len(reports)} runs on this machine, the last one detailed above (each probes anew; *fixed*: an "
        "earlier version of the benchmark with a fixed MLP width):",
        "",
        "| run | started | probed L3 | MLP | card: INT8 / fp32 | other processes (% of a core) "
        "| speedup solo (median / quantile) | fewer bytes | cache fit | pair | INT8 as deployed | predicted |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k, r in enumerate(reports):
        a = analyse(r)
        sp = a["speedups"]
        levels = {lvl["name"]: lvl for lvl in r["device"]["levels"]}
        cap = levels[r["device"].get("default_level", "l3")]["capacity_bytes"] / 2**20
        others = r.get("others") or {}
        load = (f"{max(0.0, others['other_busy_s']) / others['wall_s'] * 100:.0f}%"
                if others.get("wall_s") else "not recorded")
        m = sp["solo/median_s"]
        card8 = max(st["int8_total_bytes"] for st in r["predictions"])
        card32 = max(st["fp32_total_bytes"] for st in r["predictions"])
        probes = re.search(r"median of (\d+) probes", r.get("device_source", ""))
        cap_text = f"{cap:.1f} MiB" + (f" (median of {probes.group(1)})" if probes else " (1 probe)")
        width = f"{r['shape']['intermediate']:,}" + ("" if r.get("sized_from_probe") else " (fixed)")
        lines.append(
            f"| {k + 1} | {r.get('started', r['date'])} | {cap_text} | {width} | "
            f"{card8 / 1e6:.1f} / {card32 / 1e6:.1f} MB | {load} | {_x(m['total'])} / "
            f"{_x(sp['solo/low_s']['total'])} | {_x(m['bytes'])} | {_x(m['cache'])} | "
            f"{_x(sp['pair/median_s']['total'])} | {_x(m['deployed'])} | {_x(sp['predicted']['total'])} |")
    return lines


def _close(measured: float | None, predicted: float | None, within: float = 0.25) -> bool:
    return measured is not None and predicted is not None and abs(measured / predicted - 1) <= within


def interpretation(report: dict[str, Any], a: dict[str, Any]) -> list[str]:
    t, p, sp = a["per_token"], a["predicted"], a["speedups"]
    solo, pair = t["solo/median_s"], t["pair/median_s"]
    pred, dev = report["predictions"], report["device"]
    levels = {lvl["name"]: lvl for lvl in dev["levels"]}
    plan_level = dev.get("default_level", "l3")
    bw_cache = levels[plan_level]["bandwidth_bytes_per_s"]
    bw_dram = dev["levels"][-1]["bandwidth_bytes_per_s"]
    cap_mib = levels[plan_level]["capacity_bytes"] / 2**20
    read8 = sum(s["int8_read_bytes"] for s in pred)
    read32 = sum(s["fp32_read_bytes"] for s in pred)
    floor = a["floor_s"]
    m, pr, pf = sp["solo/median_s"], sp["predicted"], sp["predicted+floor"]
    eff8, eff8c = read8 / solo["int8"], read8 / solo["int8-cold"]
    eff32, eff32c = read32 / solo["fp32"], read32 / solo["fp32-cold"]
    out = ["What the numbers say:", ""]
    out.append(
        f"- **Measured speedup of INT8 over fp32: {_x(m['total'])}** (solo, medians; {_x(sp['solo/low_s']['total'])} "
        f"on the {int(report['quantile'] * 100)}% quantiles, {_x(sp['pair/median_s']['total'])} with both cores "
        f"busy), **predicted {_x(pr['total'])}** by the roofline, {_x(pf['total'])} with the measured fixed cost "
        f"per step added. The cache fit gives {_x(m['cache'])} measured (`int8-cold` / `int8`) against "
        f"{_x(pr['cache'])} predicted (the probed {plan_level} bandwidth over DRAM's; {_x(pf['cache'])} with the "
        f"fixed cost){', close' if _close(m['cache'], pf['cache']) else ''}; reading a quarter of the bytes, "
        f"both from DRAM, gives {_x(m['bytes'])} measured against {_x(pr['bytes'])} predicted "
        f"({_x(pf['bytes'])} with the fixed cost)"
        + ("; that factor is where the prediction misses, because the INT8 kernel streams DRAM more slowly than "
           "an fp32 GEMV (below)." if not _close(m["bytes"], pf["bytes"]) else "."))
    same = abs(eff32 / eff32c - 1) < 0.1
    head = ("The fp32 baseline streams from DRAM" if same
            else "The looped fp32 baseline does not stream all of its bytes from DRAM")
    out.append(
        f"- **{head}**: the fp32 stages read "
        f"{eff32 / 1e9:.1f} GB/s looped, {eff32c / 1e9:.1f} GB/s cycling copies twice the size of the L3 the OS "
        f"reports (probe: DRAM {bw_dram / 1e9:.1f} GB/s); "
        + (f"the same within 10%: nothing useful of a {max(st['fp32_total_bytes'] for st in pred) / 1e6:.0f} MB "
           "stage stays in the cache a core keeps. "
           if same else f"the looped stage is {_x(eff32 / eff32c)} faster, so some of it does stay in the L3 "
           f"(a core kept more than the probe's {cap_mib:.0f} MiB during the run). ")
        + f"The planner's partial-fit view (the probed {plan_level} share resident, the rest streamed) predicts "
        f"{_ms(p['fp32-partial'])} ms for fp32 per token, the DRAM roofline {_ms(p['fp32'])} ms, measured "
        f"{_ms(solo['fp32'])} ms.")
    held_back = eff8 < 0.7 * bw_cache
    slow_dram = eff8c < 0.8 * eff32c
    head = ("The INT8 kernel, not the bytes, sets INT8's speed" if held_back
            else "INT8 reads close to the cache bandwidth")
    out.append(
        f"- **{head}**: the INT8 stages read {eff8 / 1e9:.1f} GB/s of "
        f"weights from the cache (an fp32 GEMV: {bw_cache / 1e9:.1f} GB/s there, the probe's {plan_level} plateau) "
        f"and {eff8c / 1e9:.1f} GB/s from DRAM (an fp32 GEMV: {bw_dram / 1e9:.1f} GB/s). On x86, aten's "
        "`_weight_int8pack_mm` (`aten/src/ATen/native/cpu/int8mm_kernel.cpp`) has an AVX-512 kernel for bf16 "
        "activations only, and it dequantizes on the fly: every 16 int8 weights are widened to int32, converted "
        "to fp32 and multiplied by their row's scale before the multiply-add, 4 rows at a time with a "
        "horizontal sum per output: 4 vector instructions per 16 bytes of weights where an fp32 GEMV needs one "
        "FMA per 64 bytes. "
        + (f"From DRAM it also falls short of the fp32 stages' stream ({eff32c / 1e9:.1f} GB/s cycling copies; "
           "probably fewer loads in flight behind that work: the loop prefetches only 64 bytes ahead on each of "
           "its 4 rows). " if slow_dram else "")
        + "The roofline prices the dequantization at the fp32 matmul peak (negligible at "
        f"batch 1) and has no per-step term: the `floor` step ({_ms(floor)} ms per token, "
        f"{100 * floor / solo['int8']:.0f}% of the INT8 step) costs fp32 and INT8 alike.")
    dep = m["deployed"]
    out.append(
        f"- **INT8 as `cachefit run` deploys it today is {'slower' if dep < 1 else 'faster'} than fp32 here "
        f"({_x(dep)})**: with fp32 activations `_weight_int8pack_mm` runs that file's scalar loop. Casting the "
        "1-token activation to bf16 around each INT8 matrix (the `int8` rows) changes the logits by "
        f"{report['check']['bf16-activations']:.1e} (relative), against {report['check']['int8-fp32act']:.1e} "
        "for INT8 itself; `Int8WeightOnlyLinear` could take the bf16 kernel on CPU for fp32 inputs the same way.")
    pm = sp["pair/median_s"]
    out.append(
        f"- **Two cards sharing one L3** (*pair*): with both stages running at once the fp32 step takes "
        f"{_ms(pair['fp32'])} ms per token against {_ms(solo['fp32'])} ms alone (the cores share DRAM's "
        f"bandwidth), the INT8 step {_ms(pair['int8'])} ms against {_ms(solo['int8'])} ms, with "
        f"{sum(s['int8_total_bytes'] for s in pred) / 1e6:.0f} MB of INT8 stages together in an L3 of which "
        f"the probe found {cap_mib:.0f} MiB for one core; speedup {_x(pm['total'])}, cache fit {_x(pm['cache'])}. "
        "Real cards each have their own cache; these two cores share one.")
    spread = statistics.median(v.get("block_iqr", v["block_spread"]) for v in report["stats"].values())
    others = report.get("others") or {}
    load = ""
    if others and others.get("wall_s"):
        load = (f" While the workers ran ({others['wall_s']:.0f} s), other processes on this machine used "
                f"{max(0.0, others['other_busy_s']) / others['wall_s'] * 100:.0f}% of a core on average and the "
                f"hypervisor stole {others['steal_s'] / others['wall_s'] * 100:.0f}% of one.")
    agree = abs(sp["solo/low_s"]["total"] / m["total"] - 1)
    agree_pair = abs(sp["pair/low_s"]["total"] / pm["total"] - 1)
    out.append(
        f"- **Noise**: the block medians of one (mode, stage, configuration) spread by {100 * spread:.0f}% "
        "(interquartile range over median, the median over all of them) on this shared 2-vCPU machine, whose "
        f"usable L3 also moves with other guests' load (this run's probe: {cap_mib:.1f} MiB; the probe section "
        "above shows it varying between probes). The random order of blocks spreads that drift over every "
        f"configuration; the total speedup on medians and on quantiles differs by {100 * agree:.0f}% (solo) "
        f"and {100 * agree_pair:.0f}% (pair)." + load)
    return out
def write_section(path: str, section: str) -> None:
    from cachefit.report.markdown import replace_section

    replace_section(path, section, start=SECTION_START, end=SECTION_END)


# ---- main ----------------------------------------------------------------------------------------


def cpu_seconds() -> dict[str, float]:
    """Busy and stolen CPU seconds of the whole machine since boot (``/proc/stat``), and this process's
    own and its reaped children's CPU seconds: their differences over a run say how much other
    processes (or, for steal, the hypervisor's other guests) took from it."""
    import resource

    out = {"busy_s": math.nan, "steal_s": math.nan}
    try:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
        hz = os.sysconf("SC_CLK_TCK")
        # user nice system idle iowait irq softirq steal ...
        out = {"busy_s": (fields[0] + fields[1] + fields[2] + fields[5] + fields[6]) / hz, "steal_s": fields[7] / hz}
    except (OSError, ValueError, IndexError):
        pass
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    out["ours_s"] = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
    out["wall_s"] = time.monotonic()
    return out


def load_or_probe(args: argparse.Namespace, out_dir: Path) -> tuple[Any, dict[str, Any], str]:
    """The device to plan on: a device file, or the median (by the planning level's capacity) of
    ``--probes`` probes run now: one core's usable share of this machine's L3 moves with other load
    between probes minutes apart, and a single probe can land far from the typical share."""
    from cachefit.hardware.devices import parse_device

    if args.device:
        doc = json.loads(Path(args.device).read_text())
        return parse_device(doc, where=args.device), doc, f"device file {Path(args.device).name}"
    from cachefit.hardware.probe import ProbeConfig, probe_device

    docs, elapsed = [], 0.0
    for k in range(args.probes):
        result = probe_device(ProbeConfig(threads=1, seed=k))
        elapsed += result.elapsed_s
        doc = result.to_device_dict()
        (out_dir / f"probed-{k}.json").write_text(json.dumps(doc, indent=2) + "\n")
        docs.append(doc)

    def planning_capacity(doc: dict[str, Any]) -> int:
        level = doc.get("default_level")
        return next((lvl["capacity_bytes"] for lvl in doc["levels"] if lvl["name"] == level), 0)

    ranked = sorted(docs, key=planning_capacity)
    doc = ranked[len(ranked) // 2]
    found = ", ".join(f"{planning_capacity(d) / 2**20:.1f}" for d in docs)
    where = (f"the median of {len(docs)} probes at the start of the run ({doc.get('default_level')} {found} MiB, "
             f"{elapsed:.0f} s)" if len(docs) > 1 else f"probed at the start of the run ({elapsed:.0f} s)")
    (out_dir / "probed.json").write_text(json.dumps(doc, indent=2) + "\n")
    return parse_device(doc, where="probe result"), doc, where


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Probe, size, plan, predict, then time every configuration on the two worker processes."""
    if args.work_dir:
        return _measure(args, Path(args.work_dir))
    with tempfile.TemporaryDirectory(prefix="cachefit-demo-") as tmp:  # the checkpoints: a few hundred MB
        return _measure(args, Path(tmp))


def _measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import multiprocessing as mp

    from cachefit.hardware.probe import reported_cpu_caches

    t_start = time.perf_counter()
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device, device_doc, device_source = load_or_probe(args, out_dir)
    log.info("device: %s", ", ".join(f"{lvl['name']} {lvl['capacity_bytes']:,} B" for lvl in device_doc["levels"]))
    work.mkdir(parents=True, exist_ok=True)
    shape = size_model(device, work)
    log.info("model: MLP width %d", shape.intermediate)
    model_dir, floor_dir = work / "model", work / "floor"
    save_model(shape, model_dir)
    save_model(FLOOR, floor_dir)
    plans = make_plans(model_dir, device)
    predictions = predict(plans, device)
    for s in predictions:
        log.info("card %d %s: INT8 %s (fits: %s), fp32 %s (fits: %s)", s["card"], s["units"],
                 _mb(s["int8_total_bytes"]), s["int8_fits"], _mb(s["fp32_total_bytes"]), s["fp32_fits"])
    l3 = max(reported_cpu_caches().values(), default=256 * 2**20)
    plan_docs = {"plan8": plans["plan8"].to_dict(), "plan32": plans["plan32"].to_dict()}
    (out_dir / "plan-int8.json").write_text(json.dumps(plan_docs["plan8"], indent=2) + "\n")
    wargs = {"model_dir": str(model_dir), "floor_dir": str(floor_dir), "plans": plan_docs,
             "cold_bytes": COLD_FACTOR * l3, "rounds": args.rounds, "block_s": args.block_s, "seed": args.seed}
    os.environ["OMP_NUM_THREADS"] = "1"
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(CARDS), ctx.Queue()
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    procs = [ctx.Process(target=worker, args=(r, cpus[r] if len(cpus) >= CARDS else None, wargs, barrier, queue))
             for r in range(CARDS)]
    before = cpu_seconds()
    for proc in procs:
        proc.start()
    results: dict[tuple[str, int], Any] = {}
    deadline = time.monotonic() + args.timeout_s
    while len([k for k in results if k[0] == "done"]) < CARDS:
        try:
            kind, rank, payload = queue.get(timeout=max(1.0, deadline - time.monotonic()))
        except Exception:  # noqa: BLE001 - queue.Empty: a worker hung
            for proc in procs:
                proc.kill()
            raise SystemExit(f"the workers did not finish within {args.timeout_s} s") from None
        if kind == "error":
            for proc in procs:
                proc.kill()
            raise SystemExit(f"worker {rank} failed: {payload}")
        results[(kind, rank)] = payload
        if kind == "ready":
            log.info("worker %d ready after %.0f s", rank, time.perf_counter() - t_start)
    for proc in procs:
        proc.join(timeout=30)
    after = cpu_seconds()
    wall = after["wall_s"] - before["wall_s"]
    others = {
        "wall_s": wall,
        "other_busy_s": (after["busy_s"] - before["busy_s"]) - (after["ours_s"] - before["ours_s"]),
        "steal_s": after["steal_s"] - before["steal_s"],
    }
    times: dict[str, list[float]] = {}
    medians: dict[str, list[float]] = {}
    for r in range(CARDS):
        times.update(results[("done", r)]["times"])
        medians.update(results[("done", r)]["block_medians"])
    ready0 = results[("ready", 0)]
    held = [ready0["info"][s] for s in range(CARDS)]
    return {
        "date": datetime.date.today().isoformat(),
        "started": started,
        "machine": machine_line(),
        "device": device_doc,
        "device_source": device_source,
        "shape": shape.__dict__,
        "sized_from_probe": True,
        "fp32_weight_bytes": sum(u.footprint.weight_bytes for u in plans["profile"].units),
        "fp32_verdict": plans["fp32_verdict"],
        "predictions": predictions,
        "held": held,
        "cold_copies": {"fp32-cold": held[0]["fp32-cold_copies"], "int8-cold": held[0]["int8-cold_copies"]},
        "check": ready0["check"],
        "rounds": args.rounds,
        "block_s": args.block_s,
        "quantile": args.quantile,
        "stats": summarize(times, medians, args.quantile),
        "times": times,
        "elapsed_s": time.perf_counter() - t_start,
        "others": others,
    }


def _redacted(argv: list[str]) -> list[str]:
    """The command line with absolute paths (this machine's) replaced by ``DIR`` / ``FILE``."""
    return [("FILE" if Path(a).suffix else "DIR") if os.path.isabs(a) else a for a in argv]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", help="a device file from `cachefit probe --out` (default: probe now)")
    parser.add_argument("--probes", type=int, default=3,
                        help="probes to run (without --device); the plan uses the median one (default 3)")
    parser.add_argument("--rounds", type=int, default=30, help="rounds of blocks (default 30; 6 with --quick)")
    parser.add_argument("--block-s", type=float, default=0.25, help="seconds of calls per block")
    parser.add_argument("--quantile", type=float, default=0.1, help="the low quantile reported beside the median")
    parser.add_argument("--quick", action="store_true", help="6 rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=1200, help="give up on the workers after this long")
    parser.add_argument("--work-dir", help="where the model checkpoints go (default: a temporary directory)")
    parser.add_argument("--out-dir", default="cachefit-demo-out", help="where results.json and the plan go")
    parser.add_argument("--markdown", help="rewrite the cachefit-demo section of this markdown file")
    parser.add_argument("--render", help="re-render the section from an earlier results.json (measures nothing)")
    parser.add_argument("--also", nargs="*", default=[],
                        help="results.json files of earlier runs to list beside this one in a table of runs")
    args = parser.parse_args(argv)
    if args.quick and "--rounds" not in (argv if argv is not None else sys.argv[1:]):
        args.rounds = 6
    if args.rounds < 1 or args.probes < 1 or args.block_s <= 0 or not 0 < args.quantile < 1:
        parser.error("--rounds and --probes must be >= 1, --block-s > 0 and --quantile in (0, 1)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.render:
        report = json.loads(Path(args.render).read_text())
    else:
        report = measure(args)
        report["command"] = "python bench/cachefit_demo.py " + " ".join(
            _redacted(argv if argv is not None else sys.argv[1:]))
        report["command"] = report["command"].strip()
        Path(args.out_dir, "results.json").write_text(json.dumps(report, indent=2) + "\n")
    report["other_runs"] = [json.loads(Path(f).read_text()) for f in args.also]
    for other in report["other_runs"]:
        other.pop("other_runs", None)
    section = render(report)
    print(section)
    if args.markdown:
        write_section(args.markdown, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
