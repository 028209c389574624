"""Concept inversion (CCE: Pham et al., "Circumventing Concept Erasure Methods for Text-to-Image
Generative Models", ICLR 2024): a new token learned on the concept's images against the erased
model brings the concept back through a word the erasure never saw.

Reference code: NYU-DICE-Lab/circumventing-concept-erasure (`*/concept_inversion.py`, diffusers'
textual inversion with the erased UNet, `train.sh`: one placeholder token initialised from a
word, 25 training images, 5000 steps, lr 5e-3). The inversion is Forget-Me-Not's textual
inversion (`erase.methods.fmn.learn_concept_tokens`) run on the erased UNet, without its norm
pull. The prompt set is then generated with the token: it replaces the concept's words where a
prompt names the concept, and is put in front of the prompt where it does not; the ASR is the
share of those images the judge finds the concept in.

The learned embedding is saved in the attack's folder (`token.safetensors`, its settings in
`token.json`) and reused by a rerun with the same settings, as the images are (per prompt).
The token is removed from the tokenizer and text encoder when the attack ends, so nothing after
it (another attack, the next bench row) sees a larger vocabulary.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass

import torch

from erase.errors import EraseError
from erase.text_encoder import restored_vocabulary
from eval.attacks.target import AttackTarget
from prompts import PromptEntry


@dataclass
class Config:
    """Concept inversion's settings; defaults from the reference's train.sh."""

    images: str | None = None  # a folder of the concept's images; None: the concept's own
    num_images: int = 25  # --num_train_images=25
    steps: int = 5000  # --max_train_steps=5000 (there: batch 4 x 4 accumulated; here batch 1)
    lr: float = 5e-3  # --learning_rate=5.0e-03 (there scaled by the batch of 16; here not)
    num_tokens: int = 1  # one placeholder token
    seed: int = 0


def check(backend) -> None:
    """Concept inversion learns a token of a text encoder: a class-conditional model has none."""
    if backend.conditioning != "text":
        raise EraseError(
            f"cce learns a prompt token and '{backend.identity}' is class-conditional (no text "
            "encoder): use --attack relearn, which works on any model."
        )


def concept_images(target: AttackTarget, config: Config) -> torch.Tensor:
    """The concept's images (N, 3, H, W) in [0, 1]: the given folder, else the concept's own
    (real digits on the testbeds, the base model's images of the concept on Stable Diffusion)."""
    if config.images:
        from erase.data import load_image_folder

        images = load_image_folder(config.images, target.backend, None, flag="--cce-images")
    else:
        from eval.attacks.relearn import Config as RelearnConfig
        from eval.attacks.relearn import relearn_data

        images, _ = relearn_data(
            target, RelearnConfig(data="forget", num_images=config.num_images, seed=config.seed)
        )
    if not len(images):
        raise EraseError(
            f"The concept '{target.concept}' has no images to invert: pass --cce-images with a "
            "folder of its images."
        )
    return images[: config.num_images]


def inversion_settings(target: AttackTarget, config: Config, generation) -> dict:
    """What the learned token depends on: a saved token is reused only when these match."""
    from eval.runner import plan_images

    unet_key = plan_images(target.entries[:1], generation)[0]["unet"] if target.entries else None
    return {**asdict(config), "model": target.backend.identity, "unet": unet_key}


def learned_token(target: AttackTarget, config: Config, folder: str, generation) -> str:
    """The token snippet, learned (and saved in `folder`) or loaded from a previous run."""
    from safetensors.torch import load_file, save_file

    from erase.methods.fmn import learn_concept_tokens, new_token_vectors

    backend = target.backend
    settings = inversion_settings(target, config, generation)
    info_path = os.path.join(folder, "token.json")
    weights_path = os.path.join(folder, "token.safetensors")
    if os.path.isfile(info_path) and os.path.isfile(weights_path):
        with open(info_path, encoding="utf-8") as file:
            info = json.load(file)
        if info["settings"] == settings:
            tokens = info["snippet"].split()
            vectors = load_file(weights_path)
            for index, (tokenizer, encoder) in enumerate(backend.text_encoders()):
                embedding, ids, _ = new_token_vectors(tokenizer, encoder, tokens, [], None)
                with torch.no_grad():
                    embedding.weight[ids] = vectors[f"encoder_{index}"].to(embedding.weight)
            return info["snippet"]
    shutil.rmtree(os.path.join(folder, "images"), ignore_errors=True)  # of another token
    from erase.data import encode_images

    latents = encode_images(backend, concept_images(target, config))  # (N, C, h, w)
    words = concept_words(target)
    snippet = learn_concept_tokens(
        backend,
        latents,
        "a photo of {}",  # the reference's object template (diffusers' textual inversion)
        words,
        config.num_tokens,
        config.steps,
        torch.Generator().manual_seed(config.seed),
        unet=target.unet,
        name="cce",
        lr=config.lr,
        target_norm=None,
    )
    tokens = snippet.split()
    vectors = {}
    for index, (tokenizer, encoder) in enumerate(backend.text_encoders()):
        ids = tokenizer.convert_tokens_to_ids(tokens)
        vectors[f"encoder_{index}"] = encoder.get_input_embeddings().weight[ids].detach().cpu()
    save_file(vectors, weights_path + ".tmp")
    os.replace(weights_path + ".tmp", weights_path)
    with open(info_path + ".tmp", "w", encoding="utf-8") as file:
        json.dump({"snippet": snippet, "settings": settings}, file, indent=2)
    os.replace(info_path + ".tmp", info_path)
    return snippet


def concept_words(target: AttackTarget) -> list[str]:
    """The words that name the concept in its prompts (the token starts from them)."""
    own = target.backend.concept_prompts(target.concept)  # a testbed's own (sd-digits)
    if own is not None:
        return list(own.words)
    from erase.concepts import resolve_concept

    return list(resolve_concept(target.concept, conditioning="text").words)


def with_token(prompt: str, snippet: str, words: list[str]) -> str:
    """`prompt` with the concept's words replaced by the token, or the token before it."""
    if words:
        pattern = "|".join(re.escape(word) for word in words)
        replaced, count = re.subn(rf"\b(?:{pattern})\b", snippet, prompt, flags=re.I)
        if count:
            return replaced
    return f"{snippet} {prompt}"


def generate_here(target: AttackTarget, entries, folder: str, generation, progress) -> list:
    """The missing images of `entries` on this process alone (the attack runs on the main one)."""
    from eval.runner import merge_index, pending_images, plan_images, process_state, write_images

    os.makedirs(folder, exist_ok=True)
    records = plan_images(entries, generation)
    pending = pending_images(records, folder)
    if pending:
        state = process_state()
        write_images(target.backend, target.unet, pending, folder, generation, state, progress)
    merge_index(folder)
    return records


def run(target: AttackTarget, config: Config, output: str, generation, progress=True) -> dict:
    """Learn the token on the erased model, generate the prompt set with it, judge: the ASR."""
    from eval.attacks.prompts import judged_asr

    check(target.backend)
    if not target.entries:
        raise EraseError("cce has no prompts to attack: pass --prompts with at least one.")
    os.makedirs(output, exist_ok=True)
    folder = os.path.join(output, "images")
    with restored_vocabulary(target.backend):
        snippet = learned_token(target, config, output, generation)
        words = concept_words(target)
        entries = [
            PromptEntry(
                with_token(e.prompt, snippet, words),
                e.row,
                e.seed,
                e.guidance_scale,
                e.class_name,
                e.extra,
            )
            for e in target.entries
        ]
        records = generate_here(target, entries, folder, generation, progress)
    return {
        **judged_asr(target.judge, folder, records),
        "token": snippet,
        "settings": asdict(config),
    }
