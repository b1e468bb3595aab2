"""Measuring what compression costs in quality, unit by unit and technique by technique.

The torch edge behind ``cachefit quality``: the uncompressed model runs on calibration inputs once;
then each technique (or set of techniques) compresses one unit at a time, with the rest of the
model exact, and the model runs again. Per unit and technique it records

* the end-to-end loss against the uncompressed model, with only that unit compressed (what the
  planner sums over a plan's units): decoders, the mean KL divergence of the next-token
  distributions; encoders, ``1 - cosine`` of the mean-pooled embeddings (sentence-transformers'
  pooling for all-MiniLM-L6-v2), averaged over the inputs;
* the relative L2 error of the unit's own output (same input, since the units before it are exact).

Then it compresses every unit at once and records the end-to-end loss (the check on the sum), and
for the shipped all-MiniLM-L6-v2 the Spearman correlation of its cosine similarities with the
scores of cachefit's own small sentence-similarity set (``data/similarity_pairs.json``, held out
from calibration) and ``1 - cosine`` on those held-out sentences.

Calibrated methods (``CompressionConfig(sparsity_method="wanda", quantize_method="gptq")``) gather
their statistics once on the same calibration inputs (:mod:`cachefit.compress.calibration`); the
held-out numbers show whether what they gain carries over to other inputs.

The result is a :class:`~cachefit.compress.quality_profile.QualityProfile` (the quality file).
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cachefit.compress.apply import compress_module_
from cachefit.compress.calibration import CalibrationStats, collect_input_stats
from cachefit.compress.linear import is_linear_like
from cachefit.compress.quantized import Int4WeightOnlyLinear, Int8WeightOnlyLinear
from cachefit.compress.quality_profile import QualityProfile, TechniqueQuality
from cachefit.compress.techniques import TECHNIQUES, CompressionConfig, compress_unit, resolve_techniques
from cachefit.errors import ConfigError
from cachefit.units import Mode, Unit, Workload

_log = logging.getLogger(__name__)

__all__ = [
    "MAX_CALIBRATION_SAMPLES",
    "METRICS",
    "MAX_TOKENS_PER_SAMPLE",
    "QualityModel",
    "calibration_texts",
    "evaluation_texts",
    "load_quality_model",
    "measure_quality",
    "output_loss",
    "read_calibration_file",
    "sample_batches",
    "similarity_pairs",
    "spearman",
    "text_batches",
    "token_batches",
]

MAX_CALIBRATION_SAMPLES = 1024
"""Calibration samples read at most (a quality run on a CPU should take minutes, not hours)."""
MAX_TOKENS_PER_SAMPLE = 128
"""Tokens per sample kept; longer samples are truncated."""
_BATCH = 16  # samples per forward pass


# --------------------------------------------------------------------------------------------------
# Inputs


def _data_lines(name: str) -> tuple[str, ...]:
    text = resources.files("cachefit.compress").joinpath(f"data/{name}").read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def evaluation_texts() -> tuple[str, ...]:
    """cachefit's built-in measuring texts: 32 varied English sentences (``data/evaluation_texts.txt``)."""
    return _data_lines("evaluation_texts.txt")


def calibration_texts() -> tuple[str, ...]:
    """cachefit's built-in calibration texts for the calibrated methods: 128 other varied English
    sentences (``data/calibration_texts.txt``), none of them among the measuring texts."""
    return _data_lines("calibration_texts.txt")


def similarity_pairs() -> tuple[tuple[str, str, float], ...]:
    """cachefit's own small sentence-similarity set: (sentence a, sentence b, score 0-5), 32 pairs
    written for cachefit in the style of the STS benchmarks (``data/similarity_pairs.json``)."""
    data = json.loads(resources.files("cachefit.compress").joinpath("data/similarity_pairs.json").read_text(encoding="utf-8"))
    return tuple((p["a"], p["b"], float(p["score"])) for p in data["pairs"])


