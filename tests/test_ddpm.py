"""The class-conditional DDPM backend on a tiny DDPM trained in seconds on 8x8 digits."""

import json
import os
import time

import pytest
import torch
from diffusers import UNet2DModel
from safetensors.torch import load_file

from erase.cli.concept import erase_concept_main
from erase.errors import EraseError
from erase.models import load_backend
from erase.models.ddpm import ClassDDPMBackend, read_ddpm_info, write_ddpm_folder
from erase.saliency import load_mask
from erase.testbeds.ddpm_cifar10 import load_ddpm_cifar10
from erase.testbeds.ddpm_digits import load_ddpm_digits
from erase.testbeds.ddpm_training import DDPMConfig, build_class_unet, train_class_ddpm
from erase.testbeds.digits import DIGIT_NAMES, ClassifierConfig, digits_dataset

TINY = DDPMConfig(
    image_size=8, block_out_channels=(8, 16), norm_num_groups=4, steps=20, batch_size=32
)


@pytest.fixture(scope="module")
def tiny_unet() -> UNet2DModel:
    """A class-conditional UNet trained for a few steps on the native 8x8 digits."""
    images, labels = digits_dataset(8, split="train")
    return train_class_ddpm(images, labels, 10, TINY, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def backend(tiny_unet) -> ClassDDPMBackend:
    return ClassDDPMBackend(
        tiny_unet,
        DIGIT_NAMES,
        identity="tiny-ddpm",
        dataset=lambda: digits_dataset(8, split="train"),
        device=torch.device("cpu"),
    )


@pytest.fixture(scope="module")
def tiny_folder(tiny_unet, tmp_path_factory) -> str:
    """The tiny DDPM saved as a DDPM folder; its digit classifier pre-trained small in the cache."""
    from erase.testbeds.digits import (
        classifier_folder,
        save_digit_classifier,
        train_digit_classifier,
    )

    if not os.path.isdir(classifier_folder(8)):
        small = ClassifierConfig(image_size=8, width=4, feature_dim=16, epochs=1)
        save_digit_classifier(train_digit_classifier(small), classifier_folder(8))
    folder = str(tmp_path_factory.mktemp("ddpm") / "tiny-ddpm")
    return write_ddpm_folder(
        folder, tiny_unet, {"dataset": "digits", "class_names": DIGIT_NAMES, "guidance_scale": 2.0}
    )


def test_class_embedding_has_a_null_class():
    unet = build_class_unet(10, TINY)
    assert unet.config.num_class_embeds == 11


def test_encode_takes_indices_and_names(backend):
    labels = backend.encode([3, "three", "7"])
    assert labels.dtype == torch.long
    assert labels.tolist() == [3, 3, 7]


def test_unknown_class_is_a_one_line_error(backend):
    with pytest.raises(EraseError, match="not a class"):
        backend.encode([10])


def test_unconditional_is_the_null_class(backend):
    assert backend.unconditional(2).tolist() == [10, 10]


def test_guided_prediction_is_the_cfg_formula(backend):
    generator = torch.Generator().manual_seed(0)
    noisy = torch.randn(4, 1, 8, 8, generator=generator)
    timesteps = torch.tensor([10, 200, 500, 900])
    labels = backend.encode([0, 1, 2, 3])
    with torch.no_grad():
        conditional = backend.predict_noise(backend.unet, noisy, timesteps, labels)
        unconditional = backend.predict_noise(
            backend.unet, noisy, timesteps, backend.unconditional(4)
        )
        guided = backend.guided_noise(backend.unet, noisy, timesteps, labels, 2.0)
    assert not torch.allclose(guided, conditional, atol=1e-4)
    torch.testing.assert_close(guided, 3.0 * conditional - 2.0 * unconditional)


def test_sample_is_rgb_in_unit_range(backend):
    images = backend.sample([1, 2], [0, 1], num_steps=3)
    assert images.shape == (2, 3, 8, 8)
    assert images.min() >= 0 and images.max() <= 1


def test_a_sample_depends_on_its_seed_not_its_batch(backend):
    pair = backend.sample([1, 2], [5, 6], num_steps=3)
    alone = backend.sample([2], [6], num_steps=3)
    torch.testing.assert_close(pair[1:], alone, atol=1e-5, rtol=0)
    assert not torch.equal(pair[0], pair[1])


def test_to_latents_scales_pixels_and_grays_rgb(backend):
    rgb = torch.rand(2, 3, 8, 8)
    latents = backend.to_latents(rgb)
    assert latents.shape == (2, 1, 8, 8)
    torch.testing.assert_close(latents, rgb.mean(1, keepdim=True) * 2 - 1)


def test_real_images_are_only_the_asked_classes(backend):
    images, labels = backend.real_images([3, 5], 50)
    assert images.shape == (50, 1, 8, 8)
    assert set(labels) == {3, 5}
    again, again_labels = backend.real_images([3, 5], 50)
    assert torch.equal(images, again) and labels == again_labels


def test_real_images_stop_at_what_the_dataset_has(backend):
    _, labels = backend.real_images([3], 10_000)
    train_labels = digits_dataset(8, split="train")[1]
    assert len(labels) == int((train_labels == 3).sum())


def test_saved_unet_reloads_with_from_pretrained(backend, tmp_path):
    backend.save_unet(backend.unet, str(tmp_path / "unet"))
    reloaded = UNet2DModel.from_pretrained(str(tmp_path / "unet"))
    for (name, param), reloaded_param in zip(
        backend.unet.named_parameters(), reloaded.parameters()
    ):
        assert torch.equal(param, reloaded_param), name


def test_load_unet_refuses_another_number_of_classes(backend, tmp_path):
    build_class_unet(5, TINY).save_pretrained(str(tmp_path / "unet"))
    with pytest.raises(EraseError, match="does not fit"):
        backend.load_unet(str(tmp_path))


def test_load_backend_dispatches_a_ddpm_folder(tiny_folder):
    loaded = load_backend(tiny_folder, device=torch.device("cpu"))
    assert isinstance(loaded, ClassDDPMBackend)
    assert loaded.class_names == DIGIT_NAMES
    assert loaded.classifier is not None


def test_builtin_digits_model_is_trained_once_then_cached(tmp_path, monkeypatch):
    import erase.testbeds.ddpm_digits as ddpm_digits

    config = DDPMConfig(
        image_size=8, block_out_channels=(8, 16), norm_num_groups=4, steps=2, batch_size=8
    )
    small = ClassifierConfig(image_size=8, width=4, feature_dim=8, epochs=1)
    cpu = torch.device("cpu")
    first = load_ddpm_digits(
        device=cpu, config=config, cache_dir=str(tmp_path), classifier_config=small
    )
    assert first.identity == "ddpm-digits" and first.classifier is not None
    assert first.training_seconds >= 0  # what metadata.json sets the erasure's cost beside
    monkeypatch.setattr(ddpm_digits, "train_class_ddpm", lambda *a, **k: pytest.fail("retrained"))
    monkeypatch.setattr(
        "erase.testbeds.digits.train_digit_classifier", lambda *a: pytest.fail("retrained")
    )
    second = load_ddpm_digits(device=cpu, config=config, cache_dir=str(tmp_path))
    assert torch.equal(next(first.unet.parameters()), next(second.unet.parameters()))
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_cifar10_without_data_dir_says_to_pass_it():
    with pytest.raises(EraseError, match="--data-dir"):
        load_ddpm_cifar10()


def test_cifar10_without_a_trained_model_says_what_to_do(tmp_path):
    with pytest.raises(EraseError, match="No trained ddpm-cifar10 model"):
        load_ddpm_cifar10(data_dir=str(tmp_path))


def test_cifar10_folder_without_dataset_asks_for_it(tiny_unet, tmp_path):
    folder = write_ddpm_folder(
        str(tmp_path / "cifar"), tiny_unet, {"dataset": "cifar10", "class_names": DIGIT_NAMES}
    )
    loaded = ClassDDPMBackend.from_folder(folder, device=torch.device("cpu"))
    with pytest.raises(EraseError, match="--data-dir"):
        loaded.real_images([0], 4)


@pytest.fixture(scope="module")
def erased(tiny_folder, tmp_path_factory) -> str:
    """erase-concept with SalUn on the tiny DDPM folder, class 3, with the class evaluation."""
    output = str(tmp_path_factory.mktemp("erased") / "out")
    code = erase_concept_main(
        [
            "--model", tiny_folder, "--concept", "three", "--output", output,
            "--steps", "3", "--batch-size", "8", "--num-forget", "16", "--num-retain", "16",
            "--eval-per-class", "4", "--eval-steps", "2", "--lr", "1e-2",
        ]
    )  # fmt: skip
    assert code == 0
    return output


def test_erasure_changes_only_masked_weights(erased, tiny_folder):
    mask = load_mask(os.path.join(erased, "mask.safetensors"), UNet2DModel.from_pretrained(
        os.path.join(tiny_folder, "unet")))  # fmt: skip
    base = load_file(os.path.join(tiny_folder, "unet", "diffusion_pytorch_model.safetensors"))
    after = load_file(os.path.join(erased, "unet", "diffusion_pytorch_model.safetensors"))
    moved = 0
    for name, keep in mask.items():
        assert torch.equal(base[name][~keep], after[name][~keep]), name
        moved += int((base[name][keep] != after[name][keep]).sum())
    assert moved > 0


def test_erased_output_loads_as_a_backend(erased):
    loaded = load_backend(erased, device=torch.device("cpu"))
    assert isinstance(loaded, ClassDDPMBackend)
    assert loaded.sample([3], [0], num_steps=2).shape == (1, 3, 8, 8)


def test_erasure_writes_the_class_report(erased):
    metadata = json.load(open(os.path.join(erased, "metadata.json")))
    assert set(metadata["evaluation"]) == {"before", "after"}
    assert 0 <= metadata["evaluation"]["after"]["ua"] <= 1
    assert os.path.isfile(os.path.join(erased, "report.md"))
    assert os.path.isfile(os.path.join(erased, "grid.png"))


def test_metadata_sets_the_erasure_cost_beside_the_base_training(erased):
    metadata = json.load(open(os.path.join(erased, "metadata.json")))
    timings = metadata["timings_s"]
    phases = sum(timings[k] for k in ("data", "mask", "prepare", "train"))
    assert metadata["erasure_s"] == pytest.approx(phases, abs=1e-3)
    assert metadata["base_training_s"] is None  # a folder model carries no training time


def test_ddpm_info_names_the_dataset(tiny_folder):
    assert read_ddpm_info(tiny_folder)["dataset"] == "digits"


def test_forget_and_retain_sets_are_the_whole_class_and_all_the_rest(backend):
    from erase.concepts import resolve_concept
    from erase.data import DataConfig, build_concept_data

    concept = resolve_concept("3", conditioning="class", class_names=DIGIT_NAMES)
    data = build_concept_data(backend, concept, DataConfig())  # reference DDPM/datasets
    _, labels = digits_dataset(8, split="train")
    assert len(data.forget_conditions) == int((labels == 3).sum())
    assert set(data.forget_conditions) == {3}
    assert len(data.retain_conditions) == int((labels != 3).sum())


def test_erasure_records_the_reference_ddpm_settings(erased):
    metadata = json.load(open(os.path.join(erased, "metadata.json")))
    method = metadata["method_config"]
    unet = json.load(open(os.path.join(erased, "unet", "config.json")))
    pixels = unet["in_channels"] * unet["sample_size"] ** 2
    # the reference's 1e-3 on 3 x 32 x 32 at the same per-element balance (docs/methods.md)
    assert method["alpha"] == pytest.approx(1e-3 * 3072 / pixels)
    assert (method["retain_reduction"], method["cond_drop"]) == ("sum", 0.1)
    assert method["antithetic"] is True and method["clip_before_mask"] == 1.0
    assert metadata["concept"]["remap"] == [4]  # next class


def test_ddim_sampling_does_not_clip_the_predicted_x0(backend):
    # The reference's generalized steps (DDPM/functions/denoising.py) never clip x0.
    assert backend.make_sampler(10).config.clip_sample is False


def test_an_erasure_holds_the_backends_cpu_threads_and_gives_them_back(
    tiny_folder, tmp_path, monkeypatch
):
    import erase.erasure

    seen = []
    real = erase.erasure.train_phase

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(erase.erasure, "train_phase", spy)
    monkeypatch.setattr(ClassDDPMBackend, "cpu_threads", 1, raising=False)
    monkeypatch.setattr("erase.threads.cores_shared", lambda: True)  # another job is running
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        code = erase_concept_main(
            ["--model", tiny_folder, "--concept", "three", "--output", str(tmp_path / "out"),
             "--steps", "1", "--batch-size", "4", "--num-forget", "4", "--num-retain", "4",
             "--no-eval"]
        )  # fmt: skip
        assert code == 0 and seen == [1] and torch.get_num_threads() == 2
        metadata = json.load(open(tmp_path / "out" / "metadata.json"))
        assert metadata["cpu_threads"] == 1
    finally:
        torch.set_num_threads(before)


def test_free_cores_keep_torchs_threads(monkeypatch):
    from erase.threads import backend_threads

    class Testbed:
        cpu_threads = 1

    torch.set_num_threads(2)
    monkeypatch.setattr("erase.threads.cores_shared", lambda: False)
    with backend_threads(Testbed(), "cpu"):
        assert torch.get_num_threads() == 2
    monkeypatch.setattr("erase.threads.cores_shared", lambda: True)
    with backend_threads(Testbed(), "cpu"):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_busy_cores_sees_a_spinning_process():
    import multiprocessing

    from erase.threads import busy_cores

    stop = multiprocessing.Event()
    spinner = multiprocessing.Process(target=spin, args=(stop,))
    spinner.start()
    try:
        time.sleep(0.2)
        assert busy_cores() >= 0.5
    finally:
        stop.set()
        spinner.join()


def spin(stop) -> None:
    """Keep one core busy until told to stop."""
    while not stop.is_set():
        pass
