"""What the probe measures and finds: its configuration, samples, levels and the device file they make."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from cachefit.errors import ConfigError
from cachefit.hardware.probe.analysis import KiB, MiB, DetectedLevel, octave_index, plateau_level

BACKENDS: tuple[str, ...] = ("auto", "torch", "numpy", "cuda")
"""``auto``: cuda when torch sees a GPU, else torch on the CPU, else numpy."""
KERNELS: tuple[str, ...] = ("auto", "read", "gemv")
"""What finds the capacities: ``read`` (a byte-wise max reduction, per-call overhead removed; the
CPU default) or ``gemv`` (the GEMV itself; the only choice on CUDA). ``auto`` picks by backend."""
DTYPE_ITEMSIZE = {"fp32": 4, "fp16": 2, "bf16": 2, "fp64": 8}


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
        if self.dtype not in DTYPE_ITEMSIZE:
            raise ConfigError(f"probe dtype must be one of {', '.join(DTYPE_ITEMSIZE)}, got {self.dtype!r}")
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
            return math.exp(plateau_level([math.log(b) for b in bws[lo: hi + 1]]))
        start = octave_index(sizes, lo) if len(self.levels) > 1 else lo
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
        how += f", {quantile_words(self.samples[0].quantile)} of {len(self.samples[0].times_s)} passes"
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
                          f"{threads_k}, fp32, {quantile_words(k.quantile)} of {len(k.layer_times_s)} passes",
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


def quantile_words(quantile: float) -> str:
    return "median" if quantile == 0.5 else ("fastest" if quantile == 0 else f"{quantile:.0%} quantile")


