"""The saliency mask: exact fast threshold, exactly the requested count, bit-packed safetensors
round trip, the older bool format, mismatch and malformed-file errors."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from erase.errors import EraseError
from erase.models import load_backend
from erase.saliency import (
    BOOL_MASK_FORMAT,
    GradientFile,
    bisection_threshold,
    forget_loss_gradients,
    load_mask,
    mask_ratio,
    pack_mask,
    saliency_mask,
    save_mask,
    sort_threshold,
    top_k_threshold,
    unpack_mask,
)


def random_scores(seed, zeros=0.0, ties=False):
    generator = torch.Generator().manual_seed(seed)
    scores = [torch.rand(n, generator=generator) ** 3 for n in (1, 17, 1000, 4096, 20000)]
    if ties:  # values from a small set: every threshold falls in a large tie group
        scores = [(s * 8).floor() / 8 for s in scores]
    if zeros:
        scores = [s * (torch.rand(s.shape, generator=generator) >= zeros) for s in scores]
    return scores


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("kind", ["continuous", "ties", "zeros", "ties-and-zeros"])
def test_threshold_equals_sort_threshold(seed, kind):
    scores = random_scores(seed, zeros=0.7 if "zeros" in kind else 0.0, ties="ties" in kind)
    total = sum(s.numel() for s in scores)
    for keep in (1, 7, total // 10, total // 2, total - 3, total):
        assert top_k_threshold(scores, keep) == sort_threshold(scores, keep), keep


def test_bisection_fallback_equals_sort_threshold():
    scores = random_scores(0, zeros=0.5)
    total = sum(s.numel() for s in scores)
    for keep in (1, total // 3, total):
        assert bisection_threshold(scores, keep) == sort_threshold(scores, keep)


@pytest.mark.parametrize("zeros", [0.0, 0.5, 0.8])
@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.9])
def test_mask_keeps_exactly_the_requested_count(zeros, ratio):
    scores = random_scores(1, zeros=zeros, ties=True)
    gradients = {f"w{i}": s.clone() for i, s in enumerate(scores)}
    total = sum(s.numel() for s in scores)
    mask = saliency_mask(gradients, ratio)
    assert mask.kept() == round(ratio * total)
    flat_scores = torch.cat(scores)
    flat_mask = torch.cat([mask[name].flatten() for name in gradients])
    # Everything kept is at least everything dropped: a top-k.
    assert flat_scores[flat_mask].min() >= flat_scores[~flat_mask].max()


def test_ties_are_kept_earliest_first():
    gradients = {"a": torch.tensor([1.0, 0.0, 0.0]), "b": torch.tensor([0.0, 2.0, 0.0])}
    mask = saliency_mask(gradients, 0.5)  # keep 3 of 6: 2.0, 1.0 and the first zero
    assert mask["a"].tolist() == [True, True, False]
    assert mask["b"].tolist() == [False, True, False]


def test_mask_selects_the_largest_magnitudes():
    gradients = {"a": torch.tensor([-5.0, 0.1]), "b": torch.tensor([0.2, 4.0])}
    mask = saliency_mask(gradients, 0.5)
    assert mask["a"].tolist() == [True, False] and mask["b"].tolist() == [False, True]


def test_bad_ratio_is_an_error():
    with pytest.raises(EraseError):
        saliency_mask({"a": torch.ones(3)}, 1.5)


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5, 3)])
def test_pack_round_trip(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.5
    bits = pack_mask(mask)
    assert bits.dtype == torch.uint8 and bits.numel() == -(-mask.numel() // 8)
    assert torch.equal(unpack_mask(bits, shape), mask)


def test_mask_file_round_trip_is_bit_packed(tmp_path):
    unet = torch.nn.Linear(64, 32)
    gradients = {name: torch.randn(p.shape) for name, p in unet.named_parameters()}
    mask = saliency_mask(gradients, 0.5)
    path = str(tmp_path / "mask.safetensors")
    save_mask(mask, path, ratio=0.5, model="toy", concept="x")
    loaded = load_mask(path, unet, "toy")
    assert all(torch.equal(loaded[n], mask[n]) for n in mask)
    assert mask_ratio(loaded) == mask_ratio(mask) == 0.5
    weights = sum(p.numel() for p in unet.parameters())
    header_bytes = 2000  # safetensors JSON header with names, shapes and settings
    assert os.path.getsize(path) <= weights / 8 + header_bytes


def test_bool_format_masks_still_load(tmp_path):
    unet = torch.nn.Linear(3, 2)
    mask = {name: torch.rand(p.shape) > 0.5 for name, p in unet.named_parameters()}
    path = str(tmp_path / "old.safetensors")
    header = {"format": BOOL_MASK_FORMAT, "ratio": "0.5", "model": json.dumps("toy")}
    save_file(mask, path, metadata=header)
    loaded = load_mask(path, unet, "toy")
    assert all(torch.equal(loaded[n], mask[n]) for n in mask)


def test_mismatched_corrupt_and_malformed_masks_are_errors(tmp_path):
    unet = torch.nn.Linear(3, 2)
    mask = {name: torch.rand(p.shape) > 0.5 for name, p in unet.named_parameters()}
    path = str(tmp_path / "mask.safetensors")
    save_mask(mask, path, ratio=0.5, model="toy", concept="x")
    with pytest.raises(EraseError, match="does not fit"):
        load_mask(path, torch.nn.Linear(4, 2))
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(EraseError, match="corrupt"):
        load_mask(str(tmp_path / "broken.safetensors"), unet)
    bits = {name: pack_mask(m) for name, m in mask.items()}
    save_file(bits, str(tmp_path / "bad.safetensors"), metadata={
        "format": "erase-saliency-mask/2", "model": "not json {", "shapes": "{}"})  # fmt: skip
    with pytest.raises(EraseError, match="malformed"):
        load_mask(str(tmp_path / "bad.safetensors"), unet)


def test_forget_loss_gradients_cover_every_weight(tiny_sd_dir):
    backend = load_backend(tiny_sd_dir)
    latents = torch.randn(3, *backend.latent_shape)
    gradients = forget_loss_gradients(
        backend, latents, ["a photo of a nude person"] * 3, guidance_scale=7.5, batch_size=2
    )
    names = {name for name, _ in backend.unet.named_parameters()}
    assert gradients.keys() == names
    assert sum(int(g.count_nonzero()) for g in gradients.values()) > 0.5 * sum(
        g.numel() for g in gradients.values()
    )
    assert all(p.grad is None for p in backend.unet.parameters())


def test_forget_loss_gradients_are_those_of_the_guided_loss(tiny_sd_dir):
    """The conditional and unconditional passes share one UNet call; the gradient must be that
    of the reference's loss written with two calls."""
    backend = load_backend(tiny_sd_dir)
    latents = torch.randn(2, *backend.latent_shape, generator=torch.Generator().manual_seed(1))
    prompts = ["a photo of a nude person"] * 2
    gradients = forget_loss_gradients(
        backend, latents, prompts, guidance_scale=7.5, generator=torch.Generator().manual_seed(3)
    )
    generator, unet = torch.Generator().manual_seed(3), backend.unet
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, 1000, (2,), generator=generator)
    noisy = backend.noise_scheduler.add_noise(latents, noise, timesteps)
    eps_cond = backend.predict_noise(unet, noisy, timesteps, backend.encode(prompts))
    eps_uncond = backend.predict_noise(unet, noisy, timesteps, backend.unconditional(2))
    loss = -torch.nn.functional.mse_loss(8.5 * eps_cond - 7.5 * eps_uncond, noise)
    loss.backward()
    for name, param in unet.named_parameters():
        torch.testing.assert_close(gradients[name], param.grad, rtol=1e-3, atol=1e-6)
    assert sum(int(g.count_nonzero()) for g in gradients.values()) > 0


