"""Cost model: roofline time per card, the simulated pipeline, and cache-oblivious baselines.

Pure Python (no torch). ``estimate_cost(plan, profile, cluster)`` prices a plan; ``compare_layouts``
prices cachefit's plan beside the layouts a user would otherwise pick, on the same cards;
``count_kernels(shape, workload)`` is the kernel count behind the per-kernel overhead term.
docs/cost-model.md derives every formula and lists the assumptions.
"""

from cachefit.cost.baselines import (
    LAYOUTS,
    Comparison,
    LayoutCost,
    baseline_plans,
    cachefit_plan,
    compare_layouts,
    greedy_dram_plan,
    layout_pricing,
    min_cards_to_fit,
    tensor_parallel_plan,
    uniform_layers_plan,
)
from cachefit.cost.kernels import count_kernels, list_kernels
from cachefit.cost.pipeline import (
    SCHEDULES,
    PlanCost,
    ScheduledOp,
    TransferCost,
    estimate_cost,
    measured_bubble_fraction,
    schedule_bubble_fraction,
    simulate_schedule,
)
from cachefit.cost.pricing import LayoutPricing
from cachefit.cost.roofline import LINK_LATENCY_S, StageCost, estimate_stage

__all__ = [
    "LAYOUTS",
    "LINK_LATENCY_S",
    "SCHEDULES",
    "Comparison",
    "LayoutCost",
    "LayoutPricing",
    "PlanCost",
    "ScheduledOp",
    "StageCost",
    "TransferCost",
    "baseline_plans",
    "cachefit_plan",
    "compare_layouts",
    "count_kernels",
    "estimate_cost",
    "estimate_stage",
    "greedy_dram_plan",
    "layout_pricing",
    "list_kernels",
    "measured_bubble_fraction",
    "min_cards_to_fit",
    "schedule_bubble_fraction",
    "simulate_schedule",
    "tensor_parallel_plan",
    "uniform_layers_plan",
]
