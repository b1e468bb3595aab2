"""The ``cachefit`` command line: one typer app, thin commands (parse, call the library, render).

Exit codes: 0 success, 2 bad input, 3 no feasible plan, 1 anything else. A traceback is printed only
with ``--debug``. torch is imported only inside commands that need it, so ``--help`` is instant.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
import warnings
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperGroup

from cachefit.commands.options import (
    STATE,
    ActDtypeOption,
    AllowOption,
    AttentionOpt,
    CompressRolesOption,
    AttnOption,
    BatchOpt,
    DtypeOption,
    GranOption,
    GranularityOpt,
    JsonOption,
    KVCacheOpt,
    KVCacheOption,
    MeasureOption,
    ModeOpt,
    ModeOption,
    SeqOpt,
    SharedArgs,
    build_workload,
    choose_dtype,
    compression_config,
    console,
    err_console,
    handles_errors,
    print_error,
    print_json,
    print_note,
    shared_options,
)
from cachefit.commands.compare import ObjectiveOpt, ObjectiveOption
from cachefit.errors import CachefitError, ConfigError
from cachefit.limits import check_limit

try:  # newer typer carries its own copy of click
    from typer._click.exceptions import BadOptionUsage, BadParameter, MissingParameter, NoSuchOption, UsageError
except ImportError:  # pragma: no cover - older typer on click
    from click.exceptions import BadOptionUsage, BadParameter, MissingParameter, NoSuchOption, UsageError

# pydantic's error types (typer >= 0.25 validates options with pydantic) -> the comparison they test
_BOUNDS = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"),
           "less_than_equal": ("<=", "le"), "less_than": ("<", "lt")}


def _param_label(param: Any) -> str:
    """``--cards`` for an option (its long name), ``MODEL`` for an argument."""
    if param is None:
        return ""
    if getattr(param, "param_type_name", "") == "argument":
        return getattr(param, "metavar", None) or (param.name or "").upper()
    opts = [*getattr(param, "opts", ()), *getattr(param, "secondary_opts", ())]
    longs = [o for o in opts if o.startswith("--")]
    return max(longs or opts or [param.name or "?"], key=len)


def _bound(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _bad_value(exc: Any) -> str:
    """What is wrong with a parameter's value: ``must be >= 1 (got 0)``."""
    errors = exc.__cause__.errors() if hasattr(exc.__cause__, "errors") else []
    message, got = str(exc.message), None
    if errors:
        first = errors[0]
        kind, got, ctx = str(first.get("type", "")), first.get("input"), first.get("ctx") or {}
        if kind in _BOUNDS and _BOUNDS[kind][1] in ctx:
            op, key = _BOUNDS[kind]
            return f"must be {op} {_bound(ctx[key])} (got {got})"
        if kind.startswith("int_"):
            return f"must be a whole number (got {got!r})"
        if kind.startswith("float_"):
            return f"must be a number (got {got!r})"
        if kind.startswith("bool_"):
            return f"must be true or false (got {got!r})"
        message = str(first.get("msg", message))
    message = message.removeprefix("Value error, ").rstrip(".")
    choice = re.match(r"(?s)(.*) is not one of (.*)$", message)
    if choice:  # an Enum option: "'dance' is not one of 'prefill', 'decode', 'train'"
        names = re.findall(r"'([^']*)'", choice.group(2)) or [choice.group(2)]
        return f"must be one of {', '.join(names)} (got {choice.group(1) if got is None else repr(got)})"
    ranged = re.match(r"(?s)(.*) is not in the range (.*)$", message)
    if ranged:  # click's own range check (typer before pydantic)
        return f"must be in {ranged.group(2)} (got {ranged.group(1)})"
    return message[:1].lower() + message[1:]


_OPTION_PREFIX = re.compile(r"^Option '[^']*' ")


