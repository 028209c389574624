"""Throughput of the evaluation: NudeNet images per second and generation images per second.

    python scripts/bench_eval.py                      # tiny SD pipeline, CPU
    python scripts/bench_eval.py --model sd-v1-4 --gen-images 16 --num-steps 50 --resolution 512

Prints JSON. NudeNet runs over `--images` synthetic PNGs of `--size` px (smooth random colour
fields with shapes, written to a temporary folder, read back from disk as in an evaluation).
Generation runs erase.evaluate without metrics (erase-eval's runner, PNG writing and index
included) on `--model`, by default the tiny random pipeline of erase.testing, built in a
temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageDraw


def synthetic_images(folder: str, count: int, size: int, seed: int = 0) -> list[str]:
    """`count` PNGs of smooth colour fields with a few ellipses, so the detector sees structure."""
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x, y = rng.integers(0, size, 2)
            r = int(rng.integers(size // 16, size // 4))
            draw.ellipse(
                (x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3))
            )
        path = os.path.join(folder, f"{index:04d}.png")
        image.save(path)
        paths.append(path)
    return paths


def bench_nudenet(folder: str, count: int, size: int) -> dict:
    """NudeNet's detector over `count` image files: load time and images per second."""
    from eval.nudity import load_detector, nudity_score

    paths = synthetic_images(folder, count, size)
    started = time.perf_counter()
    detector = load_detector()
    load_s = time.perf_counter() - started
    nudity_score(paths[:2], detector=detector)  # warm-up
    started = time.perf_counter()
    report, _ = nudity_score(paths, detector=detector)
    seconds = time.perf_counter() - started
    return {
        "images": count,
        "size": size,
        "load_s": round(load_s, 3),
        "seconds": round(seconds, 3),
        "images_per_second": round(count / seconds, 2),
        "images_with_exposed": report["images_with_exposed"],
    }


def bench_generation(model: str, folder: str, count: int, args) -> dict:
    """erase.evaluate (erase-eval's runner) generating `count` images, one prompt each, into an
    empty folder, without metrics."""
    import erase

    started = time.perf_counter()
    backend = erase.load_model(model)
    load_s = time.perf_counter() - started
    words = ["a photo of a cat", "a photo of a dog", "a painting of a house", "a tree"]
    prompts = os.path.join(folder, "prompts.txt")
    with open(prompts, "w") as file:  # one a line: row r gets seed r, as in a prompt CSV
        file.write("\n".join(words[row % len(words)] for row in range(count)) + "\n")
    settings = {
        "metrics": "none",
        "num_steps": args.num_steps,
        "resolution": args.resolution,
        "batch_size": args.batch_size,
        "no_progress": True,
    }
    warm = os.path.join(folder, "warm")
    erase.evaluate(backend, prompts, output=warm, limit=args.batch_size, **settings)
    results = erase.evaluate(backend, prompts, output=os.path.join(folder, "run"), **settings)
    seconds = results["generation"]["seconds"]
    return {
        "model": model,
        "images": count,
        "resolution": args.resolution or backend.resolution,
        "num_steps": args.num_steps,
        "batch_size": args.batch_size,
        "load_s": round(load_s, 3),
        "seconds": seconds,
        "images_per_second": round(count / seconds, 3),
        "device": str(backend.device),
    }


def main() -> None:
    """Run both benchmarks and print one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="NudeNet images")
    parser.add_argument("--size", type=int, default=256, help="NudeNet image size (px)")
    parser.add_argument("--model", default=None, help="default: the tiny random SD pipeline")
    parser.add_argument("--gen-images", type=int, default=32)
    parser.add_argument("--num-steps", type=int, default=10)
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as folder:
        model = args.model
        if model is None:
            from erase.testing import save_tiny_sd

            model = save_tiny_sd(os.path.join(folder, "tiny-sd"))
        result = {
            "nudenet": bench_nudenet(folder, args.images, args.size),
            "generation": bench_generation(model, folder, args.gen_images, args),
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "load_average": list(os.getloadavg()),
            "machine": platform.machine(),
        }
        if args.model is None:
            result["generation"]["model"] = "erase.testing tiny SD (random, ~100 k weights)"
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
