"""Profiles of live PyTorch modules: any ``nn.Module`` (CNNs included) as ordered units.

The one place of the profiler that imports torch. :func:`profile_module` runs one real forward pass
on the example inputs and measures, per unit:

- **weights**: parameters as they are stored (``element_size() * numel``; for tensor subclasses
  such as quantized weights, the bytes of their inner tensors), each shared parameter counted once
  in ``params`` (as ``model.parameters()`` does) but its bytes charged to every unit that reads it,
  the later copies marked ``tied_to``;
- **registered buffers** (``named_buffers``: BatchNorm running statistics, position ids, rotary
  tables): resident for as long as the module lives, so counted with the weights (role ``norm`` for
  a norm's statistics, else ``other``); ``Footprint.buffer_bytes`` (reusable workspace) stays 0;
- **activations**: the peak of the live tensor bytes while the unit runs, seen by a
  ``TorchDispatchMode`` that sees every aten op. A unit's live set is its inputs plus every tensor an
  op inside it reads or creates, until that tensor's storage is freed (tracked with
  ``StorageWeakRef``); parameters and buffers are weights, not activations. Bytes are the logical
  bytes of the storages (``storage.nbytes()``), not the allocator's rounded blocks, and the scratch
  an aten kernel uses inside one op is not visible;
- **FLOPs**: ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-accumulate, matmuls,
  convolutions and attention only), divided by the tokens of the batch.

It runs on any device, the meta device included: there only shapes exist, so a model larger than
memory can be profiled (built under ``with torch.device("meta")``) with the same bytes and FLOPs.

:func:`measure_unit_peaks` is the tracker of measured profiles (:mod:`cachefit.profile.measure`,
``--measure``): one forward, usually on fake tensors, recorded as a timeline of every storage, then
cut into given units, each with the peak of everything alive while it runs (not only what it
touches) and the tensors that make it.

"Per token" means per token when the example input is token ids (an integer ``batch x seq`` tensor,
or ``inputs_embeds``); otherwise (images, feature vectors) the workload has ``seq_len = 1`` and
every "per token" figure is **per sample**.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from cachefit.errors import CachefitError, ConfigError, ProfileError
from cachefit.families import role_module_names
from cachefit.profile.measure import LiveTensor, UnitPeak
from cachefit.units import Footprint, Mode, ModelProfile, TensorSpec, Unit, Workload, normalize_dtype

logger = logging.getLogger(__name__)

__all__ = ["MeasureUnit", "fake_weights", "guess_role", "measure_unit_peaks", "profile_module"]

# Containers whose own forward is only "call the children in order" (Sequential) or that have no
# forward at all (ModuleList, ModuleDict): never a block on their own unless they repeat.
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_LIST_CONTAINERS = (nn.ModuleList, nn.ModuleDict)

# Dict keys of example inputs that hold the tokens (or samples) of the batch, in preference order.
_PRIMARY_INPUT_KEYS = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "x", "input")


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def profile_module(
    module: nn.Module,
    example_inputs: tuple | list | dict | torch.Tensor,
    *,
    workload: Workload | None = None,
    units: Sequence[str] | None = None,
    depth: int | None = None,
    name: str | None = None,
) -> ModelProfile:
    """Profile a live module into units in execution order, measured in one real forward pass.

    Units are chosen in one of three ways:

    - default: the module's *blocks*. Starting from the root, cachefit descends through containers
      (``nn.Sequential``, ``nn.ModuleList``, ``nn.ModuleDict``), through modules with a stack of
      repeated blocks anywhere below them (a ``ModuleList``, or a ``Sequential`` of blocks of the same
      structure, e.g. a transformer's layer list, a ResNet stage), and through modules whose own
      forward only chains their children (no aten op of their own); it stops at a
      repeated block (an element of such a stack), a module that owns parameters or buffers
      directly, a module whose own forward computes something, or a leaf;
    - ``depth=N``: the modules N levels below the root (``encoder.layer.0`` is at depth 3), and
      leaves above that depth;
    - ``units=[fqn, ...]``: exactly these submodules (validated: each exists, none overlaps another).

    Execution order is the order in which the units first ran in the example forward pass.
    Every parameter lands in a unit: parameters or buffers that a descended module owns directly
    (a top-level ``cls_token``, say) form a residual unit named after that module (the root's after
    the model), placed where the forward first used them; with explicit ``units``, submodules
    outside every listed one that hold parameters become units of their own (logged).

    The module runs under ``torch.no_grad()`` in eval mode unless ``workload.mode`` is train (then in
    train mode with gradients, and the tensors autograd saves for backward are measured as
    persistent activations). Hooks, train/eval flags, buffers and the global RNG are restored, even
    when the forward fails.

    Args:
        module: the model to profile.
        example_inputs: a tensor, a tuple of positional arguments, or a dict of keyword arguments.
        workload: what the profile is for; by default prefill with the batch (first dimension) and,
            for token ids, the sequence length of the example input, and the parameters' dtype.
            Must agree with the example inputs and the module (batch, sequence, dtype).
        units: explicit unit FQNs (mutually exclusive with ``depth``).
        depth: take the modules at this depth below the root as units.
        name: model name in the profile (default: the module's class name).

    Raises:
        ConfigError: bad arguments (unknown or overlapping unit FQNs, a workload that contradicts
            the example inputs, an unsupported mode).
        ProfileError: the forward pass fails, a listed unit never runs, or the module has nothing
            to profile.
    """
    if not isinstance(module, nn.Module):
        raise ConfigError(f"profile_module: expected a torch.nn.Module, got {type(module).__name__}")
    model_name = name if name is not None else type(module).__name__
    if not isinstance(model_name, str) or not model_name:
        raise ConfigError(f"profile_module: name must be a non-empty string, got {name!r}")
    args, kwargs = _split_inputs(example_inputs)
    if units is not None and depth is not None:
        raise ConfigError("profile_module: pass either units=[...] or depth=N, not both")
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 1):
        raise ConfigError(
            f"profile_module: depth must be a positive integer (1 = the root's children), got {depth!r}"
        )
    explicit = _validate_units(module, units) if units is not None else None
    if not _holds_tensors(module) and not any(True for _ in module.children()):
        raise ProfileError(
            f"{model_name} ({type(module).__name__}) has no parameters, no buffers and no submodules: there is "
            "nothing to place on a card; profile the model that contains it"
        )
    workload = _resolve_workload(module, args, kwargs, workload, model_name)

    tracker = _run_forward(module, args, kwargs, workload, model_name)

    if explicit is not None:
        choices = explicit
        for choice in choices:
            if not tracker.calls.get(id(choice.module)):
                raise ProfileError(
                    f"unit {choice.fqn!r} ({type(choice.module).__name__}) never ran during the example "
                    "forward pass (its forward was not called, e.g. a ModuleList, or a branch the inputs "
                    "did not take); list the submodules that do run, or pass inputs that exercise it"
                )
    elif depth is not None:
        choices = _select_at_depth(module, depth, tracker)
    else:
        choices = _select_blocks(module, tracker)
    choices = choices + _residual_choices(module, choices, model_name, strict=explicit is not None)
    return _assemble(module, model_name, workload, choices, tracker)


# --------------------------------------------------------------------------------------------
# Inputs and workload
# --------------------------------------------------------------------------------------------


def _split_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, Mapping):
        bad = [k for k in example_inputs if not isinstance(k, str)]
        if bad:
            raise ConfigError(f"example_inputs: dict keys must be argument names (str), got {bad!r}")
        return (), dict(example_inputs)
    raise ConfigError(
        "example_inputs must be a tensor, a tuple of positional arguments or a dict of keyword "
        f"arguments, got {type(example_inputs).__name__}"
    )


def _iter_tensors(obj: Any, _depth: int = 0) -> Iterator[torch.Tensor]:
    """Tensors inside nested tuples, lists, dicts (HF ``ModelOutput`` is a dict), in order."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif _depth > 8:
        return
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from _iter_tensors(value, _depth + 1)
    elif isinstance(obj, (tuple, list, set, frozenset)):
        for value in obj:
            yield from _iter_tensors(value, _depth + 1)


def _primary_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str | None, torch.Tensor | None]:
    for key in _PRIMARY_INPUT_KEYS:
        if isinstance(kwargs.get(key), torch.Tensor):
            return key, kwargs[key]
    for tensor in _iter_tensors((args, kwargs)):
        return None, tensor
    return None, None


def _dominant_dtype(module: nn.Module) -> tuple[torch.dtype | None, bool]:
    """dtype holding the most parameter bytes (buffers if no parameters); and whether any
    parameter is a tensor subclass (quantized weights), whose ``dtype`` is only the logical one."""
    by_dtype: dict[torch.dtype, int] = {}
    has_subclass = False
    tensors = list(module.parameters()) or list(module.buffers())
    for tensor in tensors:
        has_subclass |= is_traceable_wrapper_subclass(tensor)
        by_dtype[tensor.dtype] = by_dtype.get(tensor.dtype, 0) + _tensor_bytes(tensor, "?")
    if not by_dtype:
        return None, False
    return max(by_dtype, key=lambda d: by_dtype[d]), has_subclass


def _canonical_dtype(dtype: torch.dtype | None) -> str | None:
    if dtype is None:
        return None
    try:
        return normalize_dtype(str(dtype))
    except ConfigError:
        return None


def _resolve_workload(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], workload: Workload | None, model_name: str
) -> Workload:
    key, primary = _primary_input(args, kwargs)
    batch = seq_len = None
    tokens_input = False
    if primary is not None:
        batch = int(primary.shape[0]) if primary.dim() >= 1 else 1
        is_ids = primary.dim() == 2 and not primary.is_floating_point() and not primary.is_complex()
        if is_ids or (key == "inputs_embeds" and primary.dim() == 3):
            seq_len, tokens_input = int(primary.shape[1]), True
        else:
            seq_len = 1  # per sample: images, feature vectors, audio
    param_dtype, has_subclass = _dominant_dtype(module)
    weight_dtype = _canonical_dtype(param_dtype)

    if workload is None:
        if primary is None:
            raise ConfigError(
                f"{model_name}: example_inputs hold no tensor, so the batch size is unknown; "
                "pass workload=Workload(batch=..., seq_len=..., mode='prefill', ...)"
            )
        if param_dtype is not None and weight_dtype is None:
            raise ConfigError(
                f"{model_name}: parameters are {param_dtype}, which cachefit has no dtype name for; cast "
                "the module (e.g. module.float() or module.half()) or pass a workload naming the dtype"
            )
        act_dtype = weight_dtype if param_dtype is not None and param_dtype.is_floating_point else None
        if act_dtype is None:
            floating = [t for t in _iter_tensors((args, kwargs)) if t.is_floating_point()]
            act_dtype = (_canonical_dtype(floating[0].dtype) if floating else None) or "fp32"
        return Workload(
            batch=batch,
            seq_len=seq_len,
            mode=Mode.PREFILL,
            weight_dtype=weight_dtype or act_dtype,
            act_dtype=act_dtype,
        )

    if not isinstance(workload, Workload):
        raise ConfigError(f"profile_module: workload must be a cachefit Workload, got {type(workload).__name__}")
    if workload.mode is Mode.DECODE:
        raise ConfigError(
            f"{model_name}: workload.mode decode is not measured on live modules (the KV cache would have to "
            "be built and passed by the caller); profile mode='prefill' or 'train' here, or use the analytic "
            "transformer profile for decode"
        )
    if workload.micro_batches != 1:
        raise ConfigError(
            f"{model_name}: workload.micro_batches is {workload.micro_batches}; a live profile measures one "
            "micro-batch: pass micro_batches=1 and the micro-batch as the example input"
        )
    if primary is not None:
        if batch != workload.batch:
            raise ConfigError(
                f"{model_name}: workload.batch is {workload.batch} but the example input "
                f"({key or 'first tensor'}, shape {tuple(primary.shape)}) has batch {batch}; the profile measures "
                "the example, so make them agree"
            )
        allowed = {seq_len} if tokens_input else {1} | ({int(primary.shape[1])} if primary.dim() >= 2 else set())
        if workload.seq_len not in allowed:
            raise ConfigError(
                f"{model_name}: workload.seq_len is {workload.seq_len} but the example input "
                f"({key or 'first tensor'}, shape {tuple(primary.shape)}) allows {sorted(allowed)} "
                "(token ids: their length; other inputs: 1, i.e. per sample); make them agree"
            )
    if weight_dtype is not None and not has_subclass and weight_dtype != workload.weight_dtype:
        raise ConfigError(
            f"{model_name}: workload.weight_dtype is {workload.weight_dtype} but the module's parameters are "
            f"{weight_dtype}; the profile measures the real tensors, so cast the module or pass "
            f"weight_dtype={weight_dtype!r}"
        )
    return workload


