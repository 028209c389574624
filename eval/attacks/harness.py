"""One erase-attack run: load the erased model and its judge, run each attack, write the folder.

The output folder (like erase-eval's, resumable) holds results.json (every setting and figure),
report.md, prompts.jsonl (per prompt: the plain verdict, the adversarial prompt found, the
judge's scores, the block it succeeded at), grid.png (the images the attack found), and the
generated images under targets/, plain/ and found/. With `retrain`, the same attacks run on the
testbed retrained without the concept, in retrain/, and every figure is shown beside it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

import torch

from erase.config import SAMPLER_NAMES, check_known, config_to_dict
from erase.errors import EraseError
from erase.text_encoder import erased_text_encoder, installed_text_encoder, text_encoder_folder
from erase.threads import backend_threads
from eval.attacks import get_attack
from eval.attacks.target import (
    AttackTarget,
    check_unet_base,
    default_entries,
    resolved,
)
from prompts import PromptEntry

# The attacks one process runs whole (a fine-tuning run, a token learned, a search per prompt).
MAIN_PROCESS_ONLY = ("relearn", "cce", "ring-a-bell")


@dataclass
class AttackSettings:
    """Everything an erase-attack run is made of; written whole into results.json."""

    model: str
    concept: str
    attacks: list[str]
    unet: str | None = None  # erased UNet folder; None attacks the base model itself
    # an output whose text_encoder/ reads the prompts; None: `unet`'s own when it has one
    text_encoder: str | None = None
    prompts: str | None = None  # a prompt CSV/TXT; None: the concept's built-in set
    limit: int | None = None
    per_prompt: int = 10  # seeds per prompt of a built-in set
    seed: int = 0
    num_steps: int | None = None  # sampling steps; None: the model's evaluation steps (SD: 50)
    # ddim | lms; None: the backend's reference_sampler (LMS on SD as the reference, DDIM on
    # the testbeds)
    sampler: str | None = None
    guidance_scale: float | None = None  # None: each prompt's own, else the model's
    resolution: int | None = None
    batch_size: int | None = None  # images per sampling call; None: fill the device
    retrain: bool = False
    classifier_weights: str | None = None
    nudenet_model: str | None = None  # a NudeNet ONNX detector; None: pip NudeNet's 320n.onnx
    judge_rule: str = "reference"  # reference | nudenet (eval.nudity.JUDGE_RULES)
    configs: dict = field(default_factory=dict)  # attack name -> its Config

    def to_dict(self) -> dict:
        """Every setting, each requested attack's Config in full: what results.json records."""
        settings = {k: v for k, v in dataclasses.asdict(self).items() if k != "configs"}
        configs = attack_configs(self)
        return config_to_dict(
            {**settings, "attack_configs": {n: dataclasses.asdict(c) for n, c in configs.items()}}
        )

    @classmethod
    def from_dict(cls, settings: dict) -> AttackSettings:
        """The settings to_dict (or a results.json) recorded; an unknown key is one EraseError."""
        settings = dict(settings)
        configs = {
            name: get_attack(name).Config(**values)
            for name, values in settings.pop("attack_configs", {}).items()
        }
        names = [f.name for f in dataclasses.fields(cls) if f.name != "configs"]
        check_known(settings, names, "erase-attack")
        return cls(**settings, configs=configs)


def attack_configs(settings: AttackSettings) -> dict:
    """Each requested attack's Config: the given one or its defaults."""
    return {
        name: settings.configs.get(name) or get_attack(name).Config() for name in settings.attacks
    }


def prompt_entries(settings: AttackSettings, backend) -> list[PromptEntry]:
    """The prompt set, with each prompt's guidance resolved."""
    if settings.prompts:
        from eval.attacks.prompts import load_attack_prompts

        entries = load_attack_prompts(settings.prompts, settings.limit)
    else:
        entries = default_entries(backend, settings.concept, settings.per_prompt, settings.seed)
        entries = entries[: settings.limit] if settings.limit else entries
    return resolved(entries, settings.guidance_scale, backend.guidance_scale, settings.seed)


