"""The HTML page of a run: planned against measured bytes per card, the verdict, the prediction."""

from __future__ import annotations

from cachefit.report.html import render_run_report, write_run_report


def _report(over: bool) -> dict:
    stages = [
        {"stage": 0, "ranks": [0], "description": "stage 0 (card 0: embed..layers.1)", "planned_weight_bytes": 328_704,
         "measured_weight_bytes": 328_704, "planned_total_bytes": 377_408, "measured_peak_bytes": 367_232,
         "capacity_bytes": 400_000, "over_capacity": False, "forward_s_mean": 0.002, "busy_fraction": 0.45},
        {"stage": 1, "ranks": [1], "description": "stage 1 (card 1: layers.2..head)", "planned_weight_bytes": 180_992,
         "measured_weight_bytes": 180_992, "planned_total_bytes": 229_696,
         "measured_peak_bytes": 450_000 if over else 219_264, "capacity_bytes": 400_000, "over_capacity": over,
         "forward_s_mean": 0.001},
    ]
    return {"model": "tiny", "stages_count": 2, "cards": 2, "input_shape": [4, 8],
            "run": {"mode": "decode", "schedule": "gpipe", "dtype": "fp32", "micro_batches": 2},
            "timings": {"tokens_per_s": 120.0, "mean_step_s": 0.5, "ms_per_token": 20.0},
            "predicted": {"prediction": {"tokens_per_s": 150.0, "ms_per_token": 16.0, "busy_fractions": [0.5, 0.9]}},
            "fit": {"over_capacity": ["stage 1 (card 1: layers.2..head)"] if over else [], "note": "how it is measured"},
            "stages": stages}


def test_the_page_puts_planned_beside_measured_per_card(tmp_path):
    page = render_run_report(_report(over=False))
    assert "Planned against measured, per card" in page and "every stage stayed within" in page
    for text in ("stage 0 (card 0: embed..layers.1)", "377.4 KB", "367.2 KB", "400.0 KB", "tokens/s, predicted"):
        assert text in page, text
    index = write_run_report(_report(over=False), tmp_path / "page")
    assert index.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_a_stage_over_capacity_is_named_on_the_page():
    page = render_run_report(_report(over=True))
    assert 'over capacity: stage 1 (card 1: layers.2..head)' in page and '<span class="bad">450.0 KB</span>' in page
