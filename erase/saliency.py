"""Weight saliency: which weights the forgetting loss depends on most (SalUn, Fan et al. 2024).

The mask keeps the top `ratio` of all UNet weights by |gradient of the forgetting loss|, with
one global threshold. The threshold is found by bisection on the float bit patterns (31 counting
passes, no sort and no copy of all gradients), and the mask is stored as booleans.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from erase.errors import EraseError
from erase.models.base import Backend, Condition

MASK_FORMAT = "erase-saliency-mask/1"


def forget_loss_gradients(
    backend: Backend,
    forget_latents: torch.Tensor,
    forget_conditions: list[Condition],
    *,
    guidance_scale: float,
    batch_size: int = 8,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Sum over the forget set of d(-MSE(noise, guided eps))/dw for every UNet weight.

    The prediction is the classifier-free-guided one, (1 + g) eps(x_t, c) - g eps(x_t, ""),
    as in the reference SD/ code; t is uniform in [0, T) and the noise fresh per batch.
    """
    unet = backend.unet
    unet.requires_grad_(True)  # a previous run may have frozen it
    unet.zero_grad(set_to_none=True)
    generator = generator or torch.Generator().manual_seed(0)
    num_train_timesteps = backend.noise_scheduler.config.num_train_timesteps
    for start in tqdm(range(0, len(forget_latents), batch_size), desc="saliency", unit="batch"):
        latents = forget_latents[start : start + batch_size].to(backend.device)  # (B, C, h, w)
        conditions = forget_conditions[start : start + batch_size]
        noise = torch.randn(latents.shape, generator=generator).to(backend.device)
        timesteps = torch.randint(0, num_train_timesteps, (len(latents),), generator=generator)
        timesteps = timesteps.to(backend.device)
        noisy = backend.noise_scheduler.add_noise(latents, noise, timesteps)
        eps_cond = backend.predict_noise(unet, noisy, timesteps, backend.encode(conditions))
        eps_uncond = backend.predict_noise(
            unet, noisy, timesteps, backend.unconditional(len(latents))
        )
        guided = (1 + guidance_scale) * eps_cond - guidance_scale * eps_uncond
        loss = -torch.nn.functional.mse_loss(guided, noise)
        loss.backward()
    gradients = {}
    for name, param in unet.named_parameters():
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        gradients[name] = grad.detach().float()
        param.grad = None
    return gradients


def top_k_threshold(scores: Iterable[torch.Tensor], keep: int) -> float:
    """The `keep`-th largest value over all tensors of non-negative `scores`, without sorting.

    For non-negative float32 numbers the order of their int32 bit patterns is the order of
    the numbers, so a bisection over bit patterns finds the exact value in 31 counting passes.
    """
    scores = list(scores)
    total = sum(s.numel() for s in scores)
    if not 1 <= keep <= total:
        raise ValueError(f"keep must be in [1, {total}], got {keep}")
    if any(bool(torch.isnan(s).any()) for s in scores):
        raise EraseError("The saliency gradients contain NaN: the model or its inputs are broken.")

    def count_at_least(bits: int) -> int:
        value = torch.tensor(bits, dtype=torch.int32).view(torch.float32).item()
        return sum(int(torch.count_nonzero(s >= value)) for s in scores)

    low, high = 0, 0x7F800000  # count(+0.0) = total >= keep; +inf bits as the open upper end
    if count_at_least(high) >= keep:
        return float("inf")
    while high - low > 1:
        middle = (low + high) // 2
        if count_at_least(middle) >= keep:
            low = middle
        else:
            high = middle
    return torch.tensor(low, dtype=torch.int32).view(torch.float32).item()


def sort_threshold(scores: Iterable[torch.Tensor], keep: int) -> float:
    """The same threshold by a full sort: the exact reference, for tests and benchmarks only."""
    flat = torch.cat([s.detach().float().flatten() for s in scores])
    return torch.sort(flat, descending=True).values[keep - 1].item()


def saliency_mask(gradients: Mapping[str, torch.Tensor], ratio: float) -> dict[str, torch.Tensor]:
    """Boolean masks keeping the top `ratio` of all weights by |gradient|, one global threshold.

    The gradients are made absolute in place (no second copy of 860 M values at SD scale).
    """
    if not 0 < ratio <= 1:
        raise EraseError(f"--mask-ratio must be in (0, 1], got {ratio}.")
    scores = [g.abs_() for g in gradients.values()]
    total = sum(s.numel() for s in scores)
    threshold = top_k_threshold(scores, max(1, round(ratio * total)))
    return {name: (g >= threshold).cpu() for name, g in gradients.items()}


def structure_digest(unet: torch.nn.Module) -> str:
    """A hash of the UNet's parameter names and shapes: what a mask must match."""
    layout = [(name, list(p.shape)) for name, p in unet.named_parameters()]
    return hashlib.sha256(json.dumps(layout).encode()).hexdigest()[:16]


def save_mask(mask: Mapping[str, torch.Tensor], path: str, **metadata) -> None:
    """Write the mask as safetensors of bool tensors, with its settings as string metadata."""
    kept = sum(int(m.sum()) for m in mask.values())
    total = sum(m.numel() for m in mask.values())
    header = {"format": MASK_FORMAT, "kept": str(kept), "total": str(total)}
    header.update({key: json.dumps(value) for key, value in metadata.items()})
    save_file({name: m.contiguous() for name, m in mask.items()}, path, metadata=header)


def load_mask(
    path: str, unet: torch.nn.Module, identity: str | None = None
) -> dict[str, torch.Tensor]:
    """Read a mask and check that it fits `unet` parameter for parameter."""
    if not os.path.isfile(path):
        raise EraseError(f"Mask file '{path}' does not exist: pass a mask.safetensors of a run.")
    try:
        with safe_open(path, framework="pt") as file:
            header = file.metadata() or {}
            mask = {name: file.get_tensor(name) for name in file.keys()}
    except Exception:
        raise EraseError(
            f"'{path}' is not a readable safetensors mask: it is corrupt or truncated."
        ) from None
    if header.get("format") != MASK_FORMAT:
        raise EraseError(f"'{path}' is not an erase saliency mask (no '{MASK_FORMAT}' header).")
    shapes = {name: tuple(p.shape) for name, p in unet.named_parameters()}
    mismatched = [
        name
        for name in shapes.keys() | mask.keys()
        if name not in mask or name not in shapes or tuple(mask[name].shape) != shapes[name]
    ]
    if mismatched or any(m.dtype != torch.bool for m in mask.values()):
        raise EraseError(
            f"The mask '{path}' does not fit this model ({len(mismatched)} parameters differ, "
            f"e.g. '{sorted(mismatched)[0] if mismatched else 'dtype'}'): compute a new one."
        )
    saved_identity = json.loads(header.get("model", "null"))
    if identity and saved_identity and saved_identity != identity:
        warnings.warn(
            f"mask '{path}' was computed on '{saved_identity}', not '{identity}'", stacklevel=2
        )
    return mask


def mask_ratio(mask: Mapping[str, torch.Tensor]) -> float:
    """The share of weights the mask keeps."""
    return sum(int(m.sum()) for m in mask.values()) / sum(m.numel() for m in mask.values())
