"""`erase-bench`: every method erases the same concept from the same base model, and each result
(and the base) is scored with the same prompts, seeds and metrics, in one table.

    erase-bench --model sd-digits --concept three --output bench/
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
import traceback

import torch

from erase.artifact import check_output, staged_output, write_json
from erase.cli import OneLineParser, add_erase_arguments, resolve_run_concept, run_erasure
from erase.errors import EraseError
from erase.methods import METHODS
from erase.models import load_backend
from erase.train import peak_memory_mb


def build_parser() -> argparse.ArgumentParser:
    """erase-bench's flags: its own, plus every training flag of erase-concept."""
    parser = OneLineParser(
        prog="erase-bench",
        description="Erase one concept with several methods from the same base model and score "
        "each (and the base) with the same prompts, seeds and metrics.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--methods", default="salun,esd-u,esd-x,fmn", help="comma-separated methods to compare"
    )
    parser.add_argument("--output", required=True, help="bench folder (one subfolder per method)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bench folder")
    parser.add_argument(
        "--bench-per-prompt",
        type=int,
        default=10,
        help="evaluation images per prompt (fixed seeds)",
    )
    parser.add_argument(
        "--bench-steps", type=int, default=25, help="DDIM steps of evaluation images"
    )
    parser.add_argument(
        "--bench-guidance",
        type=float,
        default=None,
        help="guidance of evaluation images (default: the model's)",
    )
    add_erase_arguments(parser, with_output=False)
    return parser


def evaluation_prompts(backend, concept) -> tuple[list[str | int], list[str | int]]:
    """Forget-side and retain-side conditions to score (held-out captions where the model has them)."""
    if hasattr(backend, "eval_prompts"):  # sd-digits: held-out caption templates
        digit = backend.digit_names.index(concept.name)
        others = [d for d in range(10) if d != digit]
        return backend.eval_prompts(digit), [p for d in others for p in backend.eval_prompts(d)]
    return list(concept.forget), list(concept.retain)


def label_of(backend, condition) -> int | None:
    """The class a condition asks for, where a classifier can check it (digits, class models)."""
    if isinstance(condition, int):
        return condition
    names = getattr(backend, "digit_names", None)
    if names:
        words = condition.split()
        for index, name in enumerate(names):
            if name in words or str(index) in words:
                return index
    return None


def classifier_for(backend):
    """A digit classifier for digit testbeds, else None."""
    if getattr(backend, "digit_names", None) or getattr(backend, "classifier", None) is not None:
        if getattr(backend, "classifier", None) is not None:
            return backend.classifier
        from erase.models.digits import load_digit_classifier

        return load_digit_classifier(backend.resolution, device=backend.device)
    return None


