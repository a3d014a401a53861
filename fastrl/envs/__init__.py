"""The env layer: N copies of a gymnasium env behind one VectorEnv interface, every
backend with NEXT_STEP autoreset (see `fastrl.envs.group`).

  spec.py       EnvSpec and inspect_env: what the learner needs to know, checked up front
  group.py      EnvGroup, the stepping loop of the sync backend and of every async worker
  workers.py    the async backend: grouped worker processes and their pipe protocol
  process.py    an env worker process: readying it, making its envs, reporting their errors
  gym_async.py  the one place that leans on gymnasium's private AsyncVectorEnv internals
  envpool.py    the envpool backend: EnvPool's C++ envs (optional extra)
  ray_groups.py the ray backend: env groups as Ray actors on a cluster's nodes (optional extra)
"""
from __future__ import annotations

import sys
from functools import partial
from typing import Callable

import gymnasium as gym

from fastrl.config import BACKENDS
from fastrl.envs.envpool import EnvPoolVectorEnv
from fastrl.envs.group import AUTORESET, InProcessVectorEnv
from fastrl.envs.gym_async import QuietAsyncVectorEnv, plain_worker
from fastrl.envs.spec import EnvSpec, inspect_env, make_env
from fastrl.envs.workers import GroupedAsyncVectorEnv
from fastrl.errors import ConfigError, EnvCloseError
from fastrl.system import default_workers

__all__ = ["AUTORESET", "EnvSpec", "close_envs", "inspect_env", "make_vector_env"]


def make_vector_env(env_id: str, num_envs: int, backend: str = "async", env_kwargs: dict | None = None,
                    num_workers: int = 0, pin_workers: bool = True, ray_address: str = "") -> gym.vector.VectorEnv:
    """N copies of `env_id` with NEXT_STEP autoreset.

    async: `num_workers` processes (0 = `default_workers`), each pinned to its own core with
    `pin_workers`; num_workers == num_envs is plain AsyncVectorEnv, one process per env.
    ray: `num_workers` Ray actors (0 = `default_workers`) on the cluster at `ray_address`.
    `copy=False` makes step() hand back the same observation buffer every time (shared
    memory for async), which the collector copies straight into its staging row.
    """
    env_kwargs = dict(env_kwargs or {})
    fns = [partial(make_env, env_id, env_kwargs) for _ in range(num_envs)]
    if backend == "async":
        workers = num_workers or default_workers(num_envs)
        if num_envs % workers:
            raise ConfigError(f"invalid num_workers={workers}: must divide num_envs={num_envs}")
        if workers == num_envs:
            return QuietAsyncVectorEnv(fns, shared_memory=True, copy=False, autoreset_mode=AUTORESET,
                                       worker=plain_worker)
        return GroupedAsyncVectorEnv(fns, workers, pin_workers)
    if backend == "sync":
        return InProcessVectorEnv(fns)
    if backend == "envpool":
        return EnvPoolVectorEnv(env_id, num_envs, env_kwargs)
    if backend == "ray":
        from fastrl.envs.ray_groups import RayVectorEnv  # Ray is an optional extra

        return RayVectorEnv(env_id, env_kwargs, num_envs, num_workers or default_workers(num_envs), ray_address)
    raise ConfigError(f"invalid backend={backend!r}: must be {' or '.join(BACKENDS)}")


def close_envs(close: Callable[[], None], where: str = "") -> None:
    """Calls `close` (a vector env's or an Evaluator's). An env whose close() raises after
    use (one that raises at once is refused by inspect_env) is a warning, not an error:
    the work is done and saved by then, and an error would hide the run's own. Its
    traceback, then one line, on stderr. `where`: the process, if not the trainer."""
    try:
        close()
    except EnvCloseError as error:
        where = f" (in {where})" if where else ""
        print(f"{error.trace.rstrip()}\nfastrl: warning: {error}{where}", file=sys.stderr, flush=True)