# --------------------------------------------------------------------------------------------
# Measuring: a dispatch mode that follows every storage an op reads or creates
# --------------------------------------------------------------------------------------------


def _tensor_bytes(tensor: torch.Tensor, fqn: str) -> int:
    """Bytes a weight occupies: ``element_size * numel``, or its inner tensors' for a subclass."""
    if is_traceable_wrapper_subclass(tensor):
        attrs, _ = tensor.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(tensor, attr), f"{fqn}.{attr}") for attr in attrs)
    try:
        return int(tensor.element_size()) * int(tensor.numel())
    except (RuntimeError, TypeError, NotImplementedError) as exc:
        raise ProfileError(
            f"tensor {fqn} ({type(tensor).__name__}, {tensor.dtype}) has no measurable size ({exc}); "
            "convert it to a plain or a traceable-wrapper tensor before profiling"
        ) from exc


def _storages(obj: Any) -> Iterator[torch.UntypedStorage]:
    """Untyped storages behind the tensors in ``obj`` (inner tensors of wrapper subclasses)."""
    for tensor in _iter_tensors(obj):
        yield from _tensor_storages(tensor)


def _tensor_storages(tensor: torch.Tensor) -> Iterator[torch.UntypedStorage]:
    if is_traceable_wrapper_subclass(tensor):
        attrs, _ = tensor.__tensor_flatten__()
        for attr in attrs:
            inner = getattr(tensor, attr)
            if isinstance(inner, torch.Tensor):
                yield from _tensor_storages(inner)
        return
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):
        return  # sparse / nested / functional tensors have no plain storage: not measured
    yield storage


