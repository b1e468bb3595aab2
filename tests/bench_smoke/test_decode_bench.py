"""bench/decode_bench.py end to end on a tiny model and a given device file: the output's shape only
(no timing is checked: the rates depend on the host and its load)."""

import json

import pytest
from bench_scripts import bench_script, tiny_run_args

pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bench():
    with bench_script("decode_bench") as module:
        yield module


@pytest.mark.slow
@pytest.mark.multiprocess
def test_the_script_writes_a_row_per_group_count(bench, tmp_path):
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nabove\n")
    argv = [*tiny_run_args(tmp_path, docs), "--groups", "1,2", "--group-batch", "2", "--new-tokens", "3"]
    assert bench.main(argv) == 0
    doc = json.loads((tmp_path / "out" / "decode_bench.json").read_text())
    assert [r["groups"] for r in doc["rows"]] == [1, 2] and [r["sequences"] for r in doc["rows"]] == [2, 4]
    for row in doc["rows"]:
        assert row["measured_tokens_per_s"] > 0 and row["predicted_tokens_per_s"] > 0
        assert len(row["measured_busy"]) == 2 and len(row["predicted_busy"]) == 2
    # the cost model: two groups keep the two stages busier than one does
    assert sum(doc["rows"][1]["predicted_busy"]) > sum(doc["rows"][0]["predicted_busy"])
    assert str(tmp_path) not in doc["command"]
    text = docs.read_text()
    assert "above" in text and text.count(bench.SECTION_START) == 1 and bench.SECTION_END in text


def test_bad_options_are_one_line_errors(bench, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(["--groups", "0,2"])
    assert exc.value.code == 2 and "--groups '0,2': give positive integers" in capsys.readouterr().err
