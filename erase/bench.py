"""erase-bench's library: every method erases the same concept from the same base model, and
each result (and the base) is scored with the same prompts, seeds and metrics, in one table.

Writes bench.json (every setting and row), bench.md (the table), chart.png (forgetting against
retention) and grid.png (one row of images per model, same prompts and seeds), and each method's
erased model as an erase-concept artifact in <output>/<method>/. The CLI is erase/cli/bench.py.
"""

from __future__ import annotations

import dataclasses
import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch

from erase import api
from erase.artifact import check_output, output_lock, staged_output, write_json
from erase.concepts import Concept
from erase.config import (
    SAMPLER_NAMES,
    ErasureConfig,
    check_known,
    check_values,
    config_to_dict,
)
from erase.erasure import module_state, resolve_run_concept, restore_module
from erase.errors import EraseError
from erase.methods import METHODS, get_method
from erase.threads import backend_threads
from erase.train import peak_memory_mb
from eval.scoring import ModelScorer, ScoringSettings

FORGET_METRICS = ("forget_accuracy", "forget_nudity_share")  # lower = more forgotten
RETAIN_METRICS = ("retain_accuracy", "clip_score", "retain_nudity_share")
DEFAULT_METHODS = ("salun", "esd-u", "esd-x", "fmn")


@dataclass
class BenchConfig:
    """One erase-bench run: the erasure every method shares, each method's own settings, and how
    every row is scored and attacked."""

    erasure: ErasureConfig  # model, concept and the settings every method's erasure gets
    output: str
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    overwrite: bool = False
    method_settings: dict[str, dict] = field(default_factory=dict)  # one method's own settings
    bench_per_prompt: int = 10  # evaluation images per prompt (fixed seeds)
    bench_steps: int = 25  # sampling steps of evaluation images
    # The sampler of every row's images, evaluation and attacks (ddim | lms); None: DDIM for the
    # evaluation, and each attack's own default (erase-attack's --sampler: LMS on SD).
    sampler: str | None = None
    bench_guidance: float | None = None  # None: the model's
    bench_clip: str = "ViT-L-14:openai"  # open_clip MODEL:WEIGHTS of the CLIP score, or none
    attacks: list[str] = field(default_factory=list)  # erase-attack's attacks on every row
    attack_settings: dict[str, Any] = field(default_factory=dict)  # their flags, by name
    retrain: bool = False  # a row for the testbed retrained without the concept
    # a row for sd-digits' UNet retrained without it, beside the base's text encoder and VAE
    retrain_unet: bool = False

    def __post_init__(self):
        if isinstance(self.erasure, dict):
            self.erasure = ErasureConfig.from_dict(self.erasure)
        if isinstance(self.methods, str):
            self.methods = [m.strip() for m in self.methods.split(",") if m.strip()]
        if isinstance(self.attacks, str):
            self.attacks = [a.strip() for a in self.attacks.split(",") if a.strip()]
        self.methods, self.attacks = list(self.methods), list(self.attacks)

    @classmethod
    def from_dict(cls, settings: dict) -> BenchConfig:
        """A config from its fields (`erasure` a dict of ErasureConfig's); an unknown key is one
        EraseError naming the nearest."""
        names = [config_field.name for config_field in dataclasses.fields(cls)]
        check_known(settings, names, "erase-bench")
        return cls(**settings)

    @classmethod
    def from_settings(cls, concept, output: str, **settings) -> BenchConfig:
        """A config from erase-bench's flags by name: its own, and erase-concept's, which every
        method gets (`steps=50`); what erase.benchmark passes."""
        for name in ("method", "no_eval"):
            if name in settings:
                raise EraseError(
                    "--method and --no-eval are erase-concept's: erase-bench takes --methods and "
                    "scores every model itself."
                )
        own = {config_field.name for config_field in dataclasses.fields(cls)} - {"erasure"}
        bench = {name: value for name, value in settings.items() if name in own}
        erasure = {name: value for name, value in settings.items() if name not in own}
        erasure = ErasureConfig.from_dict({**erasure, "concept": concept})
        return cls(erasure=erasure, output=output, **bench)

    def to_dict(self) -> dict:
        """Every setting, as bench.json records it."""
        return config_to_dict(self)


