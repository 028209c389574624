"""Adam with state only where weights can move: the masked entries of a saliency mask.

SalUn moves only the weights its mask keeps (half of them by default), so only those need a
gradient and Adam moments. Each parameter's gradient is gathered into one flat buffer of masked
values as soon as backward has accumulated it, and the dense `.grad` is freed at once: at SD
scale the dense gradient (3.4 GB) and dense moments (6.9 GB) never exist. The update is Adam's
(torch.optim.Adam's single-tensor arithmetic), applied to the masked entries in place; the other
entries are never written, so they stay bit-identical.
"""

from __future__ import annotations

import math

import torch

from erase.saliency import PackedMask, unpack_mask


class MaskedAdam:
    """Adam (no weight decay) over the masked entries of `parameters`, named as in `mask`."""

    def __init__(
        self,
        named_parameters: list[tuple[str, torch.nn.Parameter]],
        mask: PackedMask,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),  # torch.optim.Adam's defaults (SalUn: Adam)
        eps: float = 1e-8,
    ):
        self.lr, self.betas, self.eps = lr, betas, eps
        self.entries = []  # (parameter, packed mask bits, start, stop) in the flat buffers
        offset = 0
        for name, param in named_parameters:
            count = mask.count(name)
            self.entries.append((param, mask.bits[name].to(param.device), offset, offset + count))
            offset += count
        device = named_parameters[0][1].device if named_parameters else torch.device("cpu")
        self.grad = torch.zeros(offset, device=device)  # masked gradient values, in order
        self.exp_avg = torch.zeros(offset, device=device)
        self.exp_avg_sq = torch.zeros(offset, device=device)
        self.step_count = 0
        self.hooks = []

    def numel(self) -> int:
        """How many entries can move."""
        return self.grad.numel()

    def state_bytes(self) -> dict[str, int]:
        """Bytes of the flat gradient, the moments and the packed masks."""
        return {
            "gradients": self.grad.numel() * 4,
            "optimizer": 2 * self.exp_avg.numel() * 4,
            "mask": sum(bits.numel() for _, bits, _, _ in self.entries),
        }

    def gather_in_backward(self) -> None:
        """Gather each gradient as soon as backward has accumulated it, and free it (one process:
        under DDP the gradient is reduced only after backward, so call `gather` then instead)."""
        for param, bits, start, stop in self.entries:

            def gather_one(param, bits=bits, start=start, stop=stop):
                self.grad[start:stop] += param.grad[unpack_mask(bits, param.shape)].float()
                param.grad = None

            self.hooks.append(param.register_post_accumulate_grad_hook(gather_one))

    def gather(self) -> None:
        """Add the masked values of every parameter's `.grad` to the flat buffer and free it."""
        for param, bits, start, stop in self.entries:
            if param.grad is not None:
                self.grad[start:stop] += param.grad[unpack_mask(bits, param.shape)].float()
                param.grad = None

    def remove_hooks(self) -> None:
        """Detach the backward hooks (after training)."""
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale the gradient to norm <= max_norm, as torch.nn.utils.clip_grad_norm_ does on the
        masked dense gradients (the unmasked entries are zero and add nothing to the norm)."""
        norm = torch.linalg.vector_norm(self.grad)
        self.grad.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        return norm

    @torch.no_grad()
    def step(self) -> None:
        """One Adam update of the masked entries (torch.optim.Adam's arithmetic, foreach=False)."""
        self.step_count += 1
        beta1, beta2 = self.betas
        bias_correction1 = 1 - beta1**self.step_count
        bias_correction2_sqrt = math.sqrt(1 - beta2**self.step_count)
        step_size = self.lr / bias_correction1
        for param, bits, start, stop in self.entries:
            grad = self.grad[start:stop]
            exp_avg, exp_avg_sq = self.exp_avg[start:stop], self.exp_avg_sq[start:stop]
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
            selected = unpack_mask(bits, param.shape)
            values = param.data[selected].float()
            values.addcdiv_(exp_avg, denom, value=-step_size)
            param.data[selected] = values.to(param.dtype)

    def zero_grad(self) -> None:
        """Clear the flat gradient for the next step."""
        self.grad.zero_()

    def state_dict(self) -> dict:
        """Moments and step count (for accelerate's checkpoints)."""
        return {
            "step": self.step_count,
            "exp_avg": self.exp_avg,
            "exp_avg_sq": self.exp_avg_sq,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""
        self.step_count = int(state["step"])
        self.exp_avg.copy_(state["exp_avg"])
        self.exp_avg_sq.copy_(state["exp_avg_sq"])
