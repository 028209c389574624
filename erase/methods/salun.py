"""SalUn: saliency unlearning (Fan et al., ICLR 2024; OPTML-Group/Unlearn-Saliency).

Forget images seen under the forget condition are pushed to what the model itself predicts for
them under a remap condition (the retain prompt, or a random other class), while the ordinary
denoising loss on retain images keeps the rest intact. Only the salient weights move: the
trainer multiplies every gradient by the saliency mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from erase.concepts import Concept
from erase.errors import EraseError
from erase.methods import denoising_loss, noised, random_remap, register
from erase.models.base import Backend, Batch


@dataclass
class SalUnConfig:
    """SalUn settings; None means the reference default for the backend and concept."""

    alpha: float | None = None  # retain-loss weight: 0.1 nudity, 0.5 class-wise, 1e-3 DDPM
    mask_ratio: float = 0.5  # share of weights kept by the saliency mask (reference: top 50 %)
    mask_guidance: float | None = None  # guidance of the mask's loss: 7.5 SD, 2.0 DDPM


@register("salun")
class SalUn:
    """Masked concept remapping with a retain denoising loss."""

    Config = SalUnConfig
    uses_mask = True

    def __init__(self, backend: Backend, concept: Concept, config: SalUnConfig):
        if not 0 < config.mask_ratio <= 1:
            raise EraseError(f"--mask-ratio must be in (0, 1], got {config.mask_ratio}.")
        self.backend, self.concept, self.config = backend, concept, config

    @staticmethod
    def defaults(backend: Backend, concept: Concept, num_forget: int) -> dict:
        """Reference settings (DESIGN.md) for this backend and concept."""
        if backend.conditioning == "class":  # reference DDPM/ on CIFAR-10
            settings = dict(
                alpha=1e-3,
                mask_guidance=2.0,
                lr=1e-4,
                batch_size=128,
                steps=500,
                max_grad_norm=1.0,
                optimizer="adam",
            )
            # A small testbed may have measured its own (ddpm-digits: the reference collapses it).
            settings.update(getattr(backend, "method_defaults", {}).get("salun", {}))
            return settings
        class_wise = len(concept.remap) > 1  # a random other class per sample
        epochs = 5 if class_wise else 1
        batch_size = 8
        return dict(
            alpha=0.5 if class_wise else 0.1,
            mask_guidance=7.5,
            lr=1e-5,
            batch_size=batch_size,
            steps=epochs * -(-num_forget // batch_size),
            max_grad_norm=None,
            optimizer="adam",
        )

    def trainable(self, parameter_name: str) -> bool:
        """Every UNet weight is trainable; the saliency mask decides which ones move."""
        return True

    def forget_term(self, unet: torch.nn.Module, forget: Batch, generator: torch.Generator):
        """MSE between eps(x_t, c_forget) and the stop-gradient eps(x_t, c_remap)."""
        backend = self.backend
        _, timesteps, noisy = noised(backend, forget, generator)
        remap = random_remap(self.concept, len(forget.conditions), generator)
        with torch.no_grad():
            target = backend.predict_noise(unet, noisy, timesteps, backend.encode(remap))
        prediction = backend.predict_noise(
            unet, noisy, timesteps, backend.encode(forget.conditions)
        )
        return torch.nn.functional.mse_loss(prediction.float(), target.float())

    def loss(self, unet, forget: Batch, retain: Batch, generator: torch.Generator):
        """forget remapping + alpha * retain denoising loss."""
        forget_loss = self.forget_term(unet, forget, generator)
        retain_loss = denoising_loss(self.backend, unet, retain, generator)
        total = forget_loss + self.config.alpha * retain_loss
        return total, {"forget": forget_loss.item(), "retain": retain_loss.item()}