def scoring_settings(config: BenchConfig) -> ScoringSettings:
    """How every row is sampled and scored: the bench's flags, and the erasure's seed and size."""
    return ScoringSettings(
        per_prompt=config.bench_per_prompt,
        seed=config.erasure.seed,
        num_steps=config.bench_steps,
        sampler=config.sampler or "ddim",
        guidance_scale=config.bench_guidance,
        resolution=config.erasure.resolution,
        batch_size=config.erasure.gen_batch_size,
        clip=config.bench_clip,
    )


def method_settings(config: BenchConfig, method: str) -> dict:
    """erase.erase_concept's settings for one method: the shared ones, then the method's own."""
    shared = {
        name: value
        for name, value in config.erasure.to_dict().items()
        if name not in ("model", "concept", "method", "output")
    }
    # the bench scores every row itself, the same way
    return {**shared, **config.method_settings.get(method, {}), "no_eval": True}


# -- robustness -------------------------------------------------------------------------------


def attack_settings(config: BenchConfig, concept: Concept):
    """erase-attack's settings of the bench's attacks (None without any)."""
    if not config.attacks:
        return None
    from eval.attacks.config import attack_settings as settings_of

    flags = dict(config.attack_settings)
    if config.sampler is not None:  # the bench's sampler, unless --attack-flags gives one
        flags.setdefault("sampler", config.sampler)
    try:
        return settings_of(concept.name, config.attacks, model=config.erasure.model, **flags)
    except EraseError as error:
        raise EraseError(f"--attacks/--attack-flags: {error}") from None


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
    for name in ("cce", "ring-a-bell"):
        if name in figures:
            columns[f"{name.replace('-', '_')}_asr"] = figures[name]["asr"]
    if "relearn" in figures:
        relearn = figures["relearn"]
        shared.setdefault("base_rate", relearn["base_positive_rate"])
        columns["steps_to_recover"] = relearn["steps_to_recover"]
        columns["relearn_auc"] = relearn.get("auc")
        columns["relearn_curve"] = " ".join(
            f"{p['step']}:{p['positive_rate']:.2f}" for p in relearn["curve"]
        )
        for curve in relearn.get("curves", [])[1:]:  # every further attack: data/tuning/lr
            columns[f"steps_to_recover {curve['label']}"] = curve["steps_to_recover"]
            columns[f"relearn_auc {curve['label']}"] = curve["auc"]
    return columns


def retrain_row(
    backend, concept: Concept, config, settings, folder, shared, samples, unet_only=False
) -> dict:
    """The row of the testbed retrained without the concept, scored and attacked like the others;
    `unet_only`: sd-digits' UNet alone retrained (the row `retrain-unet`)."""
    from erase.testbeds.retrain import load_retrain

    label = "retrain-unet" if unet_only else "retrain"
    retrained = load_retrain(
        config.erasure.model, concept.name, device=backend.device, unet_only=unet_only
    )
    clock = time.perf_counter()
    metrics, samples[label] = ModelScorer(retrained, concept, scoring_settings(config))()
    row = {"method": label, **metrics, "eval_s": round(time.perf_counter() - clock, 2)}
    if settings is not None:
        row.update(attack_columns(retrained, label, settings, folder, shared, base=backend))
    return row


# -- the bench --------------------------------------------------------------------------------


