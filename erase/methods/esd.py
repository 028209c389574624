"""ESD: erasing concepts from diffusion models (Gandikota et al., ICCV 2023; rohitgandikota/erasing).

The model learns to predict, under the concept's condition c, what the frozen original predicts
with c guided *away*: eps*(x_t, "") - eta * (eps*(x_t, c) - eps*(x_t, "")). No images are needed:
x_t comes from partially sampling fresh noise under c with the model being trained (50-step
DDIM, guidance 3, stopped at a random step). c is the bare concept text ("nudity", "Van Gogh"),
as the reference trains it; with several concepts, each step draws one of them. The variants
differ only in the weights they train, as the reference's `train_method` selections do
(docs/methods.md): ESD-u (`noxattn`) everything but cross-attention, the time embedding and the
output layer; ESD-x (`xattn`) cross-attention; ESD-x-strict its keys and values; `selfattn`
self-attention; `full` everything.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from erase.concepts import Concept
from erase.errors import EraseError
from erase.methods import register
from erase.models.base import Backend, Batch

# Reference esd_sd.py: x_t is sampled with a 50-step DDIM schedule at guidance 3.
SAMPLING_STEPS = 50
SAMPLING_GUIDANCE = 3.0


@dataclass
class ESDConfig:
    """ESD settings (paper defaults)."""

    negative_guidance: float = field(
        default=1.0,
        metadata={
            "help": "ESD's eta, how far the concept's prediction is pushed away from the "
            "unconditional one (paper: 1.0; the repository's diffusers script esd_sd.py uses 2.0)"
        },
    )


class ESD:
    """Negatively guided self-distillation from a frozen original; variants choose the weights."""

    Config = ESDConfig
    uses_mask = False
    needs_images = False  # ESD samples its own x_t: the forget images are never looked at
    needs_cross_attention = False

    def __init__(self, backend: Backend, concept: Concept, config: ESDConfig):
        if self.needs_cross_attention and backend.conditioning != "text":
            raise EraseError(
                f"{self.name} trains cross-attention, which a class-conditional model does not "
                "have: use --method esd-u (or salun)."
            )
        if not any(self.trainable(name) for name, _ in backend.unet.named_parameters()):
            raise EraseError(
                f"{self.name} finds no weight it trains (e.g. attn1/attn2) in the UNet of "
                f"{backend.identity}: use --method esd-u."
            )
        self.backend, self.concept, self.config = backend, concept, config
        self.frozen_unet = frozen_copy(backend.unet, self.trainable)

    @staticmethod
    def defaults(backend: Backend, concept: Concept, num_forget: int) -> dict:
        """Paper settings: Adam, lr 1e-5, 1000 iterations of batch 1 (the repository's diffusers
        script: lr 5e-5, 200 iterations, eta 2.0)."""
        return dict(lr=1e-5, batch_size=1, steps=1000, max_grad_norm=None, optimizer="adam")

    def trainable(self, parameter_name: str) -> bool:
        """Whether the parameter with this name is trained (set by each variant)."""
        raise NotImplementedError

    def partial_sample(self, unet, conditions, shape, generator: torch.Generator):
        """(x_t, t): DDIM from fresh noise under `conditions` with `unet`, stopped at a random step."""
        backend = self.backend
        cond, uncond = backend.encode(conditions), backend.unconditional(len(conditions))
        return partial_sample(backend, unet, cond, uncond, shape, generator)

    def target(self, noisy: torch.Tensor, timesteps: torch.Tensor, conditions) -> torch.Tensor:
        """The frozen original's negatively guided prediction: eps*("") - eta (eps*(c) - eps*(""))."""
        backend = self.backend
        cond, uncond = backend.encode(conditions), backend.unconditional(len(conditions))
        return negatively_guided(
            backend, self.frozen_unet, noisy, timesteps, cond, uncond, self.config.negative_guidance
        )

    def loss(self, unet, forget: Batch, retain: Batch, generator: torch.Generator):
        """MSE between the trained eps(x_t, c, t) and the negatively guided target."""
        terms = self.concept.terms  # reference train-esd.py: a random word per iteration
        picks = torch.randint(0, len(terms), (len(forget.conditions),), generator=generator)
        conditions = [terms[i] for i in picks.tolist()]
        # The forget latents give only the batch's shape (it follows --resolution).
        noisy, timesteps = self.partial_sample(unet, conditions, forget.latents.shape, generator)
        target = self.target(noisy, timesteps, conditions)
        prediction = self.backend.predict_noise(
            unet, noisy, timesteps, self.backend.encode(conditions)
        )
        loss = torch.nn.functional.mse_loss(prediction.float(), target)
        return loss, {"esd": loss.item()}

    def forget_loss(self, unet, forget: Batch, retain: Batch, generator: torch.Generator):
        """ESD's loss is its forget objective whole (it has no retain term)."""
        return self.loss(unet, forget, retain, generator)


