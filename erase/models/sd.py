"""Stable Diffusion backend on diffusers' StableDiffusionPipeline."""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import nullcontext

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    LMSDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from erase.errors import EraseError
from erase.models.base import Condition, declare_optional, prediction_type
from erase.offload import ParkedModules

# Public hub ids of the aliases `--model` accepts.
SD_ALIASES = {
    "sd-v1-4": "CompVis/stable-diffusion-v1-4",
    "sd-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd-2-1-base": "stabilityai/stable-diffusion-2-1-base",  # 512 px, epsilon
    "sd-2-1": "stabilityai/stable-diffusion-2-1",  # 768 px, v-prediction
}


# The samplers images can be generated with, by name: DDIM (erase's default, ESD's evaluation)
# and LMS (the reference sampler of UnlearnDiffAtk's and SalUn's SD evaluations).
SAMPLERS = {"ddim": DDIMScheduler, "lms": LMSDiscreteScheduler}


def sampler_class(name: str):
    """The diffusers scheduler class of sampler `name`; an unknown name is a user error."""
    if name not in SAMPLERS:
        raise EraseError(f"Unknown sampler '{name}': choose from {', '.join(SAMPLERS)}.")
    return SAMPLERS[name]


# Generation precision: diffusers users run SD in fp16 on a GPU; the weights stay fp32 and
# torch.autocast computes in half precision, so trained master weights are never cast down.
GEN_PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def generation_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of generation: `auto` is fp16 on CUDA and fp32 (None) elsewhere."""
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "fp32"
    if precision not in GEN_PRECISIONS:
        raise EraseError(f"--gen-precision must be auto, fp32, fp16 or bf16, got '{precision}'.")
    if precision == "fp16" and device.type != "cuda":
        raise EraseError("--gen-precision fp16 needs a CUDA GPU: use bf16 or fp32 on the CPU.")
    return GEN_PRECISIONS[precision]


def default_device() -> torch.device:
    """The first CUDA device when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_pipeline(
    spec: str,
    pipeline_class=StableDiffusionPipeline,
    aliases: dict[str, str] = SD_ALIASES,
    **pipeline_kwargs,
):
    """Load a `pipeline_class` (StableDiffusionPipeline by default) from an alias, hub id, local
    folder or single file; `pipeline_kwargs` go to from_pretrained / from_single_file."""
    source = aliases.get(spec, spec)
    is_file = os.path.isfile(source) and source.endswith((".safetensors", ".ckpt"))
    if (
        os.path.exists(source)
        and not is_file
        and not os.path.isfile(os.path.join(source, "model_index.json"))
    ):
        raise EraseError(
            f"'{spec}' is not a diffusers Stable Diffusion folder (no model_index.json): pass "
            "--model with a folder saved by save_pretrained or a .safetensors/.ckpt checkpoint."
        )
    diffusers_logging.disable_progress_bar()  # loading bars are noise; real work has its own
    transformers_logging.disable_progress_bar()
    try:
        if is_file:
            pipe = pipeline_class.from_single_file(source, **pipeline_kwargs)
        else:
            pipe = pipeline_class.from_pretrained(source, **pipeline_kwargs)
    except Exception as error:  # diffusers raises OSError, ValueError, hub errors, ...
        if os.path.exists(source):
            raise EraseError(
                f"Could not load a {pipeline_class.__name__} from '{source}' "
                f"({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else 'no detail'}): check that the "
                "files are complete and not corrupt."
            ) from None
        raise EraseError(
            f"The weights of '{spec}' ({source}) are not available on this machine (offline or "
            "not in the Hugging Face cache): download them where you are online and pass "
            "--model PATH to the local diffusers folder or checkpoint, or point HF_HOME at a "
            "cache that holds them."
        ) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


