"""Steps a gymnasium vector env with actions chosen on the training device.

Per vector step: one device->host copy of the actions, and one host->device copy
of a staging row that packs [obs | reward | terminated | truncated] for all envs
(pinned memory on CUDA; on the CPU the staging row is the device row). Episode
statistics are kept on the host, where the rewards arrive anyway, so they cost no
device sync.
"""
from __future__ import annotations

import math
import multiprocessing
from typing import NamedTuple

import gymnasium as gym
import numpy as np
import torch

from fastrl.envs import WorkerDied, worker_died
from fastrl.timing import Phases

_WORKER_GONE = (EOFError, ConnectionError)  # how a pipe to a dead env worker fails


class Step(NamedTuple):
    """One vector step on the device. Views into the collector's staging row:
    valid until the next step_wait(); copy what must outlive it."""

    obs: torch.Tensor         # [N, *obs_shape] float32, next state (final obs at episode ends)
    rewards: torch.Tensor     # [N] float32
    terminated: torch.Tensor  # [N] bool
    truncated: torch.Tensor   # [N] bool


class Collector:
    def __init__(self, envs: gym.vector.VectorEnv, device: torch.device, phases: Phases | None = None):
        self.envs = envs
        self.phases = phases or Phases(enabled=False)
        self.num_envs = envs.num_envs
        self.obs_shape = tuple(envs.single_observation_space.shape)
        self.obs_size = math.prod(self.obs_shape)
        width = self.obs_size + 3
        self._host = torch.zeros((self.num_envs, width), dtype=torch.float32,
                                 pin_memory=device.type == "cuda")
        self._host_np = self._host.numpy()
        # On the CPU the staging row is the device row: nothing to copy.
        self._device_row = (self._host if device.type == "cpu" else
                            torch.zeros((self.num_envs, width), dtype=torch.float32, device=device))
        self.obs = self._device_row[:, :self.obs_size].view(self.num_envs, *self.obs_shape)
        self._actions_np: np.ndarray | None = None
        self._can_async = hasattr(envs, "step_async")
        self._pending = False  # an async step was sent and not yet collected
        self._torn = False  # step_wait() was interrupted: close() terminates the workers
        # Host-side episode statistics. `_prev_done` marks NEXT_STEP reset steps,
        # which belong to no episode.
        self._ep_return = np.zeros(self.num_envs, dtype=np.float64)
        self._ep_length = np.zeros(self.num_envs, dtype=np.int64)
        self._prev_done = np.zeros(self.num_envs, dtype=bool)
        self.finished_returns: list[float] = []
        self.finished_lengths: list[int] = []
        self.episodes = 0

    def reset(self, seed: int | None = None) -> torch.Tensor:
        """Resets every env (env i gets seed + i) and returns the first obs [N, *obs] on the device."""
        try:
            obs, _ = self.envs.reset(seed=seed)
        except _WORKER_GONE:
            raise self._worker_lost() from None
        self._host_np[:, :self.obs_size] = np.asarray(obs).reshape(self.num_envs, -1)
        self._host_np[:, self.obs_size:] = 0.0
        self._upload()
        self._ep_return[:] = 0.0
        self._ep_length[:] = 0
        self._prev_done[:] = False
        return self.obs

    def step_async(self, actions: torch.Tensor) -> None:
        """Sends actions [N] to the envs; with the async backend they step while we learn."""
        with self.phases("act"):  # the device->host copy waits for the action computation
            self._actions_np = actions.cpu().numpy()
        if self._can_async:
            with self.phases("env"):
                try:
                    self.envs.step_async(self._actions_np)
                except _WORKER_GONE:
                    raise self._worker_lost() from None
            self._pending = True

    def step_wait(self) -> Step:
        with self.phases("env"):
            if self._can_async:
                try:
                    obs, reward, terminated, truncated, _ = self.envs.step_wait()
                except _WORKER_GONE:
                    raise self._worker_lost() from None
                except KeyboardInterrupt:  # maybe in the middle of a reply: the pipes can no longer be read
                    self._torn = True
                    raise
                self._pending = False
            else:
                obs, reward, terminated, truncated, _ = self.envs.step(self._actions_np)
            self._track_episodes(reward, terminated | truncated)
        with self.phases("h2d"):
            d = self.obs_size
            host = self._host_np
            host[:, :d] = np.asarray(obs).reshape(self.num_envs, -1)
            host[:, d] = reward
            host[:, d + 1] = terminated
            host[:, d + 2] = truncated
            self._upload()
        row = self._device_row
        return Step(self.obs, row[:, d], row[:, d + 1] > 0.5, row[:, d + 2] > 0.5)

    def _worker_lost(self) -> WorkerDied:
        """The error for a broken pipe to an env worker: it names the dead process."""
        self._pending = False  # nothing more will come
        return worker_died("an env worker process", getattr(self.envs, "processes", []))

    def _upload(self) -> None:
        if self._device_row is not self._host:
            self._device_row.copy_(self._host, non_blocking=True)

    def _track_episodes(self, reward: np.ndarray, done: np.ndarray) -> None:
        active = ~self._prev_done
        self._ep_return += reward * active
        self._ep_length += active
        if done.any():
            idx = np.flatnonzero(done)
            self.finished_returns.extend(self._ep_return[idx].tolist())
            self.finished_lengths.extend(self._ep_length[idx].tolist())
            self.episodes += len(idx)
            self._ep_return[idx] = 0.0
            self._ep_length[idx] = 0
        self._prev_done = done

    def pop_episodes(self) -> tuple[list[float], list[int]]:
        """Returns and forgets the (return, length) of episodes finished since the last call."""
        out = (self.finished_returns, self.finished_lengths)
        self.finished_returns, self.finished_lengths = [], []
        return out

    def close(self, timeout: float = 10.0) -> None:
        """Closes the envs. A step still in flight (e.g. sent before an exception) is collected
        first, waiting at most `timeout` seconds. The workers are terminated instead when one
        died, or when an interrupt inside step_wait() may have left a reply half read."""
        if self._torn:  # gymnasium's close would read them even when terminating
            for pipe in getattr(self.envs, "parent_pipes", []):
                pipe.close()
        terminate = self._torn or any(not p.is_alive() for p in getattr(self.envs, "processes", []))
        if self._pending and not terminate:
            self._pending = False
            try:
                self.envs.step_wait(timeout=timeout)
            except multiprocessing.TimeoutError:
                terminate = True
        self.envs.close(terminate=terminate)
