"""Audit of a device map made elsewhere: what fits on-chip on each card, what spills, and the fix.

A device map in accelerate's format (``{"model.layers.3": 1, "lm_head": "cpu", ...}``: module name
-> card index, ``"cpu"`` or ``"disk"``; what ``infer_auto_device_map`` returns and
``model.hf_device_map`` holds) says where each module lives in a card's off-chip memory (HBM). This
module asks the question it does not: does each card's share fit the card's *on-chip* memory (L2 /
SRAM), and what does it cost when it does not?

**Placing bytes.** Every weight tensor of the profile goes where the longest key covering it says
(accelerate's rule: a key covers itself and everything under ``key.``; ``""`` covers all). A tied
tensor (an LM head sharing the embedding matrix) is one matrix: it is counted once on a card that
holds both of its names, and on each card that holds one of them otherwise (each such card reads the
whole matrix). A unit's activations and buffers live on the card that runs it: the card holding most
of its weight bytes; a unit whose weights are all offloaded runs on accelerate's main device (the
lowest card index in the map), where ``dispatch_model`` executes offloaded modules. A card's bytes
are stacked as the planner stacks them (:func:`cachefit.units.stack_footprints`: resident weights and
persistent activations add up, transient scratch is the largest of its units').

**What spills, and what it costs.** ``spill = max(0, total - capacity)``. The spill is taken from the
weights first (activations are touched many times per step, a weight once), so
``streamed = min(weights, spill)`` weight bytes are read from DRAM on every forward pass (twice in
train: forward and backward), the same assumption as the roofline cost model
(:mod:`cachefit.cost.roofline`); what still does not fit is activation state, counted as written once
and read once (2 bytes of traffic per byte). Weights offloaded to ``cpu`` / ``disk`` are copied to the
executing card on every forward pass (accelerate's ``AlignDevicesHook``), so all of them count as
off-chip traffic too. Off-chip bytes per token = traffic per micro-batch / tokens per micro-batch
(``batch x query length``: ``batch`` in decode). Embedding tables are counted whole, an upper bound
(a lookup reads only its tokens' rows).

**The fix** is cachefit's plan for the same cards (:func:`cachefit.plan.search.plan_partition`
with ``num_cards`` = the cards the map uses), or the fewest cards that fit when none fits that many.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cachefit.errors import ConfigError, InfeasiblePlanError
from cachefit.hardware.devices import Card, Cluster
from cachefit.plan import Plan
from cachefit.units import Footprint, Mode, ModelProfile, dtype_bytes, stack_footprints

_log = logging.getLogger(__name__)

AUDIT_SCHEMA = "cachefit.check/1"
HOST_PLACEMENTS: tuple[str, ...] = ("cpu", "disk")
"""Placements off every card: weights there are copied to the executing card on every forward pass."""

_DEVICE_RE = re.compile(r"^([a-z_]+)(?::(\d+))?$")

Placement = int | str
"""A card index (int) or one of :data:`HOST_PLACEMENTS`."""


def _parse_placement(value: Any, key: str, where: str) -> Placement:
    if isinstance(value, bool):
        raise ConfigError(f"{where}: key {key!r} has device {value!r}; give a card index such as 0, 'cpu' or 'disk'")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{where}: key {key!r} has device {value}; card indices start at 0")
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text.isdigit():
            return int(text)
        if text in HOST_PLACEMENTS:
            return text
        match = _DEVICE_RE.match(text)
        if match and match.group(1) not in ("meta",):
            return int(match.group(2) or 0)  # "cuda:1" -> card 1; a bare "cuda" / "mps" is the first card
    raise ConfigError(
        f"{where}: key {key!r} has device {value!r}; use a card index (0, 1, ... or 'cuda:1'), 'cpu' or 'disk'"
    )


def parse_device_map(data: Any, *, where: str = "device map") -> dict[str, Placement]:
    """Read a device map in accelerate's format.

    Accepts the map itself (``{module name: device}``), a document holding it under ``"device_map"``,
    or a ``cachefit export --to accelerate --json`` document. A device is a card index (``0``, ``"1"``,
    ``"cuda:1"``), ``"cpu"`` or ``"disk"``.

    Raises:
        ConfigError: not a non-empty mapping of names to devices.
    """
    if isinstance(data, Mapping):
        if isinstance(data.get("device_map"), Mapping):
            data = data["device_map"]
        elif data.get("schema") == "cachefit.export/1" and isinstance(data.get("document"), Mapping):
            data = data["document"]
    if not isinstance(data, Mapping) or not data:
        raise ConfigError(
            f"{where}: expected a non-empty JSON object of module name -> device, such as "
            '{"model.embed_tokens": 0, "model.layers.0": 0, "lm_head": 1}'
        )
    out: dict[str, Placement] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(f"{where}: keys must be module names (strings), got {key!r}")
        out[key] = _parse_placement(value, key, where)
    return out


def load_device_map(path: str | os.PathLike[str]) -> dict[str, Placement]:
    """Read a device map JSON file (see :func:`parse_device_map`)."""
    from cachefit.files import read_json

    return parse_device_map(read_json(path, what="device map"), where=f"device map {os.fspath(path)!r}")


def _covers(key: str, fqn: str) -> bool:
    return key == "" or fqn == key or fqn.startswith(key + ".")


def place_tensors(profile: ModelProfile, device_map: Mapping[str, Placement]) -> dict[str, Placement]:
    """Where each weight tensor of ``profile`` lives: the longest key of ``device_map`` that covers it.

    Raises:
        ConfigError: tensors no key covers (accelerate's ``check_device_map`` refuses such a map too).
    """
    keys = sorted(device_map, key=len, reverse=True)
    placed: dict[str, Placement] = {}
    missing: list[str] = []
    for unit in profile.units:
        for t in unit.tensors:
            key = next((k for k in keys if _covers(k, t.name)), None)
            if key is None:
                missing.append(t.name)
            else:
                placed[t.name] = device_map[key]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ConfigError(
            f"the device map gives no device for {len(missing)} weight tensor(s) of {profile.model}: {shown}; "
            "add keys for their modules (is the map for this model?)"
        )
    return placed


@dataclass(frozen=True, slots=True, kw_only=True)
class CardAudit:
    """One card of the map: its bytes against its on-chip capacity."""

    card: int
    """Card index in the map."""
    device: str
    level: str
    """The on-chip level compared with (e.g. ``l2``)."""
    keys: tuple[str, ...]
    """Keys of the map placed on this card."""
    units: tuple[str, ...]
    """Units that run on this card (their activations and buffers live here)."""
    weight_bytes: int
    """Weights held here (a tied matrix once per card)."""
    footprint: Footprint
    """Weights plus the stacked activations and buffers of the units run here."""
    capacity_bytes: int
    """On-chip bytes the card offers (after headroom and reserve)."""
    streamed_weight_bytes: int
    """Weights beyond capacity: read from DRAM on every forward pass."""
    spilled_activation_bytes: int
    """Activation state that does not fit even with every weight streamed."""
    offchip_bytes_per_token: float
    """DRAM traffic of this card per token (streamed weights, spilled activations)."""

    @property
    def total_bytes(self) -> int:
        return self.footprint.total_bytes

    @property
    def spill_bytes(self) -> int:
        """Bytes beyond the on-chip capacity."""
        return max(0, self.total_bytes - self.capacity_bytes)

    @property
    def onchip_bytes(self) -> int:
        """Bytes that stay on-chip."""
        return min(self.total_bytes, self.capacity_bytes)

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.capacity_bytes

    @property
    def utilization(self) -> float:
        return self.total_bytes / self.capacity_bytes

    def to_dict(self) -> dict[str, Any]:
        fp = self.footprint
        return {
            "card": self.card,
            "device": self.device,
            "level": self.level,
            "keys": list(self.keys),
            "units": list(self.units),
            **fp.to_dict(),
            "capacity_bytes": self.capacity_bytes,
            "utilization": round(self.utilization, 6),
            "fits": self.fits,
            "onchip_bytes": self.onchip_bytes,
            "spill_bytes": self.spill_bytes,
            "streamed_weight_bytes": self.streamed_weight_bytes,
            "spilled_activation_bytes": self.spilled_activation_bytes,
            "offchip_bytes_per_token": self.offchip_bytes_per_token,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class OffloadAudit:
    """Weights the map keeps off every card (``cpu`` or ``disk``)."""

    placement: str
    keys: tuple[str, ...]
    units: tuple[str, ...]
    """Units with weights here."""
    weight_bytes: int
    offchip_bytes_per_token: float
    """Copied to the executing card on every forward pass."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "placement": self.placement,
            "keys": list(self.keys),
            "units": list(self.units),
            "weight_bytes": self.weight_bytes,
            "offchip_bytes_per_token": self.offchip_bytes_per_token,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class MapAudit:
    """A device map checked against on-chip capacity, with cachefit's plan for the same cards."""

    model: str
    profile: ModelProfile
    stacking: str
    cards: tuple[CardAudit, ...]
    offloaded: tuple[OffloadAudit, ...]
    split_units: tuple[str, ...]
    """Units whose weights the map spreads over several placements."""
    unmatched_keys: tuple[str, ...]
    """Keys that cover no weight of the profile (parameter-free modules, buffers, or a typo)."""
    plan: Plan | None
    """cachefit's plan (same cards, or the fewest that fit); None when nothing fits."""
    plan_note: str
    assumptions: tuple[str, ...]

    @property
    def fits(self) -> bool:
        """Every card's share fits on-chip and nothing is offloaded."""
        return bool(self.cards) and all(c.fits for c in self.cards) and not self.offloaded

    @property
    def offchip_bytes_per_token(self) -> float:
        cards = sum(c.offchip_bytes_per_token for c in self.cards)
        return cards + sum(o.offchip_bytes_per_token for o in self.offloaded)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": AUDIT_SCHEMA,
            "model": self.model,
            "workload": self.profile.workload.to_dict(),
            "granularity": self.profile.granularity,
            "stacking": self.stacking,
            "fits": self.fits,
            "num_cards": len(self.cards),
            "onchip_bytes": sum(c.onchip_bytes for c in self.cards),
            "spill_bytes": sum(c.spill_bytes for c in self.cards),
            "offloaded_bytes": sum(o.weight_bytes for o in self.offloaded),
            "offchip_bytes_per_token": self.offchip_bytes_per_token,
            "cards": [c.to_dict() for c in self.cards],
            "offloaded": [o.to_dict() for o in self.offloaded],
            "split_units": list(self.split_units),
            "unmatched_keys": list(self.unmatched_keys),
            "assumptions": list(self.assumptions),
            "fix": {
                "cards": self.plan.cards if self.plan else None,
                "feasible": self.plan.feasible if self.plan else False,
                "note": self.plan_note,
                "plan": self.plan.to_dict() if self.plan else None,
            },
        }


