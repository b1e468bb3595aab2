"""Built-in model presets: the seed paper's model and popular models, as data.

Each ``<name>.json`` in this package holds ``{"name", "source", "as_of", "notes", "config"}``:
``config`` is the model's Hugging Face ``config.json`` (cachefit's own ``cachefit-dense`` family for
the seed paper's model), ``source`` the URL it was read from, ``as_of`` when, and ``notes`` every
assumption or change made. :func:`load_preset` turns one into a
:class:`~cachefit.profile.spec.TransformerSpec` through :func:`~cachefit.profile.hf_config.load_transformer_spec`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

from cachefit.errors import ConfigError
from cachefit.profile.hf_config import load_transformer_spec
from cachefit.profile.spec import TransformerSpec

_PRESET_KEYS = ("name", "source", "as_of", "notes", "config")


@dataclass(frozen=True, slots=True, kw_only=True)
class PresetInfo:
    """What a built-in preset is, without its tensors."""

    name: str
    """Name to pass to :func:`load_preset`, e.g. ``llama-3.1-8b``."""
    family: str
    """Spec family (``llama``, ``gpt2``, ..., ``dense``)."""
    params: int
    """Parameters, each tied tensor counted once (as ``model.parameters()``)."""
    source: str
    """URL of the published config (or the paper) the preset was read from."""
    as_of: str
    """Date (YYYY-MM-DD) the source was read."""
    notes: tuple[str, ...]
    """Assumptions and changes against the source."""


def _files() -> dict[str, Any]:
    """Preset name -> its resource file, for every ``*.json`` shipped in this package."""
    return {
        entry.name.removesuffix(".json"): entry
        for entry in resources.files(__name__).iterdir()
        if entry.name.endswith(".json")
    }


@functools.cache
def _read(name: str) -> dict[str, Any]:
    entry = _files()[name]
    where = f"preset {name} ({entry.name})"
    try:
        doc = json.loads(entry.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    missing = [k for k in _PRESET_KEYS if k not in doc]
    if missing:
        raise ConfigError(f"{where}: missing keys {missing}; a preset holds {list(_PRESET_KEYS)}")
    if doc["name"] != name:
        raise ConfigError(f'{where}: "name" is {doc["name"]!r}; it must match the file name {name!r}')
    if not isinstance(doc["config"], dict) or not isinstance(doc["notes"], list):
        raise ConfigError(f'{where}: "config" must be a JSON object and "notes" a list of strings')
    return doc


def _count_params(spec: TransformerSpec) -> int:
    """Parameters of a spec, a tied tensor counted once (under the tensor it is tied to)."""
    tensors = (*spec.embedding_tensors, *(t for layer in spec.layer_tensors for t in layer), *spec.head_tensors)
    return sum(t.numel for t in tensors if t.tied_to is None)


def _resolve(name: str) -> str:
    known = sorted(_files())
    key = name.strip().lower()
    if key in known:
        return key
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ConfigError(
        f"unknown preset {name!r}.{hint} Known presets: {', '.join(known)}; "
        f"or give a path to a config.json or a model directory"
    )


@functools.cache
def load_preset(name: str) -> TransformerSpec:
    """The spec of a built-in preset, e.g. ``load_preset("llama-3.1-8b")``.

    Raises:
        ConfigError: no preset has that name (the message lists them, with the closest ones).
    """
    key = _resolve(name)
    doc = _read(key)
    spec = load_transformer_spec(doc["config"], name=key)
    return dataclasses.replace(spec, source=doc["source"], notes=(*doc["notes"], *spec.notes))


def list_presets() -> tuple[PresetInfo, ...]:
    """Every built-in preset, sorted by name."""
    infos = []
    for name in sorted(_files()):
        doc = _read(name)
        spec = load_preset(name)
        infos.append(
            PresetInfo(
                name=name,
                family=spec.family,
                params=_count_params(spec),
                source=doc["source"],
                as_of=doc["as_of"],
                notes=spec.notes,
            )
        )
    return tuple(infos)


__all__ = ["PresetInfo", "list_presets", "load_preset"]
