"""`--harden meta`: a first-order simulated-relearning term (Meta-Unlearning, Gao et al., ICCV
2025, sail-sg/Meta-Unlearning, its first-order form; FOMAML).

Every `harden_every` steps, before the step's backward: the movable entries (the method's
trainable weights; SalUn: only the masked entries) are saved, the attacker's fine-tune is
simulated on them in place (`meta_steps` steps of the plain denoising loss on forget batches,
Adam or SGD, a learning rate drawn log-uniformly from [meta_lr_min, meta_lr_max]), the gradient
of the method's forget objective is taken at the adapted weights, and the saved values are
written back, bit for bit. That gradient, times `meta_weight`, is added to the step's update
through the surrogate term `meta_weight * sum(w * g)` (its gradient in w is exactly
`meta_weight * g`), so every update path of the trainer (masked Adam stepped in backward,
clipping, accumulation) applies it as it applies the method's own gradient.

Memory: no full set of gradients ever exists. Each gradient, of the attacker's loss and of the
forget objective, is used inside backward as soon as its parameter's is complete (a tensor hook:
the inner update, or the gradient put aside and the saved weights written back) and replaced by a
zero that takes no memory. The saved weights and the forget gradient wait off the device
(`Spill`: host memory from a GPU, an unnamed file beside the output on the CPU), whole parameters
at a time (copies, where selecting the masked entries would cost a gather each), and the gradient
joins the step's backward one parameter at a time. What stays in memory is the inner Adam's two
moments of the movable entries, stored as the erasure's own are (8-bit with `--optimizer
adam8bit`; none with SGD).
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from functools import partial

import torch

from erase.data import batch_at
from erase.errors import EraseError
from erase.harden import Entry, register, stream_seed
from erase.methods import denoising_loss
from erase.offload import read_at, tensor_bytes, write_at
from erase.optim import FlatMoments, QuantizedMoments


@dataclass
class MetaConfig:
    """Meta settings; docs/methods.md#harden gives every default's source."""

    harden_every: int = field(
        default=1,
        metadata={"help": "meta: simulate the relearning every N erasure steps (reference: 1)"},
    )
    meta_steps: int = field(
        default=2,
        metadata={
            "help": "meta: K, the attacker's simulated fine-tuning steps on the forget data "
            "before the forget gradient is taken (chosen on ddpm-digits' digit 5: 2 resists as "
            "3 and 5 do at a lower cost; K = 1 only reweights the forget term)"
        },
    )
    meta_lr_min: float = field(
        default=1e-4,
        metadata={
            "help": "meta: lowest learning rate of the simulated attacker, drawn log-uniformly "
            "up to --meta-lr-max (default: both 1e-4, the relearning attack's)"
        },
    )
    meta_lr_max: float = field(
        default=1e-4,
        metadata={"help": "meta: highest learning rate of the simulated attacker"},
    )
    meta_optimizer: str = field(
        default="adam",
        metadata={"help": "meta: the simulated attacker's optimizer, adam or sgd"},
    )
    meta_weight: float = field(
        default=1.0,
        metadata={"help": "meta: weight of the forget gradient at the adapted weights"},
    )
    meta_batch_size: int | None = field(
        default=None,
        metadata={"help": "meta: forget images per simulated step (default: --batch-size)"},
    )


SAVED, GRADIENT = 0, 1  # the two values a Spill keeps per entry


