"""``probe_device``: the whole measurement of the local device, from the sweep to a :class:`ProbeProfile`."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import math
import time
from collections.abc import Callable

from cachefit.hardware.probe.analysis import detect_levels
from cachefit.hardware.probe.backends import measure_peak_flops, resolve_backend, resolve_kernel, run_sweep
from cachefit.hardware.probe.kernel_overhead import KERNEL_LAYER_HIDDEN, kernel_cases, kernel_result
from cachefit.hardware.probe.results import ProbeConfig, ProbeProfile
from cachefit.hardware.probe.system import cpu_name, physical_memory_bytes, reported_cpu_caches

log = logging.getLogger(__name__)


def probe_device(config: ProbeConfig | None = None, *, name: str | None = None,
                 drop_fraction: float = 0.30) -> ProbeProfile:
    """Measure the local device: the bandwidth sweep, its levels, and (optionally) peak FLOP/s.

    Raises:
        ConfigError: a backend that is not available (the sweep is shortened, with a warning, to a
            quarter of the memory where ``max_bytes`` is more).
    """
    config = config or ProbeConfig()
    backend = resolve_backend(config.backend)
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
        full_name = cpu_name()
        reported = reported_cpu_caches()
        offchip = physical_memory_bytes()
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
        extra, kernels = kernel_cases(backend, KERNEL_LAYER_HIDDEN)
    elif config.measure_kernels:
        log.info("probe: the numpy backend measures no per-kernel overhead (it needs torch)")
    sweeps, extra_times = run_sweep(dataclasses.replace(config, backend=backend), extra)
    samples = sweeps[resolve_kernel(config.kernel, backend)]
    levels = detect_levels([s.weight_bytes for s in samples], [s.bandwidth_bytes_per_s for s in samples],
                           drop_fraction=drop_fraction, reported=reported)
    flops: tuple[tuple[str, float], ...] = ()
    if config.measure_flops:
        flops = ((config.dtype, measure_peak_flops(backend, dtype=config.dtype, size=config.flops_size,
                                                   threads=config.threads, quantile=config.quantile)),)
    kernel = kernel_result(extra_times, kernels, KERNEL_LAYER_HIDDEN, config.quantile) if extra else None
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
