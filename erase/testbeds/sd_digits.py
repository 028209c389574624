"""`sd-digits`: a small text-to-image model in Stable Diffusion's own format, trained on CPU.

Text encoder, tokenizer, UNet with cross-attention and VAE, saved as a diffusers
StableDiffusionPipeline folder, trained from scratch on scikit-learn's handwritten digits with
captions such as "a handwritten digit three". It is the benchmark's embedded testbed: every
method, Forget-Me-Not's cross-attention steering included, runs on it unchanged, and a digit
classifier scores forgetting and retention on captions from held-out templates.
"""

from __future__ import annotations

import copy
import os
import shutil
import sys
import uuid
from dataclasses import dataclass

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
)
from tqdm.auto import tqdm

from erase.concepts import Concept
from erase.errors import EraseError
from erase.models import quiet_loading
from erase.models.sd import StableDiffusionBackend
from erase.testbeds.digits import DIGIT_NAMES, digits_dataset
from erase.testbeds.small_sd import as_pipeline, small_sd_components
from erase.threads import cpu_threads

# Captions the model is trained on, and held-out ones that only evaluation uses.
TRAIN_TEMPLATES = ["a handwritten digit {name}", "the number {number}", "a drawing of a {number}"]
HELD_OUT_TEMPLATES = ["a picture of the digit {name}", "an image of number {number}"]
# Words only the held-out captions use: never shown in training, not even as filler words.
HELD_OUT_ONLY = ["picture", "image", "an"]
CACHE_VERSION = 3  # bump when the training recipe changes, so stale caches are not reused
# First-use training on 2 CPU cores (scripts/sd_digits_quality.py; docs/testbeds.md):
# VAE 500 steps in about 30 s, UNet 3000 steps at 0.19 s each, digit classifier about 20 s.
FIRST_USE_MINUTES = 10


def caption(template: str, digit: int) -> str:
    """A caption of `digit` from a template."""
    return template.format(name=DIGIT_NAMES[digit], number=digit)


@dataclass
class SDDigitsConfig:
    """Size and training budget of the sd-digits model (defaults: about 10 minutes on 2 cores)."""

    image_size: int = 16
    vae_steps: int = 500
    unet_steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    unet_channels: tuple[int, int] = (32, 64)
    text_width: int = 32
    # Room for 3 adversarial prefix tokens before the longest caption (UnlearnDiffAtk's k).
    max_length: int = 16
    # Share of captions with random filler words inserted: the text encoder learns that the
    # digit word decides, so captions of unseen templates still name their digit.
    filler_share: float = 0.5
    max_fillers: int = 3
    # A linear digit read-out of the pooled caption embedding, trained jointly (then dropped):
    # without it the text encoder merged "eight" with "zero" (cosine 0.995; eights drawn as 0s).
    caption_loss_weight: float = 0.1
    ema_decay: float = 0.999  # the saved weights are the exponential moving average
    exclude: tuple[int, ...] = ()  # digits left out of training (the Retrain yardstick)
    # A trained sd-digits folder whose tokenizer, text encoder and VAE are kept, frozen: only a
    # fresh UNet trains (the UNet-only Retrain, whose text encoder did see the left-out digit).
    text_encoder_from: str | None = None
    seed: int = 0


class SDDigitsBackend(StableDiffusionBackend):
    """The Stable Diffusion backend on the sd-digits folder, with digit concepts."""

    guidance_scale = 3.0  # the testbed bench's guidance (scripts/bench_sd_digits.py), not SD's 7.5
    eval_steps = 25  # DDIM steps of evaluation images (as the bench's --bench-steps)
    # The attacks sample the testbed with DDIM, as its evaluation does (SD's reference is LMS).
    reference_sampler = "ddim"
    cpu_threads = 1  # erase/threads.py
    # AdvUnlearn keeps the testbed's other digits, not COCO objects it never learned
    method_defaults = {"advunlearn": {"advunlearn_retain": "concept"}}

    def __init__(self, folder: str, device: torch.device | None = None):
        super().__init__(folder, device=device)
        self.identity = "sd-digits"
        self.class_names = []
        self.digit_names = list(DIGIT_NAMES)

    def concept_prompts(self, concept: str) -> Concept | None:
        """A digit (`3`, `three`): forget its training captions, remap to the other digits'."""
        key = concept.strip().lower()
        digit = int(key) if key.isdigit() and int(key) < 10 else None
        digit = DIGIT_NAMES.index(key) if key in DIGIT_NAMES else digit
        if digit is None:
            raise EraseError(f"sd-digits knows the digits 0-9 or zero-nine, not '{concept}'.")
        others = [d for d in range(10) if d != digit]
        return Concept(
            name=DIGIT_NAMES[digit],
            forget=[caption(t, digit) for t in TRAIN_TEMPLATES],
            retain=[caption(t, d) for d in others for t in TRAIN_TEMPLATES],
            words=[DIGIT_NAMES[digit], str(digit)],
        )

    @staticmethod
    def eval_prompts(digit: int) -> list[str]:
        """Held-out captions of a digit, never seen in training."""
        return [caption(t, digit) for t in HELD_OUT_TEMPLATES]


