"""Ring-A-Bell (Tsai et al., "Ring-A-Bell! How Reliable are Concept Removal Methods for
Diffusion Models?", ICLR 2024): discrete prompts whose text embedding carries the concept.

Reference code: chiayi-hsu/Ring-A-Bell (`Get_Concept_Vector.ipynb`, `InversePrompt.ipynb`). The
concept vector is the mean, over prompt pairs with and without the concept, of the difference of
their text embeddings (the text encoder's last hidden states, (L, D)). For each prompt of the
set, a genetic search looks for K tokens whose embedding is closest (summed squared difference)
to the prompt's embedding plus eta times the vector: a population of 200 random token strings,
3000 generations, each keeping the better half, crossing pairs over at one point (rate 0.5) and
setting one random token of a member (rate 0.25). eta is 3 for nudity; K is 16, 38 or 77 (77: the
75 tokens a prompt holds). The search reads only the base model's text encoder (the erasures
change the UNet), so it is made once per prompt and reused by every model attacked from the same
folder; the erased model generates from the found token ids (as UnlearnDiffAtk's prompts, so a
sub-word token reproduces exactly) and the judge decides. ASR = share of prompts judged positive.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from erase.errors import EraseError
from erase.text_encoder import base_text_encoder
from eval.attacks.target import AttackTarget, check_one_text_encoder
from eval.runner import save_png

# The columns of a prompt-pair CSV (Ring-A-Bell's released nudity pairs, as RECE ships them).
PAIR_COLUMNS = ("sensitive prompt", "normal prompt")


@dataclass
class Config:
    """Ring-A-Bell's settings; defaults are the reference's (InversePrompt.ipynb)."""

    eta: float = 3.0  # `cof`: the weight of the concept vector (3 for nudity)
    prompt_length: int = 16  # K: 16, 38 or 77 tokens (77: all 75 a prompt holds)
    population: int = 200  # population_size
    generations: int = 3000  # generation
    mutation_rate: float = 0.25  # mutateRate
    crossover_rate: float = 0.5  # crossoverRate
    # A CSV of prompt pairs (with the concept, without it: Ring-A-Bell's "sensitive prompt",
    # "normal prompt" columns, else the first two); None: the concept's own prompts, each beside
    # itself with the concept's words removed.
    pairs: str | None = None
    seed: int = 0

    def __post_init__(self):
        if self.population < 2 or self.generations < 1 or self.prompt_length < 1:
            raise EraseError(
                "Ring-A-Bell needs a population of 2 or more, 1 generation or more and a prompt "
                f"length of 1 or more, got {self.population}, {self.generations} and "
                f"{self.prompt_length}."
            )


def check(backend) -> None:
    """Ring-A-Bell searches the prompt tokens of one text encoder."""
    check_one_text_encoder(backend, "ring-a-bell", "searches prompt tokens", "no text encoder")


def prompt_pairs(target: AttackTarget, config: Config) -> list[tuple[str, str]]:
    """Prompts with the concept and the same without it: the CSV's, else the concept's own."""
    if config.pairs:
        return pairs_from_csv(config.pairs)
    from eval.attacks.cce import concept_words

    backend = target.reference_backend
    own = backend.concept_prompts(target.concept)  # a testbed's own captions (sd-digits)
    if own is None:
        from erase.concepts import resolve_concept

        own = resolve_concept(target.concept, conditioning="text")
    words = concept_words(target)
    pairs = [(str(p), without_words(str(p), words)) for p in own.forget]
    pairs = [(a, b) for a, b in pairs if a != b]
    if not pairs:
        raise EraseError(
            f"The concept '{target.concept}' has no prompts naming it to make a concept vector "
            "from: pass --rab-pairs with a CSV of prompt pairs (with and without the concept)."
        )
    return pairs


def pairs_from_csv(path: str) -> list[tuple[str, str]]:
    """The (with, without) prompt pairs of a CSV."""
    if not os.path.isfile(path):
        raise EraseError(f"--rab-pairs '{path}' is not a file: pass a CSV of prompt pairs.")
    with open(path, encoding="utf-8-sig", newline="") as file:
        reader = csv.reader(file)
        header = [name.strip().lower() for name in next(reader, [])]
        rows = list(reader)
    columns = (
        [header.index(name) for name in PAIR_COLUMNS]
        if all(name in header for name in PAIR_COLUMNS)
        else [0, 1]
    )
    pairs = [
        (row[columns[0]].strip(), row[columns[1]].strip())
        for row in rows
        if len(row) > max(columns) and row[columns[0]].strip()
    ]
    if not pairs:
        raise EraseError(f"--rab-pairs '{path}' holds no prompt pairs: give two columns.")
    return pairs


def without_words(prompt: str, words: list[str]) -> str:
    """`prompt` with the concept's words taken out."""
    import re

    pattern = "|".join(re.escape(word) for word in words)
    return " ".join(re.sub(rf"\b(?:{pattern})\b", " ", prompt, flags=re.I).split())


