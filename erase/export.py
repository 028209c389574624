"""erase-export's library: an erased model in the formats other tools load (the CLI is
erase/cli/export.py).

erase-export outputs/sd-v1-4-nudity-salun --format single-file --output erased.safetensors
erase-export outputs/sd-v1-4-nudity-salun --format unet --output erased-unet.safetensors --half
erase-export outputs/sd-v1-4-nudity-salun --format pipeline --output erased-pipeline/

- single-file: text encoder + VAE of the base and the erased UNet in the original CompVis / A1111
  key layout, one .safetensors: what the checkpoint loaders of A1111, Forge and ComfyUI read, and
  diffusers' `StableDiffusionPipeline.from_single_file`;
- unet: the erased UNet alone in that layout (ComfyUI's UNet loader, `from_single_file` of
  `UNet2DConditionModel`);
- pipeline: a complete diffusers folder, `StableDiffusionPipeline.from_pretrained(folder)`.

diffusers converts the original layout to its own (`diffusers.loaders.single_file_utils`) but
not back; the inverse here follows those converters name by name, and the tests check that
diffusers' own loader reads every exported weight back bit for bit.
"""

from __future__ import annotations

import json
import os
import re

from erase.errors import EraseError
from erase.text_encoder import erased_text_encoder, text_encoder_folder

FORMATS = ("single-file", "unet", "pipeline")
UNET_PREFIX = "model.diffusion_model."  # the original layout's prefixes of each model
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."

# diffusers ResnetBlock2D names -> the original ResBlock's (the inverse of diffusers'
# update_unet_resnet_ldm_to_diffusers).
UNET_RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
# diffusers VAE attention names -> the original AttnBlock's (update_vae_attentions_ldm_to_diffusers).
VAE_ATTENTION_NAMES = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


# -- key layout: diffusers -> original --------------------------------------------------------


def rename_first(rest: str, names: dict[str, str]) -> str:
    """`rest` with its leading module name replaced through `names` (longest match first)."""
    for name in sorted(names, key=len, reverse=True):
        if rest.startswith(name + "."):
            return names[name] + rest[len(name) :]
    return rest


def original_unet_state_dict(state_dict: dict, layers_per_block: int) -> dict:
    """A diffusers UNet2DConditionModel state dict in the original (ldm openaimodel) key layout."""
    up_with_attention = {
        int(key.split(".")[1])
        for key in state_dict
        if key.startswith("up_blocks.") and ".attentions." in key
    }
    return {
        original_unet_key(key, layers_per_block + 1, up_with_attention): tensor
        for key, tensor in state_dict.items()
    }


def original_unet_key(key: str, per_level: int, up_with_attention: set[int]) -> str:
    """One UNet key in the original layout; `per_level`: ldm blocks per resolution level."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    fixed = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]  # conv_in, time_embed, out
    if key in fixed:
        return fixed[key]
    if match := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block = 1 + int(match[1]) * per_level + int(match[3])  # input_blocks.0 is conv_in
        return f"input_blocks.{block}.{original_block_part(match[2], match[4])}"
    if match := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(match[1]) + 1) * per_level}.0.op.{match[2]}"
    if match := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(match[1])}.{rename_first(match[2], UNET_RESNET_NAMES)}"
    if match := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{match[1]}"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block = int(match[1]) * per_level + int(match[3])
        return f"output_blocks.{block}.{original_block_part(match[2], match[4])}"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        level = int(match[1])
        block = level * per_level + per_level - 1  # the level's last block
        slot = 2 if level in up_with_attention else 1  # after its resnet (and attention)
        return f"output_blocks.{block}.{slot}.conv.{match[2]}"
    raise EraseError(
        f"The UNet weight '{key}' has no place in the original Stable Diffusion layout: "
        "export this model with --format pipeline."
    )


def original_block_part(kind: str, rest: str) -> str:
    """Index 0 (the resnet, renamed) or 1 (the transformer, same names) inside an ldm block."""
    return f"0.{rename_first(rest, UNET_RESNET_NAMES)}" if kind == "resnets" else f"1.{rest}"


def original_vae_state_dict(state_dict: dict) -> dict:
    """A diffusers AutoencoderKL state dict in the original (ldm autoencoder) key layout."""
    up_levels = 1 + max(
        int(key.split(".")[2]) for key in state_dict if key.startswith("decoder.up_blocks.")
    )
    converted = {}
    for key, tensor in state_dict.items():
        if ".mid_block.attentions." in key and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # the original attention projections are 1x1 convs
        converted[original_vae_key(key, up_levels)] = tensor
    return converted


def original_vae_key(key: str, up_levels: int) -> str:
    """One VAE key in the original layout; the original decoder counts levels from the bottom."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    fixed = DIFFUSERS_TO_LDM_MAPPING["vae"]  # conv_in/out, norm_out, quant convs
    if key in fixed:
        return fixed[key]
    if match := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{match[1]}.block.{match[2]}.{vae_resnet_part(match[3])}"
    if match := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{match[1]}.downsample.conv.{match[2]}"
    if match := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        level = up_levels - 1 - int(match[1])
        return f"decoder.up.{level}.block.{match[2]}.{vae_resnet_part(match[3])}"
    if match := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{up_levels - 1 - int(match[1])}.upsample.conv.{match[2]}"
    if match := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{match[1]}.mid.block_{int(match[2]) + 1}.{vae_resnet_part(match[3])}"
    if match := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        return f"{match[1]}.mid.attn_1.{rename_first(match[2], VAE_ATTENTION_NAMES)}"
    raise EraseError(
        f"The VAE weight '{key}' has no place in the original Stable Diffusion layout: "
        "export this model with --format pipeline."
    )


