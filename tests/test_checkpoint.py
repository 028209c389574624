"""Checkpoints: atomic under a fault inside the save, resumed only with --resume and only with
the settings they were made with; a damaged one is one line."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from erase.cli.concept import erase_concept_main
from erase.testing import save_tiny_sd

WEIGHTS = os.path.join("unet", "diffusion_pytorch_model.safetensors")


def run_args(tiny_sd_args, output, *extra):
    return [*tiny_sd_args, "--steps", "6", "--checkpoint-every", "2", "--lr", "1e-3"] + [
        "--output",
        str(output),
        *extra,
    ]


def interrupt_at_second_save(monkeypatch):
    """Make the second checkpoint save die midway: the model is written, the optimizer is not."""
    import accelerate

    original_save_state = accelerate.Accelerator.save_state
    original_torch_save = torch.save
    calls = []

    def save_state(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:

            def dying_save(obj, f, *args, **kw):
                raise KeyboardInterrupt  # what kill -9 looks like from inside the write

            monkeypatch.setattr(torch, "save", dying_save)
        try:
            return original_save_state(self, output_dir, **kwargs)
        finally:
            monkeypatch.setattr(torch, "save", original_torch_save)

    monkeypatch.setattr(accelerate.Accelerator, "save_state", save_state)
    return calls


@pytest.fixture()
def interrupted(tiny_sd_args, tmp_path, monkeypatch):
    """A run of 6 steps killed while saving its step-4 checkpoint (step 2 is complete)."""
    output = tmp_path / "run"
    with monkeypatch.context() as patch:
        calls = interrupt_at_second_save(patch)
        with pytest.raises(KeyboardInterrupt):
            erase_concept_main(run_args(tiny_sd_args, output))
    assert len(calls) == 2
    return output


# The optimizer's state in a checkpoint: accelerate's optimizer.bin, or the masked optimizer's.
OPTIMIZER_FILES = ("optimizer.bin", "custom_checkpoint_0.pkl")


def checkpoint_folder(output):
    return output.parent / (output.name + ".partial") / "checkpoint"


def test_fault_inside_a_save_then_resume_equals_an_uninterrupted_run(
    interrupted, tiny_sd_args, tmp_path
):
    checkpoints = checkpoint_folder(interrupted)
    assert (checkpoints / "latest").read_text() == "step-00000002"
    cut_short = checkpoints / "step-00000004.tmp"
    assert (cut_short / "model.safetensors").is_file()  # the fault struck inside the save
    assert not any((cut_short / name).exists() for name in OPTIMIZER_FILES)
    assert not interrupted.exists()

    assert erase_concept_main(run_args(tiny_sd_args, interrupted, "--resume")) == 0
    uninterrupted = tmp_path / "straight"
    assert erase_concept_main(run_args(tiny_sd_args, uninterrupted)) == 0
    resumed, straight = (
        load_file(str(folder / WEIGHTS)) for folder in (interrupted, uninterrupted)
    )
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[name], straight[name]) for name in straight)
    metadata = json.loads((interrupted / "metadata.json").read_text())
    assert metadata["train_result"]["resumed_from"] == 2
    assert not checkpoint_folder(interrupted).parent.exists()


def one_line(capsys, argv) -> str:
    """The run exits 2 with one error line, the last on stderr (progress bars may precede it)."""
    assert erase_concept_main(argv) == 2
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and err.endswith(errors[0]) and "Traceback" not in err, err
    return errors[0]


def test_a_leftover_checkpoint_is_not_used_without_resume(interrupted, tiny_sd_args, capsys):
    err = one_line(capsys, run_args(tiny_sd_args, interrupted, "--seed", "1"))
    assert "interrupted run (step 2)" in err and "--resume" in err
    assert (checkpoint_folder(interrupted) / "latest").is_file()  # nothing lost
    assert not interrupted.exists()
    assert not (interrupted.parent / "run.erase-lock").exists()


@pytest.mark.parametrize(
    "extra, named",
    [
        (["--seed", "1"], "seed"),
        (["--lr", "1e-2"], "train_config.lr"),
        (["--concept", "church"], "concept"),
        (["--alpha", "0.3"], "method_config.alpha"),
    ],
)
def test_resume_with_other_settings_says_which_differ(
    interrupted, tiny_sd_args, capsys, extra, named
):
    err = one_line(capsys, [*run_args(tiny_sd_args, interrupted, "--resume"), *extra])
    assert "other settings" in err and named in err
    assert (checkpoint_folder(interrupted) / "latest").is_file()


def test_resume_on_another_model_is_refused(interrupted, tiny_sd_args, tmp_path, capsys):
    other = save_tiny_sd(str(tmp_path / "other-model"), seed=1)
    argv = [*run_args(tiny_sd_args, interrupted, "--resume"), "--model", other]
    err = one_line(capsys, argv)
    assert "model:" in err and "weights:" in err


def test_overwrite_discards_a_leftover_checkpoint(interrupted, tiny_sd_args):
    assert erase_concept_main(run_args(tiny_sd_args, interrupted, "--overwrite")) == 0
    metadata = json.loads((interrupted / "metadata.json").read_text())
    assert metadata["train_result"]["resumed_from"] == 0


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_damaged_checkpoint_is_one_line(interrupted, tiny_sd_args, capsys, damage):
    step = checkpoint_folder(interrupted) / "step-00000002"
    optimizer_state = next(step / name for name in OPTIMIZER_FILES if (step / name).exists())
    target = step / "model.safetensors" if damage == "truncate" else optimizer_state
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"x" * len(data))
    err = one_line(capsys, run_args(tiny_sd_args, interrupted, "--resume"))
    assert "is damaged" in err and "--overwrite" in err
    assert not interrupted.exists() and not (interrupted.parent / "run.erase-lock").exists()


def test_resume_with_a_different_mask_is_refused(interrupted, tiny_sd_args, capsys, monkeypatch):
    import erase.erasure
    from erase.saliency import saliency_mask

    # as if the mask's gradients came out otherwise (another device): a different top set
    monkeypatch.setattr(
        erase.erasure, "saliency_mask", lambda gradients, ratio: saliency_mask(gradients, 0.25)
    )
    err = one_line(capsys, run_args(tiny_sd_args, interrupted, "--resume"))
    assert "mask_digest" in err and "saliency mask computed now differs" in err
    assert (checkpoint_folder(interrupted) / "latest").is_file()
