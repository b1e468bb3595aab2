"""Pipeline timeline (Gantt chart) of one simulated step, as a PNG (matplotlib, headless Agg backend)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from cachefit.files import write_bytes_atomic

if TYPE_CHECKING:
    from cachefit.cost.pipeline import PlanCost


def _time_scale(span_s: float) -> tuple[float, str]:
    for scale, name in ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs")):
        if span_s >= scale:
            return scale, name
    return 1e-9, "ns"


def _stage_labels(cost: PlanCost) -> list[str]:
    cards: dict[int, list[int]] = {}
    for stage in cost.stages:
        cards.setdefault(stage.pipeline_stage, []).append(stage.card)
    labels = []
    for g in range(cost.pipeline_stages):
        members = cards.get(g, [])
        span = f"card {members[0]}" if len(members) == 1 else f"cards {members[0]}-{members[-1]}"
        labels.append(f"stage {g}\n{span}")
    return labels


def plot_timeline(cost: PlanCost, path: str | os.PathLike, *, max_stages: int = 64, what: str = "timeline") -> None:
    """Write :func:`render_timeline_png` to exactly ``path`` (atomically; see :mod:`cachefit.files`).

    Raises:
        ConfigError: ``path`` cannot be written; the message names ``what`` and ``path``.
    """
    write_bytes_atomic(path, render_timeline_png(cost, max_stages=max_stages), what=what)


def render_timeline_png(cost: PlanCost, *, max_stages: int = 64) -> bytes:
    """Draw the simulated step of ``cost`` as PNG bytes: one row per pipeline stage, one bar per
    micro-batch (forward solid, backward hatched), transfers as thin grey bars under the sending
    stage's row.

    Args:
        cost: a :class:`cachefit.cost.PlanCost` (its ``ops`` are the simulated step).
        max_stages: draw at most this many pipeline stages (the first ones), saying so in the title.
    """
    from cachefit.report.plots import png_bytes, pyplot

    plt = pyplot()
    rows = min(cost.pipeline_stages, max_stages)
    height = max(2.5, min(14.0, 0.45 * rows + 1.6))
    fig, ax = plt.subplots(figsize=(10, height), dpi=120)
    try:
        if not cost.ops:
            reason = "the plan cannot run" if not cost.possible else "a figure the schedule needs is unknown"
            ax.text(0.5, 0.5, f"no timeline: {reason}", ha="center", va="center", fontsize=11)
            ax.set_axis_off()
        else:
            span = max(op.end_s for op in cost.ops)
            scale, unit = _time_scale(span)
            cmap = plt.get_cmap("tab10")
            for op in cost.ops:
                if op.stage >= rows:
                    continue
                x0, width = op.start_s / scale, (op.end_s - op.start_s) / scale
                if op.kind in ("forward", "backward"):
                    ax.barh(op.stage, width, left=x0, height=0.7, color=cmap(op.micro_batch % 10),
                            edgecolor="black", linewidth=0.4, hatch="///" if op.kind == "backward" else None)
                    if cost.micro_batches <= 16 and width > span / scale / 60:
                        ax.text(x0 + width / 2, op.stage, ("B" if op.kind == "backward" else "F") + str(op.micro_batch),
                                ha="center", va="center", fontsize=6)
                elif width > 0:
                    ax.barh(op.stage + 0.43, width, left=x0, height=0.12, color="#888888")
            labels = _stage_labels(cost)[:rows]
            ax.set_yticks(list(range(rows)))
            ax.set_yticklabels(labels, fontsize=6 if rows > 12 else 8)
            ax.invert_yaxis()
            ax.set_xlabel(f"time ({unit}); grey: activation / gradient transfers")
            bubble = f", idle {cost.bubble_fraction * 100:.0f}%" if cost.bubble_fraction is not None else ""
            more = f" (first {rows} of {cost.pipeline_stages} stages)" if rows < cost.pipeline_stages else ""
            ax.set_title(
                f"{cost.model}: one step, {cost.micro_batches} micro-batch(es), {cost.schedule} ({cost.mode}){bubble}{more}",
                fontsize=10,
            )
        fig.tight_layout()
        return png_bytes(fig)
    finally:
        plt.close(fig)


__all__ = ["plot_timeline", "render_timeline_png"]
