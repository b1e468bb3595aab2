"""Writing files whole or not at all: the helpers of ``cachefit.files`` and the commands that use them.

Failures are real where a test can make one as root (a path under a regular file: ENOTDIR; a
missing folder: ENOENT; a folder that takes no files: /proc; a pipe: not a regular file) and
simulated otherwise: a full disk by an ``os.fsync`` that raises ENOSPC, which is where a full disk
shows itself for a write the page cache accepted. No test writes to /dev: renaming onto a device
file as root would replace it.
"""

import errno
import os
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cachefit.cli import app
from cachefit.errors import ConfigError
from cachefit.files import (
    atomic_directory,
    atomic_path,
    check_writable,
    write_bytes_atomic,
    write_text_atomic,
)

runner = CliRunner()


def _full_disk(monkeypatch):
    def fsync(_fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)


def _unwritable(tmp_path):
    """Paths no write can succeed at, even as root: (path, words the message must hold)."""
    afile = tmp_path / "afile"
    afile.write_text("a file, not a folder")
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    cases = [(afile / "x.json", "Not a directory"), (tmp_path / "missing" / "x.json", "does not exist"),
             (tmp_path, "folder"), (pipe, "not a regular file")]
    if os.path.isdir("/proc/self"):
        cases.append((Path("/proc/self/cachefit-test.json"), "takes no new files"))
    return cases


# --------------------------------------------------------------------------------------------
# the helpers
# --------------------------------------------------------------------------------------------


def test_a_write_replaces_the_file_and_keeps_its_permissions(tmp_path):
    path = tmp_path / "x.json"
    assert write_text_atomic(path, "first", what="--out") == path
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600
    path.chmod(0o640)
    write_bytes_atomic(path, b"second", what="--out")
    assert path.read_text() == "second" and stat.S_IMODE(path.stat().st_mode) == 0o640
    assert os.listdir(tmp_path) == ["x.json"]


def test_a_write_through_a_symlink_keeps_the_link(tmp_path):
    (tmp_path / "real.json").write_text("old")
    (tmp_path / "link.json").symlink_to("real.json")
    write_text_atomic(tmp_path / "link.json", "new", what="--out")
    assert (tmp_path / "link.json").is_symlink() and (tmp_path / "real.json").read_text() == "new"


def test_a_full_disk_leaves_the_earlier_file_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "x.json"
    path.write_text("earlier")
    _full_disk(monkeypatch)
    with pytest.raises(ConfigError, match=r"--out '.*x\.json': cannot write it \(No space left on device\)"):
        write_text_atomic(path, "new", what="--out")
    assert path.read_text() == "earlier" and os.listdir(tmp_path) == ["x.json"]


@pytest.mark.parametrize("exc", [OSError(errno.EIO, "Input/output error"), ValueError("writer bug")])
def test_a_writer_that_fails_leaves_the_earlier_file_and_no_temporary_file(tmp_path, exc):
    path = tmp_path / "p.png"
    path.write_bytes(b"earlier")
    with pytest.raises(ConfigError if isinstance(exc, OSError) else ValueError), \
            atomic_path(path, what="--plot") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".p.png.") and tmp.name.endswith(".tmp.png")
        tmp.write_bytes(b"half a PNG")
        raise exc
    assert path.read_bytes() == b"earlier" and os.listdir(tmp_path) == ["p.png"]


def test_unwritable_places_are_one_line_config_errors_and_create_nothing(tmp_path):
    for path, words in _unwritable(tmp_path):
        before = sorted(os.listdir(path.parent)) if path.parent.is_dir() else None
        for attempt in (lambda: write_text_atomic(path, "x", what="--out"),
                        lambda: check_writable(path, what="--out")):
            with pytest.raises(ConfigError, match=words) as info:
                attempt()
            message = str(info.value)
            assert "\n" not in message and message.startswith(f"--out {str(path)!r}: ")
        if before is not None:
            assert sorted(os.listdir(path.parent)) == before
    assert stat.S_ISFIFO((tmp_path / "pipe").stat().st_mode)  # not replaced by a regular file


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write a read-only file")
def test_a_read_only_file_is_not_replaced(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("earlier")
    path.chmod(0o444)
    with pytest.raises(ConfigError, match="read-only"):
        write_text_atomic(path, "new", what="--out")
    assert path.read_text() == "earlier"


def test_check_writable_wants_the_suffix_and_leaves_nothing(tmp_path):
    with pytest.raises(ConfigError, match=r"give a name ending in \.png, e\.g\. '.*p\.png'"):
        check_writable(tmp_path / "p", what="--plot", suffix=".png")
    check_writable(tmp_path / "p.PNG", what="--plot", suffix=".png")
    assert os.listdir(tmp_path) == []


def test_a_new_folder_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    with atomic_directory(tmp_path / "rep", what="--report") as tmp:
        assert not (tmp_path / "rep").exists()
        (tmp / "index.html").write_text("page")
    assert os.listdir(tmp_path) == ["rep"] and os.listdir(tmp_path / "rep") == ["index.html"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "rep").stat().st_mode) == 0o777 & ~umask  # not mkdtemp's 0700

    _full_disk(monkeypatch)
    with pytest.raises(ConfigError, match=r"--report '.*new': cannot create it \(No space left on device\)"), \
            atomic_directory(tmp_path / "new", what="--report") as tmp:
        (tmp / "index.html").write_text("page")
    assert os.listdir(tmp_path) == ["rep"]


