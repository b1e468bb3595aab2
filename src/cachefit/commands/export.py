"""``cachefit export``: a plan in the terms of accelerate, torch.distributed.pipelining / torchtitan,
DeepSpeed, llama.cpp, Megatron-Core or vLLM."""


from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer


class ExportFormat(str, Enum):
    accelerate = "accelerate"
    pipelining = "pipelining"
    deepspeed = "deepspeed"
    llamacpp = "llamacpp"
    megatron = "megatron"
    vllm = "vllm"


def register(app: typer.Typer) -> None:
    from cachefit.commands.options import JsonOption, handles_errors

    @app.command(name="export")
    @handles_errors
    def export_command(
        plan_file: Annotated[Path, typer.Argument(metavar="PLAN.json", help="A plan written by `cachefit plan --json`.")],
        to: Annotated[ExportFormat, typer.Option("--to", "-t", help="accelerate: device_map JSON; pipelining: module FQNs per stage and split_spec; deepspeed: PipelineModule parts and snippet; llamacpp: --tensor-split flags; megatron: --pipeline-model-parallel-layout and parallel sizes; vllm: VLLM_PP_LAYER_PARTITION and parallel sizes.")],
        model: Annotated[Optional[str], typer.Option("--model", "-m", help="The plan's model as a preset, config.json or model directory (default: the plan's `model`).")] = None,
        out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the export to this file instead of stdout.")] = None,
        as_json: JsonOption = False,
    ) -> None:
        """Write a plan in another tool's terms; what the tool cannot express is warned about on stderr."""
        import sys

        from cachefit.export import export_plan
        from cachefit.export.modules import render_json
        from cachefit.files import write_text_atomic
        from cachefit.plan import load_plan

        result = export_plan(load_plan(plan_file), to.value, model=model)
        for warning in result.warnings:
            typer.echo(f"warning: {warning}", err=True)
        if out is not None:
            text = render_json(result.to_dict()) if as_json else result.text
            write_text_atomic(out, text, what="--out")  # a failed write keeps an earlier file whole
            typer.echo(f"{to.value} export written to {out}", err=True)
        elif as_json:
            sys.stdout.write(render_json(result.to_dict()))
        else:
            sys.stdout.write(result.text)
