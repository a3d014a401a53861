"""Vector env construction with an explicit autoreset mode, and env checks.

fastrl relies on NEXT_STEP autoreset: the step after an episode ends returns that
episode's *final* observation as the state, takes no action and pays reward 0, and
only then the reset observation. The replay ring keeps the final observation
(truncated episodes bootstrap from it) and marks that reset step as a
pseudo-transition that is never learned from.

Backends, all with that rule:
  async    gymnasium's AsyncVectorEnv. With fewer workers than envs (the default:
           one worker per CPU core but the trainer's) each worker process steps a group
           of envs per message, so the pipe round trip is paid once per group, not once
           per env; step messages are raw bytes, not pickles; and each worker runs the
           autoresets of ended episodes right after replying, while the trainer works.
           A worker's group can also be stepped on its own (`send_group`, `ready_groups`,
           `recv_group`), for a collector that acts on each group as soon as it is ready.
  sync     every env in this process, stepped by the same loop as each async worker
           (`EnvGroup`): leaner than gymnasium's SyncVectorEnv, with its semantics.
  envpool  EnvPool's C++ envs (optional extra), whose own autoreset is NEXT_STEP.
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib
import math
import multiprocessing
import multiprocessing.connection
import os
import pickle
import queue
import signal
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import gymnasium as gym
import numpy as np
from gymnasium.vector.async_vector_env import AsyncState
from gymnasium.vector.utils import batch_space, write_to_shared_memory

from fastrl.config import BACKENDS, ConfigError

AUTORESET = gym.vector.AutoresetMode.NEXT_STEP


@dataclass(frozen=True)
class EnvSpec:
    """What the learner needs to know about an env."""

    obs_shape: tuple
    n_actions: int
    reward_threshold: float  # nan when the env registers none
    max_episode_steps: int | None  # the time limit, if any
    render_modes: tuple  # the env's metadata["render_modes"]: what render_mode may be


def _make_one(env_id: str, env_kwargs: dict) -> gym.Env:
    try:
        return gym.make(env_id, **env_kwargs)
    except Exception as exc:
        # The env's own error (a bug, a licence or server it cannot get), from whichever
        # process made it: make_vector_env reports it as an EnvError. The mark survives
        # the pickling that brings a worker's error back.
        exc.fastrl_making_env = True
        raise


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
            env = _make_one(env_id, env_kwargs)
    except gym.error.DependencyNotInstalled as exc:
        raise ConfigError(f"env {env_id!r} needs a missing dependency: {str(exc).splitlines()[0]}") from None
    except Exception as exc:
        if env_kwargs and isinstance(exc, (TypeError, ValueError, AssertionError)):
            # Unknown or bad keyword values: gymnasium and the envs raise all three.
            raise ConfigError(f"invalid env_kwargs={env_kwargs!r} for {env_id}: "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        raise env_error(exc, failed=f"{env_id} could not be made") from None  # its traceback, one line
    obs_space, act_space = env.observation_space, env.action_space
    max_episode_steps = env.spec.max_episode_steps if env.spec is not None else None
    render_modes = tuple(env.metadata.get("render_modes", ()))
    try:
        env.close()
    except Exception as exc:  # said now, rather than when a run that trained closes its envs
        raise env_error(exc, failed=f"{env_id} could not be closed") from None
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


def cpu_capacity() -> float:
    """Cores' worth of CPU time this process may use: the cores it may run on, capped by a
    cgroup CPU quota (docker --cpus=N, a Kubernetes CPU limit), which leaves every core of
    the host in the affinity but grants only N cores' time (N may be fractional: 2.5)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota()
    return float(cores) if quota is None else min(float(cores), quota)


def cpu_cores() -> int:
    """Whole cores to give processes and threads: `cpu_capacity()` rounded up (2.5 -> 3)."""
    return max(1, math.ceil(cpu_capacity()))


