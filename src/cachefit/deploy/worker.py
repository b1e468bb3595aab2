"""One rank of a run (what torchrun starts in every process): join, build, run, report.

The worker joins the process group (gloo on CPU, NCCL on CUDA) within ``startup_timeout_s``, builds
its stage (:mod:`cachefit.deploy.stages`), checks the bytes it holds against the plan, and runs the
mode: a ``torch.distributed.pipelining`` schedule (``ScheduleGPipe``, ``Schedule1F1B`` or
``ScheduleInterleaved1F1B``) over micro-batches for ``prefill`` and ``train`` (loss on the last
stage), or pipelined greedy decoding (:mod:`cachefit.deploy.decode`). From the ready barrier on,
every wait for a peer is bounded by ``timeout_s``; a rank that fails writes ``error-rank{R}.json``
naming its stage before it exits (:mod:`cachefit.deploy.run_files`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from cachefit.deploy.config import RUN_DTYPES, RUN_MODES, SCHEDULES, RunConfig
from cachefit.deploy.faults import planned_fault
from cachefit.deploy.losses import labels_for, loss_for
from cachefit.deploy.rank import BuiltStage, RankContext
from cachefit.deploy.run_files import save_tensors, write_error
from cachefit.deploy.run_report import progress, write_report
from cachefit.deploy.stages import DeployLayout, StagePlacement
from cachefit.deploy.supervisor import write_pid
from cachefit.deploy.tp_sync import TensorParallelSync, barrier
from cachefit.errors import CachefitError, DeployError
from cachefit.plan import load_plan

logger = logging.getLogger(__name__)

BuildStage = Callable[[StagePlacement, Any], nn.Module]
"""``build(placement, mesh)``: the stage's module (``mesh``: its tensor-parallel DeviceMesh, or None)."""


def device_for_rank() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def run_rank_process(*, layout: DeployLayout, config: RunConfig, build: BuildStage,
                     inputs: tuple[torch.Tensor, ...], target: torch.Tensor | None,
                     loss_fn: Callable[..., torch.Tensor] | None, run_dir: Path, plan_dtype: str,
                     check_bytes: bool, forked: bool = False) -> torch.Tensor | None:
    """One process: join, build its stage(s), run, report. Returns the outputs on the last stage.

    ``forked``: this process was forked by the ``fork`` launcher (see :func:`wait_for_forks`).
    """
    device = device_for_rank()
    backend = "nccl" if device.type == "cuda" else "gloo"
    env_rank = int(os.environ.get("RANK", "0"))
    write_pid(run_dir, env_rank)
    if forked:
        try:
            wait_for_forks(run_dir, int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))),
                           config.startup_timeout_s)
        except DeployError as exc:
            write_error(run_dir, env_rank, f"rank {env_rank} (joining)", exc)
            raise
    # joining is bounded by the startup timeout (ranks arrive as their imports finish); every wait of
    # the run itself by --timeout, set once all ranks have built their stages (_run_rank)
    try:
        dist.init_process_group(backend, timeout=_startup_timeout(config))
    except BaseException as exc:
        logger.error("rank %d could not join the others within --startup-timeout %g s: %s", env_rank,
                     config.startup_timeout_s, exc, exc_info=True)
        write_error(run_dir, env_rank, f"rank {env_rank} (joining)", exc)
        raise
    ctx = RankContext(layout=layout, config=config, run_dir=run_dir, device=device, rank=dist.get_rank(),
                      world=dist.get_world_size())
    where = f"rank {ctx.rank}"
    _report_termination(run_dir, ctx.rank)
    try:
        return _run_rank(ctx, build, inputs, target, loss_fn, plan_dtype, check_bytes)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            where = ", ".join(p.describe() for p, _ in placements_of(layout, ctx.rank, ctx.world, config))
        # the traceback to the log first: the report makes the supervisor end every rank soon after
        logger.error("%s failed: %s: %s", where, type(exc).__name__, exc, exc_info=True)
        write_error(run_dir, ctx.rank, where, exc)
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


def placements_of(layout: DeployLayout, rank: int, world: int, config: RunConfig) -> list[tuple[StagePlacement, int]]:
    """The stage(s) ``rank`` runs, with its shard index in each (interleaved: several stages a rank)."""
    if config.schedule == "interleaved":
        return [(p, 0) for p in layout.stages if p.stage_idx % world == rank]
    return [layout.placement_of(rank)]


def _schedule(stages: list[Any], config: RunConfig, loss_fn: Callable[..., torch.Tensor] | None) -> Any:
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    if config.schedule == "interleaved":
        return ScheduleInterleaved1F1B(stages, config.micro_batches, loss_fn=loss_fn)
    cls = ScheduleGPipe if config.schedule == "gpipe" else Schedule1F1B
    return cls(stages[0], config.micro_batches, loss_fn=loss_fn)


