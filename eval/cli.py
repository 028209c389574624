"""`erase-eval`: generate images for a prompt set with a base or erased model and score them.

erase-eval --model sd-v1-4 --unet outputs/sd-v1-4-nudity-salun --prompts i2p.csv --metric nudity
erase-eval --model sd-v1-4 --unet outputs/... --prompts imagenette --metric classify
erase-eval --model sd-v1-4 --prompts coco_30k.csv --limit 10000 --metric fid,clip --reference DIR
"""

from __future__ import annotations

import argparse
import os
import sys

from erase.cli.args import (
    HelpFormatter,
    OneLineParser,
    add_generation_batch,
    positive,
    run_command,
    seed,
    set_config_defaults,
)
from erase.config import SAMPLER_NAMES
from erase.errors import EraseError
from eval.evaluation import (
    INCEPTION_FEATURES,
    METRIC_NAMES,
    EvalConfig,
    parse_metrics,
    run_evaluation,
)


def metric_list(text: str) -> list[str]:
    """An argparse type: one metric or a comma list of them."""
    try:
        return parse_metrics(text)
    except EraseError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


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
        help="base model: sd-v1-4, sd-v1-5, sd-2-1-base, a hub id, a diffusers folder or a "
        "checkpoint file",
    )
    model.add_argument(
        "--model-dir",
        "--unet",
        dest="unet",
        default=None,
        metavar="DIR",
        help="the erased model: an erase-concept output folder (its unet/, and its "
        "text_encoder/ when the method erased the text encoder); --unet is the same flag",
    )
    model.add_argument(
        "--text-encoder",
        default=None,
        metavar="DIR",
        help="an erase-concept output whose text_encoder/ (AdvUnlearn's) reads the prompts, "
        "paired with the UNet of --model-dir (or the base's)",
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
    prompts.add_argument("--per-class", type=positive(int), help="imagenette: images per class")

    generation = parser.add_argument_group("generation")
    generation.add_argument("--num-steps", type=positive(int), help="sampling steps")
    generation.add_argument(
        "--sampler",
        choices=SAMPLER_NAMES,
        help="ddim, or lms (SalUn's and UnlearnDiffAtk's SD evaluations sample LMS); recorded",
    )
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
        help="seed of row r is seed + r when the prompt file gives no evaluation_seed",
    )
    generation.add_argument(
        "--images-per-prompt",
        type=positive(int),
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
    metrics.add_argument("--nudity-threshold", type=float, help="NudeNet score")
    metrics.add_argument(
        "--reference", default=None, metavar="DIR", help="fid: folder of real images (COCO val)"
    )
    metrics.add_argument(
        "--fid-image-size",
        type=positive(int),
        help="fid: images are center-cropped and resized to this (Inception's input)",
    )
    metrics.add_argument(
        "--fid-features",
        type=int,
        choices=INCEPTION_FEATURES,
        help="fid: Inception's feature layer (2048 the usual FID; SalUn's class-wise FID uses "
        "64); fewer images than features give a biased FID, and a warning",
    )
    metrics.add_argument(
        "--fid-weights",
        default=None,
        metavar="FILE",
        help="fid: torch-fidelity's Inception weights file (pt_inception-2015-12-05), for "
        "machines that cannot download it",
    )
    metrics.add_argument(
        "--clip-model",
        help="open_clip model name (or an open_clip model config .json)",
    )
    metrics.add_argument(
        "--clip-pretrained",
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
    set_config_defaults(parser, EvalConfig())
    return parser


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """The EvalConfig of parsed erase-eval flags (repeated --metric lists joined)."""
    settings = vars(args).copy()
    if args.metric is not None:
        settings["metric"] = [name for names in args.metric for name in names]
    return EvalConfig.from_dict(settings)


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

    def work(args: argparse.Namespace) -> None:
        results = run_evaluation(config_from_args(args))
        if results is not None:
            print("\n".join(summary_lines(results)))

    return run_command(build_parser(), argv, work)


if __name__ == "__main__":
    sys.exit(main())
