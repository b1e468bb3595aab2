"""A plan as a vLLM launch: ``VLLM_PP_LAYER_PARTITION`` with ``--tensor-parallel-size`` and
``--pipeline-parallel-size``.

How vLLM reads it (``vllm/distributed/utils.py``, ``get_pp_indices``; the variable is declared in
``vllm/envs.py``): the value is split on ``,`` and each item read with ``int()``; there must be
``--pipeline-parallel-size`` items summing to the model's ``num_hidden_layers`` (else ``ValueError``),
and pipeline rank ``r`` builds layers ``sum(items[:r])`` up to ``sum(items[:r + 1])``. Unset, vLLM
splits the layers evenly and hands the remainder to the ranks before the last. The embedding is
built on the first rank, the final norm and LM head on the last (and a tied head's embedding there
too). Every rank is split over ``--tensor-parallel-size`` cards, which must divide the attention
heads (``ModelConfig.verify_with_parallel_config``: "Total number of attention heads (...) must be
divisible by tensor parallel size"), and the KV heads or be a multiple of them (``QKVParallelLinear``
replicates KV heads when there are fewer than cards), and the MLP width (``divide``); the vocabulary
is padded.

Ranks: global rank ``r`` is pipeline rank ``r // TP``, tensor rank ``r % TP``: the plan's card ``r``.
"""

from __future__ import annotations

import shlex
from typing import Any

from cachefit.export.layer_split import LayerSplit, layer_split, refusal, stage_layers_text
from cachefit.export.modules import Export, compression_warning, listing
from cachefit.plan import Plan
from cachefit.units import LayerShape, ModelProfile

ENGINE = "vLLM"
PARTITION_VARIABLE = "VLLM_PP_LAYER_PARTITION"


def vllm_tp_refusal(shape: LayerShape, degree: int) -> str | None:
    """Why vLLM refuses ``--tensor-parallel-size degree`` for a layer, or None."""
    heads = shape.num_heads
    kv = shape.num_kv_heads or heads
    bad: list[str] = []
    if heads % degree:
        bad.append(f"does not divide the {heads:,} attention heads")
    if (kv >= degree and kv % degree) or (kv < degree and degree % kv):
        bad.append(f"neither divides nor is a multiple of the {kv:,} KV heads")
    if shape.intermediate_size and shape.intermediate_size % degree:
        bad.append(f"does not divide the {shape.intermediate_size:,} MLP columns")
    if not bad:
        return None
    return f"tensor-parallel degree {degree} {' and '.join(bad)}, and vLLM splits them evenly"


def layer_partition(split: LayerSplit) -> str:
    """The value of ``VLLM_PP_LAYER_PARTITION``: decoder layers per pipeline rank, comma-separated."""
    return ",".join(map(str, split.layers_per_stage))


def _args(split: LayerSplit) -> list[str]:
    return ["--tensor-parallel-size", str(split.tensor_parallel),
            "--pipeline-parallel-size", str(split.pipeline_parallel)]


def _command(split: LayerSplit) -> str:
    return f"{PARTITION_VARIABLE}={layer_partition(split)} vllm serve MODEL {shlex.join(_args(split))}"


def to_vllm(plan: Plan, profile: ModelProfile) -> Export:
    """The plan as vLLM's layer partition and parallel sizes.

    Args:
        plan: the plan.
        profile: the profile the plan was made from (see :func:`cachefit.export.modules.profile_for_plan`).

    Raises:
        ConfigError: the plan cuts a layer between ranks, mixes cards, splits ranks over different
            numbers of cards or unevenly; the message gives the nearest launch vLLM runs.
    """
    split = layer_split(plan, profile, engine=ENGINE, tp_rule=vllm_tp_refusal)
    if split.problems:
        raise refusal(plan, split, ENGINE, _command(split))

    warnings: list[str] = []
    note = compression_warning(plan, "vLLM", "serve a checkpoint quantized to match (--quantization)")
    if note:
        warnings.append(note)
    lines = [
        f"MODEL: the Hugging Face id or directory of {plan.model}; {split.pipeline_parallel} pipeline rank(s) x "
        f"{split.tensor_parallel}-way tensor parallel = {split.num_cards} GPU(s)",
        *(f"rank {s} (card{'s' if len(cards) > 1 else ''} {listing([str(c) for c in cards], 8)}): "
          f"{stage_layers_text(split, s)}" for s, cards in enumerate(split.stage_cards)),
    ]
    text = _command(split) + "\n" + "".join(f"# {line}\n" for line in lines)
    document: dict[str, Any] = {
        "env": {PARTITION_VARIABLE: layer_partition(split)},
        "args": _args(split),
        "tensor_parallel_size": split.tensor_parallel,
        "pipeline_parallel_size": split.pipeline_parallel,
        "num_hidden_layers": split.num_layers,
        "layers_per_rank": list(split.layers_per_stage),
        "cards_per_rank": [list(c) for c in split.stage_cards],
    }
    return Export(format="vllm", model=plan.model, document=document, text=text, warnings=tuple(warnings))


__all__ = ["PARTITION_VARIABLE", "layer_partition", "to_vllm", "vllm_tp_refusal"]
