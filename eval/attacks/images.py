"""Images an attack generates and judges, through the evaluation runner's resumable folders.

The target images (the base model on each prompt and seed) and the erased model's images of the
plain prompts are planned, generated, indexed and reused exactly as `erase-eval` does it
(eval/runner.py); this module only passes the attacked UNet in and reads the images back.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from eval.runner import (
    GenerationConfig,
    merge_index,
    pending_images,
    plan_images,
    process_state,
    write_images,
)
from prompts import PromptEntry


def generate_with(
    backend,
    unet: torch.nn.Module | None,
    entries: Sequence[PromptEntry],
    folder: str,
    config: GenerationConfig,
    progress: bool = False,
) -> list[dict]:
    """Generate the missing images of `entries` with `unet` (None: the backend's own) into
    `folder`, split over the launched processes; returns the index records, one per image."""
    state = process_state()
    os.makedirs(folder, exist_ok=True)
    records = plan_images(entries, config)
    pending = pending_images(records, folder)
    state.wait_for_everyone()
    with state.split_between_processes(pending) as mine:
        if mine:
            write_images(backend, unet, mine, folder, config, state, progress)
    state.wait_for_everyone()
    if state.is_main_process:
        merge_index(folder)
    state.wait_for_everyone()
    return records


def load_pngs(folder: str, records: Sequence[dict]) -> torch.Tensor:
    """The records' PNG files as images (N, 3, H, W) in [0, 1]."""
    images = []
    for record in records:
        with Image.open(os.path.join(folder, record["file"])) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
        images.append(torch.from_numpy(pixels).permute(2, 0, 1))
    return torch.stack(images)


def judge_folder(judge, folder: str, records: Sequence[dict], batch_size: int = 64) -> list[dict]:
    """The judge's verdict on every record's image, in record order."""
    verdicts = []
    for start in range(0, len(records), batch_size):
        verdicts.extend(judge(load_pngs(folder, records[start : start + batch_size])))
    return verdicts


def positive_rate(verdicts: Sequence[dict]) -> float:
    """Share of images the judge calls positive."""
    return sum(v["positive"] for v in verdicts) / len(verdicts) if verdicts else 0.0
