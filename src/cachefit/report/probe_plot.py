"""The probe's chart: bandwidth against working set, with the levels it found (PNG)."""

from __future__ import annotations

import math
import os

from cachefit.files import atomic_path
from cachefit.hardware.probe import ProbeProfile, quantile_words
from cachefit.hardware.probe.analysis import KiB, MiB

def plot_probe(profile: ProbeProfile, path: str | os.PathLike, *, what: str = "plot") -> None:
    """PNG of bandwidth against working set (log x), with each pass's points, the medians and the capacities.

    Written whole or not at all (a temporary file in the same folder, renamed into place).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [s.weight_bytes for s in profile.samples]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    kind = "read" if profile.samples[0].kernel == "read" else "GEMV"
    for s in profile.samples + profile.gemv_samples:
        ax.scatter([s.weight_bytes] * len(s.times_s), [b / 1e9 for b in s.pass_bandwidths],
                   s=4, color="#999999", alpha=0.5, linewidths=0)
    ax.plot(sizes, [s.bandwidth_bytes_per_s / 1e9 for s in profile.samples], "o-", color="#4C72B0",
            markersize=3, label=f"{kind}: {quantile_words(profile.samples[0].quantile)} of passes")
    if profile.gemv_samples:
        ax.plot(sizes, [s.bandwidth_bytes_per_s / 1e9 for s in profile.gemv_samples], "s-", color="#8C8C8C",
                markersize=2.5, linewidth=1, label="GEMV (the device file's bandwidths)")
    colors = ("#C44E52", "#DD8452", "#55A868", "#8172B2")
    for i, lvl in enumerate(profile.cache_levels):
        ax.axvline(lvl.capacity_bytes, color=colors[i % len(colors)], linestyle="--", linewidth=1.2,
                   label=f"{lvl.name} {_short_bytes(lvl.capacity_bytes)} @ {lvl.bandwidth_bytes_per_s / 1e9:.0f} GB/s")
    for name, size in profile.reported_caches:
        if sizes[0] / 2 <= size <= sizes[-1] * 2:
            ax.axvline(size, color="#333333", linestyle=":", linewidth=0.8)
            ax.text(size, ax.get_ylim()[1] * 0.98, f" {name} (reported)", rotation=90, va="top", fontsize=7)
    last = profile.levels[-1] if profile.levels and profile.levels[-1].capacity_bytes is None else None
    if last is not None:
        ax.axhline(last.bandwidth_bytes_per_s / 1e9, color="#333333", linewidth=0.8,
                   label=f"{last.name} {last.bandwidth_bytes_per_s / 1e9:.1f} GB/s")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("working set (bytes of W)")
    ax.set_ylabel("bandwidth (GB/s)")
    threads = "" if profile.backend == "cuda" else f", {profile.threads or 'all'} thread(s)"
    ax.set_title(f"{profile.full_name} ({profile.backend}{threads}, {profile.dtype})", fontsize=9)
    ax.set_ylim(bottom=0)
    ticks = [2**k for k in range(int(math.log2(sizes[0])), int(math.log2(sizes[-1])) + 1)]
    ax.set_xticks(ticks)
    ax.set_xticklabels([_short_bytes(t) for t in ticks], fontsize=7, rotation=45)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    try:
        with atomic_path(path, what=what) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)


def _short_bytes(nbytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", MiB), ("KiB", KiB)):
        if nbytes >= scale:
            value = nbytes / scale
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{int(nbytes)} B"
