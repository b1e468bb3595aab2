"""A plan as DeepSpeed pipeline boundaries: ``PipelineModule`` ``parts``.

DeepSpeed's ``PipelineModule(layers=..., num_stages=K)`` runs a flat list of layers; stage ``s`` builds
``layers[parts[s]:parts[s + 1]]``, with ``parts = [0, b1, ..., n]`` and ``n = len(layers)``
(``deepspeed/runtime/pipe/module.py``, ``_partition_layers``). Here the layers are cachefit's units in
order (``embed``, ``layers.0`` ... ``head``; at block granularity one per attention / MLP block), and
``parts`` are the first unit of each pipeline stage, then the number of units.

``partition_method`` offers ``uniform`` (equal layer counts, ``partition_uniform``), ``parameters``
(balanced parameter counts) and ``type:REGEX`` (balanced counts of the layers whose class matches);
none takes explicit boundaries. When the plan's boundaries are exactly ``partition_uniform``'s the
snippet says ``partition_method="uniform"``; otherwise it subclasses ``PipelineModule`` and sets
``parts`` in ``_partition_layers`` (a private method: pin the DeepSpeed version you test it with).
"""

from __future__ import annotations

from typing import Any

from cachefit.export.modules import Export, compression_warning, pipeline_parts, split_parts_text
from cachefit.plan import Plan
from cachefit.units import ModelProfile


def partition_uniform(num_items: int, num_parts: int) -> list[int]:
    """DeepSpeed's ``ds_utils.partition_uniform``: ``num_items // num_parts`` layers a stage, the
    first ``num_items % num_parts`` stages one more (``deepspeed/runtime/utils.py``)."""
    if num_items <= num_parts:
        return [min(p, num_items) for p in range(num_parts + 1)]
    chunk, residual = divmod(num_items, num_parts)
    return [p * chunk + min(p, residual) for p in range(num_parts + 1)]


_SUBCLASS = '''


class CachefitPipelineModule(PipelineModule):
    """PipelineModule with cachefit's stage boundaries (partition_method is ignored)."""

    def _partition_layers(self, method="parameters"):
        if len(PARTS) != self.num_stages + 1 or PARTS[-1] != len(self._layer_specs):
            raise ValueError(
                f"cachefit's PARTS {PARTS} are for {len(PARTS) - 1} stages and {PARTS[-1]} layers; "
                f"this module has {self.num_stages} stages and {len(self._layer_specs)} layers"
            )
        self.parts = list(PARTS)
        stage_id = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage_id], stop=self.parts[stage_id + 1])


def build_pipeline(layers, **kwargs):
    """layers: one LayerSpec (or nn.Module) per cachefit unit, in the order listed above."""
    return CachefitPipelineModule(layers=layers, num_stages=NUM_STAGES, **kwargs)
'''

_UNIFORM = '''


def build_pipeline(layers, **kwargs):
    """layers: one LayerSpec (or nn.Module) per cachefit unit, in the order listed above."""
    # partition_uniform gives exactly PARTS here
    return PipelineModule(layers=layers, num_stages=NUM_STAGES, partition_method="uniform", **kwargs)
'''


def _snippet(plan: Plan, profile: ModelProfile, parts: list[int], uniform: bool) -> str:
    lines = [
        f"# cachefit plan of {plan.model}: {len(parts) - 1} pipeline stages over {len(profile.units)} layers "
        f"({profile.granularity} granularity).",
        "# DeepSpeed's convention: stage s runs layers[PARTS[s]:PARTS[s + 1]], PARTS[0] = 0, PARTS[-1] = len(layers).",
        "from deepspeed.pipe import PipelineModule",
        "",
        f"NUM_STAGES = {len(parts) - 1}",
        f"PARTS = {parts}",
        "# the layers, in order, by stage:",
    ]
    for s in range(len(parts) - 1):
        names = [u.name for u in profile.units[parts[s]:parts[s + 1]]]
        shown = ", ".join(names) if len(names) <= 4 else f"{names[0]}, {names[1]}, ..., {names[-1]}"
        lines.append(f"#   stage {s}: layers[{parts[s]}:{parts[s + 1]}] = {shown}")
    return "\n".join(lines) + (_UNIFORM if uniform else _SUBCLASS)


def to_deepspeed(plan: Plan, profile: ModelProfile) -> Export:
    """The plan as DeepSpeed ``parts`` and a runnable ``PipelineModule`` snippet (``text``).

    Args:
        plan: the plan.
        profile: the profile the plan was made from (see :func:`cachefit.export.modules.profile_for_plan`).
    """
    pparts = pipeline_parts(plan)
    parts = [part.units[0] for part in pparts] + [len(profile.units)]
    uniform = parts == partition_uniform(len(profile.units), len(pparts))
    warnings: list[str] = []
    split = split_parts_text(pparts)
    if split:
        warnings.append(
            f"{split}; DeepSpeed's topology "
            "(PipeModelDataParallelTopology) gives every stage the same model-parallel degree and the layers "
            "must implement the split themselves (Megatron-style), so these boundaries alone do not reproduce it"
        )
    note = compression_warning(plan, "DeepSpeed", "quantize or prune those layers when you build them")
    if note:
        warnings.append(note)
    document: dict[str, Any] = {
        "num_stages": len(pparts),
        "parts": parts,
        "layers": [u.name for u in profile.units],
        "partition_method": "uniform" if uniform else None,
        "tensor_parallel": [part.tensor_parallel for part in pparts],
    }
    text = _snippet(plan, profile, parts, uniform)
    document["snippet"] = text
    return Export(format="deepspeed", model=plan.model, document=document, text=text, warnings=tuple(warnings))


__all__ = ["partition_uniform", "to_deepspeed"]