class _Call:
    """One call of one module's forward: what it touched and the peak of what was live."""

    __slots__ = (
        "module_id",
        "seq",
        "touched",
        "alive_bytes",
        "peak_bytes",
        "input_keys",
        "input_bytes",
        "output_bytes",
        "flops",
        "own_flops",
        "own_ops",
        "own_peak_bytes",
        "saved",
    )

    def __init__(self, module_id: int, seq: int) -> None:
        self.module_id = module_id
        self.seq = seq
        self.touched: set[int] = set()
        self.alive_bytes = 0
        self.peak_bytes = 0
        self.input_keys: frozenset[int] = frozenset()
        self.input_bytes = 0
        self.output_bytes = 0
        self.flops = 0  # every op while this call is active
        self.own_flops = 0  # ops while it is the innermost module (its own code, not its children's)
        self.own_ops = 0
        self.own_peak_bytes = 0  # largest operand set (inputs + outputs) of one of its own ops
        self.saved: dict[int, int] = {}  # storages autograd saved for backward (train)


class _Tracked:
    __slots__ = ("ref", "nbytes", "owners")

    def __init__(self, storage: torch.UntypedStorage) -> None:
        self.ref = StorageWeakRef(storage)
        self.nbytes = int(storage.nbytes())
        self.owners: list[_Call] = []


class _LiveTensorTracker(TorchDispatchMode):
    """Follows every storage an op reads or writes, per active module call.

    A storage is keyed by its ``StorageImpl`` address (``storage._cdata``); the ``StorageWeakRef``
    kept for it reserves that address until the tracker drops it, so a key is never reused for
    another storage while tracked. Frees are found by polling ``expired()`` before each op and hook
    (a free between two ops is seen before the next op's outputs are counted).
    """

    def __init__(self, flop_counter: FlopCounterMode, weight_storages: Sequence[torch.UntypedStorage]) -> None:
        super().__init__()
        self.flop_counter = flop_counter
        # Strong references: a weight's storage address cannot be reused by an activation.
        self._weight_storages = tuple(weight_storages)
        self.weight_keys = frozenset(s._cdata for s in self._weight_storages)
        self.tracked: dict[int, _Tracked] = {}
        self.stack: list[_Call] = []
        self.calls: dict[int, list[_Call]] = {}
        self.event = 0
        self.first_use: dict[int, int] = {}  # weight storage key -> event of its first op

    # -- storage bookkeeping ---------------------------------------------------------------
    def _sweep(self) -> None:
        dead = [key for key, entry in self.tracked.items() if entry.ref.expired()]
        for key in dead:
            entry = self.tracked.pop(key)
            for call in entry.owners:
                call.touched.discard(key)
                call.alive_bytes -= entry.nbytes

    def _touch(self, key: int, storage: torch.UntypedStorage, calls: Sequence[_Call]) -> _Tracked:
        entry = self.tracked.get(key)
        if entry is None:
            entry = self.tracked[key] = _Tracked(storage)
        for call in calls:
            if key not in call.touched:
                call.touched.add(key)
                call.alive_bytes += entry.nbytes
                entry.owners.append(call)
        return entry

    def _activation_storages(self, obj: Any) -> dict[int, torch.UntypedStorage]:
        found: dict[int, torch.UntypedStorage] = {}
        for storage in _storages(obj):
            key = storage._cdata
            if key in self.weight_keys:
                self.first_use.setdefault(key, self.event)
            else:
                found.setdefault(key, storage)
        return found

    def _sample(self, calls: Sequence[_Call]) -> None:
        for call in calls:
            if call.alive_bytes > call.peak_bytes:
                call.peak_bytes = call.alive_bytes

    def _finish(self, call: _Call) -> None:
        for key in call.touched:
            entry = self.tracked.get(key)
            if entry is None:
                continue
            entry.owners = [c for c in entry.owners if c is not call]
            if not entry.owners:
                del self.tracked[key]
        call.touched = set()
        self.calls.setdefault(call.module_id, []).append(call)

    # -- dispatch ----------------------------------------------------------------------------
    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        self._sweep()
        flops_before = self.flop_counter.get_total_flops()
        out = func(*args, **kwargs)
        flops = self.flop_counter.get_total_flops() - flops_before
        self.event += 1
        operands = self._activation_storages((args, kwargs, out))
        if not self.stack:
            return out  # outside every module call: the FLOP counter still has it in its total
        operand_bytes = 0
        for key, storage in operands.items():
            operand_bytes += self._touch(key, storage, self.stack).nbytes
        inner = self.stack[-1]
        inner.own_flops += flops
        inner.own_ops += 1
        inner.own_peak_bytes = max(inner.own_peak_bytes, operand_bytes)
        for call in self.stack:
            call.flops += flops
        self._sample(self.stack)
        return out

    # -- module hooks ----------------------------------------------------------------------
    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._sweep()
        self.event += 1
        call = _Call(id(module), self.event)
        self.stack.append(call)
        for key, storage in self._activation_storages((args, kwargs)).items():
            self._touch(key, storage, self.stack)
        call.input_keys = frozenset(call.touched)
        call.input_bytes = call.alive_bytes
        self._sample(self.stack)

    def post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self._sweep()
        ids = [c.module_id for c in self.stack]
        index = len(ids) - 1 - ids[::-1].index(id(module)) if id(module) in ids else None
        if index is None:
            return
        active = self.stack[: index + 1]
        call = self.stack[index]
        out_keys: set[int] = set()
        for key, storage in self._activation_storages(output).items():
            self._touch(key, storage, active)
            out_keys.add(key)
        call.output_bytes = sum(self.tracked[k].nbytes for k in out_keys - call.input_keys)
        self._sample(active)
        # Calls above ``index`` never got their post-hook (an exception caught inside the forward).
        for finished in reversed(self.stack[index:]):
            self._finish(finished)
        del self.stack[index:]

    def pack_hook(self, tensor: torch.Tensor) -> torch.Tensor:
        """``saved_tensors_hooks`` pack: charge what autograd saves to the active calls."""
        if self.stack:
            for key, storage in self._activation_storages(tensor).items():
                entry = self._touch(key, storage, self.stack)
                for call in self.stack:
                    call.saved[key] = entry.nbytes
            self._sample(self.stack)
        return tensor


