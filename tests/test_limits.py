"""cachefit.limits: every input size is bounded, checked before any work, with a one-line error
that names the limit."""

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachefit import limits
from cachefit.errors import ConfigError
from cachefit.files import json_depth, parse_json, read_json, read_text
from cachefit.hardware.devices import get_device, load_device_file, make_cluster
from cachefit.limits import check_limit, limit_error
from cachefit.plan import Plan, load_plan
from cachefit.profile.hf_config import load_transformer_spec

LLAMA = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 128, "vocab_size": 100}


def _plan_dict() -> dict:
    from cachefit import make_cluster as cluster_of
    from cachefit.hardware.devices import device_from_capacity
    from cachefit.plan.search import plan_partition
    from cachefit.profile import profile_model

    plan, _ = plan_partition(profile_model("gpt2"), cluster_of(device_from_capacity("100MB")))
    return plan.to_dict()


def test_limits_are_generous_for_real_inputs():
    # the deepest published LLMs have ~130 layers; the partition benchmark runs 1,000,000 units
    assert limits.MAX_LAYERS >= 1_000
    assert limits.MAX_UNITS >= 1_000_000
    assert limits.MAX_SIZES_LINES == limits.MAX_UNITS
    assert limits.MAX_CARDS >= 4_096 and limits.MAX_CLUSTER_CARDS >= 4_096
    assert limits.MAX_FILE_BYTES >= 16 * 2**20
    assert limits.MAX_JSON_DEPTH >= 16


def test_the_message_names_the_limit_its_value_and_the_fix():
    with pytest.raises(ConfigError) as info:
        check_limit(1_000_000_000, "MAX_LAYERS", where="config.json", what="num_hidden_layers")
    message = str(info.value)
    assert message.startswith("config.json: num_hidden_layers = 1,000,000,000 exceeds cachefit's limit of 10,000 "
                              "layers (limits.MAX_LAYERS); ")
    assert "\n" not in message
    check_limit(limits.MAX_LAYERS, "MAX_LAYERS", where="x", what="y")  # the limit itself is allowed
    assert str(limit_error("MAX_CARDS", where="", what="--cards", value=70_000)).startswith("--cards = 70,000 exceeds")


@pytest.mark.parametrize("key, config", [("num_hidden_layers", LLAMA),
                                         ("n_layer", {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4,
                                                      "vocab_size": 100, "n_positions": 32})])
def test_a_billion_layers_is_refused_before_any_table_is_built(tmp_path, key, config, hang_guard):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(config, **{key: 1_000_000_000})))
    with hang_guard(), pytest.raises(ConfigError, match=rf"{key} = 1,000,000,000 exceeds .*limits\.MAX_LAYERS"):
        load_transformer_spec(path)
    with pytest.raises(ConfigError, match="MAX_LAYERS"):
        load_transformer_spec(dict(config, **{key: limits.MAX_LAYERS + 1}))


@pytest.mark.parametrize("suffix, text", [
    (".toml", '[[cards]]\ndevice = "h100"\ncount = 1000000000\n'),
    (".json", '{"cards": [{"device": "h100", "count": 1000000000}]}'),
    (".toml", '[[cards]]\ndevice = "h100"\ncount = 40000\n[[cards]]\ndevice = "a100"\ncount = 40000\n'),
])
def test_a_huge_cluster_count_is_refused_before_the_cards_are_built(tmp_path, suffix, text, hang_guard):
    path = tmp_path / f"cluster{suffix}"
    path.write_text(text)
    with hang_guard(), pytest.raises(ConfigError, match=r"limits\.MAX_CLUSTER_CARDS"):
        load_device_file(path)


def test_make_cluster_count_is_bounded():
    with pytest.raises(ConfigError, match=r"count = 1,000,000,000 .*MAX_CLUSTER_CARDS"):
        make_cluster(get_device("h100"), count=1_000_000_000)
    assert len(make_cluster(get_device("h100"), count=8)) == 8