def vae_resnet_part(rest: str) -> str:
    """A VAE resnet's parameter name: only the shortcut is named differently."""
    return rename_first(rest, {"conv_shortcut": "nin_shortcut"})


def original_text_encoder_state_dict(state_dict: dict) -> dict:
    """A transformers CLIPTextModel state dict as SD v1 checkpoints hold it (`text_model.*`)."""
    converted = {}
    for key, tensor in state_dict.items():
        if key.endswith("position_ids"):  # a buffer, rebuilt by every loader
            continue
        converted["text_model." + key.removeprefix("text_model.")] = tensor
    return converted


def single_file_state_dict(pipe) -> dict:
    """The whole pipeline (UNet, VAE, CLIP text encoder) in one original-layout state dict."""
    if pipe.text_encoder.config.hidden_size == 1024:  # SD 2.x: OpenCLIP-H, another layout
        raise EraseError(
            "Single-file export covers Stable Diffusion v1.x bases (CLIP ViT-L text encoder); "
            "for this model use --format unet (ComfyUI) or --format pipeline."
        )
    unet = original_unet_state_dict(pipe.unet.state_dict(), pipe.unet.config.layers_per_block)
    vae = original_vae_state_dict(pipe.vae.state_dict())
    text = original_text_encoder_state_dict(pipe.text_encoder.state_dict())
    return {
        **{UNET_PREFIX + k: v for k, v in unet.items()},
        **{VAE_PREFIX + k: v for k, v in vae.items()},
        **{TEXT_ENCODER_PREFIX + k: v for k, v in text.items()},
    }


# -- loading an artifact ----------------------------------------------------------------------


def read_metadata(artifact: str) -> dict:
    """metadata.json of an erase-concept output folder, with a clear error for anything else."""
    path = os.path.join(artifact, "metadata.json")
    if not os.path.isfile(path):
        raise EraseError(
            f"'{artifact}' is not an erase-concept output (no metadata.json): pass the folder "
            "erase-concept wrote."
        )
    try:
        with open(path, encoding="utf-8") as file:
            metadata = json.load(file)
    except (OSError, ValueError):
        metadata = None
    if not isinstance(metadata, dict):
        raise EraseError(
            f"'{path}' is unreadable (not a JSON object): the erase-concept output is damaged; "
            "erase the model again."
        )
    return metadata


def unet_class(artifact: str) -> str | None:
    """The class name in the artifact's unet/config.json; one line when it has none."""
    path = os.path.join(artifact, "unet", "config.json")
    try:
        with open(path, encoding="utf-8") as file:
            config = json.load(file)
        return config.get("_class_name")
    except (OSError, ValueError, AttributeError):
        raise EraseError(
            f"'{artifact}' has no readable unet/config.json: pass a complete erase-concept "
            "output (erase the model again if it was cut short)."
        ) from None


def load_erased_pipeline(
    artifact: str,
    base: str | None = None,
    metadata: dict | None = None,
    text_encoder: str | None = None,
):
    """The base pipeline with the artifact's erased UNet in place (and its erased text encoder,
    or that of `text_encoder`, another output), and the artifact's metadata.

    The base (the artifact's own, or `base`) must have the weights it was erased from: its text
    encoder and VAE go into the export beside the erased UNet."""
    import torch

    from erase.data import unet_fingerprint
    from erase.models import load_backend

    metadata = metadata or read_metadata(artifact)
    spec = base or metadata.get("base_model")
    backend = load_backend(spec, device=torch.device("cpu"))
    recorded = metadata.get("base_weights")
    if recorded and recorded != unet_fingerprint(backend.unet):
        raise EraseError(
            f"'{spec}' is not the base '{artifact}' was erased from ('{metadata.get('base_model')}'"
            "; its weights differ): pass that model with --base, or leave --base out."
        )
    backend.pipe.unet = backend.load_unet(artifact)
    encoder = erased_text_encoder(backend, artifact, text_encoder)
    if encoder is not None:
        backend.pipe.text_encoder = encoder
    return backend.pipe, metadata


# -- writing ----------------------------------------------------------------------------------


