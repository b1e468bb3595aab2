"""Least-loss plans: the exact search against brute force, and plans remade from measured losses."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachefit.compress.quality_profile import QualityProfile, TechniqueQuality
from cachefit.hardware import device_from_capacity, make_cluster
from cachefit.plan import Plan
from cachefit.plan.quality import UnitOption, least_loss_partition, least_loss_plan, plan_loss
from cachefit.plan.search import plan_partition, technique_sets
from cachefit.profile import profile_model
from cachefit.units import Workload


def _brute_force(options, capacities, exact=False):
    """Every choice, every contiguous cut into at most (exact: exactly) len(capacities) parts: the
    least loss that fits."""
    n, best = len(options), None
    for choice in itertools.product(*[range(len(o)) for o in options]):
        picked = [options[i][j] for i, j in enumerate(choice)]
        loss = sum(o.loss for o in picked)
        if best is not None and loss >= best:
            continue
        for r in ([len(capacities) - 1] if exact else range(0, min(n, len(capacities)))):
            for cuts in itertools.combinations(range(1, n), r):
                bounds = (0, *cuts, n)
                parts = [picked[a:b] for a, b in zip(bounds, bounds[1:])]
                if all(sum(o.resident_bytes for o in p) + max(o.transient_bytes for o in p) <= capacities[t]
                       for t, p in enumerate(parts)):
                    best = loss
                    break
            else:
                continue
            break
    return best


option = st.builds(
    lambda r, t, loss: UnitOption(techniques=(), resident_bytes=r, transient_bytes=t, loss=loss),
    st.integers(1, 10), st.integers(0, 4), st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0, 3.0]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(option, min_size=1, max_size=3), min_size=1, max_size=5),
       st.lists(st.integers(4, 16), min_size=1, max_size=3), st.booleans())
def test_least_loss_partition_equals_brute_force(options, capacities, exact):
    got = least_loss_partition(options, capacities, exact=exact)
    want = _brute_force(options, capacities, exact=exact)
    if want is None:
        assert got is None
        return
    assert got is not None
    choice, parts, loss = got
    assert loss == pytest.approx(want)
    # what it returns is a plan that fits: every unit once, in order, each part within its card
    assert parts[0][0] == 0 and parts[-1][1] == len(options) and len(parts) <= len(capacities)
    assert not exact or len(parts) == len(capacities)
    assert all(a < b and (i == 0 or parts[i - 1][1] == a) for i, (a, b) in enumerate(parts))
    for t, (a, b) in enumerate(parts):
        picked = [options[i][choice[i]] for i in range(a, b)]
        assert sum(o.resident_bytes for o in picked) + max(o.transient_bytes for o in picked) <= capacities[t]
    assert loss == pytest.approx(sum(options[i][j].loss for i, j in enumerate(choice)))


def test_worked_case_by_hand():
    # two units on one 10-byte card: plain 6 + 6 does not fit; (6, loss 0) + (4, loss 1) fits at 1,
    # (4, loss 2) + (6, loss 0) at 2: the first is the least
    a = [UnitOption(techniques=(), resident_bytes=6, transient_bytes=0, loss=0.0),
         UnitOption(techniques=("int8",), resident_bytes=4, transient_bytes=0, loss=2.0)]
    b = [UnitOption(techniques=(), resident_bytes=6, transient_bytes=0, loss=0.0),
         UnitOption(techniques=("int8",), resident_bytes=4, transient_bytes=0, loss=1.0)]
    assert least_loss_partition([a, b], [10]) == ((0, 1), ((0, 2),), 1.0)
    assert least_loss_partition([a, b], [10, 10]) == ((0, 0), ((0, 1), (1, 2)), 0.0)
    assert least_loss_partition([a, b], [7]) is None


def _quality(profile, losses):
    """A quality file with the given loss per technique for every layer (later layers cost more)."""
    techniques = []
    for name, base in losses.items():
        units = tuple((u.name, base * (1 + i) if u.name.startswith("layers.") else 0.0)
                      for i, u in enumerate(profile.units))
        techniques.append(TechniqueQuality(technique=name, end_to_end=sum(x for _, x in units), units=units))
    return QualityProfile(model=profile.model, kind="decoder", metric="kl", techniques=tuple(techniques))


def test_least_loss_plan_fits_the_same_cards_and_loses_no_more():
    wl = Workload(batch=1, seq_len=128, mode="decode")
    profile = profile_model("gpt2", wl)
    cluster = make_cluster(device_from_capacity("100MB"))  # GPT-2 (fp16) needs 2 cards, units whole
    allow = ["int8", "int4", "sparse50"]
    plan, _ = plan_partition(profile, cluster, allow=allow)
    quality = _quality(profile, {"int8": 0.001, "int4": 0.02, "sparse50": 0.3})
    better = least_loss_plan(profile, cluster, plan, technique_sets(allow), quality, source="q.json")
    assert better.feasible and better.cards <= plan.cards
    # the search puts sparse50 + int4 on every layer (28.8); per unit, int4 alone where it is enough
    assert plan_loss(better, quality) == pytest.approx(11.1) and plan_loss(plan, quality) == pytest.approx(28.8)
    assert better.objective == "least_loss" and any("predicted loss" in n for n in better.notes)
    assert all(s.fits for s in better.stages)
    # every unit once, in order
    names = [n for s in better.stages for n in s.unit_names]
    assert names == [u.name for u in profile.units]
    assert json.loads(json.dumps(better.to_dict()))["objective"] == "least_loss"
    # the prediction as a field, read back from the JSON as written
    assert better.predicted_quality == {"loss": pytest.approx(11.1), "metric": "kl", "source": "q.json"}
    back = Plan.from_dict(json.loads(better.to_json()))
    assert back.predicted_quality == better.predicted_quality and plan.predicted_quality is None
    # the search's plan kept (no better per-unit choice): still its prediction
    kept = least_loss_plan(profile, cluster, better, technique_sets(allow), quality)
    assert kept.predicted_quality["loss"] == pytest.approx(11.1) and kept.predicted_quality["source"] is None


def test_a_malformed_predicted_quality_is_refused():
    from cachefit.errors import ConfigError

    profile = profile_model("gpt2", Workload(batch=1, seq_len=128, mode="decode"))
    plan, _ = plan_partition(profile, make_cluster(device_from_capacity("1GB")))
    data = plan.to_dict()
    assert data["predicted_quality"] is None and Plan.from_dict(data).predicted_quality is None
    data["predicted_quality"] = {"loss": 0.1}
    with pytest.raises(ConfigError, match="predicted_quality must be an object with loss, metric and source"):
        Plan.from_dict(data)


def test_a_quality_file_of_another_model_is_refused():
    from cachefit.errors import ConfigError

    wl = Workload(batch=1, seq_len=128, mode="decode")
    profile = profile_model("gpt2", wl)
    plan, _ = plan_partition(profile, make_cluster(device_from_capacity("1GB")))
    other = QualityProfile(model="x", kind="decoder", metric="kl",
                           techniques=(TechniqueQuality(technique="int8", end_to_end=0.0, units=(("layers.0", 0.0),)),))
    with pytest.raises(ConfigError, match="no measurement for unit"):
        least_loss_plan(profile, make_cluster(device_from_capacity("1GB")), plan, technique_sets(["int8"]), other)


def test_plan_quality_option(tmp_path):
    from typer.testing import CliRunner

    from cachefit.cli import app

    profile = profile_model("gpt2", Workload(batch=1, seq_len=128, mode="decode"))
    path = tmp_path / "q.json"
    path.write_text(json.dumps(_quality(profile, {"int8": 0.001, "int4": 0.02, "sparse50": 0.3}).to_dict()))
    args = ["plan", "gpt2", "--capacity", "100MB", "--seq", "128", "--allow", "int8,int4,sparse50", "--quality", str(path)]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["objective"] == "least_loss" and doc["cards"] == 2
    assert any("predicted loss 11.1 (kl) against 28.8" in n for n in doc["notes"])
    result = CliRunner().invoke(app, [*args, "--cards", "3", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["cards"] == 3  # exactly K cards kept
    result = CliRunner().invoke(app, [*args, "--pin", "layers.0=0"])
    assert result.exit_code == 2 and "--quality" in result.output