def _sdpa_cpu_flops(
    query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    """FLOPs of ``aten._scaled_dot_product_flash_attention_for_cpu`` (not in torch's registry).

    Same count as torch's ``sdpa_flop_count`` (torch/utils/flop_counter.py) for the other SDPA
    kernels: ``QK^T`` and ``PV`` are two batched matmuls of ``2 * b * h * s_q * s_k * d`` FLOPs each
    (``d`` = query/key head dim, then value head dim); a causal mask is not discounted, as there.
    """
    b, h, s_q, d_qk = (int(x) for x in query_shape[-4:])
    s_k = int(key_shape[-2])
    d_v = int(value_shape[-1])
    return 2 * b * h * s_q * s_k * d_qk + 2 * b * h * s_q * s_k * d_v


def _flop_counter() -> FlopCounterMode:
    custom: dict[Any, Callable[..., int]] = {}
    sdpa_cpu = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if sdpa_cpu is not None and sdpa_cpu not in flop_registry:
        custom[sdpa_cpu] = _sdpa_cpu_flops
    return FlopCounterMode(display=False, custom_mapping=custom)


def _weight_storages(module: nn.Module) -> list[torch.UntypedStorage]:
    storages: list[torch.UntypedStorage] = []
    for tensor in [*module.parameters(), *module.buffers()]:
        storages.extend(_tensor_storages(tensor))
    return storages


def _hook_every_module(module: nn.Module, tracker: Any) -> list[Any]:
    """``tracker``'s pre- and post-forward hooks on each module object once (even if reachable by two names)."""
    handles = []
    for m in module.modules():
        handles.append(m.register_forward_pre_hook(tracker.pre_hook, with_kwargs=True))
        handles.append(m.register_forward_hook(tracker.post_hook, with_kwargs=True))
    return handles


def _tracked_forward(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], tracker: Any, *, grad: bool,
                     failed: str, hint: str = "", contexts: Sequence[Any] = ()) -> Any:
    """``module(*args, **kwargs)`` under ``contexts`` and ``tracker`` (innermost), with autograd's saved
    tensors reported to the tracker when ``grad``; a failure of the forward is a ProfileError saying
    ``failed``, the error, and ``hint``."""
    with contextlib.ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        stack.enter_context(torch.enable_grad() if grad else torch.no_grad())
        if grad:
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(tracker.pack_hook, lambda t: t))
        stack.enter_context(tracker)
        try:
            return module(*args, **kwargs)
        except CachefitError:
            raise
        except Exception as exc:
            raise ProfileError(f"{failed}: {type(exc).__name__}: {exc}{hint}") from exc


def _run_forward(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], workload: Workload, model_name: str
) -> _LiveTensorTracker:
    """Run the example forward pass under the tracker; restore the module whatever happens."""
    train = workload.mode is Mode.TRAIN
    flags = [(m, m.training) for m in module.modules()]
    saved_buffers = []
    for m in module.modules():
        for buf_name, buf in m._buffers.items():
            if buf is None:
                continue
            try:
                saved_buffers.append((m, buf_name, buf, buf.detach().clone()))
            except (RuntimeError, NotImplementedError, TypeError):
                saved_buffers.append((m, buf_name, buf, None))
    flop_counter = _flop_counter()
    tracker = _LiveTensorTracker(flop_counter, _weight_storages(module))
    handles = _hook_every_module(module, tracker)
    try:
        module.train(train)
        output = _tracked_forward(
            module, args, kwargs, tracker, grad=train,
            contexts=(torch.random.fork_rng(devices=[]), flop_counter),
            failed=f"forward of {model_name} ({type(module).__name__}) failed on the example inputs",
            hint=". Check that example_inputs match the forward signature (a tuple is passed positionally, a "
                 "dict by keyword) and live on the module's device",
        )
        del output
    finally:
        for handle in handles:
            handle.remove()
        for m, training in flags:
            m.training = training
        with torch.no_grad():
            for m, buf_name, buf, copy in saved_buffers:
                m._buffers[buf_name] = buf
                if copy is not None:
                    with contextlib.suppress(RuntimeError, NotImplementedError, TypeError):
                        buf.copy_(copy)
    if train and not any(c.saved for calls in tracker.calls.values() for c in calls):
        logger.warning(
            "%s: mode=train but autograd saved no tensor for backward (no parameter requires grad?); "
            "persistent activations are 0",
            model_name,
        )
    return tracker


# --------------------------------------------------------------------------------------------
# Choosing units
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class _Choice:
    """A unit to build: a module (and its subtree) or, for a residual, only its own tensors."""

    name: str
    fqn: str
    module: nn.Module
    own_only: bool = False


def _join(prefix: str, child: str) -> str:
    return f"{prefix}.{child}" if prefix else child


def _validate_units(root: nn.Module, units: Sequence[str]) -> list[_Choice]:
    if isinstance(units, str) or not isinstance(units, Sequence):
        raise ConfigError(
            f"units must be a list of module FQNs, e.g. ['embeddings', 'encoder.layer.0'], got {units!r}"
        )
    if not units:
        raise ConfigError("units is empty; list the submodules to profile as units, or leave it out")
    choices: list[_Choice] = []
    for fqn in units:
        if not isinstance(fqn, str):
            raise ConfigError(f"units: every entry must be a module FQN string, got {fqn!r}")
        try:
            sub = root.get_submodule(fqn)
        except AttributeError:
            parent, _, _ = fqn.rpartition(".")
            try:
                near = [n for n, _ in root.get_submodule(parent).named_children()]
            except AttributeError:
                near = [n for n, _ in root.named_children()]
                parent = ""
            where = f"children of {parent!r}" if parent else "top-level children"
            raise ConfigError(
                f"units: no submodule {fqn!r} in {type(root).__name__}; {where}: {', '.join(near) or '(none)'}"
            ) from None
        choices.append(_Choice(name=fqn, fqn=fqn, module=sub))
    dup = sorted({f for f in units if list(units).count(f) > 1})
    if dup:
        raise ConfigError(f"units: {dup} listed more than once; list each module once")
    subtree = [{id(m) for m in c.module.modules()} for c in choices]
    for i, a in enumerate(choices):
        for j in range(i + 1, len(choices)):
            b = choices[j]
            if subtree[i] & subtree[j]:
                outer, inner = (a, b) if id(b.module) in subtree[i] else (b, a)
                raise ConfigError(
                    f"units overlap: {outer.fqn or '(root)'!r} contains {inner.fqn!r} "
                    "(or they share a submodule); "
                    "list either the parent or its children, not both"
                )
    return choices


def _structure_key(module: nn.Module) -> Any:
    if isinstance(module, _CONTAINERS):
        return (type(module), tuple(_structure_key(c) for c in module.children()))
    return type(module)


def _stack_elements(module: nn.Module) -> set[str]:
    """Children of ``module`` that are elements of a stack of repeated blocks."""
    children = list(module.named_children())
    if isinstance(module, _LIST_CONTAINERS):
        return {n for n, _ in children}
    if isinstance(module, nn.Sequential):
        keys = [_structure_key(c) for _, c in children]
        return {n for (n, _), k in zip(children, keys) if keys.count(k) >= 2}
    return set()


def _holds_stack(module: nn.Module) -> bool:
    """Whether a stack of repeated blocks sits anywhere below ``module`` (a trunk, not a block).

    Only blocks count (elements with submodules of their own): ``Sequential(Linear, ReLU, Linear)``
    repeats a layer, not a block, and stays one block's MLP.
    """
    for sub in module.modules():
        if sub is not module and isinstance(sub, _CONTAINERS):
            elements = _stack_elements(sub)
            if any(next(child.children(), None) is not None for n, child in sub.named_children() if n in elements):
                return True
    return False


def _owns_tensors(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))


