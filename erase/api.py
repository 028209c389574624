"""The Python API: what erase-concept, erase-eval and erase-export do, callable from a notebook
on a model name, a folder or a StableDiffusionPipeline already in memory.

    import erase
    result = erase.erase_concept(pipe, "nudity", steps=50, num_forget=64)
    image = pipe("a photo of a person").images[0]      # pipe's UNet is now the erased one
    result.metadata["changed_weights"]
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


def as_backend(model, device: torch.device | None = None):
    """A backend for a model name or path, or for a StableDiffusionPipeline object (on `device`,
    default the first GPU, else the CPU)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from erase.models import load_backend
    from erase.models.sd import StableDiffusionBackend
    from erase.models.sdxl import StableDiffusionXLBackend

    if isinstance(model, StableDiffusionXLPipeline):
        return StableDiffusionXLBackend.from_pipeline(model, device=device)
    if isinstance(model, StableDiffusionPipeline):
        return StableDiffusionBackend.from_pipeline(model, device=device)
    if isinstance(model, str | os.PathLike):
        return load_backend(str(model), device=device)
    raise EraseError(
        f"model must be a name, a path or a StableDiffusionPipeline, not {type(model).__name__}."
    )


def model_backend(model, args: argparse.Namespace):
    """Set `args.model` from a name, a path or a pipeline object; the backend of an object (None
    for a name or path, which the run loads itself)."""
    if isinstance(model, str | os.PathLike):
        args.model = str(model)
        return None
    backend = as_backend(model)
    args.model = backend.identity
    return backend


def erase_concept(
    model, concept: str, method: str = "salun", output: str | None = None, **settings
) -> ErasedModel:
    """Erase `concept` from `model` (a name, a path or a loaded StableDiffusionPipeline).

    `settings` are erase-concept's flags by name (`steps=50`, `num_forget=64`, `lr=1e-5`). A
    pipeline object's UNet is erased in place (no second copy); the artifact is written to
    `output` when given.
    """
    from erase.cli import build_parser
    from erase.erasure import run_erasure
    from erase.methods import METHODS

    if method not in METHODS:
        raise EraseError(f"Unknown method '{method}': choose from {', '.join(sorted(METHODS))}.")
    args = namespace(
        build_parser(), ["--concept", concept, "--method", method], settings, "erase-concept"
    )
    backend = model_backend(model, args)
    if args.push_to_hub and output is None:
        raise EraseError("push_to_hub needs an output folder: pass output=PATH.")
    if args.push_to_hub:
        from erase.card import check_can_push

        check_can_push(args.push_to_hub)
    with tempfile.TemporaryDirectory(prefix="erase-") as scratch:
        args.output = output or os.path.join(scratch, "artifact")
        result = run_erasure(args, backend=backend)
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
