"""SalUn through the real code path: masked weights only, and the forget term goes down."""

import pytest
import torch

from erase.api import run
from erase.cli.concept import build_parser, config_from_args
from erase.models import load_backend
from erase.saliency import load_mask


def erase_in_process(args_list, tmp_path, name):
    args = build_parser().parse_args([*args_list, "--output", str(tmp_path / name)])
    return run(config_from_args(args))


def test_unmasked_weights_are_bit_identical(tiny_sd_dir, tiny_sd_args, tmp_path):
    base = load_backend(tiny_sd_dir).unet.state_dict()
    result = erase_in_process([*tiny_sd_args, "--lr", "1e-3"], tmp_path, "run")
    mask = load_mask(str(tmp_path / "run" / "mask.safetensors"), result.backend.unet)
    changed_inside = 0
    for name, param in result.backend.unet.named_parameters():
        outside = ~mask[name]
        assert torch.equal(param.detach()[outside], base[name][outside]), name
        changed_inside += int((param.detach()[mask[name]] != base[name][mask[name]]).sum())
    assert changed_inside > 0
    assert result.metadata["changed_weights"] == changed_inside


def forget_distance(
    backend,
    latents,
    seed=0,
    forget_prompt="a photo of a nude person",
    remap_prompt="a photo of a person wearing clothes",
):
    """Mean distance between eps(x_t, forget prompt) and eps(x_t, remap prompt) at fixed noise."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, 1000, (len(latents),), generator=generator)
    noisy = backend.noise_scheduler.add_noise(latents, noise, timesteps)
    with torch.no_grad():
        forget = backend.predict_noise(
            backend.unet,
            noisy,
            timesteps,
            backend.encode([forget_prompt] * len(latents)),
        )
        remap = backend.predict_noise(
            backend.unet,
            noisy,
            timesteps,
            backend.encode([remap_prompt] * len(latents)),
        )
    return torch.nn.functional.mse_loss(forget, remap).item()


def test_forget_term_decreases(tiny_sd_dir, tiny_sd_args, tmp_path):
    backend = load_backend(tiny_sd_dir)
    latents = torch.randn(8, *backend.latent_shape, generator=torch.Generator().manual_seed(1))
    before = forget_distance(backend, latents)
    args = [*tiny_sd_args, "--steps", "40", "--lr", "1e-3", "--num-forget", "4"]
    result = erase_in_process(args, tmp_path, "run")
    after = forget_distance(result.backend, latents)
    assert after < 0.5 * before


def test_class_defaults_are_the_reference_unless_the_backend_measured_its_own():
    from types import SimpleNamespace

    from erase.concepts import Concept
    from erase.methods.salun import SalUn

    concept = Concept("three", [3], [0, 1, 2])

    def class_backend(shape, retain_images, **settings):
        return SimpleNamespace(
            conditioning="class",
            method_defaults=settings,
            latent_shape=shape,
            real_images=lambda classes, count: (None, [0] * min(count, retain_images)),
        )

    reference = SalUn.defaults(class_backend((3, 32, 32), 45_000), concept, 100)
    # DDPM/configs/cifar10_saliency_unlearn.yml (n_iters 1000) and DDPM/README.md (alpha 1e-3)
    assert (reference["lr"], reference["alpha"], reference["steps"], reference["batch_size"]) == (
        1e-4,
        1e-3,
        1000,
        128,
    )
    assert (reference["retain_reduction"], reference["cond_drop"], reference["antithetic"]) == (
        "sum",
        0.1,
        True,
    )
    assert reference["clip_before_mask"] == 1.0 and reference["max_grad_norm"] is None
    # the same meaning on the 16 x 16 digits: the per-element retain balance, and 2.84 passes
    # (29 updates) raised to the floor of updates Adam needs to move the weights
    digits = SalUn.defaults(class_backend((1, 16, 16), 1291), concept, 100)
    assert digits["alpha"] == pytest.approx(1.2e-2) and digits["steps"] == 60
    many = SalUn.defaults(class_backend((1, 16, 16), 10_000), concept, 100)
    assert many["steps"] == round(1000 * 128 / 45_000 * 10_000 / 128) == 222
    testbed = class_backend((3, 32, 32), 45_000, salun={"lr": 5e-5})
    tuned = SalUn.defaults(testbed, concept, 100)
    assert tuned["lr"] == 5e-5 and tuned["alpha"] == 1e-3


def test_two_concepts_in_one_run_lower_both_forget_terms(tiny_sd_dir, tiny_sd_args, tmp_path):
    backend = load_backend(tiny_sd_dir)
    latents = torch.randn(8, *backend.latent_shape, generator=torch.Generator().manual_seed(1))
    church = ("an image of a church", "an image of a French horn")  # remapped to the next class
    before = [forget_distance(backend, latents), forget_distance(backend, latents, 0, *church)]
    args = [*tiny_sd_args, "--concept", "church", "--steps", "40", "--lr", "1e-3"]
    result = erase_in_process([*args, "--num-forget", "4"], tmp_path, "run")
    after = [
        forget_distance(result.backend, latents),
        forget_distance(result.backend, latents, 0, *church),
    ]
    assert after[0] < 0.7 * before[0] and after[1] < 0.7 * before[1]
    concept = result.metadata["concept"]
    assert [part["name"] for part in concept["parts"]] == ["nudity", "church"]
    assert concept["forget"] == ["a photo of a nude person", "an image of a church"]


def test_one_forward_loss_equals_the_two_terms_computed_apart(tiny_sd_dir):
    """SalUn's loss puts forget and retain through one UNet call; it must be the reference's
    remap MSE + alpha * denoising MSE, each computed on its own batch."""
    from erase.concepts import resolve_concept
    from erase.methods import get_method
    from erase.models.base import Batch

    backend = load_backend(tiny_sd_dir)
    concept = resolve_concept("nudity", conditioning="text")
    salun = get_method("salun")
    method = salun(backend, concept, salun.Config(alpha=0.3, mask_guidance=7.5))
    sample = torch.Generator().manual_seed(4)
    forget = Batch(torch.randn(3, *backend.latent_shape, generator=sample), [concept.forget[0]] * 3)
    retain = Batch(torch.randn(2, *backend.latent_shape, generator=sample), [concept.retain[0]] * 2)
    with torch.no_grad():
        loss, terms = method.loss(backend.unet, forget, retain, torch.Generator().manual_seed(9))

    def apart(generator):  # the draws in the same order: retain (noise, t), then forget (noise, t)
        mse, unet = torch.nn.functional.mse_loss, backend.unet
        retain_noise = torch.randn(retain.latents.shape, generator=generator)
        retain_t = torch.randint(0, 1000, (2,), generator=generator)
        forget_noise = torch.randn(forget.latents.shape, generator=generator)
        forget_t = torch.randint(0, 1000, (3,), generator=generator)
        add = backend.noise_scheduler.add_noise
        retain_x = add(retain.latents, retain_noise, retain_t)
        forget_x = add(forget.latents, forget_noise, forget_t)
        remap = backend.predict_noise(unet, forget_x, forget_t, backend.encode(concept.retain * 3))
        forget_eps = backend.predict_noise(
            unet, forget_x, forget_t, backend.encode(forget.conditions)
        )
        retain_eps = backend.predict_noise(
            unet, retain_x, retain_t, backend.encode(retain.conditions)
        )
        return mse(forget_eps, remap), mse(retain_eps, retain_noise)

    with torch.no_grad():
        forget_term, retain_term = apart(torch.Generator().manual_seed(9))
    assert terms["forget"] == pytest.approx(forget_term.item(), rel=1e-5)
    assert terms["retain"] == pytest.approx(retain_term.item(), rel=1e-5)
    assert loss.item() == pytest.approx(forget_term.item() + 0.3 * retain_term.item(), rel=1e-5)
