"""``cachefit run``: deploy a plan on processes (torchrun) and report measured timings and bytes."""

import contextlib
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from cachefit.deploy.config import KV_CACHES, RUN_DTYPES, RUN_MODES, SCHEDULES  # plain data, no torch

_INFER = "infer"
"""``--mode infer``: cachefit run's name for ``prefill`` before the run modes became the planner's;
still accepted, as an alias."""

# typer's choices, from the closed sets RunConfig checks (one list each)
ScheduleOpt = Enum("ScheduleOpt", {v: v for v in SCHEDULES}, type=str)
RunModeOpt = Enum("RunModeOpt", {v: v for v in (*RUN_MODES, _INFER)}, type=str)
RunDtypeOpt = Enum("RunDtypeOpt", {v: v for v in RUN_DTYPES}, type=str)
KvCacheRunOpt = Enum("KvCacheRunOpt", {v: v for v in KV_CACHES}, type=str)


def _parse_ids(text: str) -> Any:
    """``1,2,3`` (one sequence) or ``1,2,3;4,5,6`` (a batch of equal-length sequences)."""
    import torch

    from cachefit.errors import ConfigError

    rows = [r for r in text.split(";") if r.strip()]
    try:
        ids = [[int(tok) for tok in row.split(",") if tok.strip()] for row in rows]
    except ValueError:
        raise ConfigError(f"--input-ids {text!r}: write token ids as integers, e.g. 1,2,3 or 1,2,3;4,5,6") from None
    if not ids or not ids[0] or any(len(r) != len(ids[0]) for r in ids):
        raise ConfigError(f"--input-ids {text!r}: give one or more sequences of the same, non-zero length")
    return torch.tensor(ids, dtype=torch.int64)


def dtype_mismatch(plan_dtype: str, model_dir: str | Path) -> str | None:
    """A warning when a plan's weight dtype is not the one the checkpoint's config names, else None.

    A plan made without ``--dtype`` from the checkpoint's directory takes the checkpoint's dtype; one
    made with another ``--dtype``, or from a config that names none, runs (by default) and counts its
    bytes in the plan's dtype, so its outputs differ from the checkpoint's model by that rounding.
    """
    from cachefit.errors import ConfigError
    from cachefit.profile.hf_config import read_config_dtype

    try:
        found = read_config_dtype(model_dir)
    except ConfigError:
        return None  # no readable config: the launch's checks of the checkpoint say what is wrong
    if found.dtype is None or found.dtype == plan_dtype:
        return None
    return (f"the plan is in {plan_dtype} but the checkpoint's config says {found.dtype} ({found.key}): the run "
            f"counts its bytes in {plan_dtype} and, without --dtype, computes in it; plan again without --dtype "
            f"(or with --dtype {found.dtype}) to plan the checkpoint as stored")


