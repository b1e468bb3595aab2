"""Hugging Face ``config.json`` -> :class:`~cachefit.profile.spec.TransformerSpec`.

One adapter per ``model_type``. Each reads the keys that the ``transformers`` model class reads and
lists every weight tensor that class creates, under the FQN and shape ``named_parameters()`` gives
it. The rules are written down here, with the transformers class they mirror, so this module never
imports transformers; the tests build the real models on the meta device (transformers 5.x) and
compare tensor by tensor.

Which model class a spec mirrors:

* decoder families: the ``*ForCausalLM`` class (what ``AutoModelForCausalLM`` builds), LM head
  included. A tied head is listed in ``head_tensors`` with ``tied_to`` naming the embedding it
  shares (``named_parameters()`` lists that tensor once, under the embedding's name).
* ``bert``: ``BertForMaskedLM`` when ``architectures[0]`` names it (no pooler; the MLM head:
  transform dense + LayerNorm, a decoder tied to the word embeddings, an output bias), otherwise
  ``BertModel`` with its pooler (what ``AutoModel`` builds; ``architectures`` absent, ``BertModel``,
  or a task class whose head is then left out, which a note says).
* ``cachefit-dense``: cachefit's own family for the seed paper's model: a pre-norm decoder with
  weight-only RMS norms, no biases, a two-matrix MLP (up, down) and Llama's module names.

Keys: the ones that size the weights are required (width, depth, attention heads, vocabulary, MLP
width, expert count, and the position count of learned position embeddings); a sizing tool must not
guess them. Every other key, when absent, takes the default of the transformers config class, and
a note on the spec records each default that shapes a weight (e.g. Mistral's 8 KV heads).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cachefit.errors import ConfigError, ProfileError
from cachefit.files import read_json
from cachefit.limits import check_limit
from cachefit.profile.spec import TransformerSpec
from cachefit.units import TensorSpec

logger = logging.getLogger(__name__)

_REQUIRED: Any = object()  # sentinel: the key must be present
# keys that set how many times a table is repeated, and the limit each is checked against
_COUNT_LIMITS = {"num_hidden_layers": "MAX_LAYERS", "n_layer": "MAX_LAYERS"}
_REJECT: Any = object()  # sentinel: an explicit JSON null is an error


class _Config:
    """Typed reads of a parsed config; every error names the key, the file and the fix."""

    def __init__(self, data: Mapping[str, Any], *, where: str, model_type: str, config_class: str) -> None:
        self.data = data
        self.where = where
        self.model_type = model_type
        self.config_class = config_class
        self.notes: list[str] = []

    def _lookup(self, key: str, aliases: tuple[str, ...]) -> tuple[bool, Any, str]:
        present = [k for k in (key, *aliases) if k in self.data]
        values = {json.dumps(self.data[k], sort_keys=True, default=repr) for k in present}
        if len(values) > 1:
            found = ", ".join(f'"{k}": {self.data[k]!r}' for k in present)
            raise ConfigError(
                f"{self.where}: conflicting keys {found} (transformers reads them as one setting); "
                f"keep only one of them"
            )
        if present:
            return True, self.data[present[0]], present[0]
        return False, None, key

    def raw(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def integer(
        self,
        key: str,
        *,
        absent: Any = _REQUIRED,
        null: Any = _REJECT,
        minimum: int = 1,
        aliases: tuple[str, ...] = (),
        note: bool = False,
    ) -> int:
        """Read an integer key.

        ``absent``: value when the key is missing (the transformers class default), or required.
        ``null``: value when the key is an explicit ``null``, or an error. ``note``: record in the
        spec's notes when ``absent`` was used (for defaults that shape weights).
        """
        found, value, used = self._lookup(key, aliases)
        if not found:
            if absent is _REQUIRED:
                raise ConfigError(
                    f'{self.where}: required key "{key}" is missing (model_type "{self.model_type}"); '
                    f"add it, with the value from the model's published config.json"
                )
            if note and absent is not None:
                self.notes.append(f"{key} absent: {self.config_class} default {absent} used")
            return absent
        if value is None:
            if null is _REJECT:
                raise ConfigError(
                    f'{self.where}: "{used}" is null; write an integer (model_type "{self.model_type}")'
                )
            return null
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f'{self.where}: "{used}" must be an integer, got {value!r}; write a JSON integer')
        if value < minimum:
            what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise ConfigError(f'{self.where}: "{used}" must be {what}, got {value}; fix it in the config')
        if used in _COUNT_LIMITS:  # before any per-layer table is built
            check_limit(value, _COUNT_LIMITS[used], where=self.where, what=used)
        return value

    def flag(self, key: str, *, absent: bool, null: Any = _REJECT) -> bool:
        """Read a boolean key (``absent``: the transformers class default)."""
        found, value, used = self._lookup(key, ())
        if not found:
            return absent
        if value is None:
            if null is _REJECT:
                raise ConfigError(f'{self.where}: "{used}" is null; write true or false')
            return bool(null)
        if not isinstance(value, bool):
            raise ConfigError(f'{self.where}: "{used}" must be true or false, got {value!r}')
        return value

    def fraction(self, key: str, value: Any) -> float:
        """Check a factor in (0, 1] such as ``partial_rotary_factor``."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ConfigError(f'{self.where}: "{key}" must be a number in (0, 1], got {value!r}')
        return float(value)


# ---------------------------------------------------------------------------------------------
# Tensor builders. Shapes are what the torch modules store.


def _tensor(
    name: str, shape: tuple[int, ...], role: str, block: str | None = None, tied_to: str | None = None
) -> TensorSpec:
    return TensorSpec(name=name, shape=shape, role=role, block=block, tied_to=tied_to)


