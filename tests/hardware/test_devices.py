"""Tests of the device catalog, device / cluster files, cards and clusters."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from cachefit.errors import ConfigError
from cachefit.hardware import (
    Card,
    Cluster,
    DeviceSpec,
    Figure,
    MemoryLevel,
    cluster_to_dict,
    device_from_capacity,
    device_to_dict,
    format_catalog_markdown,
    get_device,
    list_devices,
    load_device_file,
    make_cluster,
    parse_bandwidth,
    parse_device,
    parse_flops,
    resolve_cluster,
    resolve_device,
)

MiB = 2**20


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------
# The catalog


def test_catalog_has_the_required_devices():
    names = {d.name for d in list_devices()}
    required = {
        "a100", "h100", "h200", "b200", "mi300x", "groq-lpu", "cerebras-wse3", "graphcore-ipu-mk2",
        "tenstorrent-wormhole-n150", "tenstorrent-wormhole-n300", "tpu-v4", "tpu-v5e",
        "tenstorrent-blackhole-p150a", "sambanova-sn40l", "d-matrix-corsair",
    }  # fmt: skip
    assert required <= names
    assert len(names) == len(list_devices())


def test_every_catalog_figure_has_a_source_and_a_date():
    checked = 0
    for dev in list_devices():
        for key, fig in dev.iter_figures():
            assert fig.source.strip(), (dev.name, key)
            assert fig.as_of.strip(), (dev.name, key)
            if fig.value is None:
                assert fig.note.strip(), f"{dev.name} {key}: an unknown figure should say why"
            checked += 1
        # every number the device carries has its provenance recorded
        for key, field in (
            ("offchip_capacity", dev.offchip_capacity_bytes),
            ("offchip_bandwidth", dev.offchip_bandwidth_bytes_per_s),
            ("link_bandwidth", dev.link_bandwidth_bytes_per_s),
        ):
            if field is not None:
                assert dev.figure(key) is not None and dev.figure(key).value == field, (dev.name, key)
        for dtype, value in dev.peak_flops_per_s:
            assert dev.figure(f"peak_flops.{dtype}").value == value
        assert any(s.startswith("http") for s in dev.sources), dev.name
        assert dev.as_of
    assert checked > 100


@pytest.mark.parametrize(
    "name, level, expected_bytes, uncertain",
    [
        ("a100", "l2", 40 * MiB, False),  # 41,943,040 B as CUDA deviceQuery reports it
        ("h100", "l2", 50 * MiB, False),  # 52,428,800 B: cudaDeviceProp.l2CacheSize, not 50,000,000
        ("h200", "l2", 60 * MiB, True),  # driver-reported, absent from NVIDIA datasheets
        ("b200", "l2", 132_644_864, False),  # 126.5 MiB
        ("mi300x", "infinity_cache", 256 * MiB, False),
        ("mi300x", "l2", 8 * 4 * MiB, False),  # 4 MiB per XCD x 8
        ("mi300x", "lds", 304 * 64 * 1024, False),
        ("h100", "smem", 132 * 228 * 1024, False),
        ("groq-lpu", "sram", 220 * MiB, False),  # ISCA 2022: 220 MiB = 230,686,720 B
        ("cerebras-wse3", "sram", 44_000_000_000, False),
        ("cerebras-wse2", "sram", 40_000_000_000, False),
        ("graphcore-ipu-mk2", "sram", 900_000_000, True),
        ("tenstorrent-wormhole-n150", "sram", 72 * 1_499_136, False),  # 107,937,792 B
        ("tenstorrent-wormhole-n300", "sram", 128 * 1_499_136, False),  # 191,889,408 B
        ("tenstorrent-blackhole-p150a", "sram", 120 * 1_500_000, True),
        ("tpu-v4", "cmem", 128 * MiB, True),
        ("tpu-v4", "vmem", 2 * 32 * MiB, True),
        ("tpu-v5e", "vmem", 128 * MiB, False),
        ("sambanova-sn40l", "sram", 520_000_000, False),
        ("d-matrix-corsair", "sram", 2_000_000_000, True),  # a vendor press figure, no datasheet
    ],
)
def test_catalog_capacities_are_exact(name, level, expected_bytes, uncertain):
    dev = get_device(name)
    assert dev.capacity_bytes(level) == expected_bytes
    assert dev.level(level).uncertain is uncertain


def test_decided_values_in_bytes():
    assert get_device("h100").capacity_bytes() == 52_428_800
    assert get_device("groq").capacity_bytes() == 230_686_720
    assert get_device("a100").capacity_bytes() == 41_943_040
    assert get_device("n150").capacity_bytes() == 107_937_792


@pytest.mark.parametrize(
    "name, level",
    [
        ("a100", "l2"), ("h100", "l2"), ("h200", "l2"), ("b200", "l2"), ("mi300x", "infinity_cache"),
        ("groq-lpu", "sram"), ("cerebras-wse3", "sram"), ("tpu-v4", "cmem"), ("tpu-v5e", "vmem"),
        ("tenstorrent-wormhole-n150", "sram"),
    ],
)  # fmt: skip
def test_default_level_is_the_shared_on_chip_level(name, level):
    dev = get_device(name)
    assert dev.default_level == level
    assert dev.level().scope == "chip" or dev.vendor == "Tenstorrent"


@pytest.mark.parametrize("name", ["a100", "h100", "h200"])
def test_gpu_l2_notes_carry_the_full_bandwidth_caveat(name):
    assert "full bandwidth" in get_device(name).level("l2").note


def test_uncertain_marks_follow_the_sources():
    assert get_device("mi300x").figure("peak_flops.int8").uncertain
    assert get_device("mi300x").figure("link_bandwidth").uncertain
    assert get_device("h100").level("l2").bandwidth_figure.uncertain  # measured on the PCIe card
    assert get_device("d-matrix-corsair").level().bandwidth_figure.uncertain
    assert get_device("tpu-v5e").figure("link_bandwidth").uncertain
    assert not get_device("h100").figure("offchip_bandwidth").uncertain


def test_unknown_figures_stay_none():
    groq = get_device("groq-lpu")
    assert groq.offchip_capacity_bytes is None and groq.offchip_bandwidth_bytes_per_s is None
    b200 = get_device("b200")
    assert b200.level("l2").bandwidth_bytes_per_s is None
    assert b200.level("l2").bandwidth_figure.note  # "not published"
    wse3 = get_device("wse3")
    assert wse3.hop_latency_s is None
    assert wse3.figure("hop_latency").value is None and wse3.figure("hop_latency").note  # looked for: not published
    # a derived dense peak (cores x SIMD x a sibling's clock), flagged; the vendor's figure counts sparsity
    fp16 = wse3.figure("peak_flops.fp16")
    assert wse3.peak_flops("fp16") == fp16.value == 900_000 * 16 * 850e6 and fp16.uncertain and "derived" in fp16.note


def test_peak_flops_are_dense_and_accept_dtype_aliases():
    h100 = get_device("h100")
    assert h100.peak_flops("fp16") == 989e12  # the datasheet's 1,979 is with sparsity
    assert h100.peak_flops("bfloat16") == 989e12
    assert h100.peak_flops("torch.float16") == 989e12
    assert h100.peak_flops("int8") == 1979e12
    assert get_device("a100").peak_flops("fp8") is None
    with pytest.raises(ConfigError, match="unknown dtype"):
        h100.peak_flops("fp7")


@pytest.mark.parametrize("alias", ["h100", "H100", " H100 ", "h100-sxm", "H100_SXM5", "NVIDIA H100 80GB HBM3"])
def test_aliases_are_case_insensitive(alias):
    assert get_device(alias).name == "h100"


def test_unknown_device_suggests_and_lists():
    with pytest.raises(ConfigError) as info:
        get_device("h10")
    msg = str(info.value)
    assert "did you mean" in msg and "'h100'" in msg
    assert "groq-lpu" in msg and "mi300x" in msg  # the list of known devices


def test_unknown_level_lists_the_levels():
    with pytest.raises(ConfigError) as info:
        get_device("h100").level("l3")
    assert "registers, smem, l2" in str(info.value)
    assert get_device("h100").level("L2").name == "l2"


def test_catalog_round_trips_through_json():
    for dev in list_devices():
        data = json.loads(json.dumps(device_to_dict(dev)))
        assert parse_device(data) == dev
        assert data["default_capacity_bytes"] == dev.capacity_bytes()


def test_docs_table_is_current():
    doc = Path(__file__).resolve().parents[2] / "docs" / "hardware.md"
    if not doc.exists():
        pytest.skip("docs not present (installed package)")
    text = doc.read_text(encoding="utf-8")
    start, end = "<!-- catalog:start -->\n", "<!-- catalog:end -->"
    generated = text[text.index(start) + len(start) : text.index(end)]
    assert generated == format_catalog_markdown(), "regenerate docs/hardware.md with format_catalog_markdown()"


def test_importing_hardware_does_not_import_torch():
    code = "import sys, cachefit.hardware; cachefit.hardware.list_devices(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------------------------------
# Rates


@pytest.mark.parametrize(
    "text, expected",
    [
        ("7.0TB/s", 7.0e12),
        ("900 GB/s", 900e9),
        ("48KiB/s", 48 * 1024),
        ("2.039TB/s", 2.039e12),
        ("1e9", 1e9),
        (5e11, 5e11),
        ("20PB/s", 20e15),
    ],
)
def test_parse_bandwidth(text, expected):
    assert parse_bandwidth(text) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("bad", ["7TB", "fast", "0GB/s", "-1TB/s", "3XB/s", True, float("inf")])
def test_parse_bandwidth_rejects(bad):
    with pytest.raises(ConfigError, match="link_bandwidth"):
        parse_bandwidth(bad, what="link_bandwidth")


def test_parse_bandwidth_refuses_bits():
    with pytest.raises(ConfigError, match="bits per second") as info:
        parse_bandwidth("1.2Tb/s")
    assert "0.15TB/s" in str(info.value)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("989TFLOPS", 989e12),
        ("989 TFLOP/s", 989e12),
        ("750 TOPS", 750e12),
        ("2.25e15", 2.25e15),
        ("1.3P", 1.3e15),
        (312e12, 312e12),
    ],
)
def test_parse_flops(text, expected):
    assert parse_flops(text) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("bad", ["lots", "989 TB/s", "0", "-3TFLOPS"])
def test_parse_flops_rejects(bad):
    with pytest.raises(ConfigError):
        parse_flops(bad)


# ------------------------------------------------------------------------------------------------
# Device files

DEVICE_TOML = """
name = "edge-npu"
full_name = "An edge NPU"
vendor = "Acme"
default_level = "sram"
offchip_capacity = "8GiB"
offchip_bandwidth = "100GB/s"
link_bandwidth = { value = "50GB/s", source = "datasheet rev 3", as_of = "2026-10", uncertain = true }
source = "Acme datasheet rev 3"
as_of = "2026-10-01"