def _holds_tensors(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def _ran(module: nn.Module, tracker: _LiveTensorTracker) -> bool:
    return bool(tracker.calls.get(id(module)))


def _descendants_ran(module: nn.Module, tracker: _LiveTensorTracker) -> bool:
    return any(_ran(m, tracker) for m in module.modules() if m is not module)


def _select_blocks(root: nn.Module, tracker: _LiveTensorTracker) -> list[_Choice]:
    chosen: list[_Choice] = []
    seen: set[int] = set()

    def own_compute(module: nn.Module) -> bool:
        return any(c.own_ops for c in tracker.calls.get(id(module), ()))

    def visit(fqn: str, module: nn.Module, is_root: bool, is_element: bool) -> None:
        if id(module) in seen:
            return  # a module reachable by two names is taken once, under its first name
        seen.add(id(module))
        children = list(module.named_children())
        if not children:
            is_unit = True
        elif isinstance(module, _LIST_CONTAINERS) or is_root:
            is_unit = False
        elif is_element:
            is_unit = True
        elif isinstance(module, nn.Sequential) or _holds_stack(module):
            is_unit = False
        else:
            is_unit = _owns_tensors(module) or own_compute(module)
        if is_unit and children and not _ran(module, tracker) and _descendants_ran(module, tracker):
            is_unit = False  # a holder whose children are called directly by someone else
        if is_unit:
            chosen.append(_Choice(name=fqn or "", fqn=fqn, module=module))
            return
        elements = _stack_elements(module)
        for child_name, child in children:
            visit(_join(fqn, child_name), child, False, child_name in elements)

    visit("", root, True, False)
    return chosen


def _select_at_depth(root: nn.Module, depth: int, tracker: _LiveTensorTracker) -> list[_Choice]:
    chosen: list[_Choice] = []
    seen: set[int] = set()

    def visit(fqn: str, module: nn.Module, level: int) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        children = list(module.named_children())
        descend = bool(children) and (
            level < depth
            or isinstance(module, _LIST_CONTAINERS)
            or (not _ran(module, tracker) and _descendants_ran(module, tracker))
        )
        if not descend:
            chosen.append(_Choice(name=fqn, fqn=fqn, module=module))
            return
        for child_name, child in children:
            visit(_join(fqn, child_name), child, level + 1)

    visit("", root, 0)
    return chosen


def _residual_choices(root: nn.Module, choices: list[_Choice], model_name: str, *, strict: bool) -> list[_Choice]:
    """Units for what no chosen unit holds: tensors owned directly by a descended module, and
    (explicit units only) whole subtrees left out of every unit."""
    covered: set[int] = set()
    for choice in choices:
        covered.update(id(m) for m in choice.module.modules())
    ancestor_fqns: set[str] = set()
    for choice in choices:
        if choice.fqn:
            parts = choice.fqn.split(".")
            ancestor_fqns.update(".".join(parts[:i]) for i in range(len(parts)))
    extra: list[_Choice] = []
    taken_names = {c.name for c in choices}
    for fqn in sorted(ancestor_fqns, key=lambda f: (f.count(".") if f else -1, f)):
        module = root.get_submodule(fqn)
        if id(module) in covered or not _owns_tensors(module):
            continue
        unit_name = fqn or model_name
        if unit_name in taken_names:
            unit_name = f"{unit_name}(own)"
        extra.append(_Choice(name=unit_name, fqn=fqn, module=module, own_only=True))
        taken_names.add(unit_name)
        logger.info(
            "%s: tensors owned directly by %r form the residual unit %r", model_name, fqn or "(root)", unit_name
        )
    # Subtrees under an ancestor that no unit covers (only possible with explicit units).
    for fqn in sorted(ancestor_fqns):
        parent = root.get_submodule(fqn)
        if id(parent) in covered:
            continue
        for child_name, child in parent.named_children():
            child_fqn = _join(fqn, child_name)
            if id(child) in covered or child_fqn in ancestor_fqns:
                continue
            covered.update(id(m) for m in child.modules())
            if not _holds_tensors(child):
                continue  # parameter-free glue (a dropout, an activation): its FLOPs are logged as outside
            if strict:
                logger.warning(
                    "%s: %r holds parameters but is in no listed unit; it becomes a unit of its own",
                    model_name,
                    child_fqn,
                )
            extra.append(_Choice(name=child_fqn, fqn=child_fqn, module=child))
            taken_names.add(child_fqn)
    return extra


# --------------------------------------------------------------------------------------------
# Building units
# --------------------------------------------------------------------------------------------

_NORM_TYPES: tuple[type, ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
# Module names by role: every registered family's (FamilySpec.role_names) and those of common
# live-module-only models (nn.MultiheadAttention, timm, gpt-fast), from the family registry.
_ROLE_NAMES = role_module_names()
_QKV_NAMES = frozenset(_ROLE_NAMES.qkv)
_ATTN_OUT_NAMES = frozenset(_ROLE_NAMES.attn_out)
_HEAD_NAMES = frozenset(_ROLE_NAMES.head)


def guess_role(root: nn.Module, param_fqn: str) -> str:
    """Role of a weight (one of ``units.WEIGHT_ROLES``) from its module's type and its FQN.

    A guess, for live-module profiles, reports and compression: embeddings, norms and convolutions
    by module type; Q/K/V, attention output and head by the module names of the family registry;
    any other linear layer is ``mlp``, anything else ``other``.

    Args:
        root: the model the FQN is relative to.
        param_fqn: the parameter's FQN, e.g. ``model.layers.0.self_attn.q_proj.weight``.
    """
    owner_fqn, _, tensor_name = param_fqn.rpartition(".")
    owner = root.get_submodule(owner_fqn)
    parts = [p.lower() for p in owner_fqn.split(".")] if owner_fqn else []
    last = parts[-1] if parts else ""
    if isinstance(owner, (nn.Embedding, nn.EmbeddingBag)):
        positional = "position" in last or "token_type" in last or last in ("wpe", "pos_embed", "pos_emb")
        return "pos_embed" if positional else "embed"
    if isinstance(owner, _NORM_TYPES) or type(owner).__name__.lower().endswith("norm"):
        return "norm"
    if isinstance(owner, nn.modules.conv._ConvNd):
        return "conv"
    if any(p in _HEAD_NAMES for p in parts):
        return "head"
    if last in _QKV_NAMES or tensor_name.startswith("in_proj"):
        return "qkv"
    parent = root.get_submodule(owner_fqn.rpartition(".")[0]) if owner_fqn else None
    in_attn = isinstance(parent, nn.MultiheadAttention) or any("attn" in p or "attention" in p for p in parts[:-1])
    if last in _ATTN_OUT_NAMES and in_attn:
        return "attn_out"
    cls_name = type(owner).__name__
    if isinstance(owner, nn.Linear) or "linear" in cls_name.lower() or cls_name == "Conv1D":
        return "mlp"
    return "other"


def _assemble(
    root: nn.Module, model_name: str, workload: Workload, choices: list[_Choice], tracker: _LiveTensorTracker
) -> ModelProfile:
    never = float("inf")

    def order_key(index_choice: tuple[int, _Choice]) -> tuple[float, int]:
        index, choice = index_choice
        calls = tracker.calls.get(id(choice.module), [])
        if choice.own_only:
            keys = [
                tracker.first_use[s._cdata]
                for t in [*choice.module.parameters(recurse=False), *choice.module.buffers(recurse=False)]
                for s in _tensor_storages(t)
                if s._cdata in tracker.first_use
            ]
            if keys:
                return (min(keys), index)
        return (min((c.seq for c in calls), default=never), index)

    ordered = []
    for _, choice in sorted(enumerate(choices), key=order_key):
        if not choice.own_only and not _ran(choice.module, tracker) and not _holds_tensors(choice.module):
            logger.debug("%s: %r never ran and holds no tensor; not a unit", model_name, choice.name)
            continue
        ordered.append(choice)
    for choice in ordered:
        if not choice.own_only and not _ran(choice.module, tracker):
            logger.warning(
                "%s: unit %r never ran in the example forward pass; it is placed last with no activations "
                "or FLOPs (its weights are still counted)",
                model_name,
                choice.name,
            )
    _warn_interleaved(ordered, tracker, model_name)

    tokens = workload.tokens
    seen_params: dict[int, str] = {}
    built: list[Unit] = []
    unit_flops_total = 0
    for choice in ordered:
        if not choice.name:
            choice = _Choice(name=model_name, fqn=choice.fqn, module=choice.module, own_only=choice.own_only)
        unit, flops = _build_unit(root, choice, tracker, seen_params, tokens, workload)
        built.append(unit)
        unit_flops_total += flops

    expected = sum(p.numel() for p in root.parameters())
    counted = sum(u.params for u in built)
    if counted != expected:
        raise ProfileError(
            f"{model_name}: units hold {counted} parameters but the model has {expected}; "
            "this is a bug in the unit selection, list units=[...] explicitly to work around it"
        )
    total_flops = tracker.flop_counter.get_total_flops()
    if total_flops > unit_flops_total:
        logger.info(
            "%s: %d of %d FLOPs (%.2f%%) ran outside every unit (the model's own glue code) and are in no unit",
            model_name,
            total_flops - unit_flops_total,
            total_flops,
            100.0 * (total_flops - unit_flops_total) / total_flops,
        )
    cls = type(root)
    return ModelProfile(
        model=model_name,
        workload=workload,
        units=tuple(built),
        granularity="layer",
        source=f"nn.Module {cls.__module__}.{cls.__qualname__}",
    )


def _warn_interleaved(ordered: list[_Choice], tracker: _LiveTensorTracker, model_name: str) -> None:
    firsts = []
    for choice in ordered:
        calls = [] if choice.own_only else tracker.calls.get(id(choice.module), [])
        if calls:
            firsts.append((choice, min(c.seq for c in calls), max(c.seq for c in calls)))
    for (a, _, a_last), (b, b_first, _) in zip(firsts, firsts[1:]):
        if a_last > b_first:
            logger.warning(
                "%s: unit %r runs again after %r started; a pipeline over these units would send "
                "activations backwards",
                model_name,
                a.name,
                b.name,
            )


def _build_unit(
    root: nn.Module,
    choice: _Choice,
    tracker: _LiveTensorTracker,
    seen_params: dict[int, str],
    tokens: int,
    workload: Workload,
) -> tuple[Unit, int]:
    recurse = not choice.own_only
    module = choice.module
    # Weights: every FQN the unit reaches (remove_duplicate=False keeps tied names), bytes once
    # per distinct tensor in this unit, params once per distinct tensor in the whole model.
    tensors: list[TensorSpec] = []
    roles: dict[str, int] = {}
    in_unit: set[int] = set()
    params = weight_bytes = 0
    for fqn, param in module.named_parameters(prefix=choice.fqn, recurse=recurse, remove_duplicate=False):
        role = guess_role(root, fqn)
        canonical = seen_params.get(id(param))
        if canonical is None:
            seen_params[id(param)] = fqn
            params += param.numel()
        tensors.append(TensorSpec(name=fqn, shape=tuple(param.shape), role=role, tied_to=canonical))
        if id(param) in in_unit:
            continue
        in_unit.add(id(param))
        nbytes = _tensor_bytes(param, fqn)
        weight_bytes += nbytes
        roles[role] = roles.get(role, 0) + nbytes
    # Registered buffers (BatchNorm running statistics, position ids, rotary tables) stay resident
    # for as long as the module exists, like weights: a card holding several units needs all of
    # them, so they count as weight bytes (role norm / other), not as the reusable workspace that
    # ``Footprint.buffer_bytes`` means (see ``stack_footprints``).
    seen_buffers: set[int] = set()
    for fqn, buf in module.named_buffers(prefix=choice.fqn, recurse=recurse, remove_duplicate=False):
        if id(buf) in seen_buffers:
            continue
        seen_buffers.add(id(buf))
        nbytes = _tensor_bytes(buf, fqn)
        role = "norm" if guess_role(root, fqn) == "norm" else "other"
        weight_bytes += nbytes
        roles[role] = roles.get(role, 0) + nbytes

    calls = tracker.calls.get(id(module), [])
    persistent = 0
    if choice.own_only:
        flops = sum(c.own_flops for c in calls)
        activation = max((c.own_peak_bytes for c in calls), default=0)
        parts: tuple[tuple[str, int], ...] = (("own_op_operands", activation),) if calls else ()
    elif calls:
        flops = sum(c.flops for c in calls)
        peak = max(calls, key=lambda c: c.peak_bytes)
        if workload.mode is Mode.TRAIN:
            persistent = sum(sum(c.saved.values()) for c in calls)
        # The post-hook sample has inputs and outputs live at once, so peak >= inputs + outputs.
        activation = max(peak.peak_bytes, persistent, peak.input_bytes + peak.output_bytes)
        parts = (
            ("inputs", peak.input_bytes),
            ("outputs", peak.output_bytes),
            ("intermediates", activation - peak.input_bytes - peak.output_bytes),
        )
    else:
        flops, activation, parts = 0, 0, ()

    footprint = Footprint(
        weight_bytes=weight_bytes,
        activation_bytes=activation,
        buffer_bytes=0,
        persistent_activation_bytes=persistent,
        weight_roles=tuple(sorted(roles.items())),
        activation_parts=parts,
    )
    unit = Unit(
        name=choice.name,
        kind=type(module).__name__,
        footprint=footprint,
        params=params,
        # FLOPs of the whole batch / tokens in it (per sample for non-token inputs), rounded.
        flops_per_token=int(math.floor(flops / tokens + 0.5)),
        tensors=tuple(tensors),
    )
    return unit, flops


# --------------------------------------------------------------------------------------------
# Measured units: one timeline of every storage, cut into units afterwards
# --------------------------------------------------------------------------------------------
#
# Why not torch.distributed._tools.mem_tracker.MemTracker (FakeTensorMode-aware, per-module peaks)?
# It answers "what is live while module M runs", by category. A unit here is often not one module
# call: an embedding unit is several modules plus the code that sums them (GPT-2's wte + wpe), an
# attention block is half a decoder layer, a head is the final norm plus the LM head. MemTracker also
# cannot leave out what another unit keeps for later (another layer's KV cache, tensors saved for
# another unit's backward), and it keeps totals, not which tensors (made by which op) form a peak.
# So this tracker records one timeline -- every storage made and freed, every op with the storages it
# touched -- and the units are cut out of it afterwards, once all of that is known.

_ALLOC, _OP, _FREE, _SAVED = 0, 1, 2, 3


@dataclass(frozen=True, slots=True, kw_only=True)
class MeasureUnit:
    """A unit as the real module runs it, for :func:`measure_unit_peaks`."""

    name: str
    roots: tuple[nn.Module, ...]
    """The modules whose calls are the unit's ops (``model.layers.3``; for an attention block the
    layer's input norm and its attention). Ops outside every unit's modules (the model's own code:
    masks, position ids, GPT-2's embedding sum, the residual adds of a layer split into blocks) go to
    the unit that made the newest of their operands, or, when no unit made any, to the next unit to run."""
    buffers: bool = True
    """Whether the buffers alive while it runs (attention masks, rotary tables: what
    :func:`measure_unit_peaks` is told makes them) count toward its peak. cachefit books them on layer
    and attention units, so an embedding, an MLP block or a head leaves them out."""


class _Storage:
    __slots__ = ("buffer", "dtype", "finalizer", "module", "nbytes", "op", "order", "ref", "shape")


class _TimelineTracker(TorchDispatchMode):
    """Records every storage made (by which op, in which module) and freed, and every op with the
    storages it touched and the unit whose modules were running. Storages are keyed by their
    ``StorageImpl`` address; the ``StorageWeakRef`` held for each until the end keeps that address from
    being reused, so a key names one storage for the whole timeline. Frees are seen through a
    ``weakref.finalize`` on the storage object (kept alive by torch as long as the storage lives)."""

    def __init__(self, weight_storages: Sequence[torch.UntypedStorage], unit_of_module: Mapping[int, int],
                 names: Mapping[int, str], buffer_modules: frozenset[int] = frozenset(),
                 buffer_code: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.buffer_modules = buffer_modules
        self.buffer_code = buffer_code
        self.in_buffer_module = 0
        self._weights = tuple(weight_storages)  # strong references: weight addresses are never reused
        self.weight_keys = frozenset(s._cdata for s in self._weights)
        self.unit_of_module = unit_of_module
        self.names = names
        self.storages: dict[int, _Storage] = {}
        self.events: list[tuple[Any, ...]] = []
        self.windows: list[int] = []  # unit of each active unit-module call, innermost last
        self.modules: list[str] = []  # FQN of each active module call, innermost last

    def _register(self, storage: torch.UntypedStorage, tensor: torch.Tensor, op: str) -> int:
        import weakref

        key = storage._cdata
        entry = _Storage()
        entry.ref = StorageWeakRef(storage)
        entry.nbytes = int(storage.nbytes())
        entry.shape = tuple(int(d) for d in tensor.shape)
        entry.dtype = str(tensor.dtype).removeprefix("torch.")
        entry.op = op
        entry.module = self.modules[-1] if self.modules else ""
        entry.order = len(self.storages)  # creation order: ties in size list the older tensor first
        entry.buffer = op not in ("input", "external") and (self.in_buffer_module > 0 or self._in_buffer_code())
        entry.finalizer = weakref.finalize(storage, self.events.append, (_FREE, key))
        entry.finalizer.atexit = False
        self.storages[key] = entry
        return key

    def _in_buffer_code(self) -> bool:
        """Whether the op runs in the model's own code (no unit's module) called from a buffer-making
        source file (transformers' ``masking_utils.py``)."""
        if not self.buffer_code or self.windows:
            return False
        frame = sys._getframe(2)
        while frame is not None:
            if frame.f_code.co_filename.endswith(self.buffer_code):
                return True
            frame = frame.f_back
        return False

    def track_inputs(self, obj: Any) -> None:
        """Forward arguments: live from the start."""
        for tensor in _iter_tensors(obj):
            for storage in _tensor_storages(tensor):
                key = storage._cdata
                if key not in self.weight_keys and key not in self.storages:
                    self._register(storage, tensor, "input")
                    self.events.append((_ALLOC, key))

    def _keys(self, obj: Any, op: str, new: list[int]) -> list[int]:
        keys: list[int] = []
        for tensor in _iter_tensors(obj):
            for storage in _tensor_storages(tensor):
                key = storage._cdata
                if key in self.weight_keys:
                    continue
                if key not in self.storages:
                    self._register(storage, tensor, op)
                    new.append(key)
                keys.append(key)
        return keys

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        new: list[int] = []
        keys = self._keys((args, kwargs), "external", new)  # operands made before the forward
        keys += self._keys(out, str(getattr(func, "overloadpacket", func)), new)
        self.events.append((_OP, self.windows[-1] if self.windows else -1, tuple(dict.fromkeys(keys)), tuple(new)))
        return out

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.modules.append(self.names.get(id(module), ""))
        if id(module) in self.buffer_modules:
            self.in_buffer_module += 1
        unit = self.unit_of_module.get(id(module))
        if unit is not None:
            self.windows.append(unit)

    def post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self.modules:
            self.modules.pop()
        if id(module) in self.buffer_modules:
            self.in_buffer_module -= 1
        if id(module) in self.unit_of_module and self.windows:
            self.windows.pop()

    def pack_hook(self, tensor: torch.Tensor) -> torch.Tensor:
        """``saved_tensors_hooks`` pack: what autograd keeps for backward (after the op that saved it)."""
        new: list[int] = []
        for key in self._keys(tensor, "external", new):
            if key in new:
                self.events.append((_ALLOC, key))
            self.events.append((_SAVED, key))
        return tensor

    def close(self) -> None:
        for entry in self.storages.values():
            entry.finalizer.detach()


def measure_unit_peaks(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    units: Sequence[MeasureUnit],
    *,
    grad: bool = False,
    kept_for_later: Callable[[], Mapping[int, Sequence[torch.Tensor]]] | None = None,
    buffer_modules: Sequence[nn.Module] = (),
    buffer_code: Sequence[str] = (),
    top: int = 8,
) -> tuple[UnitPeak, ...]:
    """Run ``module(*args, **kwargs)`` once and measure every unit: weight bytes, the peak of the live
    non-weight bytes while it runs, and the tensors that make that peak.

    Run it under ``FakeTensorMode`` (tensors without data: nothing is allocated or computed) with the
    module and inputs built in that mode; it works on real tensors too. A unit's live set at an op is
    every storage alive then -- its inputs, what it made, what the caller keeps alive -- except what
    another unit keeps for later and this one never touched: another layer's KV cache
    (``kept_for_later``), tensors autograd saved for another unit's backward (with ``grad``); and
    buffers (attention masks, rotary tables) in units that leave them out (``MeasureUnit.buffers``).
    Ops are assigned to units as :class:`MeasureUnit` says. Bytes are ``storage.nbytes()``, sampled
    after every op (its operands and its output live together).

    Args:
        module: the model, in the mode (eval / train) it should run in.
        args, kwargs: its forward arguments.
        units: the units, in execution order.
        grad: run with autograd (train): what it saves for backward stays live, owned by the unit
            whose op saved it; otherwise under ``torch.no_grad()``.
        kept_for_later: called after the forward (its output still alive): unit index -> the tensors
            that unit keeps for a later step (its KV cache).
        buffer_modules: modules whose outputs are buffers (rotary embeddings: their cos / sin tables).
        buffer_code: source files (name suffixes) whose ops, run from the model's own code, make
            buffers (transformers' ``masking_utils.py``: the attention masks).
        top: how many of the largest tensors live at each peak to name.

    Raises:
        ProfileError: the forward fails, or a unit's modules never ran.
    """
    names = {id(m): fqn for fqn, m in module.named_modules(remove_duplicate=False)}
    unit_of_module: dict[int, int] = {}
    for index, unit in enumerate(units):
        for root in unit.roots:
            unit_of_module[id(root)] = index
    tracker = _TimelineTracker(_weight_storages(module), unit_of_module, names,
                               frozenset(id(m) for m in buffer_modules), tuple(buffer_code))
    handles = _hook_every_module(module, tracker)
    try:
        tracker.track_inputs((args, kwargs))
        output = _tracked_forward(module, args, kwargs, tracker, grad=grad,
                                  failed=f"forward of {type(module).__name__} failed while measuring")
        kept: dict[int, set[int]] = {}
        if kept_for_later is not None:
            for index, tensors in kept_for_later().items():
                for tensor in tensors:
                    for storage in _tensor_storages(tensor):
                        kept.setdefault(storage._cdata, set()).add(index)
        del output
        peaks = _cut_units(tracker, units, kept, top)
    finally:
        for handle in handles:
            handle.remove()
        tracker.close()
    return peaks


def _cut_units(tracker: _TimelineTracker, units: Sequence[MeasureUnit], kept: Mapping[int, set[int]],
               top: int) -> tuple[UnitPeak, ...]:
    """The per-unit peaks of a recorded timeline."""
    events, info, count = tracker.events, tracker.storages, len(units)
    # 1. The unit of every op: its own modules', else the newest unit that made an operand, else
    #    (resolved backwards) the next unit whose modules run; ops after the last unit go to it.
    op_unit: dict[int, int] = {}
    made: dict[int, int] = {}
    pending: list[int] = []
    for i, event in enumerate(events):
        if event[0] != _OP:
            continue
        _, unit, keys, new = event
        if unit < 0:
            producers = [made[k] for k in keys if k in made]
            if not producers:
                pending.append(i)
                continue
            unit = max(producers)
        op_unit[i] = unit
        for key in new:
            made[key] = unit
    following = count - 1
    waiting = set(pending)
    for i in range(len(events) - 1, -1, -1):
        event = events[i]
        if event[0] != _OP:
            continue
        if event[1] >= 0:
            following = event[1]
        elif i in waiting:
            op_unit[i] = following
    idle = sorted({u.name for u in units} - {units[u].name for u in op_unit.values()})
    if idle:
        logger.warning("units %s ran no op in the measured forward pass: their activation peak is 0", idle)
    # 2. Who touched each storage, and who keeps it for later (KV cache, saved for backward).
    touched: dict[int, set[int]] = {}
    owners: dict[int, set[int]] = {key: set(us) for key, us in kept.items()}
    kinds: dict[int, str] = {key: "kv_cache" for key in kept}
    last = 0
    for i, event in enumerate(events):
        if event[0] == _OP:
            last = op_unit[i]
            for key in event[2]:
                touched.setdefault(key, set()).add(last)
        elif event[0] == _SAVED:
            owners.setdefault(event[1], set()).add(last)
            kinds.setdefault(event[1], "saved")
    allowed = {key: frozenset(us | touched.get(key, set())) for key, us in owners.items()}
    holding = frozenset(u for u, unit in enumerate(units) if unit.buffers)
    for key, entry in info.items():
        if entry.buffer and key not in allowed:
            allowed[key] = holding  # masks and rotary tables count where cachefit books them
            kinds[key] = "buffer"
    sets_of_unit: list[list[frozenset[int]]] = [[] for _ in units]
    for group in set(allowed.values()):
        for u in group:
            sets_of_unit[u].append(group)
    # 3. Replay: live bytes at every op, less what other units keep and this one never touched.
    peak, peak_at, ops = [0] * count, [-1] * count, [0] * count
    total = kept_total = 0
    kept_live: dict[frozenset[int], int] = {}
    alive: set[int] = set()

    def add(key: int) -> None:
        nonlocal total, kept_total
        if key in alive:
            return
        alive.add(key)
        nbytes = info[key].nbytes
        total += nbytes
        group = allowed.get(key)
        if group is not None:
            kept_live[group] = kept_live.get(group, 0) + nbytes
            kept_total += nbytes

    def drop(key: int) -> None:
        nonlocal total, kept_total
        if key not in alive:
            return
        alive.discard(key)
        nbytes = info[key].nbytes
        total -= nbytes
        group = allowed.get(key)
        if group is not None:
            kept_live[group] -= nbytes
            kept_total -= nbytes

    for i, event in enumerate(events):
        kind = event[0]
        if kind == _ALLOC:
            add(event[1])
        elif kind == _FREE:
            drop(event[1])
        elif kind == _OP:
            for key in event[3]:
                add(key)
            u = op_unit[i]
            ops[u] += 1
            live = total - kept_total + sum(kept_live.get(g, 0) for g in sets_of_unit[u])
            if live > peak[u] or peak_at[u] < 0:
                peak[u], peak_at[u] = live, i
    # 4. Replay again to list what is live at each unit's peak.
    at_event: dict[int, list[int]] = {}
    for u, i in enumerate(peak_at):
        at_event.setdefault(i, []).append(u)
    snapshots: dict[int, list[int]] = {}
    alive.clear()
    for i, event in enumerate(events):
        kind = event[0]
        if kind == _ALLOC:
            alive.add(event[1])
        elif kind == _FREE:
            alive.discard(event[1])
        elif kind == _OP:
            alive.update(event[3])
            for u in at_event.get(i, ()):
                snapshots[u] = [k for k in alive if k not in allowed or u in allowed[k]]
    peaks = []
    for u, unit in enumerate(units):
        persistent = sum(info[k].nbytes for k, us in owners.items() if u in us)
        live_keys = sorted(snapshots.get(u, []), key=lambda k: (-info[k].nbytes, info[k].order))
        named = tuple(
            LiveTensor(shape=info[k].shape, dtype=info[k].dtype, nbytes=info[k].nbytes, op=info[k].op,
                       module=info[k].module,
                       kind=kinds[k] if u in owners.get(k, ()) or kinds.get(k) == "buffer" else "activation")
            for k in live_keys[:top]
        )
        rest = live_keys[top:]
        peaks.append(UnitPeak(
            unit=unit.name,
            weight_bytes=_roots_weight_bytes(unit.roots),
            peak_bytes=max(peak[u], persistent),
            persistent_bytes=persistent,
            live=named,
            other_bytes=sum(info[k].nbytes for k in rest),
            other_count=len(rest),
            ops=ops[u],
        ))
    return tuple(peaks)


def _roots_weight_bytes(roots: Sequence[nn.Module]) -> int:
    """Bytes of the parameters and registered buffers under ``roots``, each tensor once."""
    seen: set[int] = set()
    total = 0
    for root in roots:
        for fqn, tensor in [*root.named_parameters(remove_duplicate=False), *root.named_buffers(remove_duplicate=False)]:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += _tensor_bytes(tensor, fqn)
    return total


@contextlib.contextmanager
def fake_weights(module: nn.Module, fake_mode: Any) -> Iterator[None]:
    """Swap ``module``'s parameters and buffers for fake copies made by ``fake_mode`` (same shapes,
    dtypes and devices, no data) while the context is open, then put the real ones back.

    ``FakeTensorMode.from_tensor`` keeps one fake per real tensor, so tied weights stay tied. Already
    fake tensors are kept as they are.
    """
    from torch._subclasses.fake_tensor import FakeTensor

    swapped: list[tuple[dict[str, Any], str, torch.Tensor]] = []
    try:
        for m in module.modules():
            for registry in (m._parameters, m._buffers):
                for tensor_name, tensor in list(registry.items()):
                    if tensor is None or isinstance(tensor, FakeTensor):
                        continue
                    fake = fake_mode.from_tensor(tensor)
                    swapped.append((registry, tensor_name, tensor))
                    registry[tensor_name] = fake
        yield
    finally:
        for registry, tensor_name, tensor in reversed(swapped):
            registry[tensor_name] = tensor
