"""The measuring kernels (the read and the GEMV on the CPU through torch or numpy, the GEMV in CUDA
graphs), the sweep that times them, and the matmul for peak FLOP/s. torch is imported inside."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping

import numpy as np

from cachefit.errors import ConfigError
from cachefit.hardware.probe.analysis import sweep_sizes, gemv_shape
from cachefit.hardware.probe.results import DTYPE_ITEMSIZE, BandwidthSample, ProbeConfig
from cachefit.units import torch_dtype as to_torch_dtype

log = logging.getLogger(__name__)

# The read kernel's per-call overhead is measured on a view this small (one cache line): its bytes
# take a few nanoseconds, the call's dispatch about a microsecond.
_OVERHEAD_BYTES = 64


def resolve_backend(backend: str) -> str:
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
        self.itemsize = DTYPE_ITEMSIZE[dtype]
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

            torch_dtype = to_torch_dtype(dtype, what="probe dtype")
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


class CpuThreads:
    """Set torch's CPU thread count for a block and restore it after."""

    def __init__(self, backend: str, threads: int | None) -> None:
        self.backend, self.threads, self.saved = backend, threads, None

    def __enter__(self) -> CpuThreads:
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


def resolve_kernel(kernel: str, backend: str) -> str:
    if kernel == "auto":
        return "gemv" if backend == "cuda" else "read"
    if kernel == "read" and backend == "cuda":
        raise ConfigError("probe kernel 'read' runs on the CPU only; on CUDA use --kernel gemv (or auto)")
    return kernel


def measure_bandwidth(config: ProbeConfig) -> tuple[BandwidthSample, ...]:
    """Run the sweep of ``config`` and return one sample per size of the kernel that finds the
    capacities (``config.kernel``; see the module doc)."""
    sweeps, _ = run_sweep(config, gemv_too=False)
    return sweeps[resolve_kernel(config.kernel, resolve_backend(config.backend))]


def run_sweep(config: ProbeConfig, extra: Mapping[str, Callable[[], object]] | None = None, *, gemv_too: bool = True
           ) -> tuple[dict[str, tuple[BandwidthSample, ...]], dict[str, list[float]]]:
    """The sweep: samples per kernel (``read`` and / or ``gemv``), and the ``extra`` calls' times
    (seconds per call, one per pass).

    Every call (each kernel at each size, the read kernel's overhead call, each extra call) is
    visited once per pass in a random order, so a slow phase of a shared machine hits them alike.
    """
    backend = resolve_backend(config.backend)
    primary = resolve_kernel(config.kernel, backend)
    kinds = ("read", "gemv") if primary == "read" and gemv_too else (primary,)
    sizes = sweep_sizes(config.min_bytes, config.max_bytes, config.points_per_octave)
    extra = dict(extra or {})
    with CpuThreads(backend, config.threads), InferenceMode(backend):
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
            BandwidthSample(weight_bytes=rows * cols * DTYPE_ITEMSIZE[config.dtype], rows=rows, cols=cols,
                            times_s=tuple(times[k * n + i]), quantile=config.quantile, kernel=kind,
                            overhead_s=overhead_s if kind == "read" else 0.0)
            for i, (rows, cols) in enumerate(shapes)
        )
        for k, kind in enumerate(kinds)
    }
    first_extra = len(calls) - len(extra)
    return sweeps, {key: times[first_extra + k] for k, key in enumerate(extra)}


class InferenceMode:
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
    backend = resolve_backend(backend)
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

        torch_dtype = to_torch_dtype(dtype, what="probe dtype")
        device = "cuda" if backend == "cuda" else "cpu"
        a = torch.full((size, size), 1e-3, dtype=torch_dtype, device=device)
        b = torch.full((size, size), 1e-3, dtype=torch_dtype, device=device)
        c = torch.empty((size, size), dtype=torch_dtype, device=device)
        fn = lambda: torch.mm(a, b, out=c)
        sync = torch.cuda.synchronize if backend == "cuda" else (lambda: None)
        timer = backend
    times: list[float] = []
    with CpuThreads(backend if backend != "numpy" else "numpy", threads):
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
