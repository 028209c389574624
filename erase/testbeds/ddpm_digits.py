"""`ddpm-digits`: a class-conditional DDPM of scikit-learn's handwritten digits, trained on the
CPU on first use and cached under $ERASE_HOME (docs/testbeds.md)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict

import torch
from diffusers import UNet2DModel
from tqdm.auto import tqdm

from erase.models.ddpm import SCHEDULER_CONFIG, ClassDDPMBackend, read_ddpm_info, write_ddpm_folder
from erase.models.sd import default_device, load_unet_folder
from erase.testbeds.ddpm_training import DDPMConfig, train_class_ddpm
from erase.threads import chosen_threads, cpu_threads

# --------------------------------------------------------------------------------
FIRST_USE_MINUTES = 2  # the classifier and 1000 steps at batch 64, measured (docs/testbeds.md)
DIGITS_VERSION = 1  # bump when DDPMConfig defaults change, so stale caches are not reused


def digits_folder(config: DDPMConfig, cache_dir: str | None = None) -> str:
    """Where the ddpm-digits model of this configuration is cached."""
    from erase.home import erase_home

    default = config == DDPMConfig(image_size=config.image_size)
    name = f"ddpm-digits-{config.image_size}-v{DIGITS_VERSION}"
    if not default:  # tests and experiments: one folder per configuration
        digest = hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode()).hexdigest()
        name += f"-{digest[:10]}"
    return os.path.join(cache_dir or erase_home(), name)


def train_ddpm_digits(folder: str, config: DDPMConfig | None = None) -> str:
    """Train the digits DDPM on the train split and save it to `folder`; returns the folder."""
    from erase.testbeds.digits import DIGIT_NAMES, digits_dataset

    config = config or DDPMConfig()
    images, labels = digits_dataset(config.image_size, split="train")  # (N, 1, H, W)
    started = time.perf_counter()
    device = default_device()
    with cpu_threads(chosen_threads(1) if device.type == "cpu" else None):  # erase/threads.py
        unet = train_class_ddpm(images, labels, len(DIGIT_NAMES), config, device=device)
    info = {
        "dataset": "digits",
        "class_names": DIGIT_NAMES,
        "guidance_scale": 2.0,
        "scheduler": SCHEDULER_CONFIG,
        "training": asdict(config),
        "train_seconds": round(time.perf_counter() - started, 1),
    }
    return write_ddpm_folder(folder, unet.cpu(), info)


def load_ddpm_digits(
    data_dir: str | None = None,
    device: torch.device | None = None,
    config: DDPMConfig | None = None,
    cache_dir: str | None = None,
    classifier_config=None,
) -> ClassDDPMBackend:
    """`ddpm-digits`: trained on first use (a few minutes on 2 CPU cores), cached in $ERASE_HOME.

    `data_dir` is unused (the digits ship with scikit-learn); `config`, `cache_dir` and
    `classifier_config` let tests and experiments train small versions elsewhere.
    """
    from erase.testbeds.digits import DIGIT_NAMES, digits_dataset, load_digit_classifier

    config = config or DDPMConfig()
    # The classifier first: it is the cheaper half, and evaluation needs it anyway.
    classifier = load_digit_classifier(
        config.image_size, device=device, config=classifier_config, cache_dir=cache_dir
    )
    folder = digits_folder(config, cache_dir)
    if read_ddpm_info(folder) is None:
        tqdm.write(
            f"ddpm-digits: first use: training it once into {folder} ({config.steps} steps, "
            f"about {FIRST_USE_MINUTES} minutes on 2 free CPU cores, longer beside other jobs); "
            "later runs load it in a second.",
            file=sys.stderr,
        )
        train_ddpm_digits(folder, config)
    info = read_ddpm_info(folder)
    backend = ClassDDPMBackend(
        load_unet_folder(UNet2DModel, folder),
        DIGIT_NAMES,
        identity="ddpm-digits",
        dataset=lambda: digits_dataset(config.image_size, split="train"),
        device=device,
        guidance_scale=info.get("guidance_scale", 2.0),
        scheduler_config=info.get("scheduler"),
        classifier=classifier,
    )
    backend.training_seconds = info.get("train_seconds")
    backend.cpu_threads = 1  # on shared cores: its operations are too small (erase/threads.py)
    return backend
