"""``TransformerSpec``: a transformer described by its dimensions and its real weight tensors.

Family adapters (``hf_config.py``) turn a Hugging Face ``config.json`` into a spec; the unit
builder (``transformer.py``) turns a spec plus a workload into units. The spec lists every weight
tensor by the FQN the ``transformers`` model gives it, so parameter counts are exact and deploy can
find the modules a unit owns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cachefit.errors import ConfigError
from cachefit.units import ForwardSpec, TensorSpec


@dataclass(frozen=True, slots=True, kw_only=True)
class TransformerSpec:
    """Dimensions and weight tensors of a transformer (decoder or encoder)."""

    name: str
    """Model name, e.g. ``llama-3.1-8b`` or the config path."""
    family: str
    """``llama``, ``mistral``, ``qwen2``, ``gemma``, ``phi3``, ``mixtral``, ``gpt2``, ``gpt_neox``,
    ``opt``, ``bert``, ``falcon`` or ``dense`` (the seed paper's model)."""
    causal: bool
    """True for decoders (causal LM), False for encoders (BERT)."""
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    """Key/value heads: == num_heads (MHA), 1 (MQA), in between (GQA)."""
    head_dim: int
    intermediate_size: int
    """MLP intermediate width (per expert for MoE)."""
    vocab_size: int
    gated_mlp: bool
    """Three MLP matrices (gate, up, down: SwiGLU / GeGLU) instead of two."""
    num_experts: int = 0
    experts_per_token: int = 0
    parallel_attn_mlp: bool = False
    rotary_dim: int = 0
    """Per-head dimensions under rotary embedding (``head_dim * partial_rotary_factor``); 0: none."""
    sliding_window: int | None = None
    max_position_embeddings: int = 0
    tie_word_embeddings: bool = False
    embedding_tensors: tuple[TensorSpec, ...] = ()
    """Tensors of the embedding unit (token, position, token-type embeddings, embedding norm)."""
    layer_tensors: tuple[tuple[TensorSpec, ...], ...] = ()
    """Per layer, its tensors; each has ``block`` ``"attn"`` or ``"mlp"``."""
    head_tensors: tuple[TensorSpec, ...] = ()
    """Tensors of the final unit (final norm, LM head or pooler); a tied head has ``tied_to`` set."""
    source: str = ""
    """Where the description came from (URL of the config, or a file path)."""
    notes: tuple[str, ...] = ()
    """Assumptions made (e.g. a vocabulary the paper does not give)."""
    forward: ForwardSpec = field(default_factory=ForwardSpec)
    """How the family's ``transformers`` forward holds tensors beyond the shapes (fp32 softmax, a Python
    activation, learned position lookups, ...): what the activation bytes are computed for."""

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{self.name}: {name} must be a positive integer, got {value!r}")
        if self.vocab_size < 0:
            raise ConfigError(f"{self.name}: vocab_size must be >= 0, got {self.vocab_size}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"{self.name}: num_attention_heads ({self.num_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_kv_heads}); fix one of them in the config"
            )
        if self.num_experts and not 1 <= self.experts_per_token <= self.num_experts:
            raise ConfigError(
                f"{self.name}: experts per token ({self.experts_per_token}) must be in 1..{self.num_experts}"
            )
        if self.layer_tensors and len(self.layer_tensors) != self.num_layers:
            raise ConfigError(
                f"{self.name}: {len(self.layer_tensors)} layer tensor lists for {self.num_layers} layers"
            )
        if not 0 <= self.rotary_dim <= self.head_dim:
            raise ConfigError(f"{self.name}: rotary_dim {self.rotary_dim} outside 0..head_dim ({self.head_dim})")
