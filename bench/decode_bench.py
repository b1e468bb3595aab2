"""Pipelined decode with groups in flight: measured tokens/s for M = 1, 2, 4, 8 on 2 processes, against the cost model.

``cachefit run --mode decode --micro-batches M`` cuts the batch into M groups of sequences that
circulate through the stages (deploy/decode.py): with one group a stage of two idles while the other
works; with M >= 2 groups both can work at once. Every group is ``--group-batch`` sequences, as a
plan's workload counts a micro-batch, so M groups decode ``M x group-batch`` sequences; the plan for
each M is made for exactly that workload (``--micro-batches M``: the stages hold M groups' KV caches).

What it does:

1. **The model**: a random-weight Llama (bench/cpu_validation.py's, by default hidden 1024, 8 layers,
   MLP 2816, vocabulary 8192, fp32: 445 MB), or ``--model-dir``.
2. **The cards**: this CPU probed (``cachefit probe --quick``) or ``--device-file``, with the gloo
   link between two local processes measured and added (bench/cpu_validation.py); two cards = two
   processes of one thread each, at the DRAM level (the model fits no cache).
3. **Per M**: ``cachefit plan DIR --device FILE --level dram --cards 2 --mode decode --batch B
   --micro-batches M --seq P+T``, then ``cachefit run DIR --plan PLAN --nproc 2 --mode decode
   --micro-batches M --batch M*B --seq P --new-tokens T --device FILE --level dram --json``: the
   report holds the measured tokens/s, interval between a sequence's tokens and each stage's busy
   fraction, and the cost model's prediction for the same groups on the same cards.

Output: ``OUT/decode_bench.json``, ``OUT/decode_bench.md``; ``--docs FILE`` puts the table into that
markdown file between this script's markers.

    python bench/decode_bench.py --out-dir runs/decode --docs docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_validation import (  # noqa: E402  (the sibling benchmark's model, probe and link)
    BenchError,
    _cli,
    _shown,
    add_model_options,
    bench_main,
    int_list,
    machine,
    model_and_device,
    with_link,
)

SECTION_START = "<!-- decode-bench:start (bench/decode_bench.py writes this section) -->"
SECTION_END = "<!-- decode-bench:end -->"
PROMPT_TOKENS = 16


def plan_for(model_dir: Path, device_file: Path, groups: int, group_batch: int, seq: int, out: Path) -> Path:
    text = _cli("plan", str(model_dir), "--device", str(device_file), "--level", "dram", "--cards", "2",
                "--mode", "decode", "--batch", str(group_batch), "--micro-batches", str(groups), "--seq", str(seq),
                "--json")
    plan = json.loads(text)
    if not plan.get("feasible", False):
        raise BenchError(f"the 2-card plan for {groups} group(s) does not fit the cards' DRAM; use a smaller model")
    if len(plan["stages"]) != 2:
        raise BenchError(f"the plan has {len(plan['stages'])} stage(s), not 2")
    out.write_text(text)
    return out


def run_groups(model_dir: Path, plan: Path, device_file: Path, groups: int, group_batch: int, *, new_tokens: int,
               warmup: int, steps: int, kv_cache: str) -> dict[str, Any]:
    report = json.loads(_cli("run", str(model_dir), "--plan", str(plan), "--nproc", "2", "--mode", "decode",
                             "--micro-batches", str(groups), "--batch", str(groups * group_batch),
                             "--seq", str(PROMPT_TOKENS), "--new-tokens", str(new_tokens), "--kv-cache", kv_cache,
                             "--warmup", str(warmup), "--steps", str(steps), "--device", str(device_file),
                             "--level", "dram", "--json", env={"OMP_NUM_THREADS": "1"}))
    t = report["timings"]
    predicted = report.get("predicted", {})
    if "prediction" not in predicted:
        raise BenchError(f"no prediction for {groups} group(s): {predicted.get('unavailable', 'none given')}")
    p = predicted["prediction"]
    return {
        "groups": groups, "sequences": groups * group_batch,
        "measured_tokens_per_s": t["tokens_per_s"], "measured_ms_per_token": t["ms_per_token"],
        "measured_busy": [st.get("busy_fraction") for st in report["stages"]],
        "measured_forward_ms": [st["forward_s_mean"] * 1e3 if st.get("forward_s_mean") else None
                                for st in report["stages"]],
        "predicted_tokens_per_s": p["tokens_per_s"], "predicted_ms_per_token": p["ms_per_token"],
        "predicted_busy": p["busy_fractions"], "predicted_stage_ms": [s * 1e3 for s in p["stage_times_s"]],
    }


def markdown(doc: dict[str, Any]) -> str:
    rows = doc["rows"]
    base = rows[0]
    m = doc["machine"]
    lines = [
        f"Measured {doc['date']} on {m.get('Model name', m['platform'])} ({m.get('CPU(s)', '?')} vCPUs; "
        f"L2 {m.get('L2 cache', '?')}, L3 {m.get('L3 cache', '?')}), two processes of one thread each, "
        f"{doc['model']['description']}, {doc['group_batch']} sequence(s) a group, {PROMPT_TOKENS}-token prompts, "
        f"{doc['new_tokens']} new tokens, {doc['kv_cache']} KV caches, {doc['steps']} timed generation(s) after "
        f"{doc['warmup']} warm-up. Command: `{doc['command']}`.",
        "",
        "| groups M | sequences | measured tokens/s | vs M=1 | predicted tokens/s | predicted vs M=1 | "
        "measured / predicted ratio | ms between a sequence's tokens (measured / predicted) | stages busy, measured | "
        "stages busy, predicted |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["measured_tokens_per_s"] / base["measured_tokens_per_s"]
        pratio = r["predicted_tokens_per_s"] / base["predicted_tokens_per_s"]
        busy = " / ".join(f"{b:.0%}" if b is not None else "-" for b in r["measured_busy"])
        pbusy = " / ".join(f"{b:.0%}" for b in r["predicted_busy"])
        lines.append(f"| {r['groups']} | {r['sequences']} | {r['measured_tokens_per_s']:.1f} | {ratio:.2f}x | "
                     f"{r['predicted_tokens_per_s']:.1f} | {pratio:.2f}x | {ratio / pratio:.2f} | "
                     f"{r['measured_ms_per_token']:.1f} / {r['predicted_ms_per_token']:.1f} | {busy} | {pbusy} |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> dict[str, Any]:
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir, description, device_file = model_and_device(args, out_dir, positions=PROMPT_TOKENS + args.new_tokens)
    device_file, link = with_link(device_file, out_dir / "cpu-with-link.json")
    rows = []
    for groups in args.groups:
        plan = plan_for(model_dir, device_file, groups, args.group_batch, PROMPT_TOKENS + args.new_tokens,
                        out_dir / f"plan-m{groups}.json")
        row = run_groups(model_dir, plan, device_file, groups, args.group_batch, new_tokens=args.new_tokens,
                         warmup=args.warmup, steps=args.steps, kv_cache=args.kv_cache)
        print(f"M={groups}: measured {row['measured_tokens_per_s']:.1f} tokens/s, predicted "
              f"{row['predicted_tokens_per_s']:.1f}", file=sys.stderr)
        rows.append(row)
    doc = {"schema": "cachefit.decode_bench/1", "date": _dt.date.today().isoformat(), "machine": machine(),
           "model": {"dir": str(model_dir), "description": description}, "device_file": str(device_file),
           "link": link, "group_batch": args.group_batch, "new_tokens": args.new_tokens, "kv_cache": args.kv_cache,
           "warmup": args.warmup, "steps": args.steps,
           "command": "python bench/decode_bench.py " + " ".join(_shown(args.argv)), "rows": rows}
    (out_dir / "decode_bench.json").write_text(json.dumps(doc, indent=2) + "\n")
    table = markdown(doc)
    (out_dir / "decode_bench.md").write_text(table)
    if args.docs:
        from cachefit.report.markdown import replace_section

        replace_section(args.docs, f"{SECTION_START}\n{table}{SECTION_END}\n", start=SECTION_START, end=SECTION_END,
                        title="## Pipelined decode: groups in flight (bench/decode_bench.py)")
    return doc


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    add_model_options(parser)
    parser.add_argument("--groups", default="1,2,4,8", help="Group counts M, comma-separated; the first is the baseline.")
    parser.add_argument("--group-batch", type=int, default=4, help="Sequences per group (default 4).")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--kv-cache", choices=("static", "dynamic"), default="static")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    args.groups = int_list(parser, args.groups, "--groups", "1,2,4,8")
    if min(args.group_batch, args.new_tokens, args.steps) < 1 or args.warmup < 0:
        parser.error("--group-batch, --new-tokens and --steps must be >= 1, --warmup >= 0")
    if args.out_dir is None:
        args.out_dir = tempfile.mkdtemp(prefix="decode-bench-")
    return args


def main(argv: list[str] | None = None) -> int:
    return bench_main(parse_args, run, markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