def cgroup_cpu_quota(root: str = "/sys/fs/cgroup") -> float | None:
    """The cgroup's CPU quota in cores (2.5 for docker --cpus=2.5), None where there is none."""
    try:
        try:  # cgroup v2: "<quota> <period>", or "max <period>"
            with open(os.path.join(root, "cpu.max")) as f:
                quota, period = f.read().split()
        except FileNotFoundError:  # cgroup v1: the quota (-1: none) and the period, apart
            with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as f:
                quota = f.read().strip()
            with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as f:
                period = f.read().strip()
        if quota == "max" or int(quota) <= 0 or int(period) <= 0:
            return None
        return int(quota) / int(period)
    except (OSError, ValueError):  # no cgroup files (not Linux, not mounted), or unreadable
        return None


def available_memory() -> int | None:
    """Bytes this process may still allocate: the kernel's MemAvailable, capped by a cgroup
    memory limit (docker --memory, a Kubernetes memory limit), which MemAvailable ignores;
    None where it is unknown (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    limit = cgroup_memory_limit()
    return available if limit is None else min(available, limit)


def cgroup_memory_limit(root: str = "/sys/fs/cgroup") -> int | None:
    """The cgroup's memory limit in bytes, None where there is none."""
    for name in ("memory.max", os.path.join("memory", "memory.limit_in_bytes")):  # cgroup v2, v1
        try:
            with open(os.path.join(root, name)) as f:
                text = f.read().strip()
        except OSError:
            continue
        if not text.isdigit():  # v2's "max"
            return None
        return int(text) if int(text) < 2 ** 60 else None  # v1 writes "none" as about 2**63
    return None


def default_workers(num_envs: int, cores: int = 0) -> int:
    """The largest divisor of num_envs not above `cores`. By default, the cores left once
    the trainer process has one: it acts, writes the ring and learns while the workers
    step, and a worker sharing its core waits for it (DDQN on LunarLander, 2 cores:
    1 worker gives 3,400 env steps/s, 2 workers 2,700)."""
    cores = cores or max(1, cpu_cores() - 1)
    return max(w for w in range(1, min(num_envs, cores) + 1) if num_envs % w == 0)


class WorkerDied(RuntimeError):
    """A worker process (env or evaluation) ended while the trainer relied on it."""


class BadEnvOutput(ValueError):
    """An env's reset() or step() returned what does not fit gymnasium's API: the message
    says what (an env's own error has its own traceback; this one has none to show)."""


class EnvError(RuntimeError):
    """An env raised an error (in its step, reset or autoreset): `trace` is its traceback,
    from the process that ran it, for whoever wrote the env. Also an env that gave a
    non-finite reward in an evaluation (no traceback: `trace` is empty)."""

    def __init__(self, message: str, trace: str):
        super().__init__(message)
        self.trace = trace


def env_error(exc: Exception, failed: str = "") -> EnvError:
    """The EnvError for an env's exception (call it where it is handled): raised in this
    process, or re-raised here from an env worker, with the worker's traceback attached
    (see `QuietAsyncVectorEnv`). `failed`: what failed, if not a step or reset
    ("LunarLander-v3 could not be made")."""
    if isinstance(exc, BadEnvOutput):  # not raised by the env: fastrl's frames would be all its traceback
        return EnvError(str(exc), trace="")
    trace = getattr(exc, "env_traceback", None) or traceback.format_exc()
    what = f"{failed}: it raised" if failed else "an env raised"
    name = getattr(exc, "env_error_type", type(exc).__name__)  # a stand-in's (see _PortableErrors)
    return EnvError(f"{what} {name}: {exc}", trace)


def close_envs(close: Callable[[], None], env_id: str, where: str = "") -> None:
    """Calls `close` (a vector env's or an Evaluator's). An env whose close() raises after
    use (one that raises at once is refused by inspect_env) is a warning, not an error:
    the work is done and saved by then, and an error would hide the run's own. Its
    traceback, then one line, on stderr. `where`: the process, if not the trainer."""
    try:
        close()
    except Exception as exc:
        if not getattr(exc, "fastrl_closing_env", False):
            raise
        error = env_error(exc, failed=f"{env_id} could not be closed")
        where = f" (in {where})" if where else ""
        print(f"{error.trace.rstrip()}\nfastrl: warning: {error}{where}", file=sys.stderr, flush=True)


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