def run_bench(config: BenchConfig, backend=None) -> dict:
    """Erase with each method, score the base and each, write bench.json/bench.md/chart/grid.

    `backend`: the base model already loaded (erase.load_model); it is erased in place by each
    method in turn and holds the base weights again at the end."""
    methods = config.methods
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise EraseError(
            f"Unknown method(s) {', '.join(unknown) or '(none given)'} in --methods: choose "
            f"from {', '.join(sorted(METHODS))}."
        )
    repeated = sorted({m for m in methods if methods.count(m) > 1})
    if repeated:
        raise EraseError(f"--methods names {', '.join(repeated)} more than once: name each once.")
    for name in config.method_settings:
        if name not in methods:
            raise EraseError(
                f"method_settings names '{name}', which is not in methods ({', '.join(methods)})."
            )
    positive = {"bench_per_prompt", "bench_steps", "bench_guidance"}
    check_values(config, positive, {}, skip=("erasure",))  # the erasure's: check_erasure below
    if config.sampler is not None and config.sampler not in SAMPLER_NAMES:
        raise EraseError(
            f"--sampler must be one of {', '.join(SAMPLER_NAMES)}, got {config.sampler!r}."
        )
    for method in methods:  # every method's settings, before the base is even loaded
        api.check_erasure(config.erasure.concept, method, **method_settings(config, method))
    check_bench_clip(config.bench_clip)
    if config.retrain or config.retrain_unet:  # a model without a Retrain: before any work
        from erase.testbeds.retrain import check_retrain

        flag = "--retrain" if config.retrain else "--retrain-unet"
        if len(config.erasure.concept) != 1:
            raise EraseError(f"{flag} leaves one digit out: name one --concept, or drop {flag}.")
        if config.retrain:
            check_retrain(config.erasure.model, config.erasure.concept[0])
        if config.retrain_unet:
            check_retrain(config.erasure.model, config.erasure.concept[0], unet_only=True)
    with output_lock(config.output):
        check_output(config.output, config.overwrite, tool="erase-bench")
        return bench_into(config, backend)


def benchmark(
    model,
    concept: str | list[str],
    output: str,
    methods: str | list[str] = ("salun", "esd-u", "esd-x", "fmn"),
    method_settings: dict[str, dict] | None = None,
    **settings,
) -> dict:
    """Erase `concept` with each method from the same base model and score the base and each
    with the same prompts, seeds and metrics, as erase-bench does; the table of bench.json.

    `settings` are erase-bench's flags by name: its own (`bench_per_prompt=10`,
    `attacks="relearn"`, `attack_settings={"blocks": 10}`) and erase-concept's, which every
    method gets; `method_settings` gives one method its own (`{"esd-x": {"lr": 1e-4}}`). A model
    object is erased by each method in turn and holds its base weights again at the end.
    """
    name, backend = api.loaded(model)
    config = BenchConfig.from_settings(
        concept,
        output,
        **settings,
        **({"model": name} if name is not None else {}),
        methods=methods,
        method_settings=dict(method_settings or {}),
    )
    return run_bench(config, backend=backend)


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


def bench_into(config: BenchConfig, backend=None) -> dict:
    """The bench of run_bench, holding the lock of its output."""
    clock = time.perf_counter()
    backend = backend or api.load_model(config.erasure.model, data_dir=config.erasure.data_dir)
    with backend_threads(backend, backend.device):  # a testbed on shared cores: one thread
        return bench_loaded(config, backend, clock)


