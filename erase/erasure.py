"""The pipeline of one erasure: load the model, build the data, compute the mask, train, write
the artifact, one function per phase. The Python API (erase/api.py: erase-concept, erase-bench
and the scripts go through it) calls `run_erasure` with an ErasureConfig and the measurements to
take around training; the pipeline never parses, prints or imports eval/."""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections.abc import Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import torch
from accelerate.utils import broadcast

from erase.artifact import (
    check_folder_path,
    check_output,
    output_lock,
    partial_path,
    staged_output,
    versions,
    write_json,
)
from erase.card import write_model_card
from erase.checkpoint import check_resume, file_digest, record_settings
from erase.concepts import Concept, resolve_concept, slug, union
from erase.config import ErasureConfig, fields_from
from erase.data import (
    ConceptData,
    DataConfig,
    build_concept_data,
    encode_images,
    folder_image_files,
    unet_fingerprint,
)
from erase.errors import EraseError
from erase.harden import check_harden, get_technique, technique_config
from erase.home import erase_home
from erase.methods import get_method
from erase.models import load_backend, model_conditioning
from erase.optim import eight_bit_functional
from erase.saliency import (
    GradientFile,
    forget_loss_gradients,
    load_mask,
    mask_digest,
    mask_ratio,
    saliency_mask,
    save_mask,
)
from erase.text_encoder import restored_vocabulary
from erase.threads import backend_threads
from erase.train import (
    TrainConfig,
    count_changed_weights,
    make_accelerator,
    peak_memory_mb,
    train,
    trained_model,
    write_base_weights,
)
from prompts import MAX_SEED

ERASURE_PHASES = ("data", "mask", "prepare", "train", "edit")  # UCE: "edit" alone
MAX_RESOLUTION = 8192  # beyond any released model; each backend also allows at most 4 x its own


