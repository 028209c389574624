"""Forget-Me-Not through the real code path: attention on the concept's tokens goes down."""

import json
from types import SimpleNamespace

import pytest
import torch

from erase.api import run
from erase.cli.concept import build_parser, config_from_args, erase_concept_main
from erase.concepts import resolve_concept
from erase.errors import EraseError
from erase.methods import get_method, noised
from erase.methods.fmn import (
    OBJECT_TEMPLATE,
    AttentionRecorder,
    FMNConfig,
    learn_concept_tokens,
    recording_attention,
)
from erase.models import load_backend
from erase.models.base import Batch

PROMPT = "a photo of a nude person"


def erase(args, folder):
    """Run erase-concept in process; returns the ErasureResult."""
    return run(config_from_args(build_parser().parse_args([*args, "--output", str(folder)])))


@pytest.fixture(scope="module")
def backend(tiny_sd_dir):
    return load_backend(tiny_sd_dir)


@pytest.fixture(scope="module")
def fmn(backend):
    concept = resolve_concept("nudity", conditioning="text")
    return get_method("fmn")(backend, concept, FMNConfig(fmn_ti_steps=0))  # steers the word


@pytest.fixture(scope="module")
def forget_batch(backend):
    latents = torch.randn(4, *backend.latent_shape, generator=torch.Generator().manual_seed(1))
    return Batch(latents, [PROMPT] * 4)


def test_fmn_lowers_attention_on_concept_tokens(backend, fmn, forget_batch, tiny_sd_args, tmp_path):
    before = fmn.attention_mass(backend.unet, forget_batch, torch.Generator().manual_seed(0))
    args = [
        *tiny_sd_args,
        "--method",
        "fmn",
        "--lr",
        "1e-2",
        "--steps",
        "10",
        "--fmn-ti-steps",
        "0",
    ]
    erased_unet = erase(args, tmp_path / "out").backend.unet
    after = fmn.attention_mass(erased_unet, forget_batch, torch.Generator().manual_seed(0))
    assert after < 0.5 * before


def test_fmn_writes_a_plain_loadable_unet(tiny_sd_dir, tiny_sd_args, tmp_path):
    result = erase([*tiny_sd_args, "--method", "fmn", "--fmn-ti-steps", "2"], tmp_path / "out")
    processors = {type(p).__name__ for p in result.backend.unet.attn_processors.values()}
    assert "RecordingAttnProcessor" not in processors
    loaded = load_backend(tiny_sd_dir).load_unet(str(tmp_path / "out"))
    for name, param in result.backend.unet.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], param), name


def test_fmn_cross_attention_only_changes_only_attn2(tiny_sd_dir, tiny_sd_args, tmp_path):
    base = load_backend(tiny_sd_dir).unet.state_dict()
    args = [*tiny_sd_args, "--method", "fmn", "--fmn-cross-attention-only", "--lr", "1e-3"]
    args += ["--fmn-ti-steps", "2"]
    result = erase(args, tmp_path / "out")
    changed = {n for n, p in result.backend.unet.named_parameters() if not torch.equal(p, base[n])}
    assert changed
    assert all("attn2" in name for name in changed), changed
    assert result.metadata["method_config"]["fmn_cross_attention_only"] is True


def test_recording_processor_computes_the_same_attention(backend, fmn, forget_batch):
    noisy, timesteps = forget_batch.latents, torch.full((4,), 500)
    cond = backend.encode(forget_batch.conditions)
    with torch.no_grad():
        plain = backend.predict_noise(backend.unet, noisy, timesteps, cond)
        recorder = AttentionRecorder(fmn.concept_positions(forget_batch.conditions, cond.shape[1]))
        with recording_attention(backend.unet, recorder):
            recorded = backend.predict_noise(backend.unet, noisy, timesteps, cond)
    assert len(recorder.masses) == sum(n.endswith("attn2") for n, _ in backend.unet.named_modules())
    torch.testing.assert_close(recorded, plain, rtol=1e-4, atol=1e-5)


