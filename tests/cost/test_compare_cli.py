"""``cachefit compare`` and ``cachefit report`` through the CLI."""

import json

from typer.testing import CliRunner

from cachefit.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, list(args), env={"COLUMNS": "200"})


def test_compare_prints_the_layouts_and_says_cachefit_does_not_fit_on_4_cards():
    result = run("compare", "paper-16l", "--device", "h100", "--cards", "4")
    assert result.exit_code == 0, result.output
    for name in ("cachefit", "uniform-layers", "greedy-dram", "tensor-parallel"):
        assert name in result.stdout
    assert "DOES NOT FIT" in result.stdout
    assert "154" in result.stdout  # the fewest cards on which cachefit's plan fits


def test_compare_json_contract():
    result = run("compare", "paper-16l", "--device", "h100", "--cards", "4", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    keys = {"name", "cards", "offchip_bytes_per_token", "throughput_tokens_per_s", "latency_s", "mean_utilization"}
    assert [x["name"] for x in doc["layouts"]][0] == "cachefit"
    assert all(keys <= set(x) for x in doc["layouts"])
    assert doc["min_cards_to_fit"] == 154
    assert doc["layouts"][0]["fits_on_chip"] is False


def test_compare_defaults_to_the_fewest_cards_that_fit():
    result = run("compare", "gpt2", "--device", "h100", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["num_cards"] == doc["min_cards_to_fit"]
    own = doc["layouts"][0]
    assert own["fits_on_chip"] and own["offchip_bytes_per_token"] == 0


def test_compare_bad_input_exits_2_with_one_line():
    result = run("compare", "paper-16l", "--device", "nosuchchip", "--cards", "4")
    assert result.exit_code == 2
    assert "unknown device" in result.output and "Traceback" not in result.output
    result = run("compare", "paper-16l", "--device", "h100", "--cards", "0")
    assert result.exit_code == 2


def test_plan_report_writes_a_page(tmp_path):
    out = tmp_path / "rep"
    result = run("plan", "gpt2", "--device", "h100", "--report", str(out))
    assert result.exit_code == 0, result.output
    page = (out / "index.html").read_text()
    assert 'id="plan-table"' in page and 'id="comparison-table"' in page
