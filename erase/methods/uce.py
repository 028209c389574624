"""UCE: unified concept editing (Gandikota et al., WACV 2024; rohitgandikota/unified-concept-editing).

A closed-form edit, no data and no training loop. Every cross-attention key and value projection
W (`attn2.to_k`, `attn2.to_v`) is replaced by the minimiser of

    erase_scale * sum_i ||W c_i - W_old g_i||^2        (the concept's key c_i reads as its guide's)
  + preserve_scale * sum_j ||W p_j - W_old p_j||^2     (the preserved concepts read as before)
  + lambda * ||W - W_old||_F^2,

that is W = (lambda W_old + e sum V* c^T + p sum W_old p p^T)(lambda I + e sum c c^T + p sum p p^T)^-1
(the paper's equation 7). A concept's embedding is the text encoder's output at its prompt's last
token (trainscripts/uce_sd_erase.py); on SDXL that is both encoders' hidden states side by side,
the input the UNet's projections read, so the edit reaches both. Several concepts are erased in
one solve. Every setting and its source: docs/methods.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from erase.concepts import Concept
from erase.errors import EraseError
from erase.methods import register
from erase.models.base import Backend

# trainscripts/uce_sd_erase.py: with no --guided_concepts an art style is guided to "art", any
# other concept to the empty prompt.
DEFAULT_GUIDES = {"style": "art"}
UNCONDITIONAL_GUIDE = ""


@dataclass
class UCEConfig:
    """UCE settings (reference trainscripts/uce_sd_erase.py defaults)."""

    uce_preserve: list[str] | None = field(
        default=None,
        metadata={
            "help": "UCE: a concept whose keys and values must not move (repeatable; reference "
            "--preserve_concepts, default none)"
        },
    )
    uce_guide: str | None = field(
        default=None,
        metadata={
            "help": "UCE: the concept the erased ones are mapped to (reference --guided_concepts; "
            "default 'art' for an artist style, the empty prompt otherwise)"
        },
    )
    uce_erase_scale: float = field(
        default=1.0, metadata={"help": "UCE: weight of the erase term (reference --erase_scale)"}
    )
    uce_preserve_scale: float = field(
        default=1.0,
        metadata={"help": "UCE: weight of the preserve term (reference --preserve_scale)"},
    )
    uce_lambda: float = field(
        default=0.5,
        metadata={
            "help": "UCE: weight of staying close to the original projections (reference --lamb)"
        },
    )


def is_edited(parameter_name: str) -> bool:
    """The weights UCE edits: cross-attention key and value projections (no bias in SD)."""
    return "attn2.to_k" in parameter_name or "attn2.to_v" in parameter_name


def closed_form(
    weight: torch.Tensor,
    erase_keys: torch.Tensor,
    guide_keys: torch.Tensor,
    preserve_keys: torch.Tensor,
    config: UCEConfig,
) -> torch.Tensor:
    """The edited (out, in) weight: equation 7 for one projection, solved in float64. Keys are
    rows: (n_erase, in) each for erase and guide, (n_preserve, in)."""
    old = weight.double()
    erase, guide, preserve = (k.to(old) for k in (erase_keys, guide_keys, preserve_keys))
    eye = torch.eye(old.shape[1], dtype=old.dtype, device=old.device)
    targets = guide @ old.T  # (n_erase, out): what the guide's keys read as now
    numerator = config.uce_lambda * old + config.uce_erase_scale * targets.T @ erase
    numerator = numerator + config.uce_preserve_scale * old @ preserve.T @ preserve
    gram = config.uce_lambda * eye + config.uce_erase_scale * erase.T @ erase
    gram = gram + config.uce_preserve_scale * preserve.T @ preserve  # (in, in), symmetric
    return torch.linalg.solve(gram, numerator.T).T.to(weight.dtype)


@register("uce")
class UCE:
    """Map the concept's keys and values to its guide's in closed form, keeping preserved ones."""

    Config = UCEConfig
    uses_mask = False
    needs_images = False
    text_only = True  # it edits how prompts are read: a class-conditional model has none

    def __init__(self, backend: Backend, concept: Concept, config: UCEConfig):
        if backend.conditioning != "text":
            raise EraseError(
                "UCE edits the cross-attention projections of prompt embeddings, which a "
                "class-conditional model does not have: use --method salun or esd-u."
            )
        if not any(is_edited(name) for name, _ in backend.unet.named_parameters()):
            raise EraseError(
                f"UCE finds no cross-attention projection (attn2.to_k/to_v) in the UNet of "
                f"{backend.identity}: use --method esd-u."
            )
        if config.uce_lambda <= 0 or config.uce_erase_scale < 0 or config.uce_preserve_scale < 0:
            raise EraseError(
                "--uce-lambda must be greater than 0 and --uce-erase-scale, --uce-preserve-scale "
                f"0 or more, got {config.uce_lambda}, {config.uce_erase_scale} and "
                f"{config.uce_preserve_scale}."
            )
        if any(not str(text).strip() for text in config.uce_preserve or []):
            raise EraseError("--uce-preserve must not be empty: give the text of a concept.")
        self.backend, self.concept, self.config = backend, concept, config

    @staticmethod
    def defaults(backend: Backend, concept: Concept, num_forget: int) -> dict:
        """No training settings: the edit is closed-form."""
        return {}

    def trainable(self, parameter_name: str) -> bool:
        """The weights the edit may change: `attn2.to_k` and `attn2.to_v`."""
        return is_edited(parameter_name)

    def edits(self) -> list[tuple[str, str]]:
        """(erased concept, its guide) pairs: each concept's bare terms ("nudity", "Van Gogh"),
        as the reference's --edit_concepts, each with its guide."""
        pairs = []
        for part in self.concept.parts or [self.concept]:
            guide = self.config.uce_guide
            if guide is None:
                guide = DEFAULT_GUIDES.get(part.kind, UNCONDITIONAL_GUIDE)
            pairs += [(str(term), guide) for term in part.terms]
        return list(dict.fromkeys(pairs))

    @torch.no_grad()
    def keys(self, texts: list[str]) -> torch.Tensor:
        """(N, D) text embeddings at each text's last token (the empty prompt: its start token),
        the rows UCE reads, as the reference takes them (attention mask sum - 2)."""
        if not texts:
            width = self.backend.encode([""]).shape[-1]
            return torch.zeros(0, width)
        embeddings = self.backend.encode(texts)  # (N, L, D); SDXL: a pooled row after, unread
        last = [self.backend.end_of_text_position(text) - 1 for text in texts]
        return embeddings[torch.arange(len(texts)), torch.tensor(last)].float().cpu()

    @torch.no_grad()
    def edit(self, unet: torch.nn.Module) -> dict:
        """Replace every cross-attention key and value projection of `unet` by its closed form,
        in place; what was edited, for metadata."""
        pairs = self.edits()
        preserve = [str(text) for text in self.config.uce_preserve or []]
        erase_keys = self.keys([concept for concept, _ in pairs])
        guide_keys = self.keys([guide for _, guide in pairs])
        preserve_keys = self.keys(preserve)
        edited = [(name, param) for name, param in unet.named_parameters() if self.trainable(name)]
        for _, param in edited:
            param.copy_(closed_form(param, erase_keys, guide_keys, preserve_keys, self.config))
        return {
            "erased": [concept for concept, _ in pairs],
            "guides": [guide for _, guide in pairs],
            "preserved": preserve,
            "edited_projections": len(edited),
        }
