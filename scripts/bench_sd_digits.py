"""The full default benchmark on the CPU testbed: SalUn vs ESD-u vs ESD-x vs Forget-Me-Not on sd-digits.

    python scripts/bench_sd_digits.py                         # concept: three
    python scripts/bench_sd_digits.py --concept 7 -- --bench-per-prompt 5
    python scripts/bench_sd_digits.py --methods salun --optimizer adam8bit

Trains (or loads the cached) sd-digits model and digit classifier, erases the digit with every
method through `erase.benchmark` (what `erase-bench` runs), and prints JSON: per method, the forgotten digit's classifier
accuracy on held-out captions, the other digits' accuracy (and its drop from the base, in
points), time and peak memory. Flags after `--` go to erase-bench (they override the ones below).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import erase

# Data and evaluation sized for 16 px digits on a CPU: 64 generated images per side, 10 seeds per
# held-out caption (20 captions: 200 images per scored model).
TESTBED_SETTINGS = {
    "num_forget": 64,
    "num_retain": 64,
    "gen_steps": 25,
    "guidance_scale": 3.0,
    "bench_per_prompt": 10,
    "bench_steps": 25,
    "bench_guidance": 3.0,
}
# Per-method settings for this testbed. The papers' defaults (SD v1.4: lr 1e-5 / 2e-6, ESD's 1000
# batch-1 iterations) barely move a from-scratch model trained at lr 1e-3, or take too long on a CPU.
METHOD_SETTINGS = {
    "salun": {"lr": 1e-4, "steps": 100, "batch_size": 16},
    "esd-u": {"lr": 1e-4, "steps": 100, "batch_size": 1},
    "esd-x": {"lr": 1e-3, "steps": 100, "batch_size": 1},
    "fmn": {"lr": 1e-5, "steps": 50, "batch_size": 8},
    # the reference's warm-up share (200 of 1000), lr as ESD-x's here (1e-4 cost 11 points of
    # the other digits, docs/methods.md); 10 attack steps, not 30: each is a partial DDIM
    # sampling, 30 would be ~25 s an iteration on one core
    "advunlearn": {
        "lr": 1e-3,
        "steps": 100,
        "batch_size": 1,
        "advunlearn_warmup": 20,
        "advunlearn_attack_steps": 10,
    },
}


def bench_settings(flags: list[str]) -> dict:
    """erase-bench flags (those after --) as erase.benchmark's settings: the ones given."""
    from erase.cli.bench import flags_parser

    parser = flags_parser()
    given, defaults = vars(parser.parse_args(flags)), vars(parser.parse_args([]))
    return {name: value for name, value in given.items() if value != defaults[name]}


def method_settings(method: str, optimizer: str) -> dict:
    """One method's settings on this testbed, with the optimizer asked for."""
    return {**METHOD_SETTINGS.get(method, {}), "optimizer": optimizer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concept", default="three")
    parser.add_argument("--methods", default="salun,esd-u,esd-x,fmn")
    parser.add_argument("--output", default=None, help="bench folder (default: a new temp folder)")
    parser.add_argument(
        "--optimizer", default="adam", choices=["adam", "adam8bit"], help="every method's"
    )
    parser.add_argument("extra", nargs="*", help="erase-bench flags (after --)")
    args = parser.parse_args()
    output = args.output or tempfile.mkdtemp(prefix="bench-sd-digits-") + "/bench"
    methods = [m for m in args.methods.split(",") if m]
    start = time.perf_counter()
    table = erase.benchmark(
        "sd-digits",
        args.concept,
        output,
        methods,
        method_settings={m: method_settings(m, args.optimizer) for m in methods},
        **{**TESTBED_SETTINGS, **bench_settings(args.extra)},
    )
    base = table["rows"][0]
    summary = {"concept": table["concept"]["name"], "output": output, "methods": {}}
    for row in table["rows"]:
        if "error" in row:
            summary["methods"][row["method"]] = {"error": row["error"]}
            continue
        seconds = sum(row.get(k) or 0 for k in ("data_s", "mask_s", "train_s", "eval_s"))
        summary["methods"][row["method"]] = {
            "forgotten_digit_accuracy": row["forget_accuracy"],
            "other_digits_accuracy": row["retain_accuracy"],
            "other_digits_drop_points": round(
                100 * (base["retain_accuracy"] - row["retain_accuracy"]), 1
            ),
            "retain_fid": row.get("retain_fid"),
            "changed_weights": row.get("changed_weights", 0),
            "seconds": round(seconds, 1),
            "peak_memory_mb": row["peak_memory_mb"],
        }
    summary["wall_s"] = round(time.perf_counter() - start, 1)
    summary["method_settings"] = {m: method_settings(m, args.optimizer) for m in methods}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
