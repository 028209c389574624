"""Time and memory of the saliency mask: erase's exact top-k (sample bracket + selection, bit-packed
mask) vs the reference's double argsort.

    python scripts/bench_mask.py --weights 100000000
    python scripts/bench_mask.py --weights 860000000 --skip-reference   # SD v1.4's UNet size
    python scripts/bench_mask.py --weights 100000000 --zeros 0.6        # 60 % zero gradients

Prints JSON. The gradients are random, split into tensors shaped like a UNet's (many small, a
few large). The reference (OPTML-Group/Unlearn-Saliency, SD/generate_mask.py) concatenates all
|g|, argsorts twice to rank them, and builds an int64 mask per weight; we time exactly that.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from erase.saliency import saliency_mask


def fake_gradients(total: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random gradients in tensors of UNet-like sizes summing to `total` weights."""
    generator = torch.Generator(device=device).manual_seed(seed)
    sizes, remaining = [], total
    for size in (320 * 320 * 9, 640 * 640 * 9, 1280 * 1280 * 9, 1280 * 320, 320, 1280):
        while remaining > size and len(sizes) < 2000:
            sizes.append(size)
            remaining -= size
            if len(sizes) % 6 == 0:
                break
    while remaining > 0:
        sizes.append(min(remaining, 1280 * 1280 * 9))
        remaining -= sizes[-1]
    return {
        f"layer{i}.weight": torch.randn(size, generator=generator, device=device)
        for i, size in enumerate(sizes)
    }


def reference_mask(gradients: dict[str, torch.Tensor], ratio: float) -> dict[str, torch.Tensor]:
    """The reference's method: concatenate, argsort, argsort again for ranks, int64 masks."""
    flat = torch.cat([g.abs().flatten() for g in gradients.values()])
    ranks = torch.argsort(torch.argsort(flat, descending=True))
    keep = ranks < int(len(flat) * ratio)
    masks, start = {}, 0
    for name, gradient in gradients.items():
        masks[name] = keep[start : start + gradient.numel()].reshape(gradient.shape).long()
        start += gradient.numel()
    return masks


class Peak:
    """Extra peak memory of a block: CUDA allocator peak on GPU, max RSS growth on CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.clock = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.extra = torch.cuda.max_memory_allocated() - self.start
        else:
            self.extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.start
        self.seconds = time.perf_counter() - self.clock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=int, default=100_000_000)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--zeros", type=float, default=0.0, help="share of gradients set to 0")
    args = parser.parse_args()
    device = torch.device(args.device)
    gradients = fake_gradients(args.weights, device)
    if args.zeros:  # e.g. frozen or dead weights: a large tie group at zero
        generator = torch.Generator(device=device).manual_seed(1)
        for gradient in gradients.values():
            gradient.mul_(
                torch.rand(gradient.shape, generator=generator, device=device) >= args.zeros
            )
    # Ours first: on the CPU max RSS only grows, so the later reference run is measured above it.
    with Peak(device) as ours:
        mask = saliency_mask(gradients, args.ratio)
    result = {
        "weights": args.weights,
        "tensors": len(gradients),
        "device": str(device),
        "ratio": args.ratio,
        "zeros": args.zeros,
        "ours": {
            "seconds": round(ours.seconds, 3),
            "peak_extra_mb": round(ours.extra / 2**20, 1),
            "mask_mb": round(sum(b.numel() for b in mask.bits.values()) / 2**20, 1),  # 1 bit each
            "kept": mask.kept(),
            "kept_exactly_round_ratio_n": mask.kept() == round(args.ratio * args.weights),
        },
    }
    del mask
    if not args.skip_reference:
        with Peak(device) as reference:
            reference_masks = reference_mask(gradients, args.ratio)
        result["reference_double_argsort"] = {
            "seconds": round(reference.seconds, 3),
            "peak_extra_mb": round(reference.extra / 2**20, 1),
            "mask_mb": round(sum(m.numel() * 8 for m in reference_masks.values()) / 2**20, 1),
        }
        result["speedup"] = round(reference.seconds / ours.seconds, 2)
        result["memory_ratio"] = round(reference.extra / max(ours.extra, 1), 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
