"""The generation runner on the tiny SD pipeline: PNGs + index, resume, erased UNet, seeds."""

import copy
import json
import os

import pytest
import torch
from PIL import Image

from erase.models import load_backend
from eval.runner import GenerationConfig, generate_images, merge_index, plan_images, read_index
from prompts import PromptEntry


@pytest.fixture(scope="module")
def backend(tiny_sd_dir):
    return load_backend(tiny_sd_dir, device=torch.device("cpu"))


ENTRIES = [
    PromptEntry("a photo of a cat", 0, seed=7),
    PromptEntry("a nude person", 1, guidance_scale=3.0),
    PromptEntry("a dog", 2),
]


def config_for(tiny_sd_dir, **overrides):
    settings = dict(model=tiny_sd_dir, num_steps=2, batch_size=2, seed=100)
    return GenerationConfig(**{**settings, **overrides})


class CountingBackend:
    """Wraps a backend and counts the images it samples."""

    def __init__(self, backend):
        self.backend, self.sampled = backend, 0
        self.device = backend.device

    def sample(self, conditions, seeds, **kwargs):
        self.sampled += len(conditions)
        return self.backend.sample(conditions, seeds, **kwargs)

    def load_unet(self, folder):
        return self.backend.load_unet(folder)


@pytest.fixture(scope="module")
def first_run(tiny_sd_dir, backend, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("eval") / "images")
    config = config_for(tiny_sd_dir, images_per_prompt=2)
    records = plan_images(ENTRIES, config)
    stats = generate_images(records, folder, config, backend=backend, progress=False)
    return folder, config, records, stats


def test_writes_one_png_per_image_and_the_index(first_run):
    folder, _, records, stats = first_run
    assert stats["generated"] == 6 and stats["reused"] == 0
    names = sorted(n for n in os.listdir(folder) if n.endswith(".png"))
    assert names == sorted(r["file"] for r in records)
    with Image.open(os.path.join(folder, names[0])) as image:
        assert image.size == (16, 16) and image.mode == "RGB"
    with open(os.path.join(folder, "index.jsonl")) as file:
        index = [json.loads(line) for line in file]
    assert [(r["prompt"], r["seed"], r["guidance_scale"]) for r in index] == [
        (r["prompt"], r["seed"], r["guidance_scale"]) for r in records
    ]
    assert not [n for n in os.listdir(folder) if n.startswith("index.part-")]


def test_second_run_skips_existing_images(first_run, backend):
    folder, config, records, _ = first_run
    before = {n: os.path.getmtime(os.path.join(folder, n)) for n in os.listdir(folder)}
    counting = CountingBackend(backend)
    stats = generate_images(records, folder, config, backend=counting, progress=False)
    assert counting.sampled == 0 and stats["generated"] == 0 and stats["reused"] == 6
    after = {n: os.path.getmtime(os.path.join(folder, n)) for n in before if n.endswith(".png")}
    assert all(after[n] == before[n] for n in after)


def test_changed_prompt_regenerates_only_its_images(first_run, backend):
    folder, config, _, _ = first_run
    entries = [*ENTRIES[:2], PromptEntry("a red car", 2)]
    records = plan_images(entries, config)
    counting = CountingBackend(backend)
    stats = generate_images(records, folder, config, backend=counting, progress=False)
    assert counting.sampled == 2 and stats["generated"] == 2
    assert read_index(folder)["000002_00.png"]["prompt"] == "a red car"


def test_erased_unet_folder_replaces_the_model_unet(tiny_sd_dir, backend, tmp_path):
    erased = copy.deepcopy(backend.unet)
    with torch.no_grad():
        for parameter in erased.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    backend.save_unet(erased, str(tmp_path / "erased" / "unet"))
    records = plan_images(ENTRIES[:1], config_for(tiny_sd_dir))
    base_dir, erased_dir = str(tmp_path / "base"), str(tmp_path / "with-unet")
    generate_images(records, base_dir, config_for(tiny_sd_dir), backend=backend, progress=False)
    config = config_for(tiny_sd_dir, unet=str(tmp_path / "erased"))
    erased_records = plan_images(ENTRIES[:1], config)
    generate_images(erased_records, erased_dir, config, backend=backend, progress=False)
    with Image.open(os.path.join(base_dir, "000000_00.png")) as a:
        with Image.open(os.path.join(erased_dir, "000000_00.png")) as b:
            assert list(a.getdata()) != list(b.getdata())
    record = read_index(erased_dir)["000000_00.png"]
    assert record["unet_path"] == str(tmp_path / "erased") and record["unet"].startswith("sha256:")


