"""Released attack prompt sets, used as given: the erased model generates each prompt with its
seed and guidance, and the ASR is the share of images the judge finds the concept in.

The 142 I2P nudity prompts of UnlearnDiffAtk (`nudity.csv`), Ring-A-Bell's sensitive prompts
(a CSV with `sensitive prompt` and `normal prompt` columns), or any prompt CSV/TXT.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

from erase.errors import EraseError
from eval.attacks.images import generate_with, judge_folder, positive_rate
from eval.attacks.target import AttackTarget
from eval.attacks.unlearndiffatk import stricter_asr
from prompts import PromptEntry, load_prompt_file

RING_A_BELL_COLUMN = "sensitive prompt"  # Ring-A-Bell's released CSV: the adversarial prompts


@dataclass
class Config:
    """Nothing to tune: the prompts are the attack."""


def load_attack_prompts(path: str, limit: int | None = None) -> list[PromptEntry]:
    """Prompts of a released attack set: Ring-A-Bell's sensitive column, else the prompt column."""
    if path.lower().endswith(".csv") and os.path.isfile(path):
        try:
            entries = ring_a_bell_prompts(path)
        except UnicodeDecodeError as error:
            raise EraseError(
                f"Prompt file '{path}' is not UTF-8 text (byte {error.start}): save it as UTF-8."
            ) from None
        except csv.Error as error:
            raise EraseError(
                f"Prompt file '{path}' is not a readable CSV ({error}): fix it."
            ) from None
        if entries is not None:
            if not entries:
                raise EraseError(
                    f"Prompt file '{path}' holds no prompts: pass a file with at least one."
                )
            return entries[:limit] if limit else entries
    return load_prompt_file(path, limit)


def ring_a_bell_prompts(path: str) -> list[PromptEntry] | None:
    """The sensitive prompts of a Ring-A-Bell CSV; None for a CSV without that column."""
    with open(path, encoding="utf-8-sig", newline="") as file:
        reader = csv.DictReader(file, strict=True)
        columns = {name.strip().lower(): name for name in reader.fieldnames or [] if name}
        if RING_A_BELL_COLUMN not in columns:
            return None
        texts = [(row.get(columns[RING_A_BELL_COLUMN]) or "").strip() for row in reader]
    return [PromptEntry(text, row) for row, text in enumerate(t for t in texts if t)]


def check(backend) -> None:
    """Prompt sets need a text-to-image model."""
    if backend.conditioning != "text":
        raise EraseError(
            f"--attack prompts needs a text-to-image model and '{backend.identity}' is "
            "class-conditional: use --attack relearn."
        )


def run(target: AttackTarget, config: Config, output: str, generation, progress=True) -> dict:
    """Generate every prompt with the erased model and judge it: the ASR of the prompt set."""
    check(target.backend)
    folder = os.path.join(output, "plain")
    records = generate_with(
        target.backend, target.unet, target.entries, folder, generation, progress
    )
    return judged_asr(target.judge, folder, records)


def judged_asr(judge, folder: str, records: list[dict]) -> dict:
    """Judge a folder of generated prompts: the ASR (share judged positive), the stricter
    figures, and a row per prompt (attacks that only rewrite the prompt set share it)."""
    verdicts = judge_folder(judge, folder, records)
    rows = [
        {**record, "plain_verdict": verdict, "attack": None}
        for record, verdict in zip(records, verdicts)
    ]
    return {
        "prompts": len(records),
        "positive": sum(v["positive"] for v in verdicts),
        "asr": round(positive_rate(verdicts), 4),
        **stricter_asr(rows),
        "per_prompt": rows,
    }
