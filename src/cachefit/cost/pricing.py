"""The cost model pricing the planner's partial fits: what a stage takes, and which plan is best.

When a model does not fit the cards asked for, many layouts stream almost the same bytes from
off-chip memory (every card full, the rest streamed) while their predicted speed differs a lot (how
much one stage streams, how many collectives a split adds). The planner
(:func:`cachefit.plan.search.plan_partition`) finds the layout with the fewest off-chip bytes and
variants trading a few bytes for time; :class:`LayoutPricing` gives it each stage's predicted time
and chooses among the finished plans, with the cache-oblivious layouts of the same cards beside
them (:mod:`cachefit.cost.baselines`):

1. the layouts at least as good as every alternative on both off-chip bytes per token and tokens/s;
2. among them (or among all, when none is), the fewest off-chip bytes per token, then the most
   tokens/s.

An alternative that uses exactly the cards asked for is itself a candidate, so cachefit's plan never
moves more bytes off-chip than one of those, and is as fast as every alternative wherever one of the
layouts found is.
"""

from __future__ import annotations

from collections.abc import Sequence

from cachefit.compress.techniques import CompressionConfig
from cachefit.cost.pipeline import PlanCost, collective_latency_steps, estimate_cost
from cachefit.cost.roofline import LINK_LATENCY_S, estimate_stage, hop_latency_for, one_way_link_bytes_per_s
from cachefit.hardware.devices import Card, Cluster
from cachefit.partition.split import max_shards, shard_unit
from cachefit.plan.build import plan_from_stages
from cachefit.plan.model import Plan
from cachefit.sizes import format_bytes
from cachefit.units import Footprint, ModelProfile, Unit, dtype_bytes


