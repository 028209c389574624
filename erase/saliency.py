"""Weight saliency: which weights the forgetting loss depends on most (SalUn, Fan et al. 2024).

The mask keeps exactly the top `round(ratio * N)` of all N UNet weights by |gradient of the
forgetting loss|, with one global threshold; weights equal to the threshold are kept earliest
first (in parameter order) until the count is reached, so that many equal values (zero
gradients) cannot make the mask keep more. The threshold is exact without a sort: a random
sample brackets it, one pass counts what lies above the bracket and collects the few values
inside it, and a selection among those gives the value. The mask is bit-packed (1 bit per
weight) in memory and on disk.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from erase.errors import EraseError
from erase.models.base import Backend, Condition, denoising_target
from erase.offload import read_at, write_at

MASK_FORMAT = "erase-saliency-mask/2"  # bit-packed uint8 tensors + their shapes
BOOL_MASK_FORMAT = "erase-saliency-mask/1"  # one bool tensor per parameter (still loads)
SAMPLE_SIZE = 1 << 20  # values sampled to bracket the threshold


def forget_loss_gradients(
    backend: Backend,
    forget_latents: torch.Tensor,
    forget_conditions: list[Condition],
    *,
    guidance_scale: float,
    batch_size: int = 8,
    micro_batch_size: int | None = None,
    generator: torch.Generator | None = None,
    host_gradients: bool = True,
    gradient_file: GradientFile | None = None,
) -> dict[str, torch.Tensor] | GradientFile:
    """Sum over the forget set of d(-MSE(noise, guided eps))/dw for every UNet weight.

    The prediction is the classifier-free-guided one, (1 + g) eps(x_t, c) - g eps(x_t, ""),
    as in the reference SD/ code; t is uniform in [0, T) and the noise fresh per batch. With
    `micro_batch_size`, each batch's noise and timesteps are drawn whole and the batch goes
    through the UNet in pieces whose losses are weighted by their share: the same gradient with
    the activations of a micro-batch.

    With `host_gradients` (the default) each parameter's gradient leaves the device as soon as
    backward has accumulated it and is added up in host memory (the same fp32 additions in the
    same order as .grad's, so the same bits): the device never holds the dense gradient, only
    the weights, the activations and one parameter's gradient. The gradients come back on the
    host; without `host_gradients`, where the UNet is. With a `gradient_file`, the sums are kept
    in that file instead (the same additions again), which is returned.
    """
    unet = backend.unet
    unet.requires_grad_(True)  # a previous run may have frozen it
    unet.zero_grad(set_to_none=True)
    host: dict[str, torch.Tensor] = {}

    def add(param, name):
        if gradient_file is not None:
            to_file(param, name, gradient_file)
        else:
            to_host(param, name, host)

    hooks = [
        param.register_post_accumulate_grad_hook(lambda param, name=name: add(param, name))
        for name, param in unet.named_parameters()
    ] if host_gradients or gradient_file is not None else []  # fmt: skip
    try:
        sum_forget_gradients(
            backend, forget_latents, forget_conditions, guidance_scale, batch_size,
            micro_batch_size, generator or torch.Generator().manual_seed(0),
        )  # fmt: skip
    finally:
        for hook in hooks:
            hook.remove()
    if gradient_file is not None:
        return gradient_file
    gradients = {}
    for name, param in unet.named_parameters():
        grad = host.pop(name, None) if host_gradients else param.grad
        if grad is None:
            grad = torch.zeros(param.shape, device="cpu" if host_gradients else param.device)
        gradients[name] = grad.detach().float()
        param.grad = None
    return gradients


@torch.no_grad()
def to_host(param: torch.nn.Parameter, name: str, host: dict[str, torch.Tensor]) -> None:
    """Add one parameter's freshly accumulated gradient to its sum in host memory; free it."""
    if name in host:
        host[name].add_(param.grad.to("cpu"))
    else:
        host[name] = param.grad.to("cpu", copy=True)
    param.grad = None


@torch.no_grad()
def to_file(param: torch.nn.Parameter, name: str, gradient_file: GradientFile) -> None:
    """Add one parameter's freshly accumulated gradient to its sum in `gradient_file`; free it."""
    gradient_file.add(name, param.grad)
    param.grad = None


class GradientFile:
    """The saliency gradients summed in an unnamed file, parameter after parameter in fp32,
    read and written with ordinary file I/O (no mmap): between passes they are page cache, which
    the kernel may write out, not the process's memory. Deleted when closed (or the process ends).
    """

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], folder: str):
        self.shapes = {name: tuple(shape) for name, shape in shapes.items()}
        self.offsets, offset = {}, 0
        for name, shape in self.shapes.items():
            self.offsets[name] = offset
            offset += 4 * math.prod(shape)
        self.file = tempfile.TemporaryFile(dir=folder)
        self.file.truncate(offset)  # a parameter without gradient reads as zeros
        self.written: set[str] = set()

    def __enter__(self) -> GradientFile:
        return self

    def __exit__(self, *error) -> None:
        self.close()

    def close(self) -> None:
        """Delete the file."""
        self.file.close()

    def numel(self) -> int:
        """How many gradient values the file holds."""
        return sum(math.prod(shape) for shape in self.shapes.values())

    def read(self, name: str) -> np.ndarray:
        """One parameter's summed gradient, flat fp32."""
        values = np.empty(math.prod(self.shapes[name]), dtype=np.float32)
        error = f"the saliency gradient file ends inside '{name}'"
        read_at(self.file, memoryview(values).cast("B"), self.offsets[name], error)
        return values

    def add(self, name: str, grad: torch.Tensor) -> None:
        """Add one gradient to its parameter's sum: its first is copied, later ones added in the
        gradient's dtype, as `to_host` adds them in memory (the same bits)."""
        grad = grad.detach().to("cpu")
        if name in self.written:
            total = torch.from_numpy(self.read(name)).to(grad.dtype).view(grad.shape)
            grad = total.add_(grad)
        buffer = memoryview(grad.float().contiguous().reshape(-1).numpy()).cast("B")
        write_at(self.file, buffer, self.offsets[name])
        self.written.add(name)

    def score_bits(self, name: str) -> np.ndarray:
        """The bit patterns of one parameter's |gradient|, as int32: for non-negative floats
        their order is the numbers' order."""
        bits = self.read(name).view(np.int32)
        np.bitwise_and(bits, 0x7FFFFFFF, out=bits)  # the sign bit cleared: |g|
        if np.any(bits > 0x7F800000):  # NaN
            raise EraseError(
                "The saliency gradients contain NaN: the model or its inputs are broken."
            )
        return bits


