"""Generate images for a prompt set with fixed seeds, resumably, on one or several GPUs.

Images land in `<output>/images/` as PNG files named by prompt row and sample, with an index
(`index.jsonl`: prompt, seed, guidance, file, and the settings that made the image). A rerun
skips every image whose file exists and whose index record matches what would be generated.
Launched with `accelerate launch`, each process generates its share of the missing images and
appends to its own index part; the main process merges the parts into `index.jsonl`.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import groupby

import numpy as np
import torch
from accelerate import PartialState
from PIL import Image
from tqdm.auto import tqdm

from erase.batching import sample_in_batches
from erase.text_encoder import (
    base_text_encoder,
    erased_text_encoder,
    installed_text_encoder,
    text_encoder_folder,
)
from prompts import PromptEntry

DEFAULT_GUIDANCE = 7.5  # Stable Diffusion's usual guidance when neither flag nor file sets one
# The fields of an index record that decide whether an existing image can be reused.
# "model" and "unet" are content digests of local folders, not their paths: a folder exported
# or erased again is new images, and one model spelled two ways is the same.
GENERATION_KEYS = (
    "prompt",
    "seed",
    "guidance_scale",
    "num_steps",
    "sampler",
    "resolution",
    "model",
    "unet",
)
# What an index record written before a key existed was made with: every image was DDIM then.
UNRECORDED = {"sampler": "ddim"}
MODEL_FILES = (".safetensors", ".bin", ".ckpt", ".pt", ".json", ".txt", ".model")


@dataclass
class GenerationConfig:
    """How images are generated; written whole into results.json."""

    model: str
    unet: str | None = None  # an erased UNet folder (erase-concept output) replacing the model's
    # an output whose text_encoder/ reads the prompts; None: `unet`'s own when it has one
    text_encoder: str | None = None
    num_steps: int = 50  # sampling steps
    sampler: str = "ddim"  # ddim | lms (erase.models.sd.SAMPLERS); LMS on Stable Diffusion only
    guidance_scale: float | None = None  # None: each prompt's own (I2P), else DEFAULT_GUIDANCE
    resolution: int | None = None  # None: the model's default
    batch_size: int | None = None  # images per sampling call; None: fill the device
    seed: int = 0  # seed of row r (when the prompt file gives none) is seed + r
    images_per_prompt: int = 1  # sample k of a prompt uses its seed + k


def process_state() -> PartialState:
    """This process's place among those `accelerate launch` / torchrun started (GPUs or CPUs)."""
    # cpu=True lets torchrun spread generation over CPU processes too (gloo) when there is no GPU.
    return PartialState(cpu=not torch.cuda.is_available())


def plan_images(entries: Sequence[PromptEntry], config: GenerationConfig) -> list[dict]:
    """One index record per image to generate, in prompt order (deterministic seeds and files)."""
    # A UNet folder is keyed by its content; a name (an attack's UNet held in memory) as given.
    unet_key = config.unet
    if config.unet and os.path.isdir(config.unet):
        unet_key = unet_digest(config.unet)
    encoder_folder = text_encoder_folder(config.text_encoder or config.unet)
    if encoder_folder:  # an erased text encoder (AdvUnlearn's) makes other images
        unet_key = f"{unet_key or 'base'}+text_encoder:{model_digest(encoder_folder)}"
    model_key = model_digest(config.model) if os.path.exists(config.model) else config.model
    records = []
    for entry in entries:
        base_seed = entry.seed if entry.seed is not None else config.seed + entry.row
        guidance = next(
            g
            for g in (config.guidance_scale, entry.guidance_scale, DEFAULT_GUIDANCE)
            if g is not None
        )
        for sample in range(config.images_per_prompt):
            record = {
                "file": f"{entry.row:06d}_{sample:02d}.png",
                "row": entry.row,
                "sample": sample,
                "prompt": entry.prompt,
                "seed": base_seed + sample,
                "guidance_scale": float(guidance),
                "num_steps": config.num_steps,
                "sampler": config.sampler,
                "resolution": config.resolution,
                "model": model_key,
                "model_path": identity(config.model),
                "unet": unet_key,
                "unet_path": identity(config.unet) if config.unet else None,
            }
            if entry.class_name is not None:
                record["class_name"] = entry.class_name
            records.append(record)
    return records


def identity(spec: str) -> str:
    """A model or folder spec as recorded: absolute for local paths, as given for hub names."""
    return os.path.abspath(spec) if os.path.exists(spec) else spec


_digests: dict[tuple, str] = {}  # model digests of this process, by the files' stat