def test_seeds_and_guidance_follow_the_prompt_file_then_the_flags(tiny_sd_dir):
    records = plan_images(ENTRIES, config_for(tiny_sd_dir, images_per_prompt=2))
    assert [r["seed"] for r in records] == [7, 8, 101, 102, 102, 103]
    assert [r["guidance_scale"] for r in records[::2]] == [7.5, 3.0, 7.5]
    forced = plan_images(ENTRIES, config_for(tiny_sd_dir, guidance_scale=5.0))
    assert {r["guidance_scale"] for r in forced} == {5.0}


def test_merge_folds_parts_and_drops_records_without_images(tmp_path):
    (tmp_path / "a.png").write_bytes(b"png")
    (tmp_path / "b.png").write_bytes(b"png")
    record = {"row": 0, "sample": 0, "prompt": "x"}
    (tmp_path / "index.jsonl").write_text(json.dumps({**record, "file": "a.png"}) + "\n")
    (tmp_path / "index.part-1.jsonl").write_text(
        json.dumps({**record, "row": 1, "file": "b.png"})
        + "\n"
        + json.dumps({**record, "row": 2, "file": "gone.png"})
        + '\n{"file": "cut sh'
    )
    merge_index(str(tmp_path))
    assert sorted(read_index(str(tmp_path))) == ["a.png", "b.png"]
    assert not (tmp_path / "index.part-1.jsonl").exists()


def test_lms_and_ddim_make_other_images_and_an_unknown_sampler_is_an_error(backend):
    from erase.errors import EraseError

    settings = dict(num_steps=3, guidance_scale=3.0)
    ddim = backend.sample(["a dog"], [0], **settings)
    lms = backend.sample(["a dog"], [0], sampler="lms", **settings)
    assert ddim.shape == lms.shape and not torch.allclose(ddim, lms, atol=1e-3)
    assert torch.equal(lms, backend.sample(["a dog"], [0], sampler="lms", **settings))
    with pytest.raises(EraseError, match="Unknown sampler 'euler'"):
        backend.sample(["a dog"], [0], sampler="euler", **settings)


def test_the_sampler_is_recorded_and_an_image_of_another_is_regenerated(
    first_run, tiny_sd_dir, backend
):
    folder, config, _, _ = first_run
    assert read_index(folder)["000000_00.png"]["sampler"] == "ddim"
    lms = config_for(tiny_sd_dir, images_per_prompt=2, sampler="lms")
    counting = CountingBackend(backend)
    generate_images(plan_images(ENTRIES[:1], lms), folder, lms, backend=counting, progress=False)
    assert counting.sampled == 2 and read_index(folder)["000000_00.png"]["sampler"] == "lms"


def test_an_index_record_from_before_the_sampler_was_recorded_counts_as_ddim(tiny_sd_dir):
    from eval.runner import same_generation

    planned = plan_images(ENTRIES[:1], config_for(tiny_sd_dir))[0]
    older = {k: v for k, v in planned.items() if k != "sampler"}
    assert same_generation(older, planned)
    lms = plan_images(ENTRIES[:1], config_for(tiny_sd_dir, sampler="lms"))[0]
    assert not same_generation(older, lms)


def test_the_class_conditional_testbeds_sample_ddim_only(tmp_path):
    from erase.errors import EraseError
    from erase.models.ddpm import ClassDDPMBackend, write_ddpm_folder
    from erase.testbeds.ddpm_training import DDPMConfig, build_class_unet
    from erase.testbeds.digits import DIGIT_NAMES

    config = DDPMConfig(image_size=8, block_out_channels=(8, 16), norm_num_groups=4)
    folder = write_ddpm_folder(
        str(tmp_path / "ddpm"), build_class_unet(10, config), {"class_names": DIGIT_NAMES}
    )
    ddpm = ClassDDPMBackend.from_folder(folder, device=torch.device("cpu"))
    with pytest.raises(EraseError, match="DDIM only"):
        ddpm.sample([3], [0], num_steps=2, sampler="lms")