def file_top_k_masks(gradient_file: GradientFile, keep: int) -> dict[str, torch.Tensor]:
    """Packed masks keeping exactly `keep` gradients of `gradient_file` by |value|: all above the
    keep-th largest and, of those equal to it, the earliest, as `top_k_selection` keeps them.

    The threshold is a radix selection over the float bit patterns, one parameter in memory at a
    time: a pass counts the high 16 bits, a second the low 16 bits inside the bucket that holds
    the keep-th largest, and a third packs the masks.
    """
    names = list(gradient_file.shapes)
    high = np.zeros(1 << 15, dtype=np.int64)  # sign bit clear: 15 high bits
    for name in names:
        high += np.bincount(gradient_file.score_bits(name) >> 16, minlength=1 << 15)
    bucket, rank = select_bucket(high, keep)
    low = np.zeros(1 << 16, dtype=np.int64)
    for name in names:
        bits = gradient_file.score_bits(name)
        low += np.bincount(bits[(bits >> 16) == bucket] & 0xFFFF, minlength=1 << 16)
    position, ties = select_bucket(low, rank)
    threshold = (bucket << 16) | position
    packed = {}
    for name in names:
        bits = gradient_file.score_bits(name)
        packed[name] = pack_mask(torch.from_numpy(bits > threshold))
        if ties > 0:
            tied = true_positions(torch.from_numpy(bits == threshold))[:ties]
            set_bits(packed[name], tied)
            ties -= tied.numel()
    return packed


def select_bucket(counts: np.ndarray, rank: int) -> tuple[int, int]:
    """(the bucket holding the rank-th largest value of a histogram, that value's rank within
    its bucket, counted from the bucket's top)."""
    at_least = np.cumsum(counts[::-1])[::-1]  # at_least[b]: values in buckets >= b
    bucket = int(np.flatnonzero(at_least >= rank)[-1])
    return bucket, rank - int(at_least[bucket] - counts[bucket])