@torch.no_grad()
def partial_sample(backend: Backend, unet, cond, uncond, shape, generator, stop=None):
    """(x_t, t): 50-step DDIM at guidance 3 from fresh noise under prompt embeddings `cond`
    (B, L, D) against `uncond`, with `unet`, stopped at step `stop` (drawn when None)."""
    sampler = backend.make_sampler(SAMPLING_STEPS)
    if stop is None:
        stop = int(torch.randint(0, SAMPLING_STEPS, (1,), generator=generator))
    latents = torch.randn(shape, generator=generator).to(backend.device)  # (B, C, h, w)
    latents = latents * sampler.init_noise_sigma
    guided_cond = torch.cat([cond, uncond])
    was_training = unet.training
    unet.eval()  # no dropout while sampling (the class DDPM has some)
    try:
        for timestep in sampler.timesteps[:stop]:
            timesteps = timestep.expand(2 * len(cond)).to(backend.device)
            eps = backend.predict_noise(unet, torch.cat([latents] * 2), timesteps, guided_cond)
            eps_cond, eps_uncond = eps.float().chunk(2)
            eps = eps_uncond + SAMPLING_GUIDANCE * (eps_cond - eps_uncond)
            latents = sampler.step(eps.to(latents.dtype), timestep, latents).prev_sample
    finally:
        unet.train(was_training)
    return latents, sampler.timesteps[stop].expand(len(cond)).to(backend.device)


@torch.no_grad()
def negatively_guided(backend: Backend, frozen_unet, noisy, timesteps, cond, uncond, eta: float):
    """ESD's target, the frozen original's prediction guided away from the concept:
    eps*(x_t, "") - eta (eps*(x_t, c) - eps*(x_t, "")), from embeddings `cond` and `uncond`."""
    eps = backend.predict_noise(
        frozen_unet, torch.cat([noisy] * 2), torch.cat([timesteps] * 2), torch.cat([cond, uncond])
    )
    eps_cond, eps_uncond = eps.float().chunk(2)
    return eps_uncond - eta * (eps_cond - eps_uncond)


def frozen_copy(
    unet: torch.nn.Module, trainable, dtype: torch.dtype | None = None
) -> torch.nn.Module:
    """A frozen eval copy of `unet` with its own copy of only the weights that will be trained.

    The other weights never change, so the copy shares them with `unet` (ESD-x duplicates ~10 %
    of SD's UNet instead of all of it). Under mixed precision (`dtype`, by default the run's
    accelerate compute dtype) the copied weights are stored in that dtype, half the memory, and
    the copy runs under autocast like the trained UNet; otherwise it keeps the UNet's dtype and
    runs in it. Sharing assumes the trainer keeps the parameter objects (single device or DDP;
    not FSDP, which flattens them).
    """
    dtype = dtype or mixed_precision_dtype()
    memo = {}
    for name, param in unet.named_parameters():
        if not trainable(name):
            memo[id(param)] = param  # shared, never copied
        elif dtype is not None and param.dtype != dtype:  # copied straight into the compute dtype
            memo[id(param)] = torch.nn.Parameter(param.detach().to(dtype), requires_grad=False)
    frozen = copy.deepcopy(unet, memo=memo)
    for name, param in frozen.named_parameters():
        if trainable(name):
            param.requires_grad_(False)
    if dtype is not None:
        device_type = next(unet.parameters()).device.type
        frozen.forward = torch.autocast(device_type, dtype=dtype)(frozen.forward)
    return frozen.eval()


def mixed_precision_dtype() -> torch.dtype | None:
    """The compute dtype of the accelerate run in progress: bf16, fp16, or None (full precision)."""
    from accelerate.state import AcceleratorState

    if not AcceleratorState._shared_state:  # no Accelerator made yet
        return None
    precision = str(AcceleratorState().mixed_precision)
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


# Reference train-esd.py `noxattn` leaves out `attn2`, `time_embed` and the output layer `out.`;
# in diffusers' names those are `time_embedding` and `conv_norm_out`/`conv_out`.
NOXATTN_EXCLUDED_PREFIXES = ("time_embedding.", "conv_norm_out.", "conv_out.")


@register("esd-u")
class ESDUnconditional(ESD):
    """ESD-u: every weight except cross-attention, time embedding and output layer (`noxattn`,
    the paper's setting for nudity)."""

    def trainable(self, parameter_name: str) -> bool:
        """Everything outside `attn2`, `time_embedding`, `conv_norm_out` and `conv_out`."""
        return "attn2" not in parameter_name and not parameter_name.startswith(
            NOXATTN_EXCLUDED_PREFIXES
        )


@register("esd-x")
class ESDCrossAttention(ESD):
    """ESD-x: cross-attention weights only (`xattn`; objects and artist styles)."""

    needs_cross_attention = True

    def trainable(self, parameter_name: str) -> bool:
        """Only `attn2` weights."""
        return "attn2" in parameter_name


@register("esd-x-strict")
class ESDCrossAttentionStrict(ESD):
    """ESD-x-strict: only the key and value projections of cross-attention, which read the prompt."""

    needs_cross_attention = True

    def trainable(self, parameter_name: str) -> bool:
        """Only `attn2.to_k` and `attn2.to_v` weights."""
        return "attn2.to_k" in parameter_name or "attn2.to_v" in parameter_name


@register("esd-selfattn")
class ESDSelfAttention(ESD):
    """ESD with the reference's `selfattn` selection: self-attention (`attn1`) weights only."""

    def trainable(self, parameter_name: str) -> bool:
        """Only `attn1` weights."""
        return "attn1" in parameter_name


@register("esd-full")
class ESDFull(ESD):
    """ESD with the reference's `full` selection: every UNet weight."""

    def trainable(self, parameter_name: str) -> bool:
        """Every weight."""
        return True
