"""cachefit: plan layer-wise deployments whose every card partition fits on-chip memory.

The Python API, in the order of the flow (profile -> plan -> cost -> deploy)::

    import cachefit
    profile = cachefit.profile_model("llama-3.1-8b", cachefit.Workload(batch=1, seq_len=2048, mode="decode"))
    cluster = cachefit.make_cluster(cachefit.get_device("h100"))
    plan, candidates = cachefit.plan_partition(profile, cluster, allow=["int8"])
    open("plan.json", "w").write(plan.to_json())
    plan = cachefit.load_plan("plan.json")

Importing ``cachefit`` imports no torch: the names below load their modules on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from cachefit.version import __version__

# name -> module that defines it (loaded lazily, PEP 562)
_API = {
    "Workload": "cachefit.units",
    "Mode": "cachefit.units",
    "Footprint": "cachefit.units",
    "Unit": "cachefit.units",
    "ModelProfile": "cachefit.units",
    "profile_model": "cachefit.profile",
    "profile_module": "cachefit.profile.module",
    "get_device": "cachefit.hardware.devices",
    "list_devices": "cachefit.hardware.devices",
    "resolve_device": "cachefit.hardware.devices",
    "make_cluster": "cachefit.hardware.devices",
    "device_from_capacity": "cachefit.hardware.devices",
    "compress_unit": "cachefit.compress.techniques",
    "plan_partition": "cachefit.plan.search",
    "pareto_front": "cachefit.plan.search",
    "fewest_cards": "cachefit.partition.contiguous",
    "balanced": "cachefit.partition.contiguous",
    "estimate_cost": "cachefit.cost",
    "compare_layouts": "cachefit.cost",
    "export_plan": "cachefit.export",
    "audit_device_map": "cachefit.audit",
    "Plan": "cachefit.plan",
    "load_plan": "cachefit.plan",
    "parse_bytes": "cachefit.sizes",
    "format_bytes": "cachefit.sizes",
    "CachefitError": "cachefit.errors",
    "ConfigError": "cachefit.errors",
    "InfeasiblePlanError": "cachefit.errors",
}

__all__ = ["__version__", *_API]

# Argument checks at the package face for verbs that do not check their own: a wrong type is a
# ConfigError naming the verb and the argument, not a TypeError or AttributeError from deep inside.
# verb -> {parameter: (accepted types as "module:Class", None accepted)}; ``allow`` given as a plain
# string is read as a comma-separated list ("int8,int4"). plan_partition, profile_model and
# load_plan check their arguments themselves.
_PROFILE = ("cachefit.units:ModelProfile",)
_CLUSTER = ("cachefit.hardware.devices:Cluster",)
_PLAN = ("cachefit.plan:Plan",)
_CHECKS: dict[str, dict[str, tuple[tuple[str, ...], bool]]] = {
    "estimate_cost": {"plan": (_PLAN, False), "profile": (_PROFILE, False)},
    "compare_layouts": {"profile": (_PROFILE, False), "cluster": (_CLUSTER, False)},
    "export_plan": {"plan": (_PLAN, False), "profile": (_PROFILE, True)},
    "audit_device_map": {"profile": (_PROFILE, False), "cluster": (_CLUSTER, False)},
    "make_cluster": {"devices": (("cachefit.hardware.devices:DeviceSpec", "builtins:list", "builtins:tuple"), False)},
    "profile_module": {"workload": (("cachefit.units:Workload",), True)},
}


def _type(spec: str) -> type:
    module, _, cls = spec.partition(":")
    return getattr(importlib.import_module(module), cls)


def _checked(name: str, func: Any) -> Any:
    """``func`` with its arguments checked as ``_CHECKS[name]`` says, before it runs."""
    import functools
    import inspect

    from cachefit.errors import ConfigError

    signature = inspect.signature(func)
    checks = _CHECKS[name]

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise ConfigError(f"{name}: {exc}; see help(cachefit.{name})") from None
        for param, (specs, optional) in checks.items():
            if param not in bound.arguments or (optional and bound.arguments[param] is None):
                continue
            value = bound.arguments[param]
            if not isinstance(value, tuple(_type(s) for s in specs)):
                wanted = " or ".join(s.partition(":")[2] for s in specs) + (" or None" if optional else "")
                raise ConfigError(f"{name}: {param} must be a {wanted}, got {type(value).__name__}")
        if isinstance(bound.arguments.get("allow"), str):
            bound.arguments["allow"] = tuple(a.strip() for a in bound.arguments["allow"].split(",") if a.strip())
        return func(*bound.args, **bound.kwargs)

    return wrapper


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'cachefit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    if name in _CHECKS:
        value = _checked(name, value)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # for type checkers and IDEs only
    from cachefit.audit import audit_device_map
    from cachefit.compress.techniques import compress_unit
    from cachefit.cost import compare_layouts, estimate_cost
    from cachefit.export import export_plan
    from cachefit.errors import CachefitError, ConfigError, InfeasiblePlanError
    from cachefit.hardware.devices import (
        device_from_capacity,
        get_device,
        list_devices,
        make_cluster,
        resolve_device,
    )
    from cachefit.partition.contiguous import balanced, fewest_cards
    from cachefit.plan.search import pareto_front, plan_partition
    from cachefit.plan import Plan, load_plan
    from cachefit.profile import profile_model
    from cachefit.profile.module import profile_module
    from cachefit.sizes import format_bytes, parse_bytes
    from cachefit.units import Footprint, Mode, ModelProfile, Unit, Workload
