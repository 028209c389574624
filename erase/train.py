"""One trainer for every method, on accelerate: mixed precision, gradient accumulation and
micro-batches, gradient checkpointing, masked training with optimizer state only for the masked
weights, checkpoint/resume, NaN guard. The loop in `train` is the whole training step."""

from __future__ import annotations

import ctypes
import gc
import os
import resource
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from tqdm.auto import tqdm

from erase.checkpoint import resume, save_checkpoint
from erase.data import batch_at
from erase.errors import EraseError
from erase.harden import movable_entries
from erase.models.base import Backend, Batch, Condition
from erase.optim import MaskedAdam, StepInBackward, eight_bit_functional
from erase.saliency import PackedMask, pack_bool_mask


@dataclass
class TrainConfig:
    """Training settings; None means the method's reference default for the backend/concept."""

    lr: float | None = None
    steps: int | None = None  # optimizer updates; None: from --epochs or the method default
    epochs: float | None = None  # passes over the forget set, when --steps is not given
    batch_size: int | None = None
    micro_batch_size: int | None = None  # samples per forward/backward; None: the whole batch
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"  # no | fp16 | bf16
    # SD backends recompute activations in backward, as the reference does (ldm's use_checkpoint)
    gradient_checkpointing: bool = True
    max_grad_norm: float | None = None
    optimizer: str | None = None  # adam | adamw
    eight_bit: bool = False  # --optimizer adam8bit: Adam's moments blockwise-quantized to 8 bits
    weight_decay: float | None = (
        None  # AdamW only; SalUn's Adam has none, so masked weights stay put
    )
    seed: int = 0
    checkpoint_every: int = 0  # save a resumable checkpoint every N steps (0: never)


@dataclass
class TrainResult:
    """What a training run did, for metadata.json."""

    steps: int
    first_terms: dict[str, float] = field(default_factory=dict)
    last_terms: dict[str, float] = field(default_factory=dict)
    trained_parameters: int = 0
    resumed_from: int = 0
    micro_batch_size: int | None = None
    optimizer_state: str = "dense"  # "masked": gradients and moments only for masked weights
    state_bytes: dict[str, int] = field(default_factory=dict)  # bytes of each part of the state
    step_seconds: list[float] = field(default_factory=list)


def make_accelerator(config: TrainConfig) -> Accelerator:
    """The accelerate state for this run (devices, precision, accumulation)."""
    if config.mixed_precision not in ("no", "fp16", "bf16"):
        raise EraseError(
            f"--mixed-precision must be no, fp16 or bf16, got '{config.mixed_precision}'."
        )
    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise EraseError("--mixed-precision fp16 needs a CUDA GPU: use bf16 or no on the CPU.")
    # Several processes on a machine without CUDA (torchrun, `accelerate launch --multi_gpu`):
    # accelerate joins them only when told to use the CPU, with gloo.
    several_cpu_processes = (
        not torch.cuda.is_available() and os.environ.get("WORLD_SIZE", "1") != "1"
    )
    return Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        cpu=several_cpu_processes,
    )


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA allocations on a GPU, the process's max RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def release_freed_memory() -> None:
    """Hand memory freed by a finished phase back to the system. glibc's allocator keeps large
    freed heap blocks (on the CPU at SD scale, ~2 GB of the mask phase's dense gradients) and
    would carry them through training; CUDA's caching allocator reuses its blocks by itself."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to trim
            pass


def select_parameters(unet, method, mask) -> list[torch.nn.Parameter]:
    """Mark the parameters that will move: the method's choice, minus those the mask keeps none of."""
    chosen = []
    for name, param in unet.named_parameters():
        trainable = method.trainable(name) and (mask is None or mask.count(name) > 0)
        param.requires_grad_(trainable)
        if trainable:
            chosen.append(param)
    if not chosen:
        raise EraseError("The method and mask leave no weight to train: raise --mask-ratio.")
    return chosen


def make_optimizer(
    name: str, parameters, lr: float, weight_decay: float | None, eight_bit: bool = False
) -> torch.optim.Optimizer:
    """Adam (SalUn, ESD: no weight decay, so masked weights stay put) or AdamW (Forget-Me-Not);
    `eight_bit`: bitsandbytes' Adam8bit/AdamW8bit (moments blockwise-quantized to 8 bits)."""
    if eight_bit:
        eight_bit_functional()  # one line if the library cannot run here
        import bitsandbytes

        if name == "adam":
            return bitsandbytes.optim.Adam8bit(parameters, lr=lr)
        if name == "adamw":
            return bitsandbytes.optim.AdamW8bit(parameters, lr=lr, weight_decay=weight_decay or 0.0)
    # No foreach: its fused temporaries would add a copy of every trained weight on a GPU.
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, foreach=False)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay or 0.0, foreach=False)
    raise EraseError(f"Unknown optimizer '{name}': use adam or adamw.")


