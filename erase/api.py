"""The Python API: what erase-concept, erase-eval, erase-attack, erase-bench and erase-export do,
callable from a notebook on a model name, a folder or a StableDiffusionPipeline already in memory.

    import erase
    result = erase.erase_concept(pipe, "nudity", steps=50, num_forget=64)
    image = pipe("a photo of a person").images[0]      # pipe's UNet is now the erased one
    result.metadata["changed_weights"]

The command-line tools, erase-bench and the scripts under scripts/ call these functions.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import dataclass, field

import torch

from erase.errors import EraseError


@dataclass
class ErasedModel:
    """The result of an erasure: the erased UNet, the run's metadata, and where it was written."""

    unet: torch.nn.Module
    metadata: dict
    output: str | None = None  # the artifact folder, when one was asked for
    backend: object = field(repr=False, default=None)


def namespace(parser: argparse.ArgumentParser, required: list[str], settings: dict, what: str):
    """Parse the `required` flags, then set every keyword setting by its flag's name."""
    args = parser.parse_args(required)
    known = {action.dest for action in parser._actions} - {"help"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise EraseError(
            f"Unknown setting(s) {', '.join(unknown)} for {what}: use the names of its flags with "
            f"underscores ({', '.join(sorted(known)[:6])}, ...; see {what} --help)."
        )
    for name, value in settings.items():
        setattr(args, name, value)
    return args


def load_model(model, device: torch.device | None = None, data_dir: str | None = None):
    """A model loaded once, to pass to several calls: from a name, a path, a
    StableDiffusionPipeline or a StableDiffusionXLPipeline (on `device`, default the first GPU,
    else the CPU); a model this function returned is returned as it is."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from erase.models import load_backend
    from erase.models.sd import StableDiffusionBackend
    from erase.models.sdxl import StableDiffusionXLBackend

    if all(hasattr(model, name) for name in ("identity", "conditioning", "unet", "sample")):
        return model  # a backend (erase/models/base.py's interface), loaded before
    if isinstance(model, StableDiffusionXLPipeline):
        return StableDiffusionXLBackend.from_pipeline(model, device=device)
    if isinstance(model, StableDiffusionPipeline):
        return StableDiffusionBackend.from_pipeline(model, device=device)
    if isinstance(model, str | os.PathLike):
        return load_backend(str(model), data_dir=data_dir, device=device)
    raise EraseError(
        "model must be a name, a path, a StableDiffusion(XL)Pipeline or what erase.load_model "
        f"returned, not {type(model).__name__}."
    )


def model_backend(model, args: argparse.Namespace):
    """Set `args.model` from a name, a path or a model object; the loaded model of an object
    (None for a name or path, which the run loads itself)."""
    if isinstance(model, str | os.PathLike):
        args.model = str(model)
        return None
    backend = load_model(model)
    args.model = backend.identity
    return backend


def erasure_arguments(concept: str | list[str], method: str, settings: dict) -> argparse.Namespace:
    """erase-concept's arguments for `concept` (one or several), `method` and the settings."""
    from erase.cli import build_parser
    from erase.methods import METHODS

    if method not in METHODS:
        raise EraseError(f"Unknown method '{method}': choose from {', '.join(sorted(METHODS))}.")
    concepts = [concept] if isinstance(concept, str) else list(concept)
    required = ["--method", method] + [flag for name in concepts for flag in ("--concept", name)]
    return namespace(build_parser(), required, settings, "erase-concept")


def check_erasure(concept: str | list[str], method: str = "salun", **settings) -> None:
    """Refuse, before any model is loaded, what erase_concept would refuse from its arguments
    alone (one EraseError); erase-bench checks every method's settings this way first."""
    from erase.erasure import check_arguments

    check_arguments(erasure_arguments(concept, method, settings))


def erase_concept(
    model,
    concept: str | list[str],
    method: str = "salun",
    output: str | None = None,
    on_phase=None,
    **settings,
) -> ErasedModel:
    """Erase `concept` (or several) from `model`: a name, a path, a loaded
    StableDiffusionPipeline or what erase.load_model returned.

    `settings` are erase-concept's flags by name (`steps=50`, `num_forget=64`, `lr=1e-5`). A
    model object's UNet is erased in place (no second copy); the artifact is written to `output`
    when given. `on_phase(name)` is called as each phase (load, data, mask, train, ...) ends.
    """
    from erase.erasure import run_erasure

    args = erasure_arguments(concept, method, settings)
    backend = model_backend(model, args)
    if args.push_to_hub and output is None:
        raise EraseError("push_to_hub needs an output folder: pass output=PATH.")
    if args.push_to_hub:
        from erase.card import check_can_push

        check_can_push(args.push_to_hub)
    with tempfile.TemporaryDirectory(prefix="erase-") as scratch:
        args.output = output or os.path.join(scratch, "artifact")
        result = run_erasure(args, backend=backend, on_phase=on_phase)
    if args.push_to_hub:
        from erase.card import push_folder

        push_folder(output, args.push_to_hub)
    return ErasedModel(result.backend.unet, result.metadata, output, result.backend)


def evaluate(
    model,
    prompts: str,
    unet: str | None = None,
    metrics: str | list[str] | None = None,
    output: str | None = None,
    **settings,
) -> dict:
    """Generate images for a prompt set and score them, as erase-eval does; the results dict.

    `model` is a name, a path or a StableDiffusionPipeline (then its current UNet is scored);
    `unet` an erase-concept output; `metrics` e.g. "nudity", ["fid", "clip"] or "none".
    """
    from eval.cli import build_parser, metric_list, run_evaluation

    args = namespace(build_parser(), ["--prompts", prompts], settings, "erase-eval")
    args.unet, args.output = unet, output
    if metrics is not None:
        names = metrics if isinstance(metrics, str) else ",".join(metrics)
        try:
            args.metric = [metric_list(names)]
        except argparse.ArgumentTypeError as error:
            raise EraseError(f"metrics: {error}.") from None
    backend = model_backend(model, args)
    return run_evaluation(args, backend=backend)


def attack(
    model,
    concept: str,
    attacks: str | list[str],
    unet: str | None = None,
    output: str | None = None,
    **settings,
) -> dict:
    """Attack an erased model and judge whether the concept comes back, as erase-attack does;
    the results dict (per attack its figures, and Retrain's with `retrain=True`).

    `model` is a name, a path or a model object (then its current UNet is attacked, e.g. a
    pipeline erase_concept erased in place); `unet` an erase-concept output; `attacks` e.g.
    "unlearndiffatk" or ["unlearndiffatk", "relearn"]; `settings` are erase-attack's flags by
    name (`blocks=10`, `per_prompt=5`, `relearn_steps=[0, 10, 50]`).
    """
    from eval.attacks.cli import attack_list, build_parser, default_output, settings_from_args
    from eval.attacks.harness import run_attacks

    names = attacks if isinstance(attacks, str) else ",".join(attacks)
    try:
        attack_names = attack_list(names)
    except argparse.ArgumentTypeError as error:
        raise EraseError(f"attacks: {error}.") from None
    args = namespace(
        build_parser(),
        ["--concept", concept, "--attack", attack_names[0]],
        settings,
        "erase-attack",
    )
    args.attack, args.unet = [attack_names], unet
    backend = model_backend(model, args)
    return run_attacks(
        settings_from_args(args),
        output or default_output(args),
        backend=backend,
        progress=not args.no_progress,
    )


def benchmark(
    model,
    concept: str | list[str],
    output: str,
    methods: str | list[str] = ("salun", "esd-u", "esd-x", "fmn"),
    method_settings: dict[str, dict] | None = None,
    **settings,
) -> dict:
    """Erase `concept` with each method from the same base model and score the base and each
    with the same prompts, seeds and metrics, as erase-bench does; the table of bench.json.

    `settings` are erase-bench's flags by name: its own (`bench_per_prompt=10`,
    `attacks="relearn"`) and erase-concept's, which every method gets; `method_settings` gives
    one method its own (`{"esd-x": {"lr": 1e-4}}`), before any `method_flags`. A model object is
    erased by each method in turn and holds its base weights again at the end.
    """
    from erase.bench import build_parser, run_bench

    concepts = [concept] if isinstance(concept, str) else list(concept)
    required = ["--output", output] + [flag for name in concepts for flag in ("--concept", name)]
    args = namespace(build_parser(), required, settings, "erase-bench")
    args.methods = methods if isinstance(methods, str) else ",".join(methods)
    args.method_settings = dict(method_settings or {})
    backend = model_backend(model, args)
    return run_bench(args, backend=backend)


def export_model(
    artifact: str,
    format: str,
    output: str,
    half: bool = False,
    base: str | None = None,
    overwrite: bool = False,
) -> str:
    """Write an erase-concept output as single-file, unet or pipeline (erase-export); the path."""
    from erase.export import export_artifact

    return export_artifact(artifact, format, output, half=half, base=base, overwrite=overwrite)[
        "output"
    ]