def test_into_an_existing_folder_each_file_is_replaced_and_others_kept(tmp_path):
    rep = tmp_path / "rep"
    rep.mkdir()
    (rep / "index.html").write_text("old")
    (rep / "notes.txt").write_text("mine")
    with atomic_directory(rep, what="--report") as tmp:
        (tmp / "index.html").write_text("new")
        (tmp / "memory.png").write_bytes(b"png")
    assert sorted(os.listdir(rep)) == ["index.html", "memory.png", "notes.txt"]
    assert (rep / "index.html").read_text() == "new" and (rep / "notes.txt").read_text() == "mine"
    with pytest.raises(RuntimeError), atomic_directory(rep, what="--report") as tmp:
        (tmp / "index.html").write_text("newer")
        raise RuntimeError("a chart failed")
    assert (rep / "index.html").read_text() == "new" and os.listdir(tmp_path) == ["rep"]
    with pytest.raises(ConfigError, match="it is a file, not a folder"):
        with atomic_directory(rep / "notes.txt", what="--report"):
            pass


# --------------------------------------------------------------------------------------------
# the commands
# --------------------------------------------------------------------------------------------


def _one_line_error(result, *words):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture()
def plan_json(tmp_path):
    result = runner.invoke(app, ["plan", "gpt2", "--capacity", "100MB", "--json"])
    assert result.exit_code == 0, result.output
    path = tmp_path / "plan.json"
    path.write_text(result.stdout)
    return path


def test_export_out_on_a_full_disk_keeps_the_earlier_file(plan_json, tmp_path, monkeypatch):
    out = tmp_path / "x.txt"
    out.write_text("earlier")
    _full_disk(monkeypatch)
    result = runner.invoke(app, ["export", str(plan_json), "--to", "llamacpp", "--out", str(out)])
    _one_line_error(result, f"--out {str(out)!r}", "No space left on device")
    assert out.read_text() == "earlier" and sorted(os.listdir(tmp_path)) == ["plan.json", "x.txt"]


def test_export_out_under_a_file_is_exit_2(plan_json, tmp_path):
    (tmp_path / "afile").write_text("")
    result = runner.invoke(app, ["export", str(plan_json), "--to", "llamacpp", "--out", str(tmp_path / "afile" / "x.txt")])
    _one_line_error(result, "--out", "Not a directory")


def test_plan_plot_into_a_failing_place_is_one_line_and_no_file(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("")
    result = runner.invoke(app, ["plan", "gpt2", "--capacity", "100MB", "--plot", str(tmp_path / "afile" / "p.png")])
    _one_line_error(result, "--plot", "Not a directory")
    _full_disk(monkeypatch)
    result = runner.invoke(app, ["plan", "gpt2", "--capacity", "100MB", "--plot", str(tmp_path / "p.png")])
    _one_line_error(result, "--plot", "No space left on device")
    assert os.listdir(tmp_path) == ["afile"]


def test_plan_plot_prints_the_path_it_wrote_and_refuses_a_name_without_png(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["plan", "gpt2", "--capacity", "100MB", "--plot", "p"])
    _one_line_error(result, "--plot 'p'", "p.png")
    # the tester's case: matplotlib used to append .png and write /dev/full.png
    result = runner.invoke(app, ["plan", "gpt2", "--capacity", "100MB", "--plot", "/dev/full"])
    _one_line_error(result, "--plot '/dev/full'")
    assert not os.path.exists("/dev/full.png") and os.listdir(tmp_path) == []
    result = runner.invoke(app, ["plan", "gpt2", "--capacity", "100MB", "--plot", "chart.png"])
    assert result.exit_code == 0, result.output
    assert "chart written to chart.png" in result.output
    assert os.listdir(tmp_path) == ["chart.png"] and Path("chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_report_that_fails_leaves_no_folder(tmp_path, monkeypatch):
    _full_disk(monkeypatch)
    result = runner.invoke(app, ["plan", "gpt2", "--capacity", "100MB", "--report", str(tmp_path / "rep")])
    _one_line_error(result, f"--report {str(tmp_path / 'rep')!r}", "No space left on device")
    assert os.listdir(tmp_path) == []


def test_run_save_outputs_is_checked_before_the_run(tmp_path):
    pytest.importorskip("torch")
    (tmp_path / "afile").write_text("")
    # the plan does not exist: the run would fail later; --save-outputs is refused first
    result = runner.invoke(app, ["run", str(tmp_path), "--plan", str(tmp_path / "no-plan.json"),
                                 "--save-outputs", str(tmp_path / "afile" / "out.safetensors")])
    _one_line_error(result, "--save-outputs", "Not a directory")


def test_save_outputs_writes_whole_files_and_fails_as_config_error(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    from cachefit.deploy.verify import save_outputs

    path = tmp_path / "out.safetensors"
    assert save_outputs(path, torch.arange(6.0).reshape(2, 3)) == path
    assert load_file(str(path))["outputs"].tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    earlier = path.read_bytes()
    _full_disk(monkeypatch)
    with pytest.raises(ConfigError, match="--save-outputs .*No space left on device"):
        save_outputs(path, torch.zeros(2))
    assert path.read_bytes() == earlier and os.listdir(tmp_path) == ["out.safetensors"]


def test_probe_refuses_unwritable_paths_before_measuring(tmp_path, monkeypatch):
    import cachefit.hardware.probe as probe

    def no_sweep(*_args, **_kwargs):
        raise AssertionError("the sweep ran before the paths were checked")

    monkeypatch.setattr(probe, "probe_device", no_sweep)
    (tmp_path / "afile").write_text("")
    for args, words in ((["--out", str(tmp_path / "afile" / "d.json")], "--out"),
                        (["--raw", str(tmp_path / "missing" / "r.json")], "--raw"),
                        (["--plot", str(tmp_path / "p")], "p.png")):
        _one_line_error(runner.invoke(app, ["probe", *args]), words)
    assert os.listdir(tmp_path) == ["afile"]