def sum_forget_gradients(
    backend, forget_latents, forget_conditions, guidance_scale, batch_size, micro_batch_size,
    generator,
) -> None:  # fmt: skip
    """The forget set's backward passes of `forget_loss_gradients`, batch by batch."""
    num_train_timesteps = backend.noise_scheduler.config.num_train_timesteps
    for start in tqdm(range(0, len(forget_latents), batch_size), desc="saliency", unit="batch"):
        latents = forget_latents[start : start + batch_size].to(backend.device)  # (B, C, h, w)
        conditions = forget_conditions[start : start + batch_size]
        noise = torch.randn(latents.shape, generator=generator).to(backend.device)
        timesteps = torch.randint(0, num_train_timesteps, (len(latents),), generator=generator)
        timesteps = timesteps.to(backend.device)
        piece = micro_batch_size or len(latents)
        for first in range(0, len(latents), piece):
            part = slice(first, first + piece)
            share = len(latents[part]) / len(latents)
            loss = guided_forget_loss(
                backend, latents[part], conditions[part], noise[part], timesteps[part],
                guidance_scale,
            )  # fmt: skip
            (loss * share if share != 1 else loss).backward()


def guided_forget_loss(backend, latents, conditions, noise, timesteps, guidance_scale):
    """-MSE between the guided prediction at x_t and its target (the noise, or v)."""
    noisy = backend.noise_scheduler.add_noise(latents, noise, timesteps)
    # Conditional and unconditional in one UNet call: each weight appears once in the graph,
    # so backward does not hold a second whole set of gradients until both passes are done.
    eps_cond, eps_uncond = backend.predict_noise(
        backend.unet,
        torch.cat([noisy, noisy]),
        torch.cat([timesteps, timesteps]),
        torch.cat([backend.encode(conditions), backend.unconditional(len(latents))]),
    ).chunk(2)
    guided = (1 + guidance_scale) * eps_cond - guidance_scale * eps_uncond
    target = denoising_target(backend.noise_scheduler, latents, noise, timesteps)
    return -torch.nn.functional.mse_loss(guided, target)


@dataclass
class PackedMask(Mapping):
    """A saliency mask, 1 bit per weight: per parameter, its bits packed 8 to a byte. It reads
    like a dict of bool tensors: `mask[name]` unpacks one parameter's."""

    bits: dict[str, torch.Tensor]  # uint8 (ceil(numel / 8),), little-endian within a byte
    shapes: dict[str, tuple[int, ...]]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.unpack(name)

    def __iter__(self):
        return iter(self.bits)

    def __len__(self) -> int:
        return len(self.bits)

    def unpack(self, name: str) -> torch.Tensor:
        """The bool mask of one parameter, in its shape."""
        return unpack_mask(self.bits[name], self.shapes[name])

    def count(self, name: str) -> int:
        """How many weights of one parameter the mask keeps."""
        return int(POPCOUNT.to(self.bits[name].device)[self.bits[name].int()].sum())

    def kept(self) -> int:
        """How many weights the mask keeps in all."""
        return sum(self.count(name) for name in self.bits)

    def total(self) -> int:
        """How many weights the mask covers."""
        return sum(math.prod(shape) for shape in self.shapes.values())


