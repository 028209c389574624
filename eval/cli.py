"""`erase-eval`: generate images for a prompt set with a base or erased model and score them.

erase-eval --model sd-v1-4 --unet outputs/sd-v1-4-nudity-salun --prompts i2p.csv --metric nudity
erase-eval --model sd-v1-4 --unet outputs/... --prompts imagenette --metric classify
erase-eval --model sd-v1-4 --prompts coco_30k.csv --limit 10000 --metric fid,clip --reference DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys

from erase.cliargs import OneLineParser, add_generation_batch, positive, seed
from erase.errors import EraseError
from prompts import (
    PromptEntry,
    imagenette_prompts,
    load_coco,
    load_i2p,
    load_prompt_file,
)

# Torch, diffusers and the metric models are imported only once the arguments and the prompt
# file have been checked, so that a mistake is reported in a second, not after heavy imports.
METRIC_NAMES = ("nudity", "classify", "fid", "clip")  # eval.runner.METRICS, in --help order
PROMPT_SETS = ("i2p", "i2p-nudity", "coco", "imagenette")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows real defaults; a flag whose default is 'unset' explains itself in its help."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


def metric_list(text: str) -> list[str]:
    """An argparse type: one metric or a comma list of them."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if names == ["none"]:  # generation only: no metric model is loaded (offline users)
        return []
    unknown = [name for name in names if name not in METRIC_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown metric '{(unknown or [text])[0]}': choose from {', '.join(METRIC_NAMES)} "
            "or none"
        )
    return names


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of erase-eval."""
    parser = OneLineParser(
        prog="erase-eval",
        description="Generate images for a prompt set (I2P, COCO captions, Imagenette class "
        "prompts, or your CSV/TXT) with a base model or an erased UNet, and score them: NudeNet "
        "nudity, class accuracy, FID, CLIP score. The output folder is resumable: existing "
        "images are reused.",
        formatter_class=HelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        default="sd-v1-4",
        help="base model: sd-v1-4, sd-v1-5, sd-2-1-base, a hub id, a diffusers folder or a "
        "checkpoint file",
    )
    model.add_argument(
        "--unet", default=None, metavar="DIR", help="erased UNet: an erase-concept output folder"
    )

    prompts = parser.add_argument_group("prompts")
    prompts.add_argument(
        "--prompts",
        required=True,
        metavar="SET|PATH",
        help="i2p or i2p-nudity (fetched from the hub when online), coco, imagenette, or a "
        "CSV (a 'prompt' column; optional evaluation_seed, evaluation_guidance, class) or TXT file",
    )
    prompts.add_argument(
        "--category",
        action="append",
        default=[],
        help="keep I2P rows of this category (repeatable; i2p-nudity means 'sexual')",
    )
    prompts.add_argument(
        "--min-nudity-percentage",
        type=float,
        default=None,
        help="keep I2P rows whose nudity_percentage is at least this",
    )
    prompts.add_argument(
        "--limit", type=positive(int), default=None, help="only the first N prompts"
    )
    prompts.add_argument(
        "--classes",
        default=None,
        help="imagenette: comma list of classes (default: all ten)",
    )
    prompts.add_argument(
        "--per-class", type=positive(int), default=10, help="imagenette: images per class"
    )

    generation = parser.add_argument_group("generation")
    generation.add_argument("--num-steps", type=positive(int), default=50, help="DDIM steps")
    generation.add_argument(
        "--guidance-scale",
        type=positive(float),
        default=None,
        help="classifier-free guidance (default: the prompt file's evaluation_guidance, else 7.5)",
    )
    generation.add_argument(
        "--resolution", type=positive(int), default=None, help="image size (default: the model's)"
    )
    add_generation_batch(generation, "--batch-size")
    generation.add_argument(
        "--seed",
        type=seed,
        default=0,
        help="seed of row r is seed + r when the prompt file gives no evaluation_seed",
    )
    generation.add_argument(
        "--images-per-prompt",
        type=positive(int),
        default=1,
        help="samples per prompt; sample k uses the prompt's seed + k",
    )

    metrics = parser.add_argument_group("metrics")
    metrics.add_argument(
        "--metric",
        type=metric_list,
        action="append",
        default=None,
        help=f"{'|'.join(METRIC_NAMES)}, repeatable or a comma list, or none to only generate "
        "(default: nudity for I2P, classify for imagenette, clip otherwise; fid too with "
        "--reference)",
    )
    metrics.add_argument("--nudity-threshold", type=float, default=0.6, help="NudeNet score")
    metrics.add_argument(
        "--reference", default=None, metavar="DIR", help="fid: folder of real images (COCO val)"
    )
    metrics.add_argument(
        "--fid-image-size",
        type=positive(int),
        default=299,
        help="fid: images are center-cropped and resized to this (Inception's input)",
    )
    metrics.add_argument(
        "--clip-model",
        default="ViT-L-14",
        help="open_clip model name (or an open_clip model config .json)",
    )
    metrics.add_argument(
        "--clip-pretrained",
        default="openai",
        help="open_clip weights tag or checkpoint file ('none': random weights, tests only)",
    )
    metrics.add_argument(
        "--classifier-weights",
        default=None,
        metavar="PATH",
        help="classify: ResNet-50 weights file (default: torchvision's, downloaded once)",
    )

    parser.add_argument(
        "--output",
        default=None,
        help="output folder, resumable (default: outputs/eval-<model or unet>-<prompts>)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def load_prompt_set(args: argparse.Namespace) -> list[PromptEntry]:
    """The prompts `--prompts` names, filtered and cut to `--limit`."""
    source = args.prompts
    i2p_filters = bool(args.category or args.min_nudity_percentage is not None)
    if source in ("i2p", "i2p-nudity"):
        categories = tuple(args.category) + (("sexual",) if source == "i2p-nudity" else ())
        return load_i2p(
            None,
            categories=categories,
            min_nudity_percentage=args.min_nudity_percentage,
            limit=args.limit,
        )
    if source == "coco":
        return load_coco(None)
    if source == "imagenette":
        classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
        entries = imagenette_prompts(args.per_class, classes, seed=args.seed)
        return entries[: args.limit] if args.limit else entries
    if i2p_filters:
        return load_i2p(
            source,
            categories=tuple(args.category),
            min_nudity_percentage=args.min_nudity_percentage,
            limit=args.limit,
        )
    return load_prompt_file(source, args.limit)


def chosen_metrics(args: argparse.Namespace) -> list[str]:
    """--metric values in order without repeats, or the prompt set's usual metric."""
    if args.metric is not None:
        return list(dict.fromkeys(name for names in args.metric for name in names))
    if args.prompts.startswith("i2p") or args.category or args.min_nudity_percentage is not None:
        names = ["nudity"]
    elif args.prompts == "imagenette":
        names = ["classify"]
    else:
        names = ["clip"]
    return names + (["fid"] if args.reference and "fid" not in names else [])


