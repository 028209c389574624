"""What every backend offers the methods, the trainer and the evaluation.

A backend wraps one diffusion model family. Methods see only this interface, so the same SalUn,
ESD or Forget-Me-Not code trains a Stable Diffusion UNet and a class-conditional DDPM.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from erase.errors import EraseError

# A condition is a prompt (text backends) or a class index (class backends).
Condition = str | int


@dataclass
class Batch:
    """Clean latents and the condition each was made with."""

    latents: torch.Tensor  # (B, C, h, w), already scaled for the UNet
    conditions: list[Condition]


class Backend(Protocol):
    """The model-family interface that methods, trainer and evaluation rely on."""

    identity: str  # hub id, folder or built-in name of the base model
    conditioning: str  # "text" or "class"
    unet: torch.nn.Module  # the denoiser being erased
    noise_scheduler: object  # diffusers DDPMScheduler used for training noise
    device: torch.device
    latent_shape: tuple[int, int, int]  # (C, h, w) of one latent at the default resolution
    class_names: list[str]  # class backends: names by index; text backends: []
    resolution: int  # default image size in pixels
    guidance_scale: float  # default sampling guidance (SD 7.5, DDPM 2.0)

    def encode(self, conditions: Sequence[Condition]) -> torch.Tensor:
        """Conditioning for the UNet: prompt embeddings (B, L, D) or class labels (B,)."""

    def unconditional(self, batch_size: int) -> torch.Tensor:
        """The unconditional conditioning: empty-prompt embeddings or the null class."""

    def predict_noise(
        self,
        unet: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        cond: torch.Tensor,
    ) -> torch.Tensor:
        """The prediction of `unet` (the trained one or a frozen copy) for `noisy` latents: the
        noise, the velocity or the clean sample, as the noise scheduler's `prediction_type` says
        (losses compare it with `denoising_target`)."""

    def to_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Encode images (B, 3|1, H, W) in [0, 1] to the scaled latents the UNet denoises."""

    def make_sampler(self, num_steps: int) -> object:
        """A fresh DDIM scheduler with `num_steps` timesteps set, matching the noise schedule."""

    def sample(
        self,
        conditions: Sequence[Condition],
        seeds: Sequence[int],
        *,
        num_steps: int,
        guidance_scale: float,
        resolution: int | None = None,
        unet: torch.nn.Module | None = None,
        progress: bool = False,
        sampler: str = "ddim",
    ) -> torch.Tensor:
        """Generate one image per condition and seed: (B, 3, H, W) floats in [0, 1], with
        `sampler` (ddim; lms on Stable Diffusion)."""

    # Class backends only: the dataset's images, the forget/retain sets of class forgetting.
    # def real_images(self, classes: list[int], count: int) -> tuple[torch.Tensor, list[int]]

    def save_unet(self, unet: torch.nn.Module, folder: str) -> None:
        """Write `unet` in diffusers format (config.json + safetensors) into `folder`."""

    def load_unet(self, folder: str) -> torch.nn.Module:
        """Load a UNet saved by `save_unet` (or any diffusers UNet folder) for this backend."""


def no_gradient_checkpointing(self, enabled: bool) -> None:
    """A backend whose UNet always keeps its activations (the small DDPM)."""


def no_concept_prompts(self, concept: str) -> None:
    """None: the concept's prompts come from erase/concepts.py, not from the backend."""


def no_eval_prompts(self, condition) -> None:
    """None: a class is evaluated with the concept's own prompts."""


def no_prompt_cache(self) -> None:
    """A backend that caches no prompt embeddings (the class-conditional DDPM)."""


def no_encoders_off(self, folder) -> None:
    """A backend without text encoders or VAE (the class-conditional DDPM): nothing to move."""


def no_encoders_on(self) -> None:
    """A backend without text encoders or VAE: nothing to bring back."""


# The optional parts of a backend, with what a backend that does not define one gets
# (`declare_optional` fills them in, so the pipeline, the bench and the attacks read them
# without probing).
OPTIONAL = {
    "gen_precision": "auto",  # precision of image generation (text backends: see --gen-precision)
    "set_gradient_checkpointing": no_gradient_checkpointing,
    # the frozen encoders (text, VAE) off the device while only the UNet trains, and back
    "encoders_off": no_encoders_off,
    "encoders_on": no_encoders_on,
    # drop the cached prompt embeddings (after a method trained the text encoder)
    "forget_prompt_embeddings": no_prompt_cache,
    "concept_prompts": no_concept_prompts,  # a testbed's own prompts of a concept (sd-digits)
    "eval_prompts": no_eval_prompts,  # a testbed's held-out prompts of a class (sd-digits)
    "digit_names": None,  # sd-digits: the digits' names, its classes
    "eval_steps": 50,  # DDIM steps of evaluation images (the testbeds: 25)
    # The sampler erase-attack generates with by default: the attacks' reference code samples
    # Stable Diffusion with LMS (the SD backend says so); DDIM elsewhere, the testbeds included.
    "reference_sampler": "ddim",
    "method_defaults": {},  # a testbed's measured method settings, by method (docs/methods.md)
    "classifier": None,  # a class backend's own classifier (the digits testbeds)
    "cpu_threads": None,  # torch CPU threads on shared cores (testbeds: 1, erase/threads.py)
    "training_seconds": None,  # how long a testbed's base model took to train (the cost yardstick)
}


def declare_optional(backend_class: type) -> type:
    """Class decorator: the default of every optional part `backend_class` does not define."""
    for part, default in OPTIONAL.items():
        if not hasattr(backend_class, part):
            setattr(backend_class, part, default)
    return backend_class


# What a UNet may be trained to predict (diffusers' `prediction_type`), and what erase trains.
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def prediction_type(noise_scheduler) -> str:
    """The scheduler's `prediction_type`, or a one-line error for one that erase cannot train."""
    kind = noise_scheduler.config.get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise EraseError(
            f"The model's noise scheduler predicts '{kind}', which erase cannot train: use a "
            "model whose scheduler config has prediction_type epsilon, v_prediction or sample."
        )
    return kind


def denoising_target(
    noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet should predict for `add_noise(latents, noise, timesteps)`: the noise
    (epsilon), the velocity sqrt(a_t) noise - sqrt(1 - a_t) latents (v_prediction, diffusers'
    `get_velocity`), or the clean latents (sample). Every loss takes its target from here."""
    kind = prediction_type(noise_scheduler)
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    return latents if kind == "sample" else noise