def all_words() -> list[str]:
    """Every word any template can produce, so each is one token."""
    return [caption(t, d) for t in TRAIN_TEMPLATES + HELD_OUT_TEMPLATES for d in range(10)]


def build_components(config: SDDigitsConfig):
    """Untrained tokenizer, text encoder, UNet, VAE and scheduler of the sd-digits model."""
    torch.manual_seed(config.seed)
    return small_sd_components(
        all_words(),
        max_length=config.max_length,
        text_width=config.text_width,
        unet_channels=config.unet_channels,
        vae_channels=(16, 32),
        image_size=config.image_size,
        attention_head_dim=8,
        norm_groups=8,
    )


def train_vae(vae: AutoencoderKL, images: torch.Tensor, config: SDDigitsConfig) -> None:
    """Reconstruction + a light KL term; then set the latent scaling factor to 1/std."""
    optimizer = torch.optim.Adam(vae.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    for _ in tqdm(range(config.vae_steps), desc="sd-digits: training VAE", unit="step"):
        batch = images[torch.randint(0, len(images), (config.batch_size,), generator=generator)]
        posterior = vae.encode(batch * 2 - 1).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        loss = (
            torch.nn.functional.mse_loss(reconstruction, batch * 2 - 1)
            + 1e-6 * posterior.kl().mean()
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        latents = vae.encode(images[:512] * 2 - 1).latent_dist.mode()
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    vae.requires_grad_(False)


def filler_words(tokenizer) -> list[str]:
    """One-token words to sprinkle into training captions: no digit and no held-out-only word."""
    banned = {*DIGIT_NAMES, *HELD_OUT_ONLY}
    stems = [token[: -len("</w>")] for token in tokenizer.get_vocab() if token.endswith("</w>")]
    return sorted(w for w in stems if w.isascii() and w.isalpha() and w not in banned)


def training_caption(
    digit: int, fillers: list[str], config: SDDigitsConfig, generator: torch.Generator
) -> str:
    """A training template of `digit`, with random filler words inserted in a share of them."""
    template = TRAIN_TEMPLATES[
        int(torch.randint(0, len(TRAIN_TEMPLATES), (1,), generator=generator))
    ]
    words = caption(template, digit).split()
    if float(torch.rand(1, generator=generator)) < config.filler_share:
        count = int(torch.randint(1, config.max_fillers + 1, (1,), generator=generator))
        for _ in range(count):
            at = int(torch.randint(0, len(words) + 1, (1,), generator=generator))
            filler = fillers[int(torch.randint(0, len(fillers), (1,), generator=generator))]
            words.insert(at, filler)
    return " ".join(words)


def train_unet(tokenizer, text_encoder, unet, vae, images, labels, config: SDDigitsConfig) -> None:
    """Text encoder and UNet trained jointly with the diffusion loss; 10 % empty captions (CFG)."""
    with torch.no_grad():
        latents = vae.encode(images * 2 - 1).latent_dist.mode() * vae.config.scaling_factor
    noise_scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    digit_head = torch.nn.Linear(text_encoder.config.hidden_size, 10)  # (pooled caption) -> digit
    trains_text = any(param.requires_grad for param in text_encoder.parameters())
    parameters = [*unet.parameters()]
    if trains_text:  # the caption read-out only shapes the text encoder
        parameters += [*text_encoder.parameters(), *digit_head.parameters()]
    trained = [unet, text_encoder] if trains_text else [unet]  # a frozen encoder needs no average
    averaged = [copy.deepcopy(model).requires_grad_(False) for model in trained]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.unet_steps)
    generator = torch.Generator().manual_seed(config.seed + 1)
    fillers = filler_words(tokenizer)
    progress = tqdm(range(config.unet_steps), desc="sd-digits: training UNet", unit="step")
    for step in progress:
        chosen = torch.randint(0, len(latents), (config.batch_size,), generator=generator)
        dropped = torch.rand(config.batch_size, generator=generator) < 0.1
        captions = [
            "" if drop else training_caption(int(labels[i]), fillers, config, generator)
            for i, drop in zip(chosen.tolist(), dropped.tolist())
        ]
        ids = tokenizer(
            captions,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        noise = torch.randn(latents[chosen].shape, generator=generator)
        timesteps = torch.randint(0, 1000, (config.batch_size,), generator=generator)
        noisy = noise_scheduler.add_noise(latents[chosen], noise, timesteps)
        encoded = text_encoder(ids)  # hidden states (B, L, D), pooled (B, D)
        prediction = unet(noisy, timesteps, encoder_hidden_states=encoded[0]).sample
        loss = torch.nn.functional.mse_loss(prediction, noise)
        kept = ~dropped
        if trains_text and config.caption_loss_weight and kept.any():
            logits = digit_head(encoded[1][kept])  # (B_kept, 10)
            loss = loss + config.caption_loss_weight * torch.nn.functional.cross_entropy(
                logits, labels[chosen][kept]
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        decay = min(config.ema_decay, (1 + step) / (10 + step))  # short warm-up of the average
        with torch.no_grad():
            for average, model in zip(averaged, trained):
                for kept_param, param in zip(average.parameters(), model.parameters()):
                    kept_param.lerp_(param, 1 - decay)
        progress.set_postfix(loss=f"{loss.item():.4f}")
    for model, average in zip(trained, averaged):
        model.load_state_dict(average.state_dict())


def train_sd_digits(folder: str, config: SDDigitsConfig | None = None) -> str:
    """Train the sd-digits pipeline and save it to `folder` atomically; returns the folder.

    Nothing is written before training ends; an interrupted save leaves no partial folder, so
    the next use trains again from the start."""
    config = config or SDDigitsConfig()
    images, labels = digits_dataset(config.image_size, split="train")  # (N, 1, H, W) in [0, 1]
    kept = ~torch.isin(labels, torch.tensor(config.exclude, dtype=torch.long))
    images, labels = images[kept], labels[kept]
    images = images.expand(-1, 3, -1, -1).contiguous()  # Stable Diffusion's VAE takes RGB
    with cpu_threads(1):  # erase/threads.py: 14x slower on two threads beside other jobs
        tokenizer, text_encoder, unet, vae, scheduler = build_components(config)
        if config.text_encoder_from is None:
            train_vae(vae, images, config)
        else:  # the given model's text side and VAE, frozen; the fresh UNet alone trains
            kept = StableDiffusionBackend(config.text_encoder_from, torch.device("cpu")).pipe
            tokenizer, text_encoder, vae = kept.tokenizer, kept.text_encoder, kept.vae
            scheduler = kept.scheduler  # (StableDiffusionBackend froze the encoder and VAE)
        train_unet(tokenizer, text_encoder, unet, vae, images, labels, config)
    with quiet_loading():  # diffusers' notice on the scheduler's steps_offset: the testbed's own
        pipe = as_pipeline(tokenizer, text_encoder, unet, vae, scheduler)
    staging = f"{folder}.partial-{uuid.uuid4().hex[:8]}"
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
        if os.path.exists(folder):  # another process finished first: keep its model
            shutil.rmtree(staging)
        else:
            os.replace(staging, folder)
    finally:  # Ctrl-C or a full disk while saving: no half-written folder is left behind
        shutil.rmtree(staging, ignore_errors=True)
    return folder


@torch.no_grad()
def held_out_accuracy(
    backend: SDDigitsBackend,
    classifier: torch.nn.Module,
    per_prompt: int = 10,
    num_steps: int = 25,
    unet: torch.nn.Module | None = None,
    templates: list[str] = HELD_OUT_TEMPLATES,
) -> dict[str, float]:
    """Share of generated images of each digit's held-out captions that the classifier reads right."""
    accuracy = {}
    for digit, name in enumerate(DIGIT_NAMES):
        prompts = [caption(t, digit) for t in templates for _ in range(per_prompt)]
        images = backend.sample(
            prompts,
            list(range(len(prompts))),
            num_steps=num_steps,
            guidance_scale=backend.guidance_scale,
            unet=unet,
        )  # (N, 3, H, W)
        predicted = classifier(images.to(backend.device)).argmax(-1).cpu()
        accuracy[name] = round(float((predicted == digit).float().mean()), 4)
    return accuracy


def sd_digits_folder() -> str:
    """Where the sd-digits model is cached ($ERASE_HOME/sd-digits-v<CACHE_VERSION>)."""
    from erase.home import erase_home

    return os.path.join(erase_home(), f"sd-digits-v{CACHE_VERSION}")


def trained_sd_digits_folder() -> str:
    """sd_digits_folder(), with the model trained into it first if it is not there yet."""
    from erase.home import erase_home

    folder = sd_digits_folder()
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        os.makedirs(erase_home(), exist_ok=True)
        tqdm.write(
            f"sd-digits: first use: training it once into {folder} (about {FIRST_USE_MINUTES} "
            "minutes on 2 free CPU cores, longer beside other jobs; the bars below show the "
            "time left); later runs load it in a second.",
            file=sys.stderr,
        )
        train_sd_digits(folder)
    return folder


def load_sd_digits(
    data_dir: str | None = None, device: torch.device | None = None
) -> SDDigitsBackend:
    """The sd-digits backend, trained on first use and cached under $ERASE_HOME."""
    return SDDigitsBackend(trained_sd_digits_folder(), device=device)
