"""What the learner needs to know about an env (`EnvSpec`), found by building one and
checking it (`inspect_env`), and the one place envs are made (`make_env`)."""
from __future__ import annotations

import importlib
import math
import warnings
from dataclasses import dataclass

import gymnasium as gym
import numpy as np

from fastrl.errors import ConfigError, EnvCloseError, EnvMakeError


@dataclass(frozen=True)
class EnvSpec:
    """What the learner needs to know about an env."""

    obs_shape: tuple
    n_actions: int
    reward_threshold: float  # nan when the env registers none
    max_episode_steps: int | None  # the time limit, if any
    render_modes: tuple  # the env's metadata["render_modes"]: what render_mode may be


def make_env(env_id: str, env_kwargs: dict) -> gym.Env:
    """gymnasium.make; the env's own error (a bug, a licence or server it cannot get), in
    whichever process made it, is an EnvMakeError carrying its traceback."""
    try:
        return gym.make(env_id, **env_kwargs)
    except Exception as exc:
        raise EnvMakeError.of(exc, failed=f"{env_id} could not be made") from None


def env_name(env: gym.Env) -> str:
    """The env's registered id, or its class name for an env made without gymnasium.make."""
    return env.spec.id if env.spec is not None else type(env.unwrapped).__name__


def inspect_env(env_id: str, env_kwargs: dict) -> EnvSpec:
    """Builds one env to check its spaces; raises ConfigError with a one-line reason.

    `env_id` may name the module that registers it, as gymnasium's make() allows:
    "my_envs:Maze-v0" imports my_envs first (the env workers, forked later, inherit it).
    """
    module, _, name = env_id.rpartition(":")
    if module:
        try:
            importlib.import_module(module)
        except Exception as exc:  # not found, or the module's own error (it runs on import)
            raise ConfigError(f"invalid env_id={env_id!r}: importing {module!r} failed "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    try:
        spec = gym.spec(name)
    except gym.error.Error as exc:  # unknown id, bad namespace, deprecated version...
        raise ConfigError(f"invalid env_id={env_id!r}: {str(exc).splitlines()[0]}") from None
    render_mode = env_kwargs.get("render_mode")
    try:
        with warnings.catch_warnings():  # gymnasium's warning for a mode the env lacks: refused below
            warnings.filterwarnings("ignore", message=".*not in the possible render_modes")
            env = gym.make(env_id, **env_kwargs)
    except gym.error.DependencyNotInstalled as exc:
        raise ConfigError(f"env {env_id!r} needs a missing dependency: {str(exc).splitlines()[0]}") from None
    except Exception as exc:
        if env_kwargs and isinstance(exc, (TypeError, ValueError, AssertionError)):
            # Unknown or bad keyword values: gymnasium and the envs raise all three.
            raise ConfigError(f"invalid env_kwargs={env_kwargs!r} for {env_id}: "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        raise EnvMakeError.of(exc, failed=f"{env_id} could not be made") from None  # its traceback, one line
    obs_space, act_space = env.observation_space, env.action_space
    max_episode_steps = env.spec.max_episode_steps if env.spec is not None else None
    render_modes = tuple(env.metadata.get("render_modes", ()))
    try:
        env.close()
    except Exception as exc:  # said now, rather than when a run that trained closes its envs
        raise EnvCloseError.of(exc, failed=f"{env_id} could not be closed") from None
    if render_mode is not None and render_mode not in render_modes:
        allowed = " or ".join(map(repr, render_modes)) if render_modes else "left out: it renders nothing"
        raise ConfigError(f"invalid env_kwargs render_mode={render_mode!r} for {env_id}: must be {allowed}")
    if not isinstance(act_space, gym.spaces.Discrete):
        raise ConfigError(
            f"env {env_id!r} has action space {act_space}; fastrl's algorithms need Discrete actions")
    if not isinstance(obs_space, gym.spaces.Box) or not np.issubdtype(obs_space.dtype, np.number):
        raise ConfigError(
            f"env {env_id!r} has observation space {obs_space}; fastrl needs a numeric Box observation")
    threshold = spec.reward_threshold if spec.reward_threshold is not None else math.nan
    return EnvSpec(tuple(obs_space.shape), int(act_space.n), float(threshold), max_episode_steps,
                   render_modes)
