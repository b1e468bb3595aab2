"""Which of a stage's bytes stay on-chip and which stream from off-chip memory, and what that moves.

One rule, read by the planner (to choose a partial-fit layout with the fewest off-chip bytes) and by
the cost model (:mod:`cachefit.cost.roofline`, to price any layout), so the two never disagree:

The stage's footprint (weights + activations + buffers, stacked as the plan stacks them) is compared
with the capacity its card offers. The part beyond it (``overflow_bytes = total - capacity``,
clipped at 0) is taken from the weights first (at most all of them): those weights are *streamed*
from off-chip memory on every micro-batch, the rest stay on-chip (a partial fit). Embedding tables are
the first weights left off-chip: a lookup reads only the rows of the micro-batch's tokens, so they are
the cheapest to stream. Only if the overflow is larger than the weights does the persistent activation
state (the KV cache in decode, saved tensors in train) spill, then the transient scratch.

Traffic per micro-batch (``passes`` = 2 in train, forward and backward, else 1):

* weights: every weight is read once per pass, except embedding tables, of which a lookup reads only
  the rows of the micro-batch's tokens;
* decode: the micro-batch's own KV cache is read once per token (persistent bytes / micro-batches
  profiled); train: saved activations are written and read (``2 P``); prefill: written once;
* transient scratch: each unit's written once and read once per pass (a lower bound).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cachefit.units import Footprint, Mode, Unit, Workload


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def is_embedding(unit: Unit) -> bool:
    """The unit is an embedding table (its lookups read only the rows of their tokens)."""
    return unit.shape is not None and unit.shape.part == "embedding"


def embedding_read_bytes(unit: Unit, tokens: int) -> int:
    """Bytes of an embedding unit's tables one micro-batch of ``tokens`` reads: the rows of its tokens."""
    vocab = unit.shape.vocab_size if unit.shape is not None else 0
    weight = unit.footprint.weight_bytes
    if not vocab or tokens >= vocab:
        return weight
    return _ceil_div(weight * tokens, vocab)


@dataclass(frozen=True, slots=True, kw_only=True)
class StageBytes:
    """What the off-chip split needs to know of a stage: its stacked bytes and its units' traffic."""

    weight_bytes: int
    persistent_activation_bytes: int
    other_bytes: int
    """Transient activations and buffers of the stacked footprint (the stage's scratch peak)."""
    table_bytes: int
    """Embedding-table weights among ``weight_bytes``."""
    table_read_bytes: int
    """Of those, the bytes one micro-batch's lookups read."""
    transient_traffic_bytes: int
    """Sum of the units' transient activations (each written once and read once per pass)."""

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.persistent_activation_bytes + self.other_bytes

    @classmethod
    def of(cls, footprint: Footprint, units: Sequence[Unit], tokens: int) -> StageBytes:
        """The stage of ``units`` (as the card runs them) whose stacked footprint is ``footprint``."""
        tables = sum(u.footprint.weight_bytes for u in units if is_embedding(u))
        read = sum(embedding_read_bytes(u, tokens) for u in units if is_embedding(u))
        weights = footprint.weight_bytes
        return cls(
            weight_bytes=weights,
            persistent_activation_bytes=footprint.persistent_activation_bytes,
            other_bytes=footprint.total_bytes - weights - footprint.persistent_activation_bytes,
            table_bytes=min(weights, tables),
            table_read_bytes=min(weights, tables, read),
            transient_traffic_bytes=sum(u.footprint.transient_activation_bytes for u in units),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class OffchipSplit:
    """A stage on a card of some capacity: what overflows, and the bytes it moves per micro-batch."""

    overflow_bytes: int
    """Bytes beyond the card's capacity (0: the stage fits)."""
    streamed_weight_bytes: int
    """Weights left off-chip, read from off-chip memory on every micro-batch."""
    spilled_persistent_bytes: int
    spilled_transient_bytes: int
    onchip_bytes_per_micro_batch: int
    offchip_bytes_per_micro_batch: int
    """Off-chip reads and writes of one micro-batch (not counting a reload of the resident weights)."""


def offchip_split(stage: StageBytes, capacity_bytes: int, workload: Workload) -> OffchipSplit:
    """Split ``stage`` on a card offering ``capacity_bytes`` (see the module docstring)."""
    train = workload.mode is Mode.TRAIN
    passes = 2 if train else 1
    w, p = stage.weight_bytes, stage.persistent_activation_bytes
    overflow = max(0, stage.total_bytes - capacity_bytes)
    streamed = min(w, overflow)
    tables, table_read = stage.table_bytes, stage.table_read_bytes
    streamed_tables = min(tables, streamed)
    streamed_matrices = streamed - streamed_tables
    tables_off_read = _ceil_div(table_read * streamed_tables, tables) if tables else 0
    weights_off_read = tables_off_read + streamed_matrices
    weights_on_read = (table_read - tables_off_read) + (w - tables - streamed_matrices)
    rest = overflow - streamed
    spilled_persistent = min(p, rest)
    spilled_transient = rest - spilled_persistent
    if workload.mode is Mode.DECODE:
        # the micro-batch reads its own KV cache (the footprint holds every micro-batch's cache)
        persistent_traffic = p // workload.micro_batches
        persistent_off = spilled_persistent // workload.micro_batches
    elif train:
        persistent_traffic = 2 * p  # saved in forward, read in backward
        persistent_off = 2 * spilled_persistent
    else:
        persistent_traffic = p  # written once (prefill keeps nothing: 0)
        persistent_off = spilled_persistent
    transient_traffic = 2 * passes * stage.transient_traffic_bytes
    transient_off = min(transient_traffic, 2 * passes * spilled_transient)
    return OffchipSplit(
        overflow_bytes=overflow,
        streamed_weight_bytes=streamed,
        spilled_persistent_bytes=spilled_persistent,
        spilled_transient_bytes=spilled_transient,
        onchip_bytes_per_micro_batch=(passes * weights_on_read + (persistent_traffic - persistent_off)
                                      + (transient_traffic - transient_off)),
        offchip_bytes_per_micro_batch=passes * weights_off_read + persistent_off + transient_off,
    )


__all__ = ["OffchipSplit", "StageBytes", "embedding_read_bytes", "is_embedding", "offchip_split"]