def masked_state_fallback(config: TrainConfig, clip_before_mask: float | None) -> str | None:
    """Why a masked run must keep dense state, or None when the masked optimizer applies."""
    if clip_before_mask:
        # The norm is that of the whole (unmasked) gradient of the batch, which the masked
        # optimizer never holds; the reference DDPM model that clips so is small.
        return "clipping before the mask needs the whole gradient"
    if config.mixed_precision == "fp16":
        # fp16's GradScaler unscales and checks the parameters' .grad for inf, which the masked
        # optimizer frees as soon as it has gathered them; bf16 needs no scaler.
        return "fp16 loss scaling works on dense gradients"
    if config.optimizer != "adam" or config.weight_decay:
        return "the masked optimizer is Adam without weight decay"
    return None


def micro_batches(batch: Batch, size: int | None) -> list[Batch]:
    """`batch` cut into consecutive pieces of at most `size` samples (all of it for None)."""
    count = len(batch.conditions)
    if not size or size >= count:
        return [batch]
    return [
        Batch(batch.latents[start : start + size], batch.conditions[start : start + size])
        for start in range(0, count, size)
    ]


def backward_micro_batches(
    accelerator: Accelerator, unet, method, forget: Batch, retain: Batch, generator, config,
    backward=None, loss=None,
) -> dict[str, float]:  # fmt: skip
    """Loss and backward of one batch in micro-batches; each micro-batch's loss is weighted by its
    share of the batch, so that the gradients add up to the whole batch's (the losses are means
    over samples). Only the last backward synchronises the processes. `loss`: the step's loss
    when a --harden technique sets it, else the method's."""
    backward = backward or accelerator.backward
    step_loss = loss or method.loss
    forget_parts = micro_batches(forget, config.micro_batch_size)
    retain_parts = micro_batches(retain, config.micro_batch_size)
    if len(forget_parts) > 1 and len(forget.conditions) != len(retain.conditions):
        raise EraseError(
            "--micro-batch-size needs forget and retain batches of one size: make --num-forget "
            "and --num-retain at least --batch-size."
        )
    if len(forget_parts) > 1 and not method.loss_is_mean_over_samples:
        raise EraseError(
            f"{method.name}'s loss is not a mean over samples, so micro-batches would change "
            "it: leave --micro-batch-size unset (or equal to --batch-size)."
        )
    totals: dict[str, float] = {}
    for index, (forget_part, retain_part) in enumerate(zip(forget_parts, retain_parts)):
        share = len(forget_part.conditions) / len(forget.conditions)
        last = index == len(forget_parts) - 1
        with nullcontext() if last else accelerator.no_sync(unet):
            value, terms = step_loss(unet, forget_part, retain_part, generator)
            if not torch.isfinite(value):
                raise EraseError(
                    f"The loss became {value.item()}: lower --lr (now {config.lr}) or use "
                    "--mixed-precision no; no model was written."
                )
            backward(value * share if share != 1 else value)
        for key, value in terms.items():
            totals[key] = totals.get(key, 0.0) + share * value
    return totals


class DenseUpdate:
    """torch's Adam/AdamW over whole parameters through accelerate (fp16 loss scaling, DDP);
    a mask, if any, is multiplied into the gradients."""

    def __init__(self, accelerator, optimizer, parameters, dense_masks, clip_before_mask=None):
        self.accelerator, self.optimizer = accelerator, optimizer
        self.parameters, self.dense_masks = parameters, dense_masks
        self.clip_before_mask = clip_before_mask
        self.gradient_bytes = 0

    def update(self, max_grad_norm: float | None) -> None:
        """(Clip the whole gradient,) mask, clip, step and clear the gradients of the batch."""
        if self.clip_before_mask:  # reference DDPM: clip_grad_norm_ first, then grad *= mask
            self.accelerator.clip_grad_norm_(self.parameters, self.clip_before_mask)
        for param, param_mask in self.dense_masks:
            if param.grad is not None:
                param.grad.mul_(param_mask)
        if max_grad_norm:
            self.accelerator.clip_grad_norm_(self.parameters, max_grad_norm)
        self.gradient_bytes = tensor_bytes(p.grad for p in self.parameters if p.grad is not None)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_bytes(self) -> dict[str, int]:
        """Dense gradients, the optimizer's moments and the unpacked masks."""
        inner = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps it
        moments = tensor_bytes(
            value
            for state in inner.state.values()
            for value in state.values()
            if torch.is_tensor(value) and value.dim() > 0
        )
        masks = tensor_bytes(m for _, m in self.dense_masks)
        return {"gradients": self.gradient_bytes, "optimizer": moments, "mask": masks}

    def remove_hooks(self) -> None:
        """Nothing to detach."""

    def release(self) -> None:
        """Drop the optimizer and its state (after training)."""
        self.optimizer, self.dense_masks = None, []