def _linear(
    prefix: str, in_features: int, out_features: int, *, role: str, block: str | None, bias: bool
) -> tuple[TensorSpec, ...]:
    """``nn.Linear``: weight ``(out_features, in_features)``, bias ``(out_features,)``."""
    weight = _tensor(f"{prefix}.weight", (out_features, in_features), role, block)
    if not bias:
        return (weight,)
    return (weight, _tensor(f"{prefix}.bias", (out_features,), role, block))


def _conv1d(prefix: str, in_features: int, out_features: int, *, role: str, block: str) -> tuple[TensorSpec, ...]:
    """GPT-2's ``Conv1D`` (``transformers.pytorch_utils``): weight ``(in_features, out_features)``,
    transposed against ``nn.Linear``, and always a bias ``(out_features,)``."""
    return (
        _tensor(f"{prefix}.weight", (in_features, out_features), role, block),
        _tensor(f"{prefix}.bias", (out_features,), role, block),
    )


def _norm(prefix: str, dim: int, *, block: str | None, bias: bool, affine: bool = True) -> tuple[TensorSpec, ...]:
    """A norm: RMSNorm has a weight only, ``nn.LayerNorm`` a weight and a bias, and neither when
    ``elementwise_affine=False``."""
    if not affine:
        return ()
    weight = _tensor(f"{prefix}.weight", (dim,), "norm", block)
    return (weight, _tensor(f"{prefix}.bias", (dim,), "norm", block)) if bias else (weight,)


def _lm_head(fqn: str, vocab: int, dim: int, *, tie_to: str | None) -> TensorSpec:
    """The LM head ``nn.Linear(dim, vocab, bias=False)``; tied, it is the embedding's tensor."""
    return _tensor(fqn, (vocab, dim), "head", None, tie_to)


# ---------------------------------------------------------------------------------------------
# Shared dimension rules.


def _derived_head_dim(
    cfg: _Config, hidden: int, heads: int, hidden_key: str, heads_key: str, *, explicit: bool
) -> int:
    if hidden % heads:
        fix = 'set "head_dim" explicitly or fix one of them' if explicit else (
            f"this family derives head_dim = {hidden_key} / {heads_key}; fix one of them"
        )
        raise ConfigError(
            f'{cfg.where}: "{hidden_key}" ({hidden}) is not a multiple of "{heads_key}" ({heads}); {fix}'
        )
    return hidden // heads


def _head_dim(cfg: _Config, hidden: int, heads: int, *, absent: int | None = None) -> int:
    """``head_dim`` where the family honours an explicit key (Llama, Mistral, Qwen2, Gemma, Phi-3,
    Mixtral): the key if set; if absent, ``absent`` (Gemma's class default 256) or hidden / heads;
    an explicit null means hidden / heads."""
    if cfg.data.get("head_dim") is not None or ("head_dim" not in cfg.data and absent is not None):
        return cfg.integer("head_dim", absent=absent, note=True)
    return _derived_head_dim(cfg, hidden, heads, "hidden_size", "num_attention_heads", explicit=True)


def _check_kv(cfg: _Config, heads: int, kv_heads: int, heads_key: str, kv_key: str) -> None:
    if heads % kv_heads:
        raise ConfigError(
            f'{cfg.where}: "{heads_key}" ({heads}) is not a multiple of "{kv_key}" ({kv_heads}); '
            f"fix one of them (each key/value head serves a whole group of query heads)"
        )


def _rope_factor(cfg: _Config) -> float | None:
    """``partial_rotary_factor`` as transformers 5 resolves it (``modeling_rope_utils``
    ``convert_rope_params_to_dict``): ``(rope_scaling or rope_parameters)`` first, then the top-level
    key; None when neither sets it."""
    rope = cfg.raw("rope_scaling") or cfg.raw("rope_parameters")
    if isinstance(rope, Mapping) and rope.get("partial_rotary_factor") is not None:
        return cfg.fraction("rope_parameters.partial_rotary_factor", rope["partial_rotary_factor"])
    if cfg.raw("partial_rotary_factor") is not None:
        return cfg.fraction("partial_rotary_factor", cfg.raw("partial_rotary_factor"))
    return None


def _full_rotary(cfg: _Config, head_dim: int, model_class: str) -> int:
    """Families whose default RoPE rotates the whole head (their rotary embedding takes
    ``dim = head_dim`` and ``apply_rotary_pos_emb`` rotates all of q and k)."""
    factor = _rope_factor(cfg)
    if factor is not None and factor != 1.0:
        cfg.notes.append(
            f"partial_rotary_factor {factor} not used: {model_class} rotates the whole head "
            f"(rotary_dim = head_dim = {head_dim})"
        )
    return head_dim


def _partial_rotary(cfg: _Config, head_dim: int, *, default: float, legacy_key: str | None = None) -> int:
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


def _sliding_window(cfg: _Config, *, absent: int | None) -> int | None:
    return cfg.integer("sliding_window", absent=absent, null=None)


def _decoder_fields(
    *,
    family: str,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    intermediate: int,
    vocab: int,
    gated: bool,
    tie: bool,
    max_positions: int,
    rotary_dim: int,
    embedding: tuple[TensorSpec, ...],
    layer_tensors: tuple[tuple[TensorSpec, ...], ...],
    head: tuple[TensorSpec, ...],
    sliding_window: int | None = None,
    parallel: bool = False,
    num_experts: int = 0,
    experts_per_token: int = 0,
    causal: bool = True,
) -> dict[str, Any]:
    return dict(
        family=family,
        causal=causal,
        num_layers=layers,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate,
        vocab_size=vocab,
        gated_mlp=gated,
        num_experts=num_experts,
        experts_per_token=experts_per_token,
        parallel_attn_mlp=parallel,
        rotary_dim=rotary_dim,
        sliding_window=sliding_window,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie,
        embedding_tensors=embedding,
        layer_tensors=layer_tensors,
        head_tensors=head,
    )


