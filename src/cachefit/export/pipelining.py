"""A plan as a pipeline split for ``torch.distributed.pipelining`` and torchtitan.

Two forms of the same split, one entry per pipeline stage (a card, or a tensor-parallel group):

* ``module_fqns_per_model_part``: the module names each stage keeps, as torchtitan's
  ``parallelism.module_fqns_per_model_part`` and ``pipeline_module_split(..., module_names_per_stage)``
  take them (``torchtitan/distributed/pipeline_parallel.py``). The names are those of the
  ``transformers`` model (``model.layers.4``); torchtitan's own splitter prunes top-level children and
  one level of ``ModuleList`` (its models' ``layers.4``), so a Hugging Face model, whose layers sit one
  level deeper, needs a splitter that walks the dotted names (build each stage module yourself and
  pass side inputs explicitly: ``pipeline()``'s tracer is unreliable on Hugging Face models).
* ``split_spec``: the first module of every stage after the first, split at its beginning, as
  ``torch.distributed.pipelining.pipeline(module, mb_args, split_spec={fqn: SplitPoint.BEGINNING})``
  takes it (``"BEGINNING"`` stands for ``SplitPoint.BEGINNING``).

A tensor-parallel stage is one entry whose ``cards_per_stage`` lists its cards: apply tensor
parallelism to that stage's modules separately (torchtitan's ``parallelize_fn``, ``parallelize_module``).
"""

from __future__ import annotations

from typing import Any

from cachefit.export.modules import (
    Export,
    compression_warning,
    listing,
    pipeline_parts,
    placement_keys,
    render_json,
    split_parts_text,
    tied_tensors,
    unit_of_tensor,
)
from cachefit.plan import Plan
from cachefit.units import ModelProfile


def _split_module(key: str, tensor_names: set[str]) -> str:
    """The module a split point names: a key that is a tensor FQN splits at its owning module."""
    return key.rsplit(".", 1)[0] if key in tensor_names else key


def to_pipelining(plan: Plan, profile: ModelProfile) -> Export:
    """The plan as module FQNs per pipeline stage and a ``split_spec``.

    Args:
        plan: the plan.
        profile: the profile the plan was made from (see :func:`cachefit.export.modules.profile_for_plan`).
    """
    parts = pipeline_parts(plan)
    tensor_names = {t.name for u in profile.units for t in u.tensors}
    stage_of = [part.index for part in parts for _ in range(*part.units)]
    fqns: list[list[str]] = [[] for _ in parts]
    for key, stage in placement_keys(profile, stage_of):
        fqns[stage].append(key)
    split_spec = {_split_module(names[0], tensor_names): "BEGINNING" for names in fqns[1:]}
    warnings: list[str] = []

    # A stage boundary inside a decoder layer (block granularity): the layer's forward runs its
    # attention and MLP together, so module pruning cannot cut it there.
    inside = [f"stage {part.index} at {profile.units[part.units[0]].name}" for part in parts[1:]
              if profile.units[part.units[0]].layer is not None
              and profile.units[part.units[0]].layer == profile.units[part.units[0] - 1].layer]
    if inside:
        warnings.append(
            f"{len(inside)} stage(s) start inside a decoder layer ({listing(inside, 3)}): a layer's forward runs "
            "attention and MLP together, so pruning modules cannot cut it there; build those stages' modules to "
            "call the blocks themselves, or plan at layer granularity"
        )
    split = split_parts_text(parts)
    if split:
        warnings.append(
            f"{split}: each is one pipeline stage here (cards_per_stage lists its cards); apply tensor "
            "parallelism to its modules separately (torchtitan's parallelize_fn, parallelize_module)"
        )

    stage_of_unit = {u: part.index for part in parts for u in range(*part.units)}
    owner = unit_of_tensor(profile)
    for u, fqn, target in tied_tensors(profile):
        if target in owner and stage_of_unit[owner[target]] != stage_of_unit[u]:
            warnings.append(
                f"{fqn} is tied to {target} but runs on stage {stage_of_unit[u]}, not stage "
                f"{stage_of_unit[owner[target]]}: each stage keeps its own copy (as planned); in training, add "
                "the two copies' gradients after backward (DeepSpeed's TiedLayerSpec does; pipelining does not)"
            )

    note = compression_warning(plan, "the split", "quantize or prune those modules in each stage")
    if note:
        warnings.append(note)
    document: dict[str, Any] = {
        "num_stages": len(parts),
        "module_fqns_per_model_part": fqns,
        "split_spec": split_spec,
        "cards_per_stage": [list(part.cards) for part in parts],
        "tensor_parallel": [part.tensor_parallel for part in parts],
        "units_per_stage": [[part.units[0], part.units[1]] for part in parts],
    }
    return Export(
        format="pipelining",
        model=plan.model,
        document=document,
        text=render_json(document),
        warnings=tuple(warnings),
    )


__all__ = ["to_pipelining"]
