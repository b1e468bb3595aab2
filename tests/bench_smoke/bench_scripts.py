"""Helpers of the bench/ smoke tests: loading a script as a module (bench/ is not a package), a made-up CPU,
the arguments of a run on a tiny Llama."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[2] / "bench"

# a made-up CPU: one cache level and DRAM, with every figure the decode estimate needs (link included,
# so the script measures nothing but the runs)
DEVICE = {
    "device": "tiny-cpu", "full_name": "test CPU", "default_level": "l3",
    "levels": [{"name": "l3", "capacity_bytes": 1 << 20, "bandwidth_bytes_per_s": 5e10},
               {"name": "dram", "capacity_bytes": 1 << 32, "bandwidth_bytes_per_s": 1e10}],
    "offchip_bandwidth_bytes_per_s": 1e10, "offchip_capacity_bytes": 1 << 32,
    "peak_flops": {"fp32": 1e11}, "kernel_overhead": {"value": 3e-6, "source": "test", "as_of": "2026-01-01"},
    "link_bandwidth": {"value": 2e9, "source": "test", "as_of": "2026-01-01"},
    "hop_latency": {"value": 5e-5, "source": "test", "as_of": "2026-01-01"},
    "source": "test", "as_of": "2026-01-01",
}


@contextlib.contextmanager
def bench_script(name: str) -> Iterator[ModuleType]:
    """``bench/NAME.py`` imported under a name of its own, removed from ``sys.modules`` afterwards."""
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def tiny_run_args(tmp_path: Path, docs: Path) -> list[str]:
    """The arguments the decode benchmarks share for a run on a tiny Llama: an output folder and the
    made-up CPU's device file under ``tmp_path``, the docs page ``docs`` to write into."""
    device = tmp_path / "tiny-cpu.json"
    device.write_text(json.dumps(DEVICE))
    return ["--out-dir", str(tmp_path / "out"), "--device-file", str(device), "--docs", str(docs),
            "--hidden", "64", "--layers", "2", "--intermediate", "128", "--heads", "4", "--kv-heads", "2",
            "--vocab", "128", "--warmup", "0", "--steps", "1"]