def model_digest(path: str) -> str:
    """SHA-256 of a local model's weight, config and tokenizer files (a folder or one file):
    the key of the images it makes; computed once per process for unchanged files."""
    if os.path.isfile(path):
        files = [path]
    else:
        files = sorted(
            os.path.join(root, name)
            for root, folders, names in os.walk(path)
            for name in names
            if name.endswith(MODEL_FILES) and not name.startswith(".")
        )
    stats = tuple((f, os.stat(f).st_size, os.stat(f).st_mtime_ns, os.stat(f).st_ino) for f in files)
    if stats not in _digests:
        digest = hashlib.sha256()
        for file_path in files:
            digest.update(os.path.relpath(file_path, path).encode())
            with open(file_path, "rb") as file:
                for block in iter(lambda: file.read(2**22), b""):
                    digest.update(block)
        _digests[stats] = "sha256:" + digest.hexdigest()
    return _digests[stats]


def unet_folder(folder: str) -> str:
    """The folder holding the UNet's config.json: `<folder>/unet` (an erase output) or `folder`."""
    nested = os.path.join(folder, "unet")
    return nested if os.path.isfile(os.path.join(nested, "config.json")) else folder


def unet_digest(folder: str) -> str:
    """SHA-256 of a UNet folder's config and weight files: the key of the images it makes."""
    from erase.errors import EraseError

    weights_folder = unet_folder(folder)
    names = sorted(
        name
        for name in os.listdir(weights_folder)
        if name == "config.json" or name.endswith((".safetensors", ".bin"))
    )
    if "config.json" not in names:
        raise EraseError(
            f"No UNet found in '{folder}': pass an output folder of erase-concept (with unet/) or "
            "a diffusers UNet folder."
        )
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode())
        with open(os.path.join(weights_folder, name), "rb") as file:
            for block in iter(lambda: file.read(2**22), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def load_erased_unet(backend, folder: str):
    """The erased UNet of `folder`, checked against the base: same weights, and erased from it."""
    from erase.artifact import read_metadata
    from erase.data import unet_fingerprint
    from erase.errors import EraseError

    unet = backend.load_unet(folder)
    ours = {name: tuple(p.shape) for name, p in backend.unet.named_parameters()}
    theirs = {name: tuple(p.shape) for name, p in unet.named_parameters()}
    differ = sorted(n for n in ours.keys() | theirs.keys() if ours.get(n) != theirs.get(n))
    if differ:
        raise EraseError(
            f"The UNet in '{folder}' does not fit '{backend.identity}' ({len(differ)} weights "
            f"differ, e.g. '{differ[0]}'): pass the base model it was erased from with --model."
        )
    metadata = read_metadata(folder)
    base_weights = metadata.get("base_weights") if isinstance(metadata, dict) else None
    if base_weights and base_weights != unet_fingerprint(backend.unet):
        raise EraseError(
            f"The UNet in '{folder}' was erased from '{metadata.get('base_model')}', whose weights "
            f"are not those of '{backend.identity}': pass that base model with --model."
        )
    return unet


def pending_images(records: Sequence[dict], folder: str) -> list[dict]:
    """The planned images that are missing or were made with other settings."""
    done = read_index(folder)
    return [
        record
        for record in records
        if not (
            os.path.isfile(os.path.join(folder, record["file"]))
            and same_generation(done.get(record["file"]), record)
        )
    ]


def same_generation(existing: dict | None, planned: dict) -> bool:
    """Whether an indexed image was generated exactly as `planned` would be."""
    return existing is not None and all(
        existing.get(k, UNRECORDED.get(k)) == planned[k] for k in GENERATION_KEYS
    )


def read_index(folder: str) -> dict[str, dict]:
    """Index records by file name: index.jsonl plus the parts of interrupted runs (last wins)."""
    records: dict[str, dict] = {}
    for path in [os.path.join(folder, "index.jsonl"), *index_parts(folder)]:
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as file:
                for line in file:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:  # a line cut short by a crash
                        continue
                    records[record["file"]] = record
    return records


def index_parts(folder: str) -> list[str]:
    """Per-process index parts (index.part-<rank>.jsonl) left to merge."""
    if not os.path.isdir(folder):
        return []
    return sorted(
        os.path.join(folder, name)
        for name in os.listdir(folder)
        if name.startswith("index.part-") and name.endswith(".jsonl")
    )


def generate_images(
    records: Sequence[dict],
    folder: str,
    config: GenerationConfig,
    backend=None,
    progress: bool = True,
) -> dict:
    """Generate the missing images of `records` into `folder`; returns counts and timing.

    The backend is loaded (on this process's device) only when there is something to generate.
    """
    state = process_state()
    os.makedirs(folder, exist_ok=True)
    pending = pending_images(records, folder)
    state.wait_for_everyone()  # every process splits the same list before any image is written
    started = time.perf_counter()
    with state.split_between_processes(pending) as mine:
        if mine:
            backend = backend or load_generation_backend(config, state.device)
            unet = load_erased_unet(backend, config.unet) if config.unet else None
            encoder = erased_text_encoder(backend, config.unet, config.text_encoder)
            if encoder is not None and unet is None:  # the base's UNet, the erased encoder
                unet = backend.unet
            with installed_text_encoder(backend, encoder):
                write_images(backend, unet, mine, folder, config, state, progress)
    state.wait_for_everyone()
    if state.is_main_process:
        merge_index(folder)
    state.wait_for_everyone()
    seconds = time.perf_counter() - started
    return {
        "images": len(records),
        "generated": len(pending),
        "reused": len(records) - len(pending),
        "seconds": round(seconds, 3),
        "images_per_second": round(len(pending) / seconds, 4) if pending and seconds else None,
        "processes": state.num_processes,
    }


def load_generation_backend(config: GenerationConfig, device: torch.device):
    """The text-to-image backend of `config.model` on `device`."""
    from erase.errors import EraseError
    from erase.models import load_backend

    backend = load_backend(config.model, device=device)
    if backend.conditioning != "text":
        raise EraseError(
            f"erase-eval generates from text prompts and '{config.model}' is class-conditional: "
            "evaluate it with erase-concept's class-removal evaluation instead."
        )
    return backend


def write_images(backend, unet, records, folder, config, state, progress) -> None:
    """Generate `records` in batches of one guidance scale, each PNG written atomically."""
    part = os.path.join(folder, f"index.part-{state.process_index}.jsonl")
    by_guidance = sorted(records, key=lambda r: (r["guidance_scale"], r["row"], r["sample"]))
    bar = tqdm(
        total=len(records),
        desc=f"generating (process {state.process_index})",
        unit="img",
        disable=not progress or not state.is_local_main_process,
    )
    # the base model's images (unet None) read prompts with the base's own text encoder
    reading = base_text_encoder(backend) if unet is None else nullcontext()
    with reading, open(part, "a", encoding="utf-8") as index:
        for guidance, group in groupby(by_guidance, key=lambda r: r["guidance_scale"]):
            group = list(group)
            for start, stop, images in sample_in_batches(
                backend,
                [r["prompt"] for r in group],
                [r["seed"] for r in group],
                config.batch_size,
                num_steps=config.num_steps,
                guidance_scale=guidance,
                resolution=config.resolution,
                unet=unet,
                sampler=config.sampler,
            ):  # (B, 3, H, W) in [0, 1]
                batch = group[start:stop]
                for record, image in zip(batch, images):
                    save_png(image, os.path.join(folder, record["file"]))
                    index.write(json.dumps(record) + "\n")
                index.flush()
                bar.update(len(batch))
    bar.close()


def save_png(image: torch.Tensor, path: str) -> None:
    """A (3, H, W) image in [0, 1] as PNG, through a temporary file so no PNG is ever partial."""
    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(np.ascontiguousarray(pixels)).save(path + ".tmp", format="PNG")
    os.replace(path + ".tmp", path)


def merge_index(folder: str) -> None:
    """Fold the process parts into index.jsonl (only records whose image exists), atomically."""
    records = [
        record
        for record in read_index(folder).values()
        if os.path.isfile(os.path.join(folder, record["file"]))
    ]
    records.sort(key=lambda r: (r["row"], r["sample"], r["file"]))
    path = os.path.join(folder, "index.jsonl")
    with open(path + ".tmp", "w", encoding="utf-8") as file:
        file.writelines(json.dumps(record) + "\n" for record in records)
    os.replace(path + ".tmp", path)
    for part in index_parts(folder):
        os.remove(part)


# -- metrics ----------------------------------------------------------------------------------
# Each metric is prepared before generation (so missing weights fail in seconds, not after
# hours of sampling) and then scores the indexed images: a summary and optional per-image values.


@dataclass
class MetricConfig:
    """Settings of every metric; written whole into results.json."""

    nudity_threshold: float = 0.6
    reference: str | None = None  # FID: folder of reference images (e.g. COCO val)
    fid_image_size: int = 299
    fid_features: int = 2048  # Inception's layer: 64, 192, 768 or 2048 (the usual FID)
    fid_weights: str | None = None  # torch-fidelity's Inception weights file, for offline use
    clip_model: str = "ViT-L-14"
    clip_pretrained: str | None = "openai"
    classifier_weights: str | None = None
    # Tests and scripts: a FID feature module or a loaded ClipModel instead of the defaults.
    fid_feature: torch.nn.Module | None = None
    clip: object = None


def prepare_nudity(config: MetricConfig, records, device):
    """NudeNet's detector."""
    from eval.nudity import load_detector

    return load_detector()


def score_nudity(detector, config: MetricConfig, records, folder):
    """NudeNet counts per exposed class and the share of images with any."""
    from eval.nudity import nudity_score

    files = [os.path.join(folder, r["file"]) for r in records]
    summary, detections = nudity_score(files, config.nudity_threshold, detector)
    return summary, [{"nudenet": d} for d in detections]


def prepare_clip(config: MetricConfig, records, device):
    """The CLIP model (weights fetched now, so offline fails before generation)."""
    from eval.clip_score import load_clip

    return config.clip or load_clip(config.clip_model, config.clip_pretrained, device)


def score_clip(clip, config: MetricConfig, records, folder):
    """Mean CLIP score of each image against its prompt."""
    from eval.clip_score import clip_score

    files = [os.path.join(folder, r["file"]) for r in records]
    summary, scores = clip_score(files, [r["prompt"] for r in records], clip)
    return summary, [{"clip_score": round(s, 4)} for s in scores]


def prepare_fid(config: MetricConfig, records, device):
    """The reference image files and an empty FID metric (Inception's weights fetched now)."""
    from erase.errors import EraseError
    from eval.fid import fid_metric, image_files

    if not config.reference:
        raise EraseError("--metric fid needs --reference DIR, a folder of real images (COCO val).")
    feature = config.fid_feature if config.fid_feature is not None else config.fid_features
    return image_files(config.reference), fid_metric(feature, config.fid_weights)


def score_fid(prepared, config: MetricConfig, records, folder):
    """FID between the reference folder and the generated images."""
    from eval.fid import bias_warning, feature_count, frechet_distance_files

    reference_files, metric = prepared
    files = [os.path.join(folder, r["file"]) for r in records]
    value = frechet_distance_files(
        reference_files, files, image_size=config.fid_image_size, metric=metric
    )
    warning = bias_warning(metric)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    summary = {
        "fid": value,
        "reference": os.path.abspath(config.reference),
        "reference_images": len(reference_files),
        "generated_images": len(files),
        "image_size": config.fid_image_size,
        "feature": f"inception-{config.fid_features}" if config.fid_feature is None else "custom",
        "feature_dim": feature_count(metric),
        "weights": config.fid_weights,
        "warning": warning,
    }
    return summary, None


def prepare_classify(config: MetricConfig, records, device):
    """The Imagenette class index of every image and eval.classify's accuracy function."""
    from erase.errors import EraseError
    from prompts import imagenette_index

    indices = [imagenette_index(r.get("class_name") or "") for r in records]
    if any(index is None for index in indices):
        raise EraseError(
            "--metric classify needs prompts of Imagenette classes: use --prompts imagenette or "
            "a CSV with a 'class' column naming an Imagenette class on every row."
        )
    try:
        classify = importlib.import_module("eval.classify")
    except ImportError:
        raise EraseError(
            "The Imagenette classifier (eval/classify.py) is not available in this install: "
            "update erase."
        ) from None
    if hasattr(classify, "imagenette_resnet50"):  # fetch the weights now: fail before generating
        classify.imagenette_resnet50(config.classifier_weights)
    return classify.imagenette_accuracy, indices


def score_classify(prepared, config: MetricConfig, records, folder):
    """ImageNet classifier accuracy on the generated images, overall and per Imagenette class."""
    from eval.fid import load_images
    from prompts import concept_templates

    accuracy, indices = prepared
    with Image.open(os.path.join(folder, records[0]["file"])) as first:
        size = first.width
    names = concept_templates()["imagenette"]
    per_class = {}
    for index in sorted(set(indices)):  # one class at a time bounds memory at SD resolution
        files = [os.path.join(folder, r["file"]) for r, k in zip(records, indices) if k == index]
        value = accuracy(load_images(files, size), [index] * len(files), config.classifier_weights)
        per_class[names[index]] = {"accuracy": float(value), "images": len(files)}
    correct = sum(c["accuracy"] * c["images"] for c in per_class.values())
    summary = {"accuracy": correct / len(records), "images": len(records), "per_class": per_class}
    return summary, None


METRICS = {
    "nudity": (prepare_nudity, score_nudity),
    "classify": (prepare_classify, score_classify),
    "fid": (prepare_fid, score_fid),
    "clip": (prepare_clip, score_clip),
}


def prepare_metrics(names: Sequence[str], config: MetricConfig, records, device) -> dict:
    """Load what each metric needs, failing early with a one-line error."""
    return {name: METRICS[name][0](config, records, device) for name in names}


def score_metrics(prepared: dict, config: MetricConfig, records, folder) -> tuple[dict, list]:
    """Every prepared metric's summary, and per-image values merged into one record per image."""
    summaries = {}
    per_image = [{"file": r["file"], "prompt": r["prompt"], "seed": r["seed"]} for r in records]
    for name, context in prepared.items():
        summaries[name], values = METRICS[name][1](context, config, records, folder)
        for row, value in zip(per_image, values or []):
            row.update(value)
    return summaries, per_image
