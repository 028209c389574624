"""The SDXL backend on a tiny SDXL built in code: every method through erase-concept, the saved
UNet in diffusers' StableDiffusionXLPipeline, generation by erase-eval, erase-bench and attacks."""

import json

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import save_file

from erase.api import load_model, run
from erase.cli.concept import build_parser, config_from_args, erase_concept_main
from erase.errors import EraseError
from erase.methods.fmn import OBJECT_TEMPLATE, learn_concept_tokens
from erase.models import load_backend
from erase.models.sdxl import StableDiffusionXLBackend, unpack_condition
from erase.testing import save_tiny_sdxl, tiny_sdxl_pipeline

METHODS = ["salun", "esd-x", "esd-x-strict", "esd-u", "esd-selfattn", "esd-full", "fmn"]


@pytest.fixture(scope="module")
def tiny_sdxl_dir(tmp_path_factory) -> str:
    """The tiny random SDXL pipeline saved as a diffusers folder."""
    return save_tiny_sdxl(str(tmp_path_factory.mktemp("tiny-sdxl") / "pipeline"))


@pytest.fixture(scope="module")
def sdxl_args(tiny_sdxl_dir) -> list[str]:
    """erase-concept flags for a seconds-long run on the tiny SDXL."""
    argv = ["--model", tiny_sdxl_dir, "--concept", "nudity", "--steps", "2", "--no-grid"]
    return argv + ["--num-forget", "2", "--num-retain", "2", "--gen-steps", "2"]


@pytest.fixture(scope="module")
def salun_run(sdxl_args, tmp_path_factory):
    output = tmp_path_factory.mktemp("sdxl-salun") / "out"
    args = build_parser().parse_args([*sdxl_args, "--lr", "1e-3", "--output", str(output)])
    return run(config_from_args(args)), output


def test_a_folder_of_an_xl_pipeline_loads_the_sdxl_backend(tiny_sdxl_dir):
    backend = load_backend(tiny_sdxl_dir)
    assert isinstance(backend, StableDiffusionXLBackend)
    assert backend.resolution == 16 and backend.guidance_scale == 5.0


def test_conditions_are_the_pipelines_own_prompt_embeddings(tiny_sdxl_dir):
    backend = load_backend(tiny_sdxl_dir)
    prompts = ["a photo of a cat", "a nude person"]
    prompt_embeds, pooled = unpack_condition(backend.encode(prompts), backend.pooled_width)
    with torch.no_grad():
        expected = backend.pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    assert torch.equal(prompt_embeds, expected[0]) and torch.equal(pooled, expected[2])
    # SDXL base guides against zeros, not the empty prompt (force_zeros_for_empty_prompt)
    assert not backend.unconditional(2).any()


@pytest.mark.parametrize("method", METHODS)
def test_every_method_writes_a_loadable_artifact(sdxl_args, method, tmp_path):
    output = tmp_path / "out"
    argv = [*sdxl_args, "--method", method, "--steps", "1", "--output", str(output)]
    if method == "fmn":
        argv += ["--fmn-ti-steps", "2"]  # the textual-inversion stage learns in both encoders
    assert erase_concept_main(argv) == 0
    metadata = json.loads((output / "metadata.json").read_text())
    assert metadata["method"] == method and metadata["changed_weights"] > 0
    unet = UNet2DConditionModel.from_pretrained(str(output), subfolder="unet")
    assert unet.config.addition_embed_type == "text_time"


def test_the_saved_unet_drops_into_the_sdxl_pipeline(salun_run, tiny_sdxl_dir):
    result, output = salun_run
    reloaded = UNet2DConditionModel.from_pretrained(str(output), subfolder="unet")
    backend = result.backend
    latents = torch.randn(2, *backend.latent_shape, generator=torch.Generator().manual_seed(0))
    cond, timesteps = backend.encode(["a nude person", "a cat"]), torch.tensor([10, 500])
    with torch.no_grad():
        expected = backend.predict_noise(backend.unet, latents, timesteps, cond)
        actual = backend.predict_noise(reloaded, latents, timesteps, cond)
    assert torch.equal(expected, actual)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, unet=reloaded)
    images = pipe("a photo of a nude person", num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 16, 16, 3)