def test_forget_loss_gradients_in_micro_batches_equal_whole_batches(tiny_sd_dir):
    backend = load_backend(tiny_sd_dir)
    latents = torch.randn(5, *backend.latent_shape, generator=torch.Generator().manual_seed(1))
    prompts = ["a photo of a nude person"] * 5

    def gradients(micro_batch_size):
        return forget_loss_gradients(
            backend, latents, prompts, guidance_scale=7.5, batch_size=4,
            micro_batch_size=micro_batch_size, generator=torch.Generator().manual_seed(3),
        )  # fmt: skip

    whole, pieces = gradients(None), gradients(3)  # batches of 4 + 1, pieces of 3 + 1 and 1
    for name in whole:
        torch.testing.assert_close(pieces[name], whole[name], rtol=1e-3, atol=1e-6)
    assert sum(int(g.count_nonzero()) for g in whole.values()) > 0


@pytest.mark.parametrize("micro_batch_size", [None, 1])
def test_gradients_summed_on_the_host_give_the_on_device_mask_bit_for_bit(
    tiny_sd_dir, micro_batch_size
):
    backend = load_backend(tiny_sd_dir)
    latents = torch.randn(3, *backend.latent_shape, generator=torch.Generator().manual_seed(1))
    prompts = ["a photo of a nude person"] * 3

    def gradients(host_gradients):  # two batches of 2 + 1, in micro-batches or whole
        return forget_loss_gradients(
            backend, latents, prompts, guidance_scale=7.5, batch_size=2,
            micro_batch_size=micro_batch_size, generator=torch.Generator().manual_seed(3),
            host_gradients=host_gradients,
        )  # fmt: skip

    on_device, on_host = gradients(False), gradients(True)
    assert all(torch.equal(on_host[name], on_device[name]) for name in on_device)
    assert all(g.device.type == "cpu" for g in on_host.values())
    device_mask, host_mask = saliency_mask(on_device, 0.5), saliency_mask(on_host, 0.5)
    assert all(torch.equal(host_mask.bits[n], device_mask.bits[n]) for n in device_mask.bits)
    assert all(p.grad is None for p in backend.unet.parameters())
    assert 0 < device_mask.kept() < device_mask.total()