[[levels]]
name = "l1"
scope = "per_core"
count = 16
capacity = "256KiB"

[[levels]]
name = "sram"
capacity = "48MB"
bandwidth = "10TB/s"

[peak_flops]
fp16 = "20TFLOPS"
int8 = { value = "80TOPS", source = "press release", as_of = "2026-09" }
"""


def test_toml_device_file(tmp_path):
    dev = load_device_file(write(tmp_path / "npu.toml", DEVICE_TOML))
    assert isinstance(dev, DeviceSpec)
    assert dev.name == "edge-npu" and dev.vendor == "Acme"
    assert dev.capacity_bytes() == 48_000_000
    assert dev.capacity_bytes("l1") == 16 * 256 * 1024
    assert dev.level("sram").bandwidth_bytes_per_s == 10e12
    assert dev.offchip_capacity_bytes == 8 * 2**30
    assert dev.link_bandwidth_bytes_per_s == 50e9
    assert dev.figure("link_bandwidth").uncertain and dev.figure("link_bandwidth").source == "datasheet rev 3"
    assert dev.figure("offchip_capacity").source == "Acme datasheet rev 3"  # the file's default source
    assert dev.peak_flops("fp16") == 20e12 and dev.figure("peak_flops.int8").source == "press release"
    assert dev.level("sram").as_of == "2026-10-01"


def test_yaml_and_json_device_files_match_toml(tmp_path):
    yaml_text = """