def steps_in_backward(accelerator, unet, config: TrainConfig) -> bool:
    """Whether the optimizer can step each parameter inside backward: one process, one backward
    per update, no fp16 loss scaling (its GradScaler needs every gradient at once), and no
    clipping of a checkpointed UNet (clipping measures the norm in a first backward that keeps
    the graph; checkpointed segments are not run twice here)."""
    return (
        accelerator.num_processes == 1
        and config.gradient_accumulation_steps == 1
        and (not config.micro_batch_size or config.micro_batch_size >= config.batch_size)
        and config.mixed_precision != "fp16"
        and not (config.max_grad_norm and getattr(unet, "is_gradient_checkpointing", False))
    )


def check_sharding(accelerator, method, mask) -> None:
    """FSDP and DeepSpeed shard parameters across processes; say in one line which methods cannot
    run under them."""
    if accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return
    if method.frozen_unet is not None:
        raise EraseError(
            f"{method.name} keeps a frozen copy that shares the untrained weights with the "
            "trained UNet, which FSDP/DeepSpeed shard: run it on one GPU or with plain DDP "
            "(accelerate launch --multi_gpu)."
        )
    if mask is not None:
        raise EraseError(
            "SalUn's saliency mask selects entries of whole parameters, which FSDP/DeepSpeed "
            "shard: run it on one GPU (its masked state fits 24 GB) or with plain DDP."
        )


def make_update(
    accelerator, unet, method, config: TrainConfig, parameters, mask: PackedMask | None,
    clip_before_mask: float | None = None,
):  # fmt: skip
    """The update of this run, leanest first: masked Adam (state only for masked weights), the
    optimizer stepped inside backward (no full set of gradients), or torch's optimizer through
    accelerate; `clip_before_mask` clips the whole gradient before the mask (dense path).
    Returns (update, prepared unet, state name)."""
    trained = [(n, p) for n, p in unet.named_parameters() if p.requires_grad]
    check_sharding(accelerator, method, mask)
    if mask is not None and masked_state_fallback(config, clip_before_mask) is None:
        update = MaskedAdam(trained, mask, config.lr, eight_bit=config.eight_bit)
        wrapped_unet = accelerator.prepare(unet)
        accelerator.register_for_checkpointing(update)
        if steps_in_backward(accelerator, unet, config) and not config.max_grad_norm:
            update.step_in_backward()  # no gradient buffer at all
            return update, wrapped_unet, "masked, stepped in backward"
        if accelerator.num_processes == 1:
            update.gather_in_backward()  # under DDP: gathered after the reduced backward
        return update, wrapped_unet, "masked"
    if mask is None and steps_in_backward(accelerator, unet, config):
        wrapped_unet = accelerator.prepare(unet)
        update = StepInBackward(
            accelerator,
            parameters,
            lambda group: make_optimizer(
                config.optimizer, group, config.lr, config.weight_decay, config.eight_bit
            ),
            config.max_grad_norm,
        )
        accelerator.register_for_checkpointing(update)
        return update, wrapped_unet, "dense, stepped in backward"
    dense_masks = [(p, mask.unpack(n).to(p.device)) for n, p in trained] if mask else []
    optimizer = make_optimizer(
        config.optimizer, parameters, config.lr, config.weight_decay, config.eight_bit
    )
    wrapped_unet, optimizer = accelerator.prepare(unet, optimizer)
    update = DenseUpdate(accelerator, optimizer, parameters, dense_masks, clip_before_mask)
    return update, wrapped_unet, "dense"


