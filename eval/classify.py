"""Class-removal evaluation: generate every class with fixed seeds and classify the images.

For class-conditional models (SalUn's DDPM experiments): unlearning accuracy (UA, 1 - accuracy
on the forgotten class), accuracy on the other classes, and FID of the other classes against
their real images. For Stable Diffusion: a ResNet-50 ImageNet classifier over Imagenette classes.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch

from erase.errors import EraseError

# The Imagenette classes (prompts/ order) as ImageNet-1k indices, for the ResNet-50 check.
CONFIDENT = 0.9  # the probability at which a generated digit counts as clearly its class
IMAGENETTE_TO_IMAGENET = [0, 217, 482, 491, 497, 566, 569, 571, 574, 701]
DIGIT_FID_FEATURE = "digit-classifier penultimate (Inception weights are not available offline)"


class PenultimateFeatures(torch.nn.Module):
    """Wraps a classifier with a `features(images)` method as an FID feature module.

    The classifier is held outside the module tree, so torchmetrics' dtype changes leave it alone.
    """

    def __init__(self, classifier: torch.nn.Module, example_images: torch.Tensor):
        super().__init__()
        self.__dict__["classifier"] = classifier  # not registered as a submodule on purpose
        self.num_features = int(self(example_images[:2]).shape[-1])  # torchmetrics reads this

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D) features of images (B, C, H, W) in [0, 1]."""
        param = next(self.classifier.parameters())
        return self.classifier.features(images.to(param.device, param.dtype)).float().cpu()


def backend_classifier(backend, classifier: torch.nn.Module | None) -> torch.nn.Module:
    """The classifier to score `backend`'s images: the given one, else the backend's own."""
    classifier = classifier if classifier is not None else backend.classifier
    if classifier is None:
        raise EraseError(
            f"No classifier for '{backend.identity}': put a TorchScript classifier.pt (images "
            "in [0, 1] -> logits) in the model folder, or pass --no-eval."
        )
    return classifier


