"""``cachefit plan --objective cards|time`` and ``cachefit compare --objective``: the JSON contract, one
source for every time shown, and one-line errors."""

import json

from typer.testing import CliRunner

from cachefit.cli import app

runner = CliRunner()

# GPT-2 prefill (8 x 256 tokens) on 3 H100s whose L2 is taken as 700 MB: every layout fits, so the
# objectives differ only in where the cuts go
GPT2 = ("gpt2", "--device", "h100", "--capacity", "700MB", "--cards", "3", "--mode", "prefill", "--batch", "8",
        "--seq", "256")


def run(*args):
    return runner.invoke(app, list(args), env={"COLUMNS": "200"})


def _plan(*extra):
    result = run("plan", *GPT2, *extra, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_every_stage_carries_its_predicted_time_and_time_is_never_slower():
    by_bytes = _plan()
    by_time = _plan("--objective", "time")
    assert by_bytes["objective"] == "balanced" and by_time["objective"] == "min_time"
    assert by_time["cards"] == by_bytes["cards"] == 3 and by_time["feasible"]
    for doc in (by_bytes, by_time):
        assert all(isinstance(st["predicted_time_s"], float) and st["predicted_time_s"] > 0 for st in doc["stages"])
    slowest = {name: max(st["predicted_time_s"] for st in doc["stages"])
               for name, doc in (("bytes", by_bytes), ("time", by_time))}
    assert slowest["time"] <= slowest["bytes"]
    assert [st["units"] for st in by_time["stages"]] != [st["units"] for st in by_bytes["stages"]]
    assert any("the time objective" in note for note in by_time["notes"])


def test_plan_times_are_what_compare_reports():
    for objective in ("cards", "time"):
        plan = _plan("--objective", objective)
        result = run("compare", *GPT2, "--objective", objective, "--json")
        assert result.exit_code == 0, result.output
        own = next(x for x in json.loads(result.stdout)["layouts"] if x["name"] == "cachefit")
        assert [st["predicted_time_s"] for st in plan["stages"]] == own["card_times_s"]
        assert max(own["card_times_s"]) == max(own["stage_times_s"])


def test_the_plan_table_shows_each_stage_time_and_marks_the_bottleneck():
    result = run("plan", *GPT2, "--objective", "time")
    assert result.exit_code == 0, result.output
    assert "time/µb" in result.stdout and "µs *" in result.stdout
    assert "min_time" in result.stdout


def test_bad_objective_and_untimeable_devices_exit_2_with_one_line():
    result = run("plan", "gpt2", "--capacity", "700MB", "--objective", "speed")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "cards, time" in result.output
    # a bare capacity has no FLOP/s nor bandwidths: no time to minimize, and no guess
    result = run("plan", "gpt2", "--capacity", "700MB", "--cards", "3", "--objective", "time")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "missing from the device description" in result.output and "--objective cards" in result.output
    result = run("plan", *GPT2, "--objective", "time", "--quality", "q.json")
    assert result.exit_code == 2 and "give one" in result.output
    result = run("plan", *GPT2, "--objective", "time", "--cut-after", "layers.3")
    assert result.exit_code == 2 and "--pin, --cut-after" in result.output