def make_vector_env(env_id: str, num_envs: int, backend: str = "async", env_kwargs: dict | None = None,
                    num_workers: int = 0, pin_workers: bool = True) -> gym.vector.VectorEnv:
    """N copies of `env_id` with NEXT_STEP autoreset.

    async: `num_workers` processes (0 = `default_workers`), each pinned to its own core with
    `pin_workers`; num_workers == num_envs is plain AsyncVectorEnv, one process per env.
    `copy=False` makes step() hand back the same observation buffer every time (shared
    memory for async), which the collector copies straight into its staging row.
    """
    try:
        return _vector_env(env_id, num_envs, backend, dict(env_kwargs or {}), num_workers, pin_workers)
    except Exception as exc:
        if not getattr(exc, "fastrl_making_env", False):
            raise
        # Here or in a worker, which reported it (_start_worker).
        raise env_error(exc, failed=f"{env_id} could not be made") from None


def _vector_env(env_id: str, num_envs: int, backend: str, env_kwargs: dict, num_workers: int,
                pin_workers: bool) -> gym.vector.VectorEnv:
    fns = [partial(_make_one, env_id, env_kwargs) for _ in range(num_envs)]
    if backend == "async":
        workers = num_workers or default_workers(num_envs)
        if num_envs % workers:
            raise ConfigError(f"invalid num_workers={workers}: must divide num_envs={num_envs}")
        if workers == num_envs:
            return QuietAsyncVectorEnv(fns, shared_memory=True, copy=False, autoreset_mode=AUTORESET,
                                       worker=_plain_worker)
        return GroupedAsyncVectorEnv(fns, workers, pin_workers)
    if backend == "sync":
        return InProcessVectorEnv(fns)
    if backend == "envpool":
        return EnvPoolVectorEnv(env_id, num_envs, env_kwargs)
    raise ConfigError(f"invalid backend={backend!r}: must be {' or '.join(BACKENDS)}")


# --- the stepping loop, in-process and in every worker -------------------------------------