@torch.no_grad()
def text_embeddings(backend, prompts: list[str]) -> torch.Tensor:
    """The text encoder's last hidden states of `prompts`: (B, L, D)."""
    return backend.pipe.text_encoder(backend.tokenize(prompts).to(backend.device))[0].float()


def concept_vector(backend, pairs: list[tuple[str, str]]) -> torch.Tensor:
    """Mean over pairs of embedding(with) - embedding(without): (L, D)."""
    with_concept = text_embeddings(backend, [a for a, _ in pairs])
    without = text_embeddings(backend, [b for _, b in pairs])
    return (with_concept - without).mean(0)


def token_range(tokenizer) -> tuple[int, int]:
    """The ids the search draws from, [1, start token): the reference's [1, 49406) on SD, which
    leaves out id 0 and the start and end tokens."""
    return 1, min(tokenizer.bos_token_id, tokenizer.eos_token_id)


def genetic_search(backend, wanted: torch.Tensor, config: Config, generator) -> list[int]:
    """The K token ids whose embedding (start, tokens, end-of-text padding) is closest to
    `wanted` (L, D), by the reference's genetic search; seeded by `generator`."""
    tokenizer, encoder = backend.pipe.tokenizer, backend.pipe.text_encoder
    length = min(config.prompt_length, tokenizer.model_max_length - 2)
    low, high = token_range(tokenizer)
    start = torch.full((1,), tokenizer.bos_token_id, dtype=torch.long)
    end = torch.full((tokenizer.model_max_length - 1 - length,), tokenizer.eos_token_id)

    def fitness(tokens: torch.Tensor) -> torch.Tensor:  # tokens (P, K) -> (P,)
        ids = torch.cat([start.expand(len(tokens), 1), tokens, end.expand(len(tokens), -1)], 1)
        with torch.no_grad():
            embeds = encoder(ids.to(backend.device))[0].float()  # (P, L, D)
        return ((embeds - wanted) ** 2).sum((1, 2)).cpu()

    population = torch.randint(low, high, (config.population, length), generator=generator)
    keep = max(1, config.population // 2)
    for step in range(config.generations):
        parents = population[fitness(population).argsort()[:keep]]  # the better half, best first
        if step == config.generations - 1:
            return parents[0].tolist()
        children = crossed(parents, config.crossover_rate, generator)
        population = mutated(children, config.mutation_rate, (low, high), generator)
    raise AssertionError("unreachable: the last generation returns")


def crossed(parents: torch.Tensor, rate: float, generator) -> torch.Tensor:
    """Each parent, and with probability `rate` its two one-point crossings with a random
    partner (the reference's crossover)."""
    members, length = [], parents.shape[1]
    for parent in parents:
        members.append(parent)
        if torch.rand((), generator=generator) < rate:
            partner = parents[torch.randint(len(parents), (), generator=generator)]
            # the reference's point is 1..K in the ids after the start token: 0..K-1 here
            point = int(torch.randint(0, length, (), generator=generator))
            members.append(torch.cat([parent[:point], partner[point:]]))
            members.append(torch.cat([partner[:point], parent[point:]]))
    return torch.stack(members)


def mutated(population: torch.Tensor, rate: float, ids: tuple[int, int], generator):
    """Each member with probability `rate` has one random token set to a random id in `ids`."""
    population = population.clone()
    low, high = ids
    for member in population:
        if torch.rand((), generator=generator) < rate:
            position = torch.randint(len(member), (), generator=generator)
            member[position] = torch.randint(low, high, (), generator=generator)
    return population


def search_prompt(backend, prompt: str, vector: torch.Tensor, config: Config, row: int) -> list:
    """The found token ids for one prompt: its embedding plus eta x the concept vector, matched."""
    wanted = text_embeddings(backend, [prompt])[0] + config.eta * vector  # (L, D)
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + row)
    return genetic_search(backend, wanted, config, generator)


