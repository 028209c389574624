"""What runs in its own processes or precision: two CPU processes (DDP over gloo) give the
artifact of one process, bf16 mixed precision trains with ESD's frozen copy in bf16, and
generation runs at the chosen precision over fp32 weights."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from erase.errors import EraseError
from erase.models import load_backend
from erase.saliency import load_mask


def run_cli(launcher, args, tmp_path, name, extra=()):
    """erase-concept in fresh processes on the CPU, one torch thread each; returns the output."""
    output = str(tmp_path / name)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.getcwd())
    command = [*launcher, "-m", "erase.cli", *args, *extra, "--output", output]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return output


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def unet_weights(output):
    return load_file(os.path.join(output, "unet", "diffusion_pytorch_model.safetensors"))


def test_two_processes_give_the_artifact_of_one(tiny_sd_dir, tiny_sd_args, tmp_path):
    # Two processes, batch 1 each, averaged by DDP == one process accumulating two batches of 1:
    # the same batches, noise and mask; the sums are only ordered differently.
    args = [*tiny_sd_args, "--batch-size", "1", "--lr", "1e-5"]
    two = run_cli(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
         "2", "--main_process_port", str(free_port())],
        args, tmp_path, "two",
    )  # fmt: skip
    one = run_cli([sys.executable], args, tmp_path, "one", ["--gradient-accumulation-steps", "2"])
    unet = load_backend(tiny_sd_dir).unet
    base = unet.state_dict()
    mask_one = load_mask(os.path.join(one, "mask.safetensors"), unet)
    mask_two = load_mask(os.path.join(two, "mask.safetensors"), unet)
    weights_one, weights_two = unet_weights(one), unet_weights(two)
    for name in base:
        assert torch.equal(mask_one[name], mask_two[name]), name
        outside = ~mask_one[name]
        assert torch.equal(weights_two[name][outside], base[name][outside]), name
        torch.testing.assert_close(weights_two[name], weights_one[name], rtol=0, atol=1e-6)
    assert sum(int((weights_two[n] != base[n]).sum()) for n in base) > 0


@pytest.mark.parametrize("method", ["esd-u", "salun"])
def test_bf16_mixed_precision_trains(tiny_sd_args, tmp_path, method):
    output = run_cli(
        [sys.executable], [*tiny_sd_args, "--method", method, "--mixed-precision", "bf16"],
        tmp_path, method,
    )  # fmt: skip
    with open(os.path.join(output, "metadata.json")) as file:
        metadata = json.load(file)
    state = metadata["train_result"]["state_bytes"]
    assert metadata["changed_weights"] > 0
    if method == "esd-u":  # the frozen copy of the trained weights is stored in bf16
        trained = metadata["train_result"]["trained_parameters"]
        assert state["frozen_copy"] == 2 * trained
    else:
        assert metadata["train_result"]["optimizer_state"].startswith("masked")


def test_generation_precision(tiny_sd_dir):
    backend = load_backend(tiny_sd_dir)
    prompts, seeds = ["a photo of a cat", "a painting of a dog"], [0, 1]

    def images(precision):
        backend.gen_precision = precision
        return backend.sample(prompts, seeds, num_steps=3, guidance_scale=7.5)

    full, default = images("fp32"), images("auto")
    assert torch.equal(full, default)  # auto is fp32 on the CPU
    half = images("bf16")
    assert not torch.equal(half, full)
    assert (half - full).abs().mean() < 0.05
    assert all(p.dtype == torch.float32 for p in backend.unet.parameters())
    with pytest.raises(EraseError, match="CUDA"):
        images("fp16")


def test_generated_sets_are_keyed_by_generation_precision(tiny_sd_dir, tmp_path):
    from erase.concepts import resolve_concept
    from erase.data import DataConfig, cache_folder

    backend = load_backend(tiny_sd_dir)
    concept = resolve_concept("nudity", conditioning="text")
    config = DataConfig(cache_dir=str(tmp_path))

    def folder(precision):
        backend.gen_precision = precision
        return cache_folder(backend, concept, config)

    assert folder("auto") == folder("fp32")  # auto is fp32 on the CPU: same images
    assert folder("bf16") != folder("fp32")  # half-precision images are not fp32's
