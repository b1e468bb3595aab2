"""Run a plan as processes: one per card, under torchrun, with ``torch.distributed.pipelining``.

Two halves:

* the **launcher** (:func:`launch`, :func:`deploy_plan`) checks the plan against the model before any
  process starts, writes the inputs, starts ``python -m torch.distributed.run ... -m
  cachefit.deploy.runtime`` (torchrun: one process per card, its elastic agent ends every rank when one
  fails) and reads back what the ranks wrote: timings, outputs, and, when a run fails, which stage
  failed and how;
* the **worker** (:func:`main`, run by torchrun in every process) joins the process group (gloo on
  CPU, NCCL on CUDA) with a short timeout, builds its stage (:mod:`cachefit.deploy.stages`), wraps
  it in a ``PipelineStage`` and runs a schedule (``ScheduleGPipe``, ``Schedule1F1B`` or
  ``ScheduleInterleaved1F1B``) over micro-batches, for inference or for a training step (loss on the
  last stage).

A stage split over several cards (tensor parallel) is one pipeline stage: its first rank (the leader)
takes part in the pipeline's point-to-point traffic and shares each micro-batch's inputs with the
other shards (followers) by broadcast over the stage's group; every shard then runs the same
``parallelize_module``-d forward, whose collectives join the shards' partial results.

Checks before launch live in :mod:`cachefit.deploy.preflight`; the watched torchrun process, its
log file and the failure message in :mod:`cachefit.deploy.supervisor`.

Faults: starting (joining the process group, building the stages) is bounded by
``startup_timeout_s``, and from then on every collective and point-to-point wait by ``timeout_s``
(the process groups' timeout); a rank that fails writes ``error-rank{R}.json`` naming its stage
before it exits, the supervisor ends the others, and the launcher turns those reports (and the
ranks that left none: killed or crashed hard, or ended while hung) into one
:class:`~cachefit.errors.DeployError`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import resource
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from cachefit.deploy.config import (
    LAUNCHERS,
    RUN_DTYPES,
    RUN_MODES,
    SCHEDULES,
    Launcher,
    NodeConfig,
    RunConfig,
    check_choice,
)
from cachefit.deploy.preflight import (
    check_run_inputs,
    check_world,
    load_checked_plan,
    resolve_model_dir,
)
from cachefit.deploy.supervisor import SupervisedExit, failure, log_path, run_supervised, write_pid
from cachefit.errors import CachefitError, ConfigError, DeployError
from cachefit.families import Loss
from cachefit.files import atomic_path, write_text_atomic
from cachefit.plan import Plan, load_plan

logger = logging.getLogger(__name__)

FAULT_ENV = "CACHEFIT_DEPLOY_FAULT"
"""Testing aid: ``RANK:KIND[:STEP]`` makes rank RANK fail at its stage's forward in step STEP (default
0, counted after warm-up). KIND: ``kill`` (SIGKILL, no report), ``raise`` (an exception), ``hang``
(sleeps until ended). The rank writes ``fault-rank{R}.json`` (the kind and ``time.time()``) first."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RunResult:
    """What a deployed run produced."""

    report: Mapping[str, Any]
    """Timings per stage and end to end, bytes per stage, losses (train); the JSON of ``cachefit run``."""
    outputs: torch.Tensor | None = None
    """Final outputs (logits, or the last hidden state of an encoder) on the node of the last stage."""
    run_dir: Path | None = None
    layout: Any = None
    """The :class:`~cachefit.deploy.stages.DeployLayout` that ran (for :func:`~cachefit.deploy.verify.check_run`)."""


# --------------------------------------------------------------------------------------------
# Run files (the checks before launch are in cachefit.deploy.preflight)
# --------------------------------------------------------------------------------------------


