"""The seed paper's claims for its 16-layer model on a 50 MB L2, next to what cachefit recomputes.

Every "paper" figure below is a claim as the seed's method description states it; every
"recomputed" figure comes from cachefit's own profile, compression and planning code, never from a
constant typed here. A claim *holds* when the recomputed value is within 1% of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cachefit.compress.techniques import compress_unit, compression_risk, explain_compression
from cachefit.hardware.devices import get_device, make_cluster
from cachefit.plan.search import Candidate, pareto_front, plan_partition
from cachefit.plan import Plan
from cachefit.profile import profile_model
from cachefit.sizes import format_bytes
from cachefit.units import Unit, Workload

MB = 10**6
# The techniques the seed applies, in its words: "INT8 + 50% MLP sparsity + checkpointing + fusion".
SEED_CHAIN = ("sparse50", "int8", "ckpt", "fuse")
ALL_TECHNIQUES = ("int8", "int4", "sparse50", "sparse75", "sparse24", "fuse", "ckpt")


@dataclass(frozen=True, slots=True, kw_only=True)
class Claim:
    """One line of the account."""

    what: str
    paper: str
    """The figure as the seed states it."""
    recomputed: str
    """What cachefit computes, with its unit."""
    holds: bool
    why: str
    """How the recomputed figure is made and, where the claim fails, by how much and why."""

    def to_dict(self) -> dict[str, object]:
        return {"what": self.what, "paper": self.paper, "recomputed": self.recomputed, "holds": self.holds,
                "why": self.why}


@dataclass(frozen=True, slots=True, kw_only=True)
class PaperAccount:
    claims: tuple[Claim, ...]
    workload: Workload
    device: str
    capacity_bytes: int
    fewest_uncompressed: Plan
    fewest_seed_chain: Plan
    front: tuple[Candidate, ...]

    def to_dict(self) -> dict[str, object]:
        return {
            "model": "paper-16l",
            "workload": self.workload.to_dict(),
            "device": self.device,
            "capacity_bytes": self.capacity_bytes,
            "claims": [c.to_dict() for c in self.claims],
            "deployments": {
                "uncompressed": _plan_summary(self.fewest_uncompressed),
                "seed_chain": _plan_summary(self.fewest_seed_chain),
                "pareto_front": [c.to_dict() for c in self.front],
            },
        }


def _plan_summary(plan: Plan) -> dict[str, object]:
    return {
        "cards": plan.cards,
        "feasible": plan.feasible,
        "mean_utilization": round(plan.mean_utilization, 6),
        "min_utilization": round(min(s.utilization for s in plan.stages), 6),
        "split_stages": sum(1 for s in plan.stages if s.shard and s.shard[0] == 0),
        "notes": list(plan.notes),
    }


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 0.01 * abs(b)


def _mb(nbytes: float) -> str:
    return f"{nbytes / MB:,.1f} MB"


def _smallest_combo_under(layer: Unit, wl: Workload, limit: int) -> tuple[tuple[str, ...], int] | None:
    """The least risky technique set that brings the layer's weights under ``limit`` bytes."""
    from cachefit.plan.search import technique_sets

    for combo in technique_sets(ALL_TECHNIQUES):
        if not combo:
            continue
        got = compress_unit(layer, combo, wl)
        if got.footprint.weight_bytes <= limit:
            return combo, got.footprint.weight_bytes
    return None


