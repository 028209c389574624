"""`erase-export`: an erased model in the formats other tools load (see erase/export.py).

erase-export outputs/sd-v1-4-nudity-salun --format single-file --output erased.safetensors
erase-export outputs/sd-v1-4-nudity-salun --format unet --output erased-unet.safetensors --half
erase-export outputs/sd-v1-4-nudity-salun --format pipeline --output erased-pipeline/
"""

from __future__ import annotations

import argparse
import sys

from erase.cli.args import HelpFormatter, OneLineParser, run_command
from erase.export import FORMATS, export_artifact


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of erase-export."""
    parser = OneLineParser(
        prog="erase-export",
        description="Write an erase-concept output as one checkpoint file for AUTOMATIC1111, "
        "Forge and ComfyUI (single-file), the erased UNet alone (unet: ComfyUI's UNet loader), "
        "or a complete diffusers folder (pipeline).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("artifact", help="an erase-concept output folder")
    parser.add_argument("--format", required=True, choices=FORMATS, dest="export_format")
    parser.add_argument(
        "--output", required=True, help="a .safetensors file (single-file, unet) or a folder"
    )
    parser.add_argument("--half", action="store_true", help="write fp16 weights")
    parser.add_argument(
        "--base",
        default=None,
        help="the base model when the one in metadata.json cannot be loaded here "
        "(e.g. the artifact came from a pipeline in memory)",
    )
    parser.add_argument(
        "--text-encoder",
        default=None,
        metavar="DIR",
        help="an erase-concept output whose erased text_encoder/ (AdvUnlearn's) goes in, paired "
        "with the artifact's UNet (default: the artifact's own, when it has one)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument(
        "--push-to-hub",
        default=None,
        metavar="REPO_ID",
        help="also upload the export and its model card to this Hugging Face model repository",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console entry point of erase-export."""

    def work(args: argparse.Namespace) -> None:
        if args.push_to_hub:
            from erase.card import check_can_push

            check_can_push(args.push_to_hub)
        written = export_artifact(
            args.artifact,
            args.export_format,
            args.output,
            half=args.half,
            base=args.base,
            overwrite=args.overwrite,
            text_encoder=args.text_encoder,
        )
        print(
            f"wrote {written['output']} ({written['format']}, {written['dtype']}, "
            f"{written['bytes'] / 2**20:.1f} MiB)"
        )
        if args.push_to_hub:
            from erase.card import push_export

            url = push_export(
                args.output, args.export_format, written["metadata"], args.push_to_hub
            )
            print(f"pushed to {url}")

    return run_command(build_parser(), argv, work)


if __name__ == "__main__":
    sys.exit(main())