def gradient_file_of(gradients, folder):
    """A GradientFile holding `gradients` (each added in two parts, as two batches would)."""
    gradient_file = GradientFile({n: g.shape for n, g in gradients.items()}, str(folder))
    for name, gradient in gradients.items():
        first = gradient / 3
        gradient_file.add(name, first)
        gradient_file.add(name, gradient - first)
    return gradient_file


@pytest.mark.parametrize("kind", ["continuous", "ties", "zeros", "ties-and-zeros"])
@pytest.mark.parametrize("ratio", [1e-5, 0.1, 0.5, 0.9, 1.0])
def test_mask_from_a_gradient_file_equals_the_in_memory_mask(tmp_path, kind, ratio):
    scores = random_scores(2, zeros=0.7 if "zeros" in kind else 0.0, ties="ties" in kind)
    signs = [torch.where(torch.rand(s.shape) < 0.5, -1.0, 1.0) for s in scores]
    gradients = {f"w{i}": s * sign for i, (s, sign) in enumerate(zip(scores, signs))}
    with gradient_file_of(gradients, tmp_path) as gradient_file:
        summed = {name: torch.from_numpy(gradient_file.read(name)) for name in gradients}
        in_memory = saliency_mask({n: g.clone() for n, g in summed.items()}, ratio)
        from_file = saliency_mask(gradient_file, ratio)
    assert all(torch.equal(from_file.bits[n], in_memory.bits[n]) for n in gradients)
    assert from_file.shapes == in_memory.shapes
    assert from_file.kept() == max(1, round(ratio * from_file.total()))
    assert os.listdir(tmp_path) == []  # the file has no name; closed, it is gone


