"""Profiling: turn a model description into an ordered tuple of units with exact bytes.

``profile_model`` accepts a preset name, a Hugging Face ``config.json`` (or a model directory that
holds one), a parsed config dict, or a :class:`~cachefit.profile.spec.TransformerSpec`. A live
``torch.nn.Module`` is profiled by ``cachefit.profile.module.profile_module`` instead (the only
profiling path that imports torch).

``profile_model(..., measure=True)`` (or :func:`~cachefit.profile.measure.measure_profile`, which also
takes a live module) returns a :class:`~cachefit.profile.measure.MeasuredProfile`: the same units, with
the footprints measured by running the real ``transformers`` module on fake tensors (torch and
transformers are imported then, not before).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from cachefit.errors import ConfigError
from cachefit.profile.measure import MEMORY_SOURCES, MeasuredProfile, measure_profile, memory_source
from cachefit.profile.spec import TransformerSpec
from cachefit.profile.transformer import build_units, profile_transformer
from cachefit.units import ModelProfile, Workload


def _preset_names() -> tuple[str, ...]:
    try:
        from cachefit.profile.presets import list_presets
    except ImportError:
        return ()
    return tuple(p.name for p in list_presets())


def resolve_spec(model: object) -> TransformerSpec:
    """The spec of a preset name, a config.json / model directory path, a parsed config dict, or a spec.

    Raises:
        ConfigError: unknown preset / missing file, or a bad config.
    """
    if isinstance(model, TransformerSpec):
        return model
    if isinstance(model, Mapping):
        from cachefit.profile.hf_config import load_transformer_spec

        return load_transformer_spec(model)
    if isinstance(model, (str, os.PathLike)):
        path = Path(model).expanduser()
        if path.is_file() or (path.is_dir() and (path / "config.json").is_file()):
            from cachefit.profile.hf_config import load_transformer_spec

            return load_transformer_spec(path)
        preset_error = ""
        if isinstance(model, str) and not path.is_dir():
            try:
                from cachefit.profile.presets import load_preset
            except ImportError:
                preset_error = "no presets are installed"
            else:
                if model in _preset_names():
                    return load_preset(model)  # a broken preset file raises its own error
                try:
                    return load_preset(model)
                except ConfigError as exc:  # unknown name: say so next to the path that is missing
                    preset_error = str(exc)
        if path.is_dir():
            # A directory without config.json: let the loader say what is missing in it.
            from cachefit.profile.hf_config import load_transformer_spec

            return load_transformer_spec(path)
        names = _preset_names()
        known = ", ".join(names) if names else "(none installed)"
        raise ConfigError(
            f"model {str(model)!r} is neither an existing config.json / model directory nor a preset name"
            + (f" ({preset_error})" if preset_error else "")
            + "; give a path to a Hugging Face config.json or a directory holding one, or one of the "
            f"presets: {known} (list them with `cachefit profile --list`)"
        )
    raise ConfigError(
        f"cannot profile a {type(model).__name__}: profile_model takes a preset name, a path to a "
        "config.json or model directory, a parsed config dict, or a TransformerSpec; for a live "
        "torch.nn.Module use cachefit.profile.module.profile_module"
    )


def profile_model(
    model: str | os.PathLike[str] | Mapping[str, object] | TransformerSpec,
    workload: Workload | None = None,
    *,
    granularity: str = "layer",
    measure: bool = False,
) -> ModelProfile:
    """Profile a transformer for a workload.

    Args:
        model: a preset name, a path to an HF ``config.json`` or a model directory, a parsed
            config dict, or a ``TransformerSpec``.
        workload: batch, sequence, mode and dtypes; ``Workload()`` (decode, batch 1, 1024 tokens,
            fp16) when None.
        granularity: ``layer`` (one unit per decoder layer) or ``block`` (attention and MLP apart).
        measure: run the real module (the ``transformers`` class of the config) on fake tensors and
            take each unit's bytes from that run (a :class:`MeasuredProfile`); needs torch and
            transformers. Default: the analytic bytes.

    Raises:
        ConfigError: unknown preset / missing file, a bad config, or an unsupported model type;
            with ``measure``, transformers missing or a workload the real module cannot run.
        ProfileError: with ``measure``, a family without a transformers class, or a failed run.
    """
    if workload is not None and not isinstance(workload, Workload):
        raise ConfigError(
            f"profile_model: workload must be a cachefit.Workload or None, got {type(workload).__name__}; "
            "e.g. Workload(batch=1, seq_len=1024, mode='decode')"
        )
    if measure:
        return measure_profile(model, workload, granularity=granularity)
    spec = resolve_spec(model)
    return profile_transformer(spec, workload if workload is not None else Workload(), granularity=granularity)


__all__ = [
    "MEMORY_SOURCES",
    "MeasuredProfile",
    "TransformerSpec",
    "build_units",
    "measure_profile",
    "memory_source",
    "profile_model",
    "profile_transformer",
    "resolve_spec",
]
