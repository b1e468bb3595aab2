"""Run a plan as processes: one per card, under torchrun, with ``torch.distributed.pipelining``.

This module is the deploy package's front door (its public names are re-exported here); the work is
split by role:

* :mod:`cachefit.deploy.launcher`: check, start torchrun (or forked workers), collect the results
  (:func:`launch`, :func:`deploy_plan`, :class:`RunResult`);
* :mod:`cachefit.deploy.supervisor`: the watched torchrun process, its log, a hung or failed rank;
* :mod:`cachefit.deploy.worker`: one rank (join, build its stage, run the schedule, report);
* :mod:`cachefit.deploy.decode`: pipelined greedy decoding with micro-batches in flight;
* :mod:`cachefit.deploy.tp_sync`: how the shards of a tensor-parallel stage stay in step;
* :mod:`cachefit.deploy.run_report`: the run's ``result.json``;
* :mod:`cachefit.deploy.run_files`, :mod:`cachefit.deploy.faults`, :mod:`cachefit.deploy.losses`:
  the run directory's files, fault injection for tests, the last stage's training loss.

``python -m cachefit.deploy.runtime`` runs one rank, as ``python -m cachefit.deploy.worker`` does.
"""

from __future__ import annotations

import sys

from cachefit.deploy.config import RUN_MODES, SCHEDULES, NodeConfig, RunConfig
from cachefit.deploy.faults import FAULT_ENV
from cachefit.deploy.launcher import RunResult, deploy_plan, launch
from cachefit.deploy.losses import labels_for, loss_for
from cachefit.deploy.preflight import check_world, resolve_model_dir
from cachefit.deploy.run_files import read_inputs_file
from cachefit.deploy.tp_sync import TensorParallelSync
from cachefit.deploy.worker import main, run_worker

__all__ = [
    "FAULT_ENV",
    "RUN_MODES",
    "SCHEDULES",
    "NodeConfig",
    "RunConfig",
    "RunResult",
    "TensorParallelSync",
    "check_world",
    "deploy_plan",
    "labels_for",
    "launch",
    "loss_for",
    "main",
    "read_inputs_file",
    "resolve_model_dir",
    "run_worker",
]

if __name__ == "__main__":
    sys.exit(main())
