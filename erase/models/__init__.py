"""Backends by name: `load_backend("sd-v1-4")`, a local folder, a checkpoint, or a built-in testbed."""

from __future__ import annotations

import importlib
import json
import os
import warnings
from contextlib import contextmanager

import torch

from erase.errors import EraseError
from erase.models.base import Backend, Batch, Condition
from erase.models.sd import SD_ALIASES, StableDiffusionBackend
from erase.models.sdxl import SDXL_ALIASES, StableDiffusionXLBackend

# Built-in models that are trained on first use and cached under $ERASE_HOME: name -> loader.
BUILTIN_MODELS = {
    "ddpm-digits": "erase.testbeds.ddpm_digits:load_ddpm_digits",
    "ddpm-cifar10": "erase.testbeds.ddpm_cifar10:load_ddpm_cifar10",
    "sd-digits": "erase.testbeds.sd_digits:load_sd_digits",
}


def model_conditioning(spec: str) -> str | None:
    """'class' or 'text' when it is known without loading `spec` (built-ins, DDPM folders)."""
    if spec in ("ddpm-digits", "ddpm-cifar10") or (os.path.isdir(spec) and is_ddpm_folder(spec)):
        return "class"
    if spec == "sd-digits" or spec in SD_ALIASES or spec in SDXL_ALIASES:
        return "text"
    return None


@contextmanager
def quiet_loading():
    """Silence the libraries' warnings and log lines while a model loads: a failure is then the
    one line of its EraseError, and a success prints nothing."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as transformers_logging

    loggers = (diffusers_logging, transformers_logging, hub_logging)
    levels = [module.get_verbosity() for module in loggers]
    # bitsandbytes (--optimizer adam8bit), which diffusers imports when it is installed, warns
    # through the standard logging module about optional CPU kernels as it is imported
    from erase import quiet_import_noise

    try:
        for module in loggers:
            module.set_verbosity_error()
        with quiet_import_noise(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for module, level in zip(loggers, levels):
            module.set_verbosity(level)


def is_ddpm_folder(path: str) -> bool:
    """True for a folder holding a class-conditional UNet2DModel (a saved DDPM)."""
    return os.path.isfile(os.path.join(path, "unet", "config.json")) and not os.path.isfile(
        os.path.join(path, "model_index.json")
    )


def load_backend(
    spec: str, *, data_dir: str | None = None, device: torch.device | None = None
) -> Backend:
    """The backend for `spec`: an SD alias, hub id, diffusers folder, checkpoint or built-in."""
    if spec in BUILTIN_MODELS:  # built-ins train on first use: their progress stays visible
        return load_builtin(spec, data_dir, device)
    with quiet_loading():
        return load_pretrained(spec, data_dir, device)


def load_builtin(spec: str, data_dir: str | None, device: torch.device | None) -> Backend:
    """A built-in testbed, trained and cached on first use."""
    module_name, function_name = BUILTIN_MODELS[spec].split(":")
    loader = getattr(importlib.import_module(module_name), function_name)
    return loader(data_dir=data_dir, device=device)


def load_pretrained(spec: str, data_dir: str | None, device: torch.device | None) -> Backend:
    """A saved model: a DDPM folder, or Stable Diffusion from an alias, hub id, folder or file."""
    if os.path.isdir(spec) and is_ddpm_folder(spec):
        from erase.models.ddpm import ClassDDPMBackend

        return ClassDDPMBackend.from_folder(spec, data_dir=data_dir, device=device)
    looks_like_hub_id = spec.count("/") == 1 and not spec.startswith((".", "/"))
    if spec in SDXL_ALIASES or (spec not in SD_ALIASES and is_sdxl(spec)):
        return StableDiffusionXLBackend(spec, device=device)
    if spec in SD_ALIASES or os.path.exists(spec) or looks_like_hub_id:
        return StableDiffusionBackend(spec, device=device)
    names = ", ".join([*SD_ALIASES, *SDXL_ALIASES, *BUILTIN_MODELS])
    raise EraseError(
        f"Unknown model '{spec}': use one of {names}, a hub id, a local diffusers folder or a "
        ".safetensors/.ckpt file."
    )


def is_sdxl(spec: str) -> bool:
    """True for an SDXL model: a diffusers folder (or a cached hub id) whose model_index.json
    names an XL pipeline, or a single-file checkpoint holding SDXL's second text encoder."""
    if os.path.isfile(spec):
        return checkpoint_is_sdxl(spec)
    index = os.path.join(spec, "model_index.json")
    if not os.path.isfile(index) and spec.count("/") == 1 and not os.path.exists(spec):
        try:  # a hub id: its model_index.json from the cache (or the hub when online)
            from huggingface_hub import hf_hub_download

            index = hf_hub_download(spec, "model_index.json")
        except Exception:  # not there: the SD backend then says why it cannot load it
            return False
    if not os.path.isfile(index):
        return False
    with open(index) as file:
        return "XL" in str(json.load(file).get("_class_name", ""))


# Keys only SDXL's original-format checkpoints hold: its second text encoder (OpenCLIP bigG).
SDXL_CHECKPOINT_PREFIX = "conditioner.embedders.1."


def checkpoint_is_sdxl(path: str) -> bool:
    """True for a single-file checkpoint whose weights include SDXL's second text encoder."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as checkpoint:
                keys = checkpoint.keys()
        except Exception:  # not a readable safetensors file: the SD loader reports it
            return False
    else:
        try:  # .ckpt: memory-mapped, so only the names are read
            checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception:
            return False
        keys = checkpoint.get("state_dict", checkpoint).keys()
    return any(key.startswith(SDXL_CHECKPOINT_PREFIX) for key in keys)


__all__ = [
    "Backend",
    "Batch",
    "Condition",
    "BUILTIN_MODELS",
    "load_backend",
    "model_conditioning",
]
