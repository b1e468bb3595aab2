"""What every command shares: the consoles, one-line error handling, JSON output, and the workload
and card options, declared once.

Commands import from here, never from :mod:`cachefit.cli` (which imports the commands to register
them: importing it back would be a loop). A command that takes the shared options declares one
parameter ``shared: SharedArgs`` and decorates itself with :func:`shared_options`; the decorator puts
the options in the command's signature in that parameter's place, and hands the command their
values as one :class:`SharedArgs`, which builds the workload and the cards::

    @app.command()
    @handles_errors
    @shared_options(micro_batches=False)
    def check(model: str, shared: SharedArgs, as_json: JsonOption = False) -> None:
        cluster, workload = shared.cluster(), shared.workload()
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any, Optional, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from cachefit.errors import CachefitError, ConfigError

console = Console()
"""Standard output: tables and notes."""
err_console = Console(stderr=True)
"""Standard error: errors and progress."""
STATE: dict[str, bool] = {"debug": False}
"""``debug``: set by ``cachefit --debug`` (tracebacks and third-party warnings shown)."""

F = TypeVar("F", bound=Callable[..., Any])


def print_error(exc: CachefitError | str, *, exit_code: int = 2) -> None:
    """One line on stderr: ``error: <message>`` (``no feasible plan: ...`` for exit code 3)."""
    kind = "no feasible plan" if exit_code == 3 else "error"
    message = " ".join(str(exc).split())  # one line whatever the message holds
    err_console.print(f"[bold red]{kind}:[/] {escape(message)}", highlight=False, soft_wrap=True, emoji=False)


def handles_errors(func: F) -> F:
    """Turn cachefit errors into a one-line message and an exit code (traceback only with --debug)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except CachefitError as exc:
            if STATE["debug"]:
                raise  # the app's group prints the traceback and exits with exc.exit_code
            print_error(exc, exit_code=exc.exit_code)
            raise typer.Exit(exc.exit_code) from None

    return wrapper  # type: ignore[return-value]


