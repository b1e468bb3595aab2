"""The INT8 cache-fit benchmark's bookkeeping (bench/cachefit_demo.py), without measuring anything."""

from collections import Counter

import pytest
from bench_scripts import bench_script


@pytest.fixture(scope="module")
def demo():
    with bench_script("cachefit_demo") as module:
        yield module


def test_every_block_runs_once_a_round_in_a_shuffled_order(demo):
    blocks = demo.schedule(rounds=3, seed=0)
    # 6 configurations x 2 stages solo + 5 configurations in pairs (no floor) = 17 blocks a round
    assert len(blocks) == 3 * 17
    for r in range(3):
        counts = Counter((mode, config, stage) for rr, mode, config, stage in blocks if rr == r)
        assert set(counts.values()) == {1}
        assert len([k for k in counts if k[0] == "solo"]) == 12
        assert {k[1] for k in counts if k[0] == "pair"} == set(demo.CONFIGS) - {"floor"}
    orders = [[b[1:] for b in blocks if b[0] == r] for r in range(3)]
    assert orders[0] != orders[1]  # drift falls on every configuration, not always the same one


def test_quantile_interpolates_linearly(demo):
    values = [5.0, 1.0, 3.0, 2.0, 4.0]
    # sorted 1..5: position q * 4; q = 0.1 -> 1.4, q = 0.5 -> 3, q = 0.875 -> 4.5
    assert demo.quantile(values, 0.1) == pytest.approx(1.4)
    assert demo.quantile(values, 0.5) == pytest.approx(3.0)
    assert demo.quantile(values, 0.875) == pytest.approx(4.5)


def test_speedup_factors_multiply_to_the_total(demo):
    times_ms = {"fp32": 10.0, "fp32-cold": 12.0, "int8": 4.0, "int8-cold": 6.0, "int8-fp32act": 30.0, "floor": 1.0}
    stats = {}
    for mode in ("solo", "pair"):
        for stage in range(demo.CARDS):
            for config, ms in times_ms.items():
                if mode == "pair" and config == "floor":
                    continue
                # each stage takes half the per-token time
                stats[f"{mode}/{stage}/{config}"] = {"median_s": ms / 2e3, "low_s": ms / 2.5e3, "calls": 10,
                                                     "block_spread": 0.1, "block_iqr": 0.05}
    pred = [{"predicted_s": {"int8": 1e-3, "int8-cold": 2e-3, "fp32": 4e-3, "fp32-partial": 3e-3}}] * 2
    a = demo.analyse({"stats": stats, "predictions": pred})
    solo = a["speedups"]["solo/median_s"]
    assert solo["total"] == pytest.approx(10 / 4)
    assert solo["baseline"] == pytest.approx(10 / 12)
    assert solo["bytes"] == pytest.approx(12 / 6)
    assert solo["cache"] == pytest.approx(6 / 4)
    assert solo["baseline"] * solo["bytes"] * solo["cache"] == pytest.approx(solo["total"])
    assert solo["deployed"] == pytest.approx(10 / 30)
    # predictions: per token 2 stages; total 8 / 2, with the measured 1 ms floor (9 / 3)
    assert a["speedups"]["predicted"]["total"] == pytest.approx(4.0)
    assert a["speedups"]["predicted+floor"]["total"] == pytest.approx(9 / 3)
    assert a["per_token"]["pair/median_s"]["floor"] is None


def test_the_section_replaces_only_its_own_markers(demo, tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n<!-- probe:start -->\nprobe text\n<!-- probe:end -->\n")
    first = f"{demo.SECTION_START}\none\n{demo.SECTION_END}\n"
    demo.write_section(str(doc), first)
    demo.write_section(str(doc), f"{demo.SECTION_START}\ntwo\n{demo.SECTION_END}\n")
    text = doc.read_text()
    assert "probe text" in text and "<!-- probe:end -->" in text
    assert text.count(demo.SECTION_START) == 1 and "two" in text and "one" not in text
