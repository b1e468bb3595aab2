"""The L2 cliff on one NVIDIA GPU, and the cost model's predictions beside it.

Runs with the machine's own torch and numpy only (cachefit's pure-Python parts come from ``src``)::

    PYTHONPATH=src python bench/gpu/l2_cliff.py --out l2_cliff.json      # about 2-5 minutes on an H100
    PYTHONPATH=src python bench/gpu/l2_cliff.py --dry-run                # no GPU: the plan of measurements

What it measures (every time from CUDA events around replays of CUDA graphs, so that Python's
launch overhead, a few microseconds per kernel, does not hide the L2):

1. **Bandwidth vs working set**, 1 MiB to 512 MiB, 4 sizes an octave, fp16 and fp32: cachefit's
   own probe (``cachefit.hardware.probe.measure_bandwidth``: a GEMV ``y = W x`` over views of one
   buffer, each size in 7 passes of random order, the median kept), the cliffs it finds, and the L2
   size the driver reports.
2. **One stage of the seed's model** (hidden 4096, MLP 16384, 32 heads): the linear layers of one
   decoder layer (fused QKV, attention output, MLP up with GELU, MLP down, residual adds; the
   attention over a KV cache is left out, so the stage is GEMV/GEMM-bound), tensor-parallel shards
   1 of 8, 5, 2 and 1 as cachefit's ``shard_unit`` cuts them, with INT8 weights and per-output-channel
   fp16 scales (weight-only, dequantized to fp16 inside the matmul as gpt-fast's
   ``WeightOnlyInt8Linear`` does; ``torch.compile`` fuses the conversion) -- about 25, 42, 101 and
   201 MB of weights, so the first two fit the L2 of an H100 (50 MiB) or H200 (60 MiB) and the last
   two do not -- and the same shards with fp16 weights (cuBLAS), at batch 1 and 16.
3. **The cost model's prediction** for each stage (``cachefit.cost.estimate_stage``: roofline
   ``max(FLOPs / peak, bytes on-chip / L2 bandwidth, bytes streamed / HBM bandwidth)``, the bytes
   from cachefit's profile of ``paper-16l``, sharded and compressed by cachefit), once with the
   catalog's figures for this GPU and once with the figures this run's sweep measured.

Prints a markdown table and writes everything to ``--out`` (JSON). ``--budget-s`` (default 420)
stops starting new stage measurements once that much time has passed, so one command stays inside
8 minutes even when compiles are slow; skipped cases are listed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# Runnable from a checkout without installing cachefit: put src/ on the path.
_SRC = Path(__file__).resolve().parents[2] / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

from cachefit.cost import estimate_stage  # noqa: E402  (pure Python)
from cachefit.compress.techniques import compress_unit  # noqa: E402
from cachefit.hardware.devices import DeviceSpec, get_device, parse_device  # noqa: E402
from cachefit.hardware.probe import KiB, ProbeConfig, detect_levels, sweep_sizes  # noqa: E402
from cachefit.partition.split import shard_unit  # noqa: E402
from cachefit.profile import profile_model  # noqa: E402
from cachefit.units import Unit, Workload  # noqa: E402

log = logging.getLogger("l2_cliff")

HIDDEN, MLP, HEADS = 4096, 16384, 32  # the seed's model (cachefit preset paper-16l)
SHARDS = (8, 5, 2, 1)
BATCHES = (1, 16)
SWEEP_DTYPES = ("fp16", "fp32")
GRAPH_CALLS = 20  # stage calls captured per CUDA graph
SWEEP_GRAPH_CALLS = 16  # GEMVs captured per CUDA graph in the sweep


@dataclass
class StageCase:
    shards: int
    batch: int
    weights: str  # "int8" or "fp16"
    unit: Unit  # cachefit's unit for the stage (sharded, compressed)
    workload: Workload
    measured_s: list[float] = field(default_factory=list)
    real_weight_bytes: int | None = None  # bytes of the tensors the GPU stage really holds
    impl: str = ""
    skipped: str = ""
    max_rel_error: float | None = None

    @property
    def key(self) -> str:
        return f"{self.weights} shard 1/{self.shards} b{self.batch}"


# ---- the plan of measurements (pure Python) ------------------------------------------------------


def stage_units(shards: int, batch: int, weights: str) -> tuple[Unit, Workload]:
    """cachefit's unit for one shard of a paper-16l layer at ``batch`` (decode, a 1-token context)."""
    # A 1-token context: the stage runs no attention over a KV cache, so none is counted.
    wl = Workload(batch=batch, seq_len=1, mode="decode", weight_dtype="fp16", act_dtype="fp16")
    unit = profile_model("paper-16l", wl).unit("layers.0")
    unit = shard_unit(unit, shards, wl).unit
    if weights == "int8":
        unit = compress_unit(unit, "int8", wl)
    return unit, wl


