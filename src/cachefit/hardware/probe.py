"""Measure the local device's memory hierarchy with a read sweep and a GEMV bandwidth sweep.

The probe times ``y = W @ x`` over weight matrices ``W`` of growing size (16 KiB to 1 GiB by
default, four sizes per octave). A GEMV reads each weight once and does 2 FLOPs per weight, so it is
memory-bound on every device and its bytes per second are the bandwidth of the memory level the
weights live in once they have been read before: while ``W`` fits a cache the repeated call reads it
from that cache, and past the cache's capacity the bandwidth falls to the next level. The working
sets where it falls ("cliffs") give the capacities; the plateaus between them give the bandwidths.
This is the measurement the seed's method rests on: a partition that fits on-chip memory runs at
on-chip bandwidth.

On a CPU the capacities come from a second kernel timed at the same sizes in the same passes: a
plain read (numpy's byte-wise max reduction over the first bytes of the same buffer, one thread),
with the per-call overhead (the same call on one cache line, timed in every pass) taken off each
time. The GEMV alone cannot find every level on every core: its arithmetic caps it at about 70 GB/s
on one core of an AMD EPYC (Zen), which the L3 still delivers, so its curve is flat from 0.5 to
12 MiB and the 1 MiB L2 is invisible, while the read runs at about 200 GB/s in L2, 110 GB/s in L3
and 40 GB/s from DRAM there. The device file keeps the GEMV's bandwidth of each level (what a
layer's weights get from it; equal in L2 and L3 on that core) and notes the read bandwidth beside
it. On CUDA the GEMV (in CUDA graphs) finds the levels itself (``kernel="gemv"``).

Method (standard microbenchmark practice, as in the RRZE ``gpu-benches`` cache sweeps and the
lmbench / likwid-bench working-set sweeps):

- One buffer of the largest size is allocated and filled once; the matrix of each size is a view of
  its first bytes, so a sweep needs the memory of its largest point only.
- Every sample is one warm-up call (which loads ``W`` into whatever level holds it) followed by
  enough back-to-back calls to last ``min_sample_s``; the sample is their mean time per call.
- The sweep is repeated ``passes`` times, each pass in a fresh random order of sizes, so a burst of
  interference hits one pass of many sizes instead of every pass of neighbouring sizes.
- Each size keeps a quantile of its passes' times: the median by default. On a shared machine where
  other processes take the core for a good part of the time, use a low quantile (``quantile=0.2``):
  interference only ever adds time, so the fast samples are the undisturbed ones (the advice of
  Python's ``timeit`` documentation, which reports the minimum for the same reason).
- bytes/s = bytes of ``W`` / seconds per call (``W`` has rows of 1,024 elements, so ``x`` is 4 KiB
  in fp32 and ``y`` 1/1,024 of ``W``: neither is counted).

Backends: ``torch`` on the CPU (``torch.set_num_threads(threads)``, one thread by default for a
per-core view: a core's caches are what one thread sees), ``cuda`` when torch sees a GPU (CUDA
events around replays of a CUDA graph of 16 GEMVs, so that launch overhead does not hide the L2
plateau), and ``numpy`` when torch is absent (numpy's BLAS picks its own thread count: set
``OPENBLAS_NUM_THREADS`` / ``OMP_NUM_THREADS`` before starting Python to fix it). torch is imported
only inside the measuring functions; :func:`detect_levels` and the device-file writer are plain
Python and numpy.

Detection (:func:`detect_levels`): the log-bandwidth curve is split into plateaus, merging
neighbouring sizes until adjacent plateaus differ by a fall of more than ``drop_fraction`` (30% by
default); each fall is a cliff. A level's capacity is the largest working set before the fall (the
last size still above the midpoint between the plateaus), its bandwidth the plateau's upper
quartile. Real cliffs are not vertical (replacement is not perfect LRU, the sweep's own ``x`` and
``y`` share the cache, a shared cache's usable share varies with the other work on the machine), so
a capacity is read to within a step of the sweep (19% at four sizes an octave) at best, and to a
factor of about 2 on a ramp. Levels are named after the level the operating system (or the CUDA
driver) reports with the nearest size within a factor of 4, else by order (``l1``, ``l2``...); the
plateau after the last cliff is ``dram``.

Per-kernel overhead (:func:`measure_kernel_overhead`, the ``a`` of the small-kernel model
``T = a + V / b`` the cost model adds per kernel): the time of a 64-wide Llama-style decoder layer
run eagerly (RMSNorm, q/k/v/o projections, rotary, eager attention, gated MLP; 0.2 MB of weights,
one token, fp32) divided by the kernels it launches as :func:`cachefit.cost.kernels.count_kernels`
counts them (38). Its bytes and FLOPs take well under a microsecond, so its time is the fixed cost
of its kernels: the dispatch of each op, plus the Python of the modules around them, which a real
eager model pays too. The time of a tiny op alone (a 1 x 64 by 64 x 64 matmul) is measured beside
it: a lower bound that leaves the modules' Python out.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cachefit.errors import ConfigError

log = logging.getLogger(__name__)

KiB = 2**10
MiB = 2**20

BACKENDS: tuple[str, ...] = ("auto", "torch", "numpy", "cuda")
"""``auto``: cuda when torch sees a GPU, else torch on the CPU, else numpy."""
KERNELS: tuple[str, ...] = ("auto", "read", "gemv")
"""What finds the capacities: ``read`` (a byte-wise max reduction, per-call overhead removed; the
CPU default) or ``gemv`` (the GEMV itself; the only choice on CUDA). ``auto`` picks by backend."""
# The read kernel's per-call overhead is measured on a view this small (one cache line): its bytes
# take a few nanoseconds, the call's dispatch about a microsecond.
_OVERHEAD_BYTES = 64
_DTYPE_ITEMSIZE = {"fp32": 4, "fp16": 2, "bf16": 2, "fp64": 8}
_OFFCHIP_NAME = "dram"
# Largest factor between a detected capacity and a reported cache size for the detected level to
# take the reported level's name (2 octaves: wide, because a shared cache's usable share can be far
# below its size on a busy or virtualized machine).
_NAME_MATCH_OCTAVES = 2.0


# ----------------------------------------------------------------------------------------------
# Configuration and results


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeConfig:
    """What to measure and how hard (``ProbeConfig.quick()`` for a short run)."""

    backend: str = "auto"
    """``auto``, ``torch`` (CPU), ``cuda`` or ``numpy``."""
    threads: int | None = 1
    """CPU threads for the torch backend; None: torch's default (all cores). Ignored on CUDA."""
    min_bytes: int = 16 * KiB
    """Smallest weight matrix of the sweep."""
    max_bytes: int = 1024 * MiB
    """Largest weight matrix of the sweep (one buffer of this size is allocated). Big enough to pass
    the last cache by a few octaves: the off-chip plateau is read from the sizes an octave past the
    last cliff. Lowered to a quarter of the memory when the machine has less."""
    points_per_octave: int = 4
    """Sizes per doubling; sizes are ``min_bytes * 2**(k / points_per_octave)``."""
    passes: int = 9
    """Times the whole sweep is repeated, each pass in a fresh random order of sizes."""
    quantile: float = 0.5
    """Which of a size's pass times it keeps: 0.5 the median, 0.2 a fast one (for a busy machine)."""
    min_sample_s: float = 2e-3
    """Each sample repeats the GEMV until it has run at least this long."""
    dtype: str = "fp32"
    """Element type of ``W`` and ``x`` (fp32 everywhere; fp16 / bf16 mostly make sense on GPUs)."""
    measure_flops: bool = True
    measure_kernels: bool = True
    """Also time a tiny eager layer for the per-kernel overhead (torch and cuda backends)."""
    """Also time a large matmul for the peak FLOP/s of ``dtype``."""
    flops_size: int = 0
    """Side of the square matmul for the FLOP/s figure; 0: 1024 on the CPU, 8192 on a GPU."""
    seed: int = 0
    """Seed of the random order of sizes in each pass."""
    cuda_graph_calls: int = 16
    """On CUDA, GEMVs captured in one CUDA graph per size (0: plain launches, which bound small sizes
    by the launch rate instead of the bandwidth)."""
    kernel: str = "auto"
    """Which kernel's curve the capacities are read from (:data:`KERNELS`). With ``read`` the GEMV
    is still timed at every size, in the same passes, for the bandwidth each level gives a layer."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"probe backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.kernel not in KERNELS:
            raise ConfigError(f"probe kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")
        if self.kernel == "read" and self.backend == "cuda":
            raise ConfigError("probe kernel 'read' runs on the CPU only; on CUDA use --kernel gemv (or auto)")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ConfigError(f"probe threads must be a positive int or None (all cores), got {self.threads!r}")
        for name in ("min_bytes", "max_bytes", "points_per_octave", "passes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"probe {name} must be a positive int, got {value!r}")
        if self.min_bytes < 4 * KiB:
            raise ConfigError(f"probe min_bytes must be at least 4 KiB, got {self.min_bytes:,} B")
        if self.max_bytes < 2 * self.min_bytes:
            raise ConfigError(
                f"probe max_bytes ({self.max_bytes:,} B) must be at least twice min_bytes ({self.min_bytes:,} B) "
                "to sweep one octave"
            )
        if not (isinstance(self.min_sample_s, (int, float)) and 0 < self.min_sample_s <= 10):
            raise ConfigError(f"probe min_sample_s must be in (0, 10] seconds, got {self.min_sample_s!r}")
        if not (isinstance(self.quantile, (int, float)) and 0 <= self.quantile <= 1):
            raise ConfigError(f"probe quantile must be in [0, 1] (0.5: the median), got {self.quantile!r}")
        if self.dtype not in _DTYPE_ITEMSIZE:
            raise ConfigError(f"probe dtype must be one of {', '.join(_DTYPE_ITEMSIZE)}, got {self.dtype!r}")
        if isinstance(self.cuda_graph_calls, bool) or not isinstance(self.cuda_graph_calls, int) \
                or self.cuda_graph_calls < 0:
            raise ConfigError(f"probe cuda_graph_calls must be an int >= 0, got {self.cuda_graph_calls!r}")
        if isinstance(self.flops_size, bool) or not isinstance(self.flops_size, int) or self.flops_size < 0:
            raise ConfigError(f"probe flops_size must be an int >= 0, got {self.flops_size!r}")

    @classmethod
    def quick(cls, **overrides: Any) -> ProbeConfig:
        """A short sweep: 64 KiB to 512 MiB, 3 sizes an octave, 7 passes."""
        fields: dict[str, Any] = dict(min_bytes=64 * KiB, max_bytes=512 * MiB, points_per_octave=3, passes=7,
                                      min_sample_s=1.5e-3)
        fields.update(overrides)
        return cls(**fields)


@dataclass(frozen=True, slots=True, kw_only=True)
class BandwidthSample:
    """The GEMV times of one working-set size, one per pass."""

    weight_bytes: int
    """Bytes of ``W`` (rows x cols x element size): the working set."""
    rows: int
    cols: int
    times_s: tuple[float, ...]
    """Seconds per GEMV call, one per pass (each the mean of a timed batch of back-to-back calls)."""
    quantile: float = 0.5
    """Which of the pass times :attr:`time_s` is (0.5: the median)."""
    kernel: str = "gemv"
    """``gemv`` or ``read`` (see :data:`KERNELS`)."""
    overhead_s: float = 0.0
    """Per-call overhead taken off :attr:`time_s` before the bandwidth is computed (the read
    kernel's call on one cache line; 0 for the GEMV, whose curve keeps its overhead)."""

    def __post_init__(self) -> None:
        if not self.times_s or any(not (t > 0 and math.isfinite(t)) for t in self.times_s):
            raise ConfigError(f"sample of {self.weight_bytes:,} B: times must be positive seconds, got {self.times_s}")
        if not (self.overhead_s >= 0 and math.isfinite(self.overhead_s)):
            raise ConfigError(f"sample of {self.weight_bytes:,} B: overhead must be >= 0 seconds, got {self.overhead_s}")

    @property
    def time_s(self) -> float:
        """The ``quantile`` of the pass times (linear interpolation, numpy's default)."""
        return float(np.quantile(self.times_s, self.quantile))

    def _net(self, seconds: float) -> float:
        # A size whose time is mostly overhead is kept at 1/20 of its time at least: the difference of
        # two noisy times must not become zero or negative.
        return max(seconds - self.overhead_s, seconds / 20)

    @property
    def bandwidth_bytes_per_s(self) -> float:
        """``weight_bytes / (time_s - overhead_s)``."""
        return self.weight_bytes / self._net(self.time_s)

    @property
    def pass_bandwidths(self) -> tuple[float, ...]:
        """Bytes/s of each pass (overhead taken off as in :attr:`bandwidth_bytes_per_s`)."""
        return tuple(self.weight_bytes / self._net(t) for t in self.times_s)

    @property
    def spread(self) -> float:
        """(max - min) / median of the passes' bandwidths: how noisy the size was."""
        bws = self.pass_bandwidths
        return (max(bws) - min(bws)) / float(np.median(bws))

    def to_dict(self) -> dict[str, Any]:
        return {
            "weight_bytes": self.weight_bytes,
            "rows": self.rows,
            "cols": self.cols,
            "times_s": list(self.times_s),
            "quantile": self.quantile,
            "kernel": self.kernel,
            "overhead_s": self.overhead_s,
            "time_s": self.time_s,
            "bandwidth_bytes_per_s": self.bandwidth_bytes_per_s,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class DetectedLevel:
    """One plateau of the bandwidth curve: a memory level as the sweep sees it."""

    name: str
    """``l1``, ``l2``, ``l3`` ... or ``dram`` for the plateau after the last cliff."""
    capacity_bytes: int | None
    """Largest measured working set before the level's cliff; None for the last plateau."""
    bandwidth_bytes_per_s: float
    """Highest smoothed bandwidth on the plateau."""
    first_index: int
    """Index of the plateau's first sample in the sweep."""
    last_index: int
    """Index of the plateau's last sample (for a cache, the sample at ``capacity_bytes``)."""
    drop_fraction: float | None = None
    """How much the smoothed bandwidth falls across the cliff after this level (0.4: by 40%)."""
    reported_bytes: int | None = None
    """The size the operating system or driver reports for the level this one was named after."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class KernelOverhead:
    """The fixed cost of one kernel, from a tiny eager layer whose bytes and FLOPs take no time."""

    per_kernel_s: float
    """``layer_s / kernels``: what the device file records as ``kernel_overhead``."""
    layer_s: float
    """Seconds per call of the tiny layer (the ``quantile`` of its passes)."""
    kernels: int
    """Kernels the layer launches (:func:`cachefit.cost.kernels.count_kernels` of its shape)."""
    tiny_op_s: float
    """Seconds per call of a 1 x hidden by hidden x hidden matmul alone (same quantile)."""
    hidden: int
    """Width of the layer."""
    layer_times_s: tuple[float, ...]
    """Seconds per layer call, one per pass."""
    quantile: float = 0.5

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "layer_times_s": list(self.layer_times_s)}


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeProfile:
    """A measured device: the sweep, the levels found in it, peak FLOP/s, and how it was measured."""

    device: str
    """Name for the device file, e.g. ``local-cpu`` or ``local-cuda``."""
    full_name: str
    """Processor or GPU model as the system reports it."""
    backend: str
    """``torch``, ``cuda`` or ``numpy``."""
    threads: int | None
    """CPU threads used (None: the library's default)."""
    dtype: str
    samples: tuple[BandwidthSample, ...]
    """The sweep the levels were found in (the read kernel's on a CPU, the GEMV's on CUDA)."""
    levels: tuple[DetectedLevel, ...]
    """Caches in order, then the ``dram`` plateau."""
    gemv_samples: tuple[BandwidthSample, ...] = ()
    """The GEMV at the same sizes, timed in the same passes, where ``samples`` are the read kernel's
    (empty where ``samples`` are the GEMV's already)."""
    peak_flops_per_s: tuple[tuple[str, float], ...] = ()
    """Measured dense matmul FLOP/s per dtype (with ``threads`` threads)."""
    kernel_overhead: KernelOverhead | None = None
    """The per-kernel overhead measurement (None: not measured, e.g. the numpy backend)."""
    reported_caches: tuple[tuple[str, int], ...] = ()
    """Cache sizes the operating system (Linux sysfs) or the CUDA driver reports, for comparison."""
    offchip_capacity_bytes: int | None = None
    """Physical memory (CPU) or GPU memory, as reported."""
    measured_on: str = ""
    """Date of the measurement (YYYY-MM-DD)."""
    elapsed_s: float = 0.0
    """Wall time of the sweep and the FLOP/s measurement."""
    config: ProbeConfig | None = None

    @property
    def cache_levels(self) -> tuple[DetectedLevel, ...]:
        return tuple(lvl for lvl in self.levels if lvl.capacity_bytes is not None)

    def level(self, name: str) -> DetectedLevel:
        for lvl in self.levels:
            if lvl.name == name:
                return lvl
        raise ConfigError(f"probe of {self.device}: no level {name!r}; found {', '.join(l.name for l in self.levels)}")

    @property
    def bandwidth_samples(self) -> tuple[BandwidthSample, ...]:
        """The GEMV's samples: what a layer's weights get from each level (the device file's bandwidths)."""
        return self.gemv_samples or self.samples

    def level_bandwidth(self, level: DetectedLevel) -> float:
        """The GEMV bandwidth of ``level``: its plateau's upper quartile over the sizes the level spans
        (the last plateau: the median from an octave past its start), as :func:`detect_levels` reads a
        level; the same as ``level.bandwidth_bytes_per_s`` where the levels were found in the GEMV."""
        if not self.gemv_samples:
            return level.bandwidth_bytes_per_s
        sizes = [s.weight_bytes for s in self.gemv_samples]
        bws = [s.bandwidth_bytes_per_s for s in self.gemv_samples]
        lo, hi = level.first_index, level.last_index
        if level.capacity_bytes is not None:
            return math.exp(_plateau_level([math.log(b) for b in bws[lo: hi + 1]]))
        start = _octave_index(sizes, lo) if len(self.levels) > 1 else lo
        start = lo if start is None or start >= hi else start
        return float(np.median(bws[start: hi + 1]))

    @property
    def call_overhead_s(self) -> float:
        """Time of the smallest GEMV: an upper bound on the per-call (dispatch / launch) overhead."""
        return self.bandwidth_samples[0].time_s

    def to_device_dict(self) -> dict[str, Any]:
        """The device file: ``{"device", "levels": [{"name", "capacity_bytes", "bandwidth_bytes_per_s"}...]}``.

        Plus the planning level (the last cache), the measured peak FLOP/s and the off-chip figures,
        all keys :func:`cachefit.hardware.devices.load_device_file` reads. The off-chip plateau is
        listed as the level ``dram`` (capacity: the physical memory) and as ``offchip_*``.
        """
        threads = "" if self.backend == "cuda" else f", {self.threads or 'all'} thread(s)"
        if self.gemv_samples:
            how = ("measured by cachefit probe: capacities from a read sweep (byte-wise max reduction, one "
                   "thread, per-call overhead removed), bandwidths from a GEMV sweep in the same passes, "
                   f"{self.backend}{threads}, {self.dtype}")
        else:
            how = f"measured by cachefit probe: GEMV bandwidth sweep, {self.backend}{threads}, {self.dtype}"
        how += f", {_quantile_words(self.samples[0].quantile)} of {len(self.samples[0].times_s)} passes"
        levels: list[dict[str, Any]] = []
        reported = dict(self.reported_caches)
        for lvl in self.levels:
            if lvl.capacity_bytes is None:
                if self.offchip_capacity_bytes is None:
                    continue
                entry = {"name": lvl.name, "capacity_bytes": self.offchip_capacity_bytes,
                         "bandwidth_bytes_per_s": self.level_bandwidth(lvl),
                         "note": "off-chip memory: capacity as the system reports it; bandwidth measured"}
            else:
                kind = "read" if self.gemv_samples else "bandwidth"
                note = f"capacity: largest working set before a {lvl.drop_fraction:.0%} {kind} bandwidth drop"
                if self.gemv_samples:
                    note += f" (read: {lvl.bandwidth_bytes_per_s / 1e9:,.1f} GB/s on the level)"
                if lvl.reported_bytes is not None:
                    note += f"; the system reports {lvl.name} = {lvl.reported_bytes:,} B"
                elif lvl.name in reported:
                    note += f"; the system reports {lvl.name} = {reported[lvl.name]:,} B"
                entry = {"name": lvl.name, "capacity_bytes": lvl.capacity_bytes,
                         "bandwidth_bytes_per_s": self.level_bandwidth(lvl), "note": note}
            levels.append(entry)
        doc: dict[str, Any] = {
            "device": self.device,
            "full_name": self.full_name,
            "levels": levels,
            "default_level": (self.cache_levels[-1].name if self.cache_levels else levels[-1]["name"]),
            "source": how,
            "as_of": self.measured_on,
        }
        dram = self.levels[-1] if self.levels and self.levels[-1].capacity_bytes is None else None
        if dram is not None:
            doc["offchip_bandwidth_bytes_per_s"] = self.level_bandwidth(dram)
        if self.offchip_capacity_bytes is not None:
            doc["offchip_capacity_bytes"] = self.offchip_capacity_bytes
        if self.peak_flops_per_s:
            doc["peak_flops"] = dict(self.peak_flops_per_s)
        k = self.kernel_overhead
        if k is not None:
            threads_k = "" if self.backend == "cuda" else f", {self.threads or 'all'} thread(s)"
            doc["kernel_overhead"] = {
                "value": k.per_kernel_s,
                "source": f"measured by cachefit probe: a {k.hidden}-wide eager decoder layer, {self.backend}"
                          f"{threads_k}, fp32, {_quantile_words(k.quantile)} of {len(k.layer_times_s)} passes",
                "as_of": self.measured_on,
                "note": (f"{k.layer_s * 1e6:,.1f} us per layer / {k.kernels} kernels; a tiny op alone "
                         f"(1 x {k.hidden} by {k.hidden} x {k.hidden} matmul) takes {k.tiny_op_s * 1e6:,.2f} us: the "
                         "rest is the Python of the modules around the ops, which eager models pay too"),
            }
        return doc

    def to_dict(self) -> dict[str, Any]:
        """Everything: the device file plus the sweep, the detected levels and the reported caches."""
        return {
            "device_file": self.to_device_dict(),
            "backend": self.backend,
            "threads": self.threads,
            "dtype": self.dtype,
            "levels": [lvl.to_dict() for lvl in self.levels],
            "reported_caches": dict(self.reported_caches),
            "call_overhead_s": self.call_overhead_s,
            "kernel_overhead": self.kernel_overhead.to_dict() if self.kernel_overhead else None,
            "elapsed_s": self.elapsed_s,
            "samples": [s.to_dict() for s in self.samples],
            "gemv_samples": [s.to_dict() for s in self.gemv_samples],
        }


# ----------------------------------------------------------------------------------------------
# Sizes and shapes


def sweep_sizes(min_bytes: int, max_bytes: int, points_per_octave: int) -> tuple[int, ...]:
    """Working-set sizes ``min_bytes * 2**(k / points_per_octave)`` up to ``max_bytes``, rounded to 4 KiB.

    >>> sweep_sizes(16 * 1024, 64 * 1024, 2)
    (16384, 24576, 32768, 45056, 65536)
    """
    if min_bytes < 1 or max_bytes < min_bytes or points_per_octave < 1:
        raise ConfigError(
            f"sweep sizes: need 0 < min_bytes <= max_bytes and points_per_octave >= 1, got "
            f"{min_bytes}, {max_bytes}, {points_per_octave}"
        )
    octaves = math.log2(max_bytes / min_bytes)
    count = int(math.floor(octaves * points_per_octave + 1e-9)) + 1
    out: list[int] = []
    for k in range(count):
        size = int(round(min_bytes * 2 ** (k / points_per_octave) / (4 * KiB))) * 4 * KiB
        size = max(size, 4 * KiB)
        if not out or size > out[-1]:
            out.append(size)
    return tuple(out)


def gemv_shape(weight_bytes: int, itemsize: int) -> tuple[int, int]:
    """Rows and columns of the sweep's ``W``: rows of up to 1,024 elements, at least 16 rows.

    A transformer's linear layers have rows of thousands of elements; 1,024 keeps that shape from
    64 KiB up (fp32) while the smallest matrices still have 16 rows.
    """
    elements = max(weight_bytes // itemsize, 16)
    cols = 1024
    while cols > 16 and elements // cols < 16:
        cols //= 2
    return elements // cols, cols


# ----------------------------------------------------------------------------------------------
# Detection


def _octave_index(sizes: Sequence[int], i: int) -> int | None:
    """First index whose size is at least twice ``sizes[i]`` (None past the end)."""
    for j in range(i + 1, len(sizes)):
        if sizes[j] >= 2 * sizes[i] * (1 - 1e-9):
            return j
    return None


def _plateau_level(values: Sequence[float]) -> float:
    """The level of a plateau: the 75th percentile of its log-bandwidths.

    Not the mean: the first sizes of a sweep are held back by per-call overhead (a rise), and the
    first sizes past a cliff are still partly served by the faster level; the upper quartile is the
    plateau proper in both cases.
    """
    return float(np.percentile(values, 75))


def segment_plateaus(log_bandwidths: Sequence[float], *, drop_fraction: float = 0.30,
                     min_points: int = 2) -> list[tuple[int, int]]:
    """Split a log-bandwidth curve into plateaus separated by drops of more than ``drop_fraction``.

    Constrained agglomerative segmentation (Ward's criterion with an adjacency constraint, as in
    contiguity-constrained hierarchical clustering): every point starts as its own segment; while
    some adjacent pair *must* merge, the pair whose merge raises the squared error least,
    ``n1 * n2 / (n1 + n2) * (m1 - m2)**2`` with ``m`` the mean log-bandwidth, is merged. A pair must
    merge when the right segment's level (:func:`_plateau_level`) is not below the left's by more
    than ``drop_fraction`` (a rise or a small step is never a cliff) or either has fewer than
    ``min_points`` points (an outlier is not a plateau). Merging the closest pairs first lets a cliff
    that is a gradual ramp over a few octaves survive as one drop between the plateaus on each side.

    Returns:
        ``(first, last)`` index pairs (inclusive), in order, covering every point once.
    """
    threshold = -math.log(1 - drop_fraction)
    values = [float(v) for v in log_bandwidths]
    segs = [(i, i) for i in range(len(values))]

    def must_merge(left: tuple[int, int], right: tuple[int, int]) -> bool:
        if left[1] - left[0] + 1 < min_points or right[1] - right[0] + 1 < min_points:
            return True
        drop = _plateau_level(values[left[0]: left[1] + 1]) - _plateau_level(values[right[0]: right[1] + 1])
        return drop <= threshold

    while len(segs) > 1:
        best: tuple[float, int] | None = None
        for k in range(len(segs) - 1):
            left, right = segs[k], segs[k + 1]
            if not must_merge(left, right):
                continue
            n1, n2 = left[1] - left[0] + 1, right[1] - right[0] + 1
            m1, m2 = np.mean(values[left[0]: left[1] + 1]), np.mean(values[right[0]: right[1] + 1])
            cost = n1 * n2 / (n1 + n2) * float(m1 - m2) ** 2
            if best is None or cost < best[0]:
                best = (cost, k)
        if best is None:
            break
        k = best[1]
        segs[k: k + 2] = [(segs[k][0], segs[k + 1][1])]
    return segs


def _name_levels(capacities: Sequence[int], reported: Mapping[str, int]) -> list[tuple[str, int | None]]:
    """Names for detected capacities (ascending): a reported level within a factor of 4, else by order."""
    # Reported names such as l1, l2, l3 in size order; detected levels are named in increasing order.
    ranked = sorted(reported.items(), key=lambda kv: kv[1])
    out: list[tuple[str, int | None]] = []
    last_number = 0
    used: set[str] = set()
    for cap in capacities:
        best: tuple[float, str, int] | None = None
        for name, size in ranked:
            number = _level_number(name)
            if name in used or (number is not None and number <= last_number):
                continue
            distance = abs(math.log2(cap / size))
            if distance <= _NAME_MATCH_OCTAVES and (best is None or distance < best[0]):
                best = (distance, name, size)
        if best is not None:
            _, name, size = best
            out.append((name, size))
            used.add(name)
            last_number = _level_number(name) or last_number + 1
            continue
        # No reported level near it: the next number after the previous level and after every
        # reported level far smaller than it (a 40 MB level above a 2 MiB l2 is an l3).
        below = [_level_number(n) or 0 for n, size in ranked if size * 2**_NAME_MATCH_OCTAVES < cap]
        last_number = max(last_number + 1, max(below, default=0) + 1)
        name = f"l{last_number}"
        while name in used:
            last_number += 1
            name = f"l{last_number}"
        used.add(name)
        out.append((name, None))
    return out


def _level_number(name: str) -> int | None:
    return int(name[1:]) if len(name) > 1 and name[0] == "l" and name[1:].isdigit() else None


def detect_levels(
    sizes: Sequence[int],
    bandwidths: Sequence[float],
    *,
    drop_fraction: float = 0.30,
    min_octaves: float = 1.0,
    reported: Mapping[str, int] | None = None,
    last_name: str = _OFFCHIP_NAME,
) -> tuple[DetectedLevel, ...]:
    """Find the cache levels in a bandwidth-vs-working-set curve.

    The curve is split into plateaus by :func:`segment_plateaus` (adjacent plateaus differ by a
    fall of more than ``drop_fraction``); each plateau but the last is a cache. Its capacity is the
    largest working set whose bandwidth is still above the midpoint (in log) between its plateau and
    the next, near their boundary: the last size "before the drop", read the same way on a vertical
    cliff and on a ramp. A cache's bandwidth is the 75th percentile of its points (the plateau
    proper: small sizes are held back by per-call overhead, and the first sizes past the previous
    cliff are still partly served by the faster level); the last plateau's bandwidth is the median of
    its points from one octave past its start (the sizes right after a cliff are still partly cached).

    Args:
        sizes: working-set bytes, strictly increasing (a geometric sweep).
        bandwidths: bytes/s measured at each size.
        drop_fraction: the smallest fall between plateaus that counts as a cliff (0.3: by 30%).
        min_octaves: how far a plateau must extend, from its first size to its last, to be one
            (shorter is an outlier or a step of a ramp, and is merged into a neighbour). Memory
            levels differ in size by far more than a factor of 2.
        reported: cache sizes the system reports (``{"l2": 2097152, ...}``), used only to name levels.
        last_name: name of the plateau after the last cliff.

    Returns:
        The levels in order: one per cliff (with its capacity), then the last plateau
        (``capacity_bytes=None``).
    """
    n = len(sizes)
    if n != len(bandwidths):
        raise ConfigError(f"detect_levels: {n} sizes but {len(bandwidths)} bandwidths; give one bandwidth per size")
    if n < 3:
        raise ConfigError(f"detect_levels: need at least 3 sizes, got {n}")
    if sizes[0] <= 0 or any(b <= a for a, b in zip(sizes[:-1], sizes[1:])):
        raise ConfigError("detect_levels: sizes must be positive and strictly increasing")
    if any(not (isinstance(b, (int, float)) and b > 0 and math.isfinite(b)) for b in bandwidths):
        raise ConfigError("detect_levels: bandwidths must be positive finite bytes/s")
    if not 0 < drop_fraction < 1:
        raise ConfigError(f"detect_levels: drop_fraction must be in (0, 1), got {drop_fraction!r}")
    if not (isinstance(min_octaves, (int, float)) and 0 <= min_octaves < 16):
        raise ConfigError(f"detect_levels: min_octaves must be in [0, 16), got {min_octaves!r}")
    # Sizes per octave of the sweep (geometric), hence the points a plateau of min_octaves spans.
    per_octave = (n - 1) / math.log2(sizes[-1] / sizes[0])
    min_points = max(2, 1 + math.ceil(min_octaves * per_octave - 1e-6))

    logs = [math.log(b) for b in bandwidths]
    plateaus = segment_plateaus(logs, drop_fraction=drop_fraction, min_points=min_points)
    caches = plateaus[:-1]
    # Where each cliff is: the last size, from an octave before the plateaus' boundary to an octave
    # after it, whose log-bandwidth (a running median of 3, against single outliers) is still above
    # the midpoint between the plateau before (its upper quartile) and the one after (its median).
    # The boundary the segmentation drew can sit anywhere on a ramp; the midpoint is a property of
    # the curve itself.
    smooth = [float(np.median(logs[max(0, i - 1): i + 2])) for i in range(n)]
    reach = max(1, round(per_octave))
    edges: list[int] = []
    for k, (lo, hi) in enumerate(caches):
        nxt_lo, nxt_hi = plateaus[k + 1]
        mid = (_plateau_level(logs[lo: hi + 1]) + float(np.median(logs[nxt_lo: nxt_hi + 1]))) / 2
        first = max(lo, hi - reach, edges[-1] + 1 if edges else 0)
        last = min(nxt_hi - 1, nxt_lo + reach)
        above = [j for j in range(first, last + 1) if smooth[j] >= mid]
        edges.append(max(above) if above else hi)

    names = _name_levels([sizes[edge] for edge in edges], reported or {})
    levels: list[DetectedLevel] = []
    start = 0
    for k, ((lo, hi), edge, (name, reported_bytes)) in enumerate(zip(caches, edges, names)):
        nxt_lo, nxt_hi = plateaus[k + 1]
        here = _plateau_level(logs[lo: hi + 1])
        after = _plateau_level(logs[nxt_lo: nxt_hi + 1])
        levels.append(DetectedLevel(
            name=name, capacity_bytes=sizes[edge],
            bandwidth_bytes_per_s=math.exp(here),
            first_index=start, last_index=edge, drop_fraction=1 - math.exp(after - here),
            reported_bytes=reported_bytes,
        ))
        start = edge + 1
    lo, hi = plateaus[-1]
    tail_start = (_octave_index(sizes, lo) or lo) if caches else lo
    tail = bandwidths[tail_start: hi + 1] if tail_start <= hi - 1 else bandwidths[lo: hi + 1]
    levels.append(DetectedLevel(name=last_name, capacity_bytes=None, bandwidth_bytes_per_s=float(np.median(tail)),
                                first_index=start, last_index=n - 1))
    return tuple(levels)


# ----------------------------------------------------------------------------------------------
# What the system reports


def _parse_sysfs_size(text: str) -> int | None:
    text = text.strip()
    units = {"K": KiB, "M": MiB, "G": 2**30}
    try:
        if text and text[-1].upper() in units:
            return int(text[:-1]) * units[text[-1].upper()]
        return int(text)
    except ValueError:
        return None


def reported_cpu_caches(root: str | os.PathLike = "/sys/devices/system/cpu/cpu0/cache") -> dict[str, int]:
    """Data and unified cache sizes of CPU 0 from Linux sysfs: ``{"l1": 49152, "l2": ..., "l3": ...}``.

    Empty where sysfs is absent (macOS, Windows, some containers).
    """
    out: dict[str, int] = {}
    base = Path(root)
    if not base.is_dir():
        return out
    for entry in sorted(base.glob("index*")):
        try:
            kind = (entry / "type").read_text().strip()
            level = int((entry / "level").read_text().strip())
            size = _parse_sysfs_size((entry / "size").read_text())
        except (OSError, ValueError):
            continue
        if kind in ("Data", "Unified") and size:
            out[f"l{level}"] = size
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def _physical_memory_bytes() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


# ----------------------------------------------------------------------------------------------
# Measuring


def _resolve_backend(backend: str) -> str:
    if backend == "numpy":
        return "numpy"
    try:
        import torch
    except ImportError:
        if backend in ("torch", "cuda"):
            raise ConfigError(f"probe backend {backend!r} needs torch (pip install torch), or use --backend numpy") from None
        return "numpy"
    if backend == "cuda" and not torch.cuda.is_available():
        raise ConfigError("probe backend 'cuda': torch sees no CUDA device; use --backend torch for the CPU")
    if backend == "auto":
        return "cuda" if torch.cuda.is_available() else "torch"
    return backend


class _Kernel:
    """A GEMV over views of one buffer, timed per backend."""

    def __init__(self, backend: str, dtype: str, max_bytes: int) -> None:
        self.backend = backend
        self.itemsize = _DTYPE_ITEMSIZE[dtype]
        self.graphs: list[object] = []  # CUDA graphs kept alive while their replays are in use
        numel = max_bytes // self.itemsize + 1024
        if backend == "numpy":
            np_dtype = {"fp32": np.float32, "fp64": np.float64, "fp16": np.float16}.get(dtype)
            if np_dtype is None:
                raise ConfigError(f"probe: numpy has no {dtype}; use fp32")
            self.buffer = np.full(numel, 1e-3, dtype=np_dtype)  # not denormal, not zero
            self.x = np.ones(1024, dtype=np_dtype)
            self.y = np.empty(max_bytes // self.itemsize // 16 + 1, dtype=np_dtype)
        else:
            import torch

            torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
                           "fp64": torch.float64}[dtype]
            device = "cuda" if backend == "cuda" else "cpu"
            self.buffer = torch.full((numel,), 1e-3, dtype=torch_dtype, device=device)
            self.x = torch.ones(1024, dtype=torch_dtype, device=device)
            self.y = torch.empty(max_bytes // self.itemsize // 16 + 1, dtype=torch_dtype, device=device)

    def call(self, rows: int, cols: int, graph_calls: int = 0) -> tuple[Callable[[], object], int]:
        """A function running the GEMV of ``W[:rows, :cols]``, and how many GEMVs one call runs.

        On CUDA with ``graph_calls`` > 0, the function replays a CUDA graph of that many GEMVs: a
        GEMV over an L2-sized matrix takes a few microseconds, about what launching it from Python
        takes, so without a graph the sweep would measure launches instead of bandwidth.
        """
        w = self.buffer[: rows * cols].reshape(rows, cols)
        x = self.x[:cols]
        y = self.y[:rows]
        if self.backend == "numpy":
            return (lambda: np.dot(w, x, out=y)), 1
        import torch

        def gemv() -> object:
            return torch.mv(w, x, out=y)

        if self.backend != "cuda" or graph_calls < 1:
            return gemv, 1
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm up cuBLAS outside the capture, as torch's docs ask
                for _ in range(3):
                    gemv()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(graph_calls):
                    gemv()
        except RuntimeError as exc:  # capture unsupported here: time plain launches instead
            log.warning("probe: CUDA graph capture failed (%s); timing plain launches", exc)
            return gemv, 1
        self.graphs.append(graph)
        return graph.replay, graph_calls

    def read(self, nbytes: int) -> Callable[[], object]:
        """A function reading the buffer's first ``nbytes`` once: numpy's byte-wise max reduction.

        Why this kernel: a GEMV (or a float sum) is held back by its own arithmetic at about the
        bandwidth of an L3 on recent cores (about 70 GB/s on one Zen core, in L2 and L3 alike), so the
        L2 cliff vanishes from its curve. An 8-bit max has no dependency chain and packs 32-64 lanes a
        vector, so it reads faster than the L2 delivers and each level's bandwidth shows. numpy's
        reductions run on one thread: the read curve is one core's view whatever ``threads`` says.
        """
        data = self.buffer.numpy() if self.backend != "numpy" else self.buffer
        view = data.view(np.uint8)[:nbytes]
        return lambda: np.maximum.reduce(view)

    def time_calls(self, fn: Callable[[], object], reps: int) -> float:
        """Seconds per call of ``reps`` back-to-back calls."""
        if self.backend == "cuda":
            import torch

            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / reps
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps

    def sync(self) -> None:
        if self.backend == "cuda":
            import torch

            torch.cuda.synchronize()


class _Threads:
    """Set torch's CPU thread count for a block and restore it after."""

    def __init__(self, backend: str, threads: int | None) -> None:
        self.backend, self.threads, self.saved = backend, threads, None

    def __enter__(self) -> _Threads:
        if self.backend == "torch" and self.threads is not None:
            import torch

            self.saved = torch.get_num_threads()
            torch.set_num_threads(self.threads)
        elif self.backend == "numpy" and self.threads is not None:
            log.info("numpy backend: BLAS threads are fixed at start-up (OPENBLAS_NUM_THREADS / OMP_NUM_THREADS)")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.saved is not None:
            import torch

            torch.set_num_threads(self.saved)


def _resolve_kernel(kernel: str, backend: str) -> str:
    if kernel == "auto":
        return "gemv" if backend == "cuda" else "read"
    if kernel == "read" and backend == "cuda":
        raise ConfigError("probe kernel 'read' runs on the CPU only; on CUDA use --kernel gemv (or auto)")
    return kernel


def measure_bandwidth(config: ProbeConfig) -> tuple[BandwidthSample, ...]:
    """Run the sweep of ``config`` and return one sample per size of the kernel that finds the
    capacities (``config.kernel``; see the module doc)."""
    sweeps, _ = _sweep(config, gemv_too=False)
    return sweeps[_resolve_kernel(config.kernel, _resolve_backend(config.backend))]


def _sweep(config: ProbeConfig, extra: Mapping[str, Callable[[], object]] | None = None, *, gemv_too: bool = True
           ) -> tuple[dict[str, tuple[BandwidthSample, ...]], dict[str, list[float]]]:
    """The sweep: samples per kernel (``read`` and / or ``gemv``), and the ``extra`` calls' times
    (seconds per call, one per pass).

    Every call (each kernel at each size, the read kernel's overhead call, each extra call) is
    visited once per pass in a random order, so a slow phase of a shared machine hits them alike.
    """
    backend = _resolve_backend(config.backend)
    primary = _resolve_kernel(config.kernel, backend)
    kinds = ("read", "gemv") if primary == "read" and gemv_too else (primary,)
    sizes = sweep_sizes(config.min_bytes, config.max_bytes, config.points_per_octave)
    extra = dict(extra or {})
    with _Threads(backend, config.threads), _inference_mode(backend):
        kernel = _Kernel(backend, config.dtype, sizes[-1])
        shapes = [gemv_shape(size, kernel.itemsize) for size in sizes]
        made: list[tuple[Callable[[], object], int]] = []
        for kind in kinds:
            for rows, cols in shapes:
                made.append(kernel.call(rows, cols, config.cuda_graph_calls) if kind == "gemv"
                            else (kernel.read(rows * cols * kernel.itemsize), 1))
        if "read" in kinds:
            made.append((kernel.read(_OVERHEAD_BYTES), 1))
        made += [(fn, 1) for fn in extra.values()]
        calls = [fn for fn, _ in made]
        per_call = [n for _, n in made]  # GEMVs one call runs (a CUDA graph runs several)
        # Repetitions per sample from one warm call each: enough calls to last min_sample_s.
        reps: list[int] = []
        for fn in calls:
            fn()
            kernel.sync()
            one = kernel.time_calls(fn, 1)
            reps.append(max(1, min(100_000, math.ceil(config.min_sample_s / max(one, 1e-9)))))
        times: list[list[float]] = [[] for _ in calls]
        rng = np.random.default_rng(config.seed)
        for p in range(config.passes):
            for i in rng.permutation(len(calls)):
                calls[i]()  # warm-up: brings W into the level that holds it
                times[i].append(kernel.time_calls(calls[i], reps[i]) / per_call[i])
            log.debug("probe pass %d/%d done", p + 1, config.passes)
        del kernel
    n = len(shapes)
    overhead_s = float(np.quantile(times[len(kinds) * n], config.quantile)) if "read" in kinds else 0.0
    sweeps = {
        kind: tuple(
            BandwidthSample(weight_bytes=rows * cols * _DTYPE_ITEMSIZE[config.dtype], rows=rows, cols=cols,
                            times_s=tuple(times[k * n + i]), quantile=config.quantile, kernel=kind,
                            overhead_s=overhead_s if kind == "read" else 0.0)
            for i, (rows, cols) in enumerate(shapes)
        )
        for k, kind in enumerate(kinds)
    }
    first_extra = len(calls) - len(extra)
    return sweeps, {key: times[first_extra + k] for k, key in enumerate(extra)}


class _inference_mode:
    """``torch.inference_mode()`` for the torch backends (no autograd bookkeeping per op); nothing for numpy."""

    def __init__(self, backend: str) -> None:
        self.backend, self.mode = backend, None

    def __enter__(self) -> None:
        if self.backend != "numpy":
            import torch

            self.mode = torch.inference_mode()
            self.mode.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self.mode is not None:
            self.mode.__exit__(*exc)


def measure_peak_flops(backend: str = "torch", *, dtype: str = "fp32", size: int = 0, threads: int | None = 1,
                       repeats: int = 7, quantile: float = 0.5) -> float:
    """Dense matmul FLOP/s: ``2 * size**3`` FLOPs per ``size x size`` matmul over the time's ``quantile``.

    2 FLOPs per multiply-add is the usual count (as in the PaLM paper's MFU, appendix B). ``size``
    0 picks 1,024 on the CPU (about 8 ms per matmul on one core) and 8,192 on a GPU.
    """
    backend = _resolve_backend(backend)
    if size == 0:
        size = 8192 if backend == "cuda" else 1024
    if backend == "numpy":
        np_dtype = {"fp32": np.float32, "fp64": np.float64}.get(dtype)
        if np_dtype is None:
            raise ConfigError(f"probe: numpy matmul FLOP/s only for fp32 / fp64, not {dtype}")
        a = np.full((size, size), 1e-3, dtype=np_dtype)
        b = np.full((size, size), 1e-3, dtype=np_dtype)
        c = np.empty((size, size), dtype=np_dtype)
        fn: Callable[[], object] = lambda: np.matmul(a, b, out=c)
        sync: Callable[[], None] = lambda: None
        timer = "cpu"
    else:
        import torch

        torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
                       "fp64": torch.float64}[dtype]
        device = "cuda" if backend == "cuda" else "cpu"
        a = torch.full((size, size), 1e-3, dtype=torch_dtype, device=device)
        b = torch.full((size, size), 1e-3, dtype=torch_dtype, device=device)
        c = torch.empty((size, size), dtype=torch_dtype, device=device)
        fn = lambda: torch.mm(a, b, out=c)
        sync = torch.cuda.synchronize if backend == "cuda" else (lambda: None)
        timer = backend
    times: list[float] = []
    with _Threads(backend if backend != "numpy" else "numpy", threads):
        fn()
        sync()
        for _ in range(repeats):
            if timer == "cuda":
                import torch

                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(3):
                    fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3 / 3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
    return 2 * size**3 / float(np.quantile(times, quantile))


KERNEL_LAYER_HIDDEN = 64
"""Width of the probe's tiny layer: 2 heads of 32, MLP 172 wide, 0.2 MB of fp32 weights."""


def kernel_layer_shape(hidden: int = KERNEL_LAYER_HIDDEN):
    """The :class:`~cachefit.units.LayerShape` and workload of the probe's tiny layer (for its kernel count)."""
    from cachefit.units import LayerShape, Workload

    heads = max(1, hidden // 32)
    shape = LayerShape(part="layer", hidden_size=hidden, num_heads=heads, num_kv_heads=heads,
                       head_dim=hidden // heads, intermediate_size=round(hidden * 2.6875), gated_mlp=True,
                       rotary_dim=hidden // heads)
    workload = Workload(batch=1, seq_len=1, mode="prefill", weight_dtype="fp32", act_dtype="fp32")
    return shape, workload


def build_kernel_layer(shape, device: str = "cpu"):
    """A Llama-style decoder layer of ``shape`` in plain torch, written op for op as the Hugging Face
    Llama layer is (RMSNorm, rotary, eager attention with an additive mask, gated SiLU MLP), and its
    inputs. Returns ``(layer, args)``: ``layer(*args)`` is one forward of one token.
    """
    import torch
    from torch import nn

    heads, kv_heads, head_dim = shape.num_heads, shape.num_kv_heads, shape.head_dim
    if heads != kv_heads or shape.rotary_dim != head_dim or not shape.gated_mlp:
        raise ConfigError("probe kernel layer: only multi-head attention, full rotary and a gated MLP are built")

    class RMSNorm(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(width))

        def forward(self, x):
            dtype = x.dtype
            x = x.to(torch.float32)
            variance = x.pow(2).mean(-1, keepdim=True)
            x = x * torch.rsqrt(variance + 1e-6)
            return self.weight * x.to(dtype)

    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            h = shape.hidden_size
            self.q_proj = nn.Linear(h, heads * head_dim, bias=False)
            self.k_proj = nn.Linear(h, kv_heads * head_dim, bias=False)
            self.v_proj = nn.Linear(h, kv_heads * head_dim, bias=False)
            self.o_proj = nn.Linear(heads * head_dim, h, bias=False)

        def forward(self, x, cos, sin, mask):
            b, t, _ = x.shape
            q = self.q_proj(x).view(b, t, heads, head_dim).transpose(1, 2)
            k = self.k_proj(x).view(b, t, kv_heads, head_dim).transpose(1, 2)
            v = self.v_proj(x).view(b, t, kv_heads, head_dim).transpose(1, 2)
            q = (q * cos) + (rotate_half(q) * sin)
            k = (k * cos) + (rotate_half(k) * sin)
            scores = torch.matmul(q, k.transpose(2, 3)) * head_dim**-0.5
            scores = scores + mask
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            out = torch.matmul(probs, v).transpose(1, 2).contiguous()
            return self.o_proj(out.reshape(b, t, heads * head_dim))

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            h, f = shape.hidden_size, shape.intermediate_size
            self.gate_proj = nn.Linear(h, f, bias=False)
            self.up_proj = nn.Linear(h, f, bias=False)
            self.down_proj = nn.Linear(f, h, bias=False)
            self.act_fn = nn.SiLU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    class DecoderLayer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.input_layernorm = RMSNorm(shape.hidden_size)
            self.self_attn = Attention()
            self.post_attention_layernorm = RMSNorm(shape.hidden_size)
            self.mlp = MLP()

        def forward(self, x, cos, sin, mask):
            h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
            return h + self.mlp(self.post_attention_layernorm(h))

    torch.manual_seed(0)
    layer = DecoderLayer().eval().to(device)
    x = torch.randn(1, 1, shape.hidden_size, device=device)
    angle = torch.arange(head_dim, device=device, dtype=torch.float32)[None, None, None, :] * 1e-2
    mask = torch.zeros(1, 1, 1, 1, device=device)  # additive: nothing masked, as for one token
    return layer, (x, angle.cos(), angle.sin(), mask)


def measure_kernel_overhead(backend: str = "torch", *, threads: int | None = 1, passes: int = 9,
                            quantile: float = 0.5, min_sample_s: float = 2e-3,
                            hidden: int = KERNEL_LAYER_HIDDEN) -> KernelOverhead:
    """Time the tiny eager layer and a tiny matmul; per kernel = layer time / its kernel count.

    Each pass times back-to-back calls lasting ``min_sample_s`` (torch.inference_mode; on CUDA the
    batch ends with a synchronize, so the time is what the host needs to issue the kernels, or what
    the GPU needs to run them, whichever is longer).

    Raises:
        ConfigError: the numpy backend (no eager layer to time).
    """
    backend = _resolve_backend(backend)
    import torch

    sync = torch.cuda.synchronize if backend == "cuda" else (lambda: None)
    cases, kernels = _kernel_cases(backend, hidden)
    times: dict[str, list[float]] = {key: [] for key in cases}
    with _Threads(backend, threads), torch.inference_mode():
        reps: dict[str, int] = {}
        for key, fn in cases.items():
            for _ in range(3):
                fn()
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            reps[key] = max(1, min(100_000, math.ceil(min_sample_s / max(time.perf_counter() - t0, 1e-7))))
        for _ in range(passes):
            for key, fn in cases.items():
                fn()
                sync()
                t0 = time.perf_counter()
                for _ in range(reps[key]):
                    fn()
                sync()
                times[key].append((time.perf_counter() - t0) / reps[key])
    return _kernel_result(times, kernels, hidden, quantile)


def _kernel_cases(backend: str, hidden: int) -> tuple[dict[str, Callable[[], object]], int]:
    """The tiny layer and the tiny matmul as calls, and the layer's kernel count."""
    from cachefit.cost.kernels import count_kernels

    if backend == "numpy":
        raise ConfigError("probe: the per-kernel overhead needs torch (--backend torch or cuda)")
    import torch

    device = "cuda" if backend == "cuda" else "cpu"
    shape, workload = kernel_layer_shape(hidden)
    layer, args = build_kernel_layer(shape, device)
    a = torch.ones(1, hidden, device=device)
    w = torch.ones(hidden, hidden, device=device)
    return {"layer": lambda: layer(*args), "tiny": lambda: torch.mm(a, w)}, count_kernels(shape, workload)


def _kernel_result(times: Mapping[str, Sequence[float]], kernels: int, hidden: int, quantile: float) -> KernelOverhead:
    layer_s = float(np.quantile(times["layer"], quantile))
    return KernelOverhead(per_kernel_s=layer_s / kernels, layer_s=layer_s, kernels=kernels,
                          tiny_op_s=float(np.quantile(times["tiny"], quantile)), hidden=hidden,
                          layer_times_s=tuple(times["layer"]), quantile=quantile)


def probe_device(config: ProbeConfig | None = None, *, name: str | None = None,
                 drop_fraction: float = 0.30) -> ProbeProfile:
    """Measure the local device: the bandwidth sweep, its levels, and (optionally) peak FLOP/s.

    Raises:
        ConfigError: a backend that is not available (the sweep is shortened, with a warning, to a
            quarter of the memory where ``max_bytes`` is more).
    """
    config = config or ProbeConfig()
    backend = _resolve_backend(config.backend)
    t0 = time.perf_counter()
    if backend == "cuda":
        import torch

        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        full_name = props.name
        reported = {"l2": int(props.L2_cache_size)} if getattr(props, "L2_cache_size", 0) else {}
        offchip = int(props.total_memory)
        default_name = "local-cuda"
        budget = torch.cuda.mem_get_info()[0] // 4
    else:
        full_name = _cpu_name()
        reported = reported_cpu_caches()
        offchip = _physical_memory_bytes()
        default_name = "local-cpu"
        budget = offchip // 4 if offchip is not None else config.max_bytes
    if config.max_bytes > budget:
        # A quarter of the (free) memory at most: the sweep must not push the machine into swapping.
        lowered = 2 ** int(math.log2(max(budget, 2 * config.min_bytes)))
        log.warning("probe: max_bytes %s B is more than a quarter of the memory; sweeping to %s B instead",
                    f"{config.max_bytes:,}", f"{lowered:,}")
        config = dataclasses.replace(config, max_bytes=max(lowered, 2 * config.min_bytes))
    extra: dict[str, Callable[[], object]] = {}
    kernels = 0
    if config.measure_kernels and backend != "numpy":
        # timed inside the sweep's passes, so that a slow phase of a shared machine hits both alike
        extra, kernels = _kernel_cases(backend, KERNEL_LAYER_HIDDEN)
    elif config.measure_kernels:
        log.info("probe: the numpy backend measures no per-kernel overhead (it needs torch)")
    sweeps, extra_times = _sweep(dataclasses.replace(config, backend=backend), extra)
    samples = sweeps[_resolve_kernel(config.kernel, backend)]
    levels = detect_levels([s.weight_bytes for s in samples], [s.bandwidth_bytes_per_s for s in samples],
                           drop_fraction=drop_fraction, reported=reported)
    flops: tuple[tuple[str, float], ...] = ()
    if config.measure_flops:
        flops = ((config.dtype, measure_peak_flops(backend, dtype=config.dtype, size=config.flops_size,
                                                   threads=config.threads, quantile=config.quantile)),)
    kernel = _kernel_result(extra_times, kernels, KERNEL_LAYER_HIDDEN, config.quantile) if extra else None
    return ProbeProfile(
        device=name or default_name,
        full_name=full_name,
        backend=backend,
        threads=config.threads if backend == "torch" else None,
        dtype=config.dtype,
        samples=samples,
        levels=levels,
        gemv_samples=sweeps["gemv"] if samples[0].kernel != "gemv" else (),
        peak_flops_per_s=flops,
        kernel_overhead=kernel,
        reported_caches=tuple(sorted(reported.items(), key=lambda kv: kv[1])),
        offchip_capacity_bytes=offchip,
        measured_on=_dt.date.today().isoformat(),
        elapsed_s=time.perf_counter() - t0,
        config=config,
    )


# ----------------------------------------------------------------------------------------------
# Output


def plot_probe(profile: ProbeProfile, path: str | os.PathLike) -> None:
    """PNG of bandwidth against working set (log x), with each pass's points, the medians and the capacities."""
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
            markersize=3, label=f"{kind}: {_quantile_words(profile.samples[0].quantile)} of passes")
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
        fig.savefig(path)
    except OSError as exc:
        raise ConfigError(f"plot {path}: cannot write it ({exc.strerror or exc})") from None
    finally:
        plt.close(fig)


def _quantile_words(quantile: float) -> str:
    return "median" if quantile == 0.5 else ("fastest" if quantile == 0 else f"{quantile:.0%} quantile")


def _short_bytes(nbytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", MiB), ("KiB", KiB)):
        if nbytes >= scale:
            value = nbytes / scale
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{int(nbytes)} B"
