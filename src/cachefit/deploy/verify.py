"""Check a deployed run against the unsplit model, in fp32.

The reference is the whole model loaded in one process from the same safetensors files and run on
the same inputs: its logits (decoders) or last hidden state (encoders) for inference; for a training
step, the loss of every micro-batch and the gradients of every parameter, computed micro-batch by
micro-batch and averaged as the pipeline schedules average them (``scale_grads``: each micro-batch's
gradient divided by the number of micro-batches).

Errors are reported as the largest absolute difference and that difference relative to the largest
magnitude of the reference (``max|a - b| / max|b|``): a per-element relative error explodes on the
near-zero entries every output has, so it says nothing about the pipeline.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cachefit.deploy.config import RUN_DTYPES, RUN_MODES, RunDtype, RunMode, check_choice
from cachefit.errors import ConfigError

DEFAULT_TOLERANCE: Mapping[str, float] = {"fp32": 1e-4, "bf16": 5e-2, "fp16": 2e-2}
"""Largest relative error ``--check`` accepts, by run dtype (fp32: reduction-order noise only)."""


def check_tolerance(tolerance: float | None, dtype: RunDtype = "fp32") -> float:
    """The tolerance ``--check`` applies: ``tolerance`` if given (a finite number > 0), else the dtype's default.

    Raises:
        ConfigError: ``tolerance`` is not a finite number > 0 (checked before a run starts, not after it),
            or ``dtype`` is not a run dtype.
    """
    check_choice(dtype, RUN_DTYPES, what="dtype")
    if tolerance is None:
        return DEFAULT_TOLERANCE[dtype]
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not math.isfinite(tolerance) \
            or tolerance <= 0:
        raise ConfigError(f"--tolerance {tolerance!r}: give the largest relative error --check accepts, a finite "
                          f"number > 0 (default {DEFAULT_TOLERANCE[dtype]:g} in {dtype})")
    return float(tolerance)


@dataclass(frozen=True, slots=True, kw_only=True)
class Comparison:
    """How far a result is from the reference."""

    what: str
    """``outputs``, ``losses`` or ``gradients``."""
    max_abs_error: float
    reference_max_abs: float
    tensors: int = 1

    @property
    def max_rel_error(self) -> float:
        """``max|a - b| / max|b|`` (0 when both are all zero)."""
        if self.reference_max_abs == 0.0:
            return 0.0 if self.max_abs_error == 0.0 else float("inf")
        return self.max_abs_error / self.reference_max_abs

    def to_dict(self) -> dict[str, Any]:
        return {"what": self.what, "max_abs_error": self.max_abs_error, "max_rel_error": self.max_rel_error,
                "reference_max_abs": self.reference_max_abs, "tensors": self.tensors}


def compare(what: str, actual: torch.Tensor, expected: torch.Tensor) -> Comparison:
    """Compare two tensors of the same shape (in fp32)."""
    if tuple(actual.shape) != tuple(expected.shape):
        raise ConfigError(f"{what}: shape {tuple(actual.shape)} differs from the reference's {tuple(expected.shape)}")
    a, b = actual.detach().float().cpu(), expected.detach().float().cpu()
    return Comparison(what=what, max_abs_error=float((a - b).abs().max()) if a.numel() else 0.0,
                      reference_max_abs=float(b.abs().max()) if b.numel() else 0.0)


def _combine(what: str, parts: Iterable[Comparison]) -> Comparison:
    parts = list(parts)
    return Comparison(what=what, max_abs_error=max((p.max_abs_error for p in parts), default=0.0),
                      reference_max_abs=max((p.reference_max_abs for p in parts), default=0.0), tensors=len(parts))


def _final_output(model: nn.Module, out: Any) -> torch.Tensor:
    if hasattr(out, "logits") and out.logits is not None:
        return out.logits
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    if isinstance(out, torch.Tensor):
        return out
    raise ConfigError(f"{type(model).__name__} returned {type(out).__name__}: no logits or last hidden state")


def load_reference(model: str | os.PathLike[str] | nn.Module) -> nn.Module:
    """The unsplit model in fp32: a checkpoint directory read with safetensors, or a module as given."""
    if isinstance(model, nn.Module):
        return model.float().eval()
    from cachefit.deploy.models import load_model

    return load_model(model, dtype="fp32").eval()


def reference_outputs(model: nn.Module, inputs: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Outputs of the unsplit model (``logits`` or ``last_hidden_state``), no gradients."""
    with torch.no_grad():
        if isinstance(model, nn.Sequential):
            return model(inputs.float() if inputs.is_floating_point() else inputs)
        return _final_output(model, model(input_ids=inputs, attention_mask=attention_mask))