def plan_cases() -> list[StageCase]:
    """fp16 stages first (no compile: seconds), then int8 at batch 1, then int8 at batch 16, so the
    time budget, if it runs out while compiling, cuts the least important cases."""
    order = [("fp16", b, s) for b in BATCHES for s in SHARDS] + [("int8", b, s) for b in BATCHES for s in SHARDS]
    cases = []
    for weights, batch, shards in order:
        unit, wl = stage_units(shards, batch, weights)
        cases.append(StageCase(shards=shards, batch=batch, weights=weights, unit=unit, workload=wl))
    return cases


def predict(case: StageCase, device: DeviceSpec, level: str = "l2"):
    fp = case.unit.footprint
    return estimate_stage(
        card=0, pipeline_stage=0, device=device, level=level, units=(0, 1), shard=None,
        weight_bytes=fp.weight_bytes, activation_bytes=fp.activation_bytes,
        persistent_activation_bytes=fp.persistent_activation_bytes, buffer_bytes=fp.buffer_bytes,
        capacity_bytes=device.capacity_bytes(level), stage_units=(case.unit,), workload=case.workload,
        tokens_per_micro_batch=case.workload.tokens,
    )


def catalog_device(name: str) -> DeviceSpec | None:
    """The catalog entry of a GPU from its CUDA name (``NVIDIA H100 80GB HBM3``), if any."""
    for candidate in (name, *(k for k in ("h200", "h100", "a100", "b200") if k in name.lower())):
        try:
            return get_device(candidate)
        except Exception:  # noqa: BLE001 - not in the catalog under that name
            continue
    return None


def dry_run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = sweep_sizes(args.min_bytes, args.max_bytes, 4)
    cases = plan_cases()
    print(f"sweep: {len(sizes)} working sets from {sizes[0]:,} B to {sizes[-1]:,} B, dtypes {', '.join(SWEEP_DTYPES)}, "
          f"{args.passes} passes, CUDA graphs of {SWEEP_GRAPH_CALLS} GEMVs")
    print(f"stages: {len(cases)} cases (int8 and fp16 weights x shards 1/{', 1/'.join(map(str, SHARDS))} x "
          f"batch {', '.join(map(str, BATCHES))}), {args.passes} passes each, budget {args.budget_s:.0f} s")
    print()
    print("| stage | weight bytes | FLOPs | h100: predicted (us) | bound | h200: predicted (us) | bound |")
    print("|---|---|---|---|---|---|---|")
    doc: dict[str, Any] = {"sizes": list(sizes), "cases": []}
    for case in cases:
        cells, entry = [], {"case": case.key, "weight_bytes": case.unit.footprint.weight_bytes}
        for name in ("h100", "h200"):
            cost = predict(case, get_device(name))
            cells += [f"{cost.time_s * 1e6:,.1f}", cost.bound]
            entry[name] = {"time_s": cost.time_s, "bound": cost.bound}
        print(f"| {case.key} | {case.unit.footprint.weight_bytes:,} | "
              f"{case.unit.flops_per_token * case.workload.tokens:,} | " + " | ".join(cells) + " |")
        doc["cases"].append(entry)
    return doc


