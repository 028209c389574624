"""The pipeline of one erasure: load the model, build the data, compute the mask, train, write
the artifact. The CLI and the Python API (erase/api.py, which erase-bench and the scripts use)
call `run_erasure`; it never parses or prints."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field

import torch
from accelerate.utils import broadcast

from erase.artifact import (
    check_folder_path,
    check_output,
    output_lock,
    partial_path,
    staged_output,
    versions,
    write_json,
)
from erase.card import write_model_card
from erase.checkpoint import check_resume, file_digest, record_settings
from erase.cliargs import MAX_SEED
from erase.concepts import Concept, resolve_concept, slug, union
from erase.data import (
    ConceptData,
    DataConfig,
    build_concept_data,
    encode_images,
    unet_fingerprint,
)
from erase.errors import EraseError
from erase.methods import get_method
from erase.models import erase_home, load_backend
from erase.saliency import forget_loss_gradients, load_mask, mask_ratio, saliency_mask, save_mask
from erase.train import (
    TrainConfig,
    count_changed_weights,
    make_accelerator,
    peak_memory_mb,
    train,
    write_base_weights,
)

MAX_RESOLUTION = 8192  # beyond any released model; each backend also allows at most 4 x its own


def settings_from_args(
    args: argparse.Namespace, defaults: dict, method_class, num_forget: int | None = None
):
    """TrainConfig and the method's Config: flags first, then the method's reference defaults."""
    train_config = TrainConfig(
        lr=args.lr,
        steps=args.steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        max_grad_norm=args.max_grad_norm,
        gradient_checkpointing=not args.no_gradient_checkpointing,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
    )
    for name in ("lr", "batch_size", "max_grad_norm", "optimizer", "weight_decay"):
        if getattr(train_config, name) is None:
            setattr(train_config, name, defaults.get(name))
    if train_config.steps is None:
        if args.epochs:
            per_epoch = -(-(num_forget or args.num_forget or 800) // train_config.batch_size)
            train_config.steps = max(1, round(args.epochs * per_epoch))
        else:
            train_config.steps = defaults["steps"]
    values = {}
    for config_field in dataclasses.fields(method_class.Config):
        value = getattr(args, config_field.name, None)
        values[config_field.name] = (
            value if value is not None else defaults.get(config_field.name, config_field.default)
        )
    return train_config, method_class.Config(**values)


@dataclass
class ErasureResult:
    """What one erasure produced: the output folder, metadata, and the backend with its erased UNet."""

    output: str
    metadata: dict
    backend: object = field(repr=False, default=None)


def default_output(args: argparse.Namespace) -> str:
    """outputs/<model>-<concept>-<method>."""
    model_name = os.path.basename(os.path.normpath(args.model))
    concept = slug("-".join(concept_names(args)))
    return os.path.join("outputs", f"{slug(model_name)}-{concept}-{args.method}")


def concept_names(args: argparse.Namespace) -> list[str]:
    """The --concept values of this run (one string from library callers, a list from the CLI)."""
    return [args.concept] if isinstance(args.concept, str) else list(args.concept)


def resolve_run_concept(backend, args) -> Concept:
    """The concept(s) of this run, as one Concept (the union of several); backends with their own
    prompt sets (sd-digits) resolve a name first."""
    concepts = []
    for name in concept_names(args):
        prompts = None
        if not args.forget_prompt and hasattr(backend, "concept_prompts"):
            prompts = backend.concept_prompts(name)
        concepts.append(
            prompts
            or resolve_concept(
                name,
                conditioning=backend.conditioning,
                class_names=backend.class_names,
                forget_prompts=args.forget_prompt,
                retain_prompts=args.retain_prompt,
                remap=getattr(args, "remap", "next"),
            )
        )
    return union(concepts)


def forget_count(backend, concept: Concept, args: argparse.Namespace) -> int:
    """--num-forget, or the reference's forget set size: the whole class on class-conditional
    models (DDPM/datasets), 800 generated images otherwise (SD/train-scripts)."""
    if args.num_forget:
        return args.num_forget
    if backend.conditioning == "class":
        return len(backend.real_images(concept.forget, None)[1])
    return 800


def run_erasure(args: argparse.Namespace, backend=None, on_phase=None) -> ErasureResult:
    """Erase `args.concept` with `args.method` and write the artifact; the one code path of the CLI.

    Every input is checked before any work, and the output stays locked for the whole run.
    `on_phase(name)`, when given, is called as each phase (load, data, ..., write) ends.
    """
    output = args.output or default_output(args)
    check_arguments(args)
    # The accelerate state comes first: the lock and the output's cleanup ask it which process
    # is the main one (several CPU processes are known only to the accelerator made here).
    accelerator = make_accelerator(
        TrainConfig(
            mixed_precision=args.mixed_precision,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
        )
    )
    with output_lock(output):
        return erase_into(output, args, accelerator, backend, on_phase)


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse, in one line, what can be judged from the arguments alone (before loading)."""
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise EraseError(f"--{name.replace('_', '-')} must be a finite number, got {value}.")
    if args.checkpoint_every < 0:
        raise EraseError(
            f"--checkpoint-every must be 0 (off) or more, got {args.checkpoint_every}."
        )
    if not 0 <= args.seed <= MAX_SEED:
        raise EraseError(f"--seed must be between 0 and {MAX_SEED}, got {args.seed}.")
    if args.resolution is not None and args.resolution > MAX_RESOLUTION:
        raise EraseError(f"--resolution must be at most {MAX_RESOLUTION}, got {args.resolution}.")
    for flag, prompts in (
        ("--forget-prompt", args.forget_prompt),
        ("--retain-prompt", args.retain_prompt),
    ):
        if any(not prompt.strip() for prompt in prompts):
            raise EraseError(f"{flag} must not be empty: give the text of a prompt.")
    if args.mask:
        if not get_method(args.method).uses_mask:
            raise EraseError(
                f"--mask is used only by methods with a saliency mask (salun); {args.method} "
                "trains without one: drop --mask."
            )
        if os.path.isdir(args.mask):
            raise EraseError(
                f"--mask '{args.mask}' is a folder: pass the mask file in it (e.g. "
                f"{os.path.join(args.mask, 'mask.safetensors')})."
            )
    if args.concept_images and not os.path.isdir(args.concept_images):
        raise EraseError(f"--concept-images '{args.concept_images}' is not a folder of images.")
    if args.cache_dir:
        check_folder_path(args.cache_dir, "--cache-dir")
    else:
        check_folder_path(os.path.join(erase_home(), "data"), "ERASE_HOME")


