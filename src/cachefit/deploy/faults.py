"""Fault injection for tests: make one rank fail at a chosen step, as a real failure would.

``CACHEFIT_DEPLOY_FAULT=RANK:KIND[:STEP]`` makes rank RANK fail at its stage's forward in step STEP
(default 0, counted after warm-up). KIND: ``kill`` (SIGKILL, no report), ``raise`` (an exception),
``hang`` (sleeps until ended). The rank writes ``fault-rank{R}.json`` (the kind and ``time.time()``)
first, for the tests that time how a fault ends.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

FAULT_ENV = "CACHEFIT_DEPLOY_FAULT"
"""Testing aid: ``RANK:KIND[:STEP]`` (see the module's docstring)."""


@dataclass(frozen=True, slots=True)
class Fault:
    rank: int
    kind: str
    step: int

    def due(self, rank: int, step: int) -> bool:
        """Whether ``rank`` fails at ``step`` (counted after warm-up)."""
        return rank == self.rank and step == self.step

    def inject(self, run_dir: Path, rank: int) -> None:
        logger.warning("injecting fault %r (%s)", self.kind, FAULT_ENV)
        with contextlib.suppress(OSError):
            (run_dir / f"fault-rank{rank}.json").write_text(json.dumps({"kind": self.kind, "time": time.time()}),
                                                          encoding="utf-8")
        if self.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.kind == "hang":
            while True:
                time.sleep(3600)
        else:
            raise RuntimeError(f"fault injected by {FAULT_ENV}")


def planned_fault() -> Fault | None:
    """The fault :data:`FAULT_ENV` asks for, if any."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    parts = spec.split(":")
    return Fault(int(parts[0]), parts[1], int(parts[2]) if len(parts) > 2 else 0)