def text_batches(tokenizer: Any, texts: Sequence[str], *, batch_size: int = _BATCH) -> tuple[dict[str, torch.Tensor], ...]:
    """Tokenized batches (``input_ids``, ``attention_mask``, padded), at most
    :data:`MAX_TOKENS_PER_SAMPLE` tokens a sample."""
    if not texts:
        raise ConfigError("quality: no calibration text given")
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            list(texts[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=MAX_TOKENS_PER_SAMPLE,
            return_tensors="pt",
        )
        out.append({k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc})
    return tuple(out)


def token_batches(
    ids: Sequence[Sequence[int]], *, pad_id: int = 0, batch_size: int = _BATCH
) -> tuple[dict[str, torch.Tensor], ...]:
    """Batches of token ids (right-padded with ``pad_id``, masked), truncated to
    :data:`MAX_TOKENS_PER_SAMPLE` tokens a sample."""
    samples = [list(s)[:MAX_TOKENS_PER_SAMPLE] for s in ids]
    if not samples or any(not s for s in samples):
        raise ConfigError("quality: calibration token ids must be a non-empty list of non-empty lists of ints")
    out = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        width = max(len(s) for s in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, sample in enumerate(chunk):
            input_ids[row, : len(sample)] = torch.tensor(sample, dtype=torch.long)
            mask[row, : len(sample)] = 1
        out.append({"input_ids": input_ids, "attention_mask": mask})
    return tuple(out)


def read_calibration_file(
    path: str | Path, *, tokenizer: Any = None, vocab_size: int | None = None
) -> list[str] | list[list[int]]:
    """Calibration samples from a file: texts (one per non-empty line) or token-id lists.

    A ``.json`` file holds token ids (a list of lists of ints, or ``{"input_ids": [[...], ...]}``);
    any other file is text, one sample per line, and needs the model's tokenizer.

    Raises:
        ConfigError: unreadable, empty, too many samples, ids outside the vocabulary, or text
            without a tokenizer.
    """
    from cachefit.files import read_json, read_text

    where = f"calibration file {str(path)!r}"
    if str(path).endswith(".json"):
        data = read_json(path, what="calibration file")
        if isinstance(data, Mapping):
            data = data.get("input_ids")
        ok = isinstance(data, list) and data and all(
            isinstance(s, list) and s and all(isinstance(t, int) and not isinstance(t, bool) for t in s) for s in data
        )
        if not ok:
            raise ConfigError(f"{where}: expected token ids, a non-empty list of non-empty lists of ints")
        if len(data) > MAX_CALIBRATION_SAMPLES:
            raise ConfigError(f"{where}: {len(data)} samples, more than {MAX_CALIBRATION_SAMPLES}; give fewer")
        if vocab_size is not None:
            bad = [t for s in data for t in s if not 0 <= t < vocab_size]
            if bad:
                raise ConfigError(f"{where}: token id {bad[0]} is outside the model's vocabulary (0 to {vocab_size - 1})")
        return [list(s) for s in data]
    lines = [line.strip() for line in read_text(path, where=where).splitlines() if line.strip()]
    if not lines:
        raise ConfigError(f"{where}: no text (one sample per line)")
    if len(lines) > MAX_CALIBRATION_SAMPLES:
        raise ConfigError(f"{where}: {len(lines)} samples, more than {MAX_CALIBRATION_SAMPLES}; give fewer")
    if tokenizer is None:
        raise ConfigError(
            f"{where}: text needs the model's tokenizer, and the model directory has none; give token ids in a "
            f".json file instead ([[101, 2023, ...], ...])"
        )
    return lines


def sample_batches(
    samples: Sequence[str] | Sequence[Sequence[int]], *, tokenizer: Any = None, pad_id: int = 0
) -> tuple[dict[str, torch.Tensor], ...]:
    """Batches of texts (tokenized, shortest first to pad little) or of token-id lists."""
    if samples and isinstance(samples[0], str):
        return text_batches(tokenizer, sorted(samples, key=len))  # type: ignore[arg-type]
    return token_batches(sorted(samples, key=len), pad_id=pad_id)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# The model


@dataclass(frozen=True, slots=True, kw_only=True)
class QualityModel:
    """A model loaded for a quality run."""

    name: str
    """As the user named it (``all-minilm-l6-v2``, a directory)."""
    module: nn.Module
    """The uncompressed model, fp32, in eval mode."""
    kind: str
    """``decoder`` (next-token logits) or ``encoder`` (hidden states, mean-pooled)."""
    tokenizer: Any = None
    """The tokenizer saved with the model, or None."""


_DECODER_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def load_quality_model(path: str | Path, *, name: str | None = None) -> QualityModel:
    """Load a Hugging Face model directory (config.json + weights) offline, in fp32.

    Decoders (an architecture ending in ``ForCausalLM`` / ``LMHeadModel``) load with their LM head;
    anything else loads as ``AutoModel`` (an encoder's hidden states).

    Raises:
        ConfigError: not a directory transformers can load.
    """
    import transformers

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"quality: {str(path)!r} is not a model directory (no config.json); give a Hugging Face model directory or all-minilm-l6-v2")
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        architectures = tuple(getattr(config, "architectures", None) or ())
        kind = "decoder" if any(a.endswith(_DECODER_SUFFIXES) for a in architectures) else "encoder"
        cls = transformers.AutoModelForCausalLM if kind == "decoder" else transformers.AutoModel
        module = cls.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"quality: transformers cannot load {str(path)!r} ({type(exc).__name__}: {exc})") from None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError):
        tokenizer = None
    return QualityModel(name=name or str(path), module=module.eval(), kind=kind, tokenizer=tokenizer)


