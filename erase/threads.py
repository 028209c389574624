"""CPU threads for the testbeds: models whose operations are too small to share out.

On two cores, a second torch thread saves the testbeds at most a third of a step when the
machine is free, and when another job shares the cores the two threads wait on each other and a
step takes many times longer (scripts/bench_threads.py, docs/testbeds.md). Backends say how many
threads suit them (`cpu_threads`, None: torch's own choice) and every phase that runs them on the
CPU holds that count.
"""

from __future__ import annotations

import contextlib

import torch


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
    """The backend's thread count while it runs on the CPU; nothing on a GPU."""
    on_cpu = torch.device(device).type == "cpu"
    return cpu_threads(backend.cpu_threads if on_cpu else None)
