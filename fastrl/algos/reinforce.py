"""REINFORCE: policy-gradient loss with optional return normalization, baseline
(running mean or learned value head) and entropy bonus; sampling on the device."""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch.nn import functional as F

from fastrl import accel
from fastrl.buffer import Episodes
from fastrl.nets import PolicyNetwork
from fastrl.optim import make_optimizer_step
from fastrl.timing import Phases


class UpdateStats(NamedTuple):
    loss: torch.Tensor         # total loss (0-d)
    policy_loss: torch.Tensor
    value_loss: torch.Tensor
    entropy: torch.Tensor      # mean policy entropy over the learned steps
    grad_norm: torch.Tensor


def masked_mean(x: torch.Tensor, w: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return (x * w).sum() / count


def make_update(policy: PolicyNetwork, optimizer: torch.optim.Optimizer, baseline: str,
                normalize_returns: bool, entropy_coef: float, value_coef: float, max_grad_norm: float,
                running_mean: torch.Tensor, learner: str = "eager",
                phases: Phases | None = None) -> Callable[[Episodes], UpdateStats]:
    """One gradient step on every masked step of `batch` (fixed shapes: compiles once).

    `running_mean` (0-d tensor) is the 'mean' baseline, updated in place. With `phases`
    (profiling) the stages forward_backward and optimizer_step are compiled and timed apart.
    """

    def forward_backward(batch: Episodes) -> tuple[torch.Tensor, ...]:
        w = batch.mask.to(torch.float32)
        count = w.sum().clamp_min(1.0)
        returns = batch.returns
        if normalize_returns:
            mean = masked_mean(returns, w, count)
            std = masked_mean((returns - mean) ** 2, w, count).sqrt()
            returns = (returns - mean) / (std + 1e-8)
        logits, value = policy.logits_and_value(batch.obs)
        log_probs = F.log_softmax(logits, dim=1)
        log_prob = log_probs.gather(1, batch.actions.unsqueeze(1)).squeeze(1)
        entropy = -(log_probs.exp() * log_probs).sum(dim=1)
        if baseline == "value":
            advantage = returns - value.detach()
            value_loss = masked_mean((value - returns) ** 2, w, count)
        elif baseline == "mean":
            advantage = returns - running_mean
            value_loss = torch.zeros((), device=w.device)
            running_mean.lerp_(masked_mean(returns, w, count).detach(), 0.1)
        else:
            advantage = returns
            value_loss = torch.zeros((), device=w.device)
        policy_loss = -masked_mean(log_prob * advantage, w, count)
        mean_entropy = masked_mean(entropy, w, count)
        loss = policy_loss - entropy_coef * mean_entropy + value_coef * value_loss
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        return loss.detach(), policy_loss.detach(), value_loss.detach(), mean_entropy.detach()

    optimizer_step = make_optimizer_step(list(policy.parameters()), optimizer, max_grad_norm)

    if phases is None:
        def update(batch: Episodes) -> UpdateStats:
            return UpdateStats(*forward_backward(batch), optimizer_step())

        return accel.learner_fn(update, learner)

    forward_backward, optimizer_step = (accel.compile_fn(f, learner != "eager")
                                        for f in (forward_backward, optimizer_step))

    def timed_update(batch: Episodes) -> UpdateStats:
        with phases("forward_backward"):
            losses = forward_backward(batch)
        with phases("optimizer_step"):
            grad_norm = optimizer_step()
        return UpdateStats(*losses, grad_norm)

    return timed_update


def make_act(policy: PolicyNetwork) -> Callable[[torch.Tensor], torch.Tensor]:
    """Samples a ~ softmax(logits) on the device (Gumbel-max): obs [N, *obs] -> [N] int64."""

    @torch.no_grad()
    def act(obs: torch.Tensor) -> torch.Tensor:
        logits = policy(obs)
        gumbel = -torch.log(-torch.log(torch.rand_like(logits).clamp_(1e-20, 1.0)))
        return (logits + gumbel).argmax(dim=1)

    return act
