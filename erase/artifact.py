"""The output folder of a run, written atomically: everything goes into `<out>.partial/` and the
folder is renamed to `<out>` only when complete."""

from __future__ import annotations

import json
import os
import platform
import shutil
import uuid
from contextlib import contextmanager

import accelerate
import diffusers
import torch
import transformers

import erase
from erase.errors import EraseError


def check_output(path: str, overwrite: bool, resume: bool = False) -> None:
    """Refuse an existing output folder unless --overwrite (before any work is done)."""
    if os.path.exists(path) and not overwrite:
        raise EraseError(
            f"Output folder '{path}' already exists: pass --overwrite or another --output."
        )
    if os.path.exists(partial_path(path)) and not resume:
        if not os.path.isfile(os.path.join(partial_path(path), "checkpoint", "step.json")):
            shutil.rmtree(partial_path(path))  # a crashed run's leftovers, nothing to resume


def partial_path(path: str) -> str:
    """Where a run writes before its output is complete."""
    return path.rstrip("/\\") + ".partial"


@contextmanager
def staged_output(path: str, keep_on_error: bool = False):
    """Yield `<path>.partial` to write into; on success rename it to `path` (replacing an old one).

    On an error the partial folder is removed, unless it holds a checkpoint to resume from.
    """
    staging = partial_path(path)
    os.makedirs(staging, exist_ok=True)
    try:
        yield staging
    except BaseException:
        if not keep_on_error:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    checkpoint = os.path.join(staging, "checkpoint")
    if os.path.isdir(checkpoint):
        shutil.rmtree(checkpoint)
    old = None
    if os.path.exists(path):
        old = f"{path}.old-{uuid.uuid4().hex[:8]}"
        os.replace(path, old)
    os.replace(staging, path)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def versions() -> dict[str, str]:
    """Versions of everything that shaped the result."""
    return {
        "erase": erase.__version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
    }


def write_json(path: str, payload: dict) -> None:
    """Pretty JSON, written through a temporary file."""
    with open(path + ".tmp", "w") as file:
        json.dump(payload, file, indent=2, default=str)
    os.replace(path + ".tmp", path)
