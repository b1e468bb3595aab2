"""Exports: a cachefit plan in the terms of the tools that run models.

* ``accelerate``: a ``device_map`` (module name -> card) for ``from_pretrained(..., device_map=...)``;
* ``pipelining``: module FQNs per pipeline stage (torchtitan's ``module_fqns_per_model_part``) and a
  ``split_spec`` for ``torch.distributed.pipelining``;
* ``deepspeed``: ``PipelineModule`` ``parts`` and a snippet that builds the pipeline with them;
* ``llamacpp``: ``--split-mode layer --n-gpu-layers N --tensor-split ...`` flags;
* ``megatron``: Megatron-Core's ``--pipeline-model-parallel-layout`` with the matching parallel sizes;
* ``vllm``: ``VLLM_PP_LAYER_PARTITION`` with ``--tensor-parallel-size`` / ``--pipeline-parallel-size``.

Each export re-reads the model the plan was made for (:func:`profile_for_plan`) to name its real
modules, and says in ``warnings`` what the tool cannot express of the plan and what it does instead;
the engines (``megatron``, ``vllm``) refuse what they cannot run as planned, naming the nearest they can.
Pure Python: nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Callable

from cachefit.errors import ConfigError
from cachefit.export.accelerate import to_accelerate
from cachefit.export.deepspeed import to_deepspeed
from cachefit.export.llamacpp import to_llamacpp
from cachefit.export.megatron import to_megatron
from cachefit.export.modules import (
    EXPORT_SCHEMA,
    Export,
    PipelinePart,
    pipeline_parts,
    profile_for_plan,
    unit_modules,
)
from cachefit.export.pipelining import to_pipelining
from cachefit.export.vllm import to_vllm
from cachefit.plan import Plan
from cachefit.units import ModelProfile

EXPORTERS: dict[str, Callable[[Plan, ModelProfile], Export]] = {
    "accelerate": to_accelerate,
    "pipelining": to_pipelining,
    "deepspeed": to_deepspeed,
    "llamacpp": to_llamacpp,
    "megatron": to_megatron,
    "vllm": to_vllm,
}
FORMATS: tuple[str, ...] = tuple(EXPORTERS)


def export_plan(plan: Plan, to: str, *, profile: ModelProfile | None = None, model: str | None = None) -> Export:
    """A plan in another tool's terms.

    Args:
        plan: the plan (e.g. from :func:`cachefit.plan.load_plan`).
        to: one of :data:`FORMATS`.
        profile: the profile the plan was made from; default: :func:`profile_for_plan` (``model``).
        model: a preset name, ``config.json`` or model directory in place of ``plan.model``.

    Raises:
        ConfigError: an unknown format, a model that cannot be re-read or does not match the plan, or
            (megatron, vllm) a plan the engine cannot run as planned.
    """
    key = str(to).strip().lower().replace("-", "").replace("_", "").replace(".", "")
    aliases = {"llamacpp": "llamacpp", "torchtitan": "pipelining", "pipeline": "pipelining", "hf": "accelerate",
               "megatronlm": "megatron", "megatroncore": "megatron", "mcore": "megatron"}
    key = aliases.get(key, key)
    if key not in EXPORTERS:
        raise ConfigError(f"--to {to!r}: unknown export format; use one of {', '.join(FORMATS)}")
    if profile is None:
        profile = profile_for_plan(plan, model)
    return EXPORTERS[key](plan, profile)


__all__ = [
    "EXPORTERS",
    "EXPORT_SCHEMA",
    "FORMATS",
    "Export",
    "PipelinePart",
    "export_plan",
    "pipeline_parts",
    "profile_for_plan",
    "to_accelerate",
    "to_deepspeed",
    "to_llamacpp",
    "to_megatron",
    "to_pipelining",
    "to_vllm",
    "unit_modules",
]
