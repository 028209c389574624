"""Class-conditional DDPM backend: a diffusers UNet2DModel with a class embedding, in pixel space.

The class embedding has `num_classes + 1` rows; the last is the "null" class of classifier-free
guidance (the class is dropped to it with probability 0.1 in training). Noise: linear betas
1e-4..0.02 over 1000 steps (Ho et al. 2020); sampling: DDIM with the guided prediction
`(1 + w) eps(x_t, c) - w eps(x_t, null)`, w = 2.0 (the SalUn DDPM/ reference).

Built-in models: `ddpm-digits` (scikit-learn's digits, trained on first use on the CPU) and
`ddpm-cifar10` (the reference architecture; a trained folder and CIFAR-10 given by --data-dir).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from tqdm.auto import tqdm

from erase.errors import EraseError
from erase.models.base import Condition, declare_optional, denoising_target
from erase.models.sd import default_device, load_unet_folder

DDPM_FORMAT = "erase-class-ddpm/1"
INFO_FILE = "ddpm.json"
CIFAR10_NAMES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip

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


@dataclass
class DDPMConfig:
    """Architecture and training budget of a class-conditional DDPM."""

    image_size: int = 16
    channels: int = 1
    block_out_channels: tuple[int, ...] = (16, 32, 64)
    layers_per_block: int = 1
    attention_levels: tuple[int, ...] = ()  # levels with self-attention (CIFAR-10: 16x16)
    mid_attention: bool = False
    dropout: float = 0.0
    norm_num_groups: int = 8
    class_drop: float = 0.1  # probability of training on the null class (for guidance)
    # ddpm-digits: guided samples classified right: 95 % after 250 steps, 98.5 % 500, 100 % 1000
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    ema_decay: float = 0.995
    hflip: bool = False  # random horizontal flips (CIFAR-10; never for digits)
    seed: int = 0


# The SalUn reference model for CIFAR-10 (DDPM/configs/cifar10_train.yml, docs/methods.md):
# 128 channels x (1, 2, 2, 2), two res blocks per level, attention at 16x16, dropout 0.1, class
# dropped with probability 0.1.
CIFAR10_CONFIG = DDPMConfig(
    image_size=32,
    channels=3,
    block_out_channels=(128, 256, 256, 256),
    layers_per_block=2,
    attention_levels=(1,),
    mid_attention=True,
    dropout=0.1,
    norm_num_groups=32,
    steps=800_000,
    batch_size=128,
    lr=2e-4,
    warmup_steps=5000,
    ema_decay=0.9999,
    hflip=True,
)


def build_class_unet(num_classes: int, config: DDPMConfig) -> UNet2DModel:
    """A UNet2DModel with `num_classes + 1` class embeddings (the last one is the null class)."""
    levels = range(len(config.block_out_channels))
    down = tuple(
        "AttnDownBlock2D" if i in config.attention_levels else "DownBlock2D" for i in levels
    )
    up = tuple(
        "AttnUpBlock2D" if len(levels) - 1 - i in config.attention_levels else "UpBlock2D"
        for i in levels
    )
    return UNet2DModel(
        sample_size=config.image_size,
        in_channels=config.channels,
        out_channels=config.channels,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        add_attention=config.mid_attention,
        dropout=config.dropout,
        norm_num_groups=config.norm_num_groups,
        num_class_embeds=num_classes + 1,
    )


def train_class_ddpm(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    config: DDPMConfig,
    device: torch.device | None = None,
) -> UNet2DModel:
    """Train a class-conditional DDPM on images (N, C, H, W) in [0, 1]; returns the EMA UNet."""
    device = device or default_device()
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    unet = build_class_unet(num_classes, config).to(device).train()
    ema = copy.deepcopy(unet).requires_grad_(False)
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    optimizer = torch.optim.Adam(unet.parameters(), lr=config.lr)
    warmup = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, config.warmup_steps))
    )
    pixels = images * 2 - 1  # (N, C, H, W) in [-1, 1]
    progress = tqdm(range(config.steps), desc="ddpm: training", unit="step")
    for step in progress:
        chosen = torch.randint(0, len(pixels), (config.batch_size,), generator=generator)
        clean = pixels[chosen]
        if config.hflip:
            flip = torch.rand(len(clean), generator=generator) < 0.5
            clean = torch.where(flip[:, None, None, None], clean.flip(-1), clean)
        class_labels = labels[chosen].clone()
        dropped = torch.rand(len(chosen), generator=generator) < config.class_drop
        class_labels[dropped] = num_classes  # the null class
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(clean),))
        noisy = scheduler.add_noise(clean, noise, timesteps)
        prediction = unet(
            noisy.to(device), timesteps.to(device), class_labels=class_labels.to(device)
        ).sample
        target = denoising_target(scheduler, clean, noise, timesteps)
        loss = torch.nn.functional.mse_loss(prediction, target.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        warmup.step()
        decay = min(config.ema_decay, (1 + step) / (10 + step))  # short warm-up of the EMA
        with torch.no_grad():
            for ema_param, param in zip(ema.parameters(), unet.parameters()):
                ema_param.lerp_(param, 1 - decay)
        if step % 20 == 0:
            progress.set_postfix(loss=f"{loss.item():.4f}")
    return ema.eval()


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
    ) -> torch.Tensor:
        """One image per class and seed by guided DDIM (eta `sampling_eta`): (B, 3, H, W) in [0, 1]."""
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
        info = read_ddpm_info(path)
        if info is None:
            return from_erased_output(path, data_dir, device)
        unet = load_unet_folder(UNet2DModel, path)
        dataset = info.get("dataset")
        return cls(
            unet,
            info["class_names"],
            identity=path,
            dataset=dataset_loader(
                dataset, unet.config.sample_size, data_dir or info.get("data_dir")
            ),
            device=device,
            guidance_scale=info.get("guidance_scale", 2.0),
            scheduler_config=info.get("scheduler"),
            classifier=classifier_for(dataset, path, unet.config.sample_size, device),
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


def dataset_loader(dataset: str | None, image_size: int, data_dir: str | None):
    """The loader of a known dataset by name ("digits", "cifar10"), or None."""
    if dataset == "digits":
        from erase.models.digits import digits_dataset

        return lambda: digits_dataset(image_size, split="train")
    if dataset == "cifar10" and data_dir:
        return lambda: cifar10_dataset(data_dir)
    return None


def classifier_for(dataset: str | None, folder: str, image_size: int, device):
    """The evaluation classifier: the digit classifier, or a TorchScript classifier.pt in the folder.

    classifier.pt maps images (B, C, H, W) in [0, 1] to logits (B, K), e.g. the ResNet-34 of the
    CIFAR-10 reference; without one a model other than digits has no class-removal evaluation.
    """
    if dataset == "digits":
        from erase.models.digits import load_digit_classifier

        return load_digit_classifier(image_size, device=device)
    path = os.path.join(folder, "classifier.pt")
    if os.path.isfile(path):
        try:
            return torch.jit.load(path, map_location=device or default_device()).eval()
        except Exception as error:
            raise EraseError(
                f"'{path}' is not a TorchScript classifier ({type(error).__name__}): save one with "
                "torch.jit.script(model).save(path), or remove it."
            ) from None
    return None


# -- ddpm-digits --------------------------------------------------------------------------------
DIGITS_VERSION = 1  # bump when DDPMConfig defaults change, so stale caches are not reused


def digits_folder(config: DDPMConfig, cache_dir: str | None = None) -> str:
    """Where the ddpm-digits model of this configuration is cached."""
    from erase.models import erase_home

    default = config == DDPMConfig(image_size=config.image_size)
    name = f"ddpm-digits-{config.image_size}-v{DIGITS_VERSION}"
    if not default:  # tests and experiments: one folder per configuration
        digest = hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode()).hexdigest()
        name += f"-{digest[:10]}"
    return os.path.join(cache_dir or erase_home(), name)


def train_ddpm_digits(folder: str, config: DDPMConfig | None = None) -> str:
    """Train the digits DDPM on the train split and save it to `folder`; returns the folder."""
    from erase.models.digits import DIGIT_NAMES, digits_dataset

    config = config or DDPMConfig()
    images, labels = digits_dataset(config.image_size, split="train")  # (N, 1, H, W)
    started = time.perf_counter()
    unet = train_class_ddpm(images, labels, len(DIGIT_NAMES), config, device=default_device())
    info = {
        "dataset": "digits",
        "class_names": DIGIT_NAMES,
        "guidance_scale": 2.0,
        "scheduler": SCHEDULER_CONFIG,
        "training": asdict(config),
        "train_seconds": round(time.perf_counter() - started, 1),
    }
    return write_ddpm_folder(folder, unet.cpu(), info)


def load_ddpm_digits(
    data_dir: str | None = None,
    device: torch.device | None = None,
    config: DDPMConfig | None = None,
    cache_dir: str | None = None,
    classifier_config=None,
) -> ClassDDPMBackend:
    """`ddpm-digits`: trained on first use (a few minutes on 2 CPU cores), cached in $ERASE_HOME.

    `data_dir` is unused (the digits ship with scikit-learn); `config`, `cache_dir` and
    `classifier_config` let tests and experiments train small versions elsewhere.
    """
    from erase.models.digits import DIGIT_NAMES, digits_dataset, load_digit_classifier

    config = config or DDPMConfig()
    # The classifier first: it is the cheaper half, and evaluation needs it anyway.
    classifier = load_digit_classifier(
        config.image_size, device=device, config=classifier_config, cache_dir=cache_dir
    )
    folder = digits_folder(config, cache_dir)
    if read_ddpm_info(folder) is None:
        train_ddpm_digits(folder, config)
    info = read_ddpm_info(folder)
    backend = ClassDDPMBackend(
        load_unet_folder(UNet2DModel, folder),
        DIGIT_NAMES,
        identity="ddpm-digits",
        dataset=lambda: digits_dataset(config.image_size, split="train"),
        device=device,
        guidance_scale=info.get("guidance_scale", 2.0),
        scheduler_config=info.get("scheduler"),
        classifier=classifier,
    )
    return backend


# -- ddpm-cifar10 -------------------------------------------------------------------------------
def cifar10_dataset(data_dir: str) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10's training set from a torchvision folder: (50000, 3, 32, 32) in [0, 1], labels."""
    from torchvision.datasets import CIFAR10

    try:
        data = CIFAR10(data_dir, train=True, download=False)
    except RuntimeError:
        raise EraseError(
            f"No CIFAR-10 in '{data_dir}': pass --data-dir with the folder holding "
            "cifar-10-batches-py (torchvision's CIFAR10 format)."
        ) from None
    images = torch.from_numpy(data.data).permute(0, 3, 1, 2).float() / 255  # (N, 3, 32, 32)
    return images, torch.tensor(data.targets, dtype=torch.long)