def classify(
    classifier: torch.nn.Module, images: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """Predicted class indices (N,) of images (N, C, H, W) in [0, 1]."""
    return class_probabilities(classifier, images, batch_size).argmax(-1)


@torch.no_grad()
def class_probabilities(
    classifier: torch.nn.Module, images: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """Softmax probabilities (N, K) of images (N, C, H, W) in [0, 1]."""
    device = next(iter(classifier.parameters()), torch.empty(0)).device
    return torch.cat(
        [
            classifier(images[i : i + batch_size].to(device)).float().softmax(-1).cpu()
            for i in range(0, len(images), batch_size)
        ]
    )


@torch.no_grad()
def generate_classes(
    backend,
    num_per_class: int,
    *,
    unet=None,
    seed: int = 0,
    num_steps: int = 50,
    guidance_scale: float | None = None,
    batch_size: int = 250,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`num_per_class` guided samples of every class, class by class, with fixed seeds.

    Returns images (K * n, C, H, W) in [0, 1] and their labels; the same seeds every call.
    """
    num_classes = len(backend.class_names)
    labels = torch.arange(num_classes).repeat_interleave(num_per_class)  # (K * n,)
    seeds = [seed * 1_000_003 + i for i in range(len(labels))]
    guidance = backend.guidance_scale if guidance_scale is None else guidance_scale
    images = [
        backend.sample(
            labels[i : i + batch_size].tolist(),
            seeds[i : i + batch_size],
            num_steps=num_steps,
            guidance_scale=guidance,
            unet=unet,
        )
        for i in range(0, len(labels), batch_size)
    ]
    return torch.cat(images), labels


def class_removal(
    backend,
    forget_class: int,
    *,
    unet=None,
    classifier=None,
    num_per_class: int = 100,
    seed: int = 0,
    num_steps: int = 50,
    guidance_scale: float | None = None,
) -> tuple[dict, torch.Tensor]:
    """UA, forget/retain accuracy, per-class accuracy and retain-class FID of generated images.

    Returns the metrics and the generated images (K * num_per_class, C, H, W), class by class.
    """
    classifier = backend_classifier(backend, classifier)
    forget_class = int(forget_class)
    images, labels = generate_classes(
        backend,
        num_per_class,
        unet=unet,
        seed=seed,
        num_steps=num_steps,
        guidance_scale=guidance_scale,
    )
    probabilities = class_probabilities(classifier, images)  # (K * n, K)
    predicted = probabilities.argmax(-1)
    # Argmax accuracy calls a smudged digit right as long as it is nearer its class than any
    # other; the share classified right with probability >= 0.9 drops when the digits degrade
    # (docs/testbeds.md, "Judging the other digits").
    confident = probabilities.gather(1, labels[:, None]).squeeze(1) >= CONFIDENT
    per_class = {
        name: float((predicted[labels == k] == k).float().mean())
        for k, name in enumerate(backend.class_names)
    }
    forget_accuracy = per_class[backend.class_names[forget_class]]
    retain_names = [n for k, n in enumerate(backend.class_names) if k != forget_class]
    retained = labels != forget_class
    fid, feature_name = retain_fid(backend, classifier, images[retained], forget_class)
    metrics = {
        "ua": 1 - forget_accuracy,
        "forget_accuracy": forget_accuracy,
        "retain_accuracy": sum(per_class[n] for n in retain_names) / len(retain_names),
        "retain_confident_accuracy": float(confident[retained].float().mean()),
        "confidence": CONFIDENT,
        "per_class_accuracy": per_class,
        "fid_retain": fid,
        "fid_feature": feature_name,
        "num_per_class": num_per_class,
        "num_steps": num_steps,
        "guidance_scale": backend.guidance_scale if guidance_scale is None else guidance_scale,
        "seed": seed,
    }
    return metrics, images


def retain_fid(
    backend, classifier, fake_images: torch.Tensor, forget_class: int
) -> tuple[float | None, str]:
    """FID of generated retain-class images against all real images of the retain classes.

    Features are the classifier's penultimate layer where it has one (`features`), else
    Inception; None when neither is available.
    """
    from eval.fid import frechet_distance

    retain_classes = [k for k in range(len(backend.class_names)) if k != forget_class]
    real_images, _ = backend.real_images(retain_classes, 10**9)
    if hasattr(classifier, "features"):
        feature = PenultimateFeatures(classifier, real_images)
        is_digits = type(classifier).__name__ == "DigitClassifier"
        name = DIGIT_FID_FEATURE if is_digits else "classifier penultimate"
    else:
        feature, name = 2048, "inception-2048"
    try:
        return frechet_distance(real_images, fake_images, feature=feature), name
    except EraseError:
        return None, f"{name} (unavailable)"


def write_class_report(
    folder: str,
    before: dict,
    after: dict,
    before_images: torch.Tensor,
    after_images: torch.Tensor,
    class_names: Sequence[str],
) -> None:
    """report.md (before/after table, per-class accuracy) and grid.png (rows = classes) in folder."""
    rows = [
        ("UA (1 - forgotten-class accuracy)", "ua"),
        ("forgotten-class accuracy", "forget_accuracy"),
        ("remaining-class accuracy", "retain_accuracy"),
        ("remaining-class accuracy, confident (p >= 0.9)", "retain_confident_accuracy"),
        ("FID, remaining classes", "fid_retain"),
    ]
    lines = [
        "# Class removal",
        "",
        f"{before['num_per_class']} generated images per class, the same seeds before and after "
        f"(seed {before['seed']}, {before.get('num_steps', '?')} DDIM steps, guidance "
        f"{before.get('guidance_scale', '?')}). FID features: {before.get('fid_feature', '?')}.",
        "",
        "| metric | before | after |",
        "|---|---:|---:|",
    ]
    lines += [f"| {label} | {number(before[key])} | {number(after[key])} |" for label, key in rows]
    lines += ["", "| class | accuracy before | accuracy after |", "|---|---:|---:|"]
    for name in class_names:
        lines.append(
            f"| {name} | {number(before['per_class_accuracy'][name])} | "
            f"{number(after['per_class_accuracy'][name])} |"
        )
    lines += ["", "![before | after](grid.png)", ""]
    with open(os.path.join(folder, "report.md"), "w") as file:
        file.write("\n".join(lines))
    save_class_grid(
        os.path.join(folder, "grid.png"),
        before_images,
        after_images,
        len(class_names),
        before["num_per_class"],
    )


def number(value) -> str:
    """A metric for the table: 3 decimals, or n/a."""
    return "n/a" if value is None else f"{value:.3f}"


def save_class_grid(
    path: str,
    before_images: torch.Tensor,
    after_images: torch.Tensor,
    num_classes: int,
    num_per_class: int,
    columns: int = 8,
) -> None:
    """A PNG grid: one row per class, `columns` images before | a gap | `columns` after."""
    from torchvision.utils import save_image

    shown = min(columns, num_per_class)
    rows = []
    for k in range(num_classes):
        start = k * num_per_class
        before = before_images[start : start + shown]
        after = after_images[start : start + shown]
        gap = torch.ones_like(before[:1])
        rows.append(torch.cat([before, gap, after]))
    grid = torch.cat(rows).float()
    if grid.shape[1] == 1:
        grid = grid.expand(-1, 3, -1, -1)
    scale = max(1, 64 // grid.shape[-1])  # small digits are upscaled to be visible
    if scale > 1:
        grid = torch.nn.functional.interpolate(grid, scale_factor=scale, mode="nearest")
    save_image(grid, path, nrow=2 * shown + 1, padding=2, pad_value=1.0)


@torch.no_grad()
def imagenette_accuracy(
    images: torch.Tensor, class_indices: Sequence[int], weights_path: str | None = None
) -> float:
    """Top-1 ImageNet accuracy of a ResNet-50 on images (N, 3, H, W) in [0, 1] of Imagenette
    classes (indices into the 10 Imagenette classes, prompts/ order)."""
    model = imagenette_resnet50(weights_path)
    device = next(model.parameters()).device
    targets = torch.tensor([IMAGENETTE_TO_IMAGENET[int(k)] for k in class_indices])
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)
    predicted = []
    for start in range(0, len(images), 32):  # resized batch by batch: bounded memory at 512 px
        pixels = torch.nn.functional.interpolate(
            images[start : start + 32].to(device, torch.float32),
            size=(224, 224),
            mode="bilinear",
            antialias=True,
        )
        predicted.append(model((pixels - mean) / std).argmax(-1).cpu())
    return float((torch.cat(predicted) == targets).float().mean())


@functools.lru_cache(maxsize=2)
def imagenette_resnet50(weights_path: str | None = None) -> torch.nn.Module:
    """torchvision's ResNet-50 with ImageNet weights: from `weights_path` or the torch hub cache.

    Loaded once per weights file (callers score class by class).
    """
    from torchvision.models import ResNet50_Weights, resnet50

    from erase.models.sd import default_device

    if weights_path:
        model = resnet50()
        try:
            model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
        except Exception as error:
            raise EraseError(
                f"'{weights_path}' is not a ResNet-50 state dict ({type(error).__name__}): pass "
                "the file torchvision's ResNet50_Weights.IMAGENET1K_V2 downloads."
            ) from None
        return model.eval().to(default_device())
    try:
        return resnet50(weights=ResNet50_Weights.IMAGENET1K_V2).eval().to(default_device())
    except Exception:
        raise EraseError(
            "The ResNet-50 ImageNet weights are not available offline: run once online to cache "
            "them, or pass --classifier-weights PATH (weights_path) to a downloaded resnet50 state dict."
        ) from None
