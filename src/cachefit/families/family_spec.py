"""``FamilySpec``: everything cachefit knows about one model family, as plain data.

One spec per ``model_type`` (in the spirit of torchtitan's ``TrainSpec``): how to read its
``config.json`` into a :class:`~cachefit.profile.spec.TransformerSpec` (the adapter), the module
names that compression, tensor-parallel splits and the live-module profiler look for, and the facts
deploy needs (which ``transformers`` class, which stage implementation, which loss). The registry in
:mod:`cachefit.families` holds one per family; no other module keeps a table keyed by family names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

from cachefit.errors import ConfigError

if TYPE_CHECKING:  # the adapter's types; importing them here would only be needed for annotations
    from cachefit.families.reader import ConfigReader
    from cachefit.profile.spec import TransformerSpec

Loss = Literal["causal_lm", "encoder_mean"]
"""The training loss of a deployed family's last stage: next-token cross-entropy (``causal_lm``),
or for encoders without labels half the mean square of the unpadded hidden states
(``encoder_mean``)."""

_LOSSES: tuple[str, ...] = get_args(Loss)

StageAdapter = Literal["rotary_decoder", "gpt2_decoder", "bert_encoder"]
"""The deploy-side stage implementations (``cachefit.deploy.stages.STAGE_ADAPTERS`` maps each to its
torch code): Llama-like decoders with rotary positions (``rotary_decoder``), GPT-2 (``gpt2_decoder``),
BERT encoders (``bert_encoder``)."""

_STAGE_ADAPTERS: tuple[str, ...] = get_args(StageAdapter)


@dataclass(frozen=True, slots=True, kw_only=True)
class MlpPattern:
    """The MLP matrices that share the intermediate dimension, by name relative to their owner."""

    up: str
    """Projection into the intermediate (``up_proj``, ``c_fc``, ``intermediate.dense``)."""
    down: str
    """Projection out of it (``down_proj``, ``c_proj``, ``output.dense``)."""
    gate: str | None = None
    """The gate of a gated MLP (``gate_proj``), or None."""
    fused_gate_up: bool = False
    """``up`` holds gate and up stacked along the output, gate first (Phi-3 ``gate_up_proj``)."""

    def __post_init__(self) -> None:
        for name in ("up", "down"):
            if not getattr(self, name):
                raise ConfigError(f"MLP pattern: {name} must name a module, got {getattr(self, name)!r}")
        if self.fused_gate_up and self.gate is not None:
            raise ConfigError(
                f"MLP pattern {self.up}/{self.down}: a fused gate_up has no separate gate; drop gate={self.gate!r}"
            )

    @property
    def up_names(self) -> tuple[str, ...]:
        """Names of the projections into the intermediate (up and gate)."""
        return (self.up,) if self.gate is None else (self.up, self.gate)


@dataclass(frozen=True, slots=True, kw_only=True)
class RoleNames:
    """Last FQN components of the modules whose weight role their type alone does not tell.

    The live-module profiler (:func:`cachefit.profile.module.guess_role`) reads them: a linear
    layer named in ``qkv`` is a Q/K/V projection, one named in ``attn_out`` inside an attention
    module is the attention output, and anything under a module named in ``head`` belongs to the head.
    """

    qkv: tuple[str, ...] = ()
    """Query / key / value projections, fused or not (``q_proj``, ``c_attn``, ``query_key_value``)."""
    attn_out: tuple[str, ...] = ()
    """Attention output projection (``o_proj``, ``c_proj``, ``dense``): only inside attention."""
    head: tuple[str, ...] = ()
    """Modules whose weights are the head (``lm_head``, ``pooler``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorParallelSpec:
    """Which modules deploy splits over the cards of a split unit, and how (Megatron-LM's scheme).

    Column-parallel projections (query / key / value, MLP in) keep whole heads, KV groups or MLP
    columns per card; row-parallel ones (attention out, MLP out) keep the matching input columns and
    their partial outputs are summed across the cards (the output bias added once); the embedding and
    the LM head keep a range of the vocabulary. Names are module FQNs in the ``transformers`` class:
    ``layer`` with ``{i}`` for the layer index, the others relative to the layer. Whether a weight is
    stored (in, out) comes from :attr:`FamilySpec.transposed_weights`.
    """

    layer: str
    """FQN of layer ``i`` (``model.layers.{i}``, ``transformer.h.{i}``, ``encoder.layer.{i}``)."""
    attention: str
    """The module running the attention (relative to the layer), whose head counts each card lowers to
    its own (``self_attn``, ``attn``, ``attention.self``)."""
    attention_out: str
    """The attention's output projection, row-parallel by query heads (``self_attn.o_proj``)."""
    mlp_in: tuple[str, ...]
    """Projections into the MLP's intermediate, column-parallel by MLP columns (gate and up)."""
    mlp_out: str
    """The projection out of the intermediate, row-parallel by MLP columns (``mlp.down_proj``)."""
    query: str | None = None
    """The query projection, column-parallel by query heads (None with ``fused_qkv``)."""
    key_value: tuple[str, ...] = ()
    """The key and value projections, column-parallel by KV heads (empty with ``fused_qkv``)."""
    fused_qkv: str | None = None
    """One projection whose output holds the query, key and value blocks in that order (GPT-2's
    ``attn.c_attn``), each cut by heads."""
    embedding: str | None = None
    """The token embedding (FQN from the model root), split along the vocabulary (None: replicated)."""
    head: str | None = None
    """The LM head (FQN from the model root), split along the vocabulary, logits gathered (None: the
    head unit's modules run replicated, as BERT's pooler)."""
    head_count_attrs: tuple[str, ...] = ()
    """Attributes of ``attention`` holding its query-head count (BERT ``num_attention_heads``)."""
    head_width_attrs: tuple[str, ...] = ()
    """Attributes of ``attention`` holding query heads x head dim (GPT-2 ``split_size``)."""
    group_attr: str | None = None
    """Attribute of ``attention`` holding query heads per KV head (``num_key_value_groups``)."""

    def __post_init__(self) -> None:
        if "{i}" not in self.layer:
            raise ConfigError(f"tensor-parallel spec: layer must hold {{i}} for the layer index, got {self.layer!r}")
        if (self.fused_qkv is None) == (self.query is None):
            raise ConfigError(f"tensor-parallel spec of {self.layer}: name either query (with key_value) or fused_qkv")
        if self.query is not None and len(self.key_value) != 2:
            raise ConfigError(f"tensor-parallel spec of {self.layer}: key_value must name the key and the value "
                              f"projection, got {self.key_value!r}")
        if self.fused_qkv is not None and self.key_value:
            raise ConfigError(f"tensor-parallel spec of {self.layer}: a fused_qkv has no separate key_value")
        for name in ("key_value", "mlp_in", "head_count_attrs", "head_width_attrs"):
            if not isinstance(getattr(self, name), tuple):
                raise ConfigError(f"tensor-parallel spec of {self.layer}: {name} must be a tuple")
        if not self.mlp_in:
            raise ConfigError(f"tensor-parallel spec of {self.layer}: mlp_in must name the MLP's input projections")


@dataclass(frozen=True, slots=True, kw_only=True)
class FamilySpec:
    """One model family: its config adapter, its module names and its deploy facts."""

    name: str
    """The ``model_type`` of its ``config.json`` (``llama``, ``gpt_neox``, ``cachefit-dense``)."""
    config_class: str
    """The ``transformers`` config class whose defaults the adapter applies to absent keys
    (``LlamaConfig``); notes on a spec name it."""
    adapter: Callable[[ConfigReader], TransformerSpec]
    """Reads a config (through a :class:`~cachefit.families.reader.ConfigReader`) into the spec of
    every weight tensor the ``transformers`` model creates, by FQN and shape."""
    causal: bool
    """True for decoder families; False for encoders (a config may still say otherwise, as BERT's
    ``is_decoder``: the spec's ``causal`` is the one that counts for a model)."""
    mlp_patterns: tuple[MlpPattern, ...]
    """The family's MLP module names, which structured sparsity (``compress/pruning.py``) prunes and
    ``compress/techniques.py`` reads to tell up from down projections."""
    transposed_weights: tuple[str, ...] = ()
    """fnmatch patterns of weights stored (in, out) instead of ``nn.Linear``'s (out, in): GPT-2's
    ``Conv1D`` (``*.c_attn.weight``)."""
    role_names: RoleNames = RoleNames()
    """Module names the live-module profiler reads to guess weight roles."""
    architectures: tuple[str, ...]
    """``transformers`` model classes accepted from the config's ``architectures`` (the class that
    the spec mirrors and that deploy builds); empty where no ``transformers`` class exists."""
    default_architecture: str | None
    """The class built when the config names none (None with no ``architectures``)."""
    base_model_prefix: str
    """The attribute holding the base model in that class (``model``, ``transformer``, ``bert``);
    a checkpoint saved from the base model alone stores its tensors without it."""
    stage_adapter: StageAdapter | None = None
    """Which deploy-side stage implementation runs the family (``rotary_decoder``, ``gpt2_decoder``,
    ``bert_encoder``), or None where cachefit plans the family but does not deploy it."""
    tensor_parallel: TensorParallelSpec | None = None
    """How deploy runs a unit of this family split over cards (tensor-parallel shards), or None where
    it does not."""
    decode: bool = False
    """Whether deploy runs pipelined greedy decoding (``cachefit run --mode decode``: a KV cache per
    stage) for this family; the stage adapter must implement a cached step."""
    loss: Loss = "causal_lm"
    """The training loss of the last stage when deployed."""

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ConfigError(f"family spec: name must be a non-empty model_type string, got {self.name!r}")
        for field_name in ("mlp_patterns", "transposed_weights", "architectures"):
            if not isinstance(getattr(self, field_name), tuple):
                raise ConfigError(f"family {self.name}: {field_name} must be a tuple")
        if self.architectures and self.default_architecture not in self.architectures:
            raise ConfigError(
                f"family {self.name}: default_architecture {self.default_architecture!r} is not among "
                f"architectures {self.architectures}; add it there"
            )
        if not self.architectures and self.default_architecture is not None:
            raise ConfigError(f"family {self.name}: default_architecture set but architectures is empty")
        if self.stage_adapter is not None and self.default_architecture is None:
            raise ConfigError(f"family {self.name}: a stage_adapter needs a transformers class to build")
        if self.stage_adapter is not None and self.stage_adapter not in _STAGE_ADAPTERS:
            raise ConfigError(
                f"family {self.name}: stage_adapter must be one of {', '.join(_STAGE_ADAPTERS)} or None, "
                f"got {self.stage_adapter!r}"
            )
        if self.tensor_parallel is not None and not isinstance(self.tensor_parallel, TensorParallelSpec):
            raise ConfigError(f"family {self.name}: tensor_parallel must be a TensorParallelSpec or None, "
                              f"got {self.tensor_parallel!r}")
        if self.tensor_parallel and self.stage_adapter is None:
            raise ConfigError(f"family {self.name}: tensor_parallel needs a stage_adapter (deploy runs the shards)")
        if self.decode and self.stage_adapter is None:
            raise ConfigError(f"family {self.name}: decode needs a stage_adapter (deploy runs the cached steps)")
        if self.loss not in _LOSSES:
            raise ConfigError(f"family {self.name}: loss must be one of {', '.join(_LOSSES)}, got {self.loss!r}")


__all__ = ["FamilySpec", "Loss", "MlpPattern", "RoleNames", "StageAdapter", "TensorParallelSpec"]
