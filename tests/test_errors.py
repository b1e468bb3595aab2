"""Errors everywhere are one line and an exit code (CLI), or a CachefitError (Python API).

Each case here is one a tester found printing a traceback, a boxed usage panel or the wrong exit
code, or a Python API call failing with TypeError / AttributeError.
"""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import cachefit
from cachefit.cli import app
from cachefit.errors import CachefitError, ConfigError

runner = CliRunner()

LLAMA = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 128, "vocab_size": 100}


def _one_line_error(result, code: int = 2) -> str:
    """The single stderr line of a failed command (and that there is nothing else)."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: " if code == 2 else "no feasible plan: "), lines[0]
    return lines[0]


@pytest.mark.parametrize("args, line", [
    (("partition", "--sizes", "1,2", "--cards", "0"), "error: --cards: must be >= 1 (got 0)"),
    (("plan", "gpt2", "--cards", "0"), "error: --cards: must be >= 1 (got 0)"),
    (("plan", "gpt2", "--mode", "dance"), "error: --mode: must be one of prefill, decode, train (got 'dance')"),
    (("run", "tiny-llama", "--plan", "p.json", "--nproc", "0"), "error: --nproc: must be >= 1 (got 0)"),
    (("plan", "gpt2", "--max-risk", "2"), "error: --max-risk: must be <= 1 (got 2)"),
    (("plan", "gpt2", "--headroom", "abc"), "error: --headroom: must be a number (got 'abc')"),
    (("partition", "--sizes", "1", "--cards", "x"), "error: --cards: must be a whole number (got 'x')"),
    (("profile", "gpt2", "--batch", "0"), "error: --batch: must be >= 1 (got 0)"),
    (("plan", "gpt2", "--dtype", "int3"), "error: --dtype: must be one of fp32, fp16, bf16, fp8 (got 'int3')"),
])
def test_usage_errors_are_one_line(args, line):
    assert _one_line_error(runner.invoke(app, list(args))) == line


@pytest.mark.parametrize("args, needle", [
    (("plan", "gpt2", "--nope"), "--nope: no such option"),
    (("plan",), "MODEL: missing argument"),
    (("export", "plan.json"), "--to: missing option"),
    (("nosuch",), "no such command 'nosuch'"),
    (("plna",), "did you mean 'plan'?"),
    (("plan", "gpt2", "--cards"), "--cards: requires an argument"),
    (("plan", "gpt2", "extra"), "unexpected extra argument"),
])
def test_other_usage_errors_are_one_line_with_the_help_to_read(args, needle):
    line = _one_line_error(runner.invoke(app, list(args)))
    assert needle in line and "--help`" in line


def test_help_still_works():
    result = runner.invoke(app, ["plan", "--help"])
    assert result.exit_code == 0 and "--cards" in result.stdout
    result = runner.invoke(app, [])  # a bare `cachefit` shows the commands
    assert result.exit_code == 2 and "plan" in result.output and "error:" not in result.output


def test_error_messages_are_not_read_as_markup(tmp_path):
    # a message holding [brackets] prints them as they are
    path = tmp_path / "cluster.toml"
    path.write_text('[[cards]]\ndevice = "h100"\n')
    line = _one_line_error(runner.invoke(app, ["devices", str(path)]))
    assert "([[cards]])" in line


@pytest.mark.parametrize("make, needle", [
    (lambda d: d.joinpath("config.json").write_text(json.dumps(dict(LLAMA, num_hidden_layers=10**9))),
     "num_hidden_layers = 1,000,000,000 exceeds cachefit's limit of 10,000 layers (limits.MAX_LAYERS)"),
    (lambda d: d.joinpath("config.json").write_text("[" * 100_000 + "]" * 100_000), "limits.MAX_JSON_DEPTH"),
    (lambda d: d.joinpath("config.json").write_bytes(b'{"model_type": "\xff"}'), "byte 0xff at offset 16"),
])
def test_bad_config_files_are_one_line(tmp_path, make, needle, hang_guard):
    make(tmp_path)
    with hang_guard():
        for command in ("profile", "plan"):
            args = [command, str(tmp_path / "config.json")] + (["--capacity", "1MB"] if command == "plan" else [])
            assert needle in _one_line_error(runner.invoke(app, args))


@pytest.mark.parametrize("make, needle", [
    (lambda p: p.write_bytes(b"3MB\n\xff\n"), "byte 0xff at offset 4 is not UTF-8"),
    (lambda p: p.write_text("1\n" * 1_000_001), "limits.MAX_SIZES_LINES"),
    (lambda p: p.write_text("1\r" * 1_000_001), "limits.MAX_SIZES_LINES"),
])
def test_bad_sizes_files_are_one_line(tmp_path, make, needle):
    path = tmp_path / "sizes.txt"
    make(path)
    result = runner.invoke(app, ["partition", "--sizes-file", str(path), "--capacity", "8MB"])
    assert needle in _one_line_error(result)


def test_sizes_file_dev_zero_stops(hang_guard):
    with hang_guard():
        result = runner.invoke(app, ["partition", "--sizes-file", "/dev/zero", "--capacity", "8MB"])
    assert "limits.MAX_FILE_BYTES" in _one_line_error(result)


def test_too_many_cards_is_one_line():
    result = runner.invoke(app, ["partition", "--sizes", "1,2", "--capacity", "2", "--cards", "100000"])
    assert _one_line_error(result).startswith("error: --cards = 100,000 exceeds cachefit's limit of 65,536 cards")
    result = runner.invoke(app, ["compare", "gpt2", "--capacity", "1MB", "--cards", "100000000"])
    assert "limits.MAX_CARDS" in _one_line_error(result)


@pytest.mark.parametrize("suffix, data", [
    (".json", b'{"name": "x", "levels": [{"name": "l2", "capacity": "\xff"}]}'),
    (".toml", b'name = "\xfe"\n'),
    (".json", b"[" * 100_000),
    (".toml", b"a = " + b"[" * 5_000 + b"1" + b"]" * 5_000 + b"\n"),
    (".yaml", b"a: " + b"[" * 5_000 + b"]" * 5_000 + b"\n"),
    (".toml", b'[[cards]]\ndevice = "h100"\ncount = 1000000000\n'),
])
def test_bad_device_files_are_one_line(tmp_path, suffix, data):
    path = tmp_path / f"dev{suffix}"
    path.write_bytes(data)
    _one_line_error(runner.invoke(app, ["plan", "gpt2", "--device", str(path)]))


@pytest.mark.parametrize("data", [b'{"schema": "\xff"}', b"[" * 100_000, b"NaN"])
def test_bad_plan_files_are_one_line(tmp_path, data):
    path = tmp_path / "plan.json"
    path.write_bytes(data)
    _one_line_error(runner.invoke(app, ["export", str(path), "--to", "accelerate"]))


def test_debug_keeps_the_exit_code_and_shows_the_traceback():
    result = runner.invoke(app, ["--debug", "profile", "no-such-model"])
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and "ConfigError" in result.stderr
    result = runner.invoke(app, ["--debug", "partition", "--sizes", "3,12", "--capacity", "10"])
    assert result.exit_code == 3


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cachefit.cli", *args], capture_output=True, text=True, timeout=120)


def test_the_entry_point_exits_with_the_errors_code():
    proc = _cli("partition", "--sizes", "1,2", "--cards", "0")
    assert proc.returncode == 2 and proc.stderr == "error: --cards: must be >= 1 (got 0)\n"
    proc = _cli("--debug", "profile", "no-such-model")
    assert proc.returncode == 2 and "Traceback" in proc.stderr
    proc = _cli("partition", "--sizes", "3,12", "--capacity", "10")
    assert proc.returncode == 3 and proc.stderr.startswith("no feasible plan: ") and proc.stderr.count("\n") == 1


@pytest.mark.slow
def test_third_party_warnings_are_silenced_unless_debug():
    # torchao logs "Failed to load ..." for optional kernels at import; torch logs a pytree notice
    code = ("import sys; from cachefit.cli import _quiet_third_party\n"
            "if sys.argv[1] == 'quiet': _quiet_third_party()\n"
            "import torchao, torch.utils._pytree\n")
    quiet = subprocess.run([sys.executable, "-c", code, "quiet"], capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0, quiet.stderr
    assert "Failed to load" not in quiet.stderr and "_pytree" not in quiet.stderr, quiet.stderr


# ---------------------------------------------------------------------------------------------
# The Python API


@pytest.fixture(scope="module")
def prof():
    return cachefit.profile_model("gpt2")


@pytest.fixture(scope="module")
def cluster():
    return cachefit.make_cluster(cachefit.device_from_capacity("100MB"))


@pytest.mark.parametrize("call, needle", [
    (lambda p, c: cachefit.plan_partition(p, None), "cluster must be a Cluster"),
    (lambda p, c: cachefit.plan_partition(None, c), "profile must be a ModelProfile"),
    (lambda p, c: cachefit.plan_partition(p, cachefit.get_device("h100")), "make_cluster(device)"),
    (lambda p, c: cachefit.plan_partition(p, c, num_cards="2"), "num_cards"),
    (lambda p, c: cachefit.plan_partition(p, c, max_risk=float("nan")), "max_risk"),
    (lambda p, c: cachefit.plan_partition(p, c, allow=[8]), "allow"),
    (lambda p, c: cachefit.plan_partition(p, c, overrides="layers.0=1"), "overrides"),
    (lambda p, c: cachefit.plan_partition(p, c, stacking="pile"), "stacking"),
    (lambda p, c: cachefit.profile_model("gpt2", "decode"), "workload must be a cachefit.Workload"),
    (lambda p, c: cachefit.estimate_cost(None, p), "plan must be a Plan"),
    (lambda p, c: cachefit.compare_layouts(p, None, 2), "cluster must be a Cluster"),
    (lambda p, c: cachefit.compare_layouts(None, c, 2), "profile must be a ModelProfile"),
    (lambda p, c: cachefit.export_plan(None, "accelerate"), "plan must be a Plan"),
    (lambda p, c: cachefit.audit_device_map(None, {"transformer": 0}, c), "profile must be a ModelProfile"),
    (lambda p, c: cachefit.make_cluster(None), "devices must be a DeviceSpec"),
    (lambda p, c: cachefit.estimate_cost(), "missing a required argument"),
    (lambda p, c: cachefit.load_plan(None), "load_plan"),
    (lambda p, c: cachefit.format_bytes(None), "format_bytes"),
    (lambda p, c: cachefit.parse_bytes([3]), "expected a size"),
])
def test_bad_api_arguments_raise_config_error(prof, cluster, call, needle):
    with pytest.raises(ConfigError) as info:
        call(prof, cluster)
    assert needle in str(info.value)


def test_allow_as_a_plain_string_is_a_comma_separated_list(prof):
    cluster = cachefit.make_cluster(cachefit.device_from_capacity("30MB"))
    as_list, _ = cachefit.plan_partition(prof, cluster, allow=["int8", "int4"])
    as_text, _ = cachefit.plan_partition(prof, cluster, allow="int8, int4")
    assert as_text.to_dict()["stages"] == as_list.to_dict()["stages"]
    with pytest.raises(CachefitError, match="'int9'"):
        cachefit.plan_partition(prof, cluster, allow="int8,int9")
    comparison = cachefit.compare_layouts(prof, cluster, 4, "int8")
    assert comparison.num_cards == 4
