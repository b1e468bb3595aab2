"""Stable JSON forms of profiles and plans (the contracts in docs/plan-schema.md and docs/cli.md)."""

from __future__ import annotations

import json
from typing import Any

from cachefit.units import ModelProfile, Unit

PROFILE_SCHEMA = "cachefit.profile/1"


def unit_to_dict(unit: Unit) -> dict[str, Any]:
    fp = unit.footprint
    return {
        "name": unit.name,
        "kind": unit.kind,
        "params": unit.params,
        **fp.to_dict(),
        "flops": unit.flops_per_token,
        "weight_roles": dict(fp.weight_roles),
        "activation_parts": dict(fp.activation_parts),
        "buffer_parts": dict(fp.buffer_parts),
        "split_dims": {d.name: d.size for d in unit.split_dims},
        "compression": list(unit.compression),
    }


def profile_to_dict(profile: ModelProfile) -> dict[str, Any]:
    """The ``cachefit profile --json`` document. ``flops`` is forward FLOPs per token."""
    return {
        "schema": PROFILE_SCHEMA,
        "model": profile.model,
        "source": profile.source,
        "granularity": profile.granularity,
        "workload": profile.workload.to_dict(),
        "units": [unit_to_dict(u) for u in profile.units],
        "totals": profile.totals(),
    }


def dumps(document: dict[str, Any]) -> str:
    """Deterministic JSON text (same input, same bytes)."""
    return json.dumps(document, indent=2) + "\n"