def register(app: typer.Typer) -> None:
    # no `from __future__ import annotations` here: typer evaluates these annotations in this scope
    from cachefit.commands.options import (
        CapacityOption,
        DeviceOption,
        HeadroomOption,
        JsonOption,
        LevelOption,
        ReserveOption,
        build_cluster,
        handles_errors,
    )

    @app.command()
    @handles_errors
    def run(
        model_dir: Annotated[str, typer.Argument(help="A local Hugging Face model directory (config.json + *.safetensors), or all-minilm-l6-v2.")],
        plan: Annotated[Path, typer.Option("--plan", "-p", help="Plan JSON written by `cachefit plan ... --json`.")],
        nproc: Annotated[Optional[int], typer.Option("--nproc", "-n", help="Processes on this node (default: the plan's cards / --nnodes).", min=1)] = None,
        input_ids: Annotated[Optional[str], typer.Option("--input-ids", help="Token ids: 1,2,3 (one sequence) or 1,2;3,4 (a batch).")] = None,
        inputs: Annotated[Optional[Path], typer.Option("--inputs", help="safetensors file with input_ids (and optional attention_mask).")] = None,
        batch: Annotated[Optional[int], typer.Option("--batch", "-b", help="Random inputs: sequences (default: the plan's batch x micro-batches).", min=1)] = None,
        seq: Annotated[Optional[int], typer.Option("--seq", "-s", help="Random inputs: tokens per sequence (default: the plan's).", min=1)] = None,
        save_outputs: Annotated[Optional[Path], typer.Option("--save-outputs", help="Write the final outputs (key `outputs`) to this safetensors file.")] = None,
        schedule: Annotated[ScheduleOpt, typer.Option("--schedule", help="Pipeline schedule.")] = ScheduleOpt["gpipe"],
        micro_batches: Annotated[Optional[int], typer.Option("--micro-batches", "-m", help="Micro-batches per step; in decode, groups of sequences in flight through the stages at once (default: the plan's).", min=1)] = None,
        mode: Annotated[Optional[RunModeOpt], typer.Option("--mode", help="prefill (one forward over the inputs; infer is an alias of it), train (one training step, loss on the last stage) or decode (greedy generation with a KV cache per stage), as in the plan's workload; default: decode with --new-tokens, else train for a training plan, else prefill.")] = None,
        new_tokens: Annotated[Optional[int], typer.Option("--new-tokens", help="Decode: tokens to generate after the prompt (one pipelined forward per token; the batch cut into --micro-batches groups in flight at once).", min=1)] = None,
        kv_cache: Annotated[Optional[KvCacheRunOpt], typer.Option("--kv-cache", help="Decode: each stage's KV cache, static (pre-allocated to prompt + new tokens, as deployments do) or dynamic (grown each step); default: the plan's.")] = None,
        steps: Annotated[int, typer.Option("--steps", help="Timed steps.", min=1)] = 1,
        warmup: Annotated[int, typer.Option("--warmup", help="Untimed steps before them.", min=0)] = 0,
        dtype: Annotated[Optional[RunDtypeOpt], typer.Option("--dtype", help="Run dtype (default: the plan's weight dtype, fp32 if it has none of these).")] = None,
        check: Annotated[bool, typer.Option("--check", help="Compare with the unsplit model in fp32 (outputs; losses and gradients in train).")] = False,
        tolerance: Annotated[Optional[float], typer.Option("--tolerance", help="Largest relative error --check accepts (default 1e-4 in fp32).")] = None,
        timeout: Annotated[float, typer.Option("--timeout", help="Seconds any rank waits for another before the run fails (a hung rank ends the run within 1.5x this).", min=0.1)] = 60.0,
        startup_timeout: Annotated[float, typer.Option("--startup-timeout", help="Seconds the ranks have to start, join and load their stages, before --timeout applies.", min=0.1)] = 300.0,
        nnodes: Annotated[int, typer.Option("--nnodes", help="Nodes taking part (torchrun rendezvous).", min=1)] = 1,
        node_rank: Annotated[int, typer.Option("--node-rank", help="This node's index.", min=0)] = 0,
        rdzv_endpoint: Annotated[Optional[str], typer.Option("--rdzv-endpoint", help="HOST:PORT of the c10d rendezvous, the same on every node.")] = None,
        rdzv_id: Annotated[str, typer.Option("--rdzv-id", help="Run id shared by the nodes.")] = "cachefit",
        run_dir: Annotated[Optional[Path], typer.Option("--run-dir", help="Where ranks write results (the same path on every node; default: a new temp dir).")] = None,
        device: DeviceOption = None,
        capacity: CapacityOption = None,
        level: LevelOption = None,
        headroom: HeadroomOption = 0.0,
        reserve: ReserveOption = None,
        report_dir: Annotated[Optional[Path], typer.Option("--report", help="Write an HTML page of the run (planned against measured bytes and time per card, the prediction) into this folder.")] = None,
        as_json: JsonOption = False,
    ) -> None:
        """Deploy a plan as a pipeline of processes (torch.distributed) and measure it."""
        import sys

        import torch
        from rich.markup import escape

        from cachefit.commands.options import STATE, err_console
        from cachefit.deploy.preflight import load_checked_plan
        from cachefit.deploy.config import NodeConfig, RunConfig
        from cachefit.deploy.runtime import launch, read_inputs_file, resolve_model_dir
        from cachefit.deploy.verify import check_run, check_tolerance, save_outputs as write_outputs
        from cachefit.errors import ConfigError, DeployError
        from cachefit.files import check_writable

        if save_outputs is not None:
            check_writable(save_outputs, what="--save-outputs")  # now, not after the whole run
        if report_dir is not None and report_dir.exists() and not report_dir.is_dir():
            raise ConfigError(f"--report {str(report_dir)!r} is a file; give a folder (it is made if missing)")
        # everything is checked before any process starts: the options here, the plan file against
        # itself and its cards, then (launch) the checkpoint, the processes and the inputs against the plan
        if tolerance is not None and not check:
            raise ConfigError(f"--tolerance {tolerance:g} sets what --check accepts; add --check")
        if input_ids is not None and inputs is not None:
            raise ConfigError("give --input-ids or --inputs, not both")
        if (batch is not None or seq is not None) and (input_ids is not None or inputs is not None):
            raise ConfigError("--batch and --seq shape random inputs; --input-ids / --inputs give their own shape: "
                              "drop --batch and --seq")
        if not (device or capacity) and (level or headroom or reserve):
            raise ConfigError("--level, --headroom and --reserve describe the cards of --device / --capacity; "
                              "give one of those too")
        if run_dir is not None and run_dir.exists() and not run_dir.is_dir():
            raise ConfigError(f"--run-dir {str(run_dir)!r} is a file; give a folder (it is made if missing)")
        cards_digest = cards = None
        if device or capacity:
            # the cards the plan is meant for (the run itself uses the local processes)
            from cachefit.hardware.devices import cluster_to_dict
            from cachefit.plan import cluster_digest

            cards = build_cluster(device, capacity, level, headroom, reserve)
            cards_digest = cluster_digest(cluster_to_dict(cards))
        plan_obj = load_checked_plan(plan, cluster_digest_=cards_digest)
        ids = mask = None
        if input_ids is not None:
            ids = _parse_ids(input_ids)
        elif inputs is not None:
            ids, mask = read_inputs_file(inputs)
        wl = plan_obj.workload
        plan_mode = str(wl.get("mode", "prefill"))
        if mode is not None:
            run_mode = "prefill" if mode.value == _INFER else mode.value
        else:
            run_mode = "decode" if new_tokens is not None else ("train" if plan_mode == "train" else "prefill")
        if run_mode == "decode" and new_tokens is None:
            raise ConfigError("--mode decode needs --new-tokens N, the tokens to generate after the prompt")
        if run_mode != "decode" and new_tokens is not None:
            raise ConfigError(f"--new-tokens is for --mode decode, not --mode {run_mode}")
        m = micro_batches or int(wl.get("micro_batches", 1))
        if kv_cache is not None and run_mode != "decode":
            raise ConfigError(f"--kv-cache is for --mode decode, not --mode {run_mode}")
        kv = kv_cache.value if kv_cache is not None else str(wl.get("kv_cache", "static"))
        if ids is None and (batch is not None or seq is not None):
            from cachefit.deploy.models import inspect_model_dir

            vocab = int(inspect_model_dir(resolve_model_dir(model_dir)).config.get("vocab_size") or 2)
            gen = torch.Generator().manual_seed(0)
            ids = torch.randint(0, vocab, (batch or int(wl.get("batch", 1)) * m, seq or int(wl.get("seq_len", 16))),
                                generator=gen)
        plan_dtype = str(wl.get("weight_dtype", "fp32"))
        warning = dtype_mismatch(plan_dtype, resolve_model_dir(model_dir))
        if warning is not None:
            err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True, emoji=False)
        run_dtype = dtype.value if dtype is not None else (plan_dtype if plan_dtype in RUN_DTYPES else "fp32")
        if nproc is None:
            if plan_obj.cards % nnodes:
                raise ConfigError(f"the plan's {plan_obj.cards} cards do not divide over {nnodes} nodes; give --nproc")
            nproc = plan_obj.cards // nnodes
        config = RunConfig(schedule=schedule.value, micro_batches=m, mode=run_mode, steps=steps, warmup=warmup,
                           dtype=run_dtype, timeout_s=timeout, startup_timeout_s=startup_timeout,
                           save_grads=check and run_mode == "train", new_tokens=new_tokens or 0,
                           kv_cache=kv if kv in ("static", "dynamic") else "static")
        if check:
            check_tolerance(tolerance, run_dtype)
        nodes = NodeConfig(nproc_per_node=nproc, nnodes=nnodes, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint,
                           rdzv_id=rdzv_id)
        # the ranks' output goes to the run directory's log; with --debug to the terminal as well
        verbose = bool(STATE["debug"])
        status = (err_console.status(f"running {nodes.nproc_per_node} process(es) under torchrun (their output: run.log "
                              "in the run directory)") if err_console.is_terminal and not verbose else contextlib.nullcontext())
        with status:
            result = launch(resolve_model_dir(model_dir), plan_obj, nodes=nodes, config=config, input_ids=ids,
                            attention_mask=mask, run_dir=run_dir, stream=sys.stderr if verbose else None,
                            devices=cards)
        report: dict[str, Any] = dict(result.report)
        if warning is not None:
            report["notes"] = [*report.get("notes", ()), warning]
        if save_outputs is not None:
            if result.outputs is None:
                report["outputs_file"] = None
                report.setdefault("notes", []).append("the last stage ran on another node: its outputs are in its run dir")
            else:
                report["outputs_file"] = str(write_outputs(save_outputs, result.outputs))
        verdict = None
        if check:
            from cachefit.deploy.models import inspect_model_dir
            from cachefit.deploy.stages import layout_from_plan

            source = inspect_model_dir(resolve_model_dir(model_dir))
            layout = layout_from_plan(plan_obj, source)
            verdict = check_run(result, source.path, layout=layout, mode=run_mode, micro_batches=m,
                                tolerance=tolerance, dtype=run_dtype, plan=plan_obj)
            report["check"] = verdict.to_dict()
        if report_dir is not None:
            from cachefit.report.html import write_run_report

            report["report_file"] = str(write_run_report(report, report_dir))
        if as_json:
            from cachefit.commands.options import print_json

            print_json(report)
        else:
            _render(report, verdict)
        if verdict is not None and not verdict.passed:
            raise DeployError(f"--check failed: {verdict.describe()}")