# ---------------------------------------------------------------------------------------------
# Llama-like decoders: llama, mistral, qwen2, gemma, phi3, mixtral, and cachefit-dense.
# transformers: models/<family>/modeling_<family>.py; <Family>DecoderLayer holds input_layernorm,
# self_attn, post_attention_layernorm, mlp; <Family>Model holds embed_tokens and norm.


def _llama_like(
    cfg: _Config,
    *,
    family: str,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    intermediate: int,
    vocab: int,
    tie: bool,
    max_positions: int,
    rotary_dim: int,
    mlp: str,
    qkv_bias: bool = False,
    o_bias: bool = False,
    mlp_bias: bool = False,
    fused_qkv: bool = False,
    sliding_window: int | None = None,
    num_experts: int = 0,
    experts_per_token: int = 0,
) -> dict[str, Any]:
    """Tensors of a Llama-style pre-norm decoder.

    ``mlp``: ``gated`` (gate_proj, up_proj, down_proj), ``fused_gated`` (Phi-3 gate_up_proj of
    2 x intermediate rows, down_proj), ``plain`` (up_proj, down_proj: cachefit-dense) or ``moe``
    (Mixtral in transformers 5: router ``mlp.gate`` and the experts fused into 3-D parameters
    ``mlp.experts.gate_up_proj`` (E, 2I, H) and ``mlp.experts.down_proj`` (E, H, I)).
    """
    embed = "model.embed_tokens.weight"
    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    all_layers = []
    for i in range(layers):
        p = f"model.layers.{i}"
        tensors: list[TensorSpec] = [*_norm(f"{p}.input_layernorm", hidden, block="attn", bias=False)]
        if fused_qkv:  # Phi3Attention.qkv_proj: rows = q, then k, then v
            tensors += _linear(
                f"{p}.self_attn.qkv_proj", hidden, q_out + 2 * kv_out, role="qkv", block="attn", bias=qkv_bias
            )
        else:
            tensors += _linear(f"{p}.self_attn.q_proj", hidden, q_out, role="qkv", block="attn", bias=qkv_bias)
            tensors += _linear(f"{p}.self_attn.k_proj", hidden, kv_out, role="qkv", block="attn", bias=qkv_bias)
            tensors += _linear(f"{p}.self_attn.v_proj", hidden, kv_out, role="qkv", block="attn", bias=qkv_bias)
        tensors += _linear(f"{p}.self_attn.o_proj", q_out, hidden, role="attn_out", block="attn", bias=o_bias)
        tensors += _norm(f"{p}.post_attention_layernorm", hidden, block="mlp", bias=False)
        if mlp == "gated":
            tensors += _linear(f"{p}.mlp.gate_proj", hidden, intermediate, role="mlp", block="mlp", bias=mlp_bias)
            tensors += _linear(f"{p}.mlp.up_proj", hidden, intermediate, role="mlp", block="mlp", bias=mlp_bias)
            tensors += _linear(f"{p}.mlp.down_proj", intermediate, hidden, role="mlp", block="mlp", bias=mlp_bias)
        elif mlp == "fused_gated":
            tensors += _linear(
                f"{p}.mlp.gate_up_proj", hidden, 2 * intermediate, role="mlp", block="mlp", bias=False
            )
            tensors += _linear(f"{p}.mlp.down_proj", intermediate, hidden, role="mlp", block="mlp", bias=False)
        elif mlp == "plain":
            tensors += _linear(f"{p}.mlp.up_proj", hidden, intermediate, role="mlp", block="mlp", bias=False)
            tensors += _linear(f"{p}.mlp.down_proj", intermediate, hidden, role="mlp", block="mlp", bias=False)
        elif mlp == "moe":
            tensors.append(_tensor(f"{p}.mlp.gate.weight", (num_experts, hidden), "router", "mlp"))
            tensors.append(
                _tensor(f"{p}.mlp.experts.gate_up_proj", (num_experts, 2 * intermediate, hidden), "experts", "mlp")
            )
            tensors.append(
                _tensor(f"{p}.mlp.experts.down_proj", (num_experts, hidden, intermediate), "experts", "mlp")
            )
        else:  # pragma: no cover - internal
            raise AssertionError(mlp)
        all_layers.append(tuple(tensors))
    head = (
        *_norm("model.norm", hidden, block=None, bias=False),
        _lm_head("lm_head.weight", vocab, hidden, tie_to=embed if tie else None),
    )
    return _decoder_fields(
        family=family,
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate=intermediate,
        vocab=vocab,
        gated=mlp in ("gated", "fused_gated", "moe"),
        tie=tie,
        max_positions=max_positions,
        rotary_dim=rotary_dim,
        embedding=(_tensor(embed, (vocab, hidden), "embed"),),
        layer_tensors=tuple(all_layers),
        head=head,
        sliding_window=sliding_window,
        num_experts=num_experts,
        experts_per_token=experts_per_token,
    )


def _common_dims(cfg: _Config) -> tuple[int, int, int, int, int]:
    """hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, vocab_size."""
    return (
        cfg.integer("hidden_size"),
        cfg.integer("num_hidden_layers"),
        cfg.integer("num_attention_heads"),
        cfg.integer("intermediate_size"),
        cfg.integer("vocab_size"),
    )


