"""`erase-concept`: erase a concept from a diffusion model and write a loadable artifact.

erase-concept --model sd-v1-4 --concept nudity
erase-concept --model ddpm-digits --concept 3
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from erase.artifact import check_output, staged_output, versions, write_json
from erase.cliargs import OneLineParser, positive
from erase.concepts import Concept, resolve_concept, slug
from erase.data import ConceptData, DataConfig, build_concept_data, encode_images
from erase.errors import EraseError
from erase.methods import METHODS, get_method
from erase.models import load_backend
from erase.saliency import forget_loss_gradients, load_mask, mask_ratio, saliency_mask, save_mask
from erase.train import TrainConfig, make_accelerator, peak_memory_mb, train


def method_fields() -> dict[str, dataclasses.Field]:
    """Every field of every registered method's Config, by name (shared names appear once)."""
    fields: dict[str, dataclasses.Field] = {}
    for method_class in METHODS.values():
        for config_field in dataclasses.fields(method_class.Config):
            fields.setdefault(config_field.name, config_field)
    return fields


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of erase-concept (erase-bench reuses it)."""
    parser = OneLineParser(
        prog="erase-concept",
        description="Erase a concept from a diffusion model (SalUn by default; ESD and "
        "Forget-Me-Not as baselines) and write the erased UNet in diffusers format, with its "
        "saliency mask, metadata.json and report.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_erase_arguments(parser)
    return parser


def add_erase_arguments(parser: argparse.ArgumentParser, with_output: bool = True) -> None:
    """All flags of one erasure run, grouped as in --help."""
    model = parser.add_argument_group("model and concept")
    model.add_argument(
        "--model",
        default="sd-v1-4",
        help="sd-v1-4, sd-v1-5, sd-2-1-base, a hub "
        "id, a local diffusers folder, a .safetensors/.ckpt file, or a built-in "
        "testbed: ddpm-digits, sd-digits, ddpm-cifar10 (with --data-dir)",
    )
    model.add_argument(
        "--concept",
        required=True,
        help="nudity, an Imagenette class (e.g. "
        "'church'), an artist style, a class index or name for class-conditional "
        "models, or any name with --forget-prompt/--retain-prompt",
    )
    model.add_argument(
        "--forget-prompt",
        action="append",
        default=[],
        metavar="TEXT",
        help="a prompt of the concept to forget (repeatable)",
    )
    model.add_argument(
        "--retain-prompt",
        action="append",
        default=[],
        metavar="TEXT",
        help="a prompt the forgotten one is remapped to and that must stay intact (repeatable)",
    )
    model.add_argument(
        "--method", default="salun", choices=sorted(METHODS), help="unlearning method"
    )
    model.add_argument("--data-dir", default=None, help="dataset folder (ddpm-cifar10)")
    if with_output:
        output = parser.add_argument_group("output")
        output.add_argument(
            "--output",
            default=None,
            help="output folder (default: outputs/<model>-<concept>-<method>)",
        )
        output.add_argument("--overwrite", action="store_true", help="replace an existing output")

    data = parser.add_argument_group("forget and retain data")
    data.add_argument(
        "--num-forget",
        type=positive(int),
        default=800,
        help="images of the concept (SalUn reference: 800)",
    )
    data.add_argument("--num-retain", type=positive(int), default=800, help="retain images")
    data.add_argument(
        "--resolution",
        type=positive(int),
        default=None,
        help="image size of generated data (default: the model's)",
    )
    data.add_argument("--gen-steps", type=positive(int), default=50, help="DDIM steps per image")
    data.add_argument(
        "--guidance-scale",
        type=positive(float),
        default=7.5,
        help="guidance when generating the forget/retain sets",
    )
    data.add_argument("--gen-batch-size", type=positive(int), default=8)
    data.add_argument(
        "--cache-dir", default=None, help="cache of generated sets (default: $ERASE_HOME/data)"
    )
    data.add_argument(
        "--concept-images",
        default=None,
        metavar="DIR",
        help="a folder of images of the concept to use as the forget set",
    )

    training = parser.add_argument_group("training (defaults: the method's reference settings)")
    training.add_argument("--lr", type=positive(float), default=None)
    training.add_argument("--steps", type=positive(int), default=None, help="optimizer updates")
    training.add_argument(
        "--epochs",
        type=positive(float),
        default=None,
        help="passes over the forget set (when --steps is not given)",
    )
    training.add_argument("--batch-size", type=positive(int), default=None)
    training.add_argument("--gradient-accumulation-steps", type=positive(int), default=1)
    training.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    training.add_argument("--max-grad-norm", type=positive(float), default=None)
    training.add_argument("--seed", type=int, default=0)
    training.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        metavar="N",
        help="save a resumable checkpoint every N steps (0: off)",
    )
    training.add_argument(
        "--resume", action="store_true", help="continue an interrupted run from its last checkpoint"
    )
    training.add_argument(
        "--mask",
        default=None,
        metavar="PATH",
        help="reuse a saved saliency mask (mask.safetensors) instead of computing it",
    )

    methods = parser.add_argument_group("method settings")
    for name, config_field in method_fields().items():
        flag = "--" + name.replace("_", "-")
        help_text = config_field.metadata.get("help", "")
        if config_field.type in (bool, "bool"):
            methods.add_argument(flag, action="store_true", default=None, help=help_text)
        else:
            kind = {"int": int, "int | None": int}.get(str(config_field.type), float)
            kind = str if "str" in str(config_field.type) else kind
            methods.add_argument(flag, type=kind, default=None, help=help_text)

    evaluation = parser.add_argument_group("evaluation (class-conditional models)")
    evaluation.add_argument(
        "--no-eval", action="store_true", help="skip the before/after class-removal evaluation"
    )
    evaluation.add_argument(
        "--eval-per-class", type=positive(int), default=100, help="generated images per class"
    )
    evaluation.add_argument(
        "--eval-steps",
        type=positive(int),
        default=None,
        help="DDIM steps per evaluation image (default: the model's, 50 or 25 for ddpm-digits)",
    )


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


def summary(result: ErasureResult) -> str:
    """A few lines for the terminal."""
    metadata = result.metadata
    lines = [
        f"erased '{metadata['concept']['name']}' with {metadata['method']} -> {result.output}",
        f"changed weights: {metadata['changed_weights']:,} of {metadata['total_weights']:,}",
    ]
    if "evaluation" in metadata:
        lines.append("metric              before    after")
        for key in ("ua", "forget_accuracy", "retain_accuracy", "fid_retain"):
            before, after = (
                metadata["evaluation"]["before"].get(key),
                metadata["evaluation"]["after"].get(key),
            )
            if before is not None:
                lines.append(f"{key:<18}{before:>8.3f}{after:>9.3f}")
    return "\n".join(lines)


def erase_concept_main(argv: list[str] | None = None) -> int:
    """Console entry point of erase-concept."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_request:  # --help, or a usage error already printed on one line
        return int(exit_request.code or 0)
    try:
        result = run_erasure(args)
    except EraseError as error:
        print(f"erase-concept: error: {error}", file=sys.stderr)
        return 2
    print(summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(erase_concept_main())
