"""The watched torchrun process: output to the log, a stuck rank ended soon after the first failure, one line.

A small Python script stands in for torchrun (no torch: each test takes about a second);
``test_run_command.py`` times a hung rank under a real torchrun.
"""

from __future__ import annotations

import json
import sys
import time

import pytest

from cachefit.deploy.supervisor import SupervisedExit, classify, failure, run_supervised

# torchrun as it behaves when a rank hangs in a native wait: rank 0 fails after 0.3 s (its peer timed
# out) and exits; rank 1 ignores SIGTERM (a collective does not return to Python) and so does torchrun
# (it waits 30 s for its workers before it kills)
FAKE_TORCHRUN = r"""
import json, os, signal, socket, sys, time
run_dir = sys.argv[1]

def rank(r, body):
    if os.fork() == 0:
        with open(os.path.join(run_dir, f"pid-rank{r}.json"), "w") as fh:
            json.dump({"rank": r, "pid": os.getpid(), "host": socket.gethostname()}, fh)
        body()
        os._exit(1)

def stuck():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("rank 1 is stuck", flush=True)
    time.sleep(600)

def fails():
    time.sleep(0.3)
    print("Traceback (most recent call last): ... Timed out waiting 2000ms", flush=True)
    with open(os.path.join(run_dir, "error-rank0.json"), "w") as fh:
        json.dump({"rank": 0, "stage": "stage 0", "error_type": "RuntimeError",
                   "message": "Timed out waiting 2000ms for recv operation to complete"}, fh)

rank(1, stuck)
rank(0, fails)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
time.sleep(600)
"""


class _Placement:
    def __init__(self, idx, ranks):
        self.stage_idx, self.ranks, self.shards = idx, ranks, len(ranks)

    def describe(self):
        return f"stage {self.stage_idx} (card {','.join(map(str, self.ranks))})"


class _Layout:
    stages = (_Placement(0, (0,)), _Placement(1, (1,)))


def _pids(run_dir):
    return [json.loads(p.read_text())["pid"] for p in run_dir.glob("pid-rank*.json")]


def _gone(pid):
    try:
        state = open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()[0]
        return state in ("Z", "X")
    except OSError:
        return True


def _stuck_run(tmp_path):
    start = time.perf_counter()
    exit_ = run_supervised([sys.executable, "-c", FAKE_TORCHRUN, str(tmp_path)], run_dir=tmp_path,
                           log_file=tmp_path / "run.log", timeout_s=2.0)
    return exit_, time.perf_counter() - start


@pytest.mark.hardware
def test_a_rank_stuck_past_sigterm_is_ended_within_three_seconds(tmp_path):
    # 0.3 s to the report + min(0.5, 2 / 10) s of grace + min(1, 2 / 10) s from SIGTERM to SIGKILL, and polling
    _, elapsed = _stuck_run(tmp_path)
    assert elapsed < 3.0, elapsed


def test_a_rank_stuck_past_sigterm_is_ended_after_the_first_failure(tmp_path, hang_guard):
    with hang_guard():
        exit_, elapsed = _stuck_run(tmp_path)
    assert exit_.ended == "failure" and exit_.running_ranks == (1,)
    # SIGKILL reaches the group's processes asynchronously: on a busy machine a rank may still be on
    # its way out when the supervisor returns; it must be gone soon after (a generous hang bound)
    deadline = time.monotonic() + 60
    while not all(_gone(pid) for pid in _pids(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_gone(pid) for pid in _pids(tmp_path))
    log = (tmp_path / "run.log").read_text()
    assert "rank 1 is stuck" in log and "Timed out waiting" in log
    error = failure(tmp_path, _Layout(), exit_, elapsed, 2.0, log_file=tmp_path / "run.log")
    text = str(error)
    assert "\n" not in text
    assert text.index("stage 1 (card 1) was still running") < text.index("stage 0 (card 0) timed out")
    assert "bounded by --timeout 2 s" in text and text.endswith(f"tracebacks are in {tmp_path / 'run.log'}")


def test_a_rank_that_died_is_not_called_running():
    assert classify(None)[1].startswith("died without a report")
    assert classify(None, was_running=True)[1].startswith("was still running")
    # its own report wins: a rank that timed out and was then ended timed out
    assert classify({"error_type": "RuntimeError", "message": "Timed out waiting 5000ms"}, was_running=True)[0] == 3


def test_the_wall_clock_limit_ends_everything(tmp_path, hang_guard):
    script = "import time; print('working', flush=True); time.sleep(600)"
    with hang_guard(120):  # the script sleeps 600 s: only the limit of 0.5 s ends it before the guard
        exit_ = run_supervised([sys.executable, "-c", script], run_dir=tmp_path, log_file=tmp_path / "run.log",
                               timeout_s=60.0, wall_timeout_s=0.5)
    assert exit_.ended == "wall"
    assert "wall-clock limit of 0.5 s" in str(failure(tmp_path, _Layout(), exit_, 0.5, 60.0, wall_timeout_s=0.5))
    assert (tmp_path / "run.log").read_text() == "working\n"
    assert isinstance(exit_, SupervisedExit)