def resolve_settings(
    config: ErasureConfig, defaults: dict, method_class, num_forget: int | None = None
):
    """TrainConfig and the method's Config: the run's settings first, then the method's
    reference defaults for this backend and concept (its `defaults`)."""
    # --optimizer says how Adam's moments are stored; which Adam (AdamW for FMN) is the method's
    train_config = fields_from(
        config,
        TrainConfig,
        gradient_checkpointing=not config.no_gradient_checkpointing,
        optimizer=None,
        eight_bit=config.optimizer == "adam8bit",
    )
    for name in ("lr", "batch_size", "max_grad_norm", "optimizer", "weight_decay"):
        if getattr(train_config, name) is None:
            setattr(train_config, name, defaults.get(name))
    if train_config.steps is None:
        if config.epochs and train_config.batch_size:
            per_epoch = -(-(num_forget or config.num_forget or 800) // train_config.batch_size)
            train_config.steps = max(1, round(config.epochs * per_epoch))
        else:  # a closed-form method (UCE) has no steps
            train_config.steps = defaults.get("steps")
    values = {}
    for config_field in dataclasses.fields(method_class.Config):
        value = config.method_config.get(config_field.name)
        if value is None:
            value = defaults.get(config_field.name, config_field.default)
        if value is dataclasses.MISSING:  # a field with a default_factory
            value = config_field.default_factory()
        values[config_field.name] = value
    return train_config, method_class.Config(**values)


@dataclass
class ErasureResult:
    """What one erasure produced: the output folder, metadata, and the backend with its erased UNet."""

    output: str
    metadata: dict
    backend: object = field(repr=False, default=None)


def default_output(config: ErasureConfig) -> str:
    """outputs/<model>-<concept>-<method>."""
    model_name = os.path.basename(os.path.normpath(config.model))
    concept = slug("-".join(config.concept))
    return os.path.join("outputs", f"{slug(model_name)}-{concept}-{config.method}")


def resolve_run_concept(backend, config) -> Concept:
    """The concept(s) of this run, as one Concept (the union of several); backends with their own
    prompt sets (sd-digits) resolve a name first."""
    concepts = []
    for name in config.concept:
        prompts = None
        if not config.forget_prompt:
            prompts = backend.concept_prompts(name)
        concepts.append(
            prompts
            or resolve_concept(
                name,
                conditioning=backend.conditioning,
                class_names=backend.class_names,
                forget_prompts=config.forget_prompt,
                retain_prompts=config.retain_prompt,
                remap=config.remap,
            )
        )
    return union(concepts)


def forget_count(backend, concept: Concept, config: ErasureConfig) -> int:
    """--num-forget, or the reference's forget set size: the images of --concept-images (the
    Imagenette recipe's epochs are over the class's own ~950 images), the whole class on
    class-conditional models (DDPM/datasets), 800 generated images otherwise (SD/train-scripts)."""
    if config.num_forget:
        return config.num_forget
    if config.concept_images and os.path.isdir(config.concept_images):
        return len(folder_image_files(config.concept_images)) or 800
    if backend.conditioning == "class":
        return len(backend.real_images(concept.forget, None)[1])
    return 800


class Evaluation(Protocol):
    """A measurement taken before training and again after it, composed by the caller (the API
    adds eval/'s grid of text models and class-removal evaluation of class models)."""

    name: str  # its phases are timed as <name>_before and <name>_after

    def before(self, backend, concept: Concept) -> None:
        """Measure the base model."""

    def after(self, backend, staging: str, is_main_process: bool) -> dict:
        """Measure the erased model, write its files into `staging`; entries for metadata."""


def run_erasure(
    config: ErasureConfig,
    backend=None,
    on_phase=None,
    evaluations: Sequence[Evaluation] = (),
) -> ErasureResult:
    """Erase `config.concept` with `config.method` and write the artifact.

    Every input is checked before any work, and the output stays locked for the whole run.
    `on_phase(name)`, when given, is called as each phase (load, data, ..., write) ends.
    """
    output = config.output or default_output(config)
    check_arguments(config)
    # The accelerate state comes first: the lock and the output's cleanup ask it which process
    # is the main one (several CPU processes are known only to the accelerator made here).
    accelerator = make_accelerator(fields_from(config, TrainConfig, optimizer=None))
    # A model the caller passed is erased in place: it completes, or the model is left as it was.
    in_place = restored_on_failure(backend) if backend is not None else nullcontext()
    # `threads` holds the loaded backend's CPU thread count from loading to the end of the run
    with output_lock(output), in_place, ExitStack() as threads:
        return erase_into(output, config, accelerator, backend, on_phase, evaluations, threads)


@contextmanager
def restored_on_failure(backend):
    """Leave `backend`'s UNet and text encoders as they were (weights, train/eval mode, which
    weights take gradients, the embedding rows textual inversion adds) when the run fails,
    Ctrl-C included. The copy is on the CPU, for the length of the run."""
    modules = {"unet": backend.unet}
    for index, (_, encoder) in enumerate(getattr(backend, "text_encoders", list)()):
        modules[f"text_encoder_{index}"] = encoder
    saved = {name: module_state(module) for name, module in modules.items()}
    checkpointing = getattr(backend.unet, "is_gradient_checkpointing", None)
    precision = getattr(backend, "gen_precision", None)
    try:
        yield
    except BaseException:
        for name, module in modules.items():
            restore_module(module, saved[name])
        if checkpointing is not None and hasattr(backend, "set_gradient_checkpointing"):
            backend.set_gradient_checkpointing(checkpointing)
        if precision is not None:
            backend.gen_precision = precision
        raise


def module_state(module: torch.nn.Module) -> dict:
    """What an erasure may change in `module`, copied to the CPU."""
    embeddings = getattr(module, "get_input_embeddings", lambda: None)()
    return {
        "tensors": {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()},
        "training": {name: part.training for name, part in module.named_modules()},
        "requires_grad": {name: p.requires_grad for name, p in module.named_parameters()},
        "embedding_rows": None if embeddings is None else embeddings.weight.shape[0],
    }


def restore_module(module: torch.nn.Module, state: dict) -> None:
    """Put `module` back as module_state saw it."""
    if state["embedding_rows"] is not None:
        embeddings = module.get_input_embeddings()
        if embeddings.weight.shape[0] != state["embedding_rows"]:
            module.resize_token_embeddings(state["embedding_rows"])
    with torch.no_grad():
        for key, value in module.state_dict().items():
            value.copy_(state["tensors"][key])
    for name, part in module.named_modules():
        part.training = state["training"].get(name, part.training)
    for name, param in module.named_parameters():
        param.requires_grad_(state["requires_grad"].get(name, param.requires_grad))


def check_arguments(config: ErasureConfig) -> None:
    """Refuse, in one line, what can be judged from the arguments alone (before loading)."""
    config.check()  # types, ranges and choices, the method's own settings included
    named = [name.strip().lower() for name in config.concept]
    if len(set(named)) < len(named):
        twice = next(name for name in named if named.count(name) > 1)
        raise EraseError(f"--concept names '{twice}' twice: give each concept once.")
    if config.checkpoint_every < 0:
        raise EraseError(
            f"--checkpoint-every must be 0 (off) or more, got {config.checkpoint_every}."
        )
    if not 0 <= config.seed <= MAX_SEED:
        raise EraseError(f"--seed must be between 0 and {MAX_SEED}, got {config.seed}.")
    if config.resolution is not None and config.resolution > MAX_RESOLUTION:
        raise EraseError(f"--resolution must be at most {MAX_RESOLUTION}, got {config.resolution}.")
    for flag, prompts in (
        ("--forget-prompt", config.forget_prompt),
        ("--retain-prompt", config.retain_prompt),
    ):
        if any(not prompt.strip() for prompt in prompts):
            raise EraseError(f"{flag} must not be empty: give the text of a prompt.")
    method_class = get_method(config.method)
    if method_class.text_only and model_conditioning(config.model) == "class":
        raise EraseError(
            f"{config.method} edits how a model reads prompts, and '{config.model}' is "
            "class-conditional: use --method salun or esd-u for it."
        )
    check_harden(config.harden, config.harden_config, method_class)
    if config.optimizer == "adam8bit":
        eight_bit_functional()  # the library runs here, or one line before any work
    mask_settings = [
        name for name in ("mask_ratio", "mask_guidance") if name in config.method_config
    ]
    if method_class.trains_text_encoder and (config.mask or mask_settings):
        raise EraseError(
            f"{config.method} trains the text encoder, and a saliency mask selects UNet weights: "
            "drop --mask, --mask-ratio and --mask-guidance."
        )
    if config.mask:
        if not get_method(config.method).uses_mask:
            raise EraseError(
                f"--mask is used only by methods with a saliency mask (salun); {config.method} "
                "trains without one: drop --mask."
            )
        if os.path.isdir(config.mask):
            raise EraseError(
                f"--mask '{config.mask}' is a folder: pass the mask file in it (e.g. "
                f"{os.path.join(config.mask, 'mask.safetensors')})."
            )
    check_image_folder(config.concept_images, "--concept-images", nested=False)
    check_image_folder(config.retain_images, "--retain-images", nested=True)
    if config.cache_dir:
        check_folder_path(config.cache_dir, "--cache-dir")
    else:
        check_folder_path(os.path.join(erase_home(), "data"), "ERASE_HOME")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # erase.data.load_image_folder's


def check_image_folder(folder: str | None, flag: str, nested: bool) -> None:
    """Refuse a folder of images that is not one, or holds no image (in it, or with `nested` in
    its class subfolders), before the other set is generated."""
    if not folder:
        return
    if not os.path.isdir(folder):
        raise EraseError(f"{flag} '{folder}' is not a folder of images.")
    entries = list(os.scandir(folder))
    names = [e.name for e in entries if e.is_file()]
    if nested:
        names += [n for e in entries if e.is_dir() for n in os.listdir(e.path)]
    if not any(name.lower().endswith(IMAGE_SUFFIXES) for name in names):
        raise EraseError(f"{flag} '{folder}' holds no .png/.jpg/.webp images.")


def check_backend_arguments(backend, config: ErasureConfig) -> None:
    """Refuse what needs the loaded model to judge: a resolution it cannot make."""
    if config.resolution is None:
        return
    if backend.conditioning == "text":  # diffusers' pipelines need multiples of 8, the VAE its own
        factor = max(8, backend.vae_scale)
    else:  # a pixel-space UNet halves the image once per down block but the last
        factor = 2 ** (len(backend.unet.config.block_out_channels) - 1)
    limit = 4 * backend.resolution
    if config.resolution % factor or config.resolution > limit:
        raise EraseError(
            f"--resolution must be a multiple of {factor} and at most {limit} (4 x the model's "
            f"{backend.resolution}) for this model, got {config.resolution}."
        )


def run_settings(
    backend, concept: Concept, method_config, train_config, config, harden=None
) -> dict:
    """Everything that shapes the trained weights; a checkpoint is resumed only when they match."""
    return {
        "harden": config.harden,
        "harden_config": harden.resolved() if harden else {},
        # the same model spelled two ways (./m, m/) is one model; its weights decide
        "model": os.path.realpath(backend.identity)
        if os.path.exists(backend.identity)
        else backend.identity,
        "weights": unet_fingerprint(backend.unet),
        "concept": concept.to_dict(),
        "method": config.method,
        "method_config": dataclasses.asdict(method_config),
        "train_config": dataclasses.asdict(train_config),
        "data": {
            name: getattr(config, name)
            for name in (
                "num_forget",
                "num_retain",
                "resolution",
                "gen_steps",
                "guidance_scale",
                "gen_batch_size",
                "concept_images",
            )
        },
        "mask_sha256": file_digest(config.mask),
        "seed": config.seed,
    }


class PhaseClock:
    """Seconds per phase of a run, and the run's `on_phase` hook called as each one ends."""

    def __init__(self, on_phase=None):
        self.timings: dict[str, float] = {}
        self.on_phase = on_phase
        self.start = time.perf_counter()

    def lap(self, phase: str, notify: bool = True) -> None:
        """Record the time since the last lap as `phase`."""
        self.timings[phase] = round(time.perf_counter() - self.start, 3)
        self.start = time.perf_counter()
        if notify and self.on_phase:
            self.on_phase(phase)


@dataclass
class Plan:
    """What the load phase resolved: the model, the concept, the method and every setting."""

    backend: object
    concept: Concept
    method: object
    method_config: object
    train_config: TrainConfig
    mask: object  # a saliency mask given with --mask, else None (the mask phase computes it)
    harden: object  # the --harden technique bound to this run (erase/harden/), or None
    settings: dict  # what shapes the weights (run_settings): a checkpoint resumes only on a match
    checkpoint_dir: str


def erase_into(
    output: str,
    config: ErasureConfig,
    accelerator,
    backend=None,
    on_phase=None,
    evaluations: Sequence[Evaluation] = (),
    threads: ExitStack | None = None,
) -> ErasureResult:
    """The erasure of run_erasure, holding the lock of `output`: one function per phase."""
    check_output(output, config.overwrite, resume=config.resume)
    clock = PhaseClock(on_phase)
    plan = load_phase(output, config, accelerator, backend)
    if threads is not None:
        threads.enter_context(backend_threads(plan.backend, accelerator.device))
    clock.lap("load")
    closed_form = plan.method.edit is not None
    inputs = None  # a closed-form edit (UCE) needs no data, mask or training
    if closed_form:
        measure_before(evaluations, plan, clock)
    else:
        inputs = training_inputs(plan, config, accelerator, evaluations, clock)

    with staged_output(output) as staging, encoders_back(plan, inputs):
        if closed_form:
            result, changed = edit_phase(plan, accelerator, staging)
            clock.lap("edit")
        else:
            result, changed = train_phase(plan, accelerator, staging, inputs)
            inputs.vocabulary.close()  # the grids and the artifact: the model's own vocabulary
            if inputs.encoders_moved:  # the grids encode prompts and decode images
                plan.backend.encoders_on()
                inputs.encoders_moved = False
            clock.lap("train")
        measured = {}
        for evaluation in evaluations:
            measured.update(evaluation.after(plan.backend, staging, accelerator.is_main_process))
            clock.lap(f"{evaluation.name}_after")
        mask = inputs.mask if inputs else None
        metadata = {
            "base_model": plan.backend.identity,
            "base_weights": plan.settings["weights"],  # erase-eval checks --model against it
            "model_arg": config.model,
            "concept": plan.concept.to_dict(),
            "method": plan.method.name,
            "method_config": dataclasses.asdict(plan.method_config),
            # closed-form: the weights are solved for in one step (edit_s seconds), not trained
            "closed_form": closed_form,
            "harden": config.harden,
            "harden_config": plan.settings["harden_config"],
            "train_config": None if closed_form else dataclasses.asdict(plan.train_config),
            "data_config": dataclasses.asdict(inputs.data_config) if inputs else None,
            "data_source": inputs.data.source if inputs else "none (closed-form edit)",
            "seed": config.seed,
            "settings": dataclasses.replace(config, output=output).to_dict(),  # to replay the run
            "train_result": None if closed_form else dataclasses.asdict(result),
            "edit_result": result if closed_form else None,
            "edit_s": clock.timings["edit"] if closed_form else None,
            "changed_weights": changed,
            "total_weights": sum(
                p.numel() for p in trained_model(plan.backend, plan.method).parameters()
            ),
            # the parts of the model the artifact's folders replace (unet/, text_encoder/)
            "erased_components": ["text_encoder"] if plan.method.trains_text_encoder else ["unet"],
            "mask_ratio": mask_ratio(mask) if mask is not None else None,
            "timings_s": clock.timings,
            # the erasure proper (data, mask, training) beside what training the base took
            "erasure_s": round(sum(clock.timings.get(k, 0) for k in ERASURE_PHASES), 3),
            "base_training_s": plan.backend.training_seconds,
            "peak_memory_mb": round(peak_memory_mb(accelerator.device), 1),
            "device": str(accelerator.device),
            "cpu_threads": torch.get_num_threads(),  # erase/threads.py: they order the sums
            "versions": versions(),
            **measured,
        }
        if accelerator.is_main_process:
            write_phase(plan, accelerator, staging, mask, metadata, clock)
    if on_phase:
        on_phase("write")
    return ErasureResult(output, metadata, plan.backend)


@dataclass
class TrainingInputs:
    """What a trained method learns from: the data's settings and sets, their latents, the mask."""

    data_config: DataConfig
    data: ConceptData
    forget_latents: torch.Tensor  # (N_f, C, h, w)
    retain_latents: torch.Tensor  # (N_r, C, h, w)
    mask: object  # the saliency mask (SalUn), else None
    encoders_moved: bool = False  # text encoders and VAE off the device for mask and training
    # restores the tokenizers and the text encoder's rows after a method that adds tokens to
    # learn its concept (FMN's textual inversion), once training is done
    vocabulary: ExitStack = field(default_factory=ExitStack)


def measure_before(evaluations: Sequence[Evaluation], plan: Plan, clock: PhaseClock) -> None:
    """Each evaluation's measurement of the base model, timed as <name>_before."""
    for evaluation in evaluations:
        evaluation.before(plan.backend, plan.concept)
        clock.lap(f"{evaluation.name}_before")


def training_inputs(plan: Plan, config: ErasureConfig, accelerator, evaluations, clock):
    """The data, mask and prepare phases of a trained method (and the base model measured
    between data and mask): its TrainingInputs."""
    data_config, data, forget_latents, retain_latents = data_phase(plan, config, accelerator)
    clock.lap("data")
    measure_before(evaluations, plan, clock)
    # The text encoders and the VAE wait off the device from the mask to the grids (the prompts'
    # embeddings cached, the latents made): the device holds the UNet and its training state.
    moved = encoders_off(plan, data)
    vocabulary = ExitStack()
    if plan.method.runs_text_encoder and not plan.method.trains_text_encoder:
        vocabulary.enter_context(restored_vocabulary(plan.backend))
    try:
        mask = plan.mask or mask_phase(plan, forget_latents, data.forget_conditions, accelerator)
        if mask is not None:  # the masked optimizer's state fits only the mask it was made with
            plan.settings["mask_digest"] = mask_digest(mask)
            check_resume(plan.checkpoint_dir, plan.settings, config.resume)
        clock.lap("mask")
        # a method's stage before training (FMN's textual inversion); most have none
        plan.method.prepare(
            forget_latents, data.forget_conditions, torch.Generator().manual_seed(config.seed)
        )
        clock.lap("prepare")
    except BaseException:
        vocabulary.close()
        if moved:  # an API caller gets its whole pipeline back, even after a failure
            plan.backend.encoders_on()
        raise
    return TrainingInputs(
        data_config, data, forget_latents, retain_latents, mask, moved, vocabulary
    )


@contextmanager
def encoders_back(plan: Plan, inputs: TrainingInputs | None):
    """The encoders back on the device when the block ends, failed or not, if they were moved,
    and the tokens a method added gone."""
    try:
        yield
    finally:
        if inputs is not None:
            inputs.vocabulary.close()
            if inputs.encoders_moved:
                plan.backend.encoders_on()


def load_phase(output: str, config: ErasureConfig, accelerator, backend=None) -> Plan:
    """Load the model (unless given), resolve the concept and every setting, check the resume."""
    method_class = get_method(config.method)
    if backend is None:
        backend = load_backend(config.model, data_dir=config.data_dir, device=accelerator.device)
    check_backend_arguments(backend, config)
    backend.gen_precision = config.gen_precision
    concept = resolve_run_concept(backend, config)
    num_forget = forget_count(backend, concept, config)
    defaults = method_class.defaults(backend, concept, num_forget)
    train_config, method_config = resolve_settings(config, defaults, method_class, num_forget)
    method = method_class(backend, concept, method_config)  # fails early on an unfit backend
    # for the mask's backward as well as training
    backend.set_gradient_checkpointing(
        train_config.gradient_checkpointing and method.gradient_checkpointing
    )
    mask = None
    if method.uses_mask and config.mask:
        same_weights = check_mask_base(config.mask, backend)
        with warnings.catch_warnings():
            if same_weights:  # the base's name spelled otherwise is no reason to warn
                warnings.simplefilter("ignore")
            mask = load_mask(config.mask, backend.unet, backend.identity)
    checkpoint_dir = os.path.join(partial_path(output), "checkpoint")
    harden = None
    if config.harden:
        technique_class = get_technique(config.harden)
        technique = technique_config(technique_class, config.harden_config)
        scratch = scratch_folder(checkpoint_dir)
        harden = technique_class(backend, method, technique, train_config, scratch=scratch)
    settings = run_settings(backend, concept, method_config, train_config, config, harden)
    check_resume(checkpoint_dir, settings, config.resume, ignore=("mask_digest",))
    return Plan(
        backend,
        concept,
        method,
        method_config,
        train_config,
        mask,
        harden,
        settings,
        checkpoint_dir,
    )


def check_mask_base(path: str, backend) -> bool:
    """Refuse a --mask computed on other weights (its header's `weights`), even of the same
    shapes: it selects the salient weights of another model. True when the weights match."""
    from erase.artifact import safetensors_header

    recorded = safetensors_header(path).get("__metadata__", {}).get("weights")
    if not recorded:
        return False  # a mask of an older version: load_mask compares the model's name
    if recorded.strip('"') != unet_fingerprint(backend.unet):
        raise EraseError(
            f"The mask '{path}' was computed on other weights than those of "
            f"'{backend.identity}': compute a new mask on this model (drop --mask)."
        )
    return True


def data_phase(plan: Plan, config: ErasureConfig, accelerator):
    """The forget and retain sets, and their latents: (data config, data, forget, retain)."""
    data_config = fields_from(config, DataConfig)
    backend = plan.backend
    needs_images = plan.method.needs_images or (plan.harden and plan.harden.needs_images)
    if not needs_images:  # ESD samples its own x_t: only shapes and conditions count
        data = placeholder_data(
            backend, plan.concept, plan.train_config.batch_size, config.resolution
        )
        return data_config, data, data.forget_images, data.retain_images
    with accelerator.main_process_first():  # one process generates, the others read it
        data = build_concept_data(backend, plan.concept, data_config)
    forget_latents = encode_images(backend, data.forget_images)  # (N_f, C, h, w)
    retain_latents = encode_images(backend, data.retain_images)  # (N_r, C, h, w)
    return data_config, data, forget_latents, retain_latents


def cached_conditions(plan: Plan, data) -> list[str]:
    """Every prompt the mask and training encode: the forget and retain sets', their remap
    targets, the concept's terms (ESD's prompts) and the empty prompt (the unconditional one),
    each once."""
    conditions = [*data.forget_conditions, *data.retain_conditions, *plan.concept.terms, ""]
    conditions += [t for c in data.forget_conditions for t in plan.concept.remap_for(c)]
    return sorted({str(condition) for condition in conditions})


def keeps_encoders(plan: Plan) -> bool:
    """Whether the text encoders and VAE stay through training: on class-conditional models
    (none), for a method that runs the text encoder."""
    return plan.backend.conditioning != "text" or plan.method.runs_text_encoder


def scratch_folder(checkpoint_dir: str) -> str:
    """Where a run's unnamed scratch files go (the parked encoders, the saliency gradients on
    disk, --harden meta's spill): the folder the output is made in, beside <output>.partial, whose
    `checkpoint` folder is `checkpoint_dir`."""
    return os.path.dirname(os.path.dirname(os.path.abspath(checkpoint_dir)))


def encoders_off(plan: Plan, data) -> bool:
    """Encode every prompt training needs once (cached in the backend), then take the text
    encoders and the VAE off the device (to the host from a GPU; into a file, their memory
    freed, on the CPU); whether they went."""
    if keeps_encoders(plan):
        return False
    backend = plan.backend
    backend.encode(cached_conditions(plan, data))
    backend.encoders_off(scratch_folder(plan.checkpoint_dir))
    if backend.device.type == "cuda":
        torch.cuda.empty_cache()  # hand the encoders' blocks back to the UNet's state
    return True


def mask_phase(plan: Plan, forget_latents, forget_conditions, accelerator):
    """SalUn's saliency mask from the forget set's gradients; None for methods without one."""
    if not plan.method.uses_mask:
        return None
    gradient_file = None
    if plan.method_config.mask_offload == "disk":
        shapes = {name: p.shape for name, p in plan.backend.unet.named_parameters()}
        gradient_file = GradientFile(shapes, scratch_folder(plan.checkpoint_dir))
    with gradient_file or nullcontext():
        gradients = forget_loss_gradients(
            plan.backend,
            forget_latents,
            forget_conditions,
            guidance_scale=plan.method_config.mask_guidance,
            batch_size=plan.train_config.batch_size,
            micro_batch_size=plan.train_config.micro_batch_size,
            generator=torch.Generator().manual_seed(plan.train_config.seed),
            gradient_file=gradient_file,
        )
        mask = saliency_mask(gradients, plan.method_config.mask_ratio)
    if accelerator.num_processes > 1:  # every process trains with the main process's mask
        mask.bits = {
            name: broadcast(bits.to(accelerator.device)).cpu() for name, bits in mask.bits.items()
        }
    del gradients  # the trainer hands the freed heap back before it makes its state
    return mask


def train_phase(plan: Plan, accelerator, staging: str, inputs: TrainingInputs):
    """Train the method's weights; (the train result, how many weights changed)."""
    backend, method = plan.backend, plan.method
    record_settings(accelerator, plan.checkpoint_dir, plan.settings)
    # The base values of what may move, on disk: changed weights are counted against them
    # without a second UNet in memory.
    base_weights = os.path.join(staging, "base-weights.bin")
    trained = trained_model(backend, method)  # the UNet, or AdvUnlearn's text encoder
    if accelerator.is_main_process:
        write_base_weights(trained, method.trainable, base_weights)
    result = train(
        accelerator,
        backend,
        method,
        (inputs.forget_latents, inputs.data.forget_conditions),
        (inputs.retain_latents, inputs.data.retain_conditions),
        plan.train_config,
        inputs.mask,
        checkpoint_dir=os.path.join(staging, "checkpoint"),
        harden=plan.harden,
    )
    if method.trains_text_encoder:  # the cached prompt embeddings are the original encoder's
        backend.forget_prompt_embeddings()
    changed = 0
    if accelerator.is_main_process:
        changed = count_changed_weights(trained, method.trainable, base_weights)
        os.remove(base_weights)
    return result, changed


def edit_phase(plan: Plan, accelerator, staging: str) -> tuple[dict, int]:
    """A closed-form method's edit of the UNet in place (on every process: it is deterministic);
    (what it edited, how many weights changed), counted as train_phase counts them."""
    backend, method = plan.backend, plan.method
    base_weights = os.path.join(staging, "base-weights.bin")
    if accelerator.is_main_process:
        write_base_weights(backend.unet, method.trainable, base_weights)
    edited = method.edit(backend.unet)
    changed = 0
    if accelerator.is_main_process:
        changed = count_changed_weights(backend.unet, method.trainable, base_weights)
        os.remove(base_weights)
    return edited, changed


def write_phase(plan: Plan, accelerator, staging: str, mask, metadata: dict, clock) -> None:
    """The artifact's files in the staging folder: unet/, mask, metadata.json, the model card."""
    backend = plan.backend
    backend.save_unet(accelerator.unwrap_model(backend.unet), os.path.join(staging, "unet"))
    if plan.method.trains_text_encoder:  # AdvUnlearn: the erased encoder beside the same UNet
        encoder = accelerator.unwrap_model(trained_model(backend, plan.method))
        encoder.save_pretrained(os.path.join(staging, "text_encoder"), safe_serialization=True)
    if mask is not None:
        save_mask(
            mask,
            os.path.join(staging, "mask.safetensors"),
            ratio=plan.method_config.mask_ratio,
            model=backend.identity,
            concept=plan.concept.name,
            weights=plan.settings["weights"],  # a later --mask is checked against it
        )
    clock.lap("write", notify=False)
    write_json(os.path.join(staging, "metadata.json"), metadata)
    write_model_card(staging, metadata)


def placeholder_data(backend, concept: Concept, count: int, resolution: int | None) -> ConceptData:
    """Zero latents with the concept's conditions, for methods that never look at images."""
    scale = (resolution or backend.resolution) / backend.resolution
    channels, height, width = backend.latent_shape
    latents = torch.zeros(count, channels, round(height * scale), round(width * scale))
    forget = [concept.forget[i % len(concept.forget)] for i in range(count)]
    retain = [concept.retain[i % len(concept.retain)] for i in range(count)]
    return ConceptData(latents, forget, latents, retain, "none (the method samples its own)")
