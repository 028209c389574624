"""The output folder of a run: owned, locked, and written atomically.

- Owned: every folder an erase command writes carries a marker file (`.erase-output`), and
  `--overwrite` replaces only folders that carry one.
- Locked: a run holds an exclusive lock on `<out>.lock` from its first check to its last write,
  so a second run on the same output stops at once with one line.
- Atomic: everything goes into `<out>.partial/` and that folder is renamed to `<out>` only when
  complete; an old output is replaced only then, and survives any failure before.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import shutil
import socket
import uuid
from contextlib import contextmanager

import accelerate
import diffusers
import torch
import transformers
from accelerate import PartialState

import erase
from erase.errors import EraseError

try:  # POSIX advisory locks; elsewhere an exclusive create stands in (a killed run leaves it)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

MARKER = ".erase-output"  # present in every folder an erase command wrote
NO_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


def partial_path(path: str) -> str:
    """Where a run writes before its output is complete."""
    return path.rstrip("/\\") + ".partial"


def lock_path(path: str) -> str:
    """The lock file beside an output folder."""
    return path.rstrip("/\\") + ".lock"


def is_marked(path: str) -> bool:
    """True for a folder an erase command wrote (it carries the marker file)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, MARKER))


def write_marker(folder: str, tool: str) -> None:
    """Mark `folder` as written by `tool`, so --overwrite may replace it later."""
    write_json(os.path.join(folder, MARKER), {"written_by": tool, "erase": erase.__version__})


def check_folder_path(path: str, flag: str) -> None:
    """Refuse a folder path that cannot be made: a file, under a file, or in a read-only place."""
    absolute = os.path.abspath(path)
    if os.path.exists(absolute) and not os.path.isdir(absolute):
        raise EraseError(f"{flag} '{path}' is a file: pass a folder path.")
    ancestor = os.path.dirname(absolute)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise EraseError(f"{flag} '{path}' lies under the file '{ancestor}': pass a folder path.")
    if not os.access(ancestor, os.W_OK):
        raise EraseError(f"{flag} '{path}' cannot be created: '{ancestor}' is not writable.")


def make_parents(path: str) -> list[str]:
    """Create the missing parent folders of `path`; returns those created, deepest first."""
    created = []
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        created.append(parent)
        parent = os.path.dirname(parent)
    for folder in reversed(created):
        os.mkdir(folder)
    return created


@contextmanager
def output_lock(path: str, flag: str = "--output"):
    """Hold the exclusive lock of output `path` for the whole run; a second run gets one line.

    The lock file is removed when the run ends, and so are parent folders this run made for an
    output it never wrote.
    """
    check_folder_path(path, flag)
    if not PartialState().is_main_process:  # one lock per run, however many processes it has
        yield
        return
    lock = lock_path(path)
    created: list[str] = []
    try:
        created = make_parents(path)
        descriptor = acquire(lock, path)
    except OSError as error:
        remove_empty(created)
        raise EraseError(
            f"{flag} '{path}' cannot be written ({error.strerror or error}): pass a folder in a "
            "writable place."
        ) from None
    except EraseError:
        remove_empty(created)
        raise
    try:
        yield
    finally:
        release(lock, descriptor)
        if not os.path.exists(path):
            remove_empty(created)


