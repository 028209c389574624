"""The Python API: erase.erase_concept on a pipeline in memory, erase.evaluate, erase.export."""

import os
import subprocess
import sys

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

import erase
from erase.cli import erase_concept_main

SETTINGS = {"steps": 2, "num_forget": 2, "num_retain": 2, "gen_steps": 2, "lr": 1e-3}


def test_import_erase_stays_light():
    code = "import sys, erase; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert completed.stdout.split() == ["False", "False"]


def test_api_on_a_pipeline_gives_the_cli_weights(tiny_sd_dir, tiny_sd_args, tmp_path):
    output = tmp_path / "cli"
    assert erase_concept_main([*tiny_sd_args, "--lr", "1e-3", "--output", str(output)]) == 0
    cli_unet = UNet2DConditionModel.from_pretrained(str(output), subfolder="unet")

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    result = erase.erase_concept(pipe, "nudity", **SETTINGS)
    assert result.output is None and result.unet is pipe.unet  # erased in place
    expected, actual = cli_unet.state_dict(), result.unet.state_dict()
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k].cpu()) for k in expected)
    assert result.metadata["changed_weights"] > 0
    assert result.metadata["base_model"] == tiny_sd_dir  # the pipeline's own folder


def test_api_writes_the_artifact_when_asked(tiny_sd_dir, tmp_path):
    output = str(tmp_path / "erased")
    result = erase.erase_concept(tiny_sd_dir, "nudity", output=output, no_grid=True, **SETTINGS)
    assert result.output == output
    assert os.path.isfile(os.path.join(output, "unet", "diffusion_pytorch_model.safetensors"))
    assert os.path.isfile(os.path.join(output, "README.md"))
    exported = erase.export_model(output, "unet", str(tmp_path / "unet.safetensors"))
    assert os.path.getsize(exported) > 1000


def test_unknown_setting_is_a_clear_error(tiny_sd_dir):
    with pytest.raises(erase.EraseError, match="stepz"):
        erase.erase_concept(tiny_sd_dir, "nudity", stepz=3)
    with pytest.raises(erase.EraseError, match="Unknown method"):
        erase.erase_concept(tiny_sd_dir, "nudity", method="nope")


def test_evaluate_a_pipeline_generation_only(tiny_sd_dir, tmp_path):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\na photo of a dog\n")
    results = erase.evaluate(
        pipe, str(prompts), metrics="none", output=str(tmp_path / "eval"), num_steps=2
    )
    assert results["metrics"] == {}
    assert results["generation"]["generated"] == 2
    assert sorted(os.listdir(tmp_path / "eval" / "images")) == [
        "000000_00.png",
        "000001_00.png",
        "index.jsonl",
    ]
    with pytest.raises(erase.EraseError, match="unknown metric"):
        erase.evaluate(pipe, str(prompts), metrics="nope")
