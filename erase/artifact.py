"""The outputs of every erase command (erase-concept, -eval, -attack, -export, -bench) and of the
Python API: owned, locked, and written atomically, by the functions of this one module.

- Owned: every folder an erase command writes carries a marker file (`.erase-output`, naming the
  command), every .safetensors file it writes an `erase.format` entry in its header, and
  `--overwrite` replaces only what carries one. An output inside another command's output (a
  grid.png there) is refused.
- Locked: a run holds an exclusive lock on `<out>.erase-lock` from its first check to its last
  write, so a second run on the same output stops at once with one line. The name is the
  tool's: a file there that is not an erase lock is refused, never removed.
- Atomic: everything goes into `<out>.partial/` and that folder is renamed to `<out>` (a file
  output: the file inside it renamed to `<out>`) only when complete; an old output is replaced
  only then, and survives any failure before. The resumable folders of erase-eval and
  erase-attack are written file by file, each file atomically.
- A full disk (ENOSPC, a quota, or a write cut short) is one line, wherever it happens.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import re
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
LOCK_SUFFIX = ".erase-lock"
LOCK_HEADER = "erase-lock"  # the first word of every lock file an erase command writes
FILE_MARK = "erase.format"  # the header entry of every .safetensors file erase-export writes
# A full disk or quota, and a file size limit: a write cut short reports one of these.
NO_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
NO_SPACE_MESSAGES = (
    "No space left",
    "os error 28",
    "Disk quota exceeded",
    "File too large",
    "failed to write whole buffer",  # Rust's (safetensors) short write
    "file write failed",  # torch.save's short write
    "StorageFull",
    "WriteZero",
)


def partial_path(path: str) -> str:
    """Where a run writes before its output is complete."""
    return path.rstrip("/\\") + ".partial"


def lock_path(path: str) -> str:
    """The lock file beside an output: a name erase reserves (never a user's `<out>.lock`)."""
    return path.rstrip("/\\") + LOCK_SUFFIX


def is_marked(path: str) -> bool:
    """True for a folder an erase command wrote (it carries the marker file), or a .safetensors
    file erase-export wrote (its header says so); never through a symbolic link."""
    if os.path.islink(path):
        return False
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, MARKER))
    return os.path.isfile(path) and FILE_MARK in safetensors_header(path).get("__metadata__", {})


def written_by(path: str) -> str | None:
    """The command whose marker a folder carries (None without one)."""
    try:
        with open(os.path.join(path, MARKER), encoding="utf-8") as file:
            return str(json.load(file).get("written_by"))
    except (OSError, ValueError, AttributeError):
        return None


def safetensors_header(path: str) -> dict:
    """The JSON header of a .safetensors file; {} for anything else."""
    try:
        with open(path, "rb") as file:
            size = int.from_bytes(file.read(8), "little")
            if not 0 < size < 2**26:
                return {}
            header = json.loads(file.read(size))
    except (OSError, ValueError):
        return {}
    return header if isinstance(header, dict) else {}


def write_marker(folder: str, tool: str) -> None:
    """Mark `folder` as written by `tool`, so --overwrite may replace it later."""
    write_json(os.path.join(folder, MARKER), {"written_by": tool, "erase": erase.__version__})


def check_folder_path(path: str, flag: str, kind: str = "folder") -> None:
    """Refuse an output path that cannot be made: a file (for a folder), a folder (for a
    file), under a file, or in a read-only place."""
    absolute = os.path.abspath(path)
    if kind == "folder" and os.path.exists(absolute) and not os.path.isdir(absolute):
        raise EraseError(f"{flag} '{path}' is a file: pass a folder path.")
    if kind == "file" and os.path.isdir(absolute):
        raise EraseError(f"{flag} '{path}' is a folder: pass the path of a file to write.")
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


def check_not_inside_output(path: str, flag: str = "--output") -> None:
    """Refuse an output inside another erase output (it would overwrite that one's files); a
    run's own `<out>.partial` staging folder is where erase-bench writes each method's."""
    folder = os.path.dirname(os.path.abspath(path))
    while True:
        if is_marked(folder) and not folder.endswith(".partial"):
            raise EraseError(
                f"{flag} '{path}' lies inside '{folder}', the output of "
                f"{written_by(folder) or 'an erase command'}: pass a folder outside it."
            )
        parent = os.path.dirname(folder)
        if parent == folder:
            return
        folder = parent


