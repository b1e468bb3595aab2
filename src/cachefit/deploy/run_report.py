"""The run's report (``result.json``): what rank 0 writes from what every rank gathered to it."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from cachefit.deploy.config import RunConfig
from cachefit.deploy.stages import DeployLayout
from cachefit.files import write_text_atomic


@contextlib.contextmanager
def progress(show: bool, total: int, layout: DeployLayout) -> Iterator[Callable[[], None]]:
    """A progress bar over the run's steps on rank 0's terminal (a no-op elsewhere)."""
    if not show:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(TextColumn("[bold]pipeline[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, disable=not console.is_terminal) as bar:
        task = bar.add_task(f"{layout.num_stages} stages on {layout.world_size} cards", total=total)
        yield lambda: bar.advance(task)


_SHARD_FIELDS = ("rank", "shard", "planned_weight_bytes", "measured_weight_bytes", "allocated_weight_bytes",
                 "forward_s_mean", "busy_s", "peak_rss_bytes", "planned_total_bytes", "capacity_bytes",
                 "measured_peak_bytes", "over_capacity")
_MEMORY_FIELDS = ("planned_total_bytes", "capacity_bytes", "measured_peak_bytes", "measured_weight_bytes_allocated",
                  "measured_activation_peak_bytes", "memory_method", "over_capacity")


def _stages(gathered: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    stages: dict[int, dict[str, Any]] = {}
    for item in gathered:
        for entry in item["stages"]:
            st = stages.setdefault(entry["stage"], {
                "stage": entry["stage"], "description": entry["description"], "unit_names": entry["unit_names"],
                "ranks": [], "planned_weight_bytes": entry["planned_weight_bytes"], "shards": [],
            })
            st["ranks"].append(entry["rank"])
            st["shards"].append({k: entry.get(k) for k in _SHARD_FIELDS})
            if entry["shard"] == 0:
                for key in ("measured_weight_bytes", "forward_s_mean", "forward_s_per_microbatch", "busy_s"):
                    st[key] = entry.get(key)
                if "busy_fraction" in entry:
                    st["busy_fraction"] = entry["busy_fraction"]
                st.update({k: entry[k] for k in _MEMORY_FIELDS if k in entry})
            elif entry.get("measured_peak_bytes", -1) > st.get("measured_peak_bytes", -1):
                # a split stage: its largest shard, as the plan counts it
                st.update({k: entry[k] for k in _MEMORY_FIELDS if k in entry})
    for st in stages.values():
        if len(st["shards"]) > 1 and any(s.get("over_capacity") is not None for s in st["shards"]):
            # each card against its own capacity (a proportional split's cards differ in size)
            st["over_capacity"] = any(bool(s.get("over_capacity")) for s in st["shards"])
    return [stages[k] for k in sorted(stages)]


def write_report(run_dir: Path, layout: DeployLayout, config: RunConfig, gathered: Sequence[dict[str, Any]],
                 inputs: Sequence[torch.Tensor], *, timings: dict[str, Any] | None = None,
                 extra: dict[str, Any] | None = None) -> None:
    """``result.json`` from every rank's gathered record (rank 0's clock for the steps).

    ``timings``: the mode's own timing block (decode's), instead of the pipeline steps'.
    """
    step_s = gathered[0]["step_s"]
    losses = next((item["losses"] for item in gathered if item.get("holds_last")), [])
    first = inputs[0]
    # tokens for token ids; samples for any other input (an nn.Sequential's feature vectors, images)
    tokens = first.shape[0] * (first.shape[1] if first.dim() > 1 and not first.is_floating_point() else 1)
    mean_step = sum(step_s) / len(step_s) if step_s else None
    report: dict[str, Any] = {
        "model": layout.model,
        "cards": layout.world_size,
        "stages_count": layout.num_stages,
        "world_size": len(gathered),
        "run": config.to_dict(),
        "input_shape": [int(d) for d in first.shape],
        "timings": timings or {
            "step_s": step_s,
            "mean_step_s": mean_step,
            "tokens_per_s": tokens / mean_step if mean_step else None,
            "note": "step: from a barrier before schedule.step to a barrier after it; forward_s: the stage's "
                    "own compute per micro-batch (the first step's includes shape inference and the memory "
                    "measurement of each stage's first call: use --warmup 1 for timings); tokens: samples "
                    "when the inputs are not token ids",
        },
        "stages": _stages(gathered),
    }
    if config.mode == "train":
        report["losses"] = losses
        report["mean_loss"] = sum(losses) / len(losses) if losses else None
    over = [st["description"] for st in report["stages"] if st.get("over_capacity")]
    report["fit"] = {
        "over_capacity": over,
        "note": "measured_peak_bytes: the stage's weights as allocated (in the run's dtype) plus the peak of its live "
                "non-weight bytes during its first real call (inputs, intermediates, KV caches; in decode the first "
                "one-token step, not the prompt's prefill, and the other groups' caches too), beside the plan's "
                "planned_total_bytes and the card's capacity_bytes",
    }
    report.update(extra or {})
    write_text_atomic(run_dir / "result.json", json.dumps(report, indent=2), what="run file")
