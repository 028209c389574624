"""What to forget and what to keep: a concept resolved to forget, retain and remap conditions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

from erase.errors import EraseError
from erase.models.base import Condition
from prompts import concept_templates

REMAP_MODES = ("next", "random")


@dataclass
class Concept:
    """The conditions a run forgets, keeps, and remaps the forgotten ones to."""

    name: str
    forget: list[Condition]  # prompts or class indices whose outputs are erased
    retain: list[Condition]  # prompts or class indices whose outputs must stay intact
    # SalUn remaps a forget sample to one of these: the next class by default (docs/methods.md).
    remap: list[Condition] = field(default_factory=list)
    words: list[str] = field(default_factory=list)  # the tokens Forget-Me-Not steers away from
    # What ESD trains on: the bare concept text ("nudity", "Van Gogh"), as its reference does.
    terms: list[Condition] = field(default_factory=list)
    kind: str = "custom"  # nudity | class | style | custom: picks reference defaults
    parts: list[Concept] = field(default_factory=list)  # the concepts of a several-concept run

    def __post_init__(self):
        self.remap = self.remap or list(self.retain)
        self.terms = self.terms or list(self.forget)

    def remap_for(self, condition: Condition) -> list[Condition]:
        """The remap targets of a forget condition: those of the concept it belongs to."""
        for part in self.parts:
            if condition in part.forget:
                return part.remap
        return self.remap

    def to_dict(self) -> dict:
        """Plain-JSON form for metadata.json."""
        return asdict(self)


def union(concepts: Sequence[Concept]) -> Concept:
    """Several concepts erased in one run: their forget sets together, each concept keeping its
    own remap targets, and as retain set what every one of them keeps but none forgets."""
    if len(concepts) == 1:
        return concepts[0]
    forget = unique(c for concept in concepts for c in concept.forget)
    retain = [
        c for c in unique(c for concept in concepts for c in concept.retain) if c not in forget
    ]
    if not retain:
        raise EraseError("These concepts leave nothing to retain: erase fewer of them at once.")
    kinds = {concept.kind for concept in concepts}
    return Concept(
        name=" + ".join(concept.name for concept in concepts),
        forget=forget,
        retain=retain,
        remap=unique(c for concept in concepts for c in concept.remap),
        words=unique(w for concept in concepts for w in concept.words),
        terms=unique(t for concept in concepts for t in concept.terms),
        kind=kinds.pop() if len(kinds) == 1 else "custom",
        parts=[without_forgotten_targets(concept, forget, retain) for concept in concepts],
    )


def without_forgotten_targets(concept: Concept, forget: list, retain: list) -> Concept:
    """`concept` whose remap targets skip what another concept of the run forgets: a forgotten
    class's target moves on to the next retained class (3 -> 4 becomes 3 -> 5 when 4 goes too)."""
    targets = []
    for target in concept.remap:
        if target not in forget:
            targets.append(target)
        elif isinstance(target, int):
            later = sorted(c for c in retain if isinstance(c, int))
            targets.append(next((c for c in later if c > target), later[0]) if later else None)
    targets = [t for t in unique(targets) if t is not None] or list(retain)
    return replace(concept, remap=targets, parts=[])


def unique(items) -> list:
    """Items in first-seen order, without repeats."""
    return list(dict.fromkeys(items))


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
    remap: str = "next",
) -> Concept:
    """Turn `--concept` (plus optional explicit prompts) into forget/retain/remap conditions.

    `remap`: "next" sends a class to the next class, `(c + 1) % K`, as both SalUn references do
    (docs/methods.md); "random" draws one of the other classes per sample.
    """
    if remap not in REMAP_MODES:
        raise EraseError(f"--remap must be one of {', '.join(REMAP_MODES)}, got '{remap}'.")
    if conditioning == "class":
        return resolve_class_concept(concept, class_names, remap)
    if forget_prompts or retain_prompts:
        if not (forget_prompts and retain_prompts):
            raise EraseError("Give both --forget-prompt and --retain-prompt, or neither.")
        return Concept(concept, list(forget_prompts), list(retain_prompts), words=concept.split())
    templates = concept_templates()
    key = concept.strip().lower()
    if key == "nudity":
        nudity = templates["nudity"]
        return Concept(
            "nudity",
            nudity["forget"],
            nudity["retain"],
            words=nudity["words"],
            terms=["nudity"],  # the reference ESD-u nudity model is trained on "nudity"
            kind="nudity",
        )
    names = templates["imagenette"]
    classes = {name.lower(): index for index, name in enumerate(names)}
    if key in classes:
        index = classes[key]
        class_prompt = templates["class_template"].format
        others = [class_prompt(name=n) for i, n in enumerate(names) if i != index]
        # SD/train-scripts/random_label.py: the pseudo prompt is class (c + 1) % 10's.
        targets = [class_prompt(name=names[(index + 1) % len(names)])] if remap == "next" else []
        return Concept(
            names[index],
            [class_prompt(name=names[index])],
            others,
            remap=targets,
            words=key.split(),
            terms=[names[index]],
            kind="class",
        )
    styles = {name.lower(): name for name in templates["styles"]}
    if key in styles:
        style_prompt = templates["style_template"].format(name=styles[key])
        return Concept(
            styles[key],
            [style_prompt],
            [templates["style_retain"]],
            words=key.split(),
            terms=[styles[key]],
            kind="style",
        )
    known = ", ".join(["nudity", *templates["imagenette"], *templates["styles"]])
    raise EraseError(
        f"Unknown concept '{concept}': use one of {known}, or give your own with "
        "--forget-prompt and --retain-prompt."
    )


def resolve_class_concept(concept: str, class_names: Sequence[str], remap: str = "next") -> Concept:
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
    # DDPM/runners/diffusion.py: the pseudo label is (label_to_forget + 1) % 10.
    targets: list[Condition] = [(index + 1) % len(names)] if remap == "next" else []
    return Concept(
        class_names[index], [index], others, remap=targets, words=[class_names[index]], kind="class"
    )
