"""Unlearning methods by name. A method is a loss and the parameters it trains, nothing else.

Adding a method is one new module with a class decorated by `@register("name")` and one import
line at the bottom of this file.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from erase.concepts import Concept
from erase.errors import EraseError
from erase.models.base import Backend, Batch

METHODS: dict[str, type] = {}


class Method(Protocol):
    """What the trainer needs from a method."""

    name: str
    uses_mask: bool  # SalUn: gradients are multiplied by the saliency mask

    def __init__(self, backend: Backend, concept: Concept, config) -> None: ...

    def trainable(self, parameter_name: str) -> bool:
        """Whether the parameter with this name is trained."""

    def loss(
        self, unet: torch.nn.Module, forget: Batch, retain: Batch, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The scalar loss of one step and its named terms for the progress bar."""


def register(name: str) -> Callable[[type], type]:
    """Class decorator adding a method to the registry under `name`."""

    def add(method_class: type) -> type:
        method_class.name = name
        METHODS[name] = method_class
        return method_class

    return add


def get_method(name: str) -> type:
    """The method class registered as `name`, or a one-line error listing the known names."""
    if name not in METHODS:
        raise EraseError(f"Unknown method '{name}': choose one of {', '.join(sorted(METHODS))}.")
    return METHODS[name]


def random_remap(concept: Concept, count: int, generator: torch.Generator) -> list:
    """One random remap condition per sample (SalUn's "random label" / other prompt)."""
    picks = torch.randint(0, len(concept.remap), (count,), generator=generator).tolist()
    return [concept.remap[i] for i in picks]


def noised(backend: Backend, batch: Batch, generator: torch.Generator):
    """Fresh noise, uniform timesteps and the noised latents of a batch: (noise, t, x_t)."""
    latents = batch.latents.to(backend.device)  # (B, C, h, w)
    noise = torch.randn(latents.shape, generator=generator).to(backend.device, latents.dtype)
    num_train_timesteps = backend.noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, num_train_timesteps, (len(latents),), generator=generator)
    timesteps = timesteps.to(backend.device)
    return noise, timesteps, backend.noise_scheduler.add_noise(latents, noise, timesteps)


def denoising_loss(
    backend: Backend, unet: torch.nn.Module, batch: Batch, generator
) -> torch.Tensor:
    """The ordinary diffusion loss MSE(eps(x_t, c, t), noise) on a batch."""
    noise, timesteps, noisy = noised(backend, batch, generator)
    prediction = backend.predict_noise(unet, noisy, timesteps, backend.encode(batch.conditions))
    return torch.nn.functional.mse_loss(prediction.float(), noise.float())


# Registry lines: importing a module registers its method.
from erase.methods import esd, fmn, salun  # noqa: E402,F401
