"""``cachefit probe``: measure this machine's memory hierarchy and write a device file."""


from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer


class BackendOpt(str, Enum):
    auto = "auto"
    torch = "torch"
    cuda = "cuda"
    numpy = "numpy"


class KernelOpt(str, Enum):
    auto = "auto"
    read = "read"
    gemv = "gemv"


def register(app: typer.Typer) -> None:
    from cachefit.commands.options import JsonOption, console, handles_errors, print_json

    @app.command()
    @handles_errors
    def probe(
        out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the device file (JSON) here; `--device FILE` reads it.")] = None,
        plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a PNG of bandwidth against working set.")] = None,
        quick: Annotated[bool, typer.Option("--quick", help="A short sweep: 64 KiB to 512 MiB, 3 sizes an octave, 7 passes.")] = False,
        backend: Annotated[BackendOpt, typer.Option("--backend", help="auto: cuda if torch sees a GPU, else torch on the CPU, else numpy.")] = BackendOpt.auto,
        kernel: Annotated[KernelOpt, typer.Option("--kernel", help="What finds the capacities: read (a byte-wise max reduction, overhead removed; the CPU default) or gemv (the only choice on CUDA). Bandwidths are always the GEMV's.")] = KernelOpt.auto,
        threads: Annotated[int, typer.Option("--threads", help="CPU threads (1: what one core sees; 0: all cores).", min=0)] = 1,
        min_size: Annotated[Optional[str], typer.Option("--min-size", help="Smallest working set, e.g. 16KiB.")] = None,
        max_size: Annotated[Optional[str], typer.Option("--max-size", help="Largest working set, e.g. 1GiB.")] = None,
        passes: Annotated[Optional[int], typer.Option("--passes", help="Repeats of the whole sweep.", min=1)] = None,
        quantile: Annotated[float, typer.Option("--quantile", help="Which pass time each size keeps: 0.5 the median; 0.2 on a busy machine.", min=0.0, max=1.0)] = 0.5,
        name: Annotated[Optional[str], typer.Option("--name", help="Device name in the file (default local-cpu / local-cuda).")] = None,
        raw: Annotated[Optional[Path], typer.Option("--raw", help="Also write every pass's time of every size (JSON).")] = None,
        as_json: JsonOption = False,
    ) -> None:
        """Measure this machine's caches (read and GEMV sweeps) and peak FLOP/s; write a device file."""
        import json

        from cachefit.files import check_writable, write_text_atomic
        from cachefit.hardware.devices import format_bandwidth, parse_device
        from cachefit.hardware.probe import ProbeConfig, probe_device
        from cachefit.report.probe_plot import plot_probe
        from cachefit.sizes import format_bytes, parse_bytes

        # refuse an unwritable path now, not after a sweep of minutes
        for path, what, suffix in ((out, "--out", None), (raw, "--raw", None), (plot, "--plot", ".png")):
            if path is not None:
                check_writable(path, what=what, suffix=suffix)
        fields: dict[str, object] = {"backend": backend.value, "threads": threads or None, "quantile": quantile,
                                     "kernel": kernel.value}
        if min_size is not None:
            fields["min_bytes"] = parse_bytes(min_size, what="--min-size")
        if max_size is not None:
            fields["max_bytes"] = parse_bytes(max_size, what="--max-size")
        if passes is not None:
            fields["passes"] = passes
        config = ProbeConfig.quick(**fields) if quick else ProbeConfig(**fields)
        result = probe_device(config, name=name)
        doc = result.to_device_dict()
        parse_device(doc, where="probe result")  # the file must read back as a device
        for path, what, payload in ((out, "--out", doc), (raw, "--raw", result.to_dict())):
            if path is not None:
                write_text_atomic(path, json.dumps(payload, indent=2) + "\n", what=what)
        if plot is not None:
            plot_probe(result, plot)
        if as_json:
            print_json(doc)
            return

        from rich.table import Table

        threads_text = "" if result.backend == "cuda" else f", {result.threads or 'all'} thread(s)"
        table = Table(title=f"{result.full_name}: {result.backend}{threads_text}, {result.dtype}, "
                            f"{len(result.samples)} sizes x {len(result.samples[0].times_s)} passes "
                            f"in {result.elapsed_s:.1f} s", title_justify="left")
        for col in ("level", "capacity", "reported", "GEMV bandwidth", "read bandwidth", "drop after"):
            table.add_column(col, justify="left" if col == "level" else "right")
        reported = dict(result.reported_caches)
        for lvl in result.levels:
            if lvl.capacity_bytes is None:
                cap = format_bytes(result.offchip_capacity_bytes, binary=True) + " (system)" \
                    if result.offchip_capacity_bytes else "-"
                rep = "-"
            else:
                cap = format_bytes(lvl.capacity_bytes, binary=True)
                size = lvl.reported_bytes or reported.get(lvl.name)
                rep = format_bytes(size, binary=True) if size else "-"
            drop = f"{lvl.drop_fraction:.0%}" if lvl.drop_fraction is not None else "-"
            read_bw = format_bandwidth(lvl.bandwidth_bytes_per_s) if result.gemv_samples else "-"
            table.add_row(lvl.name, cap, rep, format_bandwidth(result.level_bandwidth(lvl)), read_bw, drop)
        console.print(table)
        for dtype, flops in result.peak_flops_per_s:
            console.print(f"peak {dtype} matmul: {flops / 1e9:,.1f} GFLOP/s")
        k = result.kernel_overhead
        if k is not None:
            console.print(f"per-kernel overhead: {k.per_kernel_s * 1e6:,.2f} us ({k.hidden}-wide eager layer: "
                           f"{k.layer_s * 1e6:,.1f} us / {k.kernels} kernels; a tiny matmul alone "
                           f"{k.tiny_op_s * 1e6:,.2f} us)")
        unmatched = [n for n in reported if n not in {lvl.name for lvl in result.levels}]
        if unmatched:
            console.print("[dim]not seen as a cliff: " + ", ".join(
                f"{n} ({format_bytes(reported[n], binary=True)} reported)" for n in unmatched) + "[/]")
        for path, what in ((out, "device file"), (raw, "raw measurements"), (plot, "chart")):
            if path is not None:
                console.print(f"{what} written to {path}")