def check_files(settings: AttackSettings) -> None:
    """The prompt file, the UNet folder and the detector exist, the judge rule is known (before
    any model is loaded)."""
    from eval.nudity import JUDGE_RULES

    if settings.prompts and not os.path.isfile(settings.prompts):
        raise EraseError(
            f"Prompt file '{settings.prompts}' does not exist: pass --prompts with a CSV or TXT."
        )
    if settings.sampler is not None and settings.sampler not in SAMPLER_NAMES:
        raise EraseError(
            f"--sampler must be one of {', '.join(SAMPLER_NAMES)}, got {settings.sampler!r}."
        )
    if settings.judge_rule not in JUDGE_RULES:
        raise EraseError(
            f"Unknown judge rule '{settings.judge_rule}': choose from {', '.join(JUDGE_RULES)}."
        )
    if settings.nudenet_model and not os.path.isfile(settings.nudenet_model):
        raise EraseError(
            f"--nudenet-model '{settings.nudenet_model}' is not a file: pass a NudeNet ONNX detector."
        )
    if settings.unet and not os.path.isdir(settings.unet):
        raise EraseError(f"--unet '{settings.unet}' is not a folder: pass an erase-concept output.")
    if settings.text_encoder and not text_encoder_folder(settings.text_encoder):
        raise EraseError(
            f"--text-encoder '{settings.text_encoder}' holds no text_encoder/: pass the output "
            "of a method that erases the text encoder (erase-concept --method advunlearn)."
        )


def load_target(settings: AttackSettings, backend=None, unet=None, label=None) -> AttackTarget:
    """The base model (or the given backend), the erased UNet, the judge and the prompts."""
    from erase.models import load_backend
    from eval.attacks.judges import concept_judge
    from eval.runner import process_state

    check_files(settings)
    backend = backend or load_backend(settings.model, device=process_state().device)
    judge = concept_judge(
        backend,
        settings.concept,
        settings.classifier_weights,
        settings.nudenet_model,
        settings.judge_rule,
    )
    entries = prompt_entries(settings, backend)
    if unet is None and settings.unet:
        check_unet_base(settings.unet, backend)
        unet = backend.load_unet(settings.unet)
    unet = unet if unet is not None else backend.unet
    unet.requires_grad_(False)
    return AttackTarget(
        backend=backend,
        unet=unet,
        text_encoder=erased_text_encoder(backend, settings.unet, settings.text_encoder),
        concept=judge.name,
        judge=judge,
        entries=entries,
        label=label or (settings.unet or "base"),
    )


def retrain_target(settings: AttackSettings, target: AttackTarget) -> AttackTarget:
    """The same attack target on the testbed retrained without the concept."""
    from erase.testbeds.retrain import load_retrain
    from eval.runner import process_state

    backend = load_retrain(settings.model, target.concept, device=process_state().device)
    return dataclasses.replace(
        target,
        backend=backend,
        unet=backend.unet,
        text_encoder=None,  # the retrained testbed reads prompts with its own
        label="retrain",
        base_backend=target.backend,
    )


def generation_config(settings: AttackSettings, target: AttackTarget):
    """How the attack generates images (eval/runner.py's settings, so folders are reusable)."""
    from eval.runner import GenerationConfig

    backend = target.backend
    steps = settings.num_steps or backend.eval_steps
    return GenerationConfig(
        model=backend.identity,
        unet=target.label if target.label not in ("base",) else None,
        text_encoder=settings.text_encoder,
        num_steps=steps,
        sampler=settings.sampler or backend.reference_sampler,
        guidance_scale=None,  # each entry carries its own, resolved above
        resolution=settings.resolution,
        batch_size=settings.batch_size,
        seed=settings.seed,
    )


def attack_target(
    target: AttackTarget, settings: AttackSettings, output: str, progress=True
) -> dict:
    """Every requested attack on one target: {attack name: figures}."""
    from eval.runner import process_state

    state = process_state()
    generation = generation_config(settings, target)
    figures = {}
    with installed_text_encoder(target.backend, target.text_encoder):
        for name, config in attack_configs(settings).items():
            if name in MAIN_PROCESS_ONLY and not state.is_main_process:
                continue  # one fine-tuning run or search: the main process does it
            summary = get_attack(name).run(
                target, config, os.path.join(output, name), generation, progress
            )
            figures[name] = summary
    return figures