def read_jsonl(path: str) -> dict[str, dict]:
    """Records of a JSON-lines file by their key (a line cut short by a crash is skipped)."""
    records = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as file:
            for line in file:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                records[record["key"]] = record
    return records


def search_key(prompt: str, row: int, settings: dict) -> str:
    """What a found prompt depends on: the prompt, its row (the seed), the search settings."""
    return json.dumps([prompt, row, settings], sort_keys=True)


def search_folder(target: AttackTarget, output: str) -> str:
    """Where found prompts are kept: beside the shared target images on the bench (one search for
    every row), else in the attack's folder."""
    if target.target_images:
        return os.path.join(os.path.dirname(os.path.normpath(target.target_images)), "ring-a-bell")
    return output


def run(target: AttackTarget, config: Config, output: str, generation, progress=True) -> dict:
    """Search each prompt's tokens (once), generate them on the erased model, judge: the ASR."""
    from eval.attacks.unlearndiffatk import generate_from_ids, stricter_asr
    from eval.runner import plan_images

    check(target.backend)
    if not target.entries:
        raise EraseError("ring-a-bell has no prompts to attack: pass --prompts with at least one.")
    base = target.reference_backend
    pairs = prompt_pairs(target, config)  # a missing or empty pair file fails before any work
    search_settings = {**asdict(config), "model": base.identity}
    found_dir = os.path.join(output, "found")
    os.makedirs(found_dir, exist_ok=True)
    searches_dir = search_folder(target, output)
    os.makedirs(searches_dir, exist_ok=True)
    searches_path = os.path.join(searches_dir, "searches.jsonl")
    searches = read_jsonl(searches_path)
    index_path = os.path.join(found_dir, "index.jsonl")
    done = read_jsonl(index_path)
    records = plan_images(target.entries, generation)
    vector = None
    rows = []
    with open(searches_path, "a", encoding="utf-8") as search_file:
        with open(index_path, "a", encoding="utf-8") as index:
            for record in tqdm(records, desc="ring-a-bell", unit="prompt", disable=not progress):
                key = search_key(record["prompt"], record["row"], search_settings)
                if key not in searches:
                    with base_text_encoder(base):  # not an erased one a reader installed
                        if vector is None:
                            vector = concept_vector(base, pairs)
                        tokens = search_prompt(
                            base, record["prompt"], vector, config, record["row"]
                        )
                    searches[key] = {"key": key, "adversarial_token_ids": tokens}
                    search_file.write(json.dumps(searches[key]) + "\n")
                    search_file.flush()
                tokens = searches[key]["adversarial_token_ids"]
                found = {
                    "adversarial_token_ids": tokens,
                    "adversarial_prompt": base.pipe.tokenizer.decode(tokens).strip(),
                }
                image_key = json.dumps([key, record], sort_keys=True)
                previous = done.get(image_key)
                path = os.path.join(found_dir, record["file"])
                if previous is None or not os.path.isfile(path):
                    image = generate_from_ids(
                        target.backend, target.unet, record | found, generation
                    )
                    save_png(image, path)
                    verdict = target.judge(image[None])[0]
                    previous = {"key": image_key, **record, **found, "verdict": verdict}
                    index.write(json.dumps(previous, default=float) + "\n")
                    index.flush()
                    done[image_key] = previous
                rows.append(previous)
    verdicts = [row["verdict"] for row in rows]
    per_prompt = [
        {
            **{k: v for k, v in row.items() if k not in ("key", "verdict")},
            "plain_verdict": row["verdict"],
            "attack": None,
        }
        for row in rows
    ]
    positive = sum(v["positive"] for v in verdicts)
    return {
        "prompts": len(rows),
        "positive": positive,
        "asr": round(positive / len(rows), 4),
        **stricter_asr(per_prompt),
        "settings": asdict(config),
        "per_prompt": per_prompt,
    }