# ---- measurements (torch, CUDA) ------------------------------------------------------------------


def gpu_facts(torch) -> dict[str, Any]:
    props = torch.cuda.get_device_properties(0)
    facts = {
        "name": props.name,
        "l2_cache_bytes": int(getattr(props, "L2_cache_size", 0)),
        "sms": props.multi_processor_count,
        "total_memory_bytes": int(props.total_memory),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    for attr in ("persisting_l2_cache_max_size", "max_persist_l2_cache_size"):
        if hasattr(props, attr):
            facts["persisting_l2_max_bytes"] = int(getattr(props, attr))
    return facts


def run_sweeps(args: argparse.Namespace, reported_l2: int) -> dict[str, Any]:
    from cachefit.hardware.probe import measure_bandwidth, measure_peak_flops

    out: dict[str, Any] = {}
    for dtype in SWEEP_DTYPES:
        t0 = time.perf_counter()
        config = ProbeConfig(backend="cuda", dtype=dtype, min_bytes=args.min_bytes, max_bytes=args.max_bytes,
                             points_per_octave=4, passes=args.passes, min_sample_s=1e-3,
                             cuda_graph_calls=SWEEP_GRAPH_CALLS)
        samples = measure_bandwidth(config)
        levels = detect_levels([s.weight_bytes for s in samples], [s.bandwidth_bytes_per_s for s in samples],
                               reported={"l2": reported_l2} if reported_l2 else None)
        out[dtype] = {
            "samples": [s.to_dict() for s in samples],
            "levels": [lvl.to_dict() for lvl in levels],
            "elapsed_s": time.perf_counter() - t0,
        }
        log.info("sweep %s: %s (%.1f s)", dtype, ", ".join(
            f"{lvl.name} {lvl.capacity_bytes or '-'} B @ {lvl.bandwidth_bytes_per_s / 1e12:.2f} TB/s" for lvl in levels),
            out[dtype]["elapsed_s"])
    out["peak_flops_fp16"] = measure_peak_flops("cuda", dtype="fp16", size=8192)
    return out


def probed_device(sweeps: dict[str, Any], facts: dict[str, Any]) -> DeviceSpec:
    """A device from this run's fp16 sweep (the dtype the stages run in) and fp16 matmul peak."""
    levels = sweeps["fp16"]["levels"]
    caches = [lvl for lvl in levels if lvl["capacity_bytes"] is not None]
    last = levels[-1]
    doc: dict[str, Any] = {
        "device": "probed-gpu",
        "full_name": facts["name"],
        "levels": [{"name": lvl["name"], "capacity_bytes": lvl["capacity_bytes"],
                    "bandwidth_bytes_per_s": lvl["bandwidth_bytes_per_s"]} for lvl in caches]
        or [{"name": "l2", "capacity_bytes": facts["l2_cache_bytes"], "bandwidth_bytes_per_s": last["bandwidth_bytes_per_s"]}],
        "offchip_bandwidth_bytes_per_s": last["bandwidth_bytes_per_s"],
        "offchip_capacity_bytes": facts["total_memory_bytes"],
        "peak_flops": {"fp16": sweeps["peak_flops_fp16"]},
        "source": "bench/gpu/l2_cliff.py sweep",
    }
    names = [lvl["name"] for lvl in doc["levels"]]
    doc["default_level"] = "l2" if "l2" in names else names[-1]
    return parse_device(doc, where="this run's sweep")


class StageModule:
    """The linear layers of one (sharded) paper-16l decoder layer on the GPU."""

    def __init__(self, torch, shards: int, batch: int, weights: str, seed: int = 0, *, device: str = "cuda",
                 hidden: int = HIDDEN, mlp: int = MLP, heads: int = HEADS) -> None:
        gen = torch.Generator(device=device).manual_seed(seed)
        shard_heads = math.ceil(heads / shards)  # the largest shard, as cachefit's shard_unit sizes it
        dq = shard_heads * (hidden // heads)
        dm = math.ceil(mlp / shards)
        self.torch, self.weights, self.dq = torch, weights, dq
        shapes = {"qkv": (3 * dq, hidden), "o": (hidden, dq), "up": (dm, hidden), "down": (hidden, dm)}
        self.w: dict[str, Any] = {}
        self.s: dict[str, Any] = {}
        self.ref: dict[str, Any] = {}
        for name, (out_f, in_f) in shapes.items():
            w16 = (torch.randn(out_f, in_f, device=device, generator=gen) / math.sqrt(in_f)).half()
            if weights == "int8":
                # symmetric per-output-channel int8: scale = max|w| / 127 (gpt-fast's quantize.py)
                scale = w16.float().abs().amax(dim=1).clamp(min=1e-8) / 127
                self.w[name] = (w16.float() / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
                self.s[name] = scale.half()
                self.ref[name] = w16
            else:
                self.w[name] = w16
        self.x = torch.randn(batch, hidden, device=device, generator=gen).half()
        self.weight_bytes = sum(t.numel() * t.element_size() for t in self.w.values()) + \
            sum(t.numel() * t.element_size() for t in self.s.values())

    def _lin(self, x, name):
        F = self.torch.nn.functional
        if self.weights == "int8":
            return F.linear(x, self.w[name].to(x.dtype)) * self.s[name]
        return F.linear(x, self.w[name])

    def forward(self, x):
        F = self.torch.nn.functional
        qkv = self._lin(x, "qkv")
        attn = qkv[:, : self.dq]  # stands in for attention's output (no KV cache attended)
        h = x + self._lin(attn, "o")
        u = F.gelu(self._lin(h, "up"))
        return h + self._lin(u, "down")

    def reference(self, x):
        """The same stage with the fp16 weights the int8 ones were made from (a correctness check)."""
        F = self.torch.nn.functional
        qkv = F.linear(x, self.ref["qkv"])
        h = x + F.linear(qkv[:, : self.dq], self.ref["o"])
        return h + F.linear(F.gelu(F.linear(h, self.ref["up"])), self.ref["down"])


def time_graph(torch, fn, *, passes: int, min_sample_s: float = 2e-3) -> tuple[list[float], str]:
    """Seconds per call of ``fn`` from CUDA events around replays of a graph of GRAPH_CALLS calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    per, impl = GRAPH_CALLS, "graph"
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(GRAPH_CALLS):
                fn()
        run = graph.replay
    except Exception as exc:  # noqa: BLE001 - fall back to plain launches, and say so
        log.warning("graph capture failed (%s): timing plain launches", exc)
        per, impl, run = 1, "launches", fn
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    run()
    torch.cuda.synchronize()
    start.record()
    run()
    end.record()
    end.synchronize()
    reps = max(1, math.ceil(min_sample_s / max(start.elapsed_time(end) / 1e3, 1e-7)))
    times = []
    for _ in range(passes):
        run()  # warm: the weights into whatever level holds them
        start.record()
        for _ in range(reps):
            run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / reps / per)
    return times, impl


def run_stages(torch, args: argparse.Namespace, cases: list[StageCase], t_start: float) -> None:
    compiled_ok = not args.no_compile
    import torch._dynamo

    for attr in ("cache_size_limit", "recompile_limit"):  # one compile per case; the default limit is 8
        if hasattr(torch._dynamo.config, attr):
            setattr(torch._dynamo.config, attr, 64)
    import torch._inductor.config as inductor_config

    if hasattr(inductor_config, "use_mixed_mm"):  # older Inductor: fuse int8 -> fp16 into the matmul
        inductor_config.use_mixed_mm = True
    for case in cases:
        if time.perf_counter() - t_start > args.budget_s:
            case.skipped = f"time budget of {args.budget_s:.0f} s spent"
            continue
        stage = StageModule(torch, case.shards, case.batch, case.weights)
        case.real_weight_bytes = stage.weight_bytes
        fn = stage.forward
        impl = "eager cuBLAS" if case.weights == "fp16" else "eager (unfused dequant)"
        x = stage.x
        with torch.no_grad():
            if case.weights == "int8" and compiled_ok:
                try:
                    compiled = torch.compile(stage.forward, fullgraph=True, dynamic=False)
                    compiled(x)
                    fn, impl = compiled, "torch.compile"
                except Exception as exc:  # noqa: BLE001 - no Triton, or a compile error: eager, and say so
                    log.warning("torch.compile failed (%s): int8 stages run eager (dequantize, then matmul)", exc)
                    compiled_ok = False
            if case.weights == "int8":
                out, ref = fn(x).float(), stage.reference(x).float()
                case.max_rel_error = float(((out - ref).abs().max() / ref.abs().max()).item())
            step = fn  # bound now: the name is deleted after the case
            times, how = time_graph(torch, lambda: step(x), passes=args.passes)
        case.measured_s, case.impl = times, f"{impl}, {how}"
        log.info("%s: %.1f us (%s)", case.key, float(np.median(times)) * 1e6, case.impl)
        del stage, fn
        torch.cuda.empty_cache()


# ---- report --------------------------------------------------------------------------------------


def _us(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:,.1f}"


def _err(pred: float | None, meas: float | None) -> str:
    return "-" if pred is None or not meas else f"{(pred / meas - 1) * 100:+.0f}%"


def report(facts, sweeps, cases, catalog: DeviceSpec | None, probed: DeviceSpec | None) -> tuple[str, list[dict]]:
    lines = [f"GPU: {facts['name']}, L2 {facts['l2_cache_bytes']:,} B as CUDA reports it, {facts['sms']} SMs; "
             f"torch {facts['torch']}, CUDA {facts['cuda']}; {datetime.date.today().isoformat()}.", ""]
    for dtype in SWEEP_DTYPES:
        if dtype in sweeps:
            lv = ", ".join(
                f"{lvl['name']} {lvl['capacity_bytes'] / 1e6:,.1f} MB at {lvl['bandwidth_bytes_per_s'] / 1e12:.2f} TB/s"
                if lvl["capacity_bytes"] else f"{lvl['name']} {lvl['bandwidth_bytes_per_s'] / 1e12:.2f} TB/s"
                for lvl in sweeps[dtype]["levels"])
            lines.append(f"- GEMV sweep {dtype}: {lv}")
    if "peak_flops_fp16" in sweeps:
        lines.append(f"- fp16 matmul (8192^3): {sweeps['peak_flops_fp16'] / 1e12:,.0f} TFLOP/s")
    lines += ["", "Bandwidth vs working set (median GEMV bandwidth, TB/s):", "",
              "| working set | " + " | ".join(d for d in SWEEP_DTYPES if d in sweeps) + " |",
              "|---|" + "---|" * len([d for d in SWEEP_DTYPES if d in sweeps])]
    first = next((d for d in SWEEP_DTYPES if d in sweeps), None)
    if first:
        for i, s in enumerate(sweeps[first]["samples"]):
            cells = []
            for d in SWEEP_DTYPES:
                if d in sweeps:
                    near = min(sweeps[d]["samples"], key=lambda t: abs(math.log(t["weight_bytes"] / s["weight_bytes"])))
                    cells.append(f"{near['bandwidth_bytes_per_s'] / 1e12:.2f}")
            lines.append(f"| {s['weight_bytes'] / 2**20:,.1f} MiB | " + " | ".join(cells) + " |")
    head = ["stage", "batch", "weight bytes", "measured (us)", "GB/s of weights", "impl", "catalog: predicted (us)",
            "bound", "error", "probed: predicted (us)", "error"]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = []
    for case in cases:
        meas = float(np.median(case.measured_s)) if case.measured_s else None
        cat = predict(case, catalog) if catalog else None
        prb = predict(case, probed, level=probed.default_level) if probed else None
        wb = case.unit.footprint.weight_bytes
        lines.append("| " + " | ".join([
            f"{case.weights} shard 1/{case.shards}", str(case.batch), f"{wb / 1e6:,.1f} MB", _us(meas),
            f"{wb / meas / 1e9:,.0f}" if meas else "-", case.impl or case.skipped,
            _us(cat.time_s if cat else None), cat.bound if cat else "-", _err(cat.time_s if cat else None, meas),
            _us(prb.time_s if prb else None), _err(prb.time_s if prb else None, meas),
        ]) + " |")
        rows.append({"case": case.key, "shards": case.shards, "batch": case.batch, "weights": case.weights,
                     "weight_bytes": wb, "real_weight_bytes": case.real_weight_bytes,
                     "flops": case.unit.flops_per_token * case.workload.tokens,
                     "measured_s": case.measured_s, "median_s": meas, "impl": case.impl, "skipped": case.skipped,
                     "max_rel_error_vs_fp16": case.max_rel_error,
                     "catalog": cat.to_dict() if cat else None, "probed": prb.to_dict() if prb else None})
    return "\n".join(lines) + "\n", rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="l2_cliff.json", help="JSON file for every measurement and prediction")
    parser.add_argument("--dry-run", action="store_true", help="check the arguments, print the plan and predictions")
    parser.add_argument("--passes", type=int, default=7, help="passes per sweep size and per stage (median kept)")
    parser.add_argument("--min-size", default="1MiB", help="smallest working set of the sweep")
    parser.add_argument("--max-size", default="512MiB", help="largest working set of the sweep")
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no stage measurement after this many seconds")
    parser.add_argument("--no-compile", action="store_true", help="int8 stages eager (dequantize, then cuBLAS)")
    parser.add_argument("--skip-sweep", action="store_true", help="stages only")
    args = parser.parse_args(argv)
    from cachefit.sizes import parse_bytes

    try:
        args.min_bytes = parse_bytes(args.min_size, what="--min-size")
        args.max_bytes = parse_bytes(args.max_size, what="--max-size")
        if args.max_bytes < 2 * args.min_bytes or args.min_bytes < 4 * KiB:
            raise ValueError(f"--max-size must be at least twice --min-size (>= 4 KiB), got {args.min_size}, {args.max_size}")
        if args.passes < 1 or args.budget_s <= 0:
            raise ValueError("--passes and --budget-s must be positive")
    except Exception as exc:  # noqa: BLE001 - one clear line, exit 2
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.dry_run:
        doc = dry_run(args)
        print(f"\n(dry run: nothing measured; a real run writes {args.out})")
        return 0 if doc["cases"] else 1

    import torch

    if not torch.cuda.is_available():
        print("error: torch sees no CUDA device; use --dry-run on a machine without a GPU", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    facts = gpu_facts(torch)
    log.info("%s", facts)
    sweeps: dict[str, Any] = {}
    probed = None
    if not args.skip_sweep:
        sweeps = run_sweeps(args, facts["l2_cache_bytes"])
        probed = probed_device(sweeps, facts)
    cases = plan_cases()
    run_stages(torch, args, cases, t_start)
    catalog = catalog_device(facts["name"])
    text, rows = report(facts, sweeps, cases, catalog, probed)
    print(text)
    doc = {"facts": facts, "sweeps": sweeps, "stages": rows, "catalog_device": catalog.name if catalog else None,
           "elapsed_s": time.perf_counter() - t_start, "markdown": text}
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"written {args.out} ({doc['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
