"""Optimizers that keep only the state that training needs.

`MaskedAdam`: Adam with state only where weights can move, the masked entries of a saliency mask.

SalUn moves only the weights its mask keeps (half of them by default), so only those need Adam
moments. Each parameter's masked entries are stepped from its gradient hook as soon as backward
has accumulated its gradient (or, under DDP, accumulation or clipping, gathered into one flat
buffer of masked values), and the dense `.grad` is freed at once: at SD scale the dense gradient
(3.4 GB) and dense moments (6.9 GB) never exist. The update is Adam's
(torch.optim.Adam's single-tensor arithmetic), applied to the masked entries in place; the other
entries are never written, so they stay bit-identical.

`StepInBackward`: a dense Adam/AdamW whose update of each parameter runs as soon as backward has
produced its gradient, which is then freed: no full set of gradients ever exists. With gradient
clipping, a first backward pass only measures the gradient norm.

`--optimizer adam8bit` stores the masked moments blockwise-quantized to 8 bits with the dynamic
map of 8-bit Adam (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"), by
bitsandbytes' functional quantize/dequantize (`QuantizedMoments`): each parameter's moments are
dequantized inside its step, updated in fp32 and quantized back, 2 bytes per masked weight
instead of 8; parameters under 4096 weights keep fp32 moments, as bitsandbytes' Adam8bit does. bitsandbytes' own 8-bit optimizers hold state for whole tensors, not for the
masked entries only, so the masked optimizer quantizes its flat buffers itself with the
library's functions; the dense optimizers (ESD, FMN) use its Adam8bit/AdamW8bit directly.
"""

from __future__ import annotations

import math

import torch

from erase.errors import EraseError
from erase.saliency import PackedMask, unpack_mask

BLOCK = 256  # values per quantization block: bitsandbytes' 8-bit optimizers' block size
# parameters smaller than this keep fp32 moments: bitsandbytes' Adam8bit's min_8bit_size default
MIN_8BIT_SIZE = 4096


def eight_bit_functional():
    """bitsandbytes' functional module, checked to run here; one EraseError if it cannot."""
    from erase import quiet_import_noise  # its import warns about CPU kernels

    try:
        with quiet_import_noise():
            import bitsandbytes.functional as functional

            functional.quantize_blockwise(torch.ones(BLOCK), blocksize=BLOCK)
    except (ImportError, RuntimeError, OSError) as error:
        raise EraseError(
            "--optimizer adam8bit needs bitsandbytes, which cannot run here "
            f"({str(error).splitlines()[0] if str(error) else type(error).__name__}): "
            "pip install 'erase[adam8bit]', or use --optimizer adam."
        ) from None
    return functional


