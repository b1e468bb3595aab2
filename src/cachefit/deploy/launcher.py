"""The launcher side of a run: check, start the processes, collect what they wrote.

:func:`launch` checks the plan against the model before any process starts
(:mod:`cachefit.deploy.preflight`), writes the inputs, starts ``python -m torch.distributed.run ...
-m cachefit.deploy.worker`` (torchrun: one process per card, its elastic agent ends every rank when one
fails) under the supervisor (:mod:`cachefit.deploy.supervisor`: the log file, a hung or failed rank
ending the run) and reads back what the ranks wrote: timings, outputs, and, when a run fails, which
stage failed and how. :func:`deploy_plan` does the same for an ``nn.Sequential`` in forked processes.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cachefit.deploy.config import LAUNCHERS, Launcher, NodeConfig, RunConfig, check_choice
from cachefit.deploy.preflight import check_run_inputs, check_world, load_checked_plan
from cachefit.deploy.run_files import clear_stale, save_tensors
from cachefit.deploy.stages import DeployLayout, StagePlacement
from cachefit.deploy.supervisor import SupervisedExit, failure, log_path, run_supervised
from cachefit.deploy.worker import prepare_forked_worker, run_rank_process, run_worker, worker_args
from cachefit.errors import ConfigError, DeployError
from cachefit.files import write_text_atomic
from cachefit.plan import Plan, load_plan

logger = logging.getLogger(__name__)

WORKER_MODULE = "cachefit.deploy.worker"
"""What torchrun runs in every process (``python -m``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RunResult:
    """What a deployed run produced."""

    report: Mapping[str, Any]
    """Timings per stage and end to end, bytes per stage, losses (train); the JSON of ``cachefit run``."""
    outputs: torch.Tensor | None = None
    """Final outputs (logits, or the last hidden state of an encoder) on the node of the last stage."""
    run_dir: Path | None = None
    layout: DeployLayout | None = None
    """The layout that ran (for :func:`~cachefit.deploy.verify.check_run`)."""


def _torchrun_command(nodes: NodeConfig, args: Sequence[str]) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nodes.nproc_per_node),
           "--max-restarts", "0", "--monitor-interval", "0.2"]
    if nodes.nnodes == 1 and not nodes.rdzv_endpoint:
        cmd += ["--standalone"]
    else:
        cmd += ["--nnodes", str(nodes.nnodes), "--node-rank", str(nodes.node_rank), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", str(nodes.rdzv_endpoint), "--rdzv-id", nodes.rdzv_id]
    return cmd + ["-m", WORKER_MODULE, *args]


def launch(model_dir: str | os.PathLike[str], plan: Plan | str | os.PathLike[str], *, nodes: NodeConfig,
           config: RunConfig = RunConfig(), input_ids: torch.Tensor | None = None,
           attention_mask: torch.Tensor | None = None, run_dir: str | os.PathLike[str] | None = None,
           wall_timeout_s: float | None = None, stream: Any = None, launcher: Launcher = "torchrun",
           devices: Any = None) -> RunResult:
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
        devices: the plan's cards (a Cluster, device or devices, as :func:`~cachefit.cost.estimate_cost`
            takes them) for the prediction a decode run's report puts beside its measurement;
            default: the catalog's devices of the plan's names.

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
    clear_stale(directory)
    plan_file = write_text_atomic(directory / "plan.json", plan_obj.to_json(), what="run file")
    save_tensors({"input_ids": ids, "attention_mask": mask}, directory / "inputs.safetensors")
    args = ["--model-dir", str(source.path), "--plan", str(plan_file), "--inputs",
            str(directory / "inputs.safetensors"), "--run-dir", str(directory), *worker_args(config)]
    log_file = log_path(directory, nodes.node_rank, nodes.nnodes) if launcher == "torchrun" else None
    start = time.perf_counter()
    if launcher == "fork":
        _preload(source)
        exit_ = SupervisedExit(returncode=_run_forked(nodes, args))
    else:
        cmd = _torchrun_command(nodes, args)
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
    if isinstance(report.get("fit"), dict):
        report["fit"].update(_fit_applies(plan_obj, config))
    if config.mode == "decode" and "timings" in report:
        from cachefit.deploy.predict import compare_decode, predict_run

        predicted = predict_run(plan_obj, checked.profile, micro_batches=config.micro_batches, devices=devices)
        if "prediction" in predicted:
            predicted["measured_vs_predicted"] = compare_decode(predicted["prediction"], report["timings"],
                                                                report.get("stages", []))
        report["predicted"] = predicted
    return RunResult(report=report, outputs=result.outputs, run_dir=result.run_dir, layout=result.layout)


def _fit_applies(plan: Plan, config: RunConfig) -> dict[str, Any]:
    """Whether the plan claims the run's fit: the same mode and dtype as its workload (a training step
    on an inference plan keeps activations for backward the plan never counted; an fp32 run of a
    bf16 plan holds twice its weight bytes); the inputs were checked no larger before launch."""
    wl = plan.workload
    differs = []
    if str(wl.get("mode", "prefill")) != config.mode:
        differs.append(f"--mode {config.mode} on a {wl.get('mode', 'prefill')} plan")
    if str(wl.get("weight_dtype", "fp32")) != config.dtype:
        differs.append(f"--dtype {config.dtype} on a {wl.get('weight_dtype')} plan")
    if not differs:
        return {"checked": True}
    return {"checked": False, "not_checked_because": "the run is not the plan's workload (" + "; ".join(differs)
            + "): its bytes are reported, but the plan never claimed they fit"}


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


def _run_forked(nodes: NodeConfig, args: Sequence[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    try:
        elastic_launch(_elastic_config(nodes, f"cachefit-{os.getpid()}"), run_worker)([*args, "--forked"])
    except ChildFailedError:
        return 1
    return 0


def _collect(directory: Path, layout: DeployLayout, nodes: NodeConfig) -> RunResult:
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
    if isinstance(report.get("fit"), dict):
        report["fit"].update(_fit_applies(plan, config))
    outputs = next((r for r in returned.values() if isinstance(r, torch.Tensor)), None)
    return RunResult(report=report, outputs=outputs, run_dir=run_dir, layout=layout)


@dataclass(slots=True)
class _ModuleJob:
    module: nn.Module
    layout: DeployLayout
    config: RunConfig
    inputs: torch.Tensor
    loss_fn: Callable[..., torch.Tensor] | None
    target: torch.Tensor | None
    run_dir: str


def _module_worker(job: _ModuleJob) -> torch.Tensor | None:
    from cachefit.deploy.stages import build_sequential_stage

    prepare_forked_worker()

    def build(placement: StagePlacement, mesh: Any) -> nn.Module:
        return build_sequential_stage(job.module, placement)

    return run_rank_process(layout=job.layout, config=job.config, build=build, inputs=(job.inputs,),
                            target=job.target, loss_fn=job.loss_fn, run_dir=Path(job.run_dir),
                            plan_dtype=job.layout.weight_dtype, check_bytes=False, forked=True)
