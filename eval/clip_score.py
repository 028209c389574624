"""CLIP score of generated images against their prompts, on open_clip models.

The score is torchmetrics' definition, 100 * max(cos(image, text), 0), computed on open_clip
embeddings (torchmetrics' CLIPScore only takes transformers' CLIP). Default model: ViT-L/14 with
OpenAI's weights, the one Stable Diffusion's text encoder comes from.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from erase.errors import EraseError

DEFAULT_MODEL = "ViT-L-14"
DEFAULT_PRETRAINED = "openai"
CLIP_SCALE = "x100 (torchmetrics: 100 * max(cos, 0)); clip_score_unit is the 0-1 cosine"


@dataclass
class ClipModel:
    """An open_clip model with its image preprocessing and tokenizer."""

    model: torch.nn.Module
    preprocess: object  # PIL image -> (3, S, S) tensor
    tokenizer: object  # list of texts -> (B, L) token ids
    name: str
    pretrained: str | None
    device: torch.device


def load_clip(
    model_name: str = DEFAULT_MODEL,
    pretrained: str | None = DEFAULT_PRETRAINED,
    device: torch.device | str = "cpu",
) -> ClipModel:
    """Load an open_clip model: a built-in name (or an open_clip config .json file) and weights.

    `pretrained` is a tag (e.g. "openai"), a checkpoint file, or None / "none" for random
    weights (tests only).
    """
    import open_clip

    name = model_name
    if model_name.endswith(".json"):
        name = register_config(model_name)
    if pretrained is not None and pretrained.lower() == "none":
        pretrained = None
    check_clip_names(name, pretrained)
    logging.disable(logging.ERROR)  # open_clip logs a failed download itself: keep one line
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=device
        )
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as error:  # open_clip wraps failed downloads in RuntimeError
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise EraseError(
            f"The CLIP model {model_name} with weights '{pretrained}' could not be loaded "
            f"({detail}): run once online to cache the weights, or pass --clip-pretrained PATH "
            "to a local checkpoint."
        ) from None
    finally:
        logging.disable(logging.NOTSET)
    model.eval()
    return ClipModel(model, preprocess, tokenizer, model_name, pretrained, torch.device(device))


def check_clip_names(name: str, pretrained: str | None) -> None:
    """Fail early, in one line, on an unknown model name or weights tag."""
    import open_clip

    if ":" in name:  # hf-hub: and local-dir: schemas are resolved by open_clip itself
        return
    if name not in open_clip.list_models():
        raise EraseError(
            f"Unknown CLIP model '{name}': pass --clip-model with a name from "
            "open_clip.list_models() (e.g. ViT-L-14) or an open_clip model config .json."
        )
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained and pretrained not in tags and not os.path.isfile(pretrained):
        raise EraseError(
            f"Unknown weights '{pretrained}' for CLIP {name}: pass --clip-pretrained with one of "
            f"{', '.join(tags) or '(none known)'} or a checkpoint file."
        )


def register_config(path: str) -> str:
    """Make an open_clip model config file known to open_clip; its name is the file's stem."""
    from open_clip import add_model_config

    if not os.path.isfile(path):
        raise EraseError(f"CLIP model config '{path}' does not exist: pass --clip-model NAME.")
    add_model_config(path)
    return os.path.splitext(os.path.basename(path))[0]


@torch.no_grad()
def clip_scores(
    images: Sequence[str | Image.Image], prompts: Sequence[str], clip: ClipModel, batch_size=32
) -> list[float]:
    """100 * max(cos, 0) between each image (file or PIL image) and its prompt."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    scores = []
    for start in range(0, len(images), batch_size):
        pixels = torch.stack(
            [clip.preprocess(open_rgb(image)) for image in images[start : start + batch_size]]
        ).to(clip.device)  # (B, 3, S, S)
        tokens = clip.tokenizer(list(prompts[start : start + batch_size])).to(clip.device)
        image_embeds = torch.nn.functional.normalize(
            clip.model.encode_image(pixels).float(), dim=-1
        )
        text_embeds = torch.nn.functional.normalize(clip.model.encode_text(tokens).float(), dim=-1)
        cosine = (image_embeds * text_embeds).sum(dim=-1)  # (B,)
        scores.extend((100 * cosine.clamp(min=0)).tolist())
    return scores


def open_rgb(image: str | Image.Image) -> Image.Image:
    """An RGB PIL image from a file or an image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    with Image.open(image) as opened:
        return opened.convert("RGB")


def clip_score(
    images: Sequence[str | Image.Image], prompts: Sequence[str], clip: ClipModel
) -> tuple[dict, list[float]]:
    """The mean CLIP score over image/prompt pairs, its spread and settings; and every score."""
    scores = clip_scores(images, prompts, clip)
    values = torch.tensor(scores, dtype=torch.float64)
    mean = float(values.mean()) if scores else float("nan")
    summary = {
        "clip_score": mean,
        # Papers print both scales: torchmetrics' (and ESD's) x100, the UnlearnDiffAtk and
        # AdvUnlearn tables' 0-1 cosine. Both are recorded so a figure is set beside its own kind.
        "scale": CLIP_SCALE,
        "clip_score_unit": mean / 100,
        "std": float(values.std()) if len(scores) > 1 else 0.0,
        "images": len(scores),
        "model": clip.name,
        "pretrained": clip.pretrained,
    }
    return summary, scores
