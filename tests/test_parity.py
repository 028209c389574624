"""Settings and formulas that must mean what they mean in the reference code (docs/methods.md)."""

import dataclasses
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from erase.concepts import resolve_concept, union
from erase.methods import (
    METHODS,
    denoising_loss,
    dropped_to_null,
    remap_conditions,
    sample_timesteps,
    squared_error,
)
from erase.models.base import Batch
from erase.models.ddpm import ClassDDPMBackend
from erase.testbeds.ddpm_training import DDPMConfig, build_class_unet

DOCS = Path(__file__).resolve().parents[1] / "docs" / "methods.md"
CIFAR10 = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"
]  # fmt: skip


class ZeroUNet(torch.nn.Module):
    """A denoiser that predicts zero noise: the loss is then a known function of the noise."""

    def forward(self, noisy, timesteps, class_labels=None):
        return SimpleNamespace(sample=torch.zeros_like(noisy))


def class_backend(unet=None, classes=CIFAR10):
    config = DDPMConfig(image_size=8, channels=3, block_out_channels=(8, 16), norm_num_groups=4)
    unet_config = build_class_unet(len(classes), config)
    backend = ClassDDPMBackend(unet_config, classes, identity="tiny", device=torch.device("cpu"))
    if unet is not None:
        backend.unet = unet
    return backend


def test_retain_loss_is_the_reference_pixel_sum_on_a_known_tensor():
    prediction = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4) / 10
    noise = torch.ones(2, 3, 4, 4)
    # DDPM/functions/losses.py: (e - output).square().sum(dim=(1, 2, 3)).mean(dim=0)
    reference = (noise - prediction).square().sum(dim=(1, 2, 3)).mean(dim=0)
    assert squared_error(prediction, noise, "sum") == pytest.approx(reference.item())
    assert squared_error(prediction, noise, "mean") * 3 * 4 * 4 == pytest.approx(reference.item())


def test_ddpm_denoising_loss_follows_the_reference_formula():
    backend = class_backend(ZeroUNet())
    latents = torch.rand(4, 3, 8, 8)
    loss = denoising_loss(
        backend, backend.unet, Batch(latents, [0, 1, 2, 3]), torch.Generator().manual_seed(3),
        reduction="sum",
    )  # fmt: skip
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(3))  # drawn first
    assert loss.item() == pytest.approx(noise.square().sum(dim=(1, 2, 3)).mean().item(), rel=1e-5)


def test_antithetic_timesteps_pair_t_with_T_minus_t_minus_1():
    # The reference draws n // 2 + 1 and keeps the first n of [t, T - t - 1].
    timesteps = sample_timesteps(6, 1000, torch.Generator().manual_seed(0), antithetic=True)
    assert torch.equal(timesteps[4:], 1000 - timesteps[:2] - 1)
    odd = sample_timesteps(5, 1000, torch.Generator().manual_seed(0), antithetic=True)
    assert torch.equal(odd[3:], 1000 - odd[:2] - 1)


def test_class_is_dropped_to_null_at_the_given_rate():
    backend = class_backend()
    labels = torch.full((10_000,), 3)
    dropped = dropped_to_null(backend, labels, 0.1, torch.Generator().manual_seed(0))
    share = (dropped == backend.num_classes).float().mean().item()
    assert 0.09 < share < 0.11 and set(dropped.tolist()) == {3, backend.num_classes}
    assert torch.equal(dropped_to_null(backend, labels, 0.0, torch.Generator()), labels)


@pytest.mark.parametrize("forgotten", [0, 3, 9])
def test_next_class_remap_is_c_plus_one_mod_10(forgotten):
    concept = resolve_concept(str(forgotten), conditioning="class", class_names=CIFAR10)
    targets = remap_conditions(concept, [forgotten] * 5, torch.Generator())
    assert targets == [(forgotten + 1) % 10] * 5


def test_next_class_remap_on_imagenette_prompts():
    concept = resolve_concept("church", conditioning="text")  # Imagenette class 4
    assert concept.remap == ["an image of a French horn"]  # class 5, as random_label.py does


def test_random_remap_draws_other_classes():
    concept = resolve_concept("3", conditioning="class", class_names=CIFAR10, remap="random")
    targets = remap_conditions(concept, [3] * 200, torch.Generator().manual_seed(0))
    assert 3 not in targets and len(set(targets)) == 9