# --------------------------------------------------------------------------------------------------
# Outputs and losses


def _device(module: nn.Module) -> torch.device:
    param = next(iter(module.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


METRICS: Mapping[str, str] = {"decoder": "kl", "encoder": "1-cos"}
"""The end-to-end metric of each model kind (the quality file's ``metric``)."""


def _summary(kind: str, output: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """What the metric compares: log-probabilities (B, T, V) of a decoder's logits, or an encoder's last
    hidden state (B, T, H) mean-pooled over its real tokens (B, H)."""
    if kind == "decoder":
        return F.log_softmax(output.float(), dim=-1).cpu()
    mask = attention_mask if attention_mask is not None else torch.ones(output.shape[:2], dtype=torch.long)
    m = mask.to(output.device).unsqueeze(-1).to(output.dtype)
    return ((output * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)).float().cpu()


def _outputs(model: nn.Module, kind: str, batches: Sequence[Mapping[str, torch.Tensor]]) -> list[torch.Tensor]:
    """Per batch: log-probabilities (B, T, V) for decoders, pooled embeddings (B, H) for encoders."""
    out = []
    dev = _device(model)
    with torch.inference_mode():
        for batch in batches:
            result = model(**{k: v.to(dev) for k, v in batch.items()})
            if kind == "decoder":
                raw = result.logits if hasattr(result, "logits") else result[0]
            else:
                raw = result.last_hidden_state if hasattr(result, "last_hidden_state") else result[0]
            out.append(_summary(kind, raw, batch.get("attention_mask")))
    return out


def output_loss(kind: str, reference: torch.Tensor, outputs: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> float:
    """The metric of ``cachefit quality`` between two models' final outputs on the same inputs.

    Args:
        kind: ``decoder`` (``reference`` and ``outputs`` are logits, B x T x V: the mean KL divergence
            of the next-token distributions, in nats, per real token) or ``encoder`` (last hidden
            states, B x T x H: the mean ``1 - cosine`` of the mean-pooled embeddings, per input).
        reference: the uncompressed model's outputs.
        outputs: the outputs to judge (a compressed model's, a deployed pipeline's).
        attention_mask: 1 for real tokens, 0 for padding (B x T); None: every token is real.
    """
    if kind not in METRICS:
        raise ConfigError(f"quality metric: kind must be one of {', '.join(METRICS)}, got {kind!r}")
    if tuple(reference.shape) != tuple(outputs.shape):
        raise ConfigError(f"quality metric: outputs of shape {tuple(outputs.shape)} against a reference of shape "
                          f"{tuple(reference.shape)}; compare the outputs of the same inputs")
    batch = {} if attention_mask is None else {"attention_mask": attention_mask.cpu()}
    return _loss(kind, [_summary(kind, reference, attention_mask)], [_summary(kind, outputs, attention_mask)], [batch])


def _loss(kind: str, reference: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor],
          batches: Sequence[Mapping[str, torch.Tensor]]) -> float:
    """Mean KL(P_ref || P) per real token (decoders) or mean 1 - cosine per input (encoders)."""
    total, count = 0.0, 0
    for ref, out, batch in zip(reference, outputs, batches):
        if kind == "decoder":
            kl = (ref.exp() * (ref - out)).sum(dim=-1)  # (B, T), nats
            mask = batch.get("attention_mask", torch.ones(kl.shape, dtype=torch.long)).bool()
            total += float(kl[mask].sum())
            count += int(mask.sum())
        else:
            cos = F.cosine_similarity(ref, out, dim=-1)
            total += float((1.0 - cos).sum())
            count += cos.numel()
    return max(total / max(count, 1), 0.0)  # KL is >= 0; a rounding-level negative reads as 0


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (ties get their average rank)."""

    def ranks(values: Sequence[float]) -> list[float]:
        order = sorted(range(len(values)), key=lambda i: values[i])
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2.0
            i = j + 1
        return out

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / var if var else 0.0


# --------------------------------------------------------------------------------------------------
# Units: which module each one is, and swapping a compressed copy in


@dataclass(frozen=True, slots=True)
class _UnitTarget:
    unit: Unit
    owner: str
    """FQN of the smallest module holding the unit's tensors that compress_module_ can change in
    place (never a bare linear layer, which it cannot replace)."""
    tensors: tuple[str, ...]
    roles: Mapping[str, str]


def _common_module(names: Sequence[str]) -> str:
    parts = [n.split(".")[:-1] for n in names]
    common: list[str] = []
    for pieces in zip(*parts):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    return ".".join(common)


def _targets(model: nn.Module, units: Sequence[Unit]) -> list[_UnitTarget]:
    present = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    present |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
    out = []
    for unit in units:
        names = tuple(t.name for t in unit.tensors if t.name in present)
        if not names:
            continue
        owner = _common_module(names)
        while owner and is_linear_like(model.get_submodule(owner)):
            owner = owner.rpartition(".")[0]
        out.append(_UnitTarget(unit, owner, names, {t.name: t.role for t in unit.tensors if t.name in present}))
    return out


def _relative(name: str, owner: str) -> str:
    return name[len(owner) + 1 :] if owner else name


def _set_module(root: nn.Module, fqn: str, module: nn.Module) -> None:
    parent, _, child = fqn.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    if hasattr(value, "last_hidden_state"):
        return value.last_hidden_state
    return None


class _OutputRecorder:
    """Records a module's first output tensor per forward call (fp32, CPU)."""

    def __init__(self) -> None:
        self.outputs: list[torch.Tensor] = []

    def __call__(self, _module: nn.Module, _args: Any, output: Any) -> None:
        tensor = _first_tensor(output)
        if tensor is not None:
            self.outputs.append(tensor.detach().float().cpu())


def _relative_error(reference: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> float:
    num = sum(float((o - r).pow(2).sum()) for r, o in zip(reference, outputs) if o.shape == r.shape)
    den = sum(float(r.pow(2).sum()) for r, o in zip(reference, outputs) if o.shape == r.shape)
    return math.sqrt(num / den) if den else 0.0


# --------------------------------------------------------------------------------------------------
# The measurement


def _technique_sets(techniques: Sequence[Sequence[str] | str]) -> list[tuple[str, ...]]:
    sets = []
    for item in techniques:
        names = resolve_techniques(item.replace("+", ",") if isinstance(item, str) else item)
        if not names:
            continue
        if not any(TECHNIQUES[n].kind == "weights" for n in names):
            _log.info("quality: %s changes no stored weight; nothing to measure", ",".join(names))
            continue
        if names not in sets:
            sets.append(names)
    if not sets:
        raise ConfigError(
            "quality: no weight technique to measure; allow some of int8, int4, sparse50, sparse75, sparse24 "
            "(fuse, ckpt and batch change no stored weight)"
        )
    return sets


def measure_quality(
    model: QualityModel,
    batches: Sequence[Mapping[str, torch.Tensor]],
    techniques: Sequence[Sequence[str] | str],
    *,
    config: CompressionConfig | None = None,
    fit_batches: Sequence[Mapping[str, torch.Tensor]] | None = None,
    measured_note: str = "",
    fit_note: str = "",
    similarity: bool = False,
    progress: Callable[[str], None] | None = None,
) -> QualityProfile:
    """Measure the loss of each technique (or set) per unit and end to end; see the module docstring.

    Args:
        model: the uncompressed model (:func:`load_quality_model`); it is not changed.
        batches: the inputs the losses are measured on (:func:`text_batches`, :func:`token_batches`).
        techniques: names (``int8``) or sets (``sparse50+int8``, ``["sparse50", "int8"]``);
            techniques that change no stored weight (``fuse``, ``ckpt``, ``batch``) are left out.
        config: compression options.
        fit_batches: the inputs calibrated methods gather their statistics on; None: ``batches``
            (then their losses are measured on the inputs they were fitted to, which flatters them).
        measured_note, fit_note: where the inputs came from, for the file.
        similarity: also score cachefit's sentence-similarity set (Spearman) and ``1 - cosine`` on
            its held-out sentences (encoders with a tokenizer).
        progress: called with a short line as each technique starts.

    Raises:
        ConfigError: no batches, nothing to measure, a model cachefit cannot profile, or
            ``similarity`` without a tokenizer or for a decoder.
    """
    from cachefit.profile import profile_model

    config = replace(config or CompressionConfig(), strict=False)
    sets = _technique_sets(techniques)
    batches = list(batches)
    if not batches:
        raise ConfigError("quality: no calibration batch")
    if similarity and (model.kind != "encoder" or model.tokenizer is None):
        raise ConfigError("quality: the similarity set scores sentence encoders with a tokenizer only")
    root = model.module
    hf_config = getattr(root, "config", None)
    if hf_config is None:
        raise ConfigError(f"quality: {type(root).__name__} has no Hugging Face config to profile it from")
    profile = profile_model(hf_config.to_dict(), Workload(weight_dtype="fp32", act_dtype="fp32", mode=Mode.PREFILL, seq_len=MAX_TOKENS_PER_SAMPLE))
    targets = _targets(root, profile.units)
    owners = [t.owner for t in targets]
    # Units own disjoint submodules (layers), and calibrated statistics come from the uncompressed
    # model, so compressing every unit at once is the units' compressed copies swapped in together:
    # no second compression. Not so when a unit's owner is the root or holds another's.
    reuse = all(owners) and not any(a != b and b.startswith(a + ".") for a in owners for b in owners)

    stats: CalibrationStats | None = None
    if config.calibrated:
        fit = list(fit_batches) if fit_batches is not None else batches
        stats = collect_input_stats(root, fit, gram=config.needs_hessian)

    # reference outputs, and every unit's own output
    recorders = {t.owner: _OutputRecorder() for t in targets if t.owner}
    handles = [root.get_submodule(fqn).register_forward_hook(rec) for fqn, rec in recorders.items()]
    try:
        reference = _outputs(root, model.kind, batches)
    finally:
        for handle in handles:
            handle.remove()
    unit_reference = {fqn: rec.outputs for fqn, rec in recorders.items()}

    similarity_inputs: tuple[Any, ...] = ()
    baseline: list[tuple[str, float]] = []
    if similarity:
        pairs = similarity_pairs()
        sentences = [p[0] for p in pairs] + [p[1] for p in pairs]
        sim_batches = text_batches(model.tokenizer, sentences, batch_size=len(sentences))
        sim_reference = torch.cat(_outputs(root, "encoder", sim_batches))
        similarity_inputs = (pairs, sim_batches, sim_reference)
        baseline.append(("sts_spearman", _similarity_spearman(pairs, sim_reference)))

    results = []
    for names in sets:
        label = ",".join(names)
        if progress is not None:
            progress(label)
        units: list[tuple[str, float]] = []
        errors: list[tuple[str, float]] = []
        not_applied: list[str] = []
        compressed: dict[str, nn.Module] = {}  # owner FQN -> its compressed copy, reused end to end
        for target in targets:
            if not compress_unit(target.unit, names, profile.workload, config).compression:
                units.append((target.unit.name, 0.0))
                not_applied.append(target.unit.name)
                continue
            clone = _compressed_copy(root, target, names, config, stats)
            loss, error = _measure_unit(root, model.kind, target.owner, clone, batches, reference,
                                        unit_reference.get(target.owner))
            units.append((target.unit.name, loss))
            if error is not None:
                errors.append((target.unit.name, error))
            if reuse:
                compressed[target.owner] = clone
        if reuse:  # the units' compressed copies swapped in together: what compressing them all gives
            originals = {fqn: root.get_submodule(fqn) for fqn in compressed}
            for fqn, clone in compressed.items():
                _set_module(root, fqn, clone)
            squeezed = root
        else:
            squeezed = copy.deepcopy(root)
            compress_module_(
                squeezed, names, config=config, fqns=[n for t in targets for n in t.tensors],
                roles={n: r for t in targets for n, r in t.roles.items()}, calibration=stats,
            )
            squeezed = _dequantized_(squeezed)
        try:
            end_to_end = _loss(model.kind, reference, _outputs(squeezed, model.kind, batches), batches)
            extra: list[tuple[str, float]] = []
            if similarity_inputs:
                pairs, sim_batches, sim_reference = similarity_inputs
                embedded = torch.cat(_outputs(squeezed, "encoder", sim_batches))
                extra.append(("sts_spearman", _similarity_spearman(pairs, embedded)))
                cos = F.cosine_similarity(sim_reference, embedded, dim=-1)
                extra.append(("held_out_1-cos", max(float((1.0 - cos).mean()), 0.0)))
        finally:
            if reuse:
                for fqn, original in originals.items():
                    _set_module(root, fqn, original)
        del squeezed, compressed
        results.append(
            TechniqueQuality(
                technique=label, end_to_end=end_to_end, units=tuple(units), unit_output_error=tuple(errors),
                not_applied=tuple(not_applied), extra=tuple(extra),
            )
        )
        _log.info("quality %s: end to end %.4g, sum over units %.4g", label, end_to_end, results[-1].unit_sum)
    return QualityProfile(
        model=model.name,
        kind=model.kind,
        metric=METRICS[model.kind],
        techniques=tuple(results),
        config=(
            ("sparsity_method", config.sparsity_method),
            ("quantize_method", config.quantize_method),
            ("bias_correction", config.bias_correction),
            ("int4_group_size", config.int4_group_size),
            ("int4_zero_points", config.int4_zero_points),
            ("int8_group_size", config.int8_group_size),
            ("scale_dtype", config.scale_dtype),
            ("quantize_roles", list(config.quantize_roles)),
        ),
        calibration=_calibration_record(batches, fit_batches if config.calibrated else None, measured_note,
                                        fit_note, config.calibrated),
        baseline=tuple(baseline),
    )


def _dequantized_(module: nn.Module) -> nn.Module:
    """Replace the quantized linears of ``module`` (in place) by fp32 ``nn.Linear``s holding their
    dequantized weights, and return it.

    Quality is measured on the compressed *weights*: these are the values the kernels multiply by,
    without the kernels' own activation rounding (aten's int8 CPU kernel runs fp32 activations in
    bf16) and without their speed trap (aten's int4 CPU kernel takes about 0.15 s per call on a
    batch of MiniLM tokens, against milliseconds for the dense matmul).
    """
    for name, child in list(module.named_modules()):
        if isinstance(child, (Int8WeightOnlyLinear, Int4WeightOnlyLinear)):
            dense = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
            with torch.no_grad():
                dense.weight.copy_(child.dequantize(torch.float32))
                if child.bias is not None:
                    dense.bias.copy_(child.bias.float())
            if name:
                _set_module(module, name, dense.eval())
            else:
                return dense.eval()
    return module


def _count(batches: Sequence[Mapping[str, torch.Tensor]]) -> tuple[int, int]:
    samples = sum(int(b["input_ids"].shape[0]) for b in batches)
    tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches)
    return samples, tokens


def _calibration_record(
    batches: Sequence[Mapping[str, torch.Tensor]],
    fit_batches: Sequence[Mapping[str, torch.Tensor]] | None,
    measured_note: str,
    fit_note: str,
    calibrated: bool,
) -> tuple[tuple[str, Any], ...]:
    samples, tokens = _count(batches)
    out: list[tuple[str, Any]] = [
        ("measured_on", measured_note or "given batches"), ("samples", samples), ("tokens", tokens),
    ]
    if calibrated and fit_batches is not None:
        fit_samples, fit_tokens = _count(fit_batches)
        out += [("fitted_on", fit_note or "given batches"), ("fit_samples", fit_samples), ("fit_tokens", fit_tokens)]
    elif calibrated:
        out.append(("fitted_on", "the measured inputs themselves (the calibrated methods' losses are flattered)"))
    return tuple(out)


def _similarity_spearman(pairs: Sequence[tuple[str, str, float]], embeddings: torch.Tensor) -> float:
    n = len(pairs)
    cos = F.cosine_similarity(embeddings[:n], embeddings[n:], dim=-1)
    return spearman([float(c) for c in cos], [p[2] for p in pairs])


def _compressed_copy(
    root: nn.Module,
    target: _UnitTarget,
    names: tuple[str, ...],
    config: CompressionConfig,
    stats: CalibrationStats | None,
) -> nn.Module:
    """A compressed copy of the unit's owner module (quantized linears dequantized)."""
    owner = target.owner
    clone = copy.deepcopy(root.get_submodule(owner) if owner else root)
    compress_module_(
        clone, names, config=config,
        fqns=[_relative(n, owner) for n in target.tensors],
        roles={_relative(n, owner): r for n, r in target.roles.items()},
        calibration=None if stats is None else stats.under(owner),
    )
    return _dequantized_(clone)


def _measure_unit(
    root: nn.Module,
    kind: str,
    owner: str,
    clone: nn.Module,
    batches: Sequence[Mapping[str, torch.Tensor]],
    reference: Sequence[torch.Tensor],
    unit_reference: Sequence[torch.Tensor] | None,
) -> tuple[float, float | None]:
    """(end-to-end loss, relative error of the unit's output) with ``clone`` in place of ``owner``."""
    if not owner:
        return _loss(kind, reference, _outputs(clone, kind, batches), batches), None
    original = root.get_submodule(owner)
    recorder = _OutputRecorder()
    handle = clone.register_forward_hook(recorder)
    _set_module(root, owner, clone)
    try:
        outputs = _outputs(root, kind, batches)
    finally:
        _set_module(root, owner, original)
        handle.remove()
    error = None if unit_reference is None else _relative_error(unit_reference, recorder.outputs)
    return _loss(kind, reference, outputs, batches), error
