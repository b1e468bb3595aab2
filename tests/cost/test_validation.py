"""Predictions beside published deployments (docs/validation.md): recomputed from the catalog.

A catalog or cost-model change that moves a prediction out of its band, or makes a calibration row
stop reproducing the figure the catalog holds, fails here; so does a stale docs/validation.md
(regenerate with ``python bench/validate.py --markdown docs/validation.md``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cachefit.cost.validation import (
    CALIBRATED_FIGURES,
    load_deployments,
    predict,
    predict_all,
    with_figure,
)
from cachefit.errors import ConfigError
from cachefit.hardware import get_device
from cachefit.report.validation import SECTION_END, SECTION_START, format_validation_markdown

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "bench" / "published_deployments.toml"
DOC = ROOT / "docs" / "validation.md"

pytestmark = pytest.mark.skipif(not DATA.exists(), reason="bench data not present (installed package)")


@pytest.fixture(scope="module")
def predictions():
    return predict_all(load_deployments(DATA))


def test_at_least_eight_deployments_over_four_device_families():
    rows = load_deployments(DATA)
    assert len(rows) >= 8
    assert len({d.family for d in rows}) >= 4
    # every row cites a public source and its date
    assert all(d.source.strip() and d.date.strip() for d in rows)
    # at most one calibration per device, each fixing one of the fixed costs no specification gives
    calibrations = [d for d in rows if d.role == "calibration"]
    assert len({d.device for d in calibrations}) == len(calibrations)
    assert all(d.calibrates in CALIBRATED_FIGURES for d in calibrations)
    # every device with a calibration row is checked on at least one other published result
    for cal in calibrations:
        assert any(d.role == "validation" and d.device == cal.device for d in rows), cal.id


def test_every_prediction_is_within_its_band(predictions):
    out = [(p.deployment.id, p.ratio, p.bracketed) for p in predictions if not p.within_band]
    assert not out, f"out of band (predicted / published): {out}"


def test_unknowns_are_exactly_the_expected_ones(predictions):
    for p in predictions:
        assert p.missing == p.deployment.expect_missing, p.deployment.id
        assert (p.tokens_per_s is None) == bool(p.deployment.expect_missing)


def test_calibration_rows_reproduce_their_figure_from_the_catalog(predictions):
    # the catalog holds the calibrated value: the calibration row is predicted to within 1%
    for p in predictions:
        dep = p.deployment
        if dep.role != "calibration":
            continue
        assert p.ratio == pytest.approx(1.0, rel=0.01), dep.id
        fig = get_device(dep.device).figure(dep.calibrates)
        assert fig.calibrated and fig.uncertain and fig.source, dep.id


def test_calibrated_figures_cite_the_result_they_were_fitted_to():
    rows = {d.device: d for d in load_deployments(DATA) if d.role == "calibration"}
    for device, dep in rows.items():
        fig = get_device(device).figure(dep.calibrates)
        host = dep.source.split(" ")[0].split("//")[-1].split("/")[0]
        assert host in fig.source, (device, fig.source)


def test_the_docs_table_is_current(predictions):
    if not DOC.exists():
        pytest.skip("docs not present")
    text = DOC.read_text(encoding="utf-8")
    start, end = text.index(SECTION_START), text.index(SECTION_END) + len(SECTION_END)
    assert text[start:end] + "\n" == format_validation_markdown(predictions), \
        "regenerate: python bench/validate.py --markdown docs/validation.md"


def test_the_wafer_prediction_the_issue_reported_is_now_in_band():
    # Llama 3.1 8B on one CS-3 at 16 bits: 1,204,421 tokens/s before the per-layer term (the wafer
    # read its 16 GB at 21 PB/s and nothing else was charged); Cerebras publishes 1,800
    dep = next(d for d in load_deployments(DATA) if d.id == "cerebras-wse3-llama-3.1-8b")
    assert 900 <= predict(dep).tokens_per_s <= 3600
    # without the per-layer latency the wafer's time needs a figure it lacks, and says which
    wse3 = dataclasses.replace(get_device("cerebras-wse3"), layer_latency_s=None,
                               figures=tuple((k, f) for k, f in get_device("cerebras-wse3").figures
                                             if k != "layer_latency"))
    got = predict(dep, wse3)
    assert got.tokens_per_s is None and got.missing == ("cerebras-wse3 kernel_overhead",)


def test_a_bracket_reports_the_range_of_one_missing_figure(predictions):
    p = next(p for p in predictions if p.deployment.bracket is not None)
    (name, key), (lo, hi) = p.deployment.expect_missing[0].split(" "), p.deployment.bracket
    # the ends are the predictions with the figure set to each end of the bracket
    low = predict(dataclasses.replace(p.deployment, expect_missing=(), bracket=None),
                  with_figure(get_device(name), key, lo)).tokens_per_s
    assert p.bracketed[0] == pytest.approx(low) and p.bracketed[0] > p.bracketed[1]


ROW = """
[[deployment]]
id = "{id}"
device = "cerebras-wse3"
family = "Cerebras"
model = "llama-3.1-8b"
precision = "16-bit"
batch = 1
seq = 2048
published_tokens_per_s = 1800
source = "https://example.org"
date = "2024"
role = "{role}"
calibrates = "layer_latency"
"""


def test_bad_rows_are_config_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(ROW.format(id="a", role="guess"), encoding="utf-8")
    with pytest.raises(ConfigError, match="role"):
        load_deployments(bad)
    twice = tmp_path / "twice.toml"
    twice.write_text(ROW.format(id="a", role="calibration") + ROW.format(id="b", role="calibration"),
                     encoding="utf-8")
    with pytest.raises(ConfigError, match="one calibration row per device"):
        load_deployments(twice)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text(ROW.format(id="a", role="calibration") + 'guessed = 1\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="unknown keys"):
        load_deployments(unknown)