def _kv_heads(cfg: _Config, heads: int, *, absent: int | None) -> int:
    """``num_key_value_heads``: absent -> the class default (None there means = heads);
    an explicit null -> = heads (what the classes' ``__post_init__`` does)."""
    kv = cfg.integer(
        "num_key_value_heads", absent=heads if absent is None else absent, null=heads, note=absent is not None
    )
    _check_kv(cfg, heads, kv, "num_attention_heads", "num_key_value_heads")
    return kv


def _build_llama(cfg: _Config) -> dict[str, Any]:
    # LlamaConfig: num_key_value_heads None (-> heads), head_dim None (-> hidden/heads),
    # attention_bias False (q, k, v and o), mlp_bias False, tie_word_embeddings False,
    # max_position_embeddings 2048.
    hidden, layers, heads, inter, vocab = _common_dims(cfg)
    kv = _kv_heads(cfg, heads, absent=None)
    head_dim = _head_dim(cfg, hidden, heads)
    attn_bias = cfg.flag("attention_bias", absent=False)
    return _llama_like(
        cfg,
        family="llama",
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv,
        head_dim=head_dim,
        intermediate=inter,
        vocab=vocab,
        tie=cfg.flag("tie_word_embeddings", absent=False),
        max_positions=cfg.integer("max_position_embeddings", absent=2048),
        rotary_dim=_full_rotary(cfg, head_dim, "LlamaRotaryEmbedding"),
        mlp="gated",
        qkv_bias=attn_bias,
        o_bias=attn_bias,
        mlp_bias=cfg.flag("mlp_bias", absent=False),
    )


def _build_mistral(cfg: _Config) -> dict[str, Any]:
    # MistralConfig: num_key_value_heads 8, head_dim None (-> hidden/heads), no biases,
    # tie_word_embeddings False, max_position_embeddings 4096 * 32, sliding_window 4096 (every layer).
    hidden, layers, heads, inter, vocab = _common_dims(cfg)
    kv = _kv_heads(cfg, heads, absent=8)
    head_dim = _head_dim(cfg, hidden, heads)
    return _llama_like(
        cfg,
        family="mistral",
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv,
        head_dim=head_dim,
        intermediate=inter,
        vocab=vocab,
        tie=cfg.flag("tie_word_embeddings", absent=False),
        max_positions=cfg.integer("max_position_embeddings", absent=4096 * 32),
        rotary_dim=_full_rotary(cfg, head_dim, "MistralRotaryEmbedding"),
        mlp="gated",
        sliding_window=_sliding_window(cfg, absent=4096),
    )


def _qwen2_window(cfg: _Config, layers: int) -> int | None:
    """Qwen2Config.__post_init__: the window applies only with ``use_sliding_window``, and only to
    the layers ``layer_types`` marks ``sliding_attention`` (default: index >= max_window_layers)."""
    window = _sliding_window(cfg, absent=4096) if cfg.flag("use_sliding_window", absent=False) else None
    if window is None:
        return None
    layer_types = cfg.raw("layer_types")
    if layer_types is None:
        first = cfg.integer("max_window_layers", absent=28, minimum=0)
        sliding = [i >= first for i in range(layers)]
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


def _build_qwen2(cfg: _Config) -> dict[str, Any]:
    # Qwen2Config: num_key_value_heads 32, no head_dim field (Qwen2Attention reads
    # getattr(config, "head_dim", hidden/heads)), q/k/v biases True and o_proj bias False
    # (hard-coded in Qwen2Attention), tie_word_embeddings False, max_position_embeddings 32768.
    hidden, layers, heads, inter, vocab = _common_dims(cfg)
    kv = _kv_heads(cfg, heads, absent=32)
    head_dim = _head_dim(cfg, hidden, heads)
    return _llama_like(
        cfg,
        family="qwen2",
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv,
        head_dim=head_dim,
        intermediate=inter,
        vocab=vocab,
        tie=cfg.flag("tie_word_embeddings", absent=False),
        max_positions=cfg.integer("max_position_embeddings", absent=32768),
        rotary_dim=_full_rotary(cfg, head_dim, "Qwen2RotaryEmbedding"),
        mlp="gated",
        qkv_bias=True,
        sliding_window=_qwen2_window(cfg, layers),
    )


def _build_gemma(cfg: _Config) -> dict[str, Any]:
    # GemmaConfig: num_key_value_heads 16, head_dim 256 (not hidden/heads), attention_bias False,
    # tie_word_embeddings True, max_position_embeddings 8192. GemmaRMSNorm has a weight only.
    hidden, layers, heads, inter, vocab = _common_dims(cfg)
    kv = _kv_heads(cfg, heads, absent=16)
    head_dim = _head_dim(cfg, hidden, heads, absent=256)
    attn_bias = cfg.flag("attention_bias", absent=False)
    return _llama_like(
        cfg,
        family="gemma",
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv,
        head_dim=head_dim,
        intermediate=inter,
        vocab=vocab,
        tie=cfg.flag("tie_word_embeddings", absent=True),
        max_positions=cfg.integer("max_position_embeddings", absent=8192),
        rotary_dim=_full_rotary(cfg, head_dim, "GemmaRotaryEmbedding"),
        mlp="gated",
        qkv_bias=attn_bias,
        o_bias=attn_bias,
    )


def _build_phi3(cfg: _Config) -> dict[str, Any]:
    # Phi3Config: num_key_value_heads None (-> heads), no head_dim field (read with getattr),
    # no biases, fused qkv_proj and gate_up_proj, tie_word_embeddings False,
    # max_position_embeddings 4096, sliding_window None; Phi3RotaryEmbedding rotates
    # int(head_dim * partial_rotary_factor) dimensions (default 1.0).
    hidden, layers, heads, inter, vocab = _common_dims(cfg)
    kv = _kv_heads(cfg, heads, absent=None)
    head_dim = _head_dim(cfg, hidden, heads)
    return _llama_like(
        cfg,
        family="phi3",
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv,
        head_dim=head_dim,
        intermediate=inter,
        vocab=vocab,
        tie=cfg.flag("tie_word_embeddings", absent=False),
        max_positions=cfg.integer("max_position_embeddings", absent=4096),
        rotary_dim=_partial_rotary(cfg, head_dim, default=1.0),
        mlp="fused_gated",
        fused_qkv=True,
        sliding_window=_sliding_window(cfg, absent=None),
    )


