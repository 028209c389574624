"""CPU threads for the testbeds: models whose operations are too small to share out.

Measured by scripts/bench_threads.py on 2 cores (docs/testbeds.md): a ddpm-digits training step
takes 0.15 s on two threads and 0.25 s on one when the machine is free, but beside one other
busy job two threads wait on each other and it takes 0.67 s, where one thread keeps 0.26 s.
So a testbed runs on torch's threads when the other cores are idle and on `cpu_threads` (1)
when another job keeps one busy; the choice is made once per process, when first needed, and
recorded in metadata.json, since the thread count changes the order of floating-point sums.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time

import torch


def busy_cores(window_s: float = 0.3) -> float:
    """How many cores other processes kept busy over `window_s` seconds (this process sleeps
    meanwhile), from Linux's /proc/stat; 0.0 where it cannot be read."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as file:
            fields = [int(v) for v in file.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle

    try:
        total, idle = sample()
        time.sleep(window_s)
        total_after, idle_after = sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    elapsed = total_after - total
    if elapsed <= 0:
        return 0.0
    return (os.cpu_count() or 1) * (elapsed - (idle_after - idle)) / elapsed


@functools.lru_cache(maxsize=1)
def cores_shared() -> bool:
    """Whether another job keeps at least half a core busy (checked once per process)."""
    return busy_cores() >= 0.5


def chosen_threads(count: int | None) -> int | None:
    """`count` when the cores are shared, else None (torch's own choice)."""
    return count if count is not None and cores_shared() else None


@contextlib.contextmanager
def cpu_threads(count: int | None):
    """Run the block on `count` torch CPU threads (None: as they are), then give them back."""
    if count is None:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def backend_threads(backend, device) -> contextlib.AbstractContextManager:
    """The backend's thread count while it runs on a shared CPU; nothing on a GPU."""
    on_cpu = torch.device(device).type == "cpu"
    return cpu_threads(chosen_threads(backend.cpu_threads) if on_cpu else None)
