"""ESD through the real code path: the weights each variant trains, and the loss it minimises."""

import json
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from erase.cli import build_parser, run_erasure
from erase.concepts import resolve_concept
from erase.errors import EraseError
from erase.methods import get_method
from erase.methods.esd import ESDConfig
from erase.models import load_backend
from erase.models.base import Batch


def erase(args, folder):
    """Run erase-concept in process; returns the ErasureResult."""
    return run_erasure(build_parser().parse_args([*args, "--output", str(folder)]))


def changed_names(base_state, unet) -> set[str]:
    return {n for n, p in unet.named_parameters() if not torch.equal(p.detach(), base_state[n])}


@pytest.fixture(scope="module")
def base_state(tiny_sd_dir):
    return {n: p.detach().clone() for n, p in load_backend(tiny_sd_dir).unet.named_parameters()}


@pytest.fixture(scope="module")
def esd_x_run(tiny_sd_args, tmp_path_factory):
    folder = tmp_path_factory.mktemp("esd-x") / "out"
    args = [*tiny_sd_args, "--method", "esd-x", "--lr", "1e-3", "--negative-guidance", "2"]
    return erase(args, folder), folder


def test_esd_x_changes_only_cross_attention(esd_x_run, base_state):
    result, _ = esd_x_run
    changed = changed_names(base_state, result.backend.unet)
    assert changed
    assert all("attn2" in name for name in changed), changed


def test_esd_x_writes_a_loadable_unet(esd_x_run, tiny_sd_dir):
    result, folder = esd_x_run
    loaded = load_backend(tiny_sd_dir).load_unet(str(folder))
    for name, param in result.backend.unet.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], param), name


def test_esd_settings_are_in_metadata(esd_x_run):
    _, folder = esd_x_run
    metadata = json.loads((folder / "metadata.json").read_text())
    assert metadata["method"] == "esd-x"
    assert metadata["method_config"] == {"negative_guidance": 2.0}
    assert metadata["train_config"]["optimizer"] == "adam"


def test_esd_u_leaves_cross_attention_untouched(tiny_sd_args, base_state, tmp_path):
    result = erase([*tiny_sd_args, "--method", "esd-u", "--lr", "1e-3"], tmp_path / "out")
    changed = changed_names(base_state, result.backend.unet)
    assert changed
    assert not any("attn2" in name for name in changed), changed


def test_esd_x_strict_trains_only_keys_and_values(tiny_sd_dir):
    backend = load_backend(tiny_sd_dir)
    concept = resolve_concept("nudity", conditioning="text")
    method = get_method("esd-x-strict")(backend, concept, ESDConfig())
    trained = [n for n, _ in backend.unet.named_parameters() if method.trainable(n)]
    assert trained
    assert all(".attn2.to_k." in n or ".attn2.to_v." in n for n in trained), trained


def test_frozen_copy_owns_only_the_trained_weights(tiny_sd_dir):
    backend = load_backend(tiny_sd_dir)
    concept = resolve_concept("nudity", conditioning="text")
    method = get_method("esd-x")(backend, concept, ESDConfig())
    frozen = dict(method.frozen_unet.named_parameters())
    for name, param in backend.unet.named_parameters():
        assert (frozen[name] is param) != ("attn2" in name), name
        assert torch.equal(frozen[name], param)


def esd_distance(backend, unet, noisy, timesteps, target):
    """MSE between `unet`'s eps(x_t, c) and the ESD target, at fixed x_t and t."""
    with torch.no_grad():
        cond = backend.encode(["a photo of a nude person"] * len(noisy))
        return torch.nn.functional.mse_loss(
            backend.predict_noise(unet, noisy, timesteps, cond).float(), target
        ).item()


def test_esd_moves_prediction_toward_negatively_guided_target(tiny_sd_dir, tiny_sd_args, tmp_path):
    backend = load_backend(tiny_sd_dir)
    concept = resolve_concept("nudity", conditioning="text")
    method = get_method("esd-x")(backend, concept, ESDConfig())
    prompts = ["a photo of a nude person"] * 4
    shape = (4, *backend.latent_shape)
    noisy, timesteps = method.partial_sample(
        backend.unet, prompts, shape, torch.Generator().manual_seed(3)
    )
    target = method.target(noisy, timesteps, prompts)
    before = esd_distance(backend, backend.unet, noisy, timesteps, target)
    args = [*tiny_sd_args, "--method", "esd-x", "--lr", "3e-3", "--steps", "15"]
    after = esd_distance(
        backend, erase(args, tmp_path / "out").backend.unet, noisy, timesteps, target
    )
    assert after < 0.7 * before


class TinyClassBackend:
    """Just enough of a class-conditional backend: a UNet2DModel with a null class."""

    conditioning = "class"
    device = torch.device("cpu")
    identity = "tiny-class"
    latent_shape = (1, 8, 8)
    null_class = 3

    def __init__(self):
        torch.manual_seed(0)
        self.unet = UNet2DModel(
            sample_size=8,
            in_channels=1,
            out_channels=1,
            block_out_channels=(8, 16),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=4,
            num_class_embeds=4,
        )
        self.noise_scheduler = DDPMScheduler()

    def encode(self, conditions):
        return torch.tensor([int(c) for c in conditions])

    def unconditional(self, batch_size):
        return torch.full((batch_size,), self.null_class)

    def predict_noise(self, unet, noisy, timesteps, cond):
        return unet(noisy, timesteps, class_labels=cond).sample

    def make_sampler(self, num_steps):
        sampler = DDIMScheduler.from_config(self.noise_scheduler.config)
        sampler.set_timesteps(num_steps)
        return sampler


def class_concept():
    return resolve_concept("1", conditioning="class", class_names=["zero", "one", "two"])


def test_esd_u_trains_a_class_conditional_unet():
    backend = TinyClassBackend()
    method = get_method("esd-u")(backend, class_concept(), ESDConfig())
    forget = Batch(torch.zeros(2, *backend.latent_shape), [1, 1])
    loss, terms = method.loss(backend.unet, forget, forget, torch.Generator().manual_seed(0))
    loss.backward()
    assert terms["esd"] > 0
    assert backend.unet.class_embedding.weight.grad[1].abs().sum() > 0


@pytest.mark.parametrize("name", ["esd-x", "esd-x-strict"])
def test_esd_x_on_a_class_backend_is_an_error(name):
    backend = SimpleNamespace(conditioning="class", unet=torch.nn.Linear(1, 1), identity="ddpm")
    with pytest.raises(EraseError, match="esd-u"):
        get_method(name)(backend, class_concept(), ESDConfig())
