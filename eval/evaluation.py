"""One evaluation run: generate images for a prompt set with a base or erased model and score
them (what erase-eval does; erase.evaluate and the bench call it too). Torch, diffusers and the
metric models are imported only once the settings and the prompt file have been checked, so
that a mistake is reported in a second, not after heavy imports."""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass, field

from erase.config import (
    SAMPLER_NAMES,
    check_values,
    config_from_dict,
    config_to_dict,
    fields_from,
)
from erase.errors import EraseError
from prompts import (
    PromptEntry,
    imagenette_prompts,
    load_coco,
    load_i2p,
    load_prompt_file,
)

METRIC_NAMES = ("nudity", "classify", "fid", "clip")  # eval.runner.METRICS, in --help order
PROMPT_SETS = ("i2p", "i2p-nudity", "coco", "imagenette")
# Inception's feature layers torch-fidelity exposes: 2048 (pool3, the usual FID) down to 64
# (the first max-pool), which SalUn's class-wise FID reports.
INCEPTION_FEATURES = (64, 192, 768, 2048)
# erase-eval's settings that must be above 0 when given
EVAL_POSITIVE = {
    "limit", "per_class", "num_steps", "guidance_scale", "resolution", "batch_size",
    "images_per_prompt", "fid_image_size",
}  # fmt: skip


def parse_metrics(text: str) -> list[str]:
    """One metric or a comma list of them ('none': generation only, no metric model loaded)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if names == ["none"]:
        return []
    unknown = [name for name in names if name not in METRIC_NAMES]
    if unknown or not names:
        raise EraseError(
            f"unknown metric '{(unknown or [text])[0]}': choose from {', '.join(METRIC_NAMES)} "
            "or none"
        )
    return names


@dataclass
class EvalConfig:
    """One erase-eval run: what its flags say (their names with underscores)."""

    prompts: str = ""  # i2p, i2p-nudity, coco, imagenette, or a CSV/TXT file
    model: str = "sd-v1-4"
    unet: str | None = None  # an erase-concept output folder (--model-dir / --unet)
    text_encoder: str | None = None  # an output whose text_encoder/ reads the prompts instead
    category: list[str] = field(default_factory=list)
    min_nudity_percentage: float | None = None
    limit: int | None = None
    classes: str | None = None
    per_class: int = 10
    num_steps: int = 50
    sampler: str = "ddim"  # ddim | lms (SalUn's SD evaluation samples LMS; ESD's DDIM)
    guidance_scale: float | None = None
    resolution: int | None = None
    batch_size: int | None = None
    seed: int = 0
    images_per_prompt: int = 1
    metric: list[str] | None = None  # None: the prompt set's usual metric
    nudity_threshold: float = 0.6
    reference: str | None = None
    fid_image_size: int = 299
    fid_features: int = 2048
    fid_weights: str | None = None
    clip_model: str = "ViT-L-14"
    clip_pretrained: str = "openai"
    classifier_weights: str | None = None
    output: str | None = None
    no_progress: bool = False

    def __post_init__(self):
        self.category = list(self.category)
        if isinstance(self.metric, str):  # "fid,clip", as on the command line
            self.metric = parse_metrics(self.metric)
        elif self.metric is not None:
            self.metric = list(self.metric)

    @classmethod
    def from_dict(cls, settings: dict) -> EvalConfig:
        """A config from its fields; an unknown key is one EraseError naming the nearest."""
        return config_from_dict(cls, settings, "erase-eval")

    def to_dict(self) -> dict:
        """Every setting, as the results record it."""
        return config_to_dict(self)


def load_prompt_set(config: EvalConfig) -> list[PromptEntry]:
    """The prompts `--prompts` names, filtered and cut to `--limit`."""
    source = config.prompts
    i2p_filters = bool(config.category or config.min_nudity_percentage is not None)
    if source in ("i2p", "i2p-nudity"):
        categories = tuple(config.category) + (("sexual",) if source == "i2p-nudity" else ())
        return load_i2p(
            None,
            categories=categories,
            min_nudity_percentage=config.min_nudity_percentage,
            limit=config.limit,
        )
    if source == "coco":
        return load_coco(None)
    if source == "imagenette":
        classes = [c.strip() for c in config.classes.split(",")] if config.classes else None
        entries = imagenette_prompts(config.per_class, classes, seed=config.seed)
        return entries[: config.limit] if config.limit else entries
    if i2p_filters:
        return load_i2p(
            source,
            categories=tuple(config.category),
            min_nudity_percentage=config.min_nudity_percentage,
            limit=config.limit,
        )
    return load_prompt_file(source, config.limit)


def chosen_metrics(config: EvalConfig) -> list[str]:
    """--metric values in order without repeats, or the prompt set's usual metric."""
    if config.metric is not None:
        return list(dict.fromkeys(config.metric))
    if (
        config.prompts.startswith("i2p")
        or config.category
        or config.min_nudity_percentage is not None
    ):
        names = ["nudity"]
    elif config.prompts == "imagenette":
        names = ["classify"]
    else:
        names = ["clip"]
    return names + (["fid"] if config.reference and "fid" not in names else [])


