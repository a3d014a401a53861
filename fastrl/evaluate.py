"""Vectorized greedy evaluation on env seeds disjoint from training."""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np
import torch

from fastrl import checkpoint
from fastrl.config import TrainConfig
from fastrl.envs import make_vector_env
from fastrl.nets import PolicyNetwork, QNetwork, greedy_policy

# Training envs are seeded seed + i (i < num_envs); evaluation starts far above.
EVAL_SEED_OFFSET = 3_000_000_019


class EvalResult(NamedTuple):
    mean: float
    std: float
    episodes: int
    returns: list


class Evaluator:
    """Runs `episodes` greedy episodes over `num_envs` in-process envs.

    Every env plays a fixed quota of episodes (quotas differ by at most one), so
    short episodes are not over-represented the way "first N to finish" would be.
    """

    def __init__(self, env_id: str, env_kwargs: dict, num_envs: int, seed: int, device: torch.device):
        self.envs = make_vector_env(env_id, num_envs, "sync", env_kwargs)
        self.num_envs = num_envs
        self.device = device
        self._next_seed: int | None = EVAL_SEED_OFFSET + seed

    @torch.no_grad()
    def run(self, policy: Callable[[torch.Tensor], torch.Tensor], episodes: int,
            screen_below: float = math.nan) -> EvalResult:
        """policy: obs [E, *obs] -> actions [E]. With `screen_below`, stop after the first
        round (one episode per env) if its mean is already below that value: a cheap
        screen before paying for the full evaluation."""
        E = self.num_envs
        quota = np.full(E, episodes // E) + (np.arange(E) < episodes % E)
        returns: list[list[float]] = [[] for _ in range(E)]
        obs, _ = self.envs.reset(seed=self._next_seed)
        self._next_seed = None  # later evaluations continue the seeded RNG streams
        ep_return = np.zeros(E)
        prev_done = np.zeros(E, dtype=bool)
        screening = not math.isnan(screen_below) and episodes > E
        while any(len(r) < q for r, q in zip(returns, quota)):
            obs_t = torch.as_tensor(np.asarray(obs), dtype=torch.float32, device=self.device)
            actions = policy(obs_t).cpu().numpy()
            obs, reward, terminated, truncated, _ = self.envs.step(actions)
            ep_return += reward * ~prev_done
            done = terminated | truncated
            for i in np.flatnonzero(done):
                if len(returns[i]) < quota[i]:
                    returns[i].append(float(ep_return[i]))
                ep_return[i] = 0.0
            prev_done = done
            if screening and all(len(r) >= 1 for r in returns):
                screening = False
                first = [r[0] for r in returns]  # one episode per env: an unbiased sample
                if np.mean(first) < screen_below:
                    returns = [[x] for x in first]
                    break
        flat = [x for r in returns for x in r]
        return EvalResult(float(np.mean(flat)), float(np.std(flat)), len(flat), flat)

    def close(self) -> None:
        self.envs.close()


def load_policy(path: str, device: torch.device | str = "cpu"):
    """Rebuilds a trained network from a checkpoint. Returns (config, model, greedy_fn)."""
    payload = checkpoint.load(path)
    config = TrainConfig.from_dict(payload["config"])
    meta = payload["meta"]
    obs_shape, n_actions = tuple(meta["obs_shape"]), int(meta["n_actions"])
    if config.algo == "ddqn":
        model = QNetwork(obs_shape, n_actions, config.hidden, config.dueling)
    else:
        model = PolicyNetwork(obs_shape, n_actions, config.hidden, value_head=config.baseline == "value")
    model.load_state_dict(payload["model"])
    model.to(device).eval()
    return config, model, greedy_policy(model)


def evaluate_checkpoint(path: str, episodes: int = 100, seed: int = 0, device: str = "cpu",
                        num_envs: int = 20) -> EvalResult:
    """Greedy evaluation of a saved policy on env seeds disjoint from training."""
    device = torch.device(device)
    config, _, greedy = load_policy(path, device)
    evaluator = Evaluator(config.env_id, config.env_kwargs, min(num_envs, episodes), seed, device)
    try:
        return evaluator.run(greedy, episodes)
    finally:
        evaluator.close()
