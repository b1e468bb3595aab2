"""Measured profiles: the real module's forward on fake tensors, cut into the analytic profile's units.

``measure_profile(model, workload)`` (the CLI's ``--measure``) runs the model that really executes --
the ``transformers`` class built from the config, or a module handed in -- for the workload under
``torch._subclasses.fake_tensor.FakeTensorMode``: every tensor has its shape, dtype and storage but no
data, so a 70B model needs no memory and no compute. A dispatch-mode tracker
(:func:`cachefit.profile.module.measure_unit_peaks`) follows every storage; each unit gets:

- **weight bytes**: the bytes of the parameters (and registered buffers) of the modules that own its
  tensors, each tensor once per unit;
- **activation bytes**: the peak of the live non-weight bytes while the unit runs, and which tensors
  make that peak (shape, dtype, bytes, the op and module that made them). The live set is everything
  alive at that moment -- the unit's inputs, what it allocates, and what the caller keeps alive
  (``inputs_embeds`` through every layer) -- except what another unit keeps for later (another
  layer's KV cache, the tensors autograd saved for another unit's backward), and except the attention
  masks and rotary tables outside layer and attention units (cachefit books those buffers there).
  docs/activations.md ("Measured profiles") says how the ops are assigned to units;
- **persistent activation bytes**: its own KV cache (decode) or what autograd saved for its backward
  (train).

Units, their names, tensors, parameters and FLOPs are the analytic profile's
(:func:`cachefit.profile.profile_model`); only the footprints are measured. A measured unit carries no
:class:`~cachefit.units.LayerShape`: the planner never re-estimates its bytes from a formula, so
tensor-parallel splits and the techniques that change activations (``fuse``, ``ckpt``, MLP pruning)
do not apply to it; weight techniques (``int8``, ``int4``, ``sparse24``) and ``batch`` (linear
scaling) do.

This module imports no torch at import time (the planner reads :func:`memory_source` from it); torch
and transformers are imported when something is measured.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cachefit.errors import ConfigError, ProfileError
from cachefit.profile.spec import TransformerSpec
from cachefit.units import Footprint, Mode, ModelProfile, Unit, Workload

if TYPE_CHECKING:  # the registry imports cachefit.profile.spec, so it is imported where it is used
    from cachefit.families import FamilySpec

logger = logging.getLogger(__name__)

MEMORY_SOURCES: tuple[str, ...] = ("analytic", "measured")
"""Where a profile's (and so a plan's) bytes come from: the formulas of
:mod:`cachefit.profile.activations`, or a measured run of the real module."""

LIVE_TENSORS_KEPT = 8
"""How many of the largest tensors live at a unit's peak a measured profile names (the rest are summed)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LiveTensor:
    """One tensor storage live at a unit's activation peak."""

    shape: tuple[int, ...]
    """Shape of the tensor that created the storage."""
    dtype: str
    """Its torch dtype name (``float16``, ``int64``, ``bool``)."""
    nbytes: int
    """Bytes of the storage."""
    op: str
    """The aten op that made it (``aten.mm``), ``input`` for a forward argument, ``external`` for a
    storage first seen as an operand (made before the forward)."""
    module: str
    """FQN of the innermost module running when it was made (``""``: the model's own code)."""
    kind: str
    """``activation``; ``kv_cache`` (this unit's own cache); ``saved`` (saved for this unit's backward);
    ``buffer`` (an attention mask or rotary table, counted on layer and attention units only)."""

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype, "bytes": self.nbytes, "op": self.op,
                "module": self.module, "kind": self.kind}