def forget_distance(backend, latents, seed=0) -> float:
    """Mean distance between the predictions under the forget and the remap prompt, fixed noise."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, 1000, (len(latents),), generator=generator)
    noisy = backend.noise_scheduler.add_noise(latents, noise, timesteps)
    predictions = []
    for prompt in ("a photo of a nude person", "a photo of a person wearing clothes"):
        with torch.no_grad():
            cond = backend.encode([prompt] * len(latents))
            predictions.append(backend.predict_noise(backend.unet, noisy, timesteps, cond))
    return torch.nn.functional.mse_loss(*predictions).item()


def test_the_sdxl_forget_term_falls_after_salun_steps(tiny_sdxl_dir, sdxl_args, tmp_path):
    backend = load_backend(tiny_sdxl_dir)
    latents = torch.randn(8, *backend.latent_shape, generator=torch.Generator().manual_seed(1))
    before = forget_distance(backend, latents)
    argv = [*sdxl_args, "--steps", "40", "--lr", "1e-3", "--num-forget", "4"]
    result = run(
        config_from_args(build_parser().parse_args([*argv, "--output", str(tmp_path / "o")]))
    )
    assert forget_distance(result.backend, latents) < 0.5 * before


def test_textual_inversion_learns_the_tokens_in_both_text_encoders(tiny_sdxl_dir):
    backend = load_backend(tiny_sdxl_dir)
    latents = torch.randn(2, *backend.latent_shape, generator=torch.Generator().manual_seed(0))
    snippet = learn_concept_tokens(
        backend, latents, OBJECT_TEMPLATE, ["nude"], 2, 5, torch.Generator().manual_seed(0)
    )
    for tokenizer, encoder in backend.text_encoders():
        table = encoder.get_input_embeddings().weight
        first = tokenizer.convert_tokens_to_ids(snippet.split()[0])
        word = tokenizer("nude", add_special_tokens=False).input_ids[0]
        assert first != tokenizer.unk_token_id
        assert not torch.allclose(table[first], table[word])  # moved from its start, the word


def test_erase_eval_generates_with_the_tiny_sdxl(tiny_sdxl_dir, tmp_path):
    from eval.cli import main

    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt,evaluation_seed\na photo of a cat,3\na nude person,5\n")
    output = tmp_path / "eval"
    argv = ["--model", tiny_sdxl_dir, "--prompts", str(prompts), "--num-steps", "2"]
    assert main([*argv, "--metric", "none", "--output", str(output), "--no-progress"]) == 0
    results = json.loads((output / "results.json").read_text())
    assert results["generation"]["generated"] == 2


def test_erase_bench_and_attacks_generate_with_the_tiny_sdxl(tiny_sdxl_dir, tmp_path):
    from erase.cli.bench import main as bench_main

    prompts = tmp_path / "nudity.txt"
    prompts.write_text("a nude person\n")
    output = tmp_path / "bench"
    flags = f"--prompts {prompts} --num-steps 2 --relearn-steps 0,2"
    argv = ["--model", tiny_sdxl_dir, "--concept", "nudity", "--methods", "salun"]
    argv += ["--output", str(output), "--steps", "2", "--num-forget", "2", "--num-retain", "2"]
    argv += ["--gen-steps", "2", "--bench-per-prompt", "1", "--bench-steps", "2"]
    argv += ["--bench-clip", "none", "--attacks", "prompts,relearn"]
    argv += [f"--attack-flags={flags} --relearn-images 2 --relearn-batch-size 2"]
    assert bench_main(argv) == 0
    rows = json.loads((output / "bench.json").read_text())["rows"]
    assert [row["method"] for row in rows] == ["base", "salun"]
    assert all(row["relearn_curve"].startswith("0:") for row in rows)


def test_a_single_file_with_sdxl_weights_is_loaded_as_sdxl(tmp_path):
    checkpoint = str(tmp_path / "model.safetensors")
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.ones(2)}, checkpoint)
    with pytest.raises(EraseError, match="StableDiffusionXLPipeline"):
        load_backend(checkpoint)


def test_the_api_takes_an_sdxl_pipeline_in_memory():
    backend = load_model(tiny_sdxl_pipeline(), device=torch.device("cpu"))
    assert isinstance(backend, StableDiffusionXLBackend)


def test_export_of_sdxl_is_a_pipeline_folder_only(salun_run, tmp_path):
    from erase.export import export_artifact

    _, output = salun_run
    with pytest.raises(EraseError, match="--format pipeline"):
        export_artifact(str(output), "single-file", str(tmp_path / "x.safetensors"))
