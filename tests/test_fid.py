"""FID with a tiny feature module: ~0 for identical sets, larger for different ones."""

import numpy as np
import pytest
import torch
from PIL import Image

from erase.errors import EraseError
from eval.fid import fid_metric, frechet_distance, frechet_distance_files, image_files


class TinyFeatures(torch.nn.Module):
    """Fixed random projection of 8x8-pooled pixels: a stand-in for Inception."""

    num_features = 16

    def __init__(self):
        super().__init__()
        self.projection = torch.nn.Linear(3 * 8 * 8, self.num_features)
        torch.nn.init.normal_(self.projection.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, images):
        pooled = torch.nn.functional.adaptive_avg_pool2d(images.float(), 8)
        return self.projection(pooled.flatten(1))


def image_set(seed, count=40, brightness=0.5):
    generator = torch.Generator().manual_seed(seed)
    return (brightness + 0.2 * torch.randn(count, 3, 32, 32, generator=generator)).clamp(0, 1)


def test_identical_sets_score_about_zero():
    images = image_set(0)
    assert abs(frechet_distance(images, images.clone(), feature=TinyFeatures())) < 1e-3


def test_different_sets_score_higher():
    same = frechet_distance(image_set(0), image_set(1), feature=TinyFeatures())
    different = frechet_distance(image_set(0), image_set(2, brightness=0.8), feature=TinyFeatures())
    assert different > 10 * max(same, 1e-3)


def write_images(folder, images):
    folder.mkdir()
    for index, image in enumerate(images):
        pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:03d}.png")
    return image_files(str(folder))


def test_files_identical_folders_score_about_zero(tmp_path):
    files = write_images(tmp_path / "a", image_set(0, count=12))
    value = frechet_distance_files(files, list(files), feature=TinyFeatures(), image_size=32)
    assert abs(value) < 1e-3


def test_files_are_read_in_batches_like_tensors(tmp_path):
    real = write_images(tmp_path / "real", image_set(0, count=12))
    fake = write_images(tmp_path / "fake", image_set(3, count=12, brightness=0.7))
    batched = frechet_distance_files(real, fake, TinyFeatures(), image_size=32, batch_size=5)
    whole = frechet_distance_files(real, fake, TinyFeatures(), image_size=32, batch_size=64)
    assert batched == pytest.approx(whole, rel=1e-6) and whole > 1


def test_fewer_than_two_images_is_an_error():
    with pytest.raises(EraseError, match="at least 2 images"):
        frechet_distance(image_set(0, count=1), image_set(1), feature=TinyFeatures())


def test_missing_or_empty_reference_folder_is_an_error(tmp_path):
    with pytest.raises(EraseError, match="does not exist"):
        image_files(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EraseError, match="no images"):
        image_files(str(tmp_path / "empty"))


def test_inception_unavailable_is_an_error(monkeypatch):
    import eval.fid

    def unavailable(*args, **kwargs):
        raise ModuleNotFoundError("torch-fidelity is not installed")

    monkeypatch.setattr(eval.fid, "FrechetInceptionDistance", unavailable)
    with pytest.raises(EraseError, match="Inception network is not available"):
        fid_metric(2048)


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A random-weight Inception in torch-fidelity's weights format (the real file cannot be
    downloaded here); FID's arithmetic does not depend on which weights it is given."""
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    patch = pytest.MonkeyPatch()
    patch.setattr(inception, "load_state_dict_from_url", lambda *args, **kwargs: {})
    patch.setattr(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda *a, **k: None)
    torch.manual_seed(0)
    try:
        network = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["64"])
    finally:
        patch.undo()
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(network.state_dict(), path)
    return str(path)


def test_fid_features_64_match_torchmetrics(tmp_path, inception_weights):
    from torchmetrics.image.fid import FrechetInceptionDistance

    from eval.fid import load_images

    real = write_images(tmp_path / "real", image_set(0, count=6))
    fake = write_images(tmp_path / "fake", image_set(3, count=6, brightness=0.7))
    ours = frechet_distance_files(real, fake, 64, metric=fid_metric(64, inception_weights))
    metric = FrechetInceptionDistance(
        feature=64, normalize=True, feature_extractor_weights_path=inception_weights
    )
    metric.update(load_images(real, 299), real=True)
    metric.update(load_images(fake, 299), real=False)
    assert metric.real_features_sum.numel() == 64
    assert ours == pytest.approx(float(metric.compute()), rel=1e-6)


def test_fewer_images_than_features_warn(inception_weights):
    from eval.fid import bias_warning

    metric = fid_metric(64, inception_weights)
    metric.update(image_set(0, count=4), real=True)
    metric.update(image_set(1, count=4), real=False)
    assert "fewer images than features" in bias_warning(metric)


def test_missing_fid_weights_file_is_an_error(tmp_path):
    with pytest.raises(EraseError, match="--fid-weights"):
        fid_metric(64, str(tmp_path / "absent.pth"))


def test_fid_features_outside_inception_layers_are_refused():
    from eval.evaluation import EvalConfig, check_arguments

    with pytest.raises(EraseError, match="--fid-features must be one of 64, 192, 768, 2048"):
        check_arguments(EvalConfig(prompts="coco", fid_features=100))
