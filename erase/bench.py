"""`erase-bench`: every method erases the same concept from the same base model, and each result
(and the base) is scored with the same prompts, seeds and metrics, in one table.

    erase-bench --model sd-digits --concept three --output bench/
    erase-bench --model sd-v1-4 --concept nudity --methods salun,esd-u --steps 50 --output bench/

Writes bench.json (every setting and row), bench.md (the table), chart.png (forgetting against
retention) and grid.png (one row of images per model, same prompts and seeds), and each method's
erased model as an erase-concept artifact in <output>/<method>/.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import math
import os
import shlex
import sys
import tempfile
import time
import traceback

import torch

from erase import api
from erase.artifact import check_output, output_lock, staged_output, write_json
from erase.cli import add_erase_arguments
from erase.cliargs import OneLineParser, positive
from erase.concepts import Concept
from erase.erasure import resolve_run_concept
from erase.errors import EraseError
from erase.methods import METHODS
from erase.models.base import Condition
from erase.train import peak_memory_mb

FORGET_METRICS = ("forget_accuracy", "forget_nudity_share")  # lower = more forgotten
RETAIN_METRICS = ("retain_accuracy", "clip_score", "retain_nudity_share")
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
    "attacks",
    "attack_flags",
    "retrain",
    "method_settings",  # erase.benchmark's per-method settings (a dict; no flag)
)


def build_parser() -> argparse.ArgumentParser:
    """erase-bench's flags: its own, plus every flag of erase-concept (passed to each method)."""
    parser = OneLineParser(
        prog="erase-bench",
        description="Erase one concept with several methods from the same base model and score "
        "each (and the base) with the same prompts, seeds and metrics.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    bench = parser.add_argument_group("benchmark")
    bench.add_argument(
        "--methods", default="salun,esd-u,esd-x,fmn", help="comma-separated methods to compare"
    )
    bench.add_argument("--output", required=True, help="bench folder (one subfolder per method)")
    bench.add_argument("--overwrite", action="store_true", help="replace an existing bench folder")
    bench.add_argument(
        "--method-flags",
        action="append",
        default=[],
        metavar="METHOD=FLAGS",
        help="erase-concept flags for one method only, e.g. 'esd-x=--lr 1e-4 --steps 200' "
        "(repeatable; they override the shared flags)",
    )
    bench.add_argument(
        "--bench-per-prompt",
        type=positive(int),
        default=10,
        help="evaluation images per prompt (fixed seeds)",
    )
    bench.add_argument(
        "--bench-steps", type=positive(int), default=25, help="DDIM steps of evaluation images"
    )
    bench.add_argument(
        "--bench-guidance",
        type=positive(float),
        default=None,
        help="guidance of evaluation images (default: the model's)",
    )
    bench.add_argument(
        "--bench-clip",
        default="ViT-L-14:openai",
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
    add_erase_arguments(parser, with_output=False)
    for action in parser._actions:  # the bench sets these itself for every method: not shown
        if action.dest in ("method", "no_eval"):
            action.help = action.default = argparse.SUPPRESS
    return parser


def method_settings(args: argparse.Namespace, method: str) -> dict:
    """erase.erase_concept's settings for one method: the shared flags, then the method's own
    (erase.benchmark's method_settings, then --method-flags)."""
    method_args = copy.copy(args)
    for name, value in getattr(args, "method_settings", {}).get(method, {}).items():
        setattr(method_args, name, value)
    for name, flags in parse_method_flags(args.method_flags):
        if name == method:
            flags_parser().parse_args(flags, namespace=method_args)
    skip = {*BENCH_FLAGS, "model", "concept", "method"}
    settings = {name: value for name, value in vars(method_args).items() if name not in skip}
    settings["no_eval"] = True  # the bench scores every row itself, the same way
    return settings


def flags_parser() -> argparse.ArgumentParser:
    """erase-bench's parser with nothing required: it reads one method's extra flags."""
    parser = build_parser()
    for action in parser._actions:
        action.required = False
    return parser


def parse_method_flags(entries: list[str]) -> list[tuple[str, list[str]]]:
    """--method-flags entries as (method, [flags]); a malformed entry is a user error."""
    parsed = []
    for entry in entries:
        name, separator, flags = entry.partition("=")
        if not separator or not name.strip():
            raise EraseError(
                f"--method-flags '{entry}' must read METHOD=FLAGS, e.g. 'fmn=--lr 1e-5'."
            )
        parsed.append((name.strip(), shlex.split(flags)))
    return parsed


def check_method_flags(args: argparse.Namespace, methods: list[str]) -> None:
    """Refuse --method-flags (or method_settings) for a method not benched, or with flags
    erase-concept does not have."""
    for name in getattr(args, "method_settings", {}):
        if name not in methods:
            raise EraseError(
                f"method_settings names '{name}', which is not in methods ({', '.join(methods)})."
            )
    for name, flags in parse_method_flags(args.method_flags):
        if name not in methods:
            raise EraseError(
                f"--method-flags names '{name}', which is not in --methods ({', '.join(methods)})."
            )
        captured = io.StringIO()
        try:
            with contextlib.redirect_stderr(captured):
                flags_parser().parse_args(flags, namespace=copy.copy(args))
        except SystemExit:
            reason = captured.getvalue().strip().partition("error: ")[2] or "invalid flags"
            raise EraseError(f"--method-flags for {name}: {reason}") from None


# -- scoring ----------------------------------------------------------------------------------


def evaluation_prompts(backend, concept: Concept) -> tuple[list[Condition], list[Condition]]:
    """Forget-side and retain-side conditions to score: held-out captions where the model has them."""
    if hasattr(backend, "eval_prompts"):  # sd-digits: caption templates training never used
        digit = backend.digit_names.index(concept.name)
        others = [d for d in range(10) if d != digit]
        return backend.eval_prompts(digit), [p for d in others for p in backend.eval_prompts(d)]
    return list(concept.forget), list(concept.retain)


def label_of(backend, condition: Condition) -> int:
    """The class a condition asks for (a class index, or the digit a caption names)."""
    if isinstance(condition, int):
        return condition
    words = str(condition).split()
    for index, name in enumerate(backend.digit_names):
        if name in words or str(index) in words:
            return index
    raise ValueError(f"no digit named in '{condition}'")


class Scorer:
    """Scores a backend's current UNet the same way for every row: prompts, seeds and metrics."""

    def __init__(self, backend, concept: Concept, args: argparse.Namespace):
        self.backend, self.concept, self.args = backend, concept, args
        self.forget_conditions, self.retain_conditions = evaluation_prompts(backend, concept)
        self.notes: list[str] = []  # metrics that could not be computed, and why
        self.classifier = None
        self.fid_reference = None  # (N, 3, H, W): real images (digits) or the base's retain images
        self.clip = None
        if getattr(backend, "digit_names", None):
            from erase.models.digits import digits_dataset, load_digit_classifier

            self.classifier = load_digit_classifier(backend.resolution, device=backend.device)
            images, labels = digits_dataset(backend.resolution, split="test")
            self.fid_reference = images[labels != backend.digit_names.index(concept.name)]
        elif backend.conditioning == "text" and args.bench_clip.lower() != "none":
            self.clip = self.optional(
                "clip_score", lambda: load_clip_spec(args.bench_clip, backend)
            )

    def optional(self, name: str, compute):
        """`compute()`, or None with a note when an optional metric is unavailable here."""
        try:
            return compute()
        except EraseError as error:
            if f"{name}: {error}" not in self.notes:
                self.notes.append(f"{name}: {error}")
            return None

    def generate(self, conditions: list[Condition]) -> tuple[torch.Tensor, list[Condition]]:
        """`bench_per_prompt` images per condition, seeds 0..n-1 offset by --seed: (N, 3, H, W)."""
        per_prompt, args = self.args.bench_per_prompt, self.args
        repeated = [c for c in conditions for _ in range(per_prompt)]
        seeds = [args.seed * 10_007 + i for i in range(per_prompt)] * len(conditions)
        guidance = args.bench_guidance or self.backend.guidance_scale
        images = [
            self.backend.sample(
                repeated[i : i + 32],
                seeds[i : i + 32],
                num_steps=args.bench_steps,
                guidance_scale=guidance,
                resolution=args.resolution,
            )
            for i in range(0, len(repeated), 32)
        ]
        return torch.cat(images), repeated

    @torch.no_grad()
    def __call__(self) -> tuple[dict, torch.Tensor]:
        """The metrics of the backend's current UNet, and sample images for the grid."""
        forget_images, forget_repeated = self.generate(self.forget_conditions)
        retain_images, retain_repeated = self.generate(self.retain_conditions)
        metrics: dict = {}
        if self.classifier is not None:
            for side, images, repeated in (
                ("forget", forget_images, forget_repeated),
                ("retain", retain_images, retain_repeated),
            ):
                labels = torch.tensor([label_of(self.backend, c) for c in repeated])
                predicted = self.classifier(images.to(self.backend.device)).argmax(-1).cpu()
                metrics[f"{side}_accuracy"] = round(float((predicted == labels).float().mean()), 4)
        elif self.concept.name == "nudity":
            metrics["forget_nudity_share"] = nudity_share(forget_images)
            metrics["retain_nudity_share"] = nudity_share(retain_images)
        if self.clip is not None:
            from eval.clip_score import clip_scores

            pil_images = [to_pil(image) for image in retain_images]
            scores = clip_scores(pil_images, [str(c) for c in retain_repeated], self.clip)
            metrics["clip_score"] = round(sum(scores) / len(scores), 3)
        metrics["retain_fid"] = self.retain_fid(retain_images)
        metrics["eval_images"] = len(forget_images) + len(retain_images)
        return metrics, grid_samples(forget_images, retain_images, self.args.bench_per_prompt)

    def retain_fid(self, retain_images: torch.Tensor) -> float | None:
        """FID of the retain-side images: against real images of the retained classes (digit
        classifier features), else against the base model's own retain images (Inception)."""
        from eval.fid import frechet_distance

        if self.fid_reference is None:  # the first scored model is the base: it is the reference
            self.fid_reference = retain_images
            return None if self.classifier is None else 0.0
        feature = 2048  # Inception
        if self.classifier is not None:
            from eval.classify import PenultimateFeatures

            feature = PenultimateFeatures(self.classifier, self.fid_reference)
        value = self.optional(
            "retain_fid", lambda: frechet_distance(self.fid_reference, retain_images, feature)
        )
        return None if value is None else float(f"{value:.4g}")


def load_clip_spec(spec: str, backend):
    """An open_clip model from 'MODEL:WEIGHTS' (eval/clip_score.py)."""
    from eval.clip_score import load_clip

    model_name, _, pretrained = spec.partition(":")
    return load_clip(model_name, pretrained or None, backend.device)


def to_pil(image: torch.Tensor):
    """A (3, H, W) float image in [0, 1] as a PIL image."""
    from torchvision.transforms.functional import to_pil_image

    return to_pil_image(image.clamp(0, 1))


def nudity_share(images: torch.Tensor) -> float:
    """Share of images in which NudeNet finds an exposed body part (eval/nudity.py's threshold)."""
    from torchvision.utils import save_image

    from eval.nudity import load_detector, nudity_score

    if not hasattr(nudity_share, "detector"):  # one ONNX session for every row of the bench
        nudity_share.detector = load_detector()
    with tempfile.TemporaryDirectory() as folder:
        paths = [os.path.join(folder, f"{i:05d}.png") for i in range(len(images))]
        for image, path in zip(images, paths):
            save_image(image, path)
        report, _ = nudity_score(paths, detector=nudity_share.detector)
    return round(report["share_with_exposed"], 4)


def grid_samples(forget: torch.Tensor, retain: torch.Tensor, per_prompt: int) -> torch.Tensor:
    """Up to 6 forget-side and 4 retain-side images, one per prompt first (same in every row)."""
    step = max(1, per_prompt)
    forget_pick = torch.cat([forget[::step], forget])[:6]
    retain_pick = torch.cat([retain[::step], retain])[:4]
    return torch.cat([forget_pick, retain_pick])


# -- robustness -------------------------------------------------------------------------------


def attack_settings(args: argparse.Namespace, concept: Concept):
    """erase-attack's settings for --attacks and --attack-flags (None without --attacks)."""
    if not args.attacks:
        return None
    from eval.attacks.cli import build_parser as attack_parser
    from eval.attacks.cli import settings_from_args

    argv = ["--model", args.model, "--concept", concept.name, "--attack", args.attacks]
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            parsed = attack_parser().parse_args(argv + shlex.split(args.attack_flags))
    except SystemExit:
        reason = captured.getvalue().strip().partition("error: ")[2] or "invalid flags"
        raise EraseError(f"--attacks/--attack-flags: {reason}") from None
    return settings_from_args(parsed)


def attack_columns(backend, label: str, settings, folder: str, shared: dict, base=None) -> dict:
    """ASR and steps to recover of the backend's current UNet; `shared` carries the base's figures."""
    import dataclasses

    from eval.attacks.harness import attack_target, load_target

    target = load_target(settings, backend=backend, unet=backend.unet, label=label)
    target = dataclasses.replace(
        target,
        base_backend=base,
        target_images=os.path.join(folder, "targets"),  # made by the base row, reused after
        base_rate=shared.get("base_rate"),
    )
    figures = attack_target(target, settings, os.path.join(folder, label), progress=False)
    columns = {}
    if "unlearndiffatk" in figures:
        columns["pre_attack_asr"] = figures["unlearndiffatk"]["pre_attack_asr"]
        columns["asr"] = figures["unlearndiffatk"]["asr"]
    if "prompts" in figures:
        columns["prompts_asr"] = figures["prompts"]["asr"]
    if "relearn" in figures:
        relearn = figures["relearn"]
        shared.setdefault("base_rate", relearn["base_positive_rate"])
        columns["steps_to_recover"] = relearn["steps_to_recover"]
        columns["relearn_curve"] = " ".join(
            f"{p['step']}:{p['positive_rate']:.2f}" for p in relearn["curve"]
        )
    return columns


def retrain_row(backend, concept: Concept, args, settings, folder, shared, samples) -> dict:
    """The row of the testbed retrained without the concept, scored and attacked like the others."""
    from erase.models.retrain import load_retrain

    retrained = load_retrain(args.model, concept.name, device=backend.device)
    clock = time.perf_counter()
    metrics, samples["retrain"] = Scorer(retrained, concept, args)()
    row = {"method": "retrain", **metrics, "eval_s": round(time.perf_counter() - clock, 2)}
    if settings is not None:
        row.update(attack_columns(retrained, "retrain", settings, folder, shared, base=backend))
    return row


# -- the bench --------------------------------------------------------------------------------


def run_bench(args: argparse.Namespace, backend=None) -> dict:
    """Erase with each method, score the base and each, write bench.json/bench.md/chart/grid.

    `backend`: the base model already loaded (erase.load_model); it is erased in place by each
    method in turn and holds the base weights again at the end."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise EraseError(
            f"Unknown method(s) {', '.join(unknown) or '(none given)'} in --methods: choose "
            f"from {', '.join(sorted(METHODS))}."
        )
    repeated = sorted({m for m in methods if methods.count(m) > 1})
    if repeated:
        raise EraseError(f"--methods names {', '.join(repeated)} more than once: name each once.")
    if hasattr(args, "method") or hasattr(args, "no_eval"):  # given, though hidden
        raise EraseError(
            "--method and --no-eval are erase-concept's: erase-bench takes --methods and scores "
            "every model itself."
        )
    check_method_flags(args, methods)
    for name in BENCH_FLAGS:
        value = getattr(args, name, None)
        if isinstance(value, float) and not math.isfinite(value):
            raise EraseError(f"--{name.replace('_', '-')} must be a finite number, got {value}.")
    for method in methods:  # every method's settings, before the base is even loaded
        api.check_erasure(args.concept, method, **method_settings(args, method))
    check_bench_clip(args.bench_clip)
    with output_lock(args.output):
        check_output(args.output, args.overwrite)
        return bench_into(args, methods, backend)


def check_bench_clip(spec: str) -> None:
    """Refuse a --bench-clip model or weights name open_clip does not know (no download)."""
    if spec.lower() == "none":
        return
    from eval.clip_score import check_clip_names, register_config

    model_name, _, pretrained = spec.partition(":")
    try:
        name = register_config(model_name) if model_name.endswith(".json") else model_name
        check_clip_names(name, None if pretrained.lower() in ("", "none") else pretrained)
    except EraseError as error:
        raise EraseError(f"--bench-clip '{spec}': {error}") from None


def bench_into(args: argparse.Namespace, methods: list[str], backend=None) -> dict:
    """The bench of run_bench, holding the lock of its output."""
    clock = time.perf_counter()
    backend = backend or api.load_model(args.model, data_dir=args.data_dir)
    concept = resolve_run_concept(backend, args)
    attacks = attack_settings(args, concept)
    shared: dict = {}  # the base row's attack figures that later rows are measured against
    base_state = {name: value.clone() for name, value in backend.unet.state_dict().items()}
    scorer = Scorer(backend, concept, args)
    load_s = round(time.perf_counter() - clock, 2)
    rows, samples = [], {}
    with staged_output(args.output, tool="erase-bench") as staging:
        clock = time.perf_counter()
        metrics, samples["base"] = scorer()
        rows.append(
            {
                "method": "base",
                **metrics,
                "load_s": load_s,
                "eval_s": round(time.perf_counter() - clock, 2),
                "peak_memory_mb": round(peak_memory_mb(backend.device), 1),
            }
        )
        attack_dir = os.path.join(staging, "attacks")
        if attacks is not None:
            rows[-1].update(attack_columns(backend, "base", attacks, attack_dir, shared))
        if args.retrain:
            rows.append(retrain_row(backend, concept, args, attacks, attack_dir, shared, samples))
        for method in methods:
            rows.append(bench_one(backend, method, args, staging, scorer, samples))
            if attacks is not None and "error" not in rows[-1]:
                rows[-1].update(attack_columns(backend, method, attacks, attack_dir, shared))
            backend.unet.load_state_dict(base_state)
            backend.unet.requires_grad_(False)
        failed = [row for row in rows[1:] if "error" in row]
        if len(failed) == len(methods):  # a table of errors is no benchmark: nothing is written
            raise EraseError(
                "Every method failed: "
                + "; ".join(f"{row['method']}: {row['error']}" for row in failed)
            )
        table = {
            "model": args.model,
            "base_model": backend.identity,
            "concept": concept.to_dict(),
            "methods": methods,
            "forget_prompts": scorer.forget_conditions,
            "retain_prompts": scorer.retain_conditions,
            "settings": {k: v for k, v in vars(args).items() if k != "output"},
            "notes": scorer.notes,
            "rows": rows,
        }
        write_json(os.path.join(staging, "bench.json"), table)
        with open(os.path.join(staging, "bench.md"), "w") as file:
            file.write(markdown_report(table, list(samples)))
        draw_chart(rows, os.path.join(staging, "chart.png"))
        draw_grid(samples, os.path.join(staging, "grid.png"))
    return table


def bench_one(backend, method: str, args, staging: str, scorer: Scorer, samples: dict) -> dict:
    """One method's row: erase the loaded base in place through the API, then score; errors go
    in the row."""
    if backend.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(backend.device)
    try:
        output = os.path.join(staging, method)
        settings = method_settings(args, method)
        result = api.erase_concept(backend, args.concept, method, output, **settings)
    except Exception as error:  # a failing method is reported, and the others still run
        message = str(error) if isinstance(error, EraseError) else traceback.format_exc(limit=1)
        return {"method": method, "error": message.strip().splitlines()[-1]}
    metadata = result.metadata
    clock = time.perf_counter()
    metrics, samples[method] = scorer()
    timings = metadata["timings_s"]
    return {
        "method": method,
        **metrics,
        "changed_weights": metadata["changed_weights"],
        "data_s": timings.get("data"),
        "mask_s": timings.get("mask"),
        "train_s": timings.get("train"),
        "eval_s": round(time.perf_counter() - clock, 2),
        "peak_memory_mb": metadata["peak_memory_mb"],
    }


# -- outputs ----------------------------------------------------------------------------------


def markdown_table(rows: list[dict]) -> str:
    """All rows as one markdown table, columns in first-seen order."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [format_cell(row.get(column, "")) for column in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def format_cell(value) -> str:
    """A table cell: thousands separators for counts, '' for missing, '|' escaped."""
    if value is None:
        return ""
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value).replace("|", "\\|")


def markdown_report(table: dict, grid_rows: list[str]) -> str:
    """bench.md: what was compared, the table, and how to read the chart and grid."""
    concept = table["concept"]
    lines = [
        f"# erase-bench: '{concept['name']}' on {table['base_model']}",
        "",
        f"Forget-side prompts: {', '.join(map(str, table['forget_prompts'][:4]))}"
        + (" ..." if len(table["forget_prompts"]) > 4 else ""),
        f"Retain-side prompts: {len(table['retain_prompts'])}, "
        f"{table['settings']['bench_per_prompt']} seeds each.",
        "",
        markdown_table(table["rows"]),
        "Times in seconds; peak memory in MB (process RSS on the CPU, allocated memory on a GPU).",
        f"grid.png rows, top to bottom: {', '.join(grid_rows)} (forget-side images, then "
        "retain-side ones).",
    ]
    lines += [f"Not computed: {note}" for note in table["notes"]]
    return "\n".join(lines) + "\n"


def draw_chart(rows: list[dict], path: str) -> None:
    """Forgetting (x: forget-side metric) against retention (y: retain-side metric), a dot per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key = next((k for k in FORGET_METRICS if any(k in r for r in rows)), None)
    y_key = next((k for k in RETAIN_METRICS if any(k in r for r in rows)), None)
    robust = any(r.get("asr") is not None for r in rows)  # --attacks: the robustness axis too
    figure, panels = plt.subplots(1, 2 if robust else 1, figsize=(10 if robust else 5, 4))
    axes = panels[0] if robust else panels
    if robust:
        for row in rows:
            if row.get(x_key) is not None and row.get("asr") is not None:
                panels[1].scatter(row[x_key], row["asr"])
                panels[1].annotate(row["method"], (row[x_key], row["asr"]), fontsize=8)
        panels[1].set_xlabel(f"{x_key} (plain prompts)")
        panels[1].set_ylabel("UnlearnDiffAtk ASR (lower = robust)")
        panels[1].set_title("forgetting vs robustness")
    for row in rows:
        if row.get(x_key) is not None and row.get(y_key) is not None:
            axes.scatter(row[x_key], row[y_key])
            axes.annotate(row["method"], (row[x_key], row[y_key]), fontsize=8)
    axes.set_xlabel(f"{x_key} (lower = more forgotten)")
    axes.set_ylabel(f"{y_key} (retention)")
    axes.set_title("forgetting vs retention")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def draw_grid(samples: dict[str, torch.Tensor], path: str) -> None:
    """One row of images per model, the same prompts and seeds in every row."""
    from torchvision.utils import save_image

    rows = list(samples.values())
    width = max(len(row) for row in rows)
    padded = [torch.cat([row, torch.zeros(width - len(row), *row.shape[1:])]) for row in rows]
    save_image(torch.cat(padded), path, nrow=width, padding=1)


def main(argv: list[str] | None = None) -> int:
    """Console entry point of erase-bench."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_request:  # --help, or a usage error already printed on one line
        return int(exit_request.code or 0)
    try:
        table = run_bench(args)
    except EraseError as error:
        print(f"erase-bench: error: {error}", file=sys.stderr)
        return 2
    print(markdown_table(table["rows"]))
    print(f"wrote {args.output}/: bench.json, bench.md, chart.png, grid.png, one folder per method")
    return 0


if __name__ == "__main__":
    sys.exit(main())
