"""Unlearning methods by name. A method is a loss and the parameters it trains, nothing else
(a closed-form method, UCE: the parameters it edits and the edit).

Adding a method is one new module with a class decorated by `@register("name")` and one import
line at the bottom of this file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from types import SimpleNamespace
from typing import Protocol

import torch

from erase.concepts import Concept
from erase.errors import EraseError
from erase.models.base import Backend, Batch, denoising_target

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


def no_prepare(self, forget_latents, forget_conditions, generator) -> None:
    """A method's stage before training (FMN's textual inversion); most have none."""


def no_begin_step(self, step: int) -> None:
    """A method told which training step starts (AdvUnlearn's warm-up); most need not know."""


# The optional parts of a method, with what a method that does not define one gets
# (`register` fills them in, so the pipeline and the trainer call them without probing).
OPTIONAL = {
    "needs_images": True,  # False: the method samples its own x_t (ESD), no forget set is made
    "gradient_checkpointing": True,  # False: the method's hooks need every activation (FMN)
    # True: the method runs the text encoder itself (FMN's textual inversion), so the encoders
    # stay on the device; otherwise they wait on the host while the mask and training run
    "runs_text_encoder": False,
    "loss_is_mean_over_samples": True,  # False: the loss cannot be split into micro-batches
    "frozen_unet": None,  # a frozen copy of the UNet the loss reads (ESD's teacher)
    "clip_before_mask": None,  # a gradient norm clipped to before the mask (SalUn on DDPM)
    # the forget objective alone, (loss, terms) as `loss` gives them: what --harden measures after
    # a simulated relearning and keeps on during a recovery; None: the method cannot be hardened
    "forget_loss": None,
    "prepare": no_prepare,
    "begin_step": no_begin_step,
    # True: the method trains the text encoder (AdvUnlearn), not the UNet; the artifact gains
    # text_encoder/ beside the unchanged unet/
    "trains_text_encoder": False,
    # a closed-form method's weight edit, `edit(unet) -> dict` (what it edited, for metadata),
    # run in place of the data, mask and training phases; None: the method trains (`loss`)
    "edit": None,
    # True: the method reads prompts (UCE's edit of their projections), so a class-conditional
    # model is refused before it is loaded
    "text_only": False,
}


def declare_optional(method_class: type) -> type:
    """Class decorator: the default of every optional part `method_class` does not define."""
    for part, default in OPTIONAL.items():
        if not hasattr(method_class, part):
            setattr(method_class, part, default)
    return method_class


def register(name: str) -> Callable[[type], type]:
    """Class decorator adding a method to the registry under `name` (with its optional parts)."""

    def add(method_class: type) -> type:
        declare_optional(method_class)
        method_class.name = name
        METHODS[name] = method_class
        return method_class

    return add


# The cases whose reference defaults --help shows: (label, backend conditioning, concept kind).
REFERENCE_CASES = (
    ("SD nudity", "text", "nudity"),
    ("SD class", "text", "class"),
    ("DDPM on CIFAR-10", "class", "class"),
)
CIFAR10_RETAIN = (
    45_000  # the class case stands for the reference: 3 x 32 x 32, 45,000 retain images
)


def reference_defaults(method_class: type) -> dict[str, dict[str, object]]:
    """Each setting's reference default by case of REFERENCE_CASES (800 forget images): the
    method's own `defaults` for a plain backend over its Config's defaults; what --help prints."""
    by_setting: dict[str, dict[str, object]] = {}
    for label, conditioning, kind in REFERENCE_CASES:
        backend = SimpleNamespace(  # a plain backend of the case's sizes, no testbed's settings
            conditioning=conditioning,
            method_defaults={},
            latent_shape=(3, 32, 32),
            real_images=lambda classes, count: (None, [0] * min(count, CIFAR10_RETAIN)),
        )
        concept = Concept(name=kind, forget=[0], retain=[1], kind=kind)
        settings = {
            config_field.name: config_field.default
            for config_field in dataclasses.fields(method_class.Config)
            if config_field.default is not None and config_field.default is not dataclasses.MISSING
        }
        settings.update(method_class.defaults(backend, concept, 800))
        for name, value in settings.items():
            by_setting.setdefault(name, {})[label] = value
    return by_setting


def get_method(name: str) -> type:
    """The method class registered as `name`, or a one-line error listing the known names."""
    if name not in METHODS:
        raise EraseError(f"Unknown method '{name}': choose one of {', '.join(sorted(METHODS))}.")
    return METHODS[name]


def remap_conditions(concept: Concept, conditions, generator: torch.Generator) -> list:
    """Each forget sample's remap condition (SalUn's pseudo label / other prompt): one of the
    remap targets of the concept the sample belongs to, drawn at random when there are several."""
    remapped = []
    for condition in conditions:
        targets = concept.remap_for(condition)
        remapped.append(targets[int(torch.randint(0, len(targets), (1,), generator=generator))])
    return remapped


def sample_timesteps(count: int, num_train_timesteps: int, generator, antithetic: bool = False):
    """(B,) uniform timesteps; antithetic: the first half t, the rest T - t - 1 (the reference
    DDPM/runners/diffusion.py pairs them to lower the loss's variance)."""
    if not antithetic:
        return torch.randint(0, num_train_timesteps, (count,), generator=generator)
    half = torch.randint(0, num_train_timesteps, (count // 2 + 1,), generator=generator)
    return torch.cat([half, num_train_timesteps - half - 1])[:count]


def noised(backend: Backend, batch: Batch, generator: torch.Generator, antithetic: bool = False):
    """Fresh noise and uniform timesteps on a batch: (target, t, x_t), where the target is what
    the UNet should predict for x_t (the noise, or the velocity of a v-prediction model)."""
    latents = batch.latents.to(backend.device)  # (B, C, h, w)
    noise = torch.randn(latents.shape, generator=generator).to(backend.device, latents.dtype)
    num_train_timesteps = backend.noise_scheduler.config.num_train_timesteps
    timesteps = sample_timesteps(len(latents), num_train_timesteps, generator, antithetic)
    timesteps = timesteps.to(backend.device)
    noisy = backend.noise_scheduler.add_noise(latents, noise, timesteps)
    return denoising_target(backend.noise_scheduler, latents, noise, timesteps), timesteps, noisy


def dropped_to_null(backend: Backend, cond: torch.Tensor, probability: float, generator):
    """`cond` with each sample replaced by the unconditional one with `probability`, as the
    class-conditional reference does in every training pass (classifier-free guidance)."""
    if not probability:
        return cond
    dropped = torch.rand(len(cond), generator=generator) < probability  # (B,)
    dropped = dropped.to(cond.device).view(-1, *[1] * (cond.dim() - 1))
    return torch.where(dropped, backend.unconditional(len(cond)).to(cond.dtype), cond)


def squared_error(prediction: torch.Tensor, target: torch.Tensor, reduction: str = "mean"):
    """'mean': the mean over every element (ldm, diffusers); 'sum': summed over each sample's
    pixels, then the batch mean (the reference DDPM/functions/losses.py)."""
    error = (prediction.float() - target.float()).square()  # (B, C, h, w)
    if reduction == "sum":
        return error.flatten(1).sum(1).mean()
    if reduction == "mean":
        return error.mean()
    raise EraseError(f"The loss reduction must be 'mean' or 'sum', got '{reduction}'.")


def denoising_loss(
    backend: Backend,
    unet: torch.nn.Module,
    batch: Batch,
    generator,
    *,
    reduction: str = "mean",
    cond_drop: float = 0.0,
    antithetic: bool = False,
) -> torch.Tensor:
    """The ordinary diffusion loss on a batch: the UNet's prediction for (x_t, c, t) against
    its target (the noise, or the velocity of a v-prediction model)."""
    target, timesteps, noisy = noised(backend, batch, generator, antithetic)
    cond = dropped_to_null(backend, backend.encode(batch.conditions), cond_drop, generator)
    prediction = backend.predict_noise(unet, noisy, timesteps, cond)
    return squared_error(prediction, target, reduction)


# Registry lines: importing a module registers its method.
from erase.methods import advunlearn, esd, fmn, salun, uce  # noqa: E402,F401
