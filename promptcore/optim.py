"""A batched AdamW: many independent parameters stacked on dim 0, each with its own fresh state
(TPT tunes one context per test image this way)."""

from __future__ import annotations

from typing import Optional

import torch


class BatchedAdamW:
    """AdamW on a stack of independent parameters, fresh state, torch.optim.AdamW's arithmetic.

    The update is elementwise, so row n of ``param`` (N, ...) evolves exactly as it would alone
    under ``torch.optim.AdamW([param_n], lr, betas, eps, weight_decay)`` (its single-tensor path:
    decoupled decay ``p *= 1 - lr * wd``, ``m.lerp_(g, 1 - b1)``, ``v = b2 v + (1 - b2) g^2``,
    ``p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`` with Python-float scalars).
    ``step(grad, finite)`` skips the rows whose ``finite`` flag is False (non-finite gradients, as
    GradScaler skips a step); the step count is shared by all rows.
    """

    def __init__(self, param: torch.Tensor, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        self.param = param
        self.lr, self.betas, self.eps, self.weight_decay = float(lr), tuple(betas), float(eps), float(weight_decay)
        self.exp_avg = torch.zeros_like(param, memory_format=torch.preserve_format)
        self.exp_avg_sq = torch.zeros_like(param, memory_format=torch.preserve_format)
        self.step_count = 0

    @torch.no_grad()
    def step(self, grad: torch.Tensor, finite: Optional[torch.Tensor] = None) -> None:
        """One AdamW step with ``grad`` (same shape as the parameter); rows with ``finite`` False stay put."""
        p, m, v = self.param, self.exp_avg, self.exp_avg_sq
        if finite is not None:
            old = (p.clone(), m.clone(), v.clone())
            grad = torch.where(_rows(finite, grad), grad, torch.zeros_like(grad))
        self.step_count += 1
        step = float(self.step_count)  # torch keeps the count in a float tensor and reads it with .item()
        beta1, beta2 = self.betas
        p.mul_(1 - self.lr * self.weight_decay)
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = self.lr / (1 - beta1 ** step)
        denom = (v.sqrt() / (1 - beta2 ** step) ** 0.5).add_(self.eps)
        p.addcdiv_(m, denom, value=-step_size)
        if finite is not None:
            keep = _rows(finite, p)
            for new, prev in zip((p, m, v), old):
                new.copy_(torch.where(keep, new, prev))


def _rows(flags: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return flags.reshape(-1, *([1] * (like.dim() - 1)))
