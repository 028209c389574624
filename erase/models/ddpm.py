"""Class-conditional DDPM backend: a diffusers UNet2DModel with a class embedding, in pixel space.

The class embedding has `num_classes + 1` rows; the last is the "null" class of classifier-free
guidance (the class is dropped to it with probability 0.1 in training). Noise: linear betas
1e-4..0.02 over 1000 steps (Ho et al. 2020); sampling: DDIM with the guided prediction
`(1 + w) eps(x_t, c) - w eps(x_t, null)`, w = 2.0 (the SalUn DDPM/ reference).

The built-in DDPMs, `ddpm-digits` and `ddpm-cifar10`, and their training live in erase/testbeds/.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Sequence

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from tqdm.auto import tqdm

from erase.errors import EraseError
from erase.models.base import Condition, declare_optional
from erase.models.sd import default_device, load_unet_folder

DDPM_FORMAT = "erase-class-ddpm/1"
INFO_FILE = "ddpm.json"

# Noise schedule of the reference DDPM (linear betas 1e-4..0.02, T = 1000).
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "clip_sample": True,  # ancestral DDPM steps only: DDIM sampling does not clip (make_sampler)
    "prediction_type": "epsilon",
}

# A dataset loader: () -> (images (N, C, H, W) in [0, 1], labels (N,) long).
DatasetLoader = Callable[[], tuple[torch.Tensor, torch.Tensor]]


def write_ddpm_folder(folder: str, unet: UNet2DModel, info: dict) -> str:
    """Save `unet/` + ddpm.json into `folder` atomically (temp folder, then rename)."""
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{os.path.basename(folder)}.{uuid.uuid4().hex[:8]}.tmp")
    unet.save_pretrained(os.path.join(staging, "unet"), safe_serialization=True)
    with open(os.path.join(staging, INFO_FILE), "w") as file:
        json.dump({"format": DDPM_FORMAT, **info}, file, indent=1, default=str)
    try:
        os.replace(staging, folder)
    except OSError:  # another process wrote it first: keep theirs
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def read_ddpm_info(folder: str) -> dict | None:
    """The ddpm.json of a saved DDPM folder, or None when there is none."""
    path = os.path.join(folder, INFO_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as file:
        return json.load(file)


@declare_optional
class ClassDDPMBackend:
    """A class-conditional pixel-space DDPM with classifier-free guidance (null class)."""

    conditioning = "class"

    def __init__(
        self,
        unet: UNet2DModel,
        class_names: Sequence[str],
        *,
        identity: str,
        dataset: DatasetLoader | None = None,
        device: torch.device | None = None,
        guidance_scale: float = 2.0,  # the SalUn DDPM/ reference's sampling guidance
        scheduler_config: dict | None = None,
        classifier: torch.nn.Module | None = None,
        sample_batch_size: int = 256,
    ):
        num_embeds = unet.config.num_class_embeds
        if num_embeds != len(class_names) + 1:
            raise EraseError(
                f"The UNet of '{identity}' has {num_embeds} class embeddings but the model "
                f"names {len(class_names)} classes: it needs one more, the null class."
            )
        self.identity = identity
        self.class_names = list(class_names)
        self.num_classes = len(class_names)
        self.device = device or default_device()
        self.unet = unet.to(self.device).eval()
        self.unet.requires_grad_(False)
        self.noise_scheduler = DDPMScheduler(**(scheduler_config or SCHEDULER_CONFIG))
        self.resolution = unet.config.sample_size
        self.latent_shape = (unet.config.in_channels, self.resolution, self.resolution)
        self.guidance_scale = guidance_scale
        self.classifier = classifier
        self.sample_batch_size = sample_batch_size
        # DDIM's eta: 1.0 samples stochastically, as the reference does (DDPM/sample.py --eta).
        # Deterministic DDIM (0.0) lost quality with more steps on ddpm-digits (docs/methods.md).
        self.sampling_eta = 1.0
        self._dataset_loader = dataset
        self._dataset: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- conditioning -------------------------------------------------------------------------
    def encode(self, conditions: Sequence[Condition]) -> torch.Tensor:
        """Class labels (B,) long: indices, or class names."""
        names = [name.lower() for name in self.class_names]
        labels = []
        for condition in conditions:
            text = str(condition).strip().lower()
            if text.lstrip("-").isdigit() and 0 <= int(text) < self.num_classes:
                labels.append(int(text))
            elif text in names:
                labels.append(names.index(text))
            else:
                raise EraseError(
                    f"'{condition}' is not a class of '{self.identity}': use an index "
                    f"0-{self.num_classes - 1} or one of {', '.join(self.class_names)}."
                )
        return torch.tensor(labels, dtype=torch.long, device=self.device)

    def unconditional(self, batch_size: int) -> torch.Tensor:
        """The null class (index `num_classes`) for every sample: (B,) long."""
        return torch.full((batch_size,), self.num_classes, dtype=torch.long, device=self.device)

    def predict_noise(self, unet, noisy, timesteps, cond):
        """eps prediction of `unet` for class labels `cond` (B,)."""
        return unet(noisy, timesteps, class_labels=cond).sample

    def guided_noise(self, unet, noisy, timesteps, labels, guidance_scale: float):
        """Classifier-free guidance: (1 + w) eps(x_t, c) - w eps(x_t, null), in one UNet call."""
        if guidance_scale == 0:
            return self.predict_noise(unet, noisy, timesteps, labels)
        both = self.predict_noise(
            unet,
            torch.cat([noisy, noisy]),
            torch.cat([timesteps, timesteps]),
            torch.cat([labels, self.unconditional(len(labels))]),
        )
        conditional, unconditional = both.chunk(2)
        return (1 + guidance_scale) * conditional - guidance_scale * unconditional

    # -- images -------------------------------------------------------------------------------
    def to_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] (B, C, H, W) of images in [0, 1], with the model's channels and size."""
        images = images.to(self.device, torch.float32)
        channels = self.latent_shape[0]
        if images.shape[1] != channels:
            images = (
                images.mean(dim=1, keepdim=True)
                if channels == 1
                else images.expand(-1, channels, -1, -1)
            )
        if images.shape[-1] != self.resolution or images.shape[-2] != self.resolution:
            images = torch.nn.functional.interpolate(
                images, size=(self.resolution, self.resolution), mode="bilinear", antialias=True
            )
        return images * 2 - 1

    def make_sampler(self, num_steps: int) -> DDIMScheduler:
        """A DDIM scheduler on the training noise schedule with `num_steps` steps set.

        It does not clip the predicted x0, as the reference's sampler does not
        (DDPM/functions/denoising.py): diffusers' DDIM clips x0 but keeps the unclipped eps, and
        the mismatch, under guidance, grows with the number of steps (docs/methods.md).
        """
        sampler = DDIMScheduler.from_config(self.noise_scheduler.config, clip_sample=False)
        sampler.set_timesteps(num_steps, device=self.device)
        return sampler

    @torch.no_grad()
    def sample(
        self,
        conditions: Sequence[Condition],
        seeds: Sequence[int],
        *,
        num_steps: int = 50,
        guidance_scale: float | None = None,
        resolution: int | None = None,
        unet: torch.nn.Module | None = None,
        progress: bool = False,
        sampler: str = "ddim",
    ) -> torch.Tensor:
        """One image per class and seed by guided DDIM (eta `sampling_eta`): (B, 3, H, W) in [0, 1]."""
        if sampler != "ddim":
            raise EraseError(
                f"'{self.identity}' samples with DDIM only (its reference's sampler), not "
                f"'{sampler}': use --sampler ddim."
            )
        if len(conditions) != len(seeds):
            raise ValueError("sample needs one seed per condition")
        unet = unet if unet is not None else self.unet
        guidance = self.guidance_scale if guidance_scale is None else guidance_scale
        size = resolution or self.resolution
        labels = self.encode(conditions)  # (B,)
        shape = (self.latent_shape[0], size, size)
        chunks = []
        for start in range(0, len(labels), self.sample_batch_size):
            # One generator per seed for the start noise and every step's noise: an image does
            # not depend on its batch.
            generators = [
                torch.Generator().manual_seed(int(s))
                for s in seeds[start : start + self.sample_batch_size]
            ]
            noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
            chunks.append(
                self.denoise(
                    unet,
                    noise,
                    labels[start : start + len(generators)],
                    num_steps,
                    guidance,
                    progress,
                    generators,
                )
            )
        images = (torch.cat(chunks).clamp(-1, 1) + 1) / 2  # (B, C, H, W)
        return images.expand(-1, 3, -1, -1).contiguous() if images.shape[1] == 1 else images

    def denoise(
        self, unet, noise, labels, num_steps, guidance_scale, progress=False, generators=None
    ):
        """Run guided DDIM from `noise` (b, C, H, W) to images in [-1, 1] (on the CPU); with
        `sampling_eta` > 0 each step adds fresh noise drawn from the samples' `generators`."""
        sampler = self.make_sampler(num_steps)
        sample = noise.to(self.device)
        eta = self.sampling_eta
        if eta and generators is None:
            generators = [torch.Generator().manual_seed(i) for i in range(len(sample))]
        for t in tqdm(sampler.timesteps, desc="sampling", disable=not progress, leave=False):
            timesteps = torch.full((len(sample),), int(t), device=self.device, dtype=torch.long)
            eps = self.guided_noise(unet, sample, timesteps, labels, guidance_scale)
            step_noise = None
            if eta:
                step_noise = torch.stack(
                    [torch.randn(sample.shape[1:], generator=g) for g in generators]
                ).to(self.device, sample.dtype)  # (b, C, H, W)
            sample = sampler.step(eps, t, sample, eta=eta, variance_noise=step_noise).prev_sample
        return sample.float().cpu()

    # -- data ---------------------------------------------------------------------------------
    def dataset(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The training images (N, C, H, W) in [0, 1] and labels (N,), loaded once."""
        if self._dataset is None:
            if self._dataset_loader is None:
                raise EraseError(
                    f"'{self.identity}' has no dataset on this machine: pass --data-dir with its "
                    "training data (CIFAR-10 in torchvision format for ddpm-cifar10)."
                )
            self._dataset = self._dataset_loader()
        return self._dataset

    def real_images(self, classes: Sequence[int], count: int) -> tuple[torch.Tensor, list[int]]:
        """Up to `count` dataset images of `classes` in a fixed shuffled order, with labels."""
        images, labels = self.dataset()
        wanted = self.encode(list(classes)).cpu()
        selected = torch.nonzero(torch.isin(labels, wanted)).flatten()
        order = torch.randperm(len(selected), generator=torch.Generator().manual_seed(0))
        chosen = selected[order[:count]]
        return images[chosen], labels[chosen].tolist()

    # -- weights ------------------------------------------------------------------------------
    def save_unet(self, unet: torch.nn.Module, folder: str) -> None:
        """Write the UNet in diffusers format: config.json + diffusion_pytorch_model.safetensors."""
        unet.save_pretrained(folder, safe_serialization=True)

    def load_unet(self, folder: str) -> UNet2DModel:
        """Load an erased UNet folder and check it has this model's classes and size."""
        unet = load_unet_folder(UNet2DModel, folder)
        mine, theirs = self.unet.config, unet.config
        if (theirs.num_class_embeds, theirs.sample_size, theirs.in_channels) != (
            mine.num_class_embeds,
            mine.sample_size,
            mine.in_channels,
        ):
            raise EraseError(
                f"The UNet in '{folder}' does not fit '{self.identity}' ({theirs.num_class_embeds} "
                f"class embeddings, {theirs.sample_size} px): pass the model it was erased from."
            )
        return unet.to(self.device).eval()

    @classmethod
    def from_folder(
        cls, path: str, data_dir: str | None = None, device: torch.device | None = None
    ) -> ClassDDPMBackend:
        """A saved DDPM folder (unet/ + ddpm.json), or an erase-concept output of a DDPM."""
        from erase.testbeds import datasets  # the datasets a saved folder may name

        info = read_ddpm_info(path)
        if info is None:
            return from_erased_output(path, data_dir, device)
        unet = load_unet_folder(UNet2DModel, path)
        dataset = info.get("dataset")
        return cls(
            unet,
            info["class_names"],
            identity=path,
            dataset=datasets.dataset_loader(
                dataset, unet.config.sample_size, data_dir or info.get("data_dir")
            ),
            device=device,
            guidance_scale=info.get("guidance_scale", 2.0),
            scheduler_config=info.get("scheduler"),
            classifier=datasets.classifier_for(dataset, path, unet.config.sample_size, device),
        )


def from_erased_output(path: str, data_dir, device) -> ClassDDPMBackend:
    """An erase-concept output folder: its base model's backend with the erased UNet swapped in."""
    metadata_path = os.path.join(path, "metadata.json")
    base = None
    if os.path.isfile(metadata_path):
        with open(metadata_path) as file:
            base = json.load(file).get("base_model")
    if not base:
        raise EraseError(
            f"'{path}' has a UNet but no {INFO_FILE} or metadata.json naming its base model: "
            "pass a DDPM folder saved by erase or an erase-concept output folder."
        )
    from erase.models import load_backend

    backend = load_backend(base, data_dir=data_dir, device=device)
    if not isinstance(backend, ClassDDPMBackend):
        raise EraseError(f"The base model '{base}' of '{path}' is not a class-conditional DDPM.")
    backend.unet = backend.load_unet(path)
    backend.unet.requires_grad_(False)
    backend.identity = path
    return backend
