"""The HTML report: self-contained (no network), with the plan table, charts, comparison and sources."""

import base64
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from cachefit.cost import compare_layouts, estimate_cost
from cachefit.hardware import get_device, make_cluster
from cachefit.plan.search import plan_partition
from cachefit.profile import profile_model
from cachefit.report.html import write_report
from cachefit.report.tables import stage_groups
from cachefit.errors import ConfigError

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, int] = {}
        self._table: str | None = None
        self.images: list[str] = []
        self.scripts = 0
        self.links: list[tuple[str, str]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("id", "")
            self.tables[self._table] = 0
        elif tag == "tr" and self._table is not None:
            self.tables[self._table] += 1
        elif tag == "img":
            self.images.append(a.get("src", ""))
        elif tag == "script":
            self.scripts += 1
        for key in ("src", "href"):
            if key in a:
                self.links.append((tag, a[key]))

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    h100 = make_cluster(get_device("h100"))
    profile = profile_model("gpt2")
    plan, _ = plan_partition(profile, h100)
    comparison = compare_layouts(profile, h100, plan.cards)
    out = tmp_path_factory.mktemp("report")
    index = write_report(plan, profile, h100, out, comparison)
    return plan, index


def test_report_is_self_contained_and_holds_every_section(report):
    plan, index = report
    assert index.name == "index.html" and index.exists()
    parser = _Collector()
    parser.feed(index.read_text(encoding="utf-8"))
    # the plan table: a header row plus one row per stage group
    assert parser.tables["plan-table"] == 1 + len(stage_groups(plan))
    assert parser.tables["comparison-table"] == 1 + 4
    assert parser.tables["sources-table"] > 1 and "workload-table" in parser.tables
    # two charts, embedded as PNG data URIs that decode to PNG files
    assert len(parser.images) == 2
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    # nothing is fetched: no scripts, no external src / stylesheet (links to sources are <a> only)
    assert parser.scripts == 0
    assert all(tag == "a" or value.startswith("data:") for tag, value in parser.links)
    text = " ".join(parser.text)
    assert "cachefit report: gpt2" in text
    # device sources with dates
    h100 = get_device("h100")
    assert h100.level().as_of in text


def test_report_into_an_unwritable_place_is_a_config_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    h100 = make_cluster(get_device("h100"))
    profile = profile_model("gpt2")
    plan, _ = plan_partition(profile, h100)
    with pytest.raises(ConfigError, match="cannot create"):
        write_report(plan, profile, h100, blocker / "sub")


def test_report_of_an_impossible_plan_says_so(tmp_path):
    groq = make_cluster(get_device("groq-lpu"))
    profile = profile_model("paper-16l")
    from cachefit.cost import uniform_layers_plan

    plan = uniform_layers_plan(profile, groq, 4)
    cost = estimate_cost(plan, profile, groq)
    assert not cost.possible and cost.throughput_tokens_per_s is None
    page = write_report(plan, profile, groq, tmp_path, cost=cost).read_text(encoding="utf-8")
    assert "DOES NOT FIT" in page and "cannot run" in page


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (Debian package `chromium`)")
def test_report_renders_in_headless_chromium_without_console_errors(report, tmp_path):
    _, index = report
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
        "--dump-dom", Path(index).resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'id="plan-table"' in proc.stdout and 'id="comparison-table"' in proc.stdout
    assert "Uncaught" not in proc.stderr and "ERROR:CONSOLE" not in proc.stderr
    shot = tmp_path / "shot.png"
    proc = subprocess.run(cmd[:-2] + [f"--screenshot={shot}", "--window-size=1280,2000", Path(index).resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.exists() and shot.stat().st_size > 10_000
