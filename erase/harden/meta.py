"""`--harden meta`: a first-order simulated-relearning term (Meta-Unlearning, Gao et al., ICCV
2025, sail-sg/Meta-Unlearning, its first-order form; FOMAML).

Every `harden_every` steps, before the step's backward: the movable entries (the method's
trainable weights; SalUn: only the masked entries) are saved, the attacker's fine-tune is
simulated on them in place (`meta_steps` steps of the plain denoising loss on forget batches,
Adam or SGD, a learning rate drawn log-uniformly from [meta_lr_min, meta_lr_max]), the gradient
of the method's forget objective is taken at the adapted weights, and the saved values are
written back, bit for bit. That gradient, times `meta_weight`, is added to the step's update
through the surrogate term `meta_weight * sum(w * g)` (its gradient in w is exactly
`meta_weight * g`), so every update path of the trainer (masked Adam stepped in backward,
clipping, accumulation) applies it as it applies the method's own gradient.

Memory: one copy of the movable entries (SalUn at ratio 0.5: half the UNet's weights, 1.7 GB at
SD v1.4 scale, not a second UNet), the inner optimizer's moments for them with Adam (twice
that; none with SGD), and while a gradient is taken one dense gradient of the trained
parameters (3.4 GB at SD scale for SalUn), freed before the step's own backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from erase.data import batch_at
from erase.errors import EraseError
from erase.harden import Entry, register, stream_seed
from erase.methods import denoising_loss


@dataclass
class MetaConfig:
    """Meta settings; docs/methods.md#harden gives every default's source."""

    harden_every: int = field(
        default=1,
        metadata={"help": "meta: simulate the relearning every N erasure steps (reference: 1)"},
    )
    meta_steps: int = field(
        default=5,
        metadata={
            "help": "meta: K, the attacker's simulated fine-tuning steps on the forget data "
            "before the forget gradient is taken (chosen on ddpm-digits' digit 5; K = 1 only "
            "reweights the forget term)"
        },
    )
    meta_lr_min: float = field(
        default=1e-4,
        metadata={
            "help": "meta: lowest learning rate of the simulated attacker, drawn log-uniformly "
            "up to --meta-lr-max (default: both 1e-4, the relearning attack's)"
        },
    )
    meta_lr_max: float = field(
        default=1e-4,
        metadata={"help": "meta: highest learning rate of the simulated attacker"},
    )
    meta_optimizer: str = field(
        default="adam",
        metadata={"help": "meta: the simulated attacker's optimizer, adam or sgd"},
    )
    meta_weight: float = field(
        default=1.0,
        metadata={"help": "meta: weight of the forget gradient at the adapted weights"},
    )
    meta_batch_size: int | None = field(
        default=None,
        metadata={"help": "meta: forget images per simulated step (default: --batch-size)"},
    )


class InnerOptimizer:
    """The simulated attacker's Adam (torch.optim.Adam's arithmetic, no weight decay) or SGD,
    on the movable entries only; its state lives for one simulation."""

    def __init__(self, kind: str, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.kind, self.lr, self.betas, self.eps = kind, lr, betas, eps
        self.moments: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.step_count = 0

    @torch.no_grad()
    def step(self, entries: list[Entry], gradients) -> None:
        """One update of every entry from its parameter's dense gradient (None: no gradient)."""
        self.step_count += 1
        beta1, beta2 = self.betas
        for index, (entry, gradient) in enumerate(zip(entries, gradients)):
            if gradient is None:
                continue
            grad = entry.values(gradient).float()
            values = entry.values(entry.param.detach()).float()
            if self.kind == "sgd":
                entry.assign(values - self.lr * grad)
                continue
            exp_avg, exp_avg_sq = self.moments.get(
                index, (torch.zeros_like(grad), torch.zeros_like(grad))
            )
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            self.moments[index] = (exp_avg, exp_avg_sq)
            denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**self.step_count)).add_(self.eps)
            step_size = self.lr / (1 - beta1**self.step_count)
            entry.assign(values.addcdiv_(exp_avg, denom, value=-step_size))