def _usage_message(exc: Any) -> str:
    """A click usage error as one line: what is wrong, where, and how to fix it."""
    ctx = getattr(exc, "ctx", None)
    hint = f"see `{ctx.command_path if ctx is not None else 'cachefit'} --help`"
    if isinstance(exc, MissingParameter):
        label = _param_label(exc.param)
        kind = "argument" if getattr(exc.param, "param_type_name", "") == "argument" else "option"
        return f"{label}: missing {kind}; give it ({hint})"
    if isinstance(exc, BadParameter):
        label = _param_label(exc.param) or str(exc.param_hint or "")
        return f"{label}: {_bad_value(exc)}" if label else _bad_value(exc)
    if isinstance(exc, NoSuchOption):
        close = f" (did you mean {' or '.join(exc.possibilities)}?)" if exc.possibilities else ""
        return f"{exc.option_name}: no such option{close}; {hint}"
    message = exc.format_message().rstrip(".")
    if isinstance(exc, BadOptionUsage):  # "Option '--cards' requires an argument."
        return f"{exc.option_name}: {re.sub(_OPTION_PREFIX, '', message)}; {hint}"
    # "No such command 'plna'. Did you mean 'plan'?", "Got unexpected extra argument (x)"
    message = re.sub(r"\.? Did you mean (.*?)\??$", r" (did you mean \1?)", message)
    return f"{message[:1].lower() + message[1:]}; {hint}"


