"""bench/decode_bench.py end to end on a tiny model and a given device file: the output's shape only
(no timing is checked: the rates depend on the host and its load)."""

import json

import pytest
from bench_scripts import DEVICE, bench_script

pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bench():
    with bench_script("decode_bench") as module:
        yield module


@pytest.mark.slow
@pytest.mark.multiprocess
def test_the_script_writes_a_row_per_group_count(bench, tmp_path):
    device = tmp_path / "tiny-cpu.json"
    device.write_text(json.dumps(DEVICE))
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nabove\n")
    argv = ["--out-dir", str(tmp_path / "out"), "--device-file", str(device), "--docs", str(docs),
            "--hidden", "64", "--layers", "2", "--intermediate", "128", "--heads", "4", "--kv-heads", "2",
            "--vocab", "128", "--groups", "1,2", "--group-batch", "2", "--new-tokens", "3", "--warmup", "0",
            "--steps", "1"]
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
