"""Kill erase-concept with SIGKILL at random moments, resume until it finishes, and compare the
weights with an uninterrupted run bit for bit. Prints JSON.

    python scripts/kill_resume.py --trials 10 --steps 30

Every run saves a checkpoint after each step (--checkpoint-every 1), so most kills land inside
training or inside a checkpoint save; the tiny random pipeline of erase.testing keeps it fast.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import torch
from safetensors.torch import load_file

from erase.testing import save_tiny_sd

WEIGHTS = os.path.join("unet", "diffusion_pytorch_model.safetensors")


def erase_command(model: str, output: str, steps: int, resume: bool) -> list[str]:
    """The erase-concept command line of one attempt."""
    command = [sys.executable, "-m", "erase.cli", "--model", model, "--concept", "nudity"]
    command += ["--steps", str(steps), "--checkpoint-every", "1", "--lr", "1e-3"]
    command += ["--num-forget", "2", "--num-retain", "2", "--gen-steps", "2"]
    command += ["--output", output] + (["--resume"] if resume else [])
    return command


def run_killed(model, output, steps, low, high, rng, environment) -> dict:
    """Start, kill after a random delay, resume (killing again) until the run completes."""
    kills, attempts = [], 0
    while True:
        attempts += 1
        process = subprocess.Popen(
            erase_command(model, output, steps, resume=attempts > 1),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=environment,
        )
        delay = rng.uniform(low, high) if len(kills) < 3 else None  # at most 3 kills per trial
        try:
            _, stderr = process.communicate(timeout=delay)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.communicate()
            checkpoint = os.path.join(output + ".partial", "checkpoint")
            saving = os.path.isdir(checkpoint) and any(
                name.endswith(".tmp") for name in os.listdir(checkpoint)
            )
            kills.append({"after_s": round(delay, 2), "inside_a_save": saving})
            continue
        if process.returncode != 0:
            return {"attempts": attempts, "kills": kills, "error": stderr.decode()[-500:]}
        return {"attempts": attempts, "kills": kills}


def main() -> None:
    """Run the trials and print what happened."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kill-after", type=float, nargs=2, default=(4.0, 9.0), metavar="S")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as work:
        environment = {**os.environ, "HF_HUB_OFFLINE": "1", "ERASE_HOME": work}
        model = save_tiny_sd(os.path.join(work, "model"))
        reference = os.path.join(work, "reference")
        started = time.perf_counter()
        subprocess.run(
            erase_command(model, reference, args.steps, resume=False),
            check=True,
            capture_output=True,
            env=environment,
        )
        uninterrupted_s = time.perf_counter() - started
        expected = load_file(os.path.join(reference, WEIGHTS))
        trials = []
        for trial in range(args.trials):
            output = os.path.join(work, f"trial-{trial}")
            outcome = run_killed(model, output, args.steps, *args.kill_after, rng, environment)
            if "error" not in outcome:
                weights = load_file(os.path.join(output, WEIGHTS))
                outcome["identical"] = weights.keys() == expected.keys() and all(
                    torch.equal(weights[name], expected[name]) for name in expected
                )
                metadata = json.load(open(os.path.join(output, "metadata.json")))
                outcome["resumed_from"] = metadata["train_result"]["resumed_from"]
                outcome["left_beside"] = sorted(
                    name for name in os.listdir(work) if name.startswith(f"trial-{trial}.")
                )
            trials.append(outcome)
    killed = [t for t in trials if t["kills"]]
    print(
        json.dumps(
            {
                "steps": args.steps,
                "uninterrupted_s": round(uninterrupted_s, 1),
                "trials": len(trials),
                "trials_killed": len(killed),
                "kills": sum(len(t["kills"]) for t in trials),
                "kills_inside_a_save": sum(k["inside_a_save"] for t in trials for k in t["kills"]),
                "identical": sum(bool(t.get("identical")) for t in trials),
                "errors": [t["error"] for t in trials if "error" in t],
                "per_trial": trials,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
