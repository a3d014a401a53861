"""Double DQN: targets, loss, the update, epsilon-greedy acting, target-network updates."""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from fastrl import accel
from fastrl.buffer import Transitions
from fastrl.optim import Adam, Params, gradients
from fastrl.priorities import Priorities


class UpdateStats(NamedTuple):
    loss: torch.Tensor       # Huber TD loss (0-d)
    q_mean: torch.Tensor     # mean Q(s, a) of the batch (0-d)
    grad_norm: torch.Tensor  # gradient norm before clipping (0-d)


def double_dqn_targets(q: nn.Module, q_target: nn.Module, batch: Transitions) -> torch.Tensor:
    """y = R + discount * Q_target(s', argmax_a Q_online(s', a)) for each sample, [B]."""
    with torch.no_grad():
        next_actions = q(batch.next_obs).argmax(dim=1, keepdim=True)
        next_q = q_target(batch.next_obs).gather(1, next_actions).squeeze(1)
        return batch.returns + batch.discount * next_q


def td_loss(q: Callable[[torch.Tensor], torch.Tensor], batch: Transitions,
            y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Huber loss of Q(s, a) against y, the samples' mean weighted by `batch.weight`
    (reset pseudo-steps weigh 0; by priority, the importance-sampling weights).
    Returns (loss, Q(s, a) [B] detached)."""
    q_sa = q(batch.obs).gather(1, batch.actions.unsqueeze(1)).squeeze(1)
    per_sample = F.smooth_l1_loss(q_sa, y, reduction="none")
    loss = (per_sample * batch.weight).sum() / batch.weight.sum().clamp_min(1.0)
    return loss, q_sa.detach()


def td_gradients(q: nn.Module, params: Params, batch: Transitions,
                 y: torch.Tensor) -> tuple[Params, torch.Tensor, torch.Tensor]:
    """Gradients of `td_loss` with respect to `params` (q's own): (grads, loss, Q(s, a) [B])."""
    def loss_fn(p: Params) -> tuple[torch.Tensor, torch.Tensor]:
        return td_loss(lambda obs: functional_call(q, p, (obs,)), batch, y)

    return gradients(loss_fn, params)


def make_learn_step(sample: Callable[[], Transitions], q: nn.Module, q_target: nn.Module, optimizer: Adam,
                    tau: float, target_update_interval: int, learner: str = "eager",
                    switch: accel.Switch | None = None,
                    priorities: Priorities | None = None) -> Callable[[], UpdateStats]:
    """One gradient step on a fresh batch from `sample` (e.g. `ReplayRing.sampler(B)`):
    Double-DQN targets, Huber TD loss, gradients, clipped Adam step on `q` in place,
    then the target-network update (rate `tau`) on every `target_update_interval`-th step.
    With `priorities` (the ring's, when it samples by priority), the TD errors of the
    batch become its slots' new priorities.

    Argument-free and fixed-shape, so the whole step compiles into one graph
    (learner="compile") and can be recorded as one CUDA graph (learner="cudagraphs").
    `switch`: see accel.learner_fn.
    (`fastrl.profile.timed_learn_step` runs the same stages one by one, timed.)
    """

    def learn_step() -> UpdateStats:
        batch = sample()
        y = double_dqn_targets(q, q_target, batch)
        grads, loss, q_sa = td_gradients(q, optimizer.params, batch, y)
        if priorities is not None:
            priorities.learned(y - q_sa, batch.weight > 0)
        grad_norm = optimizer.step(grads)
        # Counted by the optimizer's device-side step count: no host branch in the step.
        update_target(q_target, q, target_update_rate(tau, target_update_interval, optimizer.steps))
        return UpdateStats(loss, q_sa.mean(), grad_norm)

    return accel.learner_fn(learn_step, learner, optimizer.device, switch)


def target_update_rate(tau: float, interval: int, updates: torch.Tensor) -> float | torch.Tensor:
    """The target update's rate after update number `updates` (a device tensor): tau on
    every `interval`-th update, else 0, which leaves the target exactly as it is
    (lerp by 0 and by 1 are exact). The schedule as tensor maths, so it runs inside
    a compiled step or a CUDA graph."""
    if interval == 1:
        return tau
    return torch.where(torch.remainder(updates, interval) == 0, tau, 0.0).float()


@torch.no_grad()
def update_target(q_target: nn.Module, q: nn.Module, tau: float | torch.Tensor) -> None:
    """Polyak update in place: target <- (1 - tau) target + tau online (tau=1: hard copy)."""
    target_params, online_params = list(q_target.parameters()), list(q.parameters())
    if isinstance(tau, float) and tau >= 1.0:
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
