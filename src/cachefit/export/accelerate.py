"""A plan as a Hugging Face accelerate ``device_map``: module name -> card index.

``AutoModelForCausalLM.from_pretrained(path, device_map=device_map)`` (or
``accelerate.dispatch_model(model, device_map)``) places each module on the card the plan gave its
unit; accelerate then runs the model as a naive pipeline, moving activations from card to card.
The keys are the modules of :func:`cachefit.export.modules.placement_keys`, so they cover every
parameter (and every tensor of ``state_dict()``, which accelerate's ``check_device_map`` requires)
exactly once.

What accelerate cannot express, and what is done instead (each said in a warning):

* a tensor-parallel stage (a unit range split over several cards): accelerate places whole modules,
  so the range goes on the group's first card, which then holds the whole of it;
* a tied weight (an LM head sharing the embedding matrix) on another card than the tensor it is tied
  to: accelerate keeps one copy of a tied parameter, on one device (``check_tied_parameters_on_same_device``
  warns otherwise, and the module would compute with a weight held by another card), so the module
  owning the tied copy follows the original's card, as accelerate's own ``infer_auto_device_map`` does;
* compression: the map places modules; it does not quantize or prune them.
"""

from __future__ import annotations

import json

from cachefit.export.modules import (
    Export,
    compression_warning,
    key_covers,
    pipeline_parts,
    placement_keys,
    split_parts_text,
    tied_tensors,
    unit_of_tensor,
)
from cachefit.plan import Plan
from cachefit.units import ModelProfile


def to_accelerate(plan: Plan, profile: ModelProfile) -> Export:
    """The plan as an accelerate ``device_map`` (``document`` is the map, keys in execution order).

    Args:
        plan: the plan.
        profile: the profile the plan was made from (see :func:`cachefit.export.modules.profile_for_plan`).
    """
    warnings: list[str] = []
    unit_card: dict[int, int] = {}
    device_map: dict[str, int] = {}
    parts = pipeline_parts(plan)
    split = split_parts_text(parts)
    if split:
        extra = sum(p.weight_bytes - p.stages[0].footprint.weight_bytes for p in parts if p.tensor_parallel > 1)
        warnings.append(
            f"{split}; accelerate places whole modules, so each split stage goes whole on its first card "
            f"({extra:,} B of weights more than planned on those cards, the others stay empty); use the "
            "pipelining export with tensor parallelism, or plan with fewer bytes per unit"
        )
    for part in parts:
        for u in range(*part.units):
            unit_card[u] = part.cards[0]
    device_map.update(placement_keys(profile, [unit_card[u] for u in range(len(profile.units))]))

    owner = unit_of_tensor(profile)
    for u, fqn, target in tied_tensors(profile):
        if target not in owner:
            continue
        want = unit_card[owner[target]]
        if unit_card[u] == want:
            continue
        key = next(k for k in device_map if key_covers(k, fqn))
        if device_map[key] == want:
            continue
        device_map[key] = want
        warnings.append(
            f"{fqn} is tied to {target} (one shared matrix); accelerate keeps tied parameters on one device, so "
            f"{key!r} goes on card {want} with {target} instead of card {unit_card[u]} as planned: its compute "
            f"runs on card {want}"
        )

    note = compression_warning(plan, "accelerate", "quantize or prune those modules before dispatching them")
    if note:
        warnings.append(note)
    return Export(
        format="accelerate",
        model=plan.model,
        document=device_map,
        text=json.dumps(device_map, indent=2) + "\n",
        warnings=tuple(warnings),
    )


__all__ = ["to_accelerate"]
