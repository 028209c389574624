"""Retrain: the testbed trained without the forgotten digit, built once and cached."""

import pytest
import torch

from erase.errors import EraseError
from erase.testbeds import retrain, sd_digits

TINY = sd_digits.SDDigitsConfig(
    vae_steps=2, unet_steps=2, batch_size=4, unet_channels=(8, 16), text_width=8
)


def test_retrain_is_only_for_the_testbeds():
    with pytest.raises(EraseError, match="only on the testbeds"):
        retrain.load_retrain("sd-v1-4", "3")
    with pytest.raises(EraseError, match="digit 0-9"):
        retrain.load_retrain("sd-digits", "church")


def test_sd_digits_retrain_leaves_the_digit_out_and_is_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("ERASE_HOME", str(tmp_path))
    configs = []
    real = sd_digits.train_sd_digits

    def tiny_train(folder, config=None):
        configs.append(config)
        return real(
            folder, sd_digits.SDDigitsConfig(**{**TINY.__dict__, "exclude": config.exclude})
        )

    monkeypatch.setattr(sd_digits, "train_sd_digits", tiny_train)
    first = retrain.load_retrain("sd-digits", "three", device=torch.device("cpu"))
    second = retrain.load_retrain("sd-digits", "3", device=torch.device("cpu"))
    assert [c.exclude for c in configs] == [(3,)]
    assert first.identity == second.identity == "sd-digits retrained without three"
    assert first.digit_names[3] == "three"


def test_unet_only_retrain_keeps_the_base_text_encoder_and_vae(monkeypatch, tmp_path):
    monkeypatch.setenv("ERASE_HOME", str(tmp_path))
    configs = []
    real = sd_digits.train_sd_digits

    def tiny_train(folder, config=None):
        config = config or sd_digits.SDDigitsConfig()
        configs.append(config)
        kept = {"exclude": config.exclude, "text_encoder_from": config.text_encoder_from}
        return real(folder, sd_digits.SDDigitsConfig(**{**TINY.__dict__, **kept}))

    monkeypatch.setattr(sd_digits, "train_sd_digits", tiny_train)
    cpu = torch.device("cpu")
    retrained = retrain.load_retrain("sd-digits", "three", device=cpu, unet_only=True)
    base = sd_digits.load_sd_digits(device=cpu)
    assert [(c.exclude, c.text_encoder_from) for c in configs] == [
        ((), None),  # the base model, trained first
        ((3,), sd_digits.sd_digits_folder()),
    ]
    assert retrained.identity == "sd-digits its UNet retrained without three"
    for part in ("text_encoder", "vae"):
        ours = getattr(retrained.pipe, part).state_dict()
        theirs = getattr(base.pipe, part).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), part
    base_unet, new_unet = base.unet.state_dict(), retrained.unet.state_dict()
    assert any(not torch.equal(base_unet[k], new_unet[k]) for k in base_unet)
    with pytest.raises(EraseError, match="sd-digits alone"):
        retrain.load_retrain("ddpm-digits", "3", unet_only=True)
