"""Predictions beside published deployments: what cachefit predicts for a deployment the world ran.

A :class:`PublishedDeployment` is one public end-to-end figure (tokens/s per user at a batch, on a
device, for a model at a precision and context length, with its source and date), read from a data
file (``bench/published_deployments.toml``; :func:`load_deployments`). :func:`predict` prices the same
model and workload with the catalog's figures on the cards the deployment used (or, where their
number is not published, on the fewest cards a cachefit plan fits), in the layout it used, and
:func:`calibrate` solves for the one device figure a calibration row fixes.

Some device figures have no public source (a wafer's per-layer latency, a Tenstorrent card's per-op
cost): each is calibrated on **one** published result per device (``role = "calibration"``, the figure
it fixes named in ``calibrates``) and checked against the device's other published results
(``role = "validation"``). ``docs/validation.md`` is the table (``bench/validate.py`` writes it) and
``tests/cost/test_validation.py`` recomputes it, so a catalog or model change that moves a prediction
out of its band fails.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cachefit.cost.baselines import cachefit_plan, min_cards_to_fit, tensor_parallel_plan, uniform_layers_plan
from cachefit.cost.pipeline import PlanCost, estimate_cost
from cachefit.errors import ConfigError
from cachefit.hardware.catalog import get_device, make_cluster
from cachefit.hardware.spec import SCALAR_FIGURES, DeviceSpec, Figure
from cachefit.profile import profile_model
from cachefit.units import Mode, Workload

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROLES: tuple[str, ...] = ("calibration", "validation")
LAYOUTS: tuple[str, ...] = ("cachefit", "tensor-parallel", "uniform-layers")
"""Layouts a deployment may name: cachefit's plan, or the layout the deployment is known to use."""
CALIBRATED_FIGURES: tuple[str, ...] = ("layer_latency", "kernel_overhead", "hop_latency")
"""Device figures a calibration row may fix (the fixed costs no public specification gives)."""
DEFAULT_BAND = 2.0
"""A prediction passes when it is within this factor of the published figure, either way."""

_KEYS = {
    "id", "device", "family", "model", "model_label", "config", "config_source", "precision", "dtype", "act_dtype",
    "allow", "batch", "seq", "cards", "layout", "published_tokens_per_s", "source", "date", "role", "calibrates",
    "band", "expect_missing", "bracket", "note",
}  # fmt: skip
_REQUIRED = ("id", "device", "family", "model", "precision", "batch", "seq", "published_tokens_per_s", "source",
             "date", "role")