def _bytes_or_dash(value: Any) -> str:
    from cachefit.sizes import format_bytes

    return format_bytes(value) if value else "-"


def _render(report: dict[str, Any], verdict: Any) -> None:
    from rich.table import Table

    from cachefit.commands.options import console
    from cachefit.sizes import format_bytes

    if "stages" not in report:
        console.print(report.get("note", "done"))
        return
    run = report["run"]
    title = (f"{report['model']}: {report['stages_count']} stages on {report['cards']} cards, {run['schedule']}, "
             f"{run['micro_batches']} micro-batch(es), {run['mode']}, {run['dtype']}, inputs {report['input_shape']}")
    table = Table(title=title, title_justify="left")
    for col in ("stage", "cards", "units", "weights planned", "weights held", "planned total", "measured peak",
                "capacity", "forward / micro-batch", "busy"):
        table.add_column(col, justify="left" if col in ("units", "cards") else "right",
                         overflow="fold" if col == "units" else "ellipsis")
    for st in report["stages"]:
        names = st["unit_names"]
        span = names[0] if len(names) == 1 else f"{names[0]}..{names[-1]}"
        held = st.get("measured_weight_bytes")
        fwd = st.get("forward_s_mean")
        table.add_row(str(st["stage"]), ",".join(str(r) for r in st["ranks"]), span,
                      format_bytes(st["planned_weight_bytes"]), format_bytes(held) if held is not None else "-",
                      _bytes_or_dash(st.get("planned_total_bytes")),
                      ("[red]" if st.get("over_capacity") else "") + _bytes_or_dash(st.get("measured_peak_bytes")),
                      _bytes_or_dash(st.get("capacity_bytes")),
                      f"{fwd * 1e3:.2f} ms" if fwd is not None else "-",
                      f"{st['busy_s']:.3f} s" if st.get("busy_s") is not None else "-")
    console.print(table)
    t = report["timings"]
    if t.get("mean_step_s"):
        console.print(f"step: {t['mean_step_s'] * 1e3:.2f} ms mean over {len(t['step_s'])} step(s), "
                       f"{t['tokens_per_s']:.1f} tokens/s end to end")
    if t.get("ms_per_token") is not None:
        console.print(f"decode: {t['ms_per_token']:.2f} ms between a sequence's tokens (mean of {len(t['token_s'])}), "
                       f"{t['micro_batches']} group(s) in flight, {t['kv_cache']} KV cache, "
                       f"prefill {t['prefill_s'][-1] * 1e3:.2f} ms")
    predicted = report.get("predicted") or {}
    if "prediction" in predicted:
        p = predicted["prediction"]
        busy = ", ".join(f"{b:.0%}" for b in p["busy_fractions"])
        measured = ", ".join(f"{st['busy_fraction']:.0%}" if st.get("busy_fraction") is not None else "-"
                             for st in report["stages"])
        console.print(f"predicted: {p['tokens_per_s']:.1f} tokens/s, {p['ms_per_token']:.2f} ms/token, stages busy "
                      f"{busy} (measured: {t.get('tokens_per_s') or 0:.1f} tokens/s, stages busy {measured})")
    elif "unavailable" in predicted:
        console.print(f"[dim]no prediction:[/] {predicted['unavailable']}")
    if report.get("generated_ids") is not None:
        console.print(f"generated ids: {report['generated_ids']}")
    if report.get("losses"):
        console.print(f"loss per micro-batch: {', '.join(f'{v:.6g}' for v in report['losses'])}")
    if report.get("report_file"):
        console.print(f"HTML page written to {report['report_file']}")
    if report.get("outputs_file"):
        console.print(f"outputs written to {report['outputs_file']} (key `outputs`)")
    fit = report.get("fit") or {}
    for name in fit.get("over_capacity", ()):
        console.print(f"[red]over capacity:[/] {name}: its measured peak exceeds its card's capacity"
                      + ("" if fit.get("checked", True) else f" ({fit.get('not_checked_because')})"))
    for note in report.get("notes", ()):
        console.print(f"[dim]note:[/] {note}")
    if report.get("log_file"):
        console.print(f"[dim]ranks' output: {report['log_file']}[/]")
    if verdict is not None:
        mark = "[green]passed[/]" if verdict.passed else "[bold red]FAILED[/]"
        console.print(f"check against the unsplit model: {mark}: {verdict.describe()}")
