"""Does the sd-digits testbed know its digits? Per-digit classifier accuracy on held-out captions.

    python scripts/sd_digits_quality.py                # trains the model on first use, timed
    python scripts/sd_digits_quality.py --per-prompt 20

Prints JSON: seconds to load (train on first use), per-digit accuracy of generated images of the
held-out captions ("a picture of the digit three", "an image of number 3"), their mean and minimum.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import erase
from erase.testbeds.digits import load_digit_classifier
from erase.testbeds.sd_digits import TRAIN_TEMPLATES, held_out_accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-prompt", type=int, default=10, help="seeds per held-out caption")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    args = parser.parse_args()
    start = time.perf_counter()
    backend = erase.load_model("sd-digits", device=torch.device("cpu"))
    load_s = time.perf_counter() - start
    classifier = load_digit_classifier(backend.resolution)
    accuracy = held_out_accuracy(backend, classifier, args.per_prompt, args.steps)
    print(
        json.dumps(
            {
                "load_or_train_s": round(load_s, 1),
                "per_digit_accuracy": accuracy,
                "mean_accuracy": round(sum(accuracy.values()) / len(accuracy), 4),
                "min_accuracy": min(accuracy.values()),
                "train_caption_accuracy": held_out_accuracy(
                    backend, classifier, args.per_prompt, args.steps, templates=TRAIN_TEMPLATES
                ),
                "per_prompt": args.per_prompt,
                "num_steps": args.steps,
                "guidance_scale": backend.guidance_scale,
                "threads": torch.get_num_threads(),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