def train(
    accelerator: Accelerator,
    backend: Backend,
    method,
    forget: tuple[torch.Tensor, list[Condition]],
    retain: tuple[torch.Tensor, list[Condition]],
    config: TrainConfig,
    mask: PackedMask | dict[str, torch.Tensor] | None = None,
    checkpoint_dir: str | None = None,
    harden=None,
) -> TrainResult:
    """Fine-tune `backend.unet` in place with `method.loss`; `forget`/`retain` are (latents,
    conditions). `harden` (erase/harden/) sets the loss of its steps and may add steps after the
    method's (`extra_steps`). A method that trains the text encoder (AdvUnlearn) gets it, not
    the UNet, as the module its loss is given; the UNet then takes no gradient."""
    unet = trained_model(backend, method)  # named so below, the text encoder for AdvUnlearn
    if unet is not backend.unet:
        backend.unet.requires_grad_(False)
    unet.train()
    backend.set_gradient_checkpointing(
        config.gradient_checkpointing and method.gradient_checkpointing
    )
    if mask is not None and not isinstance(mask, PackedMask):
        mask = pack_bool_mask(mask)
    # A masked method may ask for the whole gradient to be clipped before the mask is applied
    # (SalUn on the DDPM, as its reference): the norm then counts the weights the mask keeps
    # none of, so they take part in backward too (their masked gradient is zero: they stay put).
    clip_before_mask = method.clip_before_mask if mask is not None else None
    parameters = select_parameters(unet, method, None if clip_before_mask else mask)
    release_freed_memory()  # what the phases before left on the heap, before the state is made
    update, wrapped_unet, state_name = make_update(
        accelerator, unet, method, config, parameters, mask, clip_before_mask
    )

    entries = movable_entries(unet, mask) if harden else []
    total_steps = config.steps + (harden.extra_steps if harden else 0)
    start = resume(accelerator, checkpoint_dir)
    result = TrainResult(steps=total_steps, resumed_from=start)
    result.trained_parameters = sum(p.numel() for p in parameters)
    result.micro_batch_size = config.micro_batch_size
    result.optimizer_state = state_name
    accumulation = config.gradient_accumulation_steps
    progress = tqdm(
        range(start, total_steps),
        desc=f"erasing ({method.name}{', ' + harden.name if harden else ''})",
        unit="step",
        initial=start,
        total=total_steps,
        disable=not accelerator.is_local_main_process,
    )
    try:
        for step in progress:
            clock = time.perf_counter()
            method.begin_step(step)
            step_loss = harden.step_loss(step, unet, entries, forget, retain) if harden else None
            for micro_step in range(accumulation):
                index = (step * accumulation + micro_step) * accelerator.num_processes
                index += accelerator.process_index
                generator = torch.Generator().manual_seed(config.seed * 1_000_003 + index)
                forget_batch = batch_at(*forget, config.batch_size, index, config.seed)
                retain_batch = batch_at(*retain, config.batch_size, index, config.seed + 1)
                with accelerator.accumulate(wrapped_unet):
                    terms = backward_micro_batches(
                        accelerator, wrapped_unet, method, forget_batch, retain_batch, generator,
                        config, getattr(update, "backward", accelerator.backward), step_loss,
                    )  # fmt: skip
                    if accelerator.sync_gradients:
                        update.update(config.max_grad_norm)
            if backend.device.type == "cuda":
                torch.cuda.synchronize(backend.device)
            result.step_seconds.append(round(time.perf_counter() - clock, 3))
            result.first_terms = result.first_terms or terms
            result.last_terms = terms
            progress.set_postfix({k: f"{v:.4g}" for k, v in terms.items()})
            done = step + 1
            if checkpoint_dir and config.checkpoint_every and done % config.checkpoint_every == 0:
                save_checkpoint(accelerator, checkpoint_dir, done)
    finally:
        update.remove_hooks()
        if harden:
            harden.close()
    result.state_bytes = {"weights": tensor_bytes(unet.parameters()), **update.state_bytes()}
    frozen = method.frozen_unet
    if frozen is not None:  # ESD's copy of the trained weights (the rest is shared)
        shared = {id(p) for p in unet.parameters()}
        result.state_bytes["frozen_copy"] = tensor_bytes(
            p for p in frozen.parameters() if id(p) not in shared
        )
    accelerator.wait_for_everyone()
    # The optimizer's state is done with: free it before the evaluation and grid that follow
    # (accelerate keeps references to the optimizer and to the checkpointed update).
    update.release()
    accelerator.free_memory()
    release_freed_memory()
    unet.eval()
    unet.requires_grad_(False)
    return result


def trained_model(backend: Backend, method) -> torch.nn.Module:
    """The module whose weights `method` trains: the UNet, or the (only) text encoder of a method
    that erases there (AdvUnlearn)."""
    if method.trains_text_encoder:
        return backend.text_encoders()[0][1]
    return backend.unet


def tensor_bytes(tensors) -> int:
    """Bytes of the given tensors."""
    return sum(t.numel() * t.element_size() for t in tensors)


def write_base_weights(unet: torch.nn.Module, trainable, path: str) -> None:
    """Write the current values of the weights a method may train to one raw file, parameter
    after parameter, so that changed weights are counted later without a copy in memory."""
    with open(path, "wb") as file:
        for name, param in unet.named_parameters():
            if trainable(name):
                param.detach().reshape(-1).view(torch.uint8).cpu().numpy().tofile(file)


def count_changed_weights(unet: torch.nn.Module, trainable, path: str) -> int:
    """How many weights differ from those `write_base_weights` wrote to `path`."""
    changed, offset = 0, 0
    for name, param in unet.named_parameters():
        if not trainable(name):
            continue
        size = param.numel() * param.element_size()
        raw = np.fromfile(path, dtype=np.uint8, count=size, offset=offset)
        base = torch.from_numpy(raw).view(param.dtype).view(param.shape).to(param.device)
        changed += int((param.detach() != base).sum())
        offset += size
    return changed
