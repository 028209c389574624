"""What to forget and what to keep: a concept resolved to forget, retain and remap conditions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from erase.errors import EraseError
from erase.models.base import Condition
from prompts import concept_templates


@dataclass
class Concept:
    """The conditions a run forgets, keeps, and remaps the forgotten ones to."""

    name: str
    forget: list[Condition]  # prompts or class indices whose outputs are erased
    retain: list[Condition]  # prompts or class indices whose outputs must stay intact
    # SalUn remaps a forget sample to a random one of these (the "random label" of the paper).
    remap: list[Condition] = field(default_factory=list)
    words: list[str] = field(default_factory=list)  # the tokens Forget-Me-Not steers away from

    def __post_init__(self):
        self.remap = self.remap or list(self.retain)

    def to_dict(self) -> dict:
        """Plain-JSON form for metadata.json."""
        return asdict(self)


def slug(text: str) -> str:
    """A folder-safe form of a concept or model name."""
    kept = "".join(ch if ch.isalnum() else "-" for ch in text.strip().lower())
    return "-".join(part for part in kept.split("-") if part) or "concept"


def resolve_concept(
    concept: str,
    *,
    conditioning: str,
    class_names: Sequence[str] = (),
    forget_prompts: Sequence[str] = (),
    retain_prompts: Sequence[str] = (),
) -> Concept:
    """Turn `--concept` (plus optional explicit prompts) into forget/retain/remap conditions."""
    if conditioning == "class":
        return resolve_class_concept(concept, class_names)
    if forget_prompts or retain_prompts:
        if not (forget_prompts and retain_prompts):
            raise EraseError("Give both --forget-prompt and --retain-prompt, or neither.")
        return Concept(concept, list(forget_prompts), list(retain_prompts), words=concept.split())
    templates = concept_templates()
    key = concept.strip().lower()
    if key == "nudity":
        nudity = templates["nudity"]
        return Concept("nudity", nudity["forget"], nudity["retain"], words=nudity["words"])
    classes = {name.lower(): name for name in templates["imagenette"]}
    if key in classes:
        class_prompt = templates["class_template"].format
        others = [class_prompt(name=n) for n in templates["imagenette"] if n.lower() != key]
        return Concept(classes[key], [class_prompt(name=classes[key])], others, words=key.split())
    styles = {name.lower(): name for name in templates["styles"]}
    if key in styles:
        style_prompt = templates["style_template"].format(name=styles[key])
        return Concept(styles[key], [style_prompt], [templates["style_retain"]], words=key.split())
    known = ", ".join(["nudity", *templates["imagenette"], *templates["styles"]])
    raise EraseError(
        f"Unknown concept '{concept}': use one of {known}, or give your own with "
        "--forget-prompt and --retain-prompt."
    )


def resolve_class_concept(concept: str, class_names: Sequence[str]) -> Concept:
    """A class index or name of a class-conditional model: forget it, retain every other class."""
    names = [name.lower() for name in class_names]
    key = concept.strip().lower()
    if key.isdigit() and int(key) < len(names):
        index = int(key)
    elif key in names:
        index = names.index(key)
    else:
        raise EraseError(
            f"Unknown class '{concept}': use an index 0-{len(names) - 1} or one of "
            f"{', '.join(class_names)}."
        )
    others: list[Condition] = [i for i in range(len(names)) if i != index]
    return Concept(class_names[index], [index], others, words=[class_names[index]])