def acquire(lock: str, path: str) -> int:
    """Open and lock `lock`; EraseError when another run holds it."""
    busy = EraseError(
        f"Another run is writing '{path}' (it holds '{lock}'): wait for it to finish or pass "
        "another --output."
    )
    while True:
        if fcntl is None:
            try:
                descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
            except FileExistsError:
                raise busy from None
            break
        descriptor = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise busy from None
        try:  # the holder before us may have removed the file after we opened it: lock anew
            same = os.path.samestat(os.fstat(descriptor), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(descriptor)
    os.ftruncate(descriptor, 0)
    os.write(descriptor, f"{socket.gethostname()} {os.getpid()}\n".encode())
    return descriptor


def release(lock: str, descriptor: int) -> None:
    """Remove the lock file, then let go of the lock (a waiting run then locks a new file)."""
    try:
        os.remove(lock)
    except FileNotFoundError:
        pass
    os.close(descriptor)


def remove_empty(folders: list[str]) -> None:
    """Remove the folders (deepest first) that are still empty."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:
            break


def check_output(path: str, overwrite: bool, resume: bool = False) -> None:
    """Refuse an output this run may not write (call it holding the lock, before any work).

    An existing output is replaced only with --overwrite and only when an erase command wrote
    it. A leftover `<out>.partial` is removed when it holds nothing to resume; one with a
    checkpoint is kept for --resume, discarded with --overwrite, and refused otherwise.
    """
    from erase.checkpoint import latest_step

    if os.path.lexists(path):
        if not overwrite:
            raise EraseError(
                f"Output folder '{path}' already exists: pass --overwrite or another --output."
            )
        if not is_marked(path):
            raise EraseError(
                f"'{path}' was not written by erase (it has no {MARKER} file), and --overwrite "
                "replaces only erase outputs: pass another --output or move it away yourself."
            )
    staging = partial_path(path)
    if not os.path.lexists(staging):
        return
    if not is_marked(staging) and not (os.path.isdir(staging) and not os.listdir(staging)):
        raise EraseError(
            f"'{staging}' exists and was not written by erase: move it away or pass another "
            "--output."
        )
    step = latest_step(os.path.join(staging, "checkpoint"))
    if step is None or (overwrite and not resume):
        if PartialState().is_main_process:  # a crashed run's leftovers, or a discarded checkpoint
            shutil.rmtree(staging)
        PartialState().wait_for_everyone()
    elif not resume:
        raise EraseError(
            f"'{staging}' holds the checkpoint of an interrupted run (step {step}): pass --resume "
            "to continue it with the same settings, or --overwrite to discard it."
        )


@contextmanager
def staged_output(path: str, tool: str = "erase-concept"):
    """Yield `<path>.partial` (marked) to write into; on success rename it to `path`.

    An old output at `path` is replaced only then. On an error the partial folder is removed,
    unless it holds a complete checkpoint to resume from; a full disk is one line, not a trace.
    """
    from erase.checkpoint import latest_step

    staging = partial_path(path)
    os.makedirs(staging, exist_ok=True)
    write_marker(staging, tool)
    main = PartialState().is_main_process  # only the main process renames and cleans up
    try:
        yield staging
        if main:
            shutil.rmtree(os.path.join(staging, "checkpoint"), ignore_errors=True)
            replace_output(staging, path)
    except BaseException as error:
        step = latest_step(os.path.join(staging, "checkpoint"))
        if main and step is None:
            shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, Exception) and no_space(error, os.path.dirname(staging) or "."):
            kept = f"; its checkpoint of step {step} is kept for --resume" if step else ""
            raise EraseError(
                f"The disk of '{path}' is full ({error}): free space or pass another --output; "
                f"an earlier output there is unchanged{kept}."
            ) from None
        raise


def replace_output(staging: str, path: str) -> None:
    """Rename the complete `staging` folder to `path`, replacing an erase output there."""
    if os.path.lexists(path) and not is_marked(path):  # appeared while the run worked
        raise EraseError(
            f"'{path}' appeared during the run and was not written by erase: move it away and "
            "run again."
        )
    old = None
    if os.path.lexists(path):
        old = f"{path}.old-{uuid.uuid4().hex[:8]}"
        os.replace(path, old)
    os.replace(staging, path)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def no_space(error: Exception, folder: str) -> bool:
    """Whether `error` comes from a full disk (errno, the message, or a disk with no room left)."""
    if isinstance(error, OSError) and error.errno in NO_SPACE_ERRNOS:
        return True
    if "No space left" in str(error) or "os error 28" in str(error):
        return True
    if isinstance(error, (OSError, RuntimeError)):  # torch.save names no cause: look at the disk
        try:
            return shutil.disk_usage(folder).free < 2**20
        except OSError:
            return False
    return False


def versions() -> dict[str, str]:
    """Versions of everything that shaped the result."""
    return {
        "erase": erase.__version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
    }


def write_json(path: str, payload: dict) -> None:
    """Pretty JSON, written through a temporary file."""
    temporary = f"{path}.{os.getpid()}.tmp"  # one per process: several may write the same file
    with open(temporary, "w") as file:
        json.dump(payload, file, indent=2, default=str)
    os.replace(temporary, path)
