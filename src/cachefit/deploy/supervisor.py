"""The torchrun process of a run, watched: its output in a log file, its failures ended on time.

:func:`run_supervised` starts ``torchrun`` in a new session (so its process group holds torchrun and
every rank, and nothing else), copies everything they print to the run directory's log file (and,
verbose, to a stream as well), and watches the run directory. Every rank bounds each wait for a peer
by ``--timeout`` T, so a hung rank makes a peer fail within T and write ``error-rank{R}.json``. From
the first such report torchrun usually ends the rest at once; a rank stuck in a native call (a
collective that has not timed out yet) does not run its SIGTERM handler, though, and torchrun then
waits 30 s before it kills. So the supervisor gives torchrun ``min(0.5 s, T / 10)`` (the failing
rank has logged its traceback before it wrote its report), then ends the whole group itself
(SIGTERM, and SIGKILL ``min(1 s, T / 10)`` later): a hung rank ends the run within about
T + 0.2 T + 0.3 s of the hang (measured: 11.2 s for T = 10 here), under 1.5 T for T >= 2 s.

Each rank writes ``pid-rank{R}.json`` (its pid and host) when it starts, so the ranks still running
when the group is ended can be named as such (a rank that died leaves no report, a rank ended while
hung neither), and :func:`failure` turns the reports into one :class:`~cachefit.errors.DeployError`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from cachefit.errors import DeployError

POLL_S = 0.1
"""How often the supervisor looks at torchrun and the run directory."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SupervisedExit:
    """How torchrun ended."""

    returncode: int
    ended: str = ""
    """``""`` (torchrun ended by itself), ``failure`` (the supervisor ended the group after a rank
    failed) or ``wall`` (the wall-clock limit)."""
    running_ranks: tuple[int, ...] = ()
    """Ranks of this host still running when the supervisor ended the group."""


def log_path(run_dir: Path, node_rank: int = 0, nnodes: int = 1) -> Path:
    """The log file of this node's torchrun and ranks (one per node: the run dir may be shared)."""
    return run_dir / ("run.log" if nnodes == 1 else f"run-node{node_rank}.log")


def write_pid(run_dir: Path, rank: int) -> None:
    """A rank's pid and host, for the supervisor to tell a running rank from a dead one."""
    with contextlib.suppress(OSError):
        (run_dir / f"pid-rank{rank}.json").write_text(
            json.dumps({"rank": rank, "pid": os.getpid(), "host": socket.gethostname()}), encoding="utf-8")


def run_supervised(cmd: Sequence[str], *, run_dir: Path, log_file: Path, timeout_s: float,
                   wall_timeout_s: float | None = None, stream: IO[Any] | None = None,
                   env: Mapping[str, str] | None = None) -> SupervisedExit:
    """Run torchrun to its end, or end it: after a rank's failure report (see the module docstring)
    or after ``wall_timeout_s``. Its output goes to ``log_file`` (and ``stream``, when given)."""
    grace_s = min(0.5, 0.1 * timeout_s)
    term_s = min(1.0, 0.1 * timeout_s)
    with open(log_file, "wb") as log:
        proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=dict(env) if env is not None else None, start_new_session=True)
        pump = threading.Thread(target=_pump, args=(proc.stdout, log, stream), daemon=True)
        pump.start()
        start = time.monotonic()
        failed_at: float | None = None
        try:
            while True:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    return SupervisedExit(returncode=proc.wait(timeout=POLL_S))
                now = time.monotonic()
                if wall_timeout_s is not None and now - start > wall_timeout_s:
                    running = _running_ranks(run_dir)
                    kill_group(proc, term_s=term_s)
                    return SupervisedExit(returncode=proc.returncode, ended="wall", running_ranks=running)
                if failed_at is None and next(run_dir.glob("error-rank*.json"), None) is not None:
                    failed_at = now
                if failed_at is not None and now - failed_at > grace_s:
                    running = _running_ranks(run_dir)
                    kill_group(proc, term_s=term_s)
                    return SupervisedExit(returncode=proc.returncode, ended="failure", running_ranks=running)
        except BaseException:
            kill_group(proc, term_s=term_s)
            raise
        finally:
            pump.join(timeout=5)


def _pump(source: IO[bytes], log: IO[bytes], stream: IO[Any] | None) -> None:
    for line in iter(source.readline, b""):
        log.write(line)
        log.flush()
        if stream is not None:
            with contextlib.suppress(ValueError, OSError):
                try:
                    stream.write(line.decode(errors="replace"))
                except TypeError:  # a binary stream
                    stream.write(line)
                stream.flush()