def check_backend_arguments(backend, args: argparse.Namespace) -> None:
    """Refuse what needs the loaded model to judge: a resolution it cannot make."""
    if args.resolution is None:
        return
    if backend.conditioning == "text":  # diffusers' pipelines need multiples of 8, the VAE its own
        factor = max(8, getattr(backend, "vae_scale", 8))
    else:  # a pixel-space UNet halves the image once per down block but the last
        factor = 2 ** (len(backend.unet.config.block_out_channels) - 1)
    limit = 4 * backend.resolution
    if args.resolution % factor or args.resolution > limit:
        raise EraseError(
            f"--resolution must be a multiple of {factor} and at most {limit} (4 x the model's "
            f"{backend.resolution}) for this model, got {args.resolution}."
        )


def run_settings(backend, concept: Concept, method_config, train_config, args) -> dict:
    """Everything that shapes the trained weights; a checkpoint is resumed only when they match."""
    return {
        "model": backend.identity,
        "weights": unet_fingerprint(backend.unet),
        "concept": concept.to_dict(),
        "method": args.method,
        "method_config": dataclasses.asdict(method_config),
        "train_config": dataclasses.asdict(train_config),
        "data": {
            name: getattr(args, name)
            for name in (
                "num_forget",
                "num_retain",
                "resolution",
                "gen_steps",
                "guidance_scale",
                "gen_batch_size",
                "concept_images",
            )
        },
        "mask_sha256": file_digest(args.mask),
        "seed": args.seed,
    }


