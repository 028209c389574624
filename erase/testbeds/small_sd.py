"""Untrained Stable Diffusion components of a chosen small size, built in code.

The tiny test pipeline (erase/testing.py) and the sd-digits testbed are the same architecture
at two sizes: a word-level CLIP tokenizer and text encoder, a two-level UNet with
cross-attention, a two-level VAE (8x downsampling is 2x here) and SD's DDIM schedule.
"""

from __future__ import annotations

from collections.abc import Sequence

from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from erase.testbeds.tokenizer import build_word_tokenizer


def small_sd_components(
    words: Sequence[str],
    *,
    max_length: int,
    text_width: int,
    unet_channels: tuple[int, int],
    vae_channels: tuple[int, int],
    image_size: int,
    attention_head_dim: int,
    norm_groups: int,
):
    """(tokenizer, text_encoder, unet, vae, scheduler) with random weights (seed them first)."""
    tokenizer = build_word_tokenizer(words, max_length=max_length)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=text_width,
            intermediate_size=2 * text_width,
            num_attention_heads=2,
            num_hidden_layers=2,
            max_position_embeddings=max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=image_size // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=unet_channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_width,
        attention_head_dim=attention_head_dim,
        norm_num_groups=norm_groups,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=vae_channels,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=norm_groups,
        sample_size=image_size,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
    )
    return tokenizer, text_encoder, unet, vae, scheduler


def as_pipeline(tokenizer, text_encoder, unet, vae, scheduler) -> StableDiffusionPipeline:
    """The components as a StableDiffusionPipeline without a safety checker."""
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
