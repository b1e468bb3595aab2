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
one token, fp32) divided by the kernels it launches, counted as it runs (the non-view ATen ops a
dispatch mode sees: 38, what :func:`cachefit.cost.kernels.count_kernels` computes for its shape).
Its bytes and FLOPs take well under a microsecond, so its time is the fixed cost
of its kernels: the dispatch of each op, plus the Python of the modules around them, which a real
eager model pays too. The time of a tiny op alone (a 1 x 64 by 64 x 64 matmul) is measured beside
it: a lower bound that leaves the modules' Python out.

Layout: :mod:`.analysis` reads curves (sizes, plateaus, levels; plain numpy), :mod:`.results` holds
the configuration, samples and profile with the device file they make, :mod:`.system` what the
operating system reports, :mod:`.backends` the kernels and the sweep, :mod:`.kernel_overhead` the
tiny layer, :mod:`.device` the whole measurement; the chart is :func:`cachefit.report.probe_plot.plot_probe`.
"""

from cachefit.hardware.probe.analysis import (
    KiB,
    MiB,
    DetectedLevel,
    detect_levels,
    gemv_shape,
    segment_plateaus,
    sweep_sizes,
)
from cachefit.hardware.probe.backends import measure_bandwidth, measure_peak_flops
from cachefit.hardware.probe.device import probe_device
from cachefit.hardware.probe.kernel_overhead import (
    KERNEL_LAYER_HIDDEN,
    build_kernel_layer,
    count_launched_kernels,
    kernel_layer_shape,
    measure_kernel_overhead,
)
from cachefit.hardware.probe.results import (
    BACKENDS,
    KERNELS,
    BandwidthSample,
    KernelOverhead,
    ProbeConfig,
    ProbeProfile,
    quantile_words,
)
from cachefit.hardware.probe.system import cpu_name, reported_cpu_caches

__all__ = [
    "BACKENDS", "KERNELS", "KERNEL_LAYER_HIDDEN", "KiB", "MiB", "BandwidthSample", "DetectedLevel", "KernelOverhead",
    "ProbeConfig", "ProbeProfile", "build_kernel_layer", "count_launched_kernels", "cpu_name", "detect_levels",
    "gemv_shape", "kernel_layer_shape", "measure_bandwidth", "measure_kernel_overhead", "measure_peak_flops",
    "probe_device", "quantile_words", "reported_cpu_caches", "segment_plateaus", "sweep_sizes",
]
