"""Backends by name: `load_backend("sd-v1-4")`, a local folder, a checkpoint, or a built-in testbed."""

from __future__ import annotations

import importlib
import os

import torch

from erase.errors import EraseError
from erase.models.base import Backend, Batch, Condition
from erase.models.sd import SD_ALIASES, StableDiffusionBackend

# Built-in models that are trained on first use and cached under $ERASE_HOME: name -> loader.
BUILTIN_MODELS = {
    "ddpm-digits": "erase.models.ddpm:load_ddpm_digits",
    "ddpm-cifar10": "erase.models.ddpm:load_ddpm_cifar10",
    "sd-digits": "erase.models.sd_digits:load_sd_digits",
}


def erase_home() -> str:
    """The cache folder for built-in models and generated data ($ERASE_HOME)."""
    return os.environ.get("ERASE_HOME", os.path.join(os.path.expanduser("~"), ".cache", "erase"))


def is_ddpm_folder(path: str) -> bool:
    """True for a folder holding a class-conditional UNet2DModel (a saved DDPM)."""
    return os.path.isfile(os.path.join(path, "unet", "config.json")) and not os.path.isfile(
        os.path.join(path, "model_index.json")
    )


def load_backend(
    spec: str, *, data_dir: str | None = None, device: torch.device | None = None
) -> Backend:
    """The backend for `spec`: an SD alias, hub id, diffusers folder, checkpoint or built-in."""
    if spec in BUILTIN_MODELS:
        module_name, function_name = BUILTIN_MODELS[spec].split(":")
        loader = getattr(importlib.import_module(module_name), function_name)
        return loader(data_dir=data_dir, device=device)
    if os.path.isdir(spec) and is_ddpm_folder(spec):
        from erase.models.ddpm import ClassDDPMBackend

        return ClassDDPMBackend.from_folder(spec, data_dir=data_dir, device=device)
    looks_like_hub_id = spec.count("/") == 1 and not spec.startswith((".", "/"))
    if spec in SD_ALIASES or os.path.exists(spec) or looks_like_hub_id:
        return StableDiffusionBackend(spec, device=device)
    names = ", ".join([*SD_ALIASES, *BUILTIN_MODELS])
    raise EraseError(
        f"Unknown model '{spec}': use one of {names}, a hub id, a local diffusers folder or a "
        ".safetensors/.ckpt file."
    )


__all__ = ["Backend", "Batch", "Condition", "BUILTIN_MODELS", "erase_home", "load_backend"]
