"""Attacks on an erased model, registered by name: does the concept stay gone?

- `unlearndiffatk`: adversarial prefix tokens optimised against the erased UNet (UnlearnDiffAtk);
- `relearn`: brief fine-tuning on auxiliary images (DiMRA's relearning attack);
- `prompts`: released attack prompt sets (I2P nudity, Ring-A-Bell), used as given;
- `cce`: concept inversion, a token learned on the concept's images against the erased model;
- `ring-a-bell`: discrete prompts whose text embedding carries the concept vector.

Each module has a `Config` dataclass and `run(target, config, output, generation, progress)`
returning its figures; `eval/attacks/harness.py` loads the target and writes the output folder.
"""

from __future__ import annotations

import importlib

from erase.errors import EraseError

ATTACKS = {
    "unlearndiffatk": "eval.attacks.unlearndiffatk",
    "relearn": "eval.attacks.relearn",
    "prompts": "eval.attacks.prompts",
    "cce": "eval.attacks.cce",
    "ring-a-bell": "eval.attacks.ring_a_bell",
}


def get_attack(name: str):
    """The module of attack `name`; an unknown name is a user error."""
    if name not in ATTACKS:
        raise EraseError(f"Unknown attack '{name}': choose from {', '.join(ATTACKS)}.")
    return importlib.import_module(ATTACKS[name])
