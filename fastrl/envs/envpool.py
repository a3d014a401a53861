"""The envpool backend: EnvPool's C++ envs (an optional extra) behind gymnasium's
VectorEnv interface, with the same NEXT_STEP autoreset as the other backends."""
from __future__ import annotations

import contextlib
import warnings
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector.utils import batch_space

from fastrl.envs.group import AUTORESET
from fastrl.errors import ConfigError, EnvError
from fastrl.interrupts import import_held
from fastrl.system import cpu_cores


@contextlib.contextmanager
def _quiet_envpool():
    # EnvPool builds gymnasium Boxes from float64 bounds, and gymnasium warns about the
    # cast on every build and reset: noise for the user.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*precision lowered by casting", category=UserWarning)
        yield


class EnvPoolVectorEnv(gym.vector.VectorEnv):
    """EnvPool's C++ vector env behind the gymnasium VectorEnv interface. EnvPool's
    autoreset is NEXT_STEP (reward 0, action ignored); with batch_size = num_envs the
    results come back in env order. Env i is seeded `seed + i`, like gymnasium's."""

    def __init__(self, env_id: str, num_envs: int, env_kwargs: dict):
        try:
            envpool = import_held("envpool")
        except ImportError:
            raise ConfigError("backend='envpool' needs EnvPool: pip install envpool "
                              "(or the extra: pip install -e '.[envpool]')") from None
        if env_id not in envpool.list_all_envs():
            raise ConfigError(f"invalid env_id={env_id!r} for backend='envpool': EnvPool does not implement it")
        self._options = dict(num_envs=num_envs, batch_size=num_envs,
                             num_threads=min(num_envs, cpu_cores()), **env_kwargs)
        self._env_id = env_id
        try:
            self.pool = self._make(seed=0)
        except Exception as exc:  # EnvPool's own config check, e.g. an unknown keyword
            raise ConfigError(f"invalid env_kwargs={env_kwargs!r} for EnvPool's {env_id}: "
                              f"{str(exc).splitlines()[0]}") from None
        self.num_envs = num_envs
        with _quiet_envpool():
            self.single_observation_space = self.pool.observation_space
            self.single_action_space = self.pool.action_space
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.metadata = {"autoreset_mode": AUTORESET}

    def _make(self, seed: int):
        import envpool
        with _quiet_envpool():
            return envpool.make_gymnasium(self._env_id, seed=seed, **self._options)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        try:
            if seed is not None:  # EnvPool takes its seed when it is built
                self.pool.close()
                self.pool = self._make(seed=seed)
            with _quiet_envpool():
                return self.pool.reset()
        except Exception as exc:  # EnvPool's own error, as every backend reports an env's
            raise EnvError.of(exc) from None

    def step_async(self, actions) -> None:
        try:
            self.pool.send(np.asarray(actions, dtype=np.int32))
        except Exception as exc:
            raise EnvError.of(exc) from None

    def step_wait(self, timeout: float | None = None):  # EnvPool's recv has no timeout
        try:
            return self.pool.recv()
        except Exception as exc:
            raise EnvError.of(exc) from None

    def step(self, actions):
        self.step_async(actions)
        return self.step_wait()

    def close_extras(self, **kwargs: Any) -> None:
        self.pool.close()
