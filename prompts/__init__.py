"""Prompt sets shipped with erase: concept templates (package data) and loaders for prompt files.

Evaluation prompt sets are files the user points at (`--prompts PATH`): I2P (Schramowski et al.,
CVPR 2023), COCO captions, or any CSV/TXT with prompts. I2P can also be fetched from the
Hugging Face hub when online. The Imagenette class prompts are built from `concepts.json`.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from functools import cache
from importlib import resources

from erase.errors import EraseError

MAX_SEED = 2**32 - 1  # torch seeds are 64-bit; derived seeds (seed * 1_000_003 + i) must fit

# Column names seen in public prompt files, in order of preference.
PROMPT_COLUMNS = ("prompt", "caption", "text")
SEED_COLUMNS = ("evaluation_seed", "seed", "sd_seed")
GUIDANCE_COLUMNS = ("evaluation_guidance", "guidance_scale", "guidance", "sd_guidance_scale")
CLASS_COLUMNS = ("class", "label")

# I2P on the Hugging Face hub (its seed/guidance columns are sd_seed / sd_guidance_scale).
I2P_HUB = {"repo_id": "AIML-TUDA/i2p", "filename": "i2p_benchmark.csv", "repo_type": "dataset"}


@cache
def concept_templates() -> dict:
    """The built-in concept prompts (nudity, Imagenette classes, artist styles)."""
    return json.loads(resources.files(__name__).joinpath("concepts.json").read_text())


@dataclass
class PromptEntry:
    """One evaluation prompt: its text, the seed and guidance it asks for, and its other columns."""

    prompt: str
    row: int  # position in the prompt set; the default seed is base seed + row
    seed: int | None = None
    guidance_scale: float | None = None
    class_name: str | None = None  # the class the prompt depicts (class-removal evaluation)
    extra: dict = field(default_factory=dict)


def load_prompt_file(path: str, limit: int | None = None) -> list[PromptEntry]:
    """Prompts from a CSV (a prompt column, optional seed/guidance/class) or a TXT (one a line)."""
    if not os.path.isfile(path):
        raise EraseError(f"Prompt file '{path}' does not exist: pass --prompts with a CSV or TXT.")
    try:
        if path.lower().endswith(".txt"):
            with open(path, encoding="utf-8") as file:
                lines = [line.strip() for line in file]
            entries = [PromptEntry(text, row) for row, text in enumerate(t for t in lines if t)]
        else:
            entries = read_prompt_csv(path)
    except UnicodeDecodeError as error:
        raise EraseError(
            f"Prompt file '{path}' is not UTF-8 text (byte {error.start}): save it as UTF-8."
        ) from None
    except csv.Error as error:
        raise EraseError(f"Prompt file '{path}' is not a readable CSV ({error}): fix it.") from None
    if not entries:
        raise EraseError(f"Prompt file '{path}' holds no prompts: pass a file with at least one.")
    return entries[:limit] if limit else entries


def read_prompt_csv(path: str) -> list[PromptEntry]:
    """Rows of a prompt CSV as entries (the header names the columns)."""
    with open(path, encoding="utf-8-sig", newline="") as file:
        reader = csv.DictReader(file, strict=True)  # an unclosed quote is an error, not one row
        columns = {name.strip().lower(): name for name in reader.fieldnames or [] if name}
        prompt_column = first_column(columns, PROMPT_COLUMNS)
        if prompt_column is None:
            if not columns:
                raise EraseError(f"Prompt file '{path}' is empty: pass a CSV with a header row.")
            raise EraseError(
                f"Prompt file '{path}' has no prompt column (columns: {', '.join(columns)}): "
                "name the column 'prompt', or pass a .txt file with one prompt a line."
            )
        seed_column = first_column(columns, SEED_COLUMNS)
        guidance_column = first_column(columns, GUIDANCE_COLUMNS)
        class_column = first_column(columns, CLASS_COLUMNS)
        entries = []
        for line, record in enumerate(reader, start=2):
            # An empty prompt cell is kept: I2P has one, and its image is part of the benchmark.
            text = (record.get(prompt_column) or "").strip()
            entries.append(
                PromptEntry(
                    prompt=text,
                    row=len(entries),
                    seed=parse_number(record, seed_column, int, path, line),
                    guidance_scale=parse_number(record, guidance_column, float, path, line),
                    class_name=cell(record, class_column),
                    extra={
                        key.strip(): value
                        for key, value in record.items()
                        if key and key not in (prompt_column, seed_column, guidance_column)
                    },
                )
            )
    return entries


def cell(record: dict, column: str | None) -> str | None:
    """A stripped text cell, None when the column is absent or the cell empty."""
    return ((record.get(column) or "").strip() or None) if column else None


def first_column(columns: dict[str, str], candidates: tuple[str, ...]) -> str | None:
    """The file's spelling of the first candidate column it has."""
    return next((columns[name] for name in candidates if name in columns), None)


