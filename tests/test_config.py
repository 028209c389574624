"""Run configs: every setting round-trips through to_dict/from_dict and JSON, an unknown one is one
clear error, and a finished run replays from its metadata.json to the same weights."""

import dataclasses
import json
import typing

import pytest
import torch
from diffusers import UNet2DConditionModel

import erase
from erase.bench import BenchConfig, method_settings
from erase.cli.bench import main as bench_main
from erase.cli.concept import erase_concept_main
from erase.config import ErasureConfig
from erase.errors import EraseError
from erase.methods import METHODS
from eval.evaluation import EvalConfig


def sample_value(config_field: dataclasses.Field, types: dict):
    """A value of the field's type that differs from its default."""
    kind = str(types[config_field.name])
    if "bool" in kind:
        return True
    if "int" in kind:
        return 3
    if "float" in kind:
        return 0.25
    return "sum"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_config_round_trips(method):
    config_class = METHODS[method].Config
    types = typing.get_type_hints(config_class)
    settings = {f.name: sample_value(f, types) for f in dataclasses.fields(config_class)}
    config = erase.api.erasure_config(["nudity", "Van Gogh"], method, steps=7, **settings)
    assert config.method_config == settings  # top-level method settings land in method_config
    assert ErasureConfig.from_dict(config.to_dict()) == config
    assert ErasureConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_eval_and_bench_configs_round_trip():
    evaluation = EvalConfig.from_dict({"prompts": "coco", "metric": "fid,clip", "limit": 5})
    assert evaluation.metric == ["fid", "clip"]
    assert EvalConfig.from_dict(json.loads(json.dumps(evaluation.to_dict()))) == evaluation
    bench = BenchConfig.from_settings(
        "nudity", "out", methods="salun,esd-x", steps=2, method_settings={"esd-x": {"lr": 1e-4}}
    )
    assert bench.methods == ["salun", "esd-x"] and bench.erasure.steps == 2
    assert BenchConfig.from_dict(json.loads(json.dumps(bench.to_dict()))) == bench
    assert method_settings(bench, "esd-x")["lr"] == 1e-4
    assert method_settings(bench, "salun")["lr"] is None


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"stepz": 3}, "'stepz' for erase-concept (did you mean steps?)"),
        ({"method_config": {"alpah": 0.1}}, "'alpah' for erase-concept (did you mean alpha?)"),
    ],
)
def test_an_unknown_setting_names_the_nearest_known_one(settings, message):
    with pytest.raises(EraseError) as error:
        ErasureConfig.from_dict({"concept": "nudity", **settings})
    assert message in str(error.value)


def test_eval_config_names_the_nearest_setting():
    with pytest.raises(EraseError, match="did you mean num_steps"):
        EvalConfig.from_dict({"prompts": "coco", "num_step": 3})


def unet_state(folder) -> dict:
    return UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet").state_dict()


def test_a_run_replays_from_its_metadata_to_the_same_weights(tiny_sd_args, tmp_path):
    first = tmp_path / "first"
    flags = ["--lr", "1e-3", "--alpha", "0.3", "--no-grid"]
    assert erase_concept_main([*tiny_sd_args, *flags, "--output", str(first)]) == 0
    metadata = json.loads((first / "metadata.json").read_text())
    recorded = metadata["settings"]
    assert recorded["method_config"] == {"alpha": 0.3} and recorded["lr"] == 1e-3
    config = ErasureConfig.from_dict({**recorded, "output": str(tmp_path / "replay")})
    replay = erase.api.run(config)
    assert replay.metadata["changed_weights"] == metadata["changed_weights"] > 0
    expected, replayed = unet_state(first), unet_state(tmp_path / "replay")
    assert expected.keys() == replayed.keys()
    assert all(torch.equal(expected[k], replayed[k]) for k in expected)


def test_the_bench_erases_to_the_cli_weights(tiny_sd_dir, tiny_sd_args, tmp_path):
    assert erase_concept_main([*tiny_sd_args, "--output", str(tmp_path / "cli")]) == 0
    argv = ["--model", tiny_sd_dir, "--concept", "nudity", "--methods", "salun"]
    argv += tiny_sd_args[4:]  # --steps, --num-forget, --num-retain, --gen-steps
    argv += ["--output", str(tmp_path / "bench"), "--bench-per-prompt", "1"]
    argv += ["--bench-steps", "2", "--bench-clip", "none"]
    assert bench_main(argv) == 0
    expected, benched = unet_state(tmp_path / "cli"), unet_state(tmp_path / "bench" / "salun")
    assert all(torch.equal(expected[k], benched[k]) for k in expected)


def test_attack_settings_round_trip_through_results_json():
    from eval.attacks.config import attack_settings
    from eval.attacks.harness import AttackSettings

    settings = attack_settings(
        "nudity", "unlearndiffatk,relearn", model="sd-v1-4", blocks=7, relearn_steps=[0, 5]
    )
    recorded = json.loads(json.dumps(settings.to_dict()))
    assert recorded["attack_configs"]["unlearndiffatk"]["blocks"] == 7
    assert AttackSettings.from_dict(recorded) == settings
    with pytest.raises(EraseError, match="did you mean per_prompt"):
        attack_settings("nudity", "relearn", model="sd-v1-4", per_promt=3)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"steps": -1}, "--steps must be greater than 0, got -1."),
        ({"steps": "2"}, "--steps must be an integer or None, got '2'."),
        ({"steps": True}, "--steps must be an integer or None, got True."),
        ({"lr": float("inf")}, "--lr must be a finite number, got inf."),
        ({"mixed_precision": "fp8"}, "--mixed-precision must be one of no, fp16, bf16"),
        ({"alpha": "big"}, "--alpha must be a number or None, got 'big'."),
    ],
)
def test_the_api_refuses_what_the_cli_parser_refuses(settings, message):
    with pytest.raises(EraseError) as error:
        erase.api.check_erasure("nudity", "salun", **settings)
    assert message in str(error.value)


def test_an_erasure_needs_a_concept_and_takes_one_prompt_as_a_string():
    with pytest.raises(EraseError, match="Give the concept to erase"):
        erase.api.check_erasure([], "salun")
    config = erase.api.erasure_config("nudity", forget_prompt="a nude person", lr=1)
    assert config.forget_prompt == ["a nude person"] and config.lr == 1
    config.check()  # an int is a valid learning rate


def test_evaluate_and_benchmark_check_their_settings_before_any_work(tmp_path):
    with pytest.raises(EraseError, match="--limit must be greater than 0, got 0"):
        erase.evaluate("unused-model", "coco", limit=0, output=str(tmp_path / "e"))
    with pytest.raises(EraseError, match="--bench-steps must be an integer, got '2'"):
        erase.benchmark("unused-model", "nudity", str(tmp_path / "b"), bench_steps="2")
    assert not any(tmp_path.iterdir())


def test_each_number_of_a_list_setting_is_checked():
    from dataclasses import dataclass, field

    from erase.config import check_values

    @dataclass
    class Rates:
        lr: list[float] = field(default_factory=lambda: [1e-4, 1e-5])

    check_values(Rates(), {"lr"}, {})
    with pytest.raises(EraseError, match="--lr must be greater than 0, got -1.0"):
        check_values(Rates([1e-4, -1.0]), {"lr"}, {})
    with pytest.raises(EraseError, match="--lr must be a finite number"):
        check_values(Rates([float("nan")]), {"lr"}, {})