class EnvGroup:
    """Steps a list of envs with NEXT_STEP autoreset, exactly as gymnasium's vector envs
    step each of theirs, into preallocated arrays. The sync backend runs one group in
    this process; each async worker runs one in its own.

    Autoresets can run early: `reset_ended()` resets the envs whose episode just ended
    and keeps the results for the next step(), which then only hands them out. Async
    workers call it right after replying, so the resets (a tenth of LunarLander's stepping
    time under random actions) run while the trainer works, off the next step's critical
    path. The transitions are the same: the next step would make the very same call.
    """

    def __init__(self, envs: list[gym.Env], observation_space: gym.spaces.Box):
        n = len(envs)
        self.envs = envs
        self.obs = np.zeros(observation_space.shape, dtype=observation_space.dtype)  # [n, *obs]
        self.rewards = np.zeros(n, dtype=np.float64)
        self.terminated = np.zeros(n, dtype=np.bool_)
        self.truncated = np.zeros(n, dtype=np.bool_)
        self._autoreset = np.zeros(n, dtype=np.bool_)
        # Env j's early reset: ((obs, info) or the exception it raised, its RNG state before).
        self._early: list[tuple | None] = [None] * n

    def reset(self, seeds: list, options: dict | None) -> list[tuple[int, dict]]:
        """Resets env j with seeds[j]; returns the non-empty infos as (j, info) pairs.

        An env that already reset early: with no seed and no options, that reset is the
        one this call would make, so its result is used; otherwise its RNG goes back to
        the state before it and the env resets again, which gives what the plain path
        gives for envs whose reset depends only on its arguments and RNG (gymnasium's)."""
        infos = []
        for j, env in enumerate(self.envs):
            if self._early[j] is not None and seeds[j] is None and options is None:
                out = self._take_early(j)
            else:
                self._undo_early(j)
                out = env.reset(seed=seeds[j], options=options)
            self.obs[j], info = self._checked_reset(j, out)
            if info:
                infos.append((j, info))
        self._autoreset[:] = False
        return infos

    def reset_ended(self) -> None:
        """Runs now the autoresets that the next step() would run (see the class docstring)."""
        for j in np.flatnonzero(self._autoreset).tolist():
            if self._early[j] is None:
                env = self.envs[j]
                rng_state = env.np_random.bit_generator.state
                try:
                    result = env.reset()
                except Exception as exc:  # raised where the plain path raises it: at the next step
                    result = exc
                self._early[j] = (result, rng_state)

    def _take_early(self, j: int) -> tuple:
        (result, _), self._early[j] = self._early[j], None
        if isinstance(result, Exception):
            raise result
        return result

    def _undo_early(self, j: int) -> None:
        # Forgets env j's early reset, if any, and puts its RNG back to the state before it.
        if self._early[j] is not None:
            (_, rng_state), self._early[j] = self._early[j], None
            self.envs[j].np_random.bit_generator.state = rng_state

    def step(self, actions: np.ndarray) -> list[tuple[int, dict]]:
        """Steps env j with actions[j] (or resets it, if its episode ended last step);
        returns the non-empty infos as (j, info) pairs."""
        obs, rewards, terminated, truncated, autoreset = (
            self.obs, self.rewards, self.terminated, self.truncated, self._autoreset)
        infos = []
        for j, (env, action) in enumerate(zip(self.envs, actions.tolist())):  # Python ints: cheaper checks
            if autoreset[j]:
                out = env.reset() if self._early[j] is None else self._take_early(j)
                obs[j], info = self._checked_reset(j, out)
                rewards[j], terminated[j], truncated[j] = 0.0, False, False
            else:
                out = env.step(action)
                try:
                    obs[j], rewards[j], terminated[j], truncated[j], info = out
                except (ValueError, TypeError) as exc:
                    raise self._bad_output(j, "step", out, exc) from None
            if info:
                infos.append((j, info))
        np.logical_or(terminated, truncated, out=autoreset)
        return infos

    def _checked_reset(self, j: int, out: Any) -> tuple:
        # Checked once per episode: an observation of a wrong shape that numpy would
        # broadcast into its row without a word (a scalar, shape (1,)) is caught too.
        if not (isinstance(out, tuple) and len(out) == 2 and np.shape(out[0]) == self.obs.shape[1:]):
            raise self._bad_output(j, "reset", out)
        return out

    def _bad_output(self, j: int, call: str, out: Any, exc: Exception | None = None) -> BadEnvOutput:
        """Says what is wrong with what env j's reset() or step() returned, which does not
        fit gymnasium's API (an env written for the old gym API, often)."""
        env = self.envs[j]
        name = env.spec.id if env.spec is not None else type(env.unwrapped).__name__
        form = "(obs, info)" if call == "reset" else "(obs, reward, terminated, truncated, info)"
        if not isinstance(out, tuple) or len(out) != form.count(",") + 1:
            got = f"{len(out)} values" if isinstance(out, tuple) else f"a value of type {type(out).__name__}"
            old_api = isinstance(out, np.ndarray) if call == "reset" else isinstance(out, tuple) and len(out) == 4
            old = " (the old gym API's, which this env follows)" if old_api else ""
            what = f"{got}, not {form} as gymnasium's API (since gym 0.26) has it{old}"
        elif np.shape(out[0]) != self.obs.shape[1:]:
            what = (f"an observation of shape {np.shape(out[0])}, and its observation_space has shape "
                    f"{self.obs.shape[1:]}")
        else:
            bad = next(((k, v) for k, v in zip(("reward", "terminated", "truncated"), out[1:4])
                        if np.ndim(v) != 0 or np.asarray(v).dtype.kind not in "biuf"), None)
            what = f"a {bad[0]} of {bad[1]!r}, which is not a single number" if bad else f"what does not fit: {exc}"
        return BadEnvOutput(f"{name}'s {call}() returned {what}")


