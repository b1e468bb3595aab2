"""A self-contained HTML report of a plan: tables, charts, the comparison and every source.

One file, no network: the charts are PNGs embedded as base64 ``data:`` URIs, the CSS is inline and
there is no script. The page holds the plan table, the per-card memory chart
(:func:`cachefit.report.plots.plot_plan`), the pipeline timeline
(:func:`cachefit.report.timeline.plot_timeline`), the cost per card, the comparison against the
cache-oblivious baselines (when given), the workload, and each device figure with its source and date.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cachefit.sizes import format_bytes, format_seconds

if TYPE_CHECKING:
    from cachefit.cost.baselines import Comparison
    from cachefit.cost.pipeline import PlanCost
    from cachefit.hardware.devices import Cluster
    from cachefit.plan import Plan
    from cachefit.units import ModelProfile

log = logging.getLogger(__name__)

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1200px;
       color: #222; line-height: 1.4; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 1.8em;
     border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.55em; vertical-align: top; }
th { background: #f3f3f3; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.ok { color: #1a7f37; font-weight: bold; } .bad { color: #c62828; font-weight: bold; }
.muted { color: #666; font-size: 0.85em; } img { max-width: 100%; border: 1px solid #eee; }
ul.notes li { margin: 0.2em 0; } .summary td:first-child { font-weight: bold; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _s(value: float | None) -> str:
    return format_seconds(value, unknown="unknown", digits=3)


def _pct(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value * 100:.{digits}f}%"


def _rate(value: float | None) -> str:
    return "unknown" if value is None else f"{value:,.1f}"


def _table(headers: Sequence[str], rows: Iterable[Sequence[tuple[str, bool]]], *, table_id: str = "") -> str:
    """An HTML table; each cell is (already escaped html, numeric?)."""
    attr = f' id="{_e(table_id)}"' if table_id else ""
    out = [f"<table{attr}>", "<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in headers) + "</tr></thead>", "<tbody>"]
    for row in rows:
        out.append("<tr>" + "".join(f'<td class="num">{c}</td>' if num else f"<td>{c}</td>" for c, num in row) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _plan_rows(plan: Plan) -> list[list[tuple[str, bool]]]:
    from cachefit.report.tables import stage_groups

    rows = []
    for stage, count in stage_groups(plan):
        fp = stage.footprint
        cards = str(stage.card) if count == 1 else f"{stage.card}-{stage.card + count - 1}"
        names = stage.unit_names
        units = names[0] if len(names) == 1 else f"{names[0]} … {names[-1]} ({len(names)})"
        if count > 1:
            units += f" [{count}-way split, per card]"
        verdict = '<span class="ok">fits</span>' if stage.fits else '<span class="bad">does not fit</span>'
        rows.append([
            (_e(cards), True), (_e(f"{stage.device}:{stage.level}"), False), (_e(units), False),
            (_e(",".join(stage.compression) or "-"), False),
            (_e(format_bytes(fp.weight_bytes)), True), (_e(format_bytes(fp.activation_bytes)), True),
            (_e(format_bytes(fp.buffer_bytes)), True), (_e(format_bytes(fp.total_bytes)), True),
            (_e(format_bytes(stage.capacity_bytes)), True), (_e(_pct(stage.utilization)), True), (verdict, False),
        ])
    return rows


def _cost_rows(cost: PlanCost) -> list[list[tuple[str, bool]]]:
    rows = []
    seen: set[int] = set()
    for sc in cost.stages:
        if sc.pipeline_stage in seen:  # the shards of a split stage cost the same: show the first
            continue
        seen.add(sc.pipeline_stage)
        count = sum(1 for x in cost.stages if x.pipeline_stage == sc.pipeline_stage)
        cards = str(sc.card) if count == 1 else f"{sc.card}-{sc.card + count - 1}"
        rows.append([
            (_e(sc.pipeline_stage), True), (_e(cards), True), (_e(_s(sc.compute_s)), True), (_e(_s(sc.onchip_s)), True),
            (_e(_s(sc.offchip_s)), True),
            (_e(f"{sc.kernels_per_micro_batch} x = {_s(sc.kernel_s)}" if sc.kernel_s is not None
                else f"{sc.kernels_per_micro_batch} (launch cost unknown)"), True),
            (_e(_s(sc.collective_s)), True), (_e(_s(sc.time_s)), True), (_e(sc.bound), False),
            (_e(format_bytes(sc.streamed_weight_bytes)), True),
            (_e(format_bytes(sc.offchip_bytes_per_micro_batch)), True),
        ])
    return rows


def _comparison_rows(comparison: Comparison) -> list[list[tuple[str, bool]]]:
    rows = []
    for item in comparison.layouts:
        cost = item.cost
        if item.plan is None or cost is None:
            rows.append([(_e(item.name), False), ("-", True), ('<span class="muted">n/a</span>', False),
                         ("-", True), ("-", True), ("-", True), ("-", True), (_e(f"skipped: {item.skipped}"), False)])
            continue
        fits = '<span class="ok">yes</span>' if item.fits_on_chip else '<span class="bad">NO</span>'
        if not cost.possible:
            fits = '<span class="bad">NO (cannot run)</span>'
        star = "" if cost.complete else " *"
        rows.append([
            (_e(item.name), False), (_e(item.cards), True), (fits, False),
            (_e(format_bytes(cost.offchip_bytes_per_token)), True),
            (_e(_rate(cost.throughput_tokens_per_s) + star), True), (_e(_s(cost.latency_s) + star), True),
            (_e(_pct(item.plan.mean_utilization)), True), (_e("; ".join(item.plan.notes)), False),
        ])
    return rows


def _source_rows(cluster: Cluster) -> list[list[tuple[str, bool]]]:
    rows = []
    for device in cluster.devices:
        for key, fig in device.iter_figures():
            if fig.value is None:
                value = "unknown"
            elif "bandwidth" in key:
                value = f"{fig.value / 1e12:,.3f} TB/s"
            elif "flops" in key:
                value = f"{fig.value / 1e12:,.1f} TFLOP/s"
            else:
                value = f"{int(fig.value):,} B ({format_bytes(fig.value)})"
            source = _e(fig.source)
            if fig.source.startswith(("http://", "https://")) and ";" not in fig.source:
                source = f'<a href="{_e(fig.source)}">{_e(fig.source)}</a>'
            rows.append([(_e(device.name), False), (_e(key), False), (_e(value), True),
                         (_e("uncertain" if fig.uncertain else ""), False), (_e(fig.as_of), False),
                         (source + (f'<br><span class="muted">{_e(fig.note)}</span>' if fig.note else ""), False)])
    return rows


def render_report(
    plan: Plan,
    profile: ModelProfile,
    cluster: Cluster,
    cost: PlanCost,
    *,
    memory_png: Path | None = None,
    timeline_png: Path | None = None,
    comparison: Comparison | None = None,
) -> str:
    """The report page as a string (charts read from the given PNG files and embedded)."""
    from cachefit.version import __version__

    verdict = ('<span class="ok">every card fits its on-chip memory</span>' if plan.feasible
               else '<span class="bad">DOES NOT FIT on-chip</span>')
    wl = profile.workload
    parts: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>cachefit report: {_e(plan.model)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>cachefit report: {_e(plan.model)}</h1>",
        f'<p class="muted">cachefit {_e(__version__)} · generated {_e(_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))}'
        f" · model source: {_e(profile.source or profile.model)}</p>",
        f"<p>{_e(plan.cards)} card(s), objective {_e(plan.objective)}, stacking {_e(plan.stacking)}: {verdict}.</p>",
        '<h2 id="summary">Predicted cost</h2>',
        _table(("figure", "value"), [
            [(_e(k), False), (_e(v), True)] for k, v in (
                ("throughput (tokens/s)", _rate(cost.throughput_tokens_per_s)),
                ("latency of one micro-batch", _s(cost.latency_s)),
                ("step (all micro-batches)", _s(cost.step_s)),
                ("bottleneck per micro-batch", _s(cost.bottleneck_s)),
                ("pipeline stages", str(cost.pipeline_stages)),
                ("micro-batches, schedule", f"{cost.micro_batches}, {cost.schedule}"),
                ("idle (bubble) fraction, simulated", _pct(cost.bubble_fraction)),
                ("idle fraction, (p-1)/(m+p-1)", _pct(cost.schedule_bubble_fraction)),
                ("off-chip bytes per token", format_bytes(cost.offchip_bytes_per_token)),
                ("one-time load of on-chip weights", format_bytes(cost.load_bytes)),
                ("mean memory utilization", _pct(cost.mean_utilization)),
                ("compute utilization", _pct(cost.compute_utilization, 3)),
            )
        ], table_id="cost-summary"),
    ]
    if not cost.complete:
        parts.append('<p class="bad">Some device figure is unknown: times are lower bounds (see the notes).</p>')
    parts += ['<h2 id="plan">Plan</h2>', _table(
        ("card", "device", "units", "compression", "weights", "activations", "buffers", "total", "capacity",
         "utilization", "verdict"), _plan_rows(plan), table_id="plan-table")]
    if memory_png is not None:
        parts += ['<h2 id="memory">Bytes per card against capacity</h2>', _img(memory_png, "per-card memory chart")]
    parts += ['<h2 id="timeline">Pipeline timeline</h2>']
    if timeline_png is not None:
        parts.append(_img(timeline_png, "pipeline timeline"))
    parts += ['<h2 id="stage-cost">Cost per pipeline stage (one micro-batch)</h2>', _table(
        ("stage", "cards", "compute", "on-chip", "off-chip", "kernels", "collectives", "time", "bound by",
         "streamed weights", "off-chip bytes"), _cost_rows(cost), table_id="stage-cost-table")]
    if comparison is not None:
        parts += [
            f'<h2 id="comparison">Against cache-oblivious layouts on {_e(comparison.num_cards)} card(s)</h2>',
            _table(("layout", "cards", "fits on-chip", "off-chip / token", "tokens/s", "latency", "memory util.", "notes"),
                   _comparison_rows(comparison), table_id="comparison-table"),
            "<p>" + (f"cachefit's plan fits on-chip from {_e(comparison.min_cards_to_fit)} card(s)."
                     if comparison.min_cards_to_fit is not None else
                     '<span class="bad">No cachefit plan fits on-chip on any number of these cards.</span>') + "</p>",
        ]
    notes = list(plan.notes) + [n for n in cost.notes if n not in plan.notes]
    if notes:
        parts += ['<h2 id="notes">Notes</h2>', '<ul class="notes">' + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>"]
    parts += [
        '<h2 id="workload">Workload</h2>',
        _table(("field", "value"), [[(_e(k), False), (_e(v), False)] for k, v in wl.to_dict().items()],
               table_id="workload-table"),
        '<h2 id="devices">Cards and device figures, with their sources</h2>',
        f"<pre>{_e(cluster.describe())}</pre>",
        _table(("device", "figure", "value", "", "as of", "source"), _source_rows(cluster), table_id="sources-table"),
        '<h2 id="assumptions">Cost model assumptions</h2>',
        "<ul>"
        "<li>Per card: time = max(compute, on-chip traffic, off-chip traffic) (roofline) + the fixed cost of its "
        "kernels (or, on compiled dataflow devices, of its layers) + collectives.</li>"
        "<li>Bytes beyond a card's capacity come from the weights first and are streamed from off-chip memory "
        "every micro-batch; the rest stays on-chip (pinned; optimistic for LRU caches).</li>"
        "<li>Link: one direction gets half the published both-directions bandwidth; "
        + (f"{cost.link_latency_s * 1e6:g} µs per message (an assumption).</li>" if cost.link_latency_s is not None
           else "each device's catalog hop latency per message.</li>")
        + (f"<li>Times unknown: the estimate needs {_e(', '.join(cost.missing))}.</li>" if cost.missing else "")
        + "<li>Weight-only int8/int4 run at the activation dtype's peak; 2:4 sparsity at the dense peak.</li>"
        + ("<li>Weights that fit are loaded once and stay resident (the load is reported, not charged per step).</li>"
           if cost.steps_per_load is None else
           f"<li>The load of on-chip weights is charged once every {_e(cost.steps_per_load)} step(s).</li>")
        + "</ul>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def write_report(
    plan: Plan,
    profile: ModelProfile,
    cluster: Cluster,
    out_dir: str | os.PathLike,
    comparison: Comparison | None = None,
    *,
    cost: PlanCost | None = None,
    micro_batches: int | None = None,
    schedule: str = "1f1b",
    steps_per_load: int | None = None,
    what: str = "report",
) -> Path:
    """Write ``index.html`` (self-contained) and its charts (``memory.png``, ``timeline.png``) to ``out_dir``.

    A new ``out_dir`` appears whole or not at all (built in a hidden sibling folder, then renamed);
    into an existing one, each of the three files is replaced whole and other files there are kept
    (:func:`cachefit.files.atomic_directory`).

    Args:
        plan: the plan to report.
        profile: the profile the plan was made from.
        cluster: the cards (for the cost model and the device sources).
        out_dir: folder to write into (created if missing; its parent must exist).
        comparison: the baselines on the same cards (:func:`cachefit.cost.compare_layouts`), if any.
        cost: the plan's cost; None: estimated here with ``micro_batches``, ``schedule``, ``steps_per_load``.
        what: how the user named ``out_dir`` (e.g. ``--report``), for error messages.

    Returns:
        The path of ``index.html``.

    Raises:
        ConfigError: ``out_dir`` cannot be created or written, or the plan does not match the profile.
    """
    from cachefit.cost.pipeline import estimate_cost
    from cachefit.files import atomic_directory
    from cachefit.report.plots import render_plan_png
    from cachefit.report.timeline import render_timeline_png

    if cost is None:
        cost = estimate_cost(plan, profile, cluster, micro_batches=micro_batches, schedule=schedule,
                             steps_per_load=steps_per_load)
    memory, timeline = render_plan_png(plan), render_timeline_png(cost)
    with atomic_directory(out_dir, what=what) as tmp:
        # plain writes: the folder as a whole is what is atomic, and an OSError here is reported
        # against ``out_dir``, not this temporary folder
        (tmp / "memory.png").write_bytes(memory)
        (tmp / "timeline.png").write_bytes(timeline)
        page = render_report(plan, profile, cluster, cost, memory_png=tmp / "memory.png",
                             timeline_png=tmp / "timeline.png", comparison=comparison)
        (tmp / "index.html").write_text(page, encoding="utf-8")
    index = Path(out_dir) / "index.html"
    log.info("report written to %s", index)
    return index


def _bytes(value: Any) -> str:
    return format_bytes(value) if isinstance(value, (int, float)) and value else "-"


def render_run_report(report: dict[str, Any]) -> str:
    """A run's page (``cachefit run --report DIR``): per card, what the plan counted against what ran.

    ``report`` is the run's JSON (``cachefit run --json``): per stage the planned weights and total bytes,
    the card's capacity, the weights held and the measured peak, the forward time; the timings; in
    decode the cost model's prediction beside the measurement; the check's verdict.
    """
    from cachefit.version import __version__

    run = report.get("run", {})
    over = (report.get("fit") or {}).get("over_capacity", [])
    verdict = ('<span class="ok">every stage stayed within its card\'s capacity</span>' if not over else
               f'<span class="bad">over capacity: {_e(", ".join(over))}</span>')
    rows = []
    for st in report.get("stages", []):
        measured, capacity = st.get("measured_peak_bytes"), st.get("capacity_bytes")
        util = _pct(measured / capacity) if measured and capacity else "-"
        fwd = st.get("forward_s_mean")
        rows.append([
            (_e(st.get("stage")), True), (_e(",".join(str(r) for r in st.get("ranks", []))), False),
            (_e(st.get("description", "")), False),
            (_bytes(st.get("planned_weight_bytes")), True), (_bytes(st.get("measured_weight_bytes")), True),
            (_bytes(st.get("planned_total_bytes")), True),
            (('<span class="bad">' + _bytes(measured) + "</span>") if st.get("over_capacity") else _bytes(measured),
             True),
            (_bytes(capacity), True), (util, True),
            (_s(fwd) if fwd is not None else "-", True),
            (_pct(st.get("busy_fraction")) if st.get("busy_fraction") is not None else "-", True),
        ])
    t = report.get("timings", {})
    summary = [("mode, schedule, dtype", f"{run.get('mode')}, {run.get('schedule')}, {run.get('dtype')}"),
               ("micro-batches (decode: groups in flight)", str(run.get("micro_batches"))),
               ("inputs", str(report.get("input_shape"))),
               ("tokens/s, measured", _rate(t.get("tokens_per_s"))),
               ("mean step", _s(t.get("mean_step_s")))]
    if t.get("ms_per_token") is not None:
        summary.append(("between a sequence's tokens, measured", _s(t["ms_per_token"] / 1e3)))
    predicted = report.get("predicted") or {}
    if "prediction" in predicted:
        p = predicted["prediction"]
        summary += [("tokens/s, predicted", _rate(p.get("tokens_per_s"))),
                    ("between a sequence's tokens, predicted", _s(p["ms_per_token"] / 1e3)),
                    ("stages busy, predicted", ", ".join(_pct(b) for b in p.get("busy_fractions", [])))]
    elif "unavailable" in predicted:
        summary.append(("prediction", predicted["unavailable"]))
    check = report.get("check")
    if check is not None:
        summary.append(("--check", "passed" if check.get("passed") else "FAILED"))
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>cachefit run: {_e(report.get('model'))}</title>", f"<style>{_CSS}</style></head><body>",
        f"<h1>cachefit run: {_e(report.get('model'))}</h1>",
        f'<p class="muted">cachefit {_e(__version__)} · generated '
        f'{_e(_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))}</p>',
        f"<p>{_e(report.get('stages_count'))} stage(s) on {_e(report.get('cards'))} card(s): {verdict}.</p>",
        '<h2 id="summary">Run</h2>',
        _table(("figure", "value"), [[(_e(k), False), (_e(v), True)] for k, v in summary], table_id="run-summary"),
        '<h2 id="cards">Planned against measured, per card</h2>',
        _table(("stage", "cards", "units", "weights planned", "weights held", "planned total", "measured peak",
                "capacity", "measured / capacity", "forward / micro-batch", "busy"), rows, table_id="run-cards"),
        f'<p class="muted">{_e((report.get("fit") or {}).get("note", ""))}</p>',
    ]
    notes = list(report.get("notes", [])) + list(predicted.get("notes", []))
    if notes:
        parts += ['<h2 id="notes">Notes</h2>', '<ul class="notes">' + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>"]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_run_report(report: dict[str, Any], out_dir: str | os.PathLike, *, what: str = "--report") -> Path:
    """Write :func:`render_run_report`'s page as ``index.html`` in ``out_dir`` (whole or not at all)."""
    from cachefit.files import atomic_directory

    with atomic_directory(out_dir, what=what) as tmp:
        (tmp / "index.html").write_text(render_run_report(report), encoding="utf-8")
    return Path(out_dir) / "index.html"


__all__ = ["render_report", "render_run_report", "write_report", "write_run_report"]
