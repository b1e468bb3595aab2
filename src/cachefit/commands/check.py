"""``cachefit check``: audit a device map made elsewhere against each card's on-chip memory."""


from pathlib import Path
from typing import Annotated

import typer


def _bytes(n: float) -> str:
    from cachefit.sizes import format_bytes

    return format_bytes(n) if n else "0"


def register(app: typer.Typer) -> None:
    from cachefit.commands.options import (
        JsonOption,
        SharedArgs,
        console,
        handles_errors,
        print_json,
        shared_options,
    )

    @app.command()
    @handles_errors
    @shared_options(micro_batches=False, device_help="Catalog name or device/cluster file (every card of the map alike, or one per card).")
    def check(
        model: Annotated[str, typer.Argument(help="A preset name, a config.json, or a Hugging Face model directory.")],
        device_map: Annotated[Path, typer.Option("--device-map", help="accelerate device map JSON: module name -> card index, 'cpu' or 'disk'.")],
        allow: Annotated[str, typer.Option("--allow", help="Compression cachefit's fixing plan may apply: int8,int4,sparse50,...")] = "",
        shared: SharedArgs = None,  # type: ignore[assignment] - the card and workload options (shared_options)
        as_json: JsonOption = False,
    ) -> None:
        """Check a device map (accelerate's format) against on-chip memory: fit, spill, off-chip bytes per token, the fix."""
        from rich.table import Table

        from cachefit.audit import audit_device_map, load_device_map
        from cachefit.report.tables import plan_table

        mapping = load_device_map(device_map)
        cluster = shared.cluster()
        prof = shared.profile(model)
        allowed = [a.strip() for a in allow.split(",") if a.strip()]
        audit = audit_device_map(prof, mapping, cluster, stacking=shared.stacking.value, allow=allowed)
        if as_json:
            print_json(audit.to_dict())
            return

        caps = {(c.device, c.level, c.capacity_bytes) for c in audit.cards}
        where = (f"{audit.cards[0].device} {audit.cards[0].level} ({_bytes(audit.cards[0].capacity_bytes)})"
                 if len(caps) == 1 else "its cards" if caps else "no card")
        names = [c.units[0] if len(c.units) == 1 else (f"{c.units[0]}…{c.units[-1]}" if c.units else "-")
                 for c in audit.cards]
        names += [o.units[0] if len(o.units) == 1 else f"{o.units[0]}…{o.units[-1]}" for o in audit.offloaded]
        verdict = "[green]fits on-chip[/]" if audit.fits else (
            f"[bold red]does not fit[/]: {_bytes(audit.offchip_bytes_per_token)} off-chip per token")
        table = Table(title=f"{model} · {device_map.name} on {where} · {verdict}", title_justify="left")
        for col in ("card", "units", "weights", "total", "used", "spill", "DRAM/tok"):
            if col == "units":
                table.add_column(col, overflow="ellipsis", min_width=min(18, max(map(len, names), default=5)))
            else:
                table.add_column(col, justify="right", no_wrap=True)
        for c, units in zip(audit.cards, names):
            spill = f"[bold red]{_bytes(c.spill_bytes)}[/]" if c.spill_bytes else "0"
            table.add_row(str(c.card), units, _bytes(c.weight_bytes), _bytes(c.total_bytes),
                          f"{c.utilization:.0%}", spill, _bytes(c.offchip_bytes_per_token))
        for o, units in zip(audit.offloaded, names[len(audit.cards):]):
            table.add_row(o.placement, units,
                          _bytes(o.weight_bytes), _bytes(o.weight_bytes), "-",
                          f"[bold red]{_bytes(o.weight_bytes)}[/]", _bytes(o.offchip_bytes_per_token))
        console.print(table)
        if audit.split_units:
            console.print(f"[dim]units spread over several devices:[/] {', '.join(audit.split_units)}")
        if audit.unmatched_keys:
            console.print(f"[dim]keys holding no weights of the profile:[/] {', '.join(audit.unmatched_keys)}")
        for line in audit.assumptions:
            console.print(f"[dim]assumption:[/] {line}", highlight=False)
        console.print(f"[bold]fix:[/] {audit.plan_note}", highlight=False)
        if audit.plan is not None:
            console.print(plan_table(audit.plan))