class InProcessVectorEnv(gym.vector.VectorEnv):
    """The sync backend: `len(env_fns)` envs in this process, one `EnvGroup`. Env i gets
    seed `seed + i`, as in gymnasium's vector envs. Like `copy=False` there, every step
    returns the same observation array."""

    def __init__(self, env_fns: list[Callable[[], gym.Env]]):
        envs = []
        try:
            for fn in env_fns:
                envs.append(fn())
        except BaseException:
            for env in envs:  # those made before the one that failed
                env.close()
            raise
        self.num_envs = len(envs)
        self.single_observation_space = envs[0].observation_space
        self.single_action_space = envs[0].action_space
        self.metadata = {**envs[0].metadata, "autoreset_mode": AUTORESET}
        self.render_mode = envs[0].render_mode
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self.group = EnvGroup(envs, self.observation_space)

    def reset(self, *, seed: int | list | None = None, options: dict | None = None):
        if seed is None or isinstance(seed, int):
            seed = [None if seed is None else seed + i for i in range(self.num_envs)]
        return self.group.obs, _merge_infos(self, self.group.reset(seed, options), {})

    def step(self, actions):
        g = self.group
        infos = g.step(np.asarray(actions))
        return g.obs, g.rewards.copy(), g.terminated.copy(), g.truncated.copy(), _merge_infos(self, infos, {})

    def close_extras(self, **kwargs: Any) -> None:
        failed = []
        for env in self.group.envs:  # every one, though one before it failed
            try:
                env.close()
            except Exception as exc:
                exc.env_traceback = traceback.format_exc(chain=False)  # from here: the env's own frames
                failed.append(exc)
        if failed:  # the first, marked for close_envs
            self.closed = True
            failed[0].fastrl_closing_env = True
            raise failed[0]


def _merge_infos(vector_env: gym.vector.VectorEnv, pairs, infos: dict, offset: int = 0) -> dict:
    """Adds (env j, info) pairs to gymnasium's batched infos (with `_key` masks) as env offset + j."""
    for j, info in pairs:
        infos = vector_env._add_info(infos, info, offset + j)
    return infos


# --- grouped workers ----------------------------------------------------------------------

_GROUP_INFOS = "fastrl_group_infos"  # carries a group's per-env infos through AsyncVectorEnv

# A step travels as raw bytes, not pickled: it is the hot path (one round trip per worker
# per vector step), and pickling its small arrays costs more than the pipe's own round
# trip. Out: [_STEP | actions int64[G]]; back: [_STEP | rewards float64[G] | terminated
# bool[G] | truncated bool[G]]. A reply with infos or an error, and every other command
# (reset, close, ...), is AsyncVectorEnv's usual pickled message, which never starts
# with _STEP (a pickle starts with its PROTO opcode, 0x80).
_STEP = b"fastrl-step\0\0\0\0\0"  # 16 bytes: the arrays after it stay 8-byte aligned


class _StepRequest:
    """One group's step message, preallocated: `actions` is a view into `buffer`."""

    def __init__(self, group_size: int):
        self.buffer = bytearray(_STEP + bytes(8 * group_size))
        self.actions = np.frombuffer(self.buffer, np.int64, group_size, len(_STEP))


class _StepReply:
    """One group's step results, preallocated: the arrays are views into `buffer`."""

    def __init__(self, group_size: int):
        G, o = group_size, len(_STEP)
        self.buffer = bytearray(_STEP + bytes(10 * G))
        self.rewards = np.frombuffer(self.buffer, np.float64, G, o)
        self.terminated = np.frombuffer(self.buffer, np.bool_, G, o + 8 * G)
        self.truncated = np.frombuffer(self.buffer, np.bool_, G, o + 9 * G)


def _receive(pipe, raw: bytearray) -> Any:
    """The next message on `pipe`: None for a raw step message (now in `raw`), else the
    unpickled object."""
    try:
        size = pipe.recv_bytes_into(raw)
    except multiprocessing.BufferTooShort as exc:  # a pickled message longer than a step
        return pickle.loads(exc.args[0])
    if size == len(raw) and raw.startswith(_STEP):
        return None
    return pickle.loads(raw[:size])


