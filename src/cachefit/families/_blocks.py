"""Building blocks of the family adapters: tensors as the torch modules store them, and the
dimension rules (head_dim, KV heads, rotary dims, sliding windows) that several families share."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from cachefit.errors import ConfigError
from cachefit.families.reader import ConfigReader
from cachefit.units import TensorSpec

# ---------------------------------------------------------------------------------------------
# Tensor builders. Shapes are what the torch modules store.


def tensor(
    name: str, shape: tuple[int, ...], role: str, block: str | None = None, tied_to: str | None = None
) -> TensorSpec:
    return TensorSpec(name=name, shape=shape, role=role, block=block, tied_to=tied_to)


def linear(
    prefix: str, in_features: int, out_features: int, *, role: str, block: str | None, bias: bool
) -> tuple[TensorSpec, ...]:
    """``nn.Linear``: weight ``(out_features, in_features)``, bias ``(out_features,)``."""
    weight = tensor(f"{prefix}.weight", (out_features, in_features), role, block)
    if not bias:
        return (weight,)
    return (weight, tensor(f"{prefix}.bias", (out_features,), role, block))


def conv1d(prefix: str, in_features: int, out_features: int, *, role: str, block: str) -> tuple[TensorSpec, ...]:
    """GPT-2's ``Conv1D`` (``transformers.pytorch_utils``): weight ``(in_features, out_features)``,
    transposed against ``nn.Linear``, and always a bias ``(out_features,)``."""
    return (
        tensor(f"{prefix}.weight", (in_features, out_features), role, block),
        tensor(f"{prefix}.bias", (out_features,), role, block),
    )


def norm(prefix: str, dim: int, *, block: str | None, bias: bool, affine: bool = True) -> tuple[TensorSpec, ...]:
    """A norm: RMSNorm has a weight only, ``nn.LayerNorm`` a weight and a bias, and neither when
    ``elementwise_affine=False``."""
    if not affine:
        return ()
    weight = tensor(f"{prefix}.weight", (dim,), "norm", block)
    return (weight, tensor(f"{prefix}.bias", (dim,), "norm", block)) if bias else (weight,)


def lm_head(fqn: str, vocab: int, dim: int, *, tie_to: str | None) -> TensorSpec:
    """The LM head ``nn.Linear(dim, vocab, bias=False)``; tied, it is the embedding's tensor."""
    return tensor(fqn, (vocab, dim), "head", None, tie_to)


# ---------------------------------------------------------------------------------------------
# Shared dimension rules.


def common_dims(cfg: ConfigReader) -> tuple[int, int, int, int, int]:
    """hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, vocab_size."""
    return (
        cfg.integer("hidden_size"),
        cfg.integer("num_hidden_layers"),
        cfg.integer("num_attention_heads"),
        cfg.integer("intermediate_size"),
        cfg.integer("vocab_size"),
    )


def derived_head_dim(
    cfg: ConfigReader, hidden: int, heads: int, hidden_key: str, heads_key: str, *, explicit: bool
) -> int:
    """``hidden / heads``, where the family derives head_dim (or an explicit key is absent)."""
    if hidden % heads:
        fix = 'set "head_dim" explicitly or fix one of them' if explicit else (
            f"this family derives head_dim = {hidden_key} / {heads_key}; fix one of them"
        )
        raise ConfigError(
            f'{cfg.where}: "{hidden_key}" ({hidden}) is not a multiple of "{heads_key}" ({heads}); {fix}'
        )
    return hidden // heads


def head_dim(cfg: ConfigReader, hidden: int, heads: int, *, absent: int | None = None) -> int:
    """``head_dim`` where the family honours an explicit key (Llama, Mistral, Qwen2, Gemma, Phi-3,
    Mixtral, Qwen3, Gemma 2): the key if set; if absent, ``absent`` (a class default such as
    Gemma's 256) or hidden / heads; an explicit null means hidden / heads."""
    if cfg.data.get("head_dim") is not None or ("head_dim" not in cfg.data and absent is not None):
        return cfg.integer("head_dim", absent=absent, note=True)
    return derived_head_dim(cfg, hidden, heads, "hidden_size", "num_attention_heads", explicit=True)


def check_kv(cfg: ConfigReader, heads: int, kv_heads: int, heads_key: str, kv_key: str) -> None:
    if heads % kv_heads:
        raise ConfigError(
            f'{cfg.where}: "{heads_key}" ({heads}) is not a multiple of "{kv_key}" ({kv_heads}); '
            f"fix one of them (each key/value head serves a whole group of query heads)"
        )


