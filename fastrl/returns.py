"""Pure, batched return computations (no Python loops over time or samples).

Each function has a plain-loop twin in tests/ that it is checked against.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class NStep(NamedTuple):
    returns: torch.Tensor    # [B] sum_{k<m} gamma^k r_k
    discount: torch.Tensor   # [B] gamma^m, or 0 when the window ended in a termination
    steps: torch.Tensor      # [B] m, the number of rewards actually summed (1..n)


def nstep_targets(rewards: torch.Tensor, dones: torch.Tensor, terminated: torch.Tensor,
                  horizon: torch.Tensor, gamma: float) -> NStep:
    """n-step returns for a batch of windows.

    rewards, dones, terminated: [B, n], the n rows following each sampled start,
        in time order (row 0 is the start). `dones` = terminated | truncated.
    horizon: [B] int, how many of those rows have been written (>= 1); rows at or
        past the ring's write head do not count.
    A window stops after the first done row or at the horizon, whichever comes
    first, so it never crosses an episode end nor the write head. The bootstrap
    term is discounted by gamma^m for the m rewards summed, and dropped when the
    window ended in a termination (a truncation still bootstraps).
    """
    n = rewards.shape[1]
    k = torch.arange(n, device=rewards.device)
    done_i = dones.to(torch.int32)
    done_before = (torch.cumsum(done_i, dim=1) - done_i) > 0
    inside = (k < horizon.unsqueeze(1)) & ~done_before
    steps = inside.sum(dim=1)
    powers = torch.pow(torch.full_like(rewards[:1], gamma), k.to(rewards.dtype))  # [1, n]
    returns = (rewards * powers * inside).sum(dim=1)
    ended_terminal = terminated.gather(1, (steps - 1).unsqueeze(1)).squeeze(1)
    discount = torch.pow(torch.full_like(returns, gamma), steps.to(rewards.dtype)) * (~ended_terminal)
    return NStep(returns, discount, steps)
