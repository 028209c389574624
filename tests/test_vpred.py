"""Prediction types: every loss's target follows the scheduler's prediction_type (SD 2.x 768 and
many community models predict the velocity v, not the noise)."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from erase.cli.concept import erase_concept_main
from erase.concepts import resolve_concept
from erase.errors import EraseError
from erase.methods.esd import ESDConfig, ESDCrossAttention
from erase.methods.salun import SalUn, SalUnConfig
from erase.models import load_backend
from erase.models.base import Batch, denoising_target
from erase.models.sd import StableDiffusionBackend
from erase.saliency import forget_loss_gradients
from erase.testing import save_tiny_sd, tiny_sd_pipeline


@pytest.fixture(scope="module")
def tiny_vpred_dir(tmp_path_factory) -> str:
    """The tiny SD pipeline with a v-prediction scheduler, saved as a diffusers folder."""
    folder = str(tmp_path_factory.mktemp("tiny-vpred") / "pipeline")
    return save_tiny_sd(folder, prediction_type="v_prediction")


class OracleUNet(torch.nn.Module):
    """A perfect denoiser for clean latents that are all zero, predicting the noise or the
    velocity: x_t = sqrt(1 - a_t) noise there, so noise = x_t / sqrt(1 - a_t) and v = sqrt(a_t)
    noise. One weight scales the output, so a loss's gradient at 1 says what its target is."""

    def __init__(self, scheduler, predicts: str):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.alphas = scheduler.alphas_cumprod
        self.predicts = predicts

    def forward(self, noisy, timesteps, encoder_hidden_states=None, **kwargs):
        alpha = self.alphas[timesteps].view(-1, 1, 1, 1)
        noise = noisy / (1 - alpha).sqrt()
        perfect = noise * alpha.sqrt() if self.predicts == "v_prediction" else noise
        return SimpleNamespace(sample=self.scale * perfect)


def zero_batch(backend, prompt: str, size: int = 4) -> Batch:
    return Batch(torch.zeros(size, *backend.latent_shape), [prompt] * size)


def salun_retain_loss(backend, unet) -> float:
    concept = resolve_concept("nudity", conditioning="text")
    salun = SalUn(backend, concept, SalUnConfig(alpha=0.1, retain_reduction="mean"))
    forget = zero_batch(backend, "a photo of a nude person")
    retain = zero_batch(backend, "a photo of a person wearing clothes")
    _, terms = salun.loss(unet, forget, retain, torch.Generator().manual_seed(0))
    return terms["retain"]


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_retain_loss_is_zero_only_for_the_perfect_prediction_of_its_kind(
    tiny_vpred_dir, tiny_sd_dir, prediction_type
):
    backend = load_backend(tiny_vpred_dir if prediction_type == "v_prediction" else tiny_sd_dir)
    assert backend.noise_scheduler.config.prediction_type == prediction_type
    other = "epsilon" if prediction_type == "v_prediction" else "v_prediction"
    right = OracleUNet(backend.noise_scheduler, prediction_type)
    wrong = OracleUNet(backend.noise_scheduler, other)
    assert salun_retain_loss(backend, right) < 1e-8
    assert salun_retain_loss(backend, wrong) > 1e-2


def mask_gradient(backend, predicts: str) -> float:
    """The saliency mask's gradient on the oracle's one weight, over zero forget latents."""
    backend.unet = OracleUNet(backend.noise_scheduler, predicts)
    latents = torch.zeros(4, *backend.latent_shape)
    gradients = forget_loss_gradients(
        backend, latents, ["a photo of a nude person"] * 4, guidance_scale=7.5, batch_size=2
    )
    return gradients["scale"].abs().item()


def test_mask_loss_targets_the_velocity_on_a_v_prediction_model(tiny_vpred_dir):
    backend = load_backend(tiny_vpred_dir)
    # The perfect velocity is a stationary point of -MSE(guided prediction, target); the
    # perfect noise is not, which it would be if the target were the noise.
    assert mask_gradient(backend, "v_prediction") < 1e-6
    assert mask_gradient(backend, "epsilon") > 1e-2


def test_denoising_target_by_prediction_type():
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    timesteps = torch.tensor([0, 500, 999])
    for kind, expected in [("epsilon", noise), ("sample", latents)]:
        scheduler = DDPMScheduler(prediction_type=kind)
        assert torch.equal(denoising_target(scheduler, latents, noise, timesteps), expected)
    scheduler = DDPMScheduler(prediction_type="v_prediction")
    alpha = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    velocity = alpha.sqrt() * noise - (1 - alpha).sqrt() * latents
    target = denoising_target(scheduler, latents, noise, timesteps)
    torch.testing.assert_close(target, velocity)


def test_an_unsupported_prediction_type_is_one_clear_error():
    pipe = tiny_sd_pipeline()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="flow")
    with pytest.raises(EraseError, match="predicts 'flow'.*epsilon, v_prediction or sample"):
        StableDiffusionBackend.from_pipeline(pipe, device=torch.device("cpu"))


def test_esd_target_on_a_v_model_is_the_velocity_of_the_noise_space_target(tiny_vpred_dir):
    backend = load_backend(tiny_vpred_dir)
    assert backend.make_sampler(5).config.prediction_type == "v_prediction"  # x_t sampled right
    concept = resolve_concept("nudity", conditioning="text")
    esd = ESDCrossAttention(backend, concept, ESDConfig(negative_guidance=1.0))
    noisy = torch.randn(2, *backend.latent_shape, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([100, 700])
    target_v = esd.target(noisy, timesteps, ["nudity"] * 2)
    alpha = backend.noise_scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)

    def to_noise(v):  # eps = sqrt(a) v + sqrt(1 - a) x_t
        return alpha.sqrt() * v + (1 - alpha).sqrt() * noisy

    with torch.no_grad():
        cond, uncond = backend.encode(["nudity"] * 2), backend.unconditional(2)
        v_cond, v_uncond = (
            backend.predict_noise(esd.frozen_unet, noisy, timesteps, c) for c in (cond, uncond)
        )
    eps_cond, eps_uncond = to_noise(v_cond), to_noise(v_uncond)
    target_eps = eps_uncond - 1.0 * (eps_cond - eps_uncond)  # the paper's target, in eps space
    torch.testing.assert_close(to_noise(target_v), target_eps, atol=1e-5, rtol=1e-4)


def test_salun_erases_a_v_prediction_model_through_the_cli(tiny_vpred_dir, tmp_path):
    argv = ["--model", tiny_vpred_dir, "--concept", "nudity", "--steps", "2"]
    argv += ["--num-forget", "2", "--num-retain", "2", "--gen-steps", "2", "--no-grid"]
    assert erase_concept_main([*argv, "--output", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_sd_2_1_alias_is_the_768_v_model_and_offline_is_one_line(capsys):
    argv = ["--model", "sd-2-1", "--concept", "nudity", "--output", "unused-sd-2-1"]
    assert erase_concept_main(argv) == 2
    error = capsys.readouterr().err
    assert "stabilityai/stable-diffusion-2-1)" in error and error.count("\n") == 1
