"""PNG charts (matplotlib, headless Agg backend)."""

from __future__ import annotations

import io
import os
from typing import TYPE_CHECKING

from cachefit.files import write_bytes_atomic

if TYPE_CHECKING:
    from cachefit.plan import Plan


def pyplot():  # noqa: ANN201 - the matplotlib.pyplot module
    """matplotlib's pyplot on the Agg backend (files only, no display), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _unit_scale(max_bytes: float) -> tuple[float, str]:
    for scale, name in ((1e9, "GB"), (1e6, "MB"), (1e3, "KB")):
        if max_bytes >= scale:
            return scale, name
    return 1.0, "B"


def png_bytes(fig) -> bytes:  # noqa: ANN001 - a matplotlib Figure
    """The figure as PNG bytes."""
    # rendered in memory: the file is then written whole or not at all, always as PNG whatever
    # the path's extension (savefig would append ".png" to a name without one)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_plan(plan: Plan, path: str | os.PathLike, *, what: str = "chart") -> None:
    """Write :func:`render_plan_png` to exactly ``path`` (atomically; see :mod:`cachefit.files`).

    Raises:
        ConfigError: ``path`` cannot be written; the message names ``what`` and ``path``.
    """
    write_bytes_atomic(path, render_plan_png(plan), what=what)


def render_plan_png(plan: Plan) -> bytes:
    """Per-card stacked bars (weights, activations, buffers) against each card's capacity line, as PNG bytes."""
    from cachefit.report.tables import stage_groups

    plt = pyplot()
    groups = stage_groups(plan)
    stages = [stage for stage, _ in groups]
    peak = max(max(s.total_bytes for s in stages), max(s.capacity_bytes for s in stages))
    scale, unit = _unit_scale(peak)
    xs = list(range(len(stages)))
    weights = [s.footprint.weight_bytes / scale for s in stages]
    acts = [s.footprint.activation_bytes / scale for s in stages]
    bufs = [s.footprint.buffer_bytes / scale for s in stages]
    width = max(6.0, min(18.0, 0.45 * len(stages) + 3))
    fig, ax = plt.subplots(figsize=(width, 4.5), dpi=120)
    ax.bar(xs, weights, color="#4C72B0", label="weights")
    ax.bar(xs, acts, bottom=weights, color="#DD8452", label="activations")
    ax.bar(xs, bufs, bottom=[w + a for w, a in zip(weights, acts)], color="#55A868", label="buffers")
    for x, stage in zip(xs, stages):
        cap = stage.capacity_bytes / scale
        ax.hlines(cap, x - 0.45, x + 0.45, colors="#C44E52", linewidth=2,
                  label="capacity" if x == 0 else None)
        ax.text(x, stage.total_bytes / scale, f"{stage.utilization * 100:.0f}%", ha="center",
                va="bottom", fontsize=7)
    ax.set_xticks(xs)
    labels = [
        (s.unit_names[0] if len(s.unit_names) == 1 else f"{s.unit_names[0]}\n…{s.unit_names[-1]}")
        + (f"\n×{count} cards" if count > 1 else "")
        for s, count in groups
    ]
    ax.set_xticklabels(labels, fontsize=6, rotation=90 if len(stages) > 12 else 0)
    ax.set_xlabel("stage (first … last unit; a split stage shows the bytes of each of its cards)")
    ax.set_ylabel(f"bytes ({unit})")
    verdict = "every card fits" if plan.feasible else "DOES NOT FIT"
    ax.set_title(f"{plan.model}: {plan.cards} card(s), {plan.objective} · {verdict}", fontsize=10)
    ax.set_ylim(0, peak / scale * 1.3)
    ax.legend(fontsize=8, loc="upper center", ncol=4, frameon=False)
    fig.tight_layout()
    try:
        return png_bytes(fig)
    finally:
        plt.close(fig)
