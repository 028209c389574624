"""scikit-learn digits as a dataset, and the cached digit classifier."""

import os

import pytest
import torch

from erase.testbeds import digits
from erase.testbeds.digits import (
    DIGIT_NAMES,
    ClassifierConfig,
    DigitClassifier,
    digit_features,
    digits_dataset,
    load_digit_classifier,
)

TINY_CLASSIFIER = ClassifierConfig(image_size=8, width=8, feature_dim=16, epochs=2)


def test_digit_names_are_the_ten_words():
    assert DIGIT_NAMES[0] == "zero" and DIGIT_NAMES[3] == "three" and len(DIGIT_NAMES) == 10


@pytest.mark.parametrize("size", [8, 16, 32])
def test_dataset_is_all_digits_in_unit_range_at_the_asked_size(size):
    images, labels = digits_dataset(size)
    assert images.shape == (1797, 1, size, size) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1 and images.max() > 0.9
    assert labels.dtype == torch.long and sorted(labels.unique().tolist()) == list(range(10))


def test_upscaling_keeps_the_digit():
    small, _ = digits_dataset(8)
    large, _ = digits_dataset(16)
    back = torch.nn.functional.avg_pool2d(large, 2)  # bilinear up, then down: a slight blur
    correlation = torch.corrcoef(torch.stack([back.flatten(), small.flatten()]))[0, 1]
    assert correlation > 0.95


def test_train_and_test_splits_are_a_fixed_80_20_partition():
    all_images, all_labels = digits_dataset(8)
    train_images, train_labels = digits_dataset(8, split="train")
    test_images, test_labels = digits_dataset(8, split="test")
    assert len(train_images) + len(test_images) == len(all_images)
    assert abs(len(test_images) / len(all_images) - 0.2) < 0.01
    both = torch.cat([train_images, test_images]).flatten(1).sum(1).sort().values
    assert torch.allclose(both, all_images.flatten(1).sum(1).sort().values)
    assert torch.equal(
        torch.bincount(torch.cat([train_labels, test_labels])), torch.bincount(all_labels)
    )
    again_images, again_labels = digits_dataset(8, split="test")
    assert torch.equal(test_images, again_images) and torch.equal(test_labels, again_labels)


def test_unknown_split_is_refused():
    with pytest.raises(ValueError):
        digits_dataset(16, split="validation")


def test_classifier_takes_gray_or_rgb_and_gives_ten_logits():
    torch.manual_seed(0)
    model = DigitClassifier(16, width=8, feature_dim=16).eval()
    gray = torch.rand(3, 1, 16, 16)
    logits = model(gray)
    assert logits.shape == (3, 10)
    assert torch.allclose(model(gray.expand(-1, 3, -1, -1)), logits, atol=1e-6)


def test_classifier_resizes_other_sizes():
    model = DigitClassifier(16, width=8, feature_dim=16).eval()
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 10)


def test_digit_features_are_the_penultimate_layer():
    torch.manual_seed(0)
    model = DigitClassifier(16, width=8, feature_dim=16).eval()
    images = torch.rand(4, 3, 16, 16)
    features = digit_features(model, images)
    assert features.shape == (4, 16)
    assert torch.allclose(model.head(features), model(images), atol=1e-6)


@pytest.fixture(scope="module")
def cached_classifier(tmp_path_factory):
    """A tiny classifier trained once into a throwaway cache; returns the cache folder."""
    cache = str(tmp_path_factory.mktemp("classifier-cache"))
    load_digit_classifier(8, config=TINY_CLASSIFIER, cache_dir=cache)
    return cache


def test_classifier_is_cached_atomically_with_its_test_accuracy(cached_classifier):
    entries = os.listdir(cached_classifier)
    assert entries == ["digit-classifier-8"]  # no temporary folder left behind
    folder = digits.classifier_folder(8, cached_classifier)
    with open(os.path.join(folder, "config.json")) as file:
        config = file.read()
    assert '"test_accuracy"' in config


def test_cached_classifier_is_reused_not_retrained(cached_classifier, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("the cached classifier was trained again")

    monkeypatch.setattr(digits, "train_digit_classifier", no_training)
    model = load_digit_classifier(8, cache_dir=cached_classifier)
    assert not any(p.requires_grad for p in model.parameters())
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_cached_classifier_gives_the_same_logits_every_load(cached_classifier):
    images, _ = digits_dataset(8, split="test")
    first = load_digit_classifier(8, cache_dir=cached_classifier)(images[:16])
    second = load_digit_classifier(8, cache_dir=cached_classifier)(images[:16])
    assert torch.equal(first, second)


def test_default_cache_is_under_erase_home(monkeypatch, tmp_path):
    monkeypatch.setenv("ERASE_HOME", str(tmp_path))
    assert digits.classifier_folder(16) == os.path.join(str(tmp_path), "digit-classifier-16")


def test_a_briefly_trained_classifier_learns_the_digits():
    brief = ClassifierConfig(image_size=8, width=8, feature_dim=16, epochs=8, lr=3e-3)
    model = digits.train_digit_classifier(brief)
    assert digits.classifier_accuracy(model, "test") > 0.6  # chance is 0.1
