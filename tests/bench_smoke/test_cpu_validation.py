"""bench/cpu_validation.py end to end on a tiny model and a given device file: the output's shape only
(no timing is checked: the rates depend on the host and its load)."""

import json

import pytest
from bench_scripts import bench_script, tiny_run_args

pytest.importorskip("torch")
pytest.importorskip("transformers")



@pytest.fixture(scope="module")
def bench():
    with bench_script("cpu_validation") as module:
        yield module


@pytest.mark.slow
@pytest.mark.multiprocess
def test_the_script_writes_a_row_per_process_count(bench, tmp_path):
    docs = tmp_path / "validation.md"
    docs.write_text("# Validation\n\nabove\n")
    argv = [*tiny_run_args(tmp_path, docs), "--new-tokens", "2"]
    assert bench.main(argv) == 0
    doc = json.loads((tmp_path / "out" / "cpu_validation.json").read_text())
    assert [r["cards"] for r in doc["rows"]] == [1, 2]
    for row in doc["rows"]:
        assert row["predicted_tokens_per_s"] > 0 and row["measured_tokens_per_s"] > 0 and row["ratio"] > 0
        assert len(row["stages"]) == row["cards"] and row["weight_dtype"] == "fp32"
    assert doc["link"]["measured"] is False  # the device file's own figures
    assert str(tmp_path) not in doc["command"]  # the docs show roles, not this host's paths
    text = docs.read_text()
    assert "above" in text and text.count(bench.SECTION_START) == 1 and bench.SECTION_END in text
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 2  # header and one row per process count
    # a rerun replaces the section instead of adding another
    assert bench.main(argv) == 0 and docs.read_text().count(bench.SECTION_START) == 1


def test_bad_options_are_one_line_errors(bench, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(["--cards", "one"])
    assert exc.value.code == 2
    capsys.readouterr()
    assert bench.main(["--out-dir", str(tmp_path), "--model-dir", str(tmp_path / "missing"), "--cards", "1"]) == 1
    assert capsys.readouterr().err.strip().startswith("error: --model-dir")