class _PortableErrors:
    """A worker's view of AsyncVectorEnv's error queue: an error whose class would not
    unpickle in the trainer (one whose constructor takes more than the message: the
    trainer's get() would raise a TypeError instead) or not pickle at all (a class made on
    the fly: the item would be dropped, and the trainer wait for it forever) is put as a
    RuntimeError stand-in with its message and its class's name."""

    def __init__(self, queue):
        self.queue = queue

    def put(self, item: tuple) -> None:
        index, _, error, trace = item
        try:
            pickle.loads(pickle.dumps(error))
        except Exception:
            stand_in = RuntimeError(str(error))
            stand_in.env_error_type = type(error).__name__
            for mark in ("fastrl_making_env", "fastrl_closing_env"):
                setattr(stand_in, mark, getattr(error, mark, False))
            error = stand_in
        self.queue.put((index, type(error), error, trace))

    def put_current(self, index: int) -> None:
        """Puts the error being handled in worker `index`, with its traceback (the env's
        own frames, if it carries them: see InProcessVectorEnv.close_extras)."""
        error_type, error, _ = sys.exc_info()
        self.put((index, error_type, error, getattr(error, "env_traceback", None) or traceback.format_exc()))


def _start_worker(env_fn: Callable[[], Any], index: int, pipe, parent_pipe, error_queue) -> tuple[Any, Any]:
    """Readies an env worker process (init_worker) and makes its env (or group of envs);
    returns it, or None, and the error queue to report through (see _PortableErrors).

    If making the env raises, the worker answers the trainer's first command
    (AsyncVectorEnv's space check) with that error, as it would a step's (the error queue,
    then a failure on the pipe), and gets None: gymnasium's own worker dies instead, and
    the trainer reads a closed pipe."""
    init_worker()
    error_queue = _PortableErrors(error_queue)
    try:
        return env_fn(), error_queue
    except Exception:
        error_queue.put_current(index)
        parent_pipe.close()
        with contextlib.suppress(EOFError, OSError):  # the trainer is gone
            pipe.recv()
            pipe.send((None, False))
        return None, error_queue


def _report_not_closed(error_queue: _PortableErrors, index: int) -> None:
    """Puts the error an env's close() is raising (marked for close_envs) for the trainer,
    which reports it once the workers have ended (QuietAsyncVectorEnv.close_extras): a
    worker's own traceback would come once per worker, in the middle of the run's summary."""
    sys.exc_info()[1].fastrl_closing_env = True
    error_queue.put_current(index)


def _plain_worker(index, env_fn, pipe, parent_pipe, shared_memory, error_queue, autoreset_mode, semaphore):
    """gymnasium's AsyncVectorEnv worker, readied as a worker (init_worker), and reporting
    an env that cannot be made (see _start_worker) or closed."""
    env, error_queue = _start_worker(env_fn, index, pipe, parent_pipe, error_queue)
    if env is not None:
        try:
            gym.vector.async_vector_env._async_worker(index, lambda: env, pipe, parent_pipe, shared_memory,
                                                      error_queue, autoreset_mode, semaphore)
        # Its last act, env.close(), raised: the env's own errors go to the queue in it. (Or
        # it could not send one because the trainer is gone, and then no one reads this.)
        except Exception:
            _report_not_closed(error_queue, index)


def _make_group(env_fns: list[Callable[[], gym.Env]], core: int | None, trainer: int) -> InProcessVectorEnv:
    # AsyncVectorEnv builds one of these in the trainer (pid `trainer`) as a probe for
    # spaces and metadata; in a worker, `_group_worker` steps its EnvGroup.
    if core is not None and os.getpid() != trainer:
        _pin_to_core(core)
    return InProcessVectorEnv(env_fns)


