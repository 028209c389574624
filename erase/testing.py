"""Tiny random models built in code, for tests and benchmark scripts (nothing is downloaded)."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline

from erase.models.small_sd import as_pipeline, small_sd_components
from prompts import concept_templates

TINY_WORDS = [
    "a photo of a nude person wearing clothes an image painting in the style",
    *concept_templates()["imagenette"],
    "cat dog car tree house",
]


def tiny_sd_pipeline(seed: int = 0, image_size: int = 16) -> StableDiffusionPipeline:
    """A Stable Diffusion pipeline with random weights: ~100 k parameters, 16 px images."""
    torch.manual_seed(seed)
    tokenizer, text_encoder, unet, vae, scheduler = small_sd_components(
        TINY_WORDS,
        max_length=16,
        text_width=16,
        unet_channels=(8, 16),
        vae_channels=(8, 8),
        image_size=image_size,
        attention_head_dim=2,
        norm_groups=4,
    )
    return as_pipeline(tokenizer, text_encoder, unet, vae, scheduler)


def save_tiny_sd(folder: str, seed: int = 0) -> str:
    """Build the tiny pipeline and save it as a diffusers folder; returns the folder."""
    tiny_sd_pipeline(seed).save_pretrained(folder, safe_serialization=True)
    return folder
