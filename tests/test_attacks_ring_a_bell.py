"""Ring-A-Bell on the tiny pipeline: the concept vector, the seeded search, resume, errors."""

import json

import pytest
import torch

from eval.attacks import ring_a_bell
from eval.attacks.cli import main
from eval.attacks.target import AttackTarget
from eval.runner import GenerationConfig
from prompts import PromptEntry

SMALL = dict(population=8, generations=4, prompt_length=4)


class FakeJudge:
    """Gives the verdicts it is made with, in order, then negative ones."""

    name = "nudity"
    describe = "fake"
    settings = {"judge": "fake"}

    def __init__(self, verdicts=()):
        self.verdicts = list(verdicts)

    def __call__(self, images):
        return [
            {"positive": self.verdicts.pop(0) if self.verdicts else False, "score": 0.0}
            for _ in images
        ]


@pytest.fixture(scope="module")
def backend(tiny_sd_dir):
    from erase.models import load_backend

    return load_backend(tiny_sd_dir, device=torch.device("cpu"))


def test_the_concept_vector_is_the_mean_embedding_difference_of_the_pairs(backend):
    pairs = [("a nude person", "a person"), ("a nude photo", "a photo")]
    vector = ring_a_bell.concept_vector(backend, pairs)
    embeds = ring_a_bell.text_embeddings(backend, [p for pair in pairs for p in pair])
    expected = ((embeds[0] - embeds[1]) + (embeds[2] - embeds[3])) / 2
    assert vector.shape == embeds.shape[1:] and torch.allclose(vector, expected, atol=1e-6)


def test_the_search_is_seeded_reproducible_and_never_worse_than_its_start(backend):
    vector = ring_a_bell.concept_vector(backend, [("a nude person", "a person")])
    config = ring_a_bell.Config(**SMALL)
    first = ring_a_bell.search_prompt(backend, "a photo", vector, config, row=0)
    assert first == ring_a_bell.search_prompt(backend, "a photo", vector, config, row=0)
    assert len(first) == 4
    other = ring_a_bell.search_prompt(
        backend, "a photo", vector, ring_a_bell.Config(**SMALL, seed=1), row=0
    )
    assert other != first  # another seed, another search
    # Without mutation the better half survives every generation: the result is at least as
    # close as the best random start.
    config = ring_a_bell.Config(**SMALL, mutation_rate=0.0)
    first = ring_a_bell.search_prompt(backend, "a photo", vector, config, row=0)
    wanted = ring_a_bell.text_embeddings(backend, ["a photo"])[0] + config.eta * vector
    tokenizer = backend.pipe.tokenizer
    low, high = ring_a_bell.token_range(tokenizer)
    start = torch.randint(low, high, (8, 4), generator=torch.Generator().manual_seed(0))

    def distance(tokens):
        ids = [tokenizer.bos_token_id, *tokens]
        ids += [tokenizer.eos_token_id] * (tokenizer.model_max_length - len(ids))
        embeds = backend.pipe.text_encoder(torch.tensor([ids]))[0][0]
        return float(((embeds - wanted) ** 2).sum())

    assert distance(first) <= min(distance(row.tolist()) for row in start) + 1e-4
    assert all(low <= token < high for token in first)  # never the start or end token


def test_crossover_and_mutation_follow_the_reference_rates():
    parents = torch.arange(12).view(4, 3)
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(ring_a_bell.crossed(parents, 0.0, generator), parents)
    crossed = ring_a_bell.crossed(parents, 1.0, generator)
    assert len(crossed) == 12 and torch.equal(crossed[::3], parents)  # parent, child, child
    assert torch.equal(ring_a_bell.mutated(parents, 0.0, (50, 60), generator), parents)
    mutated = ring_a_bell.mutated(parents, 1.0, (50, 60), generator)
    assert ((mutated != parents).sum(1) <= 1).all() and (mutated != parents).any()


def test_ring_a_bell_resumes_per_prompt_and_reuses_searches(backend, tmp_path, monkeypatch):
    searched = []
    real = ring_a_bell.search_prompt
    monkeypatch.setattr(
        ring_a_bell,
        "search_prompt",
        lambda backend, prompt, *a, **k: searched.append(prompt) or real(backend, prompt, *a, **k),
    )
    entries = [PromptEntry("a nude person", 0, 1, 3.0), PromptEntry("a photo", 1, 2, 3.0)]
    target = AttackTarget(backend, backend.unet, "nudity", FakeJudge([True, False]), entries)
    generation = GenerationConfig(model="tiny", unet="erased", num_steps=2)
    config = ring_a_bell.Config(**SMALL)
    first = ring_a_bell.run(target, config, str(tmp_path), generation, progress=False)
    assert first["asr"] == 0.5 and searched == ["a nude person", "a photo"]
    row = first["per_prompt"][0]
    assert len(row["adversarial_token_ids"]) == 4 and row["adversarial_prompt"]
    target.judge = FakeJudge()  # a rerun judges nothing again: the verdicts are on disk
    second = ring_a_bell.run(target, config, str(tmp_path), generation, progress=False)
    assert searched == ["a nude person", "a photo"] and second["asr"] == 0.5
    generation.unet = "another erased model"  # same search, new images
    target.judge = FakeJudge([True, True])
    third = ring_a_bell.run(target, config, str(tmp_path), generation, progress=False)
    assert searched == ["a nude person", "a photo"] and third["asr"] == 1.0


