"""Pipeline benchmark: a Llama-like model on 2 processes against 1, with M micro-batches.

Not a test. What it does:

1. Builds a Llama-like ``LlamaForCausalLM`` with random fp32 weights (default: hidden 1,024, 6
   layers, MLP 2,816, vocabulary 8,192: about 380 MB) and saves it with safetensors.
2. Plans it twice with cachefit for a prefill workload (``--batch`` sequences per micro-batch of
   ``--seq`` tokens, ``--micro-batches`` M, fp32): on 1 card, and on 2 cards, balanced by bytes
   (``--objective cards``, the default) or by the cost model's stage time (``--objective time``, on
   the probed device); ``--granularity block`` lets a stage boundary fall between a layer's
   attention and MLP blocks.
3. Runs each plan with ``cachefit.deploy.launch`` under torchrun (gloo, CPU), ``--steps`` timed steps
   after one warm-up step, and reads the measured step time and each stage's forward time per
   micro-batch.
4. Predicts the same with the cost model (``cachefit.cost.estimate_cost``, roofline per stage and the
   simulated schedule) on a device measured here by ``cachefit.hardware.probe`` (or ``--device FILE``
   from ``cachefit probe --out``). The probe measures one thread, the runs use one thread per process.

Throughput ratio = (tokens per second on 2 processes) / (tokens per second on 1). With equal stages
of time ``t`` per micro-batch, GPipe needs ``(M + 1) t`` for what one process does in ``2 M t``: the
ideal ratio is ``2 M / (M + 1)`` (1.78 for M = 8), less the pipeline's own costs (about 1.3 ms per
micro-batch per stage on CPU gloo, FINDINGS) and any imbalance.

    python bench/pipeline_bench.py                          # about 2-4 minutes on 2 cores
    python bench/pipeline_bench.py --quick                  # a smaller model, fewer micro-batches
    python bench/pipeline_bench.py --markdown docs/benchmarks.md   # rewrite the pipeline section
    python bench/pipeline_bench.py --objective time --granularity block   # stages balanced by time
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("pipeline_bench")

START, END = "<!-- pipeline:start -->", "<!-- pipeline:end -->"


def build_model(path: Path, *, hidden: int, layers: int, intermediate: int, vocab: int, heads: int) -> None:
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.no_grad():
        model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)


def plan_for(model_dir: Path, cards: int, workload: Any, device: Any = None, *, objective: str = "cards",
             granularity: str = "layer") -> tuple[Any, Any]:
    from cachefit.cost.pricing import LayoutPricing
    from cachefit.hardware.devices import device_from_capacity, make_cluster
    from cachefit.plan.search import plan_partition
    from cachefit.profile import profile_model

    profile = profile_model(model_dir, workload, granularity=granularity)
    # a card as large as the whole model, so the plan is the balanced split over `cards` cards; on the
    # probed CPU that is its DRAM (the model is far larger than its caches)
    capacity = sum(u.total_bytes for u in profile.units) + 1
    card = device_from_capacity(capacity, level="dram", base=device) if device is not None \
        else device_from_capacity(capacity)
    cluster = make_cluster(card)
    # stage times as predict() prices them: GPipe, the workload's micro-batches, free messages
    pricing = LayoutPricing(profile, cluster, schedule="gpipe", link_latency_s=0.0) if device is not None else None
    plan, _ = plan_partition(profile, cluster, num_cards=cards, objective=objective, pricing=pricing)
    return plan, profile


def run(model_dir: Path, plan: Any, *, nproc: int, micro_batches: int, steps: int, threads: int) -> dict[str, Any]:
    from cachefit.deploy.runtime import NodeConfig, RunConfig, launch

    os.environ["OMP_NUM_THREADS"] = str(threads)
    config = RunConfig(micro_batches=micro_batches, steps=steps, warmup=1, timeout_s=600)
    start = time.perf_counter()
    with open(os.devnull, "w") as sink:
        result = launch(model_dir, plan, nodes=NodeConfig(nproc_per_node=nproc), config=config, stream=sink)
    report = dict(result.report)
    report["wall_s"] = time.perf_counter() - start
    return report


def predict(plan: Any, profile: Any, device: Any, micro_batches: int) -> Any:
    from cachefit.cost.pipeline import estimate_cost
    from cachefit.hardware.devices import device_from_capacity

    capacity = plan.stages[0].capacity_bytes
    card = device_from_capacity(capacity, level="dram", base=device)
    return estimate_cost(plan, profile, {name: card for name in set(plan.devices)}, micro_batches=micro_batches,
                         schedule="gpipe", link_latency_s=0.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller model (hidden 512, 4 layers), M = 4")
    parser.add_argument("--micro-batches", type=int, default=None)
    parser.add_argument("--batch", type=int, default=4, help="sequences per micro-batch")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="threads per process (both runs)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each configuration, alternating 1 and 2 processes; the fastest step counts")
    parser.add_argument("--device", help="device file from `cachefit probe --out` (default: probe now)")
    parser.add_argument("--no-predict", action="store_true", help="skip the probe and the cost model")
    parser.add_argument("--objective", choices=("cards", "time", "both"), default="cards",
                        help="what the 2-card plan minimizes: the largest stage in bytes, or the predicted "
                             "bottleneck stage time on the probed device; both: run the two 2-card plans, "
                             "alternating with the 1-card one under the same load")
    parser.add_argument("--granularity", choices=("layer", "block"), default="layer",
                        help="units: whole layers, or attention and MLP blocks")
    parser.add_argument("--work-dir", help="where the model is saved (default: a temp dir)")
    parser.add_argument("--markdown", help="rewrite the pipeline section of this markdown file")
    parser.add_argument("--json", help="write the raw results here")
    args = parser.parse_args(argv)
    if args.objective != "cards" and args.no_predict:
        parser.error("--objective time needs the cost model's stage times on the probed device; drop --no-predict")
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from cachefit.units import Workload

    shape = dict(hidden=512, layers=4, intermediate=1408, vocab=4096, heads=8) if args.quick else \
        dict(hidden=1024, layers=6, intermediate=2816, vocab=8192, heads=16)
    m = args.micro_batches or (4 if args.quick else 8)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="cachefit-bench-"))
    model_dir = work / "llama-bench"
    if not (model_dir / "config.json").exists():
        log.info("building %s", shape)
        build_model(model_dir, **shape)
    weight_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    workload = Workload(batch=args.batch, seq_len=args.seq, mode="prefill", weight_dtype="fp32", act_dtype="fp32",
                        micro_batches=m)
    results: dict[str, Any] = {"shape": shape, "checkpoint_bytes": weight_bytes, "micro_batches": m,
                               "repeats": args.repeats,
                               "batch_per_micro_batch": args.batch, "seq": args.seq, "steps": args.steps,
                               "threads_per_process": args.threads, "objective": args.objective,
                               "granularity": args.granularity}
    device = None
    if not args.no_predict:
        from cachefit.hardware.devices import load_device_file, parse_device

        probed_file = work / "probed-device.json"
        if args.device or probed_file.exists():
            device = load_device_file(args.device or probed_file)
        else:
            from cachefit.hardware.probe import ProbeConfig, probe_device

            log.info("probing this CPU (one thread)")
            start = time.perf_counter()
            probed = probe_device(ProbeConfig.quick(threads=1))
            log.info("probe took %.0f s", time.perf_counter() - start)
            probed_file.write_text(json.dumps(probed.to_device_dict(), indent=2) + "\n")
            device = parse_device(probed.to_device_dict(), where="probe")
        results["device"] = {"name": device.name, "levels": [(lv.name, lv.capacity_bytes) for lv in device.levels]}
    # label -> (processes, objective); "2" is the 2-card plan of --objective ("cards" with both)
    configs = {"1": (1, "cards"), "2": (2, "cards" if args.objective == "both" else args.objective)}
    if args.objective == "both":
        configs["2 (time)"] = (2, "time")
    plans = {label: plan_for(model_dir, cards, workload, device, objective=objective, granularity=args.granularity)
             for label, (cards, objective) in configs.items()}
    results["configs"] = list(configs)
    for label, (plan, profile) in plans.items():
        results[label] = {"runs": [], "stages": [list(s.unit_names) for s in plan.stages],
                          "processes": configs[label][0], "objective": plan.objective}
        if device is not None:
            cost = predict(plan, profile, device, m)
            results[label]["predicted"] = {
                "stage_s": list(cost.stage_times_s), "step_s": cost.step_s,
                "throughput_tokens_per_s": None if cost.step_s is None else m * workload.tokens / cost.step_s,
                "notes": list(cost.notes)}
    # alternate the configurations so that a slow spell of a shared machine hits both alike
    for rep in range(args.repeats):
        for label, (plan, _profile) in plans.items():
            cards = configs[label][0]
            log.info("run %d/%d, %s: %s", rep + 1, args.repeats, label, [s.unit_names for s in plan.stages])
            results[label]["runs"].append(
                run(model_dir, plan, nproc=cards, micro_batches=m, steps=args.steps, threads=args.threads))
    for label in plans:
        entry = results[label]
        # the report of the run with the fastest step; its stages' times are that run's
        best = min(entry["runs"], key=lambda rep: min(rep["timings"]["step_s"]))
        entry["report"] = best
        entry["step_samples_s"] = [t for rep in entry["runs"] for t in rep["timings"]["step_s"]]
        entry["best_step_s"] = min(entry["step_samples_s"])
    for label in plans:
        if label != "1":
            results[label]["throughput_ratio"] = results["1"]["best_step_s"] / results[label]["best_step_s"]
            results[label]["median_ratio"] = (_median(results["1"]["step_samples_s"])
                                              / _median(results[label]["step_samples_s"]))
    results["throughput_ratio"] = results["2"]["throughput_ratio"]
    results["median_ratio"] = results["2"]["median_ratio"]
    results["ideal_ratio"] = 2 * m / (m + 1)
    results["date"] = datetime.date.today().isoformat()
    results["machine"] = f"{_cpu_name()}, {os.cpu_count()} cores ({platform.machine()}, {platform.system()})"
    results["command"] = "python bench/pipeline_bench.py " + " ".join(_redacted(argv if argv is not None else sys.argv[1:]))
    text = render(results)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    if args.markdown:
        from cachefit.report.markdown import replace_section

        replace_section(args.markdown, f"{START}\n{text}\n{END}", start=START, end=END)
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _redacted(args: list[str]) -> list[str]:
    """The command line with file arguments as placeholders (results are shared without local paths)."""
    out, hide = [], {"--work-dir": "DIR", "--json": "FILE.json", "--markdown": "FILE.md", "--device": "DEVICE.json"}
    for i, arg in enumerate(args):
        out.append(hide[args[i - 1]] if i and args[i - 1] in hide else arg)
    return out


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:,.1f}"


def render(r: dict[str, Any]) -> str:
    import torch

    s = r["shape"]
    m = r["micro_batches"]
    tokens = r["batch_per_micro_batch"] * r["seq"]
    lines = [
        f"Run {r['date']} with `{r['command'].strip()}` on {r['machine']}, torch {torch.__version__}, gloo, "
        f"{r['threads_per_process']} thread(s) per process. Model: Llama-like, hidden {s['hidden']}, "
        f"{s['layers']} layers, MLP {s['intermediate']}, vocabulary {s['vocab']}, random fp32 weights "
        f"({r['checkpoint_bytes'] / 1e6:,.0f} MB of safetensors). Prefill, {m} micro-batches of "
        f"{r['batch_per_micro_batch']} x {r['seq']} = {tokens:,} tokens, GPipe, {r['steps']} timed step(s) after "
        f"one warm-up in each run. Plans: objective {r.get('objective', 'cards')}, "
        f"{r.get('granularity', 'layer')} units.",
        "",
        "| plan | stages | fastest step (ms) | median step (ms) | tokens/s (fastest) | forward per micro-batch, per stage (ms) | predicted stage (ms) | predicted step (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    step_tokens = m * tokens
    labels = r.get("configs", ["1", "2"])
    for label in labels:
        e = r[label]
        rep = e["report"]
        fwd = ", ".join(_ms(st.get("forward_s_mean")) for st in rep["stages"])
        pred = e.get("predicted") or {}
        pstage = ", ".join(_ms(t) for t in pred.get("stage_s", [])) or "-"
        names = " / ".join(f"{u[0]}..{u[-1]}" for u in e["stages"])
        what = f"{label} process(es)" if "objective" not in e else f"{e['processes']} process(es), {e['objective']}"
        lines.append(f"| {what} | {names} | {_ms(e['best_step_s'])} | {_ms(_median(e['step_samples_s']))} | "
                     f"{step_tokens / e['best_step_s']:,.0f} | {fwd} | {pstage} | {_ms(pred.get('step_s'))} |")
    ratios = "; ".join(
        f"{r[label].get('objective', 'cards')} plan **{r[label].get('throughput_ratio', r['throughput_ratio']):.2f}x** "
        f"on the fastest steps, {r[label].get('median_ratio', r['median_ratio']):.2f}x on the medians"
        for label in labels if label != "1")
    lines += [
        "",
        f"Throughput ratio, 2 processes over 1: {ratios} ({len(r['1']['step_samples_s'])} steps of each, "
        f"{r['repeats']} alternating runs). Ideal for equal stages and free communication: "
        f"2M / (M + 1) = {r['ideal_ratio']:.2f}x. Forward times are those of the run with the fastest step.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
