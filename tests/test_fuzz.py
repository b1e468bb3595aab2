"""Fuzzing the parsers and file readers: arbitrary text, bytes or JSON either parse or raise a
CachefitError, never another exception (TypeError, UnicodeDecodeError, RecursionError, ...).

Kept fast for CI on two cores: modest ``max_examples``, no deadline.
"""

import itertools
import json
import math

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from cachefit.cli import _read_sizes, app
from cachefit.errors import CachefitError
from cachefit.files import parse_json, read_json
from cachefit.hardware.devices import Cluster, DeviceSpec, load_device_file
from cachefit.plan import Plan, load_plan
from cachefit.profile.hf_config import SUPPORTED_FAMILIES, load_transformer_spec
from cachefit.profile.spec import TransformerSpec
from cachefit.sizes import parse_bytes

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_counter = itertools.count()

# JSON values, small, with the awkward corners: huge and negative ints, NaN and infinities, deep-ish
# nesting, unicode text
_LEAVES = (st.none() | st.booleans() | st.integers() | st.integers(min_value=10**18, max_value=10**40)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8))
_JSON = st.recursive(_LEAVES, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)
# bytes that look a little like the real thing, or nothing like it
_BYTES = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.builds(lambda n, b: b * n, st.integers(1, 1200), st.sampled_from([b"[", b"{", b'{"a":', b"- ", b"a = [", b"\xff"])),
)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _write(folder, suffix: str, data: bytes):
    path = folder / f"f{next(_counter)}{suffix}"
    path.write_bytes(data)
    return path


def _dumps(value) -> str:
    return json.dumps(value, allow_nan=True)


# ---------------------------------------------------------------------------------------------
# Sizes


@FUZZ
@given(st.one_of(st.text(max_size=30), st.from_regex(r"\s*[0-9.eE+-]{1,12}\s*[A-Za-z]{0,4}\s*", fullmatch=True),
                 st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.none(), st.booleans(),
                 st.binary(max_size=8), st.lists(st.integers(), max_size=2)))
def test_parse_bytes_gives_a_positive_int_or_a_config_error(text):
    try:
        value = parse_bytes(text)
    except CachefitError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 400
        return
    assert isinstance(value, int) and value >= 1


@FUZZ
@given(st.text(max_size=80))
def test_sizes_option_parses_or_raises(text):
    try:
        values = _read_sizes(text, None)
    except CachefitError:
        return
    assert values and all(isinstance(v, int) and v >= 1 for v in values)


@FUZZ
@given(data=_BYTES)
def test_sizes_file_parses_or_raises(scratch, data):
    try:
        values = _read_sizes(None, _write(scratch, ".txt", data))
    except CachefitError:
        return
    assert values and all(isinstance(v, int) and v >= 1 for v in values)


@FUZZ
@given(st.lists(st.sampled_from(["--sizes", "--capacity", "--cards", "--json", "--sizes-file", "-k", "-c", "--verify",
                                 "3,5,2", "8", "0", "-1", "x", "1e400", "10MB", "nan", "--nope", "", "2,,3"]),
                max_size=8))
def test_partition_command_exits_0_2_or_3_with_one_line(argv):
    result = CliRunner().invoke(app, ["partition", *argv])
    assert result.exit_code in (0, 2, 3), (argv, result.output, result.exception)
    assert "Traceback" not in result.output
    if result.exit_code:
        assert len(result.stderr.splitlines()) == 1, (argv, result.stderr)


# ---------------------------------------------------------------------------------------------
# JSON


@FUZZ
@given(st.one_of(st.text(max_size=100), _BYTES.map(lambda b: b.decode("utf-8", "replace")), _JSON.map(_dumps)))
def test_parse_json_parses_or_raises(text):
    try:
        parse_json(text, where="x")
    except CachefitError as exc:
        assert "\n" not in str(exc)


@FUZZ
@given(data=_BYTES)
def test_read_json_parses_or_raises(scratch, data):
    try:
        read_json(_write(scratch, ".json", data), what="file")
    except CachefitError:
        pass


# ---------------------------------------------------------------------------------------------
# Device and cluster files

