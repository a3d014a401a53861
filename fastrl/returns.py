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


def discounted_returns(rewards: torch.Tensor, dones: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Monte-Carlo returns for all envs and steps at once.

    rewards, dones: [T, N] in time order (row 0 oldest); `dones` = terminated | truncated.
    Returns (G, complete), both [T, N]:
        G[t] = r[t] + gamma * G[t+1] * (1 - done[t]), i.e. the discounted sum of the
               rewards from t to the end of t's episode;
        complete[t] = an episode end lies at or after t inside the window, so G[t] is a
               full return. Where it is False, G[t] is a partial sum that must not be used.
    The linear recurrence is solved by recursive doubling: log2(T) vectorized steps
    instead of T sequential ones, with no division (stable for any gamma and length).
    """
    T = rewards.shape[0]
    b = rewards.clone()
    a = gamma * (~dones).to(rewards.dtype)  # how much of G[t+1] flows into G[t]
    shift = 1
    while shift < T:
        # After this step b[t] sums rewards t .. t+2*shift-1 and a[t] is the matching product.
        b_next = torch.cat([b[shift:], torch.zeros_like(b[:shift])])
        a_next = torch.cat([a[shift:], torch.zeros_like(a[:shift])])
        b = b + a * b_next
        a = a * a_next
        shift *= 2
    complete = torch.flip(torch.cummax(torch.flip(dones.to(torch.int8), [0]), dim=0).values, [0]).bool()
    return b, complete
