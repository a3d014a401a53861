"""The grouped async backend: each worker process steps a group of envs per message
(`GroupedAsyncVectorEnv`), so the pipe round trip is paid once per group, not once per
env. Step messages are raw bytes, not pickles, and each worker runs the autoresets of
ended episodes right after replying, while the trainer works. A worker's group can also
be stepped on its own (`send_group`, `ready_groups`, `recv_group`), for a collector that
acts on each group as soon as it is ready. `GroupedVectorEnv` holds that per-group
stepping, shared with the ray backend (`fastrl.envs.ray_groups`), whose groups talk the
same raw step messages over TCP.

Process start, reset, close and error reports ride on gymnasium's AsyncVectorEnv
(through `fastrl.envs.gym_async`, the one place that touches its internals).
"""
from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import pickle
import time
from functools import partial
from typing import Any, Callable

import gymnasium as gym
import numpy as np
from gymnasium.vector.utils import batch_space, write_to_shared_memory

from fastrl.envs.group import AUTORESET, InProcessVectorEnv, merge_infos
from fastrl.envs.gym_async import QuietAsyncVectorEnv
from fastrl.envs.process import report_not_closed, start_worker
from fastrl.system import pin_to_core

# A step travels as raw bytes, not pickled: it is the hot path (one round trip per worker
# per vector step), and pickling its small arrays costs more than the pipe's own round
# trip. Out: [_STEP | actions int64[G]]; back: [_STEP | rewards float64[G] | terminated
# bool[G] | truncated bool[G]]. A reply with infos or an error, and every other command
# (reset, close, ...), is AsyncVectorEnv's usual pickled message, which never starts
# with _STEP (a pickle starts with its PROTO opcode, 0x80).
_STEP = b"fastrl-step\0\0\0\0\0"  # 16 bytes: the arrays after it stay 8-byte aligned


class StepRequest:
    """One group's step message, preallocated: `actions` is a view into `buffer`."""

    def __init__(self, group_size: int):
        self.buffer = bytearray(_STEP + bytes(8 * group_size))
        self.actions = np.frombuffer(self.buffer, np.int64, group_size, len(_STEP))


class StepReply:
    """One group's step results, preallocated: the arrays are views into `buffer`."""

    def __init__(self, group_size: int):
        G, o = group_size, len(_STEP)
        self.buffer = bytearray(_STEP + bytes(10 * G))
        self.rewards = np.frombuffer(self.buffer, np.float64, G, o)
        self.terminated = np.frombuffer(self.buffer, np.bool_, G, o + 8 * G)
        self.truncated = np.frombuffer(self.buffer, np.bool_, G, o + 9 * G)


def receive(pipe, raw: bytearray) -> Any:
    """The next message on `pipe`: None for a raw step message (now in `raw`), else the
    unpickled object."""
    try:
        size = pipe.recv_bytes_into(raw)
    except multiprocessing.BufferTooShort as exc:  # a pickled message longer than a step
        return pickle.loads(exc.args[0])
    if size == len(raw) and raw.startswith(_STEP):
        return None
    return pickle.loads(raw[:size])


def _make_group(env_fns: list[Callable[[], gym.Env]], core: int | None, trainer: int) -> InProcessVectorEnv:
    # AsyncVectorEnv builds one of these in the trainer (pid `trainer`) as a probe for
    # spaces and metadata; in a worker, `_group_worker` steps its EnvGroup.
    if core is not None and os.getpid() != trainer:
        pin_to_core(core)
    return InProcessVectorEnv(env_fns)


def _group_worker(index, env_fn, pipe, parent_pipe, shared_memory, error_queue, autoreset_mode, semaphore):
    """An AsyncVectorEnv worker (same signature and protocol as gymnasium's own, but for
    raw step messages) that steps a group of envs per message."""
    local, error_queue = start_worker(env_fn, index, pipe, parent_pipe, error_queue)
    if local is None:
        return
    parent_pipe.close()
    group, space = local.group, local.observation_space
    request, reply = StepRequest(local.num_envs), StepReply(local.num_envs)
    # The group writes its step results straight into the reply message.
    group.rewards, group.terminated, group.truncated = reply.rewards, reply.terminated, reply.truncated
    try:
        while True:
            try:
                message = receive(pipe, request.buffer)
            except EOFError:  # the trainer closed its end: it is ending the workers (terminate), or gone
                break
            if message is None:  # a step
                infos = group.step(request.actions)
                write_to_shared_memory(space, index, group.obs, shared_memory)
                if infos:
                    pipe.send(((None, group.rewards, group.terminated, group.truncated, _pack(infos)), True))
                else:
                    pipe.send_bytes(reply.buffer)
                group.reset_ended()  # while the trainer works
                continue
            command, data = message
            if command == "reset":
                infos = group.reset(data["seed"], data["options"])
                write_to_shared_memory(space, index, group.obs, shared_memory)
                pipe.send(((None, _pack(infos)), True))
            elif command == "_check_spaces":
                _, single_obs_space, single_action_space = data
                pipe.send(((single_obs_space == space, single_action_space == local.action_space), True))
            elif command == "close":
                # The trainer may be gone by now (killed): exit quietly all the same.
                with contextlib.suppress(BrokenPipeError):
                    pipe.send((None, True))
                break
            else:
                raise ValueError(f"fastrl's grouped env workers support reset, step and close, not {command!r}")
    except (KeyboardInterrupt, Exception):
        error_queue.put_current(index)
        pipe.send((None, False))
    finally:
        try:
            local.close()
        except Exception:
            report_not_closed(error_queue, index, local)


