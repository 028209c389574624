"""Retrain, the yardstick of unlearning: the testbed trained from scratch without the concept.

The gold standard an erasure is measured against (the "Retrain" of the unlearning literature,
whose gap SalUn's paper sets out to narrow): a model that never saw the forgotten class. On the
testbeds training is cheap, so it is built on request and cached under $ERASE_HOME beside the
base model; an attack on an erased model is reported next to the same attack on it.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict

import torch

from erase.errors import EraseError
from erase.testbeds.digits import DIGIT_NAMES

RETRAIN_MODELS = ("ddpm-digits", "sd-digits")


def digit_index(concept: str) -> int:
    """The digit a concept names (3 or three)."""
    key = concept.strip().lower()
    if key.isdigit() and int(key) < 10:
        return int(key)
    if key in DIGIT_NAMES:
        return DIGIT_NAMES.index(key)
    raise EraseError(f"Retrain forgets a digit 0-9 or zero-nine, not '{concept}'.")


def load_retrain(
    model: str, concept: str, device: torch.device | None = None, unet_only: bool = False
):
    """The backend of `model` retrained without `concept`'s digit: trained once, then cached.

    `unet_only` (sd-digits): only a fresh UNet is trained without the digit, beside the base
    model's text encoder and VAE, frozen; the yardstick of an erasure that edits the UNet alone
    (the full Retrain's text encoder never learned the digit's word either)."""
    digit = check_retrain(model, concept, unet_only)
    if model == "ddpm-digits":
        return ddpm_digits_retrain(digit, device)
    return sd_digits_retrain(digit, device, unet_only)


def check_retrain(model: str, concept: str, unet_only: bool = False) -> int:
    """The concept's digit; one EraseError for a model without a Retrain or a concept that is
    not a digit."""
    if unet_only and model != "sd-digits":
        raise EraseError(
            f"A UNet-only Retrain is built on sd-digits alone, not '{model}': drop --retrain-unet."
        )
    if model not in RETRAIN_MODELS:
        raise EraseError(
            f"Retrain is built only on the testbeds ({', '.join(RETRAIN_MODELS)}), not '{model}': "
            "drop --retrain."
        )
    return digit_index(concept)


def ddpm_digits_retrain(digit: int, device: torch.device | None = None):
    """ddpm-digits' recipe on the training digits other than `digit`."""
    from erase.models.ddpm import (
        SCHEDULER_CONFIG,
        ClassDDPMBackend,
        read_ddpm_info,
        write_ddpm_folder,
    )
    from erase.models.sd import default_device
    from erase.testbeds.ddpm_digits import digits_folder
    from erase.testbeds.ddpm_training import DDPMConfig, train_class_ddpm
    from erase.testbeds.digits import digits_dataset

    config = DDPMConfig()
    folder = f"{digits_folder(config)}-retrain-without-{digit}"
    if read_ddpm_info(folder) is None:
        images, labels = digits_dataset(config.image_size, split="train")
        kept = labels != digit
        started = time.perf_counter()
        unet = train_class_ddpm(
            images[kept], labels[kept], len(DIGIT_NAMES), config, device=default_device()
        )
        info = {
            "dataset": "digits",
            "class_names": DIGIT_NAMES,
            "excluded_classes": [digit],
            "guidance_scale": 2.0,
            "scheduler": SCHEDULER_CONFIG,
            "training": asdict(config),
            "train_seconds": round(time.perf_counter() - started, 1),
        }
        write_ddpm_folder(folder, unet.cpu(), info)
    backend = ClassDDPMBackend.from_folder(folder, device=device)
    backend.identity = f"ddpm-digits retrained without {DIGIT_NAMES[digit]}"
    backend.eval_steps = 25  # as ddpm-digits
    return backend


def sd_digits_retrain(digit: int, device: torch.device | None = None, unet_only: bool = False):
    """sd-digits' recipe (VAE, text encoder and UNet) on the training digits other than `digit`;
    `unet_only`: the UNet's part of it, beside the base model's frozen text encoder and VAE."""
    from erase.home import erase_home
    from erase.testbeds.sd_digits import (
        CACHE_VERSION,
        SDDigitsBackend,
        SDDigitsConfig,
        train_sd_digits,
        trained_sd_digits_folder,
    )

    kind = "unet-retrain" if unet_only else "retrain"
    folder = os.path.join(erase_home(), f"sd-digits-v{CACHE_VERSION}-{kind}-without-{digit}")
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        os.makedirs(erase_home(), exist_ok=True)
        base = trained_sd_digits_folder() if unet_only else None
        train_sd_digits(folder, SDDigitsConfig(exclude=(digit,), text_encoder_from=base))
    backend = SDDigitsBackend(folder, device=device)
    what = "its UNet retrained" if unet_only else "retrained"
    backend.identity = f"sd-digits {what} without {DIGIT_NAMES[digit]}"
    return backend
