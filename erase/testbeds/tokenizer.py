"""A small CLIP tokenizer built in code, for models trained here (tests, the digits testbeds).

CLIP's BPE needs a vocabulary and merge rules; no file can be downloaded here, so they are made
from a word list: every word becomes one token (plus single characters for anything else).
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import pre_tokenizers
from transformers import CLIPTokenizer


def build_word_tokenizer(words: Iterable[str], max_length: int = 16) -> CLIPTokenizer:
    """A CLIPTokenizer whose vocabulary holds every byte, and each of `words` as one token."""
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab_list = byte_chars + [ch + "</w>" for ch in byte_chars]
    merges: list[tuple[str, str]] = []
    for word in sorted({w.lower() for text in words for w in text.split()}):
        if len(word) < 2:
            continue
        # Merge left to right: "n u", "nu d", "nud e</w>" build "nude</w>".
        piece = word[0]
        for index, char in enumerate(word[1:], start=1):
            char = char + ("</w>" if index == len(word) - 1 else "")
            merged = piece + char
            if (piece, char) not in merges:
                merges.append((piece, char))
            if merged not in vocab_list:
                vocab_list.append(merged)
            piece = merged
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(vocab_list))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
