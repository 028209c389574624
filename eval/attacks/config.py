"""The settings of one erase-attack run from its flags' names (`blocks=10`, `relearn_lr=1e-4`):
what the CLI parses and the Python API passes as keyword arguments, made into the harness's
AttackSettings. Light on imports, so that --help and a mistake are reported at once."""

from __future__ import annotations

import os

from erase.config import check_known
from erase.errors import EraseError

# The registry's names (eval.attacks.ATTACKS), unlearndiffatk's relaxations
# (eval.attacks.unlearndiffatk.RELAXATIONS) and the nudity judge's rules (eval.nudity.JUDGE_RULES),
# repeated here so --help needs no heavy import.
ATTACK_NAMES = ("unlearndiffatk", "relearn", "prompts", "cce", "ring-a-bell")
RELAXATIONS = ("sample", "mixture")
JUDGE_RULES = ("reference", "nudenet")

# The run's own settings (AttackSettings' fields) and each attack's flags, by flag name: the
# attack and the field of its Config the flag sets (--seed sets every attack's seed as well).
RUN_SETTINGS = (
    "model",
    "unet",
    "text_encoder",
    "concept",
    "prompts",
    "limit",
    "per_prompt",
    "seed",
    "num_steps",
    "sampler",
    "guidance_scale",
    "resolution",
    "batch_size",
    "retrain",
    "classifier_weights",
    "nudenet_model",
    "judge_rule",
)
ATTACK_FLAGS = {
    "k": ("unlearndiffatk", "k"),
    "iterations": ("unlearndiffatk", "iterations"),
    "blocks": ("unlearndiffatk", "blocks"),
    "attack_lr": ("unlearndiffatk", "lr"),
    "attack_weight_decay": ("unlearndiffatk", "weight_decay"),
    "relaxation": ("unlearndiffatk", "relaxation"),
    "relearn_data": ("relearn", "data"),
    "relearn_tuning": ("relearn", "tuning"),
    "relearn_lora_rank": ("relearn", "lora_rank"),
    "relearn_steps": ("relearn", "checkpoints"),
    "relearn_lr": ("relearn", "lr"),
    "relearn_batch_size": ("relearn", "batch_size"),
    "relearn_images": ("relearn", "num_images"),
    "max_prompt_tokens": ("unlearndiffatk", "max_prompt_tokens"),
    "target_steps": ("unlearndiffatk", "target_steps"),
    "cce_images": ("cce", "images"),
    "cce_num_images": ("cce", "num_images"),
    "cce_steps": ("cce", "steps"),
    "cce_lr": ("cce", "lr"),
    "rab_eta": ("ring-a-bell", "eta"),
    "rab_length": ("ring-a-bell", "prompt_length"),
    "rab_population": ("ring-a-bell", "population"),
    "rab_generations": ("ring-a-bell", "generations"),
    "rab_pairs": ("ring-a-bell", "pairs"),
}
SEEDED = ("unlearndiffatk", "relearn", "cce", "ring-a-bell")  # attacks --seed seeds
CLI_ONLY = ("attack", "output", "no_progress")


def parse_attacks(text: str | list[str]) -> list[str]:
    """One attack, a comma list, or a list of them, in order without repeats."""
    if not isinstance(text, str | list | tuple) or not all(isinstance(t, str) for t in text):
        raise EraseError(f"attacks must be a name or a list of names, got {text!r}")
    parts = text.split(",") if isinstance(text, str) else [p for t in text for p in t.split(",")]
    names = list(dict.fromkeys(name.strip() for name in parts if name.strip()))
    unknown = [name for name in names if name not in ATTACK_NAMES]
    if unknown or not names:
        raise EraseError(
            f"unknown attack '{(unknown or [text])[0]}': choose from {', '.join(ATTACK_NAMES)}"
        )
    return names


def attack_settings(concept: str, attacks: str | list[str], **flags):
    """The AttackSettings of `attacks` on `concept` from erase-attack's flags by name; a flag
    left out (or None) takes the attack's reference default (its Config's)."""
    from eval.attacks import get_attack
    from eval.attacks.harness import AttackSettings

    check_known(flags, [*RUN_SETTINGS, *ATTACK_FLAGS], "erase-attack")
    names = parse_attacks(attacks)
    configs = {}
    for name in names:
        values = {"seed": flags.get("seed", 0)} if name in SEEDED else {}
        for flag, (attack, field_name) in ATTACK_FLAGS.items():
            if attack == name and flags.get(flag) is not None:
                values[field_name] = flags[flag]
        configs[name] = get_attack(name).Config(**values)
    run = {name: flags[name] for name in RUN_SETTINGS if name in flags and name != "concept"}
    settings = AttackSettings(concept=concept, attacks=names, configs=configs, **run)
    check_attack_settings(settings)
    return settings


# Settings that must be above 0 when given (the CLI's `positive` flags), by flag name.
POSITIVE = {
    "limit", "per_prompt", "num_steps", "guidance_scale", "resolution", "batch_size", "k",
    "iterations", "blocks", "attack_lr", "relearn_lr", "relearn_batch_size", "relearn_images",
}  # fmt: skip


def check_attack_settings(settings) -> None:
    """One EraseError for a setting of the wrong type, a number that is not finite or not above
    0: the same checks for the CLI and the Python API, before any model is loaded."""
    import typing

    from erase.config import check_values

    if not isinstance(settings.concept, str) or not settings.concept.strip():
        raise EraseError(f"--concept must be a concept's name, got {settings.concept!r}.")
    extra = {}
    for flag, (attack, field_name) in ATTACK_FLAGS.items():
        config = settings.configs.get(attack)
        if config is not None:
            hint = typing.get_type_hints(type(config))[field_name]
            extra[flag] = (getattr(config, field_name), hint)
    check_values(settings, POSITIVE, {"judge_rule": JUDGE_RULES}, extra, skip=("configs",))
    checkpoints = extra.get("relearn_steps", ([0], None))[0]
    if any(step < 0 for step in checkpoints) or not checkpoints:
        raise EraseError(f"--relearn-steps must be step counts >= 0, got {checkpoints}.")


def default_output(settings) -> str:
    """outputs/attack-<unet or model>-<concept>."""
    from erase.concepts import slug

    model = os.path.basename(os.path.normpath(settings.unet or settings.model))
    return os.path.join("outputs", f"attack-{slug(model)}-{slug(settings.concept)}")
