"""The Python API: what erase-concept, erase-eval, erase-attack, erase-bench and erase-export do,
callable from a notebook on a model name, a folder or a StableDiffusionPipeline already in memory.

    import erase
    result = erase.erase_concept(pipe, "nudity", steps=50, num_forget=64)
    image = pipe("a photo of a person").images[0]      # pipe's UNet is now the erased one
    result.metadata["changed_weights"]

The command-line tools, erase-bench (erase/bench.py, whose `benchmark` is erase.benchmark)
and the scripts under scripts/ call these functions.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass, field

import torch

from erase.config import ErasureConfig
from erase.erasure import check_arguments, run_erasure
from erase.errors import EraseError
from erase.methods import get_method


@dataclass
class ErasedModel:
    """The result of an erasure: the erased UNet, the run's metadata, and where it was written."""

    unet: torch.nn.Module
    metadata: dict
    output: str | None = None  # the artifact folder, when one was asked for
    backend: object = field(repr=False, default=None)
    pushed: str | None = None  # the hub URL, with push_to_hub
    # the erased text encoder (AdvUnlearn's, the pipeline's own erased in place); None when the
    # method leaves the text encoder as it was
    text_encoder: torch.nn.Module | None = None


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


def loaded(model):
    """(the model's name for a config, its loaded backend): a name or path is loaded by the run
    itself (None), a model object once here."""
    if model is None or isinstance(model, str | os.PathLike):
        return (None if model is None else str(model)), None
    backend = load_model(model)
    return backend.identity, backend


def erasure_config(concept: str | list[str], method: str = "salun", **settings) -> ErasureConfig:
    """The ErasureConfig of `concept` (one or several), `method` and erase-concept's settings by
    name (`steps=50`, `num_forget=64`, `alpha=0.1`); an unknown name is an EraseError."""
    get_method(method)  # an unknown method is one line naming the known ones
    return ErasureConfig.from_dict({**settings, "concept": concept, "method": method})


def check_erasure(concept: str | list[str], method: str = "salun", **settings) -> None:
    """Refuse, before any model is loaded, what erase_concept would refuse from its arguments
    alone (one EraseError); erase-bench checks every method's settings this way first."""
    check_arguments(erasure_config(concept, method, **settings))


def run(config: ErasureConfig, model=None, on_phase=None) -> ErasedModel:
    """Run the erasure `config` describes, as erase-concept does: the artifact in
    `config.output` (default outputs/<model>-<concept>-<method>), grid.png or the class-removal
    evaluation, and the upload with `push_to_hub`. `model`, when given, is a loaded model or
    pipeline whose UNet (AdvUnlearn: text encoder) is erased in place (no second copy on the
    device): the run completes, or the model is left as it was (a CPU copy restores it on any
    error, Ctrl-C included)."""
    from eval.before_after import before_after_evaluations

    name, backend = loaded(model)
    if name is not None:
        config = dataclasses.replace(config, model=name)
    if config.push_to_hub:
        from erase.card import check_can_push

        check_can_push(config.push_to_hub)  # before the work, not after it
    result = run_erasure(
        config, backend=backend, on_phase=on_phase, evaluations=before_after_evaluations(config)
    )
    erased = ErasedModel(result.backend.unet, result.metadata, result.output, result.backend)
    if "text_encoder" in result.metadata.get("erased_components", []):
        erased.text_encoder = result.backend.text_encoders()[0][1]
    if config.push_to_hub:
        from erase.card import push_folder

        erased.pushed = push_folder(result.output, config.push_to_hub)
    return erased


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
    model object's UNet is erased in place (no second copy on the device; left as it was when
    the run fails, Ctrl-C included); the artifact is written to `output`
    when given. `on_phase(name)` is called as each phase (load, data, mask, train, ...) ends.
    """
    config = erasure_config(concept, method, **settings)
    if config.push_to_hub and output is None:
        raise EraseError("push_to_hub needs an output folder: pass output=PATH.")
    with tempfile.TemporaryDirectory(prefix="erase-") as scratch:
        config = dataclasses.replace(config, output=output or os.path.join(scratch, "artifact"))
        erased = run(config, model if model is not None else config.model, on_phase)
    erased.output = output
    return erased


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
    `unet` an erase-concept output; `metrics` e.g. "nudity", ["fid", "clip"] or "none";
    `settings` are erase-eval's flags by name (`limit=10`, `num_steps=25`).
    """
    from eval.evaluation import EvalConfig, parse_metrics, run_evaluation

    if metrics is not None:
        if not isinstance(metrics, str | list | tuple) or not all(
            isinstance(name, str) for name in metrics
        ):
            raise EraseError(f"metrics must be a name or a list of names, got {metrics!r}.")
        names = metrics if isinstance(metrics, str) else ",".join(metrics)
        try:
            settings["metric"] = parse_metrics(names)
        except EraseError as error:
            raise EraseError(f"metrics: {error}.") from None
    name, backend = loaded(model)
    config = EvalConfig.from_dict(
        {**settings, "prompts": prompts, "model": name, "unet": unet, "output": output}
    )
    return run_evaluation(config, backend=backend)


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
    from eval.attacks.config import attack_settings, default_output, parse_attacks
    from eval.attacks.harness import run_attacks

    progress = not settings.pop("no_progress", False)
    try:
        parse_attacks(attacks)
    except EraseError as error:
        raise EraseError(f"attacks: {error}.") from None
    name, backend = loaded(model)
    run_settings = attack_settings(concept, attacks, model=name, unet=unet, **settings)
    return run_attacks(
        run_settings, output or default_output(run_settings), backend=backend, progress=progress
    )


def export_model(
    artifact: str,
    format: str,
    output: str,
    half: bool = False,
    base: str | None = None,
    overwrite: bool = False,
    text_encoder: str | None = None,
) -> str:
    """Write an erase-concept output as single-file, unet or pipeline (erase-export); the path.
    `text_encoder`: another output whose erased text encoder goes in (AdvUnlearn's)."""
    from erase.export import export_artifact

    written = export_artifact(
        artifact,
        format,
        output,
        half=half,
        base=base,
        overwrite=overwrite,
        text_encoder=text_encoder,
    )
    return written["output"]