def cifar10_folder(cache_dir: str | None = None) -> str:
    """Where a trained ddpm-cifar10 model is looked for ($ERASE_HOME/ddpm-cifar10)."""
    from erase.models import erase_home

    return os.path.join(cache_dir or erase_home(), "ddpm-cifar10")


def train_ddpm_cifar10(
    data_dir: str, folder: str | None = None, config: DDPMConfig = CIFAR10_CONFIG
) -> str:
    """Train the reference CIFAR-10 DDPM (a GPU job: 800 k steps in the reference) and save it."""
    images, labels = cifar10_dataset(data_dir)
    unet = train_class_ddpm(images, labels, len(CIFAR10_NAMES), config)
    info = {
        "dataset": "cifar10",
        "class_names": CIFAR10_NAMES,
        "guidance_scale": 2.0,
        "scheduler": SCHEDULER_CONFIG,
        "training": asdict(config),
    }
    return write_ddpm_folder(folder or cifar10_folder(), unet.cpu(), info)


def load_ddpm_cifar10(
    data_dir: str | None = None, device: torch.device | None = None
) -> ClassDDPMBackend:
    """`ddpm-cifar10`: a trained DDPM folder plus CIFAR-10, both found through --data-dir."""
    if not data_dir:
        raise EraseError(
            "ddpm-cifar10 needs CIFAR-10 on disk: pass --data-dir PATH (a torchvision CIFAR10 "
            "folder, holding the trained model as ddpm.json + unet/ or in $ERASE_HOME/ddpm-cifar10)."
        )
    if not os.path.isdir(data_dir):
        raise EraseError(f"--data-dir '{data_dir}' is not a folder: pass the CIFAR-10 folder.")
    for folder in (data_dir, os.path.join(data_dir, "ddpm-cifar10"), cifar10_folder()):
        if read_ddpm_info(folder) is not None:
            backend = ClassDDPMBackend.from_folder(folder, data_dir=data_dir, device=device)
            backend.identity = "ddpm-cifar10"
            return backend
    raise EraseError(
        f"No trained ddpm-cifar10 model in '{data_dir}' or {cifar10_folder()}: train one on a GPU "
        "with erase.models.ddpm.train_ddpm_cifar10(data_dir) or put a saved DDPM folder "
        "(ddpm.json + unet/) there."
    )


__all__ = [
    "CIFAR10_CONFIG",
    "ClassDDPMBackend",
    "DDPMConfig",
    "build_class_unet",
    "load_ddpm_cifar10",
    "load_ddpm_digits",
    "train_class_ddpm",
    "train_ddpm_digits",
]