def reference_generation(model: nn.Module, inputs: torch.Tensor, new_tokens: int,
                         attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy ``generate`` of the unsplit model: the new token ids ``(batch, new_tokens)`` and the
    logits of every step ``(batch, new_tokens, vocab)`` (``output_logits``: before any logits processor)."""
    config = getattr(model, "generation_config", None)
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        pad = getattr(config, "eos_token_id", None)
        pad = pad[0] if isinstance(pad, (list, tuple)) else pad
    with torch.no_grad():
        out = model.generate(input_ids=inputs, attention_mask=attention_mask, do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0 if pad is None else pad)
    return out.sequences[:, inputs.shape[1]:], torch.stack(out.logits, dim=1)


def reference_training_step(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor,
                            loss_fn: Any, micro_batches: int,
                            attention_mask: torch.Tensor | None = None) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Per-micro-batch losses and the gradients a pipeline step must produce (dropout off)."""
    model.eval()
    model.zero_grad(set_to_none=True)
    losses = []
    chunks = zip(inputs.tensor_split(micro_batches), target.tensor_split(micro_batches),
                 attention_mask.tensor_split(micro_batches) if attention_mask is not None else [None] * micro_batches)
    for x, t, m in chunks:
        if isinstance(model, nn.Sequential):
            out = model(x)
        else:
            out = _final_output(model, model(input_ids=x, attention_mask=m))
        loss = loss_fn(out, t)
        (loss / micro_batches).backward()
        losses.append(float(loss.detach()))
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return losses, grads


def read_gradients(run_dir: str | os.PathLike[str], tied: Iterable[tuple[str, str]] = ()) -> dict[str, torch.Tensor]:
    """Gradients the ranks wrote (``grads-rank*.safetensors``), tied copies summed onto their source."""
    from safetensors.torch import load_file

    grads: dict[str, torch.Tensor] = {}
    files = sorted(Path(run_dir).glob("grads-rank*.safetensors"))
    if not files:
        raise ConfigError(f"{run_dir}: no gradient files; run the training step with save_grads")
    for file in files:
        for name, g in load_file(str(file)).items():
            grads[name] = grads[name] + g if name in grads else g
    for fqn, source in tied:
        if fqn in grads and fqn != source:
            g = grads.pop(fqn)
            grads[source] = grads[source] + g if source in grads else g
    return grads


def compare_gradients(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> Comparison:
    """The worst gradient over every parameter; a parameter missing on either side is an error."""
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    if missing or extra:
        raise ConfigError(
            f"gradients: the pipeline has none for {missing[:4]} and extra ones for {extra[:4]} "
            "(parameters the plan's stages do not cover, or names that differ)"
        )
    return _combine("gradients", (compare(name, actual[name], expected[name]) for name in expected))


def save_outputs(path: str | os.PathLike[str], outputs: torch.Tensor, **extra: torch.Tensor) -> Path:
    """Write ``outputs`` (and any ``extra`` tensors) to a safetensors file; key ``outputs``.

    The file is replaced whole or not at all (:func:`cachefit.files.atomic_path`).

    Raises:
        ConfigError: ``path`` cannot be written (``--save-outputs`` and the reason in the message).
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from cachefit.files import atomic_path

    tensors = {"outputs": outputs.detach().contiguous().cpu(), **{k: v.contiguous().cpu() for k, v in extra.items()}}
    with atomic_path(path, what="--save-outputs") as tmp:
        try:
            save_file(tensors, str(tmp))
        except SafetensorError as exc:
            # safetensors reports I/O failures (a full disk) as its own error, not an OSError
            raise ConfigError(f"--save-outputs {os.fspath(path)!r}: cannot write it ({exc})") from None
    return Path(path)


# how cachefit.plan.quality wrote a plan's predicted loss into its notes before Plan.predicted_quality:
# "predicted quality loss 0.01 (kl, ..." or "...; predicted loss 0.01 (kl) against ..."
_PREDICTED = re.compile(r"predicted (?:quality )?loss ([-+0-9.eE]+|inf|nan) \(([^,)]+)")
NO_PREDICTION = "no prediction: plan made without --quality"


def predicted_quality_loss(plan: Any) -> tuple[float, str] | None:
    """The quality loss a plan made with ``--quality`` predicts (summed measured per-unit losses) and its
    metric: the plan's ``predicted_quality``, or for a plan written before that field, its notes; None
    for a plan made without a quality file."""
    field = getattr(plan, "predicted_quality", None)
    if field:
        return float(field["loss"]), str(field["metric"])
    for note in getattr(plan, "notes", ()) or ():
        found = _PREDICTED.search(str(note))
        if found:
            try:
                return float(found.group(1)), found.group(2).strip()
            except ValueError:
                continue
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class QualityLoss:
    """A compressed deployment's end-to-end quality: the metric of ``cachefit quality`` measured between
    the deployed outputs and the uncompressed model's, beside the plan's prediction."""

    metric: str
    """``kl`` (decoders: mean next-token KL divergence, nats per token) or ``1-cos`` (encoders)."""
    measured: float
    """On the run's inputs: deployed (compressed) outputs against the uncompressed model's."""
    predicted: float | None = None
    """The plan's predicted loss (``plan --quality``: the sum of each compressed unit's measured loss
    alone, on the quality file's inputs); None for a plan made without a quality file."""
    predicted_metric: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "measured": self.measured, "predicted": self.predicted,
                "prediction": (f"plan --quality ({self.predicted_metric})" if self.predicted is not None
                               else NO_PREDICTION),
                "measured_on": "the run's inputs, deployed outputs against the uncompressed model"}

    def describe(self) -> str:
        if self.predicted is None:
            tail = NO_PREDICTION
        elif self.predicted_metric != self.metric:
            tail = f"the plan predicts {self.predicted:.4g} in another metric ({self.predicted_metric})"
        else:
            tail = f"the plan predicts {self.predicted:.4g}"
        return f"quality loss ({self.metric}) measured {self.measured:.4g} against the uncompressed model; {tail}"


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckReport:
    """Outcome of ``--check``: every comparison and whether all are within tolerance."""

    comparisons: tuple[Comparison, ...]
    tolerance: float
    quality: Comparison | None = None
    """Compressed plans: the outputs against the *uncompressed* model (compression's own error)."""
    loss: QualityLoss | None = None
    """Compressed plans of a checkpoint: the end-to-end quality metric against the uncompressed model,
    beside the plan's predicted loss (reported, not checked)."""
    over_capacity: tuple[str, ...] = ()
    """Stages whose measured peak (weights + live activations, the run report's ``measured_peak_bytes``)
    exceeded their card's capacity: the plan's fit did not hold, and the check fails."""

    @property
    def passed(self) -> bool:
        return all(c.max_rel_error <= self.tolerance for c in self.comparisons) and not self.over_capacity

    def to_dict(self) -> dict[str, Any]:
        doc = {"reference": "unsplit model, fp32, one process" + (", compressed as planned" if self.quality else ""),
               "tolerance_rel": self.tolerance, "passed": self.passed,
               "comparisons": [c.to_dict() for c in self.comparisons]}
        if self.quality is not None:
            doc["compression_error"] = self.quality.to_dict()
        if self.loss is not None:
            doc["quality_loss"] = self.loss.to_dict()
        doc["over_capacity"] = list(self.over_capacity)
        return doc

    def describe(self) -> str:
        parts = [f"{c.what}: max abs error {c.max_abs_error:.3g}, relative {c.max_rel_error:.3g}"
                 for c in self.comparisons]
        text = "; ".join(parts) + f" (tolerance {self.tolerance:g} relative to the largest reference value)"
        if self.quality is not None:
            text += (f"; compression itself moves the outputs by {self.quality.max_rel_error:.3g} relative to the "
                     "uncompressed model")
        if self.loss is not None:
            text += f"; {self.loss.describe()}"
        if self.over_capacity:
            text += (f"; the measured peak of {', '.join(self.over_capacity)} exceeds its card's capacity (the run "
                     "report's stages give measured_peak_bytes beside capacity_bytes): the plan does not fit there")
        return text


def check_run(result: Any, model: str | os.PathLike[str] | nn.Module, **kwargs: Any) -> CheckReport:
    """:func:`check_outputs`, and the fit: a stage whose measured peak exceeded its card's capacity
    (the run report's ``fit.over_capacity``) fails the check too, where the run was the plan's
    workload (``fit.checked``: its mode and dtype)."""
    import dataclasses

    report = check_outputs(result, model, **kwargs)
    fit = (getattr(result, "report", None) or {}).get("fit", {})
    over = tuple(fit.get("over_capacity", ())) if fit.get("checked", True) else ()
    return dataclasses.replace(report, over_capacity=over)


def check_outputs(result: Any, model: str | os.PathLike[str] | nn.Module, *, layout: Any = None,
                  mode: RunMode = "prefill", micro_batches: int = 1, tolerance: float | None = None,
                  dtype: RunDtype = "fp32",
                  inputs: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                  loss_fn: Any = None, target: torch.Tensor | None = None, plan: Any = None) -> CheckReport:
    """Compare a :class:`~cachefit.deploy.launcher.RunResult` with the unsplit model.

    For a checkpoint run the inputs are read back from the run directory; for a module give them.
    ``layout`` (the run's :class:`~cachefit.deploy.stages.DeployLayout`, by default the result's) gives
    the family (its ``loss``, unless ``loss_fn`` and ``target`` are given), tied tensors (their gradients add up) and the compression of each unit: a compressed plan is
    compared with the unsplit model compressed the same way (the pipeline must not add error), and
    the error compression itself adds, against the uncompressed model, is reported beside it, both
    as the largest difference and (checkpoints of a known family) as the end-to-end metric of
    ``cachefit quality`` (:func:`cachefit.compress.quality.output_loss`), beside the loss ``plan``
    predicts (:func:`predicted_quality_loss`) where it was made with ``--quality``.
    """
    from cachefit.deploy.losses import labels_for, loss_for

    check_choice(mode, RUN_MODES, what="mode")
    layout = layout if layout is not None else getattr(result, "layout", None)
    family = getattr(layout, "family", None)
    tied = [t for st in getattr(layout, "stages", ()) for t in st.tied]
    compressed = [st for st in getattr(layout, "stages", ()) if st.compressed]
    tol = check_tolerance(tolerance, dtype)
    if inputs is None:
        from safetensors.torch import load_file

        tensors = load_file(str(Path(result.run_dir) / "inputs.safetensors"))
        inputs, attention_mask = tensors["input_ids"], tensors["attention_mask"]
    reference = load_reference(model)
    comparisons = []
    if result.outputs is None:
        raise ConfigError("the run returned no outputs here (the last stage ran on another node); check there")
    kind = None if family is None else ("decoder" if family.causal else "encoder")
    if mode == "decode":
        report = _check_decode(result, reference, inputs, attention_mask, compressed, tol, kind=kind)
        return _with_prediction(report, plan)
    loss = None
    if compressed:
        from cachefit.deploy.stages import compress_units_

        uncompressed = reference_outputs(reference, inputs, attention_mask)
        for placement in compressed:
            compress_units_(reference, placement)
        comparisons.append(compare("outputs", result.outputs, reference_outputs(reference, inputs, attention_mask)))
        quality = compare("compression error (not checked)", result.outputs, uncompressed)
        if kind is not None:
            loss = _measured_loss(kind, uncompressed, result.outputs, attention_mask)
    else:
        comparisons.append(compare("outputs", result.outputs, reference_outputs(reference, inputs, attention_mask)))
        quality = None
    if mode == "train":
        if loss_fn is None:
            if family is None:
                raise ConfigError("checking a training step of an nn.Module needs its loss_fn(output, target) and "
                                  "target; give both")
            loss_fn = loss_for(family.loss)
            target = labels_for(family.loss, inputs, attention_mask)
        losses, grads = reference_training_step(reference, inputs, target, loss_fn, micro_batches, attention_mask)
        got = result.report.get("losses") or []
        if len(got) == len(losses):
            comparisons.append(compare("losses", torch.tensor(got), torch.tensor(losses)))
        comparisons.append(compare_gradients(read_gradients(result.run_dir, tied), grads))
    return _with_prediction(CheckReport(comparisons=tuple(comparisons), tolerance=tol, quality=quality, loss=loss),
                            plan)


def _measured_loss(kind: str, reference: torch.Tensor, outputs: torch.Tensor,
                   attention_mask: torch.Tensor | None) -> QualityLoss:
    """The metric of ``cachefit quality`` (one function for both) of the deployed outputs."""
    from cachefit.compress.quality import METRICS, output_loss

    return QualityLoss(metric=METRICS[kind], measured=output_loss(kind, reference, outputs, attention_mask))


def _with_prediction(report: CheckReport, plan: Any) -> CheckReport:
    """The report with the plan's predicted loss beside the measured one."""
    if report.loss is None or plan is None:
        return report
    from dataclasses import replace

    found = predicted_quality_loss(plan)
    if found is None:
        return report
    return replace(report, loss=replace(report.loss, predicted=found[0], predicted_metric=found[1]))


def _teacher_forced_logits(model: nn.Module, inputs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The logits ``model`` gives each generated token's position when fed the prompt and the tokens
    generated before it (B x N x V): the next-token distributions of the same prefixes as the run's."""
    with torch.no_grad():
        full = torch.cat([inputs, tokens[:, :-1]], dim=1)
        logits = _final_output(model, model(input_ids=full, attention_mask=torch.ones_like(full)))
    return logits[:, inputs.shape[1] - 1:, :]


def _check_decode(result: Any, reference: nn.Module, inputs: torch.Tensor, attention_mask: torch.Tensor | None,
                  compressed: list[Any], tol: float, *, kind: str | None = None) -> CheckReport:
    """Generated ids must equal greedy ``generate`` of the unsplit model; each step's logits within ``tol``.

    The ids are reported as a comparison whose error is the count of differing ids (reference 1), so
    a single different token fails any tolerance below 1. A compressed plan's quality loss compares
    each step's logits with the uncompressed model's on the same prefix (the run's own tokens), as
    ``cachefit quality`` compares next-token distributions of the same inputs.
    """
    generated = (result.report or {}).get("generated_ids")
    if generated is None:
        raise ConfigError("the decode run reported no generated ids (the last stage ran on another node); check there")
    tokens = torch.tensor(generated, dtype=torch.int64)
    quality = loss = None
    if compressed:
        from cachefit.deploy.stages import compress_units_

        _, plain_logits = reference_generation(reference, inputs, tokens.shape[1], attention_mask)
        if kind == "decoder":
            loss = _measured_loss(kind, _teacher_forced_logits(reference, inputs, tokens), result.outputs, None)
        for placement in compressed:
            compress_units_(reference, placement)
    ref_tokens, ref_logits = reference_generation(reference, inputs, tokens.shape[1], attention_mask)
    if compressed:
        quality = compare("compression error (not checked)", result.outputs, plain_logits)
    if tuple(ref_tokens.shape) != tuple(tokens.shape):
        raise ConfigError(f"generated ids have shape {tuple(tokens.shape)}, the reference's {tuple(ref_tokens.shape)}")
    mismatched = int((ref_tokens != tokens).sum())
    ids = Comparison(what="generated ids (count differing)", max_abs_error=float(mismatched), reference_max_abs=1.0,
                     tensors=int(tokens.numel()))
    return CheckReport(comparisons=(ids, compare("logits per step", result.outputs, ref_logits)), tolerance=tol,
                       quality=quality, loss=loss)


__all__ = [
    "DEFAULT_TOLERANCE",
    "NO_PREDICTION",
    "CheckReport",
    "Comparison",
    "QualityLoss",
    "check_outputs",
    "check_run",
    "check_tolerance",
    "compare",
    "compare_gradients",
    "load_reference",
    "predicted_quality_loss",
    "read_gradients",
    "reference_outputs",
    "reference_generation",
    "reference_training_step",
    "save_outputs",
]