class FlatMoments:
    """Adam's two moments of the masked entries in fp32, one flat buffer each."""

    def __init__(self, size: int, device: torch.device):
        self.exp_avg = torch.zeros(size, device=device)
        self.exp_avg_sq = torch.zeros(size, device=device)

    def read(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The moments of entries [start, stop), as views updated in place."""
        return self.exp_avg[start:stop], self.exp_avg_sq[start:stop]

    def write(self, start: int, stop: int, exp_avg, exp_avg_sq) -> None:
        """Nothing to do: `read` gave views."""

    def nbytes(self) -> int:
        """Bytes of the stored moments."""
        return 2 * self.exp_avg.numel() * 4

    def state_dict(self) -> dict:
        """The stored tensors by name (checkpoints; `MaskedAdam.load_state_dict` copies into them)."""
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}


class QuantizedMoments:
    """Adam's two moments of the masked entries, blockwise-quantized to 8 bits: uint8 codes of
    8-bit Adam's dynamic map (signed for the first moment, unsigned for the second) and one fp32
    absmax per block of BLOCK values. Each parameter's entries start on a block boundary, so one
    parameter is dequantized and quantized without touching its neighbours. A parameter of fewer
    than MIN_8BIT_SIZE weights keeps fp32 moments, as bitsandbytes' own Adam8bit does."""

    def __init__(self, segments: list[tuple[int, int, int]], device: torch.device):
        """`segments`: (start, stop, parameter size) of each parameter's masked entries."""
        self.functional = eight_bit_functional()
        # (start, stop) of a parameter's entries -> the start of its codes, or in the fp32 buffers
        self.aligned, self.exact = {}, {}
        size = exact_size = 0
        for start, stop, parameter_size in segments:
            if parameter_size < MIN_8BIT_SIZE:
                self.exact[start, stop] = exact_size
                exact_size += stop - start
            else:
                self.aligned[start, stop] = size
                size += -(-(stop - start) // BLOCK) * BLOCK
        self.maps = [
            self.functional.create_dynamic_map(signed=signed).to(device) for signed in (True, False)
        ]
        # zero codes with zero absmax dequantize to 0: Adam's initial moments
        self.codes = [torch.zeros(size, dtype=torch.uint8, device=device) for _ in range(2)]
        self.absmax = [torch.zeros(size // BLOCK, device=device) for _ in range(2)]
        self.fp32 = FlatMoments(exact_size, device)

    def blocks(self, start: int, stop: int) -> tuple[slice, slice]:
        """The codes and the absmax entries of entries [start, stop)."""
        first = self.aligned[start, stop]
        return slice(first, first + stop - start), slice(
            first // BLOCK, (first + stop - start + BLOCK - 1) // BLOCK
        )

    def read(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The moments of entries [start, stop), dequantized to fp32 (views of fp32 ones)."""
        if (start, stop) in self.exact:
            first = self.exact[start, stop]
            return self.fp32.read(first, first + stop - start)
        codes, absmax = self.blocks(start, stop)
        return tuple(
            self.functional.dequantize_blockwise(
                self.codes[i][codes],
                absmax=self.absmax[i][absmax],
                code=self.maps[i],
                blocksize=BLOCK,
            )
            for i in range(2)
        )

    def write(self, start: int, stop: int, exp_avg, exp_avg_sq) -> None:
        """Quantize the updated moments of entries [start, stop) back (fp32 ones: updated in
        place already)."""
        if (start, stop) in self.exact:
            return
        codes, absmax = self.blocks(start, stop)
        for i, values in enumerate((exp_avg, exp_avg_sq)):
            quantized, state = self.functional.quantize_blockwise(
                values, code=self.maps[i], blocksize=BLOCK
            )
            self.codes[i][codes] = quantized
            self.absmax[i][absmax] = state.absmax

    def nbytes(self) -> int:
        """Bytes of the stored moments: codes, absmax and the small parameters' fp32 moments."""
        quantized = sum(t.numel() * t.element_size() for t in (*self.codes, *self.absmax))
        return quantized + self.fp32.nbytes()

    def state_dict(self) -> dict:
        """The stored tensors by name (checkpoints; `MaskedAdam.load_state_dict` copies into them)."""
        return {
            "exp_avg_codes": self.codes[0],
            "exp_avg_sq_codes": self.codes[1],
            "exp_avg_absmax": self.absmax[0],
            "exp_avg_sq_absmax": self.absmax[1],
            **{f"{name}_fp32": tensor for name, tensor in self.fp32.state_dict().items()},
        }


class MaskedAdam:
    """Adam (no weight decay) over the masked entries of `parameters`, named as in `mask`.

    Two ways to meet the gradients: `step_in_backward` updates each parameter's masked entries
    from its hook as soon as backward has accumulated its gradient (one process, one backward per
    update, no clipping: no gradient buffer at all); otherwise the masked values are gathered
    into one flat buffer (`gather_in_backward`, or `gather` after a reduced DDP backward) and
    `update` steps them all.
    """

    def __init__(
        self,
        named_parameters: list[tuple[str, torch.nn.Parameter]],
        mask: PackedMask,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),  # torch.optim.Adam's defaults (SalUn: Adam)
        eps: float = 1e-8,
        eight_bit: bool = False,
    ):
        self.lr, self.betas, self.eps = lr, betas, eps
        self.entries = []  # (parameter, packed mask bits, start, stop) in the flat buffers
        offset = 0
        for name, param in named_parameters:
            count = mask.count(name)
            self.entries.append((param, mask.bits[name].to(param.device), offset, offset + count))
            offset += count
        self.size = offset
        self.device = named_parameters[0][1].device if named_parameters else torch.device("cpu")
        segments = [(start, stop, param.numel()) for param, _, start, stop in self.entries]
        self.moments = (
            QuantizedMoments(segments, self.device)
            if eight_bit
            else FlatMoments(offset, self.device)
        )
        self.grad: torch.Tensor | None = None  # the flat masked gradient, when gathered
        self.stepping_in_backward = False
        self.largest_gradient = 0  # bytes of the largest masked gradient stepped in backward
        self.step_count = 0
        self.hooks = []

    def numel(self) -> int:
        """How many entries can move."""
        return self.size

    def state_bytes(self) -> dict[str, int]:
        """Bytes of the gradient (the flat buffer, or one parameter's when stepping in backward),
        the moments and the packed masks."""
        gradients = self.largest_gradient if self.grad is None else self.grad.numel() * 4
        return {
            "gradients": gradients,
            "optimizer": self.moments.nbytes(),
            "mask": sum(bits.numel() for _, bits, _, _ in self.entries),
        }

    def flat_gradient(self) -> torch.Tensor:
        """The flat buffer of masked gradient values, made on first use."""
        if self.grad is None:
            self.grad = torch.zeros(self.size, device=self.device)
        return self.grad

    def gather_in_backward(self) -> None:
        """Gather each gradient as soon as backward has accumulated it, and free it (one process:
        under DDP the gradient is reduced only after backward, so call `gather` then instead)."""
        for param, bits, start, stop in self.entries:

            def gather_one(param, bits=bits, start=start, stop=stop):
                self.add_masked_gradient(param, bits, start, stop)

            self.hooks.append(param.register_post_accumulate_grad_hook(gather_one))

    def step_in_backward(self) -> None:
        """Step each parameter's masked entries from its gradient hook, and free the gradient:
        the whole update happens inside backward, with no gradient buffer. Exact Adam when every
        update is one backward of one process, without clipping (which needs every gradient)."""
        self.stepping_in_backward = True
        for param, bits, start, stop in self.entries:

            @torch.no_grad()
            def step_one(param, bits=bits, start=start, stop=stop):
                selected = unpack_mask(bits, param.shape)
                grad = param.grad[selected].float()
                self.largest_gradient = max(self.largest_gradient, grad.numel() * 4)
                param.grad = None
                # `update` counts the step once backward is over: this is step step_count + 1
                self.adam_step(param, selected, grad, start, stop, self.step_count + 1)

            self.hooks.append(param.register_post_accumulate_grad_hook(step_one))

    def gather(self) -> None:
        """Add the masked values of every parameter's `.grad` to the flat buffer and free it."""
        for param, bits, start, stop in self.entries:
            if param.grad is not None:
                self.add_masked_gradient(param, bits, start, stop)

    def add_masked_gradient(self, param, bits, start: int, stop: int) -> None:
        """Add the masked values of one parameter's `.grad` to the flat buffer and free it."""
        self.flat_gradient()[start:stop] += param.grad[unpack_mask(bits, param.shape)].float()
        param.grad = None

    def remove_hooks(self) -> None:
        """Detach the backward hooks (after training)."""
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    def release(self) -> None:
        """Drop the moments and the gradient buffer (after training)."""
        self.moments = self.grad = None

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale the gradient to norm <= max_norm, as torch.nn.utils.clip_grad_norm_ does on the
        masked dense gradients (the unmasked entries are zero and add nothing to the norm)."""
        grad = self.flat_gradient()
        norm = torch.linalg.vector_norm(grad)
        grad.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        return norm

    @torch.no_grad()
    def adam_step(self, param, selected, grad, start: int, stop: int, step: int) -> None:
        """Adam's update of one parameter's masked entries (torch.optim.Adam's single-tensor
        arithmetic, foreach=False) from their gradient `grad`, at step number `step`; 8-bit
        moments are dequantized for it and quantized back."""
        beta1, beta2 = self.betas
        bias_correction2_sqrt = math.sqrt(1 - beta2**step)
        step_size = self.lr / (1 - beta1**step)
        exp_avg, exp_avg_sq = self.moments.read(start, stop)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
        values = param.data[selected].float()
        values.addcdiv_(exp_avg, denom, value=-step_size)
        param.data[selected] = values.to(param.dtype)
        self.moments.write(start, stop, exp_avg, exp_avg_sq)

    @torch.no_grad()
    def step(self) -> None:
        """One Adam update of the masked entries from the flat gradient."""
        self.step_count += 1
        grad = self.flat_gradient()
        for param, bits, start, stop in self.entries:
            selected = unpack_mask(bits, param.shape)
            self.adam_step(param, selected, grad[start:stop], start, stop, self.step_count)

    def zero_grad(self) -> None:
        """Clear the flat gradient for the next step."""
        if self.grad is not None:
            self.grad.zero_()

    def update(self, max_grad_norm: float | None) -> None:
        """After the batch's backward: count the step taken inside backward; or gather what hooks
        did not, clip, step and clear."""
        if self.stepping_in_backward:
            self.step_count += 1
            return
        self.gather()
        if max_grad_norm:
            self.clip_grad_norm_(max_grad_norm)
        self.step()
        self.zero_grad()

    def state_dict(self) -> dict:
        """Moments and step count (for accelerate's checkpoints)."""
        return {"step": self.step_count, **self.moments.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""
        self.step_count = int(state["step"])
        for name, tensor in self.moments.state_dict().items():
            tensor.copy_(state[name])


class StepInBackward:
    """Dense Adam/AdamW, one torch optimizer per parameter, stepped from the parameter's gradient
    hook as soon as backward has accumulated its gradient (one process, no accumulation)."""

    def __init__(
        self, accelerator, parameters: list[torch.nn.Parameter], make_optimizer, max_grad_norm
    ):
        self.accelerator = accelerator
        self.optimizers = {param: make_optimizer([param]) for param in parameters}
        self.max_grad_norm = max_grad_norm
        self.measuring = False  # first of two backward passes: only the norm is wanted
        self.norms: list[torch.Tensor] = []
        self.clip_coef: torch.Tensor | None = None
        self.largest_gradient = 0
        self.hooks = [p.register_post_accumulate_grad_hook(self.on_gradient) for p in parameters]

    def on_gradient(self, param: torch.nn.Parameter) -> None:
        """Measure, or clip and step, one parameter; then free its gradient."""
        self.largest_gradient = max(self.largest_gradient, param.grad.numel() * 4)
        if self.measuring:
            self.norms.append(torch.linalg.vector_norm(param.grad.detach().float()))
        else:
            if self.clip_coef is not None:
                param.grad.mul_(self.clip_coef.to(param.grad.dtype))
            self.optimizers[param].step()
        param.grad = None

    def backward(self, loss: torch.Tensor) -> None:
        """Backward with the update inside; with clipping, a measuring pass first, clipping
        exactly as torch.nn.utils.clip_grad_norm_ (coefficient max_norm / (norm + 1e-6) <= 1)."""
        if self.max_grad_norm:
            self.measuring, self.norms = True, []
            self.accelerator.backward(loss, retain_graph=True)
            self.measuring = False
            total_norm = torch.linalg.vector_norm(torch.stack(self.norms))
            self.clip_coef = torch.clamp(self.max_grad_norm / (total_norm + 1e-6), max=1.0)
        self.accelerator.backward(loss)

    def update(self, max_grad_norm: float | None) -> None:
        """Nothing left to do after backward: every parameter has been stepped."""

    def state_bytes(self) -> dict[str, int]:
        """Moments of every parameter; the gradient of one parameter at a time."""
        moments = sum(
            value.numel() * value.element_size()
            for optimizer in self.optimizers.values()
            for state in optimizer.state.values()
            for value in state.values()
            if torch.is_tensor(value) and value.dim() > 0
        )
        return {"gradients": self.largest_gradient, "optimizer": moments}

    def remove_hooks(self) -> None:
        """Detach the backward hooks (after training)."""
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    def release(self) -> None:
        """Drop every parameter's optimizer and its moments (after training)."""
        self.optimizers = {}

    def state_dict(self) -> dict:
        """Every parameter's optimizer state, in parameter order (for accelerate's checkpoints)."""
        return {"optimizers": [o.state_dict() for o in self.optimizers.values()]}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""
        for optimizer, saved in zip(self.optimizers.values(), state["optimizers"]):
            optimizer.load_state_dict(saved)
