"""`ddpm-cifar10`: the SalUn reference's CIFAR-10 DDPM, a trained folder and CIFAR-10 given by
--data-dir (training it is a GPU job; docs/testbeds.md)."""

from __future__ import annotations

import os
from dataclasses import asdict

import torch

from erase.errors import EraseError
from erase.models.ddpm import SCHEDULER_CONFIG, ClassDDPMBackend, read_ddpm_info, write_ddpm_folder
from erase.testbeds.datasets import cifar10_dataset
from erase.testbeds.ddpm_training import CIFAR10_CONFIG, DDPMConfig, train_class_ddpm

CIFAR10_NAMES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip


# -------------------------------------------------------------------------------
def cifar10_folder(cache_dir: str | None = None) -> str:
    """Where a trained ddpm-cifar10 model is looked for ($ERASE_HOME/ddpm-cifar10)."""
    from erase.home import erase_home

    return os.path.join(cache_dir or erase_home(), "ddpm-cifar10")


def train_ddpm_cifar10(
    data_dir: str, folder: str | None = None, config: DDPMConfig = CIFAR10_CONFIG
) -> str:
    """Train the reference CIFAR-10 DDPM (a GPU job: 800 k steps in the reference) and save it."""
    images, labels = cifar10_dataset(data_dir)
    unet = train_class_ddpm(images, labels, len(CIFAR10_NAMES), config)
    info = {
        "dataset": "cifar10",
        "class_names": CIFAR10_NAMES,
        "guidance_scale": 2.0,
        "scheduler": SCHEDULER_CONFIG,
        "training": asdict(config),
    }
    return write_ddpm_folder(folder or cifar10_folder(), unet.cpu(), info)


def load_ddpm_cifar10(
    data_dir: str | None = None, device: torch.device | None = None
) -> ClassDDPMBackend:
    """`ddpm-cifar10`: a trained DDPM folder plus CIFAR-10, both found through --data-dir."""
    if not data_dir:
        raise EraseError(
            "ddpm-cifar10 needs CIFAR-10 on disk: pass --data-dir PATH (a torchvision CIFAR10 "
            "folder, holding the trained model as ddpm.json + unet/ or in $ERASE_HOME/ddpm-cifar10)."
        )
    if not os.path.isdir(data_dir):
        raise EraseError(f"--data-dir '{data_dir}' is not a folder: pass the CIFAR-10 folder.")
    for folder in (data_dir, os.path.join(data_dir, "ddpm-cifar10"), cifar10_folder()):
        if read_ddpm_info(folder) is not None:
            backend = ClassDDPMBackend.from_folder(folder, data_dir=data_dir, device=device)
            backend.identity = "ddpm-cifar10"
            return backend
    raise EraseError(
        f"No trained ddpm-cifar10 model in '{data_dir}' or {cifar10_folder()}: train one on a GPU "
        "with erase.testbeds.ddpm_cifar10.train_ddpm_cifar10(data_dir) or put a saved DDPM folder "
        "(ddpm.json + unet/) there."
    )
