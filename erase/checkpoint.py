"""Resumable checkpoints: written atomically, and tied to the settings that made them.

    <out>.partial/checkpoint/
        settings.json        this run's settings (model, weights, concept, method, configs, seed)
        latest               the name of the newest complete checkpoint, switched by os.replace
        step-00000010/       accelerate's save_state (model, optimizer, RNG) + settings + step.json
        step-00000015.tmp/   a save in progress: never read

A save writes into a temporary folder, renames it once complete, then moves `latest`; a kill at
any moment leaves `latest` naming a complete checkpoint. `--resume` continues only from one whose
settings equal this run's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings

from accelerate import Accelerator

from erase.errors import EraseError

SETTINGS = "settings.json"
LATEST = "latest"
IGNORED_SETTINGS = ("train_config.checkpoint_every",)  # how often to save does not shape weights


def step_name(step: int) -> str:
    """The folder name of the checkpoint after `step` optimizer updates."""
    return f"step-{step:08d}"


def latest_step(folder: str) -> int | None:
    """The step of the newest complete checkpoint in `folder`, None when there is none."""
    try:
        with open(os.path.join(folder, LATEST)) as file:
            name = file.read().strip()
        step = int(name.removeprefix("step-"))
    except (OSError, ValueError):
        return None
    return step if os.path.isdir(os.path.join(folder, name)) else None


def file_digest(path: str | None) -> str | None:
    """SHA-256 of a file (a reused mask), so a checkpoint knows which one it trained with."""
    if not path or not os.path.isfile(path):
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(2**22), b""):
            digest.update(block)
    return digest.hexdigest()


def flatten(settings: dict, prefix: str = "") -> dict:
    """Nested settings as {'train_config.lr': 1e-05, ...}, through JSON so types compare alike."""
    flat = {}
    for key, value in json.loads(json.dumps(settings, default=str)).items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_resume(folder: str, settings: dict, resume: bool, ignore: tuple[str, ...] = ()) -> int:
    """Before any work: the step `--resume` continues from (0 without a checkpoint).

    Refuses, in one line, a checkpoint made with other settings, or a damaged one; `ignore`
    names settings not known yet (the computed mask's digest, checked once it is made).
    """
    step = latest_step(folder)
    if step is None or not resume:
        return 0
    checkpoint = os.path.join(folder, step_name(step))
    saved = read_json(os.path.join(checkpoint, SETTINGS), checkpoint)
    now, then = flatten(settings), flatten(saved)
    differ = sorted(
        key
        for key in now.keys() | then.keys()
        if key not in (*IGNORED_SETTINGS, *ignore) and now.get(key) != then.get(key)
    )
    if differ:
        shown = "; ".join(f"{key}: {then.get(key)} -> {now.get(key)}" for key in differ[:3])
        more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
        if differ == ["mask_digest"]:
            shown += (
                ": the saliency mask computed now differs from the one the checkpoint trained "
                "with, e.g. on another device"
            )
        raise EraseError(
            f"The checkpoint in '{folder}' was made with other settings ({shown}{more}): resume "
            "with the settings it was made with, or pass --overwrite instead of --resume to "
            "start over."
        )
    expected = read_json(os.path.join(checkpoint, "step.json"), checkpoint).get("files", {})
    for name, size in expected.items():
        path = os.path.join(checkpoint, name)
        if not os.path.isfile(path) or os.path.getsize(path) != size:
            raise damaged(checkpoint, f"{name} is missing or cut short")
    return step


def read_json(path: str, checkpoint: str) -> dict:
    """A JSON file of a checkpoint; a missing or unreadable one means the checkpoint is damaged."""
    try:
        with open(path) as file:
            return json.load(file)
    except (OSError, ValueError):
        raise damaged(checkpoint, f"{os.path.basename(path)} is unreadable") from None


def damaged(checkpoint: str, reason: str) -> EraseError:
    """The error for a checkpoint that cannot be resumed from."""
    return EraseError(
        f"The checkpoint '{checkpoint}' is damaged ({reason}): pass --overwrite instead of "
        "--resume to start over."
    )


def record_settings(accelerator: Accelerator, folder: str, settings: dict) -> None:
    """Write this run's settings beside its checkpoints (every checkpoint carries a copy)."""
    if accelerator.is_main_process:
        os.makedirs(folder, exist_ok=True)
        write_json_atomic(os.path.join(folder, SETTINGS), settings)
    accelerator.wait_for_everyone()


def save_checkpoint(accelerator: Accelerator, folder: str, step: int) -> None:
    """Model, optimizer and RNG state after `step` updates, switched in atomically."""
    name = step_name(step)
    temporary = os.path.join(folder, name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(temporary)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if os.path.isfile(os.path.join(folder, SETTINGS)):
            shutil.copyfile(os.path.join(folder, SETTINGS), os.path.join(temporary, SETTINGS))
        files = {
            os.path.relpath(os.path.join(root, file), temporary): os.path.getsize(
                os.path.join(root, file)
            )
            for root, _, names in os.walk(temporary)
            for file in names
        }
        write_json_atomic(
            os.path.join(temporary, "step.json"),
            {"step": step, "time": time.time(), "files": files},
        )
        sync_tree(temporary)  # on disk before it is named complete, not only in the page cache
        final = os.path.join(folder, name)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)
        with open(os.path.join(folder, LATEST + ".tmp"), "w") as file:
            file.write(name)
            file.flush()
            os.fsync(file.fileno())
        os.replace(os.path.join(folder, LATEST + ".tmp"), os.path.join(folder, LATEST))
        sync_tree(folder, files=False)
        for old in os.listdir(folder):  # earlier checkpoints and saves cut short
            if old.startswith("step-") and old != name:
                shutil.rmtree(os.path.join(folder, old), ignore_errors=True)
    accelerator.wait_for_everyone()


def resume(accelerator: Accelerator, folder: str | None) -> int:
    """Load the newest complete checkpoint in `folder`, if any; returns the step to continue from.

    Settings were checked before any work (check_resume); a file that still fails to load is a
    damaged checkpoint, said in one line.
    """
    step = latest_step(folder) if folder else None
    if step is None:
        return 0
    checkpoint = os.path.join(folder, step_name(step))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            accelerator.load_state(checkpoint)
    except Exception as error:  # torch/safetensors raise many types for a cut or foreign file
        raise damaged(checkpoint, f"{type(error).__name__} while loading") from None
    return step


def write_json_atomic(path: str, payload: dict) -> None:
    """JSON through a temporary file, flushed to disk before the rename."""
    with open(path + ".tmp", "w") as file:
        json.dump(payload, file, indent=2, default=str)
        file.flush()
        os.fsync(file.fileno())
    os.replace(path + ".tmp", path)


def sync_tree(folder: str, files: bool = True) -> None:
    """fsync the files under `folder` (when `files`) and the folder itself."""
    if files:
        for root, _, names in os.walk(folder):
            for name in names:
                with open(os.path.join(root, name), "rb") as file:
                    os.fsync(file.fileno())
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
