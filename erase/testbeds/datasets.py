"""The datasets a saved class-conditional DDPM may name in its ddpm.json ("digits", "cifar10"),
and the classifier that evaluates each: what ClassDDPMBackend.from_folder looks up."""

from __future__ import annotations

import os

import torch

from erase.errors import EraseError
from erase.models.sd import default_device


def cifar10_dataset(data_dir: str) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10's training set from a torchvision folder: (50000, 3, 32, 32) in [0, 1], labels."""
    from torchvision.datasets import CIFAR10

    try:
        data = CIFAR10(data_dir, train=True, download=False)
    except RuntimeError:
        raise EraseError(
            f"No CIFAR-10 in '{data_dir}': pass --data-dir with the folder holding "
            "cifar-10-batches-py (torchvision's CIFAR10 format)."
        ) from None
    images = torch.from_numpy(data.data).permute(0, 3, 1, 2).float() / 255  # (N, 3, 32, 32)
    return images, torch.tensor(data.targets, dtype=torch.long)


def dataset_loader(dataset: str | None, image_size: int, data_dir: str | None):
    """The loader of a known dataset by name ("digits", "cifar10"), or None."""
    if dataset == "digits":
        from erase.testbeds.digits import digits_dataset

        return lambda: digits_dataset(image_size, split="train")
    if dataset == "cifar10" and data_dir:
        return lambda: cifar10_dataset(data_dir)
    return None


def classifier_for(dataset: str | None, folder: str, image_size: int, device):
    """The evaluation classifier: the digit classifier, or a TorchScript classifier.pt in the folder.

    classifier.pt maps images (B, C, H, W) in [0, 1] to logits (B, K), e.g. the ResNet-34 of the
    CIFAR-10 reference; without one a model other than digits has no class-removal evaluation.
    """
    if dataset == "digits":
        from erase.testbeds.digits import load_digit_classifier

        return load_digit_classifier(image_size, device=device)
    path = os.path.join(folder, "classifier.pt")
    if os.path.isfile(path):
        try:
            return torch.jit.load(path, map_location=device or default_device()).eval()
        except Exception as error:
            raise EraseError(
                f"'{path}' is not a TorchScript classifier ({type(error).__name__}): save one with "
                "torch.jit.script(model).save(path), or remove it."
            ) from None
    return None
