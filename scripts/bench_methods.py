"""Seconds per training step and peak memory of each method in the same trainer, and the ratios
to SalUn.

    python scripts/bench_methods.py                       # the tiny SD pipeline, on the CPU
    python scripts/bench_methods.py --model sd-v1-4 --steps 20 --batch-size 1   # on a GPU

Prints JSON. Each method runs in a fresh process on the same base model, the same random forget
and retain latents and the same training settings (batch size, steps, Adam at lr 1e-5, no
mixed precision), so only the method differs. Memory is the peak above what the loaded model
and data already hold, from the method's construction (ESD's frozen UNet copy) to the end of
training: CUDA's max_memory_allocated on a GPU, the process's resident memory sampled every
millisecond on the CPU (coarse at the tiny model's scale: allocator arenas dominate).
SalUn's saliency mask is computed before the timed steps and reported as `setup_seconds`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import tempfile
import threading
import time

import torch

METHODS = ("salun", "esd-u", "esd-x", "fmn")


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator on a GPU, sampled RSS on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = self.peak = resident_bytes()
            self.running = True
            self.sampler = threading.Thread(target=self.sample, daemon=True)
            self.sampler.start()
        return self

    def sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, resident_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.extra = torch.cuda.max_memory_allocated() - self.start
        else:
            self.running = False
            self.sampler.join()
            self.extra = max(self.peak, resident_bytes()) - self.start


def resident_bytes() -> int:
    """Resident set size of this process (Linux)."""
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def bench_method(name: str, args: argparse.Namespace) -> dict:
    """Build everything for `name`, run `args.steps` timed steps (after one warm-up), measure."""
    from erase.concepts import resolve_concept
    from erase.methods import get_method
    from erase.models import load_backend
    from erase.saliency import forget_loss_gradients, saliency_mask
    from erase.train import TrainConfig, make_accelerator, train

    if args.threads:
        torch.set_num_threads(args.threads)
    config = TrainConfig(lr=1e-5, steps=1, batch_size=args.batch_size, optimizer="adam")
    accelerator = make_accelerator(config)
    backend = load_backend(args.model, device=accelerator.device)
    concept = resolve_concept("nudity", conditioning=backend.conditioning)
    generator = torch.Generator().manual_seed(0)
    count = 2 * args.batch_size
    forget_latents = torch.randn(count, *backend.latent_shape, generator=generator)  # (N, C, h, w)
    retain_latents = torch.randn(count, *backend.latent_shape, generator=generator)
    forget = (forget_latents.to(backend.device), [concept.forget[0]] * count)
    retain = (retain_latents.to(backend.device), [concept.retain[0]] * count)
    method_class = get_method(name)
    defaults = method_class.defaults(backend, concept, count)
    method_config = method_class.Config(
        **{
            key: value
            for key, value in defaults.items()
            if key in method_class.Config.__dataclass_fields__
        }
    )
    with PeakMemory(backend.device) as peak:
        clock = time.perf_counter()
        method = method_class(backend, concept, method_config)
        mask = None
        if method.uses_mask:
            gradients = forget_loss_gradients(
                backend,
                forget_latents.to(backend.device),
                forget[1],
                guidance_scale=method_config.mask_guidance,
                batch_size=args.batch_size,
                generator=torch.Generator().manual_seed(0),
            )
            mask = saliency_mask(gradients, method_config.mask_ratio)
            del gradients
        setup_seconds = time.perf_counter() - clock
        train(accelerator, backend, method, forget, retain, config, mask)  # warm-up step
        config.steps = args.steps
        synchronize(backend.device)
        clock = time.perf_counter()
        result = train(accelerator, backend, method, forget, retain, config, mask)
        synchronize(backend.device)
        seconds = time.perf_counter() - clock
    return {
        "seconds_per_step": round(seconds / args.steps, 4),
        "peak_memory_mb": round(peak.extra / 2**20, 1),
        "setup_seconds": round(setup_seconds, 3),
        "trained_parameters": result.trained_parameters,
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the tiny SD pipeline, built here")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as folder:
        if args.model is None:
            from erase.testing import save_tiny_sd

            args.model = save_tiny_sd(os.path.join(folder, "tiny-sd"))
        names = args.methods.split(",")
        results = {}
        # One fresh process per method, one at a time: peaks and timings do not mix.
        spawn = multiprocessing.get_context("spawn")
        for name in names:
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
                results[name] = pool.submit(bench_method, name, args).result()
    report = {
        "model": "tiny-sd" if args.model.startswith(tempfile.gettempdir()) else args.model,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "steps": args.steps,
        "batch_size": args.batch_size,
        "threads": args.threads or torch.get_num_threads(),
        "methods": results,
    }
    if "salun" in results:
        salun = results["salun"]
        report["ratios_to_salun"] = {
            name: {
                "seconds_per_step": round(r["seconds_per_step"] / salun["seconds_per_step"], 2),
                "peak_memory": round(r["peak_memory_mb"] / max(salun["peak_memory_mb"], 0.1), 2),
            }
            for name, r in results.items()
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
