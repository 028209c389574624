"""The model card (README.md with Hugging Face hub front matter) of an erased model, and
`--push-to-hub`: uploading an output or an export through huggingface_hub."""

from __future__ import annotations

import json
import os

from erase.errors import EraseError

# Licenses of the bases `--model` names by alias, as their hub model cards declare them.
BASE_LICENSES = {
    "CompVis/stable-diffusion-v1-4": "creativeml-openrail-m",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",
    "runwayml/stable-diffusion-v1-5": "creativeml-openrail-m",
    "stabilityai/stable-diffusion-2-1-base": "openrail++",
    "stabilityai/stable-diffusion-2-1": "openrail++",
}
METHOD_NAMES = {
    "salun": "SalUn (saliency unlearning; Fan et al., ICLR 2024)",
    "esd-u": "ESD-u (erasing concepts, unconditional layers; Gandikota et al., ICCV 2023)",
    "esd-x": "ESD-x (erasing concepts, cross-attention; Gandikota et al., ICCV 2023)",
    "esd-x-strict": "ESD-x-strict (cross-attention keys and values; Gandikota et al., ICCV 2023)",
    "fmn": "Forget-Me-Not (attention re-steering; Zhang et al., 2023)",
    "uce": "UCE (unified concept editing, closed form; Gandikota et al., WACV 2024)",
    "advunlearn": "AdvUnlearn (adversarial training of the text encoder; Zhang et al., "
    "NeurIPS 2024)",
}


def is_hub_id(name: str) -> bool:
    """Whether `name` reads as a hub repository id (owner/name) rather than a local path."""
    return (
        isinstance(name, str)
        and name.count("/") == 1
        and not name.startswith((".", "/", "~"))
        and not os.path.exists(name)
    )


def card_data(metadata: dict):
    """The front matter: base model and its license where known, library, tags."""
    from huggingface_hub import ModelCardData

    base = metadata.get("base_model")
    forget = metadata.get("concept", {}).get("forget", [])
    text_to_image = all(isinstance(condition, str) for condition in forget)  # not class indices
    tags = ["concept-erasure", "machine-unlearning", metadata.get("method", "unknown")]
    if text_to_image:
        tags += ["stable-diffusion", "text-to-image"]
    return ModelCardData(
        base_model=base if is_hub_id(base) else None,
        license=BASE_LICENSES.get(base),
        library_name="diffusers",
        pipeline_tag="text-to-image" if text_to_image else None,
        tags=tags,
    )