def _check_bytes(stage: BuiltStage, plan_dtype: str) -> None:
    """The bytes the stage really holds, against what the plan gives this card (a mismatch: the plan is
    not this model's)."""
    placement, module, entry = stage.placement, stage.module, stage.report
    planned = placement.planned_weight_bytes_of(stage.shard)
    if placement.compressed:
        from cachefit.compress.apply import check_bytes, measure_module_bytes
        from cachefit.deploy.stages import compressed_weight_bytes

        held = compressed_weight_bytes(module, plan_dtype)
        entry["measured_weight_bytes"] = held
        entry["allocated_weight_bytes"] = sum(measure_module_bytes(module.model).values())
        verdict = check_bytes(held, planned, what=placement.describe())
        if not verdict.ok:
            raise DeployError(f"compressed weights do not match the plan: {verdict.describe()}")
        return
    from cachefit.deploy.stages import stage_weight_bytes

    counted = stage_weight_bytes(module, plan_dtype)
    entry["measured_weight_bytes"] = counted["planned_dtype"]
    entry["allocated_weight_bytes"] = counted["allocated"]
    if counted["planned_dtype"] != planned:
        card = f" card {placement.ranks[stage.shard]}" if placement.shards > 1 else ""
        raise DeployError(
            f"{placement.describe()}{card} holds {counted['planned_dtype']:,} B of weights (at {plan_dtype}) but "
            f"the plan gives it {planned:,} B; the plan does not match this model"
        )


def _run_rank(ctx: RankContext, build: BuildStage, inputs: tuple[torch.Tensor, ...], target: torch.Tensor | None,
              loss_fn: Callable[..., torch.Tensor] | None, plan_dtype: str, check_bytes: bool) -> torch.Tensor | None:
    layout, config = ctx.layout, ctx.config
    placements = placements_of(layout, ctx.rank, ctx.world, config)
    interleaved = config.schedule == "interleaved"
    # groups: every rank creates every group, in the same order (new_group is collective); without a
    # timeout they would wait 30 minutes (torch's default), whatever the world group's is
    startup = _startup_timeout(config)
    leaders = [p.leader for p in layout.stages]
    pp_group = None if (interleaved or not layout.tensor_parallel) else dist.new_group(leaders, timeout=startup)
    tp_groups = {p.stage_idx: dist.new_group(list(p.ranks), timeout=startup) for p in layout.stages if p.shards > 1}
    built: list[BuiltStage] = []
    for placement, shard in placements:
        mesh = None
        if placement.shards > 1:
            from torch.distributed.device_mesh import DeviceMesh

            mesh = DeviceMesh.from_group(tp_groups[placement.stage_idx], ctx.device.type)
        stage = BuiltStage(placement=placement, shard=shard, module=build(placement, mesh).to(ctx.device), report={
            "rank": ctx.rank, "stage": placement.stage_idx, "shard": shard, "description": placement.describe(),
            "unit_names": list(placement.unit_names), "planned_weight_bytes": placement.planned_weight_bytes_of(shard)})
        if check_bytes:
            _check_bytes(stage, plan_dtype)
        stage.measure_memory()
        built.append(stage)
    # every rank has joined and built its stage(s): from here on each wait for a peer is bounded by --timeout
    dist.barrier()
    mine = [g for g in (pp_group, *tp_groups.values()) if g is not None and g != dist.GroupMember.NON_GROUP_MEMBER]
    _bound_waits(config.timeout_s, [None, *mine])
    if config.mode == "decode":
        from cachefit.deploy.decode import decode_rank

        return decode_rank(ctx, built[0], inputs, tp_group=tp_groups.get(built[0].placement.stage_idx))
    return _run_schedule(ctx, built, tp_groups, pp_group, inputs, target, loss_fn)


