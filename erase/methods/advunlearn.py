"""AdvUnlearn: defensive unlearning with adversarial training (Zhang et al., NeurIPS 2024;
OPTML-Group/AdvUnlearn, train-scripts/AdvUnlearn.py).

The text encoder is erased, the UNet never moves. Each iteration trains the encoder with ESD's
loss (erase/methods/esd.py: x_t partially sampled under the concept at guidance 3, the frozen
prediction guided away from it as target) on the concept's prompt, read by the encoder being
trained, plus a retain term: on a batch of retain prompts the trained encoder must give the
UNet's prediction that the original encoder gives. After the warm-up iterations the concept's
prompt is first attacked: a soft prefix of k word embeddings (erase/softprompt.py, the
`prefix_k` slots UnlearnDiffAtk attacks too) is optimised for `attack_steps` Adam steps to make
the erased model predict what the original predicts under the concept; the iteration then
trains on the prompt with that prefix. Every setting and its source: docs/methods.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import resources

import torch

from erase.concepts import Concept
from erase.errors import EraseError
from erase.methods import esd, register
from erase.methods.esd import ESDConfig, negatively_guided, partial_sample
from erase.models.base import Backend, Batch
from erase.softprompt import prefixed_condition, prefixed_ids, random_token_embeddings

# Our stand-in for the reference's coco_object retain prompts (data/prompts/train/
# coco_object_retain.csv, "a photo of <object>"): the same wording over the 80 COCO categories.
COCO_OBJECTS = "coco-objects"
CONCEPT_RETAIN = "concept"  # the concept's own retain prompts (a testbed's other classes)
# CLIPTextModel's weights (under `text_model.` in older transformers releases)
ENCODER_LAYERS = "encoder.layers."
FINAL_LAYER_NORM = "final_layer_norm."


@dataclass
class AdvUnlearnConfig:
    """AdvUnlearn settings (the README's command over train-scripts/AdvUnlearn.py's defaults)."""

    # ESD's eta, one setting for both (AdvUnlearn's --negative_guidance is 1 too)
    negative_guidance: float = field(
        default=1.0, metadata=ESDConfig.__dataclass_fields__["negative_guidance"].metadata
    )
    advunlearn_layers: str = field(
        default="full",
        metadata={
            "help": "AdvUnlearn: the text-encoder weights trained: 'full' (every transformer "
            "layer and the final layer norm, the reference's text_encoder_full) or layer indices "
            "like '0' or '0,1' (its text_encoder_layer0 ... variants)"
        },
    )
    advunlearn_attack_steps: int = field(
        default=30, metadata={"help": "AdvUnlearn: Adam steps of the inner attack (--attack_step)"}
    )
    advunlearn_prefix_tokens: int = field(
        default=1,
        metadata={"help": "AdvUnlearn: soft tokens of the attack's prefix (--adv_prompt_num)"},
    )
    advunlearn_attack_lr: float = field(
        default=1e-3, metadata={"help": "AdvUnlearn: the attack's Adam lr (--attack_lr)"}
    )
    advunlearn_warmup: int = field(
        default=200,
        metadata={
            "help": "AdvUnlearn: iterations trained before the attack starts (--warmup_iter)"
        },
    )
    advunlearn_retain: str | None = field(
        default=None,
        metadata={
            "help": "AdvUnlearn: the retain prompts, 'coco-objects' (erase's 80 'a photo of "
            "<COCO object>' prompts, for the reference's coco_object set), 'concept' (the "
            "concept's retain prompts; the testbeds' default) or a TXT/CSV prompt file"
        },
    )
    advunlearn_retain_weight: float = field(
        default=0.3, metadata={"help": "AdvUnlearn: weight of the retain term (--retain_loss_w)"}
    )
    advunlearn_retain_batch: int = field(
        default=5, metadata={"help": "AdvUnlearn: retain prompts per iteration (--retain_batch)"}
    )


def layer_indices(layers: str, count: int) -> list[int] | None:
    """The encoder layers `advunlearn_layers` names (None for 'full'), or a one-line error."""
    if layers.strip().lower() == "full":
        return None
    try:
        indices = sorted({int(part) for part in layers.split(",")})
    except ValueError:
        indices = []
    if not indices or indices[0] < 0 or indices[-1] >= count:
        raise EraseError(
            f"--advunlearn-layers must be 'full' or layer indices from 0 to {count - 1} like "
            f"'0,1', got '{layers}'."
        )
    return indices


def retain_prompts(choice: str, concept: Concept) -> list[str]:
    """The retain prompt set `advunlearn_retain` names."""
    from prompts import load_prompt_file

    if choice == COCO_OBJECTS:
        text = resources.files("prompts").joinpath("coco_objects.txt").read_text()
        return [line.strip() for line in text.splitlines() if line.strip()]
    if choice == CONCEPT_RETAIN:
        return [str(prompt) for prompt in concept.retain]
    if not os.path.isfile(choice):
        raise EraseError(
            f"--advunlearn-retain must be '{COCO_OBJECTS}', '{CONCEPT_RETAIN}' or a prompt file, "
            f"got '{choice}'."
        )
    return [entry.prompt for entry in load_prompt_file(choice)]


@register("advunlearn")
class AdvUnlearn:
    """ESD's loss on the text encoder, against a soft-prefix attack found each iteration."""

    Config = AdvUnlearnConfig
    uses_mask = False
    needs_images = False  # x_t is sampled, as ESD does
    runs_text_encoder = True  # the encoder is what trains: it stays on the device
    trains_text_encoder = True
    text_only = True  # it erases in the text encoder: a class-conditional model has none

    def __init__(self, backend: Backend, concept: Concept, config: AdvUnlearnConfig):
        if backend.conditioning != "text":
            raise EraseError(
                "AdvUnlearn trains the text encoder, which a class-conditional model does not "
                "have: use --method salun or esd-u."
            )
        if len(backend.text_encoders()) != 1:
            raise EraseError(
                f"AdvUnlearn trains the one text encoder of SD v1.x/2.x; '{backend.identity}' "
                "has two (SDXL): use --method esd-x or uce for it."
            )
        for name, minimum in (
            ("advunlearn_attack_steps", 0),
            ("advunlearn_prefix_tokens", 1),
            ("advunlearn_warmup", 0),
            ("advunlearn_retain_batch", 1),
            ("advunlearn_retain_weight", 0),
            ("advunlearn_attack_lr", 0),
        ):
            if getattr(config, name) < minimum:
                flag = "--" + name.replace("_", "-")
                raise EraseError(f"{flag} must be {minimum} or more, got {getattr(config, name)}.")
        self.tokenizer, self.encoder = backend.text_encoders()[0]
        self.layers = layer_indices(config.advunlearn_layers, self.encoder.config.num_hidden_layers)
        self.backend, self.concept, self.config = backend, concept, config
        self.retain = retain_prompts(config.advunlearn_retain or COCO_OBJECTS, concept)
        if not self.retain:
            raise EraseError("AdvUnlearn's retain prompt set is empty: pass --advunlearn-retain.")
        # The original encoder's embeddings of every prompt the targets read, taken before the
        # encoder moves (the reference reads them from the frozen copy, model_orig).
        texts = [*self.concept.terms, "", *self.retain]
        with torch.no_grad():
            self.original = dict(zip(texts, backend.encode(texts).clone()))  # text -> (L, D)
        self.step = 0

    @staticmethod
    def defaults(backend: Backend, concept: Concept, num_forget: int) -> dict:
        """The README's run: Adam, lr 1e-5, 1000 iterations of one concept prompt; the retain set
        coco_object (a testbed's own retain prompts where it says so)."""
        settings = dict(lr=1e-5, batch_size=1, steps=1000, max_grad_norm=None, optimizer="adam")
        settings["advunlearn_retain"] = COCO_OBJECTS
        settings.update(backend.method_defaults.get("advunlearn", {}))
        return settings

    def trainable(self, parameter_name: str) -> bool:
        """text_encoder_full: every transformer layer and the final layer norm (not the token
        and position embeddings); a layer list: only those layers."""
        name = parameter_name.removeprefix("text_model.")
        if self.layers is None:
            return name.startswith((ENCODER_LAYERS, FINAL_LAYER_NORM))
        return name.startswith(tuple(f"{ENCODER_LAYERS}{i}." for i in self.layers))

    def begin_step(self, step: int) -> None:
        """The trainer says which iteration starts: the attack runs from the warm-up's end on."""
        self.step = step

    def embeddings(self, texts) -> torch.Tensor:
        """(B, L, D) the original encoder's embeddings of `texts`."""
        return torch.stack([self.original[str(text)] for text in texts]).to(self.backend.device)

    def attack(self, word: str, shape, generator) -> tuple[torch.Tensor, float]:
        """The soft prefix (k, D) that makes the erased model predict, under the prefixed `word`,
        what the original predicts under `word` (the reference's soft_prompt_attack, pgd), and
        its last loss. Only the prefix gets gradients; the encoder runs unwrapped (no process
        synchronises a backward that reaches no weight)."""
        backend, unet, config = self.backend, self.backend.unet, self.config
        concept, unconditional = self.embeddings([word]), self.embeddings([""])
        prefix = random_token_embeddings(
            self.encoder, self.tokenizer, config.advunlearn_prefix_tokens, generator
        ).requires_grad_(True)  # (k, D)
        optimizer = torch.optim.Adam([prefix], lr=config.advunlearn_attack_lr)
        ids = prefixed_ids(self.tokenizer, word, config.advunlearn_prefix_tokens)  # (1, L)
        loss = torch.zeros(())
        for _ in range(config.advunlearn_attack_steps):
            noisy, timesteps = partial_sample(
                backend, unet, concept, unconditional, shape, generator
            )
            with torch.no_grad():
                wanted = backend.predict_noise(unet, noisy, timesteps, concept).float()
            cond = prefixed_condition(self.encoder, ids, prefix.to(backend.device))
            prediction = backend.predict_noise(unet, noisy, timesteps, cond)
            loss = torch.nn.functional.mse_loss(prediction.float(), wanted)
            (prefix.grad,) = torch.autograd.grad(loss, [prefix])
            optimizer.step()
        return prefix.detach(), loss.item()

    def forget_condition(self, text_encoder, word: str, shape, generator):
        """The trained encoder's reading of the concept prompt, attacked after the warm-up:
        ((1, L, D) conditioning, the attack's last loss or None)."""
        config = self.config
        if self.step < config.advunlearn_warmup or not config.advunlearn_attack_steps:
            ids = self.backend.tokenize([word]).to(self.encoder.device)
            return text_encoder(ids)[0].to(self.backend.device), None
        prefix, attack_loss = self.attack(word, shape, generator)
        ids = prefixed_ids(self.tokenizer, word, config.advunlearn_prefix_tokens)
        return prefixed_condition(self.encoder, ids, prefix, text_encoder), attack_loss

    def loss(self, text_encoder, forget: Batch, retain: Batch, generator: torch.Generator):
        """ESD's loss on the (attacked) concept prompt + weight x the retain term; `text_encoder`
        is the trained module (the forget and retain batches give only the latents' shape)."""
        backend, unet, config = self.backend, self.backend.unet, self.config
        terms = self.concept.terms  # a random concept word per iteration, as ESD
        word = str(terms[int(torch.randint(0, len(terms), (1,), generator=generator))])
        shape = (1, *forget.latents.shape[1:])
        cond, attack_loss = self.forget_condition(text_encoder, word, shape, generator)
        # The forget and retain samples stop at one DDIM step, as the reference's do.
        stop = int(torch.randint(0, esd.SAMPLING_STEPS, (1,), generator=generator))
        concept, unconditional = self.embeddings([word]), self.embeddings([""])
        noisy, timesteps = partial_sample(
            backend, unet, concept, unconditional, shape, generator, stop
        )
        target = negatively_guided(
            backend, unet, noisy, timesteps, concept, unconditional, config.negative_guidance
        )
        prediction = backend.predict_noise(unet, noisy, timesteps, cond)
        forget_loss = torch.nn.functional.mse_loss(prediction.float(), target)

        order = torch.randperm(len(self.retain), generator=generator)[
            : config.advunlearn_retain_batch
        ]
        prompts = [self.retain[i] for i in order.tolist()]
        original = self.embeddings(prompts)  # (R, L, D)
        retain_noisy, retain_timesteps = partial_sample(
            backend, unet, original, self.embeddings([""] * len(prompts)),
            (len(prompts), *shape[1:]), generator, stop,
        )  # fmt: skip
        with torch.no_grad():
            kept = backend.predict_noise(unet, retain_noisy, retain_timesteps, original).float()
        trained = text_encoder(backend.tokenize(prompts).to(self.encoder.device))[0]
        retain_prediction = backend.predict_noise(
            unet, retain_noisy, retain_timesteps, trained.to(backend.device)
        )
        retain_loss = torch.nn.functional.mse_loss(retain_prediction.float(), kept)
        loss = forget_loss + config.advunlearn_retain_weight * retain_loss
        terms = {"esd": forget_loss.item(), "retain": retain_loss.item()}
        if attack_loss is not None:
            terms["attack"] = attack_loss
        return loss, terms
