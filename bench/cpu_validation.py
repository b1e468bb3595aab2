"""Predicted against measured on this CPU: batch-1 decode tokens/s of a small Llama, 1 and 2 processes.

What it does, in order:

1. **The model.** A random-weight Llama checkpoint (``--model-dir`` to take one): by default hidden
   1024, 8 layers, MLP 2816, 16 heads / 8 KV heads, vocabulary 8192, fp32: 111 M parameters, 445 MB.
   Why this size: a decode step must read every weight once, and 445 MB is over ten times any CPU
   cache here, so the step is bound by DRAM bandwidth (tens of ms), while the per-token fixed costs
   (8 layers x ~40 eager kernels at a few us, the stage-to-stage messages) stay around 1 ms: the cost
   model's main term is the one tested, and its fixed costs are visible but not dominant. fp32:
   the probe measures fp32 GEMV bandwidth and FLOP/s, and the checkpoint's dtype is what a plan of
   the directory takes.
2. **The device.** ``cachefit probe --quick`` (``--device-file`` to take one) measures the caches,
   DRAM bandwidth, fp32 FLOP/s and the per-kernel cost of an eager layer, with one thread. A card is
   one process with one thread (``OMP_NUM_THREADS=1``), i.e. one core. Two cards on one host talk
   over gloo on the loopback interface: the probe does not measure that link, so this script does
   (a ping-pong between two gloo processes: the one-way time of a 4 KiB message is the hop latency,
   of a 16 MiB one the bandwidth) and writes both, with their source, into a copy of the device file.
3. **Plan and prediction.** The model does not fit any cache, so the cards' level is DRAM
   (``--level dram``): ``cachefit plan DIR --device FILE --level dram --cards N`` is the plan that
   runs, and ``cachefit compare DIR --device FILE --level dram --cards N`` prices it (the layout
   named ``cachefit``; the script checks it has the plan's stages). Decode at batch 1: one token
   passes through every stage before the next starts, so the stages never run at once and two
   processes on one host never compete for its memory bandwidth; the cost model charges the stages
   one after another plus a hop between them, which is what runs.
4. **Measurement.** ``cachefit run DIR --plan PLAN --nproc N --mode decode --new-tokens T`` with
   ``--warmup 1 --steps S``: the decode rate is ``1000 / ms_per_token`` (the mean of the one-token
   steps after the prompt), the figure the prediction is for.

Output: ``OUT/cpu_validation.json`` and ``OUT/cpu_validation.md`` (the table); ``--docs FILE`` puts
the table into that markdown file between this script's own markers.

    python bench/cpu_validation.py --out-dir runs/cpu --docs docs/validation.md
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SECTION_START = "<!-- cpu-validation:start (bench/cpu_validation.py writes this section) -->"
SECTION_END = "<!-- cpu-validation:end -->"
PROMPT_TOKENS = 16
BAND = 2.0
"""A prediction passes within 2x of the measurement, as the published deployments do."""


class BenchError(RuntimeError):
    """A step of the benchmark failed: the message says which and why."""


# ------------------------------------------------------------------------------------------------
# The model and the device


def build_model(path: Path, *, hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int,
                vocab: int, positions: int, seed: int = 0) -> Path:
    """A random-weight Llama checkpoint (fp32, safetensors) at ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=positions, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return path


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 900) -> str:
    """Run ``cachefit ARGS`` and return its stdout; a failure raises with its last stderr line."""
    proc = subprocess.run([sys.executable, "-m", "cachefit.cli", *args], capture_output=True, text=True, check=False,
                          timeout=timeout, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise BenchError(f"cachefit {args[0]} failed (exit {proc.returncode}): {last}")
    return proc.stdout


def probe_device(out: Path) -> Path:
    """``cachefit probe --quick`` into ``out``."""
    _cli("probe", "--quick", "--out", str(out), "--json")
    return out


def _ping_pong(rank: int, port: int, sizes: tuple[int, int], repeats: tuple[int, int], result: Any) -> None:
    import torch
    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = os.environ.get("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        times = []
        for size, reps in zip(sizes, repeats):
            buf = torch.zeros(size // 4, dtype=torch.float32)
            for _ in range(2):  # warm the connection and the buffers
                (dist.send if rank == 0 else dist.recv)(buf, 1 - rank)
                (dist.recv if rank == 0 else dist.send)(buf, 1 - rank)
            dist.barrier()
            start = time.perf_counter()
            for _ in range(reps):
                (dist.send if rank == 0 else dist.recv)(buf, 1 - rank)
                (dist.recv if rank == 0 else dist.send)(buf, 1 - rank)
            times.append((time.perf_counter() - start) / (2 * reps))  # one way
        if rank == 0:
            result.extend(times)
    finally:
        dist.destroy_process_group()


def measure_link(*, small_bytes: int = 4096, large_bytes: int = 16 << 20, repeats: tuple[int, int] = (200, 5)
                 ) -> dict[str, float]:
    """One-way time of a small and a large gloo message between two local processes.

    Returns ``hop_latency_s`` (the small message's one-way time) and ``link_bandwidth_bytes_per_s``
    (the large message's bytes over its one-way time less the hop latency).
    """
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    result = manager.list()
    mp.spawn(_ping_pong, args=(port, (small_bytes, large_bytes), repeats, result), nprocs=2, join=True)
    small_s, large_s = list(result)
    return {"hop_latency_s": small_s,
            "link_bandwidth_bytes_per_s": large_bytes / max(large_s - small_s, 1e-9)}


def with_link(device_file: Path, out: Path, link: dict[str, float] | None = None) -> tuple[Path, dict[str, Any]]:
    """The device file, with the link figures of two local processes added where it has none."""
    doc = json.loads(device_file.read_text())
    has = {k: doc.get(k) or doc.get(f"{k}_{'bytes_per_s' if k == 'link_bandwidth' else 's'}")
           for k in ("link_bandwidth", "hop_latency")}
    if all(v is not None for v in has.values()):
        return device_file, {"measured": False, **has}
    link = link or measure_link()
    today = _dt.date.today().isoformat()
    source = ("measured by bench/cpu_validation.py: one-way time of gloo messages between two processes on "
              "this host's loopback interface (ping-pong; 4 KiB for the latency, 16 MiB for the bandwidth)")
    doc["hop_latency"] = {"value": link["hop_latency_s"], "source": source, "as_of": today}
    doc["link_bandwidth"] = {"value": link["link_bandwidth_bytes_per_s"], "source": source, "as_of": today}
    out.write_text(json.dumps(doc, indent=2) + "\n")
    return out, {"measured": True, **link}


# ------------------------------------------------------------------------------------------------
# Plan, prediction, measurement


def plan_and_predict(model_dir: Path, device_file: Path, cards: int, seq: int, out_dir: Path) -> dict[str, Any]:
    """The plan that runs on ``cards`` processes and the ``compare`` prediction of its decode rate."""
    common = ["--device", str(device_file), "--level", "dram", "--cards", str(cards), "--mode", "decode",
              "--batch", "1", "--seq", str(seq)]
    plan_text = _cli("plan", str(model_dir), *common, "--json")
    plan = json.loads(plan_text)
    if not plan.get("feasible", False):
        raise BenchError(f"the plan on {cards} card(s) does not fit their DRAM; use a smaller model")
    plan_path = out_dir / f"plan-{cards}.json"
    plan_path.write_text(plan_text)
    compared = json.loads(_cli("compare", str(model_dir), *common, "--json"))
    layout = next(x for x in compared["layouts"] if x["name"] == "cachefit")
    if layout["throughput_tokens_per_s"] is None:
        raise BenchError(f"compare on {cards} card(s) gives no tokens/s: it needs {', '.join(layout['missing'])}")
    if layout["pipeline_stages"] != len(plan["stages"]):
        raise BenchError(f"compare's cachefit layout has {layout['pipeline_stages']} stage(s), the plan "
                         f"{len(plan['stages'])}: the prediction would not be for the plan that runs")
    return {"plan": plan_path, "stages": [[s["unit_names"][0], s["unit_names"][-1]] for s in plan["stages"]],
            "predicted_tokens_per_s": float(layout["throughput_tokens_per_s"]),
            "predicted_latency_s": layout["latency_s"], "weight_dtype": plan["workload"]["weight_dtype"]}


def measure_decode(model_dir: Path, plan: Path, device_file: Path, cards: int, *, new_tokens: int, warmup: int,
                   steps: int) -> dict[str, Any]:
    """``cachefit run --mode decode`` on ``cards`` processes of one thread each."""
    prompt = ",".join(str(1 + i) for i in range(PROMPT_TOKENS))
    report = json.loads(_cli("run", str(model_dir), "--plan", str(plan), "--nproc", str(cards), "--mode", "decode",
                             "--new-tokens", str(new_tokens), "--input-ids", prompt, "--warmup", str(warmup),
                             "--steps", str(steps), "--device", str(device_file), "--level", "dram", "--json",
                             env={"OMP_NUM_THREADS": "1"}))
    t = report["timings"]
    return {"measured_tokens_per_s": 1e3 / t["ms_per_token"], "ms_per_token": t["ms_per_token"],
            "end_to_end_tokens_per_s": t["tokens_per_s"],
            "stage_forward_ms": [None if s.get("forward_s_mean") is None else s["forward_s_mean"] * 1e3
                                 for s in report["stages"]]}


# ------------------------------------------------------------------------------------------------
# Output


def machine() -> dict[str, str]:
    """The host as ``lscpu`` names it (model, cores, caches), where it can."""
    info = {"platform": platform.platform()}
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "L1d cache", "L2 cache", "L3 cache",
                           "Hypervisor vendor"):
            info[key.strip()] = value.strip()
    return info


def markdown(doc: dict[str, Any]) -> str:
    """The table of predicted against measured decode rates, between this script's markers."""
    m = doc["machine"]
    host = ", ".join(f"{k} {v}" for k, v in m.items() if k != "platform")
    lines = [
        SECTION_START,
        "",
        f"Machine: {host}. Date: {doc['date']}. Model: {doc['model']['description']}. "
        f"Decode at batch 1 of {doc['new_tokens']} tokens after a {PROMPT_TOKENS}-token prompt, "
        f"one thread per process; {doc['steps']} timed generation(s) after {doc['warmup']} untimed.",
        "",
        "| processes (cards) | stages | predicted tok/s | measured tok/s | measured ms/token | stage forward ms (mean, prompt incl.) "
        "| predicted / measured | in band (2x) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        stages = "; ".join(f"{a}..{b}" if a != b else a for a, b in r["stages"])
        fwd = ", ".join(f"{v:.1f}" for v in r["stage_forward_ms"] if v is not None)
        lines.append(f"| {r['cards']} | {stages} | {r['predicted_tokens_per_s']:.1f} | {r['measured_tokens_per_s']:.1f} "
                     f"| {r['ms_per_token']:.1f} | {fwd} | {r['ratio']:.2f}x | {'yes' if r['in_band'] else 'no'} |")
    link = doc["link"]
    lines += ["", f"Link between two processes ({'measured here' if link['measured'] else 'from the device file'}): "
              f"hop latency {_fmt_us(link.get('hop_latency_s', link.get('hop_latency')))}, bandwidth "
              f"{_fmt_gbs(link.get('link_bandwidth_bytes_per_s', link.get('link_bandwidth')))}.",
              "", f"Command: `{doc['command']}`", "", SECTION_END]
    return "\n".join(lines) + "\n"


def _fmt_us(value: Any) -> str:
    return f"{value * 1e6:.1f} us" if isinstance(value, (int, float)) else str(value)


def _fmt_gbs(value: Any) -> str:
    return f"{value / 1e9:.2f} GB/s" if isinstance(value, (int, float)) else str(value)


def _shown(argv: list[str]) -> list[str]:
    """The command line as the docs show it: file arguments named by their role, not this host's paths."""
    shown, hide = [], {"--out-dir": "OUT", "--model-dir": "MODEL_DIR", "--device-file": "DEVICE_FILE", "--docs": "DOCS"}
    for i, arg in enumerate(argv):
        key = arg.split("=", 1)[0]
        if key in hide and "=" in arg:
            shown.append(f"{key}={hide[key]}")
        elif i and argv[i - 1] in hide:
            shown.append(hide[argv[i - 1]])
        else:
            shown.append(arg)
    return shown


def model_and_device(args: argparse.Namespace, out_dir: Path, *, positions: int) -> tuple[Path, str, Path]:
    """The checkpoint (``--model-dir``, or a random Llama of the ``--hidden``... options built into
    ``out_dir``), how to name it, and the device file (``--device-file``, or this CPU probed)."""
    if args.model_dir:
        model_dir = Path(args.model_dir)
        if not (model_dir / "config.json").is_file():
            raise BenchError(f"--model-dir {str(model_dir)!r} has no config.json; give a Hugging Face model directory")
        description = f"the checkpoint {model_dir.name}"
    else:
        model_dir = build_model(out_dir / "model", hidden=args.hidden, layers=args.layers,
                                intermediate=args.intermediate, heads=args.heads, kv_heads=args.kv_heads,
                                vocab=args.vocab, positions=max(64, positions))
        description = (f"random Llama, hidden {args.hidden}, {args.layers} layers, MLP {args.intermediate}, "
                       f"{args.heads} heads / {args.kv_heads} KV heads, vocabulary {args.vocab}, fp32")
    if args.device_file:
        device_file = Path(args.device_file)
        if not device_file.is_file():
            raise BenchError(f"--device-file {str(device_file)!r} does not exist; omit it to probe this CPU")
    else:
        device_file = probe_device(out_dir / "cpu.json")
    return model_dir, description, device_file


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The options :func:`model_and_device` reads."""
    parser.add_argument("--out-dir", default=None, help="Where plans, the device file and results go (default: a temp dir).")
    parser.add_argument("--model-dir", help="A Llama-like checkpoint directory to use instead of building one.")
    parser.add_argument("--device-file", help="A device file to use instead of probing this CPU.")
    parser.add_argument("--docs", help="A markdown file to put the table into (between this script's markers).")
    for name, default in (("hidden", 1024), ("layers", 8), ("intermediate", 2816), ("heads", 16), ("kv-heads", 8),
                          ("vocab", 8192)):
        parser.add_argument(f"--{name}", type=int, default=default, help=f"Built model: {name} (default {default}).")


def int_list(parser: argparse.ArgumentParser, text: str, flag: str, example: str) -> list[int]:
    """``1,2,4`` as integers >= 1, or a usage error naming ``flag``."""
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        parser.error(f"{flag} {text!r}: give positive integers such as {example}")
    return values


def bench_main(parse: Any, run_fn: Any, render: Any, argv: list[str] | None = None) -> int:
    """Parse, run, print the table; a :class:`BenchError` is one line and exit 1."""
    args = parse(argv)
    try:
        doc = run_fn(args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(render(doc))
    return 0


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark; returns the JSON document it writes."""
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir, description, device_file = model_and_device(args, out_dir, positions=PROMPT_TOKENS + args.new_tokens)
    if max(args.cards) > 1:
        device_file, link = with_link(device_file, out_dir / "cpu-with-link.json")
    else:
        link = {"measured": False}
    seq = PROMPT_TOKENS + args.new_tokens
    rows = []
    for cards in args.cards:
        predicted = plan_and_predict(model_dir, device_file, cards, seq, out_dir)
        measured = measure_decode(model_dir, predicted["plan"], device_file, cards, new_tokens=args.new_tokens,
                                  warmup=args.warmup, steps=args.steps)
        ratio = predicted["predicted_tokens_per_s"] / measured["measured_tokens_per_s"]
        rows.append({"cards": cards, **{k: v for k, v in predicted.items() if k != "plan"},
                     "plan_file": str(predicted["plan"]), **measured, "ratio": ratio,
                     "in_band": 1 / BAND <= ratio <= BAND})
    doc = {"schema": "cachefit.cpu_validation/1", "date": _dt.date.today().isoformat(), "machine": machine(),
           "model": {"dir": str(model_dir), "description": description}, "device_file": str(device_file),
           "link": link, "new_tokens": args.new_tokens, "warmup": args.warmup, "steps": args.steps,
           "command": "python bench/cpu_validation.py " + " ".join(_shown(args.argv)), "rows": rows}
    (out_dir / "cpu_validation.json").write_text(json.dumps(doc, indent=2) + "\n")
    table = markdown(doc)
    (out_dir / "cpu_validation.md").write_text(table)
    if args.docs:
        from cachefit.report.markdown import replace_section

        replace_section(args.docs, table, start=SECTION_START, end=SECTION_END, title="## Measured here: this CPU")
    return doc


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    add_model_options(parser)
    parser.add_argument("--cards", default="1,2", help="Process counts, comma-separated (default 1,2).")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    args.cards = int_list(parser, args.cards, "--cards", "1,2")
    if min(args.new_tokens, args.steps) < 1 or args.warmup < 0:
        parser.error("--new-tokens and --steps must be >= 1, --warmup >= 0")
    if args.out_dir is None:
        args.out_dir = tempfile.mkdtemp(prefix="cpu-validation-")
    return args


def main(argv: list[str] | None = None) -> int:
    return bench_main(parse_args, run, markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