def test_the_file_reader_stops_at_the_size_limit(tmp_path):
    big = tmp_path / "big.json"
    with open(big, "wb") as f:  # sparse: the size is refused before a byte is read
        f.truncate(limits.MAX_FILE_BYTES + 1)
    with pytest.raises(ConfigError, match=r"size = 67,108,865 exceeds .*limits\.MAX_FILE_BYTES"):
        read_text(big, where="big.json")
    exact = tmp_path / "exact.txt"
    exact.write_text("x" * 1000)
    assert read_text(exact, where="exact.txt") == "x" * 1000


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_dev_zero_stops_at_the_limit(hang_guard):
    with hang_guard(), pytest.raises(ConfigError, match=r"MAX_FILE_BYTES"):
        read_text("/dev/zero", where="/dev/zero")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_an_endless_pipe_stops_at_the_limit(tmp_path):
    import threading

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    stop = threading.Event()

    def feed() -> None:  # writes until the reader closes its end
        chunk = b"1\n" * 2**15
        try:
            with open(fifo, "wb") as f:
                while not stop.is_set():
                    f.write(chunk)
        except (BrokenPipeError, OSError):
            pass

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    try:
        with pytest.raises(ConfigError, match=r"MAX_FILE_BYTES"):
            read_text(fifo, where="pipe")
    finally:
        stop.set()
        writer.join(timeout=5)


def test_non_utf8_bytes_name_the_file_and_the_offset(tmp_path):
    path = tmp_path / "sizes.txt"
    path.write_bytes(b"3MB\n5MB\n\xff\xfe\n")
    with pytest.raises(ConfigError, match=r"^sizes\.txt: byte 0xff at offset 8 is not UTF-8"):
        read_text(path, where="sizes.txt")
    path.write_bytes(b"\xef\xbb\xbf{}")  # a UTF-8 byte-order mark is dropped
    assert read_json(path, what="plan file") == {}


def test_json_depth_is_found_without_recursion():
    assert json_depth('{"a": [1, {"b": "[[[[ not brackets \\" [["}]}') == 3
    assert json_depth("[]") == 1 and json_depth("3") == 0
    deep = "[" * 1_000_000 + "]" * 1_000_000
    assert json_depth(deep) == 1_000_000
    with pytest.raises(ConfigError, match=r"nesting depth = 1,000,000 exceeds .*limits\.MAX_JSON_DEPTH"):
        parse_json(deep, where="deep.json")
    ok = "[" * limits.MAX_JSON_DEPTH + "]" * limits.MAX_JSON_DEPTH
    assert parse_json(ok, where="ok.json") is not None
    with pytest.raises(ConfigError, match="MAX_JSON_DEPTH"):
        parse_json("[" + ok + "]", where="ok.json")


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=4),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
                     max_leaves=20)


def _depth(value) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


@settings(max_examples=100, deadline=None)
@given(_JSON)
def test_json_depth_equals_the_depth_of_the_parsed_value(value):
    assert json_depth(json.dumps(value)) == _depth(value)


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_a_plan_with_a_non_finite_number_is_refused(tmp_path, token):
    text = json.dumps(_plan_dict(), indent=2).replace('"utilization": ', f'"utilization": {token}, "was": ', 1)
    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"plan file .*plan\.json"):
        load_plan(path)


def test_plan_from_dict_refuses_nan_and_oversized_counts():
    doc = _plan_dict()
    doc["stages"][0]["utilization"] = float("nan")
    with pytest.raises(ConfigError, match=r"stages\[0\]\.utilization is nan"):
        Plan.from_dict(doc)
    doc = _plan_dict()
    doc["num_units"] = limits.MAX_UNITS + 1
    with pytest.raises(ConfigError, match=r"limits\.MAX_UNITS"):
        Plan.from_dict(doc)
    doc = _plan_dict()
    doc["stages"] = doc["stages"] * (limits.MAX_CARDS + 1)
    with pytest.raises(ConfigError, match=r"limits\.MAX_CARDS"):
        Plan.from_dict(doc)


def test_plan_partition_bounds_num_cards():
    from cachefit.hardware.devices import device_from_capacity
    from cachefit.plan.search import plan_partition
    from cachefit.profile import profile_model

    with pytest.raises(ConfigError, match=r"num_cards = 100,000 .*limits\.MAX_CARDS"):
        plan_partition(profile_model("gpt2"), make_cluster(device_from_capacity("1GB")), num_cards=100_000)
