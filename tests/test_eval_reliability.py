"""erase-eval never scores stale or mismatched images: its cache is keyed by the erased UNet's
content, the UNet is checked against the base, and a refused run leaves no images/ behind."""

import json

import pytest
from diffusers import UNet2DConditionModel

from erase.artifact import output_lock
from erase.cli.concept import erase_concept_main
from erase.testing import save_tiny_sd
from eval.cli import main


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.csv"
    path.write_text("prompt,evaluation_seed\na photo of a cat,3\na nude person,5\n")
    return str(path)


def erase_into(tiny_sd_args, output, *extra):
    argv = [*tiny_sd_args, "--lr", "1e-3", "--output", str(output), *extra]
    assert erase_concept_main(argv) == 0


def evaluate(model, unet, prompts, output):
    argv = ["--model", model, "--unet", str(unet), "--prompts", prompts, "--num-steps", "2"]
    return main([*argv, "--metric", "nudity", "--output", str(output), "--no-progress"])


def generated(output) -> tuple[int, int]:
    results = json.loads((output / "results.json").read_text())["generation"]
    return results["generated"], results["reused"]


def test_re_erasing_into_the_same_folder_makes_erase_eval_regenerate(
    tiny_sd_dir, tiny_sd_args, prompts, tmp_path
):
    erased, report = tmp_path / "erased", tmp_path / "eval"
    erase_into(tiny_sd_args, erased)
    assert evaluate(tiny_sd_dir, erased, prompts, report) == 0
    assert generated(report) == (2, 0)
    assert evaluate(tiny_sd_dir, erased, prompts, report) == 0
    assert generated(report) == (0, 2)  # same content: the images are reused
    erase_into(tiny_sd_args, erased, "--overwrite", "--seed", "1")
    assert evaluate(tiny_sd_dir, erased, prompts, report) == 0
    assert generated(report) == (2, 0)  # same path, new weights: every image is new


def one_line(capsys, code, message):
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("erase-eval: error:"), err
    assert message in err


def test_a_unet_erased_from_another_base_is_refused(
    tiny_sd_dir, tiny_sd_args, prompts, tmp_path, capsys
):
    erased = tmp_path / "erased"
    erase_into(tiny_sd_args, erased)
    other = save_tiny_sd(str(tmp_path / "other-base"), seed=1)  # same shapes, other weights
    capsys.readouterr()  # the erasure's progress bars
    report = tmp_path / "eval"
    one_line(capsys, evaluate(other, erased, prompts, report), "was erased from")
    assert not report.exists() and not (tmp_path / "eval.erase-lock").exists()


def test_a_unet_of_another_shape_is_refused(tiny_sd_dir, prompts, tmp_path, capsys):
    base = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    assert base.config.block_out_channels != (16, 16)
    config = {**base.config, "block_out_channels": (16, 16)}  # cross-attention width unchanged
    UNet2DConditionModel.from_config(config).save_pretrained(str(tmp_path / "foreign" / "unet"))
    report = tmp_path / "eval"
    one_line(capsys, evaluate(tiny_sd_dir, tmp_path / "foreign", prompts, report), "does not fit")
    assert not report.exists()


def test_a_class_conditional_model_fails_before_it_is_trained(
    prompts, tmp_path, monkeypatch, capsys
):
    def no_training(*args, **kwargs):
        raise AssertionError("ddpm-digits should not be trained to be refused")

    monkeypatch.setattr("erase.testbeds.ddpm_digits.load_ddpm_digits", no_training)
    argv = ["--model", "ddpm-digits", "--prompts", prompts, "--output", str(tmp_path / "e")]
    one_line(capsys, main(argv), "class-conditional")
    assert not (tmp_path / "e").exists()


def test_a_second_evaluation_of_one_output_is_refused(tiny_sd_dir, prompts, tmp_path, capsys):
    report = tmp_path / "eval"
    argv = ["--model", tiny_sd_dir, "--prompts", prompts, "--output", str(report)]
    with output_lock(str(report)):
        one_line(capsys, main(argv), "Another run is writing")
    assert not report.exists()