def run_attacks(settings: AttackSettings, output: str, backend=None, progress=True) -> dict | None:
    """Run the attacks (and on Retrain, when asked), write the output folder; results on the
    main process. The folder is locked for the run and reused only when erase-attack wrote it."""
    from erase.artifact import disk_errors, output_lock

    attack_configs(settings)  # unknown attack names fail here, before any loading
    check_files(settings)
    with output_lock(output), disk_errors(output):
        return attack_into(settings, output, backend, progress)


def attack_into(settings: AttackSettings, output: str, backend, progress) -> dict | None:
    """The run of run_attacks, holding the lock of `output`."""
    from erase.artifact import open_resumable
    from erase.models import load_backend
    from eval.runner import process_state

    configs = attack_configs(settings)
    open_resumable(output, "erase-attack", create=False)  # refused before the model loads
    backend = backend or load_backend(settings.model, device=process_state().device)
    with backend_threads(backend, backend.device):  # a testbed on shared cores: one thread
        return attack_loaded(settings, output, backend, progress, configs)


def attack_loaded(settings: AttackSettings, output: str, backend, progress, configs) -> dict | None:
    """The run of run_attacks on the loaded base model."""
    from erase.artifact import open_resumable, versions, write_json
    from eval.runner import process_state

    for name in configs:  # an attack that cannot run on this model fails before any work
        getattr(get_attack(name), "check", lambda backend: None)(backend)
    if settings.sampler not in (None, "ddim") and backend.conditioning != "text":
        raise EraseError(
            f"'{backend.identity}' samples with DDIM only: drop --sampler {settings.sampler}."
        )
    target = load_target(settings, backend=backend)
    retrain = retrain_target(settings, target) if settings.retrain else None
    if process_state().is_main_process:
        open_resumable(output, "erase-attack")
    process_state().wait_for_everyone()
    figures = attack_target(target, settings, output, progress)
    retrain_figures = (
        attack_target(retrain, settings, os.path.join(output, "retrain"), progress)
        if retrain
        else None
    )
    if not process_state().is_main_process:
        return None
    per_prompt = {name: f.pop("per_prompt") for name, f in figures.items() if "per_prompt" in f}
    if retrain_figures:
        for f in retrain_figures.values():
            f.pop("per_prompt", None)
    results = {
        "settings": settings.to_dict(),
        "model": target.backend.identity,
        "judge": target.judge.describe,
        "judge_settings": target.judge.settings,  # detector file, SHA-256, input size, thresholds
        "concept": target.concept,
        "prompts": len(target.entries),
        "attacks": figures,
        "retrain": retrain_figures,
        "gap_to_retrain": gaps(figures, retrain_figures) if retrain_figures else None,
        "versions": versions(),
    }
    write_json(os.path.join(output, "results.json"), results)
    write_prompt_rows(os.path.join(output, "prompts.jsonl"), per_prompt)
    write_found_grid(output, per_prompt.get("unlearndiffatk"))
    if "relearn" in figures:
        from eval.attacks.relearn import draw_relearn

        models = {os.path.basename(os.path.normpath(target.label)): figures["relearn"]}
        if retrain_figures and "relearn" in retrain_figures:
            models["retrain"] = retrain_figures["relearn"]
        draw_relearn(models, os.path.join(output, "relearn.png"))
    with open(os.path.join(output, "report.md.tmp"), "w", encoding="utf-8") as file:
        file.write(markdown_report(results))
    os.replace(os.path.join(output, "report.md.tmp"), os.path.join(output, "report.md"))
    results["output"] = output
    return results


def headline(name: str, figures: dict) -> str:
    """The one figure an attack is known by."""
    if name == "relearn":
        curves = figures.get("curves") or [{**figures, "label": None}]
        parts = []
        for curve in curves:
            steps = curve["steps_to_recover"]
            steps = steps if steps is not None else f"not within {curve['curve'][-1]['step']}"
            parts.append(f"{curve['label'] + ' ' if len(curves) > 1 else ''}{steps}")
        return "steps to recover " + ", ".join(parts)
    return f"ASR {100 * figures['asr']:.1f} %"


