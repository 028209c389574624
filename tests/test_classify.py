"""Class-removal evaluation: metrics from known classifications, determinism, report, errors."""

import os

import pytest
import torch
from PIL import Image

from erase.errors import EraseError
from erase.models.base import declare_optional
from erase.models.ddpm import ClassDDPMBackend
from erase.testbeds.ddpm_training import DDPMConfig, build_class_unet
from erase.testbeds.digits import DIGIT_NAMES, DigitClassifier, digits_dataset
from eval.classify import (
    DIGIT_FID_FEATURE,
    PenultimateFeatures,
    class_removal,
    imagenette_accuracy,
    write_class_report,
)

NUM_CLASSES = 4


@declare_optional
class CodedBackend:
    """A class backend whose samples encode their label as brightness; seeds add tiny noise.

    `broken` classes come out as the image of `broken_to`, as if that class had been erased.
    """

    conditioning = "class"
    identity = "coded"
    guidance_scale = 2.0
    class_names = ["a", "b", "c", "d"]

    def __init__(self, broken=(), broken_to=0):
        self.broken, self.broken_to = set(broken), broken_to
        self.classifier = CodedClassifier()

    def sample(self, conditions, seeds, *, num_steps, guidance_scale, unet=None, **_):
        images = []
        for label, seed in zip(conditions, seeds):
            label = self.broken_to if int(label) in self.broken else int(label)
            noise = 0.01 * torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(seed))
            images.append(torch.full((1, 4, 4), (label + 0.5) / NUM_CLASSES) + noise)
        return torch.stack(images).clamp(0, 1)

    def real_images(self, classes, count):
        """The dataset is never erased: real images ignore `broken`."""
        labels = [k for k in classes for _ in range(20)][:count]
        intact = CodedBackend()
        return intact.sample(
            labels, range(1000, 1000 + len(labels)), num_steps=1, guidance_scale=0
        ), labels


class CodedClassifier(torch.nn.Module):
    """Reads the label back from the brightness; features are the brightness and its square."""

    def __init__(self, sharpness=10.0):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.sharpness = sharpness  # logits' scale: how confident the read label is

    def features(self, images):
        brightness = images.float().mean(dim=(1, 2, 3))[:, None] * self.scale
        return torch.cat([brightness, brightness**2], dim=1)

    def forward(self, images):
        label = (images.float().mean(dim=(1, 2, 3)) * NUM_CLASSES).floor().clamp(0, 3).long()
        return self.sharpness * torch.nn.functional.one_hot(label, NUM_CLASSES).float()


def test_an_intact_model_has_zero_ua_and_full_accuracy():
    metrics, _ = class_removal(CodedBackend(), 2, num_per_class=5, num_steps=1)
    assert metrics["ua"] == 0.0
    assert metrics["forget_accuracy"] == 1.0
    assert metrics["retain_accuracy"] == 1.0


def test_an_erased_class_gives_ua_one_and_leaves_the_others():
    metrics, _ = class_removal(CodedBackend(broken={2}), 2, num_per_class=5, num_steps=1)
    assert metrics["ua"] == 1.0
    assert metrics["retain_accuracy"] == 1.0
    assert metrics["per_class_accuracy"] == {"a": 1.0, "b": 1.0, "c": 0.0, "d": 1.0}


def test_retain_accuracy_is_the_mean_over_the_other_classes():
    metrics, _ = class_removal(CodedBackend(broken={1}), 2, num_per_class=5, num_steps=1)
    assert metrics["retain_accuracy"] == pytest.approx(2 / 3)
    assert metrics["forget_accuracy"] == 1.0


def test_confident_accuracy_counts_only_clear_verdicts():
    sure, _ = class_removal(CodedBackend(), 2, num_per_class=5, num_steps=1)
    backend = CodedBackend()
    backend.classifier = CodedClassifier(sharpness=1.0)  # right by argmax, at p = 0.48
    unsure, _ = class_removal(backend, 2, num_per_class=5, num_steps=1)
    assert sure["retain_confident_accuracy"] == 1.0
    assert unsure["retain_accuracy"] == 1.0 and unsure["retain_confident_accuracy"] == 0.0


