"""Limits on the size of every input cachefit reads, checked before any work is done.

Each limit is generous for real models and hardware and small enough that an absurd or hostile
input (``num_hidden_layers: 1000000000``, a cluster of a billion cards, ``/dev/zero`` as a sizes
file, JSON nested a million deep) ends in a one-line :class:`~cachefit.errors.ConfigError` that
names the limit, instead of a hang, a ``MemoryError`` or a ``RecursionError``. The values, and why
each is what it is, are listed in ``docs/errors.md``.
"""

from __future__ import annotations

from cachefit.errors import ConfigError

MAX_LAYERS = 10_000
"""Decoder layers in a model config. The deepest published LLMs have about 100-130 layers
(Llama-3.1-405B: 126; GPT-3 175B: 96); 10,000 leaves two orders of magnitude of room while
keeping a profile (two units a layer at ``--granularity block``) far below :data:`MAX_UNITS`."""

MAX_UNITS = 1_000_000
"""Units to partition (a profile's units, a sizes list, a plan's ``num_units``). The contiguous
partitioner is near-linear; the partition benchmark runs 1,000,000 units in a few hundred ms; no model
profile comes close (10,000 layers at block granularity is 20,002 units)."""

MAX_SIZES_LINES = MAX_UNITS
"""Lines of a ``--sizes-file`` (or items of ``--sizes``): one unit a line, so the units limit;
counted before the lines are split or parsed."""

MAX_CARDS = 65_536
"""Cards a plan may use (``--cards``, ``num_cards``, stages of a loaded plan). One pipeline stage
per card: real pipelines have tens to hundreds of stages, and a stage needs at least one unit."""

MAX_CLUSTER_CARDS = 65_536
"""Cards a cluster file (the sum of its ``count`` fields) or ``make_cluster(count=...)`` may
describe, checked before the list of cards is built. The largest single clusters built so far have
about 100,000 GPUs, but no pipeline spans more than a few hundred of them."""

MAX_FILE_BYTES = 64 * 2**20
"""Bytes of one input file (config.json, device or cluster file, plan, device map, sizes file),
read with a bounded read so ``/dev/zero`` and endless pipes stop. The largest real inputs are a
1,000,000-line sizes file (about 10 MB) and a plan of 20,000 units (a few MB); 64 MiB is 6x that."""

MAX_JSON_DEPTH = 64
"""Nesting depth of a JSON (or TOML / YAML) document, checked by a scan before parsing. Real
configs, plans and device files nest 2-5 levels; Python's JSON parser recurses once per level and
fails with ``RecursionError`` near 1,000."""

# What each limit counts, for the messages.
_NOUNS: dict[str, str] = {
    "MAX_LAYERS": "layers",
    "MAX_UNITS": "units",
    "MAX_SIZES_LINES": "lines",
    "MAX_CARDS": "cards",
    "MAX_CLUSTER_CARDS": "cards",
    "MAX_FILE_BYTES": "bytes (64 MiB)",
    "MAX_JSON_DEPTH": "levels of nesting",
}
# How to get under each limit, for the messages.
_FIXES: dict[str, str] = {
    "MAX_LAYERS": "check the value (real models have at most a few hundred layers)",
    "MAX_UNITS": "partition fewer units (merge small ones into larger ones)",
    "MAX_SIZES_LINES": "give at most one size a line for at most 1,000,000 units",
    "MAX_CARDS": "plan for fewer cards",
    "MAX_CLUSTER_CARDS": "describe fewer cards (lower the counts)",
    "MAX_FILE_BYTES": "check that this is the right file (cachefit's inputs are a few MB at most)",
    "MAX_JSON_DEPTH": "check that this is the right file (cachefit's inputs nest a few levels)",
}


def limit_error(name: str, *, where: str, what: str, value: int | None = None) -> ConfigError:
    """The one-line error for an input over the limit ``name`` (e.g. ``"MAX_LAYERS"``).

    ``where`` names the file (empty for a command-line option), ``what`` the field or option;
    ``value`` (when known) is shown.
    """
    limit = globals()[name]
    shown = f"{what} = {value:,}" if value is not None else what
    return ConfigError(
        f"{where + ': ' if where else ''}{shown} exceeds cachefit's limit of {limit:,} {_NOUNS[name]} "
        f"(limits.{name}); {_FIXES[name]}"
    )


def check_limit(value: int, name: str, *, where: str, what: str) -> None:
    """Raise :func:`limit_error` when ``value`` exceeds the limit ``name``.

    Raises:
        ConfigError: ``value`` is over the limit; the message names the limit and its value.
    """
    if value > globals()[name]:
        raise limit_error(name, where=where, what=what, value=value)


__all__ = [
    "MAX_CARDS",
    "MAX_CLUSTER_CARDS",
    "MAX_FILE_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_LAYERS",
    "MAX_SIZES_LINES",
    "MAX_UNITS",
    "check_limit",
    "limit_error",
]
