"""Soft prompts: k free token embeddings put after a prompt's start token (`prefix_k`).

Both prefix attacks of the OPTML group read a prompt this way: UnlearnDiffAtk
(eval/attacks/unlearndiffatk.py) searches the k slots over the vocabulary, and AdvUnlearn
(erase/methods/advunlearn.py) attacks them in word-embedding space inside its training loop.
The text encoder reads the token ids of `prefixed_ids`; a forward hook on its token-embedding
layer puts the soft embeddings at the slots (`soft_tokens`).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def prompt_words(tokenizer, prompt: str, k: int) -> list[int]:
    """The prompt's tokens that fit after the start token and k prefix slots, before the end."""
    return tokenizer(prompt, add_special_tokens=False).input_ids[
        : tokenizer.model_max_length - k - 2
    ]


def ids_for_text_encoder(tokenizer, token_ids: list[int]) -> torch.Tensor:
    """Recorded prompt tokens as the text encoder reads them (1, L): start, tokens, end, padding."""
    length = tokenizer.model_max_length
    ids = [tokenizer.bos_token_id, *token_ids[: length - 2], tokenizer.eos_token_id]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return torch.tensor([ids + [pad] * (length - len(ids))])


def prefixed_ids(tokenizer, prompt: str, k: int) -> torch.Tensor:
    """Token ids (1, L): start token, k slots for the adversarial tokens, the prompt, end, padding."""
    slot = tokenizer.bos_token_id  # replaced by the soft tokens; never the end token (pooling)
    return ids_for_text_encoder(tokenizer, [*[slot] * k, *prompt_words(tokenizer, prompt, k)])


def with_prefix(ids: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """`ids` (1, L) from prefixed_ids with its k slots holding the tokens `prefix` (k,)."""
    filled = ids.clone()
    filled[0, 1 : 1 + len(prefix)] = prefix.to(ids.device, ids.dtype)
    return filled


@contextmanager
def soft_tokens(text_encoder, embeddings: torch.Tensor, start: int = 1):
    """While active, the token embeddings at positions start..start+k-1 are `embeddings` (k, D)."""

    def replace(module, inputs, output):  # output: (B, L, D) token embeddings
        output = output.clone()
        output[:, start : start + len(embeddings)] = embeddings.to(output.dtype)
        return output

    handle = text_encoder.get_input_embeddings().register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()


def prefixed_condition(text_encoder, ids: torch.Tensor, embeddings: torch.Tensor, run=None):
    """The UNet's conditioning (B, L, D) for `ids` (B, L) from prefixed_ids with the soft tokens
    `embeddings` (k, D) in its slots; `run` is the module to call (a wrapped `text_encoder`,
    whose embedding layer the hook is put on), `text_encoder` itself by default."""
    with soft_tokens(text_encoder, embeddings):
        return (run or text_encoder)(ids.to(embeddings.device))[0]


def random_token_embeddings(text_encoder, tokenizer, k: int, generator) -> torch.Tensor:
    """(k, D) copies of the embeddings of k tokens drawn uniformly from the vocabulary, a soft
    prefix's start (AdvUnlearn's `attack_init random`)."""
    vocabulary = len(tokenizer.get_vocab())
    token_ids = torch.randint(0, vocabulary, (k,), generator=generator)
    table = text_encoder.get_input_embeddings().weight.detach()
    return table[token_ids.to(table.device)].float().clone()
