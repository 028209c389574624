"""`--harden perturb`: after the erasure, move the weights away from where the erasure left
them, then recover what must stay (UNDO's noise mixing, "Distillation robustifies unlearning";
"From Dormant to Deleted": the distance from the original weights predicts resistance).

At the step after the erasure's last, the movable entries (the method's trainable weights; SalUn:
the masked entries only) are mixed with noise, `w <- (1 - a) w + a (mean + std * eps)`, with each
tensor's own mean and standard deviation standing in for the random initialisation UNDO mixes
with (a = `perturb_noise`). Then `perturb_steps` more steps train the method's forget objective
plus `perturb_retain_weight` times the plain denoising loss on retain data, with the same
optimizer. The noise is drawn from the run's seed, so a resumed run mixes the same noise, and
the mixed weights are in every later checkpoint. No copy of the weights is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from erase.errors import EraseError
from erase.harden import Entry, register, stream_seed, tensor_std
from erase.methods import denoising_loss


@dataclass
class PerturbConfig:
    """Perturb settings; docs/methods.md#harden gives every default's source."""

    perturb_noise: float = field(
        default=0.1,
        metadata={"help": "perturb: share of noise mixed into the trained weights (UNDO's alpha)"},
    )
    perturb_steps: int | None = field(
        default=None,
        metadata={"help": "perturb: recovery steps after the mixing (default: --steps)"},
    )
    perturb_retain_weight: float = field(
        default=1.0,
        metadata={"help": "perturb: weight of the retain denoising loss during the recovery"},
    )


@register("perturb")
class Perturb:
    """Noise-mix the trained weights after the erasure, then recover with the forget term on."""

    Config = PerturbConfig
    needs_images = True  # the recovery's retain loss reads retain images (ESD makes none itself)

    @staticmethod
    def check(config: PerturbConfig) -> None:
        """Refuse settings that cannot run, in one line."""
        if not 0 <= config.perturb_noise <= 1:
            raise EraseError(f"--perturb-noise must be in [0, 1], got {config.perturb_noise}.")
        if config.perturb_steps is not None and config.perturb_steps < 0:
            raise EraseError(f"--perturb-steps must be 0 or more, got {config.perturb_steps}.")
        if config.perturb_retain_weight < 0:
            raise EraseError(
                f"--perturb-retain-weight must be 0 or more, got {config.perturb_retain_weight}."
            )

    def __init__(self, backend, method, config: PerturbConfig, train_config, scratch=None):
        # `scratch` (where a technique may keep files) is unused: perturb keeps no copy
        self.backend, self.method, self.config = backend, method, config
        self.erase_steps = train_config.steps
        self.extra_steps = (
            train_config.steps if config.perturb_steps is None else config.perturb_steps
        )
        self.seed = train_config.seed

    def resolved(self) -> dict:
        """The settings as this run uses them (for metadata.json)."""
        return {**vars(self.config), "perturb_steps": self.extra_steps}

    def step_loss(self, step: int, unet, entries: list[Entry], forget, retain):
        """The method's loss during the erasure; from the first recovery step (after mixing the
        noise in at its start), forget objective + weight * retain denoising loss."""
        if step < self.erase_steps:
            return self.method.loss
        if step == self.erase_steps:
            self.mix_noise(entries)
        weight = self.config.perturb_retain_weight

        def loss(unet, forget_batch, retain_batch, generator):
            forget_term, _ = self.method.forget_loss(unet, forget_batch, retain_batch, generator)
            retain_term = denoising_loss(self.backend, unet, retain_batch, generator)
            total = forget_term + weight * retain_term
            return total, {"forget": forget_term.item(), "retain": retain_term.item()}

        return loss

    def close(self) -> None:
        """Nothing to free: perturb keeps no state of its own."""

    @torch.no_grad()
    def mix_noise(self, entries: list[Entry]) -> None:
        """w <- (1 - a) w + a (mean + std * eps) on the movable entries, per tensor."""
        share = self.config.perturb_noise
        generator = torch.Generator().manual_seed(stream_seed(self.seed, self.erase_steps, 1))
        for entry in entries:
            whole = entry.param.detach().float()
            mean = whole.mean()
            std = tensor_std(whole)
            values = entry.values(whole)
            noise = torch.randn(values.shape, generator=generator).to(values.device)
            entry.assign((1 - share) * values + share * (mean + std * noise))
