"""REINFORCE: policy-gradient loss with optional return normalization, baseline
(running mean or learned value head), entropy bonus and truncated importance weights
for steps an older policy acted; sampling on the device."""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch.func import functional_call
from torch.nn import functional as F

from fastrl import accel
from fastrl.buffer import Episodes
from fastrl.nets import PolicyNetwork
from fastrl.optim import Adam, Params, gradients


class UpdateStats(NamedTuple):
    loss: torch.Tensor         # total loss (0-d)
    policy_loss: torch.Tensor
    value_loss: torch.Tensor
    entropy: torch.Tensor      # mean policy entropy over the learned steps
    grad_norm: torch.Tensor


def masked_mean(x: torch.Tensor, w: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return (x * w).sum() / count


def make_gradients(policy: PolicyNetwork, params: Params, baseline: str, normalize_returns: bool,
                   entropy_coef: float, value_coef: float, running_mean: torch.Tensor, importance_clip: float = 0.0
                   ) -> Callable[[Episodes], tuple[Params, torch.Tensor, tuple[torch.Tensor, ...]]]:
    """batch -> (gradients of the REINFORCE loss with respect to `params` (the policy's own),
    the loss, (policy loss, value loss, mean entropy)) over the masked steps of the batch.

    `running_mean` (0-d tensor) is the 'mean' baseline: each batch is measured against
    it, then it moves 10% of the way to the batch's mean return (in place).

    A step is learned once its episode has ended, so a long episode's first steps were
    acted by a policy many updates older. `importance_clip` > 0 weighs each step's
    policy-gradient term by min(pi(a|s) / mu(a|s), importance_clip), pi the policy now and
    mu the one that acted (truncated importance sampling); 0 leaves the weights at 1."""

    def forward_backward(batch: Episodes) -> tuple[Params, torch.Tensor, tuple[torch.Tensor, ...]]:
        w = batch.mask.to(torch.float32)
        count = w.sum().clamp_min(1.0)
        returns = batch.returns
        if normalize_returns:
            mean = masked_mean(returns, w, count)
            std = masked_mean((returns - mean) ** 2, w, count).sqrt()
            returns = (returns - mean) / (std + 1e-8)

        def loss_fn(params: Params) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
            logits, value = functional_call(policy, params, (batch.obs,), {"with_value": True})
            log_probs = F.log_softmax(logits, dim=1)
            log_prob = log_probs.gather(1, batch.actions.unsqueeze(1)).squeeze(1)
            entropy = -(log_probs.exp() * log_probs).sum(dim=1)
            if baseline == "value":
                advantage = returns - value.detach()
                value_loss = masked_mean((value - returns) ** 2, w, count)
            else:
                advantage = returns - running_mean if baseline == "mean" else returns
                value_loss = torch.zeros((), device=w.device)
            if importance_clip > 0:
                ratio = (log_prob.detach() - batch.log_probs).exp().clamp(max=importance_clip)
                advantage = ratio * advantage
            policy_loss = -masked_mean(log_prob * advantage, w, count)
            mean_entropy = masked_mean(entropy, w, count)
            loss = policy_loss - entropy_coef * mean_entropy + value_coef * value_loss
            return loss, (policy_loss.detach(), value_loss.detach(), mean_entropy.detach())

        grads, loss, parts = gradients(loss_fn, params)
        if baseline == "mean":  # after its use as this batch's baseline
            running_mean.lerp_(masked_mean(returns, w, count), 0.1)
        return grads, loss, parts

    return forward_backward


def make_update(policy: PolicyNetwork, optimizer: Adam, baseline: str, normalize_returns: bool,
                entropy_coef: float, value_coef: float, running_mean: torch.Tensor, importance_clip: float = 0.0,
                learner: str = "eager") -> Callable[[Episodes], UpdateStats]:
    """One gradient step on every masked step of `batch` (fixed shapes: compiles once).
    (`fastrl.profile.timed_update` runs its two stages apart, timed.)"""
    forward_backward = make_gradients(policy, optimizer.params, baseline, normalize_returns, entropy_coef,
                                      value_coef, running_mean, importance_clip)

    def update(batch: Episodes) -> UpdateStats:
        grads, loss, parts = forward_backward(batch)
        return UpdateStats(loss, *parts, optimizer.step(grads))

    return accel.learner_fn(update, learner, optimizer.device)


def make_act(policy: PolicyNetwork) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Samples a ~ softmax(logits) on the device (Gumbel-max): obs [N, *obs] -> (actions
    [N] int64, their log-probabilities [N])."""

    @torch.no_grad()
    def act(obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = policy(obs)
        gumbel = -torch.log(-torch.log(torch.rand_like(logits).clamp_(1e-20, 1.0)))
        actions = (logits + gumbel).argmax(dim=1)
        return actions, F.log_softmax(logits, dim=1).gather(1, actions.unsqueeze(1)).squeeze(1)

    return act
