import pytest
from hypothesis import given, settings, strategies as st

from cachefit.errors import ConfigError
from cachefit.sizes import format_bytes, format_capacity, parse_bytes, read_sizes_file


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


# read_sizes_file reads whole-number files with a few passes over the whole text; it must give what the
# line-by-line reading gives (the one it replaced, below), numbers and errors alike, whatever the text.
def _sizes_line_by_line(text, where):
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    items = [line for line in text.split("\n") if line.strip() and not line.lstrip().startswith("#")]
    if not items:
        raise ConfigError(f"{where}: no sizes given")
    return [parse_bytes(item.strip(), what=f"{where} item {i}") for i, item in enumerate(items)]


_NUMBERS = st.one_of(st.integers(min_value=0, max_value=10**20).map(str), st.sampled_from(
    ["0", "007", "1" * 18, "9" * 19, "9" * 25, "1.5", "2e3", "-4", "+4", "1 2", "", "12#", "x"]))
_UNITS_TEXT = st.sampled_from(["", "", "", "B", "MB", "mb", "MiB", "GiB", "KB", "XB", "b/s"])
_PADS = st.sampled_from(["", "", " ", "\t", "  \t", "\x0b", "\xa0"])
_LINES = st.one_of(
    st.tuples(_PADS, _NUMBERS, _PADS, _UNITS_TEXT, _PADS).map("".join),
    st.sampled_from(["", " ", "\t", "# a comment", "  # 5MB", "#"]),
)


_GOOD_LINES = st.one_of(
    st.tuples(st.sampled_from(["", " ", "\t"]), st.integers(min_value=1, max_value=10**19).map(str),
              st.sampled_from(["", " "]), st.sampled_from(["", "", "MB", "KiB", "b"]), st.sampled_from(["", "\t"])
              ).map("".join),
    st.sampled_from(["", "# 3MB"]),
)


def _same_as_line_by_line(directory, lines, newline, final):
    text = newline.join(lines) + (newline if final else "")
    path = directory / "sizes.txt"
    path.write_bytes(text.encode("utf-8"))
    where = f"--sizes-file {path}"
    try:
        expected = _sizes_line_by_line(text, where)
    except ConfigError as exc:
        with pytest.raises(ConfigError) as info:
            read_sizes_file(path)
        assert str(info.value) == str(exc)
    else:
        assert read_sizes_file(path) == expected


@settings(max_examples=400, deadline=None)
@given(st.lists(_LINES, max_size=12), st.sampled_from(["\n", "\r\n", "\r"]), st.booleans())
def test_read_sizes_file_reads_as_parse_bytes_does_line_by_line(tmp_path_factory, lines, newline, final):
    _same_as_line_by_line(tmp_path_factory.mktemp("sizes"), lines, newline, final)


@settings(max_examples=300, deadline=None)
@given(st.lists(_GOOD_LINES, max_size=20), st.sampled_from(["\n", "\r\n"]), st.booleans())
def test_read_sizes_file_reads_whole_numbers_as_parse_bytes_does(tmp_path_factory, lines, newline, final):
    _same_as_line_by_line(tmp_path_factory.mktemp("sizes"), lines, newline, final)


def test_read_sizes_file_reads_a_million_whole_numbers_and_units(tmp_path):
    values = [(i * 7919) % 10**9 + 1 for i in range(10**6)]
    path = tmp_path / "sizes.txt"
    path.write_text("\n".join(map(str, values)) + "\n")
    assert read_sizes_file(path) == values
    path.write_text("# sizes\n" + "\n".join(f"{v} MiB" if v % 2 else f"\t{v}KB " for v in values[:1000]))
    assert read_sizes_file(path) == [v * 2**20 if v % 2 else v * 1000 for v in values[:1000]]