@contextmanager
def output_lock(path: str, flag: str = "--output", kind: str = "folder"):
    """Hold the exclusive lock of output `path` for the whole run; a second run gets one line.

    The lock file is removed when the run ends, and so are parent folders this run made for an
    output it never wrote.
    """
    check_folder_path(path, flag, kind)
    check_not_inside_output(path, flag)
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
        if os.path.islink(lock) or (os.path.lexists(lock) and not os.path.isfile(lock)):
            raise foreign_lock(lock, path)
        descriptor = os.open(lock, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise busy from None
        text = os.pread(descriptor, 64, 0)
        if text and not text.startswith(LOCK_HEADER.encode()):  # a file erase did not write
            os.close(descriptor)
            raise foreign_lock(lock, path)
        try:  # the holder before us may have removed the file after we opened it: lock anew
            same = os.path.samestat(os.fstat(descriptor), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(descriptor)
    os.ftruncate(descriptor, 0)
    os.write(descriptor, f"{LOCK_HEADER} {socket.gethostname()} {os.getpid()}\n".encode())
    return descriptor


def foreign_lock(lock: str, path: str) -> EraseError:
    """The error for a file at the lock's name that an erase command did not write."""
    return EraseError(
        f"'{lock}' exists and is not an erase lock: erase reserves that name for the lock of "
        f"'{path}'; move the file away or pass another --output."
    )


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


def check_output(
    path: str, overwrite: bool, resume: bool = False, tool: str = "erase-concept"
) -> None:
    """Refuse an output this run may not write (call it holding the lock, before any work).

    An existing output is replaced only with --overwrite and only when `tool` wrote it (never
    through a symbolic link). A leftover `<out>.partial` is removed when it holds nothing to
    resume; one with a checkpoint is kept for --resume, discarded with --overwrite, and refused
    otherwise.
    """
    from erase.checkpoint import latest_step

    if os.path.lexists(path):
        check_replaceable(path, overwrite, tool)
    staging = partial_path(path)
    if not os.path.lexists(staging):
        return
    if os.path.islink(staging) or not os.path.isdir(staging):
        raise EraseError(
            f"'{staging}' exists and is not a folder erase wrote (a link or a file): move it "
            "away or pass another --output."
        )
    # a run killed while marking it leaves only the marker's temporary file
    foreign = [name for name in os.listdir(staging) if not name.startswith(MARKER)]
    if not is_marked(staging) and foreign:
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


def check_replaceable(path: str, overwrite: bool, tool: str) -> None:
    """Refuse to replace an existing output unless --overwrite is given and `tool` wrote it."""
    if not overwrite:
        raise EraseError(f"Output '{path}' already exists: pass --overwrite or another --output.")
    if os.path.islink(path):
        raise EraseError(
            f"'{path}' is a symbolic link, and --overwrite replaces only what erase wrote: pass "
            "the path it points to, or another --output."
        )
    if not is_marked(path):
        what = f"it has no {MARKER} file" if os.path.isdir(path) else "no erase file header"
        raise EraseError(
            f"'{path}' was not written by erase ({what}), and --overwrite replaces only erase "
            "outputs: pass another --output or move it away yourself."
        )
    owner = written_by(path) if os.path.isdir(path) else "erase-export"
    if owner != tool:
        raise EraseError(
            f"'{path}' is the output of {owner}, and {tool} --overwrite replaces only its own: "
            "pass another --output."
        )


@contextmanager
def staged_output(path: str, tool: str = "erase-concept"):
    """Yield `<path>.partial` (marked) to write into; on success rename it to `path`.

    An old output at `path` is replaced only then. On an error the partial folder is removed,
    unless it holds a complete checkpoint to resume from; a full disk is one line, not a trace.
    """
    from erase.checkpoint import latest_step

    staging = partial_path(path)
    main = PartialState().is_main_process  # only the main process renames and cleans up
    try:
        os.makedirs(staging, exist_ok=True)
        write_marker(staging, tool)
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
            raise full_disk(path, error, kept) from None
        raise


def full_disk(path: str, error: BaseException, kept: str = "") -> EraseError:
    """The one line of a full disk (or a write cut short) while writing `path`."""
    return EraseError(
        f"The disk of '{path}' is full ({one_line(error)}): free space or pass another --output; "
        f"an earlier output there is unchanged{kept}."
    )


@contextmanager
def disk_errors(path: str):
    """A full disk (or a write cut short) while writing the output `path` is one line."""
    try:
        yield
    except EraseError:
        raise
    except Exception as error:
        if no_space(error, os.path.dirname(os.path.abspath(path))):
            raise EraseError(
                f"The disk of '{path}' is full ({one_line(error)}): free space and run again; "
                "what was written completely is kept and reused."
            ) from None
        raise


def one_line(error: BaseException) -> str:
    """An error's message on one line, cut to a readable length."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."


@contextmanager
def staged_file(path: str, tool: str = "erase-export"):
    """Yield where to write the file output `path`: inside a marked `<path>.partial/` folder, so
    a killed run leaves nothing a later run cannot recognise as its own; on success the file
    is renamed to `path` (replacing an old one only then) and the folder removed."""
    staging = partial_path(path)
    try:
        os.makedirs(staging, exist_ok=True)
        write_marker(staging, tool)
        temporary = os.path.join(staging, os.path.basename(path.rstrip("/\\")))
        yield temporary
        os.replace(temporary, path)
    except BaseException as error:
        if isinstance(error, Exception) and no_space(error, os.path.dirname(staging) or "."):
            raise full_disk(path, error) from None
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_file_output(path: str, overwrite: bool, tool: str = "erase-export") -> None:
    """Refuse a file output this run may not write (holding its lock): an existing file not
    written by `tool`, or one without --overwrite; a killed run's `<path>.partial/` is removed."""
    if os.path.lexists(path):
        check_replaceable(path, overwrite, tool)
    staging = partial_path(path)
    if os.path.lexists(staging):
        unmarked = os.path.isdir(staging) and not is_marked(staging)
        foreign = unmarked and any(not n.startswith(MARKER) for n in os.listdir(staging))
        if os.path.islink(staging) or not os.path.isdir(staging) or foreign:
            raise EraseError(
                f"'{staging}' exists and was not written by erase: move it away or pass another "
                "--output."
            )
        shutil.rmtree(staging)


def open_resumable(path: str, tool: str, create: bool = True) -> None:
    """Make (or reopen; only check without `create`) the resumable output folder of erase-eval
    / erase-attack, holding its lock: an existing folder is reused only when `tool` marked it
    (or it is empty)."""
    if os.path.islink(path):
        raise EraseError(
            f"--output '{path}' is a symbolic link: pass the folder it points to, or another one."
        )
    if os.path.isdir(path) and os.listdir(path):
        owner = written_by(path)
        if owner is None:
            raise EraseError(
                f"--output '{path}' exists and was not written by {tool} (it has no {MARKER} "
                "file): pass another --output, or an empty folder."
            )
        if owner != tool:
            raise EraseError(
                f"--output '{path}' is the output of {owner}, and {tool} would overwrite its "
                "files: pass another --output."
            )
    if create:
        os.makedirs(path, exist_ok=True)
        if not os.path.isfile(os.path.join(path, MARKER)):
            write_marker(path, tool)


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


def no_space(error: BaseException, folder: str) -> bool:
    """Whether `error` comes from a full disk (errno, the message, or a disk with no room left),
    itself or what caused it."""
    seen = error
    for _ in range(8):  # the error and its causes, as far as a sane chain goes
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno in NO_SPACE_ERRNOS:
            return True
        if any(message in str(seen) for message in NO_SPACE_MESSAGES):
            return True
        if re.search(r"\d+ requested and \d+ written", str(seen)):  # numpy's short write
            return True
        seen = seen.__cause__ or seen.__context__
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


def read_metadata(folder: str):
    """The parsed metadata.json of an erase-concept output folder, or None where the folder has
    none (a bare diffusers folder, a released text encoder); one EraseError when it cannot be read
    or is not JSON."""
    path = os.path.join(folder, "metadata.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (OSError, ValueError):
        raise damaged_metadata(path) from None


def damaged_metadata(path: str) -> EraseError:
    return EraseError(
        f"'{path}' is unreadable: the output of erase-concept is damaged; erase the model again."
    )


def write_json(path: str, payload: dict) -> None:
    """Pretty JSON, written through a temporary file."""
    temporary = f"{path}.{os.getpid()}.tmp"  # one per process: several may write the same file
    with open(temporary, "w") as file:
        json.dump(payload, file, indent=2, default=str)
    os.replace(temporary, path)