def print_json(document: Any) -> None:
    """The stable JSON of a command (``--json``) on standard output."""
    sys.stdout.write(json.dumps(document, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------
# Option types and the options every command that profiles or plans shares


class ModeOpt(str, Enum):
    prefill = "prefill"
    decode = "decode"
    train = "train"


class DtypeOpt(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"
    fp8 = "fp8"


class AttentionOpt(str, Enum):
    eager = "eager"
    flash = "flash"


class KVCacheOpt(str, Enum):
    static = "static"
    dynamic = "dynamic"


class GranularityOpt(str, Enum):
    layer = "layer"
    block = "block"


class StackingOpt(str, Enum):
    reuse = "reuse"
    sum = "sum"


BatchOpt = Annotated[int, typer.Option("--batch", "-b", help="Sequences per step.", min=1)]
SeqOpt = Annotated[int, typer.Option("--seq", "-s", help="Tokens per sequence (prefill/train) or KV-cache length (decode).", min=1)]
ModeOption = Annotated[ModeOpt, typer.Option("--mode", help="prefill, decode (with KV cache) or train.")]
DtypeOption = Annotated[Optional[DtypeOpt], typer.Option("--dtype", help="Weight dtype before compression (default: the checkpoint's torch_dtype / dtype for a config.json or model directory, else fp16).")]
ActDtypeOption = Annotated[Optional[DtypeOpt], typer.Option("--act-dtype", help="Activation dtype (default: --dtype).")]
AttnOption = Annotated[AttentionOpt, typer.Option("--attention", help="eager materializes attention scores; flash does not.")]
KVCacheOption = Annotated[KVCacheOpt, typer.Option("--kv-cache", help="decode: static, a cache pre-allocated for the whole context; dynamic, one grown by torch.cat each step (old and new cache alive together).")]
GranOption = Annotated[GranularityOpt, typer.Option("--granularity", "-g", help="layer: whole layers; block: attention and MLP blocks as units.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print stable JSON instead of a table.")]
MicroBatchesOption = Annotated[int, typer.Option("--micro-batches", help="Micro-batches per step in the pipeline.", min=1)]
StackingOption = Annotated[StackingOpt, typer.Option("--stacking", help="reuse: units on a card share scratch (peak); sum: the seed's plain sum.")]
MeasureOption = Annotated[bool, typer.Option("--measure", help="Take each unit's bytes from a run of the real transformers module on fake tensors (needs torch and transformers) instead of the analytic model.")]

DEVICE_HELP = "Catalog name or device/cluster file; repeat for a heterogeneous cluster in order."
DeviceOption = Annotated[Optional[list[str]], typer.Option("--device", "-d", help=DEVICE_HELP)]
CapacityOption = Annotated[Optional[str], typer.Option("--capacity", "-c", help="Override the on-chip capacity per card, e.g. 50MB.")]
LevelOption = Annotated[Optional[str], typer.Option("--level", help="Memory level to fit (default: the device's planning level, e.g. l2).")]
HeadroomOption = Annotated[float, typer.Option("--headroom", help="Fraction of each card kept free, in [0, 1).")]
ReserveOption = Annotated[Optional[str], typer.Option("--reserve", help="Bytes kept free on every card, e.g. 2MiB.")]
AllowOption = Annotated[str, typer.Option("--allow", help="Compression the planner may apply: int8,int4,sparse50,sparse75,sparse24,ckpt,fuse,batch.")]
CompressRolesOption = Annotated[str, typer.Option("--compress-roles", help="Also let int8 / int4 / sparse24 touch these weight roles (off by default, as common practice keeps them): head, embed, router.")]


def compression_config(compress_roles: str):  # noqa: ANN201 - a cachefit.compress.techniques.CompressionConfig
    """The compression options of ``--compress-roles``: the weight techniques also reach these roles
    (``head,embed``) beyond the attention and MLP matrices."""
    from cachefit.compress.techniques import DEFAULT_MATRIX_ROLES, CompressionConfig

    extra = tuple(r.strip() for r in compress_roles.split(",") if r.strip())
    bad = [r for r in extra if r not in ("head", "embed", "router")]
    if bad:
        raise ConfigError(f"--compress-roles: unknown role(s) {', '.join(bad)}; give some of head, embed, router")
    roles = tuple(dict.fromkeys((*DEFAULT_MATRIX_ROLES, *extra)))
    return CompressionConfig(quantize_roles=roles, sparse24_roles=roles)


DEFAULT_DTYPE = DtypeOpt.fp16
"""The weight dtype of a preset, and of a config that names none, when ``--dtype`` is not given."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DtypeChoice:
    """The weight dtype a command plans in, and where it came from."""

    dtype: DtypeOpt
    source: str
    """``--dtype`` (given), ``checkpoint`` (the config's ``torch_dtype`` / ``dtype``) or ``default``."""
    note: str | None = None
    """One line for stderr saying so (None where there is nothing to say: ``--dtype``, a preset)."""

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype.value, "source": self.source, "note": self.note}


def choose_dtype(model: str | None, dtype: DtypeOpt | None) -> DtypeChoice:
    """``--dtype`` if given; else, for a config.json or a model directory holding one, the dtype its
    ``torch_dtype`` / ``dtype`` names; else (a preset name, a config naming none) :data:`DEFAULT_DTYPE`.

    Raises:
        ConfigError: the config file cannot be read.
    """
    if dtype is not None:
        return DtypeChoice(dtype=dtype, source="--dtype")
    if model is None:
        return DtypeChoice(dtype=DEFAULT_DTYPE, source="default")
    from pathlib import Path

    path = Path(model).expanduser()
    if not (path.is_file() or (path.is_dir() and (path / "config.json").is_file())):
        return DtypeChoice(dtype=DEFAULT_DTYPE, source="default")  # a preset keeps the default, silently
    from cachefit.profile.hf_config import read_config_dtype

    found = read_config_dtype(path)
    if found.dtype is not None:
        return DtypeChoice(dtype=DtypeOpt(found.dtype), source="checkpoint",
                           note=f"dtype {found.dtype} from {found.describe()}; --dtype overrides")
    return DtypeChoice(dtype=DEFAULT_DTYPE, source="default",
                       note=f"dtype {DEFAULT_DTYPE.value}: {found.describe()}, so cachefit's default; --dtype overrides")


def print_note(note: str | None) -> None:
    """A one-line note on stderr (nothing for None)."""
    if note:
        err_console.print(f"[dim]note:[/] {escape(note)}", highlight=False, soft_wrap=True, emoji=False)


def build_workload(batch: int, seq: int, mode: ModeOpt, dtype: DtypeOpt, act_dtype: DtypeOpt | None,
                   attention: AttentionOpt, micro_batches: int = 1,
                   kv_cache: KVCacheOpt = KVCacheOpt.static):  # noqa: ANN201 - a cachefit.units.Workload
    """The :class:`~cachefit.units.Workload` of the workload options."""
    from cachefit.units import Workload

    return Workload(batch=batch, seq_len=seq, mode=mode.value, weight_dtype=dtype.value,
                    act_dtype=(act_dtype or dtype).value, attention=attention.value, micro_batches=micro_batches,
                    kv_cache=kv_cache.value)


def build_cluster(devices: list[str] | None, capacity: str | None, level: str | None, headroom: float,
                  reserve: str | None):  # noqa: ANN201 - a cachefit.hardware.devices.Cluster
    """Cards from --device (repeatable; a name or a device / cluster file) and --capacity / --level."""
    from cachefit.hardware.devices import device_from_capacity, make_cluster, resolve_cluster, resolve_device
    from cachefit.sizes import parse_bytes

    reserved = parse_bytes(reserve, what="--reserve") if reserve else 0
    if not devices:
        if capacity is None:
            raise ConfigError("give --device NAME|FILE (see `cachefit devices`) or --capacity SIZE")
        dev = device_from_capacity(capacity, level=level or "sram")
        return make_cluster(dev, headroom=headroom, reserved_bytes=reserved)
    if len(devices) == 1:
        if capacity is not None:
            dev = device_from_capacity(capacity, level=level or resolve_device(devices[0]).default_level,
                                       base=resolve_device(devices[0]))
            return make_cluster(dev, headroom=headroom, reserved_bytes=reserved)
        return resolve_cluster(devices[0], level=level, headroom=headroom, reserved_bytes=reserved) \
            if (level or headroom or reserved) else resolve_cluster(devices[0])
    if capacity is not None:
        raise ConfigError("--capacity overrides one device; with several --device cards put capacities in a cluster file")
    return make_cluster([resolve_device(d) for d in devices], level=level, headroom=headroom, reserved_bytes=reserved)


@dataclass(frozen=True, slots=True, kw_only=True)
class SharedArgs:
    """The values of the shared card and workload options of one command call."""

    device: list[str] | None
    """``--device``: catalog names or device / cluster files, in card order."""
    capacity: str | None
    """``--capacity``: a size overriding the on-chip capacity per card."""
    level: str | None
    """``--level``: the memory level to fit."""
    headroom: float
    """``--headroom``: the fraction of each card kept free."""
    reserve: str | None
    """``--reserve``: bytes kept free on every card."""
    stacking: StackingOpt
    """``--stacking``: how a card's units share scratch."""
    batch: int
    seq: int
    mode: ModeOpt
    dtype: DtypeOpt | None
    """``--dtype``; None when not given (the model's own, see :func:`choose_dtype`)."""
    act_dtype: DtypeOpt | None
    attention: AttentionOpt
    kv_cache: KVCacheOpt
    """``--kv-cache``: how a decode KV cache is held (static or dynamic)."""
    micro_batches: int
    """``--micro-batches`` (1 where the command has no such option)."""
    granularity: GranularityOpt
    measure: bool = False
    """``--measure``: profile by running the real module on fake tensors (False where the command has
    no such option)."""

    def dtype_choice(self, model: str | None = None) -> DtypeChoice:
        """The weight dtype for ``model``: ``--dtype``, else the checkpoint's, else the default."""
        return choose_dtype(model, self.dtype)

    def workload(self, model: str | None = None):  # noqa: ANN201 - a cachefit.units.Workload
        """The workload these options describe (its dtype, without ``--dtype``, ``model``'s own)."""
        return build_workload(self.batch, self.seq, self.mode, self.dtype_choice(model).dtype, self.act_dtype,
                              self.attention, self.micro_batches, self.kv_cache)

    def cluster(self):  # noqa: ANN201 - a cachefit.hardware.devices.Cluster
        """The cards these options describe."""
        return build_cluster(self.device, self.capacity, self.level, self.headroom, self.reserve)

    def profile(self, model: str):  # noqa: ANN201 - a cachefit.units.ModelProfile
        """The profile of ``model`` for these options: measured with ``--measure``, else analytic.

        Without ``--dtype``, a note on stderr says which dtype the checkpoint's config gave.
        """
        from cachefit.profile import profile_model

        choice = self.dtype_choice(model)
        prof = profile_model(model, self.workload(model), granularity=self.granularity.value, measure=self.measure)
        print_note(choice.note)  # after the profile: a model that cannot be read fails with its own error alone
        return prof


def _option(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def shared_options(*, micro_batches: bool = True, measure: bool = False, device_help: str | None = None,
                   stacking_help: str | None = None) -> Callable[[F], F]:
    """Give a command the shared card and workload options in place of its ``shared`` parameter.

    Args:
        micro_batches: whether the command takes ``--micro-batches`` (else ``SharedArgs.micro_batches`` is 1).
        measure: whether the command takes ``--measure`` (else ``SharedArgs.measure`` is False).
        device_help: the command's own help for ``--device``.
        stacking_help: the command's own help for ``--stacking``.
    """
    device = DeviceOption if device_help is None else Annotated[
        Optional[list[str]], typer.Option("--device", "-d", help=device_help)]
    stacking = StackingOption if stacking_help is None else Annotated[
        StackingOpt, typer.Option("--stacking", help=stacking_help)]
    cards = [_option("device", device, None), _option("capacity", CapacityOption, None),
             _option("level", LevelOption, None), _option("headroom", HeadroomOption, 0.0),
             _option("reserve", ReserveOption, None)]
    workload = [_option("stacking", stacking, StackingOpt.reuse), _option("batch", BatchOpt, 1),
                _option("seq", SeqOpt, 1024), _option("mode", ModeOption, ModeOpt.decode),
                _option("dtype", DtypeOption, None), _option("act_dtype", ActDtypeOption, None),
                _option("attention", AttnOption, AttentionOpt.eager),
                _option("kv_cache", KVCacheOption, KVCacheOpt.static)]
    if micro_batches:
        workload.append(_option("micro_batches", MicroBatchesOption, 1))
    workload.append(_option("granularity", GranOption, GranularityOpt.layer))
    if measure:
        workload.append(_option("measure", MeasureOption, False))
    added = cards + workload
    names = [p.name for p in added]

    def decorate(func: F) -> F:
        signature = inspect.signature(func, eval_str=True)
        params = list(signature.parameters.values())
        at = [i for i, p in enumerate(params) if p.name == "shared"]
        if not at:
            raise TypeError(f"{func.__name__}: shared_options needs a parameter `shared: SharedArgs`")
        own = params[: at[0]] + params[at[0] + 1:]
        clash = sorted(set(names) & {p.name for p in own})
        if clash:
            raise TypeError(f"{func.__name__}: parameters {clash} are shared options already")
        # keyword-only parameters may not precede positional ones in a signature: keep the command's
        # positional parameters (its arguments) first, then its options and the shared ones in place
        positional = [p for p in params[: at[0]] if p.kind != inspect.Parameter.KEYWORD_ONLY]
        before = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params[: at[0]] if p not in positional]
        after = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params[at[0] + 1:]]
        new_params = positional + before + added + after

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name in names}
            values.setdefault("micro_batches", 1)
            values.setdefault("measure", False)
            return func(*args, shared=SharedArgs(**values), **kwargs)

        wrapper.__signature__ = signature.replace(parameters=new_params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in new_params} | {"return": signature.return_annotation}
        del wrapper.__wrapped__  # typer must read the new signature, not the command's own
        return wrapper  # type: ignore[return-value]

    return decorate


__all__ = [
    "STATE", "ActDtypeOption", "AllowOption", "CompressRolesOption", "AttentionOpt", "AttnOption", "BatchOpt", "CapacityOption",
    "DEFAULT_DTYPE", "DeviceOption", "DtypeChoice", "DtypeOpt", "DtypeOption", "GranOption", "GranularityOpt", "HeadroomOption", "JsonOption",
    "KVCacheOpt", "KVCacheOption",
    "LevelOption", "MeasureOption", "MicroBatchesOption", "ModeOpt", "ModeOption", "ReserveOption", "SeqOpt", "SharedArgs",
    "StackingOpt", "StackingOption", "build_cluster", "build_workload", "console", "err_console", "handles_errors",
    "choose_dtype", "compression_config", "print_error", "print_json", "print_note", "shared_options",
]
