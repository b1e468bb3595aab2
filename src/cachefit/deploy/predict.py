"""The cost model's prediction for a run, to put beside what the run measured.

``cachefit run`` of a decode plan reports the predicted tokens/s, interval between a sequence's
tokens and busy fraction of each stage (:func:`cachefit.cost.decode.predict_decode`) for the groups
the run keeps in flight, priced on the plan's own cards (the catalog's, or the device file given to
``run --device``).
"""

from __future__ import annotations

from typing import Any

from cachefit.errors import CachefitError


def predict_run(plan: Any, profile: Any, *, micro_batches: int, devices: Any = None) -> dict[str, Any]:
    """``{"prediction": ...}`` for a decode run of ``plan`` (made from ``profile``) with ``micro_batches``
    groups, or ``{"unavailable": why}`` (a device missing from the catalog, a figure the times need)."""
    from cachefit.cost import estimate_cost
    from cachefit.cost.decode import predict_decode

    try:
        cost = estimate_cost(plan, profile, devices, micro_batches=micro_batches, schedule="gpipe")
    except CachefitError as exc:
        return {"unavailable": f"{exc} (give the plan's cards with --device FILE to price them)"}
    predicted = predict_decode(cost)
    if predicted is None:
        missing = ", ".join(cost.missing) or "the plan cannot run on its cards"
        return {"unavailable": f"the cost model cannot time this plan: {missing}"}
    out: dict[str, Any] = {"prediction": predicted.to_dict()}
    if cost.notes:
        out["notes"] = list(cost.notes)
    return out


def compare_decode(predicted: dict[str, Any], timings: dict[str, Any], stages: list[dict[str, Any]]) -> dict[str, Any]:
    """Measured over predicted, for the figures both have (tokens/s, ms per token, busy fractions)."""
    out: dict[str, Any] = {}
    for key in ("tokens_per_s", "ms_per_token"):
        if timings.get(key) and predicted.get(key):
            out[f"{key}_measured_over_predicted"] = timings[key] / predicted[key]
    busy = [st.get("busy_fraction") for st in stages]
    out["busy_fraction_measured"] = busy
    out["busy_fraction_predicted"] = predicted.get("busy_fractions")
    return out


__all__ = ["compare_decode", "predict_run"]
