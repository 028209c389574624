"""Does hardening hold against relearning? Erasures beside Retrain under every relearning attack.

    python scripts/bench_relearn.py --output /tmp/relearn                  # ddpm-digits, digit 3
    python scripts/bench_relearn.py --output /tmp/relearn --part erase     # erasures + quality only
    python scripts/bench_relearn.py --output /tmp/relearn --rows salun-meta --attacks forget/full/1e-4
    python scripts/bench_relearn.py --concept 5 --output /tmp/tune5 --attacks forget/full/1e-4 \
        --rows "salun-meta,meta-k5=--method salun --harden meta --meta-steps 5"   # a row of your own

Only on ddpm-digits (sd-digits: erase-bench --attacks relearn --retrain). Part erase: each row's
erasure by erase-concept in its own process (so its peak memory is its own), with erase-concept's
class-removal evaluation: plain forget accuracy, the other digits' accuracy and FID on them (the
base model's figures are the evaluation's `before`); Retrain's quality measured the same way. Part
attack: erase-attack's relearning attack on each row and on Retrain, every attack setting (data
forget|retain x full fine-tuning|LoRA rank 4 x lr 1e-5|1e-4), judged at 0, 10, 25, 50, 100, 250 and
500 steps; steps to recover and the curve's area per setting, and relearn.png (one panel per
setting, one line per model, Retrain's dashed). Resumable: an erasure folder or an attack's
results.json already written is reused. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# row -> erase-concept flags (the methods' and techniques' defaults for the testbed)
ROWS = {
    "salun": ["--method", "salun"],
    # meta at its defaults, with SalUn's --cond-drop 0: the setting chosen on digit 5
    "salun-meta": ["--method", "salun", "--harden", "meta", "--cond-drop", "0"],
    "salun-perturb": ["--method", "salun", "--harden", "perturb"],
    # meta over 150 erasure steps (2.5x SalUn's 60), so the retain term repairs the other digits:
    # chosen on digit 5 (docs/attacks.md, "IEU, longer recovery and longer hardened runs")
    "salun-meta-150": "--method salun --harden meta --cond-drop 0 --steps 150".split(),
    "salun-ieu": ["--method", "salun", "--harden", "ieu", "--cond-drop", "0"],
    "esd-u": ["--method", "esd-u"],
}
ATTACKS = [  # data/tuning/lr, the plain attacker first
    "forget/full/1e-4",
    "forget/lora/1e-4",
    "retain/full/1e-4",
    "retain/lora/1e-4",
    "forget/full/1e-5",
    "forget/lora/1e-5",
    "retain/full/1e-5",
    "retain/lora/1e-5",
]
CHECKPOINTS = [0, 10, 25, 50, 100, 250, 500]
JUDGED_PER_CHECKPOINT = 100  # generated images of the digit judged at each checkpoint


def erase_row(row: str, model: str, concept: str, folder: str) -> dict:
    """Erase (unless the folder holds a finished erasure) and read its metadata."""
    metadata_path = os.path.join(folder, "metadata.json")
    if not os.path.isfile(metadata_path):
        command = [sys.executable, "-m", "erase.cli.concept", "--model", model]
        command += ["--concept", concept, *ROWS[row], "--output", folder]
        clock = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        with open(os.path.join(folder, "process_wall_s.txt"), "w") as file:
            file.write(f"{time.perf_counter() - clock:.1f}\n")
    with open(metadata_path) as file:
        metadata = json.load(file)
    evaluation = metadata["evaluation"]
    timings = metadata["timings_s"]
    erasure_s = sum(timings.get(phase) or 0 for phase in ("data", "mask", "train"))
    return {
        "flags": " ".join(ROWS[row]),
        "harden_config": metadata.get("harden_config"),
        "quality": quality(evaluation["after"]),
        "base_quality": quality(evaluation["before"]),
        "erasure_s": round(erasure_s, 1),
        "timings_s": timings,
        "peak_memory_mb": metadata["peak_memory_mb"],
    }


def quality(metrics: dict) -> dict:
    """The plain figures of a class-removal evaluation."""
    return {k: metrics[k] for k in ("forget_accuracy", "retain_accuracy", "fid_retain")}


def retrain_quality(model: str, concept: str, folder: str) -> dict:
    """Retrain's plain figures, measured as erase-concept measures an erasure (cached)."""
    path = os.path.join(folder, "quality.json")
    if not os.path.isfile(path):
        from erase.config import ErasureConfig
        from erase.testbeds.retrain import digit_index, load_retrain
        from eval.classify import class_removal

        backend = load_retrain(model, concept)
        defaults = ErasureConfig(model=model, concept=concept)
        metrics, _ = class_removal(
            backend,
            digit_index(concept),
            num_per_class=defaults.eval_per_class,
            seed=defaults.seed,
            num_steps=defaults.eval_steps or backend.eval_steps,
        )
        os.makedirs(folder, exist_ok=True)
        with open(path, "w") as file:
            json.dump(quality(metrics), file)
    with open(path) as file:
        return json.load(file)


def parse_attack(text: str) -> tuple[str, str, float]:
    """data/tuning/lr -> (data, tuning, lr)."""
    data, tuning, lr = text.split("/")
    return data, tuning, float(lr)


def relearn_flags(attacks: list[str], checkpoints: list[int] = CHECKPOINTS) -> dict:
    """erase-attack's relearning flags by name for the attacks `data/tuning/lr`."""
    settings = [parse_attack(a) for a in attacks]
    return {
        "per_prompt": JUDGED_PER_CHECKPOINT,
        "relearn_data": list(dict.fromkeys(s[0] for s in settings)),
        "relearn_tuning": list(dict.fromkeys(s[1] for s in settings)),
        "relearn_lr": list(dict.fromkeys(s[2] for s in settings)),
        "relearn_steps": checkpoints,
    }


