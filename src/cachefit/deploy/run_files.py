"""The files of a run directory that launcher and ranks share: inputs, outputs, error reports.

A run directory holds ``plan.json`` and ``inputs.safetensors`` (written by the launcher),
``outputs.safetensors``, ``result.json`` and, per rank, ``grads-rank{R}.safetensors``,
``error-rank{R}.json`` and ``pid-rank{R}.json`` (written by the ranks). Every file is written whole
or not at all (a temporary file renamed into place).
"""

from __future__ import annotations

import contextlib
import json
import os
import traceback
from collections.abc import Mapping
from pathlib import Path

import torch

from cachefit.errors import ConfigError
from cachefit.files import atomic_path


def read_inputs_file(path: str | os.PathLike[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``input_ids`` (and optional ``attention_mask``) from a safetensors file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise ConfigError(f"--inputs {path}: cannot read it as safetensors ({exc})") from None
    if "input_ids" not in tensors:
        raise ConfigError(f"--inputs {path}: no tensor named 'input_ids' (found {sorted(tensors)})")
    return tensors["input_ids"], tensors.get("attention_mask")


def save_tensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Write ``tensors`` as one safetensors file, atomically."""
    from safetensors.torch import save_file

    with atomic_path(path, what="run file") as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))


def write_error(run_dir: Path, rank: int, where: str, exc: BaseException) -> None:
    """``error-rank{rank}.json``: which stage failed and how (the launcher turns these into one message)."""
    with contextlib.suppress(OSError):
        (run_dir / f"error-rank{rank}.json").write_text(json.dumps({
            "rank": rank, "stage": where, "error_type": type(exc).__name__, "message": str(exc),
            "traceback": traceback.format_exc(limit=8),
        }), encoding="utf-8")


STALE_PATTERNS = ("error-rank*.json", "grads-rank*.safetensors", "pid-rank*.json", "fault-rank*.json")
"""Per-rank files an earlier run in the same directory may have left (removed before a launch)."""
STALE_FILES = ("result.json", "outputs.safetensors")


def clear_stale(directory: Path) -> None:
    """Remove what an earlier run left in ``directory``, so that nothing of it is read as this run's."""
    stale = [p for pattern in STALE_PATTERNS for p in directory.glob(pattern)]
    for path in [*stale, *(directory / name for name in STALE_FILES)]:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