def _build_mixtral(cfg: _Config) -> dict[str, Any]:
    # MixtralConfig: num_key_value_heads 8, head_dim None (-> hidden/heads), num_local_experts 8
    # (alias num_experts; required here, it sizes most weights), num_experts_per_tok 2,
    # tie_word_embeddings False, max_position_embeddings 4096 * 32, sliding_window None.
    hidden, layers, heads, inter, vocab = _common_dims(cfg)
    kv = _kv_heads(cfg, heads, absent=8)
    head_dim = _head_dim(cfg, hidden, heads)
    experts = cfg.integer("num_local_experts", aliases=("num_experts",))
    top_k = cfg.integer("num_experts_per_tok", absent=2, note=True)
    if top_k > experts:
        raise ConfigError(
            f'{cfg.where}: "num_experts_per_tok" ({top_k}) exceeds "num_local_experts" ({experts}); '
            f"a token cannot be routed to more experts than exist, lower num_experts_per_tok"
        )
    return _llama_like(
        cfg,
        family="mixtral",
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv,
        head_dim=head_dim,
        intermediate=inter,
        vocab=vocab,
        tie=cfg.flag("tie_word_embeddings", absent=False),
        max_positions=cfg.integer("max_position_embeddings", absent=4096 * 32),
        rotary_dim=_full_rotary(cfg, head_dim, "MixtralRotaryEmbedding"),
        mlp="moe",
        sliding_window=_sliding_window(cfg, absent=None),
        num_experts=experts,
        experts_per_token=top_k,
    )


def _build_dense(cfg: _Config) -> dict[str, Any]:
    # cachefit's own family: Llama module names, two-matrix MLP, no biases. Defaults: KV heads =
    # heads, head_dim = hidden/heads, untied head, no rotary (partial_rotary_factor 0: the seed
    # paper names no position scheme), max_position_embeddings 0 (unknown), no sliding window.
    hidden, layers, heads, inter, vocab = _common_dims(cfg)
    kv = _kv_heads(cfg, heads, absent=None)
    head_dim = _head_dim(cfg, hidden, heads)
    factor = cfg.raw("partial_rotary_factor")
    rotary = 0 if factor in (None, 0) else int(head_dim * cfg.fraction("partial_rotary_factor", factor))
    return _llama_like(
        cfg,
        family="dense",
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv,
        head_dim=head_dim,
        intermediate=inter,
        vocab=vocab,
        tie=cfg.flag("tie_word_embeddings", absent=False),
        max_positions=cfg.integer("max_position_embeddings", absent=0, minimum=0),
        rotary_dim=rotary,
        mlp="plain",
        sliding_window=_sliding_window(cfg, absent=None),
    )


# ---------------------------------------------------------------------------------------------
# GPT-2 (models/gpt2/modeling_gpt2.py: GPT2LMHeadModel).


def _build_gpt2(cfg: _Config) -> dict[str, Any]:
    # GPT2Config: attribute_map hidden_size -> n_embd, num_attention_heads -> n_head,
    # num_hidden_layers -> n_layer, max_position_embeddings -> n_positions; n_inner None
    # (-> 4 * n_embd, GPT2Block), tie_word_embeddings True. Fused c_attn (q, k, v) in Conv1D.
    hidden = cfg.integer("n_embd", aliases=("hidden_size",))
    layers = cfg.integer("n_layer", aliases=("num_hidden_layers",))
    heads = cfg.integer("n_head", aliases=("num_attention_heads",))
    vocab = cfg.integer("vocab_size")
    positions = cfg.integer("n_positions", aliases=("max_position_embeddings",))
    inner = cfg.integer("n_inner", absent=4 * hidden, null=4 * hidden)
    if cfg.flag("add_cross_attention", absent=False):
        raise ProfileError(
            f"{cfg.where}: add_cross_attention is set (GPT-2 as an encoder-decoder's decoder); cachefit "
            f"profiles decoder-only GPT-2: remove the key or set it to false"
        )
    head_dim = _derived_head_dim(cfg, hidden, heads, "n_embd", "n_head", explicit=False)
    tie = cfg.flag("tie_word_embeddings", absent=True)
    embed = "transformer.wte.weight"
    all_layers = []
    for i in range(layers):
        p = f"transformer.h.{i}"
        all_layers.append(
            (
                *_norm(f"{p}.ln_1", hidden, block="attn", bias=True),
                *_conv1d(f"{p}.attn.c_attn", hidden, 3 * hidden, role="qkv", block="attn"),
                *_conv1d(f"{p}.attn.c_proj", hidden, hidden, role="attn_out", block="attn"),
                *_norm(f"{p}.ln_2", hidden, block="mlp", bias=True),
                *_conv1d(f"{p}.mlp.c_fc", hidden, inner, role="mlp", block="mlp"),
                *_conv1d(f"{p}.mlp.c_proj", inner, hidden, role="mlp", block="mlp"),
            )
        )
    return _decoder_fields(
        family="gpt2",
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=heads,
        head_dim=head_dim,
        intermediate=inner,
        vocab=vocab,
        gated=False,
        tie=tie,
        max_positions=positions,
        rotary_dim=0,
        embedding=(
            _tensor(embed, (vocab, hidden), "embed"),
            _tensor("transformer.wpe.weight", (positions, hidden), "pos_embed"),
        ),
        layer_tensors=tuple(all_layers),
        head=(
            *_norm("transformer.ln_f", hidden, block=None, bias=True),
            _lm_head("lm_head.weight", vocab, hidden, tie_to=embed if tie else None),
        ),
    )


