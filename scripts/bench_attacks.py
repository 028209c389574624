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
from bench_sd_digits import METHOD_FLAGS, TESTBED_FLAGS  # noqa: E402

from erase.bench import build_parser, run_bench  # noqa: E402

# UnlearnDiffAtk on 16 px digits on a CPU: the reference's 40 iterations per block, 10 blocks
# (the reference allows 50), 5 seeds per held-out caption (10 prompts per row).
ATTACK_FLAGS = "--blocks 10 --per-prompt 5"


def sd_digits_part(concept: str, output: str, extra: list[str]) -> dict:
    """The bench table with the robustness columns."""
    methods = list(METHOD_FLAGS)
    bench_args = build_parser().parse_args(
        ["--model", "sd-digits", "--concept", concept, "--methods", ",".join(methods)]
        + ["--output", output, *TESTBED_FLAGS]
        + [f"--method-flags={m}={METHOD_FLAGS[m]}" for m in methods]
        + ["--attacks", "unlearndiffatk,relearn", f"--attack-flags={ATTACK_FLAGS}", "--retrain"]
        + extra
    )
    start = time.perf_counter()
    table = run_bench(bench_args)
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
        "method_flags": METHOD_FLAGS,
        "wall_s": round(time.perf_counter() - start, 1),
    }


def ddpm_digits_part(concept: str, output: str) -> dict:
    """SalUn on ddpm-digits, then relearning on the digit's images, erased vs retrained."""
    from erase.cli import build_parser as erase_parser
    from erase.erasure import run_erasure
    from eval.attacks.harness import AttackSettings, run_attacks
    from eval.attacks.relearn import Config

    start = time.perf_counter()
    erased = os.path.join(output, "ddpm-digits-salun")
    args = erase_parser().parse_args(
        ["--model", "ddpm-digits", "--concept", concept, "--output", erased, "--no-eval"]
    )
    run_erasure(args)
    erase_s = time.perf_counter() - start
    settings = AttackSettings(
        model="ddpm-digits",
        concept=concept,
        attacks=["relearn"],
        unet=erased,
        per_prompt=100,
        retrain=True,
        configs={"relearn": Config(data="forget")},
    )
    results = run_attacks(settings, os.path.join(output, "ddpm-digits-relearn"), progress=False)
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
