"""Stable Diffusion XL backend on diffusers' StableDiffusionXLPipeline.

SDXL differs from SD in conditioning only: two text encoders whose penultimate hidden states are
concatenated (B, 77, 768 + 1280), and added conditions, the second encoder's pooled projection
(B, 1280) and six size "time ids" (original size, crop corner, target size). The backend packs
the pooled embedding into the condition tensor as one extra row, so every method handles
conditions as it does on SD (concatenates, masks, caches them) without knowing; `predict_noise`
splits it off again and derives the time ids from the latents' size, as the pipeline does with
its defaults (original size = target size = the image's, crop at (0, 0)).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
from diffusers import StableDiffusionXLPipeline

from erase.errors import EraseError
from erase.models.sd import StableDiffusionBackend

# Public hub ids of the SDXL aliases `--model` accepts.
SDXL_ALIASES = {
    "sdxl-base-1.0": "stabilityai/stable-diffusion-xl-base-1.0",  # 1024 px
    "sdxl-turbo": "stabilityai/sdxl-turbo",  # 512 px, distilled for 1-4 steps without guidance
}
# Sampling guidance: the pipeline's default 5.0; SDXL-Turbo is distilled to run without (0.0).
SDXL_GUIDANCE = {"stabilityai/sdxl-turbo": 0.0}


class StableDiffusionXLBackend(StableDiffusionBackend):
    """SDXL: two frozen text encoders and a VAE around a trainable UNet with added conditions."""

    guidance_scale = 5.0  # StableDiffusionXLPipeline's default
    pipeline_class = StableDiffusionXLPipeline
    aliases = SDXL_ALIASES
    pipeline_kwargs = {"add_watermarker": False}  # the watermark would alter measured images

    def __init__(self, spec: str, device: torch.device | None = None, pipe=None):
        super().__init__(spec, device=device, pipe=pipe)
        self.guidance_scale = SDXL_GUIDANCE.get(self.identity, self.guidance_scale)
        unet_config = self.unet.config
        if unet_config.addition_embed_type != "text_time":
            raise EraseError(
                f"The UNet of '{self.identity}' has no SDXL added conditions "
                "(addition_embed_type 'text_time'): load it as a Stable Diffusion model."
            )
        time_ids_width = unet_config.projection_class_embeddings_input_dim - self.pooled_width
        if time_ids_width != 6 * unet_config.addition_time_embed_dim:
            raise EraseError(
                f"'{self.identity}' expects {time_ids_width // unet_config.addition_time_embed_dim}"
                " time ids (an SDXL refiner?): erase runs on SDXL base models, which take six."
            )

    @property
    def pooled_width(self) -> int:
        """Width of the pooled text embedding (the second encoder's projection)."""
        return self.pipe.text_encoder_2.config.projection_dim

    def text_encoders(self) -> list[tuple]:
        """The (tokenizer, text encoder) pairs that read a prompt: SDXL's two. Both split a
        prompt into the same token positions, so `tokenize` (the first) gives the positions
        cross-attention sees."""
        pairs = [
            (self.pipe.tokenizer, self.pipe.text_encoder),
            (self.pipe.tokenizer_2, self.pipe.text_encoder_2),
        ]
        return [(tokenizer, encoder) for tokenizer, encoder in pairs if encoder is not None]

    def embed(self, prompts: Sequence[str]) -> torch.Tensor:
        """Both encoders' prompt embeddings (B, L, D) with the pooled one (B, P) packed in as a
        last row (B, L + 1, D), by the pipeline's own encode_prompt (gradients flow), on the
        UNet's device wherever the encoders are."""
        encoder_device = self.text_encoders()[0][1].device
        prompt_embeds, _, pooled, _ = self.pipe.encode_prompt(
            list(prompts), device=encoder_device, do_classifier_free_guidance=False
        )
        return pack_condition(prompt_embeds, pooled).to(self.device)

    def unconditional(self, batch_size: int) -> torch.Tensor:
        """The unconditional condition the pipeline guides with: zeros where the model says so
        (`force_zeros_for_empty_prompt`, SDXL base), else the empty prompt's embeddings."""
        empty = self.encode([""] * batch_size)
        if self.pipe.config.get("force_zeros_for_empty_prompt", True):
            return torch.zeros_like(empty)
        return empty

    def predict_noise(self, unet, noisy, timesteps, cond):
        """The prediction of `unet` for `noisy` latents under a packed SDXL condition (eps, or v
        for a v-prediction model)."""
        prompt_embeds, pooled = unpack_condition(cond, self.pooled_width)
        height, width = (side * self.vae_scale for side in noisy.shape[-2:])
        time_ids = torch.tensor(
            [[height, width, 0, 0, height, width]], device=noisy.device, dtype=noisy.dtype
        ).expand(len(noisy), -1)  # (B, 6): original size, crop corner, target size
        added = {"text_embeds": pooled.to(noisy.dtype), "time_ids": time_ids}
        return unet(
            noisy,
            timesteps,
            encoder_hidden_states=prompt_embeds.to(noisy.dtype),
            added_cond_kwargs=added,
        ).sample

    def sample(self, *args, **kwargs) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1], as on SD; SDXL's VAE decodes in fp32 (it overflows in
        fp16, which is why its config asks for `force_upcast`)."""
        with full_precision_decode(self.pipe.vae):
            return super().sample(*args, **kwargs)


def pack_condition(prompt_embeds: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """(B, L, D) prompt embeddings and (B, P) pooled ones as one (B, L + 1, D) tensor, P <= D."""
    width = prompt_embeds.shape[-1]
    if pooled.shape[-1] > width:
        raise EraseError(
            f"The pooled text embedding ({pooled.shape[-1]}) is wider than the prompt embeddings "
            f"({width}): this is not an SDXL text encoder pair."
        )
    row = torch.nn.functional.pad(pooled, (0, width - pooled.shape[-1]))  # (B, D)
    return torch.cat([prompt_embeds, row[:, None].to(prompt_embeds.dtype)], dim=1)


def unpack_condition(cond: torch.Tensor, pooled_width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (B, L, D) prompt embeddings and (B, P) pooled embedding of a packed condition."""
    return cond[:, :-1], cond[:, -1, :pooled_width]


@contextmanager
def full_precision_decode(vae: torch.nn.Module):
    """Run `vae.decode` in fp32 even under autocast; restored after."""
    if not vae.config.get("force_upcast", False):
        yield
        return
    decode = vae.decode

    def decode_fp32(latents, *args, **kwargs):
        with torch.autocast(latents.device.type, enabled=False):
            return decode(latents.float(), *args, **kwargs)

    vae.decode = decode_fp32
    try:
        yield
    finally:
        del vae.decode  # the class's method again
