"""Hardening techniques by name: what `--harden TECHNIQUE` adds to an erasure so that a brief
fine-tune does not bring the concept back. A technique changes only the loss of some steps (and,
for `perturb`, the weights at one step boundary; for `ieu`, at every step's start); it trains
the method's own trainable set, and within SalUn's mask only the masked entries, so everything
outside stays bit-identical.

Adding a technique is one new module with a class decorated by `@register("name")` (a `Config`
dataclass whose field names become erase-concept flags, `check`, `step_loss`, and `close`, which
the trainer calls once training ends or fails) and one import line at the bottom of this file.
Every default and its source: docs/methods.md#harden.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from erase.errors import EraseError
from erase.saliency import PackedMask, unpack_mask

TECHNIQUES: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
    """Class decorator adding a technique to the registry under `name`."""

    def add(technique_class: type) -> type:
        technique_class.name = name
        TECHNIQUES[name] = technique_class
        return technique_class

    return add


def get_technique(name: str) -> type:
    """The technique class registered as `name`, or a one-line error naming the known ones."""
    if name not in TECHNIQUES:
        close = difflib.get_close_matches(name, list(TECHNIQUES), n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise EraseError(
            f"Unknown --harden technique '{name}'{hint}: choose one of "
            f"{', '.join(sorted(TECHNIQUES))}."
        )
    return TECHNIQUES[name]


def technique_config(technique_class: type, settings: dict):
    """The technique's Config from the run's `harden_config` (absent or None: its default)."""
    names = {config_field.name for config_field in dataclasses.fields(technique_class.Config)}
    foreign = [name for name in settings if name not in names]
    if foreign:
        flag = "--" + foreign[0].replace("_", "-")
        raise EraseError(
            f"{flag} is not a setting of --harden {technique_class.name}: drop it, or choose the "
            "technique it belongs to (see erase-concept --help, hardening)."
        )
    return technique_class.Config(
        **{name: value for name, value in settings.items() if value is not None}
    )


def check_harden(technique: str | None, settings: dict, method_class: type) -> None:
    """Refuse, before any work, an unknown technique, a bad setting, settings without a
    technique, or a method without a separate forget objective (one EraseError)."""
    if technique is None:
        if settings:
            flag = "--" + next(iter(settings)).replace("_", "-")
            raise EraseError(f"{flag} is a hardening setting: add --harden TECHNIQUE or drop it.")
        return
    technique_class = get_technique(technique)
    if method_class.forget_loss is None:
        raise EraseError(
            f"--harden {technique} needs the method's forget objective apart from its other "
            f"terms, which {method_class.name} does not declare (forget_loss): use salun, esd-* "
            "or fmn, or drop --harden."
        )
    technique_class.check(technique_config(technique_class, settings))


@dataclass
class Entry:
    """The entries of one parameter that may move: the mask's, or the whole parameter (None)."""

    param: torch.nn.Parameter
    bits: torch.Tensor | None  # packed saliency-mask bits of this parameter
    count: int  # how many entries may move

    def selection(self) -> torch.Tensor | None:
        """The bool mask in the parameter's shape, or None for the whole parameter."""
        return None if self.bits is None else unpack_mask(self.bits, self.param.shape)

    def values(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` (the parameter, its gradient) at the movable entries: flat under a mask."""
        selected = self.selection()
        return tensor if selected is None else tensor[selected]

    @torch.no_grad()
    def assign(self, values: torch.Tensor) -> None:
        """Write `values` (as `values` returned them) into the movable entries, in place."""
        selected = self.selection()
        if selected is None:
            self.param.data.copy_(values.to(self.param.dtype))
        else:
            self.param.data[selected] = values.to(self.param.dtype)


def movable_entries(unet: torch.nn.Module, mask: PackedMask | None) -> list[Entry]:
    """What training may move: every trained parameter (requires_grad), within the mask's
    entries when there is one (parameters the mask keeps none of are left out)."""
    entries = []
    for name, param in unet.named_parameters():
        if not param.requires_grad:
            continue
        if mask is None:
            entries.append(Entry(param, None, param.numel()))
        elif mask.count(name) > 0:
            entries.append(Entry(param, mask.bits[name].to(param.device), mask.count(name)))
    return entries


def tensor_std(whole: torch.Tensor) -> torch.Tensor:
    """A parameter's own noise scale: its standard deviation, or for a single entry its size."""
    return whole.std() if whole.numel() > 1 else whole.abs().reshape(())


def stream_seed(seed: int, step: int, stream: int) -> int:
    """The seed of a technique's own random stream at `step`: a pure function of the step, so a
    resumed run draws what an uninterrupted one drew, and the trainer's own stream is untouched."""
    return (seed * 1_000_003 + step) * 7 + stream + 2**40


# Registry lines: importing a module registers its technique.
from erase.harden import ieu, meta, perturb  # noqa: E402,F401
