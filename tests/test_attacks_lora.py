"""The relearning attacker's LoRA adapter (eval/attacks/lora.py) on a tiny random UNet."""

import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention

from eval.attacks.lora import LoRAConv2d, LoRALinear, add_lora


def tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )


def test_lora_starts_equal_and_trains_only_its_adapters():
    unet = tiny_unet()
    before = {name: p.detach().clone() for name, p in unet.named_parameters()}
    sample, timestep = torch.randn(2, 1, 8, 8), torch.tensor([10, 500])
    with torch.no_grad():
        plain = unet(sample, timestep).sample
    attentions = sum(isinstance(m, Attention) for m in unet.modules())
    parameters = add_lora(unet, rank=4)
    adapters = [m for m in unet.modules() if isinstance(m, LoRALinear | LoRAConv2d)]
    # to_q, to_k, to_v, to_out.0 of every attention layer, nothing else
    assert attentions >= 3 and len(adapters) == 4 * attentions and len(parameters) == 8 * attentions
    assert all(isinstance(a, LoRALinear) for a in adapters)
    assert all(a.lora_down.weight.shape[0] == 4 for a in adapters)
    with torch.no_grad():
        assert torch.equal(unet(sample, timestep).sample, plain)  # B = 0: no change yet
    optimizer = torch.optim.Adam(parameters, lr=1e-2)
    for _ in range(3):
        loss = unet(sample, timestep).sample.square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trainable = {name for name, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    for name, value in unet.named_parameters():
        if "lora_" not in name:  # the attacked weights themselves never move
            assert torch.equal(value, before[name.replace(".base.", ".")]), name
    with torch.no_grad():
        assert not torch.allclose(unet(sample, timestep).sample, plain)


def test_a_unet_without_attention_gets_adapters_on_its_linear_and_conv_layers():
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        add_attention=False,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    layers = sum(isinstance(m, torch.nn.Linear | torch.nn.Conv2d) for m in unet.modules())
    sample, timestep = torch.randn(1, 1, 8, 8), torch.tensor([100])
    with torch.no_grad():
        plain = unet(sample, timestep).sample
    parameters = add_lora(unet, rank=2)
    convs = [m for m in unet.modules() if isinstance(m, LoRAConv2d)]
    assert len(parameters) == 2 * layers and convs
    assert all(c.lora_down.weight.shape[0] == 2 for c in convs)
    with torch.no_grad():
        assert torch.equal(unet(sample, timestep).sample, plain)
