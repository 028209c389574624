"""The settings of one run, as plain dataclasses: what the CLI fills from its flags, the Python API
from keyword arguments, and metadata.json records whole (`to_dict`), so a run can be replayed
from its metadata (`from_dict`).

Field names are the flags' names with underscores (`--num-forget` is `num_forget`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from erase.errors import EraseError

Config = TypeVar("Config")


def nearest(name: str, known: list[str]) -> str:
    """' (did you mean X?)' for the known name closest to `name`, or ''."""
    match = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    return f" (did you mean {match[0]}?)" if match else ""


def check_known(settings: dict, known: list[str], what: str) -> None:
    """An EraseError naming the first unknown setting and the nearest known one."""
    unknown = [name for name in settings if name not in known]
    if unknown:
        raise EraseError(
            f"Unknown setting '{unknown[0]}' for {what}{nearest(unknown[0], known)}: settings "
            f"are the flags' names with underscores (see {what} --help)."
        )


def config_from_dict(config_class: type[Config], settings: dict, what: str) -> Config:
    """`config_class` from a dict of its fields; an unknown key is one EraseError."""
    names = [config_field.name for config_field in dataclasses.fields(config_class)]
    check_known(settings, names, what)
    return config_class(**settings)


def config_to_dict(config) -> dict[str, Any]:
    """Every field of a config dataclass (or a dict of settings), as JSON-ready values."""
    return json_ready(config if isinstance(config, dict) else dataclasses.asdict(config))


def fields_from(source, target_class: type[Config], **overrides) -> Config:
    """A `target_class` (a part's config: training, data, generation) made of the run config's
    same-named settings, then `overrides`; its other fields keep their defaults."""
    names = [f.name for f in dataclasses.fields(target_class) if hasattr(source, f.name)]
    return target_class(**{**{name: getattr(source, name) for name in names}, **overrides})


def json_ready(value):
    """Tuples as lists, recursively: what a JSON round trip gives back."""
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(item) for item in value]
    return value


def matches(value, hint) -> bool:
    """Whether `value` is of the annotated type `hint` (an int is a float; a bool is no number)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, option) for option in typing.get_args(hint))
    if hint is typing.Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (list, tuple):
        (item,) = typing.get_args(hint)[:1] or (typing.Any,)
        return isinstance(value, list | tuple) and all(matches(v, item) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def type_name(hint) -> str:
    """'an integer or None', 'a list of strings', ...: a type as an error message says it."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(type_name(option) for option in typing.get_args(hint))
    if typing.get_origin(hint) in (list, tuple):
        return "a list"
    names = {int: "an integer", float: "a number", bool: "True or False", str: "a string"}
    return names.get(hint, "None" if hint is type(None) else getattr(hint, "__name__", str(hint)))


def as_list(value, name: str) -> list:
    """A list setting given as a list or tuple; anything else is one EraseError (the API)."""
    if not isinstance(value, list | tuple):
        flag = "--" + name.replace("_", "-")
        raise EraseError(f"{flag} must be a text or a list of texts, got {value!r}.")
    return list(value)


def check_values(
    config, positive: set[str], choices: dict[str, tuple], extra: dict | None = None, skip=()
):
    """One EraseError for the first setting of the wrong type, a number that is not finite or,
    where `positive` names it, not above 0, or a value outside its `choices`. `extra` holds more
    settings with their types ({name: (value, hint)}, a method's own); `skip` names fields that
    are checked elsewhere (a nested config)."""
    hints = typing.get_type_hints(type(config))
    values = {
        f.name: (getattr(config, f.name), hints[f.name])
        for f in dataclasses.fields(config)
        if f.name not in skip
    }
    for name, (value, hint) in {**values, **(extra or {})}.items():
        flag = "--" + name.replace("_", "-")
        if not matches(value, hint):
            raise EraseError(f"{flag} must be {type_name(hint)}, got {value!r}.")
        for number in value if isinstance(value, list | tuple) else [value]:  # a list: each
            if isinstance(number, float) and not math.isfinite(number):
                raise EraseError(f"{flag} must be a finite number, got {number}.")
            if name in positive and number is not None and not number > 0:
                raise EraseError(f"{flag} must be greater than 0, got {number}.")
        if name in choices and value not in choices[name]:
            raise EraseError(
                f"{flag} must be one of {', '.join(map(str, choices[name]))}, got {value!r}."
            )


def setting_names(registry: dict[str, type]) -> list[str]:
    """Every field of the Configs of a registry's classes, each name once."""
    return list(
        dict.fromkeys(
            config_field.name
            for registered in registry.values()
            for config_field in dataclasses.fields(registered.Config)
        )
    )


def method_setting_names() -> list[str]:
    """Every registered method's settings (the `method_config` keys)."""
    from erase.methods import METHODS

    return setting_names(METHODS)


# The settings of an erasure that must be above 0 when given, and those with a fixed set of values
# (the CLI's --help lists the same choices).
# The samplers images are generated with (erase.models.sd.SAMPLERS' names, here so that a CLI
# checks them without importing diffusers): DDIM, erase's default, and LMS, the reference
# sampler of the UnlearnDiffAtk and SalUn Stable Diffusion evaluations.
SAMPLER_NAMES = ("ddim", "lms")

ERASURE_POSITIVE = {
    "num_forget", "num_retain", "resolution", "gen_steps", "guidance_scale", "gen_batch_size",
    "lr", "steps", "epochs", "batch_size", "micro_batch_size", "gradient_accumulation_steps",
    "max_grad_norm", "eval_per_class", "eval_steps",
}  # fmt: skip
ERASURE_CHOICES = {
    "remap": ("next", "random"),
    "gen_precision": ("auto", "fp32", "fp16", "bf16"),
    "mixed_precision": ("no", "fp16", "bf16"),
    "optimizer": ("adam", "adam8bit"),
}


def harden_setting_names() -> list[str]:
    """Every registered hardening technique's settings (the `harden_config` keys)."""
    from erase.harden import TECHNIQUES

    return setting_names(TECHNIQUES)


@dataclass
class ErasureConfig:
    """One erasure: what erase-concept's flags say. None means the reference default for the
    backend and concept (resolved by the method's `defaults`, see docs/methods.md)."""

    # model and concept
    concept: list[str] = field(default_factory=list)
    model: str = "sd-v1-4"
    method: str = "salun"
    remap: str = "next"  # class models: the next class, (c + 1) % K, as both references do
    forget_prompt: list[str] = field(default_factory=list)
    retain_prompt: list[str] = field(default_factory=list)
    data_dir: str | None = None
    # the method's own settings by name (e.g. {"alpha": 0.1}); absent ones take its defaults
    method_config: dict[str, Any] = field(default_factory=dict)
    # --harden: a technique against relearning (erase/harden/), None for none; its settings by
    # name (e.g. {"meta_steps": 2}) as method_config holds the method's
    harden: str | None = None
    harden_config: dict[str, Any] = field(default_factory=dict)
    # output
    output: str | None = None
    overwrite: bool = False
    push_to_hub: str | None = None
    # forget and retain data
    num_forget: int | None = None
    num_retain: int | None = None
    resolution: int | None = None
    gen_steps: int = 50
    guidance_scale: float = 7.5
    gen_batch_size: int | None = None
    gen_precision: str = "auto"
    cache_dir: str | None = None
    concept_images: str | None = None
    retain_images: str | None = None
    # training (None: the method's reference setting)
    lr: float | None = None
    steps: int | None = None
    epochs: float | None = None
    batch_size: int | None = None
    micro_batch_size: int | None = None
    no_gradient_checkpointing: bool = False
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    # adam: the method's Adam/AdamW with fp32 moments; adam8bit: its moments quantized to 8 bits
    optimizer: str = "adam"
    max_grad_norm: float | None = None
    seed: int = 0
    checkpoint_every: int = 0
    resume: bool = False
    mask: str | None = None
    # evaluation
    no_eval: bool = False
    no_grid: bool = False
    eval_per_class: int = 100
    eval_steps: int | None = None

    def __post_init__(self):
        # one concept or prompt may be given as a string
        self.concept, self.forget_prompt, self.retain_prompt = (
            [value] if isinstance(value, str) else as_list(value, name)
            for name, value in (
                ("concept", self.concept),
                ("forget_prompt", self.forget_prompt),
                ("retain_prompt", self.retain_prompt),
            )
        )
        self.method_config = dict(self.method_config)
        check_known(self.method_config, method_setting_names(), "erase-concept")
        self.harden_config = dict(self.harden_config)
        check_known(self.harden_config, harden_setting_names(), "erase-concept")

    @classmethod
    def from_dict(cls, settings: dict) -> ErasureConfig:
        """A config from its fields; a method setting may also be given at the top level
        (`alpha=0.1`, as its flag `--alpha`), where None means its default; so may a hardening
        setting (`meta_steps=2`)."""
        settings = dict(settings)
        grouped = {}
        for key, names in (
            ("method_config", method_setting_names()),
            ("harden_config", harden_setting_names()),
        ):
            grouped[key] = dict(settings.pop(key, None) or {})
            for name in [name for name in settings if name in names]:
                value = settings.pop(name)
                if value is not None:
                    grouped[key][name] = value
        return config_from_dict(cls, {**settings, **grouped}, "erase-concept")

    def to_dict(self) -> dict[str, Any]:
        """Every setting, as metadata.json records it."""
        return config_to_dict(self)

    def check(self) -> None:
        """One EraseError for the first setting of the wrong type or out of range, the method's
        and the hardening technique's own settings included (what the CLI's parser checks, for
        the API too)."""
        from erase.harden import TECHNIQUES
        from erase.methods import METHODS

        hints = {}
        for registered in (*METHODS.values(), *TECHNIQUES.values()):
            for name, hint in typing.get_type_hints(registered.Config).items():
                hints.setdefault(name, hint)
        own = {**self.method_config, **self.harden_config}
        extra = {name: (value, hints[name]) for name, value in own.items()}
        check_values(self, ERASURE_POSITIVE, ERASURE_CHOICES, extra)
        if not self.concept:
            raise EraseError("Give the concept to erase (--concept NAME, concept= in the API).")
