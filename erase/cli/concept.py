"""`erase-concept`: erase a concept from a diffusion model and write a loadable artifact.

erase-concept --model sd-v1-4 --concept nudity
erase-concept --model ddpm-digits --concept 3
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from erase.api import ErasedModel, run
from erase.cli.args import (
    HelpFormatter,
    OneLineParser,
    add_generation_batch,
    positive,
    run_command,
    set_config_defaults,
)
from erase.config import ERASURE_CHOICES, ErasureConfig
from erase.harden import TECHNIQUES
from erase.methods import METHODS
from erase.models import BUILTIN_MODELS
from erase.models.sd import SD_ALIASES
from erase.models.sdxl import SDXL_ALIASES


def method_fields() -> dict[str, dataclasses.Field]:
    """Every field of every registered method's Config, by name (shared names appear once)."""
    fields: dict[str, dataclasses.Field] = {}
    for method_class in METHODS.values():
        for config_field in dataclasses.fields(method_class.Config):
            fields.setdefault(config_field.name, config_field)
    return fields


def technique_fields() -> dict[str, dataclasses.Field]:
    """Every field of every hardening technique's Config, by name."""
    fields: dict[str, dataclasses.Field] = {}
    for technique_class in TECHNIQUES.values():
        for config_field in dataclasses.fields(technique_class.Config):
            fields.setdefault(config_field.name, config_field)
    return fields