class LayoutPricing:
    """Prices layouts of ``profile`` on ``cluster`` with :func:`cachefit.cost.estimate_cost` (same options).

    Args:
        alternatives: plans of the same model on the same cards to compare with (and adopt, where one
            uses exactly the cards asked for and is best), e.g. the baselines of
            :func:`cachefit.cost.baselines.baseline_plans`, each under its name.
    """

    def __init__(self, profile: ModelProfile, cluster: Cluster, *, config: CompressionConfig | None = None,
                 micro_batches: int | None = None, schedule: str = "1f1b", steps_per_load: int | None = None,
                 link_latency_s: float | None = LINK_LATENCY_S, alternatives: Sequence[tuple[str, Plan]] = ()) -> None:
        self.profile, self.cluster = profile, cluster
        self.config = config or CompressionConfig()
        self.micro_batches = profile.workload.micro_batches if micro_batches is None else micro_batches
        self.schedule, self.steps_per_load, self.link_latency_s = schedule, steps_per_load, link_latency_s
        self.alternatives = tuple(alternatives)
        self._steps: dict[tuple[int, int], int] = {}
        self._costs: dict[int, PlanCost] = {}

    def price(self, plan: Plan) -> PlanCost:
        """The plan's predicted cost (computed once per plan)."""
        key = id(plan)
        if key not in self._costs:
            self._costs[key] = estimate_cost(plan, self.profile, self.cluster, micro_batches=self.micro_batches,
                                             schedule=self.schedule, steps_per_load=self.steps_per_load,
                                             config=self.config, link_latency_s=self.link_latency_s)
        return self._costs[key]

    def _latency_steps(self, index: int, shards: int) -> int:
        key = (index, shards)
        if key not in self._steps:
            unit = self.profile.units[index]
            degree = min(shards, max_shards(unit))
            names = shard_unit(unit, degree, self.profile.workload).collectives if degree > 1 else ()
            self._steps[key] = collective_latency_steps(names, degree)
        return self._steps[key]

    def card_time_s(self, start: int, units: Sequence[Unit], footprint: Footprint, shards: int,
                    collective_bytes_per_token: int, card: Card) -> float | None:
        """One micro-batch through one card's stage (:func:`cachefit.cost.estimate_stage`: compute,
        on-chip and off-chip traffic, kernels, collectives), with the arguments
        :func:`cachefit.cost.estimate_cost` gives it, so that a stage placed in a plan is priced the same
        (``stage_times_s``); None where a figure is unknown."""
        wl = self.profile.workload
        tokens = wl.tokens
        if any("batch" in u.compression for u in units):  # as estimate_cost: a reduced batch per micro-batch
            tokens = min(wl.batch, self.config.target_batch) * wl.query_len
        steps = sum(self._latency_steps(i, shards) for i in range(start, start + len(units)))
        cost = estimate_stage(
            card=0, pipeline_stage=0, device=card.device, level=card.level_name,
            units=(start, start + len(units)), shard=(0, shards) if shards > 1 else None,
            weight_bytes=footprint.weight_bytes, activation_bytes=footprint.activation_bytes,
            persistent_activation_bytes=footprint.persistent_activation_bytes, buffer_bytes=footprint.buffer_bytes,
            capacity_bytes=card.capacity_bytes, stage_units=tuple(units), workload=wl,
            tokens_per_micro_batch=tokens, collective_bytes_per_token=collective_bytes_per_token,
            collective_latency_steps=steps, steps_per_load=self.steps_per_load,
            micro_batches=self.micro_batches, link_latency_s=self.link_latency_s,
        )
        return cost.time_s

    def stage_time_s(self, start: int, units: Sequence[Unit], footprint: Footprint, shards: int,
                     collective_bytes_per_token: int, card: Card) -> float | None:
        """One micro-batch through the stage (:meth:`card_time_s`), plus sending its output on to the
        next stage; None where a figure is unknown."""
        took = self.card_time_s(start, units, footprint, shards, collective_bytes_per_token, card)
        if took is None:
            return None
        wl = self.profile.workload
        link = one_way_link_bytes_per_s(card.device)
        hop = hop_latency_for(card.device, self.link_latency_s)
        last = units[-1].shape
        if link is None or hop is None or last is None:
            return took
        return took + wl.tokens * last.hidden_size * dtype_bytes(wl.act_dtype, 1) / link + hop

    def stage_times_s(self, plan: Plan) -> tuple[float | None, ...]:
        """Each card's predicted time per micro-batch in ``plan`` (its :class:`~cachefit.cost.StageCost`
        ``time_s`` from :func:`cachefit.cost.estimate_cost`, as ``cachefit compare`` reports it), in
        plan order; None where a figure is unknown or the card cannot run its stage."""
        return tuple(c.time_s for c in self.price(plan).stages)

    def choose(self, plans: Sequence[Plan]) -> Plan:
        """The best of ``plans`` and the alternatives that use as many cards (see the module docstring);
        an adopted alternative becomes a cachefit plan (provenance recorded, a note says whose layout)."""
        if not plans:
            raise ValueError("choose: no plans to choose from")
        cards = plans[0].cards
        own = [("cachefit", p) for p in plans]
        others = [(name, p) for name, p in self.alternatives if p.cards == cards]
        pool = own + others

        def key(item: tuple[str, Plan]) -> tuple[float, float]:
            cost = self.price(item[1])
            return cost.offchip_bytes_per_token, -(cost.throughput_tokens_per_s or 0.0)

        def beats_all(item: tuple[str, Plan]) -> bool:
            off, neg_tps = key(item)
            return all(off <= key(alt)[0] and neg_tps <= key(alt)[1] for alt in self.alternatives)

        good = [item for item in pool if beats_all(item)]
        name, plan = min(good or pool, key=key)
        cost = self.price(plan)
        tps = cost.throughput_tokens_per_s
        speed = (f"{tps:,.1f} tokens/s" if tps is not None
                 else f"tokens/s unknown (needs {', '.join(cost.missing)})" if cost.missing else "tokens/s unknown")
        how = (f"chosen by the cost model among {len(pool)} layouts on {cards} card(s): "
               f"{format_bytes(cost.offchip_bytes_per_token)} off-chip per token, {speed}")
        if tps is None:
            how += "; ranked by off-chip bytes per token, the figure known for every layout"
        if self.alternatives:
            how += ("; at least as good as every baseline on both" if good
                    else "; no layout is at least as good as every baseline on both, so the fewest off-chip bytes")
        if name == "cachefit":
            return _with_notes(plan, (how,))
        adopted = plan_from_stages(self.profile, plan.stages, objective="fewest_offchip_bytes", stacking=plan.stacking,
                                   notes=(f"the {name} layout, adopted: it is the best on these cards", how),
                                   cluster=self.cluster)
        return adopted


def _with_notes(plan: Plan, notes: Sequence[str]) -> Plan:
    from dataclasses import replace

    return replace(plan, notes=(*plan.notes, *notes))


__all__ = ["LayoutPricing"]
