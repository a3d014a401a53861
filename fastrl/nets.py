"""Networks: an MLP torso with a Q head (optionally dueling) or a policy head."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from fastrl.config import TrainConfig


def mlp(in_dim: int, hidden: tuple, activation=nn.ReLU) -> nn.Sequential:
    layers, width = [], in_dim
    for h in hidden:
        layers += [nn.Linear(width, int(h)), activation()]
        width = int(h)
    return nn.Sequential(*layers)


class QNetwork(nn.Module):
    """obs [B, *obs_shape] -> Q-values [B, n_actions]."""

    def __init__(self, obs_shape: tuple, n_actions: int, hidden: tuple = (256, 256), dueling: bool = False):
        super().__init__()
        self.torso = mlp(math.prod(obs_shape), hidden)
        width = int(hidden[-1])
        self.dueling = dueling
        self.advantage = nn.Linear(width, n_actions)
        self.value = nn.Linear(width, 1) if dueling else None

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        h = self.torso(obs.flatten(1))
        adv = self.advantage(h)
        if self.value is None:
            return adv
        return self.value(h) + adv - adv.mean(dim=1, keepdim=True)


class PolicyNetwork(nn.Module):
    """obs [B, *obs_shape] -> action logits [B, n_actions]; with_value=True: (logits,
    state values [B]), the values 0 without a value head."""

    def __init__(self, obs_shape: tuple, n_actions: int, hidden: tuple = (128, 128), value_head: bool = False):
        super().__init__()
        self.torso = mlp(math.prod(obs_shape), hidden, activation=nn.Tanh)
        width = int(hidden[-1])
        self.logits = nn.Linear(width, n_actions)
        self.value = nn.Linear(width, 1) if value_head else None

    def forward(self, obs: torch.Tensor, with_value: bool = False):
        h = self.torso(obs.flatten(1))
        if not with_value:
            return self.logits(h)
        value = self.value(h).squeeze(1) if self.value is not None else torch.zeros_like(h[:, 0])
        return self.logits(h), value


def greedy_policy(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """obs [E, *obs] -> argmax actions [E]; the same for Q-values and policy logits."""

    @torch.no_grad()
    def greedy(obs: torch.Tensor) -> torch.Tensor:
        return model(obs).argmax(dim=1)

    return greedy


def build_network(config: TrainConfig, obs_shape: tuple, n_actions: int) -> torch.nn.Module:
    """The network `config` trains, freshly initialised: training, evaluation and
    checkpoint loading all build it here."""
    if config.algo == "ddqn":
        return QNetwork(obs_shape, n_actions, config.hidden, config.dueling)
    return PolicyNetwork(obs_shape, n_actions, config.hidden, value_head=config.baseline == "value")
