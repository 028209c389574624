"""The saliency mask: exact fast threshold, requested share, safetensors round trip, mismatch errors."""

import pytest
import torch

from erase.errors import EraseError
from erase.models import load_backend
from erase.saliency import (
    forget_loss_gradients,
    load_mask,
    saliency_mask,
    save_mask,
    sort_threshold,
    top_k_threshold,
)


@pytest.mark.parametrize("seed", range(5))
def test_bisection_threshold_equals_sort_threshold(seed):
    generator = torch.Generator().manual_seed(seed)
    scores = [torch.rand(n, generator=generator) ** 3 for n in (1, 17, 1000, 4096)]
    scores.append(torch.zeros(50))  # zero gradients, as frozen layers give
    total = sum(s.numel() for s in scores)
    for keep in (1, 7, total // 2, total - 3, total):
        assert top_k_threshold(scores, keep) == sort_threshold(scores, keep)


def test_threshold_with_ties_keeps_the_whole_tie_group():
    scores = [torch.tensor([3.0, 2.0, 2.0, 2.0, 1.0])]
    assert top_k_threshold(scores, 2) == 2.0
    assert top_k_threshold(scores, 5) == 1.0


def test_mask_keeps_requested_share():
    generator = torch.Generator().manual_seed(0)
    gradients = {
        f"w{i}": torch.randn(n, generator=generator) for i, n in enumerate((10, 333, 5000))
    }
    for ratio in (0.1, 0.5, 0.9):
        mask = saliency_mask(gradients, ratio)
        kept = sum(int(m.sum()) for m in mask.values())
        assert kept == round(ratio * 5343)  # continuous random values: no ties
        assert all(m.dtype == torch.bool for m in mask.values())


def test_mask_selects_the_largest_magnitudes():
    gradients = {"a": torch.tensor([-5.0, 0.1]), "b": torch.tensor([0.2, 4.0])}
    mask = saliency_mask(gradients, 0.5)
    assert mask["a"].tolist() == [True, False] and mask["b"].tolist() == [False, True]


def test_bad_ratio_is_an_error():
    with pytest.raises(EraseError):
        saliency_mask({"a": torch.ones(3)}, 1.5)


def test_mask_round_trip_and_mismatch(tmp_path):
    unet = torch.nn.Linear(3, 2)
    mask = {name: torch.rand(p.shape) > 0.5 for name, p in unet.named_parameters()}
    path = str(tmp_path / "mask.safetensors")
    save_mask(mask, path, ratio=0.5, model="toy", concept="x")
    loaded = load_mask(path, unet, "toy")
    assert all(torch.equal(loaded[n], mask[n]) for n in mask)
    with pytest.raises(EraseError, match="does not fit"):
        load_mask(path, torch.nn.Linear(4, 2))
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(EraseError, match="corrupt"):
        load_mask(str(tmp_path / "broken.safetensors"), unet)


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
