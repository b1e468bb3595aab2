"""Rich tables for profiles, devices and plans (the CLI renders them; the library never prints)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table
from rich.text import Text

from cachefit.sizes import format_bytes, format_seconds
from cachefit.units import ModelProfile

if TYPE_CHECKING:
    from cachefit.hardware.devices import DeviceSpec
    from cachefit.plan.search import Candidate
    from cachefit.plan import Plan, Stage


def _num(n: int) -> str:
    return f"{n:,}"


def _flops(n: float) -> str:
    return f"{n / 1e9:.3f}" if n else "0"


def _util_text(util: float) -> Text:
    style = "green" if util <= 0.9 else ("yellow" if util <= 1.0 else "bold red")
    bar_len = 10
    filled = min(bar_len, int(round(min(util, 1.0) * bar_len)))
    return Text(f"{'█' * filled}{'·' * (bar_len - filled)} {util * 100:5.1f}%", style=style)


def profile_table(profile: ModelProfile) -> Table:
    """One row per unit: params, bytes by kind, FLOPs per token."""
    wl = profile.workload
    title = (
        f"{profile.model} · {profile.granularity} units · {wl.mode.value} batch {wl.batch} seq {wl.seq_len} · "
        f"weights {wl.weight_dtype}, activations {wl.act_dtype}, attention {wl.attention.value}"
    )
    table = Table(title=title, show_footer=True, title_justify="left")
    totals = profile.totals()
    table.add_column("#", justify="right", footer="")
    table.add_column("unit", footer="total", no_wrap=True)
    table.add_column("kind")
    table.add_column("params", justify="right", footer=_num(totals["params"]))
    table.add_column("weights", justify="right", footer=format_bytes(totals["weight_bytes"]))
    table.add_column("activations", justify="right", footer=format_bytes(totals["activation_bytes"]))
    table.add_column("buffers", justify="right", footer=format_bytes(totals["buffer_bytes"]))
    table.add_column("total", justify="right", footer=format_bytes(totals["total_bytes"]))
    table.add_column("GFLOP/token", justify="right", footer=_flops(sum(u.flops_per_token for u in profile.units)))
    for i, unit in enumerate(profile.units):
        fp = unit.footprint
        table.add_row(
            str(i),
            unit.name,
            unit.kind,
            _num(unit.params),
            format_bytes(fp.weight_bytes),
            format_bytes(fp.activation_bytes),
            format_bytes(fp.buffer_bytes),
            format_bytes(fp.total_bytes),
            _flops(unit.flops_per_token),
        )
    return table


def _unit_range(names: tuple[str, ...]) -> str:
    return names[0] if len(names) == 1 else f"{names[0]}…{names[-1]}"


def stage_groups(plan: Plan) -> list[tuple[Stage, int]]:
    """Consecutive stages that are shards of one split stage, as (first stage, shard count)."""
    groups: list[tuple[Stage, int]] = []
    for stage in plan.stages:
        if stage.shard is not None and stage.shard[0] > 0 and groups:
            continue
        groups.append((stage, stage.shard[1] if stage.shard else 1))
    return groups


def plan_table(plan: Plan) -> Table:
    """One row per card (one per tensor-parallel group: its card range and ``×`` the split), with the
    units it holds, bytes by weights / activations / buffers, utilization, and the cost model's time
    per micro-batch (``predicted_time_s``, the group's slowest card; the bottleneck marked ``*``)."""
    verdict = "[green]every card fits[/]" if plan.feasible else "[bold red]DOES NOT FIT[/]"
    kinds = {(s.device, s.level, s.capacity_bytes) for s in plan.stages}
    where = ""
    if len(kinds) == 1:
        device, level, cap = next(iter(kinds))
        where = f" x {device} {level} ({format_bytes(cap)})"
    title = f"{plan.model} on {plan.cards} card(s){where} · {plan.objective} · {verdict}"
    table = Table(title=title, title_justify="left")
    table.add_column("cards", justify="right", no_wrap=True)
    if len(kinds) > 1:
        table.add_column("device", no_wrap=True)
    groups = stage_groups(plan)
    any_compressed = any(s.compression for s in plan.stages)
    table.add_column("units", overflow="fold")
    if any_compressed:
        table.add_column("comp.", overflow="fold")
    table.add_column("weights", justify="right", no_wrap=True)
    table.add_column("acts", justify="right", no_wrap=True)
    table.add_column("bufs", justify="right", no_wrap=True)
    table.add_column("total", justify="right", no_wrap=True)
    table.add_column("used", justify="right", no_wrap=True)
    partial = not plan.feasible
    if partial:  # what each card streams from off-chip memory: the bytes beyond its capacity
        table.add_column("over", justify="right", no_wrap=True)
    timed = any(s.predicted_time_s is not None for s in plan.stages)
    group_times: list[float | None] = []
    if timed:
        table.add_column("time/µb", justify="right", no_wrap=True)
        first = 0
        for _, count in groups:  # a split stage takes as long as its slowest shard
            times = [m.predicted_time_s for m in plan.stages[first:first + count]]
            first += count
            known = [t for t in times if t is not None]
            group_times.append(max(known) if len(known) == len(times) else None)
    slowest = max((t for t in group_times if t is not None), default=None)
    for g, (stage, count) in enumerate(groups):
        fp = stage.footprint
        cards = str(stage.card) if count == 1 else f"{stage.card}-{stage.card + count - 1} ×{count}"
        row = [cards]
        if len(kinds) > 1:
            row.append(f"{stage.device}:{stage.level} {format_bytes(stage.capacity_bytes)}")
        util = stage.utilization
        style = "green" if util <= 0.9 else ("yellow" if util <= 1.0 else "bold red")
        row.append(_unit_range(stage.unit_names))
        if any_compressed:
            row.append(",".join(stage.compression) or "-")
        row += [
            format_bytes(fp.weight_bytes),
            format_bytes(fp.activation_bytes),
            format_bytes(fp.buffer_bytes),
            format_bytes(fp.total_bytes),
            Text(f"{util * 100:.1f}%", style=style),
        ]
        if partial:
            row.append(format_bytes(stage.overflow_bytes) if stage.overflow_bytes else "-")
        if timed:
            took = group_times[g]
            row.append(format_seconds(took) + (" *" if took is not None and took == slowest and len(groups) > 1 else ""))
        table.add_row(*row)
    return table


def _domain(source: str) -> str:
    text = source.split(";")[0].strip()
    text = text.split("://", 1)[-1]
    return text.split("/", 1)[0].removeprefix("www.")


def devices_table(devices: tuple[DeviceSpec, ...]) -> Table:
    """The catalog, one row per device: the level a plan targets, other levels, off-chip, peak FP16."""
    table = Table(title="device catalog ((U): uncertain figure; `cachefit devices NAME` shows every source)",
                  title_justify="left")
    table.add_column("name", no_wrap=True)
    table.add_column("device")
    table.add_column("plans for", no_wrap=True)
    table.add_column("other on-chip")
    table.add_column("off-chip", justify="right")
    table.add_column("FP16 dense", justify="right")
    table.add_column("source", overflow="fold")
    for dev in devices:
        level = dev.level()
        target = f"{level.name} {format_bytes(level.total_bytes)}" + (" (U)" if level.uncertain else "")
        others = ", ".join(
            f"{lvl.name} {format_bytes(lvl.total_bytes)}" + (" (U)" if lvl.uncertain else "")
            for lvl in dev.levels if lvl.name != level.name
        )
        off = "none"
        if dev.offchip_capacity_bytes:
            bw = dev.offchip_bandwidth_bytes_per_s
            off = format_bytes(dev.offchip_capacity_bytes) + (f" @ {bw / 1e12:.2f} TB/s" if bw else "")
        fp16 = dev.peak_flops("fp16") or dev.peak_flops("bf16")
        table.add_row(
            dev.name,
            dev.full_name,
            target,
            others or "-",
            off,
            f"{fp16 / 1e12:,.0f} TFLOP/s" if fp16 else "unknown",
            f"{_domain(level.source)} ({level.as_of})" if level.as_of else _domain(level.source),
        )
    return table


def device_figures_table(device: DeviceSpec) -> Table:
    """Every figure of one device with its value, source and date."""
    table = Table(title=f"{device.name}: {device.full_name}", title_justify="left")
    for col in ("figure", "value", "as of", "source"):
        table.add_column(col, overflow="fold")
    for key, fig in device.iter_figures():
        if fig.value is None:
            value = "unknown"
        elif key.endswith("bandwidth") or "bandwidth" in key:
            value = f"{fig.value / 1e12:,.3f} TB/s"
        elif "flops" in key:
            value = f"{fig.value / 1e12:,.1f} TFLOP/s"
        else:
            value = f"{int(fig.value):,} B ({format_bytes(fig.value)})"
        if fig.uncertain:
            value += " (U)"
        table.add_row(key, value, fig.as_of, fig.source + (f" — {fig.note}" if fig.note else ""))
    return table


def candidates_table(candidates: tuple[Candidate, ...]) -> Table:
    """Every technique set the planner tried: cards needed, quality risk, utilization."""
    table = Table(title="technique sets tried (least lossy first)", title_justify="left")
    for col in ("techniques", "risk", "cards", "largest part", "mean utilization", "units compressed"):
        table.add_column(col, justify="left" if col == "techniques" else "right")
    for c in candidates:
        # the numbers of the plan each set gives (compression undone where not needed), as the plan shows them
        table.add_row(
            ",".join(c.techniques) or "none",
            f"{c.risk:.2f}",
            str(c.cards) if c.cards is not None else "does not fit",
            format_bytes(c.bottleneck_bytes) if c.bottleneck_bytes is not None else "-",
            f"{c.mean_utilization * 100:.1f}%" if c.mean_utilization is not None else "-",
            str(c.compressed_units) if c.compressed_units is not None else "-",
        )
    return table
