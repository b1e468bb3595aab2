"""cachefit's predictions beside published deployments: the table of docs/validation.md.

Reads the published deployments (bench/published_deployments.toml: tokens/s per user at batch 1 on
Cerebras, Groq, NVIDIA and Tenstorrent hardware, each with its source and date), prices each with the
catalog's figures (cachefit.cost.validation.predict), and prints or writes the table. Runs in seconds,
no accelerator needed.

    python bench/validate.py                                 # print the table
    python bench/validate.py --markdown docs/validation.md   # rewrite its marked section
    python bench/validate.py --calibrate                     # solve each calibration row for its figure

``--calibrate`` prints, for each calibration row, the value of the device figure it fixes at which the
prediction equals the published rate: the value the catalog should hold (catalog.toml, marked
``calibrated = true``). tests/cost/test_validation.py checks the catalog agrees and that every
prediction stays within its band.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parent / "published_deployments.toml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="published deployments (TOML)")
    parser.add_argument("--markdown", type=Path, help="write the table into this file's marked section")
    parser.add_argument("--calibrate", action="store_true", help="solve the calibration rows for their figures")
    parser.add_argument("--json", action="store_true", help="print the predictions as JSON")
    args = parser.parse_args(argv)

    from cachefit.cost.validation import calibrate, load_deployments, predict_all
    from cachefit.report.markdown import replace_section
    from cachefit.report.validation import SECTION_END, SECTION_START, format_validation_markdown

    deployments = load_deployments(args.data)
    if args.calibrate:
        for dep in deployments:
            if dep.role == "calibration":
                value = calibrate(dep)
                print(f"{dep.device} {dep.calibrates} = {value * 1e6:.3f} us  (fits {dep.id}: "
                      f"{dep.published_tokens_per_s:g} tokens/s per user)")
        return 0
    predictions = predict_all(deployments)
    if args.json:
        print(json.dumps([{"id": p.deployment.id, "published": p.deployment.published_tokens_per_s,
                           "predicted": p.tokens_per_s, "ratio": p.ratio, "cards": p.cards,
                           "cards_to_fit": p.cards_to_fit, "missing": list(p.missing),
                           "bracketed": p.bracketed, "within_band": p.within_band} for p in predictions], indent=2))
    else:
        text = format_validation_markdown(predictions)
        if args.markdown:
            replace_section(args.markdown, text, start=SECTION_START, end=SECTION_END)
            print(f"wrote {len(predictions)} deployments to {args.markdown}")
        else:
            print(text)
    return 0 if all(p.within_band for p in predictions) else 1


if __name__ == "__main__":
    sys.exit(main())
