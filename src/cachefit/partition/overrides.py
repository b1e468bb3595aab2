"""User overrides the planner honours: pins, forced cuts, units kept whole, techniques forbidden.

Each override names units by a selector: an exact unit name (``embed``, ``layers.7.mlp``), a glob
(``layers.1*``, ``*.mlp``), or a numeric range (``layers.0-3`` = ``layers.0`` .. ``layers.3``; with
block granularity it selects both blocks of each layer). Overrides are checked against each other
before any search, so two that cannot both hold are reported together (exit 2); a set that is
consistent but leaves no plan that fits is an infeasible plan (exit 3).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from cachefit.errors import ConfigError
from cachefit.units import ModelProfile

_RANGE = re.compile(r"^(?P<prefix>.*?)(?P<lo>\d+)-(?P<hi>\d+)(?P<suffix>(\..*)?)$")


@dataclass(frozen=True, slots=True, kw_only=True)
class Overrides:
    """What the user fixes; selectors are resolved against a profile by :func:`resolve_overrides`."""

    pins: tuple[tuple[str, int], ...] = ()
    """``(selector, card)``: the selected units go on that card (0-based, pipeline order)."""
    cut_after: tuple[str, ...] = ()
    """A stage boundary right after each selected unit."""
    keep_whole: tuple[str, ...] = ()
    """Units never split across cards (accelerate's ``no_split_module_classes``)."""
    forbid: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """``(selector, techniques)``: those techniques are never applied to the selected units."""

    @property
    def empty(self) -> bool:
        return not (self.pins or self.cut_after or self.keep_whole or self.forbid)

    def describe(self) -> tuple[str, ...]:
        out = [f"pin {sel}={card}" for sel, card in self.pins]
        out += [f"cut after {sel}" for sel in self.cut_after]
        out += [f"keep whole {sel}" for sel in self.keep_whole]
        out += [f"forbid {','.join(t)} on {sel}" for sel, t in self.forbid]
        return tuple(out)


@dataclass(frozen=True, slots=True, kw_only=True)
class ResolvedOverrides:
    """Overrides as unit indices of one profile."""

    pins: Mapping[int, int] = field(default_factory=dict)
    pin_source: Mapping[int, str] = field(default_factory=dict)
    """For each pinned unit, the override that pinned it (for error messages)."""
    cuts: frozenset[int] = frozenset()
    """Boundaries: a cut at ``b`` means a stage ends before unit ``b``."""
    cut_source: Mapping[int, str] = field(default_factory=dict)
    keep_whole: frozenset[int] = frozenset()
    forbid: Mapping[int, frozenset[str]] = field(default_factory=dict)

    @property
    def shapes_partition(self) -> bool:
        """Pins or cuts constrain where stages begin and end."""
        return bool(self.pins or self.cuts)


def _select(profile: ModelProfile, selector: str, what: str) -> list[int]:
    names = [u.name for u in profile.units]
    sel = selector.strip()
    if not sel:
        raise ConfigError(f"{what}: empty unit selector; write a unit name such as layers.3, a glob or a range layers.0-3")
    if sel in names:
        return [names.index(sel)]
    hits = [i for i, n in enumerate(names) if fnmatchcase(n, sel)]
    m = _RANGE.match(sel)
    if not hits and m:
        lo, hi = int(m.group("lo")), int(m.group("hi"))
        if lo > hi:
            raise ConfigError(f"{what}: range {sel!r} runs backwards; write {m.group('prefix')}{hi}-{lo}")
        wanted = {f"{m.group('prefix')}{k}{m.group('suffix')}" for k in range(lo, hi + 1)}
        hits = [i for i, n in enumerate(names) if n in wanted or any(n.startswith(w + ".") for w in wanted)]
    if not hits:
        close = [n for n in names if n.split(".")[0] == sel.split(".")[0]][:4] or names[:4]
        raise ConfigError(
            f"{what}: no unit matches {sel!r}; units are named like {', '.join(close)} (see `cachefit profile MODEL`)"
        )
    return hits


def parse_pin(text: str) -> tuple[str, int]:
    """``'layers.0-3=0'`` -> ``('layers.0-3', 0)``."""
    sel, sep, card = text.rpartition("=")
    if not sep or not sel.strip():
        raise ConfigError(f"--pin {text!r}: write UNITS=CARD, e.g. --pin 'layers.0-3=0'")
    try:
        index = int(card)
    except ValueError:
        raise ConfigError(f"--pin {text!r}: card {card!r} is not an integer") from None
    if index < 0:
        raise ConfigError(f"--pin {text!r}: cards count from 0")
    return sel.strip(), index


def parse_forbid(text: str) -> tuple[str, tuple[str, ...]]:
    """``'head:int8,int4'`` -> ``('head', ('int8', 'int4'))``."""
    sel, sep, techs = text.partition(":")
    names = tuple(t.strip() for t in techs.split(",") if t.strip())
    if not sep or not sel.strip() or not names:
        raise ConfigError(f"--forbid {text!r}: write UNITS:TECHNIQUES, e.g. --forbid 'head:int8,int4'")
    return sel.strip(), names


def resolve_overrides(profile: ModelProfile, overrides: Overrides, *, num_cards: int | None = None) -> ResolvedOverrides:
    """Resolve selectors to unit indices and check the overrides against each other.

    Raises:
        ConfigError: an unknown unit, or two overrides that cannot both hold (both are named).
    """
    from cachefit.compress.techniques import resolve_techniques

    pins: dict[int, int] = {}
    pin_source: dict[int, str] = {}
    for sel, card in overrides.pins:
        label = f"--pin {sel}={card}"
        if num_cards is not None and card >= num_cards:
            raise ConfigError(f"{label}: card {card} does not exist with --cards {num_cards} (cards 0..{num_cards - 1})")
        for i in _select(profile, sel, label):
            if i in pins and pins[i] != card:
                raise ConfigError(
                    f"{pin_source[i]} and {label} collide: unit {profile.units[i].name} cannot be on card "
                    f"{pins[i]} and card {card}"
                )
            pins[i], pin_source[i] = card, label
    ordered = sorted(pins)
    for a, b in zip(ordered, ordered[1:]):
        if pins[a] > pins[b]:
            raise ConfigError(
                f"{pin_source[a]} and {pin_source[b]} collide: units keep their order, so "
                f"{profile.units[b].name} (after {profile.units[a].name}) cannot sit on an earlier card"
            )
        if pins[b] - pins[a] > b - a:
            raise ConfigError(
                f"{pin_source[a]} and {pin_source[b]} collide: cards {pins[a] + 1}..{pins[b] - 1} in between "
                f"would hold no unit ({b - a - 1} units for {pins[b] - pins[a] - 1} cards)"
            )
    if pins and num_cards is not None:
        last = max(pins, key=lambda i: pins[i])
        if num_cards - 1 - pins[last] > len(profile.units) - 1 - last:
            raise ConfigError(
                f"{pin_source[last]} and --cards {num_cards} collide: too few units after "
                f"{profile.units[last].name} to give every later card one"
            )
    cuts: set[int] = set()
    cut_source: dict[int, str] = {}
    for sel in overrides.cut_after:
        label = f"--cut-after {sel}"
        for i in _select(profile, sel, label):
            if i + 1 >= len(profile.units):
                continue  # after the last unit a stage ends anyway
            cuts.add(i + 1)
            cut_source[i + 1] = label
    for b in cuts:
        if b - 1 in pins and b in pins and pins[b - 1] == pins[b]:
            raise ConfigError(
                f"{cut_source[b]} and {pin_source[b]} collide: {profile.units[b - 1].name} and "
                f"{profile.units[b].name} are pinned to the same card {pins[b]}, so no stage can end between them"
            )
    keep = set()
    for sel in overrides.keep_whole:
        keep.update(_select(profile, sel, f"--keep-whole {sel}"))
    forbid: dict[int, set[str]] = {}
    for sel, techs in overrides.forbid:
        names = {resolve_techniques((t,))[0] for t in techs}
        for i in _select(profile, sel, f"--forbid {sel}"):
            forbid.setdefault(i, set()).update(names)
    return ResolvedOverrides(
        pins=pins, pin_source=pin_source, cuts=frozenset(cuts), cut_source=cut_source,
        keep_whole=frozenset(keep), forbid={i: frozenset(v) for i, v in forbid.items()},
    )


def constrained_partition(
    resident: Sequence[int],
    transient: Sequence[int] | None,
    capacities: Sequence[int],
    *,
    num_cards: int | None,
    overrides: ResolvedOverrides,
) -> list[tuple[int, int]] | None:
    """Contiguous parts honouring pins and cuts, by dynamic programming over (units placed, cards used).

    Without ``num_cards``: the fewest cards (then the smallest largest part); with it: exactly
    ``num_cards`` parts minimizing the largest part. ``capacities[c]`` is card ``c``'s capacity
    (as many entries as cards may be used). O(n^2 K) in the worst case, so meant for the model-sized
    instances overrides come with (hundreds of units), not the million-unit fast path.
    """
    n = len(resident)
    trans = transient if transient is not None else [0] * n
    max_cards = num_cards if num_cards is not None else min(n, len(capacities))
    inf = float("inf")
    # best[c][j]: smallest largest part placing units [0, j) on cards [0, c)
    best = [[inf] * (n + 1) for _ in range(max_cards + 1)]
    back: list[list[int]] = [[-1] * (n + 1) for _ in range(max_cards + 1)]
    best[0][0] = 0
    cuts = overrides.cuts
    pins = overrides.pins
    for c in range(max_cards):
        cap = capacities[min(c, len(capacities) - 1)]
        for i in range(n):
            if best[c][i] == inf:
                continue
            total_res, peak = 0, 0
            for j in range(i, n):
                pin = pins.get(j)
                if pin is not None and pin != c:
                    break  # unit j belongs to another card
                total_res += resident[j]
                peak = max(peak, trans[j])
                cost = total_res + peak
                if cost > cap:
                    break
                end = j + 1
                value = max(best[c][i], cost)
                if value < best[c + 1][end]:
                    best[c + 1][end], back[c + 1][end] = value, i
                if end in cuts:
                    break  # a stage must end here
    if num_cards is not None:
        chosen = num_cards if best[num_cards][n] < inf else None
    else:
        chosen = next((c for c in range(1, max_cards + 1) if best[c][n] < inf), None)
    if chosen is None:
        return None
    parts: list[tuple[int, int]] = []
    j, c = n, chosen
    while c > 0:
        i = back[c][j]
        parts.append((i, j))
        j, c = i, c - 1
    return list(reversed(parts))
