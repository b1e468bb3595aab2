"""The validation table: cachefit's predictions beside published deployments, as Markdown.

``bench/validate.py`` writes it into ``docs/validation.md`` between :data:`SECTION_START` and
:data:`SECTION_END`; ``tests/cost/test_validation.py`` regenerates it and compares.
"""

from __future__ import annotations

from collections.abc import Sequence

from cachefit.cost.validation import Prediction

SECTION_START = "<!-- validation:start (bench/validate.py writes this section) -->"
SECTION_END = "<!-- validation:end -->"


def _md(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _rate(value: float | None) -> str:
    return "unknown" if value is None else f"{value:,.1f}"


def _predicted(p: Prediction) -> str:
    if p.tokens_per_s is not None:
        return _rate(p.tokens_per_s)
    text = f"unknown (needs {', '.join(p.missing)})"
    if p.bracketed is not None and p.deployment.bracket is not None:
        lo, hi = p.deployment.bracket
        text += (f"; {_rate(p.bracketed[0])} to {_rate(p.bracketed[1])} for it from "
                 f"{lo * 1e6:g} to {hi * 1e6:g} us")
    return text


def _ratio(p: Prediction) -> str:
    if p.ratio is not None:
        return f"{p.ratio:.2f}x"
    if p.bracketed is not None:
        pub = p.deployment.published_tokens_per_s
        return f"{p.bracketed[0] / pub:.2f}x to {p.bracketed[1] / pub:.2f}x"
    return "-"


def format_validation_markdown(predictions: Sequence[Prediction]) -> str:
    """The marked section: one row per published deployment, then the notes, numbered."""
    out = [
        SECTION_START,
        "",
        "| # | family | device | model | precision | context | batch | cards published | cards to fit on-chip "
        "| cards priced | published tok/s/user | predicted tok/s/user | predicted / published | in band | role "
        "| source (date) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes: list[str] = []
    for i, p in enumerate(predictions, start=1):
        d = p.deployment
        role = d.role if d.role == "validation" else f"calibration (fixes `{d.calibrates}`)"
        band = ("yes" if p.within_band else "**no**") + f" ({d.band:g}x)"
        out.append(
            f"| {i} | {_md(d.family)} | `{d.device}` | {_md(d.model_label)} | {_md(d.precision)} | {d.seq:,} "
            f"| {d.batch} | {d.cards if d.cards is not None else 'not published'} "
            f"| {p.cards_to_fit if p.cards_to_fit is not None else 'none'} | {p.cards} "
            f"| {d.published_tokens_per_s:,.1f} | {_md(_predicted(p))} | {_ratio(p)} | {band} | {role} "
            f"| {_md(d.source)} ({_md(d.date)}) |"
        )
        parts = [d.note] if d.note else []
        parts.append(f"Bound by {p.bound}" + ("" if p.fits_on_chip else "; weights streamed from off-chip memory"))
        if d.config_source:
            parts.append(f"Config from {d.config_source}")
        notes.append(f"{i}. **{_md(d.model_label)} on `{d.device}`**: " + ". ".join(x.rstrip(".") for x in parts) + ".")
    out += ["", "Notes:", "", *notes, "", SECTION_END]
    return "\n".join(out) + "\n"


__all__ = ["SECTION_END", "SECTION_START", "format_validation_markdown"]
