"""Does the concept stay gone? Attacks on the CPU testbeds, beside the Retrain yardstick.

    python scripts/bench_attacks.py                      # both parts below, concept three
    python scripts/bench_attacks.py --part sd-digits -- --attack-flags='--blocks 5'

Part sd-digits: erase-bench on sd-digits (the testbed settings of scripts/bench_sd_digits.py)
with --attacks unlearndiffatk,relearn --retrain: per row (base, retrain, salun, esd-u, esd-x,
fmn) the forgotten digit's accuracy on held-out captions, the other digits' accuracy, the
UnlearnDiffAtk ASR and the relearning steps to recover.
Part ddpm-digits: SalUn erases the digit from ddpm-digits, then the relearning curve (0, 10, 25,
50, 100 steps of fine-tuning on the digit's real images) of the erased and the retrained model.
Prints JSON; flags after `--` go to erase-bench.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_sd_digits import METHOD_SETTINGS, TESTBED_SETTINGS, bench_settings  # noqa: E402

import erase  # noqa: E402

# UnlearnDiffAtk on 16 px digits on a CPU: the reference's 40 iterations per block, 10 blocks
# (the reference allows 50), 5 seeds per held-out caption (10 prompts per row).
ATTACK_FLAGS = "--blocks 10 --per-prompt 5"


def sd_digits_part(concept: str, output: str, extra: list[str]) -> dict:
    """The bench table with the robustness columns."""
    robustness = {
        "attacks": "unlearndiffatk,relearn",
        "attack_flags": ATTACK_FLAGS,
        "retrain": True,
    }
    start = time.perf_counter()
    table = erase.benchmark(
        "sd-digits",
        concept,
        output,
        list(METHOD_SETTINGS),
        method_settings=METHOD_SETTINGS,
        **{**TESTBED_SETTINGS, **robustness, **bench_settings(extra)},
    )
    keys = (
        "forget_accuracy",
        "retain_accuracy",
        "pre_attack_asr",
        "asr",
        "steps_to_recover",
        "relearn_curve",
        "error",
    )
    rows = {row["method"]: {k: row[k] for k in keys if k in row} for row in table["rows"]}
    return {
        "output": output,
        "rows": rows,
        "attack_flags": ATTACK_FLAGS,
        "method_settings": METHOD_SETTINGS,
        "wall_s": round(time.perf_counter() - start, 1),
    }


def ddpm_digits_part(concept: str, output: str) -> dict:
    """SalUn on ddpm-digits, then relearning on the digit's images, erased vs retrained."""
    start = time.perf_counter()
    erased = os.path.join(output, "ddpm-digits-salun")
    erase.erase_concept("ddpm-digits", concept, output=erased, no_eval=True)
    erase_s = time.perf_counter() - start
    results = erase.attack(
        "ddpm-digits",
        concept,
        "relearn",
        unet=erased,
        output=os.path.join(output, "ddpm-digits-relearn"),
        per_prompt=100,
        retrain=True,
        relearn_data="forget",
        no_progress=True,
    )
    relearn, retrain = results["attacks"]["relearn"], results["retrain"]["relearn"]
    return {
        "salun": {"curve": relearn["curve"], "steps_to_recover": relearn["steps_to_recover"]},
        "retrain": {"curve": retrain["curve"], "steps_to_recover": retrain["steps_to_recover"]},
        "base_positive_rate": relearn["base_positive_rate"],
        "judged_images_per_checkpoint": relearn["prompts"],
        "relearn_settings": relearn["settings"],
        "erase_s": round(erase_s, 1),
        "wall_s": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concept", default="three")
    parser.add_argument("--part", choices=["all", "sd-digits", "ddpm-digits"], default="all")
    parser.add_argument("--output", default=None, help="folder (default: a new temp folder)")
    parser.add_argument("extra", nargs="*", help="erase-bench flags (after --)")
    args = parser.parse_args()
    output = args.output or tempfile.mkdtemp(prefix="bench-attacks-")
    summary = {"concept": args.concept}
    if args.part in ("all", "sd-digits"):
        summary["sd-digits"] = sd_digits_part(
            args.concept, os.path.join(output, "bench"), args.extra
        )
    if args.part in ("all", "ddpm-digits"):
        summary["ddpm-digits"] = ddpm_digits_part(args.concept, output)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
