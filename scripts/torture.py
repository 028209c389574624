"""Try every erase command and the Python API as a hostile user and a fault injector would, on
the tiny random pipeline of erase.testing, and print per case whether it held: JSON.

    python scripts/torture.py                 # every case
    python scripts/torture.py --case export   # the cases whose name contains 'export'

A case is defective when a command gives a wrong result with exit 0, loses or overwrites a file
it did not write, leaves a pipeline half-erased, or answers a user's mistake (or a full disk)
with anything but one stderr line and exit code 2 (the API: one EraseError). Faults are
injected for real: a full disk is a file size limit (RLIMIT_FSIZE) on a child process, so writes
are cut short as on a full disk; a kill is SIGKILL at a chosen call inside a checkpoint save.
tests/test_torture.py runs the fast cases (FAST) in the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as `python scripts/torture.py` from anywhere
    sys.path.insert(0, ROOT)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from erase.errors import EraseError  # noqa: E402
from erase.testing import save_tiny_sd  # noqa: E402

WEIGHTS = os.path.join("unet", "diffusion_pytorch_model.safetensors")
PROMPTS = "prompt,evaluation_seed\na photo of a cat,3\na nude person,5\n"


class Defect(Exception):
    """What a case found wrong."""


class World:
    """The tiny models and artifacts the cases share, each made once, on first use."""

    def __init__(self, folder: str):
        self.folder = folder
        self.made: dict[str, str] = {}

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def once(self, name: str, make) -> str:
        if name not in self.made:
            self.made[name] = make(self.path(name))
        return self.made[name]

    @property
    def model(self) -> str:
        """The tiny random SD pipeline (seed 0)."""
        return self.once("model", lambda path: save_tiny_sd(path, seed=0))

    @property
    def other_model(self) -> str:
        """Another tiny SD pipeline of the same shapes (seed 1): another base."""
        return self.once("other-model", lambda path: save_tiny_sd(path, seed=1))

    def artifact(self, seed: int = 0) -> str:
        """An erase-concept output (SalUn, 2 steps) of the tiny model."""

        def make(path):
            require_ok(erase_cli([*erase_args(self.model), "--seed", str(seed), "--output", path]))
            return path

        return self.once(f"artifact-{seed}", make)

    @property
    def prompts(self) -> str:
        def make(path):
            with open(path, "w") as file:
                file.write(PROMPTS)
            return path

        return self.once("prompts.csv", make)


# -- running the commands ---------------------------------------------------------------------


def erase_args(model: str) -> list[str]:
    """erase-concept flags for a seconds-long run on a tiny model."""
    return ["--model", model, "--concept", "nudity", "--steps", "2", "--lr", "1e-3"] + [
        "--num-forget", "2", "--num-retain", "2", "--gen-steps", "2",
    ]  # fmt: skip


def in_process(main, argv: list[str]) -> tuple[int, str]:
    """(exit code, stderr) of a command's main in this process; a traceback is a Defect."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
    except BaseException as error:  # noqa: BLE001 - any escape is the finding
        raise Defect(f"traceback: {type(error).__name__}: {str(error)[:200]}") from None
    return code, err.getvalue()


def erase_cli(argv):
    from erase.cli.concept import main

    return in_process(main, argv)


def eval_cli(argv):
    from eval.cli import main

    return in_process(main, argv)


def attack_cli(argv):
    from eval.attacks.cli import main

    return in_process(main, argv)


def export_cli(argv):
    from erase.cli.export import main

    return in_process(main, argv)


def require_ok(result: tuple[int, str]) -> None:
    code, err = result
    if code != 0:
        raise Defect(f"exit {code}: {err.strip()[-300:]}")


def require_one_line(result: tuple[int, str], *words: str) -> str:
    """Exit code 2 and exactly one stderr line (containing `words`), no traceback."""
    code, err = result
    lines = [line for line in err.strip().splitlines() if line.strip()]
    if code != 2 or len(lines) != 1 or "Traceback" in err:
        raise Defect(f"exit {code} with {len(lines)} stderr lines: {err.strip()[-300:]}")
    missing = [word for word in words if word.lower() not in lines[0].lower()]
    if missing:
        raise Defect(f"the line does not say {missing}: {lines[0]}")
    return lines[0]


