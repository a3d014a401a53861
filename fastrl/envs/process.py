"""An env worker process's side of things, on every async backend: readying the process
(`init_worker`), making its envs and reporting their errors to the trainer
(`start_worker`, `ErrorReports`), and naming a worker that died (`worker_died`)."""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time
from typing import Any, Callable

import gymnasium as gym

from fastrl.envs.spec import env_name
from fastrl.errors import EnvCloseError, EnvError, WorkerDied

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def init_worker() -> None:
    """Readies a worker process (env or evaluation) that the trainer started.

    Ctrl-C goes to the whole process group; the trainer handles it and closes the
    workers, which must not die mid-step with a traceback of their own. And on Linux the
    worker is killed when the trainer dies, however it dies (`kill -9`, the OOM killer):
    blocked on its pipe, it would otherwise wait forever, since processes forked after
    it hold copies of the pipe's other end, so the trainer's death does not close it.
    (Linux ties the worker to the trainer thread that started it: `train()` ends its
    workers before it returns.)
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        parent = os.getppid()
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # it died before the request
            os.kill(os.getpid(), signal.SIGKILL)


def end_processes(processes: list, terminate: bool, wait_s: float) -> None:
    """Waits up to `wait_s` for `processes` to end (with `terminate`, after a SIGTERM
    each), then kills those still running (SIGKILL): a worker stopped with SIGSTOP, or
    whose env ignores SIGTERM, would otherwise keep a stop waiting forever."""
    if terminate:
        for process in processes:
            if process.is_alive():
                process.terminate()
    deadline = time.monotonic() + wait_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()


def worker_died(what: str, processes: list) -> WorkerDied:
    """The error naming the first of `processes` found dead. Waits up to a second for
    the death to show: a pipe can read as closed before its process is reaped."""
    deadline = time.monotonic() + 1.0
    while (dead := next((p for p in processes if not p.is_alive()), None)) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if dead is None:
        return WorkerDied(f"{what} closed its pipe unexpectedly")
    how = f"killed by signal {-dead.exitcode}" if dead.exitcode < 0 else f"exit code {dead.exitcode}"
    return WorkerDied(f"{what} (pid {dead.pid}) ended unexpectedly ({how})")


class ErrorReports:
    """A worker's side of AsyncVectorEnv's error queue, gymnasium's worker's too: every
    error an env raised goes as an EnvError with the env's traceback. Only strings cross
    the pipe then: an env's exception class that would not unpickle in the trainer (a
    constructor that takes more than the message) or not pickle at all (a class made on
    the fly) is reported by its name and message, not lost on the way."""

    def __init__(self, queue):
        self.queue = queue

    def put(self, item: tuple) -> None:
        """gymnasium's worker reports (index, type, error, traceback) here."""
        self.put_error(item[0], item[2])

    def put_current(self, index: int) -> None:
        """Puts the error being handled in worker `index`."""
        self.put_error(index, sys.exc_info()[1])

    def put_error(self, index: int, error: BaseException) -> None:
        if isinstance(error, Exception):  # a KeyboardInterrupt goes as itself
            error = EnvError.of(error)
        self.queue.put((index, type(error), error, getattr(error, "trace", "")))


def start_worker(env_fn: Callable[[], Any], index: int, pipe, parent_pipe, error_queue) -> tuple[Any, Any]:
    """Readies an env worker process (init_worker) and makes its env (or group of envs);
    returns it, or None, and the error queue to report through (see ErrorReports).

    If making the env raises, the worker answers the trainer's first command
    (AsyncVectorEnv's space check) with that error, as it would a step's (the error queue,
    then a failure on the pipe), and gets None: gymnasium's own worker dies instead, and
    the trainer reads a closed pipe."""
    init_worker()
    error_queue = ErrorReports(error_queue)
    try:
        return env_fn(), error_queue
    except Exception:
        error_queue.put_current(index)
        parent_pipe.close()
        with contextlib.suppress(EOFError, OSError):  # the trainer is gone
            pipe.recv()
            pipe.send((None, False))
        return None, error_queue


def report_not_closed(error_queue: ErrorReports, index: int, env: gym.Env) -> None:
    """Puts the error `env`'s close() is raising, as an EnvCloseError, for the trainer,
    which reports it once the workers have ended (QuietAsyncVectorEnv.close_extras): a
    worker's own traceback would come once per worker, in the middle of the run's summary."""
    error = EnvCloseError.of(sys.exc_info()[1], failed=f"{env_name(env)} could not be closed")
    error_queue.put_error(index, error)