def _group_worker(index, env_fn, pipe, parent_pipe, shared_memory, error_queue, autoreset_mode, semaphore):
    """An AsyncVectorEnv worker (same signature and protocol as gymnasium's own, but for
    raw step messages) that steps a group of envs per message."""
    local, error_queue = _start_worker(env_fn, index, pipe, parent_pipe, error_queue)
    if local is None:
        return
    parent_pipe.close()
    group, space = local.group, local.observation_space
    request, reply = _StepRequest(local.num_envs), _StepReply(local.num_envs)
    # The group writes its step results straight into the reply message.
    group.rewards, group.terminated, group.truncated = reply.rewards, reply.terminated, reply.truncated
    try:
        while True:
            message = _receive(pipe, request.buffer)
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
            _report_not_closed(error_queue, index)


def _pin_to_core(index: int) -> None:
    # Workers are woken together every step; left to the scheduler, two of them often
    # share a core for a while (wake-affine placement). One core each keeps them parallel.
    # From the last core down: with fewer workers than cores the first stays free for
    # the trainer.
    if hasattr(os, "sched_setaffinity"):
        allowed = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {allowed[-1 - index % len(allowed)]})


def _pack(infos: list[tuple[int, dict]]) -> dict:
    # Empty infos (the usual case) cost nothing; others travel as (env-in-group, info) pairs.
    return {_GROUP_INFOS: tuple(infos)} if infos else {}


class QuietAsyncVectorEnv(gym.vector.AsyncVectorEnv):
    """gymnasium's AsyncVectorEnv, but a worker's error is raised with the worker's traceback
    attached (`env_traceback`, see `env_error`) rather than logged as warnings: gymnasium's
    logger also fails on a '%' in the traceback, raising a TypeError instead of the error.
    If starting fails (an env that cannot be made), no worker is left running."""

    def __init__(self, *args, **kwargs):
        self._not_closed: list[tuple] = []  # error reports of envs whose close() raised
        try:
            super().__init__(*args, **kwargs)
        except BaseException:
            if hasattr(self, "processes"):
                self._state = AsyncState.DEFAULT  # nothing to wait for: end them
                self.close(terminate=True)
            raise

    def _raise_if_errors(self, successes) -> None:
        if all(successes):  # every step, in plain AsyncVectorEnv's step_wait: nothing more
            return
        errors = []
        while len(errors) < len(successes) - sum(successes):
            report = self.error_queue.get()  # a failed worker closes its env next: its report may be next
            (self._not_closed if getattr(report[2], "fastrl_closing_env", False) else errors).append(report)
        for index, *_ in errors:  # as gymnasium does: the failed workers' pipes are closed
            self.parent_pipes[index].close()
            self.parent_pipes[index] = None
        self._state = AsyncState.DEFAULT
        raise self._error(errors[-1])

    @staticmethod
    def _error(report: tuple) -> BaseException:
        # A worker's error report (index, type, error, traceback) -> the error to raise here.
        _, exctype, value, trace = report
        error = value if isinstance(value, BaseException) else exctype(value)
        error.env_traceback = trace
        return error

    def close_extras(self, timeout: float | None = None, terminate: bool = False) -> None:
        super().close_extras(timeout=timeout, terminate=terminate)
        # Raises the first env error from a close() in a worker (see _report_not_closed).
        # Every worker has ended, so its reports are all in the queue; none is read if one
        # was killed (terminate: a report it was writing then would never end).
        if any(p.exitcode != 0 for p in self.processes):
            return
        reports = []
        with contextlib.suppress(queue.Empty):
            while True:
                reports.append(self.error_queue.get_nowait())
        not_closed = self._not_closed + [r for r in reports if getattr(r[2], "fastrl_closing_env", False)]
        if not_closed:
            self.closed = True
            raise self._error(not_closed[0])