def test_gradient_file_sums_as_memory_does(tmp_path):
    generator = torch.Generator().manual_seed(4)
    parts = [torch.randn(3, 5, generator=generator) for _ in range(3)]
    with GradientFile({"w": (3, 5), "unused": (2,)}, str(tmp_path)) as gradient_file:
        for part in parts:
            gradient_file.add("w", part)
        expected = parts[0].clone().add_(parts[1]).add_(parts[2])
        assert torch.equal(torch.from_numpy(gradient_file.read("w")).view(3, 5), expected)
        assert gradient_file.read("unused").tolist() == [0.0, 0.0]


@pytest.mark.parametrize("micro_batch_size", [None, 1])
def test_gradients_summed_on_disk_give_the_in_memory_mask_bit_for_bit(
    tiny_sd_dir, tmp_path, micro_batch_size
):
    backend = load_backend(tiny_sd_dir)
    latents = torch.randn(3, *backend.latent_shape, generator=torch.Generator().manual_seed(1))
    prompts = ["a photo of a nude person"] * 3
    shapes = {name: p.shape for name, p in backend.unet.named_parameters()}

    def gradients(gradient_file=None):  # two batches of 2 + 1, in micro-batches or whole
        return forget_loss_gradients(
            backend, latents, prompts, guidance_scale=7.5, batch_size=2,
            micro_batch_size=micro_batch_size, generator=torch.Generator().manual_seed(3),
            gradient_file=gradient_file,
        )  # fmt: skip

    in_memory = gradients()
    with GradientFile(shapes, str(tmp_path)) as gradient_file:
        assert gradients(gradient_file) is gradient_file
        summed = {n: torch.from_numpy(gradient_file.read(n)).view(s) for n, s in shapes.items()}
        assert all(torch.equal(summed[name], in_memory[name]) for name in in_memory)
        disk_mask = saliency_mask(gradient_file, 0.5)
    memory_mask = saliency_mask(in_memory, 0.5)
    assert all(torch.equal(disk_mask.bits[n], memory_mask.bits[n]) for n in memory_mask.bits)
    assert all(p.grad is None for p in backend.unet.parameters())


def test_nan_gradients_in_a_file_are_an_error(tmp_path):
    gradients = {"a": torch.tensor([1.0, float("nan"), 2.0]), "b": torch.ones(5)}
    with gradient_file_of(gradients, tmp_path) as gradient_file:
        with pytest.raises(EraseError, match="NaN"):
            saliency_mask(gradient_file, 0.5)


def test_nan_gradients_are_an_error():
    gradients = {"a": torch.tensor([1.0, float("nan"), 2.0]), "b": torch.ones(5)}
    with pytest.raises(EraseError, match="NaN"):
        saliency_mask(gradients, 0.5)


def test_erase_concept_with_the_mask_offloaded_to_disk_is_the_same_run(tiny_sd_args, tmp_path):
    from safetensors.torch import load_file

    from erase.cli.concept import erase_concept_main

    outputs = {}
    for offload in ("memory", "disk"):
        output = tmp_path / offload
        flags = [*tiny_sd_args, "--output", str(output), "--mask-offload", offload]
        assert erase_concept_main(flags) == 0
        outputs[offload] = output
    for name in ("mask.safetensors", "unet/diffusion_pytorch_model.safetensors"):
        memory, disk = (load_file(str(outputs[o] / name)) for o in ("memory", "disk"))
        assert all(torch.equal(memory[key], disk[key]) for key in memory), name
    assert sorted(os.listdir(tmp_path)) == ["disk", "memory"]  # no gradient file left


def test_a_bad_mask_offload_is_one_line(tiny_sd_args, tmp_path, capsys):
    from erase.cli.concept import erase_concept_main

    output = tmp_path / "run"
    flags = [*tiny_sd_args, "--output", str(output), "--mask-offload", "swap"]
    assert erase_concept_main(flags) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--mask-offload" in err, err
    assert not output.exists()
