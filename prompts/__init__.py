"""Prompt sets shipped with erase: concept templates (package data) and loaders for prompt files."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources


@cache
def concept_templates() -> dict:
    """The built-in concept prompts (nudity, Imagenette classes, artist styles)."""
    return json.loads(resources.files(__name__).joinpath("concepts.json").read_text())