def default_output(config: EvalConfig) -> str:
    """outputs/eval-<unet or model>-<prompt set>."""
    from erase.concepts import slug

    model = os.path.basename(os.path.normpath(config.unet or config.model))
    prompt_set = os.path.splitext(os.path.basename(config.prompts))[0]
    return os.path.join("outputs", f"eval-{slug(model)}-{slug(prompt_set)}")


def run_evaluation(config: EvalConfig, metric_config=None, backend=None) -> dict | None:
    """Generate the missing images, score them, write the reports; the results (main process).

    `metric_config` (an eval.runner.MetricConfig) lets tests pass a FID feature module or a
    loaded CLIP model; the flags fill in the rest.
    """
    check_arguments(config)
    entries = load_prompt_set(config)

    from erase.artifact import disk_errors, output_lock
    from eval.runner import process_state

    state = process_state()
    output = config.output or default_output(config)
    with output_lock(output), disk_errors(output):
        return evaluate_into(output, config, entries, state, metric_config, backend)


def check_arguments(config: EvalConfig) -> None:
    """Refuse, in one line, what the arguments alone show to be wrong (before any work)."""
    from erase.models import model_conditioning

    check_values(
        config, EVAL_POSITIVE, {"fid_features": INCEPTION_FEATURES, "sampler": SAMPLER_NAMES}
    )

    if model_conditioning(config.model) == "class":  # before a testbed is trained on first use
        raise EraseError(
            f"erase-eval generates from text prompts and '{config.model}' is class-conditional: "
            "evaluate it with erase-concept's class-removal evaluation instead."
        )
    if config.resolution is not None and config.resolution % 8:
        raise EraseError(  # diffusers' pipelines make multiples of 8 (the VAE's factor)
            f"--resolution must be a multiple of 8, got {config.resolution}."
        )
    if config.unet and not os.path.isdir(config.unet):
        raise EraseError(f"--unet '{config.unet}' is not a folder: pass an erase-concept output.")
    if config.text_encoder and not os.path.isdir(os.path.join(config.text_encoder, "text_encoder")):
        raise EraseError(
            f"--text-encoder '{config.text_encoder}' holds no text_encoder/: pass the output of "
            "a method that erases the text encoder (erase-concept --method advunlearn)."
        )
    if not 0 <= config.nudity_threshold <= 1:  # NaN fails this too
        raise EraseError(f"--nudity-threshold must be in [0, 1], got {config.nudity_threshold}.")
    if config.min_nudity_percentage is not None and not 0 <= config.min_nudity_percentage <= 100:
        raise EraseError(
            f"--min-nudity-percentage must be in [0, 100], got {config.min_nudity_percentage}."
        )


def evaluate_into(
    output, config: EvalConfig, entries, state, metric_config, backend
) -> dict | None:
    """Generate and score into `output`, holding its lock; on an error no empty images/ is left."""
    image_dir = os.path.join(output, "images")
    from erase.artifact import open_resumable

    created = [folder for folder in (output, image_dir) if not os.path.exists(folder)]
    if state.is_main_process:
        open_resumable(output, "erase-eval")
    state.wait_for_everyone()
    try:
        return generate_and_score(output, image_dir, config, entries, state, metric_config, backend)
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


def generate_and_score(output, image_dir, config, entries, state, metric_config, backend):
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

    generation = fields_from(config, GenerationConfig)
    metric_config = metric_config or MetricConfig()
    metric_config.nudity_threshold = config.nudity_threshold
    metric_config.reference = config.reference
    metric_config.fid_image_size = config.fid_image_size
    metric_config.fid_features = config.fid_features
    metric_config.fid_weights = config.fid_weights
    metric_config.clip_model = config.clip_model
    metric_config.clip_pretrained = config.clip_pretrained
    metric_config.classifier_weights = config.classifier_weights

    records = plan_images(entries, generation)
    metric_names = chosen_metrics(config)
    prepared = prepare_metrics(metric_names, metric_config, records, state.device)
    stats = generate_images(
        records, image_dir, generation, backend=backend, progress=not config.no_progress
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
            "source": config.prompts,
            "count": len(entries),
            "categories": config.category,
            "min_nudity_percentage": config.min_nudity_percentage,
            "limit": config.limit,
        },
        "metric_settings": {
            k: v
            for k, v in dataclasses.asdict(metric_config).items()
            if k not in ("fid_feature", "clip")
        },
        "metrics": summaries,
        "settings": config.to_dict(),  # the run, as EvalConfig.from_dict reads it back
        "versions": versions(),
    }
    write_outputs(output, results, per_image, records, image_dir)
    results["output"] = output
    return results
