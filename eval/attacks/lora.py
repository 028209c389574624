"""A rank-r LoRA adapter on a UNet's attention projections: the cheap fine-tune a hobbyist runs.

The relearning attacker's LoRA. peft is not a dependency of erase (and diffusers' own LoRA
loading needs it), so the adapter is the few lines of LoRA itself (Hu et al., 2021): each
targeted linear layer W x becomes W x + (alpha / r) B A x, W frozen, A (r x in) initialised as
peft does (Kaiming-uniform, a = sqrt(5)), B (out x r) zero, so the adapted UNet starts equal to
the attacked one. Targets: the attention projections to_q, to_k, to_v, to_out.0 and
alpha = r, the settings of diffusers' examples/text_to_image/train_text_to_image_lora.py. A UNet
without attention (ddpm-digits) gets the adapter on every linear and convolution layer instead
(LoCon; peft's LoRA on a Conv2d: A a convolution of the layer's kernel into r channels, B a 1x1
convolution out of them).
"""

from __future__ import annotations

import math

import torch

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' LoRA training example


class LoRAConv2d(torch.nn.Module):
    """A frozen convolution plus a trainable low-rank update: A (k x k, into r channels), B (1 x 1)."""

    def __init__(self, base: torch.nn.Conv2d, rank: int, alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_down = torch.nn.Conv2d(
            base.in_channels,
            rank,
            base.kernel_size,
            base.stride,
            base.padding,
            base.dilation,
            bias=False,
        )
        self.lora_up = torch.nn.Conv2d(rank, base.out_channels, 1, bias=False)
        torch.nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        torch.nn.init.zeros_(self.lora_up.weight)
        self.lora_down.to(base.weight.device, base.weight.dtype)
        self.lora_up.to(base.weight.device, base.weight.dtype)
        self.scale = alpha / rank

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        update = self.lora_up(self.lora_down(hidden_states))
        return self.base(hidden_states) + self.scale * update


class LoRALinear(torch.nn.Module):
    """A frozen linear layer plus a trainable low-rank update (alpha / rank) * B A."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_down = torch.nn.Linear(base.in_features, rank, bias=False)  # A
        self.lora_up = torch.nn.Linear(rank, base.out_features, bias=False)  # B
        torch.nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        torch.nn.init.zeros_(self.lora_up.weight)
        self.lora_down.to(base.weight.device, base.weight.dtype)
        self.lora_up.to(base.weight.device, base.weight.dtype)
        self.scale = alpha / rank

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        update = self.lora_up(self.lora_down(hidden_states))
        return self.base(hidden_states) + self.scale * update


def lora_targets(unet: torch.nn.Module) -> list[str]:
    """The layers LoRA adapts: the attention projections, or, in a UNet without attention, every
    linear layer and ungrouped convolution."""
    modules = dict(unet.named_modules())
    attention = [
        name
        for name, module in modules.items()
        if isinstance(module, torch.nn.Linear) and any(name.endswith(t) for t in TARGETS)
    ]
    if attention:
        return attention
    return [
        name
        for name, module in modules.items()
        if isinstance(module, torch.nn.Linear)
        or (isinstance(module, torch.nn.Conv2d) and module.groups == 1)
    ]


def add_lora(unet: torch.nn.Module, rank: int, alpha: float | None = None) -> list:
    """Freeze `unet` and wrap its LoRA targets (lora_targets) in adapters, in place; the
    trainable parameters (every A and B)."""
    unet.requires_grad_(False)
    parameters = []
    for name in lora_targets(unet):
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name)
        layer = getattr(parent, child)
        kind = LoRALinear if isinstance(layer, torch.nn.Linear) else LoRAConv2d
        adapter = kind(layer, rank, float(alpha or rank))
        setattr(parent, child, adapter)
        parameters += [adapter.lora_down.weight, adapter.lora_up.weight]
    return parameters
