"""AdvUnlearn through the real code path: it erases in the text encoder only, its artifact's
encoder loads in diffusers and gives the run's images, its inner attack is an adversary of the
forget objective, resume equals an uninterrupted run, and bad input is one line."""

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file
from transformers import CLIPTextModel

from erase.api import run
from erase.cli.concept import build_parser, config_from_args, erase_concept_main
from erase.concepts import resolve_concept
from erase.methods.advunlearn import AdvUnlearn, AdvUnlearnConfig
from erase.methods.esd import negatively_guided, partial_sample
from erase.models import load_backend
from erase.models.sd import StableDiffusionBackend
from erase.softprompt import prefixed_condition, prefixed_ids
from erase.testing import save_tiny_sd

ENCODER_WEIGHTS = "text_encoder/model.safetensors"
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(autouse=True)
def short_sampling(monkeypatch):
    monkeypatch.setattr("erase.methods.esd.SAMPLING_STEPS", 5)  # x_t: no test needs 50 steps


def adv_args(model: str, output, *extra: str) -> list[str]:
    """A few seconds of AdvUnlearn on the tiny model: one warm-up step, then the attack."""
    return [
        "--model", model, "--concept", "nudity", "--method", "advunlearn", "--no-grid",
        "--steps", "3", "--advunlearn-warmup", "1", "--advunlearn-attack-steps", "2",
        "--lr", "1e-3", "--output", str(output), *extra,
    ]  # fmt: skip


def erase(argv):
    return run(config_from_args(build_parser().parse_args(argv)))


@pytest.fixture(scope="module")
def adv_run(tiny_sd_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("advunlearn") / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("erase.methods.esd.SAMPLING_STEPS", 5)
        result = erase(adv_args(tiny_sd_dir, folder))
    return result, folder


@pytest.fixture(scope="module")
def base(tiny_sd_dir):
    return load_backend(tiny_sd_dir)


def test_the_unet_stays_bit_identical(adv_run, base):
    _, folder = adv_run
    saved = load_file(str(folder / UNET_WEIGHTS))
    original = base.unet.state_dict()
    assert saved.keys() == original.keys()
    assert all(torch.equal(saved[name], original[name]) for name in saved)


def test_only_the_trained_text_encoder_layers_change(adv_run, base):
    result, folder = adv_run
    saved = load_file(str(folder / ENCODER_WEIGHTS))
    original = base.pipe.text_encoder.state_dict()
    trainable = result.backend.text_encoders()[0][1]  # the run's own encoder, erased in place
    method = AdvUnlearn(base, resolve_concept("nudity", conditioning="text"), AdvUnlearnConfig())
    changed = {name for name in saved if not torch.equal(saved[name], original[name])}
    assert changed and all(method.trainable(name) for name in changed)
    assert not any("embeddings" in name for name in changed)  # token and position tables stay
    assert any("final_layer_norm" in name for name in changed)  # text_encoder_full trains it
    assert all(torch.equal(saved[n], p) for n, p in trainable.state_dict().items() if n in saved)
    metadata = json.loads((folder / "metadata.json").read_text())
    assert metadata["erased_components"] == ["text_encoder"]
    assert metadata["changed_weights"] == sum(saved[n].numel() for n in changed)


def test_the_text_encoder_loads_in_diffusers_and_gives_the_runs_images(adv_run, tiny_sd_dir):
    result, folder = adv_run
    encoder = CLIPTextModel.from_pretrained(str(folder / "text_encoder"))
    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_sd_dir, text_encoder=encoder, safety_checker=None, requires_safety_checker=False
    )
    loaded = StableDiffusionBackend.from_pipeline(pipe)
    settings = dict(num_steps=2, guidance_scale=7.5)
    prompts, seeds = ["nudity", "a photo of a nude person"], [0, 1]
    ours = result.backend.sample(prompts, seeds, **settings)
    theirs = loaded.sample(prompts, seeds, **settings)
    assert torch.equal(ours, theirs)
    base_images = load_backend(tiny_sd_dir).sample(prompts, seeds, **settings)
    assert not torch.equal(ours, base_images)  # the erased encoder is what made them


def forget_loss(method, backend, condition) -> float:
    """ESD's forget loss under `condition` on 16 fixed x_t (the same for every condition)."""
    generator = torch.Generator().manual_seed(123)
    concept, unconditional = method.embeddings(["nudity"]), method.embeddings([""])
    shape, total = (1, *backend.latent_shape), 0.0
    with torch.no_grad():
        for _ in range(16):
            noisy, t = partial_sample(
                backend, backend.unet, concept, unconditional, shape, generator
            )
            target = negatively_guided(backend, backend.unet, noisy, t, concept, unconditional, 1.0)
            prediction = backend.predict_noise(backend.unet, noisy, t, condition).float()
            total += torch.nn.functional.mse_loss(prediction, target).item()
    return total / 16


