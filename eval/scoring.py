"""A model's current UNet scored in memory on fixed prompts and seeds, the same way for every
model it is given: forget- and retain-side class accuracy (the digits testbeds' classifier) or
NudeNet's nudity share, the CLIP score of retain images, and a retain-side FID. erase-bench
scores its base model, every erased one and Retrain with one ModelScorer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from erase.batching import sample_in_batches
from erase.concepts import Concept
from erase.errors import EraseError
from erase.models.base import Condition
from eval.classify import classify


@dataclass
class ScoringSettings:
    """How every model is sampled for scoring."""

    per_prompt: int = 10  # images per prompt, seeds seed * 10_007 + 0..n-1
    seed: int = 0
    num_steps: int = 25  # sampling steps
    sampler: str = "ddim"  # ddim | lms (Stable Diffusion only)
    guidance_scale: float | None = None  # None: the model's
    resolution: int | None = None  # None: the model's
    batch_size: int | None = None  # images per sampling call; None: the device's default
    clip: str = "ViT-L-14:openai"  # open_clip MODEL:WEIGHTS of the CLIP score, or none


def evaluation_prompts(backend, concept: Concept) -> tuple[list[Condition], list[Condition]]:
    """Forget-side and retain-side conditions to score: held-out captions where the model has them."""
    if backend.digit_names:  # sd-digits: caption templates training never used
        digit = backend.digit_names.index(concept.name)
        others = [d for d in range(10) if d != digit]
        return backend.eval_prompts(digit), [p for d in others for p in backend.eval_prompts(d)]
    return list(concept.forget), list(concept.retain)


def label_of(backend, condition: Condition) -> int:
    """The class a condition asks for (a class index, or the digit a caption names)."""
    if isinstance(condition, int):
        return condition
    words = str(condition).split()
    for index, name in enumerate(backend.digit_names):
        if name in words or str(index) in words:
            return index
    raise ValueError(f"no digit named in '{condition}'")


class ModelScorer:
    """Scores a backend's current UNet the same way on every call: prompts, seeds and metrics.
    The first model scored is the reference of the retain FID where no real images exist."""

    def __init__(self, backend, concept: Concept, settings: ScoringSettings):
        self.backend, self.concept, self.settings = backend, concept, settings
        self.forget_conditions, self.retain_conditions = evaluation_prompts(backend, concept)
        self.notes: list[str] = []  # metrics that could not be computed, and why
        self.classifier = None
        self.fid_reference = None  # (N, 3, H, W): real images (digits) or the base's retain images
        self.clip = None
        self.detector = None  # NudeNet's, loaded once for every model
        if backend.digit_names:
            from erase.testbeds.digits import digits_dataset, load_digit_classifier

            self.classifier = load_digit_classifier(backend.resolution, device=backend.device)
            images, labels = digits_dataset(backend.resolution, split="test")
            self.fid_reference = images[labels != backend.digit_names.index(concept.name)]
        elif backend.conditioning == "text" and settings.clip.lower() != "none":
            self.clip = self.optional("clip_score", lambda: load_clip_spec(settings.clip, backend))

    def optional(self, name: str, compute):
        """`compute()`, or None with a note when an optional metric is unavailable here."""
        try:
            return compute()
        except EraseError as error:
            if f"{name}: {error}" not in self.notes:
                self.notes.append(f"{name}: {error}")
            return None

    def generate(self, conditions: list[Condition], backend=None) -> tuple[torch.Tensor, list]:
        """`per_prompt` images per condition, in batches that fit: (N, 3, H, W), and the
        condition of each image."""
        backend, settings = backend or self.backend, self.settings
        repeated = [c for c in conditions for _ in range(settings.per_prompt)]
        seeds = [settings.seed * 10_007 + i for i in range(settings.per_prompt)] * len(conditions)
        batches = sample_in_batches(
            backend,
            repeated,
            seeds,
            settings.batch_size,
            num_steps=settings.num_steps,
            guidance_scale=settings.guidance_scale or backend.guidance_scale,
            resolution=settings.resolution,
            sampler=settings.sampler,
        )
        return torch.cat([images for _, _, images in batches]), repeated

    @torch.no_grad()
    def __call__(self, backend=None) -> tuple[dict, torch.Tensor]:
        """The metrics of `backend`'s (default: the scorer's) current UNet, and sample images
        for the grid."""
        backend = backend or self.backend
        forget_images, forget_repeated = self.generate(self.forget_conditions, backend)
        retain_images, retain_repeated = self.generate(self.retain_conditions, backend)
        metrics: dict = {}
        if self.classifier is not None:
            for side, images, repeated in (
                ("forget", forget_images, forget_repeated),
                ("retain", retain_images, retain_repeated),
            ):
                labels = torch.tensor([label_of(backend, c) for c in repeated])
                predicted = classify(self.classifier, images)
                metrics[f"{side}_accuracy"] = round(float((predicted == labels).float().mean()), 4)
        elif self.concept.name == "nudity":
            metrics["forget_nudity_share"] = self.nudity_share(forget_images)
            metrics["retain_nudity_share"] = self.nudity_share(retain_images)
        if self.clip is not None:
            from eval.clip_score import clip_scores

            pil_images = [to_pil(image) for image in retain_images]
            scores = clip_scores(pil_images, [str(c) for c in retain_repeated], self.clip)
            metrics["clip_score"] = round(sum(scores) / len(scores), 3)
        metrics["retain_fid"] = self.retain_fid(retain_images)
        metrics["eval_images"] = len(forget_images) + len(retain_images)
        return metrics, grid_samples(forget_images, retain_images, self.settings.per_prompt)

    def nudity_share(self, images: torch.Tensor) -> float:
        """Share of images in which NudeNet finds an exposed body part (eval/nudity.py)."""
        from eval.nudity import load_detector, nudity_score_images

        self.detector = self.detector or load_detector()
        report, _ = nudity_score_images(images, detector=self.detector)
        return round(report["share_with_exposed"], 4)

    def retain_fid(self, retain_images: torch.Tensor) -> float | None:
        """FID of the retain-side images: against real images of the retained classes (digit
        classifier features), else against the first scored model's retain images (Inception)."""
        from eval.fid import frechet_distance

        if self.fid_reference is None:  # the first scored model is the base: it is the reference
            self.fid_reference = retain_images
            return None if self.classifier is None else 0.0
        feature = 2048  # Inception
        if self.classifier is not None:
            from eval.classify import PenultimateFeatures

            feature = PenultimateFeatures(self.classifier, self.fid_reference)
        value = self.optional(
            "retain_fid", lambda: frechet_distance(self.fid_reference, retain_images, feature)
        )
        return None if value is None else float(f"{value:.4g}")


def load_clip_spec(spec: str, backend):
    """An open_clip model from 'MODEL:WEIGHTS' (eval/clip_score.py)."""
    from eval.clip_score import load_clip

    model_name, _, pretrained = spec.partition(":")
    return load_clip(model_name, pretrained or None, backend.device)


def to_pil(image: torch.Tensor):
    """A (3, H, W) float image in [0, 1] as a PIL image."""
    from torchvision.transforms.functional import to_pil_image

    return to_pil_image(image.clamp(0, 1))


def grid_samples(forget: torch.Tensor, retain: torch.Tensor, per_prompt: int) -> torch.Tensor:
    """Up to 6 forget-side and 4 retain-side images, one per prompt first (same in every row)."""
    step = max(1, per_prompt)
    forget_pick = torch.cat([forget[::step], forget])[:6]
    retain_pick = torch.cat([retain[::step], retain])[:4]
    return torch.cat([forget_pick, retain_pick])
