import pytest
from hypothesis import given, strategies as st

from cachefit.errors import ConfigError
from cachefit.sizes import format_bytes, format_capacity, parse_bytes


@pytest.mark.parametrize(
    "text, expected",
    [
        ("50MB", 50_000_000),
        ("50 MB", 50_000_000),
        ("48KiB", 48 * 1024),
        ("1.5GiB", 3 * 2**29),
        ("123", 123),
        ("123B", 123),
        ("1e6", 1_000_000),
        ("0.5kb", 500),
        (4096, 4096),
    ],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["50XB", "", "MB", "-5MB", "0", "0.3B", "1..2MB", True, float("nan")])
def test_parse_bytes_rejects_bad_input(bad):
    with pytest.raises(ConfigError) as info:
        parse_bytes(bad, what="--capacity")
    assert "--capacity" in str(info.value)


def test_unknown_unit_names_the_known_ones():
    with pytest.raises(ConfigError, match="KiB"):
        parse_bytes("50XB")


@given(st.integers(min_value=1, max_value=10**15))
def test_format_then_parse_is_close(n):
    text = format_bytes(n, digits=3)
    assert abs(parse_bytes(text.replace(" ", "")) - n) <= max(1, n * 0.001)


def test_format_bytes_names_units():
    assert format_bytes(50_000_000) == "50.0 MB"
    assert format_bytes(512) == "512 B"
    assert format_bytes(50 * 2**20, binary=True) == "50.0 MiB"


def test_format_capacity_picks_the_units_the_count_was_written_in():
    assert format_capacity(50 * 2**20) == "50.0 MiB"  # whole MiB: binary
    assert format_capacity(48 * 2**10) == "48.0 KiB"  # whole KiB below 1 MiB: binary
    assert format_capacity(44_000_000_000) == "44.0 GB"  # else decimal
    assert format_capacity(3 * 2**10 + 1) == "3.1 KB"


def test_rate_and_time_parsers_live_here_and_in_the_hardware_face():
    import cachefit.hardware.devices as devices
    import cachefit.sizes as sizes

    for name in ("parse_bandwidth", "parse_flops", "parse_duration"):
        assert getattr(devices, name) is getattr(sizes, name)
