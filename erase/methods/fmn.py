"""Forget-Me-Not: attention re-steering (Zhang et al., 2023; SHI-Labs/Forget-Me-Not, attn.yaml).

Over noised images of the concept seen under the concept's prompt, every cross-attention layer
records its attention probabilities, and the loss is their norm on the concept's token positions
(plus the end-of-text token, the reference's `use_pooler`): the UNet learns to stop looking at
the words that name the concept. With --fmn-ti-steps, a first stage learns a new token for the
concept from its images (textual inversion) and the attention is steered away from that token.
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
        default=0,
        metadata={
            "help": "Forget-Me-Not: steps of the optional textual-inversion first stage, which "
            "learns a token for the concept from its images and then steers attention away from "
            "that token (reference: 500, at lr 1e-3; 0 skips it)"
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
    loss_is_mean_over_samples = False  # a norm over the whole batch: no micro-batches

    def __init__(self, backend: Backend, concept: Concept, config: FMNConfig):
        if backend.conditioning != "text":
            raise EraseError(
                "Forget-Me-Not re-steers attention on prompt tokens, which a class-conditional "
                "model does not have: use --method salun or esd-u."
            )
        if config.fmn_ti_steps < 0:
            raise EraseError(f"--fmn-ti-steps must be 0 or more, got {config.fmn_ti_steps}.")
        if config.fmn_ti_steps and not hasattr(backend, "pipe"):
            raise EraseError(
                "--fmn-ti-steps needs a Stable Diffusion text encoder to learn a token in: "
                "leave it at 0 for this model."
            )
        if not any(backend.token_positions(str(p), concept.words) for p in concept.forget):
            raise EraseError(
                f"None of the concept's words {concept.words} appears in its forget prompts: "
                "give --forget-prompt texts that contain the concept's name."
            )
        self.backend, self.concept, self.config = backend, concept, config
        self.concept_token: str | None = None  # the learned token, after textual inversion

    def prepare(self, forget_latents: torch.Tensor, forget_conditions, generator) -> None:
        """Before training, with the whole forget set: the optional textual-inversion stage."""
        if self.config.fmn_ti_steps:
            self.concept_token = learn_concept_token(
                self.backend,
                forget_latents,
                [self.with_token(str(p), PLACEHOLDER) for p in forget_conditions],
                self.concept.words,
                self.config.fmn_ti_steps,
                generator,
            )

    def with_token(self, prompt: str, token: str | None) -> str:
        """`prompt` with the concept's words replaced by one `token` (unchanged for None)."""
        if token is None:
            return prompt
        words = "|".join(re.escape(word) for word in self.concept.words)
        return re.sub(rf"\b(?:{words})\b(?:\s+\b(?:{words})\b)*", token, prompt, flags=re.I)

    def steered(self, prompts) -> tuple[list[str], list[str]]:
        """The prompts the attention is measured on, and the words whose tokens are steered."""
        if self.config.fmn_ti_steps and self.concept_token is None:
            raise EraseError(
                "Forget-Me-Not's textual-inversion stage has not run: call the method's "
                "prepare() with the forget set before training, or leave --fmn-ti-steps at 0."
            )
        if self.concept_token is None:
            return [str(p) for p in prompts], self.concept.words
        return [self.with_token(str(p), self.concept_token) for p in prompts], [self.concept_token]

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
        """(B, L) bool: the concept's word tokens and the end-of-text token of each prompt."""
        words = self.concept.words if words is None else words
        positions = torch.zeros(len(prompts), length, dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            positions[row, self.backend.token_positions(str(prompt), words)] = True
            positions[row, self.backend.end_of_text_position(str(prompt))] = True
        return positions.to(self.backend.device)

    def attention(self, unet, forget: Batch, generator: torch.Generator) -> AttentionRecorder:
        """One forward pass over the noised forget batch with attention recorded."""
        _, timesteps, noisy = noised(self.backend, forget, generator)
        prompts, words = self.steered(forget.conditions)
        cond = self.backend.encode(prompts)  # (B, L, D)
        recorder = AttentionRecorder(self.concept_positions(prompts, cond.shape[1], words))
        with recording_attention(unet, recorder):
            self.backend.predict_noise(unet, noisy, timesteps, cond)
        return recorder

    def loss(self, unet, forget: Batch, retain: Batch, generator: torch.Generator):
        """Norm of the attention probabilities on the concept's tokens (retain batch unused)."""
        recorder = self.attention(unet, forget, generator)
        loss = recorder.loss()
        return loss, {"fmn": loss.item(), "attention_mass": recorder.mass()}

    @torch.no_grad()
    def attention_mass(self, unet, forget: Batch, generator: torch.Generator) -> float:
        """Mean attention mass on the concept's tokens for a batch (a measurement, no gradient)."""
        return self.attention(unet, forget, generator).mass()


# Textual inversion (reference configs/ti.yaml: lr 1e-3, batch 1, initialised from the concept's
# words). The reference learns up to four tokens with lora_pti; one token is learned here.
PLACEHOLDER = "<fmn-placeholder>"
TI_LR = 1e-3


def learn_concept_token(backend, latents, prompts, init_words, steps: int, generator) -> str:
    """Add a token to the SD backend's tokenizer and learn its embedding from `latents` (the
    concept's images) under `prompts` (holding PLACEHOLDER) by the denoising loss; returns it."""
    tokenizer, text_encoder = backend.pipe.tokenizer, backend.pipe.text_encoder
    token = f"<fmn-concept-{len(tokenizer)}>"  # new on every call: no stale cached embeddings
    tokenizer.add_tokens([token])
    token_id = tokenizer.convert_tokens_to_ids(token)
    text_encoder.resize_token_embeddings(len(tokenizer))
    embedding = text_encoder.get_input_embeddings().requires_grad_(False)
    init_ids = tokenizer(" ".join(init_words), add_special_tokens=False).input_ids
    vector = torch.nn.Parameter(embedding.weight[init_ids].detach().mean(0).clone())  # (D,)

    def insert_vector(module, inputs, output):  # (B, L, D): the learned vector at the token
        return torch.where((inputs[0] == token_id)[..., None], vector.to(output.dtype), output)

    prompts = [prompt.replace(PLACEHOLDER, token) for prompt in prompts]
    optimizer = torch.optim.Adam([vector], lr=TI_LR)
    order = torch.randperm(len(latents), generator=generator).tolist()
    hook = embedding.register_forward_hook(insert_vector)
    try:
        for step in range(steps):
            index = order[step % len(order)]
            batch = Batch(latents[index : index + 1], [prompts[index]])
            noise, timesteps, noisy = noised(backend, batch, generator)
            cond = text_encoder(backend.tokenize(batch.conditions).to(backend.device))[0]
            prediction = backend.predict_noise(backend.unet, noisy, timesteps, cond)
            loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
            (gradient,) = torch.autograd.grad(loss, [vector])  # the UNet gets no gradient
            vector.grad = gradient
            optimizer.step()
    finally:
        hook.remove()
    with torch.no_grad():
        embedding.weight[token_id] = vector.to(embedding.weight.dtype)
    return token
