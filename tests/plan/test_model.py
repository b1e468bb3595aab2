import json
import subprocess
import sys

import pytest

from cachefit.errors import ConfigError
from cachefit.hardware import device_from_capacity, make_cluster
from cachefit.hardware.devices import cluster_to_dict
from cachefit.plan.search import plan_partition
from cachefit.plan import Plan, check_provenance, cluster_digest, load_plan
from cachefit.profile import profile_model
from cachefit.units import Workload


def _plan(model="gpt2", capacity="100MB", **kw):
    prof = profile_model(model, Workload(**kw))
    cluster = make_cluster(device_from_capacity(capacity))
    plan, _ = plan_partition(prof, cluster)
    return plan, prof, cluster


def test_plan_round_trips_through_json(tmp_path):
    plan, _, _ = _plan()
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    again = load_plan(path)
    # the JSON keeps every decision and every per-card byte count (not the per-role breakdowns)
    assert again.to_json() == plan.to_json()
    assert [s.footprint.total_bytes for s in again.stages] == [s.footprint.total_bytes for s in plan.stages]


def test_plans_are_byte_identical_across_processes():
    code = (
        "from cachefit.profile import profile_model\n"
        "from cachefit.plan.search import plan_partition\n"
        "from cachefit.hardware import get_device, make_cluster\n"
        "p, _ = plan_partition(profile_model('llama-2-7b'), make_cluster(get_device('h100')), allow=['int8'])\n"
        "print(p.to_json())\n"
    )
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)}
    assert len(outs) == 1


def test_provenance_catches_a_changed_model_workload_or_device():
    plan, prof, cluster = _plan()
    check_provenance(plan, profile_digest=prof.digest(), cluster_digest_=cluster_digest(cluster_to_dict(cluster)))
    other_model = profile_model("bert-base-uncased", prof.workload)
    with pytest.raises(ConfigError, match="model or workload differs"):
        check_provenance(plan, profile_digest=other_model.digest())
    other_workload = profile_model("gpt2", Workload(batch=2))
    with pytest.raises(ConfigError, match="model or workload differs"):
        check_provenance(plan, profile_digest=other_workload.digest())
    other_cards = make_cluster(device_from_capacity("120MB"))
    with pytest.raises(ConfigError, match="cards differ"):
        check_provenance(plan, cluster_digest_=cluster_digest(cluster_to_dict(other_cards)))


def test_same_model_from_preset_and_config_has_the_same_digest(tmp_path):
    import cachefit.profile.presets as presets

    with open(presets.__path__[0] + "/gpt2.json") as f:
        doc = json.load(f)
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(doc["config"]))
    assert profile_model(str(cfg)).digest() == profile_model("gpt2").digest()


def test_malformed_plan_files_are_refused(tmp_path):
    bad = tmp_path / "p.json"
    bad.write_text("{}")
    with pytest.raises(ConfigError, match="schema"):
        load_plan(bad)
    bad.write_text('{"schema": "cachefit.plan/1", "stages": [{}]}')
    with pytest.raises(ConfigError, match="malformed"):
        load_plan(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_plan(tmp_path / "missing.json")
    plan, _, _ = _plan()
    assert Plan.from_dict(json.loads(plan.to_json())).feasible