def model_card(metadata: dict, export_format: str | None = None, grid: bool = False) -> str:
    """README.md of an erased model: front matter, what was erased and how, results, loading."""
    concept = metadata.get("concept", {})
    method = metadata.get("method", "unknown")
    base = metadata.get("base_model")
    lines = [
        "---",
        card_data(metadata).to_yaml(),
        "---",
        "",
        f"# {base} without '{concept.get('name')}' ({method})",
        "",
        f"The UNet of `{base}` with the concept **{concept.get('name')}** erased by "
        f"{METHOD_NAMES.get(method, method)}, written by "
        f"[erase](https://pypi.org/project/erase/) {metadata.get('versions', {}).get('erase', '')}."
        " The text encoder, VAE and scheduler are the base model's, unchanged.",
        "",
        "## The run",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{base}` |",
        f"| concept | {concept.get('name')} |",
        f"| forget prompts | {prompt_list(concept.get('forget', []))} |",
        f"| retain prompts | {prompt_list(concept.get('retain', []))} |",
        f"| method | {method} |",
        f"| method settings | `{compact(metadata.get('method_config'))}` |",
        f"| hardening | {harden_text(metadata)} |",
        f"| training | {training_text(metadata)} |",
        f"| data | {metadata.get('data_source', '')} |",
        f"| seed | {metadata.get('seed')} |",
        f"| changed weights | {metadata.get('changed_weights', 0):,} of "
        f"{metadata.get('total_weights', 0):,} |",
        f"| device, peak memory | {metadata.get('device')}, {metadata.get('peak_memory_mb')} MB |",
        "",
        "## Evaluation",
        "",
        *evaluation_lines(metadata.get("evaluation")),
    ]
    if grid:
        lines += ["", "![before | after: forget prompts, then retain prompts](grid.png)"]
    erased_encoder = "text_encoder" in (metadata.get("erased_components") or [])
    lines += ["", "## How to use it", "", *usage_lines(base, export_format, erased_encoder)]
    license_name = BASE_LICENSES.get(base)
    if license_name:
        lines += [
            "",
            f"The base model's license ({license_name}) and its use restrictions apply to this "
            "derivative.",
        ]
    return "\n".join(lines) + "\n"


def training_text(metadata: dict) -> str:
    """The training settings, or the closed-form edit's seconds (UCE trains nothing)."""
    if metadata.get("closed_form"):
        return f"none: a closed-form edit, {metadata.get('edit_s')} s"
    return f"`{compact(metadata.get('train_config'))}`"


def harden_text(metadata: dict) -> str:
    """The --harden technique and its settings, or 'none'."""
    if not metadata.get("harden"):
        return "none"
    return f"{metadata['harden']} `{compact(metadata.get('harden_config'))}`"


def prompt_list(prompts: list, shown: int = 3) -> str:
    """The first few prompts, quoted, with how many more there are."""
    quoted = ", ".join(f'"{p}"' for p in prompts[:shown])
    return quoted + (f" and {len(prompts) - shown} more" if len(prompts) > shown else "")


def compact(settings: dict | None) -> str:
    """A settings dataclass as one line of JSON."""
    return json.dumps(settings or {}, default=str)


def evaluation_lines(evaluation: dict | None) -> list[str]:
    """The before/after metrics measured during the run, or how to measure them."""
    if not evaluation:
        return [
            "No evaluation ran with the erasure. Measure it with `erase-eval` (NudeNet on I2P, "
            "ResNet-50 on Imagenette classes, FID and CLIP score on COCO captions)."
        ]
    before, after = evaluation.get("before", {}), evaluation.get("after", {})
    lines = ["| metric | before | after |", "|---|---|---|"]
    for key, value in before.items():
        if isinstance(value, int | float) and isinstance(after.get(key), int | float):
            lines.append(f"| {key} | {value:.4g} | {after[key]:.4g} |")
    return lines


def usage_lines(base: str, export_format: str | None, text_encoder: bool = False) -> list[str]:
    """Loading instructions for the artifact folder or one of erase-export's formats;
    `text_encoder`: the folder holds an erased text encoder (AdvUnlearn's) to load."""
    if export_format == "pipeline":
        return [
            "```python",
            "from diffusers import DiffusionPipeline",
            "",
            'pipe = DiffusionPipeline.from_pretrained("THIS_REPO_OR_FOLDER")  # SD or SDXL',
            'image = pipe("a photo of a person at the beach").images[0]',
            "```",
        ]
    if export_format == "single-file":
        return [
            "One `.safetensors` checkpoint in the original Stable Diffusion layout: put it in the "
            "checkpoint folder of AUTOMATIC1111 / Forge (`models/Stable-diffusion`) or ComfyUI "
            "(`models/checkpoints`). In diffusers:",
            "",
            "```python",
            "from diffusers import StableDiffusionPipeline",
            "",
            "# config: the base's folder or hub id, so that no configuration is fetched or guessed",
            f'pipe = StableDiffusionPipeline.from_single_file("FILE.safetensors", config="{base}")',
            "```",
        ]
    if export_format == "unet":
        return [
            "The erased UNet alone, original Stable Diffusion layout: ComfyUI's *Load Diffusion "
            "Model* node (`models/unet` or `models/diffusion_models`), with the base model's CLIP "
            "and VAE. In diffusers:",
            "",
            "```python",
            "from diffusers import UNet2DConditionModel",
            "",
            "unet = UNet2DConditionModel.from_single_file(",
            f'    "FILE.safetensors", config="{base}", subfolder="unet"',
            ")",
            "```",
        ]
    if text_encoder:  # AdvUnlearn: the erased text encoder beside the base's UNet
        return [
            "```python",
            "from diffusers import StableDiffusionPipeline",
            "from transformers import CLIPTextModel",
            "",
            "text_encoder = CLIPTextModel.from_pretrained(",
            '    "THIS_REPO_OR_FOLDER", subfolder="text_encoder"',
            ")",
            f'pipe = StableDiffusionPipeline.from_pretrained("{base}", text_encoder=text_encoder)',
            "```",
            "",
            "The text encoder is a plug-in: pass it with any UNet of the same base (another "
            "method's erased one, `unet=...`). `erase-export` turns this folder into one "
            "checkpoint file (`--format single-file`, the erased encoder in it) or a complete "
            "diffusers pipeline (`--format pipeline`).",
        ]
    return [
        "```python",
        "from diffusers import DiffusionPipeline, UNet2DConditionModel",
        "",
        'unet = UNet2DConditionModel.from_pretrained("THIS_REPO_OR_FOLDER", subfolder="unet")',
        f'pipe = DiffusionPipeline.from_pretrained("{base}", unet=unet)  # SD or SDXL',
        "```",
        "",
        "`erase-export` turns this folder into one checkpoint file for AUTOMATIC1111, Forge and "
        "ComfyUI (`--format single-file`) or a complete diffusers pipeline (`--format pipeline`).",
    ]


