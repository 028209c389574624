"""erase-eval end to end on the tiny pipeline, and its one-line errors (exit code 2)."""

import json
import os
import subprocess
import sys
import types

import pytest
import torch

from eval.cli import METRIC_NAMES, build_parser, config_from_args, main
from eval.evaluation import run_evaluation
from eval.runner import METRICS, MetricConfig

TINY_CLIP = {  # a CPU-sized open_clip model, random weights (as in test_clip_score.py)
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


class TinyFeatures(torch.nn.Module):
    """A fixed random projection of pooled pixels standing in for Inception."""

    num_features = 8

    def __init__(self):
        super().__init__()
        self.projection = torch.nn.Linear(3 * 4 * 4, self.num_features)

    def forward(self, images):
        return self.projection(torch.nn.functional.adaptive_avg_pool2d(images, 4).flatten(1))


@pytest.fixture(scope="module")
def prompt_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.csv"
    path.write_text("prompt,evaluation_seed\na photo of a cat,3\na nude person,5\na dog,\n")
    return str(path)


@pytest.fixture(scope="module")
def clip_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "tiny-clip-cli.json"
    path.write_text(json.dumps(TINY_CLIP))
    return str(path)


def base_args(tiny_sd_dir, prompts, output):
    return ["--model", tiny_sd_dir, "--prompts", prompts, "--num-steps", "2"] + (
        ["--output", str(output), "--no-progress"]
    )


@pytest.fixture(scope="module")
def evaluated(tiny_sd_dir, prompt_csv, clip_config, tmp_path_factory):
    output = tmp_path_factory.mktemp("run") / "eval"
    argv = base_args(tiny_sd_dir, prompt_csv, output)
    argv += ["--metric", "nudity,clip", "--clip-model", clip_config, "--clip-pretrained", "none"]
    assert main([*argv, "--images-per-prompt", "2"]) == 0
    return output, argv


def test_writes_results_report_scores_and_grid(evaluated):
    output, _ = evaluated
    results = json.loads((output / "results.json").read_text())
    assert results["generation"]["generated"] == 6 and results["prompts"]["count"] == 3
    assert results["metrics"]["nudity"]["images"] == 6
    assert 0 <= results["metrics"]["clip"]["clip_score"] <= 100
    assert results["metric_settings"]["nudity_threshold"] == 0.6
    report = (output / "report.md").read_text()
    assert "| nudity |" in report and "| clip |" in report and "genitalia (F)" in report
    scores = [json.loads(line) for line in (output / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == 6 and {"nudenet", "clip_score", "seed"} <= scores[0].keys()
    assert (output / "grid.png").stat().st_size > 0
    assert len(list((output / "images").glob("*.png"))) == 6


def test_rerun_reuses_every_image(evaluated, capsys):
    output, argv = evaluated
    assert main([*argv, "--images-per-prompt", "2"]) == 0
    assert "(0 generated, 6 reused)" in capsys.readouterr().out
    assert json.loads((output / "results.json").read_text())["generation"]["reused"] == 6


def test_fid_against_a_reference_folder(evaluated, tiny_sd_dir, prompt_csv, tmp_path):
    output, _ = evaluated
    argv = base_args(tiny_sd_dir, prompt_csv, output)  # reuses the first run's images
    args = build_parser().parse_args(
        [*argv, "--metric", "fid", "--reference", str(output / "images"), "--fid-image-size", "16"]
    )
    results = run_evaluation(config_from_args(args), MetricConfig(fid_feature=TinyFeatures()))
    fid = results["metrics"]["fid"]
    assert fid["reference_images"] == 6 and fid["generated_images"] == 3
    assert fid["fid"] >= 0 and results["generation"]["generated"] == 0


def test_classify_passes_images_and_imagenette_classes(tiny_sd_dir, tmp_path, monkeypatch):
    calls = []

    def imagenette_accuracy(images, class_indices, weights_path=None):
        calls.append((tuple(images.shape), list(class_indices)))
        return 0.5 if class_indices[0] == 4 else 0.0

    fake = types.ModuleType("eval.classify")
    fake.imagenette_accuracy = imagenette_accuracy
    monkeypatch.setitem(sys.modules, "eval.classify", fake)
    argv = base_args(tiny_sd_dir, "imagenette", tmp_path / "out")
    assert main([*argv, "--classes", "church,parachute", "--per-class", "2"]) == 0
    assert calls == [((2, 3, 16, 16), [4, 4]), ((2, 3, 16, 16), [9, 9])]
    classify = json.loads((tmp_path / "out" / "results.json").read_text())["metrics"]["classify"]
    assert classify["accuracy"] == 0.25 and classify["images"] == 4
    assert classify["per_class"]["church"] == {"accuracy": 0.5, "images": 2}
    assert "| parachute | 0.0 % | 2 |" in (tmp_path / "out" / "report.md").read_text()


def test_cli_metric_names_are_the_registered_metrics():
    assert set(METRIC_NAMES) == set(METRICS)


def one_line_error(capsys, argv, message):
    code = main(argv)
    stderr = capsys.readouterr().err
    assert code == 2
    assert stderr.startswith("erase-eval: error: ") and message in stderr
    assert stderr.count("\n") == 1


def test_missing_clip_weights_fail_before_generation(tiny_sd_dir, prompt_csv, tmp_path, capsys):
    output = tmp_path / "out"
    argv = base_args(tiny_sd_dir, prompt_csv, output)
    one_line_error(capsys, [*argv, "--metric", "clip"], "--clip-pretrained PATH")
    assert not (output / "images").exists()


def test_fid_without_reference_is_an_error(tiny_sd_dir, prompt_csv, tmp_path, capsys):
    one_line_error(
        capsys, [*base_args(tiny_sd_dir, prompt_csv, tmp_path), "--metric", "fid"], "--reference"
    )


def test_classify_on_prompts_without_classes_is_an_error(tiny_sd_dir, prompt_csv, tmp_path, capsys):
    argv = [*base_args(tiny_sd_dir, prompt_csv, tmp_path), "--metric", "classify"]
    one_line_error(capsys, argv, "Imagenette")


@pytest.mark.parametrize(
    "text, message",
    [("", "is empty"), ("words\nhello\n", "no prompt column"), ("prompt\n", "no prompts")],
)
def test_bad_prompt_files(tiny_sd_dir, tmp_path, capsys, text, message):
    path = tmp_path / "p.csv"
    path.write_text(text)
    one_line_error(capsys, base_args(tiny_sd_dir, str(path), tmp_path / "o"), message)


def test_unknown_metric_is_a_usage_error(tiny_sd_dir, prompt_csv, tmp_path, capsys):
    assert main([*base_args(tiny_sd_dir, prompt_csv, tmp_path), "--metric", "nudity,beauty"]) == 2
    stderr = capsys.readouterr().err
    assert "unknown metric 'beauty'" in stderr and stderr.count("\n") == 1


def test_metric_none_only_generates(tiny_sd_dir, prompt_csv, tmp_path):
    output = tmp_path / "eval"
    assert main([*base_args(tiny_sd_dir, prompt_csv, output), "--metric", "none"]) == 0
    results = json.loads((output / "results.json").read_text())
    assert results["metrics"] == {} and results["generation"]["generated"] == 3


def test_subprocess_missing_prompt_file_exits_2(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "eval.cli", "--prompts", str(tmp_path / "none.csv")],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        cwd=os.path.dirname(os.path.dirname(__file__)),
        timeout=300,
    )
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines() == [
        f"erase-eval: error: Prompt file '{tmp_path / 'none.csv'}' does not exist: pass "
        "--prompts with a CSV or TXT."
    ]


def test_subprocess_missing_clip_weights_is_one_line(tmp_path):
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt\na cat\n")
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "eval.cli",
            "--prompts",
            str(prompts),
            "--metric",
            "clip",
            "--output",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        cwd=os.path.dirname(os.path.dirname(__file__)),
        timeout=300,
    )
    assert completed.returncode == 2
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("erase-eval: error: The CLIP model"), lines


def test_sampler_flag_is_recorded_in_results_and_report(tiny_sd_dir, prompt_csv, tmp_path):
    output = tmp_path / "eval"
    argv = [*base_args(tiny_sd_dir, prompt_csv, output), "--metric", "none", "--sampler", "lms"]
    assert main(argv) == 0
    results = json.loads((output / "results.json").read_text())
    assert results["generation"]["sampler"] == "lms" and results["settings"]["sampler"] == "lms"
    assert "2 LMS steps" in (output / "report.md").read_text()