def require_erase_error(call, *words: str) -> None:
    """The API call raises one EraseError (no other type, no SystemExit)."""
    try:
        call()
    except EraseError as error:
        text = str(error)
        if "\n" in text or any(word.lower() not in text.lower() for word in words):
            raise Defect(f"EraseError without {words}: {text}") from None
        return
    except BaseException as error:  # noqa: BLE001
        raise Defect(f"{type(error).__name__}: {str(error)[:200]}") from None
    raise Defect("no error: the call went through")


def child(code: str, file_size_limit: int | None = None, env=None) -> subprocess.CompletedProcess:
    """Run `code` in a child Python (this repository importable); with `file_size_limit`, every
    write past that many bytes fails as on a full disk (EFBIG, a short write first)."""

    def limit():
        if file_size_limit is not None:
            import resource

            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write, not the process
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    environment = {**os.environ, "PYTHONPATH": ROOT, "PYTHONDONTWRITEBYTECODE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=600,
        env=environment,
        preexec_fn=limit,
        cwd=ROOT,
    )


def child_one_line(completed: subprocess.CompletedProcess, *words: str) -> str:
    """A child command ended with exit 2 and one error line, the last on stderr (libraries'
    import-time notices before it are not the command's)."""
    err = completed.stderr.strip()
    lines = [line for line in err.splitlines() if "error:" in line]
    if (
        completed.returncode != 2
        or len(lines) != 1
        or not err.endswith(lines[0])
        or "Traceback" in err
    ):
        raise Defect(f"exit {completed.returncode}: {completed.stderr.strip()[-400:]}")
    missing = [word for word in words if word.lower() not in lines[0].lower()]
    if missing:
        raise Defect(f"the line does not say {missing}: {lines[0]}")
    return lines[0]


def generated(output: str) -> tuple[int, int]:
    with open(os.path.join(output, "results.json")) as file:
        generation = json.load(file)["generation"]
    return generation["generated"], generation["reused"]


