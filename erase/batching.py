"""Image generation in batches that fill the device: the default batch is large on a GPU, and a
batch that runs out of memory is halved and retried (accelerate's out-of-memory test), after which
the rest of the work goes on at the smaller size. Every image has its own seed, so the images do
not depend on how they were batched."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from accelerate.utils.memory import clear_device_cache, should_reduce_batch_size

# Images per generation call when none is asked for: a CUDA GPU holds far more than the 8 a CPU
# runs well at (SD v1.x at 512 px in fp16: ~0.3 GB of activations per image, guidance included).
DEFAULT_GEN_BATCH = {"cuda": 32}
DEFAULT_CPU_GEN_BATCH = 8


def generation_batch_size(requested: int | None, device: torch.device) -> int:
    """The batch to start from: `requested`, or the device's default."""
    return requested or DEFAULT_GEN_BATCH.get(device.type, DEFAULT_CPU_GEN_BATCH)


def fitting_batches(
    count: int, batch_size: int, run: Callable[[int, int], object]
) -> Iterator[tuple[int, int, object]]:
    """(start, stop, run(start, stop)) over [0, count) in consecutive batches of at most
    `batch_size`; a batch that runs out of memory is halved and tried again."""
    start = 0
    while start < count:
        stop = min(start + batch_size, count)
        try:
            result = run(start, stop)
        except RuntimeError as error:
            if batch_size == 1 or not should_reduce_batch_size(error):
                raise
            del error  # its traceback holds the failed batch's tensors
            clear_device_cache(garbage_collection=True)
            batch_size //= 2
            continue
        yield start, stop, result
        start = stop


def sample_in_batches(
    backend, conditions, seeds, batch_size: int | None, **settings
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(start, stop, images) of `backend.sample(conditions, seeds, **settings)` in batches that
    fit, starting from `batch_size` (None: the device's default)."""

    def run(start: int, stop: int) -> torch.Tensor:
        return backend.sample(conditions[start:stop], seeds[start:stop], **settings)

    size = generation_batch_size(batch_size, backend.device)
    yield from fitting_batches(len(seeds), size, run)
