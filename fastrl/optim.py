"""Optimizer pieces shared by the learners."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def adam(params, lr: float, device: torch.device) -> tuple[torch.optim.Optimizer, torch.Tensor]:
    """Adam whose learning rate is a device tensor, changed in place by schedules, so a
    compiled update never sees a new Python constant (no recompiles, no host sync).
    Returns (optimizer, lr_tensor)."""
    lr_t = torch.tensor(lr, dtype=torch.float32, device=device)
    # A tensor lr with the foreach implementation needs capturable=True, which eager
    # PyTorch allows on accelerators only; on CPU the per-tensor implementation takes it.
    on_accelerator = device.type != "cpu"
    return torch.optim.Adam(params, lr=lr_t, foreach=on_accelerator, capturable=on_accelerator), lr_t


def make_optimizer_step(params: list[torch.Tensor], optimizer: torch.optim.Optimizer,
                        max_grad_norm: float) -> Callable[[], torch.Tensor]:
    """Clip the gradient norm (max_grad_norm > 0) and step; returns the norm before clipping."""

    def optimizer_step() -> torch.Tensor:
        max_norm = max_grad_norm if max_grad_norm > 0 else float("inf")
        grad_norm = nn.utils.clip_grad_norm_(params, max_norm)
        optimizer.step()
        return grad_norm.detach()

    return optimizer_step