name: edge-npu
full_name: An edge NPU
vendor: Acme
default_level: sram
offchip_capacity: 8GiB
offchip_bandwidth: 100GB/s
link_bandwidth: {value: 50GB/s, source: datasheet rev 3, as_of: "2026-10", uncertain: true}
source: Acme datasheet rev 3
as_of: "2026-10-01"
levels:
  - {name: l1, scope: per_core, count: 16, capacity: 256KiB}
  - {name: sram, capacity: 48MB, bandwidth: 10TB/s}
peak_flops:
  fp16: 20TFLOPS
  int8: {value: 80TOPS, source: press release, as_of: "2026-09"}
"""
    from_toml = load_device_file(write(tmp_path / "a.toml", DEVICE_TOML))
    from_yaml = load_device_file(write(tmp_path / "a.yaml", yaml_text))
    from_json = load_device_file(write(tmp_path / "a.json", json.dumps(device_to_dict(from_toml))))
    # provenance defaults name the file, so compare everything but the default source
    assert from_yaml.capacity_bytes() == from_toml.capacity_bytes()
    assert from_yaml.levels[0].total_bytes == from_toml.levels[0].total_bytes
    assert dict(from_yaml.peak_flops_per_s) == dict(from_toml.peak_flops_per_s)
    assert from_yaml.link_bandwidth_bytes_per_s == from_toml.link_bandwidth_bytes_per_s
    assert from_json == from_toml


def test_base_inheritance(tmp_path):
    text = """
