"""erase-export: each format read back by diffusers' own loaders gives the artifact's model."""

import json
import os
import struct

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from erase.cli.concept import erase_concept_main
from erase.cli.export import main
from erase.export import (
    original_text_encoder_state_dict,
    original_unet_state_dict,
    original_vae_state_dict,
)


@pytest.fixture(scope="module")
def artifact(tiny_sd_args, tmp_path_factory) -> str:
    """An erase-concept output on the tiny pipeline (lr high enough that the UNet changes)."""
    output = str(tmp_path_factory.mktemp("export") / "erased")
    assert erase_concept_main([*tiny_sd_args, "--lr", "1e-3", "--output", output]) == 0
    return output


def erased_pipeline(tiny_sd_dir: str, artifact: str) -> StableDiffusionPipeline:
    """The artifact used the documented way: the base pipeline with the erased UNet."""
    unet = UNet2DConditionModel.from_pretrained(artifact, subfolder="unet")
    return StableDiffusionPipeline.from_pretrained(tiny_sd_dir, unet=unet, safety_checker=None)


def image(pipe: StableDiffusionPipeline) -> torch.Tensor:
    """One image for a fixed prompt and seed."""
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        "a photo of a nude person",
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(7),
        output_type="pt",
    ).images


def same_weights(first: torch.nn.Module, second: torch.nn.Module) -> bool:
    """Identical parameter names and bit-identical values."""
    a, b = first.state_dict(), second.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_single_file_reads_back_bit_identical(artifact, tiny_sd_dir, tmp_path):
    path = str(tmp_path / "erased.safetensors")
    assert main([artifact, "--format", "single-file", "--output", path]) == 0
    loaded = StableDiffusionPipeline.from_single_file(
        path, config=tiny_sd_dir, safety_checker=None, requires_safety_checker=False
    )
    expected = erased_pipeline(tiny_sd_dir, artifact)
    for name in ("unet", "vae", "text_encoder"):
        assert same_weights(getattr(loaded, name), getattr(expected, name)), name
    assert not same_weights(loaded.unet, StableDiffusionPipeline.from_pretrained(tiny_sd_dir).unet)
    assert torch.equal(image(loaded), image(expected))


def test_unet_file_loads_into_unet2dconditionmodel(artifact, tiny_sd_dir, tmp_path):
    path = str(tmp_path / "unet.safetensors")
    assert main([artifact, "--format", "unet", "--output", path]) == 0
    unet = UNet2DConditionModel.from_single_file(path, config=tiny_sd_dir, subfolder="unet")
    assert same_weights(unet, UNet2DConditionModel.from_pretrained(artifact, subfolder="unet"))


def test_pipeline_folder_loads_alone(artifact, tiny_sd_dir, tmp_path):
    folder = str(tmp_path / "pipeline")
    assert main([artifact, "--format", "pipeline", "--output", folder]) == 0
    loaded = StableDiffusionPipeline.from_pretrained(folder)
    assert loaded.safety_checker is None
    assert torch.equal(image(loaded), image(erased_pipeline(tiny_sd_dir, artifact)))
    assert "library_name: diffusers" in open(os.path.join(folder, "README.md")).read()


def tensor_bytes(path: str) -> int:
    """Bytes of tensor data in a .safetensors file (the file minus its JSON header)."""
    with open(path, "rb") as file:
        header_length = struct.unpack("<Q", file.read(8))[0]
    return os.path.getsize(path) - 8 - header_length


def test_half_export_halves_the_size(artifact, tmp_path):
    full, half = str(tmp_path / "full.safetensors"), str(tmp_path / "half.safetensors")
    assert main([artifact, "--format", "single-file", "--output", full]) == 0
    assert main([artifact, "--format", "single-file", "--output", half, "--half"]) == 0
    assert 2 * tensor_bytes(half) == tensor_bytes(full)
    assert os.path.getsize(half) < 0.6 * os.path.getsize(full)


def test_existing_output_is_refused_and_left_intact(artifact, tmp_path, capsys):
    path = tmp_path / "taken.safetensors"
    path.write_bytes(b"mine")
    assert main([artifact, "--format", "unet", "--output", str(path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert path.read_bytes() == b"mine"
    # --overwrite replaces only a file erase-export wrote: not the user's
    assert main([artifact, "--format", "unet", "--output", str(path), "--overwrite"]) == 2
    assert "not written by erase" in capsys.readouterr().err
    assert path.read_bytes() == b"mine"
    ours = tmp_path / "ours.safetensors"
    assert main([artifact, "--format", "unet", "--output", str(ours)]) == 0
    assert main([artifact, "--format", "unet", "--output", str(ours), "--overwrite"]) == 0
    assert ours.stat().st_size > 1000 and not os.path.exists(f"{ours}.partial")


def test_not_an_artifact_is_one_line(tmp_path, capsys):
    assert (
        main([str(tmp_path), "--format", "unet", "--output", str(tmp_path / "u.safetensors")]) == 2
    )
    assert "metadata.json" in capsys.readouterr().err


def test_push_to_hub_offline_is_one_line_and_loses_nothing(artifact, tmp_path, capsys):
    before = sorted(os.listdir(artifact))
    path = str(tmp_path / "unet.safetensors")
    code = main([artifact, "--format", "unet", "--output", path, "--push-to-hub", "me/erased"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "HF_HUB_OFFLINE" in err
    assert sorted(os.listdir(artifact)) == before


def test_sd_v1_layout_matches_diffusers_converters():
    """On SD v1.x's real shapes (meta tensors, no memory), diffusers recognises the layout as v1
    and its own ldm->diffusers converters give back every key with its shape."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        infer_diffusers_model_type,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    with init_empty_weights():
        unet = UNet2DConditionModel()  # diffusers' defaults are SD v1.x's UNet
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            sample_size=512,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=77,
            )
        )
    unet_keys = original_unet_state_dict(unet.state_dict(), layers_per_block=2)
    vae_keys = original_vae_state_dict(vae.state_dict())
    text_keys = original_text_encoder_state_dict(text_encoder.state_dict())
    checkpoint = {
        **{"model.diffusion_model." + k: v for k, v in unet_keys.items()},
        **{"first_stage_model." + k: v for k, v in vae_keys.items()},
        **{"cond_stage_model.transformer." + k: v for k, v in text_keys.items()},
    }
    # An SD v1.x checkpoint holds 686 UNet, 248 VAE and 196 text-encoder weights.
    assert (len(unet_keys), len(vae_keys), len(text_keys)) == (686, 248, 196)
    assert infer_diffusers_model_type(checkpoint) == "v1"
    assert checkpoint["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    for model, back in (
        (unet, convert_ldm_unet_checkpoint(checkpoint, dict(unet.config))),
        (vae, convert_ldm_vae_checkpoint(checkpoint, dict(vae.config))),
    ):
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in back.items()} == expected


def test_header_names_the_run(artifact, tmp_path):
    from safetensors import safe_open

    path = str(tmp_path / "erased.safetensors")
    assert main([artifact, "--format", "single-file", "--output", path]) == 0
    with safe_open(path, "pt") as file:
        header = file.metadata()
    metadata = json.load(open(os.path.join(artifact, "metadata.json")))
    assert header["erase.concept"] == "nudity"
    assert header["erase.base_model"] == metadata["base_model"]
