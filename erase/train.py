"""One trainer for every method, on accelerate: mixed precision, gradient accumulation, masked
gradients, checkpoint/resume, NaN guard. The loop below is the whole training step."""

from __future__ import annotations

import resource
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from erase.checkpoint import resume, save_checkpoint
from erase.data import batch_at
from erase.errors import EraseError
from erase.models.base import Backend, Condition


@dataclass
class TrainConfig:
    """Training settings; None means the method's reference default for the backend/concept."""

    lr: float | None = None
    steps: int | None = None  # optimizer updates; None: from --epochs or the method default
    epochs: float | None = None  # passes over the forget set, when --steps is not given
    batch_size: int | None = None
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"  # no | fp16 | bf16
    max_grad_norm: float | None = None
    optimizer: str | None = None  # adam | adamw
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


def make_accelerator(config: TrainConfig) -> Accelerator:
    """The accelerate state for this run (devices, precision, accumulation)."""
    if config.mixed_precision not in ("no", "fp16", "bf16"):
        raise EraseError(
            f"--mixed-precision must be no, fp16 or bf16, got '{config.mixed_precision}'."
        )
    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise EraseError("--mixed-precision fp16 needs a CUDA GPU: use bf16 or no on the CPU.")
    return Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
    )


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA allocations on a GPU, the process's max RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def select_parameters(unet, method, mask) -> list[torch.nn.Parameter]:
    """Mark the parameters that will move: the method's choice, minus those the mask keeps none of."""
    chosen = []
    for name, param in unet.named_parameters():
        trainable = method.trainable(name) and (mask is None or bool(mask[name].any()))
        param.requires_grad_(trainable)
        if trainable:
            chosen.append(param)
    if not chosen:
        raise EraseError("The method and mask leave no weight to train: raise --mask-ratio.")
    return chosen


def make_optimizer(
    name: str, parameters, lr: float, weight_decay: float | None
) -> torch.optim.Optimizer:
    """Adam (SalUn, ESD: no weight decay, so masked weights stay put) or AdamW (Forget-Me-Not)."""
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay or 0.0)
    raise EraseError(f"Unknown optimizer '{name}': use adam or adamw.")


def train(
    accelerator: Accelerator,
    backend: Backend,
    method,
    forget: tuple[torch.Tensor, list[Condition]],
    retain: tuple[torch.Tensor, list[Condition]],
    config: TrainConfig,
    mask: dict[str, torch.Tensor] | None = None,
    checkpoint_dir: str | None = None,
) -> TrainResult:
    """Fine-tune `backend.unet` in place with `method.loss`; `forget`/`retain` are (latents, conditions)."""
    unet = backend.unet
    unet.train()
    parameters = select_parameters(unet, method, mask)
    masks = (
        [(p, mask[n].to(p.device)) for n, p in unet.named_parameters() if p.requires_grad]
        if mask
        else []
    )
    optimizer = make_optimizer(config.optimizer, parameters, config.lr, config.weight_decay)
    wrapped_unet, optimizer = accelerator.prepare(unet, optimizer)

    start = resume(accelerator, checkpoint_dir)
    result = TrainResult(steps=config.steps, resumed_from=start)
    result.trained_parameters = sum(p.numel() for p in parameters)
    accumulation = config.gradient_accumulation_steps
    progress = tqdm(
        range(start, config.steps),
        desc=f"erasing ({method.name})",
        unit="step",
        initial=start,
        total=config.steps,
        disable=not accelerator.is_local_main_process,
    )
    for step in progress:
        for micro_step in range(accumulation):
            index = (step * accumulation + micro_step) * accelerator.num_processes
            index += accelerator.process_index
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + index)
            forget_batch = batch_at(*forget, config.batch_size, index, config.seed)
            retain_batch = batch_at(*retain, config.batch_size, index, config.seed + 1)
            with accelerator.accumulate(wrapped_unet):
                loss, terms = method.loss(wrapped_unet, forget_batch, retain_batch, generator)
                if not torch.isfinite(loss):
                    raise EraseError(
                        f"The loss became {loss.item()} at step {step}: lower --lr (now "
                        f"{config.lr}) or use --mixed-precision no; no model was written."
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    for param, param_mask in masks:
                        if param.grad is not None:
                            param.grad.mul_(param_mask)
                    if config.max_grad_norm:
                        accelerator.clip_grad_norm_(parameters, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        result.first_terms = result.first_terms or terms
        result.last_terms = terms
        progress.set_postfix({k: f"{v:.4g}" for k, v in terms.items()})
        done = step + 1
        if checkpoint_dir and config.checkpoint_every and done % config.checkpoint_every == 0:
            save_checkpoint(accelerator, checkpoint_dir, done)
    accelerator.wait_for_everyone()
    unet.eval()
    unet.requires_grad_(False)
    return result