# ---------------------------------------------------------------------------------------------
# GPT-NeoX (models/gpt_neox/modeling_gpt_neox.py: GPTNeoXForCausalLM).


def _build_gpt_neox(cfg: _Config) -> dict[str, Any]:
    # GPTNeoXConfig: attention_bias True, use_parallel_residual True, tie_word_embeddings False,
    # max_position_embeddings 2048, rotary_pct 0.25. The MLP always has biases. transformers 5
    # names the (untied) LM head `lm_head` (checkpoints call it `embed_out`; loading renames it).
    hidden, layers, heads, inter, vocab = _common_dims(cfg)
    head_dim = _derived_head_dim(cfg, hidden, heads, "hidden_size", "num_attention_heads", explicit=False)
    attn_bias = cfg.flag("attention_bias", absent=True)
    parallel = cfg.flag("use_parallel_residual", absent=True)
    tie = cfg.flag("tie_word_embeddings", absent=False)
    embed = "gpt_neox.embed_in.weight"
    all_layers = []
    for i in range(layers):
        p = f"gpt_neox.layers.{i}"
        all_layers.append(
            (
                *_norm(f"{p}.input_layernorm", hidden, block="attn", bias=True),
                *_linear(
                    f"{p}.attention.query_key_value", hidden, 3 * hidden, role="qkv", block="attn", bias=attn_bias
                ),
                *_linear(f"{p}.attention.dense", hidden, hidden, role="attn_out", block="attn", bias=attn_bias),
                *_norm(f"{p}.post_attention_layernorm", hidden, block="mlp", bias=True),
                *_linear(f"{p}.mlp.dense_h_to_4h", hidden, inter, role="mlp", block="mlp", bias=True),
                *_linear(f"{p}.mlp.dense_4h_to_h", inter, hidden, role="mlp", block="mlp", bias=True),
            )
        )
    return _decoder_fields(
        family="gpt_neox",
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=heads,
        head_dim=head_dim,
        intermediate=inter,
        vocab=vocab,
        gated=False,
        tie=tie,
        max_positions=cfg.integer("max_position_embeddings", absent=2048),
        rotary_dim=_partial_rotary(cfg, head_dim, default=0.25, legacy_key="rotary_pct"),
        embedding=(_tensor(embed, (vocab, hidden), "embed"),),
        layer_tensors=tuple(all_layers),
        head=(
            *_norm("gpt_neox.final_layer_norm", hidden, block=None, bias=True),
            _lm_head("lm_head.weight", vocab, hidden, tie_to=embed if tie else None),
        ),
        parallel=parallel,
    )


# ---------------------------------------------------------------------------------------------
# OPT (models/opt/modeling_opt.py: OPTForCausalLM).


def _build_opt(cfg: _Config) -> dict[str, Any]:
    # OPTConfig: word_embed_proj_dim None (-> hidden_size), enable_bias True,
    # layer_norm_elementwise_affine True, do_layer_norm_before True, _remove_final_layer_norm False,
    # tie_word_embeddings True. OPTLearnedPositionalEmbedding keeps max_position_embeddings + 2 rows
    # (positions are offset by 2). project_in / project_out exist when word_embed_proj_dim != hidden.
    hidden = cfg.integer("hidden_size")
    layers = cfg.integer("num_hidden_layers")
    heads = cfg.integer("num_attention_heads")
    ffn = cfg.integer("ffn_dim")
    vocab = cfg.integer("vocab_size")
    positions = cfg.integer("max_position_embeddings")
    proj = cfg.integer("word_embed_proj_dim", absent=hidden, null=hidden)
    bias = cfg.flag("enable_bias", absent=True)
    affine = cfg.flag("layer_norm_elementwise_affine", absent=True)
    pre_norm = cfg.flag("do_layer_norm_before", absent=True)
    final_norm = pre_norm and not cfg.flag("_remove_final_layer_norm", absent=False)
    tie = cfg.flag("tie_word_embeddings", absent=True)
    head_dim = _derived_head_dim(cfg, hidden, heads, "hidden_size", "num_attention_heads", explicit=False)
    embed = "model.decoder.embed_tokens.weight"
    embedding: list[TensorSpec] = [
        _tensor(embed, (vocab, proj), "embed"),
        _tensor("model.decoder.embed_positions.weight", (positions + 2, hidden), "pos_embed"),
    ]
    head: list[TensorSpec] = []
    if final_norm:
        head += _norm("model.decoder.final_layer_norm", hidden, block=None, bias=True, affine=affine)
    if proj != hidden:
        embedding += _linear("model.decoder.project_in", proj, hidden, role="embed", block=None, bias=False)
        head += _linear("model.decoder.project_out", hidden, proj, role="head", block=None, bias=False)
    head.append(_lm_head("lm_head.weight", vocab, proj, tie_to=embed if tie else None))
    all_layers = []
    for i in range(layers):
        p = f"model.decoder.layers.{i}"
        all_layers.append(
            (
                *_norm(f"{p}.self_attn_layer_norm", hidden, block="attn", bias=True, affine=affine),
                *_linear(f"{p}.self_attn.q_proj", hidden, hidden, role="qkv", block="attn", bias=bias),
                *_linear(f"{p}.self_attn.k_proj", hidden, hidden, role="qkv", block="attn", bias=bias),
                *_linear(f"{p}.self_attn.v_proj", hidden, hidden, role="qkv", block="attn", bias=bias),
                *_linear(f"{p}.self_attn.out_proj", hidden, hidden, role="attn_out", block="attn", bias=bias),
                *_norm(f"{p}.final_layer_norm", hidden, block="mlp", bias=True, affine=affine),
                *_linear(f"{p}.fc1", hidden, ffn, role="mlp", block="mlp", bias=bias),
                *_linear(f"{p}.fc2", ffn, hidden, role="mlp", block="mlp", bias=bias),
            )
        )
    return _decoder_fields(
        family="opt",
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=heads,
        head_dim=head_dim,
        intermediate=ffn,
        vocab=vocab,
        gated=False,
        tie=tie,
        max_positions=positions,
        rotary_dim=0,
        embedding=tuple(embedding),
        layer_tensors=tuple(all_layers),
        head=tuple(head),
    )


