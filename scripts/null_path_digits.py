"""Which digits a class-conditional testbed draws from its null class (the unconditional path
that classifier-free guidance subtracts), for the base model, Retrain and erased models.

    python scripts/null_path_digits.py --concept 5 ERASED_FOLDER [ERASED_FOLDER ...]

An erasure by remapping changes weights the null class shares with the forgotten one (and with
cond_drop > 0 trains the null class on the forget images itself); this shows whether the
unconditional path still draws the digit and what else it now favours.
Each model draws the same `--samples` start noises (seeds 0..N-1) at guidance 0 on the null
class, judged by the testbed's digit classifier. Prints JSON: per model, the share classified
as the concept's digit and the count of each digit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def null_class_counts(backend, samples: int, num_steps: int) -> list[int]:
    """How many of `samples` null-class samples the backend's classifier puts in each class."""
    import torch

    from eval.classify import backend_classifier, classify

    generators = [torch.Generator().manual_seed(seed) for seed in range(samples)]
    noise = torch.stack([torch.randn(tuple(backend.latent_shape), generator=g) for g in generators])
    labels = backend.unconditional(samples)
    images = backend.denoise(backend.unet, noise, labels, num_steps, 0.0, False, generators)
    images = ((images.clamp(-1, 1) + 1) / 2).expand(-1, 3, -1, -1)
    classifier = backend_classifier(backend, None)
    return torch.bincount(classify(classifier, images), minlength=backend.num_classes).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("erased", nargs="*", help="erase-concept output folders")
    parser.add_argument("--model", default="ddpm-digits", help="a class-conditional testbed")
    parser.add_argument("--concept", default="3", help="the erased digit (for Retrain)")
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from erase.models import load_backend
    from erase.testbeds.retrain import digit_index, load_retrain

    digit = digit_index(args.concept)
    models = {"base": load_backend(args.model), "retrain": load_retrain(args.model, args.concept)}
    for folder in args.erased:
        name = os.path.basename(os.path.normpath(folder))
        models[name] = load_backend(folder)  # an erase-concept output of the testbed
    summary = {"model": args.model, "concept": args.concept, "samples": args.samples}
    for name, backend in models.items():
        counts = null_class_counts(backend, args.samples, args.steps)
        summary[name] = {"share_of_concept": counts[digit] / args.samples, "counts": counts}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
