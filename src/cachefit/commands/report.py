"""``cachefit report``: plan a model and write a self-contained HTML report (charts embedded)."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from cachefit.commands.compare import ScheduleOpt


def register(app: typer.Typer) -> None:
    from cachefit.cli import (
        ActDtypeOption,
        AttentionOpt,
        AttnOption,
        BatchOpt,
        DtypeOpt,
        DtypeOption,
        GranOption,
        GranularityOpt,
        JsonOption,
        ModeOpt,
        ModeOption,
        SeqOpt,
        StackingOpt,
        _cluster,
        _console,
        _handles_errors,
        _print_json,
        _workload,
    )

    @app.command()
    @_handles_errors
    def report(
        model: Annotated[str, typer.Argument(help="A preset name, a config.json, or a Hugging Face model directory.")],
        out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write index.html and its charts into.")],
        device: Annotated[Optional[list[str]], typer.Option("--device", "-d", help="Catalog name or device/cluster file; repeat for a heterogeneous cluster in order.")] = None,
        cards: Annotated[Optional[int], typer.Option("--cards", "-k", help="Use exactly K cards, balanced; default: the fewest that fit.", min=1)] = None,
        capacity: Annotated[Optional[str], typer.Option("--capacity", "-c", help="Override the on-chip capacity per card, e.g. 50MB.")] = None,
        level: Annotated[Optional[str], typer.Option("--level", help="Memory level to fit (default: the device's planning level).")] = None,
        headroom: Annotated[float, typer.Option("--headroom", help="Fraction of each card kept free, in [0, 1).")] = 0.0,
        reserve: Annotated[Optional[str], typer.Option("--reserve", help="Bytes kept free on every card, e.g. 2MiB.")] = None,
        allow: Annotated[str, typer.Option("--allow", help="Compression the planner may apply: int8,int4,sparse50,sparse75,sparse24,ckpt,fuse,batch.")] = "",
        stacking: Annotated[StackingOpt, typer.Option("--stacking", help="reuse: units on a card share scratch; sum: the seed's plain sum.")] = StackingOpt.reuse,
        batch: BatchOpt = 1,
        seq: SeqOpt = 1024,
        mode: ModeOption = ModeOpt.decode,
        dtype: DtypeOption = DtypeOpt.fp16,
        act_dtype: ActDtypeOption = None,
        attention: AttnOption = AttentionOpt.eager,
        micro_batches: Annotated[int, typer.Option("--micro-batches", help="Micro-batches per step in the pipeline.", min=1)] = 1,
        schedule: Annotated[ScheduleOpt, typer.Option("--schedule", help="Pipeline schedule (the same in inference).")] = ScheduleOpt.one_f_one_b,
        steps_per_load: Annotated[Optional[int], typer.Option("--steps-per-load", help="Charge the load of on-chip weights once every N steps; default: loaded once.", min=1)] = None,
        compare: Annotated[bool, typer.Option("--compare/--no-compare", help="Add the cache-oblivious baselines on the same cards.")] = True,
        link_latency_us: Annotated[float, typer.Option("--link-latency-us", help="Latency of one chip-to-chip message, in microseconds (an assumption).", min=0.0)] = 5.0,
        granularity: GranOption = GranularityOpt.layer,
        as_json: JsonOption = False,
    ) -> None:
        """Plan a model and write an HTML report: plan, memory chart, pipeline timeline, baselines, sources."""
        from cachefit.cost import compare_layouts, estimate_cost
        from cachefit.partition.search import plan_partition
        from cachefit.profile import profile_model
        from cachefit.report.html import write_report

        cluster = _cluster(device, capacity, level, headroom, reserve)
        prof = profile_model(model, _workload(batch, seq, mode, dtype, act_dtype, attention, micro_batches),
                             granularity=granularity.value)
        techniques = [a for a in allow.split(",") if a.strip()]
        plan, _ = plan_partition(prof, cluster, num_cards=cards, allow=techniques, stacking=stacking.value)
        cost = estimate_cost(plan, prof, cluster, schedule=schedule.value, steps_per_load=steps_per_load,
                             link_latency_s=link_latency_us * 1e-6)
        comparison = None
        if compare:
            comparison = compare_layouts(prof, cluster, plan.cards, techniques, schedule=schedule.value,
                                         steps_per_load=steps_per_load, stacking=stacking.value,
                                         link_latency_s=link_latency_us * 1e-6)
        index = write_report(plan, prof, cluster, out, comparison, cost=cost)
        if as_json:
            _print_json({"report": str(index), "plan": plan.to_dict(), "cost": cost.to_dict(),
                         "comparison": comparison.to_dict() if comparison else None})
            return
        _console.print(f"report written to {index}")
