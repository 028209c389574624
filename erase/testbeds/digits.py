"""scikit-learn's handwritten digits: the real data of the CPU testbeds, and a digit classifier.

1,797 real 8x8 scans (shipped with scikit-learn, no download), upscaled to 16x16 or 32x32. The
classifier scores generated digits (class-removal accuracy) and its penultimate layer is the
feature space of FID on the testbeds, where Inception weights are not available offline.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from erase.threads import chosen_threads, cpu_threads

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

CLASSIFIER_FORMAT = "erase-digit-classifier/1"
SPLIT_SEED = 0  # the fixed 80/20 train/test split


def digits_dataset(image_size: int = 16, split: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """The digits as (N, 1, H, W) floats in [0, 1] and (N,) long labels; split: all|train|test."""
    from sklearn.datasets import load_digits

    if split not in ("all", "train", "test"):
        raise ValueError(f"split must be all, train or test, got '{split}'")
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16  # (N, 1, 8, 8)
    labels = torch.tensor(digits.target, dtype=torch.long)
    if image_size != 8:
        images = torch.nn.functional.interpolate(
            images, size=(image_size, image_size), mode="bilinear", align_corners=False
        ).clamp(0, 1)  # (N, 1, H, W)
    if split == "all":
        return images, labels
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    cut = round(0.8 * len(labels))
    chosen = order[:cut] if split == "train" else order[cut:]
    chosen = chosen.sort().values  # dataset order within a split
    return images[chosen], labels[chosen]


@dataclass
class ClassifierConfig:
    """The digit classifier's size and training budget (about 30 s on 2 CPU cores)."""

    image_size: int = 16
    width: int = 32  # channels of the first conv; the second has twice as many
    feature_dim: int = 128  # penultimate features (FID space)
    epochs: int = 15
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0


class DigitClassifier(torch.nn.Module):
    """A small CNN: two conv blocks, a `feature_dim` penultimate layer, 10 logits."""

    def __init__(self, image_size: int = 16, width: int = 32, feature_dim: int = 128):
        super().__init__()
        self.image_size = image_size
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(1, width, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(width, 2 * width, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Flatten(),
            torch.nn.Linear(2 * width * (image_size // 4) ** 2, feature_dim),
            torch.nn.ReLU(),
        )
        self.dropout = torch.nn.Dropout(0.3)
        self.head = torch.nn.Linear(feature_dim, 10)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 1|3, H, W) in [0, 1] as the network's input: gray, its size, its dtype."""
        weight = self.head.weight
        images = images.to(weight.device, weight.dtype)
        if images.shape[1] != 1:
            images = images.mean(dim=1, keepdim=True)  # RGB-looking digits to gray
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = torch.nn.functional.interpolate(
                images, size=(self.image_size, self.image_size), mode="bilinear", antialias=True
            )
        return images * 2 - 1

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, feature_dim) of images in [0, 1]."""
        return self.body(self.prepare(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, 10) of images (B, 1|3, H, W) in [0, 1]."""
        return self.head(self.dropout(self.features(images)))


class DigitFeatures(torch.nn.Module):
    """The classifier's penultimate layer as a feature module (for FID)."""

    def __init__(self, classifier: DigitClassifier):
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.head.in_features  # torchmetrics reads this

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D) features of images in [0, 1]."""
        return self.classifier.features(images)


def digit_features(model: DigitClassifier, images: torch.Tensor) -> torch.Tensor:
    """Penultimate features (B, D) of `model` for images in [0, 1]."""
    with torch.no_grad():
        return model.eval().features(images)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 1/8 of the size, and a little noise: robustness to generated digits."""
    size = images.shape[-1]
    shift = max(1, size // 8)
    padded = torch.nn.functional.pad(images, (shift, shift, shift, shift))
    dx, dy = torch.randint(0, 2 * shift + 1, (2,), generator=generator).tolist()
    shifted = padded[..., dy : dy + size, dx : dx + size]
    noise = 0.05 * torch.randn(images.shape, generator=generator)
    return (shifted + noise).clamp(0, 1)


def train_digit_classifier(config: ClassifierConfig | None = None) -> DigitClassifier:
    """Train the classifier on the train split (a few seconds to a minute on 2 CPU cores)."""
    config = config or ClassifierConfig()
    torch.manual_seed(config.seed)
    images, labels = digits_dataset(config.image_size, split="train")  # (N, 1, H, W)
    model = DigitClassifier(config.image_size, config.width, config.feature_dim)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    model.train()
    for _ in tqdm(range(config.epochs), desc="digit classifier: training", unit="epoch"):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), config.batch_size):
            chosen = order[start : start + config.batch_size]
            logits = model(augment(images[chosen], generator))
            loss = torch.nn.functional.cross_entropy(logits, labels[chosen])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def classifier_accuracy(model: torch.nn.Module, split: str = "test") -> float:
    """Top-1 accuracy of `model` on a split of the real digits."""
    image_size = getattr(model, "image_size", 16)
    images, labels = digits_dataset(image_size, split=split)
    predicted = model.eval()(images).argmax(-1).cpu()
    return float((predicted == labels).float().mean())


def classifier_folder(image_size: int = 16, cache_dir: str | None = None) -> str:
    """Where the classifier of this image size is cached ($ERASE_HOME/digit-classifier-<size>)."""
    from erase.home import erase_home

    return os.path.join(cache_dir or erase_home(), f"digit-classifier-{image_size}")


def save_digit_classifier(model: DigitClassifier, folder: str, **info) -> None:
    """Write model.safetensors + config.json into `folder` atomically (temp folder + rename)."""
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{os.path.basename(folder)}.{uuid.uuid4().hex[:8]}.tmp")
    os.makedirs(staging)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, os.path.join(staging, "model.safetensors"))
    config = {
        "format": CLASSIFIER_FORMAT,
        "image_size": model.image_size,
        "width": model.body[0].out_channels,
        "feature_dim": model.head.in_features,
        **info,
    }
    with open(os.path.join(staging, "config.json"), "w") as file:
        json.dump(config, file, indent=1)
    try:
        os.replace(staging, folder)
    except OSError:  # another process cached it first: keep theirs
        shutil.rmtree(staging, ignore_errors=True)


def read_digit_classifier(folder: str) -> DigitClassifier:
    """Load a classifier saved by `save_digit_classifier`."""
    with open(os.path.join(folder, "config.json")) as file:
        config = json.load(file)
    model = DigitClassifier(config["image_size"], config["width"], config["feature_dim"])
    model.load_state_dict(load_file(os.path.join(folder, "model.safetensors")))
    return model.eval()


def load_digit_classifier(
    image_size: int = 16,
    device: torch.device | str | None = None,
    config: ClassifierConfig | None = None,
    cache_dir: str | None = None,
) -> DigitClassifier:
    """The digit classifier for `image_size`, trained on first use and cached under $ERASE_HOME."""
    folder = classifier_folder(image_size, cache_dir)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        config = config or ClassifierConfig(image_size=image_size)
        with cpu_threads(chosen_threads(1)):  # a small CNN on shared cores: erase/threads.py
            model = train_digit_classifier(config)
        save_digit_classifier(
            model, folder, test_accuracy=classifier_accuracy(model), training=asdict(config)
        )
    model = read_digit_classifier(folder)
    model.requires_grad_(False)
    return model.to(device) if device is not None else model