@declare_optional
class StableDiffusionBackend:
    """Text-conditioned latent diffusion: a frozen text encoder and VAE around a trainable UNet."""

    conditioning = "text"
    class_names: list[str] = []
    guidance_scale = 7.5
    reference_sampler = "lms"  # what the attacks' reference code samples SD with (its LMS)
    gen_precision = "auto"  # fp16 on CUDA, fp32 on the CPU (see generation_dtype)
    # What load_pipeline builds (the SDXL backend changes these three).
    pipeline_class = StableDiffusionPipeline
    aliases = SD_ALIASES
    pipeline_kwargs = {"safety_checker": None, "requires_safety_checker": False}

    def __init__(self, spec: str, device: torch.device | None = None, pipe=None):
        self.pipe = pipe
        if pipe is None:
            self.pipe = load_pipeline(
                spec, self.pipeline_class, self.aliases, **self.pipeline_kwargs
            )
        self.identity = self.aliases.get(spec, spec)
        self.device = device or default_device()
        self.pipe.to(self.device)
        self.unet: UNet2DConditionModel = self.pipe.unet
        for frozen in self.frozen_modules():
            frozen.requires_grad_(False)
            frozen.eval()
        self.noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        prediction_type(self.noise_scheduler)  # an unsupported one fails here, in one line
        self.vae_scale = 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)
        self.resolution = self.unet.config.sample_size * self.vae_scale
        self.latent_shape = (
            self.unet.config.in_channels,
            self.unet.config.sample_size,
            self.unet.config.sample_size,
        )
        self._embeds: dict[str, torch.Tensor] = {}
        self._parked: ParkedModules | None = None  # the encoders while they wait in a file

    @classmethod
    def from_pipeline(
        cls, pipe: StableDiffusionPipeline, identity: str | None = None, device=None
    ) -> StableDiffusionBackend:
        """The backend on a pipeline already in memory; its UNet is the one that gets erased."""
        return cls(identity or pipe.name_or_path or "in-memory pipeline", device=device, pipe=pipe)

    # -- conditioning -------------------------------------------------------------------------
    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids padded to the tokenizer's length: (B, L)."""
        tokenizer = self.pipe.tokenizer
        return tokenizer(
            list(prompts),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    def token_positions(self, prompt: str, words: Sequence[str]) -> list[int]:
        """Positions in `prompt`'s token ids of the tokens that spell any of `words`."""
        ids = self.tokenize([prompt])[0].tolist()
        positions = []
        for word in words:
            word_ids = self.pipe.tokenizer(word, add_special_tokens=False).input_ids
            for start in range(len(ids) - len(word_ids) + 1):
                if word_ids and ids[start : start + len(word_ids)] == word_ids:
                    positions.extend(range(start, start + len(word_ids)))
        return sorted(set(positions))

    def end_of_text_position(self, prompt: str) -> int:
        """Position of the end-of-text token (the pooled token) in `prompt`'s ids."""
        ids = self.tokenize([prompt])[0].tolist()
        return ids.index(self.pipe.tokenizer.eos_token_id)

    def text_encoders(self) -> list[tuple]:
        """The (tokenizer, text encoder) pairs that read a prompt (SD: one)."""
        return [(self.pipe.tokenizer, self.pipe.text_encoder)]

    def embed(self, prompts: Sequence[str]) -> torch.Tensor:
        """The UNet's conditioning for `prompts`, with gradients to the text encoder's inputs
        (textual inversion needs them): the last hidden states (B, L, D), on the UNet's device
        wherever the encoder is."""
        encoder = self.pipe.text_encoder
        return encoder(self.tokenize(prompts).to(encoder.device))[0].to(self.device)

    @torch.no_grad()
    def encode(self, conditions: Sequence[Condition]) -> torch.Tensor:
        """Prompt embeddings from the frozen text encoder(s), cached per prompt: (B, L, D)."""
        missing = sorted({str(c) for c in conditions} - self._embeds.keys())
        if missing:
            self._embeds.update(zip(missing, self.embed(missing)))
        return torch.stack([self._embeds[str(c)] for c in conditions])

    def forget_prompt_embeddings(self) -> None:
        """Drop the cached prompt embeddings: the text encoder they came from has changed."""
        self._embeds.clear()

    def frozen_modules(self) -> list[torch.nn.Module]:
        """The VAE and the text encoder(s): what the UNet's training only reads."""
        return [self.pipe.vae, *(encoder for _, encoder in self.text_encoders())]

    def encoders_off(self, folder: str) -> None:
        """Take the frozen text encoder(s) and the VAE off the device while only the UNet trains
        (its prompts' embeddings cached, its images' latents made): from a GPU to the host; on
        the CPU into an unnamed file in `folder`, their memory freed (erase/offload.py)."""
        if self.device.type == "cpu":
            self._parked = ParkedModules(self.frozen_modules(), folder)
        else:
            for module in self.frozen_modules():
                module.to("cpu")

    def encoders_on(self) -> None:
        """The text encoder(s) and the VAE back on the device, as they were (for the grids)."""
        if self._parked is not None:
            self._parked.restore()
            self._parked = None
        else:
            for module in self.frozen_modules():
                module.to(self.device)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute the UNet's activations in backward instead of keeping them (the reference
        trains with ldm's use_checkpoint): at 512 px it keeps ~1/10 of the activation memory."""
        if enabled:
            self.unet.enable_gradient_checkpointing()
        else:
            self.unet.disable_gradient_checkpointing()

    def unconditional(self, batch_size: int) -> torch.Tensor:
        """Embeddings of the empty prompt: (B, L, D)."""
        return self.encode([""] * batch_size)

    def predict_noise(self, unet, noisy, timesteps, cond):
        """The prediction of `unet` under prompt embeddings `cond`: eps, or v for a
        v-prediction model (see erase.models.base.denoising_target)."""
        return unet(noisy, timesteps, encoder_hidden_states=cond.to(noisy.dtype)).sample

    # -- images -------------------------------------------------------------------------------
    @torch.no_grad()
    def to_latents(self, images: torch.Tensor) -> torch.Tensor:
        """VAE latents (B, 4, H/8, W/8) of images in [0, 1], scaled by the VAE's factor."""
        vae = self.pipe.vae
        pixels = images.to(self.device, vae.dtype) * 2 - 1
        latents = vae.encode(pixels).latent_dist.mode()
        return latents * vae.config.scaling_factor

    def make_sampler(self, num_steps: int) -> DDIMScheduler:
        """A DDIM scheduler on the model's noise schedule with `num_steps` steps set."""
        sampler = DDIMScheduler.from_config(self.pipe.scheduler.config)
        sampler.set_timesteps(num_steps, device=self.device)
        return sampler

    @torch.no_grad()
    def sample(
        self,
        conditions: Sequence[Condition],
        seeds: Sequence[int],
        *,
        num_steps: int,
        guidance_scale: float,
        resolution: int | None = None,
        unet: torch.nn.Module | None = None,
        progress: bool = False,
        token_ids: torch.Tensor | None = None,
        sampler: str = "ddim",
    ) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] from the pipeline, one seed per prompt, with `sampler`
        (ddim or lms, see SAMPLERS) on the model's noise schedule.

        `token_ids` (B, L): the text encoder reads these ids instead of the tokenized
        `conditions` (an attack's tokens, which need not survive a round trip through text)."""
        scheduler_class = sampler_class(sampler)
        size = resolution or self.resolution
        if size % self.vae_scale:
            raise EraseError(f"--resolution must be a multiple of {self.vae_scale}, got {size}.")
        dtype = generation_dtype(self.gen_precision, self.device)
        precision = torch.autocast(self.device.type, dtype=dtype) if dtype else nullcontext()
        original_unet, original_scheduler = self.pipe.unet, self.pipe.scheduler
        self.pipe.unet = unet if unet is not None else original_unet
        self.pipe.scheduler = scheduler_class.from_config(original_scheduler.config)
        self.pipe.set_progress_bar_config(disable=not progress)
        try:
            with precision:
                prompt = {"prompt": [str(c) for c in conditions]}
                if token_ids is not None:
                    prompt = {"prompt_embeds": self.pipe.text_encoder(token_ids.to(self.device))[0]}
                images = self.pipe(
                    **prompt,
                    generator=[torch.Generator("cpu").manual_seed(int(s)) for s in seeds],
                    num_inference_steps=num_steps,
                    guidance_scale=guidance_scale,
                    height=size,
                    width=size,
                    output_type="pt",
                ).images
        finally:
            self.pipe.unet, self.pipe.scheduler = original_unet, original_scheduler
            self.pipe.set_progress_bar_config(disable=True)
        return images.float().clamp(0, 1).cpu()

    # -- weights ------------------------------------------------------------------------------
    def save_unet(self, unet: torch.nn.Module, folder: str) -> None:
        """Write the UNet in diffusers format: config.json + diffusion_pytorch_model.safetensors."""
        unet.save_pretrained(folder, safe_serialization=True)

    def load_unet(self, folder: str) -> UNet2DConditionModel:
        """Load an erased UNet folder and check it fits this pipeline."""
        unet = load_unet_folder(UNet2DConditionModel, folder)
        if unet.config.cross_attention_dim != self.unet.config.cross_attention_dim:
            raise EraseError(
                f"The UNet in '{folder}' does not fit '{self.identity}' (cross-attention "
                f"dimension {unet.config.cross_attention_dim} vs "
                f"{self.unet.config.cross_attention_dim}): pass the base model it was erased from."
            )
        return unet.to(self.device)


def load_unet_folder(unet_class, folder: str):
    """Load a diffusers UNet from `folder` or its `unet/` subfolder, with a clear error."""
    for candidate in (os.path.join(folder, "unet"), folder):
        if os.path.isfile(os.path.join(candidate, "config.json")):
            try:
                return unet_class.from_pretrained(candidate)
            except Exception as error:
                raise EraseError(
                    f"Could not load the UNet in '{candidate}' ({type(error).__name__}): the "
                    "files are incomplete or corrupt; erase the model again."
                ) from None
    raise EraseError(
        f"No UNet found in '{folder}': pass an output folder of erase-concept (with unet/) or a "
        "diffusers UNet folder."
    )