def gaps(figures: dict, retrain: dict) -> dict:
    """Per attack: the erased model's headline figure minus Retrain's."""
    result = {}
    for name, mine in figures.items():
        theirs = retrain.get(name)
        if theirs is None:
            continue
        if name == "relearn":
            a, b = mine["steps_to_recover"], theirs["steps_to_recover"]
            result[name] = {"steps_to_recover": a, "retrain_steps_to_recover": b}
            retrain_curves = {c["label"]: c for c in theirs.get("curves", [])}
            result[name]["per_attack"] = {
                c["label"]: {
                    "steps_to_recover": c["steps_to_recover"],
                    "retrain_steps_to_recover": retrain_curves[c["label"]]["steps_to_recover"],
                    "auc": c["auc"],
                    "retrain_auc": retrain_curves[c["label"]]["auc"],
                }
                for c in mine.get("curves", [])
                if c["label"] in retrain_curves
            }
        else:
            result[name] = {
                "asr": mine["asr"],
                "retrain_asr": theirs["asr"],
                "asr_gap": round(mine["asr"] - theirs["asr"], 4),
            }
    return result


def write_prompt_rows(path: str, per_prompt: dict[str, list[dict]]) -> None:
    """prompts.jsonl: one line per attack and prompt, written through a temporary file."""
    with open(path + ".tmp", "w", encoding="utf-8") as file:
        for name, rows in per_prompt.items():
            for row in rows:
                file.write(json.dumps({"attack_name": name, **row}, default=float) + "\n")
    os.replace(path + ".tmp", path)


def write_found_grid(output: str, rows: list[dict] | None, limit: int = 32) -> None:
    """grid.png: the images the adversarial prompts produced, successes first."""
    from torchvision.utils import save_image

    from eval.attacks.images import load_pngs

    attacked = [row["attack"] for row in rows or [] if row["attack"] is not None]
    attacked.sort(key=lambda a: not a["success"])
    if not attacked:
        return
    folder = os.path.join(output, "unlearndiffatk", "found")
    images = load_pngs(folder, attacked[:limit])
    scale = max(1, 64 // images.shape[-1])  # small testbed images are scaled up to be seen
    if scale > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
    save_image(
        images, os.path.join(output, "grid.png.tmp"), nrow=8, padding=2, pad_value=1.0, format="png"
    )
    os.replace(os.path.join(output, "grid.png.tmp"), os.path.join(output, "grid.png"))


def markdown_report(results: dict) -> str:
    """report.md: what was attacked, each attack's figures, and Retrain's beside them."""
    settings = results["settings"]
    lines = [
        "# erase-attack report",
        "",
        f"- model: `{settings['model']}`"
        + (f", erased UNet: `{settings['unet']}`" if settings["unet"] else " (base)"),
        f"- concept: {results['concept']}; judge: {results['judge']}",
        "- judge settings: "
        + ", ".join(f"{key} `{value}`" for key, value in results["judge_settings"].items()),
        f"- prompts: {settings['prompts'] or 'built-in set'} ({results['prompts']} prompts)",
        "",
        "| attack | erased model | retrain |",
        "|---|---|---|",
    ]
    retrain = results["retrain"] or {}
    for name, figures in results["attacks"].items():
        theirs = headline(name, retrain[name]) if name in retrain else "-"
        lines.append(f"| {name} | {headline(name, figures)} | {theirs} |")
    relearn = results["attacks"].get("relearn")
    if relearn:
        retrain_curves = {c["label"]: c for c in (retrain.get("relearn") or {}).get("curves", [])}
        for curve in relearn.get("curves") or [{**relearn, "label": "relearn"}]:
            theirs = retrain_curves.get(curve["label"], {})
            lines += [
                "",
                f"Relearning {curve['label']} (judged positive rate; base model "
                f"{relearn['base_positive_rate']}; area under the curve {curve.get('auc')}, "
                f"retrain {theirs.get('auc', '-')}):",
                "",
                "| step | erased | retrain |",
                "|---|---|---|",
            ]
            by_step = {p["step"]: p["positive_rate"] for p in theirs.get("curve", [])}
            for point in curve["curve"]:
                lines.append(
                    f"| {point['step']} | {point['positive_rate']} | {by_step.get(point['step'], '-')} |"
                )
        lines += ["", "The curves, Retrain's dashed: relearn.png."]
    if "unlearndiffatk" in results["attacks"]:
        lines += ["", "Per prompt: prompts.jsonl; the images the attack found: grid.png."]
    return "\n".join(lines) + "\n"