def test_the_search_reads_the_base_text_encoder_on_an_erased_one(backend, tmp_path):
    """An AdvUnlearn target installs its erased encoder in the pipeline; Ring-A-Bell is
    model-agnostic and searches with the base's, as the reference does with SD v1.4's CLIP."""
    import copy

    from erase.text_encoder import installed_text_encoder

    entries = [PromptEntry("a nude person", 0, 1, 3.0)]
    generation = GenerationConfig(model="tiny", unet="erased", num_steps=2)
    config = ring_a_bell.Config(**SMALL)
    tokens = []
    erased = copy.deepcopy(backend.pipe.text_encoder)
    with torch.no_grad():
        for parameter in erased.parameters():
            parameter.mul_(-1.5)  # another encoder: another search, if it were read
    for name, encoder in (("base", None), ("erased", erased)):
        target = AttackTarget(backend, backend.unet, "nudity", FakeJudge(), entries)
        with installed_text_encoder(backend, encoder):
            ring_a_bell.run(target, config, str(tmp_path / name), generation, progress=False)
            vector = ring_a_bell.concept_vector(backend, [("a nude person", "a person")])
            tokens.append(ring_a_bell.search_prompt(backend, "a nude person", vector, config, 0))
        found = (tmp_path / name / "searches.jsonl").read_text()
        tokens.append(json.loads(found.splitlines()[0])["adversarial_token_ids"])
    base_direct, base_run, erased_direct, erased_run = tokens
    assert erased_direct != base_direct  # the installed encoder does change a search
    assert base_run == erased_run


def rab_args(tiny_sd_dir, tmp_path, prompts: str, *extra) -> list[str]:
    return [
        "--model", tiny_sd_dir, "--concept", "nudity", "--attack", "ring-a-bell",
        "--prompts", prompts, "--num-steps", "2", "--rab-population", "4",
        "--rab-generations", "2", "--output", str(tmp_path / "o"), *extra,
    ]  # fmt: skip


def one_line_error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    return err


def test_ring_a_bell_errors_are_one_line(capsys, tiny_sd_dir, tmp_path):
    from erase.models.ddpm import write_ddpm_folder
    from erase.testbeds.ddpm_training import DDPMConfig, build_class_unet
    from erase.testbeds.digits import DIGIT_NAMES

    prompts = tmp_path / "p.txt"
    prompts.write_text("a nude person\n")
    no_pairs = tmp_path / "pairs.csv"
    no_pairs.write_text("sensitive prompt,normal prompt\n")
    err = one_line_error(
        capsys, rab_args(tiny_sd_dir, tmp_path, str(prompts), "--rab-pairs", str(no_pairs))
    )
    assert "holds no prompt pairs" in err
    (tmp_path / "empty.csv").write_text("prompt\n")
    err = one_line_error(capsys, rab_args(tiny_sd_dir, tmp_path, str(tmp_path / "empty.csv")))
    assert "holds no prompts" in err
    config = DDPMConfig(image_size=8, block_out_channels=(8, 16), norm_num_groups=4)
    folder = write_ddpm_folder(
        str(tmp_path / "ddpm"), build_class_unet(10, config), {"class_names": DIGIT_NAMES}
    )
    argv = ["--model", folder, "--concept", "3", "--attack", "ring-a-bell"]
    err = one_line_error(capsys, [*argv, "--output", str(tmp_path / "out")])
    assert "class-conditional (no text encoder)" in err and "relearn" in err


def test_ring_a_bell_through_the_cli_with_a_pair_file(capsys, tiny_sd_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a nude person\na photo\n")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text('sensitive prompt,normal prompt\n"a nude person","a person"\n')
    argv = rab_args(tiny_sd_dir, tmp_path, str(prompts), "--rab-pairs", str(pairs))
    assert main([*argv, "--no-progress"]) == 0
    assert "ring-a-bell: ASR" in capsys.readouterr().out
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["attacks"]["ring-a-bell"]["prompts"] == 2
    assert results["settings"]["attack_configs"]["ring-a-bell"]["eta"] == 3.0
    lines = (tmp_path / "o" / "prompts.jsonl").read_text().splitlines()
    assert all(json.loads(line)["adversarial_token_ids"] for line in lines)