@torch.no_grad()
def score(backend, concept, conditions, args) -> tuple[dict, torch.Tensor]:
    """Forget/retain metrics of the backend's current UNet, and the forget-side images."""
    forget_conditions, retain_conditions = conditions
    per_prompt = args.bench_per_prompt
    guidance = args.bench_guidance or backend.guidance_scale

    def generate(condition_list):
        repeated = [c for c in condition_list for _ in range(per_prompt)]
        seeds = [args.seed * 10_007 + i for i in range(per_prompt)] * len(condition_list)
        images = [
            backend.sample(
                repeated[i : i + 32],
                seeds[i : i + 32],
                num_steps=args.bench_steps,
                guidance_scale=guidance,
                resolution=args.resolution,
            )
            for i in range(0, len(repeated), 32)
        ]
        return torch.cat(images), repeated

    forget_images, forget_repeated = generate(forget_conditions)
    retain_images, retain_repeated = generate(retain_conditions)
    classifier = classifier_for(backend)
    metrics: dict = {}
    if classifier is not None:
        for side, images, repeated in (
            ("forget", forget_images, forget_repeated),
            ("retain", retain_images, retain_repeated),
        ):
            labels = torch.tensor([label_of(backend, c) for c in repeated])
            predicted = classifier(images.to(backend.device)).argmax(-1).cpu()
            metrics[f"{side}_accuracy"] = round(float((predicted == labels).float().mean()), 4)
    elif concept.name == "nudity":
        metrics["forget_nudity_share"] = nudity_share(forget_images)
        metrics["retain_nudity_share"] = nudity_share(retain_images)
    metrics["images_per_side"] = [len(forget_images), len(retain_images)]
    return metrics, forget_images[:: max(1, per_prompt // 4)][:8]


def nudity_share(images: torch.Tensor) -> float:
    """Share of images in which NudeNet finds an exposed body part (eval/nudity.py's threshold)."""
    from torchvision.utils import save_image

    from eval.nudity import nudity_score

    if not hasattr(nudity_share, "detector"):  # one ONNX session for every row of the bench
        from eval.nudity import load_detector

        nudity_share.detector = load_detector()
    with tempfile.TemporaryDirectory() as folder:
        paths = [os.path.join(folder, f"{i:05d}.png") for i in range(len(images))]
        for image, path in zip(images, paths):
            save_image(image, path)
        report, _ = nudity_score(paths, detector=nudity_share.detector)
    return round(report["share_with_exposed"], 4)


def run_bench(args: argparse.Namespace) -> dict:
    """Erase with each method, score base and each, write bench.json/bench.md/chart/grid."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise EraseError(f"Unknown method(s) {unknown}: choose from {', '.join(sorted(METHODS))}.")
    check_output(args.output, args.overwrite)
    start = time.perf_counter()
    backend = load_backend(args.model, data_dir=args.data_dir)
    concept = resolve_run_concept(backend, args)
    base_state = copy.deepcopy(backend.unet.state_dict())
    conditions = evaluation_prompts(backend, concept)
    rows, grids = [], {}
    with staged_output(args.output) as staging:
        base_metrics, grids["base"] = score(backend, concept, conditions, args)
        rows.append(
            {"method": "base", **base_metrics, "load_s": round(time.perf_counter() - start, 2)}
        )
        for method in methods:
            rows.append(bench_one(backend, method, args, staging, concept, conditions, grids))
            backend.unet.load_state_dict(base_state)
            backend.unet.requires_grad_(False)
        table = {
            "model": args.model,
            "concept": concept.to_dict(),
            "methods": methods,
            "settings": {k: v for k, v in vars(args).items() if k != "output"},
            "rows": rows,
        }
        write_json(os.path.join(staging, "bench.json"), table)
        with open(os.path.join(staging, "bench.md"), "w") as file:
            file.write(markdown_table(rows))
            file.write(f"\ngrid.png rows, top to bottom: {', '.join(grids)}\n")
        draw_chart(rows, os.path.join(staging, "chart.png"))
        draw_grid(grids, os.path.join(staging, "grid.png"))
    return table


def bench_one(backend, method, args, staging, concept, conditions, grids) -> dict:
    """One method's row: erase through the erase-concept path, then score; errors go in the row."""
    method_args = copy.copy(args)
    method_args.method, method_args.output, method_args.overwrite = (
        method,
        os.path.join(staging, method),
        False,
    )
    method_args.no_eval = True  # the bench scores every row itself, the same way
    try:
        result = run_erasure(method_args, backend=backend)
    except Exception as error:  # a failing method is reported and the others go on
        message = str(error) if isinstance(error, EraseError) else traceback.format_exc(limit=1)
        return {"method": method, "error": message.strip().splitlines()[-1]}
    metadata = result.metadata
    clock = time.perf_counter()
    metrics, grids[method] = score(backend, concept, conditions, args)
    return {
        "method": method,
        **metrics,
        "changed_weights": metadata["changed_weights"],
        "train_s": metadata["timings_s"].get("train"),
        "mask_s": metadata["timings_s"].get("mask"),
        "data_s": metadata["timings_s"].get("data"),
        "eval_s": round(time.perf_counter() - clock, 2),
        "peak_memory_mb": round(peak_memory_mb(backend.device), 1),
    }


def markdown_table(rows: list[dict]) -> str:
    """All rows as one markdown table, columns in first-seen order."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def draw_chart(rows: list[dict], path: str) -> None:
    """Forgetting (x: forget-side metric) against retention (y: retain-side metric), one dot a row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key = next(
        (k for k in ("forget_accuracy", "forget_nudity_share") if any(k in r for r in rows)), None
    )
    y_key = next(
        (k for k in ("retain_accuracy", "retain_nudity_share") if any(k in r for r in rows)), None
    )
    figure, axes = plt.subplots(figsize=(5, 4))
    for row in rows:
        if x_key in row and y_key in row:
            axes.scatter(row[x_key], row[y_key])
            axes.annotate(row["method"], (row[x_key], row[y_key]))
    axes.set_xlabel(f"{x_key} (lower = more forgotten)")
    axes.set_ylabel(f"{y_key} (retention)")
    axes.set_title("forgetting vs retention")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def draw_grid(grids: dict[str, torch.Tensor], path: str) -> None:
    """One row of forget-side samples per method (same prompts and seeds in every row)."""
    from torchvision.utils import save_image

    rows = [images for images in grids.values() if images is not None and len(images)]
    width = max(len(r) for r in rows)
    padded = [torch.cat([r, torch.zeros(width - len(r), *r.shape[1:])]) for r in rows]
    save_image(torch.cat(padded), path, nrow=width, padding=1)


def main(argv: list[str] | None = None) -> int:
    """Console entry point of erase-bench."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_request:
        return int(exit_request.code or 0)
    try:
        table = run_bench(args)
    except EraseError as error:
        print(f"erase-bench: error: {error}", file=sys.stderr)
        return 2
    print(markdown_table(table["rows"]))
    print(f"wrote {args.output}/bench.json, bench.md, chart.png, grid.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