def test_images_come_class_by_class_with_the_same_seeds_every_call():
    backend = CodedBackend()
    _, first = class_removal(backend, 0, num_per_class=3, num_steps=1, seed=7)
    _, again = class_removal(backend, 0, num_per_class=3, num_steps=1, seed=7)
    _, other_seed = class_removal(backend, 0, num_per_class=3, num_steps=1, seed=8)
    assert first.shape == (NUM_CLASSES * 3, 1, 4, 4)
    assert torch.equal(first, again)
    assert not torch.equal(first, other_seed)
    brightness = first.mean(dim=(1, 2, 3)).view(NUM_CLASSES, 3)
    assert torch.all(brightness[1:].min(dim=1).values > brightness[:-1].max(dim=1).values)


def test_fid_grows_when_a_retained_class_changes():
    intact, _ = class_removal(CodedBackend(), 0, num_per_class=20, num_steps=1)
    damaged, _ = class_removal(
        CodedBackend(broken={3}, broken_to=1), 0, num_per_class=20, num_steps=1
    )
    assert intact["fid_retain"] < 0.05
    assert damaged["fid_retain"] > 10 * intact["fid_retain"] + 0.01


def test_fid_features_leave_the_classifier_in_float32():
    classifier = DigitClassifier(16, width=8, feature_dim=16)
    features = PenultimateFeatures(classifier, torch.rand(2, 3, 16, 16))
    assert features.num_features == 16
    features.double()  # what torchmetrics' set_dtype does to its feature module
    assert classifier.head.weight.dtype == torch.float32
    assert features(torch.rand(3, 1, 16, 16)).shape == (3, 16)


def test_a_backend_without_classifier_is_a_clear_error():
    backend = CodedBackend()
    backend.classifier = None
    with pytest.raises(EraseError, match="classifier"):
        class_removal(backend, 0, num_per_class=1, num_steps=1)


@pytest.fixture(scope="module")
def tiny_ddpm_backend() -> ClassDDPMBackend:
    """An untrained 10-class DDPM over the digits with an untrained digit classifier."""
    torch.manual_seed(0)
    unet = build_class_unet(10, DDPMConfig(block_out_channels=(8, 16), norm_num_groups=4))
    return ClassDDPMBackend(
        unet,
        DIGIT_NAMES,
        identity="tiny-ddpm",
        dataset=lambda: digits_dataset(16, split="train"),
        device=torch.device("cpu"),
        classifier=DigitClassifier(16, width=8, feature_dim=16).eval(),
    )


def test_class_removal_on_a_class_ddpm_reports_every_metric(tiny_ddpm_backend):
    metrics, images = class_removal(tiny_ddpm_backend, 3, num_per_class=2, num_steps=2)
    assert images.shape == (20, 3, 16, 16)
    assert 0 <= images.min() and images.max() <= 1
    assert set(metrics["per_class_accuracy"]) == set(DIGIT_NAMES)
    assert metrics["ua"] == pytest.approx(1 - metrics["per_class_accuracy"]["three"])
    assert metrics["fid_feature"] == DIGIT_FID_FEATURE
    assert metrics["fid_retain"] is not None and metrics["fid_retain"] >= 0
    assert (metrics["num_per_class"], metrics["seed"]) == (2, 0)


def test_write_class_report_writes_table_and_grid(tmp_path):
    backend = CodedBackend(broken={2})
    before, before_images = class_removal(CodedBackend(), 2, num_per_class=3, num_steps=1)
    after, after_images = class_removal(backend, 2, num_per_class=3, num_steps=1)
    write_class_report(
        str(tmp_path), before, after, before_images, after_images, backend.class_names
    )
    report = (tmp_path / "report.md").read_text()
    assert "| UA (1 - forgotten-class accuracy) | 0.000 | 1.000 |" in report
    assert "| c | 1.000 | 0.000 |" in report
    with Image.open(tmp_path / "grid.png") as grid:
        width, height = grid.size
    # 4 rows of 4 px images upscaled 16x, 7 columns (3 before, a gap, 3 after), 2 px padding
    assert (width, height) == (7 * 66 + 2, 4 * 66 + 2)


def test_imagenette_accuracy_without_weights_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache: the download must fail
    with pytest.raises(EraseError, match="ResNet-50"):
        imagenette_accuracy(torch.rand(1, 3, 32, 32), [0])


def test_imagenette_accuracy_with_a_weights_file(tmp_path):
    from torchvision.models import resnet50

    torch.manual_seed(0)
    path = os.path.join(tmp_path, "resnet50.pt")
    torch.save(resnet50().state_dict(), path)
    accuracy = imagenette_accuracy(torch.rand(2, 3, 32, 32), [0, 4], weights_path=path)
    assert 0.0 <= accuracy <= 1.0
