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
