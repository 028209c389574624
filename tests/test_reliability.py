"""Bad inputs to erase-concept: each is one stderr line and exit code 2, found before any data is
generated or trained on, with nothing left behind (no output, .partial or .erase-lock)."""

import os

import pytest
import torch
from safetensors.torch import save_file

from erase.cli.concept import erase_concept_main
from erase.data import DataConfig, generated_set
from erase.errors import EraseError
from prompts import load_prompt_file


@pytest.fixture()
def no_work(monkeypatch):
    """Fail the test if a run generates data or trains: the input must be refused before."""
    from erase.models.sd import StableDiffusionBackend

    def forbidden(*args, **kwargs):
        raise AssertionError("the input should have been refused before any work")

    monkeypatch.setattr(StableDiffusionBackend, "sample", forbidden)
    monkeypatch.setattr("erase.erasure.train", forbidden)
    monkeypatch.setattr("erase.erasure.forget_loss_gradients", forbidden)


def one_line(capsys, argv) -> str:
    """The run exits 2 with one stderr line and no traceback."""
    assert erase_concept_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("erase-concept: error:"), err
    return err


def assert_nothing_left(tmp_path, keep=()):
    assert sorted(set(os.listdir(tmp_path)) - set(keep)) == []


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--resolution", "34"], "multiple of 8"),
        (["--resolution", "100000"], "at most 8192"),
        (["--resolution", "128"], "at most 64 (4 x the model's 16)"),
        (["--checkpoint-every", "-1"], "--checkpoint-every must be 0"),
        (["--alpha", "nan"], "--alpha must be a finite number"),
        (["--method", "esd-u", "--negative-guidance", "nan"], "--negative-guidance must be a"),
        (["--lr", "inf"], "finite number greater than 0"),
        (["--guidance-scale", "nan"], "finite number greater than 0"),
        (["--seed", "-1"], "--seed must be between 0 and"),
        (["--seed", str(2**70)], "--seed must be between 0 and"),
        (["--forget-prompt", "", "--retain-prompt", "a dog"], "--forget-prompt must not be"),
        (["--forget-prompt", "a cat", "--retain-prompt", "  "], "--retain-prompt must not be"),
        (["--method", "esd-u", "--mask", "mask.safetensors"], "drop --mask"),
        (["--method", "fmn", "--mask", "mask.safetensors"], "drop --mask"),
    ],
)
def test_bad_input_fails_before_any_work(tiny_sd_args, tmp_path, capsys, no_work, extra, message):
    err = one_line(capsys, [*tiny_sd_args, "--output", str(tmp_path / "out"), *extra])
    assert message in err
    assert_nothing_left(tmp_path)


def test_a_mask_folder_names_the_file_to_pass(tiny_sd_args, tmp_path, capsys, no_work):
    (tmp_path / "run").mkdir()
    err = one_line(
        capsys, [*tiny_sd_args, "--output", str(tmp_path / "o"), "--mask", str(tmp_path / "run")]
    )
    assert "is a folder" in err and os.path.join(str(tmp_path / "run"), "mask.safetensors") in err
    assert_nothing_left(tmp_path, keep=["run"])


def test_cache_dir_or_erase_home_on_a_file(tiny_sd_args, tmp_path, capsys, no_work, monkeypatch):
    (tmp_path / "file").write_text("x")
    argv = [*tiny_sd_args, "--output", str(tmp_path / "o")]
    err = one_line(capsys, [*argv, "--cache-dir", str(tmp_path / "file")])
    assert "--cache-dir" in err and "is a file" in err
    monkeypatch.setenv("ERASE_HOME", str(tmp_path / "file"))
    err = one_line(capsys, argv)
    assert "ERASE_HOME" in err and "is a file" in err
    assert_nothing_left(tmp_path, keep=["file"])


