"""Hardware for people: bandwidths as text and the catalog as Markdown tables (``docs/hardware.md``)."""

from __future__ import annotations

from collections.abc import Sequence

from cachefit.hardware.catalog import list_devices
from cachefit.hardware.spec import DeviceSpec
from cachefit.sizes import format_capacity, format_seconds


def format_bandwidth(bytes_per_s: float) -> str:
    """``format_bandwidth(7.0e12) == '7.00 TB/s'``."""
    for unit, scale in (("PB/s", 1e15), ("TB/s", 1e12), ("GB/s", 1e9), ("MB/s", 1e6)):
        if bytes_per_s >= scale:
            return f"{bytes_per_s / scale:.2f} {unit}"
    return f"{bytes_per_s:.0f} B/s"


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _fmt_value(key: str, value: float | int | None) -> str:
    if value is None:
        return "unknown"
    if key.endswith("capacity"):
        return f"{int(value):,} B ({format_capacity(int(value))})"
    if key.endswith("bandwidth"):
        return format_bandwidth(value)
    if key.startswith("peak_flops."):
        return f"{value / 1e12:,.1f} T{'OP' if 'int' in key else 'FLOP'}/s"
    if key in ("kernel_overhead", "hop_latency", "layer_latency"):
        return format_seconds(value, digits=2)
    return str(value)


def format_catalog_markdown(devices: Sequence[DeviceSpec] | None = None) -> str:
    """Markdown tables of the catalog: a summary, then every figure with its source and date."""
    devs = tuple(devices) if devices is not None else list_devices()
    out = [
        "| name | device | planning level | other on-chip levels | off-chip | dense FP16/BF16 |",
        "|---|---|---|---|---|---|",
    ]
    for dev in devs:
        lvl = dev.level()
        others = "; ".join(o.describe() for o in dev.levels if o.name != lvl.name) or "none"
        off = "none"
        if dev.offchip_capacity_bytes:
            off = format_capacity(dev.offchip_capacity_bytes)
            if dev.offchip_bandwidth_bytes_per_s:
                off += f" @ {format_bandwidth(dev.offchip_bandwidth_bytes_per_s)}"
        fp16 = dev.peak_flops("fp16") or dev.peak_flops("bf16")
        out.append(
            f"| `{dev.name}` | {_md(dev.full_name)} | **{_md(lvl.describe())}** | {_md(others)} | {off} | "
            f"{f'{fp16 / 1e12:,.0f} TFLOP/s' if fp16 else 'unknown'} |"
        )
    out += ["", "Every figure, with its source (U: uncertain; C: calibrated on the published result its source "
            "names, see docs/validation.md):", ""]
    for dev in devs:
        out += [
            f"#### `{dev.name}`: {_md(dev.full_name)}"
            + (f" (aliases: {', '.join(dev.aliases)})" if dev.aliases else ""),
            "",
        ]
        if dev.note:
            out += [_md(dev.note), ""]
        out += ["| figure | value | U | as of | source | note |", "|---|---|---|---|---|---|"]
        for key, fig in dev.iter_figures():
            value = _fmt_value(key, fig.value)
            if key.endswith(".capacity"):
                lvl = dev.level(key.split(".")[1])
                if lvl.scope != "chip":
                    value = f"{lvl.count} x {lvl.capacity_bytes:,} B = {value}"
            mark = "".join(m for m, on in (("U", fig.uncertain), ("C", fig.calibrated)) if on)
            out.append(f"| {key} | {value} | {mark} | {fig.as_of} | {_md(fig.source)} | {_md(fig.note)} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"