# ---------------------------------------------------------------------------------------------
# BERT (models/bert/modeling_bert.py: BertModel or BertForMaskedLM), post-LN encoder.


def _build_bert(cfg: _Config) -> dict[str, Any]:
    # BertConfig: type_vocab_size 2, is_decoder False, add_cross_attention False,
    # tie_word_embeddings True. BertSelfOutput's LayerNorm closes the attention block and
    # BertOutput's LayerNorm the MLP block (post-LN).
    hidden, layers, heads, inter, vocab = _common_dims(cfg)
    positions = cfg.integer("max_position_embeddings")
    type_vocab = cfg.integer("type_vocab_size", absent=2, minimum=0)
    causal = cfg.flag("is_decoder", absent=False)
    if cfg.flag("add_cross_attention", absent=False):
        raise ProfileError(
            f"{cfg.where}: add_cross_attention is set (BERT as an encoder-decoder's decoder); cachefit "
            f"profiles BERT encoders: remove the key or set it to false"
        )
    head_dim = _derived_head_dim(cfg, hidden, heads, "hidden_size", "num_attention_heads", explicit=False)
    tie = cfg.flag("tie_word_embeddings", absent=True)
    architectures = cfg.raw("architectures") or []
    arch = architectures[0] if isinstance(architectures, list) and architectures else None
    masked_lm = arch == "BertForMaskedLM"
    if arch not in (None, "BertModel", "BertForMaskedLM"):
        cfg.notes.append(
            f"architectures[0] is {arch}: profiled as BertModel (pooler included), its task head left out"
        )
    base = "bert." if masked_lm else ""
    embed = f"{base}embeddings.word_embeddings.weight"
    embedding = (
        _tensor(embed, (vocab, hidden), "embed"),
        _tensor(f"{base}embeddings.position_embeddings.weight", (positions, hidden), "pos_embed"),
        _tensor(f"{base}embeddings.token_type_embeddings.weight", (type_vocab, hidden), "pos_embed"),
        *_norm(f"{base}embeddings.LayerNorm", hidden, block=None, bias=True),
    )
    all_layers = []
    for i in range(layers):
        p = f"{base}encoder.layer.{i}"
        all_layers.append(
            (
                *_linear(f"{p}.attention.self.query", hidden, hidden, role="qkv", block="attn", bias=True),
                *_linear(f"{p}.attention.self.key", hidden, hidden, role="qkv", block="attn", bias=True),
                *_linear(f"{p}.attention.self.value", hidden, hidden, role="qkv", block="attn", bias=True),
                *_linear(f"{p}.attention.output.dense", hidden, hidden, role="attn_out", block="attn", bias=True),
                *_norm(f"{p}.attention.output.LayerNorm", hidden, block="attn", bias=True),
                *_linear(f"{p}.intermediate.dense", hidden, inter, role="mlp", block="mlp", bias=True),
                *_linear(f"{p}.output.dense", inter, hidden, role="mlp", block="mlp", bias=True),
                *_norm(f"{p}.output.LayerNorm", hidden, block="mlp", bias=True),
            )
        )
    if masked_lm:
        # BertLMPredictionHead: transform (dense + LayerNorm), decoder Linear(hidden, vocab) with a
        # bias, and its own `bias` parameter; tied, decoder.weight is the word embedding and
        # decoder.bias is cls.predictions.bias (BertForMaskedLM._tied_weights_keys).
        p = "cls.predictions"
        head = (
            *_linear(f"{p}.transform.dense", hidden, hidden, role="head", block=None, bias=True),
            *_norm(f"{p}.transform.LayerNorm", hidden, block=None, bias=True),
            _tensor(f"{p}.decoder.weight", (vocab, hidden), "head", None, embed if tie else None),
            _tensor(f"{p}.decoder.bias", (vocab,), "head", None, f"{p}.bias" if tie else None),
            _tensor(f"{p}.bias", (vocab,), "head"),
        )
    else:
        head = _linear("pooler.dense", hidden, hidden, role="head", block=None, bias=True)
    return _decoder_fields(
        family="bert",
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=heads,
        head_dim=head_dim,
        intermediate=inter,
        vocab=vocab,
        gated=False,
        tie=tie,
        max_positions=positions,
        rotary_dim=0,
        embedding=embedding,
        layer_tensors=tuple(all_layers),
        head=head,
        causal=causal,
    )


# ---------------------------------------------------------------------------------------------
# Falcon (models/falcon/modeling_falcon.py: FalconForCausalLM).


