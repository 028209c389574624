"""The full default benchmark on the CPU testbed: SalUn vs ESD-u vs ESD-x vs Forget-Me-Not on sd-digits.

    python scripts/bench_sd_digits.py                       # concept: three, default settings
    python scripts/bench_sd_digits.py --concept 7 -- --steps 50

Trains (or loads the cached) sd-digits model and digit classifier, erases the digit with every
method through `erase-bench`, and prints JSON: per method, the forgotten digit's classifier
accuracy on held-out captions, the other digits' accuracy, time and peak memory.
Extra arguments after `--` go to erase-bench unchanged (they override the defaults below).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from erase.bench import build_parser, run_bench

# Testbed settings: the forget/retain sets are small because the digits are small.
DEFAULTS = [
    "--num-forget",
    "64",
    "--num-retain",
    "64",
    "--gen-steps",
    "25",
    "--guidance-scale",
    "3",
    "--bench-per-prompt",
    "25",
    "--bench-steps",
    "25",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concept", default="three")
    parser.add_argument("--methods", default="salun,esd-u,esd-x,fmn")
    parser.add_argument("--output", default=None)
    parser.add_argument("extra", nargs="*", help="erase-bench flags (after --)")
    args = parser.parse_args()
    output = args.output or tempfile.mkdtemp(prefix="bench-sd-digits-") + "/bench"
    bench_args = build_parser().parse_args(
        [
            "--model",
            "sd-digits",
            "--concept",
            args.concept,
            "--methods",
            args.methods,
            "--output",
            output,
            *DEFAULTS,
            *args.extra,
        ]
    )
    start = time.perf_counter()
    table = run_bench(bench_args)
    base = table["rows"][0]
    summary = {
        "concept": args.concept,
        "output": output,
        "rows": table["rows"],
        "wall_s": round(time.perf_counter() - start, 1),
    }
    for row in table["rows"][1:]:
        if "forget_accuracy" in row:
            row["retain_accuracy_drop_points"] = round(
                100 * (base["retain_accuracy"] - row["retain_accuracy"]), 1
            )
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