def default_output(args: argparse.Namespace) -> str:
    """outputs/eval-<unet or model>-<prompt set>."""
    from erase.concepts import slug

    model = os.path.basename(os.path.normpath(args.unet or args.model))
    prompt_set = os.path.splitext(os.path.basename(args.prompts))[0]
    return os.path.join("outputs", f"eval-{slug(model)}-{slug(prompt_set)}")


def run_evaluation(args: argparse.Namespace, metric_config=None, backend=None) -> dict | None:
    """Generate the missing images, score them, write the reports; the results (main process).

    `metric_config` (an eval.runner.MetricConfig) lets tests pass a FID feature module or a
    loaded CLIP model; the flags fill in the rest.
    """
    check_arguments(args)
    entries = load_prompt_set(args)

    from erase.artifact import output_lock
    from eval.runner import (
        process_state,
    )

    state = process_state()
    output = args.output or default_output(args)
    with output_lock(output):
        return evaluate_into(output, args, entries, state, metric_config, backend)


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse, in one line, what the arguments alone show to be wrong (before any work)."""
    from erase.models import model_conditioning

    if model_conditioning(args.model) == "class":  # before a testbed is trained on first use
        raise EraseError(
            f"erase-eval generates from text prompts and '{args.model}' is class-conditional: "
            "evaluate it with erase-concept's class-removal evaluation instead."
        )
    if args.unet and not os.path.isdir(args.unet):
        raise EraseError(f"--unet '{args.unet}' is not a folder: pass an erase-concept output.")
    if not 0 <= args.nudity_threshold <= 1:  # NaN fails this too
        raise EraseError(f"--nudity-threshold must be in [0, 1], got {args.nudity_threshold}.")
    if args.min_nudity_percentage is not None and not 0 <= args.min_nudity_percentage <= 100:
        raise EraseError(
            f"--min-nudity-percentage must be in [0, 100], got {args.min_nudity_percentage}."
        )


def evaluate_into(output, args, entries, state, metric_config, backend) -> dict | None:
    """Generate and score into `output`, holding its lock; on an error no empty images/ is left."""
    image_dir = os.path.join(output, "images")
    created = [folder for folder in (output, image_dir) if not os.path.exists(folder)]
    try:
        return generate_and_score(output, image_dir, args, entries, state, metric_config, backend)
    except BaseException:
        if state.is_main_process:
            remove_if_imageless(created)
        raise


def remove_if_imageless(folders: list[str]) -> None:
    """Remove the folders this run made (deepest first) when no image was written into them."""
    for folder in reversed(folders):
        if os.path.isdir(folder) and not any(
            name.endswith(".png") for _, _, names in os.walk(folder) for name in names
        ):
            shutil.rmtree(folder, ignore_errors=True)


def generate_and_score(output, image_dir, args, entries, state, metric_config, backend):
    """The evaluation proper: plan, prepare metrics, generate the missing images, score, report."""
    from erase.artifact import versions
    from eval.report import write_outputs
    from eval.runner import (
        GenerationConfig,
        MetricConfig,
        generate_images,
        plan_images,
        prepare_metrics,
        score_metrics,
    )

    generation = GenerationConfig(
        model=args.model,
        unet=args.unet,
        num_steps=args.num_steps,
        guidance_scale=args.guidance_scale,
        resolution=args.resolution,
        batch_size=args.batch_size,
        seed=args.seed,
        images_per_prompt=args.images_per_prompt,
    )
    metric_config = metric_config or MetricConfig()
    metric_config.nudity_threshold = args.nudity_threshold
    metric_config.reference = args.reference
    metric_config.fid_image_size = args.fid_image_size
    metric_config.clip_model = args.clip_model
    metric_config.clip_pretrained = args.clip_pretrained
    metric_config.classifier_weights = args.classifier_weights

    records = plan_images(entries, generation)
    metric_names = chosen_metrics(args)
    prepared = prepare_metrics(metric_names, metric_config, records, state.device)
    stats = generate_images(
        records, image_dir, generation, backend=backend, progress=not args.no_progress
    )
    if not state.is_main_process:
        return None

    summaries, per_image = score_metrics(prepared, metric_config, records, image_dir)
    results = {
        "generation": {
            **dataclasses.asdict(generation),
            "unet_digest": records[0]["unet"] if records else None,
            **stats,
        },
        "prompts": {
            "source": args.prompts,
            "count": len(entries),
            "categories": args.category,
            "min_nudity_percentage": args.min_nudity_percentage,
            "limit": args.limit,
        },
        "metric_settings": {
            k: v
            for k, v in dataclasses.asdict(metric_config).items()
            if k not in ("fid_feature", "clip")
        },
        "metrics": summaries,
        "versions": versions(),
    }
    write_outputs(output, results, per_image, records, image_dir)
    results["output"] = output
    return results


def summary_lines(results: dict) -> list[str]:
    """A few lines for the terminal."""
    from eval.report import headline

    generation = results["generation"]
    lines = [
        f"{generation['images']} images in {results['output']}/images "
        f"({generation['generated']} generated, {generation['reused']} reused)"
    ]
    for name, summary in results["metrics"].items():
        lines.append(f"{name}: {headline(name, summary)[0]}")
    lines.append(f"report: {os.path.join(results['output'], 'report.md')}")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Console entry point of erase-eval; user errors are one stderr line and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        results = run_evaluation(args)
    except EraseError as error:
        print(f"erase-eval: error: {error}", file=sys.stderr)
        return 2
    if results is not None:
        print("\n".join(summary_lines(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