_GROUP_INFOS = "fastrl_group_infos"  # carries a group's per-env infos through AsyncVectorEnv


def _pack(infos: list[tuple[int, dict]]) -> dict:
    # Empty infos (the usual case) cost nothing; others travel as (env-in-group, info) pairs.
    return {_GROUP_INFOS: tuple(infos)} if infos else {}


class GroupedVectorEnv(gym.vector.VectorEnv):
    """Envs in `num_workers` groups of `group_size`, one connection per group (a worker's
    pipe, a Ray actor's socket: multiprocessing Connections both), each group stepped by
    a raw step message: the sending and waiting that the grouped async and the ray
    backends share. A subclass sets those counts and `channels`, calls `_init_groups()`,
    and reads the replies (`recv_group`)."""

    channels: list  # the trainer's end of each group's connection

    def _init_groups(self) -> None:
        self._requests = [StepRequest(self.group_size) for _ in range(self.num_workers)]
        self._pending = [False] * self.num_workers  # group w owes a step reply

    def _seeds_by_group(self, seed: int | list | None) -> list[list]:
        """reset()'s seeds, a list per group: env i gets seed + i (as in every gymnasium
        vector env). No step may be in flight."""
        if any(self._pending):
            raise gym.error.AlreadyPendingCallError("Calling `reset` while waiting for a pending call to `step`",
                                                    "step")
        if seed is None or isinstance(seed, int):
            seed = [None if seed is None else seed + i for i in range(self.num_envs)]
        G = self.group_size
        return [seed[w * G:(w + 1) * G] for w in range(self.num_workers)]

    def _send_failed(self, w: int, exc: OSError) -> Exception:
        """The error for a step message to group w that could not be sent."""
        return exc

    def step_async(self, actions) -> None:
        if any(self._pending):
            raise gym.error.AlreadyPendingCallError("Calling `step_async` while waiting for a pending call to "
                                                    "`step`", "step")
        actions = np.asarray(actions).reshape(self.num_workers, self.group_size)
        for w in range(self.num_workers):
            self.send_group(w, actions[w])

    # Per group, for a collector that acts on each group as soon as it has stepped,
    # without waiting for the others (step_async/step_wait are these for every group).

    def send_group(self, w: int, actions) -> None:
        """Sends group w its actions [G] (no step of that group may be pending)."""
        if self.closed:
            raise gym.error.ClosedEnvironmentError(f"{type(self).__name__}: a step after close()")
        if self._pending[w]:
            raise gym.error.AlreadyPendingCallError(f"env group {w} is still stepping", "step")
        request = self._requests[w]
        request.actions[:] = actions
        try:
            self.channels[w].send_bytes(request.buffer)
        except OSError as exc:
            raise self._send_failed(w, exc) from None
        self._pending[w] = True

    def ready_groups(self) -> list[int]:
        """The groups whose step reply has arrived, waiting until there is at least one."""
        pending = [channel for w, channel in enumerate(self.channels) if self._pending[w]]
        if not pending:
            raise gym.error.NoAsyncCallError("Calling `ready_groups` without any step in flight", "step")
        ready = multiprocessing.connection.wait(pending)
        return [w for w, channel in enumerate(self.channels) if channel in ready]

    def step(self, actions):
        self.step_async(actions)
        return self.step_wait()