class GroupedAsyncVectorEnv(gym.vector.VectorEnv):
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
        self._requests = [_StepRequest(G) for _ in range(num_workers)]
        self._replies = [_StepReply(G) for _ in range(num_workers)]
        self._pending = [False] * num_workers  # worker w owes a step reply
        # step_wait()'s rewards, terminated, truncated [N]: every worker's reply copied in, no allocation
        self._results = (np.zeros(self.num_envs, np.float64), np.zeros(self.num_envs, np.bool_),
                         np.zeros(self.num_envs, np.bool_))

    def reset(self, *, seed: int | list | None = None, options: dict | None = None):
        if any(self._pending):
            raise gym.error.AlreadyPendingCallError("Calling `reset` while waiting for a pending call to `step`",
                                                    "step")
        if seed is None or isinstance(seed, int):
            seed = [None if seed is None else seed + i for i in range(self.num_envs)]
        G = self.group_size
        _, infos = self.workers.reset(seed=[seed[w * G:(w + 1) * G] for w in range(self.num_workers)],
                                      options=options)
        infos_by_worker = infos.get(_GROUP_INFOS, [None] * self.num_workers)
        return self._obs, self._merge_group_infos(enumerate(infos_by_worker), {})

    def step_async(self, actions) -> None:
        if any(self._pending):
            raise gym.error.AlreadyPendingCallError("Calling `step_async` while waiting for a pending call to "
                                                    "`step`", "step")
        actions = np.asarray(actions).reshape(self.num_workers, self.group_size)
        for w in range(self.num_workers):
            self.send_group(w, actions[w])

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

    # Per worker, for a collector that acts on each group as soon as it has stepped,
    # without waiting for the others (step_async/step_wait are these for every worker).

    def send_group(self, w: int, actions) -> None:
        """Sends worker w its group's actions [G] (no step of that worker may be pending)."""
        if self.closed:
            raise gym.error.ClosedEnvironmentError("GroupedAsyncVectorEnv: a step after close()")
        if self._pending[w]:
            raise gym.error.AlreadyPendingCallError(f"worker {w} is still stepping", "step")
        request = self._requests[w]
        request.actions[:] = actions
        self.workers.parent_pipes[w].send_bytes(request.buffer)
        self._pending[w] = True

    def ready_groups(self) -> list[int]:
        """The workers whose step reply has arrived, waiting until there is at least one."""
        pending = [pipe for w, pipe in enumerate(self.workers.parent_pipes) if self._pending[w]]
        if not pending:
            raise gym.error.NoAsyncCallError("Calling `ready_groups` without any step in flight", "step")
        ready = multiprocessing.connection.wait(pending)
        return [w for w, pipe in enumerate(self.workers.parent_pipes) if pipe in ready]

    def recv_group(self, w: int):
        """Worker w's step: (obs [G, *obs] in shared memory, rewards, terminated, truncated,
        its (env-in-group, info) pairs); the arrays are reused by its next step. Raises the
        worker's error, as step_wait() does."""
        pipe, reply, G = self.workers.parent_pipes[w], self._replies[w], self.group_size
        message = _receive(pipe, reply.buffer)
        self._pending[w] = False
        pairs = ()
        if message is not None:  # pickled: with infos, or a worker's error
            result, success = message
            if not success:  # closes the failed worker's pipe and raises its error
                self.workers._raise_if_errors([v != w for v in range(self.num_workers)])
            _, reply.rewards[:], reply.terminated[:], reply.truncated[:], group_infos = result
            pairs = group_infos[_GROUP_INFOS]
        return self._obs[w * G:(w + 1) * G], reply.rewards, reply.terminated, reply.truncated, pairs

    def step(self, actions):
        self.step_async(actions)
        return self.step_wait()

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
            infos = _merge_infos(self, pairs or (), infos, w * self.group_size)
        return infos


# --- EnvPool ------------------------------------------------------------------------------

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
            import envpool
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
        if seed is not None:  # EnvPool takes its seed when it is built
            self.pool.close()
            self.pool = self._make(seed=seed)
        with _quiet_envpool():
            return self.pool.reset()

    def step_async(self, actions) -> None:
        self.pool.send(np.asarray(actions, dtype=np.int32))

    def step_wait(self, timeout: float | None = None):  # EnvPool's recv has no timeout
        return self.pool.recv()

    def step(self, actions):
        self.step_async(actions)
        return self.step_wait()

    def close_extras(self, **kwargs: Any) -> None:
        self.pool.close()
