"""Steps a gymnasium vector env with actions chosen on the training device.

Per vector step (of each group of envs): one device->host copy of the actions, and one
host->device copy of a staging row that packs [obs | reward | terminated | truncated]
(pinned memory on CUDA; on the CPU the staging row is the device row). Episode
statistics are kept on the host, where the rewards arrive anyway, so they cost no
device sync.
"""
from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import gymnasium as gym
import numpy as np
import torch

from fastrl.envs.process import worker_died
from fastrl.errors import WorkerDied
from fastrl.timing import Phases

_WORKER_GONE = (EOFError, ConnectionError)  # how a pipe to a dead env worker fails


class Step(NamedTuple):
    """One step of a group of G envs (all N in lockstep) on the device. Views into the
    collector's staging: valid until that group's next step; copy what must outlive it."""

    obs: torch.Tensor         # [G, *obs_shape] float32, next state (final obs at episode ends)
    rewards: torch.Tensor     # [G] float32
    terminated: torch.Tensor  # [G] bool
    truncated: torch.Tensor   # [G] bool


class Collector:
    """Steps `envs` with actions from the device, in groups of envs: in lockstep (the
    default) one group of all envs, stepped together. With `ready_first` and grouped
    async workers, one group per worker, acted on as soon as that worker has stepped it
    without waiting for the others, so a worker on a slower core holds no one back;
    the order of groups then depends on timing. Either way each env steps exactly as in
    lockstep: the same transitions for the same actions."""

    def __init__(self, envs: gym.vector.VectorEnv, device: torch.device, phases: Phases | None = None,
                 ready_first: bool = False):
        self.envs = envs
        self.phases = phases or Phases(enabled=False)
        self.num_envs = N = envs.num_envs
        self.obs_shape = tuple(envs.single_observation_space.shape)
        self.obs_size = math.prod(self.obs_shape)
        self._per_worker = ready_first and hasattr(envs, "send_group")
        workers = envs.num_workers if self._per_worker else 1
        G = N // workers
        self.groups = [slice(g * G, (g + 1) * G) for g in range(workers)]  # env indices of each group
        width = self.obs_size + 3
        self._host = torch.zeros((N, width), dtype=torch.float32, pin_memory=device.type == "cuda")
        self._host_np = self._host.numpy()
        # On the CPU the staging row is the device row: nothing to copy.
        self._upload = device.type != "cpu"
        self._device_row = (torch.zeros((N, width), dtype=torch.float32, device=device) if self._upload
                            else self._host)
        self.obs = self._device_row[:, :self.obs_size].view(N, *self.obs_shape)
        self._flags = torch.zeros((N, 2), dtype=torch.bool, device=device)  # terminated, truncated
        # Per group, views made once: (host staging, device staging, its flags, the Step it returns).
        d = self.obs_size
        self._staging = [(self._host_np[c], self._host[c], self._device_row[c], self._flags[c],
                          Step(self.obs[c], self._device_row[c, d], self._flags[c, 0], self._flags[c, 1]))
                         for c in self.groups]
        self._actions_np: np.ndarray | None = None  # the sync backend steps them in step_wait()
        self._can_async = hasattr(envs, "step_async")
        # A reply may be half read (an interrupt in step_wait) or never come (a dead worker):
        # close() then terminates the workers without reading their pipes.
        self._unreadable = False
        # Host-side episode statistics. `_prev_done` marks NEXT_STEP reset steps,
        # which belong to no episode.
        self._ep_return = np.zeros(N, dtype=np.float64)
        self._ep_length = np.zeros(N, dtype=np.int64)
        self._prev_done = np.zeros(N, dtype=bool)
        self.finished_returns: list[float] = []
        self.finished_lengths: list[int] = []
        self.finished_at: list[int] = []
        self.env_steps = 0  # env steps received (a resumed run sets it to where it goes on)
        self.episodes = 0

    def reset(self, seed: int | None = None) -> torch.Tensor:
        """Resets every env (env i gets seed + i) and returns the first obs [N, *obs] on the device."""
        try:
            obs, _ = self.envs.reset(seed=seed)
        except _WORKER_GONE:
            raise self._worker_lost() from None
        self._host_np[:, :self.obs_size] = np.asarray(obs).reshape(self.num_envs, -1)
        self._host_np[:, self.obs_size:] = 0.0
        if self._upload:
            self._device_row.copy_(self._host, non_blocking=True)
        self._ep_return[:] = 0.0
        self._ep_length[:] = 0
        self._prev_done[:] = False
        return self.obs

    def step_async(self, actions: torch.Tensor) -> None:
        """Lockstep: sends actions [N] to the envs; with the async backend they step while we learn."""
        self.send(0, actions)

    def step_wait(self) -> Step:
        """Lockstep: the step of every env (see `receive`)."""
        return self.receive(0)

    def send(self, group: int, actions: torch.Tensor) -> None:
        """Sends actions [G] to the envs of `group` (indices `groups[group]`)."""
        with self.phases("act"):  # the device->host copy waits for the action computation
            actions_np = actions.cpu().numpy()
        if not self._can_async:
            self._actions_np = actions_np
            return
        with self.phases("env"):
            try:
                if self._per_worker:
                    self.envs.send_group(group, actions_np)
                else:
                    self.envs.step_async(actions_np)
            except _WORKER_GONE:
                raise self._worker_lost() from None

    def ready(self) -> list[int]:
        """The groups whose step has arrived (waiting for one): lockstep, the one group."""
        if not self._per_worker:
            return [0]
        with self.phases("env"):  # waits without reading: an interrupt here tears no reply
            return self.envs.ready_groups()

    def receive(self, group: int) -> Step:
        """The step of `group`'s envs on the device, waiting for it if need be."""
        envs, cols = self.envs, self.groups[group]
        with self.phases("env"):
            try:
                if self._per_worker:
                    obs, reward, terminated, truncated, _ = envs.recv_group(group)
                elif self._can_async:
                    obs, reward, terminated, truncated, _ = envs.step_wait()
                else:
                    obs, reward, terminated, truncated, _ = envs.step(self._actions_np)
            except _WORKER_GONE:
                raise self._worker_lost() from None
            except KeyboardInterrupt:  # maybe in the middle of a reply: the pipes can no longer be read
                self._unreadable = True
                raise
            self._track_episodes(cols, reward, terminated | truncated)
        with self.phases("h2d"):
            host, host_t, row, flags, step = self._staging[group]
            d = self.obs_size
            host[:, :d] = np.asarray(obs).reshape(len(host), -1)
            host[:, d] = reward
            host[:, d + 1] = terminated
            host[:, d + 2] = truncated
            if self._upload:  # (on the CPU, row and host_t are two views of the same memory)
                row.copy_(host_t, non_blocking=True)
            torch.gt(row[:, d + 1:], 0.5, out=flags)
        return step

    def _worker_lost(self) -> WorkerDied:
        """The error for a broken pipe to an env worker: it names the dead process."""
        self._unreadable = True  # nothing more will come
        return worker_died("an env worker process", getattr(self.envs, "processes", []))

    def _track_episodes(self, cols: slice, reward: np.ndarray, done: np.ndarray) -> None:
        self.env_steps += cols.stop - cols.start
        active = ~self._prev_done[cols]
        self._ep_return[cols] += reward * active
        self._ep_length[cols] += active
        if done.any():
            idx = np.flatnonzero(done) + cols.start
            self.finished_returns.extend(self._ep_return[idx].tolist())
            self.finished_lengths.extend(self._ep_length[idx].tolist())
            self.finished_at.extend([self.env_steps] * len(idx))
            self.episodes += len(idx)
            self._ep_return[idx] = 0.0
            self._ep_length[idx] = 0
        self._prev_done[cols] = done

    def pop_episodes(self) -> tuple[list[float], list[int], list[int]]:
        """Returns and forgets the returns, lengths and end steps (`env_steps` when each
        ended) of the episodes finished since the last call."""
        out = (self.finished_returns, self.finished_lengths, self.finished_at)
        self.finished_returns, self.finished_lengths, self.finished_at = [], [], []
        return out

    def close(self, timeout: float = 10.0, terminate: bool = False) -> None:
        """Closes the envs. The vector env collects a step still in flight (e.g. sent before
        an exception) first, waiting at most `timeout` seconds. The workers are terminated
        instead when asked (`terminate`: a forced stop), when one died unannounced (killed:
        before or during the close), or when an interrupt inside step_wait() may have
        left a reply half read. A worker whose env
        raised has ended after closing it, and the others still close theirs (an env may
        hold a simulator process that a terminated worker would leave running)."""
        pipes = getattr(self.envs, "parent_pipes", [])  # None: a worker whose error was raised
        processes = getattr(self.envs, "processes", [])
        killed = any(not p.is_alive() and pipe is not None for p, pipe in zip(processes, pipes))
        terminate = terminate or self._unreadable or killed
        if terminate:
            # gymnasium's close reads a pending step's replies even when terminating, and a
            # torn reply would hang it, a dead worker's end of file raise EOFError there.
            for pipe in pipes:
                if pipe is not None:
                    pipe.close()
        with warnings.catch_warnings():  # gymnasium's, for the pending step it collects or we chose not to read
            warnings.filterwarnings("ignore", message=".*Calling `close` while waiting for a pending call")
            try:
                self.envs.close(timeout=timeout, terminate=terminate)
            except _WORKER_GONE:  # a worker died since (a signal to the whole process group)
                self.envs.close(terminate=True)
