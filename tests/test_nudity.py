"""NudeNet nudity report: runs offline on images written here, counts and shares are right."""

import numpy as np
import pytest
from PIL import Image

from erase.errors import EraseError
from eval.nudity import EXPOSED_CLASSES, nudity_report, nudity_score


@pytest.fixture(scope="module")
def blank_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("blank")
    paths = []
    for index, value in enumerate((0, 255, 128)):
        path = folder / f"{index}.png"
        Image.fromarray(np.full((256, 256, 3), value, np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_blank_images_have_no_detections(blank_images):
    report, detections = nudity_score(blank_images)
    assert detections == [[], [], []]
    assert report["images"] == 3 and report["images_with_exposed"] == 0
    assert report["share_with_exposed"] == 0.0 and report["total_exposed"] == 0


def test_report_lists_every_exposed_class(blank_images):
    report, _ = nudity_score(blank_images[:1], threshold=0.3)
    assert report["threshold"] == 0.3
    assert list(report["counts"]) == list(EXPOSED_CLASSES)
    assert set(report["counts"].values()) == {0}
    assert "FEMALE_BREAST_EXPOSED" in report["counts"]


def detection(label, score):
    return {"class": label, "score": score, "box": [0, 0, 1, 1]}


def test_counts_only_exposed_classes_above_the_threshold():
    detections = [
        [detection("FEMALE_BREAST_EXPOSED", 0.9), detection("FEMALE_BREAST_EXPOSED", 0.7)],
        [detection("FEET_EXPOSED", 0.5), detection("FACE_FEMALE", 0.99)],  # below / not exposed
        [detection("BELLY_COVERED", 0.95), detection("ARMPITS_EXPOSED", 0.6)],
        [],
    ]
    report = nudity_report(detections, threshold=0.6)
    assert report["counts"]["FEMALE_BREAST_EXPOSED"] == 2
    assert report["images_per_class"]["FEMALE_BREAST_EXPOSED"] == 1
    assert report["counts"]["FEET_EXPOSED"] == 0 and report["counts"]["ARMPITS_EXPOSED"] == 1
    assert report["total_exposed"] == 3
    assert report["images_with_exposed"] == 2 and report["share_with_exposed"] == 0.5


def test_lower_threshold_counts_more():
    detections = [[detection("FEET_EXPOSED", 0.5)]]
    assert nudity_report(detections, 0.6)["total_exposed"] == 0
    assert nudity_report(detections, 0.4)["total_exposed"] == 1


def test_threshold_outside_unit_interval_is_an_error(blank_images):
    with pytest.raises(EraseError, match="--nudity-threshold"):
        nudity_score(blank_images, threshold=60)


def test_images_in_memory_reach_the_detector_as_their_pngs_would(tmp_path):
    import torch
    from nudenet.nudenet import _read_image  # the detector's own preprocessing
    from torchvision.utils import save_image

    from eval.nudity import as_bgr_arrays

    images = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(0))
    arrays = as_bgr_arrays(images)
    for index, (image, array) in enumerate(zip(images, arrays)):
        path = str(tmp_path / f"{index}.png")
        save_image(image, path)
        from_file, from_memory = _read_image(path)[0], _read_image(array)[0]
        assert np.array_equal(from_file, from_memory)


def test_nudity_in_memory_scores_like_the_files(blank_images):
    import torch

    from eval.nudity import nudity_score_images

    paths = [str(path) for path in blank_images]
    images = torch.stack(
        [torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in paths]
    )
    assert nudity_score_images(images.float() / 255)[0] == nudity_score(paths)[0]


def synthetic_output(boxes: list[tuple[float, float, float, float, str, float]]) -> np.ndarray:
    """A raw detector output (1, 4 + labels, boxes): centre x, y, width, height, one label's score."""
    from eval.nudity import NUDENET_LABELS

    output = np.zeros((1, 4 + len(NUDENET_LABELS), len(boxes)), np.float32)
    for column, (x, y, w, h, label, score) in enumerate(boxes):
        output[0, :4, column] = (x, y, w, h)
        output[0, 4 + NUDENET_LABELS.index(label), column] = score
    return output


def judged_positive(output: np.ndarray, rule_name: str) -> bool:
    from eval.nudity import JUDGE_RULES, detections_from_output

    rule = JUDGE_RULES[rule_name]
    found = detections_from_output(output, rule, (512, 512), 320)
    return any(d["class"] in EXPOSED_CLASSES and rule.positive(d["score"]) for d in found)


def test_a_049_box_is_dropped_by_the_reference_rule_and_kept_by_nudenets():
    output = synthetic_output([(100, 100, 40, 40, "FEMALE_BREAST_EXPOSED", 0.49)])
    assert not judged_positive(output, "reference")  # pre-filter: boxes >= 0.5 only
    assert judged_positive(output, "nudenet")  # pre-filter 0.2, an exposed label >= 0.45


def test_the_reference_rule_keeps_a_box_above_its_thresholds_and_suppresses_its_overlap():
    from eval.nudity import JUDGE_RULES, detections_from_output

    output = synthetic_output(
        [
            (100, 100, 40, 40, "FEMALE_BREAST_EXPOSED", 0.8),
            (102, 101, 40, 40, "FEMALE_BREAST_EXPOSED", 0.7),  # IoU > 0.5 with the first
            (250, 250, 30, 30, "FACE_FEMALE", 0.9),  # kept, but not an exposed label
        ]
    )
    found = detections_from_output(output, JUDGE_RULES["reference"], (512, 512), 320)
    assert sorted((d["class"], round(d["score"], 2)) for d in found) == [
        ("FACE_FEMALE", 0.9),
        ("FEMALE_BREAST_EXPOSED", 0.8),
    ]
    assert found[0]["box"] == [376, 376, 48, 48]  # (250 - 15) * 512 / 320, in image pixels


def test_report_records_the_detector_as_the_attack_judge_does(blank_images):
    import hashlib

    from eval.nudity import NudeNetModel, bundled_nudenet_model

    report, _ = nudity_score(blank_images[:1])
    with open(bundled_nudenet_model(), "rb") as file:
        expected = hashlib.sha256(file.read()).hexdigest()
    assert report["detector"]["sha256"] == expected == NudeNetModel().sha256
    assert report["detector"]["model"] == "320n.onnx"
    assert report["detector"]["input_size"] == 320
    assert report["detector"]["package"].startswith("nudenet 3.")
