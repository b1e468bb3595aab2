"""The plan and the search that makes it.

:mod:`.model` holds :class:`Plan` and :class:`Stage` (the planner's decision as a plain, versioned
value that ``cost``, ``report`` and ``deploy`` read) with its JSON reader and provenance checks;
:mod:`.search` chooses compression and a partition of the units over the cards
(:func:`plan_partition`), using the algorithms of :mod:`cachefit.partition`; :mod:`.build` turns
units placed on cards into stages and plans, for the search and the cost model's baselines alike.
"""

from cachefit.plan.build import plan_from_stages, stage_for, with_stage_times
from cachefit.plan.model import (
    PLAN_SCHEMA,
    Plan,
    Stage,
    check_provenance,
    cluster_digest,
    load_plan,
)
from cachefit.plan.search import (
    STACKING,
    Candidate,
    pareto_front,
    plan_partition,
    technique_sets,
)

__all__ = [
    "PLAN_SCHEMA",
    "STACKING",
    "Candidate",
    "Plan",
    "Stage",
    "check_provenance",
    "cluster_digest",
    "load_plan",
    "pareto_front",
    "plan_from_stages",
    "plan_partition",
    "stage_for",
    "technique_sets",
    "with_stage_times",
]
