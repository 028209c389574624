"""The testbeds: small models trained here, on data that packages ship, where erasure is
measured against the model retrained without the concept (docs/testbeds.md).

- `digits.py`: scikit-learn's handwritten digits and the digit classifier that judges them;
- `ddpm_training.py`, `ddpm_digits.py`, `ddpm_cifar10.py`: class-conditional DDPMs;
- `sd_digits.py`, `small_sd.py`, `tokenizer.py`: a small text-to-image Stable Diffusion of digits;
- `retrain.py`: each testbed retrained without one digit (the gold standard of unlearning);
- `datasets.py`: the datasets a saved DDPM folder names.
"""
