"""FID between two image sets with torchmetrics (Inception by default, any feature module)."""

from __future__ import annotations

import torch
from torchmetrics.image.fid import FrechetInceptionDistance

from erase.errors import EraseError


def frechet_distance(
    real_images: torch.Tensor,
    fake_images: torch.Tensor,
    feature: torch.nn.Module | int = 2048,
    batch_size: int = 64,
) -> float:
    """FID of two (N, C, H, W) float image sets in [0, 1].

    `feature` is an Inception layer size (weights are downloaded by torch-fidelity on first
    use) or a module mapping images in [0, 1] to (B, D) features, e.g. a classifier's
    penultimate layer where Inception weights cannot be had.
    """
    try:
        metric = FrechetInceptionDistance(feature=feature, normalize=True)
    except Exception as error:  # torch-fidelity missing, or its weights not downloadable
        raise EraseError(
            f"FID's Inception network is not available ({type(error).__name__}): install "
            "torch-fidelity and run once online to cache its weights, or pass a feature model."
        ) from None
    metric.set_dtype(torch.float64)
    with torch.no_grad():
        for images, real in ((real_images, True), (fake_images, False)):
            for start in range(0, len(images), batch_size):
                metric.update(images[start : start + batch_size].float(), real=real)
    return float(metric.compute())