def test_a_decompression_bomb_is_one_line(tiny_sd_args, tmp_path, capsys, monkeypatch):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 32)).save(images / "bomb.png")
    # PIL refuses images over 2 x MAX_IMAGE_PIXELS: a lowered limit makes a small file one.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    err = one_line(
        capsys,
        [*tiny_sd_args, "--output", str(tmp_path / "o"), "--concept-images", str(images)],
    )
    assert "bomb.png" in err and "too many to decode" in err
    assert_nothing_left(tmp_path, keep=["images"])


def test_concept_images_that_is_not_a_folder(tiny_sd_args, tmp_path, capsys, no_work):
    err = one_line(
        capsys,
        [*tiny_sd_args, "--output", str(tmp_path / "o"), "--concept-images", str(tmp_path / "x")],
    )
    assert "not a folder of images" in err


class CountingBackend:
    """Stands in for a backend in generated_set: counts the images it is asked for."""

    device = torch.device("cpu")

    def __init__(self):
        self.sampled = 0

    def sample(self, prompts, seeds, **kwargs):
        self.sampled += len(prompts)
        return torch.rand(len(prompts), 3, 8, 8)


@pytest.mark.parametrize("damage", ["truncated", "short"])
def test_a_damaged_cached_set_is_generated_again(tmp_path, capsys, damage):
    config = DataConfig(num_forget=4, gen_batch_size=4)
    backend = CountingBackend()
    images, _ = generated_set(backend, "forget", ["a cat"], 4, config, str(tmp_path))
    assert backend.sampled == 4
    path = tmp_path / "forget.safetensors"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    else:  # a complete file holding fewer images than its index names
        save_file({"images": (images[:2] * 255).to(torch.uint8)}, str(path))
    again, _ = generated_set(backend, "forget", ["a cat"], 4, config, str(tmp_path))
    assert backend.sampled == 8 and again.shape == (4, 3, 8, 8)
    assert "generating it again" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text, message",
    [
        ("prompt,evaluation_seed\na cat,inf\n", "is not a seed"),
        ("prompt,evaluation_seed\na cat,1e23\n", "is not a seed"),
        ("prompt,evaluation_seed\na cat,-3\n", "is not a seed"),
        ("prompt,evaluation_seed\na cat,2.5\n", "is not a seed"),
        ("prompt,evaluation_guidance\na cat,nan\n", "is not a finite number"),
    ],
)
def test_bad_numbers_in_a_prompt_csv(tmp_path, text, message):
    path = tmp_path / "p.csv"
    path.write_text(text)
    with pytest.raises(EraseError, match=message):
        load_prompt_file(str(path))


@pytest.mark.parametrize("suffix", [".csv", ".txt"])
def test_a_prompt_file_that_is_not_utf8(tmp_path, suffix):
    path = tmp_path / f"p{suffix}"
    path.write_bytes("prompt\nune église\n".encode("latin-1"))
    with pytest.raises(EraseError, match="not UTF-8"):
        load_prompt_file(str(path))


def test_seeds_that_are_whole_numbers_are_read(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt,evaluation_seed\na cat,3.0\na dog,4294967295\n")
    assert [entry.seed for entry in load_prompt_file(str(path))] == [3, 2**32 - 1]


def test_a_model_that_does_not_load_is_exactly_one_stderr_line(tmp_path):
    """Library warnings and hub log lines are silenced around loading: seen in a real process
    (pytest would capture warnings and log records itself)."""
    import pickle
    import subprocess
    import sys

    raw = tmp_path / "raw.ckpt"
    raw.write_bytes(pickle.dumps({"state_dict": {"weight": [1.0, 2.0]}}))
    script = (
        "import sys\n"
        "from erase.cli.concept import erase_concept_main\n"
        "for model in sys.argv[1:3]:\n"
        "    argv = ['--model', model, '--concept', 'nudity', '--output', sys.argv[3]]\n"
        "    assert erase_concept_main(argv) == 2\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script, "sd-v1-4", str(raw), str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("erase-concept: error:") for line in lines), (
        lines
    )
    assert "not available on this machine" in lines[0] and "raw.ckpt" in lines[1]
    assert sorted(os.listdir(tmp_path)) == ["raw.ckpt"]