def read_inputs_file(path: str | os.PathLike[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``input_ids`` (and optional ``attention_mask``) from a safetensors file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise ConfigError(f"--inputs {path}: cannot read it as safetensors ({exc})") from None
    if "input_ids" not in tensors:
        raise ConfigError(f"--inputs {path}: no tensor named 'input_ids' (found {sorted(tensors)})")
    return tensors["input_ids"], tensors.get("attention_mask")


def _atomic_save(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    with atomic_path(path, what="run file") as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------


def _torchrun_command(nodes: NodeConfig, worker_args: Sequence[str]) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nodes.nproc_per_node),
           "--max-restarts", "0", "--monitor-interval", "0.2"]
    if nodes.nnodes == 1 and not nodes.rdzv_endpoint:
        cmd += ["--standalone"]
    else:
        cmd += ["--nnodes", str(nodes.nnodes), "--node-rank", str(nodes.node_rank), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", str(nodes.rdzv_endpoint), "--rdzv-id", nodes.rdzv_id]
    return cmd + ["-m", "cachefit.deploy.runtime", *worker_args]


def launch(model_dir: str | os.PathLike[str], plan: Plan | str | os.PathLike[str], *, nodes: NodeConfig,
           config: RunConfig = RunConfig(), input_ids: torch.Tensor | None = None,
           attention_mask: torch.Tensor | None = None, run_dir: str | os.PathLike[str] | None = None,
           wall_timeout_s: float | None = None, stream: Any = None, launcher: Launcher = "torchrun") -> RunResult:
    """Deploy a checkpoint directory as ``plan`` says: check, start torchrun, collect the results.

    Args:
        model_dir: a local Hugging Face model directory (or ``all-minilm-l6-v2``).
        plan: a Plan, or the path of its JSON (then checked against itself and its provenance by
            :func:`~cachefit.deploy.preflight.load_checked_plan`).
        nodes: processes on this node and, for several nodes, the rendezvous.
        config: schedule, micro-batches, mode, steps, dtype, timeouts.
        input_ids: ``(batch, seq)`` token ids, at most the plan's workload per micro-batch; default:
            random ids of the plan's workload shape (its batch per micro-batch).
        attention_mask: padding mask (1 = token), default all ones.
        run_dir: where the ranks write their results (must be the same path on every node); default
            a new temporary directory, kept (the report's ``run_dir``: inputs, outputs, gradients, errors).
        wall_timeout_s: end the whole run (every process) after this long; default none, every
            wait for a peer being bounded by ``config.timeout_s`` already.
        stream: where torchrun's and the ranks' output is copied as well (verbose); it always goes
            to the run directory's log file (``run.log``, the report's ``log_file``).
        launcher: ``torchrun`` (a ``python -m torch.distributed.run`` subprocess; the CLI's way, and
            the only one across nodes) or ``fork`` (torch's elastic launcher in this process, workers
            forked from it: no second start of Python and torch, so a run starts in about a second;
            CPU only, one node).

    Raises:
        ConfigError: the plan, the checkpoint, the process count or the inputs would not run (before
            launch; see :mod:`cachefit.deploy.preflight`).
        DeployError: a rank failed; the message names the stage(s), what happened, and the log file.
    """
    check_choice(launcher, LAUNCHERS, what="launcher")
    plan_obj = plan if isinstance(plan, Plan) else load_checked_plan(plan)
    checked = check_run_inputs(model_dir, plan_obj, nodes=nodes, config=config, input_ids=input_ids,
                               attention_mask=attention_mask)
    source, layout, ids, mask = checked.source, checked.layout, checked.input_ids, checked.attention_mask
    directory = Path(run_dir) if run_dir is not None else Path(tempfile.mkdtemp(prefix="cachefit-run-"))
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--run-dir {os.fspath(directory)!r}: cannot create it ({exc.strerror}); "
                          "give a writable folder") from None
    stale_files = [*directory.glob("error-rank*.json"), *directory.glob("grads-rank*.safetensors"),
                   *directory.glob("pid-rank*.json"), *directory.glob("fault-rank*.json"),
                   directory / "result.json", directory / "outputs.safetensors"]
    for stale in stale_files:
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    plan_file = write_text_atomic(directory / "plan.json", plan_obj.to_json(), what="run file")
    _atomic_save({"input_ids": ids, "attention_mask": mask}, directory / "inputs.safetensors")
    worker_args = [
        "--model-dir", str(source.path), "--plan", str(plan_file), "--inputs", str(directory / "inputs.safetensors"),
        "--run-dir", str(directory), "--schedule", config.schedule, "--micro-batches", str(config.micro_batches),
        "--mode", config.mode, "--steps", str(config.steps), "--warmup", str(config.warmup), "--dtype", config.dtype,
        "--timeout", str(config.timeout_s), "--startup-timeout", str(config.startup_timeout_s),
        "--new-tokens", str(config.new_tokens),
    ] + (["--save-grads"] if config.save_grads else [])
    log_file = log_path(directory, nodes.node_rank, nodes.nnodes) if launcher == "torchrun" else None
    start = time.perf_counter()
    if launcher == "fork":
        _preload(source)
        exit_ = SupervisedExit(returncode=_run_forked(nodes, worker_args))
    else:
        cmd = _torchrun_command(nodes, worker_args)
        logger.info("launching: %s (output in %s)", " ".join(cmd), log_file)
        exit_ = run_supervised(cmd, run_dir=directory, log_file=log_file, timeout_s=config.timeout_s,  # type: ignore[arg-type]
                               wall_timeout_s=wall_timeout_s, stream=stream, env=_torchrun_env(nodes))
    elapsed = time.perf_counter() - start
    if exit_.returncode != 0 or exit_.ended:
        raise failure(directory, layout, exit_, elapsed, config.timeout_s, log_file=log_file,
                      wall_timeout_s=wall_timeout_s)
    result = _collect(directory, layout, nodes)
    report = dict(result.report)
    if checked.notes:
        report["notes"] = [*report.get("notes", []), *checked.notes]
    if log_file is not None:
        report["log_file"] = str(log_file)
    return RunResult(report=report, outputs=result.outputs, run_dir=result.run_dir, layout=result.layout)


def _torchrun_env(nodes: NodeConfig) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if nodes.nproc_per_node > 1:  # what torchrun would set, without its banner: the cores shared by the ranks
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nodes.nproc_per_node)))
    return env


def _elastic_config(nodes: NodeConfig, run_id: str) -> Any:
    import multiprocessing

    from torch.distributed.launcher.api import LaunchConfig

    if nodes.nnodes != 1:
        raise ConfigError("the fork launcher runs on one node; use the torchrun launcher across nodes")
    if torch.cuda.is_available():
        raise ConfigError("the fork launcher runs on CPU only (CUDA cannot be used in forked processes); use torchrun")
    if "fork" not in multiprocessing.get_all_start_methods():
        raise ConfigError("this platform cannot fork processes; use the torchrun launcher")
    return LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nodes.nproc_per_node, run_id=run_id,
                        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2,
                        start_method="fork")


def _preload(source: Any) -> None:
    """Import what every worker needs once, before forking (each would import it again otherwise)."""
    import transformers
    import transformers.masking_utils  # noqa: F401
    from torch.distributed import pipelining  # noqa: F401
    from torch.distributed.tensor import parallel  # noqa: F401

    getattr(transformers, source.architecture)


