"""Measured quality loss per unit and technique: the quality file ``cachefit quality`` writes.

Pure core (no torch): the planner reads it. :mod:`cachefit.compress.quality` (torch) measures it by
compressing one unit at a time with each technique and comparing the model's outputs with the
uncompressed model's on calibration inputs. The file (``schema``: ``cachefit.quality/1``)::

    {"schema": "cachefit.quality/1", "model": "all-minilm-l6-v2", "kind": "encoder", "metric": "1-cos",
     "techniques": {"int8": {"end_to_end": 0.0004, "units": {"layers.0": 0.00007, ...},
                             "unit_output_error": {"layers.0": 0.004, ...}, "not_applied": ["embed", "head"]},
                    ...},
     "config": {...}, "calibration": {...}, "baseline": {...}}

Larger is worse. ``units[u]`` is the end-to-end loss with only unit ``u`` compressed (the rest of the
model exact), so summing it over units predicts the loss of a plan to first order;
``end_to_end`` is the loss with every unit compressed at once, the check on that sum.
``unit_output_error[u]`` is the relative L2 error of unit ``u``'s own output (same input).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from cachefit.compress.techniques import TECHNIQUES, resolve_techniques
from cachefit.errors import CachefitError, ConfigError

__all__ = ["METRICS", "QUALITY_SCHEMA", "QualityProfile", "TechniqueQuality", "read_quality_file"]

QUALITY_SCHEMA = "cachefit.quality/1"

METRICS: Mapping[str, str] = MappingProxyType(
    {
        "kl": (
            "mean KL divergence KL(P_ref || P) of the next-token distributions vs the uncompressed model, "
            "in nats per token (decoders)"
        ),
        "1-cos": (
            "1 - cosine similarity of the mean-pooled embeddings vs the uncompressed model, mean over the "
            "inputs (encoders)"
        ),
    }
)
"""Loss metrics (larger is worse) and what they measure."""


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def _losses(data: Any, where: str) -> tuple[tuple[str, float], ...]:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected an object of unit name -> number, got {type(data).__name__}")
    out = []
    for name, value in data.items():
        loss = _number(value, f"{where}[{name!r}]")
        if loss < 0:
            raise ConfigError(f"{where}[{name!r}]: a loss is never negative, got {loss}")
        out.append((str(name), loss))
    return tuple(out)


@dataclass(frozen=True, slots=True, kw_only=True)
class TechniqueQuality:
    """What one technique (or one set of techniques, ``sparse50,int8``) costs, measured."""

    technique: str
    """The technique (or comma-separated set, canonical order) as the planner names it."""
    end_to_end: float
    """Loss with every unit compressed at once."""
    units: tuple[tuple[str, float], ...]
    """(unit, loss with only that unit compressed); 0 where the technique does not apply."""
    unit_output_error: tuple[tuple[str, float], ...] = ()
    """(unit, relative L2 error of that unit's own output when only it is compressed)."""
    not_applied: tuple[str, ...] = ()
    """Units the technique does not apply to (the planner's own rule: a no-op saving 0 B)."""
    extra: tuple[tuple[str, float], ...] = ()
    """Further measurements of the fully compressed model (``sts_spearman``, ``held_out_1-cos``)."""

    def __post_init__(self) -> None:
        if not self.end_to_end >= 0 or not math.isfinite(self.end_to_end):
            raise ConfigError(f"quality of {self.technique}: end_to_end must be a finite loss >= 0, got {self.end_to_end}")
        for name, loss in self.units:
            if not loss >= 0 or not math.isfinite(loss):
                raise ConfigError(f"quality of {self.technique}: unit {name} has loss {loss}; losses are finite and >= 0")

    @property
    def by_unit(self) -> Mapping[str, float]:
        """Unit -> loss with only that unit compressed."""
        return dict(self.units)

    @property
    def unit_sum(self) -> float:
        """The predicted loss of compressing every unit: the sum of the per-unit losses."""
        return sum(loss for _, loss in self.units)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"end_to_end": self.end_to_end, "units": dict(self.units)}
        if self.unit_output_error:
            out["unit_output_error"] = dict(self.unit_output_error)
        if self.not_applied:
            out["not_applied"] = list(self.not_applied)
        out.update(dict(self.extra))
        return out

    @classmethod
    def from_dict(cls, technique: str, data: Any, *, where: str) -> TechniqueQuality:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected an object with end_to_end and units, got {type(data).__name__}")
        for key in ("end_to_end", "units"):
            if key not in data:
                raise ConfigError(f"{where}: missing {key!r}")
        known = {"end_to_end", "units", "unit_output_error", "not_applied"}
        not_applied = data.get("not_applied", [])
        if not isinstance(not_applied, list) or not all(isinstance(n, str) for n in not_applied):
            raise ConfigError(f"{where}.not_applied: expected a list of unit names")
        return cls(
            technique=technique,
            end_to_end=_number(data["end_to_end"], f"{where}.end_to_end"),
            units=_losses(data["units"], f"{where}.units"),
            unit_output_error=_losses(data.get("unit_output_error", {}), f"{where}.unit_output_error"),
            not_applied=tuple(not_applied),
            extra=tuple((k, _number(v, f"{where}.{k}")) for k, v in data.items() if k not in known),
        )