def add_setting_flag(group, config_field: dataclasses.Field, help_text: str) -> None:
    """The flag of one config field (`--mask-ratio` for mask_ratio), typed by its annotation;
    its default is None, so a setting left unset takes its config's default."""
    flag = "--" + config_field.name.replace("_", "-")
    if str(config_field.type).startswith("list["):  # repeatable: --uce-preserve A --uce-preserve B
        group.add_argument(flag, action="append", default=None, metavar="TEXT", help=help_text)
    elif config_field.type in (bool, "bool"):
        group.add_argument(flag, action="store_true", default=None, help=help_text)
    elif config_field.type == "bool | None":
        group.add_argument(
            flag, action=argparse.BooleanOptionalAction, default=None, help=help_text
        )
    else:
        kind = {"int": int, "int | None": int}.get(str(config_field.type), float)
        kind = str if "str" in str(config_field.type) else kind
        group.add_argument(flag, type=kind, default=None, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of erase-concept (erase-bench reuses it)."""
    parser = OneLineParser(
        prog="erase-concept",
        description="Erase a concept from a diffusion model (SalUn by default; ESD, "
        "Forget-Me-Not and UCE as baselines) and write the erased UNet in diffusers format, with its "
        "saliency mask, metadata.json and report.",
        formatter_class=HelpFormatter,
    )
    add_erase_arguments(parser)
    set_config_defaults(parser, ErasureConfig())
    return parser


def config_from_args(args: argparse.Namespace) -> ErasureConfig:
    """The ErasureConfig of parsed erase-concept flags (method settings left unset are dropped)."""
    return ErasureConfig.from_dict(vars(args))


def reference_help(setting: str) -> str:
    """'reference: salun 1e-05 (SD nudity, SD class), 0.0001 (DDPM); fmn 2e-06': the default of
    `setting` per method and case, from the methods' own `defaults`; '' where none sets it."""
    from erase.methods import reference_defaults

    by_values: dict[str, list[str]] = {}
    for name in sorted(METHODS):
        cases = reference_defaults(METHODS[name]).get(setting)
        if cases is None:
            continue
        values: dict[str, list[str]] = {}
        for case, value in cases.items():
            values.setdefault(format_default(value), []).append(case)
        text = ", ".join(
            value if len(values) == 1 else f"{value} ({', '.join(labels)})"
            for value, labels in values.items()
        )
        by_values.setdefault(text, []).append(name)
    return "; ".join(f"{'/'.join(names)} {text}" for text, names in by_values.items())


def format_default(value) -> str:
    """A default as --help prints it: 'none' for None, else its repr for strings and numbers."""
    return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def with_reference(help_text: str, setting: str) -> str:
    """`help_text` with the reference defaults of `setting` appended, when methods give any."""
    reference = reference_help(setting)
    if not reference:
        return help_text
    return f"{help_text}; reference: {reference}" if help_text else f"reference: {reference}"


def add_erase_arguments(parser: argparse.ArgumentParser, with_output: bool = True) -> None:
    """All flags of one erasure run, grouped as in --help."""
    model = parser.add_argument_group("model and concept")
    model.add_argument(
        "--model",
        help=f"{', '.join([*SD_ALIASES, *SDXL_ALIASES])}, a hub id, a local diffusers folder, "
        f"a .safetensors/.ckpt file, or a built-in testbed: {', '.join(BUILTIN_MODELS)} "
        "(ddpm-cifar10 with --data-dir)",
    )
    model.add_argument(
        "--concept",
        required=True,
        action="append",
        help="nudity, an Imagenette class (e.g. "
        "'church'), an artist style, a class index or name for class-conditional "
        "models, or any name with --forget-prompt/--retain-prompt; repeat it to erase several "
        "concepts in one run",
    )
    model.add_argument(
        "--remap",
        choices=ERASURE_CHOICES["remap"],
        help="SalUn's remap target of a forgotten class: the next class, (c + 1) %% K, as both "
        "references do, or a random other class per sample",
    )
    model.add_argument(
        "--forget-prompt",
        action="append",
        metavar="TEXT",
        help="a prompt of the concept to forget (repeatable)",
    )
    model.add_argument(
        "--retain-prompt",
        action="append",
        metavar="TEXT",
        help="a prompt the forgotten one is remapped to and that must stay intact (repeatable)",
    )
    model.add_argument("--method", choices=sorted(METHODS), help="unlearning method")
    model.add_argument("--data-dir", default=None, help="dataset folder (ddpm-cifar10)")
    if with_output:
        output = parser.add_argument_group("output")
        output.add_argument(
            "--output",
            default=None,
            help="output folder (default: outputs/<model>-<concept>-<method>)",
        )
        output.add_argument("--overwrite", action="store_true", help="replace an existing output")
        output.add_argument(
            "--push-to-hub",
            default=None,
            metavar="REPO_ID",
            help="upload the output (with its model card) to this Hugging Face model repository",
        )

    data = parser.add_argument_group("forget and retain data")
    data.add_argument(
        "--num-forget",
        type=positive(int),
        default=None,
        help="images of the concept (default: the reference's, 800 generated images; the whole "
        "class on class-conditional models)",
    )
    data.add_argument(
        "--num-retain",
        type=positive(int),
        default=None,
        help="retain images (default: 800 generated; every other class's images on "
        "class-conditional models)",
    )
    data.add_argument(
        "--resolution",
        type=positive(int),
        default=None,
        help="image size of generated data (default: the model's)",
    )
    data.add_argument("--gen-steps", type=positive(int), help="DDIM steps per image")
    data.add_argument(
        "--guidance-scale",
        type=positive(float),
        help="guidance when generating the forget/retain sets",
    )
    add_generation_batch(data, "--gen-batch-size")
    data.add_argument(
        "--gen-precision",
        choices=ERASURE_CHOICES["gen_precision"],
        help="precision of image generation (Stable Diffusion), by autocast over the fp32 "
        "weights; auto: fp16 on a CUDA GPU, as diffusers users run SD, fp32 on the CPU",
    )
    data.add_argument(
        "--cache-dir", default=None, help="cache of generated sets (default: $ERASE_HOME/data)"
    )
    data.add_argument(
        "--concept-images",
        default=None,
        metavar="DIR",
        help="a folder of images of the concept to use as the forget set",
    )
    data.add_argument(
        "--retain-images",
        default=None,
        metavar="DIR",
        help="a folder of images to keep, as the retain set (class subfolders named by class "
        "pair each image with its class's prompt)",
    )

    training = parser.add_argument_group("training (defaults: the method's reference settings)")
    training.add_argument("--lr", type=positive(float), default=None, help=with_reference("", "lr"))
    training.add_argument(
        "--steps",
        type=positive(int),
        default=None,
        help=with_reference(
            "optimizer updates (class-conditional SalUn: the reference's ~2.84 passes over the "
            "retain set in batches of 128, at least 60)",
            "steps",
        ),
    )
    training.add_argument(
        "--epochs",
        type=positive(float),
        default=None,
        help="passes over the forget set (when --steps is not given)",
    )
    training.add_argument(
        "--batch-size", type=positive(int), default=None, help=with_reference("", "batch_size")
    )
    training.add_argument(
        "--micro-batch-size",
        type=positive(int),
        default=None,
        metavar="N",
        help="compute each batch N samples at a time, with the same update as the whole batch "
        "(less activation memory; default: the whole batch at once)",
    )
    training.add_argument(
        "--no-gradient-checkpointing",
        action="store_true",
        help="keep every activation instead of recomputing them in backward (faster, much "
        "more memory; Stable Diffusion trains with checkpointing by default, as the reference)",
    )
    training.add_argument("--gradient-accumulation-steps", type=positive(int))
    training.add_argument("--mixed-precision", choices=ERASURE_CHOICES["mixed_precision"])
    training.add_argument(
        "--optimizer",
        choices=ERASURE_CHOICES["optimizer"],
        help="adam: exact fp32 moments (default); adam8bit: Adam's moments blockwise-quantized "
        "to 8 bits, a quarter of their memory (needs bitsandbytes: pip install 'erase[adam8bit]')",
    )
    training.add_argument(
        "--max-grad-norm",
        type=positive(float),
        default=None,
        help=with_reference("", "max_grad_norm"),
    )
    training.add_argument("--seed", type=int)
    training.add_argument(
        "--checkpoint-every",
        type=int,
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
        add_setting_flag(
            methods, config_field, with_reference(config_field.metadata.get("help", ""), name)
        )

    hardening = parser.add_argument_group("hardening against relearning (docs/methods.md#harden)")
    hardening.add_argument(
        "--harden",
        default=None,
        metavar="TECHNIQUE",
        help=f"make the erasure resist fine-tuning: {', '.join(sorted(TECHNIQUES))} "
        "(default: none)%(default).0s",
    )
    for config_field in technique_fields().values():
        default = format_default(config_field.default)
        # "%(default).0s" prints nothing, and keeps argparse from adding "(default: None)":
        # the flag's own default is None (unset), the technique's default is the one shown
        help_text = f"{config_field.metadata.get('help', '')} (default: {default})%(default).0s"
        add_setting_flag(hardening, config_field, help_text)

    evaluation = parser.add_argument_group("evaluation (class-conditional models)")
    evaluation.add_argument(
        "--no-eval", action="store_true", help="skip the before/after class-removal evaluation"
    )
    evaluation.add_argument(
        "--no-grid",
        action="store_true",
        help="text models: skip grid.png (a few forget and retain prompts, same seeds, "
        "before | after)",
    )
    evaluation.add_argument(
        "--eval-per-class", type=positive(int), help="generated images per class"
    )
    evaluation.add_argument(
        "--eval-steps",
        type=positive(int),
        default=None,
        help="DDIM steps per evaluation image (default: the model's, 50)",
    )


def summary(result: ErasedModel) -> str:
    """A few lines for the terminal."""
    metadata = result.metadata
    lines = [
        f"erased '{metadata['concept']['name']}' with {metadata['method']} -> {result.output}",
        f"changed weights: {metadata['changed_weights']:,} of {metadata['total_weights']:,}",
    ]
    if "evaluation" in metadata:
        lines.append(f"{'metric':<26}{'before':>8}{'after':>9}")
        for key in (
            "ua",
            "forget_accuracy",
            "retain_accuracy",
            "retain_confident_accuracy",
            "fid_retain",
        ):
            before, after = (
                metadata["evaluation"]["before"].get(key),
                metadata["evaluation"]["after"].get(key),
            )
            if before is not None:
                lines.append(f"{key:<26}{before:>8.3f}{after:>9.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Console entry point of erase-concept."""

    def work(args: argparse.Namespace) -> None:
        result = run(config_from_args(args))
        print(summary(result))
        if result.pushed:
            print(f"pushed to {result.pushed}")

    return run_command(build_parser(), argv, work)


erase_concept_main = main  # the name tests and older scripts import


if __name__ == "__main__":
    sys.exit(main())