class Spill:
    """Per entry, its parameter's saved weights and forget gradient (whole tensors), kept off the
    device between the simulation and the step: in host memory from a GPU; on the CPU, where the
    host is the device, in an unnamed file in `folder` (deleted when closed or when the process
    ends), read back bit for bit."""

    def __init__(self, entries: list[Entry], folder: str | None, to_file: bool | None = None):
        """`to_file`: whether to keep them in the file (default: when the device is the CPU)."""
        self.places = []  # [slot][entry] -> (byte offset, shape, dtype)
        offset = 0
        for _ in (SAVED, GRADIENT):
            places = []
            for entry in entries:
                places.append((offset, entry.param.shape, entry.param.dtype))
                offset += entry.param.numel() * entry.param.element_size()
            self.places.append(places)
        self.device = entries[0].param.device if entries else torch.device("cpu")
        if to_file is None:
            to_file = self.device.type == "cpu"
        self.file = tempfile.TemporaryFile(dir=folder) if to_file else None
        self.host: dict[tuple[int, int], torch.Tensor] | None = None if to_file else {}

    def put(self, slot: int, index: int, values: torch.Tensor) -> None:
        """Keep `values` (a tensor of the parameter's shape) of entry `index` in `slot`."""
        offset, shape, dtype = self.places[slot][index]
        values = values.detach().to(dtype)
        if self.file is not None:
            write_at(self.file, tensor_bytes(values.contiguous()), offset)
            return
        if (slot, index) not in self.host:  # one host tensor per entry and slot, made once
            self.host[slot, index] = torch.empty(shape, dtype=dtype)
        self.host[slot, index].copy_(values)

    def take(self, slot: int, index: int) -> torch.Tensor:
        """What `put` kept of entry `index` in `slot`, on the device, bit for bit."""
        offset, shape, dtype = self.places[slot][index]
        if self.file is None:
            return self.host[slot, index].to(self.device)
        values = torch.empty(shape, dtype=dtype)
        read_at(self.file, tensor_bytes(values), offset, "the hardening's scratch file was cut")
        return values.to(self.device)

    def close(self) -> None:
        """Free the host memory or delete the file."""
        if self.file is not None:
            self.file.close()
        self.file = self.host = None


class InnerOptimizer:
    """The simulated attacker's Adam (torch.optim.Adam's arithmetic, no weight decay) or SGD,
    on the movable entries only, one entry at a time; its moments live for one simulation, in
    fp32 or blockwise 8-bit as the erasure's own optimizer keeps them."""

    def __init__(self, kind: str, lr: float, entries: list[Entry], eight_bit: bool):
        self.kind, self.lr, self.betas, self.eps = kind, lr, (0.9, 0.999), 1e-8
        self.spans, start = [], 0
        for entry in entries:
            self.spans.append((start, start + entry.count))
            start += entry.count
        device = entries[0].param.device if entries else torch.device("cpu")
        self.moments = None
        if kind == "adam":
            self.moments = (
                QuantizedMoments(
                    [(a, b, e.param.numel()) for (a, b), e in zip(self.spans, entries)], device
                )
                if eight_bit
                else FlatMoments(start, device)
            )
        self.step_count = 0

    @torch.no_grad()
    def step_entry(self, index: int, entry: Entry, gradient: torch.Tensor) -> None:
        """Update entry `index` from its parameter's dense gradient, as step `step_count`. The
        update is added to the whole parameter, zero outside the mask, so the weights are never
        gathered (the simulation's weights are restored from the spill afterwards anyway)."""
        selected = entry.selection()
        param = entry.param.data
        if self.kind == "sgd":
            masked = gradient if selected is None else torch.where(selected, gradient, 0)
            param.add_(masked.to(param.dtype), alpha=-self.lr)
            return
        grad = (gradient if selected is None else gradient[selected]).float().reshape(-1)
        beta1, beta2 = self.betas
        start, stop = self.spans[index]
        exp_avg, exp_avg_sq = self.moments.read(start, stop)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**self.step_count)).add_(self.eps)
        step_size = self.lr / (1 - beta1**self.step_count)
        update = (exp_avg / denom).mul_(-step_size)  # (count,)
        self.moments.write(start, stop, exp_avg, exp_avg_sq)
        if selected is None:
            param.add_(update.view(param.shape).to(param.dtype))
        else:
            dense = torch.zeros(param.shape, dtype=update.dtype, device=param.device)
            param.add_(dense.masked_scatter_(selected, update).to(param.dtype))


