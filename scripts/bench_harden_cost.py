"""Seconds per erasure step of SalUn plain, `--harden meta` and `--harden perturb` on the tiny
random SD pipeline of erase/testing.py (cost only: a tiny model says nothing about resistance).

    python scripts/bench_harden_cost.py

Prints one JSON object: per run, the median step time (first step left out), the steps taken,
the train phase's seconds and the last loss terms.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ERASE_HOME", tempfile.mkdtemp(prefix="erase-home-"))


def main() -> int:
    """Run the three erasures and print their costs."""
    import torch

    from erase.cli.concept import erase_concept_main
    from erase.testing import save_tiny_sd

    torch.set_num_threads(1)
    folder = tempfile.mkdtemp(prefix="harden-cost-")
    pipeline = save_tiny_sd(os.path.join(folder, "pipeline"))
    common = ["--model", pipeline, "--concept", "nudity", "--steps", "20", "--num-forget", "8"]
    common += ["--num-retain", "8", "--gen-steps", "2", "--lr", "1e-3", "--no-grid"]
    runs = {
        "plain": [],
        "meta": ["--harden", "meta"],
        "perturb": ["--harden", "perturb", "--perturb-steps", "20"],
    }
    result = {}
    for name, extra in runs.items():
        output = os.path.join(folder, name)
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON only
            code = erase_concept_main([*common, *extra, "--output", output])
        if code != 0:
            return code
        with open(os.path.join(output, "metadata.json")) as file:
            metadata = json.load(file)
        seconds = metadata["train_result"]["step_seconds"]
        result[name] = {
            "median_step_s": statistics.median(seconds[1:]),
            "steps": len(seconds),
            "train_s": metadata["timings_s"]["train"],
            "last_terms": metadata["train_result"]["last_terms"],
        }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
