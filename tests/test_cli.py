"""erase-concept end to end on the tiny pipeline: artifact, reload, pipeline use, errors."""

import json
import os
import subprocess
import sys

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from erase.api import run
from erase.cli.concept import build_parser, config_from_args, erase_concept_main


def test_cli_subprocess_writes_the_artifact(tiny_sd_args, tmp_path):
    output = tmp_path / "erased"
    completed = subprocess.run(
        [sys.executable, "-m", "erase.cli", *tiny_sd_args, "--output", str(output)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert (output / "unet" / "config.json").is_file()
    assert (output / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (output / "mask.safetensors").is_file()
    metadata = json.loads((output / "metadata.json").read_text())
    assert metadata["method"] == "salun" and metadata["train_config"]["steps"] == 2
    assert {"load", "data", "mask", "train"} <= metadata["timings_s"].keys()
    assert metadata["peak_memory_mb"] > 0 and metadata["versions"]["diffusers"]
    assert not (tmp_path / "erased.partial").exists()


def test_saved_unet_reloads_to_the_same_outputs(tiny_sd_dir, tiny_sd_args, tmp_path):
    args = build_parser().parse_args(
        [*tiny_sd_args, "--lr", "1e-3", "--output", str(tmp_path / "o")]
    )
    result = run(config_from_args(args))
    reloaded = UNet2DConditionModel.from_pretrained(str(tmp_path / "o"), subfolder="unet")
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    embeds = result.backend.encode(["a photo of a nude person", "a cat"])
    timesteps = torch.tensor([10, 500])
    with torch.no_grad():
        expected = result.backend.unet(sample, timesteps, encoder_hidden_states=embeds).sample
        actual = reloaded(sample, timesteps, encoder_hidden_states=embeds).sample
    assert torch.equal(expected, actual)
    # and it drops into a diffusers pipeline
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, unet=reloaded, safety_checker=None)
    images = pipe("a photo of a nude person", num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 16, 16, 3)


def test_generated_sets_are_cached(tiny_sd_args, tmp_path, monkeypatch):
    assert erase_concept_main([*tiny_sd_args, "--output", str(tmp_path / "a")]) == 0
    from erase.models.sd import StableDiffusionBackend

    def no_sampling(*args, **kwargs):
        raise AssertionError("the cached forget/retain sets should have been reused")

    monkeypatch.setattr(StableDiffusionBackend, "sample", no_sampling)
    argv = [*tiny_sd_args, "--no-grid", "--output", str(tmp_path / "b")]
    assert erase_concept_main(argv) == 0


def test_mask_reuse(tiny_sd_args, tmp_path):
    assert erase_concept_main([*tiny_sd_args, "--output", str(tmp_path / "a")]) == 0
    mask = str(tmp_path / "a" / "mask.safetensors")
    assert erase_concept_main([*tiny_sd_args, "--mask", mask, "--output", str(tmp_path / "b")]) == 0
    from safetensors.torch import load_file

    first, second = (load_file(str(tmp_path / d / "mask.safetensors")) for d in "ab")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_resume_continues_from_checkpoint(tiny_sd_args, tmp_path, monkeypatch):
    import erase.train as train_module

    output = tmp_path / "run"
    original = train_module.save_checkpoint
    calls = []

    def crash_after_first_checkpoint(accelerator, folder, step):
        original(accelerator, folder, step)
        calls.append(step)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_checkpoint", crash_after_first_checkpoint)
    args = [*tiny_sd_args, "--steps", "4", "--checkpoint-every", "2", "--output", str(output)]
    with pytest.raises(KeyboardInterrupt):
        erase_concept_main(args)
    assert calls == [2] and not output.exists()
    monkeypatch.setattr(train_module, "save_checkpoint", original)
    assert erase_concept_main([*args, "--resume"]) == 0
    metadata = json.loads((output / "metadata.json").read_text())
    assert metadata["train_result"]["resumed_from"] == 2
    assert not (output / "checkpoint").exists()


def test_help_documents_the_flags(capsys):
    assert erase_concept_main(["--help"]) == 0
    text = capsys.readouterr().out
    for flag in (
        "--model",
        "--concept",
        "--mask-ratio",
        "--mixed-precision",
        "--method",
        "--overwrite",
    ):
        assert flag in text


def one_line_error(capsys, argv) -> str:
    assert erase_concept_main(argv) == 2
    err = capsys.readouterr().err.strip()
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and err.endswith(error_lines[0]), err
    assert "Traceback" not in err
    return error_lines[0]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lr", "-1"], "greater than 0"),
        (["--steps", "0"], "greater than 0"),
        (["--mask-ratio", "1.5"], "mask-ratio"),
        (["--mask", "/nonexistent/mask.safetensors"], "does not exist"),
        (["--concept", "no-such-concept"], "Unknown concept"),
        (["--method", "nope"], "invalid choice"),
        (["--lr", "1e30", "--steps", "6"], "loss became"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tiny_sd_args, tmp_path, capsys, extra, message):
    output = tmp_path / "out"
    err = one_line_error(capsys, [*tiny_sd_args, "--output", str(output), *extra])
    assert message in err
    assert not output.exists() and not (tmp_path / "out.partial").exists()


def test_unknown_model_and_missing_weights(tmp_path, capsys):
    for model, message in [
        ("no-such-model", "Unknown model"),
        ("sd-v1-4", "not available"),
        (str(tmp_path), "model_index.json"),
    ]:
        err = one_line_error(
            capsys, ["--model", model, "--concept", "nudity", "--output", str(tmp_path / "o")]
        )
        assert message in err
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is valid on a GPU")
def test_fp16_on_cpu_is_refused(tiny_sd_args, tmp_path, capsys):
    err = one_line_error(
        capsys, [*tiny_sd_args, "--mixed-precision", "fp16", "--output", str(tmp_path / "o")]
    )
    assert "CUDA" in err and not (tmp_path / "o").exists()


def test_corrupt_single_file_checkpoint(tmp_path, capsys):
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"truncated")
    err = one_line_error(capsys, ["--model", str(checkpoint), "--concept", "nudity"])
    assert "corrupt" in err


def test_corrupt_weights(tiny_sd_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd_dir, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    err = one_line_error(capsys, ["--model", str(broken), "--concept", "nudity"])
    assert "corrupt" in err


def test_mismatched_mask(tiny_sd_args, tmp_path, capsys):
    from erase.saliency import save_mask

    mask_path = str(tmp_path / "mask.safetensors")
    save_mask({"weight": torch.ones(3, dtype=torch.bool)}, mask_path, ratio=0.5)
    err = one_line_error(
        capsys, [*tiny_sd_args, "--mask", mask_path, "--output", str(tmp_path / "o")]
    )
    assert "does not fit" in err and not (tmp_path / "o").exists()


def test_existing_output_is_refused_unless_overwrite(tiny_sd_args, tmp_path, capsys):
    output = tmp_path / "out"
    assert erase_concept_main([*tiny_sd_args, "--output", str(output)]) == 0
    (output / "stale.txt").write_text("from the first run")
    err = one_line_error(capsys, [*tiny_sd_args, "--output", str(output)])
    assert "already exists" in err and (output / "stale.txt").exists()
    assert erase_concept_main([*tiny_sd_args, "--output", str(output), "--overwrite"]) == 0
    assert (output / "unet").is_dir() and not (output / "stale.txt").exists()


def write_images(folder, count, size=16):
    from PIL import Image

    folder.mkdir(parents=True)
    for index in range(count):
        Image.new("RGB", (size, size), (index * 40, 0, 0)).save(folder / f"{index}.png")


def test_retain_images_pair_each_class_folder_with_its_prompt(tiny_sd_dir, tmp_path):
    from erase.concepts import resolve_concept
    from erase.data import DataConfig, build_concept_data
    from erase.models import load_backend

    write_images(tmp_path / "forget", 2)
    write_images(tmp_path / "train" / "tench", 3)
    write_images(tmp_path / "train" / "golf_ball", 2)
    write_images(tmp_path / "train" / "church", 4)  # the forgotten class: not retained
    concept = resolve_concept("church", conditioning="text")
    config = DataConfig(
        concept_images=str(tmp_path / "forget"), retain_images=str(tmp_path / "train")
    )
    data = build_concept_data(load_backend(tiny_sd_dir), concept, config)
    assert data.forget_conditions == ["an image of a church"] * 2
    assert data.retain_conditions == ["an image of a golf ball"] * 2 + ["an image of a tench"] * 3
    assert data.retain_images.shape[0] == 5 and data.source == "folder"


def test_retain_images_flag_reaches_the_run(tiny_sd_args, tmp_path):
    write_images(tmp_path / "keep", 3)
    args = [*tiny_sd_args, "--retain-images", str(tmp_path / "keep"), "--method", "salun"]
    assert erase_concept_main([*args, "--output", str(tmp_path / "out")]) == 0
    metadata = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert metadata["data_config"]["retain_images"] == str(tmp_path / "keep")
    assert metadata["data_source"] == "folder"


def test_help_lists_every_model_alias_and_no_unset_default(capsys):
    from erase.models import BUILTIN_MODELS
    from erase.models.sd import SD_ALIASES
    from erase.models.sdxl import SDXL_ALIASES

    assert erase_concept_main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere
    for alias in [*SD_ALIASES, *SDXL_ALIASES, *BUILTIN_MODELS]:
        assert alias in text.replace("- ", "-"), alias
    assert "(default: None)" not in text and "(default: False)" not in text


def test_imagenette_steps_count_the_concept_images_folder(tiny_sd_dir, tmp_path):
    from erase.config import ErasureConfig
    from erase.erasure import forget_count, resolve_run_concept, resolve_settings
    from erase.methods import get_method
    from erase.models import load_backend

    write_images(tmp_path / "church", 19)
    config = ErasureConfig(
        model=tiny_sd_dir, concept=["church"], concept_images=str(tmp_path / "church")
    )
    backend = load_backend(tiny_sd_dir)
    concept = resolve_run_concept(backend, config)
    salun = get_method("salun")
    num_forget = forget_count(backend, concept, config)
    train_config, _ = resolve_settings(config, salun.defaults(backend, concept, num_forget), salun)
    assert num_forget == 19
    assert train_config.steps == 5 * 3  # the reference's 5 epochs of ceil(19 / 8) batches
