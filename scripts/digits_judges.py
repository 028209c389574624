"""The remaining digits of a ddpm-digits model judged three ways under several samplers: the
project's classifier by argmax and at probability >= 0.9, and an independent judge (scikit-learn's
classic digits SVC on the native 8x8 scans, trained apart on the same train split).

    python scripts/digits_judges.py ERASED_UNET_DIR [--concept 3] [--per-class 60]

For the base model and the erased UNet, each sampler case generates `--per-class` images of every
digit (seeds other than the evaluation's) and reports each judge's accuracy on the digits other
than `--concept`, and the SVC's per digit. Prints JSON (docs/testbeds.md, "Judging the other
digits").
"""

from __future__ import annotations

import argparse
import json

import torch

SAMPLERS = {  # name: (DDIM eta, steps, guidance)
    "evaluation's (eta 1, 25 steps, w 2)": (1.0, 25, 2.0),
    "unguided (eta 1, 25 steps, w 0)": (1.0, 25, 0.0),
    "deterministic DDIM (eta 0, 50 steps, w 2)": (0.0, 50, 2.0),
    "eta 1, 100 steps, w 1": (1.0, 100, 1.0),
}


def main() -> None:
    from sklearn.svm import SVC

    from erase.api import load_model
    from erase.testbeds.digits import digits_dataset, load_digit_classifier
    from eval.classify import CONFIDENT, class_probabilities, generate_classes

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("unet", help="the erased UNet folder (an erase-concept output's unet/)")
    parser.add_argument("--concept", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=60)
    args = parser.parse_args()

    backend = load_model("ddpm-digits")
    erased = type(backend.unet).from_pretrained(args.unet).eval()
    classifier = load_digit_classifier(16)
    train_images, train_labels = digits_dataset(8, "train")  # (N, 1, 8, 8) in [0, 1]
    svc = SVC(gamma=0.001, C=10).fit(train_images.flatten(1).numpy() * 16, train_labels.numpy())
    test_images, test_labels = digits_dataset(8, "test")
    svc_test = (svc.predict(test_images.flatten(1).numpy() * 16) == test_labels.numpy()).mean()
    rows = []
    for sampler, (eta, steps, guidance) in SAMPLERS.items():
        backend.sampling_eta = eta
        for model, unet in (("base", None), ("erased", erased)):
            images, labels = generate_classes(
                backend, args.per_class, unet=unet, seed=1, num_steps=steps, guidance_scale=guidance
            )
            probabilities = class_probabilities(classifier, images)  # (K * n, 10)
            small = torch.nn.functional.interpolate(
                images.mean(1, keepdim=True), size=8, mode="area"
            )
            svc_predicted = torch.from_numpy(svc.predict(small.flatten(1).numpy() * 16))
            others = labels != args.concept
            right = probabilities.argmax(-1) == labels
            confident = probabilities.gather(1, labels[:, None]).squeeze(1) >= CONFIDENT
            rows.append(
                {
                    "sampler": sampler,
                    "model": model,
                    "cnn_others": round(float(right[others].float().mean()), 3),
                    "cnn_confident_others": round(float(confident[others].float().mean()), 3),
                    "svc_others": round(float((svc_predicted == labels)[others].float().mean()), 3),
                    "svc_per_digit": [
                        round(float((svc_predicted[labels == k] == k).float().mean()), 2)
                        for k in range(10)
                    ],
                }
            )
    print(json.dumps({"unet": args.unet, "svc_test_accuracy": round(float(svc_test), 4),
                      "per_class": args.per_class, "rows": rows}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
