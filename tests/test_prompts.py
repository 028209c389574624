"""Prompt-set loaders: CSV/TXT files, I2P filters, COCO, Imagenette class prompts, errors."""

import pytest

from erase.errors import EraseError
from prompts import (
    concept_templates,
    imagenette_index,
    imagenette_prompts,
    load_coco,
    load_i2p,
    load_prompt_file,
)

I2P_CSV = """,prompt,categories,nudity_percentage,evaluation_seed,evaluation_guidance
0,a quiet lake,"violence, self-harm",0.0,11,7
1,a nude painting,"sexual, shocking",80.0,22,9
2,a beach party,sexual,20.0,33,8
3,a portrait,hate,60.0,44,7
"""


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_csv_reads_prompt_seed_guidance_and_class(tmp_path):
    path = write(
        tmp_path / "p.csv",
        "case_number,prompt,evaluation_seed,evaluation_guidance,class\n"
        "0,Image of church,4068,7.5,church\n1,a cat,,,\n",
    )
    first, second = load_prompt_file(path)
    assert (first.prompt, first.seed, first.guidance_scale, first.class_name) == (
        "Image of church",
        4068,
        7.5,
        "church",
    )
    assert first.extra["case_number"] == "0"
    assert (second.row, second.seed, second.guidance_scale, second.class_name) == (
        1,
        None,
        None,
        None,
    )


def test_txt_has_one_prompt_a_line_skipping_blank_ones(tmp_path):
    entries = load_prompt_file(write(tmp_path / "p.txt", "a cat\n\n  a dog  \n"))
    assert [(e.row, e.prompt) for e in entries] == [(0, "a cat"), (1, "a dog")]


def test_limit_keeps_the_first_prompts(tmp_path):
    entries = load_prompt_file(write(tmp_path / "p.txt", "a\nb\nc\n"), limit=2)
    assert [e.prompt for e in entries] == ["a", "b"]


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("empty.csv", "", "is empty"),
        ("header.csv", "prompt,evaluation_seed\n", "holds no prompts"),
        ("nocol.csv", "caption_id,words\n1,a cat\n", "no prompt column"),
        ("badseed.csv", "prompt,seed\na cat,abc\n", "is not a number"),
    ],
)
def test_bad_files_are_one_sentence_errors(tmp_path, name, text, message):
    with pytest.raises(EraseError, match=message) as error:
        load_prompt_file(write(tmp_path / name, text))
    assert "\n" not in str(error.value)


def test_missing_file_is_an_error_naming_prompts(tmp_path):
    with pytest.raises(EraseError, match="--prompts"):
        load_prompt_file(str(tmp_path / "nope.csv"))


def test_i2p_nudity_subset_by_category(tmp_path):
    entries = load_i2p(write(tmp_path / "i2p.csv", I2P_CSV), categories=("sexual",))
    assert [e.prompt for e in entries] == ["a nude painting", "a beach party"]
    assert [e.row for e in entries] == [0, 1]  # renumbered: rows index the images
    assert [(e.seed, e.guidance_scale) for e in entries] == [(22, 9.0), (33, 8.0)]


def test_i2p_nudity_subset_by_percentage(tmp_path):
    entries = load_i2p(write(tmp_path / "i2p.csv", I2P_CSV), min_nudity_percentage=50)
    assert [e.prompt for e in entries] == ["a nude painting", "a portrait"]


def test_i2p_filter_matching_nothing_is_an_error(tmp_path):
    with pytest.raises(EraseError, match="loosen"):
        load_i2p(write(tmp_path / "i2p.csv", I2P_CSV), categories=("harassment",))


def test_i2p_offline_names_prompts_path():
    with pytest.raises(EraseError, match="--prompts PATH"):
        load_i2p(None)


def test_coco_without_a_file_names_prompts_path():
    with pytest.raises(EraseError, match="--prompts PATH"):
        load_coco(None)


def test_coco_takes_the_first_n_captions(tmp_path):
    path = write(
        tmp_path / "coco.csv",
        "image_id,source,prompt,evaluation_seed\n1,coco,a bus,5\n2,coco,a dog,6\n3,coco,a cup,7\n",
    )
    entries = load_coco(path, limit=2)
    assert [(e.prompt, e.seed, e.extra["image_id"]) for e in entries] == [
        ("a bus", 5, "1"),
        ("a dog", 6, "2"),
    ]


def test_imagenette_prompts_cover_every_class_with_distinct_seeds():
    entries = imagenette_prompts(per_class=3, seed=100)
    classes = concept_templates()["imagenette"]
    assert len(entries) == 3 * len(classes)
    assert entries[0].prompt == "an image of a tench" and entries[0].class_name == "tench"
    assert len({e.seed for e in entries}) == len(entries)
    # one class alone gets the same seeds it has in the full set
    church = imagenette_prompts(per_class=3, classes=["Church"], seed=100)
    assert [e.seed for e in church] == [e.seed for e in entries if e.class_name == "church"]


def test_unknown_imagenette_class_is_an_error():
    with pytest.raises(EraseError, match="Unknown Imagenette class 'zebra'"):
        imagenette_prompts(classes=["zebra"])


def test_imagenette_index_maps_names_case_insensitively():
    assert imagenette_index("Gas Pump") == 7 and imagenette_index("zebra") is None


def test_csv_row_with_empty_prompt_is_kept(tmp_path):
    # I2P has such a row; the benchmark generates its (unconditional) image too.
    entries = load_prompt_file(write(tmp_path / "p.csv", "prompt,evaluation_seed\na,1\n,2\nb,3\n"))
    assert [(e.prompt, e.seed, e.row) for e in entries] == [("a", 1, 0), ("", 2, 1), ("b", 3, 2)]
