"""DeepSpeed parts: monotone, from 0 to the number of layers, and the snippet really sets them."""

import sys
import types

import numpy as np
import pytest
from conftest import plan_of, profile_of

from cachefit.export import to_deepspeed
from cachefit.export.deepspeed import partition_uniform
from cachefit.export.modules import pipeline_parts
from cachefit.hardware.devices import device_from_capacity, make_cluster
from cachefit.plan.search import plan_partition


def _deepspeed_partition_uniform(num_items, num_parts):
    """DeepSpeed's own ``deepspeed/runtime/utils.py`` ``partition_uniform``, verbatim in substance."""
    parts = [0] * (num_parts + 1)
    if num_items <= num_parts:
        for p in range(num_parts + 1):
            parts[p] = min(p, num_items)
        return parts
    chunksize = num_items // num_parts
    residual = num_items - (chunksize * num_parts)
    parts = np.arange(0, (num_parts + 1) * chunksize, chunksize)
    for i in range(residual):
        parts[i + 1:] += 1
    return parts.tolist()


@pytest.mark.parametrize("num_items", range(1, 40))
def test_partition_uniform_is_deepspeeds(num_items):
    for num_parts in range(1, 12):
        assert partition_uniform(num_items, num_parts) == _deepspeed_partition_uniform(num_items, num_parts)


@pytest.mark.parametrize("name, granularity", [("llama", "layer"), ("gpt2", "block"), ("bert", "layer")])
@pytest.mark.parametrize("num_cards", [1, 2, 3])
def test_parts_are_monotone_and_end_at_the_number_of_layers(name, granularity, num_cards):
    profile = profile_of(name, granularity)
    plan = plan_of(profile, num_cards)
    doc = to_deepspeed(plan, profile).document
    parts = doc["parts"]
    assert parts[0] == 0 and parts[-1] == len(profile.units) == len(doc["layers"])
    assert all(a < b for a, b in zip(parts, parts[1:]))
    assert doc["num_stages"] == len(parts) - 1 == plan.cards
    assert [[parts[s], parts[s + 1]] for s in range(len(parts) - 1)] == [list(s.units) for s in plan.stages]
    assert doc["layers"] == [u.name for u in profile.units]


class _Topo:
    def __init__(self, stage):
        self.stage = stage

    def get_coord(self, rank):
        return types.SimpleNamespace(pipe=self.stage)


def _run_snippet(text, num_layers, stage):
    """Execute the snippet against a stand-in ``deepspeed.pipe`` and partition one stage's layers."""
    calls = {}

    class PipelineModule:  # what the snippet subclasses; only the attributes _partition_layers reads
        def __init__(self, layers, num_stages, partition_method="parameters", **kwargs):
            self._layer_specs = list(layers)
            self.num_stages = num_stages
            self._topo = _Topo(stage)
            self.global_rank = stage
            calls["method"] = partition_method
            self._partition_layers(method=partition_method)

        def _set_bounds(self, start=None, stop=None):
            calls["bounds"] = (start, stop)

        def _partition_layers(self, method="uniform"):
            assert method == "uniform", method
            self.parts = partition_uniform(len(self._layer_specs), self.num_stages)
            self._set_bounds(self.parts[stage], self.parts[stage + 1])

    pipe = types.ModuleType("deepspeed.pipe")
    pipe.PipelineModule = PipelineModule
    saved = {k: sys.modules.get(k) for k in ("deepspeed", "deepspeed.pipe")}
    sys.modules["deepspeed"] = types.ModuleType("deepspeed")
    sys.modules["deepspeed.pipe"] = pipe
    try:
        namespace = {}
        exec(compile(text, "<snippet>", "exec"), namespace)
        module = namespace["build_pipeline"](layers=[object()] * num_layers)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return module, calls


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_snippet_sets_the_parts_and_each_stage_bounds(stage):
    # every stage of both snippet kinds: gpt2 (block, 3 cards) has parts [0, 4, 7, 10], partition_uniform's,
    # bert (block, 3 cards) [0, 3, 6, 10], which only the subclass gives
    for name in ("gpt2", "bert"):
        profile = profile_of(name, "block")
        plan = plan_of(profile, 3)
        export = to_deepspeed(plan, profile)
        parts = export.document["parts"]
        module, calls = _run_snippet(export.text, len(profile.units), stage)
        assert module.parts == parts
        assert calls["bounds"] == (parts[stage], parts[stage + 1])


def test_custom_parts_use_the_subclass():
    # bert at block granularity on 3 cards: parts [0, 3, 6, 10], while partition_uniform(10, 3) is [0, 4, 7, 10]
    profile = profile_of("bert", "block")
    export = to_deepspeed(plan_of(profile, 3), profile)
    assert export.document["parts"] == [0, 3, 6, 10]
    assert export.document["partition_method"] is None
    assert "class CachefitPipelineModule(PipelineModule)" in export.text
    module, calls = _run_snippet(export.text, 10, 1)
    assert module.parts == [0, 3, 6, 10] and calls["bounds"] == (3, 6)


def test_uniform_parts_use_deepspeeds_own_method():
    # llama, 6 units on 3 cards: parts [0, 2, 4, 6] == partition_uniform(6, 3)
    profile = profile_of("llama", "layer")
    export = to_deepspeed(plan_of(profile, 3), profile)
    assert export.document["parts"] == [0, 2, 4, 6] == partition_uniform(6, 3)
    assert export.document["partition_method"] == "uniform"
    assert 'partition_method="uniform"' in export.text
    module, calls = _run_snippet(export.text, 6, 2)
    assert calls["method"] == "uniform" and module.parts == [0, 2, 4, 6] and calls["bounds"] == (4, 6)


def test_snippet_refuses_a_model_with_other_layers():
    profile = profile_of("bert", "block")
    export = to_deepspeed(plan_of(profile, 3), profile)
    with pytest.raises(ValueError, match="cachefit's PARTS"):
        _run_snippet(export.text, 7, 0)


def test_tensor_parallel_plan_warns():
    profile = profile_of("llama", "layer")
    plan, _ = plan_partition(profile, make_cluster(device_from_capacity("60KB")))
    export = to_deepspeed(plan, profile)
    assert export.document["num_stages"] == len(pipeline_parts(plan)) < plan.cards
    assert any("tensor-parallel" in w for w in export.warnings)