name = "h100-40mib"
base = "h100"
[[levels]]
name = "l2"
capacity = "40MiB"
"""
    dev = load_device_file(write(tmp_path / "h.toml", text))
    h100 = get_device("h100")
    assert dev.capacity_bytes() == 40 * MiB
    assert dev.default_level == "l2"
    assert [lvl.name for lvl in dev.levels] == ["registers", "smem", "l2"]
    assert dev.level("smem") == h100.level("smem")
    assert dev.level("l2").bandwidth_bytes_per_s == h100.level("l2").bandwidth_bytes_per_s
    assert dev.peak_flops("fp16") == h100.peak_flops("fp16")
    assert dev.offchip_capacity_bytes == h100.offchip_capacity_bytes
    assert dev.figure("offchip_capacity") == h100.figure("offchip_capacity")
    assert "h.toml" in dev.level("l2").source  # the new figure's provenance is the file


def test_base_from_a_relative_file_and_new_level(tmp_path):
    write(tmp_path / "parent.yaml", "name: parent\nlevels:\n  - {name: sram, capacity: 100MB}\n")
    (tmp_path / "sub").mkdir()
    child = write(
        tmp_path / "sub" / "child.toml",
        'name = "child"\nbase = "../parent.yaml"\ndefault_level = "big"\n[[levels]]\nname = "big"\ncapacity = "1GB"\n',
    )
    dev = load_device_file(child)
    assert [lvl.name for lvl in dev.levels] == ["sram", "big"]
    assert dev.capacity_bytes() == 10**9 and dev.capacity_bytes("sram") == 10**8


def test_base_that_includes_itself_is_refused(tmp_path):
    path = write(tmp_path / "loop.toml", 'name = "loop"\nbase = "loop.toml"\n')
    with pytest.raises(ConfigError, match="includes itself"):
        load_device_file(path)


def test_probe_json_is_a_device_file(tmp_path):
    probe = {
        "device": "NVIDIA H100 80GB HBM3",
        "levels": [
            {"name": "l1", "capacity_bytes": 233472, "bandwidth_bytes_per_s": None, "scope": "per_sm", "count": 132},
            {"name": "l2", "capacity_bytes": 52428800, "bandwidth_bytes_per_s": 6.9e12, "method": "pointer chase"},
        ],
        "torch_version": "2.11",
    }
    dev = load_device_file(write(tmp_path / "probe.json", json.dumps(probe)))
    assert dev.name == "NVIDIA H100 80GB HBM3"
    assert dev.default_level == "l2"  # the last chip-wide level
    assert dev.capacity_bytes() == 52_428_800
    assert dev.level("l2").bandwidth_bytes_per_s == 6.9e12
    assert dev.level("l1").total_bytes == 132 * 233472
    assert resolve_device(str(tmp_path / "probe.json")) == dev


def test_default_level_without_hint_is_the_last_chip_wide_level():
    dev = parse_device(
        {"name": "cpu", "levels": [{"name": "l1", "capacity": "48KiB"}, {"name": "l3", "capacity": "32MiB"}]}
    )
    assert dev.default_level == "l3"


# ------------------------------------------------------------------------------------------------
# Clusters


CLUSTER_TOML = """
name = "mixed"
headroom = 0.1
reserved = "1MiB"

[[cards]]
device = "h100"
count = 2

[[cards]]
device = "a100"
headroom = 0.0
reserved = 0

[[cards]]
device = "npu.toml"
level = "l1"

[[cards]]
device = { name = "sram-card", levels = [{ name = "sram", capacity = "230MB" }] }
reserved = "10MB"
"""


def test_heterogeneous_cluster_file(tmp_path):
    write(tmp_path / "npu.toml", DEVICE_TOML)
    cluster = load_device_file(write(tmp_path / "cluster.toml", CLUSTER_TOML))
    assert isinstance(cluster, Cluster) and cluster.name == "mixed"
    assert len(cluster) == 5
    assert [c.device.name for c in cluster] == ["h100", "h100", "a100", "edge-npu", "sram-card"]
    assert [c.level_name for c in cluster] == ["l2", "l2", "l2", "l1", "sram"]
    h100_cap = math.floor(52_428_800 * 0.9) - MiB  # 47,185,920 - 1,048,576 = 46,137,344
    npu_cap = math.floor(16 * 256 * 1024 * 0.9) - MiB  # 3,774,873 - 1,048,576 = 2,726,297
    sram_cap = math.floor(230_000_000 * 0.9) - 10_000_000  # 207,000,000 - 10,000,000
    assert cluster.capacities() == (46_137_344, 46_137_344, 41_943_040, npu_cap, sram_cap)
    assert h100_cap == 46_137_344 and npu_cap == 2_726_297
    assert not cluster.is_homogeneous
    assert [d.name for d in cluster.devices] == ["h100", "a100", "edge-npu", "sram-card"]
    assert "cards 0-1: h100:l2" in cluster.describe()
    data = json.loads(json.dumps(cluster_to_dict(cluster)))
    assert [c["capacity_bytes"] for c in data["cards"]] == list(cluster.capacities())


def test_yaml_cluster_file(tmp_path):
    text = """
cards:
  - {device: groq, count: 3, headroom: 0.25}
  - device: n150
