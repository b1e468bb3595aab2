"""Benchmark: cachefit's contiguous partitioning against peers and the MILP optimum.

Not a test. For each instance (uniform, lognormal, transformer-shaped sizes) and each (n, K):

* ``balanced``: at most K parts minimizing the largest one. cachefit's :func:`balanced`, the MILP
  optimum (scipy HiGHS, small n), DeepSpeed's ``partition_balanced`` (if installed; it minimizes
  the spread max - min with an O(n^2 K) dynamic program, so only small n), and accelerate's
  ``get_balanced_memory`` + ``infer_auto_device_map`` on a meta-device model whose modules hold one
  uint8 parameter of each unit's size (so its byte counts equal the unit sizes), with K devices
  of ``total / K + largest unit`` bytes each (always enough for K parts). For large n, cachefit
  with the resident + transient cost model too (transient = 1/8 of each unit), for its time.
* ``fewest``: the fewest cards of capacity C = max(largest unit, 1.15 x total / K). cachefit's
  :func:`fewest_cards`, the MILP, and accelerate with as many devices of C as needed.

Columns: largest part relative to the optimum (cachefit's value, itself checked against the MILP
where the MILP runs), cards used, units that did not fit any card (accelerate sends them to
``cpu``/``disk``), and solve time on one core (model construction excluded).

    python bench/partition_bench.py --quick            # a few minutes on 2 cores
    python bench/partition_bench.py --quick --markdown docs/benchmarks.md   # rewrite its section
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cachefit.partition.contiguous import balanced, fewest_cards
from cachefit.partition.exact import milp_balanced, milp_fewest

SECTION_START = "<!-- partition-bench:start -->"
SECTION_END = "<!-- partition-bench:end -->"


# ---- instances ---------------------------------------------------------------------------------


def make_sizes(kind: str, n: int, seed: int) -> np.ndarray:
    """Unit sizes in bytes."""
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        return rng.integers(1_000_000, 100_000_000, n)
    if kind == "lognormal":
        return (np.exp(rng.normal(16.0, 1.5, n)) + 1).astype(np.int64)  # median ~8.9 MB, heavy tail
    if kind == "transformer":
        # A Llama-3-8B-like stack: embedding and LM head of 128,256 x 4,096 fp16 = 1,050,673,152 B,
        # decoder layers of 4,096^2 x (4 attention-ish + 3 x 14,336 / 4,096 MLP) x 2 B ~ 436 MB
        # (approximate; the shape, a large first and last unit, is what matters), +-2% jitter.
        embed = 128_256 * 4_096 * 2
        layer = int(4_096 * (4 * 4_096 + 3 * 14_336) * 2)
        sizes = (layer * rng.uniform(0.98, 1.02, n)).astype(np.int64)
        sizes[0] = embed
        sizes[-1] = embed
        return sizes
    raise ValueError(kind)


# ---- peers -------------------------------------------------------------------------------------


def deepspeed_partition() -> Callable | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.disable(logging.WARNING)
            from deepspeed.runtime.utils import partition_balanced
            logging.disable(logging.NOTSET)
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        logging.disable(logging.NOTSET)
        return None
    return partition_balanced


def accelerate_model(sizes: np.ndarray):
    import torch
    from torch import nn

    class Blob(nn.Module):
        def __init__(self, numel: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.empty(int(numel), dtype=torch.uint8, device="meta"), requires_grad=False)

    return nn.Sequential(*[Blob(s) for s in sizes])


def accelerate_parts(device_map: dict, sizes: np.ndarray) -> tuple[list[int], int, int]:
    """(bytes per used device in device order, devices used, units not on any device)."""
    per_device: dict[object, int] = {}
    spilled = 0
    for name, device in device_map.items():
        idx = int(name)
        if isinstance(device, int):
            per_device[device] = per_device.get(device, 0) + int(sizes[idx])
        else:
            spilled += 1
    return [per_device[d] for d in sorted(per_device)], len(per_device), spilled


def run_accelerate(sizes: np.ndarray, num_devices: int, budget: int, *, balance: bool):
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    model = accelerate_model(sizes)
    max_memory: dict = {i: int(budget) for i in range(num_devices)}
    max_memory["cpu"] = 10**18
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        if balance:
            max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=["Blob"])
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=["Blob"])
        elapsed = time.perf_counter() - start
    return accelerate_parts(device_map, sizes), elapsed


# ---- the table ---------------------------------------------------------------------------------


@dataclass
class Row:
    instance: str
    n: int
    k: int
    mode: str
    method: str
    largest: int | None
    optimum: int | None
    cards: int | None
    spilled: int = 0
    seconds: float | None = None
    note: str = ""

    def cells(self) -> list[str]:
        ratio = "-" if self.largest is None or not self.optimum else f"{self.largest / self.optimum:.3f}"
        largest = "-" if self.largest is None else f"{self.largest / 1e6:,.1f}"
        secs = "-" if self.seconds is None else (f"{self.seconds * 1e3:,.1f}")
        return [
            self.instance, f"{self.n:,}", f"{self.k:,}", self.mode, self.method, largest, ratio,
            "-" if self.cards is None else f"{self.cards:,}", str(self.spilled) if self.spilled else "0", secs, self.note,
        ]


HEADER = ["instance", "n", "K", "mode", "method", "largest part (MB)", "vs optimum", "cards", "units not placed",
          "time (ms)", "note"]


def timed(fn: Callable, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def bench_case(kind: str, n: int, k: int, *, ds: Callable | None, args) -> list[Row]:
    sizes = make_sizes(kind, n, seed=n * 31 + k)
    rows: list[Row] = []
    # ---- balanced: at most K parts, no capacity
    part, secs = timed(balanced, sizes, k)
    opt = part.bottleneck
    rows.append(Row(kind, n, k, "balanced", "cachefit", opt, opt, part.cards, seconds=secs))
    if n <= args.milp_max_n and k <= args.milp_max_k:
        ref, secs = timed(milp_balanced, sizes.tolist(), k, time_limit_s=args.milp_time_limit)
        note = "equal" if ref.bottleneck == opt else f"MILP differs: {ref.bottleneck}"
        rows.append(Row(kind, n, k, "balanced", "MILP (HiGHS)", ref.bottleneck, opt, ref.cards, seconds=secs, note=note))
    if ds is not None and n * n * k / 2 <= args.deepspeed_max_work:
        bounds, secs = timed(ds, sizes.tolist(), k)
        bounds = [int(b) for b in bounds]
        prefix = np.concatenate([[0], np.cumsum(sizes)])
        parts = [int(prefix[b] - prefix[a]) for a, b in zip(bounds[:-1], bounds[1:])]
        used = sum(1 for a, b in zip(bounds[:-1], bounds[1:]) if b > a)
        rows.append(Row(kind, n, k, "balanced", "DeepSpeed partition_balanced", max(parts), opt, used, seconds=secs,
                        note="minimizes max - min"))
    if n <= args.accelerate_max_n:
        # K devices of total / K + largest unit each: a bound under which K parts always exist (so
        # the optimum is the same as without capacity), and finite, since get_balanced_memory
        # leaves the last device its whole budget.
        budget = int(sizes.sum()) // k + int(sizes.max())
        (parts, used, spilled), secs = run_accelerate(sizes, k, budget, balance=True)
        rows.append(Row(kind, n, k, "balanced", "accelerate (balanced memory)", max(parts) if parts else None, opt,
                        used, spilled, secs))
    if n >= args.transient_min_n:
        # the resident + transient cost model: transient bytes of 1/8 of each unit, reused per card
        part, secs = timed(balanced, sizes, k, transient=sizes // 8)
        rows.append(Row(kind, n, k, "balanced", "cachefit, resident + transient", part.bottleneck, None, part.cards,
                        seconds=secs, note="other cost model: own optimum"))
    # ---- fewest cards of capacity C
    total = int(sizes.sum())
    cap = max(int(sizes.max()), int(1.15 * total / k))
    part, secs = timed(fewest_cards, sizes, cap)
    rows.append(Row(kind, n, k, f"fewest, C = {cap / 1e6:,.0f} MB", "cachefit", part.bottleneck, part.bottleneck,
                    part.cards, seconds=secs))
    if n <= args.milp_fewest_max_n:
        ref, secs = timed(milp_fewest, sizes.tolist(), cap, time_limit_s=args.milp_time_limit)
        note = "equal" if (ref.cards, ref.bottleneck) == (part.cards, part.bottleneck) else "MILP differs"
        rows.append(Row(kind, n, k, f"fewest, C = {cap / 1e6:,.0f} MB", "MILP (HiGHS)", ref.bottleneck,
                        part.bottleneck, ref.cards, seconds=secs, note=note))
    if n <= args.accelerate_max_n:
        devices = min(n, 2 * part.cards + 2)
        (parts, used, spilled), secs = run_accelerate(sizes, devices, cap, balance=False)
        over = sum(1 for p in parts if p > cap)
        note = f"{devices} devices offered" + (f"; {over} over capacity" if over else "")
        rows.append(Row(kind, n, k, f"fewest, C = {cap / 1e6:,.0f} MB", "accelerate", max(parts) if parts else None,
                        part.bottleneck, used, spilled, secs, note))
    return rows


QUICK_CASES = [(16, 2), (16, 8), (40, 4), (40, 8), (256, 8), (256, 64), (4096, 64), (100_000, 512),
               (1_000_000, 2), (1_000_000, 4096)]
FULL_CASES = QUICK_CASES + [(4096, 4096 // 2), (100_000, 4096), (1_000_000, 64)]


def _machine() -> str:
    """CPU model and core count as the OS reports them (lscpu's "Model name" where available)."""
    import subprocess

    name = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        name = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), name)
    except (OSError, subprocess.SubprocessError):
        pass
    return f"{os.cpu_count()}-core {name}"


