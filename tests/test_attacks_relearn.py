"""The relearning attack on a small class DDPM that never learnt the digit 3 (a tiny Retrain)."""

import pytest
import torch

from erase.errors import EraseError
from erase.models.ddpm import ClassDDPMBackend
from erase.testbeds.ddpm_training import DDPMConfig, train_class_ddpm
from erase.testbeds.digits import (
    DIGIT_NAMES,
    ClassifierConfig,
    digits_dataset,
    train_digit_classifier,
)
from eval.attacks import relearn
from eval.attacks.judges import ClassifierJudge
from eval.attacks.target import AttackTarget, default_entries

SMALL = DDPMConfig(image_size=8, block_out_channels=(16, 32), norm_num_groups=4, steps=500)


@pytest.fixture(scope="module")
def target() -> AttackTarget:
    """A DDPM trained briefly on every digit but 3, judged by its own small classifier."""
    images, labels = digits_dataset(8, split="train")
    kept = labels != 3
    unet = train_class_ddpm(images[kept], labels[kept], 10, SMALL, device=torch.device("cpu"))
    backend = ClassDDPMBackend(
        unet,
        DIGIT_NAMES,
        identity="small-ddpm",
        dataset=lambda: digits_dataset(8, split="train"),
        device=torch.device("cpu"),
    )
    classifier = train_digit_classifier(
        ClassifierConfig(image_size=8, width=8, feature_dim=32, epochs=15)
    )
    judge = ClassifierJudge(classifier, 3, "three", "digit classifier")
    return AttackTarget(backend, backend.unet, "three", judge, default_entries(backend, "3", 32, 0))


def test_relearning_on_the_forgotten_class_raises_its_judged_rate(target):
    config = relearn.Config(checkpoints=[0, 60], lr=1e-3)
    curve = relearn.relearn_curve(target, config, num_steps=10, progress=False)
    assert [point["step"] for point in curve] == [0, 60]
    rates = [point["positive_rate"] for point in curve]
    assert rates[1] > rates[0] + 0.2, rates
    assert target.unet.training is False  # the attacked UNet itself is untouched (a copy trains)


def test_forget_data_are_the_digit_and_retain_data_the_others(target):
    images, labels = relearn.relearn_data(target, relearn.Config(data="forget", num_images=50))
    assert len(images) == 50 and set(labels) == {3}
    images, labels = relearn.relearn_data(target, relearn.Config(data="retain", num_images=50))
    assert len(images) == 50 and 3 not in labels


def test_steps_to_recover_is_the_first_checkpoint_at_half_the_base_rate():
    curve = [
        {"step": 0, "positive_rate": 0.1},
        {"step": 10, "positive_rate": 0.4},
        {"step": 25, "positive_rate": 0.6},
    ]
    assert relearn.steps_to_recover(curve, base_rate=0.7) == 10
    assert relearn.steps_to_recover(curve, base_rate=1.0) == 25
    assert relearn.steps_to_recover(curve[:2], base_rate=1.0) is None


def test_each_prompt_is_judged_at_its_own_guidance():
    from prompts import PromptEntry

    sampled = []  # (prompt, guidance) of every image generated

    class RecordingBackend:
        guidance_scale = 7.5

        def sample(self, prompts, seeds, *, guidance_scale, **settings):
            sampled.extend((prompt, guidance_scale) for prompt in prompts)
            return torch.zeros(len(prompts), 3, 4, 4)

    entries = [
        PromptEntry("a", 0, 0, 7.0),
        PromptEntry("b", 1, 1, 3.0),
        PromptEntry("c", 2, 2, 7.0),
        PromptEntry("d", 3, 3, None),  # none of its own: the model's
    ]
    target = AttackTarget(
        RecordingBackend(), None, "x", lambda images: [{"positive": True}] * len(images), entries
    )
    assert relearn.judged_rate(target, None) == 1.0
    assert sorted(sampled) == [("a", 7.0), ("b", 3.0), ("c", 7.0), ("d", 7.5)]


def test_every_combination_of_data_tuning_and_lr_is_one_attack():
    config = relearn.Config(data=["forget", "retain"], tuning=["full", "lora"], lr=[1e-5, 1e-4])
    labels = [relearn.curve_label(attack) for attack in config.attacks()]
    assert labels[:3] == ["forget/full/1e-05", "forget/full/0.0001", "forget/lora/1e-05"]
    assert len(labels) == len(set(labels)) == 8 and labels[-1] == "retain/lora/0.0001"
    one = relearn.Config(data="retain", lr=1e-5)  # single values, as the Python API passes them
    assert (one.data, one.tuning, one.lr) == (["retain"], ["full"], [1e-5])


@pytest.mark.parametrize(
    "values, message",
    [
        ({"tuning": ["qlora"]}, "--relearn-tuning 'qlora'"),
        ({"lr": [1e-4, 0.0]}, "--relearn-lr"),
        ({"lora_rank": 0}, "--relearn-lora-rank"),
    ],
)
def test_bad_relearning_settings_are_refused(values, message):
    with pytest.raises(EraseError, match=message):
        relearn.Config(**values)


def test_area_under_the_curve_is_the_mean_rate_over_the_steps():
    curve = [
        {"step": 0, "positive_rate": 0.0},
        {"step": 10, "positive_rate": 1.0},
        {"step": 30, "positive_rate": 0.5},
    ]
    # trapezoids: 10 * 0.5 + 20 * 0.75 = 20 over 30 steps
    assert relearn.curve_area(curve) == pytest.approx(0.6667, abs=1e-4)
    assert relearn.curve_area(curve[:1]) is None


def test_lora_relearning_leaves_the_attacked_unet_untouched(target):
    before = {name: value.clone() for name, value in target.unet.state_dict().items()}
    config = relearn.Config(tuning="lora", lr=1e-2, checkpoints=[0, 3])
    curve = relearn.relearn_curve(target, config, num_steps=5, progress=False)
    assert [point["step"] for point in curve] == [0, 3]
    after = target.unet.state_dict()
    assert after.keys() == before.keys()  # no adapter left in the attacked UNet
    assert all(torch.equal(after[name], value) for name, value in before.items())


def test_run_reports_a_curve_per_attack_the_first_at_the_top(target):
    from eval.runner import GenerationConfig

    config = relearn.Config(data=["forget", "retain"], lr=1e-3, checkpoints=[0, 40])
    figures = relearn.run(
        target, config, "", GenerationConfig(model="small-ddpm", num_steps=10), progress=False
    )
    curves = figures["curves"]
    assert [c["label"] for c in curves] == ["forget/full/0.001", "retain/full/0.001"]
    assert figures["curve"] == curves[0]["curve"] and figures["auc"] == curves[0]["auc"]
    for curve in curves:
        assert curve["auc"] == relearn.curve_area(curve["curve"])
        assert curve["steps_to_recover"] == relearn.steps_to_recover(
            curve["curve"], figures["base_positive_rate"]
        )
    # the digit's own images bring it back faster than the other digits'
    assert curves[0]["curve"][-1]["positive_rate"] > curves[1]["curve"][-1]["positive_rate"]
