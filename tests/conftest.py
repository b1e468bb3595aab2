"""Shared test helpers.

No test here measures time: speed goals are benchmarks (bench/) or tests marked ``hardware``, left
out of the default run. Where a regression would make a call hang (an unbounded read, a run that
never ends), :func:`hang_guard` turns the hang into a failure after a bound far above any normal
run, so CI fails quickly instead of waiting for its own limit. Use the fixture:
``def test_x(hang_guard): with hang_guard(): ...``.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

import pytest

HANG_BOUND_S = 300
"""Far above what any guarded call takes, loaded or idle (seconds): a hang guard, not a timing."""


@contextlib.contextmanager
def _hang_guard(seconds: int = HANG_BOUND_S) -> Iterator[None]:
    """Fail (TimeoutError) if the block runs longer than ``seconds``; a no-op off the main thread or
    where SIGALRM does not exist."""
    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def _hung(signum, frame):  # noqa: ANN001, ARG001
        raise TimeoutError(f"still running after {seconds} s: a hang, not a slow machine")

    previous = signal.signal(signal.SIGALRM, _hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def hang_guard() -> Callable[..., contextlib.AbstractContextManager[None]]:
    """``with hang_guard(): ...`` fails the test if the block hangs (see the module doc)."""
    return _hang_guard
