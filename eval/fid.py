"""FID between two image sets with torchmetrics (Inception by default, any feature module)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torchmetrics.image.fid import FrechetInceptionDistance

from erase.errors import EraseError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def fid_metric(
    feature: torch.nn.Module | int = 2048, weights: str | None = None
) -> FrechetInceptionDistance:
    """An empty FID metric; Inception's weights are read (or fetched) here, so offline fails early.

    `weights` is torch-fidelity's Inception weights file (pt_inception-2015-12-05), for machines
    that cannot download it.
    """
    if weights is not None and not os.path.isfile(weights):
        raise EraseError(f"--fid-weights '{weights}' is not a file: pass Inception's weights file.")
    try:
        metric = FrechetInceptionDistance(
            feature=feature, normalize=True, feature_extractor_weights_path=weights
        )
    except Exception as error:  # torch-fidelity missing, or its weights not downloadable
        raise EraseError(
            f"FID's Inception network is not available ({type(error).__name__}): run once "
            "online to cache its weights, or pass --fid-weights FILE (torch-fidelity's "
            "pt_inception-2015-12-05 weights)."
        ) from None
    return metric


def feature_count(metric: FrechetInceptionDistance) -> int:
    """The dimension of the metric's feature space."""
    return int(metric.real_features_sum.numel())


def bias_warning(metric: FrechetInceptionDistance) -> str | None:
    """A sentence when either set has fewer images than features (a rank-deficient covariance
    makes FID biased, and not comparable with figures computed on more images), else None."""
    features = feature_count(metric)
    fewest = int(min(metric.real_features_num_samples, metric.fake_features_num_samples))
    if fewest >= features:
        return None
    return (
        f"FID from {fewest} images in {features} feature dimensions is biased (fewer images "
        "than features): compare it only with FIDs of the same counts, or pass more images or "
        "a smaller --fid-features."
    )


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
    metric = fid_metric(feature)
    with torch.no_grad():
        for images, real in ((real_images, True), (fake_images, False)):
            for start in range(0, len(images), batch_size):
                metric.update(images[start : start + batch_size].float(), real=real)
    return compute(metric)


def frechet_distance_files(
    real_files: Sequence[str],
    fake_files: Sequence[str],
    feature: torch.nn.Module | int = 2048,
    image_size: int = 299,
    batch_size: int = 64,
    metric: FrechetInceptionDistance | None = None,
) -> float:
    """FID of two lists of image files, read `batch_size` at a time (any number of images).

    Every image is center-cropped to a square and resized to `image_size` (Inception's 299).
    """
    metric = metric if metric is not None else fid_metric(feature)
    with torch.no_grad():
        for files, real in ((real_files, True), (fake_files, False)):
            for start in range(0, len(files), batch_size):
                metric.update(load_images(files[start : start + batch_size], image_size), real)
    return compute(metric)


def compute(metric: FrechetInceptionDistance) -> float:
    """The metric's value; too few images is a user error."""
    if min(metric.real_features_num_samples, metric.fake_features_num_samples) < 2:
        raise EraseError("FID needs at least 2 images in each set: generate or pass more images.")
    return float(metric.compute())


def image_files(folder: str) -> list[str]:
    """The image files in `folder`, sorted by name."""
    if not os.path.isdir(folder):
        raise EraseError(f"Reference folder '{folder}' does not exist: pass --reference DIR.")
    files = sorted(
        os.path.join(folder, name)
        for name in os.listdir(folder)
        if name.lower().endswith(IMAGE_SUFFIXES)
    )
    if not files:
        raise EraseError(f"Reference folder '{folder}' holds no images: pass a folder of images.")
    return files


def load_images(files: Sequence[str], image_size: int) -> torch.Tensor:
    """Image files as (B, 3, S, S) floats in [0, 1], center-cropped and resized to S."""
    images = []
    for path in files:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
        image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
        images.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
    return torch.stack(images).float() / 255