def _card_of(cluster: Cluster, index: int) -> Card:
    if len(cluster) == 1:
        return cluster.cards[0]
    if index >= len(cluster):
        raise ConfigError(
            f"the device map puts modules on card {index}, but the cluster has {len(cluster)} card(s) "
            f"(0..{len(cluster) - 1}); give a single --device (every card alike) or a cluster file with more cards"
        )
    return cluster.cards[index]


def _activations_only(fp: Footprint) -> Footprint:
    return Footprint(weight_bytes=0, activation_bytes=fp.activation_bytes, buffer_bytes=fp.buffer_bytes,
                     persistent_activation_bytes=fp.persistent_activation_bytes)


def _fix_plan(profile: ModelProfile, cluster: Cluster, num_cards: int, allow: Sequence[str],
              stacking: str) -> tuple[Plan | None, str]:
    from cachefit.plan.search import plan_partition

    if num_cards >= 1:
        try:
            plan, _ = plan_partition(profile, cluster, num_cards=num_cards, allow=allow, stacking=stacking)
            return plan, f"cachefit's plan on the same {num_cards} card(s)"
        except (InfeasiblePlanError, ConfigError) as exc:
            why = str(exc)
    else:
        why = "the map uses no card"
    try:
        plan, _ = plan_partition(profile, cluster, allow=allow, stacking=stacking)
    except InfeasiblePlanError as exc:
        return None, f"no cachefit plan fits: {exc}"
    return plan, f"no plan fits {num_cards} card(s) ({why}); the fewest cards that fit: {plan.cards}"


