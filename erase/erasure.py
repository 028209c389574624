"""The pipeline of one erasure: load the model, build the data, compute the mask, train, write
the artifact. The CLI, erase-bench and the scripts call `run_erasure`; it never parses or prints."""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from dataclasses import dataclass, field

import torch

from erase.artifact import check_output, staged_output, versions, write_json
from erase.card import write_model_card
from erase.concepts import Concept, resolve_concept, slug
from erase.data import ConceptData, DataConfig, build_concept_data, encode_images
from erase.methods import get_method
from erase.models import load_backend
from erase.saliency import forget_loss_gradients, load_mask, mask_ratio, saliency_mask, save_mask
from erase.train import TrainConfig, make_accelerator, peak_memory_mb, train


def settings_from_args(args: argparse.Namespace, defaults: dict, method_class):
    """TrainConfig and the method's Config: flags first, then the method's reference defaults."""
    train_config = TrainConfig(
        lr=args.lr,
        steps=args.steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        max_grad_norm=args.max_grad_norm,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
    )
    for name in ("lr", "batch_size", "max_grad_norm", "optimizer", "weight_decay"):
        if getattr(train_config, name) is None:
            setattr(train_config, name, defaults.get(name))
    if train_config.steps is None:
        if args.epochs:
            per_epoch = -(-args.num_forget // train_config.batch_size)
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
    return os.path.join("outputs", f"{slug(model_name)}-{slug(args.concept)}-{args.method}")


def resolve_run_concept(backend, args) -> Concept:
    """The concept of this run; backends with their own prompt sets (sd-digits) resolve it first."""
    if not args.forget_prompt and hasattr(backend, "concept_prompts"):
        prompts = backend.concept_prompts(args.concept)
        if prompts is not None:
            return prompts
    return resolve_concept(
        args.concept,
        conditioning=backend.conditioning,
        class_names=backend.class_names,
        forget_prompts=args.forget_prompt,
        retain_prompts=args.retain_prompt,
    )


def run_erasure(args: argparse.Namespace, backend=None) -> ErasureResult:
    """Erase `args.concept` with `args.method` and write the artifact; the one code path of the CLI."""
    output = args.output or default_output(args)
    check_output(output, args.overwrite, resume=args.resume)
    method_class = get_method(args.method)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal clock
        timings[phase] = round(time.perf_counter() - clock, 3)
        clock = time.perf_counter()

    accelerator = make_accelerator(
        TrainConfig(
            mixed_precision=args.mixed_precision,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
        )
    )
    if backend is None:
        backend = load_backend(args.model, data_dir=args.data_dir, device=accelerator.device)
    concept = resolve_run_concept(backend, args)
    defaults = method_class.defaults(backend, concept, args.num_forget)
    train_config, method_config = settings_from_args(args, defaults, method_class)
    method = method_class(backend, concept, method_config)  # fails early on an unfit backend
    mask = None
    if method.uses_mask and args.mask:
        mask = load_mask(args.mask, backend.unet, backend.identity)
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
    )
    if getattr(method, "needs_images", True):
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
            generator=torch.Generator().manual_seed(args.seed),
        )
        mask = saliency_mask(gradients, method_config.mask_ratio)
        del gradients
    lap("mask")

    if hasattr(method, "prepare"):  # a method's stage before training (FMN's textual inversion)
        method.prepare(
            forget_latents, data.forget_conditions, torch.Generator().manual_seed(args.seed)
        )
    lap("prepare")

    base_state = {n: p.detach().clone() for n, p in backend.unet.named_parameters()}
    with staged_output(output, keep_on_error=bool(args.checkpoint_every)) as staging:
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
            save_before_after(
                os.path.join(staging, "grid.png"), grid_prompts(concept), grid_before, grid_after
            )
        lap("grid_after")
        changed = sum(
            int((p.detach() != base_state[n]).sum()) for n, p in backend.unet.named_parameters()
        )
        metadata = {
            "base_model": backend.identity,
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
            "mask_ratio": mask_ratio(mask) if mask else None,
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
