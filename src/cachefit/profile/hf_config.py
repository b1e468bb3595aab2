"""Hugging Face ``config.json`` -> :class:`~cachefit.profile.spec.TransformerSpec`.

This module reads the file and picks the family; the families themselves live in
:mod:`cachefit.families`, one module per ``model_type``, each with an adapter that reads the keys
the ``transformers`` model class reads and lists every weight tensor that class creates, under the
FQN and shape ``named_parameters()`` gives it. The rules are written down there, with the
transformers class they mirror, so cachefit never imports transformers; the tests build the real
models on the meta device (transformers 5.x) and compare tensor by tensor.

Which model class a spec mirrors: for decoder families the ``*ForCausalLM`` class (what
``AutoModelForCausalLM`` builds), LM head included; a tied head is listed in ``head_tensors`` with
``tied_to`` naming the embedding it shares (``named_parameters()`` lists that tensor once, under the
embedding's name). BERT and cachefit's own ``cachefit-dense`` family say theirs in their modules.

Keys: the ones that size the weights are required (width, depth, attention heads, vocabulary, MLP
width, expert count, and the position count of learned position embeddings); a sizing tool must not
guess them. Every other key, when absent, takes the default of the transformers config class, and
a note on the spec records each default that shapes a weight (e.g. Mistral's 8 KV heads).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cachefit.errors import ConfigError, ProfileError
from cachefit.families import ConfigReader, family_names, get_family
from cachefit.files import read_json
from cachefit.profile.spec import TransformerSpec

logger = logging.getLogger(__name__)

SUPPORTED_FAMILIES: tuple[str, ...] = family_names()
"""The ``model_type`` values :func:`load_transformer_spec` accepts (the registry's families)."""


def _read_config(source: str | os.PathLike[str] | Mapping[str, Any]) -> tuple[Mapping[str, Any], str | None]:
    """The parsed config and the path of the file it came from (None for a mapping)."""
    if isinstance(source, Mapping):
        return source, None
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError(
            f"model config: expected a path to a config.json, a model directory or a dict, "
            f"got {type(source).__name__}"
        )
    path = Path(source)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"{path}: directory has no config.json; point at a Hugging Face model directory "
                f"(one that contains config.json) or at the config file itself"
            )
        path = path / "config.json"
    elif not path.exists():
        raise ConfigError(
            f"{path}: no such file or directory; give a config.json, a model directory containing "
            f"one, or a built-in preset name (cachefit.profile.presets.list_presets())"
        )
    # bounded, UTF-8 checked, nesting depth checked (cachefit.limits); NaN may sit in unread keys
    data = read_json(path, what="model config", finite=False)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data, str(path)


def load_transformer_spec(
    source: str | os.PathLike[str] | Mapping[str, Any], *, name: str | None = None
) -> TransformerSpec:
    """Read a Hugging Face config into a :class:`TransformerSpec`.

    Args:
        source: a path to a ``config.json``, a model directory containing ``config.json``, or an
            already-parsed config dict.
        name: the spec's name; default: the path as given, or for a dict its ``_name_or_path``
            (else its ``model_type``).

    Raises:
        ConfigError: unreadable file, missing or malformed key, inconsistent dimensions.
        ProfileError: a ``model_type`` outside :data:`SUPPORTED_FAMILIES`, or a variant cachefit
            does not profile (cross-attention).
    """
    data, path = _read_config(source)
    label = name or data.get("_name_or_path")
    where = path if path is not None else (f"config of {label}" if label else "config")
    model_type = data.get("model_type")
    if model_type is None:
        raise ConfigError(
            f'{where}: required key "model_type" is missing; add it (one of {", ".join(SUPPORTED_FAMILIES)})'
        )
    if not isinstance(model_type, str):
        raise ConfigError(f'{where}: "model_type" must be a string such as "llama", got {model_type!r}')
    try:
        family = get_family(model_type)
    except ProfileError as exc:
        raise ProfileError(f"{where}: {exc}") from None
    if name is None:
        name = str(source) if path is not None else str(data.get("_name_or_path") or model_type)
    cfg = ConfigReader(
        data, where=where, model_type=model_type, config_class=family.config_class, name=name, source=path or ""
    )
    spec = family.adapter(cfg)
    logger.debug("loaded %s (%s): %d layers, %d tensors per layer", name, model_type, spec.num_layers,
                 len(spec.layer_tensors[0]) if spec.layer_tensors else 0)
    return spec


# The keys a checkpoint's config names its dtype under: transformers 5 writes ``dtype``, earlier versions
# ``torch_dtype`` (5.x still reads it); where both are present ``dtype`` is the one transformers 5 uses.
_DTYPE_KEYS = ("dtype", "torch_dtype")


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigDtype:
    """The dtype a checkpoint's ``config.json`` says its weights are stored in."""

    dtype: str | None
    """cachefit's name for it (``fp32``, ``bf16``, ``fp16``, ``fp8``); None when the config names none
    cachefit plans in."""
    key: str | None
    """The key it was read from (``torch_dtype`` or ``dtype``); None when the config has neither."""
    value: Any = None
    """The value as written (``"bfloat16"``), or None."""
    where: str = ""
    """The file it came from ("" for a dict)."""

    def describe(self) -> str:
        """Where the dtype came from, for a note: ``the checkpoint's config (torch_dtype)``."""
        if self.dtype is not None:
            return f"the checkpoint's config ({self.key})"
        if self.key is None:
            return "no torch_dtype / dtype in the checkpoint's config"
        return f"the checkpoint's config names {self.key} {self.value!r}, which cachefit does not plan in"


def read_config_dtype(source: str | os.PathLike[str] | Mapping[str, Any]) -> ConfigDtype:
    """The weight dtype a Hugging Face config names (``dtype``, else ``torch_dtype``).

    A value cachefit has no dtype for (``"auto"``, ``"float64"``, a number) gives ``dtype=None`` with
    the key and value kept, so the caller can say what it fell back to.

    Raises:
        ConfigError: the file cannot be read (as :func:`load_transformer_spec`).
    """
    from cachefit.units import normalize_dtype

    data, path = _read_config(source)
    for key in _DTYPE_KEYS:
        if data.get(key) is None:
            continue
        value = data[key]
        try:
            dtype = normalize_dtype(value) if isinstance(value, str) else None
        except ConfigError:
            dtype = None
        if dtype is not None and dtype not in _PLANNED_DTYPES:
            dtype = None
        return ConfigDtype(dtype=dtype, key=key, value=value, where=path or "")
    return ConfigDtype(dtype=None, key=None, where=path or "")


# the weight dtypes a plan is made in (`--dtype`): int8 / int4 are compression, not a checkpoint's dtype
_PLANNED_DTYPES = ("fp32", "bf16", "fp16", "fp8")


__all__ = ["SUPPORTED_FAMILIES", "ConfigDtype", "load_transformer_spec", "read_config_dtype"]