def export_artifact(
    artifact: str,
    export_format: str,
    output: str,
    *,
    half: bool = False,
    base: str | None = None,
    overwrite: bool = False,
    text_encoder: str | None = None,
) -> dict:
    """Write `artifact` as `export_format` to `output`, atomically, holding its lock; returns
    what was written. `--overwrite` replaces only what erase-export wrote; `text_encoder`: an
    output whose erased text encoder goes in instead of the base's."""
    from erase.artifact import check_file_output, check_output, disk_errors, output_lock

    if export_format not in FORMATS:
        raise EraseError(f"Unknown format '{export_format}': choose from {', '.join(FORMATS)}.")
    if not isinstance(output, str) or not output.strip():
        raise EraseError("--output must be a path to write the export to.")
    if not isinstance(artifact, str | os.PathLike) or not os.path.isdir(artifact):
        raise EraseError(f"'{artifact}' is not a folder: pass the folder erase-concept wrote.")
    artifact = str(artifact)
    if export_format != "pipeline" and not output.endswith(".safetensors"):
        raise EraseError(f"--format {export_format} writes one file: name it *.safetensors.")
    metadata = read_metadata(artifact)
    found = unet_class(artifact)
    if found != "UNet2DConditionModel":
        raise EraseError(
            f"'{artifact}' holds a {found} (a class-conditional model), not Stable Diffusion: "
            "its unet/ folder is already what diffusers loads; erase-export writes SD models."
        )
    erased_encoder = text_encoder_folder(text_encoder or artifact)
    if text_encoder and erased_encoder is None:
        raise EraseError(
            f"--text-encoder '{text_encoder}' holds no text_encoder/: pass the output of a "
            "method that erases the text encoder (erase-concept --method advunlearn)."
        )
    if export_format == "unet" and erased_encoder:
        raise EraseError(
            "This model's text encoder is erased, which a UNet-only file would leave out: use "
            "--format single-file or pipeline."
        )
    kind = "folder" if export_format == "pipeline" else "file"
    with output_lock(output, kind=kind), disk_errors(output):
        if kind == "folder":
            check_output(output, overwrite, tool="erase-export")
        else:
            check_file_output(output, overwrite)
        return write_export(artifact, export_format, output, half, base, metadata, text_encoder)


def write_export(artifact, export_format, output, half, base, metadata, text_encoder) -> dict:
    """The export of export_artifact, holding the lock of `output`."""
    import torch

    pipe, metadata = load_erased_pipeline(artifact, base, metadata, text_encoder)
    if export_format != "pipeline" and getattr(pipe, "text_encoder_2", None) is not None:
        raise EraseError("An SDXL model is exported with --format pipeline (a diffusers folder).")
    dtype = torch.float16 if half else torch.float32
    if export_format == "pipeline":
        write_pipeline_folder(pipe.to(dtype), metadata, output)
    else:
        if export_format == "unet":  # prefixed as in a checkpoint: ComfyUI and diffusers read it
            layers = pipe.unet.config.layers_per_block
            unet = original_unet_state_dict(pipe.unet.state_dict(), layers)
            state = {UNET_PREFIX + k: v for k, v in unet.items()}
        else:
            state = single_file_state_dict(pipe)
        tensors = {k: v.detach().to(dtype).contiguous() for k, v in state.items()}
        write_safetensors_atomically(tensors, output, file_metadata(metadata, export_format))
    return {
        "output": output,
        "format": export_format,
        "dtype": str(dtype).removeprefix("torch."),
        "bytes": path_size(output),
        "metadata": metadata,
    }


def write_pipeline_folder(pipe, metadata: dict, output: str) -> None:
    """save_pretrained into a staged folder with the model card, renamed into place."""
    from erase.artifact import staged_output
    from erase.card import write_model_card

    with staged_output(output, tool="erase-export") as staging:
        pipe.save_pretrained(staging, safe_serialization=True)
        write_model_card(staging, metadata, export_format="pipeline")


def write_safetensors_atomically(tensors: dict, output: str, metadata: dict[str, str]) -> None:
    """One .safetensors file, written in a marked staging folder and renamed when complete; its
    header's `erase.format` marks it as erase-export's (--overwrite replaces only such files)."""
    from safetensors.torch import save_file

    from erase.artifact import staged_file

    with staged_file(output) as temporary:
        save_file(tensors, temporary, metadata=metadata)


def file_metadata(metadata: dict, export_format: str) -> dict[str, str]:
    """The safetensors header's string metadata: what the file is and where it comes from."""
    concept = metadata.get("concept", {})
    return {
        "format": "pt",
        "erase.format": export_format,
        "erase.base_model": str(metadata.get("base_model")),
        "erase.concept": str(concept.get("name")),
        "erase.method": str(metadata.get("method")),
        "erase.version": str(metadata.get("versions", {}).get("erase")),
    }


def path_size(path: str) -> int:
    """Bytes of a file, or of every file under a folder."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(path)
        for name in names
    )