def write_model_card(folder: str, metadata: dict, export_format: str | None = None) -> str:
    """README.md in `folder` (written through a temporary file); returns its path."""
    path = os.path.join(folder, "README.md")
    grid = os.path.isfile(os.path.join(folder, "grid.png"))
    with open(path + ".tmp", "w", encoding="utf-8") as file:
        file.write(model_card(metadata, export_format, grid=grid))
    os.replace(path + ".tmp", path)
    return path


# -- the hub ----------------------------------------------------------------------------------


def check_can_push(repo_id: str) -> None:
    """Fail in a second, before any work, when an upload to `repo_id` cannot happen."""
    from huggingface_hub import constants, get_token

    if repo_id.count("/") != 1:
        raise EraseError(f"--push-to-hub takes a repository id OWNER/NAME, got '{repo_id}'.")
    if constants.HF_HUB_OFFLINE:
        raise EraseError(
            f"Cannot push to '{repo_id}' while HF_HUB_OFFLINE is set: run again online without "
            f"it, or upload the files later with `hf upload {repo_id} PATH`."
        )
    if get_token() is None:
        raise EraseError(
            f"Cannot push to '{repo_id}': no Hugging Face token. Log in with `hf auth login` or "
            "set HF_TOKEN."
        )


def push_folder(folder: str, repo_id: str) -> str:
    """Upload an output folder (its README.md is the card) to a model repository; its URL."""
    from huggingface_hub import HfApi

    check_can_push(repo_id)
    try:
        api = HfApi()
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="erase: upload")
    except Exception as error:  # network, authentication, permission: the local files stay
        raise upload_error(repo_id, folder, error) from None
    return f"https://huggingface.co/{repo_id}"


def push_export(path: str, export_format: str, metadata: dict, repo_id: str) -> str:
    """Upload an erase-export result with its model card; its URL."""
    if os.path.isdir(path):
        return push_folder(path, repo_id)
    from huggingface_hub import HfApi

    check_can_push(repo_id)
    card = model_card(metadata, export_format).replace("FILE.safetensors", os.path.basename(path))
    try:
        api = HfApi()
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        api.upload_file(path_or_fileobj=path, path_in_repo=os.path.basename(path), repo_id=repo_id)
        api.upload_file(path_or_fileobj=card.encode(), path_in_repo="README.md", repo_id=repo_id)
    except Exception as error:
        raise upload_error(repo_id, path, error) from None
    return f"https://huggingface.co/{repo_id}"


def upload_error(repo_id: str, path: str, error: Exception) -> EraseError:
    """One sentence: the upload failed, why, and that the local files are kept."""
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return EraseError(
        f"Upload to '{repo_id}' failed ({type(error).__name__}: {reason}); '{path}' is kept: "
        f"retry with `hf upload {repo_id} {path}` once online and logged in."
    )
