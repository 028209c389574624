"""`erase-bench`: every method erases the same concept from the same base model, and each result
(and the base) is scored with the same prompts, seeds and metrics, in one table.

    erase-bench --model sd-digits --concept three --output bench/
    erase-bench --model sd-v1-4 --concept nudity --methods salun,esd-u --steps 50 --output bench/
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import shlex
import sys

from erase.bench import DEFAULT_METHODS, BenchConfig, markdown_table, run_bench
from erase.cli.args import HelpFormatter, OneLineParser, positive, run_command, set_config_defaults
from erase.cli.concept import add_erase_arguments
from erase.config import SAMPLER_NAMES, ErasureConfig
from erase.errors import EraseError

# erase-bench's own flags; every other flag is erase-concept's, a setting of each method's erasure
BENCH_FLAGS = (
    "methods",
    "output",
    "overwrite",
    "method_flags",
    "bench_per_prompt",
    "bench_steps",
    "bench_guidance",
    "bench_clip",
    "sampler",
    "attacks",
    "attack_flags",
    "retrain",
    "retrain_unet",
)


def build_parser() -> argparse.ArgumentParser:
    """erase-bench's flags: its own, plus every flag of erase-concept (passed to each method)."""
    parser = OneLineParser(
        prog="erase-bench",
        description="Erase one concept with several methods from the same base model and score "
        "each (and the base) with the same prompts, seeds and metrics.",
        formatter_class=HelpFormatter,
    )
    bench = parser.add_argument_group("benchmark")
    bench.add_argument(
        "--methods", default=",".join(DEFAULT_METHODS), help="comma-separated methods to compare"
    )
    bench.add_argument("--output", required=True, help="bench folder (one subfolder per method)")
    bench.add_argument("--overwrite", action="store_true", help="replace an existing bench folder")
    bench.add_argument(
        "--method-flags",
        action="extend",
        nargs="+",
        default=[],
        metavar="METHOD=FLAGS",
        help="erase-concept flags for one method only, e.g. 'esd-x=--lr 1e-4 --steps 200' "
        "(one or more per flag, and repeatable; they override the shared flags)",
    )
    bench.add_argument(
        "--bench-per-prompt", type=positive(int), help="evaluation images per prompt (fixed seeds)"
    )
    bench.add_argument("--bench-steps", type=positive(int), help="DDIM steps of evaluation images")
    bench.add_argument(
        "--sampler",
        choices=SAMPLER_NAMES,
        default=None,
        help="sampler of every row's images, evaluation and attacks (default: DDIM for the "
        "evaluation, each attack's own: LMS on SD, as the reference)",
    )
    bench.add_argument(
        "--bench-guidance",
        type=positive(float),
        help="guidance of evaluation images (default: the model's)",
    )
    bench.add_argument(
        "--bench-clip",
        metavar="MODEL:WEIGHTS",
        help="open_clip model for the CLIP score of retain images on Stable Diffusion models "
        "('none' to skip)",
    )
    robustness = parser.add_argument_group("robustness (erase-attack on every row)")
    robustness.add_argument(
        "--attacks",
        default="",
        metavar="LIST",
        help="attacks on the base and every erased model, e.g. unlearndiffatk,relearn: adds the "
        "ASR and steps-to-recover columns",
    )
    robustness.add_argument(
        "--attack-flags",
        default="",
        metavar="FLAGS",
        help="erase-attack flags for those attacks, e.g. --attack-flags='--blocks 10 --per-prompt 5'",
    )
    robustness.add_argument(
        "--retrain",
        action="store_true",
        help="add a row for the testbed retrained without the concept (trained once, cached)",
    )
    robustness.add_argument(
        "--retrain-unet",
        action="store_true",
        help="sd-digits: add a row for its UNet alone retrained without the concept, beside the "
        "base's text encoder and VAE: the yardstick of an erasure that edits only the UNet "
        "(trained once, cached)",
    )
    add_erase_arguments(parser, with_output=False)
    for action in parser._actions:  # the bench sets these itself for every method: not shown
        if action.dest in ("method", "no_eval"):
            action.help = action.default = argparse.SUPPRESS
    set_config_defaults(parser, ErasureConfig())
    bench_defaults = BenchConfig(erasure=ErasureConfig(), output="")
    parser.set_defaults(
        **{
            name: getattr(bench_defaults, name)
            for name in ("bench_per_prompt", "bench_steps", "bench_guidance", "bench_clip")
        }
    )
    return parser