def bench_loaded(config: BenchConfig, backend, clock: float) -> dict:
    """The bench on the loaded base model (`clock`: when loading began)."""
    methods = config.methods
    concept = resolve_run_concept(backend, config.erasure)
    attacks = attack_settings(config, concept)
    shared: dict = {}  # the base row's attack figures that later rows are measured against
    base_state = {name: value.clone() for name, value in backend.unet.state_dict().items()}
    # AdvUnlearn erases the text encoder in place: the rows after it start from the base's
    erases_encoder = any(get_method(name).trains_text_encoder for name in methods)
    encoders = [e for _, e in getattr(backend, "text_encoders", list)()] if erases_encoder else []
    encoder_states = [module_state(encoder) for encoder in encoders]
    scorer = ModelScorer(backend, concept, scoring_settings(config))
    load_s = round(time.perf_counter() - clock, 2)
    rows, samples = [], {}
    with staged_output(config.output, tool="erase-bench") as staging:
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
        if config.retrain:
            rows.append(retrain_row(backend, concept, config, attacks, attack_dir, shared, samples))
        if config.retrain_unet:
            rows.append(
                retrain_row(backend, concept, config, attacks, attack_dir, shared, samples, True)
            )
        for method in methods:
            rows.append(bench_one(backend, method, config, staging, scorer, samples))
            if attacks is not None and "error" not in rows[-1]:
                rows[-1].update(attack_columns(backend, method, attacks, attack_dir, shared))
            backend.unet.load_state_dict(base_state)
            backend.unet.requires_grad_(False)
            if get_method(method).trains_text_encoder:
                for encoder, state in zip(encoders, encoder_states):
                    restore_module(encoder, state)
                backend.forget_prompt_embeddings()
        failed = [row for row in rows[1:] if "error" in row]
        if len(failed) == len(methods):  # a table of errors is no benchmark: nothing is written
            raise EraseError(
                "Every method failed: "
                + "; ".join(f"{row['method']}: {row['error']}" for row in failed)
            )
        table = {
            "model": config.erasure.model,
            "base_model": backend.identity,
            "concept": concept.to_dict(),
            "methods": methods,
            "forget_prompts": scorer.forget_conditions,
            "retain_prompts": scorer.retain_conditions,
            "settings": {k: v for k, v in config.to_dict().items() if k != "output"},
            "notes": scorer.notes,
            "rows": rows,
        }
        write_json(os.path.join(staging, "bench.json"), table)
        with open(os.path.join(staging, "bench.md"), "w") as file:
            file.write(markdown_report(table, list(samples)))
        draw_chart(rows, os.path.join(staging, "chart.png"))
        draw_grid(samples, os.path.join(staging, "grid.png"))
    return table


def bench_one(backend, method: str, config, staging: str, scorer, samples: dict) -> dict:
    """One method's row: erase the loaded base in place through the API, then score; errors go
    in the row."""
    if backend.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(backend.device)
    try:
        output = os.path.join(staging, method)
        settings = method_settings(config, method)
        result = api.erase_concept(backend, config.erasure.concept, method, output, **settings)
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
        "edit_s": timings.get("edit"),  # a closed-form method's (UCE) instead of data/mask/train
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
    ]
    if any(row.get("clip_score") is not None for row in table["rows"]):
        lines.append(
            "clip_score is on torchmetrics' x100 scale (100 * max(cos, 0)); the UnlearnDiffAtk "
            "and AdvUnlearn tables print the 0-1 cosine, i.e. this divided by 100."
        )
    lines += [
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
    relearned = any(r.get("relearn_curve") for r in rows)  # relearn: its curves' panel
    count = 1 + robust + relearned
    figure, panels = plt.subplots(1, count, figsize=(5 * count, 4), squeeze=False)
    panels = panels[0]
    axes = panels[0]
    if relearned:
        draw_relearn_panel(panels[-1], rows)
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


def draw_relearn_panel(axes, rows: list[dict]) -> None:
    """The relearning curve of each row (the first relearning attack), Retrain's dashed."""
    for row in rows:
        if not row.get("relearn_curve"):
            continue
        points = [point.split(":") for point in row["relearn_curve"].split()]
        retrain = row["method"].startswith("retrain")
        axes.plot(
            [int(step) for step, _ in points],
            [float(rate) for _, rate in points],
            "--" if retrain else "-",
            marker="o",
            markersize=3,
            color={"retrain": "black", "retrain-unet": "grey"}.get(row["method"]),
            label=row["method"],
        )
    axes.set_xlabel("fine-tuning steps on the relearning data")
    axes.set_ylabel("concept judged positive")
    axes.set_ylim(-0.02, 1.02)
    axes.set_title("relearning (lower and later = more robust)")
    axes.legend(fontsize=7)


def draw_grid(samples: dict[str, torch.Tensor], path: str) -> None:
    """One row of images per model, the same prompts and seeds in every row."""
    from torchvision.utils import save_image

    rows = list(samples.values())
    width = max(len(row) for row in rows)
    padded = [torch.cat([row, torch.zeros(width - len(row), *row.shape[1:])]) for row in rows]
    save_image(torch.cat(padded), path, nrow=width, padding=1)