def _run_forked(nodes: NodeConfig, worker_args: Sequence[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    try:
        elastic_launch(_elastic_config(nodes, f"cachefit-{os.getpid()}"), run_worker)([*worker_args, "--forked"])
    except ChildFailedError:
        return 1
    return 0


def _collect(directory: Path, layout: Any, nodes: NodeConfig) -> RunResult:
    from safetensors.torch import load_file

    result_file = directory / "result.json"
    outputs_file = directory / "outputs.safetensors"
    report: dict[str, Any] = {}
    if result_file.exists():
        report = json.loads(result_file.read_text(encoding="utf-8"))
    elif nodes.nnodes > 1:
        report = {"note": f"rank 0 ran on another node; its result.json is written to {directory} there"}
    else:
        raise DeployError(f"the run ended without error but wrote no {result_file}; see the log in {directory}")
    outputs = load_file(str(outputs_file))["outputs"] if outputs_file.exists() else None
    report["run_dir"] = str(directory)
    return RunResult(report=report, outputs=outputs, run_dir=directory, layout=layout)


def deploy_plan(model: str | os.PathLike[str] | nn.Module, plan: Plan | str | os.PathLike[str], *,
                nproc: int | None = None, inputs: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, config: RunConfig = RunConfig(),
                loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                target: torch.Tensor | None = None, **launch_kwargs: Any) -> RunResult:
    """Deploy ``plan`` on this machine: one process per card (``nproc``, default: the plan's cards).

    ``model`` is a model directory (run under torchrun, see :func:`launch`) or an ``nn.Sequential``
    whose children are the plan's units (run with torch's elastic launcher in forked processes, so the
    module is not pickled); for the latter ``inputs`` is the batch tensor, and ``config.mode="train"``
    needs ``loss_fn(output, target)`` and ``target``.
    """
    plan_obj = plan if isinstance(plan, Plan) else load_plan(plan)
    if isinstance(model, nn.Module):
        return _deploy_module(model, plan_obj, nproc=nproc, inputs=inputs, config=config, loss_fn=loss_fn,
                              target=target)
    nodes = NodeConfig(nproc_per_node=nproc or plan_obj.cards)
    return launch(model, plan_obj, nodes=nodes, config=config, input_ids=inputs, attention_mask=attention_mask,
                  **launch_kwargs)


def _deploy_module(module: nn.Module, plan: Plan, *, nproc: int | None, inputs: torch.Tensor | None,
                   config: RunConfig, loss_fn: Callable[..., torch.Tensor] | None,
                   target: torch.Tensor | None) -> RunResult:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    from cachefit.deploy.stages import layout_from_module

    layout = layout_from_module(plan, module)
    nodes = NodeConfig(nproc_per_node=nproc or layout.world_size)
    check_world(layout, nodes, config)
    if inputs is None:
        raise ConfigError("deploy_plan(nn.Sequential): give inputs, the batch tensor of the first block")
    if inputs.shape[0] % config.micro_batches:
        raise ConfigError(f"a batch of {inputs.shape[0]} cannot be cut into {config.micro_batches} micro-batches")
    if config.mode == "train" and (loss_fn is None or target is None):
        raise ConfigError("mode train needs loss_fn(output, target) and target")
    run_dir = Path(tempfile.mkdtemp(prefix="cachefit-run-"))
    launch_config = _elastic_config(nodes, f"cachefit-{os.getpid()}")
    job = _ModuleJob(module=module, layout=layout, config=config, inputs=inputs, loss_fn=loss_fn, target=target,
                     run_dir=str(run_dir))
    try:
        returned = elastic_launch(launch_config, _module_worker)(job)
    except ChildFailedError as exc:
        raise failure(run_dir, layout, SupervisedExit(returncode=1), 0.0, config.timeout_s) from exc
    report = json.loads((run_dir / "result.json").read_text(encoding="utf-8"))
    outputs = next((r for r in returned.values() if isinstance(r, torch.Tensor)), None)
    return RunResult(report=report, outputs=outputs, run_dir=run_dir, layout=layout)


@dataclass(slots=True)
class _ModuleJob:
    module: nn.Module
    layout: Any
    config: RunConfig
    inputs: torch.Tensor
    loss_fn: Callable[..., torch.Tensor] | None
    target: torch.Tensor | None
    run_dir: str


def _module_worker(job: _ModuleJob) -> torch.Tensor | None:
    from cachefit.deploy.stages import build_sequential_stage

    _prepare_forked_worker()

    def build(placement: Any, mesh: Any) -> nn.Module:
        return build_sequential_stage(job.module, placement)

    return _worker(layout=job.layout, config=job.config, build=build, inputs=(job.inputs,), target=job.target,
                   loss_fn=job.loss_fn, run_dir=Path(job.run_dir), plan_dtype=job.layout.weight_dtype,
                   check_bytes=False)


# --------------------------------------------------------------------------------------------
# Worker
# --------------------------------------------------------------------------------------------

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.int64: 3, torch.int32: 4, torch.bool: 5}
_CODE_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}
_MAX_DIMS = 4


