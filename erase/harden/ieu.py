"""`--harden ieu`: weight decay and noise injection on the trained weights during the erasure
(Influence Eliminating Unlearning, Tran and Woo, 2026: "Efficient Unlearning through Maximizing
Relearning Convergence Delay"; it forgets by degrading the forget set while decaying the weights
and injecting noise into them, the retain loss keeping the rest).

At the start of every erasure step the movable entries (the method's trainable weights; SalUn:
the masked entries only) are shrunk toward zero and noised,
`w <- (1 - d) w + s_t * std * eps`, with d = `ieu_decay` (decoupled from the learning rate: it is
AdamW's lr * weight_decay), std each tensor's own standard deviation, and s_t = `ieu_noise`
falling linearly to zero at the last step, so the final steps train the noise out under the
method's own loss (its forget term and, for SalUn, its retain term). The step's loss is the
method's. Both pull the weights away from the original model, the quantity "From Dormant to
Deleted" finds to predict resistance to relearning.

The noise of a step is drawn from the run's seed and the step on the weights' device, so a
resumed run draws what an uninterrupted one drew; nothing is kept across steps but the weights.
The masked entries are updated through `torch.where` on the whole tensor: every other entry keeps
its bits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from erase.errors import EraseError
from erase.harden import Entry, register, stream_seed, tensor_std


@dataclass
class IEUConfig:
    """IEU settings; docs/methods.md#harden gives every default's source."""

    ieu_decay: float = field(
        default=1e-3,
        metadata={
            "help": "ieu: share each trained weight is shrunk toward zero at every erasure step "
            "(AdamW's lr * weight_decay, decoupled from the learning rate)"
        },
    )
    ieu_noise: float = field(
        default=0.01,
        metadata={
            "help": "ieu: standard deviation of the noise added at the first step, as a share of "
            "each tensor's own; it falls linearly to zero at the last step"
        },
    )


@register("ieu")
class IEU:
    """Decay the trained weights and inject annealed noise at every erasure step."""

    Config = IEUConfig
    needs_images = False  # the method's loss is unchanged: ESD's needs no images

    @staticmethod
    def check(config: IEUConfig) -> None:
        """Refuse settings that cannot run, in one line."""
        if not 0 <= config.ieu_decay < 1:
            raise EraseError(f"--ieu-decay must be in [0, 1), got {config.ieu_decay}.")
        if config.ieu_noise < 0:
            raise EraseError(f"--ieu-noise must be 0 or more, got {config.ieu_noise}.")

    def __init__(self, backend, method, config: IEUConfig, train_config, scratch=None):
        # `scratch` (where a technique may keep files) is unused: ieu keeps no copy
        self.method, self.config = method, config
        self.steps = train_config.steps
        self.extra_steps = 0
        self.seed = train_config.seed

    def resolved(self) -> dict:
        """The settings as this run uses them (for metadata.json)."""
        return dict(vars(self.config))

    def step_loss(self, step: int, unet, entries: list[Entry], forget, retain):
        """Decay and noise the movable entries, then the method's own loss."""
        self.shake(step, entries)
        return self.method.loss

    def close(self) -> None:
        """Nothing to free: ieu keeps no state of its own."""

    def noise_share(self, step: int) -> float:
        """s_t: `ieu_noise` at step 0, falling linearly to 0 at the last step."""
        if self.steps <= 1:
            return 0.0
        return self.config.ieu_noise * (1 - step / (self.steps - 1))

    @torch.no_grad()
    def shake(self, step: int, entries: list[Entry]) -> None:
        """w <- (1 - d) w + s_t * std * eps on the movable entries, per tensor."""
        decay, share = self.config.ieu_decay, self.noise_share(step)
        if decay == 0 and share == 0:
            return
        generators = {}
        for entry in entries:
            param = entry.param
            whole = param.detach().float()
            moved = whole * (1 - decay)
            if share > 0:
                if param.device not in generators:
                    generators[param.device] = torch.Generator(device=param.device).manual_seed(
                        stream_seed(self.seed, step, 3)
                    )
                std = tensor_std(whole)
                noise = torch.randn(
                    whole.shape, generator=generators[param.device], device=param.device
                )
                moved += share * std * noise
            moved = moved.to(param.dtype)
            selected = entry.selection()
            param.data.copy_(moved if selected is None else torch.where(selected, moved, param))