def _run_schedule(ctx: RankContext, built: list[BuiltStage], tp_groups: dict[int, Any], pp_group: Any,
                  inputs: tuple[torch.Tensor, ...], target: torch.Tensor | None,
                  loss_fn: Callable[..., torch.Tensor] | None) -> torch.Tensor | None:
    """Prefill or a training step: the pipelining schedule over micro-batches, ``warmup + steps`` times."""
    from torch.distributed.pipelining import PipelineStage

    layout, config, device, rank = ctx.layout, ctx.config, ctx.device, ctx.rank
    me = built[0]
    train = config.mode == "train"
    for stage in built:
        stage.module.eval()  # dropout off: a training step is compared exactly with the unsplit model
        if train:
            stage.module.requires_grad_(True)
    sync = None
    if me.placement.shards > 1:
        sync = TensorParallelSync(tp_groups[me.placement.stage_idx], me.placement.leader, device)
        if not me.is_follower:
            me.module.pre_forward = sync.lead
            if train:
                sync.watch(me.module)
                me.module.post_forward = sync.share_grad
    fault = planned_fault()
    result: torch.Tensor | None = None
    step_times: list[float] = []
    losses_all: list[float] = []
    holds_last = any(b.placement.stage_idx == layout.num_stages - 1 for b in built) and not me.is_follower
    if me.is_follower:
        sync.follow(me.module, train=train, input_grads=me.placement.stage_idx > 0)  # type: ignore[union-attr]
    else:
        pipe_stages = [PipelineStage(stage.module, stage.placement.stage_idx, layout.num_stages, device, group=pp_group)
                       for stage in built]
        schedule = _schedule(pipe_stages, config, loss_fn if train else None)
        holds_first = any(b.placement.stage_idx == 0 for b in built)
        first_args = tuple(t.to(device) for t in inputs) if holds_first else ()
        tgt = target.to(device) if (holds_last and target is not None) else None
        total = config.warmup + config.steps
        with progress(ctx.shows_progress, total, layout) as advance:
            for step in range(total):
                timed = step >= config.warmup
                if timed and step == config.warmup:
                    for stage in built:
                        stage.module.forward_times_s.clear()
                if fault and fault.due(rank, step - config.warmup):
                    fault.inject(ctx.run_dir, rank)
                if train:  # each step's gradients alone (what the check compares)
                    for stage in built:
                        stage.module.zero_grad(set_to_none=True)
                    if sync is not None:
                        sync.command(TensorParallelSync.ZERO)
                barrier(sync)
                t0 = time.perf_counter()
                losses: list[torch.Tensor] = []
                grad = torch.no_grad() if config.mode == "prefill" else contextlib.nullcontext()
                with grad:
                    kwargs: dict[str, Any] = {}
                    if holds_last and train:
                        kwargs = {"target": tgt, "losses": losses}
                    out = schedule.step(*first_args, **kwargs)
                if sync is not None and train:
                    # the schedule divided this stage's gradients by the micro-batches: the shards too
                    sync.command(TensorParallelSync.SCALE, config.micro_batches)
                barrier(sync)
                if timed:
                    step_times.append(time.perf_counter() - t0)
                    losses_all = [float(v.detach()) for v in losses]
                if holds_last and out is not None:
                    result = out.detach()
                advance()
        if sync is not None:
            sync.command(TensorParallelSync.STOP)
    if config.save_grads and train:
        _save_grads(built, ctx.run_dir, rank)
    for stage in built:
        stage.record_times()
        stage.record_memory()
    gathered: list[Any] = [None] * ctx.world if rank == 0 else None  # type: ignore[assignment]
    dist.gather_object({"stages": [b.report for b in built], "step_s": step_times, "losses": losses_all,
                        "holds_last": holds_last}, gathered, dst=0)
    if holds_last and result is not None:
        save_tensors({"outputs": result.float().cpu()}, ctx.run_dir / "outputs.safetensors")
    if rank == 0:
        write_report(ctx.run_dir, layout, config, gathered, inputs)
    return result if holds_last else None


def _save_grads(built: list[BuiltStage], run_dir: Path, rank: int) -> None:
    """Each parameter's gradient under the unsplit model's name and shape: a tensor-parallel shard's
    part scattered into zeros where it belongs (the files of a stage's cards then add up to the unsplit
    gradient), a parameter every shard holds whole from the stage's first card only."""
    from cachefit.deploy.tensor_parallel import unsplit_gradient

    grads = {}
    for stage in built:
        for name, p in stage.module.named_parameters():
            if p.grad is None:
                continue
            # TransformerStage keeps the model as `model`, SequentialStage its children in `blocks`
            key = name.removeprefix("model.") if hasattr(stage.module, "adapter_name") else name.removeprefix("blocks.")
            grad = unsplit_gradient(p)
            if grad is None and stage.shard > 0:
                continue  # replicated over the shards, with the same gradient on each: saved once
            grads[key] = (grad if grad is not None else p.grad).detach().float().cpu()
    save_tensors(grads, run_dir / f"grads-rank{rank}.safetensors")