def erase_into(
    output: str, args: argparse.Namespace, accelerator, backend=None, on_phase=None
) -> ErasureResult:
    """The erasure of run_erasure, holding the lock of `output`."""
    check_output(output, args.overwrite, resume=args.resume)
    method_class = get_method(args.method)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal clock
        timings[phase] = round(time.perf_counter() - clock, 3)
        clock = time.perf_counter()
        if on_phase:
            on_phase(phase)

    if backend is None:
        backend = load_backend(args.model, data_dir=args.data_dir, device=accelerator.device)
    check_backend_arguments(backend, args)
    if hasattr(backend, "gen_precision"):
        backend.gen_precision = getattr(args, "gen_precision", "auto")
    concept = resolve_run_concept(backend, args)
    num_forget = forget_count(backend, concept, args)
    defaults = method_class.defaults(backend, concept, num_forget)
    train_config, method_config = settings_from_args(args, defaults, method_class, num_forget)
    method = method_class(backend, concept, method_config)  # fails early on an unfit backend
    if hasattr(backend, "set_gradient_checkpointing"):  # for the mask's backward as well
        backend.set_gradient_checkpointing(
            train_config.gradient_checkpointing and getattr(method, "gradient_checkpointing", True)
        )
    mask = None
    if method.uses_mask and args.mask:
        mask = load_mask(args.mask, backend.unet, backend.identity)
    checkpoint_dir = os.path.join(partial_path(output), "checkpoint")
    settings = run_settings(backend, concept, method_config, train_config, args)
    check_resume(checkpoint_dir, settings, args.resume)
    lap("load")

    data_config = DataConfig(
        num_forget=args.num_forget,
        num_retain=args.num_retain,
        resolution=args.resolution,
        gen_steps=args.gen_steps,
        guidance_scale=args.guidance_scale,
        gen_batch_size=args.gen_batch_size,
        seed=args.seed,
        cache_dir=args.cache_dir,
        concept_images=args.concept_images,
        retain_images=getattr(args, "retain_images", None),
    )
    if getattr(method, "needs_images", True):
        with accelerator.main_process_first():  # one process generates, the others read it
            data = build_concept_data(backend, concept, data_config)
        forget_latents = encode_images(backend, data.forget_images)  # (N_f, C, h, w)
        retain_latents = encode_images(backend, data.retain_images)  # (N_r, C, h, w)
    else:  # ESD samples its own x_t: only the batches' shape and conditions are used
        data = placeholder_data(backend, concept, train_config.batch_size, args.resolution)
        forget_latents, retain_latents = data.forget_images, data.retain_images
    lap("data")

    evaluate = backend.conditioning == "class" and not args.no_eval
    before = evaluate and class_evaluation(backend, concept, args)
    lap("eval_before")
    grid = backend.conditioning == "text" and not getattr(args, "no_grid", False)
    if grid:  # text backends: before/after images of a few prompts (class ones: the evaluation)
        from eval.before_after import grid_prompts, sample_grid_images, save_before_after

        grid_before = sample_grid_images(backend, grid_prompts(concept), args)
    lap("grid_before")

    if method.uses_mask and mask is None:
        gradients = forget_loss_gradients(
            backend,
            forget_latents,
            data.forget_conditions,
            guidance_scale=method_config.mask_guidance,
            batch_size=train_config.batch_size,
            micro_batch_size=train_config.micro_batch_size,
            generator=torch.Generator().manual_seed(args.seed),
        )
        mask = saliency_mask(gradients, method_config.mask_ratio)
        if accelerator.num_processes > 1:  # every process trains with the main process's mask
            mask.bits = {
                name: broadcast(bits.to(accelerator.device)).cpu()
                for name, bits in mask.bits.items()
            }
        del gradients  # the trainer hands the freed heap back before it makes its state
    lap("mask")

    if hasattr(method, "prepare"):  # a method's stage before training (FMN's textual inversion)
        method.prepare(
            forget_latents, data.forget_conditions, torch.Generator().manual_seed(args.seed)
        )
    lap("prepare")

    with staged_output(output) as staging:
        record_settings(accelerator, checkpoint_dir, settings)
        # The base values of what may move, on disk: changed weights are counted against them
        # without a second UNet in memory.
        base_weights = os.path.join(staging, "base-weights.bin")
        if accelerator.is_main_process:
            write_base_weights(backend.unet, method.trainable, base_weights)
        result = train(
            accelerator,
            backend,
            method,
            (forget_latents, data.forget_conditions),
            (retain_latents, data.retain_conditions),
            train_config,
            mask,
            checkpoint_dir=os.path.join(staging, "checkpoint"),
        )
        lap("train")
        after = evaluate and class_evaluation(backend, concept, args)
        lap("eval_after")
        if grid:
            grid_after = sample_grid_images(backend, grid_prompts(concept), args)
        if grid and accelerator.is_main_process:
            save_before_after(
                os.path.join(staging, "grid.png"), grid_prompts(concept), grid_before, grid_after
            )
        lap("grid_after")
        changed = 0
        if accelerator.is_main_process:
            changed = count_changed_weights(backend.unet, method.trainable, base_weights)
            os.remove(base_weights)
        metadata = {
            "base_model": backend.identity,
            "base_weights": settings["weights"],  # erase-eval checks --model against it
            "model_arg": args.model,
            "concept": concept.to_dict(),
            "method": method.name,
            "method_config": dataclasses.asdict(method_config),
            "train_config": dataclasses.asdict(train_config),
            "data_config": dataclasses.asdict(data_config),
            "data_source": data.source,
            "seed": args.seed,
            "train_result": dataclasses.asdict(result),
            "changed_weights": changed,
            "total_weights": sum(p.numel() for p in backend.unet.parameters()),
            "mask_ratio": mask_ratio(mask) if mask is not None else None,
            "timings_s": timings,
            "peak_memory_mb": round(peak_memory_mb(accelerator.device), 1),
            "device": str(accelerator.device),
            "versions": versions(),
        }
        if accelerator.is_main_process:
            backend.save_unet(accelerator.unwrap_model(backend.unet), os.path.join(staging, "unet"))
            if mask is not None:
                save_mask(
                    mask,
                    os.path.join(staging, "mask.safetensors"),
                    ratio=method_config.mask_ratio,
                    model=backend.identity,
                    concept=concept.name,
                )
            if evaluate:
                from eval.classify import write_class_report

                metadata["evaluation"] = {"before": before[0], "after": after[0]}
                write_class_report(
                    staging, before[0], after[0], before[1], after[1], backend.class_names
                )
            timings["write"] = round(time.perf_counter() - clock, 3)
            write_json(os.path.join(staging, "metadata.json"), metadata)
            write_model_card(staging, metadata)
    if on_phase:
        on_phase("write")
    return ErasureResult(output, metadata, backend)


def placeholder_data(backend, concept: Concept, count: int, resolution: int | None) -> ConceptData:
    """Zero latents with the concept's conditions, for methods that never look at images."""
    scale = (resolution or backend.resolution) / backend.resolution
    channels, height, width = backend.latent_shape
    latents = torch.zeros(count, channels, round(height * scale), round(width * scale))
    forget = [concept.forget[i % len(concept.forget)] for i in range(count)]
    retain = [concept.retain[i % len(concept.retain)] for i in range(count)]
    return ConceptData(latents, forget, latents, retain, "none (the method samples its own)")


def class_evaluation(backend, concept: Concept, args: argparse.Namespace):
    """Class-removal metrics and images of the current UNet (same seeds before and after)."""
    from eval.classify import class_removal

    return class_removal(
        backend,
        concept.forget[0],
        num_per_class=args.eval_per_class,
        seed=args.seed,
        num_steps=args.eval_steps or getattr(backend, "eval_steps", 50),
    )
