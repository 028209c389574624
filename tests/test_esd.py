"""ESD through the real code path: the weights each variant trains, and the loss it minimises."""

import json
from types import SimpleNamespace

import pytest
import torch

from erase.api import run
from erase.cli.concept import build_parser, config_from_args
from erase.concepts import resolve_concept
from erase.errors import EraseError
from erase.methods import get_method
from erase.methods.esd import NOXATTN_EXCLUDED_PREFIXES, ESDConfig
from erase.models import load_backend
from erase.models.ddpm import ClassDDPMBackend
from erase.testbeds.ddpm_training import DDPMConfig, build_class_unet
from erase.train import TrainConfig, make_accelerator, train


def erase(args, folder):
    """Run erase-concept in process; returns the ErasureResult."""
    return run(config_from_args(build_parser().parse_args([*args, "--output", str(folder)])))


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
    # no cross-attention here: esd-u trains everything but the time embedding and output layer
    assert changed == {n for n in base if not n.startswith(NOXATTN_EXCLUDED_PREFIXES)}


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


def sd_v1_unet_parameter_names() -> list[str]:
    """Parameter names of SD v1.x's UNet (diffusers' default config), built without weights."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel()  # the default config is SD v1.x's 860 M UNet
    return [name for name, _ in unet.named_parameters()]


# The reference train-esd.py selects on CompVis names: `noxattn` skips names with "attn2" or
# "time_embed" and names starting with "out." (the final GroupNorm out.0 and conv out.2). Its
# top-level CompVis modules and their diffusers names, after diffusers' conversion script:
COMPVIS_TOP_LEVEL = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
    "input_blocks.0.0": "conv_in",
}


def reference_noxattn(diffusers_name: str) -> bool:
    """The reference's noxattn rule, applied to the CompVis name of a diffusers parameter."""
    module, _, leaf = diffusers_name.rpartition(".")
    compvis = {v: k for k, v in COMPVIS_TOP_LEVEL.items()}.get(module)
    name = f"{compvis}.{leaf}" if compvis else diffusers_name  # blocks keep attn1/attn2 names
    return not (name.startswith("out.") or "attn2" in name or "time_embed" in name)


def test_esd_u_trains_the_reference_noxattn_selection_on_the_sd_v1_unet():
    names = sd_v1_unet_parameter_names()
    method = get_method("esd-u")
    trained = {n for n in names if method.trainable(method, n)}
    assert trained == {n for n in names if reference_noxattn(n)}
    assert "time_embedding.linear_1.weight" not in trained and "conv_out.weight" not in trained
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight" in trained
    assert "down_blocks.0.resnets.0.time_emb_proj.weight" in trained  # not time_embed


def test_selfattn_and_full_variants_select_as_the_reference():
    names = sd_v1_unet_parameter_names()
    selfattn, full = get_method("esd-selfattn"), get_method("esd-full")
    assert {n for n in names if selfattn.trainable(selfattn, n)} == {
        n for n in names if "attn1" in n
    }
    assert all(full.trainable(full, n) for n in names)


def test_esd_trains_on_the_bare_concept_word():
    assert resolve_concept("nudity", conditioning="text").terms == ["nudity"]
    assert resolve_concept("Van Gogh", conditioning="text").terms == ["Van Gogh"]


def test_esd_loss_conditions_on_the_terms_of_every_concept(tiny_sd_dir, monkeypatch):
    from erase.concepts import union
    from erase.models.base import Batch

    backend = load_backend(tiny_sd_dir)
    concept = union([resolve_concept(c, conditioning="text") for c in ("nudity", "church")])
    method = get_method("esd-u")(backend, concept, ESDConfig())
    seen = []
    monkeypatch.setattr(
        method,
        "partial_sample",
        lambda unet, conditions, shape, generator: (
            seen.extend(conditions) or torch.zeros(shape),
            torch.zeros(shape[0], dtype=torch.long),
        ),
    )
    batch = Batch(torch.zeros(8, *backend.latent_shape), ["x"] * 8)
    for seed in range(4):
        method.loss(backend.unet, batch, batch, torch.Generator().manual_seed(seed))
    assert set(seen) == {"nudity", "church"}
