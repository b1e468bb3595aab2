"""A plan as Megatron-Core flags: ``--pipeline-model-parallel-layout`` with the matching sizes.

The layout grammar (Megatron-LM ``docs/api-guide/pipeline_parallel_layout.md`` and
``megatron/core/transformer/pipeline_parallel_layer_layout.py``, ``parse_str_to_list``): stages are
split by ``|``; ``E`` is the embedding, ``t`` a transformer decoder layer, ``m`` an MTP layer, ``L``
the loss (final norm and output layer); ``x*n`` repeats one symbol and ``(...)*n`` a group (the
group is unrolled first, with a regular expression that allows no nested parentheses); commas are
cosmetic and removed before anything else. The layout must hold ``E`` first and ``L`` last, once
each, and exactly ``--num-layers`` ``t`` (``validate_layer_layout``); its stage count divided by
``--pipeline-model-parallel-size`` is the virtual pipeline size, 1 here (one stage per rank). Every
stage is split over ``--tensor-model-parallel-size`` cards, which must divide the attention heads
(``TransformerConfig``: "must be a multiple of tensor_model_parallel_size"), divide or be a multiple
of the query groups, and divide the MLP width (``ColumnParallelLinear``'s ``divide``); the vocabulary
is padded to fit any degree.

Ranks: with Megatron's default order (``tp-cp-ep-dp-pp``, tensor parallel fastest) and one data-
parallel replica, global rank ``r`` is pipeline stage ``r // TP``, tensor rank ``r % TP``: the plan's
card ``r``.
"""

from __future__ import annotations

import shlex
from typing import Any

from cachefit.export.layer_split import LayerSplit, layer_split, refusal, stage_layers_text
from cachefit.export.modules import Export, compression_warning, listing, tied_tensors
from cachefit.plan import Plan
from cachefit.units import LayerShape, ModelProfile

ENGINE = "Megatron-Core"


def megatron_tp_refusal(shape: LayerShape, degree: int) -> str | None:
    """Why Megatron-Core refuses ``--tensor-model-parallel-size degree`` for a layer, or None.

    ``TransformerConfig.__post_init__`` (Megatron-Core 0.16): the attention heads a multiple of the
    degree, the query groups (KV heads) a multiple or a divisor of it; ``ColumnParallelLinear``
    divides the MLP width evenly.
    """
    heads = shape.num_heads
    kv = shape.num_kv_heads or heads
    bad: list[str] = []
    if heads % degree:
        bad.append(f"does not divide the {heads:,} attention heads")
    if kv % degree and degree % kv:
        bad.append(f"neither divides nor is a multiple of the {kv:,} query groups (KV heads)")
    if shape.intermediate_size and shape.intermediate_size % degree:
        bad.append(f"does not divide the {shape.intermediate_size:,} MLP columns")
    if not bad:
        return None
    return f"tensor-parallel degree {degree} {' and '.join(bad)}, and Megatron-Core splits them evenly"


def _stage_symbols(split: LayerSplit, stage: int) -> str:
    n = split.layers_per_stage[stage]
    text = "" if n == 0 else "t" if n == 1 else f"t*{n}"
    if stage == 0:
        text = "E" + text
    if stage == split.pipeline_parallel - 1:
        text += "L"
    return text


def pipeline_layout(split: LayerSplit) -> str:
    """The ``--pipeline-model-parallel-layout`` string of a split: ``Et*3|(t*4|)*6,t*2L``.

    A run of equal stages is written ``(s|)*k,`` where that is shorter than the stages one by one.
    """
    stages = [_stage_symbols(split, s) for s in range(split.pipeline_parallel)]
    out: list[str] = []
    i = 0
    while i < len(stages):
        j = i
        while j + 1 < len(stages) and stages[j + 1] == stages[i]:
            j += 1
        k = j - i + 1
        last = j == len(stages) - 1
        plain = "|".join(stages[i:j + 1]) + ("" if last else "|")
        grouped = f"({stages[i]}|)*{k}," if not last else plain
        out.append(grouped if k > 1 and len(grouped) < len(plain) else plain)
        i = j + 1
    return "".join(out)


def _flags(split: LayerSplit) -> list[str]:
    return ["--tensor-model-parallel-size", str(split.tensor_parallel),
            "--pipeline-model-parallel-size", str(split.pipeline_parallel),
            "--pipeline-model-parallel-layout", pipeline_layout(split)]


def to_megatron(plan: Plan, profile: ModelProfile) -> Export:
    """The plan as Megatron-Core's pipeline layout and parallel sizes.

    Args:
        plan: the plan.
        profile: the profile the plan was made from (see :func:`cachefit.export.modules.profile_for_plan`).

    Raises:
        ConfigError: the plan cuts a layer between stages, mixes cards, splits stages over different
            numbers of cards or unevenly; the message gives the nearest flags Megatron-Core runs.
    """
    split = layer_split(plan, profile, engine=ENGINE, tp_rule=megatron_tp_refusal)
    flags = _flags(split)
    if split.problems:
        raise refusal(plan, split, ENGINE, shlex.join(flags))

    warnings: list[str] = []
    tied = tied_tensors(profile)
    if split.pipeline_parallel > 1 and tied:
        warnings.append(
            f"{tied[0][1]} is tied to {tied[0][2]}: Megatron-Core keeps a copy of the word embeddings on the last "
            "stage and all-reduces the two copies' gradients (as the plan counts them, one on each)"
        )
    note = compression_warning(plan, "Megatron-Core", "quantize or prune those layers in your model provider")
    if note:
        warnings.append(note)
    untie = [] if tied else ["--untie-embeddings-and-output-weights"]
    lines = [
        f"{split.pipeline_parallel} pipeline stage(s) x {split.tensor_parallel}-way tensor parallel = "
        f"{split.num_cards} GPU(s) per model replica; the model's --num-layers is {split.num_layers}"
        + (f", with {untie[0]} (the head is not tied)" if untie else ""),
        *(f"stage {s} (card{'s' if len(cards) > 1 else ''} {listing([str(c) for c in cards], 8)}): "
          f"{stage_layers_text(split, s)}" for s, cards in enumerate(split.stage_cards)),
    ]
    text = shlex.join(flags) + "\n" + "".join(f"# {line}\n" for line in lines)
    document: dict[str, Any] = {
        "flags": flags,
        "tensor_model_parallel_size": split.tensor_parallel,
        "pipeline_model_parallel_size": split.pipeline_parallel,
        "pipeline_model_parallel_layout": pipeline_layout(split),
        "num_layers": split.num_layers,
        "untie_embeddings_and_output_weights": not tied,
        "layers_per_stage": list(split.layers_per_stage),
        "cards_per_stage": [list(c) for c in split.stage_cards],
    }
    return Export(format="megatron", model=plan.model, document=document, text=text, warnings=tuple(warnings))


__all__ = ["megatron_tp_refusal", "pipeline_layout", "to_megatron"]
