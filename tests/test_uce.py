"""UCE through the real code path: the weights its closed form edits, and that it is the minimiser
of its objective, checked against an independent least-squares solve."""

import json

import pytest
import torch

from erase.api import run
from erase.cli.concept import build_parser, config_from_args, erase_concept_main
from erase.methods.uce import UCEConfig, is_edited
from erase.models import load_backend
from erase.testing import save_tiny_sdxl

PRESERVED = ["a photo of a cat", "a photo of a dog", "a house"]
# The tiny encoder's 16-wide embeddings are much alike: at the reference's preserve scale 1 the
# preserved keys move ~10 %; a preserve term that dominates keeps them within 1e-3.
PRESERVE_SCALE = 1e4


def erase(args, folder):
    """Run erase-concept in process; returns the ErasureResult."""
    return run(config_from_args(build_parser().parse_args([*args, "--output", str(folder)])))


def uce_args(model: str, *extra: str) -> list[str]:
    """erase-concept flags of a UCE run on a tiny model (no grid: the edit alone)."""
    return ["--model", model, "--method", "uce", "--no-grid", *extra]


def state(unet) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in unet.named_parameters()}


def last_token_embedding(pipe, text: str) -> torch.Tensor:
    """(D,) the text's embedding at its last token, straight from the pipeline's own encoder(s)
    and the tokenizer's attention mask (the reference's indexing), not through the method."""
    tokens = pipe.tokenizer(
        text, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True
    )
    last = sum(tokens["attention_mask"]) - 2
    with torch.no_grad():
        embeds = pipe.encode_prompt(
            text, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )[0]
    return embeds[0, last].double()


def least_squares(weight, pipe, erased, guides, preserved, config=None) -> torch.Tensor:
    """The (out, in) weight minimising UCE's objective, solved by torch.linalg.lstsq on the
    stacked system [sqrt(e) C_e; sqrt(p) C_p; sqrt(lambda) I] W^T = [sqrt(e) G W0^T; ...]."""
    config = config or UCEConfig()  # the reference's scales and lambda
    old = weight.double()
    erase_keys = torch.stack([last_token_embedding(pipe, t) for t in erased])
    guide_keys = torch.stack([last_token_embedding(pipe, t) for t in guides])
    rows, targets = (
        [config.uce_erase_scale**0.5 * erase_keys],
        [config.uce_erase_scale**0.5 * guide_keys @ old.T],
    )
    if preserved:
        preserve_keys = torch.stack([last_token_embedding(pipe, t) for t in preserved])
        rows.append(config.uce_preserve_scale**0.5 * preserve_keys)
        targets.append(config.uce_preserve_scale**0.5 * preserve_keys @ old.T)
    eye = torch.eye(old.shape[1], dtype=old.dtype)
    rows.append(config.uce_lambda**0.5 * eye)
    targets.append(config.uce_lambda**0.5 * old.T)
    return torch.linalg.lstsq(torch.cat(rows), torch.cat(targets)).solution.T


@pytest.fixture(scope="module")
def base(tiny_sd_dir):
    return load_backend(tiny_sd_dir)


