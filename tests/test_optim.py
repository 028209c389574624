"""The masked optimizer's 8-bit moments (--optimizer adam8bit): the library's own quantization,
an update within 1 % of fp32 Adam's, masked weights only, a resume equal to one run, and one line
where the library cannot run."""

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

import erase.train as train_module
from erase.cli.concept import erase_concept_main
from erase.models import load_backend
from erase.optim import BLOCK, MIN_8BIT_SIZE, MaskedAdam, QuantizedMoments
from erase.saliency import load_mask, pack_bool_mask

bitsandbytes_functional = pytest.importorskip("bitsandbytes.functional")


def test_quantized_moments_round_trip_through_the_librarys_quantization():
    # Three parameters of sizes that end inside a block: each starts on a block boundary.
    sizes = [BLOCK + 7, 3, 2 * BLOCK]
    segments, start = [], 0
    for size in sizes:
        segments.append((start, start + size))
        start += size
    # each parameter masked to its size here, from parameters big enough for 8-bit moments
    moments = QuantizedMoments(
        [(first, last, MIN_8BIT_SIZE) for first, last in segments], torch.device("cpu")
    )
    generator = torch.Generator().manual_seed(0)
    written = [
        (torch.randn(size, generator=generator), torch.rand(size, generator=generator) * 1e-3)
        for size in sizes
    ]
    for (first, last), values in zip(segments, written):
        moments.write(first, last, *values)
    signed = bitsandbytes_functional.create_dynamic_map(signed=True)
    unsigned = bitsandbytes_functional.create_dynamic_map(signed=False)
    for (first, last), values in zip(segments, written):
        for value, read, code in zip(values, moments.read(first, last), (signed, unsigned)):
            codes, state = bitsandbytes_functional.quantize_blockwise(
                value, code=code, blocksize=BLOCK
            )
            expected = bitsandbytes_functional.dequantize_blockwise(codes, state)
            assert torch.equal(read, expected)
            assert 0 < (read - value).abs().max() <= 0.02 * value.abs().max()
    # the codes of 8-bit moments: 1 byte per entry (block-padded) plus one absmax per block
    padded = sum(-(-size // BLOCK) * BLOCK for size in sizes)
    assert moments.nbytes() == 2 * (padded + 4 * padded // BLOCK)


def test_small_parameters_keep_fp32_moments():
    # bitsandbytes' Adam8bit keeps fp32 state for tensors under min_8bit_size entries
    moments = QuantizedMoments(
        [(0, 5, MIN_8BIT_SIZE - 1), (5, 5, 10), (5, 9, MIN_8BIT_SIZE)], "cpu"
    )
    small = (torch.randn(5), torch.rand(5))
    moments.write(0, 5, *small)
    exp_avg, exp_avg_sq = moments.read(0, 5)
    exp_avg.copy_(small[0]), exp_avg_sq.copy_(small[1])  # fp32 moments are views, kept as written
    assert all(torch.equal(read, value) for read, value in zip(moments.read(0, 5), small))
    assert moments.nbytes() == 2 * (5 * 4 + BLOCK + 4)


def tiny_step_gradients(backend, steps):
    """The gradients of a denoising loss of the tiny UNet at `steps` fresh batches (at its own
    weights: both optimizers then see the same gradients)."""
    generator = torch.Generator().manual_seed(3)
    cond = backend.encode(["a photo of a nude person"] * 2)
    gradients = []
    for _ in range(steps):
        latents = torch.randn(2, *backend.latent_shape, generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, 1000, (2,), generator=generator)
        noisy = backend.noise_scheduler.add_noise(latents, noise, timesteps)
        loss = torch.nn.functional.mse_loss(
            backend.predict_noise(backend.unet, noisy, timesteps, cond), noise
        )
        gradients.append(torch.autograd.grad(loss, list(backend.unet.parameters())))
    return gradients


# The bound: measured here 0.5-0.9 % at steps 2-10 (docs/memory.md), with the small
# parameters' fp32 moments; 8-bit moments for every parameter gave 1.7-3.2 %.
UPDATE_TOLERANCE = 0.01


def test_adam8bit_update_stays_near_fp32_adam_each_step(tiny_sd_dir):
    backend = load_backend(tiny_sd_dir)
    named = list(backend.unet.named_parameters())
    generator = torch.Generator().manual_seed(2)
    mask = pack_bool_mask({n: torch.rand(p.shape, generator=generator) < 0.5 for n, p in named})
    base = [p.detach().clone() for _, p in named]
    exact = MaskedAdam(named, mask, lr=1e-3)
    quantized = MaskedAdam(named, mask, lr=1e-3, eight_bit=True)
    for step, gradients in enumerate(tiny_step_gradients(backend, 10)):
        updates = []
        for optimizer in (exact, quantized):
            with torch.no_grad():  # both step from the same weights with the same gradient
                for (_, param), value in zip(named, base):
                    param.copy_(value)
            for (_, param), gradient in zip(named, gradients):
                param.grad = gradient.clone()
            optimizer.update(None)
            updates.append(
                torch.cat([(p.detach() - v).flatten() for (_, p), v in zip(named, base)])
            )
        exact_update, quantized_update = updates
        relative = (quantized_update - exact_update).norm() / exact_update.norm()
        assert relative < UPDATE_TOLERANCE, (step, float(relative))
        # the first step reads fp32 moments (zeros) in both; later ones the quantized ones
        assert (relative == 0) == (step == 0), (step, float(relative))
    # 2 bytes a masked weight plus one absmax per block, and 8 a masked weight of the small
    # tensors (most of the tiny model, a few MB at SD scale)
    counts = [(mask.count(name), param.numel()) for name, param in named]
    small = sum(count for count, size in counts if size < MIN_8BIT_SIZE)
    blocks = sum(-(-count // BLOCK) for count, size in counts if size >= MIN_8BIT_SIZE)
    assert quantized.state_bytes()["optimizer"] == 8 * small + 2 * blocks * (BLOCK + 4)


def test_masked_adam8bit_over_every_weight_matches_bitsandbytes_adam8bit(tiny_sd_dir):
    import bitsandbytes

    backend = load_backend(tiny_sd_dir)
    named = list(backend.unet.named_parameters())
    everything = pack_bool_mask({n: torch.ones(p.shape, dtype=torch.bool) for n, p in named})
    ours = MaskedAdam(named, everything, lr=1e-3, eight_bit=True)
    base = [p.detach().clone() for _, p in named]
    library = bitsandbytes.optim.Adam8bit([p for _, p in named], lr=1e-3)
    for gradients in tiny_step_gradients(backend, 3):
        weights = []
        for step in (lambda: ours.update(None), library.step):
            with torch.no_grad():
                for (_, param), value in zip(named, base):
                    param.copy_(value)
            for (_, param), gradient in zip(named, gradients):
                param.grad = gradient.clone()
            step()
            weights.append([p.detach().clone() for _, p in named])
        # the same moments and codes; fp32 Adam's arithmetic in another order: a few ulps of the
        # weights, 1e-3 of the learning rate's step
        assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(*weights))


def erase_args(tiny_sd_args, output, *extra):
    return [*tiny_sd_args, "--lr", "1e-3", "--output", str(output), *extra]


@pytest.mark.parametrize("method", ["salun", "esd-x", "fmn"])
def test_adam8bit_moves_only_what_the_method_trains(tiny_sd_dir, tiny_sd_args, tmp_path, method):
    base = load_backend(tiny_sd_dir).unet.state_dict()
    output = tmp_path / method
    extra = ["--method", method, "--optimizer", "adam8bit"]
    extra += ["--fmn-ti-steps", "0"] if method == "fmn" else []
    assert erase_concept_main(erase_args(tiny_sd_args, output, *extra)) == 0
    erased = load_file(str(output / "unet" / "diffusion_pytorch_model.safetensors"))
    metadata = json.loads((output / "metadata.json").read_text())
    assert metadata["train_config"]["eight_bit"] is True
    assert metadata["changed_weights"] > 0
    if method == "salun":
        mask = load_mask(str(output / "mask.safetensors"), load_backend(tiny_sd_dir).unet)
        for name, value in erased.items():
            assert torch.equal(value[~mask[name]], base[name][~mask[name]]), name
    if method == "esd-x":  # bitsandbytes' Adam8bit on cross-attention: nothing else moves
        for name, value in erased.items():
            assert "attn2" in name or torch.equal(value, base[name]), name


def test_adam8bit_resumed_run_equals_an_uninterrupted_one(tiny_sd_args, tmp_path, monkeypatch):
    original = train_module.save_checkpoint

    def crash_after_first_checkpoint(accelerator, folder, step):
        original(accelerator, folder, step)
        raise KeyboardInterrupt

    extra = ["--optimizer", "adam8bit", "--steps", "4", "--checkpoint-every", "2"]
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "save_checkpoint", crash_after_first_checkpoint)
        with pytest.raises(KeyboardInterrupt):
            erase_concept_main(erase_args(tiny_sd_args, resumed, *extra))
    assert erase_concept_main(erase_args(tiny_sd_args, resumed, *extra, "--resume")) == 0
    assert erase_concept_main(erase_args(tiny_sd_args, straight, *extra)) == 0
    weights = "unet/diffusion_pytorch_model.safetensors"
    first, second = (load_file(str(folder / weights)) for folder in (resumed, straight))
    assert all(torch.equal(first[name], second[name]) for name in second)
    metadata = json.loads((resumed / "metadata.json").read_text())
    assert metadata["train_result"]["resumed_from"] == 2


def test_adam8bit_without_a_working_library_is_one_line(
    tiny_sd_args, tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails, as where not installed
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    started = []
    monkeypatch.setattr("erase.erasure.load_backend", lambda *a, **k: started.append(1))
    output = tmp_path / "run"
    assert erase_concept_main(erase_args(tiny_sd_args, output, "--optimizer", "adam8bit")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bitsandbytes" in err and "adam8bit" in err, err
    assert not started and not output.exists()