def kv_heads(cfg: ConfigReader, heads: int, *, absent: int | None) -> int:
    """``num_key_value_heads``: absent -> the class default (None there means = heads);
    an explicit null -> = heads (what the classes' ``__post_init__`` does)."""
    kv = cfg.integer(
        "num_key_value_heads", absent=heads if absent is None else absent, null=heads, note=absent is not None
    )
    check_kv(cfg, heads, kv, "num_attention_heads", "num_key_value_heads")
    return kv


def rope_factor(cfg: ConfigReader) -> float | None:
    """``partial_rotary_factor`` as transformers 5 resolves it (``modeling_rope_utils``
    ``convert_rope_params_to_dict``): ``(rope_scaling or rope_parameters)`` first, then the top-level
    key; None when neither sets it."""
    rope = cfg.raw("rope_scaling") or cfg.raw("rope_parameters")
    if isinstance(rope, Mapping) and rope.get("partial_rotary_factor") is not None:
        return cfg.fraction("rope_parameters.partial_rotary_factor", rope["partial_rotary_factor"])
    if cfg.raw("partial_rotary_factor") is not None:
        return cfg.fraction("partial_rotary_factor", cfg.raw("partial_rotary_factor"))
    return None


def full_rotary(cfg: ConfigReader, head_dim: int, model_class: str) -> int:
    """Families whose default RoPE rotates the whole head (their rotary embedding takes
    ``dim = head_dim`` and ``apply_rotary_pos_emb`` rotates all of q and k)."""
    factor = rope_factor(cfg)
    if factor is not None and factor != 1.0:
        cfg.notes.append(
            f"partial_rotary_factor {factor} not used: {model_class} rotates the whole head "
            f"(rotary_dim = head_dim = {head_dim})"
        )
    return head_dim


def partial_rotary(cfg: ConfigReader, head_dim: int, *, default: float, legacy_key: str | None = None) -> int:
    """Families that rotate ``int(head_dim * partial_rotary_factor)`` dimensions per head (Phi-3,
    GPT-NeoX: ``rotary_ndims`` in their attention)."""
    rope = cfg.raw("rope_scaling") or cfg.raw("rope_parameters")
    if isinstance(rope, Mapping) and rope.get("partial_rotary_factor") is not None:
        factor = cfg.fraction("rope_parameters.partial_rotary_factor", rope["partial_rotary_factor"])
    elif legacy_key is not None:
        # GPTNeoXConfig.convert_rope_params_to_dict: rope dict first, then `rotary_pct`, then 0.25;
        # a top-level `partial_rotary_factor` is not read.
        value = cfg.raw(legacy_key)
        factor = default if value is None else cfg.fraction(legacy_key, value)
    else:
        top = cfg.raw("partial_rotary_factor")
        factor = default if top is None else cfg.fraction("partial_rotary_factor", top)
    return int(head_dim * factor)


def sliding_window(cfg: ConfigReader, *, absent: int | None) -> int | None:
    """``sliding_window`` of a family that applies it to every layer (null: none)."""
    return cfg.integer("sliding_window", absent=absent, null=None)


def layered_window(
    cfg: ConfigReader, layers: int, window: int | None, *, default_types: Callable[[], Sequence[bool]]
) -> int | None:
    """The window of a family whose config marks each layer ``sliding_attention`` or not.

    ``layer_types`` when given (one entry per layer), else ``default_types()`` (the config class's
    ``__post_init__`` rule, read only then). The spec has one window for all layers: the window when
    every layer slides; otherwise None (full attention, an upper bound on the KV cache) and, when
    only some layers slide, a note saying so.
    """
    if window is None:
        return None
    layer_types = cfg.raw("layer_types")
    if layer_types is None:
        sliding = list(default_types())
    elif isinstance(layer_types, list) and len(layer_types) == layers:
        sliding = [t == "sliding_attention" for t in layer_types]
    else:
        raise ConfigError(
            f'{cfg.where}: "layer_types" must be a list of {layers} entries (one per layer), got {layer_types!r}'
        )
    if all(sliding):
        return window
    if any(sliding):
        cfg.notes.append(
            f"sliding window {window} applies to {sum(sliding)} of {layers} layers only; "
            f"all layers are sized for full attention (an upper bound on the KV cache)"
        )
    return None