def paper_account(workload: Workload | None = None, *, device: str = "h100") -> PaperAccount:
    """Recompute every claim of the seed for ``paper-16l`` and plan the deployments that really fit."""
    wl = workload or Workload()
    profile = profile_model("paper-16l", wl)
    layer = profile.unit("layers.0")
    roles = layer.footprint.roles
    qkv, mlp, out, norm = roles["qkv"], roles["mlp"], roles["attn_out"], roles.get("norm", 0)
    dev = get_device(device)
    cluster = make_cluster(dev)
    capacity = cluster.cards[0].capacity_bytes

    claims: list[Claim] = []
    for what, paper_mb, value, how in (
        ("attention QKV weights per layer, FP16", 100.7, qkv, "3 x 4096 x 4096 x 2 B"),
        ("MLP weights per layer, FP16", 268.4, mlp, "2 x 4096 x 16384 x 2 B (up and down)"),
        ("other weights per layer, FP16", 33.6, out + norm, "attention output 4096 x 4096 x 2 B + two norms 2 x 4096 x 2 B"),
    ):
        claims.append(Claim(what=what, paper=f"{paper_mb} MB", recomputed=_mb(value),
                            holds=_close(value, paper_mb * MB), why=f"{how} = {value:,} B"))
    parts_sum = qkv + mlp + out + norm
    claims.append(Claim(
        what="one layer, FP16 (the sum of the three parts above)",
        paper="376.7 MB",
        recomputed=_mb(parts_sum),
        holds=_close(parts_sum, 376.7 * MB),
        why=(f"100.7 + 268.4 + 33.6 = 402.7 MB: the paper's own parts add up to {_mb(parts_sum)}, "
             f"{_mb(parts_sum - 376.7 * MB)} more than its total; before any activation"),
    ))

    steps = explain_compression(layer, SEED_CHAIN, wl)
    after_int8 = next(s for s in steps if s.technique == "int8").after
    claims.append(Claim(
        what="one layer after INT8 + 50% MLP sparsity",
        paper="~144 MB",
        recomputed=f"{_mb(after_int8.weight_bytes)} weights, {_mb(after_int8.total_bytes)} with activations",
        holds=_close(after_int8.weight_bytes, 144 * MB) or _close(after_int8.total_bytes, 144 * MB),
        why=(f"attention 4 x 4096 x 4096 B + MLP 2 x 4096 x 8192 B in int8, fp16 scales per row: "
             f"{after_int8.weight_bytes:,} B; activations at {wl.mode.value} batch {wl.batch}, "
             f"{wl.seq_len} tokens: {_mb(after_int8.activation_bytes)} (KV cache included)"),
    ))
    final = steps[-1].after
    saved = {s.technique: s.saved_bytes for s in steps}
    fit = _smallest_combo_under(layer, wl, int(49.5 * MB))
    fit_text = (f"the least risky set that gets the weights under 49.5 MB is {'+'.join(fit[0])} "
                f"({_mb(fit[1])}, risk {compression_risk(fit[0]):.2f})") if fit else \
        "no combination of cachefit's techniques gets the weights under 49.5 MB"
    claims.append(Claim(
        what="one layer after INT8 + 50% MLP sparsity + checkpointing + fusion",
        paper="49.5 MB",
        recomputed=_mb(final.total_bytes),
        holds=_close(final.total_bytes, 49.5 * MB),
        why=(f"checkpointing saves {format_bytes(saved['ckpt'])} and fusion {format_bytes(saved['fuse'])} in "
             f"{wl.mode.value}: they shrink activations, not weights, which stay at {_mb(final.weight_bytes)}; "
             + fit_text),
    ))
    claims.append(Claim(
        what="a compressed layer fits one 50 MB L2",
        paper="49.5 MB <= 50 MB",
        recomputed=f"{_mb(final.total_bytes)} vs {format_bytes(capacity)} ({dev.name} {cluster.cards[0].level_name})",
        holds=final.total_bytes <= capacity,
        why=(f"the {dev.name} L2 is {capacity:,} B (50 MiB as CUDA reports it, not 50,000,000 B); the seed's "
             f"compressed layer needs {final.total_bytes / capacity:.1f}x that"),
    ))
    on_chip = min(1.0, capacity / final.total_bytes)
    claims.append(Claim(
        what="cache efficiency with one compressed layer per card",
        paper="99%",
        recomputed=f"at most {on_chip * 100:.0f}% of a layer's bytes on-chip",
        holds=on_chip >= 0.99,
        why=("a card whose partition exceeds its L2 streams the rest from HBM on every pass: at best "
             f"{format_bytes(capacity)} of {_mb(final.total_bytes)} stays resident; 99% needs a partition that fits, "
             "which below takes splitting each layer over several cards"),
    ))

    uncompressed, _ = plan_partition(profile, cluster)
    seed_plan, _ = plan_partition(profile, cluster, allow=SEED_CHAIN)
    _, candidates = plan_partition(profile, cluster, allow=ALL_TECHNIQUES)
    return PaperAccount(
        claims=tuple(claims),
        workload=wl,
        device=dev.name,
        capacity_bytes=capacity,
        fewest_uncompressed=uncompressed,
        fewest_seed_chain=seed_plan,
        front=pareto_front(candidates),
    )


__all__: Sequence[str] = ("Claim", "PaperAccount", "paper_account")
