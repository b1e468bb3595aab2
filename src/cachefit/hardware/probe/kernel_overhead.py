"""The fixed cost of a kernel: a tiny eager decoder layer, whose bytes and FLOPs take no time, timed
and divided by the kernels it launches (counted as it runs: the non-view ATen ops it dispatches)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from cachefit.errors import ConfigError
from cachefit.hardware.probe.backends import CpuThreads, resolve_backend
from cachefit.hardware.probe.results import KernelOverhead

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
    backend = resolve_backend(backend)
    import torch

    sync = torch.cuda.synchronize if backend == "cuda" else (lambda: None)
    cases, kernels = kernel_cases(backend, hidden)
    times: dict[str, list[float]] = {key: [] for key in cases}
    with CpuThreads(backend, threads), torch.inference_mode():
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
    return kernel_result(times, kernels, hidden, quantile)


# Ops a dispatch mode sees that launch no kernel: views, and the aliases autograd and reshape make.
_NOT_KERNELS = frozenset({"_unsafe_view", "alias", "detach"})


def count_launched_kernels(fn: Callable[[], object]) -> int:
    """Kernels one call of ``fn`` launches: the non-view ATen ops a ``TorchDispatchMode`` sees.

    The same definition as the cost model's count (:mod:`cachefit.cost.kernels`), measured here
    rather than computed, so that a device fact does not depend on the cost model; a test checks
    that the two agree on the probe's layer.
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.kernels = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
            if not func.is_view and func.overloadpacket.__name__ not in _NOT_KERNELS:
                self.kernels += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), _Count() as counter:
        fn()
    return counter.kernels


def kernel_cases(backend: str, hidden: int) -> tuple[dict[str, Callable[[], object]], int]:
    """The tiny layer and the tiny matmul as calls, and the kernels the layer launches (counted)."""
    if backend == "numpy":
        raise ConfigError("probe: the per-kernel overhead needs torch (--backend torch or cuda)")
    import torch

    device = "cuda" if backend == "cuda" else "cpu"
    shape, _ = kernel_layer_shape(hidden)
    layer, args = build_kernel_layer(shape, device)
    a = torch.ones(1, hidden, device=device)
    w = torch.ones(hidden, hidden, device=device)
    run_layer = lambda: layer(*args)  # noqa: E731
    return {"layer": run_layer, "tiny": lambda: torch.mm(a, w)}, count_launched_kernels(run_layer)


def kernel_result(times: Mapping[str, Sequence[float]], kernels: int, hidden: int, quantile: float) -> KernelOverhead:
    layer_s = float(np.quantile(times["layer"], quantile))
    return KernelOverhead(per_kernel_s=layer_s / kernels, layer_s=layer_s, kernels=kernels,
                          tiny_op_s=float(np.quantile(times["tiny"], quantile)), hidden=hidden,
                          layer_times_s=tuple(times["layer"]), quantile=quantile)
