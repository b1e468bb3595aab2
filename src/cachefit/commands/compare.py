"""``cachefit compare``: cachefit's plan beside cache-oblivious layouts on the same K cards."""

from enum import Enum
from typing import Annotated, Any, Optional

import typer


class ScheduleOpt(str, Enum):
    one_f_one_b = "1f1b"
    gpipe = "gpipe"


class ObjectiveOpt(str, Enum):
    """What cachefit's plan minimizes among the layouts that fit (``cachefit.plan.OBJECTIVES``)."""

    cards = "cards"
    time = "time"


ObjectiveOption = Annotated[ObjectiveOpt, typer.Option(
    "--objective",
    help="cards: the fewest cards that fit (with --cards K: the smallest largest stage in bytes); time: on the "
         "same cards, the smallest predicted bottleneck stage time (the cost model's, per card as compare "
         "reports it).")]


def _fmt_s(value: Optional[float]) -> str:
    from cachefit.sizes import format_seconds

    return format_seconds(value, digits=3)


def _fmt_rate(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:,.1f}"


def comparison_table(comparison: Any) -> Any:
    """A rich table of a :class:`cachefit.cost.Comparison`, one row per layout."""
    from rich.table import Table

    from cachefit.sizes import format_bytes

    wl = comparison.workload
    title = (
        f"{comparison.model} on {comparison.num_cards} card(s) · {wl['mode']} batch {wl['batch']} seq {wl['seq_len']} "
        f"· {comparison.micro_batches} micro-batch(es), {comparison.schedule}"
    )
    table = Table(title=title, title_justify="left")
    for name, justify in (("layout", "left"), ("cards", "right"), ("fits on-chip", "left"),
                          ("off-chip / token", "right"), ("tokens/s", "right"), ("latency", "right"),
                          ("memory util.", "right"), ("compute util.", "right"), ("bound by", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for item in comparison.layouts:
        if item.plan is None or item.cost is None:
            table.add_row(item.name, "-", "[dim]n/a[/]", "-", "-", "-", "-", "-", "[dim]skipped (below)[/]")
            continue
        cost = item.cost
        fits = "[green]yes[/]" if item.fits_on_chip else "[bold red]NO[/]"
        if not cost.possible:
            fits = "[bold red]NO (cannot run)[/]"
        bounds = sorted({s.bound for s in cost.stages})
        util = cost.compute_utilization
        if cost.possible and cost.missing:
            needs = f"[yellow]unknown (needs {', '.join(cost.missing)})[/]"
            rate, latency = needs, "unknown"
        else:
            rate, latency = _fmt_rate(cost.throughput_tokens_per_s), _fmt_s(cost.latency_s)
        table.add_row(
            item.name,
            str(item.cards),
            fits,
            format_bytes(cost.offchip_bytes_per_token),
            rate,
            latency,
            f"{item.plan.mean_utilization * 100:.1f}%",
            "-" if util is None else f"{util * 100:.3f}%",
            ", ".join(bounds),
        )
    return table


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
    @shared_options(measure=True)
    def compare(
        model: Annotated[str, typer.Argument(help="A preset name, a config.json, or a Hugging Face model directory.")],
        cards: Annotated[Optional[int], typer.Option("--cards", "-k", help="Cards every layout may use; default: the fewest on which cachefit's plan fits.", min=1)] = None,
        allow: Annotated[str, typer.Option("--allow", help="Compression cachefit may apply (the baselines never compress).")] = "",
        shared: SharedArgs = None,  # type: ignore[assignment] - the card and workload options (shared_options)
        schedule: Annotated[ScheduleOpt, typer.Option("--schedule", help="Pipeline schedule (the same in inference).")] = ScheduleOpt.one_f_one_b,
        steps_per_load: Annotated[Optional[int], typer.Option("--steps-per-load", help="Charge the load of on-chip weights once every N steps (1: every step); default: loaded once, resident.", min=1)] = None,
        link_latency_us: Annotated[Optional[float], typer.Option("--link-latency-us", help="Latency of one chip-to-chip message for every device, in microseconds (an assumption); default: each device's catalog hop_latency.", min=0.0)] = None,
        objective: ObjectiveOption = ObjectiveOpt.cards,
        as_json: JsonOption = False,
    ) -> None:
        """Compare cachefit's plan with cache-oblivious layouts (uniform layers, greedy DRAM, tensor parallel)."""
        from cachefit.cost import compare_layouts, min_cards_to_fit
        from cachefit.errors import InfeasiblePlanError
        from cachefit.limits import check_limit

        if cards is not None:  # before any layout is built for that many cards
            check_limit(cards, "MAX_CARDS", where="", what="--cards")
        cluster = shared.cluster()
        prof = shared.profile(model)
        micro_batches, stacking = shared.micro_batches, shared.stacking
        techniques = [a for a in allow.split(",") if a.strip()]
        if cards is None:
            cards = len(cluster) if len(cluster) > 1 else min_cards_to_fit(
                prof, cluster, allow=techniques, stacking=stacking.value)
            if cards is None:
                raise InfeasiblePlanError(
                    f"{prof.model}: no cachefit plan fits any number of these cards; give --cards K to compare "
                    "the layouts anyway"
                )
        comparison = compare_layouts(prof, cluster, cards, techniques, micro_batches=micro_batches,
                                     schedule=schedule.value, steps_per_load=steps_per_load,
                                     stacking=stacking.value, objective=objective.value,
                                     link_latency_s=None if link_latency_us is None else link_latency_us * 1e-6)
        if as_json:
            from cachefit.profile import memory_source

            print_json({**comparison.to_dict(), "memory_source": memory_source(prof)})
            return
        console.print(comparison_table(comparison))
        own = comparison.layout("cachefit")
        if comparison.min_cards_to_fit is None:
            console.print("[bold red]no cachefit plan fits on-chip on any number of these cards[/]")
        elif not own.fits_on_chip:
            console.print(
                f"[bold red]cachefit's layout on {cards} card(s) DOES NOT FIT on-chip[/]: shown is its balanced "
                f"partition with the overflow streamed from off-chip memory; a fitting plan needs "
                f"{comparison.min_cards_to_fit} card(s)"
            )
        else:
            console.print(f"[green]cachefit's plan fits on-chip[/] (the fewest cards that fit: {comparison.min_cards_to_fit})")
        unknown = [item for item in comparison.layouts if item.cost is not None and item.cost.possible
                   and item.cost.missing]
        if unknown:
            console.print(
                f"[yellow]tokens/s and latency unknown for {len(unknown)} layout(s)[/]: a device figure they need is "
                "not in the catalog (add it with a device file); the layouts are ranked by off-chip bytes per token, "
                "which is known for all"
            )
        if steps_per_load is None:
            console.print("[dim]weights that fit on-chip are loaded once and stay resident (not charged per step); "
                           "--steps-per-load 1 charges a reload every step[/]")
        for item in comparison.layouts:
            if item.skipped:
                console.print(f"[dim]skipped:[/] {item.skipped}")
            for note in item.plan.notes if item.plan else ():
                console.print(f"[dim]{item.name}:[/] {note}")