@dataclass(frozen=True, slots=True, kw_only=True)
class PublishedDeployment:
    """One published end-to-end decode figure and the workload that reproduces it."""

    id: str
    """Short unique name (``cerebras-wse3-llama-3.1-8b``)."""
    device: str
    """Catalog device the deployment ran on."""
    family: str
    """Device family for the table (``Cerebras``, ``Groq``, ``NVIDIA GPU``, ``Tenstorrent``)."""
    model: str
    """A preset name, or a label for ``config``."""
    model_label: str
    """How the table names the model."""
    config: Mapping[str, Any] | None
    """The model's Hugging Face ``config.json`` where no preset has it (``config_source`` says where from)."""
    config_source: str
    precision: str
    """As published (``16-bit``, ``bf16``, ``BFP8 (block FP8)``)."""
    dtype: str
    """cachefit's weight dtype for it (``fp16``, ``bf16``, ``fp8``)."""
    act_dtype: str
    allow: tuple[str, ...]
    """Compression the deployment applied (``int8`` weight-only), as cachefit techniques."""
    batch: int
    seq: int
    """Context (KV-cache) length the figure was measured at, as near as published."""
    cards: int | None
    """Cards the deployment used, where published; None: priced on the fewest cards a plan fits."""
    layout: str
    """``cachefit`` (cachefit's own plan), or ``tensor-parallel`` / ``uniform-layers`` where the
    deployment is known to split that way."""
    published_tokens_per_s: float
    """Tokens/s per user (one sequence's decode rate) as published."""
    source: str
    date: str
    role: str
    """``calibration`` (fixes ``calibrates``) or ``validation``."""
    calibrates: str
    """For a calibration row: the catalog figure it fixes (``layer_latency``)."""
    band: float
    """Allowed factor between predicted and published, either way."""
    expect_missing: tuple[str, ...]
    """Figures the prediction is known to lack (the row then reports unknown, not a number)."""
    bracket: tuple[float, float] | None
    """For one missing figure: the range of its value (seconds) over which the predictions are given."""
    note: str

    def __post_init__(self) -> None:
        where = f"deployment {self.id!r}"
        if self.role not in ROLES:
            raise ConfigError(f"{where}: role must be one of {ROLES}, got {self.role!r}")
        if self.role == "calibration" and self.calibrates not in CALIBRATED_FIGURES:
            raise ConfigError(f"{where}: a calibration row names the figure it fixes, one of {CALIBRATED_FIGURES}")
        if self.role == "validation" and self.calibrates:
            raise ConfigError(f"{where}: only a calibration row calibrates a figure")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"{where}: layout must be one of {LAYOUTS}, got {self.layout!r}")
        if not (self.published_tokens_per_s > 0 and self.band > 1):
            raise ConfigError(f"{where}: published_tokens_per_s must be > 0 and band > 1")
        if self.cards is not None and self.cards < 1:
            raise ConfigError(f"{where}: cards must be >= 1 where given")
        if self.bracket is not None and (len(self.expect_missing) != 1 or not 0 < self.bracket[0] < self.bracket[1]):
            raise ConfigError(f"{where}: a bracket [low, high] (0 < low < high, seconds) goes with one expected "
                              "missing figure")

    def workload(self) -> Workload:
        return Workload(batch=self.batch, seq_len=self.seq, mode=Mode.DECODE, weight_dtype=self.dtype,
                        act_dtype=self.act_dtype)


