"""CLIP score on a tiny randomly initialised open_clip model built offline from a config file."""

import json

import numpy as np
import pytest
from PIL import Image

from erase.errors import EraseError
from eval.clip_score import clip_score, clip_scores, load_clip

# A CLIP small enough for CPU tests; open_clip ships the BPE vocabulary its tokenizer needs.
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_clip_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "tiny-clip-test.json"
    path.write_text(json.dumps(TINY_CLIP))
    return str(path)


@pytest.fixture(scope="module")
def tiny_clip(tiny_clip_config):
    import torch

    torch.manual_seed(0)
    return load_clip(tiny_clip_config, "none")


def images(count, size=24):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8)) for _ in range(count)]


def test_scores_are_in_range_one_per_pair(tiny_clip):
    scores = clip_scores(images(3), ["a cat", "a dog", "a car"], tiny_clip)
    assert len(scores) == 3
    assert all(0 <= s <= 100 for s in scores)


def test_score_is_deterministic_and_depends_on_the_prompt(tiny_clip):
    picture = images(1)
    first = clip_scores(picture * 2, ["a red house", "a red house"], tiny_clip)
    other = clip_scores(picture, ["seven green parrots flying"], tiny_clip)
    assert first[0] == pytest.approx(first[1])
    assert other[0] != pytest.approx(first[0])


def test_reads_image_files(tiny_clip, tmp_path):
    path = tmp_path / "x.png"
    picture = images(1)[0]
    picture.save(path)
    from_file = clip_scores([str(path)], ["a cat"], tiny_clip)
    from_image = clip_scores([picture], ["a cat"], tiny_clip)
    assert from_file == pytest.approx(from_image)


def test_summary_holds_mean_and_settings(tiny_clip):
    summary, scores = clip_score(images(4), ["a cat"] * 4, tiny_clip)
    assert summary["clip_score_unit"] == pytest.approx(summary["clip_score"] / 100)
    assert summary["scale"].startswith("x100")
    assert summary["images"] == 4 and summary["model"].endswith("tiny-clip-test.json")
    assert summary["pretrained"] is None
    assert summary["clip_score"] == pytest.approx(sum(scores) / 4)


def test_missing_weights_offline_is_an_error():
    with pytest.raises(EraseError, match="could not be loaded.*--clip-pretrained PATH"):
        load_clip("ViT-B-32", "openai")


def test_unknown_model_is_an_error():
    with pytest.raises(EraseError, match="Unknown CLIP model 'ViT-Q-99'"):
        load_clip("ViT-Q-99", None)


def test_unknown_weights_tag_is_an_error():
    with pytest.raises(EraseError, match="Unknown weights 'nonsense'"):
        load_clip("ViT-B-32", "nonsense")
