"""The model families cachefit knows, one :class:`FamilySpec` each, keyed by ``model_type``.

One module per family (``families/llama.py``, ``families/gpt2.py``, ...) holds its config adapter
and its ``FAMILY`` spec; this registry collects them. Every other module asks here instead of
keeping its own table keyed by family names: ``profile/hf_config.py`` picks the adapter, the
compression code reads the MLP and transposed-weight patterns, the tensor-parallel split reads the
transposed weights, the live-module profiler reads the role names. Adding a family is one new module
plus its tests (``docs/families.md``). Pure Python: importing it imports no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from cachefit.errors import ProfileError
from cachefit.families import (
    bert,
    dense,
    falcon,
    gemma,
    gemma2,
    gpt2,
    gpt_neox,
    llama,
    mistral,
    mixtral,
    opt,
    phi3,
    qwen2,
    qwen3,
)
from cachefit.families.family_spec import (
    FamilySpec,
    Loss,
    MlpPattern,
    RoleNames,
    TensorParallelSpec,
)
from cachefit.families.reader import ConfigReader

FAMILIES: Mapping[str, FamilySpec] = MappingProxyType(
    {
        f.name: f
        for f in (
            llama.FAMILY,
            mistral.FAMILY,
            qwen2.FAMILY,
            qwen3.FAMILY,
            gemma.FAMILY,
            gemma2.FAMILY,
            phi3.FAMILY,
            mixtral.FAMILY,
            gpt2.FAMILY,
            gpt_neox.FAMILY,
            opt.FAMILY,
            bert.FAMILY,
            falcon.FAMILY,
            dense.FAMILY,
        )
    }
)
"""Every registered family by ``model_type``, in the order error messages list them."""

# Names of models cachefit profiles only as live nn.Modules (no config adapter): they join the
# families' names in the tables below, so the live-module profiler and compression know them too.
_LIVE_MLP_PATTERNS: tuple[MlpPattern, ...] = (
    MlpPattern(up="fc_in", down="fc_out"),  # GPT-J (transformers GPTJMLP)
)
_LIVE_ROLE_NAMES = RoleNames(
    # nn.MultiheadAttention (in_proj_weight, out_proj), timm ViT (qkv, proj, head),
    # gpt-fast / Meta's Llama reference (wqkv, wo), classifier heads, plain attention modules (out)
    qkv=("qkv", "wqkv", "in_proj"),
    attn_out=("out_proj", "wo", "proj", "out"),
    head=("classifier", "head"),
)


def family_names() -> tuple[str, ...]:
    """The registered ``model_type`` values, in registry order."""
    return tuple(FAMILIES)


def get_family(model_type: str) -> FamilySpec:
    """The spec of ``model_type``.

    Raises:
        ProfileError: the family is not registered; the message lists the ones that are.
    """
    try:
        return FAMILIES[model_type]
    except (KeyError, TypeError):
        raise ProfileError(
            f"model_type {model_type!r} is not supported; cachefit reads {', '.join(FAMILIES)} "
            f"(profile another model from its live nn.Module instead)"
        ) from None


def _unique(items: list) -> tuple:
    return tuple(dict.fromkeys(items))


def mlp_patterns() -> tuple[MlpPattern, ...]:
    """Every family's MLP patterns (and those of live-module-only models), each once; patterns with a
    gate come first, so that a gated MLP is not taken for the two-matrix MLP of the same names."""
    found = _unique([p for f in FAMILIES.values() for p in f.mlp_patterns] + list(_LIVE_MLP_PATTERNS))
    return tuple(sorted(found, key=lambda p: p.gate is None))


def mlp_up_names() -> tuple[str, ...]:
    """Names of the projections into an MLP's intermediate (up and gate), over all patterns."""
    return _unique([n for p in mlp_patterns() for n in p.up_names])


def mlp_down_names() -> tuple[str, ...]:
    """Names of the projections out of an MLP's intermediate, over all patterns."""
    return _unique([p.down for p in mlp_patterns()])


def transposed_weight_patterns() -> tuple[str, ...]:
    """fnmatch patterns of the weights stored (in, out), over all families (GPT-2's Conv1D)."""
    return _unique([pat for f in FAMILIES.values() for pat in f.transposed_weights])


def role_module_names() -> RoleNames:
    """Module names by weight role, over all families and the live-module-only models."""
    every = [*(f.role_names for f in FAMILIES.values()), _LIVE_ROLE_NAMES]
    return RoleNames(
        qkv=_unique([n for r in every for n in r.qkv]),
        attn_out=_unique([n for r in every for n in r.attn_out]),
        head=_unique([n for r in every for n in r.head]),
    )


__all__ = [
    "FAMILIES",
    "ConfigReader",
    "FamilySpec",
    "Loss",
    "MlpPattern",
    "RoleNames",
    "TensorParallelSpec",
    "family_names",
    "get_family",
    "mlp_down_names",
    "mlp_patterns",
    "mlp_up_names",
    "role_module_names",
    "transposed_weight_patterns",
]
