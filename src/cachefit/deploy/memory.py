"""What a stage really holds while it runs: the peak of its live bytes, to check the plan's fit.

On CUDA the allocator knows (``torch.cuda.max_memory_allocated`` from a reset before the call). On
CPU no allocator statistic separates this stage from the rest of the process, so :class:`LivePeak`
counts it the way the profiler's live-storage tracker does (profile/module.py): a
``TorchDispatchMode`` that sees every op of the call, adds each non-weight storage an op reads or
writes when first seen (the call's inputs, its intermediates, KV caches it reads), and drops it once
its ``StorageWeakRef`` expires (polled before every op); the peak is the largest sum seen. Weights are
counted apart (the bytes of the stage's parameters and buffers as allocated).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _storages(obj: Any) -> Iterator[torch.UntypedStorage]:
    for leaf in tree_leaves(obj):
        if isinstance(leaf, torch.Tensor):
            try:
                yield leaf.untyped_storage()
            except (RuntimeError, NotImplementedError, TypeError):
                continue  # sparse / nested tensors: no plain storage


class LivePeak(TorchDispatchMode):
    """The peak of live non-weight bytes during the ops run under it (see the module's docstring)."""

    def __init__(self, weights: nn.Module) -> None:
        super().__init__()
        self._weights = [t.untyped_storage() for t in (*weights.parameters(), *weights.buffers())]
        self._weight_keys = frozenset(s._cdata for s in self._weights)
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.live_bytes = 0
        self.peak_bytes = 0

    def _sweep(self) -> None:
        for key in [k for k, (ref, _) in self._live.items() if ref.expired()]:
            self.live_bytes -= self._live.pop(key)[1]

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self._sweep()
        out = func(*args, **(kwargs or {}))
        for storage in _storages((args, kwargs, out)):
            key = storage._cdata
            if key in self._weight_keys or key in self._live:
                continue
            nbytes = int(storage.nbytes())
            self._live[key] = (StorageWeakRef(storage), nbytes)
            self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return out


def weight_bytes(module: nn.Module) -> int:
    """Bytes of the distinct storages of ``module``'s parameters and buffers, as allocated."""
    seen: dict[int, int] = {}
    for t in (*module.parameters(), *module.buffers()):
        if t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        seen[storage._cdata] = int(storage.nbytes())
    return sum(seen.values())


class PeakProbe:
    """Measures the first ``calls`` calls of a stage's methods; ``peak_bytes`` is their largest
    non-weight peak (on CUDA the allocator's, on CPU :class:`LivePeak`'s)."""

    def __init__(self, module: nn.Module, *, calls: int = 1) -> None:
        self.module = module
        self.remaining = calls
        self.skip = 0
        """Real calls to let pass unmeasured first (decode: the prompts' prefills, not the plan's workload)."""
        self.peak_bytes: int | None = None
        self.method = "torch.cuda.max_memory_allocated" if torch.cuda.is_available() else "live-storage tracker"

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def measured(*args: Any, **kwargs: Any) -> Any:
            if self.remaining <= 0 or any(isinstance(a, torch.Tensor) and a.device.type == "meta" for a in args):
                return fn(*args, **kwargs)
            if self.skip > 0:
                self.skip -= 1
                return fn(*args, **kwargs)
            self.remaining -= 1
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                out = fn(*args, **kwargs)
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - base + _input_bytes(args)
            else:
                with LivePeak(self.module) as probe:
                    out = fn(*args, **kwargs)
                peak = probe.peak_bytes
            self.peak_bytes = max(self.peak_bytes or 0, peak)
            return out

        return measured

    def install(self, *names: str) -> None:
        """Measure calls of the module's methods ``names`` (those it has)."""
        for name in names:
            if hasattr(self.module, name):
                setattr(self.module, name, self.wrap(getattr(self.module, name)))


def _input_bytes(args: Any) -> int:
    seen = {s._cdata: int(s.nbytes()) for s in _storages(args)}
    return sum(seen.values())


__all__ = ["LivePeak", "PeakProbe", "weight_bytes"]