def _build_falcon(cfg: _Config) -> dict[str, Any]:
    # FalconConfig: n_embed overrides hidden_size; num_kv_heads None (-> heads), alibi False,
    # new_decoder_architecture False, multi_query True, parallel_attn True, bias False,
    # num_ln_in_parallel_attn None (-> 2 with the new architecture, FalconDecoderLayer),
    # ffn_hidden_size None (-> 4 * hidden), max_position_embeddings 2048, tie_word_embeddings True.
    # The `bool | None` keys treat null as false, as the model's `if config.x` does.
    hidden = cfg.integer("hidden_size", aliases=("n_embed",))
    layers = cfg.integer("num_hidden_layers")
    heads = cfg.integer("num_attention_heads")
    vocab = cfg.integer("vocab_size")
    ffn = cfg.integer("ffn_hidden_size", absent=4 * hidden, null=4 * hidden)
    head_dim = _derived_head_dim(cfg, hidden, heads, "hidden_size", "num_attention_heads", explicit=False)
    new_arch = cfg.flag("new_decoder_architecture", absent=False, null=False)
    multi_query = cfg.flag("multi_query", absent=True, null=False)
    parallel = cfg.flag("parallel_attn", absent=True, null=False)
    bias = cfg.flag("bias", absent=False, null=False)
    alibi = cfg.flag("alibi", absent=False, null=False)
    tie = cfg.flag("tie_word_embeddings", absent=True)
    num_ln = cfg.integer("num_ln_in_parallel_attn", absent=None, null=None)
    if num_ln is None and new_arch:
        num_ln = 2
    # FalconAttention: query_key_value rows and the KV heads it serves.
    if new_arch:
        kv = cfg.integer("num_kv_heads", absent=heads, null=heads)
        _check_kv(cfg, heads, kv, "num_attention_heads", "num_kv_heads")
        qkv_out = (heads + 2 * kv) * head_dim
    elif multi_query:
        kv, qkv_out = 1, hidden + 2 * head_dim
    else:
        kv, qkv_out = heads, 3 * hidden
    if parallel:
        norm_names = (("ln_attn", "attn"), ("ln_mlp", "mlp")) if num_ln == 2 else (("input_layernorm", "attn"),)
    else:
        norm_names = (("input_layernorm", "attn"), ("post_attention_layernorm", "mlp"))
    embed = "transformer.word_embeddings.weight"
    all_layers = []
    for i in range(layers):
        p = f"transformer.h.{i}"
        norms = {block: _norm(f"{p}.{name}", hidden, block=block, bias=True) for name, block in norm_names}
        all_layers.append(
            (
                *norms["attn"],
                *_linear(
                    f"{p}.self_attention.query_key_value", hidden, qkv_out, role="qkv", block="attn", bias=bias
                ),
                *_linear(f"{p}.self_attention.dense", hidden, hidden, role="attn_out", block="attn", bias=bias),
                *norms.get("mlp", ()),
                *_linear(f"{p}.mlp.dense_h_to_4h", hidden, ffn, role="mlp", block="mlp", bias=bias),
                *_linear(f"{p}.mlp.dense_4h_to_h", ffn, hidden, role="mlp", block="mlp", bias=bias),
            )
        )
    return _decoder_fields(
        family="falcon",
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv,
        head_dim=head_dim,
        intermediate=ffn,
        vocab=vocab,
        gated=False,
        tie=tie,
        max_positions=cfg.integer("max_position_embeddings", absent=2048),
        rotary_dim=0 if alibi else _full_rotary(cfg, head_dim, "FalconRotaryEmbedding"),
        embedding=(_tensor(embed, (vocab, hidden), "embed"),),
        layer_tensors=tuple(all_layers),
        head=(
            *_norm("transformer.ln_f", hidden, block=None, bias=True),
            _lm_head("lm_head.weight", vocab, hidden, tie_to=embed if tie else None),
        ),
        parallel=new_arch or parallel,
    )


# model_type -> (adapter, transformers config class whose defaults it applies)
_FAMILIES: dict[str, tuple[Callable[[_Config], dict[str, Any]], str]] = {
    "llama": (_build_llama, "LlamaConfig"),
    "mistral": (_build_mistral, "MistralConfig"),
    "qwen2": (_build_qwen2, "Qwen2Config"),
    "gemma": (_build_gemma, "GemmaConfig"),
    "phi3": (_build_phi3, "Phi3Config"),
    "mixtral": (_build_mixtral, "MixtralConfig"),
    "gpt2": (_build_gpt2, "GPT2Config"),
    "gpt_neox": (_build_gpt_neox, "GPTNeoXConfig"),
    "opt": (_build_opt, "OPTConfig"),
    "bert": (_build_bert, "BertConfig"),
    "falcon": (_build_falcon, "FalconConfig"),
    "cachefit-dense": (_build_dense, "cachefit-dense"),
}

SUPPORTED_FAMILIES: tuple[str, ...] = tuple(_FAMILIES)
"""The ``model_type`` values :func:`load_transformer_spec` accepts."""


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
    if model_type not in _FAMILIES:
        raise ProfileError(
            f'{where}: model_type {model_type!r} is not supported; cachefit reads {", ".join(SUPPORTED_FAMILIES)} '
            f"(profile another model from its live nn.Module instead)"
        )
    adapter, config_class = _FAMILIES[model_type]
    cfg = _Config(data, where=where, model_type=model_type, config_class=config_class)
    fields = adapter(cfg)
    if name is None:
        name = str(source) if path is not None else str(data.get("_name_or_path") or model_type)
    spec = TransformerSpec(name=name, source=path or "", notes=tuple(cfg.notes), **fields)
    logger.debug("loaded %s (%s): %d layers, %d tensors per layer", name, model_type, spec.num_layers,
                 len(spec.layer_tensors[0]) if spec.layer_tensors else 0)
    return spec


__all__ = ["SUPPORTED_FAMILIES", "load_transformer_spec"]
