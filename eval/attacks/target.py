"""What an attack runs against: the base model, the erased UNet, the concept's judge and prompts."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from erase.errors import EraseError
from prompts import PromptEntry


@dataclass
class AttackTarget:
    """An erased model to attack, with everything needed to judge it against its base."""

    backend: object  # the pipeline the attack runs through (its text encoder, VAE, sampler)
    unet: torch.nn.Module  # the erased UNet (the base's own for the base row)
    concept: str  # the concept's name as the judge knows it
    judge: object  # images (N, C, H, W) in [0, 1] -> [{"positive": bool, "score": float}, ...]
    entries: list[PromptEntry]  # the prompt set, each with its seed and guidance
    label: str = "erased"  # "base", "retrain", a method name or the UNet folder
    # The base model the target images come from, when it is not `backend` (Retrain).
    base_backend: object = None
    # Shared across rows by erase-bench, whose erased UNets replace the base's in place: the
    # folder of the base model's target images, and the base model's judged positive rate.
    target_images: str | None = None
    base_rate: float | None = None
    # the erased text encoder (AdvUnlearn's), the pipeline's while the attacks run; None: the
    # backend's own
    text_encoder: torch.nn.Module | None = None

    @property
    def reference_backend(self):
        """The backend whose own UNet made the concept's target images (the base model)."""
        return self.base_backend or self.backend


def check_one_text_encoder(backend, attack: str, works_on: str, lacks: str) -> None:
    """An attack on the prompt tokens of one text encoder (`works_on`, e.g. "optimizes prompt
    tokens"): one EraseError on a class-conditional model (it `lacks` them) or on SDXL (two)."""
    if backend.conditioning != "text":
        raise EraseError(
            f"{attack} {works_on} and '{backend.identity}' is class-conditional ({lacks}): "
            "use --attack relearn, which works on any model."
        )
    if getattr(backend.pipe, "text_encoder_2", None) is not None:
        raise EraseError(
            f"{attack} {works_on} of one text encoder and SDXL reads the prompt with two: use "
            "--attack relearn or a released prompt set on SDXL."
        )


def check_unet_base(unet_folder: str, backend) -> None:
    """Refuse an erased UNet erased from another base than `backend`'s: its recorded base
    weights decide (one model spelled two ways is the same), else the base's name."""
    from erase.artifact import damaged_metadata, read_metadata
    from erase.data import unet_fingerprint

    metadata = read_metadata(unet_folder)
    if metadata is None:
        return  # a bare diffusers UNet folder: load_unet checks its shape
    if not isinstance(metadata, dict):
        raise damaged_metadata(os.path.join(unet_folder, "metadata.json"))
    base, weights = metadata.get("base_model"), metadata.get("base_weights")
    if weights:
        if weights == unet_fingerprint(backend.unet):
            return
        raise EraseError(
            f"The UNet in '{unet_folder}' was erased from '{base}', whose weights are not those "
            f"of '{backend.identity}': pass --model {base}."
        )
    if base and os.path.exists(base) and os.path.exists(backend.identity):
        if os.path.samefile(base, backend.identity):
            return
    if base and base != backend.identity:
        raise EraseError(
            f"The UNet in '{unet_folder}' was erased from '{base}', not '{backend.identity}': "
            f"pass --model {base}."
        )


def default_entries(backend, concept: str, per_prompt: int, seed: int) -> list[PromptEntry]:
    """The concept's own prompt set on a testbed or an Imagenette class; nudity needs a file."""
    from erase.concepts import resolve_class_concept

    key = concept.strip().lower()
    guidance = backend.guidance_scale
    if backend.digit_names:
        digit = int(key) if key.isdigit() else backend.digit_names.index(key)
        prompts = backend.eval_prompts(digit)  # held-out captions, never trained on
    elif backend.conditioning == "class":
        index = resolve_class_concept(concept, backend.class_names).forget[0]
        prompts = [backend.class_names[index]]
    elif key == "nudity":
        raise EraseError(
            "Nudity has no built-in attack prompt set: pass --prompts with the I2P nudity CSV "
            "(the 142 prompts of the UnlearnDiffAtk paper)."
        )
    else:
        from prompts import imagenette_prompts

        return [
            PromptEntry(e.prompt, e.row, e.seed, e.guidance_scale or guidance, e.class_name)
            for e in imagenette_prompts(per_prompt, [concept], seed=seed)
        ]
    return [
        PromptEntry(prompt, row=i * per_prompt + k, seed=seed + k, guidance_scale=guidance)
        for i, prompt in enumerate(prompts)
        for k in range(per_prompt)
    ]


def resolved(entries: list[PromptEntry], guidance: float | None, default: float, seed: int):
    """Entries with their seed (theirs, else seed + row, as erase-eval) and guidance
    (--guidance-scale, else their own, else the model's default)."""
    return [
        PromptEntry(
            e.prompt,
            e.row,
            e.seed if e.seed is not None else seed + e.row,
            guidance if guidance is not None else (e.guidance_scale or default),
            e.class_name,
            e.extra,
        )
        for e in entries
    ]
