"""The one module that leans on gymnasium's private AsyncVectorEnv internals: its worker
function, its error queue, `_raise_if_errors` and `_state`. A gymnasium upgrade that
changes them breaks this module alone (tests/test_envs.py and test_lifecycle.py say so).

`QuietAsyncVectorEnv` starts, resets and closes the worker processes of both async
layouts and raises their errors; `plain_worker` is gymnasium's own worker, one env per
process, readied as fastrl's workers are.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import queue
import time

import gymnasium as gym
from gymnasium.vector.async_vector_env import AsyncState

from fastrl.envs.process import end_processes, report_not_closed, start_worker
from fastrl.errors import EnvCloseError
from fastrl.interrupts import ctrl_c_held


def plain_worker(index, env_fn, pipe, parent_pipe, shared_memory, error_queue, autoreset_mode, semaphore):
    """gymnasium's AsyncVectorEnv worker, readied as a worker (init_worker), and reporting
    an env that cannot be made (see start_worker) or closed."""
    env, error_queue = start_worker(env_fn, index, pipe, parent_pipe, error_queue)
    if env is not None:
        try:
            gym.vector.async_vector_env._async_worker(index, lambda: env, pipe, parent_pipe, shared_memory,
                                                      error_queue, autoreset_mode, semaphore)
        # Its last act, env.close(), raised: the env's own errors go to the queue in it. (Or
        # it could not send one because the trainer is gone, and then no one reads this.)
        except Exception:
            report_not_closed(error_queue, index, env)


class QuietAsyncVectorEnv(gym.vector.AsyncVectorEnv):
    """gymnasium's AsyncVectorEnv, but a worker's error (an EnvError carrying the env's
    traceback, see ErrorReports) is raised rather than logged as warnings: gymnasium's
    logger also fails on a '%' in the traceback, raising a TypeError instead of the error.
    If starting fails (an env that cannot be made), no worker is left running."""

    def __init__(self, *args, **kwargs):
        self._not_closed: list[tuple] = []  # error reports of envs whose close() raised
        try:
            with ctrl_c_held():  # forks: see ctrl_c_held
                super().__init__(*args, **kwargs)
        except BaseException:
            if hasattr(self, "processes"):
                self._state = AsyncState.DEFAULT  # nothing to wait for: end them
                self.close(terminate=True)
            raise

    def raise_error_of(self, w: int) -> None:
        """Raises the error that worker w reported (its step's reply said it failed)."""
        self._raise_if_errors([v != w for v in range(self.num_envs)])

    def _raise_if_errors(self, successes) -> None:
        if all(successes):  # every step, in plain AsyncVectorEnv's step_wait: nothing more
            return
        errors = []
        while len(errors) < len(successes) - sum(successes):
            report = self.error_queue.get()  # a failed worker closes its env next: its report may be next
            (self._not_closed if isinstance(report[2], EnvCloseError) else errors).append(report)
        for index, *_ in errors:  # as gymnasium does: the failed workers' pipes are closed
            self.parent_pipes[index].close()
            self.parent_pipes[index] = None
        self._state = AsyncState.DEFAULT
        raise errors[-1][2]

    TERMINATE_WAIT_S = 1.0  # after SIGTERM, how long a worker may take to end before SIGKILL
    CLOSE_WAIT_S = 10.0  # how long workers may take to close their envs when no timeout is given

    def close_extras(self, timeout: float | None = None, terminate: bool = False) -> None:
        """gymnasium's close, bounded: workers that do not answer the close within
        `timeout` are terminated, and workers that a SIGTERM does not end in
        TERMINATE_WAIT_S are killed (see end_processes)."""
        wait_s = self.CLOSE_WAIT_S if timeout is None else timeout
        try:
            if self._state != AsyncState.DEFAULT and not terminate:  # a step in flight: collect it first
                getattr(self, f"{self._state.value}_wait")(wait_s)
        except multiprocessing.TimeoutError:
            terminate = True
        pipes = [pipe for pipe in self.parent_pipes if pipe is not None and not pipe.closed]
        if not terminate:
            terminate = not _closed_in_time(pipes, wait_s)
        for pipe in pipes:
            pipe.close()
        end_processes(self.processes, terminate, self.TERMINATE_WAIT_S if terminate else wait_s)
        # Raises the first env error from a close() in a worker (see report_not_closed).
        # Every worker has ended, so its reports are all in the queue; none is read if one
        # was killed (terminate: a report it was writing then would never end).
        if any(p.exitcode != 0 for p in self.processes):
            return
        reports = []
        with contextlib.suppress(queue.Empty):
            while True:
                reports.append(self.error_queue.get_nowait())
        not_closed = self._not_closed + [r for r in reports if isinstance(r[2], EnvCloseError)]
        if not_closed:
            self.closed = True
            raise not_closed[0][2]


def _closed_in_time(pipes: list, wait_s: float) -> bool:
    """Asks each worker to close its env (gymnasium's "close" command); True if all
    answered within `wait_s` seconds."""
    deadline = time.monotonic() + wait_s
    try:
        for pipe in pipes:
            pipe.send(("close", None))
        for pipe in pipes:
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                return False
            pipe.recv()
    except (OSError, EOFError):  # a worker gone already
        return False
    return True
