"""The quality file (pure core): reading and writing it, and the loss of a technique set on a unit."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachefit.compress.quality_profile import QUALITY_SCHEMA, QualityProfile, TechniqueQuality, read_quality_file
from cachefit.errors import ConfigError


def _profile() -> QualityProfile:
    return QualityProfile(
        model="tiny",
        kind="decoder",
        metric="kl",
        techniques=(
            TechniqueQuality(technique="int8", end_to_end=0.002, units=(("embed", 0.0), ("layers.0", 0.001), ("layers.1", 0.0012)),
                             not_applied=("embed",)),
            TechniqueQuality(technique="int4", end_to_end=0.05, units=(("embed", 0.0), ("layers.0", 0.02), ("layers.1", 0.03)),
                             unit_output_error=(("layers.0", 0.1), ("layers.1", 0.12)), extra=(("held_out_1-cos", 0.04),)),
            TechniqueQuality(technique="sparse50", end_to_end=0.3, units=(("embed", 0.0), ("layers.0", 0.1), ("layers.1", 0.2))),
            TechniqueQuality(technique="sparse50,int8", end_to_end=0.31, units=(("embed", 0.0), ("layers.0", 0.11), ("layers.1", 0.25))),
        ),
        config=(("quantize_method", "rtn"),),
        calibration=(("samples", 4),),
        baseline=(("sts_spearman", 0.8),),
    )


def test_round_trips_through_json(tmp_path):
    profile = _profile()
    doc = profile.to_dict()
    assert doc["schema"] == QUALITY_SCHEMA and doc["metric"] == "kl"
    assert doc["techniques"]["int8"] == {"end_to_end": 0.002, "units": {"embed": 0.0, "layers.0": 0.001, "layers.1": 0.0012},
                                         "not_applied": ["embed"]}
    assert doc["techniques"]["int4"]["held_out_1-cos"] == 0.04
    path = tmp_path / "q.json"
    path.write_text(json.dumps(doc))
    assert read_quality_file(path) == profile


def test_unit_loss_uses_a_measured_set_or_adds_up_single_techniques():
    profile = _profile()
    assert profile.unit_loss("layers.1", ["int8"]) == 0.0012
    assert profile.unit_loss("layers.1", "int8,sparse50") == 0.25  # measured as a set (any order)
    assert profile.unit_loss("layers.1", ["sparse50", "int4"]) == pytest.approx(0.2 + 0.03)  # not measured: summed
    assert profile.unit_loss("layers.1", ["int4", "fuse", "ckpt"]) == 0.03  # no weight changed: 0
    assert profile.unit_loss("layers.1", []) == 0.0
    assert profile.unit_loss("head", ["int4"]) == 0.0  # a unit not listed: nothing applied
    with pytest.raises(ConfigError, match="sparse24 was not measured.*--allow"):
        profile.unit_loss("layers.0", ["sparse24"])
    assert profile.technique(["int4"]).unit_sum == pytest.approx(0.05)


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda d: d.update(schema="cachefit.plan/1"), "schema"),
        (lambda d: d.pop("metric"), "metric"),
        (lambda d: d.update(metric="bleu"), "unknown metric"),
        (lambda d: d.update(kind="vision"), "encoder or decoder"),
        (lambda d: d["techniques"].update(int9={"end_to_end": 0, "units": {}}), "unknown compression technique"),
        (lambda d: d["techniques"]["int8"].update(end_to_end="small"), "finite number"),
        (lambda d: d["techniques"]["int8"]["units"].update({"layers.0": -1.0}), "never negative"),
        (lambda d: d["techniques"]["int8"].pop("units"), "missing 'units'"),
        (lambda d: d.update(techniques={}), "non-empty"),
    ],
)
def test_malformed_files_are_explained(change, needle):
    doc = _profile().to_dict()
    change(doc)
    with pytest.raises(ConfigError, match=needle):
        QualityProfile.from_dict(doc)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=10, allow_nan=False), min_size=1, max_size=6))
def test_sums_of_units_are_what_the_planner_adds(losses):
    units = tuple((f"layers.{i}", x) for i, x in enumerate(losses))
    t = TechniqueQuality(technique="int4", end_to_end=sum(losses), units=units)
    profile = QualityProfile(model="m", kind="encoder", metric="1-cos", techniques=(t,))
    assert sum(profile.unit_loss(name, ["int4"]) for name, _ in units) == pytest.approx(t.unit_sum)
    assert QualityProfile.from_dict(json.loads(json.dumps(profile.to_dict()))) == profile
