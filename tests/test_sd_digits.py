"""sd-digits: digit concepts, held-out evaluation captions, and a (tiny) trained pipeline folder."""

import json
import os
import warnings

import pytest
import torch

from erase.errors import EraseError
from erase.testbeds import sd_digits
from erase.testbeds.digits import DIGIT_NAMES
from erase.testbeds.sd_digits import (
    HELD_OUT_ONLY,
    HELD_OUT_TEMPLATES,
    TRAIN_TEMPLATES,
    SDDigitsBackend,
    SDDigitsConfig,
    train_sd_digits,
)

TINY = SDDigitsConfig(vae_steps=2, unet_steps=2, batch_size=4, unet_channels=(8, 16), text_width=8)


@pytest.fixture(scope="module")
def tiny_sd_digits(tmp_path_factory) -> str:
    """An sd-digits folder trained for two steps: the real format, not the real quality."""
    return train_sd_digits(str(tmp_path_factory.mktemp("sd-digits") / "sd-digits"), TINY)


@pytest.fixture(scope="module")
def backend(tiny_sd_digits) -> SDDigitsBackend:
    return SDDigitsBackend(tiny_sd_digits, device=torch.device("cpu"))


def test_the_folder_is_a_stable_diffusion_pipeline(tiny_sd_digits):
    with open(os.path.join(tiny_sd_digits, "model_index.json")) as file:
        index = json.load(file)
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"][1] == "UNet2DConditionModel" and index["vae"][1] == "AutoencoderKL"
    assert not [name for name in os.listdir(os.path.dirname(tiny_sd_digits)) if "partial" in name]


def test_the_unet_has_cross_attention_for_forget_me_not(backend):
    assert any("attn2" in name for name, _ in backend.unet.named_parameters())
    assert backend.identity == "sd-digits" and backend.resolution == TINY.image_size


@pytest.mark.parametrize("spelling", ["three", "3", " Three "])
def test_a_digit_concept_forgets_its_captions_and_retains_the_others(backend, spelling):
    concept = backend.concept_prompts(spelling)
    assert concept.name == "three"
    assert sorted(concept.forget) == sorted(
        t.format(name="three", number=3) for t in TRAIN_TEMPLATES
    )
    assert len(concept.retain) == 9 * len(TRAIN_TEMPLATES)
    assert not any("three" in p.split() or "3" in p.split() for p in concept.retain)
    assert set(concept.words) == {"three", "3"}


def test_an_unknown_digit_is_a_user_error(backend):
    with pytest.raises(EraseError, match="digits 0-9"):
        backend.concept_prompts("eleven")


def test_evaluation_captions_were_never_trained_on(backend):
    trained = {
        t.format(name=name, number=d) for t in TRAIN_TEMPLATES for d, name in enumerate(DIGIT_NAMES)
    }
    for digit in range(10):
        held_out = backend.eval_prompts(digit)
        assert len(held_out) == len(HELD_OUT_TEMPLATES)
        assert not set(held_out) & trained
        assert all(DIGIT_NAMES[digit] in p.split() or str(digit) in p.split() for p in held_out)


def test_every_caption_word_is_one_token(backend):
    tokenizer = backend.pipe.tokenizer
    for word in {w for p in sd_digits.all_words() for w in p.split()}:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word


def test_sampling_gives_images_at_the_model_resolution(backend):
    images = backend.sample(
        ["the number 3", "a drawing of a 7"], [0, 1], num_steps=2, guidance_scale=3
    )
    assert images.shape == (2, 3, TINY.image_size, TINY.image_size)
    assert images.min() >= 0 and images.max() <= 1


def test_load_sd_digits_trains_once_then_reuses_the_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ERASE_HOME", str(tmp_path))
    calls = []

    def tiny_train(folder, config=None):
        calls.append(folder)
        return train_sd_digits(folder, TINY)

    monkeypatch.setattr(sd_digits, "train_sd_digits", tiny_train)
    first = sd_digits.load_sd_digits(device=torch.device("cpu"))
    notice = capsys.readouterr()
    second = sd_digits.load_sd_digits(device=torch.device("cpu"))
    assert calls == [str(tmp_path / f"sd-digits-v{sd_digits.CACHE_VERSION}")]
    assert first.identity == second.identity == "sd-digits"
    # the first use says, before training, where the model goes and about how long it takes
    assert "first use" in notice.err and calls[0] in notice.err and "minutes" in notice.err
    assert notice.out == "" and "first use" not in capsys.readouterr().err


def test_an_interrupted_save_leaves_nothing_and_the_next_use_trains_again(tmp_path, monkeypatch):
    real_as_pipeline = sd_digits.as_pipeline

    def interrupted_save(*components):
        pipe = real_as_pipeline(*components)

        def save_half(folder, **kwargs):
            pipe.unet.save_pretrained(os.path.join(folder, "unet"))  # the UNet is written...
            raise KeyboardInterrupt  # ...then Ctrl-C

        pipe.save_pretrained = save_half
        return pipe

    folder = str(tmp_path / "sd-digits")
    monkeypatch.setattr(sd_digits, "as_pipeline", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        train_sd_digits(folder, TINY)
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(sd_digits, "as_pipeline", real_as_pipeline)
    train_sd_digits(folder, TINY)
    assert os.listdir(tmp_path) == ["sd-digits"]
    assert os.path.isfile(os.path.join(folder, "model_index.json"))


def test_training_prints_no_diffusers_notice(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_sd_digits(str(tmp_path / "sd-digits"), TINY)
    assert not [w for w in caught if "steps_offset" in str(w.message)]


def test_training_runs_on_one_thread_and_gives_the_caller_its_threads_back(monkeypatch, tmp_path):
    seen = []
    real = sd_digits.train_unet

    def spy(*args):
        seen.append(torch.get_num_threads())
        return real(*args)

    monkeypatch.setattr(sd_digits, "train_unet", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        train_sd_digits(str(tmp_path / "sd-digits"), TINY)
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_filler_words_never_name_a_digit_or_a_held_out_word(backend):
    fillers = sd_digits.filler_words(backend.pipe.tokenizer)
    assert fillers and not set(fillers) & {*DIGIT_NAMES, *HELD_OUT_ONLY}
    assert not any(word.isdigit() for word in fillers)


def test_training_captions_keep_their_digit_among_the_fillers(backend):
    fillers = sd_digits.filler_words(backend.pipe.tokenizer)
    generator = torch.Generator().manual_seed(0)
    captions = [sd_digits.training_caption(7, fillers, TINY, generator) for _ in range(50)]
    assert all("seven" in c.split() or "7" in c.split() for c in captions)
    assert any(len(c.split()) > 5 for c in captions)  # some got filler words
    held_out_words = {w for t in HELD_OUT_TEMPLATES for w in t.split()} - {
        w for t in TRAIN_TEMPLATES for w in t.split()
    }
    assert not {w for c in captions for w in c.split()} & held_out_words


def test_excluded_digits_are_left_out_of_training(monkeypatch, tmp_path):
    seen = []
    real = sd_digits.train_unet

    def spy(tokenizer, text_encoder, unet, vae, images, labels, config):
        seen.append(labels)
        return real(tokenizer, text_encoder, unet, vae, images, labels, config)

    monkeypatch.setattr(sd_digits, "train_unet", spy)
    config = SDDigitsConfig(**{**TINY.__dict__, "exclude": (3,)})
    train_sd_digits(str(tmp_path / "without-3"), config)
    assert 3 not in seen[0].tolist() and set(seen[0].tolist()) == set(range(10)) - {3}