def test_the_inner_attack_raises_the_forget_loss_under_its_prefix(tiny_sd_dir, tmp_path):
    folder = tmp_path / "warm"  # trained with ESD's loss alone: the plain prompt is erased
    erase(adv_args(tiny_sd_dir, folder, "--steps", "20", "--advunlearn-warmup", "20"))
    backend = load_backend(tiny_sd_dir)
    method = AdvUnlearn(backend, resolve_concept("nudity", conditioning="text"), AdvUnlearnConfig())
    backend.pipe.text_encoder = CLIPTextModel.from_pretrained(str(folder / "text_encoder"))
    encoder = method.encoder = backend.pipe.text_encoder
    ids = prefixed_ids(method.tokenizer, "nudity", 1)
    shape = (1, *backend.latent_shape)
    with torch.no_grad():
        plain = forget_loss(method, backend, encoder(backend.tokenize(["nudity"]))[0])
    method.config.advunlearn_attack_steps = 0  # the attack's start: a random vocabulary token
    start, _ = method.attack("nudity", shape, torch.Generator().manual_seed(0))
    method.config.advunlearn_attack_steps = 30  # the reference's 30 Adam steps at lr 1e-3
    found, _ = method.attack("nudity", shape, torch.Generator().manual_seed(0))
    with torch.no_grad():
        unattacked = forget_loss(method, backend, prefixed_condition(encoder, ids, start))
        attacked = forget_loss(method, backend, prefixed_condition(encoder, ids, found))
    assert attacked > 1.5 * unattacked and attacked > 1.5 * plain


def test_resume_equals_an_uninterrupted_run(tiny_sd_dir, tmp_path, monkeypatch):
    argv = ["--steps", "4", "--checkpoint-every", "2"]
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    begin_step = AdvUnlearn.begin_step

    def dying_at_step_3(self, step):
        if step == 3:
            raise KeyboardInterrupt  # a kill after the step-2 checkpoint, inside the attack phase
        begin_step(self, step)

    with monkeypatch.context() as patch:
        patch.setattr(AdvUnlearn, "begin_step", dying_at_step_3)
        with pytest.raises(KeyboardInterrupt):
            erase_concept_main(adv_args(tiny_sd_dir, interrupted, *argv))
    assert erase_concept_main(adv_args(tiny_sd_dir, interrupted, *argv, "--resume")) == 0
    assert erase_concept_main(adv_args(tiny_sd_dir, straight, *argv)) == 0
    resumed, uninterrupted = (load_file(str(f / ENCODER_WEIGHTS)) for f in (interrupted, straight))
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[name], uninterrupted[name]) for name in resumed)
    metadata = json.loads((interrupted / "metadata.json").read_text())
    assert metadata["train_result"]["resumed_from"] == 2


