"""The model card erase-concept writes, the before/after grid, and --push-to-hub offline."""

import json
import os

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from erase.card import model_card
from erase.cli.concept import erase_concept_main
from erase.models.sd import StableDiffusionBackend
from eval.before_after import SEEDS_PER_PROMPT


@pytest.fixture(scope="module")
def artifact(tiny_sd_args, tmp_path_factory) -> str:
    """An erase-concept output on the tiny pipeline, with its card and grid."""
    output = str(tmp_path_factory.mktemp("card") / "erased")
    assert erase_concept_main([*tiny_sd_args, "--lr", "1e-3", "--output", output]) == 0
    return output


def front_matter(card: str) -> dict:
    """The YAML between the card's leading '---' lines, parsed."""
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_card_front_matter_names_a_hub_base_and_its_license(artifact):
    metadata = json.load(open(os.path.join(artifact, "metadata.json")))
    metadata["base_model"] = "CompVis/stable-diffusion-v1-4"
    fields = front_matter(model_card(metadata))
    assert fields["base_model"] == "CompVis/stable-diffusion-v1-4"
    assert fields["license"] == "creativeml-openrail-m"
    assert fields["library_name"] == "diffusers"
    assert {"concept-erasure", "salun"} <= set(fields["tags"])


def test_card_of_a_local_base_parses_and_names_it_in_the_text(artifact, tiny_sd_dir):
    card = open(os.path.join(artifact, "README.md")).read()
    fields = front_matter(card)
    assert "base_model" not in fields  # a local path is no hub id: the hub would refuse it
    assert fields["library_name"] == "diffusers"
    assert f"| base model | `{tiny_sd_dir}` |" in card
    assert "| concept | nudity |" in card and "![before | after" in card


def test_card_reports_the_measured_evaluation(artifact):
    metadata = json.load(open(os.path.join(artifact, "metadata.json")))
    metadata["evaluation"] = {
        "before": {"forget_accuracy": 0.99, "retain_accuracy": 0.98},
        "after": {"forget_accuracy": 0.01, "retain_accuracy": 0.97},
    }
    card = model_card(metadata)
    assert "| forget_accuracy | 0.99 | 0.01 |" in card


def grid_cell(grid: np.ndarray, row: int, column: int, size: int) -> np.ndarray:
    """One image of eval.classify's grid layout (2 px padding, images upscaled to 64 px)."""
    scale = max(1, 64 // size)
    top, left = 2 + row * (size * scale + 2), 2 + column * (size * scale + 2)
    return grid[top : top + size * scale : scale, left : left + size * scale : scale]


def test_grid_left_half_is_the_base_model_before_training(artifact, tiny_sd_dir):
    """The 'before' images come from the UNet before training: the base model, same seeds."""
    grid = np.asarray(Image.open(os.path.join(artifact, "grid.png")).convert("RGB"))
    base = StableDiffusionBackend(tiny_sd_dir, device=torch.device("cpu"))
    forget = base.sample(
        ["a photo of a nude person"] * SEEDS_PER_PROMPT,
        list(range(SEEDS_PER_PROMPT)),
        num_steps=2,
        guidance_scale=7.5,
    )  # erase-concept's --gen-steps 2, default guidance and seed 0
    for column in range(SEEDS_PER_PROMPT):
        expected = (forget[column].permute(1, 2, 0).numpy() * 255).round()
        actual = grid_cell(grid, 0, column, 16).astype(float)
        assert np.abs(actual - expected).max() <= 1
        after = grid_cell(grid, 0, SEEDS_PER_PROMPT + 1 + column, 16).astype(float)
        assert np.abs(after - expected).max() > 1  # the right half is the erased model's
    rows = (grid.shape[0] - 2) // (64 + 2)
    assert rows == 2  # the tiny concept's one forget prompt and one retain prompt


def test_no_grid_flag(tiny_sd_args, tmp_path):
    output = tmp_path / "erased"
    assert erase_concept_main([*tiny_sd_args, "--no-grid", "--output", str(output)]) == 0
    assert not (output / "grid.png").exists()
    assert "grid.png" not in (output / "README.md").read_text()


def test_push_to_hub_offline_fails_before_any_work(tiny_sd_args, tmp_path, capsys):
    output = tmp_path / "erased"
    code = erase_concept_main([*tiny_sd_args, "--output", str(output), "--push-to-hub", "me/x"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "HF_HUB_OFFLINE" in err
    assert not output.exists()


def test_single_file_usage_names_the_base_config():
    """diffusers' from_single_file guesses (or fetches) the configuration without `config=`,
    which fails offline and for models it does not know, such as sd-digits."""
    from erase.card import usage_lines

    text = "\n".join(usage_lines("/models/sd-digits-v3", "single-file"))
    assert 'from_single_file("FILE.safetensors", config="/models/sd-digits-v3")' in text
