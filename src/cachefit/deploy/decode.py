"""Pipelined greedy decoding with micro-batches in flight.

The batch is cut into ``M = micro_batches`` groups of sequences that circulate through the stages:
stage ``s`` runs the jobs ``(step, group)`` in the order ``step 0 group 0, step 0 group 1, ..., step 1
group 0, ...``, receiving each job's hidden states from stage ``s - 1`` and sending its output on;
the last stage takes the argmax of the last position's logits and sends the token back to the first
stage, which embeds it for that group's next step. So while the first stage works on group 1, the
second works on group 0, and so on: with ``M >= S`` groups every stage has work in steady state (the
pipelined decode of inference servers). Each stage keeps one KV cache per group for its own layers
(the attention of layer ``i`` writes slot ``i``): ``dynamic`` (``DynamicCache``, grown by
concatenation) or ``static`` (``StaticCache``, pre-allocated to the prompt plus the new tokens).

Sends are non-blocking (``dist.isend``) and every receive names its peer, so no stage waits for a
later job than the one it needs; messages between two ranks arrive in the order they were sent,
which is the job order on both sides.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist

from cachefit.deploy.faults import planned_fault
from cachefit.deploy.rank import BuiltStage, RankContext
from cachefit.deploy.run_files import save_tensors
from cachefit.deploy.run_report import progress, write_report
from cachefit.errors import ConfigError


def new_cache(kind: str, model_config: Any, max_len: int) -> Any:
    """A stage's KV cache for one group: ``dynamic`` or ``static`` (``max_len`` positions, in place)."""
    from transformers import DynamicCache, StaticCache

    if kind == "static":
        return StaticCache(config=model_config, max_cache_len=max_len)
    return DynamicCache()


def split_groups(batch: int, groups: int) -> list[slice]:
    """The sequences of each group: ``groups`` equal, contiguous slices of the batch."""
    if groups < 1 or batch % groups:
        raise ConfigError(f"--micro-batches {groups}: the batch of {batch} sequences must be a multiple of it")
    size = batch // groups
    return [slice(g * size, (g + 1) * size) for g in range(groups)]