def parse_number(record: dict, column: str | None, kind, path: str, line: int):
    """A seed or guidance cell as `kind`, None when the column is absent or the cell empty."""
    text = cell(record, column)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise EraseError(
            f"Prompt file '{path}', line {line}: '{text}' in column '{column}' is not a number; "
            "fix the file."
        ) from None
    if kind is float:
        if not math.isfinite(value):
            raise EraseError(
                f"Prompt file '{path}', line {line}: '{text}' in column '{column}' is not a "
                "finite number; fix the file."
            )
        return value
    if not (math.isfinite(value) and value == int(value) and 0 <= value <= MAX_SEED):
        raise EraseError(
            f"Prompt file '{path}', line {line}: '{text}' in column '{column}' is not a seed "
            f"(a whole number from 0 to {MAX_SEED}); fix the file."
        )
    return int(value)


def load_i2p(
    path: str | None = None,
    *,
    categories: tuple[str, ...] = (),
    min_nudity_percentage: float | None = None,
    limit: int | None = None,
) -> list[PromptEntry]:
    """I2P prompts, optionally only rows in `categories` (e.g. "sexual") or with a nudity share.

    Without `path` the benchmark CSV is fetched from the Hugging Face hub (online only).
    """
    entries = load_prompt_file(path or fetch_i2p())
    if categories:
        wanted = {name.strip().lower() for name in categories}
        entries = [e for e in entries if wanted & split_categories(e.extra.get("categories"))]
    if min_nudity_percentage is not None:
        if entries and "nudity_percentage" not in entries[0].extra:
            raise EraseError(
                "The prompt file has no nudity_percentage column: pass the I2P CSV with --prompts "
                "or drop --min-nudity-percentage."
            )
        entries = [
            e
            for e in entries
            if float(e.extra.get("nudity_percentage") or 0) >= min_nudity_percentage
        ]
    if not entries:
        raise EraseError("No I2P prompt matches the category/nudity filter: loosen it.")
    return renumber(entries[:limit] if limit else entries)


def split_categories(cell: str | None) -> set[str]:
    """I2P's comma-separated categories cell as a set of lower-case names."""
    return {part.strip().lower() for part in (cell or "").split(",") if part.strip()}


def renumber(entries: list[PromptEntry]) -> list[PromptEntry]:
    """Set each entry's row to its position in a filtered set (rows index the output images)."""
    for row, entry in enumerate(entries):
        entry.row = row
    return entries


def fetch_i2p() -> str:
    """Download the I2P CSV from the hub into its cache; offline, say how to pass it instead."""
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(**I2P_HUB)
    except Exception as error:  # offline mode, no network, hub errors
        raise EraseError(
            f"The I2P prompts could not be fetched from the hub ({type(error).__name__}): "
            "download the I2P CSV (e.g. unsafe-prompts4703.csv of ESD, or AIML-TUDA/i2p) and "
            "pass --prompts PATH."
        ) from None


def load_coco(path: str | None, limit: int | None = None) -> list[PromptEntry]:
    """The first `limit` captions of a COCO caption CSV (image_id, prompt, evaluation_seed)."""
    if path is None:
        raise EraseError(
            "COCO captions are not shipped: pass --prompts PATH to a CSV of captions with a "
            "'prompt' column (e.g. coco_30k.csv of ESD)."
        )
    return load_prompt_file(path, limit)


def imagenette_prompts(
    per_class: int = 10, classes: list[str] | None = None, seed: int = 0
) -> list[PromptEntry]:
    """SalUn's class prompts "an image of a {class}", `per_class` seeds for each Imagenette class.

    The seed of the k-th image of class c is `seed + c * per_class + k`, so sets with other
    class selections reuse the same images.
    """
    templates = concept_templates()
    names = templates["imagenette"]
    if classes:
        known = {name.lower(): name for name in names}
        unknown = [name for name in classes if name.lower() not in known]
        if unknown:
            raise EraseError(
                f"Unknown Imagenette class '{unknown[0]}': use one of {', '.join(names)}."
            )
        selected = [known[name.lower()] for name in classes]
    else:
        selected = names
    entries = []
    for name in selected:
        index = names.index(name)
        for k in range(per_class):
            entries.append(
                PromptEntry(
                    prompt=templates["class_template"].format(name=name),
                    row=len(entries),
                    seed=seed + index * per_class + k,
                    class_name=name,
                )
            )
    return entries


def imagenette_index(class_name: str) -> int | None:
    """The Imagenette class index (0-9) of a class name, None when it is not one."""
    lowered = [name.lower() for name in concept_templates()["imagenette"]]
    key = class_name.strip().lower()
    return lowered.index(key) if key in lowered else None