def test_each_concept_keeps_its_own_remap_and_skips_forgotten_targets():
    concepts = [resolve_concept(c, conditioning="class", class_names=CIFAR10) for c in "34"]
    both = union(concepts)
    assert both.forget == [3, 4] and 3 not in both.retain and 4 not in both.retain
    # 3's next class is 4, forgotten too: it moves on to 5; 4 keeps its own 5.
    assert remap_conditions(both, [3, 4], torch.Generator()) == [5, 5]
    assert [part.name for part in both.parts] == ["cat", "deer"]


def documented_flags() -> set[str]:
    return set(re.findall(r"`(--[a-z0-9-]+)", DOCS.read_text()))


def test_methods_doc_has_a_row_for_every_method_setting():
    flags = documented_flags()
    for method_class in METHODS.values():
        for field in dataclasses.fields(method_class.Config):
            assert "--" + field.name.replace("_", "-") in flags, field.name
    for flag in ("--lr", "--steps", "--batch-size", "--max-grad-norm", "--remap", "--num-forget"):
        assert flag in flags, flag


def test_methods_doc_names_every_registered_method():
    text = DOCS.read_text()
    for name in METHODS:
        assert f"`{name}`" in text, name


def test_salun_clips_the_whole_ddpm_gradient_before_the_trainer_masks_it():
    """Reference DDPM/runners/diffusion.py: backward, clip_grad_norm_(1.0), then grad *= mask."""
    from erase.data import batch_at
    from erase.methods.salun import SalUn, SalUnConfig
    from erase.saliency import saliency_mask
    from erase.train import TrainConfig, make_accelerator, train

    backend = class_backend()
    concept = resolve_concept("3", conditioning="class", class_names=CIFAR10)
    settings = SalUn.defaults(backend, concept, 10)
    config = SalUnConfig(
        **{k: settings[k] for k in ("alpha", "retain_reduction", "cond_drop", "antithetic")},
        # Adam is blind to a gradient's scale unless the gradient is below its eps (1e-8): so
        # small a norm makes the update tell clipping the whole gradient from the masked one.
        clip_before_mask=1e-9,
    )
    method = SalUn(backend, concept, config)
    forget = (torch.rand(4, 3, 8, 8) * 2 - 1, [3] * 4)
    retain = (torch.rand(4, 3, 8, 8) * 2 - 1, [0, 1, 2, 4])
    mask = saliency_mask({n: torch.rand(p.shape) for n, p in backend.unet.named_parameters()}, 0.5)
    base = {n: p.detach().clone() for n, p in backend.unet.named_parameters()}
    # The same step by hand: the whole gradient clipped first, then masked, then Adam.
    unet = backend.unet
    unet.train().requires_grad_(True)
    generator = torch.Generator().manual_seed(0)  # the trainer's generator of step 0, seed 0
    forget_batch = batch_at(*forget, 4, 0, 0)
    retain_batch = batch_at(*retain, 4, 0, 1)
    torch.manual_seed(0)  # the same dropout in both runs
    loss, _ = method.loss(unet, forget_batch, retain_batch, generator)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(unet.parameters()), 1e-9)
    for name, param in unet.named_parameters():
        param.grad.mul_(mask[name])
    optimizer = torch.optim.Adam(unet.parameters(), lr=1e-2, foreach=False)
    optimizer.step()
    expected = {n: p.detach().clone() for n, p in unet.named_parameters()}
    with torch.no_grad():
        for name, param in unet.named_parameters():
            param.copy_(base[name])
            param.grad = None

    train_config = TrainConfig(lr=1e-2, steps=1, batch_size=4, optimizer="adam", seed=0)
    result = train(
        make_accelerator(train_config), backend, method, forget, retain, train_config, mask
    )
    assert result.optimizer_state == "dense"
    for name, param in unet.named_parameters():
        moved, expected_move = param - base[name], expected[name] - base[name]
        # Entries whose gradient nearly cancels may differ in their last bits between runs.
        tolerance = 1e-3 * expected_move.abs().max().item()
        assert torch.allclose(moved, expected_move, rtol=1e-3, atol=tolerance), name
