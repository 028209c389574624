"""Forget-Me-Not: attention re-steering (Zhang et al., 2023; SHI-Labs/Forget-Me-Not, attn.yaml).

Two stages, as the reference runs them (`use_ti: true`). First, textual inversion learns four
new tokens for each concept from its images (configs/ti.yaml: AdamW, lr 1e-3, weight decay 0.1,
500 steps, prompts "a photo of {}" / "a photo in the style of {}"). Then, over noised images of
the concept seen under its prompt with the concept's words replaced by those tokens, every
cross-attention layer records its attention probabilities, and the loss is their norm on the
tokens' positions plus every end-of-text position (`use_pooler`; on SD v1.x the padding is the
end-of-text token, so every padding position too): the UNet learns to stop looking at the
concept. `--fmn-ti-steps 0` skips the first stage and steers the concept's own words. Every
setting and its source: docs/methods.md.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from erase.concepts import Concept
from erase.errors import EraseError
from erase.methods import noised, register
from erase.models.base import Backend, Batch


@dataclass
class FMNConfig:
    """Forget-Me-Not settings (reference configs/attn.yaml)."""

    fmn_cross_attention_only: bool = field(
        default=False,
        metadata={
            "help": "Forget-Me-Not: train only cross-attention (attn2) weights instead of the "
            "whole UNet (reference: only_optimize_ca)"
        },
    )
    fmn_ti_steps: int = field(
        default=500,
        metadata={
            "help": "Forget-Me-Not: steps of the textual-inversion first stage, which learns "
            "tokens for the concept from its images; attention is then steered away from those "
            "tokens (reference ti.yaml: 500; 0 skips the stage and steers the concept's words)"
        },
    )
    fmn_ti_tokens: int = field(
        default=4,
        metadata={
            "help": "Forget-Me-Not: tokens learned per concept by textual inversion "
            "(reference ti.yaml: <s1>|<s2>|<s3>|<s4>)"
        },
    )


class AttentionRecorder:
    """Collects, over every cross-attention layer of one forward pass, the attention probabilities
    that fall on the concept's token positions."""

    def __init__(self, concept_positions: torch.Tensor):
        self.concept_positions = concept_positions  # (B, L) bool
        self.squared_sum = 0.0  # sum of squared probabilities on the concept tokens, all layers
        self.masses: list[torch.Tensor] = []  # per layer: mean probability mass on those tokens

    def record(self, attention_probs: torch.Tensor, heads: int) -> None:
        """Add one layer's probabilities (B * heads, Q, L), batch-major as diffusers lays them out."""
        batch = self.concept_positions.shape[0]
        probs = attention_probs.view(batch, heads, *attention_probs.shape[1:])  # (B, H, Q, L)
        on_concept = probs * self.concept_positions[:, None, None, :].to(probs.dtype)
        self.squared_sum = self.squared_sum + on_concept.float().pow(2).sum()
        self.masses.append(on_concept.detach().float().sum(-1).mean())

    def loss(self) -> torch.Tensor:
        """The reference's loss: the L2 norm of all recorded concept-token probabilities."""
        if not self.masses:
            raise EraseError("Forget-Me-Not found no cross-attention layer (attn2) in this UNet.")
        return self.squared_sum.sqrt()

    def mass(self) -> float:
        """Mean attention probability mass on the concept tokens, over layers, heads and pixels."""
        return torch.stack(self.masses).mean().item()


