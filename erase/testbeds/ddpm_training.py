"""Training a class-conditional DDPM from scratch: the architecture and budget (DDPMConfig, the
SalUn reference's CIFAR-10 model), the UNet, and the training loop the DDPM testbeds and Retrain
use. The backend that erases such a model is erase/models/ddpm.py."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler, UNet2DModel
from tqdm.auto import tqdm

from erase.models.base import denoising_target
from erase.models.ddpm import SCHEDULER_CONFIG
from erase.models.sd import default_device


@dataclass
class DDPMConfig:
    """Architecture and training budget of a class-conditional DDPM."""

    image_size: int = 16
    channels: int = 1
    block_out_channels: tuple[int, ...] = (16, 32, 64)
    layers_per_block: int = 1
    attention_levels: tuple[int, ...] = ()  # levels with self-attention (CIFAR-10: 16x16)
    mid_attention: bool = False
    dropout: float = 0.0
    norm_num_groups: int = 8
    class_drop: float = 0.1  # probability of training on the null class (for guidance)
    # ddpm-digits: guided samples classified right: 95 % after 250 steps, 98.5 % 500, 100 % 1000
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    ema_decay: float = 0.995
    hflip: bool = False  # random horizontal flips (CIFAR-10; never for digits)
    seed: int = 0


# The SalUn reference model for CIFAR-10 (DDPM/configs/cifar10_train.yml, docs/methods.md):
# 128 channels x (1, 2, 2, 2), two res blocks per level, attention at 16x16, dropout 0.1, class
# dropped with probability 0.1.
CIFAR10_CONFIG = DDPMConfig(
    image_size=32,
    channels=3,
    block_out_channels=(128, 256, 256, 256),
    layers_per_block=2,
    attention_levels=(1,),
    mid_attention=True,
    dropout=0.1,
    norm_num_groups=32,
    steps=800_000,
    batch_size=128,
    lr=2e-4,
    warmup_steps=5000,
    ema_decay=0.9999,
    hflip=True,
)


def build_class_unet(num_classes: int, config: DDPMConfig) -> UNet2DModel:
    """A UNet2DModel with `num_classes + 1` class embeddings (the last one is the null class)."""
    levels = range(len(config.block_out_channels))
    down = tuple(
        "AttnDownBlock2D" if i in config.attention_levels else "DownBlock2D" for i in levels
    )
    up = tuple(
        "AttnUpBlock2D" if len(levels) - 1 - i in config.attention_levels else "UpBlock2D"
        for i in levels
    )
    return UNet2DModel(
        sample_size=config.image_size,
        in_channels=config.channels,
        out_channels=config.channels,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        add_attention=config.mid_attention,
        dropout=config.dropout,
        norm_num_groups=config.norm_num_groups,
        num_class_embeds=num_classes + 1,
    )


def train_class_ddpm(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    config: DDPMConfig,
    device: torch.device | None = None,
) -> UNet2DModel:
    """Train a class-conditional DDPM on images (N, C, H, W) in [0, 1]; returns the EMA UNet."""
    device = device or default_device()
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    unet = build_class_unet(num_classes, config).to(device).train()
    ema = copy.deepcopy(unet).requires_grad_(False)
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    optimizer = torch.optim.Adam(unet.parameters(), lr=config.lr)
    warmup = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, config.warmup_steps))
    )
    pixels = images * 2 - 1  # (N, C, H, W) in [-1, 1]
    progress = tqdm(range(config.steps), desc="ddpm: training", unit="step")
    for step in progress:
        chosen = torch.randint(0, len(pixels), (config.batch_size,), generator=generator)
        clean = pixels[chosen]
        if config.hflip:
            flip = torch.rand(len(clean), generator=generator) < 0.5
            clean = torch.where(flip[:, None, None, None], clean.flip(-1), clean)
        class_labels = labels[chosen].clone()
        dropped = torch.rand(len(chosen), generator=generator) < config.class_drop
        class_labels[dropped] = num_classes  # the null class
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(clean),))
        noisy = scheduler.add_noise(clean, noise, timesteps)
        prediction = unet(
            noisy.to(device), timesteps.to(device), class_labels=class_labels.to(device)
        ).sample
        target = denoising_target(scheduler, clean, noise, timesteps)
        loss = torch.nn.functional.mse_loss(prediction, target.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        warmup.step()
        decay = min(config.ema_decay, (1 + step) / (10 + step))  # short warm-up of the EMA
        with torch.no_grad():
            for ema_param, param in zip(ema.parameters(), unet.parameters()):
                ema_param.lerp_(param, 1 - decay)
        if step % 20 == 0:
            progress.set_postfix(loss=f"{loss.item():.4f}")
    return ema.eval()
