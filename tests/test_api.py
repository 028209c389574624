"""The Python API: erase.erase_concept on a pipeline in memory, erase.evaluate, erase.export."""

import json
import os
import subprocess
import sys

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

import erase
from erase.cli.concept import erase_concept_main

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
    phases = []
    result = erase.erase_concept(
        tiny_sd_dir, "nudity", output=output, on_phase=phases.append, no_grid=True, **SETTINGS
    )
    assert result.output == output
    assert phases[0] == "load" and phases[-1] == "write" and "mask" in phases and "train" in phases
    assert os.path.isfile(os.path.join(output, "unet", "diffusion_pytorch_model.safetensors"))
    assert os.path.isfile(os.path.join(output, "README.md"))
    exported = erase.export_model(output, "unet", str(tmp_path / "unet.safetensors"))
    assert os.path.getsize(exported) > 1000


def test_several_concepts_are_the_repeated_flag():
    from erase.api import erasure_config

    config = erasure_config(["nudity", "Van Gogh"], "esd-x", steps=3)
    assert config.concept == ["nudity", "Van Gogh"] and config.method == "esd-x"
    assert config.steps == 3
    assert erasure_config("nudity", "salun").concept == ["nudity"]


def test_unknown_setting_is_a_clear_error(tiny_sd_dir):
    with pytest.raises(erase.EraseError, match="'stepz' .*did you mean steps"):
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


def test_benchmark_gives_each_method_its_settings_and_restores_the_pipeline(tiny_sd_dir, tmp_path):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    base = {name: value.clone() for name, value in pipe.unet.state_dict().items()}
    table = erase.benchmark(
        pipe,
        "nudity",
        str(tmp_path / "bench"),
        methods=["salun", "esd-x"],
        method_settings={"esd-x": {"steps": 1}},
        bench_per_prompt=1,
        bench_steps=2,
        bench_clip="none",
        **SETTINGS,
    )
    assert [row["method"] for row in table["rows"]] == ["base", "salun", "esd-x"]
    assert all(row["changed_weights"] > 0 for row in table["rows"][1:])
    steps = [
        json.loads((tmp_path / "bench" / m / "metadata.json").read_text())["train_config"]["steps"]
        for m in ("salun", "esd-x")
    ]
    assert steps == [2, 1]
    assert all(torch.equal(base[k], v.cpu()) for k, v in pipe.unet.state_dict().items())
    with pytest.raises(erase.EraseError, match="not in methods"):
        erase.benchmark(
            pipe,
            "nudity",
            str(tmp_path / "b2"),
            methods="salun",
            method_settings={"fmn": {"lr": 1.0}},
        )


def test_attack_on_a_pipeline_in_memory(tiny_sd_dir, tmp_path, monkeypatch):
    prompts = tmp_path / "ring.csv"
    prompts.write_text('prompt\n"a nude person"\n"a nude photo"\n"a photo"\n')
    judged = []

    class CountingJudge:
        """Positive for the first image it sees; records how many it judged."""

        name, describe, settings = "nudity", "counting", {}

        def __init__(self, *options):  # the detector file and rule the harness passes
            pass

        def __call__(self, images):
            judged.append(len(images))
            return [
                {"positive": len(judged) == 1 and i == 0, "score": 0.0} for i in range(len(images))
            ]

    monkeypatch.setattr("eval.attacks.judges.NudityJudge", CountingJudge)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    results = erase.attack(
        pipe,
        "nudity",
        "prompts",
        prompts=str(prompts),
        num_steps=2,
        output=str(tmp_path / "a"),
        no_progress=True,
    )
    assert results["attacks"]["prompts"]["prompts"] == 3 and sum(judged) == 3
    assert results["attacks"]["prompts"]["asr"] == pytest.approx(1 / 3, abs=1e-3)
    assert (tmp_path / "a" / "results.json").is_file() and results["model"] == tiny_sd_dir
    with pytest.raises(erase.EraseError, match="unknown attack 'nope'"):
        erase.attack(pipe, "nudity", ["prompts", "nope"])