def test_loss_call_restores_the_attention_processors(backend, fmn, forget_batch):
    before = {name: type(p) for name, p in backend.unet.attn_processors.items()}
    fmn.loss(backend.unet, forget_batch, forget_batch, torch.Generator().manual_seed(0))
    assert {name: type(p) for name, p in backend.unet.attn_processors.items()} == before


def test_concept_positions_are_the_word_and_every_end_of_text(backend, fmn):
    # A v1.x-style tokenizer pads with the end-of-text token: the reference's use_pooler marks
    # the end of the text and every padding position after it.
    tokenizer = backend.pipe.tokenizer
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    positions = fmn.concept_positions([PROMPT], 16)[0]
    end = backend.end_of_text_position(PROMPT)
    expected = set(backend.token_positions(PROMPT, ["nude"])) | set(range(end, 16))
    assert set(positions.nonzero().flatten().tolist()) == expected
    assert len(expected) == 1 + 16 - end and 16 - end > 1


def test_ti_stage_is_on_by_default_with_four_tokens():
    config = FMNConfig()  # reference attn.yaml use_ti: true; ti.yaml <s1>|<s2>|<s3>|<s4>, 500 steps
    assert (config.fmn_ti_steps, config.fmn_ti_tokens) == (500, 4)


def test_recorder_reads_each_sample_at_its_own_positions():
    # Two samples, two heads, one query, three tokens; sample 0 marks token 0, sample 1 token 2.
    positions = torch.tensor([[True, False, False], [False, False, True]])
    recorder = AttentionRecorder(positions)
    probs = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    recorder.record(probs[:, None, :], heads=2)  # (B * heads, Q, L), batch-major
    assert recorder.mass() == pytest.approx(0.75)
    assert recorder.loss().item() == pytest.approx((2 * 0.25 + 2 * 1.0) ** 0.5)


def test_fmn_on_a_class_backend_is_an_error():
    backend = SimpleNamespace(conditioning="class")
    concept = resolve_concept("1", conditioning="class", class_names=["zero", "one"])
    with pytest.raises(EraseError, match="class-conditional"):
        get_method("fmn")(backend, concept, FMNConfig())


def denoising_loss_with(backend, latents, snippet) -> float:
    """Denoising loss of the concept images under a prompt holding `snippet`, at fixed noise."""
    prompts = [OBJECT_TEMPLATE.format(snippet)] * len(latents)
    noise, timesteps, noisy = noised(
        backend, Batch(latents, prompts), torch.Generator().manual_seed(5)
    )
    with torch.no_grad():
        prediction = backend.predict_noise(backend.unet, noisy, timesteps, backend.encode(prompts))
    return torch.nn.functional.mse_loss(prediction, noise).item()


def test_textual_inversion_lowers_the_denoising_loss(tiny_sd_dir):
    backend = load_backend(tiny_sd_dir)
    latents = torch.randn(2, *backend.latent_shape, generator=torch.Generator().manual_seed(0))
    learn = learn_concept_tokens  # (backend, latents, template, words, tokens, steps, generator)
    initial = learn(backend, latents, OBJECT_TEMPLATE, ["nude"], 4, 0, torch.Generator())
    learned = learn(backend, latents, OBJECT_TEMPLATE, ["nude"], 4, 30, torch.Generator())
    assert len(learned.split()) == 4
    repeated = latents.repeat(8, 1, 1, 1)
    assert denoising_loss_with(backend, repeated, learned) < denoising_loss_with(
        backend, repeated, initial
    )


def test_ti_stage_steers_attention_from_the_learned_tokens(tiny_sd_dir, forget_batch):
    backend = load_backend(tiny_sd_dir)
    concept = resolve_concept("nudity", conditioning="text")
    method = get_method("fmn")(backend, concept, FMNConfig(fmn_ti_steps=2))
    method.prepare(forget_batch.latents, forget_batch.conditions, torch.Generator())
    prompts, words = method.steered([PROMPT])
    (snippet,) = method.concept_tokens
    assert prompts == [f"a photo of a {snippet} person"] and "nude" not in prompts[0]
    positions = method.concept_positions(prompts, 16, words)[0].nonzero().flatten().tolist()
    ids = backend.tokenize(prompts)[0].tolist()
    token_ids = backend.pipe.tokenizer.convert_tokens_to_ids(snippet.split())
    token_positions = [ids.index(token_id) for token_id in token_ids]
    start = backend.token_positions(PROMPT, ["nude"])[0]  # where "nude" was
    assert token_positions == [start, start + 1, start + 2, start + 3]
    end = ids.index(backend.pipe.tokenizer.eos_token_id)
    assert positions == token_positions + list(range(end, 16))


