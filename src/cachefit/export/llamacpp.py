"""A plan as llama.cpp flags: ``--split-mode layer --n-gpu-layers N --tensor-split a,b,c``.

How llama.cpp places layers (``src/llama-model.cpp``, ``load_tensors``): it has ``n_layer + 1``
positions, the repeating layers ``0 .. n_layer - 1`` and the output layer (final norm and LM head,
position ``n_layer``). With ``--n-gpu-layers`` at least ``n_layer + 1`` every position is offloaded,
and position ``il`` goes to the first device ``d`` with ``splits[d] > il / (n_layer + 1)``, where
``splits`` is the cumulative ``--tensor-split`` normalized to 1 (``std::upper_bound``). So the split
is by *positions*, not by bytes: giving each device its number of positions as the proportion
reproduces the plan's contiguous layers exactly (the cumulative sums are whole numbers, so the
float comparison is exact at the boundaries). The token embedding is llama.cpp's input layer, which
it always keeps in host memory.

The JSON form also gives each card's share of the plan's weight bytes (``weight_fractions``): what
a split by bytes would be, shown for comparison, not what the flag should say.
"""

from __future__ import annotations

from typing import Any

from cachefit.errors import ConfigError
from cachefit.export.modules import Export, compression_warning, listing, pipeline_parts, split_parts_text
from cachefit.plan import Plan
from cachefit.units import ModelProfile


def _layer_cards(plan: Plan, profile: ModelProfile) -> tuple[list[int], int, list[int]]:
    """The card of each transformer layer and of the output position (tensor-parallel: first card), and
    the layers the plan cuts between cards."""
    unit_card: dict[int, int] = {}
    for part in pipeline_parts(plan):
        for u in range(*part.units):
            unit_card[u] = part.cards[0]
    layers: dict[int, dict[int, int]] = {}  # layer -> card -> weight bytes of its units there
    for i, unit in enumerate(profile.units):
        if unit.layer is not None:
            per_card = layers.setdefault(unit.layer, {})
            per_card[unit_card[i]] = per_card.get(unit_card[i], 0) + unit.footprint.weight_bytes
    n_layer = len(layers)
    if not n_layer or sorted(layers) != list(range(n_layer)):
        raise ConfigError(
            f"profile of {profile.model}: llama.cpp places numbered transformer layers, and the units name "
            f"layers {sorted(layers)}; export a plan made from a config.json, a model directory or a preset"
        )
    # a layer cut by the plan (block granularity) goes where most of its weights are (the first such card on a tie)
    cards = [max(layers[il], key=lambda c: (layers[il][c], -c)) for il in range(n_layer)]
    heads = [i for i, u in enumerate(profile.units) if u.layer is None and i > 0]
    output = unit_card[heads[-1]] if heads else cards[-1]
    cut = [il for il in range(n_layer) if len(layers[il]) > 1]
    return cards, output, cut


def to_llamacpp(plan: Plan, profile: ModelProfile) -> Export:
    """The plan as llama.cpp's layer-split flags (``text``) and their numbers (``document``).

    Args:
        plan: the plan.
        profile: the profile the plan was made from (see :func:`cachefit.export.modules.profile_for_plan`).
    """
    layer_cards, output_card, cut = _layer_cards(plan, profile)
    n_layer = len(layer_cards)
    num_cards = 1 + max(s.card for s in plan.stages)
    positions = [0] * num_cards
    layers = [0] * num_cards
    for card in layer_cards:
        positions[card] += 1
        layers[card] += 1
    positions[output_card] += 1
    weight = [0] * num_cards
    for stage in plan.stages:
        weight[stage.card] += stage.footprint.weight_bytes
    total_weight = sum(weight)
    n_gpu_layers = n_layer + 1
    flags = ["--split-mode", "layer", "--n-gpu-layers", str(n_gpu_layers),
             "--tensor-split", ",".join(map(str, positions))]

    warnings: list[str] = []
    pparts = pipeline_parts(plan)
    split = split_parts_text(pparts)
    if split:
        warnings.append(
            f"{split}; llama.cpp's row split (--split-mode row) applies to the whole model, so in layer mode each "
            "split stage goes whole on its first card and the group's other cards get no layers (0 in --tensor-split)"
        )
    if cut:
        warnings.append(
            f"the plan cuts layer(s) {listing([str(c) for c in cut], 8)} between cards (block granularity); "
            "llama.cpp places whole layers, so each goes to the card that holds most of its weights"
        )
    embed = profile.units[0]
    if embed.layer is None:  # the embedding unit, on the first stage's card
        warnings.append(
            f"llama.cpp keeps the input layer ({embed.name}, {embed.footprint.weight_bytes:,} B) in host memory; "
            f"card {pparts[0].cards[0]} holds that much less than planned"
        )
    note = compression_warning(plan, "llama.cpp", "pick the matching GGUF quantization type when converting")
    if note:
        warnings.append(note)

    first_layers: list[str] = []
    il = 0
    for card in range(num_cards):
        if positions[card] == 0:
            continue
        span = f"layers {il}-{il + layers[card] - 1}" if layers[card] > 1 else (
            f"layer {il}" if layers[card] == 1 else "no layers")
        il += layers[card]
        extra = " + output" if card == output_card else ""
        first_layers.append(f"card {card}: {span}{extra}")
    idle = num_cards - sum(1 for p in positions if p)
    if idle:
        first_layers.append(f"{idle} other card(s): nothing (0 in --tensor-split)")
    text = " ".join(flags) + "\n" + "".join(
        f"# {line}\n" for line in (
            f"{n_layer} layers + the output layer = {n_gpu_layers} positions over {num_cards} GPU(s), in device "
            "order (CUDA_VISIBLE_DEVICES or --device picks them)",
            *first_layers,
        )
    )
    document: dict[str, Any] = {
        "flags": flags,
        "split_mode": "layer",
        "n_gpu_layers": n_gpu_layers,
        "tensor_split": positions,
        "ratios": [p / sum(positions) for p in positions],
        "layers_per_device": layers,
        "output_device": output_card,
        "weight_bytes_per_device": weight,
        "weight_fractions": [w / total_weight if total_weight else 0.0 for w in weight],
    }
    return Export(format="llamacpp", model=plan.model, document=document, text=text, warnings=tuple(warnings))


__all__ = ["to_llamacpp"]
