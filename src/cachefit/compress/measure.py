"""Measuring a module that compression changed: its real bytes, and how close an encoder stays.

:func:`measure_module_bytes` reads the bytes a module's tensors really occupy (storages, each
counted once), with quantized weights' scales and sparsity metadata under their own keys next to
the weight's FQN; :func:`bytes_by_role` groups them as the planner's ``Footprint.weight_roles``
does, so deploy can check each stage against the plan. :func:`embedding_cosine` compares a
compressed encoder's embeddings with the original's.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from cachefit.compress.linear import check_fqns
from cachefit.errors import ConfigError
from cachefit.units import TensorSpec

__all__ = ["base_fqn", "bytes_by_role", "embedding_cosine", "measure_module_bytes"]


# --------------------------------------------------------------------------------------------------
# Real bytes

# Suffixes of the tensors stored next to a weight ``<fqn>``: ``<fqn>_scale``, ``<fqn>_zero_point``,
# ``<fqn>_scales_and_zeros`` (role "scales"), ``<fqn>_meta`` / bitmasks (role "metadata").
_SCALE_MARKERS = ("scale", "zero")
_METADATA_MARKERS = ("meta", "bitmask")


def _companion_role(suffix: str) -> str | None:
    lowered = suffix.lower()
    if any(m in lowered for m in _METADATA_MARKERS):
        return "metadata"
    if any(m in lowered for m in _SCALE_MARKERS):
        return "scales"
    return None


def base_fqn(key: str) -> str:
    """The weight a measured key belongs to: ``a.weight_scale`` -> ``a.weight``; any other key is its
    own base."""
    owner, _, name = key.rpartition(".")
    stem, sep, suffix = name.partition("_")
    if sep and _companion_role(suffix) is not None:
        return f"{owner}.{stem}" if owner else stem
    return key


def _storage_parts(fqn: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """(key, plain tensor) pairs holding the storages of ``tensor``; wrapper subclasses (torchao's
    quantized tensors, semi-structured sparse) are opened to their inner tensors: values under
    ``fqn``, scales / zero points / metadata under ``fqn_<inner name>``."""
    if is_traceable_wrapper_subclass(tensor):
        inner_names, _ = tensor.__tensor_flatten__()
        parts = []
        for inner in inner_names:
            value = getattr(tensor, inner)
            if value is None:
                continue
            key = f"{fqn}_{inner}" if _companion_role(inner) is not None else fqn
            parts += _storage_parts(key, value)
        return parts
    return [(fqn, tensor)]


def measure_module_bytes(module: nn.Module, fqns: Collection[str] | None = None) -> dict[str, int]:
    """Real bytes of a module's parameters and buffers, by FQN, each storage counted once.

    Bytes are the storages' sizes (a view of a larger tensor counts the whole storage it keeps
    alive). Quantized weights appear as their values under the weight's FQN and their scales / zero
    points / metadata under ``<fqn>_scale``, ``<fqn>_scales_and_zeros``, ``<fqn>_zero_point``,
    ``<fqn>_meta``. A storage shared by several FQNs (a tied LM head) is counted under the first
    FQN that ``named_parameters(remove_duplicate=False)`` gives.

    Args:
        module: the module to measure.
        fqns: keep only these FQNs (and the scales / metadata stored next to them); None keeps all.
            Names of weights that were compressed still select their values and scales.
    """
    wanted = None if fqns is None else frozenset(check_fqns(fqns, "measure_module_bytes: fqns"))
    seen: set[int] = set()
    out: dict[str, int] = {}
    named = [
        *module.named_parameters(remove_duplicate=False),
        *module.named_buffers(remove_duplicate=False),
    ]
    for fqn, tensor in named:
        if tensor is None:
            continue
        for key, part in _storage_parts(fqn, tensor):
            if wanted is not None and key not in wanted and base_fqn(key) not in wanted:
                continue
            storage = part.untyped_storage()
            ident = storage._cdata  # one StorageImpl per real allocation, whatever Python object wraps it
            if ident in seen:
                continue
            seen.add(ident)
            out[key] = out.get(key, 0) + storage.nbytes()
    return out


def bytes_by_role(measured: Mapping[str, int], tensors: Sequence[TensorSpec]) -> dict[str, int]:
    """Group measured bytes by the roles of ``tensors`` (a unit's ``TensorSpec``s): scales and zero
    points go to ``scales``, sparsity metadata to ``metadata`` (as ``Footprint.weight_roles`` does);
    FQNs not among ``tensors`` go to ``other``."""
    role_of = {t.name: t.role for t in tensors}
    out: dict[str, int] = {}
    for key, nbytes in measured.items():
        base = base_fqn(key)
        if base != key and base in role_of:
            role = _companion_role(key[len(base) + 1 :]) or role_of[base]
        else:
            role = role_of.get(key, "other")
        out[role] = out.get(role, 0) + nbytes
    return out


# --------------------------------------------------------------------------------------------------
# Quality


def embedding_cosine(
    model_fp32: nn.Module,
    model_q: nn.Module,
    sentences: Sequence[str] | Mapping[str, torch.Tensor],
    *,
    tokenizer: Any = None,
) -> float:
    """Smallest cosine similarity, over sentences, of mean-pooled embeddings of two encoders.

    Mean pooling over the tokens the attention mask keeps (sentence-transformers' pooling for
    all-MiniLM-L6-v2). ``sentences`` are strings (tokenized with ``tokenizer``, by default the
    tokenizer saved next to ``model_fp32``'s checkpoint, loaded offline) or an already tokenized
    batch (``input_ids``, ``attention_mask``).

    Raises:
        ConfigError: no sentences, or strings without a tokenizer to read them.
    """
    if isinstance(sentences, Mapping):
        batch = dict(sentences)
    else:
        sentences = list(sentences)
        if not sentences or not all(isinstance(s, str) for s in sentences):
            raise ConfigError("embedding_cosine: give a non-empty list of sentences (strings) or a tokenized batch")
        if tokenizer is None:
            path = getattr(getattr(model_fp32, "config", None), "_name_or_path", "")
            if not path:
                raise ConfigError(
                    "embedding_cosine: no tokenizer given and the model does not say where it was loaded from; "
                    "pass tokenizer=AutoTokenizer.from_pretrained(...)"
                )
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        batch = dict(tokenizer(sentences, padding=True, truncation=True, return_tensors="pt"))
    if "input_ids" not in batch:
        raise ConfigError(f"embedding_cosine: the tokenized batch has no input_ids (keys: {sorted(batch)})")
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(batch["input_ids"])

    def embed(model: nn.Module) -> torch.Tensor:
        param = next(iter(model.parameters()), None)
        dev = param.device if param is not None else torch.device("cpu")
        with torch.no_grad():
            out = model(**{k: v.to(dev) for k, v in batch.items()})
        hidden = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
        m = mask.to(hidden.device).unsqueeze(-1).to(hidden.dtype)
        return ((hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)).float().cpu()

    a, b = embed(model_fp32), embed(model_q)
    return float(F.cosine_similarity(a, b, dim=-1).min())