def decode_rank(ctx: RankContext, stage: BuiltStage, inputs: tuple[torch.Tensor, ...], *,
                tp_group: Any = None) -> torch.Tensor | None:
    """Run ``warmup + steps`` generations (fresh caches each) of ``new_tokens`` tokens; report them.

    A stage split over several cards (``tp_group``) decodes as one: its leader receives each job's input
    (hidden states, or on the first stage the token ids) and broadcasts it to the other shards, every
    shard runs the job on its own heads (its KV caches hold its own KV heads) and the shards' collectives
    join the partial results; only the leader sends on. Every rank knows the jobs' order and shapes.

    Returns the last stage's logits ``(batch, new_tokens, vocab)`` on its leader (None elsewhere).
    """
    layout, config, device, rank = ctx.layout, ctx.config, ctx.device, ctx.rank
    placement, module = stage.placement, stage.module
    module.eval()
    ids, mask = (t.to(device) for t in inputs[:2])
    idx, count = placement.stage_idx, layout.num_stages
    prev = layout.stages[idx - 1].leader if idx > 0 else None
    nxt = layout.stages[idx + 1].leader if idx < count - 1 else None
    first, last = layout.stages[0].leader, layout.stages[-1].leader
    is_first, is_last = prev is None, nxt is None
    leads = stage.shard == 0  # a split stage's other shards take their inputs from it
    split = placement.shards > 1 and tp_group is not None
    groups = split_groups(ids.shape[0], config.micro_batches)
    if stage.probe is not None:
        # the fit is the plan's workload, a one-token step with the caches filled, not the prompts' prefill
        # (a forward over the whole prompt, a prefill plan's workload): measure the first group's first step
        stage.probe.skip = len(groups)
    prompt = ids.shape[1]
    hidden_size = module.model.config.hidden_size
    dtype = next(module.parameters()).dtype
    fault = planned_fault()
    runs: list[dict[str, Any]] = []
    walls: list[float] = []
    tokens = logits = None
    total = config.warmup + config.steps
    with progress(ctx.shows_progress, total, layout) as advance, torch.no_grad():
        for run in range(total):
            if run == config.warmup:
                module.forward_times_s.clear()
            if fault and fault.due(rank, run - config.warmup):
                fault.inject(ctx.run_dir, rank)
            caches = [new_cache(config.kv_cache, module.model.config, prompt + config.new_tokens) for _ in groups]
            pending: list[Any] = []
            got_tokens: list[list[torch.Tensor]] = [[] for _ in groups]
            got_logits: list[list[torch.Tensor]] = [[] for _ in groups]
            produced: list[list[float]] = [[] for _ in groups]  # the last stage's clock, per group and step
            next_in: list[torch.Tensor] = [ids[sl] for sl in groups]
            dist.barrier()
            t0 = time.perf_counter()
            for step in range(config.new_tokens):
                q = prompt if step == 0 else 1
                position = 0 if step == 0 else prompt + step - 1
                for g, sl in enumerate(groups):
                    rows = sl.stop - sl.start
                    if not leads:
                        x = (torch.empty(rows, q, hidden_size, dtype=dtype, device=device) if not is_first
                             else torch.empty(rows, q, dtype=torch.int64, device=device))
                    elif not is_first:
                        x = torch.empty(rows, q, hidden_size, dtype=dtype, device=device)
                        dist.recv(x, src=prev)
                    elif step > 0 and not is_last:
                        x = torch.empty(rows, 1, dtype=torch.int64, device=device)
                        dist.recv(x, src=last)  # the token this group's previous step produced
                    else:
                        x = next_in[g].contiguous()
                    if split:
                        dist.broadcast(x, src=placement.leader, group=tp_group)
                    out = module.decode(x, mask[sl] if step == 0 else None, caches[g], position)
                    if not leads:
                        continue
                    if not is_last:
                        pending.append(dist.isend(out.contiguous(), dst=nxt))
                        continue
                    step_logits = out[:, -1]
                    token = step_logits.argmax(-1, keepdim=True)
                    produced[g].append(time.perf_counter() - t0)
                    got_logits[g].append(step_logits.float())
                    got_tokens[g].append(token)
                    if is_first:
                        next_in[g] = token
                    elif step < config.new_tokens - 1:
                        pending.append(dist.isend(token, dst=first))
            for work in pending:
                work.wait()
            dist.barrier()
            wall = time.perf_counter() - t0
            if run >= config.warmup:
                walls.append(wall)
                if is_last and leads:
                    runs.append(_run_timings(produced, wall))
            if is_last and leads:
                tokens = torch.cat([torch.cat(t, dim=1) for t in got_tokens], dim=0).cpu()
                logits = torch.cat([torch.stack(lg, dim=1) for lg in got_logits], dim=0).cpu()
            advance()
    stage.record_times()
    # the measured call (the first group's first one-token step) saw its own group's cache; the other groups'
    # stay resident too
    kv_all = _cache_bytes(caches) if total else 0
    stage.record_memory(resident_extra_bytes=kv_all - kv_all // len(groups))
    stage.report["busy_fraction"] = stage.report["busy_s"] / sum(walls) if sum(walls) > 0 else None
    gathered: list[Any] = [None] * ctx.world if rank == 0 else None  # type: ignore[assignment]
    holds_last = is_last and leads
    dist.gather_object({"stages": [stage.report], "step_s": walls, "losses": [], "holds_last": holds_last,
                        "decode_runs": runs, "tokens": tokens.tolist() if holds_last and tokens is not None else None},
                       gathered, dst=0)
    if holds_last and logits is not None:
        save_tensors({"outputs": logits, "tokens": tokens}, ctx.run_dir / "outputs.safetensors")
    if rank == 0:
        write_report(ctx.run_dir, layout, config, gathered, inputs,
                     timings=decode_timings(config, gathered, int(ids.shape[0])),
                     extra={"generated_ids": next((item["tokens"] for item in gathered if item.get("holds_last")),
                                                  None)})
    return logits if holds_last else None


def _cache_bytes(caches: list[Any]) -> int:
    """Bytes of the keys and values the caches hold (allocated: a static cache's whole length)."""
    seen: dict[int, int] = {}
    for cache in caches:
        for layer in getattr(cache, "layers", ()):
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor) and t.numel():
                    storage = t.untyped_storage()
                    seen[storage._cdata] = int(storage.nbytes())
    return sum(seen.values())


def _run_timings(produced: list[list[float]], wall: float) -> dict[str, Any]:
    """One generation on the last stage's clock: when each group's first token came (its prefill), and the
    intervals between a group's later tokens (what each sequence waits per token)."""
    return {
        "prefill_s": [p[0] for p in produced],
        "token_s": [b - a for p in produced for a, b in zip(p, p[1:])],
        "total_s": wall,
    }


def decode_timings(config: Any, gathered: list[Any], batch: int) -> dict[str, Any]:
    """The report's decode timings: throughput on rank 0's clock, latency on the last stage's."""
    runs = next((item["decode_runs"] for item in gathered if item.get("holds_last")), [])
    total_s = gathered[0]["step_s"]  # rank 0's clock, from a barrier to the barrier after the last token
    token_s = [t for r in runs for t in r["token_s"]]
    prefill_s = [max(r["prefill_s"]) for r in runs]
    mean_total = sum(total_s) / len(total_s) if total_s else None
    mean_token = sum(token_s) / len(token_s) if token_s else None
    return {
        "micro_batches": config.micro_batches,
        "kv_cache": config.kv_cache,
        "step_s": total_s,
        "mean_step_s": mean_total,
        "prefill_s": prefill_s,
        "token_s": token_s,
        "ms_per_token": mean_token * 1e3 if mean_token is not None else None,
        "tokens_per_s": batch * config.new_tokens / mean_total if mean_total else None,
        "note": "step: one generation (prefill of the prompt, then one pipelined forward per further token, "
                "the batch cut into micro_batches groups in flight at once), from a barrier to a barrier after "
                "the last token, on rank 0's clock; prefill_s: until every group's first token; ms_per_token: "
                "mean interval between a sequence's consecutive tokens (per-token latency), on the last stage's "
                "clock; tokens_per_s: generated tokens (batch x new tokens) per generation second; a stage's "
                "busy_fraction: its compute time over the generations' wall time",
    }
