"""Tiny random models built in code, for tests and benchmark scripts (nothing is downloaded)."""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from erase.testbeds.small_sd import as_pipeline, small_sd_components
from erase.testbeds.tokenizer import build_word_tokenizer
from prompts import concept_templates

TINY_WORDS = [
    "a photo of a nude person wearing clothes an image painting in the style",
    *concept_templates()["imagenette"],
    "cat dog car tree house",
]


def tiny_sd_pipeline(
    seed: int = 0, image_size: int = 16, prediction_type: str = "epsilon"
) -> StableDiffusionPipeline:
    """A Stable Diffusion pipeline with random weights: ~100 k parameters, 16 px images; its
    scheduler's `prediction_type` says what the UNet predicts (SD 2.x 768: v_prediction)."""
    torch.manual_seed(seed)
    tokenizer, text_encoder, unet, vae, scheduler = small_sd_components(
        TINY_WORDS,
        max_length=16,
        text_width=16,
        unet_channels=(8, 16),
        vae_channels=(8, 8),
        image_size=image_size,
        attention_head_dim=2,
        norm_groups=4,
    )
    scheduler = DDIMScheduler.from_config(scheduler.config, prediction_type=prediction_type)
    return as_pipeline(tokenizer, text_encoder, unet, vae, scheduler)


def save_tiny_sd(folder: str, seed: int = 0, prediction_type: str = "epsilon") -> str:
    """Build the tiny pipeline and save it as a diffusers folder; returns the folder."""
    pipe = tiny_sd_pipeline(seed, prediction_type=prediction_type)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_text_encoder(width: int, max_length: int, tokenizer, projection: bool):
    """A two-layer CLIP text encoder of `width`, with a `width` projection when asked (SDXL's
    second encoder, whose pooled projection is an added condition)."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        projection_dim=width,
        num_attention_heads=2,
        num_hidden_layers=2,
        max_position_embeddings=max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def tiny_sdxl_pipeline(seed: int = 0, image_size: int = 16) -> StableDiffusionXLPipeline:
    """An SDXL pipeline with random weights, shaped like diffusers' own SDXL pipeline tests: a
    UNet with added text-time conditions and varied transformer depth, two small CLIP text
    encoders (the second with a projection), SDXL's Euler scheduler; 16 px images."""
    torch.manual_seed(seed)
    max_length, width = 16, 16
    tokenizers = [build_word_tokenizer(TINY_WORDS, max_length=max_length) for _ in range(2)]
    text_encoder = tiny_text_encoder(width, max_length, tokenizers[0], projection=False)
    text_encoder_2 = tiny_text_encoder(width, max_length, tokenizers[1], projection=True)
    time_embed_dim = 4
    unet = UNet2DConditionModel(
        sample_size=image_size // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=2 * width,  # both encoders' hidden states, concatenated
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + width,  # time ids + pooled
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=image_size,
        scaling_factor=0.13025,  # SDXL's VAE
        force_upcast=True,
    )
    scheduler = EulerDiscreteScheduler(  # SDXL base's scheduler config
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )


def save_tiny_sdxl(folder: str, seed: int = 0) -> str:
    """Build the tiny SDXL pipeline and save it as a diffusers folder; returns the folder."""
    tiny_sdxl_pipeline(seed).save_pretrained(folder, safe_serialization=True)
    return folder