POPCOUNT = torch.tensor([bin(byte).count("1") for byte in range(256)])
BIT_WEIGHTS = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """The bits of a bool tensor packed 8 to a uint8, little-endian: (ceil(numel / 8),)."""
    flat = mask.reshape(-1)
    if flat.device.type == "cpu":
        return torch.from_numpy(np.packbits(flat.numpy(), bitorder="little"))
    padded = torch.zeros(-(-flat.numel() // 8) * 8, dtype=torch.uint8, device=flat.device)
    padded[: flat.numel()] = flat
    return (padded.view(-1, 8) * BIT_WEIGHTS.to(flat.device)).sum(1, dtype=torch.uint8)


def unpack_mask(bits: torch.Tensor, shape) -> torch.Tensor:
    """The bool tensor of `shape` whose entries are `bits` (as `pack_mask` wrote them)."""
    numel = math.prod(shape)
    flags = bits[:, None].bitwise_and(BIT_WEIGHTS.to(bits.device)).ne(0)  # (bytes, 8)
    return flags.view(-1)[:numel].view(shape)


def pack_bool_mask(mask: Mapping[str, torch.Tensor]) -> PackedMask:
    """A PackedMask from bool tensors by parameter name."""
    return PackedMask(
        {name: pack_mask(m.cpu()) for name, m in mask.items()},
        {name: tuple(m.shape) for name, m in mask.items()},
    )


def top_k_threshold(scores: Iterable[torch.Tensor], keep: int) -> float:
    """The `keep`-th largest value over all tensors of non-negative `scores`, without sorting."""
    return top_k_selection([s.reshape(-1) for s in scores], keep)[0]


def top_k_selection(scores: list[torch.Tensor], keep: int) -> tuple[float, list[torch.Tensor]]:
    """(threshold, packed masks) over 1-d tensors of non-negative `scores`: masks (as `pack_mask`
    writes them) keeping exactly `keep` values, all those above the threshold and, of those
    equal to it, the earliest ones.

    A random sample of 2^20 values brackets the threshold (its sample quantiles, widened by six
    standard errors); one pass per tensor packs the values above the bracket (they are kept) and
    collects the positions inside it; the threshold is a selection among those few. Heavy ties
    at the bracket's lower end (zero gradients) are settled by one more count, and a bracket that
    missed (probability ~1e-9) falls back to an exact bisection over the float bit patterns.
    """
    total = sum(s.numel() for s in scores)
    if not 1 <= keep <= total:
        raise ValueError(f"keep must be in [1, {total}], got {keep}")
    low, high = sample_bracket(scores, keep, total)
    largest = max(s.numel() for s in scores)
    device = scores[0].device
    above = torch.empty(largest, dtype=torch.bool, device=device)  # reused: no fresh pages
    between = torch.empty(largest, dtype=torch.bool, device=device)
    packed, inside, kept = [], [], 0  # per tensor: bits above; (positions, values) inside
    for score in scores:
        over, middle = above[: score.numel()], between[: score.numel()]
        torch.gt(score, high, out=over)
        torch.gt(score, low, out=middle)
        torch.logical_xor(middle, over, out=middle)  # low < score <= high
        positions = true_positions(middle)
        kept += count_true(over)
        packed.append(pack_mask(over))
        inside.append((positions, take(score, positions)))
    del above, between
    rank = keep - kept  # still to keep, from inside the bracket
    values = torch.cat([v.float().cpu() for _, v in inside])
    if 1 <= rank <= values.numel():
        threshold = values.kthvalue(values.numel() - rank + 1).values.item()
        ties = rank - int(torch.count_nonzero(values > threshold))
        for bits, (positions, candidate) in zip(packed, inside):
            tied = positions[candidate == threshold][:ties]
            set_bits(bits, torch.cat([positions[candidate > threshold], tied]))
            ties -= tied.numel()
        return threshold, packed
    del packed, inside
    if rank > values.numel() and count_at_least(scores, low) >= keep:
        threshold = low  # the threshold is `low` itself, a value many scores share
    else:
        threshold = bisection_threshold(scores, keep)
    return threshold, keep_at_threshold(scores, threshold, keep)


def keep_at_threshold(scores: list[torch.Tensor], threshold: float, keep: int):
    """Packed masks of the values above `threshold` plus the earliest ones equal to it, `keep`
    in all."""
    packed = []
    ties = keep - sum(int(torch.count_nonzero(s > threshold)) for s in scores)
    for score in scores:
        mask = score > threshold
        if ties > 0:
            tied = true_positions(score == threshold)[:ties]
            mask[tied] = True
            ties -= tied.numel()
        packed.append(pack_mask(mask))
    return packed


def true_positions(flags: torch.Tensor) -> torch.Tensor:
    """Positions of the True entries of a 1-d bool tensor (numpy's is ~7x faster on the CPU)."""
    if flags.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(flags.numpy()))
    return flags.nonzero().squeeze(1)


def count_true(flags: torch.Tensor) -> int:
    """How many entries of a bool tensor are True."""
    if flags.device.type == "cpu":
        return int(np.count_nonzero(flags.numpy()))
    return int(torch.count_nonzero(flags))


def take(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """values[positions] for a 1-d tensor (through numpy on the CPU, much faster)."""
    if values.device.type == "cpu":
        return torch.from_numpy(values.numpy()[positions.numpy()])
    return values[positions]


def set_bits(bits: torch.Tensor, positions: torch.Tensor) -> None:
    """Set the bits at `positions` in a packed mask, in place."""
    if bits.device.type == "cpu":
        index = positions.numpy()
        np.bitwise_or.at(bits.numpy(), index >> 3, (1 << (index & 7)).astype(np.uint8))
        return
    flags = unpack_mask(bits, (bits.numel() * 8,)).clone()
    flags[positions] = True
    bits.copy_(pack_mask(flags))


def sample_bracket(scores: list[torch.Tensor], keep: int, total: int) -> tuple[float, float]:
    """(low, high) from sample quantiles such that the keep-th largest is in (low, high] w.h.p."""
    generator = torch.Generator().manual_seed(0)
    picks = []
    for s in scores:
        count = max(1, round(SAMPLE_SIZE * s.numel() / total))
        positions = torch.randint(0, s.numel(), (count,), generator=generator).to(s.device)
        picks.append(s[positions].float().cpu())
    sample = torch.cat(picks).sort().values
    # NaN gradients come from a NaN loss and fill the whole backward: the sample shows them.
    if bool(torch.isnan(sample[-1])):
        raise EraseError("The saliency gradients contain NaN: the model or its inputs are broken.")
    below = 1 - keep / total  # the share of values below the answer
    margin = 6 * math.sqrt(below * (1 - below) / sample.numel()) + 8 / sample.numel()
    low_index = math.floor((below - margin) * sample.numel())
    high_index = math.ceil((below + margin) * sample.numel())
    low = sample[low_index].item() if low_index >= 0 else -1.0  # scores are >= 0
    high = sample[high_index].item() if high_index < sample.numel() else float("inf")
    return low, high


def count_at_least(scores: list[torch.Tensor], value: float) -> int:
    """How many scores are >= value."""
    return sum(int(torch.count_nonzero(s >= value)) for s in scores)


def bisection_threshold(scores: list[torch.Tensor], keep: int) -> float:
    """The keep-th largest by bisection over float32 bit patterns (31 counting passes): for
    non-negative floats the order of their int32 bit patterns is the order of the numbers."""

    def at_least(bits: int) -> int:
        return count_at_least(scores, torch.tensor(bits, dtype=torch.int32).view(torch.float32))

    low, high = 0, 0x7F800000  # count(+0.0) = total >= keep; +inf bits as the open upper end
    if at_least(high) >= keep:
        return float("inf")
    while high - low > 1:
        middle = (low + high) // 2
        if at_least(middle) >= keep:
            low = middle
        else:
            high = middle
    return torch.tensor(low, dtype=torch.int32).view(torch.float32).item()


def sort_threshold(scores: Iterable[torch.Tensor], keep: int) -> float:
    """The same threshold by a full sort: the exact reference, for tests and benchmarks only."""
    flat = torch.cat([s.detach().float().flatten() for s in scores])
    return torch.sort(flat, descending=True).values[keep - 1].item()


def saliency_mask(gradients: Mapping[str, torch.Tensor] | GradientFile, ratio: float) -> PackedMask:
    """The mask keeping exactly round(ratio * N) weights by |gradient|, bit-packed.

    One global threshold; weights equal to it are kept earliest first (in parameter order)
    until the count is reached. The gradients are made absolute in place (no second copy of
    860 M values at SD scale); those of a GradientFile are read one parameter at a time.
    """
    if not 0 < ratio <= 1:
        raise EraseError(f"--mask-ratio must be in (0, 1], got {ratio}.")
    if isinstance(gradients, GradientFile):
        keep = max(1, round(ratio * gradients.numel()))
        return PackedMask(file_top_k_masks(gradients, keep), dict(gradients.shapes))
    scores = [g.abs_().reshape(-1) for g in gradients.values()]
    keep = max(1, round(ratio * sum(s.numel() for s in scores)))
    _, packed = top_k_selection(scores, keep)
    bits = {name: bits.cpu() for name, bits in zip(gradients, packed)}
    return PackedMask(bits, {name: tuple(g.shape) for name, g in gradients.items()})


def structure_digest(unet: torch.nn.Module) -> str:
    """A hash of the UNet's parameter names and shapes: what a mask must match."""
    layout = [(name, list(p.shape)) for name, p in unet.named_parameters()]
    return hashlib.sha256(json.dumps(layout).encode()).hexdigest()[:16]


def save_mask(mask: PackedMask | Mapping[str, torch.Tensor], path: str, **metadata) -> None:
    """Write the mask as safetensors of bit-packed uint8 tensors; shapes, counts and settings go
    into the string metadata."""
    if not isinstance(mask, PackedMask):
        mask = pack_bool_mask(mask)
    header = {
        "format": MASK_FORMAT,
        "kept": str(mask.kept()),
        "total": str(mask.total()),
        "shapes": json.dumps({name: list(shape) for name, shape in mask.shapes.items()}),
    }
    header.update({key: json.dumps(value) for key, value in metadata.items()})
    save_file({name: b.contiguous() for name, b in mask.bits.items()}, path, metadata=header)


def load_mask(path: str, unet: torch.nn.Module, identity: str | None = None) -> PackedMask:
    """Read a mask (bit-packed, or the older bool format) and check it fits `unet`."""
    if not os.path.isfile(path):
        raise EraseError(f"Mask file '{path}' does not exist: pass a mask.safetensors of a run.")
    try:
        with safe_open(path, framework="pt") as file:
            header = file.metadata() or {}
            tensors = {name: file.get_tensor(name) for name in file.keys()}
    except Exception:
        raise EraseError(
            f"'{path}' is not a readable safetensors mask: it is corrupt or truncated."
        ) from None
    if header.get("format") not in (MASK_FORMAT, BOOL_MASK_FORMAT):
        raise EraseError(f"'{path}' is not an erase saliency mask (no '{MASK_FORMAT}' header).")
    try:
        saved_identity = json.loads(header.get("model", "null"))
        saved_shapes = json.loads(header.get("shapes", "{}"))
        saved_shapes = {name: tuple(int(n) for n in shape) for name, shape in saved_shapes.items()}
    except (ValueError, TypeError):
        raise EraseError(
            f"The metadata of mask '{path}' is malformed (not JSON): compute a new mask."
        ) from None
    shapes = {name: tuple(p.shape) for name, p in unet.named_parameters()}
    if header["format"] == BOOL_MASK_FORMAT:
        if any(t.dtype != torch.bool for t in tensors.values()):
            raise EraseError(f"The mask '{path}' holds non-bool tensors: compute a new one.")
        saved_shapes = {name: tuple(t.shape) for name, t in tensors.items()}
        tensors = {name: pack_mask(t) for name, t in tensors.items()}
    mismatched = [
        name
        for name in shapes.keys() | tensors.keys()
        if name not in tensors
        or saved_shapes.get(name) != shapes.get(name)
        or tensors[name].dtype != torch.uint8
        or tensors[name].numel() != -(-math.prod(shapes[name]) // 8)
    ]
    if mismatched:
        raise EraseError(
            f"The mask '{path}' does not fit this model ({len(mismatched)} parameters differ, "
            f"e.g. '{sorted(mismatched)[0]}'): compute a new one."
        )
    if identity and saved_identity and saved_identity != identity:
        warnings.warn(
            f"mask '{path}' was computed on '{saved_identity}', not '{identity}'", stacklevel=2
        )
    return PackedMask(tensors, {name: shapes[name] for name in tensors})


def mask_ratio(mask: PackedMask) -> float:
    """The share of weights the mask keeps."""
    return mask.kept() / mask.total()


def mask_digest(mask: PackedMask) -> str:
    """SHA-256 of a mask's bits by parameter name: tells two masks apart without keeping one (a
    resumed run's masked optimizer state is only valid for the mask it was made with)."""
    digest = hashlib.sha256()
    for name in sorted(mask.bits):
        digest.update(name.encode())
        digest.update(mask.bits[name].cpu().numpy().tobytes())
    return digest.hexdigest()