@register("meta")
class Meta:
    """The forget objective measured after a simulated relearning, added to each update."""

    Config = MetaConfig
    needs_images = True  # the attacker fine-tunes on the concept's images (ESD makes none itself)

    @staticmethod
    def check(config: MetaConfig) -> None:
        """Refuse settings that cannot run, in one line."""
        if config.harden_every < 1 or config.meta_steps < 1:
            raise EraseError(
                "--harden-every and --meta-steps must be 1 or more, got "
                f"{config.harden_every} and {config.meta_steps}."
            )
        if not 0 < config.meta_lr_min <= config.meta_lr_max:
            raise EraseError(
                "--meta-lr-min and --meta-lr-max must be learning rates above 0 with min <= max, "
                f"got {config.meta_lr_min} and {config.meta_lr_max}."
            )
        if config.meta_optimizer not in ("adam", "sgd"):
            raise EraseError(
                f"--meta-optimizer must be adam or sgd, got '{config.meta_optimizer}'."
            )
        if config.meta_weight < 0:
            raise EraseError(f"--meta-weight must be 0 or more, got {config.meta_weight}.")
        if config.meta_batch_size is not None and config.meta_batch_size < 1:
            raise EraseError(f"--meta-batch-size must be 1 or more, got {config.meta_batch_size}.")

    def __init__(self, backend, method, config: MetaConfig, train_config):
        self.backend, self.method = backend, method
        self.batch_size = config.meta_batch_size or train_config.batch_size
        self.config = config
        self.seed = train_config.seed
        self.extra_steps = 0

    def resolved(self) -> dict:
        """The settings as this run uses them (for metadata.json)."""
        return {**vars(self.config), "meta_batch_size": self.batch_size}

    def step_loss(self, step: int, unet, entries: list[Entry], forget, retain):
        """The loss of erasure step `step`: the method's, plus the meta surrogate on its steps."""
        if step % self.config.harden_every:
            return self.method.loss
        gradients, after = self.meta_gradient(step, unet, entries, forget, retain)
        weight = self.config.meta_weight

        def loss(unet, forget_batch, retain_batch, generator):
            total, terms = self.method.loss(unet, forget_batch, retain_batch, generator)
            surrogate = sum(
                (entry.values(entry.param) * gradient).sum()
                for entry, gradient in zip(entries, gradients)
            )
            return total + weight * surrogate, {**terms, "forget_after_relearn": after}

        return loss

    def meta_gradient(self, step: int, unet, entries: list[Entry], forget, retain):
        """(the forget objective's gradient at the adapted entries, one flat or whole tensor per
        entry; the objective's value there). The weights are restored exactly before it returns."""
        generator = torch.Generator().manual_seed(stream_seed(self.seed, step, 0))
        low, high = math.log(self.config.meta_lr_min), math.log(self.config.meta_lr_max)
        lr = math.exp(low + (high - low) * float(torch.rand((), generator=generator)))
        inner = InnerOptimizer(self.config.meta_optimizer, lr)
        params = [entry.param for entry in entries]
        saved = [entry.values(entry.param.detach()).clone() for entry in entries]
        devices = [self.backend.device] if self.backend.device.type == "cuda" else []
        # The global stream (dropout) is forked, so the step itself draws what it would without.
        with torch.random.fork_rng(devices=devices):
            try:
                for inner_step in range(self.config.meta_steps + 1):
                    index = step * (self.config.meta_steps + 1) + inner_step
                    forget_batch = batch_at(*forget, self.batch_size, index, self.seed + 2)
                    if inner_step == self.config.meta_steps:
                        retain_batch = batch_at(*retain, self.batch_size, index, self.seed + 3)
                        objective, _ = self.method.forget_loss(
                            unet, forget_batch, retain_batch, generator
                        )
                        gradients = torch.autograd.grad(objective, params, allow_unused=True)
                        break
                    attack = denoising_loss(self.backend, unet, forget_batch, generator)
                    inner.step(entries, torch.autograd.grad(attack, params, allow_unused=True))
            finally:
                for entry, values in zip(entries, saved):
                    entry.assign(values)
        flat = [
            torch.zeros_like(values) if gradient is None else entry.values(gradient).detach()
            for entry, values, gradient in zip(entries, saved, gradients)
        ]
        return flat, objective.item()
