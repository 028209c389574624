"""The output folder: marked, locked for the whole run, replaced only when an erase command wrote
it, and never half-written (a full disk, a bad path, a second run)."""

import errno
import json
import os
import subprocess
import sys

import pytest

import erase.erasure
from erase.artifact import MARKER, output_lock
from erase.cli.concept import erase_concept_main


def one_line(capsys, argv) -> str:
    """The run exits 2 with one error line, the last on stderr (progress bars may precede it)."""
    assert erase_concept_main(argv) == 2
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and err.endswith(errors[0]) and "Traceback" not in err, err
    return errors[0]


def leftovers(output) -> list[str]:
    """What a failed run left beside its output."""
    return sorted(name for name in os.listdir(output.parent) if name.startswith(output.name + "."))


def test_every_output_carries_the_marker(tiny_sd_args, tmp_path):
    output = tmp_path / "out"
    assert erase_concept_main([*tiny_sd_args, "--output", str(output)]) == 0
    assert json.loads((output / MARKER).read_text())["written_by"] == "erase-concept"
    assert leftovers(output) == []  # no .partial, no .erase-lock


def test_overwrite_keeps_a_folder_erase_did_not_write(tiny_sd_args, tmp_path, capsys):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("months of work")
    err = one_line(capsys, [*tiny_sd_args, "--output", str(thesis), "--overwrite"])
    assert "not written by erase" in err
    assert (thesis / "chapter1.tex").read_text() == "months of work"
    assert sorted(os.listdir(thesis)) == ["chapter1.tex"] and leftovers(thesis) == []


def test_a_second_run_on_a_locked_output_exits_2(tiny_sd_args, tmp_path, monkeypatch, capsys):
    """The second run starts while the first trains; the first's artifact is then intact."""
    output = tmp_path / "out"
    original_train = erase.erasure.train
    second = []

    def train_while_another_run_starts(*args, **kwargs):
        second.append(erase_concept_main([*tiny_sd_args, "--output", str(output)]))
        return original_train(*args, **kwargs)

    monkeypatch.setattr(erase.erasure, "train", train_while_another_run_starts)
    assert erase_concept_main([*tiny_sd_args, "--output", str(output)]) == 0
    assert second == [2]
    assert "Another run is writing" in capsys.readouterr().err
    metadata = json.loads((output / "metadata.json").read_text())
    assert metadata["train_config"]["steps"] == 2 and (output / "unet" / "config.json").is_file()
    assert leftovers(output) == []


def test_another_process_is_refused_while_the_lock_is_held(tiny_sd_args, tmp_path):
    output = tmp_path / "out"
    with output_lock(str(output)):
        completed = subprocess.run(
            [sys.executable, "-m", "erase.cli", *tiny_sd_args, "--output", str(output)],
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert completed.returncode == 2
    err = completed.stderr.strip()  # libraries' import-time notices may precede the line
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and err.endswith(lines[0]) and "Another run is writing" in lines[0], err
    assert not output.exists() and leftovers(output) == []


def test_a_lock_file_left_by_a_killed_run_does_not_block(tiny_sd_args, tmp_path):
    output = tmp_path / "out"
    # kill -9 leaves the file, not the lock
    (tmp_path / "out.erase-lock").write_text("erase-lock host 12345\n")
    assert erase_concept_main([*tiny_sd_args, "--output", str(output)]) == 0
    assert leftovers(output) == []


def test_a_users_file_at_the_lock_name_is_refused_and_kept(tiny_sd_args, tmp_path, capsys):
    output, lock = tmp_path / "out", tmp_path / "out.erase-lock"
    lock.write_text("my notes\n")
    err = one_line(capsys, [*tiny_sd_args, "--output", str(output)])
    assert "is not an erase lock" in err
    assert lock.read_text() == "my notes\n" and not output.exists()


def test_a_partial_folder_erase_did_not_write_is_refused(tiny_sd_args, tmp_path, capsys):
    output = tmp_path / "out"
    (tmp_path / "out.partial").mkdir()
    (tmp_path / "out.partial" / "notes.txt").write_text("mine")
    err = one_line(capsys, [*tiny_sd_args, "--output", str(output)])
    assert "was not written by erase" in err
    assert (tmp_path / "out.partial" / "notes.txt").exists()


@pytest.mark.parametrize("where", ["proc", "under-a-file", "a-file"])
def test_an_output_that_cannot_be_written_fails_before_any_work(
    tiny_sd_args, tmp_path, capsys, monkeypatch, where
):
    from erase.models.sd import StableDiffusionBackend

    def no_sampling(*args, **kwargs):
        raise AssertionError("the output should have been refused before generating data")

    monkeypatch.setattr(StableDiffusionBackend, "sample", no_sampling)
    (tmp_path / "file.txt").write_text("x")
    output = {
        "proc": "/proc/erase-test-out",
        "under-a-file": str(tmp_path / "file.txt" / "out"),
        "a-file": str(tmp_path / "file.txt"),
    }[where]
    err = one_line(capsys, [*tiny_sd_args, "--output", output])
    assert "--output" in err
    assert sorted(os.listdir(tmp_path)) == ["file.txt"]


def test_parent_folders_made_for_a_failed_run_are_removed(tiny_sd_args, tmp_path, capsys):
    output = tmp_path / "a" / "b" / "out"
    one_line(capsys, [*tiny_sd_args, "--output", str(output), "--concept", "no-such-concept"])
    assert not (tmp_path / "a").exists()


def test_a_full_disk_is_one_line_and_keeps_the_old_output(
    tiny_sd_args, tmp_path, capsys, monkeypatch
):
    output = tmp_path / "out"
    assert erase_concept_main([*tiny_sd_args, "--output", str(output)]) == 0
    before = (output / "metadata.json").read_text()

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(erase.erasure, "save_mask", disk_full)
    err = one_line(capsys, [*tiny_sd_args, "--output", str(output), "--overwrite", "--seed", "3"])
    assert "disk" in err and "full" in err
    assert (output / "metadata.json").read_text() == before
    assert leftovers(output) == []