def snapshot(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed_weights(module: torch.nn.Module, before: dict) -> int:
    return sum(int((v != before[k]).sum()) for k, v in module.state_dict().items())


@contextlib.contextmanager
def patched(owner, name: str, replacement):
    """`owner.name` replaced for the block."""
    original = getattr(owner, name)
    setattr(owner, name, replacement)
    try:
        yield original
    finally:
        setattr(owner, name, original)


def forbidden(*args, **kwargs):
    raise Defect("work was done before the input was refused")


# -- wrong results with exit 0 ----------------------------------------------------------------


def eval_model_exported_again_is_regenerated(world: World, tmp: str) -> None:
    """erase-eval --model DIR keys images by the model's content: a pipeline exported again into
    the same folder (--overwrite) is scored anew, not the old images."""
    pipeline, report = os.path.join(tmp, "pipeline"), os.path.join(tmp, "eval")
    argv = ["--model", pipeline, "--prompts", world.prompts, "--num-steps", "2"]
    argv += ["--metric", "none", "--output", report, "--no-progress"]
    for seed in (0, 1):
        export = [world.artifact(seed), "--format", "pipeline", "--output", pipeline]
        require_ok(export_cli(export + (["--overwrite"] if seed else [])))
        require_ok(eval_cli(argv))
        if generated(report) != (2, 0):
            raise Defect(f"export {seed}: (generated, reused) = {generated(report)}, not (2, 0)")


def attack_output_is_locked(world: World, tmp: str) -> None:
    """A second erase-attack on one --output while the first holds it is refused (else
    results.json names one UNet and the rows come from the other)."""
    from erase.artifact import output_lock

    output = os.path.join(tmp, "attack")
    with output_lock(output):
        line = require_one_line(attack_cli(attack_args(world, output)), "another run")
    del line


def attack_args(world: World, output: str, *extra: str) -> list[str]:
    argv = ["--model", world.model, "--unet", world.artifact(0), "--concept", "nudity"]
    argv += ["--attack", "prompts", "--prompts", world.prompts, "--num-steps", "2"]
    return [*argv, "--output", output, "--no-progress", *extra]


def export_base_of_other_weights_is_refused(world: World, tmp: str) -> None:
    """erase-export --base OTHER would combine another base's text encoder and VAE with the
    erased UNet: refused against the artifact's base fingerprint."""
    output = os.path.join(tmp, "x.safetensors")
    argv = [world.artifact(0), "--format", "single-file", "--output", output]
    require_one_line(export_cli([*argv, "--base", world.other_model]), "base")
    if os.path.exists(output):
        raise Defect("the export was written")


def export_base_spelled_otherwise_is_accepted(world: World, tmp: str) -> None:
    """--base naming the artifact's own base another way (a trailing slash) is the same model."""
    output = os.path.join(tmp, "x.safetensors")
    argv = [world.artifact(0), "--format", "unet", "--output", output]
    require_ok(export_cli([*argv, "--base", world.model + os.sep]))


def api_negative_steps_is_refused(world: World, tmp: str) -> None:
    """erase.erase_concept(..., steps=-1) is one EraseError, not an artifact trained 0 steps."""
    import erase

    require_erase_error(
        lambda: erase.erase_concept(world.model, "nudity", steps=-1, output=tmp + "/o"), "steps"
    )


# -- data loss --------------------------------------------------------------------------------


def users_lock_file_is_kept(world: World, tmp: str) -> None:
    """--output proj/uv never deletes the user's proj/uv.lock (erase-concept, erase-eval)."""
    project = os.path.join(tmp, "proj")
    os.makedirs(os.path.join(project, "uv"))  # exists: the run is refused at once
    lock = os.path.join(project, "uv.lock")
    with open(lock, "w") as file:
        file.write("version = 1\n")
    require_one_line(erase_cli([*erase_args(world.model), "--output", project + "/uv"]))
    argv = ["--model", world.model, "--prompts", world.prompts, "--num-steps", "2"]
    require_one_line(eval_cli([*argv, "--output", project + "/uv", "--no-progress"]))
    if not os.path.isfile(lock) or open(lock).read() != "version = 1\n":
        raise Defect("proj/uv.lock was removed or changed")


def outputs_inside_another_commands_output_are_refused(world: World, tmp: str) -> None:
    """erase-attack / erase-eval --output into an erase-concept output would overwrite its
    grid.png: refused, the output unchanged."""
    artifact = os.path.join(tmp, "artifact")
    shutil.copytree(world.artifact(0), artifact)
    grid = os.path.join(artifact, "grid.png")
    before = open(grid, "rb").read() if os.path.exists(grid) else None
    for output in (artifact, os.path.join(artifact, "attack")):
        require_one_line(attack_cli(attack_args(world, output)), "output")
        argv = ["--model", world.model, "--prompts", world.prompts, "--num-steps", "2"]
        require_one_line(eval_cli([*argv, "--output", output, "--no-progress"]), "output")
    after = open(grid, "rb").read() if os.path.exists(grid) else None
    if before != after or os.path.exists(os.path.join(artifact, "attack")):
        raise Defect("the erase-concept output was changed")


def in_place_nan_loss_leaves_the_pipeline_as_it_was(world: World, tmp: str) -> None:
    """A pipeline erased in place whose training fails (a NaN loss) keeps its weights and mode."""
    from diffusers import StableDiffusionPipeline

    import erase
    from erase.methods import get_method

    pipe = StableDiffusionPipeline.from_pretrained(world.model)
    pipe.unet.eval()
    before = snapshot(pipe.unet)
    calls = []

    def nan_on_the_second_step(self, *args, **kwargs):  # the first step moved the weights
        value, terms = original(self, *args, **kwargs)
        calls.append(1)
        return (value * float("nan"), terms) if len(calls) > 1 else (value, terms)

    settings = dict(steps=3, num_forget=2, num_retain=2, gen_steps=2, lr=1e-2)
    with patched(get_method("salun"), "loss", nan_on_the_second_step) as original:
        try:
            erase.erase_concept(pipe, "nudity", **settings)
        except EraseError:
            pass
        else:
            raise Defect("the NaN loss was not reported")
    changed = changed_weights(pipe.unet, before)
    if changed or pipe.unet.training:
        raise Defect(f"{changed} weights changed, train mode {pipe.unet.training}")


def in_place_ctrl_c_leaves_the_pipeline_as_it_was(world: World, tmp: str) -> None:
    """Ctrl-C after training (while the artifact is written) leaves the pipeline as it was."""
    from diffusers import StableDiffusionPipeline

    import erase
    import erase.erasure

    pipe = StableDiffusionPipeline.from_pretrained(world.model)
    before = snapshot(pipe.unet)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with patched(erase.erasure, "write_phase", interrupted):
        try:
            erase.erase_concept(pipe, "nudity", steps=2, num_forget=2, num_retain=2, gen_steps=2)
        except KeyboardInterrupt:
            pass
        else:
            raise Defect("the interrupt did not stop the run")
    changed = changed_weights(pipe.unet, before)
    if changed or pipe.unet.training:
        raise Defect(f"{changed} weights changed, train mode {pipe.unet.training}")


def export_overwrite_keeps_a_users_file(world: World, tmp: str) -> None:
    """erase-export --overwrite replaces only files it wrote: a user's .safetensors is refused."""
    mine = os.path.join(tmp, "mine.safetensors")
    save_file({"w": torch.ones(3)}, mine)
    before = open(mine, "rb").read()
    argv = [world.artifact(0), "--format", "unet", "--output", mine, "--overwrite"]
    require_one_line(export_cli(argv), "not written by erase")
    if open(mine, "rb").read() != before:
        raise Defect("the user's file was replaced")


def export_overwrite_replaces_its_own_file(world: World, tmp: str) -> None:
    """... and it does replace a file erase-export wrote."""
    output = os.path.join(tmp, "erased.safetensors")
    argv = [world.artifact(0), "--format", "unet", "--output", output]
    require_ok(export_cli(argv))
    require_ok(export_cli([*argv, "--overwrite"]))


# -- late checks ------------------------------------------------------------------------------


def retain_images_without_images_is_refused_before_work(world: World, tmp: str) -> None:
    """--retain-images with an empty or non-image folder is refused before the forget set is
    generated."""
    from erase.models.sd import StableDiffusionBackend

    empty, texts = os.path.join(tmp, "empty"), os.path.join(tmp, "texts")
    os.makedirs(empty)
    os.makedirs(texts)
    with open(os.path.join(texts, "notes.txt"), "w") as file:
        file.write("no image")
    with patched(StableDiffusionBackend, "sample", forbidden):
        for folder in (empty, texts):
            argv = [*erase_args(world.model), "--retain-images", folder]
            require_one_line(erase_cli([*argv, "--output", tmp + "/o"]), "--retain-images")


def api_wrong_types_are_refused_before_work(world: World, tmp: str) -> None:
    """API settings of the wrong type (steps="2") are one EraseError before any training."""
    import erase
    from erase.models.sd import StableDiffusionBackend

    with patched(StableDiffusionBackend, "sample", forbidden):
        for settings in ({"steps": "2"}, {"lr": "fast"}, {"num_forget": 2.5}, {"seed": -1}):
            require_erase_error(
                lambda s=settings: erase.erase_concept(
                    world.model, "nudity", output=tmp + "/o", **s
                )
            )


# -- tracebacks instead of one line -----------------------------------------------------------


def attack_bad_outputs_and_inputs_are_one_line(world: World, tmp: str) -> None:
    """erase-attack: --output /proc/x or an existing file, a non-UTF-8 prompt CSV,
    --attack-weight-decay nan, a CSV with an unclosed quote."""
    afile = os.path.join(tmp, "file.txt")
    with open(afile, "w") as file:
        file.write("x")
    require_one_line(attack_cli(attack_args(world, "/proc/erase-torture")), "/proc")
    require_one_line(attack_cli(attack_args(world, afile)), "file")
    latin = os.path.join(tmp, "latin.csv")
    with open(latin, "wb") as file:
        file.write("prompt\nun caf\xe9 nu\n".encode("latin-1"))
    argv = attack_args(world, os.path.join(tmp, "o"))
    argv[argv.index("--prompts") + 1] = latin
    require_one_line(attack_cli(argv), "UTF-8")
    quoted = os.path.join(tmp, "quoted.csv")
    with open(quoted, "w") as file:
        file.write('prompt,evaluation_seed\n"a cat,3\na dog,5\n')
    argv[argv.index("--prompts") + 1] = quoted
    require_one_line(attack_cli(argv), "CSV")
    nan = attack_args(world, os.path.join(tmp, "o"), "--attack-weight-decay", "nan")
    nan[nan.index("--attack") + 1] = "unlearndiffatk"
    require_one_line(attack_cli(nan), "weight-decay")


def eval_resolution_not_a_multiple_of_8_is_one_line(world: World, tmp: str) -> None:
    """erase-eval --resolution 34 is one line, before any image."""
    argv = ["--model", world.model, "--prompts", world.prompts, "--num-steps", "2"]
    argv += ["--metric", "none", "--resolution", "34"]  # no metric model: the check is first
    require_one_line(eval_cli([*argv, "--output", tmp + "/o", "--no-progress"]), "multiple")


def export_bad_outputs_and_artifacts_are_one_line(world: World, tmp: str) -> None:
    """erase-export to an unwritable place, under a file, a *.safetensors folder with
    --overwrite; an artifact without unet/ or with a corrupt metadata.json."""
    afile = os.path.join(tmp, "file.txt")
    with open(afile, "w") as file:
        file.write("x")
    folder = os.path.join(tmp, "dir.safetensors")
    os.makedirs(folder)
    for output in ("/proc/erase-torture.safetensors", afile + "/x.safetensors", folder):
        argv = [world.artifact(0), "--format", "unet", "--output", output, "--overwrite"]
        require_one_line(export_cli(argv))
    no_unet = os.path.join(tmp, "no-unet")
    shutil.copytree(world.artifact(0), no_unet)
    shutil.rmtree(os.path.join(no_unet, "unet"))
    require_one_line(export_cli([no_unet, "--format", "unet", "--output", tmp + "/a.safetensors"]))
    corrupt = os.path.join(tmp, "corrupt")
    shutil.copytree(world.artifact(0), corrupt)
    with open(os.path.join(corrupt, "metadata.json"), "w") as file:
        file.write('{"base_model": ')
    argv = [corrupt, "--format", "unet", "--output", tmp + "/b.safetensors"]
    require_one_line(export_cli(argv), "metadata.json")


def export_full_disk_is_one_line(world: World, tmp: str) -> None:
    """erase-export on a full disk: one line, no file and no .partial left."""
    output = os.path.join(tmp, "x.safetensors")
    code = (
        "import sys; from erase.cli.export import main; "
        f"sys.exit(main([{world.artifact(0)!r}, '--format', 'unet', '--output', {output!r}]))"
    )
    child_one_line(child(code, file_size_limit=20_000), "full")
    left = sorted(os.listdir(tmp))
    if left:
        raise Defect(f"left behind: {left}")


def erase_full_disk_is_one_line(world: World, tmp: str) -> None:
    """erase-concept on a full disk (a write cut short, not only ENOSPC): one line, nothing
    half-written."""
    output = os.path.join(tmp, "out")
    argv = [*erase_args(world.model), "--output", output]
    code = f"import sys; from erase.cli.concept import main; sys.exit(main({argv!r}))"
    home = os.path.join(tmp, "home")
    completed = child(code, file_size_limit=40_000, env={"ERASE_HOME": home})
    child_one_line(completed, "full")
    left = sorted(name for name in os.listdir(tmp) if name != "home")
    if left:
        raise Defect(f"left behind: {left}")


def symlinked_partial_is_one_line(world: World, tmp: str) -> None:
    """erase-concept with `<out>.partial` a symbolic link: one line, the link's target intact."""
    target = os.path.join(tmp, "elsewhere")
    os.makedirs(target)
    with open(os.path.join(target, "keep.txt"), "w") as file:
        file.write("mine")
    os.symlink(target, os.path.join(tmp, "out.partial"))
    require_one_line(erase_cli([*erase_args(world.model), "--output", tmp + "/out"]), "link")
    if not os.path.isfile(os.path.join(target, "keep.txt")):
        raise Defect("the link's target lost a file")


def api_bad_calls_are_one_erase_error(world: World, tmp: str) -> None:
    """Wrong API calls raise EraseError with one sentence: never TypeError, ValueError,
    ZeroDivisionError, AttributeError or SystemExit."""
    import erase

    out = os.path.join(tmp, "o")
    calls = {
        "concept=[]": lambda: erase.erase_concept(world.model, [], output=out),
        "concept=5": lambda: erase.erase_concept(world.model, 5, output=out),
        "method=3": lambda: erase.erase_concept(world.model, "nudity", method=3, output=out),
        "model=5": lambda: erase.erase_concept(5, "nudity", output=out),
        "unknown setting": lambda: erase.erase_concept(world.model, "nudity", stepz=2),
        "batch_size=0": lambda: erase.erase_concept(world.model, "nudity", batch_size=0),
        "epochs=-1": lambda: erase.erase_concept(world.model, "nudity", epochs=-1, output=out),
        "output=5": lambda: erase.erase_concept(world.model, "nudity", output=5),
        "evaluate prompts=3": lambda: erase.evaluate(world.model, 3, output=out),
        "evaluate limit=-1": lambda: erase.evaluate(world.model, world.prompts, limit=-1),
        "evaluate num_steps='2'": lambda: erase.evaluate(world.model, world.prompts, num_steps="2"),
        "evaluate metrics=5": lambda: erase.evaluate(world.model, world.prompts, metrics=5),
        "attack attacks=5": lambda: erase.attack(world.model, "nudity", 5, output=out),
        "attack blocks=0": lambda: erase.attack(
            world.model, "nudity", "unlearndiffatk", blocks=0, output=out
        ),
        "attack concept=None": lambda: erase.attack(world.model, None, "prompts", output=out),
        "attack relearn_steps=[-1]": lambda: erase.attack(
            world.model, "nudity", "relearn", relearn_steps=[-1], output=out
        ),
        "export format=bogus": lambda: erase.export_model(world.artifact(0), "bogus", out),
        "export output=None": lambda: erase.export_model(world.artifact(0), "pipeline", None),
        "export artifact=None": lambda: erase.export_model(None, "pipeline", out),
        "load_model(5)": lambda: erase.load_model(5),
    }
    failures = []
    for name, call in calls.items():
        try:
            require_erase_error(call)
        except Defect as defect:
            failures.append(f"{name}: {defect}")
    if failures:
        raise Defect("; ".join(failures))


# -- minor ------------------------------------------------------------------------------------


def same_model_spelled_two_ways_is_one_model(world: World, tmp: str) -> None:
    """erase-attack and --resume accept the base model spelled another way (a trailing slash)."""
    output = os.path.join(tmp, "attack")
    argv = attack_args(world, output)
    argv[argv.index("--model") + 1] = world.model + os.sep
    require_ok(attack_cli(argv))
    interrupted = os.path.join(tmp, "run")
    from erase.cli.concept import main

    with patched_exit_after_checkpoint(), contextlib.redirect_stderr(io.StringIO()):
        try:
            main([*erase_args(world.model), "--checkpoint-every", "1", "--output", interrupted])
        except KeyboardInterrupt:
            pass
    if not os.path.isdir(interrupted + ".partial"):
        raise Defect("no checkpoint was left to resume (the setup failed)")
    resumed = [*erase_args(world.model + os.sep), "--checkpoint-every", "1", "--resume"]
    require_ok(erase_cli([*resumed, "--output", interrupted]))


@contextlib.contextmanager
def patched_exit_after_checkpoint():
    """The run stops (as if killed) right after its first checkpoint is complete."""
    import erase.train

    original = erase.train.save_checkpoint

    def save_then_stop(*args, **kwargs):
        original(*args, **kwargs)
        raise KeyboardInterrupt

    with patched(erase.train, "save_checkpoint", save_then_stop):
        yield


def mask_of_another_base_is_refused(world: World, tmp: str) -> None:
    """A --mask computed on another base of the same shapes is refused, not used silently."""
    mask = os.path.join(world.artifact(0), "mask.safetensors")
    argv = [*erase_args(world.other_model), "--mask", mask, "--output", tmp + "/o"]
    require_one_line(erase_cli(argv), "mask")


def the_same_concept_twice_is_refused(world: World, tmp: str) -> None:
    """--concept nudity --concept nudity is a mistake, not a union of one concept with itself."""
    argv = [*erase_args(world.model), "--concept", "nudity", "--output", tmp + "/o"]
    require_one_line(erase_cli(argv), "nudity")


def empty_relearn_data_names_its_flag(world: World, tmp: str) -> None:
    """An empty --relearn-data folder is one line naming --relearn-data."""
    empty = os.path.join(tmp, "empty")
    os.makedirs(empty)
    argv = attack_args(world, os.path.join(tmp, "o"), "--relearn-data", empty)
    argv[argv.index("--attack") + 1] = "relearn"
    require_one_line(attack_cli(argv), "--relearn-data")


def unclosed_quote_in_a_prompt_csv_is_one_line(world: World, tmp: str) -> None:
    """A CSV with an unclosed quote is one line, not a prompt that swallowed the rest (and its
    seed)."""
    quoted = os.path.join(tmp, "quoted.csv")
    with open(quoted, "w") as file:
        file.write('prompt,evaluation_seed\n"a cat,3\na dog,5\n')
    argv = ["--model", world.model, "--prompts", quoted, "--num-steps", "2", "--metric", "none"]
    require_one_line(eval_cli([*argv, "--output", tmp + "/o", "--no-progress"]), "CSV")


def killed_export_leftover_is_cleaned(world: World, tmp: str) -> None:
    """What a killed export leaves (its marked staging folder, a file cut short in it) does not
    stay beside the next export's file."""
    from erase.artifact import partial_path, write_marker

    output = os.path.join(tmp, "x.safetensors")
    staging = partial_path(output)
    os.makedirs(staging)
    write_marker(staging, "erase-export")
    with open(os.path.join(staging, "x.safetensors"), "wb") as file:
        file.write(b"\x10\x00\x00")  # cut short
    require_ok(export_cli([world.artifact(0), "--format", "unet", "--output", output]))
    if sorted(os.listdir(tmp)) != ["x.safetensors"]:
        raise Defect(f"left behind: {sorted(os.listdir(tmp))}")


def overwrite_through_a_symlink_is_refused(world: World, tmp: str) -> None:
    """--overwrite of an output that is a symbolic link is refused: the link stays a link."""
    target = os.path.join(tmp, "real")
    shutil.copytree(world.artifact(0), target)
    link = os.path.join(tmp, "link")
    os.symlink(target, link)
    require_one_line(erase_cli([*erase_args(world.model), "--output", link, "--overwrite"]), "link")
    if not os.path.islink(link):
        raise Defect("the link was replaced by a folder")


# -- kills inside a checkpoint save (these held before) ---------------------------------------

KILL_POINTS = ("save_state", "copyfile", "write_json_atomic", "sync_tree", "replace")


def kill_inside_checkpoint(point: str, occurrence: int):
    """SIGKILL at the `occurrence`-th call of `point` (a step of a checkpoint save; os.replace
    and shutil.copyfile are counted wherever they are called, the marker's write included), then
    --resume: the weights equal an uninterrupted run's."""

    def case(world: World, tmp: str) -> None:
        reference = world.once(
            "reference",
            lambda path: (
                require_ok(erase_cli([*erase_args(world.model), "--steps", "3", "--output", path])),
                path,
            )[1],
        )
        output = os.path.join(tmp, "run")
        argv = [*erase_args(world.model), "--steps", "3", "--checkpoint-every", "1"]
        argv += ["--output", output]
        code = KILL_CODE.format(point=point, occurrence=occurrence, argv=argv)
        killed = child(code, env={"ERASE_HOME": world.path("home")})
        if killed.returncode != -signal.SIGKILL:
            raise Defect(f"the kill did not happen (exit {killed.returncode})")
        require_ok(erase_cli([*argv, "--resume"]))
        expected = load_file(os.path.join(reference, WEIGHTS))
        weights = load_file(os.path.join(output, WEIGHTS))
        differ = sum(int((weights[k] != expected[k]).sum()) for k in expected)
        if differ:
            raise Defect(f"{differ} weights differ from the uninterrupted run")

    case.__doc__ = f"kill -9 at call {occurrence} of {point} inside a checkpoint save, then resume"
    return case


KILL_CODE = """
import os, signal, sys
import erase.checkpoint as checkpoint
from accelerate import Accelerator
calls = [0]
def killing(original):
    def call(*args, **kwargs):
        calls[0] += 1
        if calls[0] == {occurrence}:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)
    return call
point = {point!r}
if point == "save_state":
    Accelerator.save_state = killing(Accelerator.save_state)
elif point == "copyfile":
    checkpoint.shutil.copyfile = killing(checkpoint.shutil.copyfile)
elif point == "replace":
    checkpoint.os.replace = killing(checkpoint.os.replace)
else:
    setattr(checkpoint, point, killing(getattr(checkpoint, point)))
from erase.cli.concept import main
sys.exit(main({argv!r}))
"""


# -- the cases --------------------------------------------------------------------------------

CASES = {
    case.__name__: case
    for case in (
        eval_model_exported_again_is_regenerated,
        attack_output_is_locked,
        export_base_of_other_weights_is_refused,
        export_base_spelled_otherwise_is_accepted,
        api_negative_steps_is_refused,
        users_lock_file_is_kept,
        outputs_inside_another_commands_output_are_refused,
        in_place_nan_loss_leaves_the_pipeline_as_it_was,
        in_place_ctrl_c_leaves_the_pipeline_as_it_was,
        export_overwrite_keeps_a_users_file,
        export_overwrite_replaces_its_own_file,
        retain_images_without_images_is_refused_before_work,
        api_wrong_types_are_refused_before_work,
        attack_bad_outputs_and_inputs_are_one_line,
        eval_resolution_not_a_multiple_of_8_is_one_line,
        export_bad_outputs_and_artifacts_are_one_line,
        export_full_disk_is_one_line,
        erase_full_disk_is_one_line,
        symlinked_partial_is_one_line,
        api_bad_calls_are_one_erase_error,
        same_model_spelled_two_ways_is_one_model,
        mask_of_another_base_is_refused,
        the_same_concept_twice_is_refused,
        empty_relearn_data_names_its_flag,
        unclosed_quote_in_a_prompt_csv_is_one_line,
        killed_export_leftover_is_cleaned,
        overwrite_through_a_symlink_is_refused,
    )
}
for kill_point in KILL_POINTS:
    for kill_occurrence in (1, 2):
        CASES[f"kill_at_{kill_point}_{kill_occurrence}"] = kill_inside_checkpoint(
            kill_point, kill_occurrence
        )
# The cases tests/test_torture.py runs: seconds each on the tiny model, no child process.
FAST = tuple(
    name
    for name in CASES
    if not name.startswith("kill_")
    and name not in ("export_full_disk_is_one_line", "erase_full_disk_is_one_line")
)


def run_case(name: str, world: World) -> dict:
    """One case in a fresh folder: {"ok": bool, "defect": ..., "seconds": ...}."""
    started = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix=name[:40] + "-", dir=world.folder)
    try:
        CASES[name](world, tmp)
        outcome = {"ok": True}
    except Defect as defect:
        outcome = {"ok": False, "defect": str(defect)}
    except Exception as error:  # noqa: BLE001 - the harness itself failing is a finding too
        lines = traceback.format_exception(error)
        outcome = {"ok": False, "defect": f"case crashed: {''.join(lines)[-600:]}"}
    outcome["seconds"] = round(time.perf_counter() - started, 1)
    return outcome


def main() -> None:
    """Run the cases and print each one's outcome, then the count of defective ones."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--case", default="", help="run only cases whose name contains this")
    parser.add_argument("--fast", action="store_true", help="only the test suite's subset")
    args = parser.parse_args()
    names = [n for n in (FAST if args.fast else CASES) if args.case in n]
    with tempfile.TemporaryDirectory(prefix="erase-torture-") as folder:
        os.environ["ERASE_HOME"] = os.path.join(folder, "home")
        world = World(folder)
        results = {name: run_case(name, world) for name in names}
    print(
        json.dumps(
            {
                "cases": len(results),
                "defective": sum(not r["ok"] for r in results.values()),
                "per_case": {
                    name: ("ok" if r["ok"] else "defective") for name, r in results.items()
                },
                "defects": {name: r["defect"] for name, r in results.items() if not r["ok"]},
                "seconds": {name: r["seconds"] for name, r in results.items()},
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