def audit_device_map(
    profile: ModelProfile,
    device_map: Mapping[str, Placement],
    cluster: Cluster,
    *,
    stacking: str = "reuse",
    allow: Sequence[str] = (),
    fix: bool = True,
) -> MapAudit:
    """Check a device map against each card's on-chip capacity (see the module docstring).

    Args:
        profile: the model's units for the workload (uncompressed, as the map's modules are).
        device_map: module name -> card index, ``"cpu"`` or ``"disk"`` (:func:`parse_device_map`).
        cluster: one card (every card of the map alike) or a cluster covering the map's card indices.
        stacking: ``reuse`` or ``sum``, as in the planner.
        allow: compression cachefit's fixing plan may apply.
        fix: also compute cachefit's plan for the same cards.

    Raises:
        ConfigError: a malformed map, tensors it does not place, a card index beyond the cluster.
    """
    if stacking not in ("reuse", "sum"):
        raise ConfigError(f"stacking must be 'reuse' or 'sum', got {stacking!r}")
    device_map = parse_device_map(device_map)
    placed = place_tensors(profile, device_map)
    wl = profile.workload
    dtype = wl.weight_dtype
    card_ids = sorted({p for p in device_map.values() if isinstance(p, int)})
    main_card = card_ids[0] if card_ids else None

    # -- weights per placement, a tied matrix once per placement that holds any of its names
    weight: dict[Placement, int] = {}
    held: dict[Placement, set[str]] = {}  # matrices (by their original FQN) already counted there
    unit_weight: list[dict[Placement, int]] = []
    for unit in profile.units:
        per: dict[Placement, int] = {}
        for t in unit.tensors:
            where = placed[t.name]
            nbytes = dtype_bytes(dtype, t.numel)
            per[where] = per.get(where, 0) + nbytes
            matrix = t.tied_to or t.name
            if matrix in held.setdefault(where, set()):
                continue
            held[where].add(matrix)
            weight[where] = weight.get(where, 0) + nbytes
        unit_weight.append(per)

    # -- the card each unit runs on
    runs_on: list[int | None] = []
    split_units: list[str] = []
    for unit, per in zip(profile.units, unit_weight):
        if len(per) > 1:
            split_units.append(unit.name)
        on_cards = {p: b for p, b in per.items() if isinstance(p, int)}
        runs_on.append(max(on_cards, key=lambda c: (on_cards[c], -c)) if on_cards else main_card)

    passes = 2 if wl.mode is Mode.TRAIN else 1
    tokens = wl.tokens
    cards: list[CardAudit] = []
    for cid in card_ids:
        card = _card_of(cluster, cid)
        run = [u for u, c in zip(profile.units, runs_on) if c == cid]
        act = stack_footprints((_activations_only(u.footprint) for u in run), reuse=stacking == "reuse")
        fp = Footprint(weight_bytes=weight.get(cid, 0), activation_bytes=act.activation_bytes,
                       buffer_bytes=act.buffer_bytes, persistent_activation_bytes=act.persistent_activation_bytes)
        spill = max(0, fp.total_bytes - card.capacity_bytes)
        streamed = min(fp.weight_bytes, spill)
        spilled_act = spill - streamed
        cards.append(CardAudit(
            card=cid,
            device=card.device.name,
            level=card.level_name,
            keys=tuple(k for k, p in device_map.items() if p == cid),
            units=tuple(u.name for u in run),
            weight_bytes=fp.weight_bytes,
            footprint=fp,
            capacity_bytes=card.capacity_bytes,
            streamed_weight_bytes=streamed,
            spilled_activation_bytes=spilled_act,
            offchip_bytes_per_token=(passes * streamed + 2 * spilled_act) / tokens,
        ))

    offloaded = tuple(
        OffloadAudit(
            placement=where,
            keys=tuple(k for k, p in device_map.items() if p == where),
            units=tuple(u.name for u, per in zip(profile.units, unit_weight) if where in per),
            weight_bytes=weight[where],
            offchip_bytes_per_token=passes * weight[where] / tokens,
        )
        for where in HOST_PLACEMENTS if weight.get(where)
    )
    unmatched = tuple(k for k in device_map if not any(_covers(k, t.name) for u in profile.units for t in u.tensors))

    assumptions = (
        f"on-chip capacity: each card's {cards[0].level if cards else 'planning'} level after headroom (the map's "
        "modules live in off-chip memory; this asks whether each card's share also fits on-chip)",
        "a card's bytes: its weights (a tied matrix once) plus the stacked activations and buffers of the units "
        f"it runs ({stacking} stacking); a unit runs on the card holding most of its weights",
        "what does not fit is taken from the weights first; streamed weights are read from DRAM once per forward "
        f"pass{' and once per backward pass' if passes == 2 else ''}, spilled activations written and read once",
        "weights offloaded to cpu / disk are copied to the executing card on every forward pass (accelerate's hooks)",
        f"per token: per micro-batch traffic / {tokens} token(s) per micro-batch (batch x query length)",
    )
    plan, note = (_fix_plan(profile, cluster, len(card_ids), allow, stacking) if fix else (None, "not computed"))
    return MapAudit(
        model=profile.model,
        profile=profile,
        stacking=stacking,
        cards=tuple(cards),
        offloaded=offloaded,
        split_units=tuple(split_units),
        unmatched_keys=unmatched,
        plan=plan,
        plan_note=note,
        assumptions=assumptions,
    )


__all__ = [
    "AUDIT_SCHEMA",
    "HOST_PLACEMENTS",
    "CardAudit",
    "MapAudit",
    "OffloadAudit",
    "audit_device_map",
    "load_device_map",
    "parse_device_map",
    "place_tensors",
]
