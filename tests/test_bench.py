"""erase-bench on the tiny pipeline: one row per method plus the base, chart, grid; failures isolated."""

import json

import pytest

from erase.cli.bench import main
from erase.methods import METHODS


def bench_args(tiny_sd_dir, output, methods, *extra):
    return [
        "--model",
        tiny_sd_dir,
        "--concept",
        "nudity",
        "--methods",
        methods,
        "--output",
        str(output),
        "--steps",
        "2",
        "--num-forget",
        "2",
        "--num-retain",
        "2",
        "--gen-steps",
        "2",
        "--bench-per-prompt",
        "2",
        "--bench-steps",
        "2",
        "--bench-clip",
        "none",
        *extra,
    ]


def test_bench_writes_table_chart_and_grid(tiny_sd_dir, tmp_path):
    methods = [m for m in ("salun", "esd-u", "esd-x", "fmn") if m in METHODS]
    output = tmp_path / "bench"
    assert main(bench_args(tiny_sd_dir, output, ",".join(methods))) == 0
    table = json.loads((output / "bench.json").read_text())
    assert [row["method"] for row in table["rows"]] == ["base", *methods]
    for row in table["rows"][1:]:
        assert "error" not in row, row
        assert row["changed_weights"] > 0 and row["train_s"] >= 0 and row["peak_memory_mb"] > 0
        assert 0 <= row["forget_nudity_share"] <= 1
        assert (output / row["method"] / "unet" / "config.json").is_file()
        assert (output / row["method"] / "metadata.json").is_file()
    assert (output / "chart.png").stat().st_size > 1000
    assert (output / "grid.png").stat().st_size > 100
    markdown = (output / "bench.md").read_text()
    assert all(f"| {name} |" in markdown for name in ["base", *methods])


def test_a_failing_method_is_reported_and_the_others_run(tiny_sd_dir, tmp_path, monkeypatch):
    class NaNSalUn(METHODS["salun"]):
        """SalUn whose loss turns NaN: what a diverging method looks like to the harness."""

        def loss(self, unet, forget, retain, generator):
            loss, terms = super().loss(unet, forget, retain, generator)
            return loss * float("nan"), terms

    monkeypatch.setitem(METHODS, "nan-salun", NaNSalUn)
    output = tmp_path / "bench"
    assert main(bench_args(tiny_sd_dir, output, "nan-salun,salun")) == 0
    rows = json.loads((output / "bench.json").read_text())["rows"]
    assert [row["method"] for row in rows] == ["base", "nan-salun", "salun"]
    assert "loss became nan" in rows[1]["error"]
    assert "error" not in rows[2] and rows[2]["changed_weights"] > 0
    assert not (output / "nan-salun").exists()


def test_method_flags_apply_to_their_method_only(tiny_sd_dir, tmp_path):
    output = tmp_path / "bench"
    argv = bench_args(tiny_sd_dir, output, "salun,esd-x", "--method-flags", "esd-x=--steps 1")
    assert main(argv) == 0
    salun = json.loads((output / "salun" / "metadata.json").read_text())
    esd = json.loads((output / "esd-x" / "metadata.json").read_text())
    assert (salun["train_config"]["steps"], esd["train_config"]["steps"]) == (2, 1)


def test_method_flags_take_several_entries_after_one_flag_or_one_per_flag():
    from erase.cli.bench import build_parser, method_settings

    shared = ["--model", "m", "--concept", "c", "--output", "o", "--methods", "salun,esd-u,fmn"]
    one_flag = shared + ["--method-flags", "salun=--steps 3", "esd-u=--lr 0.001"]
    args = build_parser().parse_args(one_flag + ["--method-flags", "fmn=--steps 4"])
    assert method_settings(args) == {
        "salun": {"steps": 3},
        "esd-u": {"lr": 0.001},
        "fmn": {"steps": 4},
    }


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--methods", "salun,nope"], "Unknown method(s) nope"),
        (["--methods", "salun", "--method-flags", "fmn=--lr 1"], "not in --methods"),
        (["--method-flags", "salun=--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--method", "esd-u"], "erase-bench takes --methods"),
        (["--no-eval"], "erase-bench takes --methods"),
    ],
)
def test_usage_mistakes_are_one_line_errors(tmp_path, capsys, flags, message):
    argv = ["--model", "unused", "--concept", "nudity", "--output", str(tmp_path / "b"), *flags]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("erase-bench: error:") and message in error
    assert error.count("\n") == 1


def test_help_hides_the_erase_concept_flags_the_bench_sets_itself(capsys):
    assert main(["--help"]) == 0
    usage = capsys.readouterr().out
    assert "--methods" in usage and "--method " not in usage and "--no-eval" not in usage


def test_the_bench_erases_through_the_api_with_one_loaded_model(tiny_sd_dir, tmp_path, monkeypatch):
    from erase import api

    calls = []
    real_erase_concept = api.erase_concept

    def recording_erase_concept(model, concept, method, output, **settings):
        calls.append((model, method, output, settings))
        return real_erase_concept(model, concept, method, output, **settings)

    monkeypatch.setattr(api, "erase_concept", recording_erase_concept)
    assert main(bench_args(tiny_sd_dir, tmp_path / "bench", "salun,esd-x")) == 0
    assert [method for _, method, _, _ in calls] == ["salun", "esd-x"]
    models = [model for model, _, _, _ in calls]
    assert models[0] is models[1] and models[0].identity == tiny_sd_dir  # loaded once, shared
    assert all(settings["steps"] == 2 and settings["no_eval"] for *_, settings in calls)