# --------------------------------------------------------------------------------------------
# Entry point of each torchrun process
# --------------------------------------------------------------------------------------------


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cachefit.deploy.worker",
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
    parser.add_argument("--kv-cache", default="dynamic", choices=("static", "dynamic"))
    parser.add_argument("--forked", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def worker_args(config: RunConfig) -> list[str]:
    """The command-line arguments that give a worker ``config`` (read back by :func:`run_worker`)."""
    return [
        "--schedule", config.schedule, "--micro-batches", str(config.micro_batches), "--mode", config.mode,
        "--steps", str(config.steps), "--warmup", str(config.warmup), "--dtype", config.dtype,
        "--timeout", str(config.timeout_s), "--startup-timeout", str(config.startup_timeout_s),
        "--new-tokens", str(config.new_tokens), "--kv-cache", config.kv_cache,
    ] + (["--save-grads"] if config.save_grads else [])


def prepare_forked_worker() -> None:
    """Set up a worker forked from the launching process (one node, CPU).

    It runs torch on one thread: a forked child of a process whose OpenMP thread pool has run (the
    launcher's, after any multi-threaded torch work, as a test's reference model) inherits that pool
    broken, and its first parallel region waits forever (seen here: a one-process run stuck in the
    rotary embedding's first op after earlier tests); one thread never enters a parallel region.
    (torchrun's fresh processes have no such limit.) The store is reached at the numeric loopback
    address and gloo binds to the loopback interface, so no host name is looked up; the resolver lock
    a fork can leave held (c10d still formats every socket's address with ``getnameinfo``) is what
    :func:`wait_for_forks` guards against.
    """
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


def wait_for_forks(run_dir: Path, world: int, timeout_s: float) -> None:
    """Return once every rank of this node has been forked (its pid file exists); no socket before.

    The launching process has threads of its own while it forks the ranks one after another (torch's
    elastic agent: the rendezvous store's server, its keep-alive timer). While a rank connects to the
    store, one of those threads may be inside glibc's resolver (c10d formats each socket's peer
    address with ``getnameinfo``, under the resolver's lock); a rank forked at that moment inherits the
    lock held and waits forever at its own first connect (seen here in about one run in 20 on a loaded
    2-core machine: a rank stuck in ``__resolv_context_get`` under ``TCPStore``'s connect, its peers
    waiting for it until the startup timeout). Each rank writes its pid file first thing, so once all
    of them exist no fork is left, and connecting is safe.

    Raises:
        DeployError: a rank did not start within ``timeout_s`` seconds.
    """
    deadline = time.monotonic() + timeout_s
    files = [run_dir / f"pid-rank{r}.json" for r in range(world)]
    while True:
        missing = [r for r, f in enumerate(files) if not f.exists()]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise DeployError(f"rank(s) {', '.join(map(str, missing))} did not start within --startup-timeout "
                              f"{timeout_s:g} s (no pid file in {run_dir})")
        time.sleep(0.005)


def run_worker(argv: Sequence[str]) -> None:
    """One rank of a deployed checkpoint (torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, ...).

    Raises:
        CachefitError: set-up failed (the plan, the model or the inputs); reported in the run dir too.
    """
    args = _parse(argv)
    rank = int(os.environ.get("RANK", "0"))
    run_dir = Path(args.run_dir)
    if args.forked:
        prepare_forked_worker()
    try:
        from safetensors.torch import load_file

        from cachefit.deploy.models import inspect_model_dir
        from cachefit.deploy.stages import build_stage, layout_from_plan

        config = RunConfig(schedule=args.schedule, micro_batches=args.micro_batches, mode=args.mode,
                           steps=args.steps, warmup=args.warmup, dtype=args.dtype, timeout_s=args.timeout,
                           startup_timeout_s=args.startup_timeout, save_grads=args.save_grads,
                           new_tokens=args.new_tokens, kv_cache=args.kv_cache)
        plan = load_plan(args.plan)
        source = inspect_model_dir(args.model_dir)
        layout = layout_from_plan(plan, source)
        tensors = load_file(args.inputs)
        ids, mask = tensors["input_ids"], tensors["attention_mask"]
    except CachefitError as exc:
        write_error(run_dir, rank, f"rank {rank} (set-up)", exc)
        logger.error("set-up failed: %s", exc)
        raise

    def build(placement: StagePlacement, mesh: Any) -> nn.Module:
        return build_stage(layout, placement, source, dtype=config.dtype, mesh=mesh)

    loss = source.family.loss
    run_rank_process(layout=layout, config=config, build=build, inputs=(ids, mask),
                     target=labels_for(loss, ids, mask), loss_fn=loss_for(loss), run_dir=run_dir,
                     plan_dtype=layout.weight_dtype, check_bytes=True, forked=args.forked)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cachefit.deploy.worker``: one torchrun process; exit 0, 1 (failed) or 2 (bad set-up)."""
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
