"""erase-bench checks every input before any work, refuses a repeated method, and does not
report success (exit 0) when every method failed."""

import os

import pytest

from erase.cli.bench import main
from erase.methods import METHODS


def one_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and err.endswith(errors[0]) and "Traceback" not in err, err
    assert errors[0].startswith("erase-bench: error:") and message in errors[0], errors[0]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--bench-clip", "nonsense"], "--bench-clip 'nonsense': Unknown CLIP model"),
        (["--bench-clip", "ViT-B-32:no-such-weights"], "Unknown weights"),
        (["--bench-per-prompt", "0"], "greater than 0"),
        (["--bench-steps", "-2"], "greater than 0"),
        (["--bench-guidance", "nan"], "finite number"),
        (["--methods", "salun,salun"], "salun more than once"),
        (["--alpha", "nan"], "--alpha must be a finite number"),
        (["--method-flags", "salun=--alpha nan"], "--alpha must be a finite number"),
        (["--methods", "salun,esd-u", "--mask", "m.safetensors"], "drop --mask"),
        (["--retrain"], "Retrain is built only on the testbeds"),
        (["--retrain-unet"], "on sd-digits alone, not 'unused': drop --retrain-unet"),
    ],
)
def test_bad_input_fails_before_the_model_is_loaded(tmp_path, capsys, flags, message):
    # '--model unused' does not exist: reaching the model would be a different error
    argv = ["--model", "unused", "--concept", "nudity", "--output", str(tmp_path / "b"), *flags]
    one_line(capsys, argv, message)
    assert os.listdir(tmp_path) == []


def test_retrain_of_a_concept_that_is_no_digit_fails_before_the_testbed_is_trained(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("ERASE_HOME", str(tmp_path / "home"))  # an empty cache: nothing trained
    argv = ["--model", "sd-digits", "--concept", "church", "--output", str(tmp_path / "b")]
    one_line(capsys, [*argv, "--retrain-unet"], "Retrain forgets a digit 0-9 or zero-nine")
    assert os.listdir(tmp_path) == []


def test_every_method_failing_is_exit_2_and_writes_nothing(
    tiny_sd_dir, tmp_path, capsys, monkeypatch
):
    class NaNSalUn(METHODS["salun"]):
        """SalUn whose loss turns NaN."""

        def loss(self, unet, forget, retain, generator):
            loss, terms = super().loss(unet, forget, retain, generator)
            return loss * float("nan"), terms

    monkeypatch.setitem(METHODS, "nan-salun", NaNSalUn)
    argv = ["--model", tiny_sd_dir, "--concept", "nudity", "--methods", "nan-salun"]
    argv += ["--output", str(tmp_path / "bench"), "--steps", "2", "--num-forget", "2"]
    argv += ["--num-retain", "2", "--gen-steps", "2", "--bench-per-prompt", "1"]
    argv += ["--bench-steps", "2", "--bench-clip", "none"]
    one_line(capsys, argv, "Every method failed: nan-salun: The loss became nan")
    assert os.listdir(tmp_path) == []
