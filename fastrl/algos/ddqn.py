"""Double DQN: loss, epsilon-greedy acting, target updates, epsilon schedule."""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from fastrl.buffer import Transitions


class UpdateStats(NamedTuple):
    loss: torch.Tensor       # Huber TD loss (0-d)
    q_mean: torch.Tensor     # mean Q(s, a) of the batch (0-d)
    grad_norm: torch.Tensor  # gradient norm before clipping (0-d)


def double_dqn_targets(q: nn.Module, q_target: nn.Module, batch: Transitions,
                       next_q_online: torch.Tensor | None = None) -> torch.Tensor:
    """y = R + discount * Q_target(s', argmax_a Q_online(s', a)) for each sample, [B].

    `next_q_online` ([B, A], optional) saves a forward pass when the caller has it.
    """
    with torch.no_grad():
        if next_q_online is None:
            next_q_online = q(batch.next_obs)
        next_actions = next_q_online.argmax(dim=1, keepdim=True)
        next_q = q_target(batch.next_obs).gather(1, next_actions).squeeze(1)
        return batch.returns + batch.discount * next_q


def td_loss(q: nn.Module, q_target: nn.Module, batch: Transitions) -> tuple[torch.Tensor, torch.Tensor]:
    """Huber loss averaged over samples with weight 1 (reset pseudo-steps weigh 0)."""
    # One online forward over [s; s'] instead of two; the s' half only picks actions.
    q_both = q(torch.cat([batch.obs, batch.next_obs]))
    q_values, next_q_online = q_both.split(batch.obs.shape[0])
    y = double_dqn_targets(q, q_target, batch, next_q_online.detach())
    q_sa = q_values.gather(1, batch.actions.unsqueeze(1)).squeeze(1)
    per_sample = F.smooth_l1_loss(q_sa, y, reduction="none")
    loss = (per_sample * batch.weight).sum() / batch.weight.sum().clamp_min(1.0)
    return loss, q_sa.detach().mean()


def make_update(q: nn.Module, q_target: nn.Module, optimizer: torch.optim.Optimizer,
                max_grad_norm: float) -> Callable[[Transitions], UpdateStats]:
    """One gradient step on a batch; pure in shape, so torch.compile traces it once."""
    params = [p for p in q.parameters()]

    def update(batch: Transitions) -> UpdateStats:
        loss, q_mean = td_loss(q, q_target, batch)
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        if max_grad_norm > 0:
            grad_norm = nn.utils.clip_grad_norm_(params, max_grad_norm)
        else:
            grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        optimizer.step()
        return UpdateStats(loss.detach(), q_mean, grad_norm.detach())

    return update


@torch.no_grad()
def update_target(q_target: nn.Module, q: nn.Module, tau: float) -> None:
    """Polyak update in place: target <- (1 - tau) target + tau online (tau=1: hard copy)."""
    target_params, online_params = list(q_target.parameters()), list(q.parameters())
    if tau >= 1.0:
        torch._foreach_copy_(target_params, online_params)
    else:
        torch._foreach_lerp_(target_params, online_params, tau)


def make_act(q: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Epsilon-greedy on the device: obs [N, *obs], eps 0-d tensor -> actions [N] int64."""

    @torch.no_grad()
    def act(obs: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        q_values = q(obs)
        n, n_actions = q_values.shape
        random_actions = torch.randint(0, n_actions, (n,), device=obs.device)
        explore = torch.rand(n, device=obs.device) < eps
        return torch.where(explore, random_actions, q_values.argmax(dim=1))

    return act
