"""Vector env construction with an explicit autoreset mode, and env checks.

fastrl relies on gymnasium's NEXT_STEP autoreset: the step after an episode ends
returns that episode's *final* observation as the state, takes no action and pays
reward 0, and only then the reset observation. The replay ring keeps the final
observation (truncated episodes bootstrap from it) and marks that reset step as a
pseudo-transition that is never learned from.
"""
from __future__ import annotations

import math
import signal
from dataclasses import dataclass
from functools import partial

import gymnasium as gym
import numpy as np

from fastrl.config import ConfigError

AUTORESET = gym.vector.AutoresetMode.NEXT_STEP


@dataclass(frozen=True)
class EnvSpec:
    """What the learner needs to know about an env."""

    obs_shape: tuple
    n_actions: int
    reward_threshold: float  # nan when the env registers none
    max_episode_steps: int | None  # the time limit, if any


def _make_one(env_id: str, env_kwargs: dict) -> gym.Env:
    return gym.make(env_id, **env_kwargs)


def _make_in_worker(env_id: str, env_kwargs: dict) -> gym.Env:
    # Ctrl-C goes to the whole process group; the trainer handles it and closes
    # the workers, which must not die mid-step with a traceback of their own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return _make_one(env_id, env_kwargs)


def inspect_env(env_id: str, env_kwargs: dict) -> EnvSpec:
    """Builds one env to check its spaces; raises ConfigError with a one-line reason."""
    try:
        spec = gym.spec(env_id)
    except gym.error.Error as exc:  # unknown id, bad namespace, deprecated version...
        raise ConfigError(f"invalid env_id={env_id!r}: {str(exc).splitlines()[0]}") from None
    try:
        env = _make_one(env_id, env_kwargs)
    except TypeError as exc:
        raise ConfigError(f"invalid env_kwargs={env_kwargs!r} for {env_id}: {exc}") from None
    except gym.error.DependencyNotInstalled as exc:
        raise ConfigError(f"env {env_id!r} needs a missing dependency: {str(exc).splitlines()[0]}") from None
    try:
        obs_space, act_space = env.observation_space, env.action_space
        max_episode_steps = env.spec.max_episode_steps if env.spec is not None else None
    finally:
        env.close()
    if not isinstance(act_space, gym.spaces.Discrete):
        raise ConfigError(
            f"env {env_id!r} has action space {act_space}; fastrl's algorithms need Discrete actions")
    if not isinstance(obs_space, gym.spaces.Box) or not np.issubdtype(obs_space.dtype, np.number):
        raise ConfigError(
            f"env {env_id!r} has observation space {obs_space}; fastrl needs a numeric Box observation")
    threshold = spec.reward_threshold if spec.reward_threshold is not None else math.nan
    return EnvSpec(tuple(obs_space.shape), int(act_space.n), float(threshold), max_episode_steps)


def make_vector_env(env_id: str, num_envs: int, backend: str = "async",
                    env_kwargs: dict | None = None) -> gym.vector.VectorEnv:
    """N copies of `env_id` with NEXT_STEP autoreset.

    `copy=False` makes step() hand back the same observation buffer every time
    (shared memory for async), which the collector copies straight to the device.
    """
    if backend == "async":
        fns = [partial(_make_in_worker, env_id, dict(env_kwargs or {})) for _ in range(num_envs)]
        return gym.vector.AsyncVectorEnv(fns, shared_memory=True, copy=False, autoreset_mode=AUTORESET)
    if backend == "sync":
        fns = [partial(_make_one, env_id, dict(env_kwargs or {})) for _ in range(num_envs)]
        return gym.vector.SyncVectorEnv(fns, copy=False, autoreset_mode=AUTORESET)
    raise ConfigError(f"invalid backend={backend!r}: must be async or sync")