def _deployment(raw: Mapping[str, Any], index: int, where: str) -> PublishedDeployment:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: deployment[{index}] must be a table")
    unknown = set(raw) - _KEYS
    missing = [k for k in _REQUIRED if k not in raw]
    if unknown or missing:
        raise ConfigError(f"{where}: deployment[{index}] ({raw.get('id', '?')}): unknown keys {sorted(unknown)}, "
                          f"missing keys {missing}")
    dtype = str(raw.get("dtype", "fp16"))
    try:
        return PublishedDeployment(
            id=str(raw["id"]), device=str(raw["device"]), family=str(raw["family"]), model=str(raw["model"]),
            model_label=str(raw.get("model_label", raw["model"])), config=raw.get("config"),
            config_source=str(raw.get("config_source", "")), precision=str(raw["precision"]), dtype=dtype,
            act_dtype=str(raw.get("act_dtype", dtype)), allow=tuple(raw.get("allow", ())), batch=int(raw["batch"]),
            seq=int(raw["seq"]), cards=raw.get("cards"), layout=str(raw.get("layout", "cachefit")),
            published_tokens_per_s=float(raw["published_tokens_per_s"]), source=str(raw["source"]),
            date=str(raw["date"]), role=str(raw["role"]), calibrates=str(raw.get("calibrates", "")),
            band=float(raw.get("band", DEFAULT_BAND)), expect_missing=tuple(raw.get("expect_missing", ())),
            bracket=tuple(float(v) for v in raw["bracket"]) if "bracket" in raw else None,  # type: ignore[arg-type]
            note=str(raw.get("note", "")),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: deployment[{index}] ({raw.get('id', '?')}): {exc}") from None


def load_deployments(path: str | os.PathLike[str]) -> tuple[PublishedDeployment, ...]:
    """Read the published deployments (``[[deployment]]`` tables of a TOML file).

    Raises:
        ConfigError: a malformed row, a repeated id, or two calibration rows for one device figure.
    """
    where = os.fspath(path)
    with open(path, "rb") as fh:
        doc = tomllib.load(fh)
    rows = tuple(_deployment(raw, i, where) for i, raw in enumerate(doc.get("deployment", ())))
    ids = [d.id for d in rows]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{where}: deployment ids repeat: {sorted({i for i in ids if ids.count(i) > 1})}")
    calibrations = [d.device for d in rows if d.role == "calibration"]
    if len(set(calibrations)) != len(calibrations):
        raise ConfigError(f"{where}: at most one calibration row per device; {calibrations}")
    return rows


@dataclass(frozen=True, slots=True, kw_only=True)
class Prediction:
    """cachefit's prediction for one published deployment."""

    deployment: PublishedDeployment
    cards: int
    """Cards priced: the published count, else the fewest on which a cachefit plan fits."""
    cards_to_fit: int | None
    """The fewest cards on which the model fits on-chip (None: no number of cards does)."""
    fits_on_chip: bool
    """The priced layout holds every stage on-chip (else it streams weights from off-chip memory)."""
    tokens_per_s: float | None
    """Predicted tokens/s per user; None where a figure is missing or the layout cannot run."""
    missing: tuple[str, ...]
    bound: str
    """What bounds the slowest stage (``off-chip``, ``layers``, ``kernels``, ``collectives`` ...)."""
    bracketed: tuple[float, float] | None = None
    """Predicted tokens/s per user at the low and high end of the deployment's ``bracket`` for its one
    missing figure (None without a bracket)."""

    @property
    def ratio(self) -> float | None:
        """Predicted over published tokens/s."""
        if self.tokens_per_s is None:
            return None
        return self.tokens_per_s / self.deployment.published_tokens_per_s

    @property
    def within_band(self) -> bool:
        """The prediction (or, for a bracketed unknown, both ends of its range) lies within the band."""
        dep = self.deployment
        values = [self.tokens_per_s] if self.bracketed is None else list(self.bracketed)
        return all(v is not None and 1 / dep.band <= v / dep.published_tokens_per_s <= dep.band for v in values)


def _profile(dep: PublishedDeployment):
    return profile_model(dict(dep.config) if dep.config is not None else dep.model, dep.workload())


_BUILDERS: dict[str, Callable[..., Any]] = {
    "tensor-parallel": tensor_parallel_plan,
    "uniform-layers": uniform_layers_plan,
}


def _price(dep: PublishedDeployment, device: DeviceSpec, profile: Any, cards: int) -> PlanCost:
    cluster = make_cluster(device)
    if dep.layout == "cachefit":
        plan = cachefit_plan(profile, cluster, cards, allow=dep.allow)
    else:
        if dep.allow:
            raise ConfigError(f"deployment {dep.id!r}: compression is applied only with layout 'cachefit'")
        plan = _BUILDERS[dep.layout](profile, cluster, cards)
    return estimate_cost(plan, profile, device)


def predict(dep: PublishedDeployment, device: DeviceSpec | None = None) -> Prediction:
    """Price ``dep``'s model and workload on its device (the catalog's, or ``device``) and cards."""
    device = device or get_device(dep.device)
    profile = _profile(dep)
    fit = min_cards_to_fit(profile, make_cluster(device), allow=dep.allow)
    cards = dep.cards if dep.cards is not None else fit
    if cards is None:
        raise ConfigError(f"deployment {dep.id!r}: no number of {device.name} cards holds the model on-chip and the "
                          "deployment does not say how many it used; give cards")
    cost = _price(dep, device, profile, cards)
    tps = cost.throughput_tokens_per_s
    slowest = max((s for s in cost.stages if s.time_s is not None), key=lambda s: s.time_s or 0.0, default=None)
    bracketed = None
    if dep.bracket is not None and tps is None:
        name, _, key = dep.expect_missing[0].partition(" ")
        if name != device.name:
            raise ConfigError(f"deployment {dep.id!r}: the bracketed figure {dep.expect_missing[0]!r} is not "
                              f"{device.name}'s")
        ends = []
        for value in dep.bracket:
            got = _price(dep, with_figure(device, key, value, note="bracket"), profile, cards).throughput_tokens_per_s
            ends.append(None if got is None else got / dep.batch)
        if None not in ends:
            bracketed = (ends[0], ends[1])  # type: ignore[assignment]
    return Prediction(
        deployment=dep,
        cards=len(cost.stages),
        cards_to_fit=fit,
        fits_on_chip=cost.fits_on_chip,
        tokens_per_s=None if tps is None else tps / dep.batch,
        missing=cost.missing if cost.possible else ("(cannot run: a stage does not fit and there is no off-chip memory)",),
        bound=slowest.bound if slowest is not None else "unknown",
        bracketed=bracketed,
    )


def with_figure(device: DeviceSpec, key: str, value: float, *, source: str = "", note: str = "") -> DeviceSpec:
    """``device`` with the scalar figure ``key`` (``layer_latency``...) set to ``value`` (calibrated)."""
    if key not in SCALAR_FIGURES:
        raise ConfigError(f"with_figure: {key!r} is not a scalar device figure; one of {', '.join(SCALAR_FIGURES)}")
    old = device.figure(key)
    fig = Figure(value=value, source=source or (old.source if old else "calibration"),
                 as_of=old.as_of if old else "", uncertain=True, calibrated=True, note=note)
    figures = tuple((k, f) for k, f in device.figures if k != key) + ((key, fig),)
    return dataclasses.replace(device, figures=figures, **{SCALAR_FIGURES[key]: value})


def calibrate(dep: PublishedDeployment, *, low: float = 1e-9, high: float = 1e-2, rel_tol: float = 1e-6) -> float:
    """The value of ``dep.calibrates`` (seconds) at which the prediction equals the published figure.

    Bisection on a log scale: the predicted tokens/s falls as a fixed cost grows.

    Raises:
        ConfigError: not a calibration row, or no value in [low, high] reaches the published figure
            (the other terms alone are already slower, or the figure cannot slow it enough).
    """
    if dep.role != "calibration":
        raise ConfigError(f"deployment {dep.id!r} is not a calibration row")
    base = get_device(dep.device)

    def rate(value: float) -> float:
        got = predict(dep, with_figure(base, dep.calibrates, value)).tokens_per_s
        if got is None:
            raise ConfigError(f"deployment {dep.id!r}: no prediction even with {dep.calibrates} set: "
                              f"{predict(dep, with_figure(base, dep.calibrates, value)).missing}")
        return got

    target = dep.published_tokens_per_s
    if rate(low) < target or rate(high) > target:
        raise ConfigError(
            f"deployment {dep.id!r}: {dep.calibrates} in [{low:g}, {high:g}] s cannot reach {target:g} tokens/s "
            f"(predicted {rate(low):,.1f} .. {rate(high):,.1f})"
        )
    lo, hi = math.log(low), math.log(high)
    while hi - lo > rel_tol:
        mid = (lo + hi) / 2
        if rate(math.exp(mid)) > target:
            lo = mid
        else:
            hi = mid
    return math.exp((lo + hi) / 2)


def predict_all(deployments: Sequence[PublishedDeployment]) -> tuple[Prediction, ...]:
    """:func:`predict` for each deployment, in order."""
    return tuple(predict(d) for d in deployments)


__all__ = [
    "CALIBRATED_FIGURES",
    "DEFAULT_BAND",
    "LAYOUTS",
    "ROLES",
    "Prediction",
    "PublishedDeployment",
    "calibrate",
    "load_deployments",
    "predict",
    "predict_all",
    "with_figure",
]
