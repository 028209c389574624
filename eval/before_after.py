"""Before / after images of an erasure on a text backend: a few forget and retain prompts with
the same seeds, sampled by the UNet before training and again after it."""

from __future__ import annotations

import os

import torch

from erase.batching import sample_in_batches
from erase.concepts import Concept
from erase.config import ErasureConfig

PROMPTS_PER_SIDE = 3  # forget prompts, then as many retain prompts
SEEDS_PER_PROMPT = 3


def grid_prompts(concept: Concept) -> list[str]:
    """The first few distinct forget prompts, then the first few distinct retain prompts."""
    forget = list(dict.fromkeys(map(str, concept.forget)))[:PROMPTS_PER_SIDE]
    retain = list(dict.fromkeys(map(str, concept.retain)))[:PROMPTS_PER_SIDE]
    return forget + retain


@torch.no_grad()
def sample_grid_images(backend, prompts: list[str], config: ErasureConfig) -> torch.Tensor:
    """SEEDS_PER_PROMPT images per prompt with the run's data settings: (P * S, 3, H, W)."""
    repeated = [prompt for prompt in prompts for _ in range(SEEDS_PER_PROMPT)]
    seeds = [config.seed + k for k in range(SEEDS_PER_PROMPT)] * len(prompts)
    batches = sample_in_batches(
        backend,
        repeated,
        seeds,
        config.gen_batch_size,
        num_steps=config.gen_steps,
        guidance_scale=config.guidance_scale,
        resolution=config.resolution,
    )
    return torch.cat([images for _, _, images in batches])


def save_before_after(path: str, prompts: list[str], before, after) -> None:
    """grid.png: one row per prompt, its seeds before | a gap | the same seeds after."""
    from eval.classify import save_class_grid

    save_class_grid(path, before, after, len(prompts), SEEDS_PER_PROMPT)


class GridEvaluation:
    """grid.png of a text model's erasure: a few forget and retain prompts before | after."""

    name = "grid"

    def __init__(self, config: ErasureConfig):
        self.config = config
        self.prompts: list[str] = []
        self.before_images = None

    def before(self, backend, concept: Concept) -> None:
        """Sample the grid's prompts with the UNet before training."""
        if backend.conditioning == "text" and not self.config.no_grid:
            self.prompts = grid_prompts(concept)
            self.before_images = sample_grid_images(backend, self.prompts, self.config)

    def after(self, backend, staging: str, is_main_process: bool) -> dict:
        """Sample them again and write grid.png into the artifact; no metadata."""
        if self.before_images is not None:
            after_images = sample_grid_images(backend, self.prompts, self.config)
            if is_main_process:
                path = os.path.join(staging, "grid.png")
                save_before_after(path, self.prompts, self.before_images, after_images)
        return {}


class ClassRemovalEvaluation:
    """A class model's erasure measured before and after: UA, accuracies, retain FID, report.md."""

    name = "eval"

    def __init__(self, config: ErasureConfig):
        self.config = config
        self.forget_class = None
        self.before_result = None

    def measure(self, backend):
        """Class-removal metrics and images of the current UNet (same seeds before and after)."""
        from eval.classify import class_removal

        return class_removal(
            backend,
            self.forget_class,
            num_per_class=self.config.eval_per_class,
            seed=self.config.seed,
            num_steps=self.config.eval_steps or backend.eval_steps,
        )

    def before(self, backend, concept: Concept) -> None:
        """Measure the base model."""
        if backend.conditioning == "class" and not self.config.no_eval:
            self.forget_class = concept.forget[0]
            self.before_result = self.measure(backend)

    def after(self, backend, staging: str, is_main_process: bool) -> dict:
        """Measure the erased model, write report.md and grid.png; the metadata's evaluation."""
        if self.before_result is None:
            return {}
        from eval.classify import write_class_report

        (before, before_images), (after, after_images) = self.before_result, self.measure(backend)
        if is_main_process:
            write_class_report(
                staging, before, after, before_images, after_images, backend.class_names
            )
        return {"evaluation": {"before": before, "after": after}}


def before_after_evaluations(config: ErasureConfig) -> list:
    """What erase-concept measures around training: the class-removal evaluation (class models)
    and the grid (text models), in that order."""
    return [ClassRemovalEvaluation(config), GridEvaluation(config)]