class TensorParallelSync:
    """The leader of a split stage shares each forward's inputs with its followers (broadcast).

    A fixed-size int64 header says what comes next: ``FORWARD`` with the shapes and dtypes of the
    tensors that follow, ``BARRIER`` (join a world barrier), or ``STOP``.
    """

    STOP, FORWARD, BARRIER = 0, 1, 2

    def __init__(self, group: Any, leader: int, device: torch.device) -> None:
        self.group, self.leader, self.device = group, leader, device

    def _header(self, cmd: int, tensors: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        head = torch.zeros(2 + 2 * (2 + _MAX_DIMS), dtype=torch.int64)
        head[0], head[1] = cmd, len(tensors)
        for k, t in enumerate(tensors):
            base = 2 + k * (2 + _MAX_DIMS)
            head[base], head[base + 1] = t.dim(), _DTYPE_CODES[t.dtype]
            head[base + 2: base + 2 + t.dim()] = torch.tensor(t.shape)
        return head.to(self.device)

    def lead(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        tensors = tuple(t.contiguous() for t in tensors)
        dist.broadcast(self._header(self.FORWARD, tensors), src=self.leader, group=self.group)
        for t in tensors:
            dist.broadcast(t.detach(), src=self.leader, group=self.group)
        return tensors

    def command(self, cmd: int) -> None:
        dist.broadcast(self._header(cmd), src=self.leader, group=self.group)

    def follow(self, stage: Any) -> None:
        """Follower loop: run the stage's forward on every input the leader shares, until STOP."""
        while True:
            head = self._header(self.STOP)
            dist.broadcast(head, src=self.leader, group=self.group)
            head = head.cpu()
            cmd = int(head[0])
            if cmd == self.STOP:
                return
            if cmd == self.BARRIER:
                dist.barrier()
                continue
            tensors = []
            for k in range(int(head[1])):
                base = 2 + k * (2 + _MAX_DIMS)
                ndim, code = int(head[base]), int(head[base + 1])
                shape = tuple(int(d) for d in head[base + 2: base + 2 + ndim])
                t = torch.empty(shape, dtype=_CODE_DTYPES[code], device=self.device)
                dist.broadcast(t, src=self.leader, group=self.group)
                tensors.append(t)
            with torch.no_grad():
                stage.compute(*tensors)


def _fault() -> tuple[int, str, int] | None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    parts = spec.split(":")
    return int(parts[0]), parts[1], int(parts[2]) if len(parts) > 2 else 0


def _inject(kind: str, run_dir: Path, rank: int) -> None:
    logger.warning("injecting fault %r (%s)", kind, FAULT_ENV)
    with contextlib.suppress(OSError):  # when it happened, for the tests that time how a fault ends
        (run_dir / f"fault-rank{rank}.json").write_text(json.dumps({"kind": kind, "time": time.time()}),
                                                      encoding="utf-8")
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "hang":
        while True:
            time.sleep(3600)
    else:
        raise RuntimeError(f"fault injected by {FAULT_ENV}")


def _causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy (labels -100 where padded), the loss of ``*ForCausalLM``."""
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                       ignore_index=-100)


def _encoder_loss(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A synthetic loss for encoders (no labels): half the mean square of the unpadded hidden states."""
    weight = mask.unsqueeze(-1).to(hidden.dtype)
    return 0.5 * (hidden.float().pow(2) * weight).sum() / (weight.sum() * hidden.shape[-1])


_LOSS_FNS: Mapping[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "causal_lm": _causal_lm_loss,
    "encoder_mean": _encoder_loss,
}


def loss_for(loss: Loss) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training loss of the last stage, by a family's ``loss`` (its target: :func:`labels_for`)."""
    check_choice(loss, tuple(_LOSS_FNS), what="loss")
    return _LOSS_FNS[loss]


def labels_for(loss: Loss, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The target handed to the last stage: next-token labels (-100 where padded) for ``causal_lm``,
    the padding mask for ``encoder_mean`` (encoders have no labels)."""
    check_choice(loss, tuple(_LOSS_FNS), what="loss")
    if loss == "encoder_mean":
        return mask.clone()
    return input_ids.masked_fill(mask == 0, -100)


def _schedule(stages: list[Any], config: RunConfig, loss_fn: Callable[..., torch.Tensor] | None) -> Any:
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    if config.schedule == "interleaved":
        return ScheduleInterleaved1F1B(stages, config.micro_batches, loss_fn=loss_fn)
    cls = ScheduleGPipe if config.schedule == "gpipe" else Schedule1F1B
    return cls(stages[0], config.micro_batches, loss_fn=loss_fn)


def _device() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _write_error(run_dir: Path, rank: int, where: str, exc: BaseException) -> None:
    with contextlib.suppress(OSError):
        (run_dir / f"error-rank{rank}.json").write_text(json.dumps({
            "rank": rank, "stage": where, "error_type": type(exc).__name__, "message": str(exc),
            "traceback": traceback.format_exc(limit=8),
        }), encoding="utf-8")


def _worker(*, layout: Any, config: RunConfig, build: Callable[[Any, Any], nn.Module],
            inputs: tuple[torch.Tensor, ...], target: torch.Tensor | None,
            loss_fn: Callable[..., torch.Tensor] | None, run_dir: Path, plan_dtype: str,
            check_bytes: bool) -> torch.Tensor | None:
    """One process: join, build its stage(s), run the schedule, report. Returns the outputs on the last stage."""
    device = _device()
    backend = "nccl" if device.type == "cuda" else "gloo"
    env_rank = int(os.environ.get("RANK", "0"))
    write_pid(run_dir, env_rank)
    # joining is bounded by the startup timeout (ranks arrive as their imports finish); every wait of
    # the run itself by --timeout, set once all ranks have built their stages (_run_rank)
    try:
        dist.init_process_group(backend, timeout=_startup_timeout(config))
    except BaseException as exc:
        logger.error("rank %d could not join the others within --startup-timeout %g s: %s", env_rank,
                     config.startup_timeout_s, exc, exc_info=True)
        _write_error(run_dir, env_rank, f"rank {env_rank} (joining)", exc)
        raise
    rank, world = dist.get_rank(), dist.get_world_size()
    where = f"rank {rank}"
    _report_termination(run_dir, rank)
    try:
        return _run_rank(layout, config, build, inputs, target, loss_fn, run_dir, plan_dtype, check_bytes,
                         device, rank, world)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            placements = _placements_of(layout, rank, world, config)
            where = ", ".join(p.describe() for p, _ in placements)
        # the traceback to the log first: the report makes the supervisor end every rank soon after
        logger.error("%s failed: %s: %s", where, type(exc).__name__, exc, exc_info=True)
        _write_error(run_dir, rank, where, exc)
        raise
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _startup_timeout(config: RunConfig) -> datetime.timedelta:
    return datetime.timedelta(seconds=max(config.startup_timeout_s, config.timeout_s))


def _bound_waits(timeout_s: float, groups: Sequence[Any]) -> None:
    """Set the timeout of every wait in ``groups`` (None: the world group; this rank's groups only) to ``timeout_s``.

    ``_set_pg_timeout`` is torch's own (torch >= 2.3) way to change a process group's timeout after
    it was made; the alternative, a second world group made with the run's timeout, would leave the
    first one (which pipelining and DTensor fall back to) bounded by the startup timeout only.
    """
    from torch.distributed.distributed_c10d import _set_pg_timeout

    timeout = datetime.timedelta(seconds=timeout_s)
    for group in groups:
        _set_pg_timeout(timeout, group)


def _report_termination(run_dir: Path, rank: int) -> None:
    """On SIGTERM (torchrun ending the survivors of a failed run), leave a report before exiting."""
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return  # torch's elastic launcher installed its own (it raises SignalException)

    def handler(signum: int, _frame: Any) -> None:
        with contextlib.suppress(OSError), open(run_dir / f"error-rank{rank}.json", "x", encoding="utf-8") as fh:
            # "x": a rank that failed first keeps its own report (the root cause)
            fh.write(json.dumps({"rank": rank, "stage": f"rank {rank}", "error_type": "SignalException",
                                 "message": f"got signal {signum}: ended by the launcher"}))
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def _placements_of(layout: Any, rank: int, world: int, config: RunConfig) -> list[tuple[Any, int]]:
    if config.schedule == "interleaved":
        return [(p, 0) for p in layout.stages if p.stage_idx % world == rank]
    return [layout.placement_of(rank)]


def _run_rank(layout: Any, config: RunConfig, build: Callable[[Any, Any], nn.Module],
              inputs: tuple[torch.Tensor, ...], target: torch.Tensor | None,
              loss_fn: Callable[..., torch.Tensor] | None, run_dir: Path, plan_dtype: str, check_bytes: bool,
              device: torch.device, rank: int, world: int) -> torch.Tensor | None:
    from torch.distributed.pipelining import PipelineStage

    placements = _placements_of(layout, rank, world, config)
    interleaved = config.schedule == "interleaved"
    # groups: every rank creates every group, in the same order (new_group is collective); without a
    # timeout they would wait 30 minutes (torch's default), whatever the world group's is
    startup = _startup_timeout(config)
    leaders = [p.leader for p in layout.stages]
    pp_group = None if (interleaved or not layout.tensor_parallel) else dist.new_group(leaders, timeout=startup)
    tp_groups = {p.stage_idx: dist.new_group(list(p.ranks), timeout=startup) for p in layout.stages if p.shards > 1}
    built = []
    for placement, shard in placements:
        mesh = None
        if placement.shards > 1:
            from torch.distributed.device_mesh import DeviceMesh

            mesh = DeviceMesh.from_group(tp_groups[placement.stage_idx], device.type)
        module = build(placement, mesh).to(device)
        built.append((placement, shard, module))
    # the bytes really held, against the plan's
    stage_reports = []
    for placement, shard, module in built:
        entry: dict[str, Any] = {"rank": rank, "stage": placement.stage_idx, "shard": shard,
                                 "description": placement.describe(), "unit_names": list(placement.unit_names),
                                 "planned_weight_bytes": placement.planned_weight_bytes}
        if check_bytes and placement.compressed:
            _check_compressed_bytes(module, placement, entry, plan_dtype)
        elif check_bytes:
            from cachefit.deploy.stages import stage_weight_bytes

            held = stage_weight_bytes(module, plan_dtype)
            entry["measured_weight_bytes"] = held["planned_dtype"]
            entry["allocated_weight_bytes"] = held["allocated"]
            if held["planned_dtype"] != placement.planned_weight_bytes:
                raise DeployError(
                    f"{placement.describe()} holds {held['planned_dtype']:,} B of weights (at {plan_dtype}) but the "
                    f"plan gives it {placement.planned_weight_bytes:,} B; the plan does not match this model"
                )
        stage_reports.append(entry)
    # every rank has joined and built its stage(s): from here on each wait for a peer is bounded by --timeout
    dist.barrier()
    mine = [g for g in (pp_group, *tp_groups.values()) if g is not None and g != dist.GroupMember.NON_GROUP_MEMBER]
    _bound_waits(config.timeout_s, [None, *mine])
    if config.mode == "decode":
        return _decode_rank(layout, config, built[0], inputs, stage_reports, run_dir, device, rank, world)
    me, my_shard, _ = built[0]
    followers = me.shards > 1 and my_shard > 0
    sync = None
    if me.shards > 1:
        sync = TensorParallelSync(tp_groups[me.stage_idx], me.leader, device)
        if not followers:
            built[0][2].pre_forward = sync.lead
    fault = _fault()
    result: torch.Tensor | None = None
    step_times: list[float] = []
    losses_all: list[float] = []
    if followers:
        built[0][2].eval()
        sync.follow(built[0][2])  # type: ignore[union-attr]
    else:
        pipe_stages = []
        for placement, _shard, module in built:
            module.eval()  # dropout off: a training step is compared exactly with the unsplit model
            if config.mode == "train":
                module.requires_grad_(True)
            pipe_stages.append(PipelineStage(module, placement.stage_idx, layout.num_stages, device,
                                             group=pp_group))
        schedule = _schedule(pipe_stages, config, loss_fn if config.mode == "train" else None)
        holds_first = any(p.stage_idx == 0 for p, _, _ in built)
        holds_last = any(p.stage_idx == layout.num_stages - 1 for p, _, _ in built)
        first_args = tuple(t.to(device) for t in inputs) if holds_first else ()
        tgt = target.to(device) if (holds_last and target is not None) else None
        show = rank == 0
        total = config.warmup + config.steps
        with _progress(show, total, layout) as advance:
            for step in range(total):
                timed = step >= config.warmup
                if timed and step == config.warmup:
                    for _, _, module in built:
                        module.forward_times_s.clear()
                if fault and fault[0] == rank and step - config.warmup == fault[2]:
                    _inject(fault[1], run_dir, rank)
                _barrier(sync)
                t0 = time.perf_counter()
                losses: list[torch.Tensor] = []
                ctx = torch.no_grad() if config.mode == "prefill" else contextlib.nullcontext()
                with ctx:
                    kwargs: dict[str, Any] = {}
                    if holds_last and config.mode == "train":
                        kwargs = {"target": tgt, "losses": losses}
                    out = schedule.step(*first_args, **kwargs)
                _barrier(sync)
                if timed:
                    step_times.append(time.perf_counter() - t0)
                    losses_all = [float(v.detach()) for v in losses]
                if holds_last and out is not None:
                    result = out.detach()
                advance()
        if sync is not None:
            sync.command(TensorParallelSync.STOP)
    if config.save_grads and config.mode == "train":
        _save_grads(built, run_dir, rank)
    for entry, (_, _, module) in zip(stage_reports, built):
        times = list(module.forward_times_s)
        entry.update({
            "forward_s_per_microbatch": times,
            "forward_s_mean": sum(times) / len(times) if times else None,
            "busy_s": sum(times),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        })
    gathered: list[Any] = [None] * world if rank == 0 else None  # type: ignore[assignment]
    dist.gather_object({"stages": stage_reports, "step_s": step_times, "losses": losses_all,
                        "holds_last": any(p.stage_idx == layout.num_stages - 1 for p, s, _ in built) and not followers},
                       gathered, dst=0)
    holds_last_leader = any(p.stage_idx == layout.num_stages - 1 for p, _, _ in built) and not followers
    if holds_last_leader and result is not None:
        tensors = {"outputs": result.float().cpu() if result.dtype != torch.float32 else result.cpu()}
        _atomic_save(tensors, run_dir / "outputs.safetensors")
    if rank == 0:
        _write_report(run_dir, layout, config, gathered, inputs)
    return result if holds_last_leader else None


def _decode_rank(layout: Any, config: RunConfig, built: tuple[Any, int, nn.Module], inputs: tuple[torch.Tensor, ...],
                 stage_reports: list[dict[str, Any]], run_dir: Path, device: torch.device, rank: int,
                 world: int) -> torch.Tensor | None:
    """Greedy decoding through the pipeline, one token per sequence and step, KV caches kept per stage.

    Each generation (``warmup + steps`` of them, fresh caches each) is a prefill of the prompt, then
    ``new_tokens - 1`` steps of one token: stage ``s`` receives the hidden states of stage ``s - 1``
    (``dist.recv``), runs its units with its own ``DynamicCache`` (the keys / values of its layers
    only) and sends its output on (``dist.send``); the last stage takes the argmax of the last
    position's logits and broadcasts the token from its rank, which the first stage embeds next.
    Position ids are the count of tokens done so far, known to every stage (all prompts have the
    same length, unpadded). The whole batch is one micro-batch: a step's stages run one after another.
    """
    from transformers import DynamicCache

    placement, _shard, module = built
    module.eval()
    ids, mask = (t.to(device) for t in inputs[:2])
    idx, count = placement.stage_idx, layout.num_stages
    prev = layout.stages[idx - 1].leader if idx > 0 else None
    nxt = layout.stages[idx + 1].leader if idx < count - 1 else None
    last = layout.stages[-1].leader
    batch, hidden_size = ids.shape[0], module.model.config.hidden_size
    dtype = next(module.parameters()).dtype
    runs: list[dict[str, Any]] = []
    tokens = logits = None
    show = rank == 0
    fault = _fault()
    total = config.warmup + config.steps
    with _progress(show, total, layout) as advance, torch.no_grad():
        for run in range(total):
            if run == config.warmup:
                module.forward_times_s.clear()
            if fault and fault[0] == rank and run - config.warmup == fault[2]:
                _inject(fault[1], run_dir, rank)
            cache = DynamicCache()
            token, position = ids, 0
            step_times: list[float] = []
            got_tokens, got_logits = [], []
            dist.barrier()
            for _step in range(config.new_tokens):
                t0 = time.perf_counter()
                q = token.shape[1]
                if prev is None:
                    x = token
                else:
                    x = torch.empty(batch, q, hidden_size, dtype=dtype, device=device)
                    dist.recv(x, src=prev)
                out = module.decode(x, mask, cache, position)
                if nxt is not None:
                    dist.send(out.contiguous(), dst=nxt)
                    next_token = torch.empty(batch, 1, dtype=torch.int64, device=device)
                else:
                    step_logits = out[:, -1]
                    got_logits.append(step_logits.float())
                    next_token = step_logits.argmax(-1, keepdim=True)
                dist.broadcast(next_token, src=last)
                got_tokens.append(next_token)
                position += q
                token = next_token
                step_times.append(time.perf_counter() - t0)
            if run >= config.warmup:
                runs.append({"prefill_s": step_times[0], "token_s": step_times[1:], "total_s": sum(step_times)})
            tokens = torch.cat(got_tokens, dim=1).cpu()
            logits = torch.stack(got_logits, dim=1).cpu() if got_logits else None
            advance()
    for entry in stage_reports:
        times = list(module.forward_times_s)
        entry.update({"forward_s_per_microbatch": times, "forward_s_mean": sum(times) / len(times) if times else None,
                      "busy_s": sum(times), "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})
    holds_last = nxt is None
    gathered: list[Any] = [None] * world if rank == 0 else None  # type: ignore[assignment]
    dist.gather_object({"stages": stage_reports, "step_s": [r["total_s"] for r in runs], "losses": [],
                        "holds_last": holds_last, "decode_runs": runs,
                        "tokens": tokens.tolist() if holds_last and tokens is not None else None},
                       gathered, dst=0)
    if holds_last and logits is not None:
        _atomic_save({"outputs": logits, "tokens": tokens}, run_dir / "outputs.safetensors")
    if rank == 0:
        _write_report(run_dir, layout, config, gathered, inputs)
    return logits if holds_last else None


def _decode_timings(config: RunConfig, gathered: list[Any], batch: int) -> dict[str, Any]:
    runs = gathered[0]["decode_runs"]  # rank 0's clock; every step ends with the token broadcast to all ranks
    token_s = [t for r in runs for t in r["token_s"]]
    prefill_s = [r["prefill_s"] for r in runs]
    total_s = [r["total_s"] for r in runs]
    mean_total = sum(total_s) / len(total_s) if total_s else None
    mean_token = sum(token_s) / len(token_s) if token_s else None
    return {
        "step_s": total_s,
        "mean_step_s": mean_total,
        "prefill_s": prefill_s,
        "token_s": token_s,
        "ms_per_token": mean_token * 1e3 if mean_token is not None else None,
        "tokens_per_s": batch * config.new_tokens / mean_total if mean_total else None,
        "note": "step: one generation (prefill of the prompt, then one pipelined forward per further token), on "
                "rank 0's clock from a barrier to the last token's broadcast; prefill_s: the prompt's step (it "
                "gives the first token); ms_per_token: mean of the later one-token steps (each through every "
                "stage, the batch as one micro-batch); tokens_per_s: generated tokens (batch x new tokens) per "
                "generation second",
    }


def _check_compressed_bytes(module: nn.Module, placement: Any, entry: dict[str, Any], plan_dtype: str) -> None:
    from cachefit.compress.apply import check_bytes, measure_module_bytes
    from cachefit.deploy.stages import compressed_weight_bytes

    held = compressed_weight_bytes(module, plan_dtype)
    entry["measured_weight_bytes"] = held
    entry["allocated_weight_bytes"] = sum(measure_module_bytes(module.model).values())
    verdict = check_bytes(held, placement.planned_weight_bytes, what=placement.describe())
    if not verdict.ok:
        raise DeployError(f"compressed weights do not match the plan: {verdict.describe()}")


def _barrier(sync: TensorParallelSync | None) -> None:
    if sync is not None:
        sync.command(TensorParallelSync.BARRIER)
    dist.barrier()


@contextlib.contextmanager
def _progress(show: bool, total: int, layout: Any):  # noqa: ANN202 - a context manager yielding a callable
    if not show:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(TextColumn("[bold]pipeline[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, disable=not console.is_terminal) as bar:
        task = bar.add_task(f"{layout.num_stages} stages on {layout.world_size} cards", total=total)
        yield lambda: bar.advance(task)


def _save_grads(built: list[Any], run_dir: Path, rank: int) -> None:
    grads = {}
    for _placement, _shard, module in built:
        for name, p in module.named_parameters():
            if p.grad is not None:
                # TransformerStage keeps the model as `model`, SequentialStage its children in `blocks`
                key = name.removeprefix("model.") if hasattr(module, "adapter_name") else name.removeprefix("blocks.")
                grads[key] = p.grad.detach().float().cpu()
    _atomic_save(grads, run_dir / f"grads-rank{rank}.safetensors")


def _write_report(run_dir: Path, layout: Any, config: RunConfig, gathered: list[Any],
                  inputs: tuple[torch.Tensor, ...]) -> None:
    stages: dict[int, dict[str, Any]] = {}
    step_s = gathered[0]["step_s"]
    losses: list[float] = []
    for item in gathered:
        if item.get("holds_last"):
            losses = item["losses"]
        for entry in item["stages"]:
            st = stages.setdefault(entry["stage"], {
                "stage": entry["stage"], "description": entry["description"], "unit_names": entry["unit_names"],
                "ranks": [], "planned_weight_bytes": entry["planned_weight_bytes"], "shards": [],
            })
            st["ranks"].append(entry["rank"])
            st["shards"].append({k: entry.get(k) for k in (
                "rank", "shard", "measured_weight_bytes", "allocated_weight_bytes", "forward_s_mean", "busy_s",
                "peak_rss_bytes")})
            if entry["shard"] == 0:
                st["measured_weight_bytes"] = entry.get("measured_weight_bytes")
                st["forward_s_mean"] = entry.get("forward_s_mean")
                st["forward_s_per_microbatch"] = entry.get("forward_s_per_microbatch")
                st["busy_s"] = entry.get("busy_s")
    first = inputs[0]
    # tokens for token ids; samples for any other input (an nn.Sequential's feature vectors, images)
    tokens = first.shape[0] * (first.shape[1] if first.dim() > 1 and not first.is_floating_point() else 1)
    mean_step = sum(step_s) / len(step_s) if step_s else None
    report = {
        "model": layout.model,
        "cards": layout.world_size,
        "stages_count": layout.num_stages,
        "world_size": len(gathered),
        "run": config.to_dict(),
        "input_shape": [int(d) for d in inputs[0].shape],
        "timings": {
            "step_s": step_s,
            "mean_step_s": mean_step,
            "tokens_per_s": tokens / mean_step if mean_step else None,
            "note": "step: from a barrier before schedule.step to a barrier after it; forward_s: the stage's "
                    "own compute per micro-batch (the first step's includes shape inference); tokens: samples "
                    "when the inputs are not token ids",
        },
        "stages": [stages[k] for k in sorted(stages)],
    }
    if config.mode == "decode":
        report["timings"] = _decode_timings(config, gathered, int(first.shape[0]))
        report["generated_ids"] = next((item["tokens"] for item in gathered if item.get("holds_last")), None)
    if config.mode == "train":
        report["losses"] = losses
        report["mean_loss"] = sum(losses) / len(losses) if losses else None
    write_text_atomic(run_dir / "result.json", json.dumps(report, indent=2), what="run file")


# --------------------------------------------------------------------------------------------
# Entry point of each torchrun process
# --------------------------------------------------------------------------------------------


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cachefit.deploy.runtime",
                                     description="One pipeline process (started by torchrun; see `cachefit run`).")
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--plan", required=True)
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--schedule", default="gpipe", choices=SCHEDULES)
    parser.add_argument("--micro-batches", type=int, default=1)
    parser.add_argument("--mode", default="prefill", choices=RUN_MODES)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--dtype", default="fp32", choices=RUN_DTYPES)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--save-grads", action="store_true")
    parser.add_argument("--new-tokens", type=int, default=0)
    parser.add_argument("--forked", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _prepare_forked_worker() -> None:
    """Set up a worker forked from the launching process (one node, CPU).

    It shares the cores with its siblings (torchrun sets OMP_NUM_THREADS=1 likewise). And it must not
    resolve a host name: the launcher's own threads may be inside glibc's ``getaddrinfo`` at the
    moment of the fork, and the child then inherits the resolver's lock held, so its first lookup
    waits forever (seen here: a rank stuck in ``__resolv_context_get`` under ``TCPStore``'s connect
    while its peers waited for it). The store is reached at the numeric loopback address and gloo
    binds to the loopback interface, neither of which takes that lock.
    """
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


def run_worker(argv: Sequence[str]) -> None:
    """One rank of a deployed checkpoint (torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, ...).

    Raises:
        CachefitError: set-up failed (the plan, the model or the inputs); reported in the run dir too.
    """
    args = _parse(argv)
    rank = int(os.environ.get("RANK", "0"))
    run_dir = Path(args.run_dir)
    if args.forked:
        _prepare_forked_worker()
    try:
        from safetensors.torch import load_file

        from cachefit.deploy.models import inspect_model_dir
        from cachefit.deploy.stages import build_stage, layout_from_plan

        config = RunConfig(schedule=args.schedule, micro_batches=args.micro_batches, mode=args.mode,
                           steps=args.steps, warmup=args.warmup, dtype=args.dtype, timeout_s=args.timeout,
                           startup_timeout_s=args.startup_timeout,
                           save_grads=args.save_grads, new_tokens=args.new_tokens)
        plan = load_plan(args.plan)
        source = inspect_model_dir(args.model_dir)
        layout = layout_from_plan(plan, source)
        tensors = load_file(args.inputs)
        ids, mask = tensors["input_ids"], tensors["attention_mask"]
    except CachefitError as exc:
        _write_error(run_dir, rank, f"rank {rank} (set-up)", exc)
        logger.error("set-up failed: %s", exc)
        raise

    def build(placement: Any, mesh: Any) -> nn.Module:
        return build_stage(layout, placement, source, dtype=config.dtype, mesh=mesh)

    loss = source.family.loss
    _worker(layout=layout, config=config, build=build, inputs=(ids, mask),
            target=labels_for(loss, ids, mask), loss_fn=loss_for(loss), run_dir=run_dir,
            plan_dtype=layout.weight_dtype, check_bytes=True)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cachefit.deploy.runtime``: one torchrun process; exit 0, 1 (failed) or 2 (bad set-up)."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"[cachefit rank {rank}] %(levelname)s %(message)s")
    try:
        run_worker(sys.argv[1:] if argv is None else argv)
    except CachefitError as exc:
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "FAULT_ENV",
    "RUN_MODES",
    "SCHEDULES",
    "NodeConfig",
    "RunConfig",
    "RunResult",
    "TensorParallelSync",
    "check_world",
    "deploy_plan",
    "labels_for",
    "launch",
    "loss_for",
    "main",
    "read_inputs_file",
    "resolve_model_dir",
    "run_worker",
]