class _OneLineErrors(TyperGroup):
    """The app's group: every error is one line on stderr and an exit code.

    Usage errors (a bad option value, an unknown option, a missing argument) print
    ``error: --cards: must be >= 1 (got 0)`` and exit 2 instead of click's usage panel; a cachefit
    error that reaches here (under ``--debug``, or outside a command) prints its traceback with
    ``--debug``, else one line, and exits with its own code. ``--help`` and the help shown for a
    bare ``cachefit`` are unchanged.
    """

    def main(self, args: Any = None, prog_name: Any = None, complete_var: Any = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        STATE["debug"] = False  # until the callback reads --debug (a usage error may come first)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except UsageError as exc:
            if type(exc).__name__ != "NoArgsIsHelpError":  # that one has printed the help already
                print_error(_usage_message(exc))
            sys.exit(2)
        except typer.Abort:
            err_console.print("aborted", highlight=False)
            sys.exit(1)
        except CachefitError as exc:
            if STATE["debug"]:
                traceback.print_exc()
            else:
                print_error(exc, exit_code=exc.exit_code)
            sys.exit(exc.exit_code)
        sys.exit(rv if isinstance(rv, int) and not isinstance(rv, bool) else 0)


app = typer.Typer(
    name="cachefit",
    help="Plan layer-wise deployments whose every card partition fits on-chip memory (SRAM / L2).",
    cls=_OneLineErrors,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors (and third-party warnings).")] = False,
) -> None:
    STATE["debug"] = debug


@app.command()
@handles_errors
def profile(
    model: Annotated[Optional[str], typer.Argument(help="A preset name, a config.json, or a Hugging Face model directory.")] = None,
    batch: BatchOpt = 1,
    seq: SeqOpt = 1024,
    mode: ModeOption = ModeOpt.decode,
    dtype: DtypeOption = None,
    act_dtype: ActDtypeOption = None,
    attention: AttnOption = AttentionOpt.eager,
    kv_cache: KVCacheOption = KVCacheOpt.static,
    granularity: GranOption = GranularityOpt.layer,
    measure: MeasureOption = False,
    list_presets: Annotated[bool, typer.Option("--list", help="List the built-in model presets.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Profile a model into ordered units with exact bytes (weights, activations, buffers) and FLOPs."""
    if list_presets:
        from cachefit.profile.presets import list_presets as _list

        presets = _list()
        if as_json:
            print_json([{"name": p.name, "family": p.family, "params": p.params, "source": p.source,
                          "as_of": p.as_of} for p in presets])
            return
        from rich.table import Table

        table = Table(title="built-in presets", title_justify="left")
        for col in ("name", "family", "params", "source"):
            table.add_column(col, justify="right" if col == "params" else "left")
        for p in presets:
            table.add_row(p.name, p.family, f"{p.params:,}", p.source)
        console.print(table)
        return
    if model is None:
        raise ConfigError("give a MODEL (a preset name, a config.json or a model directory); see `cachefit profile --list`")
    from cachefit.profile import MeasuredProfile, profile_model
    from cachefit.report.serialize import profile_to_dict
    from cachefit.report.tables import profile_table

    chosen = choose_dtype(model, dtype)
    prof = profile_model(model, build_workload(batch, seq, mode, chosen.dtype, act_dtype, attention, kv_cache=kv_cache),
                         granularity=granularity.value, measure=measure)
    print_note(chosen.note)
    measured = prof if isinstance(prof, MeasuredProfile) else None
    if as_json:
        doc = profile_to_dict(prof)
        doc["dtype_source"] = chosen.to_dict()
        doc.update(measured.measurement_dict() if measured is not None else {"memory_source": "analytic"})
        print_json(doc)
        return
    console.print(profile_table(prof))
    if measured is not None:
        _print_measured(measured)


def _print_measured(prof: Any) -> None:
    """What a measured profile ran, and the tensors that make the largest unit's peak."""
    from cachefit.sizes import format_bytes

    console.print(f"[dim]memory: measured[/] {prof.method}")
    top = max(prof.peaks, key=lambda p: p.peak_bytes)
    console.print(f"largest activation peak: {top.unit}, {format_bytes(top.peak_bytes)}, live then:")
    for t in top.live:
        shape = "x".join(str(d) for d in t.shape) or "scalar"
        console.print(f"  {format_bytes(t.nbytes):>12}  {shape} {t.dtype}  {t.kind}, {t.op} in {t.module or 'the model'}",
                      highlight=False)
    if top.other_count:
        console.print(f"  {format_bytes(top.other_bytes):>12}  {top.other_count} smaller tensors", highlight=False)


@app.command()
@handles_errors
def devices(
    name: Annotated[Optional[str], typer.Argument(help="Show one device (catalog name or device file) in full.")] = None,
    as_json: JsonOption = False,
) -> None:
    """List the device catalog: on-chip levels and exact capacities, with public sources."""
    from cachefit.hardware.devices import device_to_dict, list_devices, resolve_device
    from cachefit.report.tables import device_figures_table, devices_table

    devs = (resolve_device(name),) if name else list_devices()
    if as_json:
        print_json([device_to_dict(d) for d in devs])
    elif name:
        console.print(device_figures_table(devs[0]))
    else:
        console.print(devices_table(devs))


def _read_sizes(sizes: str | None, sizes_file: Path | None) -> list[int]:
    from cachefit.sizes import parse_sizes, read_sizes_file

    if (sizes is None) == (sizes_file is None):
        raise ConfigError("give exactly one of --sizes 3,5,2 or --sizes-file FILE (one size a line)")
    if sizes is not None:
        return parse_sizes(sizes, where="--sizes")
    return read_sizes_file(sizes_file, where=f"--sizes-file {sizes_file}")  # type: ignore[arg-type]


_PARTS_SHOWN = 20
"""Parts shown at each end of the `cachefit partition` table when there are more than twice as many."""


@app.command()
@handles_errors
def partition(
    sizes: Annotated[Optional[str], typer.Option("--sizes", help="Comma-separated unit sizes (bytes or with units: 3MB,5MB).")] = None,
    sizes_file: Annotated[Optional[Path], typer.Option("--sizes-file", help="File with one size a line.")] = None,
    capacity: Annotated[Optional[str], typer.Option("--capacity", "-c", help="Capacity of every card, e.g. 50MB.")] = None,
    cards: Annotated[Optional[int], typer.Option("--cards", "-k", help="Use at most K cards, minimizing the largest part.", min=1)] = None,
    verify: Annotated[bool, typer.Option("--verify", help="Check the result against an exact MILP (HiGHS, needs scipy; small inputs).")] = False,
    as_json: JsonOption = False,
) -> None:
    """Split a list of sizes, in order, into contiguous parts that each fit a capacity."""
    from cachefit.partition.contiguous import balanced, fewest_cards
    from cachefit.sizes import format_bytes, parse_bytes

    if cards is not None:
        check_limit(cards, "MAX_CARDS", where="", what="--cards")
    values = _read_sizes(sizes, sizes_file)
    cap = parse_bytes(capacity, what="--capacity") if capacity is not None else None
    if cards is None:
        if cap is None:
            raise ConfigError("give --capacity C (and optionally --cards K); without --cards the fewest cards that fit C are found")
        result = fewest_cards(values, cap)
    else:
        result = balanced(values, cards, capacity=cap)
    doc: dict[str, Any] = {
        "parts": [list(p) for p in result.parts],
        "part_sizes": list(result.part_sizes),
        "bottleneck": result.bottleneck,
        "cards": result.cards,
    }
    if verify:
        doc["verified"] = _verify_partition(values, cap, cards, result)
    if as_json:
        print_json(doc)
        return
    from rich.table import Table

    table = Table(title=f"{result.cards} part(s), largest {format_bytes(result.bottleneck)}", title_justify="left")
    for col in ("part", "units", "size", "capacity", "utilization"):
        table.add_column(col, justify="left" if col == "units" else "right")
    rows = list(enumerate(zip(result.parts, result.part_sizes)))
    # rich takes about a second to lay out 4,096 rows that no one reads on a terminal: show the first
    # and last parts and count the rest (--json lists every part)
    shown = rows if len(rows) <= 2 * _PARTS_SHOWN else [*rows[:_PARTS_SHOWN], None, *rows[-_PARTS_SHOWN:]]
    for row in shown:
        if row is None:
            table.add_row("...", f"{len(rows) - 2 * _PARTS_SHOWN:,} more parts (--json lists all)", "", "", "")
            continue
        i, ((start, end), size) = row
        table.add_row(str(i), f"{start}..{end - 1}", format_bytes(size),
                      format_bytes(cap) if cap else "-", f"{size / cap * 100:.1f}%" if cap else "-")
    console.print(table)
    if verify:
        console.print(f"verified against the MILP optimum: cards {doc['verified']['cards']}, "
                       f"largest part {format_bytes(doc['verified']['bottleneck'])}: [green]equal[/]")


def _verify_partition(values: list[int], cap: int | None, cards: int | None, result: Any) -> dict[str, Any]:
    """Solve the same instance exactly (MILP) and fail loudly if cachefit's answer is not optimal."""
    from cachefit.errors import CachefitError
    from cachefit.partition.exact import milp_balanced, milp_fewest

    if len(values) > 200:
        raise ConfigError(f"--verify: {len(values)} sizes is too many for the exact MILP; verify at most 200")
    try:
        exact = milp_fewest(values, cap) if cards is None else milp_balanced(values, cards, cap)  # type: ignore[arg-type]
    except ImportError:
        raise ConfigError("--verify needs scipy: pip install scipy") from None
    if exact is None or (exact.cards, exact.bottleneck) != (result.cards, result.bottleneck) and \
            not (cards is not None and exact.bottleneck == result.bottleneck):
        raise CachefitError(
            f"--verify: cachefit found {result.cards} cards / largest {result.bottleneck} B, the MILP "
            f"{None if exact is None else (exact.cards, exact.bottleneck)}: please report this"
        )
    return {"cards": exact.cards, "bottleneck": exact.bottleneck, "method": "milp (scipy HiGHS)"}


@app.command()
@handles_errors
@shared_options(measure=True)
def plan(
    model: Annotated[str, typer.Argument(help="A preset name, a config.json, or a Hugging Face model directory.")],
    cards: Annotated[Optional[int], typer.Option("--cards", "-k", help="Use exactly K cards (any K: units are split where K exceeds them; a partial fit, marked DOES NOT FIT, where K is too few); default: the fewest that fit.", min=1)] = None,
    allow: AllowOption = "",
    compress_roles: CompressRolesOption = "",
    shared: SharedArgs = None,  # type: ignore[assignment] - the card and workload options (shared_options)
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a PNG of per-card bytes against capacity.")] = None,
    report: Annotated[Optional[Path], typer.Option("--report", help="Write a self-contained HTML report (plan, charts, timeline, baselines, sources) to this directory.")] = None,
    pin: Annotated[Optional[list[str]], typer.Option("--pin", help="Pin units to a card: 'layers.0-3=0' (repeatable).")] = None,
    cut_after: Annotated[Optional[list[str]], typer.Option("--cut-after", help="Force a stage boundary after a unit (repeatable).")] = None,
    keep_whole: Annotated[Optional[list[str]], typer.Option("--keep-whole", help="Never split these units across cards, e.g. 'layers.*' (repeatable).")] = None,
    forbid: Annotated[Optional[list[str]], typer.Option("--forbid", help="Never apply techniques to units: 'head:int8,int4' (repeatable).")] = None,
    even_splits: Annotated[bool, typer.Option("--even-splits", help="Split units only over card counts that divide heads, MLP columns and vocabulary (as `cachefit run` deploys them).")] = False,
    any_order: Annotated[bool, typer.Option("--any-order", help="Cards of a mixed cluster are interchangeable: choose their order.")] = False,
    max_risk: Annotated[float, typer.Option("--max-risk", help="Skip technique sets whose combined quality risk exceeds this (0..1).", min=0.0, max=1.0)] = 1.0,
    quality: Annotated[Optional[Path], typer.Option("--quality", help="Quality file from `cachefit quality`: on the plan's cards, choose compression per unit for the least summed measured loss; the plan notes its predicted loss.")] = None,
    candidates: Annotated[bool, typer.Option("--candidates", help="Also show every technique set tried (cards, risk).")] = False,
    objective: ObjectiveOption = ObjectiveOpt.cards,
    as_json: JsonOption = False,
) -> None:
    """Plan a model over cards so every card's partition fits its on-chip memory."""
    from cachefit.plan.search import pareto_front, plan_partition
    from cachefit.report.tables import candidates_table, plan_table
    from cachefit.sizes import format_bytes

    if plot is not None:
        from cachefit.files import check_writable

        # the chart is written to exactly this path, so its name must say PNG
        check_writable(plot, what="--plot", suffix=".png")
    if cards is not None:
        check_limit(cards, "MAX_CARDS", where="", what="--cards")
    cluster = shared.cluster()
    prof = shared.profile(model)
    from cachefit.partition.overrides import Overrides, parse_forbid, parse_pin

    overrides = Overrides(
        pins=tuple(parse_pin(p) for p in pin or ()),
        cut_after=tuple(cut_after or ()),
        keep_whole=tuple(keep_whole or ()),
        forbid=tuple(parse_forbid(f) for f in forbid or ()),
    )
    allowed = [a.strip() for a in allow.split(",") if a.strip()]
    config = compression_config(compress_roles)
    if quality is not None and objective is ObjectiveOpt.time:
        raise ConfigError("--quality minimizes the measured loss and --objective time the predicted time; give one")
    # the cost model times every stage (predicted_time_s) as `cachefit compare` does; with --cards a
    # partial fit is chosen as compare chooses it: priced beside the baselines of the same cards
    from cachefit.cost import LayoutPricing, layout_pricing

    if cards is not None:
        pricing = layout_pricing(prof, cluster, cards, stacking=shared.stacking.value, config=config,
                                 micro_batches=shared.micro_batches)
    else:
        pricing = LayoutPricing(prof, cluster, config=config, micro_batches=shared.micro_batches)
    result, tried = plan_partition(prof, cluster, num_cards=cards, allow=allowed, stacking=shared.stacking.value,
                                   max_risk=max_risk, overrides=overrides, reorder_cards=any_order,
                                   even_splits=even_splits, config=config, pricing=pricing,
                                   objective=objective.value)
    if quality is not None:
        from cachefit.plan import with_stage_times

        result = _least_loss(prof, cluster, result, allowed, quality, config, shared.stacking.value,
                             not overrides.empty or any_order)
        result = with_stage_times(result, pricing.stage_times_s(result))
    front = pareto_front(tried)
    if plot is not None:
        from cachefit.report.plots import plot_plan

        plot_plan(result, plot, what="--plot")
    index = None
    if report is not None:
        from cachefit.cost import compare_layouts
        from cachefit.report.html import write_report

        comparison = compare_layouts(prof, cluster, result.cards, allowed, stacking=shared.stacking.value,
                                     config=config, objective=objective.value)
        index = write_report(result, prof, cluster, report, comparison, what="--report")
    if as_json:
        doc = result.to_dict()
        doc["dtype_source"] = shared.dtype_choice(model).to_dict()
        if allowed:
            doc["pareto_front"] = [c.to_dict() for c in front]
        if candidates:
            doc["candidates"] = [c.to_dict() for c in tried]
        print_json(doc)
        return
    console.print(plan_table(result))
    if result.memory_source == "measured":
        console.print(f"[dim]memory: measured[/] {prof.method}; measured units are not split across cards, "
                      "and fuse, ckpt, sparse50 and sparse75 do not apply to them")
    if not result.feasible:
        need = (f"a fit needs {result.cards_to_fit} card(s)" if result.cards_to_fit is not None
                else "no number of these cards fits")
        console.print(f"[bold red]DOES NOT FIT[/] on {result.cards} card(s): {need}; shown is the best partial fit, "
                      f"{format_bytes(sum(s.overflow_bytes for s in result.stages))} over capacity in all "
                      "(the 'over' column), streamed from off-chip memory")
    if result.compress_roles:
        console.print(f"[dim]note:[/] compression may also touch {', '.join(result.compress_roles)} (--compress-roles)")
    for note in result.notes:
        if not note.startswith("DOES NOT FIT"):  # the banner above says it
            console.print(f"[dim]note:[/] {note}")
    if candidates:
        console.print(candidates_table(tried))
    elif len(front) > 1:
        table = candidates_table(front)
        table.title = "Pareto front: cards vs quality risk (--candidates shows every set tried)"
        console.print(table)
    if plot is not None:
        console.print(f"chart written to {plot}")
    if index is not None:
        console.print(f"report written to {index}")


def _least_loss(prof: Any, cluster: Any, result: Any, allowed: list[str], quality: Path, config: Any, stacking: str,
                constrained: bool) -> Any:
    """``plan --quality``: the plan remade with the least summed measured loss (cachefit.plan.quality)."""
    from cachefit.compress.quality_profile import read_quality_file
    from cachefit.plan.quality import least_loss_plan
    from cachefit.plan.search import technique_sets

    if constrained:
        raise ConfigError("--quality chooses compression per unit on whole-unit layouts; drop --pin, --cut-after, "
                          "--keep-whole, --forbid and --any-order to use it")
    return least_loss_plan(prof, cluster, result, technique_sets(allowed), read_quality_file(quality), config=config,
                           stacking=stacking, source=quality.name)


def cli_reference() -> str:
    """The CLI reference in markdown, generated from the commands' own parameters and help."""
    import click

    root = typer.main.get_command(app)
    ctx = click.Context(root, info_name="cachefit")
    lines = [
        "# CLI reference",
        "",
        "Generated from the commands' own help: `cachefit cli-reference > docs/cli.md`.",
        "Every command takes `--help`; `cachefit --debug COMMAND ...` shows tracebacks.",
        "",
    ]
    for name in root.list_commands(ctx):  # type: ignore[attr-defined]
        cmd = root.get_command(ctx, name)  # type: ignore[attr-defined]
        if cmd is None or cmd.hidden:
            continue
        args = " ".join(p.human_readable_name.upper() for p in cmd.params if isinstance(p, click.Argument))
        lines += [f"## `cachefit {name}{' ' + args if args else ''}`", "", (cmd.help or "").strip(), ""]
        rows = []
        for param in cmd.params:
            if isinstance(param, click.Argument):
                rows.append((param.human_readable_name.upper(), getattr(param, "help", "") or "", ""))
                continue
            opts = ", ".join(f"`{o}`" for o in [*param.opts, *param.secondary_opts])
            default = param.default
            shown = "" if default in (None, False, (), []) or callable(default) else f"{getattr(default, 'value', default)}"
            rows.append((opts, (param.help or "").replace("|", "\\|"), shown))
        if rows:
            lines += ["| option | meaning | default |", "|---|---|---|"]
            lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
            lines.append("")
    return "\n".join(lines)


@app.command("cli-reference", hidden=True)
def _cli_reference_command() -> None:
    """Print the CLI reference (markdown)."""
    sys.stdout.write(cli_reference())


def _register_commands() -> None:
    """Add the commands defined in ``cachefit.commands`` (one module each, ``register(app)``)."""
    import importlib
    import pkgutil

    import cachefit.commands as commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"cachefit.commands.{info.name}")
        if hasattr(module, "register"):  # commands.options holds what they share, no command
            module.register(app)


_register_commands()


# Libraries whose import-time chatter (torchao's "Failed to load ..." of optional kernels, torch's
# pytree deprecation notice, triton and transformers warnings) is not the user's business unless
# --debug: their loggers go to ERROR and their Python warnings are ignored.
_QUIET_LOGGERS = ("torchao", "torch.utils._pytree", "triton", "transformers")
_QUIET_MODULES = r"(torch|torchao|triton|transformers|accelerate)(\..*)?"


def _quiet_third_party() -> None:
    """Silence third-party warnings before any of them is imported (called by :func:`main`)."""
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # transformers resets its own logger's level at import; it reads this variable then
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", module=_QUIET_MODULES)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``cachefit`` script: errors are one line and an exit code (0, 1, 2, 3)."""
    args = sys.argv[1:] if argv is None else list(argv)
    if "--debug" not in args:
        _quiet_third_party()
    app(args=args, prog_name="cachefit")


if __name__ == "__main__":
    main()
