"""Rich tables for profiles, devices and plans (the CLI renders them; the library never prints)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table
from rich.text import Text

from cachefit.sizes import format_bytes
from cachefit.units import ModelProfile

if TYPE_CHECKING:
    from cachefit.hardware.devices import DeviceSpec
    from cachefit.plan import Plan


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
    table.add_column("unit", footer="total")
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
    return names[0] if len(names) == 1 else f"{names[0]} … {names[-1]} ({len(names)})"


def plan_table(plan: Plan) -> Table:
    """One row per card: the units it holds, bytes by kind, capacity, utilization."""
    verdict = "[green]fits[/]" if plan.feasible else "[bold red]DOES NOT FIT[/]"
    title = f"{plan.model} on {plan.cards} card(s) · objective {plan.objective} · {verdict}"
    table = Table(title=title, title_justify="left")
    for name, justify in (
        ("card", "right"),
        ("device", "left"),
        ("units", "left"),
        ("compression", "left"),
        ("weights", "right"),
        ("activations", "right"),
        ("buffers", "right"),
        ("total", "right"),
        ("capacity", "right"),
        ("utilization", "left"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for stage in plan.stages:
        fp = stage.footprint
        shard = f" [shard {stage.shard[0] + 1}/{stage.shard[1]}]" if stage.shard else ""
        table.add_row(
            str(stage.card),
            f"{stage.device}:{stage.level}",
            _unit_range(stage.unit_names) + shard,
            ",".join(stage.compression) or "-",
            format_bytes(fp.weight_bytes),
            format_bytes(fp.activation_bytes),
            format_bytes(fp.buffer_bytes),
            format_bytes(fp.total_bytes),
            format_bytes(stage.capacity_bytes),
            _util_text(stage.utilization),
        )
    return table


def devices_table(devices: tuple[DeviceSpec, ...]) -> Table:
    """The catalog: on-chip levels and capacities, off-chip, peak FP16, with sources."""
    table = Table(title="device catalog (on-chip level a plan targets in bold)", title_justify="left")
    table.add_column("name")
    table.add_column("device")
    table.add_column("on-chip levels")
    table.add_column("off-chip", justify="right")
    table.add_column("FP16/BF16 dense", justify="right")
    table.add_column("as of")
    table.add_column("source of the planning level", overflow="fold")
    for dev in devices:
        levels = []
        for lvl in dev.levels:
            text = f"{lvl.name} {format_bytes(lvl.capacity_bytes)}" + (" (U)" if lvl.uncertain else "")
            levels.append(f"[bold]{text}[/]" if lvl.name == dev.default_level else text)
        off = "none"
        if dev.offchip_capacity_bytes:
            bw = dev.offchip_bandwidth_bytes_per_s
            off = format_bytes(dev.offchip_capacity_bytes) + (f" @ {bw / 1e12:.2f} TB/s" if bw else "")
        fp16 = dev.peak_flops("fp16") or dev.peak_flops("bf16")
        level = dev.level()
        table.add_row(
            dev.name,
            dev.full_name,
            "\n".join(levels),
            off,
            f"{fp16 / 1e12:,.0f} TFLOP/s" if fp16 else "unknown",
            level.as_of,
            level.source,
        )
    return table