class GroupedAsyncVectorEnv(GroupedVectorEnv):
    """`len(env_fns)` envs in `num_workers` AsyncVectorEnv worker processes, an equal
    group per worker. Env i is env i % G of worker i // G; it gets seed `seed + i`, as
    in plain AsyncVectorEnv, so both give identical transitions.

    AsyncVectorEnv starts, resets and closes the workers and reports their errors; steps
    go over its pipes as raw step messages (see _STEP)."""

    def __init__(self, env_fns: list[Callable[[], gym.Env]], num_workers: int, pin_workers: bool = True):
        self.num_envs = len(env_fns)
        self.num_workers = num_workers
        self.group_size = G = self.num_envs // num_workers
        probe = env_fns[0]()
        self.single_observation_space = probe.observation_space
        self.single_action_space = probe.action_space
        self.metadata = {**probe.metadata, "autoreset_mode": AUTORESET}
        probe.close()
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        groups = [partial(_make_group, env_fns[w * G:(w + 1) * G], w if pin_workers else None, os.getpid())
                  for w in range(num_workers)]
        self.workers = QuietAsyncVectorEnv(groups, shared_memory=True, copy=False, worker=_group_worker)
        # [W, G, *obs] in shared memory, seen as [N, *obs] without a copy.
        self._obs = self.workers.observations.reshape(self.num_envs, *self.single_observation_space.shape)
        self._init_groups()
        self._replies = [StepReply(G) for _ in range(num_workers)]
        # step_wait()'s rewards, terminated, truncated [N]: every worker's reply copied in, no allocation
        self._results = (np.zeros(self.num_envs, np.float64), np.zeros(self.num_envs, np.bool_),
                         np.zeros(self.num_envs, np.bool_))

    def reset(self, *, seed: int | list | None = None, options: dict | None = None):
        _, infos = self.workers.reset(seed=self._seeds_by_group(seed), options=options)
        infos_by_worker = infos.get(_GROUP_INFOS, [None] * self.num_workers)
        return self._obs, self._merge_group_infos(enumerate(infos_by_worker), {})

    def step_wait(self, timeout: float | None = None):
        if not any(self._pending):
            raise gym.error.NoAsyncCallError("Calling `step_wait` without any prior call to `step_async`", "step")
        deadline = None if timeout is None else time.monotonic() + timeout
        infos = {}
        for w, pipe in enumerate(self.workers.parent_pipes):
            if not self._pending[w]:
                continue
            if deadline is not None and not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise multiprocessing.TimeoutError(f"The call to `step_wait` has timed out after {timeout} second(s).")
            *_, group_infos = self.recv_group(w)
            infos = self._merge_group_infos([(w, group_infos)], infos)
        rewards, terminated, truncated = self._results  # reused by the next step, like the obs
        replies = self._replies
        np.concatenate([r.rewards for r in replies], out=rewards)
        np.concatenate([r.terminated for r in replies], out=terminated)
        np.concatenate([r.truncated for r in replies], out=truncated)
        return self._obs, rewards, terminated, truncated, infos

    def recv_group(self, w: int):
        """Worker w's step: (obs [G, *obs] in shared memory, rewards, terminated, truncated,
        its (env-in-group, info) pairs); the arrays are reused by its next step. Raises the
        worker's error, as step_wait() does."""
        pipe, reply, G = self.workers.parent_pipes[w], self._replies[w], self.group_size
        message = receive(pipe, reply.buffer)
        self._pending[w] = False
        pairs = ()
        if message is not None:  # pickled: with infos, or a worker's error
            result, success = message
            if not success:  # closes the failed worker's pipe and raises its error
                self.workers.raise_error_of(w)
            _, reply.rewards[:], reply.terminated[:], reply.truncated[:], group_infos = result
            pairs = group_infos[_GROUP_INFOS]
        return self._obs[w * G:(w + 1) * G], reply.rewards, reply.terminated, reply.truncated, pairs

    @property
    def channels(self) -> list:
        return self.workers.parent_pipes

    @property
    def processes(self) -> list:
        """The worker processes, as on gymnasium's AsyncVectorEnv."""
        return self.workers.processes

    @property
    def parent_pipes(self) -> list:
        """The trainer's ends of the workers' pipes, as on gymnasium's AsyncVectorEnv."""
        return self.workers.parent_pipes

    def close_extras(self, timeout: float | None = None, terminate: bool = False) -> None:
        try:
            if any(self._pending) and not terminate:
                # Collects the step in flight, so that the pipes carry only close messages.
                try:
                    self.step_wait(timeout)
                except multiprocessing.TimeoutError:
                    terminate = True
        finally:
            self.workers.close(timeout=timeout, terminate=terminate)

    def _merge_group_infos(self, pairs_by_worker, infos: dict) -> dict:
        # (worker w, its (env-in-group, info) pairs or None) -> gymnasium's batched infos.
        for w, pairs in pairs_by_worker:
            infos = merge_infos(self, pairs or (), infos, w * self.group_size)
        return infos