"""
    cluster = load_device_file(write(tmp_path / "c.yml", text))
    assert cluster.capacities() == (3 * 220 * MiB // 4,) * 3 + (107_937_792,)
    assert resolve_cluster(str(tmp_path / "c.yml")) == cluster
    with pytest.raises(ConfigError, match="has 4 cards but 2"):
        resolve_cluster(str(tmp_path / "c.yml"), count=2)
    with pytest.raises(ConfigError, match="is a cluster file"):
        resolve_device(str(tmp_path / "c.yml"))


def test_card_arithmetic():
    h100 = get_device("h100")
    card = Card(device=h100, headroom=0.1, reserved_bytes=1_000_000)
    assert card.total_bytes == 52_428_800
    assert card.capacity_bytes == 47_185_920 - 1_000_000
    # decimal headroom is exact: floor(1000 x 0.93) = 930, where binary floats give 929.999...
    tiny = device_from_capacity(1000, level="sram")
    assert math.floor(1000 * (1 - 0.07)) == 929
    assert Card(device=tiny, headroom=0.07).capacity_bytes == 930
    assert Card(device=get_device("h100"), headroom=0.9).capacity_bytes == 5_242_880
    assert Card(device=h100, level="smem").capacity_bytes == 132 * 228 * 1024


@given(
    total=st.integers(min_value=1, max_value=10**12),
    headroom=st.floats(min_value=0, max_value=0.99, allow_nan=False),
    reserved=st.integers(min_value=0, max_value=10**6),
)
def test_card_capacity_formula(total, headroom, reserved):
    dev = device_from_capacity(total)
    expected = math.floor(total * (1 - Fraction(repr(headroom)))) - reserved
    if expected <= 0:
        with pytest.raises(ConfigError, match="nothing left"):
            Card(device=dev, headroom=headroom, reserved_bytes=reserved)
        return
    card = Card(device=dev, headroom=headroom, reserved_bytes=reserved)
    assert card.capacity_bytes == expected
    assert 0 < card.capacity_bytes <= total
    # more headroom never offers more bytes
    if headroom + 0.005 < 1:
        more = math.floor(total * (1 - Fraction(repr(headroom + 0.005)))) - reserved
        assert more <= card.capacity_bytes


def test_make_cluster():
    h100, a100 = get_device("h100"), get_device("a100")
    four = make_cluster(h100, count=4, headroom=0.1, reserved_bytes=MiB)
    assert len(four) == 4 and four.is_homogeneous
    assert four.capacities() == (46_137_344,) * 4
    assert make_cluster(h100).capacities() == (52_428_800,)
    mixed = make_cluster([h100, a100, h100])
    assert mixed.capacities() == (52_428_800, 41_943_040, 52_428_800)
    assert four[0] == four[3]
    with pytest.raises(ConfigError, match="count applies to a single device"):
        make_cluster([h100, a100], count=4)
    with pytest.raises(ConfigError, match="positive integer"):
        make_cluster(h100, count=0)
    with pytest.raises(ConfigError, match="no memory level 'sram'.*registers, smem, l2"):
        make_cluster([h100], level="sram")
    assert resolve_cluster("h100", count=2, headroom=0.5).capacities() == (26_214_400,) * 2


def test_device_from_capacity():
    dev = device_from_capacity("50MB")
    assert dev.name == "custom" and dev.default_level == "sram" and dev.capacity_bytes() == 50_000_000
    half = device_from_capacity("25MB", level="l2", base=get_device("h100"))
    assert half.name == "h100-custom" and half.capacity_bytes() == 25_000_000
    assert half.level("l2").bandwidth_bytes_per_s == 7.0e12  # kept from the base
    assert half.peak_flops("fp16") == 989e12 and half.capacity_bytes("smem") == 132 * 228 * 1024
    added = device_from_capacity("8MiB", level="scratch", bandwidth="1TB/s", base=get_device("a100"), name="a")
    assert added.name == "a" and added.default_level == "scratch" and added.levels[-1].bandwidth_bytes_per_s == 1e12
    assert parse_device(device_to_dict(half)) == half


# ------------------------------------------------------------------------------------------------
# Bad input: a ConfigError naming the file and the field


@pytest.mark.parametrize(
    "text, field",
    [
        ('name = "x"\n[[levels]]\nname = "sram"\n', "missing capacity"),
        ('name = "x"\n[[levels]]\nname = "sram"\ncapacity = 0\n', "capacity"),
        ('name = "x"\n[[levels]]\nname = "sram"\ncapacity = "-5MB"\n', "capacity"),
        ('name = "x"\n[[levels]]\nname = "sram"\ncapacity = "50XB"\n', "unknown unit"),
        ('name = "x"\n[[levels]]\nname = "sram"\ncapacity = "5MB"\nbandwidth = "1.2Tb/s"\n', "bits per second"),
        ('name = "x"\n[[levels]]\nname = "sram"\ncapacity = "5MB"\nbandwidth = "9QB/s"\n', "bandwidth"),
        ('name = "x"\ndefault_level = "l2"\n[[levels]]\nname = "sram"\ncapacity = "5MB"\n', "default_level"),
        ('name = "x"\n[[levels]]\nname = "sram"\ncapacty = "5MB"\n', "did you mean 'capacity'"),
        ('name = "x"\n[[levels]]\nname = "sram"\ncapacity = "5MB"\nscope = "chip"\ncount = 4\n', "count"),
        ('name = "x"\noffchip_capacity = "lots"\n[[levels]]\nname = "sram"\ncapacity = "5MB"\n', "offchip_capacity"),
        ('name = "x"\n[[levels]]\nname = "sram"\ncapacity = "5MB"\n[peak_flops]\nfp7 = 1e12\n', "peak_flops"),
        ('[[levels]]\nname = "sram"\ncapacity = "5MB"\n', "missing name"),
        ('name = "x"\n', "no levels"),
        ('name = "x"\nbase = "h1000"\n', "did you mean 'h100'"),
        ('name = "x"\n[[levels]]\nname = "sram"\ncapacity = "5MB"\n[[levels]]\nname = "SRAM"\ncapacity = "6MB"\n',
         "repeat"),
    ],
)
def test_bad_device_files(tmp_path, text, field):
    path = write(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError) as info:
        load_device_file(path)
    msg = str(info.value)
    assert "bad.toml" in msg
    assert field in msg


@pytest.mark.parametrize(
    "cards, field",
    [
        ('[[cards]]\ndevice = "h100"\nheadroom = 1.0\n', "headroom"),
        ('[[cards]]\ndevice = "h100"\nheadroom = -0.1\n', "headroom"),
        ('[[cards]]\ndevice = "h100"\nlevel = "l3"\n', "no memory level 'l3'"),
        ('[[cards]]\ndevice = "h100"\nreserved = "60MiB"\n', "nothing left"),
        ('[[cards]]\ndevice = "h100"\ncount = 0\n', "count"),
        ('[[cards]]\nlevel = "l2"\n', "missing device"),
        ('[[cards]]\ndevice = "nope.toml"\n', "not found"),
        ("cards = []\n", "non-empty"),
    ],
)
def test_bad_cluster_files(tmp_path, cards, field):
    path = write(tmp_path / "cl.toml", cards)
    with pytest.raises(ConfigError) as info:
        load_device_file(path)
    assert "cl.toml" in str(info.value)
    assert field in str(info.value)


@pytest.mark.parametrize(
    "name, text",
    [
        ("broken.toml", 'name = "x\n'),
        ("broken.yaml", "name: [x\n"),
        ("broken.json", '{"device": "x", '),
        ("list.yaml", "- a\n- b\n"),
        ("device.ini", "name = x\n"),
    ],
)
def test_unparseable_files(tmp_path, name, text):
    with pytest.raises(ConfigError) as info:
        load_device_file(write(tmp_path / name, text))
    assert name in str(info.value)


def test_missing_file_and_unknown_spec(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_device_file(tmp_path / "nothing.toml")
    with pytest.raises(ConfigError, match="not found"):
        resolve_device(str(tmp_path / "nothing.yaml"))
    with pytest.raises(ConfigError, match="unknown device 'tpu-v9'"):
        resolve_device("tpu-v9")
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_cluster("tpu-v9")


def test_headroom_in_code_is_checked():
    for bad in (1.0, -0.01, float("nan"), True, "0.1"):
        with pytest.raises(ConfigError, match="headroom"):
            make_cluster(get_device("h100"), headroom=bad)
    with pytest.raises(ConfigError, match="reserved_bytes"):
        Card(device=get_device("h100"), reserved_bytes=-1)


def test_value_types_validate():
    with pytest.raises(ConfigError, match="source"):
        Figure(value=1, source="")
    with pytest.raises(ConfigError, match="capacity_bytes"):
        MemoryLevel(name="l2", capacity_bytes=0, source="x")
    with pytest.raises(ConfigError, match="name"):
        MemoryLevel(name="L 2", capacity_bytes=1, source="x")
    with pytest.raises(ConfigError, match="default_level"):
        DeviceSpec(name="d", levels=(MemoryLevel(name="l2", capacity_bytes=1, source="x"),), default_level="sram")
    with pytest.raises(ConfigError, match="figures"):
        DeviceSpec(
            name="d",
            levels=(MemoryLevel(name="l2", capacity_bytes=1, source="x"),),
            default_level="l2",
            offchip_capacity_bytes=10,
            figures=(("offchip_capacity", Figure(value=11, source="x")),),
        )
    with pytest.raises(ConfigError, match="device_from_capacity|capacity"):
        device_from_capacity("0MB")


def test_docs_examples_load(tmp_path):
    doc = Path(__file__).resolve().parents[2] / "docs" / "hardware.md"
    if not doc.exists():
        pytest.skip("docs not present (installed package)")
    text = doc.read_text(encoding="utf-8")
    blocks = {}
    for lang in ("toml", "yaml", "json"):
        start = text.index(f"```{lang}\n") + len(lang) + 4
        blocks[lang] = text[start : text.index("```", start)]
    device = load_device_file(write(tmp_path / "dev.toml", blocks["toml"]))
    assert device.capacity_bytes() == 40 * MiB and device.peak_flops("int8") == 1979e12
    assert device.kernel_overhead_s == 2.4e-6
    probe = load_device_file(write(tmp_path / "probe.json", blocks["json"]))
    assert probe.capacity_bytes() == 52_428_800
    assert probe.kernel_overhead_s == 4.6e-6
    cluster = load_device_file(write(tmp_path / "cluster.yaml", blocks["yaml"]))
    # h100 x2 at 5% headroom and 1 MiB reserved; a100 at 10%; an inline 230 MB SRAM card at 5%
    assert cluster.capacities() == (
        math.floor(52_428_800 * 0.95) - MiB,
        math.floor(52_428_800 * 0.95) - MiB,
        math.floor(41_943_040 * 0.9) - MiB,
        math.floor(230_000_000 * 0.95) - MiB,
    )


def test_overriding_a_base_level_keeps_only_what_still_holds(tmp_path):
    text = 'name = "h"\nbase = "h100"\n[[levels]]\nname = "l2"\ncapacity = "25MB"\n'
    l2 = load_device_file(write(tmp_path / "h.toml", text)).level("l2")
    base_l2 = get_device("h100").level("l2")
    assert "52,428,800" in l2.note and "full bandwidth" not in l2.note  # the base's caveats were about 50 MiB
    assert l2.bandwidth_figure.value == base_l2.bandwidth_bytes_per_s
    assert l2.bandwidth_figure.source == base_l2.bandwidth_figure.source  # still attributed to its source
    assert l2.bandwidth_figure.uncertain == base_l2.bandwidth_figure.uncertain


def test_a_new_bandwidth_on_a_base_level_is_attributed_to_the_file(tmp_path):
    text = 'name = "h"\nbase = "h100"\n[[levels]]\nname = "l2"\nbandwidth = "6TB/s"\n'
    l2 = load_device_file(write(tmp_path / "h.toml", text)).level("l2")
    assert l2.total_bytes == 52_428_800 and l2.source == get_device("h100").level("l2").source
    assert l2.bandwidth_bytes_per_s == 6e12 and "h.toml" in l2.bandwidth_figure.source


# ------------------------------------------------------------------------------------------------
# The per-kernel overhead figure


@pytest.mark.parametrize(
    "text, expected",
    [("2.4us", 2.4e-6), ("2.4 µs", 2.4e-6), ("2.4μs", 2.4e-6), ("0.005ms", 5e-6), ("3e-6 s", 3e-6),
     ("1500ns", 1.5e-6), (5e-6, 5e-6), ("2.5us", 2.5e-6)],
)
def test_parse_duration(text, expected):
    from cachefit.sizes import parse_duration

    assert parse_duration(text) == expected  # exact: 2.5 / 1e6, not 2.5 * 1e-6


@pytest.mark.parametrize("bad", ["", "fast", "2 min", "-1us", "0us", 0, True, "1e400s"])
def test_parse_duration_rejects(bad):
    from cachefit.sizes import parse_duration

    with pytest.raises(ConfigError):
        parse_duration(bad, what="kernel_overhead")


def test_catalog_kernel_overheads_carry_their_source():
    # The catalog's source (RRZE gpu-benches gpu-small-kernels): T = a + V/b fitted; a = 2.4 us (H200), 2.5 us
    # (A100 80GB) per kernel on one stream. The H100 was not measured there: the H200's figure, flagged.
    # The Tenstorrent cards' figure is calibrated on one published tt-metal result (docs/validation.md).
    expected = {"a100": 2.5e-6, "h200": 2.4e-6, "h100": 2.4e-6}
    calibrated = {"tenstorrent-wormhole-n150", "tenstorrent-wormhole-n300"}
    for dev in list_devices():
        fig = dev.figure("kernel_overhead")
        if dev.name in calibrated:
            assert fig.calibrated and fig.uncertain and fig.value == dev.kernel_overhead_s and "PERF.md" in fig.source
            continue
        if dev.name not in expected:
            assert dev.kernel_overhead_s is None and fig is None  # never guessed
            continue
        assert dev.kernel_overhead_s == expected[dev.name] == fig.value
        assert "gpu-small-kernels" in fig.source and fig.as_of
        assert fig.uncertain and "CUDA graph" in fig.note and not fig.calibrated
    assert "not measured on an H100" in get_device("h100").figure("kernel_overhead").note
    assert ("kernel_overhead", get_device("h200").figure("kernel_overhead")) in list(get_device("h200").iter_figures())


def test_catalog_fixed_costs_are_sourced_or_marked_calibrated():
    for dev in list_devices():
        for key in ("kernel_overhead", "hop_latency", "layer_latency"):
            fig = dev.figure(key)
            if fig is None or fig.value is None:
                assert getattr(dev, f"{key}_s") is None
                continue
            assert fig.source and fig.as_of and fig.note
            # a figure no specification gives is either derived from a cited measurement or calibrated
            assert fig.calibrated or "derived" in fig.note or "upper bound" in fig.note or "not measured" in fig.note \
                or "gpu-small-kernels" in fig.source, (dev.name, key)
    # the per-layer latencies are calibrated, each on one published result its source names
    for name in ("cerebras-wse3", "groq-lpu"):
        fig = get_device(name).figure("layer_latency")
        assert fig.calibrated and "tokens/s" in fig.source


def test_calibrated_flag_round_trips_through_a_device_file(tmp_path):
    wse3 = get_device("cerebras-wse3")
    again = parse_device(json.loads(json.dumps(wse3.to_dict())))
    assert again.figure("layer_latency").calibrated and again.layer_latency_s == wse3.layer_latency_s
    assert again.hop_latency_s is None and again.figure("hop_latency").value is None


def test_device_files_with_and_without_a_kernel_overhead(tmp_path):
    without = load_device_file(write(tmp_path / "npu.toml", DEVICE_TOML))
    assert without.kernel_overhead_s is None and without.figure("kernel_overhead") is None
    plain = load_device_file(write(tmp_path / "a.toml", DEVICE_TOML.replace(
        'as_of = "2026-10-01"\n', 'as_of = "2026-10-01"\nkernel_overhead = "3us"\n', 1)))
    assert plain.kernel_overhead_s == 3e-6
    assert plain.figure("kernel_overhead").source == "Acme datasheet rev 3"  # the file's default source
    table = load_device_file(write(tmp_path / "b.toml", DEVICE_TOML.replace(
        'as_of = "2026-10-01"\n',
        'as_of = "2026-10-01"\nkernel_overhead = { value = "0.004ms", source = "my timing", as_of = "2026-11", '
        'note = "eager" }\n', 1)))
    assert table.kernel_overhead_s == 4e-6
    assert table.figure("kernel_overhead").source == "my timing" and table.figure("kernel_overhead").note == "eager"
    # the JSON form and the dict round trip, and the key with its unit suffix
    again = parse_device(json.loads(json.dumps(device_to_dict(table))))
    assert again == table
    assert device_to_dict(table)["kernel_overhead_s"] == 4e-6
    data = {"name": "x", "kernel_overhead_s": 2e-6, "levels": [{"name": "sram", "capacity": "1MB"}]}
    assert parse_device(data).kernel_overhead_s == 2e-6


def test_kernel_overhead_inherits_overrides_and_clears_from_a_base(tmp_path):
    child = load_device_file(write(tmp_path / "c.toml", 'name = "my-h200"\nbase = "h200"\n'))
    assert child.kernel_overhead_s == 2.4e-6 and "gpu-small-kernels" in child.figure("kernel_overhead").source
    graphs = load_device_file(write(tmp_path / "g.toml",
                                    'name = "h200-graphs"\nbase = "h200"\nkernel_overhead = "1.2us"\n'
                                    'source = "CUDA graphs"\n'))
    assert graphs.kernel_overhead_s == 1.2e-6 and graphs.figure("kernel_overhead").source == "CUDA graphs"
    cleared = parse_device({"name": "h200-unknown", "base": "h200", "kernel_overhead": None})
    assert cleared.kernel_overhead_s is None and cleared.figure("kernel_overhead") is None


@pytest.mark.parametrize("value", ['"2 minutes"', '"-3us"', "0", "true"])
def test_bad_kernel_overhead_names_the_file_and_the_key(tmp_path, value):
    path = write(tmp_path / "bad.toml", f'name = "x"\nkernel_overhead = {value}\n[[levels]]\nname = "sram"\n'
                                       'capacity = "5MB"\n')
    with pytest.raises(ConfigError) as info:
        load_device_file(path)
    assert "bad.toml" in str(info.value) and "kernel_overhead" in str(info.value)


def test_kernel_overhead_in_code_is_checked():
    lvl = MemoryLevel(name="sram", capacity_bytes=10, source="test")
    with pytest.raises(ConfigError, match="kernel_overhead_s"):
        DeviceSpec(name="x", levels=(lvl,), default_level="sram", kernel_overhead_s=-1e-6)
    fig = Figure(value=2e-6, source="test")
    with pytest.raises(ConfigError, match="says"):
        DeviceSpec(name="x", levels=(lvl,), default_level="sram", kernel_overhead_s=3e-6,
                   figures=(("kernel_overhead", fig),))
