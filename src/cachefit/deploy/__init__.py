"""Deploy: run a Plan as a pipeline of processes on ``torch.distributed`` and check it.

* :mod:`cachefit.deploy.config`: how a run goes (:class:`RunConfig`: mode ``prefill|decode|train``,
  schedule, dtype, timeouts) and where (:class:`NodeConfig`), plain data without torch;
* :mod:`cachefit.deploy.models`: local Hugging Face checkpoint directories (safetensors only);
* :mod:`cachefit.deploy.stages`: plan -> the real submodules of each stage (tensor parallel for split
  units), refusing before launch a plan that does not match the model;
* :mod:`cachefit.deploy.runtime`: torchrun processes, ``torch.distributed.pipelining`` schedules,
  timings, faults; :func:`deploy_plan` and :func:`launch`;
* :mod:`cachefit.deploy.verify`: outputs, losses and gradients against the unsplit model.

This package imports torch (a torch edge of cachefit); names are loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "deploy_plan": "cachefit.deploy.launcher",
    "launch": "cachefit.deploy.launcher",
    "NodeConfig": "cachefit.deploy.config",
    "RunConfig": "cachefit.deploy.config",
    "RunResult": "cachefit.deploy.launcher",
    "layout_from_plan": "cachefit.deploy.stages",
    "layout_from_module": "cachefit.deploy.stages",
    "build_stage": "cachefit.deploy.stages",
    "DeployLayout": "cachefit.deploy.stages",
    "StagePlacement": "cachefit.deploy.stages",
    "inspect_model_dir": "cachefit.deploy.models",
    "load_model": "cachefit.deploy.models",
    "check_run": "cachefit.deploy.verify",
    "save_outputs": "cachefit.deploy.verify",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cachefit.deploy' has no attribute {name!r}")