def attack_row(model: str, concept: str, unet: str, output: str, attacks: list[str], steps) -> dict:
    """erase-attack's relearning attacks on one erased model (its folder: results.json,
    report.md, relearn.png); the relearn figures."""
    import erase

    path = os.path.join(output, "results.json")
    if not os.path.isfile(path):
        flags = relearn_flags(attacks, steps)
        erase.attack(model, concept, "relearn", unet=unet, output=output, no_progress=True, **flags)
    with open(path) as file:
        return json.load(file)["attacks"]["relearn"]


def attack_retrain(model: str, concept: str, output: str, attacks: list[str], steps) -> dict:
    """The same attacks on Retrain, judged against the base model's rate (as erase-bench's
    Retrain row): the relearn figures, cached in output/relearn.json."""
    path = os.path.join(output, "relearn.json")
    if not os.path.isfile(path):
        import dataclasses

        from erase.models import load_backend
        from erase.testbeds.retrain import load_retrain
        from eval.attacks.config import attack_settings
        from eval.attacks.harness import attack_target, load_target

        settings = attack_settings(concept, "relearn", model=model, **relearn_flags(attacks, steps))
        base = load_backend(model)
        target = load_target(settings, backend=load_retrain(model, concept), label="retrain")
        target = dataclasses.replace(target, base_backend=base)
        figures = attack_target(target, settings, output, progress=False)["relearn"]
        os.makedirs(output, exist_ok=True)
        with open(path, "w") as file:
            json.dump(figures, file, indent=1)
    with open(path) as file:
        return json.load(file)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default="ddpm-digits",
        help="ddpm-digits, the one testbed with a class-removal evaluation and a Retrain",
    )
    parser.add_argument("--concept", default="3")
    parser.add_argument("--output", required=True, help="folder (resumable)")
    parser.add_argument("--part", choices=["all", "erase", "attack"], default="all")
    parser.add_argument(
        "--rows",
        default=",".join(ROWS),
        help=f"comma list of {', '.join(ROWS)} or name=erase-concept flags",
    )
    parser.add_argument(
        "--attacks",
        default=",".join(ATTACKS),
        help="data/tuning/lr, comma list; erase-attack runs every combination of the data, "
        "tunings and lrs named (forget/full/1e-4,retain/lora/1e-5 runs all eight)",
    )
    parser.add_argument(
        "--relearn-steps",
        default=CHECKPOINTS,
        type=lambda text: [int(step) for step in text.split(",")],
        help="checkpoints, comma list",
    )
    parser.add_argument(
        "--attack-rows",
        default=None,
        help="the rows to attack now, retrain among them (default: retrain and every row)",
    )
    args = parser.parse_args()
    if args.model != "ddpm-digits":
        parser.error(
            f"--model {args.model}: this script scores erasures by erase-concept's class-removal "
            "evaluation, which only ddpm-digits has; on sd-digits use erase-bench --attacks "
            "relearn --retrain (docs/attacks.md)."
        )
    rows = []
    for spec in (r for r in args.rows.split(",") if r):  # a name, or name=erase-concept flags
        name, _, flags = spec.partition("=")
        if flags:
            ROWS[name] = flags.split()
        rows.append(name)
    attacked = (args.attack_rows or ",".join(["retrain", *rows])).split(",")
    attacks = [a for a in args.attacks.split(",") if a]
    combined = relearn_flags(attacks)
    every = [
        f"{data}/{tuning}/{lr}"
        for data in combined["relearn_data"]
        for tuning in combined["relearn_tuning"]
        for lr in combined["relearn_lr"]
    ]
    if len(every) > len({parse_attack(a) for a in attacks}):  # the named ones are among them
        print(
            f"bench_relearn: --attacks runs every combination: {','.join(every)}", file=sys.stderr
        )
    summary = {"model": args.model, "concept": args.concept, "rows": {}}
    start = time.perf_counter()
    for row in rows:
        summary["rows"][row] = erase_row(
            row, args.model, args.concept, os.path.join(args.output, row)
        )
    first = summary["rows"][rows[0]] if rows else None
    summary["base"] = {"quality": first["base_quality"]} if first else {}
    summary["retrain"] = {
        "quality": retrain_quality(args.model, args.concept, os.path.join(args.output, "retrain"))
    }
    if args.part in ("all", "attack"):
        from eval.attacks.relearn import draw_relearn

        relearned = {}
        if "retrain" in attacked:
            folder = os.path.join(args.output, "attack", "retrain")
            relearned["retrain"] = attack_retrain(
                args.model, args.concept, folder, attacks, args.relearn_steps
            )
        for row in (r for r in rows if r in attacked):
            folder = os.path.join(args.output, "attack", row)
            unet = os.path.join(args.output, row)
            relearned[row] = attack_row(
                args.model, args.concept, unet, folder, attacks, args.relearn_steps
            )
        for name, figures in relearned.items():
            part = summary["retrain"] if name == "retrain" else summary["rows"][name]
            part["base_positive_rate"] = figures["base_positive_rate"]
            part["relearn"] = {
                c["label"]: {k: c[k] for k in ("steps_to_recover", "auc", "curve")}
                for c in figures["curves"]
            }
        summary["base"]["positive_rate"] = next(iter(relearned.values()))["base_positive_rate"]
        draw_relearn(relearned, os.path.join(args.output, "relearn.png"))
        summary["relearn_png"] = os.path.join(args.output, "relearn.png")
    summary["wall_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