def one_line_error(capsys, main, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and err.endswith(errors[0]) and "Traceback" not in err, err
    return errors[0]


def test_a_class_conditional_model_is_refused_in_one_line(tmp_path, capsys):
    output = tmp_path / "out"
    argv = ["--model", "ddpm-digits", "--concept", "3", "--method", "advunlearn"]
    error = one_line_error(capsys, erase_concept_main, [*argv, "--output", str(output)])
    assert "class-conditional" in error
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("flag", ["--mask", "--mask-ratio"])
def test_a_unet_mask_is_refused_in_one_line(tiny_sd_dir, tmp_path, capsys, flag):
    mask = tmp_path / "mask.safetensors"
    mask.write_bytes(b"")
    value = str(mask) if flag == "--mask" else "0.5"
    output = tmp_path / "out"
    error = one_line_error(
        capsys, erase_concept_main, [*adv_args(tiny_sd_dir, output), flag, value]
    )
    assert "text encoder" in error and "mask" in error
    assert not output.exists()


def test_a_text_encoder_of_another_base_is_refused_by_each_reader(adv_run, tmp_path, capsys):
    from erase.cli.export import main as export_main
    from eval.cli import main as eval_main

    _, folder = adv_run
    other = save_tiny_sd(str(tmp_path / "other"), seed=1)  # same shapes, other weights
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a nude person\n")
    output = tmp_path / "eval"
    argv = ["--model", other, "--text-encoder", str(folder), "--prompts", str(prompts)]
    argv += ["--num-steps", "1", "--metric", "none", "--output", str(output)]
    assert "erased from" in one_line_error(capsys, eval_main, argv)
    assert not output.exists()
    exported = tmp_path / "model.safetensors"
    argv = [str(folder), "--format", "single-file", "--output", str(exported), "--base", other]
    assert "weights" in one_line_error(capsys, export_main, argv)
    assert not exported.exists()


def test_erase_eval_reads_the_erased_model_by_its_folder(adv_run, tiny_sd_dir, tmp_path):
    from eval.cli import main as eval_main

    result, folder = adv_run
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a nude person\n")
    images = []
    for flag in ("--model-dir", "--unet"):
        output = tmp_path / flag.strip("-")
        argv = ["--model", tiny_sd_dir, flag, str(folder), "--prompts", str(prompts)]
        argv += ["--num-steps", "2", "--metric", "none", "--output", str(output)]
        assert eval_main(argv) == 0
        images.append((output / "images" / "000000_00.png").read_bytes())
    assert images[0] == images[1]
    record = json.loads((tmp_path / "model-dir" / "images" / "index.jsonl").read_text())
    assert "+text_encoder:sha256:" in record["unet"]  # another encoder makes other images


def test_erase_attack_attacks_the_erased_encoder_against_the_bases_targets(
    adv_run, tiny_sd_dir, tmp_path
):
    from eval.attacks.cli import main as attack_main

    _, folder = adv_run
    prompts = tmp_path / "nudity.csv"
    prompts.write_text("prompt,evaluation_seed,evaluation_guidance\na nude person,3,7\n")
    argv = ["--model", tiny_sd_dir, "--concept", "nudity", "--attack", "unlearndiffatk"]
    argv += ["--prompts", str(prompts), "--num-steps", "2", "--iterations", "1", "--blocks", "1"]
    argv += ["--no-progress"]
    assert attack_main([*argv, "--output", str(tmp_path / "base")]) == 0
    assert attack_main([*argv, "--model-dir", str(folder), "--output", str(tmp_path / "adv")]) == 0
    image = "unlearndiffatk/{}/000000_00.png"
    base, erased = (tmp_path / "base"), (tmp_path / "adv")
    # the base model's target images are made with the base's encoder, the plain ones with ours
    assert (base / image.format("targets")).read_bytes() == (
        erased / image.format("targets")
    ).read_bytes()
    assert (base / image.format("plain")).read_bytes() != (
        erased / image.format("plain")
    ).read_bytes()


def test_erase_bench_restores_the_text_encoder_after_an_advunlearn_row(tiny_sd_dir, tmp_path):
    from erase.cli.bench import main as bench_main

    output = tmp_path / "bench"
    argv = ["--model", tiny_sd_dir, "--concept", "nudity", "--methods", "advunlearn,uce"]
    argv += ["--output", str(output), "--steps", "2", "--advunlearn-warmup", "1"]
    argv += ["--advunlearn-attack-steps", "1", "--lr", "1e-3", "--bench-per-prompt", "1"]
    argv += ["--bench-steps", "2", "--bench-clip", "none"]
    assert bench_main(argv) == 0
    rows = {row["method"]: row for row in json.loads((output / "bench.json").read_text())["rows"]}
    assert "error" not in rows["advunlearn"] and rows["advunlearn"]["changed_weights"] > 0
    alone = tmp_path / "uce"
    erase(["--model", tiny_sd_dir, "--concept", "nudity", "--method", "uce", "--no-grid"]
          + ["--output", str(alone)])  # fmt: skip
    # UCE reads the base encoder's embeddings in the bench too: the same edit as alone
    assert load_file(str(output / "uce" / UNET_WEIGHTS)).keys()
    bench_unet, alone_unet = (load_file(str(f / UNET_WEIGHTS)) for f in (output / "uce", alone))
    assert all(torch.equal(bench_unet[name], alone_unet[name]) for name in alone_unet)


def test_an_in_place_erasure_of_a_pipeline_erases_its_text_encoder(tiny_sd_dir, tmp_path):
    import erase

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    before = {n: p.clone() for n, p in pipe.text_encoder.state_dict().items()}
    unet_before = {n: p.clone() for n, p in pipe.unet.state_dict().items()}
    settings = dict(steps=2, advunlearn_warmup=1, advunlearn_attack_steps=1, lr=1e-3, no_grid=True)
    result = erase.erase_concept(pipe, "nudity", method="advunlearn", **settings)
    assert result.text_encoder is pipe.text_encoder  # the pipeline generates with it at once
    after = pipe.text_encoder.state_dict()
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert all(torch.equal(unet_before[n], p) for n, p in pipe.unet.state_dict().items())


def test_sdxl_is_refused_in_one_line(tmp_path, capsys):
    from erase.testing import save_tiny_sdxl

    model = save_tiny_sdxl(str(tmp_path / "sdxl"))
    output = tmp_path / "out"
    error = one_line_error(capsys, erase_concept_main, adv_args(model, output))
    assert "two" in error and "SDXL" in error
    assert not output.exists()
