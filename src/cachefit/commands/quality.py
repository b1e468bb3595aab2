"""``cachefit quality``: measure what each compression technique costs in quality, unit by unit."""

from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from cachefit.compress.techniques import QUANTIZE_METHODS, SPARSITY_METHODS  # plain data, no torch

SparsityMethodOpt = Enum("SparsityMethodOpt", {v: v for v in SPARSITY_METHODS}, type=str)
QuantizeMethodOpt = Enum("QuantizeMethodOpt", {v: v for v in QUANTIZE_METHODS}, type=str)

DEFAULT_ALLOW = "int8,int4,sparse50,sparse24"


def _loss(value: float) -> str:
    return "0" if value == 0 else f"{value:.2e}" if value < 1e-3 else f"{value:.4f}"


def quality_table(profile: Any) -> Any:  # a cachefit.compress.quality_profile.QualityProfile -> rich Table
    """Units down, techniques across: the loss with only that unit compressed, then every unit at once."""
    from rich.table import Table

    config = dict(profile.config)
    methods = f"{config.get('sparsity_method', 'magnitude')} / {config.get('quantize_method', 'rtn')}"
    table = Table(
        title=f"{profile.model} · loss {profile.metric} vs uncompressed (larger is worse) · {methods}",
        title_justify="left",
    )
    table.add_column("unit", no_wrap=True)
    for t in profile.techniques:
        table.add_column(t.technique.replace(",", "+"), justify="right", no_wrap=True)
    first = profile.techniques[0]
    for name, _ in first.units:
        cells = []
        for t in profile.techniques:
            cells.append("-" if name in t.not_applied else _loss(t.by_unit.get(name, 0.0)))
        table.add_row(name, *cells)
    table.add_section()
    table.add_row("sum of units", *[_loss(t.unit_sum) for t in profile.techniques])
    table.add_row("[bold]all units at once[/]", *[f"[bold]{_loss(t.end_to_end)}[/]" for t in profile.techniques])
    extras = [k for k in ("held_out_1-cos", "sts_spearman") if any(k in dict(t.extra) for t in profile.techniques)]
    labels = {"held_out_1-cos": "held-out 1-cos", "sts_spearman": "similarity Spearman"}
    for key in extras:
        table.add_row(labels[key], *[
            (f"{dict(t.extra)[key]:.3f}" if key == "sts_spearman" else _loss(dict(t.extra)[key]))
            if key in dict(t.extra) else "" for t in profile.techniques
        ])
    return table