def test_ti_steps_without_prepare_is_an_error(backend, forget_batch):
    concept = resolve_concept("nudity", conditioning="text")
    method = get_method("fmn")(backend, concept, FMNConfig(fmn_ti_steps=2))
    with pytest.raises(EraseError, match="--fmn-ti-steps"):
        method.loss(backend.unet, forget_batch, forget_batch, torch.Generator())


def test_fmn_with_ti_stage_through_the_cli(tiny_sd_args, tmp_path):
    args = [*tiny_sd_args, "--method", "fmn", "--fmn-ti-steps", "3"]
    assert erase_concept_main([*args, "--output", str(tmp_path / "out")]) == 0
    metadata = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert metadata["method_config"]["fmn_ti_steps"] == 3


def test_fmn_needs_the_concept_word_in_its_prompts(backend):
    concept = resolve_concept(
        "cat", conditioning="text", forget_prompts=["a photo of a dog"], retain_prompts=["a photo"]
    )
    with pytest.raises(EraseError, match="forget-prompt"):
        get_method("fmn")(backend, concept, FMNConfig())


def test_several_concepts_get_their_own_tokens(tiny_sd_dir):
    from erase.concepts import union

    backend = load_backend(tiny_sd_dir)
    nudity = resolve_concept("nudity", conditioning="text")
    church = resolve_concept("church", conditioning="text")
    method = get_method("fmn")(backend, union([nudity, church]), FMNConfig(fmn_ti_steps=1))
    prompts = [PROMPT, "an image of a church"]
    latents = torch.randn(2, *backend.latent_shape, generator=torch.Generator().manual_seed(0))
    method.prepare(latents, prompts, torch.Generator())
    nude_tokens, church_tokens = method.concept_tokens
    steered, words = method.steered(prompts)
    assert steered == [f"a photo of a {nude_tokens} person", f"an image of a {church_tokens}"]
    assert words == nude_tokens.split() + church_tokens.split() and len(words) == 8


def test_fmn_leaves_a_shared_pipeline_its_own_vocabulary(tiny_sd_dir, monkeypatch):
    """FMN's textual inversion adds tokens to learn the concept; an in-place erasure (the API's,
    each erase-bench row) gives the pipeline back without them, so a later method that trains or
    saves the text encoder (AdvUnlearn) sees the model's own vocabulary."""
    from diffusers import StableDiffusionPipeline

    import erase as api
    import erase.methods.fmn as fmn_module

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    rows, words = pipe.text_encoder.get_input_embeddings().weight.shape[0], len(pipe.tokenizer)
    before = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    ids = pipe.tokenizer("a nude person").input_ids
    text = pipe.tokenizer.decode(ids)
    added = []
    original = fmn_module.learn_concept_tokens

    def learning(backend, *args, **kwargs):
        snippet = original(backend, *args, **kwargs)
        added.append(len(backend.pipe.tokenizer) - words)
        return snippet

    monkeypatch.setattr(fmn_module, "learn_concept_tokens", learning)
    api.erase_concept(
        pipe, "nudity", method="fmn", steps=1, fmn_ti_steps=2, num_forget=2, num_retain=2,
        gen_steps=2, no_grid=True,
    )  # fmt: skip
    assert added == [4]  # the tokens were there for training
    assert len(pipe.tokenizer) == words
    assert pipe.tokenizer.decode(ids) == text  # the same tokenizer, decoding as before
    embeddings = pipe.text_encoder.get_input_embeddings().weight
    assert embeddings.shape[0] == rows and pipe.text_encoder.config.vocab_size == rows
    assert torch.equal(embeddings, before) and not embeddings.requires_grad