def markdown(rows: list[Row], command: str, deepspeed_note: str) -> str:
    lines = [
        SECTION_START,
        f"Machine: {_machine()}, {platform.python_implementation()} {platform.python_version()}, "
        f"numpy {np.__version__}; run {datetime.date.today().isoformat()} with `{command}`. "
        "Times are wall-clock on one process (model building excluded); the largest part is compared "
        "with cachefit's optimum, which the MILP confirms wherever it runs (n <= 40). `balanced` uses "
        "*at most* K cards (fewer when the largest unit is the bottleneck, as in lognormal rows); "
        "`fewest` uses cards of C = max(largest unit, 1.15 x total / K) bytes.",
        "",
        deepspeed_note,
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join("---" for _ in HEADER) + "|",
    ]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    lines.append(SECTION_END)
    return "\n".join(lines) + "\n"


def write_section(path: str, section: str) -> None:
    from cachefit.report.markdown import replace_section

    replace_section(path, section, start=SECTION_START, end=SECTION_END,
                    title="## Contiguous partitioning (`bench/partition_bench.py`)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the reduced configuration (a few minutes)")
    parser.add_argument("--instances", default="uniform,lognormal,transformer")
    parser.add_argument("--milp-max-n", type=int, default=40)
    parser.add_argument("--milp-max-k", type=int, default=8)
    parser.add_argument("--milp-fewest-max-n", type=int, default=16)
    parser.add_argument("--milp-time-limit", type=float, default=120.0)
    parser.add_argument("--accelerate-max-n", type=int, default=4096)
    parser.add_argument("--transient-min-n", type=int, default=100_000)
    parser.add_argument("--deepspeed-max-work", type=float, default=3e5, help="skip DeepSpeed above n^2 K / 2 steps")
    parser.add_argument("--markdown", help="write the table into this markdown file's partition section")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    ds = deepspeed_partition()
    if ds is None:
        deepspeed_note = "DeepSpeed: not importable in this environment, so no DeepSpeed rows."
    else:
        import deepspeed

        deepspeed_note = (
            f"DeepSpeed {deepspeed.__version__} (from `pip install deepspeed`, CPU accelerator fallback) "
            f"`partition_balanced` (pure-Python O(n^2 K) DP, run where "
            f"n^2 K / 2 <= {args.deepspeed_max_work:.0e}); accelerate "
            f"{__import__('accelerate').__version__}; scipy {__import__('scipy').__version__} (HiGHS)."
        )
    cases = QUICK_CASES if args.quick else FULL_CASES
    rows: list[Row] = []
    for kind in args.instances.split(","):
        for n, k in cases:
            case_rows = bench_case(kind, n, k, ds=ds, args=args)
            rows += case_rows
            for r in case_rows:
                print(" | ".join(r.cells()), flush=True)
    command = "python bench/partition_bench.py" + (" --quick" if args.quick else "")
    section = markdown(rows, command, deepspeed_note)
    if args.markdown:
        write_section(args.markdown, section)
    else:
        sys.stdout.write(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
