"""How a run goes, as plain data: closed sets of strings checked with their allowed values named,
and one vocabulary of modes with the planner."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from typing import get_type_hints

import pytest

from cachefit.deploy.config import (
    LAUNCHERS,
    RUN_DTYPES,
    RUN_MODES,
    SCHEDULES,
    Launcher,
    NodeConfig,
    RunConfig,
    RunDtype,
    RunMode,
    Schedule,
)
from cachefit.errors import ConfigError
from cachefit.units import Mode


def test_run_modes_are_the_planner_s():
    assert RUN_MODES == tuple(m.value for m in Mode) == ("prefill", "decode", "train")
    assert RunConfig().mode == "prefill" and RunConfig().to_dict()["mode"] == "prefill"


def test_closed_sets_are_typed_and_checked_naming_the_allowed_values():
    hints = get_type_hints(RunConfig)
    assert (hints["mode"], hints["schedule"], hints["dtype"]) == (RunMode, Schedule, RunDtype)
    for field, allowed in (("schedule", SCHEDULES), ("mode", RUN_MODES), ("dtype", RUN_DTYPES)):
        with pytest.raises(ConfigError, match=f"--{field} 'nope': use one of {', '.join(allowed)}"):
            RunConfig(**{field: "nope"})
        with pytest.raises(ConfigError, match=f"--{field}"):
            RunConfig(**{field: None})
    for schedule in SCHEDULES:
        assert RunConfig(schedule=schedule, micro_batches=2).schedule == schedule
    assert LAUNCHERS == ("torchrun", "fork") and Launcher.__args__ == LAUNCHERS


def test_infer_is_refused_by_the_library_with_its_new_name():
    # only the CLI keeps `--mode infer` (an alias of prefill); the library speaks the planner's modes
    with pytest.raises(ConfigError, match=r"use one of prefill, decode, train \(infer is now called prefill\)"):
        RunConfig(mode="infer")


def test_numbers_are_checked():
    with pytest.raises(ConfigError, match="--micro-batches must be >= 1"):
        RunConfig(micro_batches=0)
    with pytest.raises(ConfigError, match="--timeout must be a number of seconds"):
        RunConfig(timeout_s=float("nan"))
    with pytest.raises(ConfigError, match="--rdzv-endpoint"):
        NodeConfig(nproc_per_node=1, nnodes=2, rdzv_endpoint="host")
    assert dataclasses.replace(RunConfig(), mode="decode", new_tokens=2).to_dict()["new_tokens"] == 2


def test_config_imports_no_torch():
    code = (
        "import sys, cachefit.deploy.config, cachefit.commands.run\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
