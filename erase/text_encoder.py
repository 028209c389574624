"""An artifact's erased text encoder (AdvUnlearn's `text_encoder/`) in a loaded pipeline.

Every reader of an artifact (erase-eval, erase-attack, erase-export, the API) loads the base
model, puts the erased UNet in, and with this module the erased text encoder as well: the
artifact's own, or another artifact's given with `--text-encoder` (AdvUnlearn's encoder beside
another method's UNet, as the paper pairs them). The base's own encoder is kept on the backend,
so that what the base model makes (an attack's target images) is still made with it.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager

from erase.errors import EraseError

FOLDER = "text_encoder"  # beside unet/ in an artifact, as in a diffusers pipeline folder


def text_encoder_folder(artifact: str | None) -> str | None:
    """The artifact's `text_encoder/` folder, or None when it has none (a UNet-only method)."""
    if not artifact:
        return None
    folder = os.path.join(artifact, FOLDER)
    return folder if os.path.isfile(os.path.join(folder, "config.json")) else None


def check_text_encoder_base(artifact: str, backend) -> None:
    """Refuse an artifact erased from other base weights than `backend`'s (metadata.json's
    `base_weights`, the base UNet's fingerprint); a folder without metadata.json (the authors'
    released encoder in `text_encoder/`) is checked by its shapes alone."""
    from erase.artifact import read_metadata
    from erase.data import unet_fingerprint

    metadata = read_metadata(artifact)
    recorded = metadata.get("base_weights") if isinstance(metadata, dict) else None
    if recorded and recorded != unet_fingerprint(backend.unet):
        raise EraseError(
            f"The text encoder in '{artifact}' was erased from '{metadata.get('base_model')}', "
            f"whose weights are not those of '{backend.identity}': pass that base model."
        )


def load_text_encoder(backend, artifact: str, flag: str = "--text-encoder"):
    """The erased text encoder of `artifact`, checked against `backend`'s base, on its device."""
    folder = text_encoder_folder(artifact)
    if folder is None:
        raise EraseError(
            f"{flag} '{artifact}' holds no {FOLDER}/: pass the output of a method that erases "
            "the text encoder (erase-concept --method advunlearn)."
        )
    check_text_encoder_base(artifact, backend)
    base = backend.text_encoders()[0][1]
    try:
        encoder = type(base).from_pretrained(folder)
    except Exception as error:  # transformers raises OSError, ValueError, ...
        raise EraseError(
            f"Could not load the text encoder in '{folder}' ({type(error).__name__}): the files "
            "are incomplete or corrupt; erase the model again."
        ) from None
    shape = ("hidden_size", "num_hidden_layers", "vocab_size", "max_position_embeddings")
    ours = [getattr(base.config, name, None) for name in shape]
    theirs = [getattr(encoder.config, name, None) for name in shape]
    if ours != theirs:
        raise EraseError(
            f"The text encoder in '{folder}' does not fit '{backend.identity}' (width, layers, "
            f"vocabulary, length {theirs} vs {ours}): pass the base model it was erased from."
        )
    return encoder.to(backend.device).eval().requires_grad_(False)


@contextmanager
def installed_text_encoder(backend, encoder):
    """While active, `encoder` is the pipeline's text encoder (None: nothing changes); the
    base's own stays on the backend (`base_text_encoder`) for what the base model makes."""
    if encoder is None:
        yield
        return
    base = backend.pipe.text_encoder
    backend.base_text_encoder = base
    backend.pipe.text_encoder = encoder
    backend.forget_prompt_embeddings()
    try:
        yield
    finally:
        backend.pipe.text_encoder = base
        backend.base_text_encoder = None
        backend.forget_prompt_embeddings()


def erased_text_encoder(backend, artifact: str | None, paired: str | None = None):
    """The text encoder an erased model reads prompts with: `paired` (--text-encoder) when
    given, else the artifact's own; None when neither has one (the base's stays)."""
    if paired:
        return load_text_encoder(backend, paired)
    if text_encoder_folder(artifact) is None or backend.conditioning != "text":
        return None
    return load_text_encoder(backend, artifact, "--unet")


@contextmanager
def base_text_encoder(backend):
    """While active, the pipeline reads prompts with the base model's own text encoder (when a
    reader installed an erased one)."""
    base = getattr(backend, "base_text_encoder", None)
    pipe = getattr(backend, "pipe", None)
    if base is None or pipe is None or pipe.text_encoder is base:
        yield
        return
    erased = pipe.text_encoder
    pipe.text_encoder = base
    backend.forget_prompt_embeddings()
    try:
        yield
    finally:
        pipe.text_encoder = erased
        backend.forget_prompt_embeddings()


@contextmanager
def restored_vocabulary(backend):
    """While active, tokens may be added to the backend's tokenizer(s) and text encoder(s)
    (FMN's and CCE's textual inversion); after, both are as they were (the added embedding rows
    dropped), so that a shared pipeline (erase-bench's rows, an API caller's) does not keep them.
    The tokenizers come back from a saved copy, not a deep copy: a deep copy of transformers'
    CLIPTokenizer loses its decode wrapper (the decoded text keeps its '</w>' suffixes)."""
    sizes = [
        encoder.get_input_embeddings().weight.shape[0] for _, encoder in backend.text_encoders()
    ]
    names = [n for n in ("tokenizer", "tokenizer_2") if getattr(backend.pipe, n, None) is not None]
    with tempfile.TemporaryDirectory(prefix="erase-tokenizers-") as folder:
        for name in names:
            getattr(backend.pipe, name).save_pretrained(os.path.join(folder, name))
        try:
            yield
        finally:
            for name in names:
                kind = type(getattr(backend.pipe, name))
                setattr(backend.pipe, name, kind.from_pretrained(os.path.join(folder, name)))
            for (_, encoder), size in zip(backend.text_encoders(), sizes):
                if encoder.get_input_embeddings().weight.shape[0] != size:
                    encoder.resize_token_embeddings(size)
                    encoder.get_input_embeddings().requires_grad_(False)  # a new layer: frozen