@pytest.fixture(scope="module")
def uce_run(tiny_sd_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("uce") / "out"
    preserve = [flag for text in PRESERVED for flag in ("--uce-preserve", text)]
    scale = ["--uce-preserve-scale", str(PRESERVE_SCALE)]
    result = erase(uce_args(tiny_sd_dir, "--concept", "nudity", *preserve, *scale), folder)
    return result, folder


def test_only_cross_attention_keys_and_values_change(uce_run, base):
    result, _ = uce_run
    before, after = state(base.unet), state(result.backend.unet)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    edited = {name for name in before if "attn2.to_k" in name or "attn2.to_v" in name}
    assert changed == edited and edited


def test_each_projection_is_the_least_squares_solution(uce_run, base):
    result, _ = uce_run
    after = state(result.backend.unet)
    for name, weight in state(base.unet).items():
        if is_edited(name):
            config = UCEConfig(uce_preserve_scale=PRESERVE_SCALE)
            expected = least_squares(weight, base.pipe, ["nudity"], [""], PRESERVED, config)
            assert torch.allclose(after[name].double(), expected, atol=1e-4), name


def test_preserved_concepts_keys_and_values_barely_move(uce_run, base):
    result, _ = uce_run
    after = state(result.backend.unet)
    preserved = torch.stack([last_token_embedding(base.pipe, t) for t in PRESERVED])  # (P, D)
    for name, weight in state(base.unet).items():
        if is_edited(name):
            old, new = preserved @ weight.double().T, preserved @ after[name].double().T
            assert ((new - old).norm() / old.norm()).item() < 1e-3, name
    # while the erased concept's do move, toward the guide's
    erased = last_token_embedding(base.pipe, "nudity")
    moved = [
        (erased @ (after[n].double() - w.double()).T).norm() / (erased @ w.double().T).norm()
        for n, w in state(base.unet).items()
        if is_edited(n)
    ]
    assert min(moved) > 0.1


def test_several_concepts_are_one_joint_solve(tiny_sd_dir, base, tmp_path):
    args = uce_args(tiny_sd_dir, "--concept", "nudity", "--concept", "church")
    result = erase(args, tmp_path / "out")
    after = state(result.backend.unet)
    church = result.metadata["edit_result"]["erased"][1]
    assert result.metadata["edit_result"]["erased"] == ["nudity", church]
    for name, weight in state(base.unet).items():
        if is_edited(name):
            joint = least_squares(weight, base.pipe, ["nudity", church], ["", ""], [])
            assert torch.allclose(after[name].double(), joint, atol=1e-4), name


def test_metadata_says_closed_form_with_its_seconds_and_no_data(uce_run):
    _, folder = uce_run
    metadata = json.loads((folder / "metadata.json").read_text())
    assert metadata["closed_form"] is True and metadata["edit_s"] >= 0
    assert "edit" in metadata["timings_s"]
    assert not {"data", "mask", "train"} & metadata["timings_s"].keys()
    assert metadata["train_config"] is None and metadata["data_source"].startswith("none")
    assert metadata["method_config"]["uce_preserve"] == PRESERVED
    assert metadata["changed_weights"] > 0


def test_sdxl_edits_what_both_text_encoders_feed(tmp_path):
    model = save_tiny_sdxl(str(tmp_path / "sdxl"))
    base = load_backend(model)
    result = erase(uce_args(model, "--concept", "nudity"), tmp_path / "out")
    width = base.pipe.text_encoder.config.hidden_size  # the first encoder's columns come first
    after = state(result.backend.unet)
    edited = [name for name in after if is_edited(name)]
    assert edited
    for name, weight in state(base.unet).items():
        if is_edited(name):
            change = after[name] - weight
            assert change[:, :width].abs().max() > 0 and change[:, width:].abs().max() > 0
            expected = least_squares(weight, base.pipe, ["nudity"], [""], [])
            assert torch.allclose(after[name].double(), expected, atol=1e-4), name


def test_a_class_conditional_model_is_refused_in_one_line(tmp_path, capsys):
    output = tmp_path / "out"
    argv = ["--model", "ddpm-digits", "--concept", "3", "--method", "uce", "--output", str(output)]
    assert erase_concept_main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "class-conditional" in error
    assert not output.exists() and not any(tmp_path.iterdir())


def test_erase_bench_runs_uce_beside_a_trained_method(tiny_sd_dir, tmp_path, monkeypatch):
    from erase.cli.bench import main as bench_main

    monkeypatch.setattr("erase.methods.esd.SAMPLING_STEPS", 5)  # ESD's x_t: no test needs 50

    output = tmp_path / "bench"
    argv = ["--model", tiny_sd_dir, "--concept", "nudity", "--methods", "uce,esd-x"]
    argv += ["--output", str(output), "--steps", "1", "--bench-per-prompt", "1"]
    argv += ["--bench-steps", "2", "--bench-clip", "none"]
    assert bench_main(argv) == 0
    rows = {row["method"]: row for row in json.loads((output / "bench.json").read_text())["rows"]}
    assert "error" not in rows["uce"] and rows["uce"]["changed_weights"] > 0
    assert rows["uce"]["edit_s"] >= 0 and rows["uce"]["train_s"] is None
    assert rows["esd-x"]["train_s"] >= 0 and rows["esd-x"]["edit_s"] is None


def test_the_model_card_says_nothing_was_trained(uce_run):
    _, folder = uce_run
    card = (folder / "README.md").read_text()
    assert "UCE (unified concept editing" in card and "none: a closed-form edit" in card
