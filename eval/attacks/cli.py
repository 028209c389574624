"""`erase-attack`: attack an erased model and report whether the concept stays gone.

erase-attack --model sd-v1-4 --unet outputs/sd-v1-4-nudity-salun --concept nudity \
    --attack unlearndiffatk --prompts nudity.csv
erase-attack --model ddpm-digits --unet outputs/ddpm-digits-3-salun --concept 3 --attack relearn --retrain
"""

from __future__ import annotations

import argparse
import os
import sys

from erase.cli.args import OneLineParser, add_generation_batch, positive, run_command, seed
from erase.config import SAMPLER_NAMES
from erase.errors import EraseError
from eval.attacks.config import (
    ATTACK_NAMES,
    JUDGE_RULES,
    RELAXATIONS,
    default_output,
    parse_attacks,
)


def attack_list(text: str) -> list[str]:
    """An argparse type: one attack or a comma list of them."""
    try:
        return parse_attacks(text)
    except EraseError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def step_list(text: str) -> list[int]:
    """An argparse type: relearning checkpoints, a comma list of step counts."""
    try:
        steps = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected step counts like 0,10,25, got '{text}'"
        ) from None
    if not steps or steps[0] < 0:
        raise argparse.ArgumentTypeError(f"expected step counts >= 0 like 0,10,25, got '{text}'")
    return steps


def text_list(text: str) -> list[str]:
    """An argparse type: a comma list of names (relearning data or tunings)."""
    names = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not names:
        raise argparse.ArgumentTypeError(f"expected a comma list, got '{text}'")
    return names