def flags_parser() -> argparse.ArgumentParser:
    """erase-bench's parser with nothing required: it reads one method's extra flags."""
    parser = build_parser()
    for action in parser._actions:
        action.required = False
    return parser


def parse_quietly(parser: argparse.ArgumentParser, argv: list[str], namespace=None, what=""):
    """`parser.parse_args(argv)`, a usage error as one EraseError prefixed by `what`."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return parser.parse_args(argv, namespace=namespace)
    except SystemExit:
        reason = captured.getvalue().strip().partition("error: ")[2] or "invalid flags"
        raise EraseError(f"{what}: {reason}") from None


def method_settings(args: argparse.Namespace) -> dict[str, dict]:
    """--method-flags as each method's own settings: what its flags change from the shared ones."""
    shared = {name: value for name, value in vars(args).items() if name not in BENCH_FLAGS}
    settings: dict[str, dict] = {}
    for entry in args.method_flags:
        name, separator, flags = entry.partition("=")
        if not separator or not name.strip():
            raise EraseError(
                f"--method-flags '{entry}' must read METHOD=FLAGS, e.g. 'fmn=--lr 1e-5'."
            )
        parsed = parse_quietly(
            flags_parser(), shlex.split(flags), copy.deepcopy(args), f"--method-flags for {name}"
        )
        changed = {k: v for k, v in vars(parsed).items() if k in shared and v != shared[k]}
        if name.strip() not in args.methods.split(","):
            raise EraseError(
                f"--method-flags names '{name}', which is not in --methods ({args.methods})."
            )
        settings.setdefault(name.strip(), {}).update(changed)
    return settings


def attack_settings(args: argparse.Namespace) -> dict:
    """--attack-flags as erase-attack's settings by name (checked by erase-attack's parser)."""
    if not args.attacks:
        return {}
    from eval.attacks.cli import build_parser as attack_parser
    from eval.attacks.config import CLI_ONLY

    argv = ["--model", args.model, "--concept", "-", "--attack", args.attacks]
    parsed = parse_quietly(
        attack_parser(), argv + shlex.split(args.attack_flags), what="--attacks/--attack-flags"
    )
    defaults = vars(attack_parser().parse_args(argv))
    skip = {*CLI_ONLY, "model", "concept"}
    return {k: v for k, v in vars(parsed).items() if k not in skip and v != defaults[k]}


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The BenchConfig of parsed erase-bench flags."""
    erasure = {name: value for name, value in vars(args).items() if name not in BENCH_FLAGS}
    own = {
        name: getattr(args, name)
        for name in BENCH_FLAGS
        if name not in ("method_flags", "attack_flags", "output")
    }
    own.update(method_settings=method_settings(args), attack_settings=attack_settings(args))
    concept = erasure.pop("concept")
    return BenchConfig.from_settings(concept, args.output, **erasure, **own)


def main(argv: list[str] | None = None) -> int:
    """Console entry point of erase-bench."""

    def work(args: argparse.Namespace) -> None:
        table = run_bench(config_from_args(args))
        print(markdown_table(table["rows"]))
        print(
            f"wrote {args.output}/: bench.json, bench.md, chart.png, grid.png, one folder per method"
        )

    return run_command(build_parser(), argv, work)


if __name__ == "__main__":
    sys.exit(main())
