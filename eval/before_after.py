"""Before / after images of an erasure on a text backend: a few forget and retain prompts with
the same seeds, sampled by the UNet before training and again after it."""

from __future__ import annotations

import argparse

import torch

from erase.batching import sample_in_batches
from erase.concepts import Concept

PROMPTS_PER_SIDE = 3  # forget prompts, then as many retain prompts
SEEDS_PER_PROMPT = 3


def grid_prompts(concept: Concept) -> list[str]:
    """The first few distinct forget prompts, then the first few distinct retain prompts."""
    forget = list(dict.fromkeys(map(str, concept.forget)))[:PROMPTS_PER_SIDE]
    retain = list(dict.fromkeys(map(str, concept.retain)))[:PROMPTS_PER_SIDE]
    return forget + retain


@torch.no_grad()
def sample_grid_images(backend, prompts: list[str], args: argparse.Namespace) -> torch.Tensor:
    """SEEDS_PER_PROMPT images per prompt with the run's data settings: (P * S, 3, H, W)."""
    repeated = [prompt for prompt in prompts for _ in range(SEEDS_PER_PROMPT)]
    seeds = [args.seed + k for k in range(SEEDS_PER_PROMPT)] * len(prompts)
    batches = sample_in_batches(
        backend,
        repeated,
        seeds,
        getattr(args, "gen_batch_size", None),
        num_steps=args.gen_steps,
        guidance_scale=args.guidance_scale,
        resolution=args.resolution,
    )
    return torch.cat([images for _, _, images in batches])


def save_before_after(path: str, prompts: list[str], before, after) -> None:
    """grid.png: one row per prompt, its seeds before | a gap | the same seeds after."""
    from eval.classify import save_class_grid

    save_class_grid(path, before, after, len(prompts), SEEDS_PER_PROMPT)