def rate_list(text: str) -> list[float]:
    """An argparse type: learning rates > 0, a comma list like 1e-5,1e-4."""
    try:
        rates = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        rates = []
    if not rates or min(rates) <= 0:
        raise argparse.ArgumentTypeError(
            f"expected learning rates > 0 like 1e-5,1e-4, got '{text}'"
        )
    return rates


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of erase-attack."""
    parser = OneLineParser(
        prog="erase-attack",
        description="Attack an erased model (adversarial prompts, relearning, released attack "
        "prompt sets) and judge whether the concept comes back; beside the testbed retrained "
        "without the concept with --retrain. The output folder is resumable per prompt.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default="sd-v1-4", help="base model the UNet was erased from")
    parser.add_argument(
        "--model-dir",
        "--unet",
        dest="unet",
        default=None,
        metavar="DIR",
        help="the erased model: an erase-concept output, its unet/ and its text_encoder/ when "
        "it has one; --unet is the same flag (default: attack the base)",
    )
    parser.add_argument(
        "--text-encoder",
        default=None,
        metavar="DIR",
        help="an erase-concept output whose text_encoder/ (AdvUnlearn's) reads the prompts, "
        "paired with the UNet of --model-dir (or the base's)",
    )
    parser.add_argument(
        "--concept",
        required=True,
        help="the erased concept: nudity, an Imagenette class, a testbed digit",
    )
    parser.add_argument(
        "--attack",
        type=attack_list,
        action="append",
        required=True,
        help=f"{'|'.join(ATTACK_NAMES)}, repeatable or a comma list",
    )
    parser.add_argument(
        "--prompts",
        default=None,
        metavar="PATH",
        help="prompt CSV/TXT (nudity: the I2P nudity CSV; Ring-A-Bell's CSV); default: the concept's built-in set",
    )
    parser.add_argument(
        "--limit", type=positive(int), default=None, help="only the first N prompts"
    )
    parser.add_argument(
        "--per-prompt", type=positive(int), default=10, help="seeds per prompt of a built-in set"
    )
    parser.add_argument(
        "--seed",
        type=seed,  # the range every other erase command checks
        default=0,
        help="seed of row r is seed + r when the prompt file gives none",
    )
    parser.add_argument(
        "--num-steps",
        type=positive(int),
        default=None,
        help="sampling steps (default: 25 on the testbeds, 50 otherwise)",
    )
    parser.add_argument(
        "--sampler",
        choices=SAMPLER_NAMES,
        default=None,
        help="sampler of the target, plain and attacked images (default: lms on Stable "
        "Diffusion, the reference's; ddim on the testbeds)",
    )
    parser.add_argument(
        "--guidance-scale",
        type=positive(float),
        default=None,
        help="guidance (default: the prompt's own, else the model's)",
    )
    parser.add_argument(
        "--resolution", type=positive(int), default=None, help="image size (default: the model's)"
    )
    add_generation_batch(parser, "--batch-size")
    parser.add_argument(
        "--retrain",
        action="store_true",
        help="also attack the testbed retrained without the concept (trained once, cached)",
    )
    parser.add_argument(
        "--classifier-weights",
        default=None,
        metavar="PATH",
        help="Imagenette judge: ResNet-50 weights file",
    )
    parser.add_argument(
        "--nudenet-model",
        default=None,
        metavar="PATH",
        help="nudity judge: a NudeNet-format ONNX detector (e.g. the reference's best.onnx; "
        "default: pip NudeNet's bundled 320n.onnx)",
    )
    parser.add_argument(
        "--judge-rule",
        choices=JUDGE_RULES,
        default="reference",
        help="nudity judge: reference (boxes >= 0.5, NMS 0.5/0.5, an exposed label > 0.45) or "
        "nudenet (pip NudeNet's boxes >= 0.2, NMS 0.25/0.45, an exposed label >= 0.45)",
    )

    udiff = parser.add_argument_group("unlearndiffatk (reference: configs/*/text_grad_*.json)")
    udiff.add_argument(
        "--k",
        type=positive(int),
        default=None,
        help="prefix tokens (default: 5 for nudity, 3 otherwise)",
    )
    udiff.add_argument("--iterations", type=positive(int), default=40, help="Adam steps per block")
    udiff.add_argument(
        "--blocks",
        type=positive(int),
        default=50,
        help="blocks at most (one sampled timestep each)",
    )
    udiff.add_argument("--attack-lr", type=positive(float), default=0.01, help="Adam learning rate")
    udiff.add_argument("--attack-weight-decay", type=float, default=0.1, help="Adam weight decay")
    udiff.add_argument(
        "--relaxation",
        choices=RELAXATIONS,
        default="sample",
        help="sample: one real token per slot drawn each iteration, straight-through gradient "
        "(the reference's); mixture: the probability-weighted mean of the token embeddings",
    )

    udiff.add_argument(
        "--max-prompt-tokens",
        type=positive(int),
        default=60,
        help="prompts longer than this (start and end tokens counted) are not attacked and "
        "count by their plain verdict (the reference's loader)",
    )
    udiff.add_argument(
        "--target-steps",
        type=positive(int),
        default=None,
        help="steps of the base model's target images (default: 100 with lms, the "
        "reference's; else --num-steps)",
    )

    cce = parser.add_argument_group("cce (concept inversion; reference train.sh)")
    cce.add_argument(
        "--cce-images",
        default=None,
        metavar="DIR",
        help="the concept's images (default: its own, as --relearn-data forget)",
    )
    cce.add_argument("--cce-num-images", type=positive(int), default=25, help="images at most")
    cce.add_argument(
        "--cce-steps", type=positive(int), default=5000, help="textual-inversion steps"
    )
    cce.add_argument("--cce-lr", type=positive(float), default=5e-3, help="AdamW learning rate")

    rab = parser.add_argument_group("ring-a-bell (reference InversePrompt.ipynb)")
    rab.add_argument(
        "--rab-eta", type=float, default=3.0, help="weight of the concept vector (3: nudity)"
    )
    rab.add_argument(
        "--rab-length",
        type=positive(int),
        default=16,
        help="prompt tokens K: 16, 38 or 77 (77: all 75 a prompt holds)",
    )
    rab.add_argument("--rab-population", type=positive(int), default=200, help="population")
    rab.add_argument(
        "--rab-generations", type=positive(int), default=3000, help="genetic-search generations"
    )
    rab.add_argument(
        "--rab-pairs",
        default=None,
        metavar="CSV",
        help="prompt pairs with and without the concept (columns 'sensitive prompt', 'normal "
        "prompt'); default: the concept's prompts with and without its words",
    )

    relearn = parser.add_argument_group(
        "relearn (each combination of data, tuning and lr is one attack, one curve)"
    )
    relearn.add_argument(
        "--relearn-data",
        type=text_list,
        default=["forget"],
        metavar="forget|retain|DIR",
        help="auxiliary images: the concept's, the others', or a folder; comma list",
    )
    relearn.add_argument(
        "--relearn-tuning",
        type=text_list,
        default=["full"],
        metavar="full|lora",
        help="fine-tune every weight or a LoRA on the attention projections; comma list",
    )
    relearn.add_argument(
        "--relearn-lora-rank", type=positive(int), default=4, help="the LoRA attacker's rank"
    )
    relearn.add_argument(
        "--relearn-steps",
        type=step_list,
        default=[0, 10, 25, 50, 100],
        help="checkpoints, comma list",
    )
    relearn.add_argument(
        "--relearn-lr", type=rate_list, default=[1e-4], help="Adam learning rate(s), comma list"
    )
    relearn.add_argument(
        "--relearn-batch-size", type=positive(int), default=32, help="images per step"
    )
    relearn.add_argument(
        "--relearn-images", type=positive(int), default=180, help="auxiliary images at most"
    )

    parser.add_argument(
        "--output",
        default=None,
        help="output folder, resumable (default: outputs/attack-<unet or model>-<concept>)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def settings_from_args(args: argparse.Namespace):
    """The run's AttackSettings from parsed erase-attack flags."""
    from eval.attacks.config import CLI_ONLY, attack_settings

    flags = {name: value for name, value in vars(args).items() if name not in CLI_ONLY}
    return attack_settings(
        flags.pop("concept"), [n for names in args.attack for n in names], **flags
    )


def summary_lines(results: dict) -> list[str]:
    """A few lines for the terminal."""
    from eval.attacks.harness import headline

    lines = [
        f"{results['concept']} on {results['model']} ({results['prompts']} prompts, judge: {results['judge']})"
    ]
    retrain = results["retrain"] or {}
    for name, figures in results["attacks"].items():
        line = f"{name}: {headline(name, figures)}"
        if name in retrain:
            line += f" (retrain: {headline(name, retrain[name])})"
        lines.append(line)
    lines.append(f"report: {os.path.join(results['output'], 'report.md')}")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Console entry point of erase-attack; user errors are one stderr line and exit code 2."""

    def work(args: argparse.Namespace) -> None:
        from eval.attacks.harness import run_attacks

        settings = settings_from_args(args)
        output = args.output or default_output(settings)
        results = run_attacks(settings, output, progress=not args.no_progress)
        if results is not None:
            print("\n".join(summary_lines(results)))

    return run_command(build_parser(), argv, work)


if __name__ == "__main__":
    sys.exit(main())