_DEVICE_KEYS = st.sampled_from(["name", "base", "levels", "capacity", "bandwidth", "scope", "count", "cards", "device",
                                "level", "headroom", "reserved", "default_level", "peak_flops", "kernel_overhead",
                                "offchip_capacity", "link_bandwidth", "source", "as_of", "value", "uncertain"])
_DEVICE_VALUES = st.one_of(_LEAVES, st.sampled_from(["h100", "l2", "50MiB", "7TB/s", "chip", "per_sm", "2.4us", "0.1"]))
_DEVICE = st.recursive(
    st.dictionaries(_DEVICE_KEYS, _DEVICE_VALUES, max_size=5),
    lambda inner: st.dictionaries(_DEVICE_KEYS, st.one_of(_DEVICE_VALUES, inner, st.lists(inner, max_size=3)),
                                  max_size=5),
    max_leaves=15,
)


@FUZZ
@given(data=_BYTES, suffix=st.sampled_from([".json", ".toml", ".yaml", ".yml", ".txt"]))
def test_device_file_bytes_load_or_raise(scratch, data, suffix):
    try:
        loaded = load_device_file(_write(scratch, suffix, data))
    except CachefitError:
        return
    assert isinstance(loaded, (DeviceSpec, Cluster))


@FUZZ
@given(doc=_DEVICE, as_yaml=st.booleans())
def test_device_file_structures_load_or_raise(scratch, doc, as_yaml):
    text = yaml.safe_dump(doc) if as_yaml else _dumps(doc)
    try:
        loaded = load_device_file(_write(scratch, ".yaml" if as_yaml else ".json", text.encode()))
    except CachefitError:
        return
    assert isinstance(loaded, (DeviceSpec, Cluster))


# ---------------------------------------------------------------------------------------------
# Plans


@pytest.fixture(scope="module")
def plan_doc():
    from cachefit.hardware.devices import device_from_capacity, make_cluster
    from cachefit.plan.search import plan_partition
    from cachefit.profile import profile_model

    plan, _ = plan_partition(profile_model("gpt2"), make_cluster(device_from_capacity("50MB")))
    return plan.to_dict()


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _paths(item, (*prefix, i))


def _replace(value, path, new):
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _replace(value[path[0]], path[1:], new)
    return copy


@FUZZ
@given(data=st.data())
def test_mutated_plans_load_or_raise(scratch, plan_doc, data):
    doc = plan_doc
    for _ in range(data.draw(st.integers(1, 3))):  # replace 1-3 values (or whole branches) by any JSON
        doc = _replace(doc, data.draw(st.sampled_from(list(_paths(doc)))), data.draw(_JSON))
    path = _write(scratch, ".json", _dumps(doc).encode())
    try:
        plan = load_plan(path)
    except CachefitError:
        return
    assert isinstance(plan, Plan)
    assert all(math.isfinite(s.utilization) for s in plan.stages)


@FUZZ
@given(data=_BYTES)
def test_plan_bytes_load_or_raise(scratch, data):
    try:
        load_plan(_write(scratch, ".json", data))
    except CachefitError:
        pass


# ---------------------------------------------------------------------------------------------
# config.json

_CONFIG_KEYS = st.sampled_from(["model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                "intermediate_size", "vocab_size", "num_key_value_heads", "head_dim", "n_layer",
                                "n_embd", "n_head", "n_positions", "max_position_embeddings", "tie_word_embeddings",
                                "num_local_experts", "rope_scaling", "sliding_window", "architectures"])
_CONFIG_VALUES = st.one_of(_LEAVES, st.sampled_from(SUPPORTED_FAMILIES), st.integers(0, 64),
                           st.integers(10**4, 10**12), _JSON)


@FUZZ
@given(family=st.sampled_from(SUPPORTED_FAMILIES), extra=st.dictionaries(_CONFIG_KEYS, _CONFIG_VALUES, max_size=6))
def test_config_dicts_load_or_raise(family, extra):
    config = {"model_type": family, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 128, "vocab_size": 100, **extra}
    try:
        spec = load_transformer_spec(config)
    except CachefitError:
        return
    assert isinstance(spec, TransformerSpec)


@FUZZ
@given(data=st.one_of(_BYTES, _JSON.map(lambda v: _dumps(v).encode())))
def test_config_files_load_or_raise(scratch, data):
    try:
        load_transformer_spec(_write(scratch, ".json", data))
    except CachefitError:
        pass
