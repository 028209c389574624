"""ESD through the real code path: the weights each variant trains, and the loss it minimises."""

import json
from types import SimpleNamespace

import pytest
import torch

from erase.cli import build_parser
from erase.concepts import resolve_concept
from erase.erasure import run_erasure
from erase.errors import EraseError
from erase.methods import get_method
from erase.methods.esd import ESDConfig
from erase.models import load_backend
from erase.models.ddpm import ClassDDPMBackend, DDPMConfig, build_class_unet
from erase.train import TrainConfig, make_accelerator, train


def erase(args, folder):
    """Run erase-concept in process; returns the ErasureResult."""
    return run_erasure(build_parser().parse_args([*args, "--output", str(folder)]))


def changed_names(base_state, unet) -> set[str]:
    return {n for n, p in unet.named_parameters() if not torch.equal(p.detach(), base_state[n])}


@pytest.fixture(autouse=True)
def few_sampling_steps(monkeypatch):
    """5 DDIM steps instead of 50 for x_t: ten times cheaper, and no test depends on 50."""
    monkeypatch.setattr("erase.methods.esd.SAMPLING_STEPS", 5)


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
    args = [*tiny_sd_args, "--method", "esd-x", "--lr", "3e-3", "--steps", "8"]
    after = esd_distance(
        backend, erase(args, tmp_path / "out").backend.unet, noisy, timesteps, target
    )
    assert after < 0.7 * before


def tiny_class_backend():
    """A class-conditional DDPM backend with a random tiny UNet (three classes + null)."""
    torch.manual_seed(0)
    config = DDPMConfig(image_size=8, block_out_channels=(8, 16), norm_num_groups=4, dropout=0.1)
    unet = build_class_unet(3, config)
    return ClassDDPMBackend(
        unet, ["zero", "one", "two"], identity="tiny-ddpm", device=torch.device("cpu")
    )


def class_concept():
    return resolve_concept("1", conditioning="class", class_names=["zero", "one", "two"])


def test_esd_u_trains_a_class_conditional_unet():
    backend = tiny_class_backend()
    base = {n: p.detach().clone() for n, p in backend.unet.named_parameters()}
    method = get_method("esd-u")(backend, class_concept(), ESDConfig())
    latents = torch.zeros(2, *backend.latent_shape)  # only their shape is used
    config = TrainConfig(lr=1e-3, steps=2, batch_size=2, optimizer="adam")
    result = train(
        make_accelerator(config), backend, method, (latents, [1, 1]), (latents, [0, 2]), config
    )
    assert result.last_terms["esd"] > 0
    changed = {n for n, p in backend.unet.named_parameters() if not torch.equal(p, base[n])}
    assert "class_embedding.weight" in changed
    assert len(changed) == len(base)  # no cross-attention here: esd-u trains everything


@pytest.mark.parametrize("name", ["esd-x", "esd-x-strict"])
def test_esd_x_on_a_class_backend_is_an_error(name):
    backend = SimpleNamespace(conditioning="class", unet=torch.nn.Linear(1, 1), identity="ddpm")
    with pytest.raises(EraseError, match="esd-u"):
        get_method(name)(backend, class_concept(), ESDConfig())


def test_esd_generates_no_forget_set(tiny_sd_args, tmp_path, monkeypatch):
    from erase.models.sd import StableDiffusionBackend

    def no_sampling(*args, **kwargs):
        raise AssertionError("ESD samples its own x_t; no forget/retain set is needed")

    monkeypatch.setattr(StableDiffusionBackend, "sample", no_sampling)
    argv = [*tiny_sd_args, "--method", "esd-u", "--steps", "1", "--no-grid"]
    result = erase(argv, tmp_path / "out")
    assert result.metadata["data_source"].startswith("none")