def _canonical(techniques: Sequence[str] | str) -> str:
    return ",".join(resolve_techniques(techniques))


@dataclass(frozen=True, slots=True, kw_only=True)
class QualityProfile:
    """Measured losses of a model's units under each technique (the quality file)."""

    model: str
    """The model as given to ``cachefit quality``."""
    kind: str
    """``encoder`` or ``decoder``."""
    metric: str
    """A key of :data:`METRICS`."""
    techniques: tuple[TechniqueQuality, ...]
    config: tuple[tuple[str, Any], ...] = ()
    """The compression options measured with (methods, group sizes)."""
    calibration: tuple[tuple[str, Any], ...] = ()
    """Where the inputs came from and how many tokens they hold."""
    baseline: tuple[tuple[str, float], ...] = ()
    """Measurements of the uncompressed model (``sts_spearman``)."""

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ConfigError(f"quality profile: unknown metric {self.metric!r}; known: {', '.join(METRICS)}")
        if self.kind not in ("encoder", "decoder"):
            raise ConfigError(f"quality profile: kind must be encoder or decoder, got {self.kind!r}")
        names = [t.technique for t in self.techniques]
        if len(set(names)) != len(names):
            raise ConfigError(f"quality profile: a technique is listed twice in {names}")

    def technique(self, techniques: Sequence[str] | str) -> TechniqueQuality | None:
        """The measurement of one technique or set (any order), or None."""
        key = _canonical(techniques)
        return next((t for t in self.techniques if _canonical(t.technique) == key), None)

    def unit_loss(self, unit: str, techniques: Sequence[str] | str) -> float:
        """Predicted loss of compressing unit ``unit`` (alone) with ``techniques``.

        A set measured as a whole gives its own number. Otherwise the losses of its techniques add
        up (to first order, small losses of independent changes add); techniques that change no
        stored weight (``fuse``, ``ckpt``, ``batch``) count 0 unless measured.

        Raises:
            ConfigError: a weight technique of the set was not measured.
        """
        names = resolve_techniques(techniques)
        if not names:
            return 0.0
        whole = self.technique(names)
        if whole is not None:
            return whole.by_unit.get(unit, 0.0)
        total = 0.0
        for name in names:
            single = self.technique([name])
            if single is None:
                if TECHNIQUES[name].kind != "weights":
                    continue
                raise ConfigError(
                    f"quality profile of {self.model}: technique {name} was not measured; measure it with "
                    f"`cachefit quality {self.model} --allow {','.join(sorted({*self.measured, name}))}`"
                )
            total += single.by_unit.get(unit, 0.0)
        return total

    @property
    def measured(self) -> tuple[str, ...]:
        """The techniques (and sets) measured, as named in the file."""
        return tuple(t.technique for t in self.techniques)

    def to_dict(self) -> dict[str, Any]:
        """The quality file's JSON document."""
        return {
            "schema": QUALITY_SCHEMA,
            "model": self.model,
            "kind": self.kind,
            "metric": self.metric,
            "metric_description": METRICS[self.metric],
            "config": dict(self.config),
            "calibration": dict(self.calibration),
            "baseline": dict(self.baseline),
            "techniques": {t.technique: t.to_dict() for t in self.techniques},
        }

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "quality file") -> QualityProfile:
        """Read the JSON document back (``schema`` must be ``cachefit.quality/1``)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a JSON object, got {type(data).__name__}")
        if data.get("schema") != QUALITY_SCHEMA:
            raise ConfigError(
                f"{where}: schema is {data.get('schema')!r}, expected {QUALITY_SCHEMA!r}; write it with "
                f"`cachefit quality MODEL --out FILE`"
            )
        for key in ("model", "kind", "metric", "techniques"):
            if key not in data:
                raise ConfigError(f"{where}: missing {key!r}")
        techniques = data["techniques"]
        if not isinstance(techniques, Mapping) or not techniques:
            raise ConfigError(f"{where}.techniques: expected a non-empty object of technique -> measurements")
        parsed = []
        for name, entry in techniques.items():
            try:
                canonical = _canonical(str(name))
            except CachefitError as exc:  # an unknown or repeated technique name
                raise ConfigError(f"{where}.techniques: {exc}") from None
            parsed.append(TechniqueQuality.from_dict(canonical, entry, where=f"{where}.techniques[{name!r}]"))
        for key in ("config", "calibration", "baseline"):
            if not isinstance(data.get(key, {}), Mapping):
                raise ConfigError(f"{where}.{key}: expected an object")
        return cls(
            model=str(data["model"]),
            kind=str(data["kind"]),
            metric=str(data["metric"]),
            techniques=tuple(parsed),
            config=tuple(dict(data.get("config", {})).items()),
            calibration=tuple(dict(data.get("calibration", {})).items()),
            baseline=tuple((k, _number(v, f"{where}.baseline.{k}")) for k, v in dict(data.get("baseline", {})).items()),
        )


def read_quality_file(path: str | os.PathLike[str]) -> QualityProfile:
    """Read a quality file written by ``cachefit quality --out FILE``.

    Raises:
        ConfigError: unreadable, malformed, or another schema.
    """
    from cachefit.files import read_json

    return QualityProfile.from_dict(read_json(path, what="quality file"), where=f"quality file {os.fspath(path)!r}")