class RecordingAttnProcessor:
    """diffusers' plain AttnProcessor with the softmax probabilities handed to a recorder."""

    def __init__(self, recorder: AttentionRecorder):
        self.recorder = recorder

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None
    ):
        """Cross-attention of `hidden_states` over `encoder_hidden_states`, probabilities recorded."""
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, sequence_length, _ = context.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query = attn.head_to_batch_dim(query)  # (B * heads, Q, d)
        key = attn.head_to_batch_dim(attn.to_k(context))  # (B * heads, L, d)
        value = attn.head_to_batch_dim(attn.to_v(context))
        attention_probs = attn.get_attention_scores(query, key, attention_mask)  # (B*heads, Q, L)
        self.recorder.record(attention_probs, attn.heads)
        hidden_states = attn.batch_to_head_dim(torch.bmm(attention_probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # projection, dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(
                batch_size, channel, height, width
            )
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextmanager
def recording_attention(unet: torch.nn.Module, recorder: AttentionRecorder):
    """Install recording processors on every cross-attention layer; restore the old ones after,
    so sampling and saving see a plain diffusers UNet."""
    layers = [m for name, m in unet.named_modules() if name.endswith("attn2")]
    originals = [layer.processor for layer in layers]
    try:
        for layer in layers:
            layer.set_processor(RecordingAttnProcessor(recorder))
        yield recorder
    finally:
        for layer, original in zip(layers, originals):
            layer.set_processor(original)


@register("fmn")
class ForgetMeNot:
    """Minimise cross-attention on the concept's tokens over images of the concept."""

    Config = FMNConfig
    uses_mask = False
    needs_images = True
    # Its recording attention processors are gone when backward would recompute the forward.
    gradient_checkpointing = False
    runs_text_encoder = True  # textual inversion trains token vectors through the encoder
    loss_is_mean_over_samples = False  # a norm over the whole batch: no micro-batches

    def __init__(self, backend: Backend, concept: Concept, config: FMNConfig):
        if backend.conditioning != "text":
            raise EraseError(
                "Forget-Me-Not re-steers attention on prompt tokens, which a class-conditional "
                "model does not have: use --method salun or esd-u."
            )
        if config.fmn_ti_steps < 0 or config.fmn_ti_tokens < 1:
            raise EraseError(
                "--fmn-ti-steps must be 0 or more and --fmn-ti-tokens 1 or more, got "
                f"{config.fmn_ti_steps} and {config.fmn_ti_tokens}."
            )
        if config.fmn_ti_steps and backend.conditioning != "text":
            raise EraseError(
                "Forget-Me-Not's textual-inversion stage needs a Stable Diffusion text encoder "
                "to learn tokens in: pass --fmn-ti-steps 0 for this model."
            )
        if not any(backend.token_positions(str(p), concept.words) for p in concept.forget):
            raise EraseError(
                f"None of the concept's words {concept.words} appears in its forget prompts: "
                "give --forget-prompt texts that contain the concept's name."
            )
        self.backend, self.concept, self.config = backend, concept, config
        self.parts = concept.parts or [concept]
        self.concept_tokens: list[str] | None = None  # per part, after textual inversion

    def prepare(self, forget_latents: torch.Tensor, forget_conditions, generator) -> None:
        """Before training, with the whole forget set: textual inversion, one snippet of
        `fmn_ti_tokens` new tokens per concept, learned from that concept's images."""
        if not self.config.fmn_ti_steps:
            return
        snippets = []
        for part in self.parts:
            chosen = [i for i, c in enumerate(forget_conditions) if c in part.forget]
            chosen = chosen or list(range(len(forget_conditions)))
            template = STYLE_TEMPLATE if part.kind == "style" else OBJECT_TEMPLATE
            snippets.append(
                learn_concept_tokens(
                    self.backend,
                    forget_latents[chosen],
                    template,
                    part.words,
                    self.config.fmn_ti_tokens,
                    self.config.fmn_ti_steps,
                    generator,
                )
            )
        self.concept_tokens = snippets

    def part_of(self, prompt) -> int:
        """Index of the concept (of a several-concept run) a forget prompt belongs to."""
        return next((i for i, p in enumerate(self.parts) if prompt in p.forget), 0)

    def with_token(self, prompt: str, token: str | None, words=None) -> str:
        """`prompt` with the concept's words replaced by `token` (unchanged for None)."""
        if token is None:
            return prompt
        words = "|".join(re.escape(word) for word in (words or self.concept.words))
        return re.sub(rf"\b(?:{words})\b(?:\s+\b(?:{words})\b)*", token, prompt, flags=re.I)

    def steered(self, prompts) -> tuple[list[str], list[str]]:
        """The prompts the attention is measured on, and the words whose tokens are steered."""
        if self.config.fmn_ti_steps and self.concept_tokens is None:
            raise EraseError(
                "Forget-Me-Not's textual-inversion stage has not run: call the method's "
                "prepare() with the forget set before training, or pass --fmn-ti-steps 0."
            )
        if self.concept_tokens is None:
            return [str(p) for p in prompts], self.concept.words
        steered = []
        for prompt in prompts:
            part = self.part_of(prompt)
            steered.append(
                self.with_token(str(prompt), self.concept_tokens[part], self.parts[part].words)
            )
        tokens = [token for snippet in self.concept_tokens for token in snippet.split()]
        return steered, tokens

    @staticmethod
    def defaults(backend: Backend, concept: Concept, num_forget: int) -> dict:
        """Reference configs/attn.yaml: AdamW (weight decay 0.01), lr 2e-6, batch 1, 35 steps,
        grad norm 1."""
        return dict(
            lr=2e-6, batch_size=1, steps=35, max_grad_norm=1.0, optimizer="adamw", weight_decay=0.01
        )

    def trainable(self, parameter_name: str) -> bool:
        """The whole UNet, or only cross-attention with --fmn-cross-attention-only."""
        return not self.config.fmn_cross_attention_only or "attn2" in parameter_name

    def concept_positions(self, prompts, length: int, words=None) -> torch.Tensor:
        """(B, L) bool: the concept's tokens and every end-of-text token of each prompt."""
        words = self.concept.words if words is None else words
        positions = torch.zeros(len(prompts), length, dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            positions[row, self.backend.token_positions(str(prompt), words)] = True
            positions[row, end_of_text_positions(self.backend, str(prompt))] = True
        return positions.to(self.backend.device)

    def attention(self, unet, forget: Batch, generator: torch.Generator) -> AttentionRecorder:
        """One forward pass over the noised forget batch with attention recorded."""
        _, timesteps, noisy = noised(self.backend, forget, generator)
        prompts, words = self.steered(forget.conditions)
        cond = self.backend.encode(prompts)  # (B, L, D); SDXL: an extra pooled row, not attended
        length = self.backend.tokenize(prompts[:1]).shape[1]  # what cross-attention attends over
        recorder = AttentionRecorder(self.concept_positions(prompts, length, words))
        with recording_attention(unet, recorder):
            self.backend.predict_noise(unet, noisy, timesteps, cond)
        return recorder

    def loss(self, unet, forget: Batch, retain: Batch, generator: torch.Generator):
        """Norm of the attention probabilities on the concept's tokens (retain batch unused)."""
        recorder = self.attention(unet, forget, generator)
        loss = recorder.loss()
        return loss, {"fmn": loss.item(), "attention_mass": recorder.mass()}

    def forget_loss(self, unet, forget: Batch, retain: Batch, generator: torch.Generator):
        """Forget-Me-Not's loss is its forget objective whole (it has no retain term)."""
        return self.loss(unet, forget, retain, generator)

    @torch.no_grad()
    def attention_mass(self, unet, forget: Batch, generator: torch.Generator) -> float:
        """Mean attention mass on the concept's tokens for a batch (a measurement, no gradient)."""
        return self.attention(unet, forget, generator).mass()


def end_of_text_positions(backend, prompt: str) -> list[int]:
    """Every position of the end-of-text token in `prompt`'s padded ids: on SD v1.x, whose
    tokenizer pads with it, the padding too (the reference's `use_pooler` matches them all)."""
    ids = backend.tokenize([prompt])[0].tolist()
    end_of_text = backend.pipe.tokenizer.eos_token_id
    return [position for position, token in enumerate(ids) if token == end_of_text]


# Textual inversion, reference configs/ti.yaml and src/train_ti.py: AdamW, lr 1e-3, weight decay
# 0.1, batch 1; the first tokens start from the concept's words, the rest from N(0, 0.017^2);
# after each step the embeddings' norms are pulled toward 0.4 (`clip_ti_decay`).
OBJECT_TEMPLATE = "a photo of {}"  # reference src/dataset.py OBJECT_TEMPLATE
STYLE_TEMPLATE = "a photo in the style of {}"  # and STYLE_TEMPLATE
TI_LR = 1e-3
TI_WEIGHT_DECAY = 0.1
TI_RANDOM_INIT_STD = 0.017
TI_TARGET_NORM = 0.4


def learn_concept_tokens(
    backend,
    latents,
    template: str,
    init_words,
    num_tokens: int,
    steps: int,
    generator,
    unet=None,
    name: str = "fmn",
    lr: float = TI_LR,
    target_norm: float | None = TI_TARGET_NORM,
) -> str:
    """Add `num_tokens` tokens to the backend's tokenizer(s) and learn their embeddings in each
    text encoder (SDXL: both) from `latents` (the concept's images) under `template` by the
    denoising loss of `unet` (default: the backend's); returns the snippet of the tokens,
    space-separated, to put where the concept's words were. `target_norm` None leaves the
    norms free (plain textual inversion, as concept inversion uses it)."""
    unet = unet if unet is not None else backend.unet
    encoders = backend.text_encoders()  # [(tokenizer, text encoder)]
    first = len(encoders[0][0])  # new names on every call: no stale cached prompt embeddings
    tokens = [f"<{name}-{first + i}>" for i in range(num_tokens)]
    learned = [
        new_token_vectors(tokenizer, encoder, tokens, init_words, generator)
        for tokenizer, encoder in encoders
    ]  # per encoder: (embedding layer, token ids, (K, D) vectors)
    snippet = " ".join(tokens)
    prompt = template.format(snippet)
    vectors = [vectors for _, _, vectors in learned]
    optimizer = torch.optim.AdamW(vectors, lr=lr, weight_decay=TI_WEIGHT_DECAY)
    order = torch.randperm(len(latents), generator=generator).tolist()
    hooks = [
        embedding.register_forward_hook(inserting(ids, vectors))
        for embedding, ids, vectors in learned
    ]
    try:
        for step in range(steps):
            index = order[step % len(order)]
            batch = Batch(latents[index : index + 1], [prompt])
            target, timesteps, noisy = noised(backend, batch, generator)
            cond = backend.embed(batch.conditions)  # through the hooks: gradients reach vectors
            prediction = backend.predict_noise(unet, noisy, timesteps, cond)
            loss = torch.nn.functional.mse_loss(prediction.float(), target.float())
            gradients = torch.autograd.grad(loss, vectors)  # the UNet gets no gradient
            for parameter, gradient in zip(vectors, gradients):
                parameter.grad = gradient
            optimizer.step()
            if target_norm is None:
                continue
            with torch.no_grad():  # clip_ti_decay: norms drift toward 0.4
                pull = min(1.0, 100 * lr)
                for parameter in vectors:
                    norms = parameter.norm(dim=-1, keepdim=True)
                    parameter.copy_(
                        torch.nn.functional.normalize(parameter, dim=-1)
                        * (norms + pull * (target_norm - norms))
                    )
    finally:
        for hook in hooks:
            hook.remove()
    with torch.no_grad():
        for embedding, ids, parameter in learned:
            embedding.weight[ids] = parameter.to(embedding.weight.dtype)
    return snippet


def new_token_vectors(tokenizer, text_encoder, tokens, init_words, generator):
    """Add `tokens` to one tokenizer and its encoder: (embedding layer, token ids, (K, D) vectors
    to learn), the first vectors starting from the concept's words, the rest random."""
    tokenizer.add_tokens(tokens)
    token_ids = tokenizer.convert_tokens_to_ids(tokens)
    text_encoder.resize_token_embeddings(len(tokenizer))
    embedding = text_encoder.get_input_embeddings().requires_grad_(False)
    init_ids = tokenizer(" ".join(init_words), add_special_tokens=False).input_ids
    initial = TI_RANDOM_INIT_STD * torch.randn(
        len(tokens), embedding.weight.shape[1], generator=generator
    )  # (K, D)
    for i, token_id in enumerate(init_ids[: len(tokens)]):
        initial[i] = embedding.weight[token_id].detach().float().cpu()
    vectors = torch.nn.Parameter(initial.to(embedding.weight.device))
    return embedding, token_ids, vectors


def inserting(token_ids: list[int], vectors: torch.nn.Parameter):
    """A forward hook for an embedding layer that puts `vectors` at the tokens `token_ids`."""
    id_tensor = torch.tensor(token_ids, device=vectors.device)

    def insert_vectors(module, inputs, output):  # (B, L, D): the learned vectors at the tokens
        where = inputs[0][..., None] == id_tensor  # (B, L, K)
        learned = where.to(output.dtype) @ vectors.to(output.dtype)  # (B, L, D)
        return torch.where(where.any(-1, keepdim=True), learned, output)

    return insert_vectors