def kill_group(proc: subprocess.Popen, *, term_s: float = 5.0) -> None:
    """End torchrun and its workers (a new session was made for them, so this group is ours alone):
    SIGTERM (each rank's handler leaves a report), then SIGKILL after ``term_s``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=term_s)
    except subprocess.TimeoutExpired:
        pass
    # the ranks may outlive torchrun by a moment: end whatever is left of the group
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _running_ranks(run_dir: Path) -> tuple[int, ...]:
    host = socket.gethostname()
    out = []
    for path in run_dir.glob("pid-rank*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            data = json.loads(path.read_text(encoding="utf-8"))
            if data["host"] == host and _alive(int(data["pid"])):
                out.append(int(data["rank"]))
    return tuple(sorted(out))


def _alive(pid: int) -> bool:
    try:  # Linux: a zombie (exited, not yet reaped by torchrun) is not running
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------------------------
# What happened, in one message
# --------------------------------------------------------------------------------------------


def classify(report: Mapping[str, Any] | None, *, was_running: bool = False) -> tuple[int, str]:
    """(order, what happened) of one rank: the root cause sorts first, the ranks it took down last."""
    ended = "was still running when another rank failed (hung?) and was ended by the launcher"
    if report is None:
        return (2, ended) if was_running else (1, "died without a report (killed, or crashed hard)")
    kind = str(report.get("error_type", ""))
    text = str(report.get("message", "")).strip()
    low = text.lower()
    if kind == "SignalException" or "got signal" in low:
        return 2, ended
    if "timed out" in low or "timeout" in low:
        return 3, "timed out waiting for a peer"
    if any(h in low for h in ("connection closed", "connection reset", "broken pipe", "connection refused")):
        return 4, "lost the connection to a peer (which stopped first)"
    first = text.splitlines()[0] if text else ""
    return 0, f"failed: {kind}: {first[:300]}"


def failure(directory: Path, layout: Any, exit_: SupervisedExit, elapsed_s: float, timeout_s: float,
            log_file: Path | None = None, wall_timeout_s: float | None = None) -> DeployError:
    """One error naming what happened to each stage, the root cause first, and where the log is."""
    reports: dict[int, dict[str, Any]] = {}
    for path in directory.glob("error-rank*.json"):
        with contextlib.suppress(OSError, json.JSONDecodeError, ValueError, KeyError, TypeError):
            data = json.loads(path.read_text(encoding="utf-8"))
            reports[int(data["rank"])] = data
    log = f"; the ranks' output and tracebacks are in {log_file}" if log_file is not None else ""
    setup = [r for r in reports.values() if "set-up" in str(r.get("stage", ""))]
    if setup:
        first = setup[0]
        message = str(first.get("message", "")).strip().splitlines()
        return DeployError(f"rank {first['rank']} could not set up: {first.get('error_type')}: "
                           f"{message[0] if message else ''}{log}")
    events = []
    for placement in layout.stages:
        for rank in placement.ranks:
            order, what = classify(reports.get(rank), was_running=rank in exit_.running_ranks)
            who = placement.describe() + (f" rank {rank}" if placement.shards > 1 else "")
            events.append((order, f"{who} {what}"))
    events.sort(key=lambda e: e[0])
    if exit_.ended == "wall":
        head = f"the run exceeded its wall-clock limit of {wall_timeout_s:g} s and every process was ended"
    elif exit_.ended == "failure":
        head = f"the pipeline failed after {elapsed_s:.1f} s (a rank failed; the launcher ended the others)"
    else:
        head = f"the pipeline failed after {elapsed_s:.1f} s (exit code {exit_.returncode})"
    joining = sorted(r for r, rep in reports.items() if "(joining)" in str(rep.get("stage", "")))
    if joining:  # the rendezvous of init_process_group, bounded by the startup timeout
        hint = (f"; rank {joining[0]} could not join the others within --startup-timeout (raise it if the "
                "processes start slowly)")
    else:
        hint = (f"; every wait for a peer is bounded by --timeout {timeout_s:g} s"
                if any(order in (2, 3) for order, _ in events) else "")
    return DeployError(f"{head}: " + "; ".join(text for _, text in events) + hint + log)


__all__ = [
    "SupervisedExit",
    "classify",
    "failure",
    "kill_group",
    "log_path",
    "run_supervised",
    "write_pid",
]