def register(app: typer.Typer) -> None:
    # no `from __future__ import annotations` here: typer evaluates these annotations in this scope
    from cachefit.commands.options import CompressRolesOption, JsonOption, handles_errors

    @app.command()
    @handles_errors
    def quality(
        model: Annotated[str, typer.Argument(help="A local Hugging Face model directory (config.json + weights), or all-minilm-l6-v2.")],
        allow: Annotated[str, typer.Option("--allow", help="Techniques to measure, comma-separated; a + joins a set measured together (sparse50+int8). fuse, ckpt and batch change no weight and are skipped.")] = DEFAULT_ALLOW,
        calibration: Annotated[Optional[Path], typer.Option("--calibration", help="Inputs: a text file (one sample per line; needs the model's tokenizer) or a .json of token ids ([[101, 2023, ...], ...]). Calibrated methods fit on every other sample and are measured on the rest. Default: cachefit's 32 built-in sentences to measure on, 128 others to fit on.")] = None,
        sparsity_method: Annotated[SparsityMethodOpt, typer.Option("--sparsity-method", help="How pruning chooses what to remove: magnitude; wanda (weights x input norms); sparsegpt (2:4: SparseGPT; structured: Wanda, then the down projection refit). The last two are calibrated.")] = SparsityMethodOpt["magnitude"],
        quantize_method: Annotated[QuantizeMethodOpt, typer.Option("--quantize-method", help="How quantization rounds: rtn (to nearest), or gptq (calibrated).")] = QuantizeMethodOpt["rtn"],
        int4_group_size: Annotated[int, typer.Option("--int4-group-size", help="Input features per int4 group.", min=1)] = 128,
        compress_roles: CompressRolesOption = "",
        out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the quality file (JSON, schema cachefit.quality/1) here.")] = None,
        as_json: JsonOption = False,
    ) -> None:
        """Measure the quality loss of each technique per unit and end to end, on calibration inputs."""
        import time
        from dataclasses import replace

        from cachefit.commands.options import compression_config, console, err_console, print_json
        from cachefit.files import check_writable, write_text_atomic

        if out is not None:
            check_writable(out, what="--out")  # now, not after the measurement
        config = replace(
            compression_config(compress_roles),
            sparsity_method=sparsity_method.value,
            quantize_method=quantize_method.value,
            int4_group_size=int4_group_size,
        )
        items = [item.strip() for item in allow.split(",") if item.strip()]

        import json

        from cachefit.compress.quality import (
            calibration_texts,
            evaluation_texts,
            load_quality_model,
            measure_quality,
            read_calibration_file,
            sample_batches,
        )
        from cachefit.deploy.preflight import MINILM_NAMES, resolve_model_dir
        from cachefit.errors import ConfigError

        start = time.perf_counter()
        loaded = load_quality_model(resolve_model_dir(model), name=model)
        hf_config = loaded.module.config
        tokenizer, pad_id = loaded.tokenizer, getattr(hf_config, "pad_token_id", None) or 0
        fit_batches, fit_note = None, ""
        if calibration is not None:
            samples = read_calibration_file(calibration, tokenizer=tokenizer,
                                            vocab_size=getattr(hf_config, "vocab_size", None))
            if config.calibrated and len(samples) >= 2:
                # fitted on every other sample, measured on the rest: a method is not scored on its own inputs
                fit, measured = samples[0::2], samples[1::2]
                fit_batches = sample_batches(fit, tokenizer=tokenizer, pad_id=pad_id)
                fit_note = f"{len(fit)} samples of {calibration.name} (the 1st, 3rd, ...)"
                batches = sample_batches(measured, tokenizer=tokenizer, pad_id=pad_id)
                note = f"{len(measured)} samples of {calibration.name} (the 2nd, 4th, ...)"
            else:
                batches = sample_batches(samples, tokenizer=tokenizer, pad_id=pad_id)
                note = f"{len(samples)} samples of {calibration.name}"
        elif tokenizer is not None:
            texts = evaluation_texts()
            batches, note = sample_batches(texts, tokenizer=tokenizer), f"cachefit's {len(texts)} built-in sentences"
            if config.calibrated:
                fit_texts = calibration_texts()
                fit_batches = sample_batches(fit_texts, tokenizer=tokenizer)
                fit_note = f"cachefit's {len(fit_texts)} built-in calibration sentences (not among the measured ones)"
        else:
            raise ConfigError(
                f"{model}: the model directory has no tokenizer, so cachefit's built-in texts cannot be read; give "
                f"--calibration FILE.json with token ids ([[1, 2, 3], ...])"
            )
        similarity = model.lower() in MINILM_NAMES and loaded.kind == "encoder" and tokenizer is not None

        def progress(label: str) -> None:
            err_console.print(f"[dim]measuring {label} ({time.perf_counter() - start:.0f} s)[/]", highlight=False)

        profile = measure_quality(
            loaded, batches, items, config=config, fit_batches=fit_batches, measured_note=note, fit_note=fit_note,
            similarity=similarity, progress=progress,
        )
        document = profile.to_dict()
        if out is not None:
            write_text_atomic(out, json.dumps(document, indent=2) + "\n", what="quality file")
        if as_json:
            print_json(document)
            return
        console.print(quality_table(profile))
        baseline = dict(profile.baseline)
        if "sts_spearman" in baseline:
            console.print(
                f"[dim]similarity Spearman of the uncompressed model: {baseline['sts_spearman']:.3f} on cachefit's own "
                f"32 sentence pairs (held out from calibration; differences under about 0.02 are noise)[/]",
                highlight=False,
            )
        fitted = f"; calibrated methods fitted on {fit_note}" if fit_note else ""
        console.print(f"[dim]measured on {note}{fitted}; {time.perf_counter() - start:.0f} s[/]", highlight=False)
        if out is not None:
            console.print(f"quality file written to {out}")
