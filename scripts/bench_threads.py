"""Seconds per step of the testbeds' operations on 1 and 2 torch CPU threads, alone and beside
another busy job: whether a testbed phase should pin one thread (docs/testbeds.md).

    python scripts/bench_threads.py [--steps 30]

For each case the ddpm-digits UNet's training step (batch 128, what the base training and the
erasure run) and its sampling step (batch 250, what the class-removal evaluation runs). The
competing job is a process doing one-thread matrix products for the whole measurement, as a
second user's job on a shared machine would. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time

import torch


def busy(stop) -> None:
    """A competing job: one-thread matrix products until told to stop."""
    torch.set_num_threads(1)
    a = torch.randn(512, 512)
    while not stop.is_set():
        a = torch.tanh(a @ a)


def step_seconds(threads: int, steps: int) -> dict:
    """Median seconds of a training step and of a sampling step on `threads` threads."""
    from erase.testbeds.ddpm_training import DDPMConfig, build_class_unet

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    unet = build_class_unet(10, DDPMConfig())
    optimizer = torch.optim.Adam(unet.parameters(), lr=1e-4)
    train, sample = [], []
    for _ in range(steps):
        noisy, labels = torch.randn(128, 1, 16, 16), torch.randint(0, 10, (128,))
        start = time.perf_counter()
        loss = unet(noisy, torch.randint(0, 1000, (128,)), class_labels=labels).sample.square()
        loss.mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train.append(time.perf_counter() - start)
        with torch.no_grad():
            start = time.perf_counter()
            unet(
                torch.randn(250, 1, 16, 16),
                torch.full((250,), 500),
                class_labels=labels[:1].repeat(250),
            )
            sample.append(time.perf_counter() - start)
    median = lambda values: round(sorted(values[2:])[len(values[2:]) // 2], 4)  # noqa: E731
    return {"train_step_s": median(train), "sample_step_s": median(sample)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    results = []
    for competing in (False, True):
        stop = multiprocessing.Event()
        rival = multiprocessing.Process(target=busy, args=(stop,)) if competing else None
        if rival:
            rival.start()
            time.sleep(1)
        for threads in (1, 2):
            row = {"threads": threads, "competing_job": competing}
            results.append({**row, **step_seconds(threads, args.steps)})
        if rival:
            stop.set()
            rival.join()
    print(json.dumps({"cpu_count": multiprocessing.cpu_count(), "cases": results}, indent=1))


if __name__ == "__main__":
    main()