def gradients_in_backward(objective: torch.Tensor, entries: list[Entry], use) -> None:
    """Backward of `objective`, handing each entry's dense gradient to `use(index, gradient)` as
    soon as it is complete (its parameter may change then: nothing left in backward reads it) and
    keeping none of them: each is replaced by an expanded zero, which takes no memory."""

    def hook(index: int, gradient: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            use(index, gradient)
        return torch.zeros((), dtype=gradient.dtype, device=gradient.device).expand(gradient.shape)

    handles = [entry.param.register_hook(partial(hook, i)) for i, entry in enumerate(entries)]
    try:
        torch.autograd.grad(objective, [e.param for e in entries], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()


@register("meta")
class Meta:
    """The forget objective measured after a simulated relearning, added to each update."""

    Config = MetaConfig
    needs_images = True  # the attacker fine-tunes on the concept's images (ESD makes none itself)

    @staticmethod
    def check(config: MetaConfig) -> None:
        """Refuse settings that cannot run, in one line."""
        if config.harden_every < 1 or config.meta_steps < 1:
            raise EraseError(
                "--harden-every and --meta-steps must be 1 or more, got "
                f"{config.harden_every} and {config.meta_steps}."
            )
        if not 0 < config.meta_lr_min <= config.meta_lr_max:
            raise EraseError(
                "--meta-lr-min and --meta-lr-max must be learning rates above 0 with min <= max, "
                f"got {config.meta_lr_min} and {config.meta_lr_max}."
            )
        if config.meta_optimizer not in ("adam", "sgd"):
            raise EraseError(
                f"--meta-optimizer must be adam or sgd, got '{config.meta_optimizer}'."
            )
        if config.meta_weight < 0:
            raise EraseError(f"--meta-weight must be 0 or more, got {config.meta_weight}.")
        if config.meta_batch_size is not None and config.meta_batch_size < 1:
            raise EraseError(f"--meta-batch-size must be 1 or more, got {config.meta_batch_size}.")

    def __init__(self, backend, method, config: MetaConfig, train_config, scratch=None):
        self.backend, self.method = backend, method
        self.batch_size = config.meta_batch_size or train_config.batch_size
        self.config = config
        self.seed = train_config.seed
        self.eight_bit = train_config.eight_bit
        self.scratch = scratch  # the folder of the spill file on the CPU (None: the temp dir)
        self.extra_steps = 0
        self.spill: Spill | None = None
        self.entries: list[Entry] = []  # those of the last simulation
        self.with_gradient: set[int] = set()  # entries the forget objective reached
        self.hooks = []

    def resolved(self) -> dict:
        """The settings as this run uses them (for metadata.json)."""
        return {**vars(self.config), "meta_batch_size": self.batch_size}

    def step_loss(self, step: int, unet, entries: list[Entry], forget, retain):
        """The loss of erasure step `step`: the method's; on meta steps, the forget gradient at
        the adapted weights joins the gradient of every backward of it, scaled as that backward
        scales the loss (its share of the batch, accumulation, fp16's loss scale)."""
        self.remove_hooks()
        if step % self.config.harden_every:
            return self.method.loss
        after = self.simulate(step, unet, entries, forget, retain)
        weight = self.config.meta_weight
        scale = {}  # d(what backward differentiates) / d(loss), read off a zero added to it
        if weight:
            for index in sorted(self.with_gradient):
                add = partial(self.add_meta_gradient, index, entries[index], weight, scale)
                self.hooks.append(entries[index].param.register_hook(add))

        def loss(unet, forget_batch, retain_batch, generator):
            total, terms = self.method.loss(unet, forget_batch, retain_batch, generator)
            if weight:
                anchor = torch.zeros((), device=total.device, dtype=total.dtype, requires_grad=True)
                anchor.register_hook(partial(scale.__setitem__, "value"))
                total = total + anchor
            return total, {**terms, "forget_after_relearn": after}

        return loss

    def add_meta_gradient(self, index, entry: Entry, weight, scale, gradient):
        """Tensor hook of a meta step's backward: the parameter's gradient plus its forget
        gradient at the adapted weights, times `weight` and the loss's scale in this backward."""
        if "value" not in scale:
            raise RuntimeError("the meta gradient's scale was not read before its parameters'")
        with torch.no_grad():
            meta = self.spill.take(GRADIENT, index).to(gradient.dtype) * (weight * scale["value"])
            selected = entry.selection()
            return gradient + (meta if selected is None else torch.where(selected, meta, 0))

    def simulate(self, step: int, unet, entries: list[Entry], forget, retain) -> float:
        """Simulate the attacker from the current weights and put the forget objective's gradient
        at the adapted ones aside (`gradient`); the weights are written back bit for bit before
        it returns. Returns the objective's value there."""
        generator = torch.Generator().manual_seed(stream_seed(self.seed, step, 0))
        low, high = math.log(self.config.meta_lr_min), math.log(self.config.meta_lr_max)
        lr = math.exp(low + (high - low) * float(torch.rand((), generator=generator)))
        inner = InnerOptimizer(self.config.meta_optimizer, lr, entries, self.eight_bit)
        if self.spill is None:
            self.spill = Spill(entries, self.scratch)
        for index, entry in enumerate(entries):
            self.spill.put(SAVED, index, entry.param.detach())
        # the entries the forget objective reached: their gradient kept, their weights restored
        self.entries, self.with_gradient = entries, set()

        def keep_and_restore(index: int, gradient: torch.Tensor) -> None:
            self.spill.put(GRADIENT, index, gradient)
            entries[index].param.data.copy_(self.spill.take(SAVED, index))
            self.with_gradient.add(index)

        def inner_step(index: int, gradient: torch.Tensor) -> None:
            inner.step_entry(index, entries[index], gradient)

        devices = [self.backend.device] if self.backend.device.type == "cuda" else []
        # The global stream (dropout) is forked, so the step itself draws what it would without.
        with torch.random.fork_rng(devices=devices):
            try:
                for inner_step_index in range(self.config.meta_steps):
                    index = step * (self.config.meta_steps + 1) + inner_step_index
                    forget_batch = batch_at(*forget, self.batch_size, index, self.seed + 2)
                    attack = denoising_loss(self.backend, unet, forget_batch, generator)
                    inner.step_count += 1
                    gradients_in_backward(attack, entries, inner_step)
                index = step * (self.config.meta_steps + 1) + self.config.meta_steps
                forget_batch = batch_at(*forget, self.batch_size, index, self.seed + 2)
                retain_batch = batch_at(*retain, self.batch_size, index, self.seed + 3)
                objective, _ = self.method.forget_loss(unet, forget_batch, retain_batch, generator)
                gradients_in_backward(objective, entries, keep_and_restore)
            finally:
                for index, entry in enumerate(entries):
                    if index not in self.with_gradient:
                        entry.param.data.copy_(self.spill.take(SAVED, index))
        return objective.item()

    def gradient(self, index: int) -> torch.Tensor | None:
        """Entry `index`'s forget gradient at the adapted weights of the last simulation (as
        Entry.values returns it), or None where the objective did not reach it."""
        if index not in self.with_gradient:
            return None
        return self.entries[index].values(self.spill.take(GRADIENT, index))

    def remove_hooks(self) -> None:
        """Detach the previous meta step's hooks."""
        for handle in self.hooks:
            handle.remove()
        self.hooks = []

    def close(self) -> None:
        """After training (or a failure): no hook left on the weights, the spill freed."""
        self.remove_hooks()
        if self.spill is not None:
            self.spill.close()
            self.spill = None