@dataclass(frozen=True, slots=True, kw_only=True)
class UnitPeak:
    """What a measured run saw of one unit."""

    unit: str
    """The unit's name (``embed``, ``layers.3``, ``layers.3.attn``, ``head``)."""
    weight_bytes: int
    """Bytes of its parameters and registered buffers as stored."""
    peak_bytes: int
    """Peak of the live non-weight bytes while it ran (its own persistent bytes included)."""
    persistent_bytes: int
    """Its own KV cache (decode) or the tensors saved for its backward (train)."""
    live: tuple[LiveTensor, ...] = ()
    """The largest tensors live at the peak, largest first (at most :data:`LIVE_TENSORS_KEPT`)."""
    other_bytes: int = 0
    """The rest of ``peak_bytes``: the smaller tensors live at the peak."""
    other_count: int = 0
    """How many smaller tensors ``other_bytes`` sums."""
    ops: int = 0
    """aten ops assigned to the unit."""

    def __post_init__(self) -> None:
        for name in ("weight_bytes", "peak_bytes", "persistent_bytes", "other_bytes", "other_count", "ops"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"measured unit {self.unit}: {name} must be a non-negative int, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.unit,
            "weight_bytes": self.weight_bytes,
            "peak_bytes": self.peak_bytes,
            "persistent_bytes": self.persistent_bytes,
            "ops": self.ops,
            "live_at_peak": [t.to_dict() for t in self.live],
            "other_live_bytes": self.other_bytes,
            "other_live_tensors": self.other_count,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class MeasuredProfile(ModelProfile):
    """A :class:`~cachefit.units.ModelProfile` whose footprints were measured on the real module.

    It is a ``ModelProfile`` (the planner, the cost model and the reports take it as one); the plan
    made from it records ``memory_source: "measured"``.
    """

    peaks: tuple[UnitPeak, ...] = ()
    """Per unit, in unit order: the measured bytes and the tensors live at its peak."""
    method: str = ""
    """What ran, e.g. ``transformers LlamaForCausalLM (eager), FakeTensorMode``."""

    @property
    def memory_source(self) -> str:
        return "measured"

    def measurement_dict(self) -> dict[str, Any]:
        """The measured part of ``cachefit profile --measure --json``: ``memory_source`` and ``measured``."""
        return {
            "memory_source": "measured",
            "measured": {"method": self.method, "units": [p.to_dict() for p in self.peaks]},
        }


def memory_source(profile: ModelProfile) -> str:
    """``measured`` for a :class:`MeasuredProfile`, else ``analytic``."""
    return "measured" if isinstance(profile, MeasuredProfile) else "analytic"


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------

_RUNNABLE_DTYPES = ("fp32", "fp16", "bf16")


def measure_profile(
    model: Any,
    workload: Workload | None = None,
    *,
    granularity: str = "layer",
    example_inputs: Any = None,
    units: Sequence[str] | None = None,
) -> MeasuredProfile:
    """Profile a model by running its real forward for ``workload`` on fake tensors.

    Args:
        model: a preset name, a path to an HF ``config.json`` or a model directory, a parsed config
            dict (the ``transformers`` class of its family is built from it), or a live
            ``torch.nn.Module``: a ``transformers`` model of a family cachefit knows is cut into the
            analytic profile's units; any other module needs ``example_inputs`` and is cut into the
            units :func:`~cachefit.profile.module.profile_module` chooses (or ``units``).
        workload: batch, sequence, mode and dtypes; ``Workload()`` when None. The model runs in one
            dtype (``weight_dtype`` = ``act_dtype``, fp32 / fp16 / bf16).
        granularity: ``layer`` or ``block`` (attention and MLP halves of each layer).
        example_inputs: a generic module's forward arguments (a tensor, a tuple, or a dict); they
            are made fake too.
        units: a generic module's unit FQNs (default: :func:`profile_module`'s blocks).

    Raises:
        ConfigError: transformers is not installed, the workload cannot run as asked (two dtypes,
            decode of an encoder), or a bad argument.
        ProfileError: the family has no ``transformers`` class, the built model's tensors differ from
            the analytic profile's, or the forward fails.
    """
    torch_module = _torch_module_type()
    if torch_module is not None and isinstance(model, torch_module):
        if _family_of_module(model) is None:
            return _measure_generic(model, workload, example_inputs, units)
        return _measure_hf_module(model, workload, granularity)
    if example_inputs is not None or units is not None:
        raise ConfigError("measure_profile: example_inputs and units apply to a live nn.Module only")
    workload = _workload(workload)
    config, spec = _config_and_spec(model)
    family = _family(config, spec)
    analytic = _analytic(spec, workload, granularity)
    transformers = _import_transformers()
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_mode = FakeTensorMode()
    hf_config = _hf_config(transformers, config, workload)
    built, cls_name = _build(transformers, hf_config, config, spec, family, workload, fake_mode)
    return _measure_built(built, hf_config, analytic, workload, fake_mode, f"transformers {cls_name}")


def _torch_module_type() -> type | None:
    """``torch.nn.Module`` if torch is already imported (a live module can exist only then)."""
    import sys

    torch = sys.modules.get("torch")
    return getattr(getattr(torch, "nn", None), "Module", None)


def _workload(workload: Workload | None) -> Workload:
    if workload is None:
        workload = Workload()
    if not isinstance(workload, Workload):
        raise ConfigError(
            f"measure_profile: workload must be a cachefit.Workload or None, got {type(workload).__name__}"
        )
    if workload.weight_dtype not in _RUNNABLE_DTYPES or workload.act_dtype != workload.weight_dtype:
        raise ConfigError(
            f"--measure runs the model in one dtype, but the workload has weights in {workload.weight_dtype} and "
            f"activations in {workload.act_dtype}; give one of {', '.join(_RUNNABLE_DTYPES)} for both "
            "(compression is applied by the planner afterwards)"
        )
    if workload.kv_cache_dtype != workload.act_dtype:
        raise ConfigError(
            f"--measure: the KV cache would be {workload.kv_cache_dtype} but the model runs in {workload.act_dtype}; "
            "measure with kv_dtype equal to the activation dtype"
        )
    if workload.fused_mlp or workload.checkpointing:
        raise ConfigError(
            "--measure runs the transformers modules as they are: they have no fused MLP and do not "
            "checkpoint; measure without fused_mlp / checkpointing, or profile analytically"
        )
    return workload


def _analytic(spec: TransformerSpec, workload: Workload, granularity: str) -> ModelProfile:
    from cachefit.profile.transformer import profile_transformer

    if workload.mode is Mode.DECODE and not spec.causal:
        raise ConfigError(
            f"{spec.name} is an encoder: it has no KV cache to decode with; measure --mode prefill or train"
        )
    return profile_transformer(spec, workload, granularity=granularity)


def _config_and_spec(model: Any) -> tuple[Mapping[str, Any], TransformerSpec]:
    """The model's ``config.json`` contents and its analytic spec."""
    from cachefit.files import read_json
    from cachefit.profile import resolve_spec

    if isinstance(model, TransformerSpec):
        raise ConfigError(
            f"measure_profile: {model.name} is a TransformerSpec, which holds no config to build the real "
            "model from; give its preset name, config.json, model directory or config dict"
        )
    spec = resolve_spec(model)  # the same errors (unknown preset, bad config) as profile_model
    if isinstance(model, Mapping):
        return dict(model), spec
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return read_json(path, what="model config", finite=False), spec
    doc = json.loads(resources.files("cachefit.profile.presets").joinpath(f"{spec.name}.json")
                     .read_text(encoding="utf-8"))
    return doc["config"], spec


def _family(config: Mapping[str, Any], spec: TransformerSpec) -> FamilySpec:
    from cachefit.families import FAMILIES

    family = FAMILIES.get(str(config.get("model_type")))
    if family is None or family.default_architecture is None:
        raise ProfileError(
            f"{spec.name}: model_type {config.get('model_type')!r} has no transformers class to run, so it "
            "cannot be measured; profile it without --measure (analytic), or measure a live nn.Module with "
            "cachefit.profile.measure_profile(module, workload, example_inputs=...)"
        )
    return family


def _import_transformers() -> Any:
    try:
        import torch  # noqa: F401 - transformers needs it; say so if it is the one missing
        import transformers
    except ImportError as exc:
        raise ConfigError(
            f"--measure builds the model with transformers, which is not installed ({exc}); "
            "`pip install transformers` (and torch), or profile without --measure"
        ) from None
    return transformers


def _hf_config(transformers: Any, config: Mapping[str, Any], workload: Workload) -> Any:
    from cachefit.units import Attention

    fields = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version")}
    try:
        hf_config = transformers.AutoConfig.for_model(str(config["model_type"]), **fields)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types on a bad config
        raise ConfigError(f"transformers cannot read the config ({type(exc).__name__}: {exc})") from None
    # eager: the score matrix materialized (transformers' eager_attention_forward); flash: SDPA, whose
    # CPU kernel is a fused (flash) attention
    hf_config._attn_implementation = "eager" if workload.attention is Attention.EAGER else "sdpa"
    return hf_config


def _tensor_names(spec: TransformerSpec) -> set[str]:
    tensors = (*spec.embedding_tensors, *(t for layer in spec.layer_tensors for t in layer), *spec.head_tensors)
    return {t.name for t in tensors}


def _build(transformers: Any, hf_config: Any, config: Mapping[str, Any], spec: TransformerSpec,
           family: FamilySpec, workload: Workload, fake_mode: Any) -> tuple[Any, str]:
    """The ``transformers`` model the spec mirrors, built under ``fake_mode``: the config's
    ``architectures[0]`` when its tensors are the spec's, else ``AutoModelForCausalLM`` (decoders) or
    ``AutoModel`` (encoders)."""
    from cachefit.units import torch_dtype

    candidates: list[Any] = []
    architectures = config.get("architectures")
    if isinstance(architectures, list) and architectures and isinstance(architectures[0], str):
        cls = getattr(transformers, architectures[0], None)
        if cls is not None:
            candidates.append(cls)
    candidates.append(transformers.AutoModelForCausalLM if spec.causal else transformers.AutoModel)
    want = _tensor_names(spec)
    diff = ""
    for cls in candidates:
        try:
            # Auto classes build through from_config, model classes through _from_config
            build = getattr(cls, "from_config", None) or cls._from_config
            with fake_mode:
                model = build(hf_config, dtype=torch_dtype(workload.weight_dtype))
        except Exception as exc:  # noqa: BLE001 - the next candidate may build
            diff = f"{getattr(cls, '__name__', cls)} does not build ({type(exc).__name__}: {exc})"
            continue
        got = {name for name, _ in model.named_parameters(remove_duplicate=False)}
        if got == want:
            return model, type(model).__name__
        diff = (f"{type(model).__name__} has {sorted(got - want)[:4]} that the profile lacks and lacks "
                f"{sorted(want - got)[:4]}")
    raise ProfileError(
        f"{spec.name}: the transformers model built from the config does not hold the analytic profile's "
        f"tensors ({diff}); cachefit's {family.name} adapter and this transformers version disagree"
    )


def _measure_built(model: Any, hf_config: Any, analytic: ModelProfile, workload: Workload, fake_mode: Any,
                   what: str) -> MeasuredProfile:
    """Measure a transformers model (built or swapped to fake under ``fake_mode``) in the analytic units."""
    import torch

    from cachefit.profile.module import measure_unit_peaks

    units = _measure_units(model, analytic)
    train = workload.mode is Mode.TRAIN
    model.train(train and workload.dropout)  # dropout is the identity unless the workload has it
    with fake_mode, _masks_as_for_real_inputs(torch):
        args, kwargs, cache = _inputs(torch, model, hf_config, analytic, workload)
        peaks = measure_unit_peaks(
            model, args, kwargs, units, grad=train,
            kept_for_later=(lambda: _cache_owners(cache, analytic)) if cache is not None else None,
            # the buffers cachefit books on layer and attention units: the rotary cos / sin tables
            # and the attention masks (made by transformers' masking_utils)
            buffer_modules=[m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")],
            buffer_code=("masking_utils.py",),
            top=LIVE_TENSORS_KEPT,
        )
    attention = "eager" if hf_config._attn_implementation == "eager" else "sdpa"
    method = f"{what} ({attention} attention), forward on FakeTensorMode tensors"
    return _assemble(analytic, peaks, workload, method)


@contextlib.contextmanager
def _masks_as_for_real_inputs(torch: Any) -> Iterator[None]:
    """Make transformers' mask code decide as it does for real inputs like ours.

    ``transformers.utils.is_tracing`` is true for fake tensors, and then the mask code cannot read a
    mask or the positions: it assumes packed sequences and padding may be present, so it builds masks
    that a real run with these inputs (every token valid, consecutive positions) skips -- with SDPA, the
    whole ``B x 1 x T x S`` mask, which the real run replaces by ``is_causal``. For the run, the three
    helpers that read data get the answers such inputs give: no packed sequences, and a padding mask
    (all ones) that is the same as none. Helpers this transformers version lacks are left alone.
    """
    try:
        from transformers import masking_utils
    except ImportError:  # pragma: no cover - transformers is there whenever a model was built
        yield
        return

    def causal_skip(original: Any) -> Any:
        def decide(padding_mask: Any, q_length: int, kv_length: int, q_offset: Any, *args: Any, **kwargs: Any) -> Any:
            # a static cache passes its offset as a tensor only to avoid graph breaks; its value is not read
            offset = 0 if isinstance(q_offset, torch.Tensor) else q_offset
            return original(None, q_length, kv_length, offset, *args, **kwargs)
        return decide

    def bidirectional_skip(original: Any) -> Any:
        return lambda padding_mask, *args, **kwargs: original(None, *args, **kwargs)

    replacements = {
        "find_packed_sequence_indices": lambda original: (lambda position_ids: None),
        "_ignore_causal_mask_sdpa": causal_skip,
        "_ignore_bidirectional_mask_sdpa": bidirectional_skip,
    }
    saved = {name: getattr(masking_utils, name) for name in replacements if hasattr(masking_utils, name)}
    try:
        for name, original in saved.items():
            setattr(masking_utils, name, replacements[name](original))
        yield
    finally:
        for name, original in saved.items():
            setattr(masking_utils, name, original)


def _measure_units(model: Any, analytic: ModelProfile) -> list[Any]:
    """Each analytic unit's modules: the largest modules all of whose parameters the unit owns (never a
    ``ModuleList`` / ``ModuleDict``, which holds modules but is never called)."""
    from torch import nn

    from cachefit.profile.module import MeasureUnit

    owner: dict[str, int] = {}
    for index, unit in enumerate(analytic.units):
        for tensor in unit.tensors:
            owner.setdefault(tensor.name, index)
    roots: list[list[Any]] = [[] for _ in analytic.units]
    covered: set[str] = set()

    def visit(fqn: str, module: Any) -> None:
        names = [name for name, _ in module.named_parameters(prefix=fqn, remove_duplicate=False)]
        owners = {owner[n] for n in names if n in owner}
        if not names:
            return
        callable_ = not isinstance(module, (nn.ModuleList, nn.ModuleDict))
        if len(owners) == 1 and all(n in owner for n in names) and callable_:
            roots[owners.pop()].append(module)
            covered.update(names)
            return
        for child_name, child in module.named_children():
            visit(f"{fqn}.{child_name}" if fqn else child_name, child)

    visit("", model)
    loose = sorted(set(owner) - covered)
    if loose:
        raise ProfileError(
            f"{analytic.model}: tensors {loose[:4]} belong to modules that also hold another unit's tensors, so "
            f"the {analytic.granularity} units cannot be cut out of the real model; measure with granularity layer"
        )
    return [MeasureUnit(name=unit.name, roots=tuple(r), buffers=unit.kind in ("layer", "attention"))
            for unit, r in zip(analytic.units, roots)]


def _inputs(torch: Any, model: Any, hf_config: Any, analytic: ModelProfile,
            workload: Workload) -> tuple[tuple[Any, ...], dict[str, Any], Any]:
    """Forward arguments for the workload (made under the fake mode) and the KV cache, if any.

    prefill / train: ``batch x seq_len`` token ids (train: the ids as labels too, where the model
    takes labels, so the loss is measured with the head); decode: one new token per sequence at
    position ``seq_len - 1`` (``cache_position``, as ``generate`` passes it), with a ``StaticCache`` of
    ``seq_len`` positions that says it holds ``seq_len - 1`` tokens, or a ``DynamicCache`` that does
    hold them when the workload's ``kv_cache`` is dynamic.
    """
    import inspect

    batch, seq = workload.batch, workload.seq_len
    params = inspect.signature(model.forward).parameters
    kwargs: dict[str, Any] = {}
    cache = None
    if workload.mode is Mode.DECODE:
        kwargs["input_ids"] = torch.zeros(batch, 1, dtype=torch.long)
        if str(getattr(getattr(workload, "kv_cache", None), "value", "static")) == "dynamic":
            cache = _dynamic_cache(torch, hf_config, analytic, workload)
        else:
            from transformers import StaticCache

            cache = StaticCache(config=hf_config, max_cache_len=seq)
            # A static cache counts its filled positions from the data (``keys.any(-1).sum()``), which
            # fake tensors do not have; a real one would hold the seq_len - 1 earlier tokens.
            cache.get_seq_length = lambda layer_idx=0: seq - 1
        # transformers 5.25 names it ``cache`` (``past_key_values`` before)
        kwargs["cache" if "cache" in params else "past_key_values"] = cache
        kwargs["use_cache"] = True
        if "cache_position" in params:
            kwargs["cache_position"] = torch.tensor([seq - 1])
    else:
        ids = torch.zeros(batch, seq, dtype=torch.long)
        kwargs["input_ids"] = ids
        if "use_cache" in params:
            kwargs["use_cache"] = False  # prefill keeps no KV cache (as the analytic profile counts it)
        if workload.mode is Mode.TRAIN and "labels" in params:
            kwargs["labels"] = ids
    return (), kwargs, cache


def _dynamic_cache(torch: Any, hf_config: Any, analytic: ModelProfile, workload: Workload) -> Any:
    from transformers import DynamicCache

    from cachefit.units import torch_dtype

    layers = sorted({u.layer for u in analytic.units if u.layer is not None})
    kv = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    cache = DynamicCache(config=hf_config)
    dtype = torch_dtype(workload.act_dtype)
    for layer in layers:
        past = torch.zeros(workload.batch, kv, workload.seq_len - 1, head_dim, dtype=dtype)
        cache.update(past, past.clone(), layer)
    return cache


def _cache_owners(cache: Any, analytic: ModelProfile) -> dict[int, list[Any]]:
    """Unit index -> the KV-cache tensors of its layer (the layer unit, or its attention block)."""
    owners: dict[int, list[Any]] = {}
    by_layer = {u.layer: i for i, u in reversed(list(enumerate(analytic.units)))
                if u.layer is not None and u.kind in ("layer", "attention")}
    for layer, cached in enumerate(getattr(cache, "layers", ())):
        index = by_layer.get(layer)
        # Keys, values and a static layer's fill counter (``StaticLayer.cumulative_length``, an int64
        # scalar the cache keeps for the next step): the layer's cache state, no other unit's bytes.
        tensors = [t for t in (getattr(cached, name, None) for name in ("keys", "values", "cumulative_length"))
                   if hasattr(t, "untyped_storage")]  # a sliding-window layer counts in a Python int
        if index is not None and tensors:
            owners.setdefault(index, []).extend(tensors)
    return owners


def _assemble(analytic: ModelProfile, peaks: Sequence[UnitPeak], workload: Workload, method: str) -> MeasuredProfile:
    """The analytic units with the measured footprints (and no LayerShape: nothing re-estimates them)."""
    units: list[Unit] = []
    adjusted: list[UnitPeak] = []
    extra_batches = workload.micro_batches - 1 if workload.mode is Mode.DECODE else 0
    for unit, peak in zip(analytic.units, peaks, strict=True):
        # Decode with m micro-batches in flight: each holds its own KV cache (as the analytic model
        # counts it), measured once here.
        persistent = peak.persistent_bytes * (1 + extra_batches)
        activation = peak.peak_bytes + peak.persistent_bytes * extra_batches
        parts = [(_part_name(t), t.nbytes) for t in peak.live]
        if peak.other_bytes:
            parts.append((f"{peak.other_count} smaller tensors", peak.other_bytes))
        rest = activation - sum(n for _, n in parts)
        if rest > 0:
            parts.append(("kv_cache of the other micro-batches" if extra_batches else "persistent", rest))
        roles = list(unit.footprint.weight_roles)
        extra_weights = peak.weight_bytes - unit.footprint.weight_bytes
        if extra_weights > 0:
            roles.append(("other", extra_weights))  # registered buffers the analytic tensors leave out
        footprint = Footprint(
            weight_bytes=peak.weight_bytes,
            activation_bytes=activation,
            buffer_bytes=0,
            persistent_activation_bytes=persistent,
            weight_roles=tuple(roles) if extra_weights >= 0 else (),
            activation_parts=tuple(parts) if rest >= 0 else (),
        )
        units.append(replace(unit, footprint=footprint, shape=None))
        adjusted.append(replace(peak, peak_bytes=activation, persistent_bytes=persistent))
    return MeasuredProfile(
        model=analytic.model,
        workload=workload,
        units=tuple(units),
        granularity=analytic.granularity,
        source=analytic.source,
        peaks=tuple(adjusted),
        method=method,
    )


def _part_name(tensor: LiveTensor) -> str:
    shape = "x".join(str(d) for d in tensor.shape) or "scalar"
    where = tensor.module or "model"
    label = tensor.kind if tensor.kind != "activation" else tensor.op
    return f"{label} {shape} {tensor.dtype} ({where})"


# --------------------------------------------------------------------------------------------
# Live modules
# --------------------------------------------------------------------------------------------


def _family_of_module(module: Any) -> FamilySpec | None:
    """The registered family of a transformers model (its ``config.model_type``), else None."""
    from cachefit.families import FAMILIES

    config = getattr(module, "config", None)
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    return family if family is not None and hasattr(config, "to_dict") else None


def _module_dtype(module: Any) -> str | None:
    from cachefit.units import normalize_dtype

    counts: dict[Any, int] = {}
    for p in module.parameters():
        counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    if not counts:
        return None
    try:
        return normalize_dtype(str(max(counts, key=lambda d: counts[d])))
    except ConfigError:
        return None


def _module_workload(module: Any, workload: Workload | None) -> Workload:
    dtype = _module_dtype(module)
    if workload is None:
        workload = Workload(weight_dtype=dtype or "fp32", act_dtype=dtype or "fp32")
    workload = _workload(workload)
    if dtype is not None and dtype != workload.weight_dtype:
        raise ConfigError(
            f"{type(module).__name__}: its parameters are {dtype} but the workload says {workload.weight_dtype}; "
            f"cast the module or pass weight_dtype={dtype!r} (and act_dtype)"
        )
    return workload


def _measure_hf_module(module: Any, workload: Workload | None, granularity: str) -> MeasuredProfile:
    """A live transformers model of a registered family: its config gives the analytic units; the
    module itself runs, its weights swapped for fake copies."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from cachefit.profile.hf_config import load_transformer_spec
    from cachefit.profile.module import fake_weights

    workload = _module_workload(module, workload)
    config = module.config.to_dict()
    name = str(config.get("_name_or_path") or type(module).__name__)
    spec = load_transformer_spec(config, name=name)
    analytic = _analytic(spec, workload, granularity)
    got = {n for n, _ in module.named_parameters(remove_duplicate=False)}
    want = _tensor_names(spec)
    if got != want:
        raise ProfileError(
            f"{name}: the module holds {sorted(got - want)[:4]} that the profile of its config lacks and lacks "
            f"{sorted(want - got)[:4]}; measure a model whose tensors its config describes"
        )
    from cachefit.units import Attention

    # tensors the module keeps outside its parameters and buffers (constants) are made fake on use
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    training = [(m, m.training) for m in module.modules()]
    attention = module.config._attn_implementation
    try:
        # the workload's attention kernel, for this run only (transformers reads it at every forward)
        module.config._attn_implementation = "eager" if workload.attention is Attention.EAGER else "sdpa"
        with fake_weights(module, fake_mode):
            return _measure_built(module, module.config, analytic, workload, fake_mode,
                                  f"nn.Module {type(module).__name__}")
    finally:
        module.config._attn_implementation = attention
        for m, flag in training:
            m.training = flag


def _measure_generic(module: Any, workload: Workload | None, example_inputs: Any,
                     units: Sequence[str] | None) -> MeasuredProfile:
    """Any other module: the units :func:`profile_module` chooses, measured on the example inputs."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from cachefit.profile.module import (
        MeasureUnit,
        fake_weights,
        measure_unit_peaks,
        profile_module,
    )

    if example_inputs is None:
        raise ConfigError(
            f"measure_profile: {type(module).__name__} is not a transformers model of a known family, so "
            "give example_inputs (its forward arguments) to run it on"
        )
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    training = [(m, m.training) for m in module.modules()]
    try:
        with fake_weights(module, fake_mode):
            fake_inputs = torch.utils._pytree.tree_map_only(torch.Tensor, fake_mode.from_tensor, example_inputs)
            with fake_mode:
                profile = profile_module(module, fake_inputs, workload=workload, units=units)
            measure = []
            for unit in profile.units:
                try:
                    sub = module.get_submodule(unit.name)
                except AttributeError:
                    sub = None  # a residual unit (tensors a parent owns directly): no module of its own
                owned = {t.name for t in unit.tensors}
                full = sub is not None and {n for n, _ in sub.named_parameters(prefix=unit.name,
                                                                                 remove_duplicate=False)} == owned
                measure.append(MeasureUnit(name=unit.name, roots=(sub,) if full else ()))
            if isinstance(fake_inputs, torch.Tensor):
                args, kwargs = (fake_inputs,), {}
            elif isinstance(fake_inputs, Mapping):
                args, kwargs = (), dict(fake_inputs)
            else:
                args, kwargs = tuple(fake_inputs), {}
            workload = profile.workload
            train = workload.mode is Mode.TRAIN
            module.train(train)
            with fake_mode:
                peaks = measure_unit_peaks(module, args, kwargs, measure, grad=train, top=LIVE_TENSORS_KEPT)
    finally:
        for m, flag in training:
            m.training = flag
    peaks = tuple(replace(p, weight_bytes=u.footprint.weight_bytes) for p, u in zip(peaks, profile.units))
    return _assemble(profile, peaks, workload, f"nn.Module {type(module).__name__}, forward on FakeTensorMode tensors")


__all__ = [
    "LIVE_TENSORS_KEPT",
    "MEMORY_SOURCES",
    "LiveTensor",
    "MeasuredProfile",
    "UnitPeak",
    "measure_profile",
    "memory_source",
]
