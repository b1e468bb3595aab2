"""How a deployed plan runs, as plain data: :class:`RunConfig` (the user's choices) and
:class:`NodeConfig` (where the processes run), with the closed sets of strings they take.

No torch here: ``cachefit run`` and the checks before launch read these without importing it.
The run modes are the planner's (:class:`cachefit.units.Mode`): a plan made for ``prefill`` runs
with ``mode="prefill"``, one vocabulary from ``cachefit plan`` to ``cachefit run``'s report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

from cachefit.errors import ConfigError

RunMode = Literal["prefill", "decode", "train"]
"""``prefill``: forward only, over the whole inputs; ``decode``: greedy generation of ``new_tokens``
tokens, each stage keeping the KV cache of its own layers; ``train``: forward, loss on the last stage,
backward. The values of :class:`cachefit.units.Mode`."""
Schedule = Literal["gpipe", "1f1b", "interleaved"]
"""``torch.distributed.pipelining`` schedules: ``ScheduleGPipe``, ``Schedule1F1B``,
``ScheduleInterleaved1F1B`` (several plan stages per process, round robin)."""
RunDtype = Literal["fp32", "bf16", "fp16"]
"""dtypes a pipeline runs in (weights and activations)."""
Launcher = Literal["torchrun", "fork"]
"""``torchrun``: a ``python -m torch.distributed.run`` subprocess (the CLI's way, and the only one
across nodes); ``fork``: torch's elastic launcher in this process, workers forked from it (CPU only,
one node)."""

RUN_MODES: tuple[str, ...] = get_args(RunMode)
"""The run modes: :class:`cachefit.units.Mode`'s values in its order (a test holds them equal)."""
SCHEDULES: tuple[str, ...] = get_args(Schedule)
RUN_DTYPES: tuple[str, ...] = get_args(RunDtype)
LAUNCHERS: tuple[str, ...] = get_args(Launcher)
KvCache = Literal["dynamic", "static"]
"""Decode: ``dynamic`` (transformers' ``DynamicCache``, grown by concatenation each step) or
``static`` (``StaticCache``, pre-allocated to the prompt plus the new tokens, written in place)."""
KV_CACHES: tuple[str, ...] = get_args(KvCache)

_MAX_TIMEOUT_S = 7 * 24 * 3600.0  # a week: larger values overflow the process group's timedelta in C++


def check_choice(value: Any, allowed: tuple[str, ...], *, what: str, hint: str = "") -> None:
    """Refuse ``value`` unless it is one of ``allowed`` (a closed set of strings), naming them.

    Raises:
        ConfigError: ``value`` is not among ``allowed``.
    """
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(f"{what} {value!r}: use one of {', '.join(allowed)}{hint}")


@dataclass(frozen=True, slots=True, kw_only=True)
class RunConfig:
    """How to run a deployed plan."""

    schedule: Schedule = "gpipe"
    """``gpipe``, ``1f1b`` or ``interleaved`` (several plan stages per process, round robin)."""
    micro_batches: int = 1
    """Micro-batches per step; the batch must be a multiple of it."""
    mode: RunMode = "prefill"
    """``prefill`` (forward only), ``train`` (forward, loss on the last stage, backward) or ``decode``
    (greedy generation of ``new_tokens`` tokens, each stage keeping the KV cache of its own layers)."""
    steps: int = 1
    """Timed steps."""
    warmup: int = 0
    """Untimed steps before them."""
    dtype: RunDtype = "fp32"
    """Weights and activations dtype of the run (``fp32``, ``bf16``, ``fp16``)."""
    timeout_s: float = 60.0
    """Bound on every wait for another rank once the run has started (the process groups' timeout)."""
    startup_timeout_s: float = 300.0
    """Bound on starting: every rank joining the process group (its rendezvous included) and building
    its stage(s), before ``timeout_s`` applies. Generous on purpose: cold imports of torch and
    transformers by 8 ranks on 2 cores take over a minute, and loading a large stage from disk can take
    longer; a rank that hangs while the run itself goes is still caught after ``timeout_s``."""
    save_grads: bool = False
    """Train: each rank writes its gradients (for the check against the unsplit model)."""
    new_tokens: int = 0
    """Decode: tokens generated after the prompt (each step one pipelined forward of one token)."""
    kv_cache: KvCache = "dynamic"
    """Decode: each stage's KV cache, ``dynamic`` or ``static`` (pre-allocated to prompt + new tokens)."""

    def __post_init__(self) -> None:
        check_choice(self.schedule, SCHEDULES, what="--schedule")
        # `infer` was cachefit run's name for prefill before the modes became the planner's
        check_choice(self.mode, RUN_MODES, what="--mode",
                     hint=" (infer is now called prefill)" if self.mode == "infer" else "")
        check_choice(self.dtype, RUN_DTYPES, what="--dtype", hint=" (a pipeline runs in one of these)")
        check_choice(self.kv_cache, KV_CACHES, what="--kv-cache")
        if self.mode == "decode" and self.new_tokens < 1:
            raise ConfigError(f"--mode decode generates --new-tokens N tokens: give N >= 1, got {self.new_tokens}")
        if self.mode != "decode" and self.new_tokens:
            raise ConfigError(f"--new-tokens {self.new_tokens} is for --mode decode, not {self.mode}")
        for name in ("micro_batches", "steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ConfigError(f"--warmup must be >= 0, got {self.warmup}")
        for name, flag in (("timeout_s", "--timeout"), ("startup_timeout_s", "--startup-timeout")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not 0 < value <= _MAX_TIMEOUT_S:
                raise ConfigError(f"{flag} must be a number of seconds > 0 and at most {_MAX_TIMEOUT_S:g} "
                                  f"(a week), got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        out = {"schedule": self.schedule, "micro_batches": self.micro_batches, "mode": self.mode,
               "steps": self.steps, "warmup": self.warmup, "dtype": self.dtype, "timeout_s": self.timeout_s,
               "startup_timeout_s": self.startup_timeout_s}
        if self.mode == "decode":
            out["new_tokens"] = self.new_tokens
            out["kv_cache"] = self.kv_cache
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeConfig:
    """Where the processes run: this machine alone, or one node of several (torchrun rendezvous)."""

    nproc_per_node: int
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    """``host:port`` of the c10d rendezvous every node joins (required with ``nnodes > 1``)."""
    rdzv_id: str = "cachefit"

    def __post_init__(self) -> None:
        if self.nproc_per_node < 1 or self.nnodes < 1:
            raise ConfigError("--nproc and --nnodes must be >= 1")
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"--node-rank {self.node_rank} must be in 0..{self.nnodes - 1}")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ConfigError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT, the same on every node")
        if self.rdzv_endpoint is not None:
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"--rdzv-endpoint {self.rdzv_endpoint!r}: write HOST:PORT with a port in 1..65535, "
                                  "e.g. 10.0.0.1:29500")

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


__all__ = [
    "KV_CACHES",
    "LAUNCHERS",
    "RUN_DTYPES",
    "RUN_MODES",
    "SCHEDULES",
    "KvCache",
    "Launcher",
    "NodeConfig",
    "RunConfig",
    "RunDtype",
    "RunMode",
    "Schedule",
    "check_choice",
]
