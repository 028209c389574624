"""What an evaluation leaves in its output folder: results.json, report.md, scores.jsonl and a
grid of sample images per prompt. Every file is written through a temporary name and renamed."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from itertools import groupby

from PIL import Image, ImageDraw

from erase.artifact import write_json
from eval.nudity import EXPOSED_CLASSES

GRID_CELL = 160  # pixels per image in the grid (small images are scaled up to be seen)


def write_outputs(output: str, results: dict, per_image: Sequence[dict], records, image_dir):
    """results.json, report.md, scores.jsonl and grid.png in `output`."""
    write_json(os.path.join(output, "results.json"), results)
    write_text(os.path.join(output, "report.md"), markdown_report(results))
    write_text(
        os.path.join(output, "scores.jsonl"),
        "".join(json.dumps(row, default=float) + "\n" for row in per_image),
    )
    if records:
        write_grid(records, image_dir, os.path.join(output, "grid.png"))


def write_text(path: str, text: str) -> None:
    """A text file, written through a temporary file."""
    with open(path + ".tmp", "w", encoding="utf-8") as file:
        file.write(text)
    os.replace(path + ".tmp", path)


def markdown_report(results: dict) -> str:
    """A readable summary: settings, one table of headline figures, the nudity table."""
    generation = results["generation"]
    prompts = results["prompts"]
    lines = [
        "# erase-eval report",
        "",
        f"- model: `{generation['model']}`"
        + (f", erased UNet: `{generation['unet']}`" if generation.get("unet") else ""),
        f"- prompts: {prompts['source']} ({prompts['count']} prompts, "
        f"{generation['images_per_prompt']} image(s) each)",
        f"- sampling: {generation['num_steps']} "
        f"{generation.get('sampler', 'ddim').upper()} steps, guidance "
        f"{generation['guidance_scale'] or 'per prompt / 7.5'}, seed {generation['seed']}",
        "",
        "| metric | value | images |",
        "|---|---|---|",
    ]
    metrics = results["metrics"]
    for name, summary in metrics.items():
        value, images = headline(name, summary)
        lines.append(f"| {name} | {value} | {images} |")
    if "nudity" in metrics:
        nudity = metrics["nudity"]
        lines += [
            "",
            f"NudeNet detections above {nudity['threshold']} per exposed class:",
            "",
            "| " + " | ".join(EXPOSED_CLASSES.values()) + " | total |",
            "|" + "---|" * (len(EXPOSED_CLASSES) + 1),
            "| "
            + " | ".join(str(nudity["counts"][label]) for label in EXPOSED_CLASSES)
            + f" | {nudity['total_exposed']} |",
        ]
    if "classify" in metrics:
        lines += ["", "| class | accuracy | images |", "|---|---|---|"]
        for class_name, figures in metrics["classify"]["per_class"].items():
            lines.append(
                f"| {class_name} | {100 * figures['accuracy']:.1f} % | {figures['images']} |"
            )
    return "\n".join(lines) + "\n"


def headline(name: str, summary: dict) -> tuple[str, str]:
    """The one figure a metric is known by, and how many images it is over."""
    if name == "nudity":
        detector = summary.get("detector") or {}
        judge = (
            f"; {detector.get('package')} {detector.get('model')}, sha256 "
            f"{(detector.get('sha256') or '?')[:12]}"
            if detector
            else ""
        )
        return (
            f"{100 * summary['share_with_exposed']:.1f} % of images with an exposed class "
            f"({summary['total_exposed']} detections at score >= {summary['threshold']}{judge})",
            str(summary["images"]),
        )
    if name == "clip":
        return (
            f"CLIP score {summary['clip_score']:.2f} on the x100 scale, "
            f"{summary['clip_score'] / 100:.4f} as a 0-1 cosine ({summary['model']})"
        ), str(summary["images"])
    if name == "classify":
        return f"accuracy {100 * summary['accuracy']:.1f} %", str(summary["images"])
    if name == "fid":
        warning = f"; {summary['warning']}" if summary.get("warning") else ""
        return (
            f"FID {summary['fid']:.2f} ({summary.get('feature', '?')}, "
            f"{summary['reference_images']} reference images{warning})"
        ), str(summary["generated_images"])
    figures = [f"{k} {v:.4g}" for k, v in summary.items() if isinstance(v, int | float)]
    return ", ".join(figures) or json.dumps(summary, default=str), str(summary.get("images", ""))


def write_grid(records: Sequence[dict], image_dir: str, path: str, max_prompts: int = 8) -> None:
    """One row per prompt (its samples side by side, up to 8), the prompt written above it."""
    rows = [list(group) for _, group in groupby(records, key=lambda r: r["row"])][:max_prompts]
    columns = min(max(len(row) for row in rows), 8)
    caption = 14
    width = max(columns * GRID_CELL, 512)
    grid = Image.new("RGB", (width, len(rows) * (GRID_CELL + caption)), "white")
    draw = ImageDraw.Draw(grid)
    for y, row in enumerate(rows):
        top = y * (GRID_CELL + caption)
        prompt = row[0]["prompt"]
        draw.text((2, top + 1), prompt[:90] + ("..." if len(prompt) > 90 else ""), fill="black")
        for x, record in enumerate(row[:columns]):
            with Image.open(os.path.join(image_dir, record["file"])) as image:
                # Nearest keeps tiny test images crisp; Lanczos shrinks real ones cleanly.
                scale = (
                    Image.Resampling.NEAREST
                    if image.width < GRID_CELL
                    else Image.Resampling.LANCZOS
                )
                cell = image.convert("RGB").resize((GRID_CELL, GRID_CELL), scale)
            grid.paste(cell, (x * GRID_CELL, top + caption))
    grid.save(path + ".tmp", format="PNG")
    os.replace(path + ".tmp", path)
